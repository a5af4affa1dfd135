"""value_grad_and_stats: a drop-in for jax.value_and_grad that also captures every Dense layer.

These tests check the capture's contract with the user's code (values, gradients, which layers are
captured and where their statistics sit), not the factor maths, which tests/test_truths.py covers.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax

BATCH = 11  # Distinct from every layer width below, so a batch-sized axis is recognisable.


def _key(i):
  return jax.random.key(i)


def _normal(seed, shape):
  # NumPy data: eager jax.random would compile one kernel per shape.
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _init(model, *args, **kwargs):
  """Variables shaped as model.init makes them, filled with NumPy random values (no compile)."""
  shapes = jax.eval_shape(lambda *a: model.init(_key(1), *a, **kwargs), *args)
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):  # BatchNorm's running variance.
      return np.ones(leaf.shape, leaf.dtype)
    return (0.5 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _stats_paths(stats):
  """The nested paths of stats.layers at which a LayerStatistics sits."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      stats.layers, is_leaf=lambda x: isinstance(x, tkfac_jax.LayerStatistics)
  )
  return {tuple(k.key if hasattr(k, "key") else k.idx for k in kp) for kp, _ in leaves}


def _node(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _assert_trees_close(actual, expected):
  """The same values through another float32 route: references.SAME_MATHS of each leaf's scale."""
  references.assert_trees_close(actual, expected, references.SAME_MATHS)


def _assert_stats_fit_params(stats, params, dense_paths):
  """Statistics sit exactly at the layer nodes, sized by those nodes' kernel (and bias)."""
  assert _stats_paths(stats) == set(dense_paths)
  for path in dense_paths:
    node, layer = _node(params, path), _node(stats.layers, path)
    d_in, d_out = int(np.prod(node["kernel"].shape[:-1])), node["kernel"].shape[-1]
    d_in += "bias" in node
    assert layer.phi.shape == (d_in, d_in)
    assert layer.psi.shape == (d_out, d_out)
    assert layer.delta.shape == ()
    assert all(np.all(np.isfinite(x)) for x in layer)
    assert float(layer.delta) > 0.0


# Models.


class Block(nn.Module):
  """A setup-style submodule holding Dense layers, one in a list."""

  width: int

  def setup(self):
    self.inner = nn.Dense(self.width)
    self.stack = [nn.Dense(self.width), nn.Dense(self.width, use_bias=False)]

  def __call__(self, x):
    x = nn.tanh(self.inner(x))
    for layer in self.stack:
      x = nn.tanh(layer(x))
    return x


class Nested(nn.Module):
  """A compact module containing a setup-style submodule, itself containing Dense layers."""

  @nn.compact
  def __call__(self, x):
    x = Block(6, name="encoder")(x)
    return nn.Dense(3, name="head")(x)


class Compact(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(7)(x))
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


class ConvNorm(nn.Module):
  """Conv and LayerNorm layers (not captured) between Dense layers (captured)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.LayerNorm()(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x)


class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(nn.relu(x))


class DropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = nn.relu(nn.Dense(6)(x))
    x = nn.Dropout(0.5)(x, deterministic=deterministic)
    return nn.Dense(3)(x)


class Sequence(nn.Module):
  """Dense layers applied at several positions per example, one of them twice (shared weights)."""

  @nn.compact
  def __call__(self, x):  # x: [B, T, 4]
    shared = nn.Dense(4, name="shared")
    x = shared(nn.tanh(shared(x)))
    return nn.Dense(3, name="out")(x).mean(axis=1)


def _data(batch=BATCH, d_in=4, d_out=3, seed=0):
  return _normal(seed, (batch, d_in)), _normal(seed + 100, (batch, d_out))


def _capture(loss_fn, **kwargs):
  """The jitted capture: how a train step uses it (and much faster to compile than op by op)."""
  return jax.jit(tkfac_jax.value_grad_and_stats(loss_fn, **kwargs))


def _capture_and_reference(loss_fn, **kwargs):
  """Jitted ``(value_grad_and_stats(...)(*args), jax.value_and_grad(...)(*args))``."""
  capture = tkfac_jax.value_grad_and_stats(loss_fn, **kwargs)
  reference = jax.value_and_grad(loss_fn, **kwargs)
  return jax.jit(lambda *args: (capture(*args), reference(*args)))


def _mse_loss(model):
  def loss_fn(params, x, y):
    return jnp.mean(jnp.sum((model.apply({"params": params}, x) - y) ** 2, axis=-1))

  return loss_fn


# Values and gradients equal jax.value_and_grad.


@pytest.mark.parametrize(
    "model, dense_paths",
    [
        (
            Nested(),
            [
                ("encoder", "inner"),
                ("encoder", "stack_0"),
                ("encoder", "stack_1"),
                ("head",),
            ],
        ),
        (Block(3), [("inner",), ("stack_0",), ("stack_1",)]),
        (Compact(), [("Dense_0",), ("Dense_1",), ("Dense_2",)]),
    ],
    ids=["nested", "setup", "compact"],
)
def test_matches_value_and_grad_and_mirrors_params(model, dense_paths):
  """Loss and grads equal jax.value_and_grad's; stats sit at exactly the Dense parameter nodes."""
  x, y = _data()
  params = _init(model, x)["params"]
  loss_fn = _mse_loss(model)
  (loss, grads, stats), (ref_loss, ref_grads) = _capture_and_reference(loss_fn)(params, x, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  assert isinstance(stats, tkfac_jax.Statistics)
  assert stats.curvature == "tkfac"
  _assert_stats_fit_params(stats, params, dense_paths)


def test_conv_and_layernorm_get_grads_but_layernorm_no_stats():
  """Conv and LayerNorm parameters are differentiated as usual; LayerNorm is not captured."""
  x, y = _normal(0, (BATCH, 5, 5, 2)), _normal(1, (BATCH, 3))
  model = ConvNorm()
  params = _init(model, x)["params"]
  loss_fn = _mse_loss(model)
  (loss, grads, stats), (ref_loss, ref_grads) = _capture_and_reference(loss_fn)(params, x, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  assert np.abs(grads["Conv_0"]["kernel"]).sum() > 0
  assert np.abs(grads["LayerNorm_0"]["scale"]).sum() > 0
  _assert_stats_fit_params(stats, params, [("Conv_0",), ("Dense_0",), ("Dense_1",)])


def test_several_locations_and_shared_weights():
  """A Dense on [B, T, d] and one applied twice: exact grads, one factor-sized entry per layer."""
  x, y = _normal(0, (BATCH, 5, 4)), _normal(1, (BATCH, 3))
  model = Sequence()
  params = _init(model, x)["params"]
  loss_fn = _mse_loss(model)
  (loss, grads, stats), (ref_loss, ref_grads) = _capture_and_reference(loss_fn)(params, x, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  _assert_stats_fit_params(stats, params, [("shared",), ("out",)])


def test_batchnorm_with_mutable_batch_stats_through_has_aux():
  """A BatchNorm model returning its new batch_stats as aux gives the same loss, aux and grads."""
  x, y = _data()
  model = BatchNormNet()
  variables = _init(model, x, train=False)
  batch_stats = variables["batch_stats"]

  def loss_fn(params, batch_stats, x, y):
    out, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.mean((out - y) ** 2), updates["batch_stats"]

  ((loss, new_stats), grads, stats), ((ref_loss, ref_new_stats), ref_grads) = (
      _capture_and_reference(loss_fn, has_aux=True)(variables["params"], batch_stats, x, y)
  )
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(new_stats, ref_new_stats)
  _assert_trees_close(grads, ref_grads)
  # The running mean moved, so the batch statistics really went through aux.
  moved = references.max_error(new_stats["BatchNorm_0"]["mean"], batch_stats["BatchNorm_0"]["mean"])
  assert moved > 1e-3
  _assert_stats_fit_params(stats, variables["params"], [("Dense_0",), ("Dense_1",)])


def test_dropout_with_rng_passed_in():
  """With the dropout key as an argument, the loss and grads are those of jax.value_and_grad."""
  x, y = _data()
  model = DropoutNet()
  params = _init(model, x, deterministic=True)["params"]

  def loss_fn(params, x, y, rng):
    out = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": rng})
    return jnp.mean((out - y) ** 2)

  step = _capture_and_reference(loss_fn)
  (loss, grads, stats), (ref_loss, ref_grads) = step(params, x, y, _key(7))
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  # Dropout is active: another key gives another loss.
  (other_loss, _, _), _ = step(params, x, y, _key(8))
  assert not np.isclose(float(loss), float(other_loss))
  _assert_stats_fit_params(stats, params, [("Dense_0",), ("Dense_1",)])


def test_has_aux_returns_aux_unchanged():
  """has_aux=True returns ((loss, aux), grads, stats), with aux as the loss returned it."""
  x, y = _data()
  model = Compact()
  params = _init(model, x)["params"]

  def loss_fn(params, x, y):
    out = model.apply({"params": params}, x)
    return jnp.mean((out - y) ** 2), {"out": out, "tag": jnp.int32(3)}

  ((loss, aux), grads, stats), ((ref_loss, ref_aux), ref_grads) = _capture_and_reference(
      loss_fn, has_aux=True
  )(params, x, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(aux, ref_aux)
  _assert_trees_close(grads, ref_grads)
  _assert_stats_fit_params(stats, params, [("Dense_0",), ("Dense_1",), ("Dense_2",)])


def test_argnums_one():
  """argnums=1 differentiates and captures the second argument only."""
  x, y = _data()
  model = Compact()
  params = _init(model, x)["params"]

  def loss_fn(x, params, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  step = _capture_and_reference(loss_fn, argnums=1)
  (loss, grads, stats), (ref_loss, ref_grads) = step(x, params, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  _assert_stats_fit_params(stats, params, [("Dense_0",), ("Dense_1",), ("Dense_2",)])


def test_tuple_argnums_and_the_optimizer_accepts_them():
  """Tuple argnums: grads are a tuple; stats sit under each argument's index, as init() sees it."""
  x, y = _data()
  encoder, head = nn.Dense(5), Compact()
  enc_params = _init(encoder, x)["params"]
  head_params = _init(head, np.zeros((1, 5), np.float32))["params"]

  def loss_fn(enc_params, x, head_params, y):
    h = nn.tanh(encoder.apply({"params": enc_params}, x))
    return jnp.mean((head.apply({"params": head_params}, h) - y) ** 2)

  step = _capture_and_reference(loss_fn, argnums=(0, 2))
  (loss, grads, stats), (ref_loss, ref_grads) = step(enc_params, x, head_params, y)
  _assert_trees_close(loss, ref_loss)
  assert isinstance(grads, tuple) and len(grads) == 2
  _assert_trees_close(grads, ref_grads)
  both = (enc_params, head_params)
  _assert_stats_fit_params(
      stats, both, [(0,), (1, "Dense_0"), (1, "Dense_1"), (1, "Dense_2")]
  )
  # The optimizer initialised on the same tuple accepts these statistics.
  tx = optax.chain(tkfac_jax.scale_by_tkfac(1e-2), optax.scale(-0.1))
  state = jax.jit(tx.init)(both)
  updates, _ = jax.jit(tx.update)(grads, state, both, stats=stats)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


# Where the statistics sit.


def test_params_nested_under_an_extra_key():
  """Differentiating the whole variables dict puts stats under 'params', like the grads."""
  x, y = _data()
  model = Nested()
  variables = _init(model, x)

  def loss_fn(variables, x, y):
    return jnp.mean((model.apply(variables, x) - y) ** 2)

  (loss, grads, stats), (ref_loss, ref_grads) = _capture_and_reference(loss_fn)(variables, x, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  _assert_stats_fit_params(
      stats,
      variables,
      [
          ("params", "encoder", "inner"),
          ("params", "encoder", "stack_0"),
          ("params", "encoder", "stack_1"),
          ("params", "head"),
      ],
  )


def test_frozen_dict_params_give_the_dict_statistics_and_grads():
  """Params in a Flax FrozenDict (old checkpoints, flax.core.freeze) are captured like a dict's,
  and the gradient keeps the FrozenDict type."""
  x, y = _data()
  model = Nested()
  variables = _init(model, x)

  def loss_fn(variables, x, y):
    return jnp.mean((model.apply(variables, x) - y) ** 2)

  capture = tkfac_jax.value_grad_and_stats(loss_fn)
  _, grads, stats = capture(variables, x, y)
  _, frozen_grads, frozen_stats = capture(flax.core.freeze(variables), x, y)
  assert isinstance(frozen_grads, flax.core.FrozenDict)
  _assert_trees_close(flax.core.unfreeze(frozen_grads), grads)
  _assert_trees_close(frozen_stats.layers, stats.layers)
  assert _stats_paths(frozen_stats) == _stats_paths(stats) != set()


def test_model_that_is_a_single_dense():
  """For a bare nn.Dense, params is the layer's own node, so stats.layers is its LayerStatistics."""
  x, y = _data()
  model = nn.Dense(3)
  params = _init(model, x)["params"]
  step = _capture_and_reference(_mse_loss(model))
  (loss, grads, stats), (ref_loss, ref_grads) = step(params, x, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  assert isinstance(stats.layers, tkfac_jax.LayerStatistics)
  assert stats.layers.phi.shape == (5, 5)
  assert stats.layers.psi.shape == (3, 3)
  # And the optimizer takes it as it comes.
  tx = optax.chain(tkfac_jax.scale_by_tkfac(1e-2), optax.scale(-0.1))
  updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params, stats=stats)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_frozen_dense_from_a_closure_is_not_captured():
  """A Dense whose parameters are closed over (not differentiated) has no statistics."""
  x, y = _data()
  model = Compact()
  params = _init(model, x)["params"]
  frozen = {"Dense_0": params["Dense_0"]}
  trainable = {k: v for k, v in params.items() if k != "Dense_0"}

  def loss_fn(trainable, x, y):
    return jnp.mean((model.apply({"params": {**frozen, **trainable}}, x) - y) ** 2)

  (loss, grads, stats), (ref_loss, ref_grads) = _capture_and_reference(loss_fn)(trainable, x, y)
  _assert_trees_close(loss, ref_loss)
  _assert_trees_close(grads, ref_grads)
  _assert_stats_fit_params(stats, trainable, [("Dense_1",), ("Dense_2",)])


def test_curvature_kfac_is_recorded():
  """curvature='kfac' is carried on the statistics (for the optimizer's check)."""
  x, y = _data()
  model = Compact()
  params = _init(model, x)["params"]
  _, _, stats = _capture(_mse_loss(model), curvature="kfac")(params, x, y)
  assert stats.curvature == "kfac"
  _assert_stats_fit_params(stats, params, [("Dense_0",), ("Dense_1",), ("Dense_2",)])


# Inside jit, and what leaves the step.


def test_under_jit_with_different_batch_sizes():
  """One jitted capture serves several batch sizes; the statistics' shapes do not depend on B."""
  model = Nested()
  params = _init(model, np.zeros((1, 4), np.float32))["params"]
  capture = tkfac_jax.value_grad_and_stats(_mse_loss(model))
  reference = jax.value_and_grad(_mse_loss(model))
  traces = []

  @jax.jit
  def step(params, x, y):
    traces.append(x.shape[0])
    return capture(params, x, y), reference(params, x, y)

  shapes = []
  for batch, seed in [(BATCH, 0), (17, 1), (BATCH, 2)]:
    x, y = _data(batch, seed=seed)
    (loss, grads, stats), expected = step(params, x, y)
    _assert_trees_close((loss, grads), expected)
    shapes.append(jax.tree.map(jnp.shape, stats))
  assert shapes[0] == shapes[1] == shapes[2]
  assert traces == [BATCH, 17]  # A new shape retraces; a repeated one does not.


def test_statistics_are_factor_sized():
  """No leaf of the statistics has a batch-sized axis: no per-example activation leaves the step."""
  model = ConvNorm()
  x, y = _normal(0, (BATCH, 5, 5, 2)), _normal(1, (BATCH, 3))
  params = _init(model, x)["params"]
  widths = {d for leaf in jax.tree.leaves(params) for d in leaf.shape}
  assert BATCH not in widths and BATCH + 1 not in widths
  _, _, stats = _capture(_mse_loss(model))(params, x, y)
  for leaf in jax.tree.leaves(stats):
    assert BATCH not in leaf.shape


def test_compiled_step_outputs_only_loss_grads_and_factors():
  """The compiled step outputs the loss, param-sized grads and factor-sized stats, whatever B."""
  model = Compact()
  params = _init(model, np.zeros((1, 4), np.float32))["params"]
  step = _capture(_mse_loss(model))
  factor_bytes = 4 * sum(
      (k.shape[0] + 1) ** 2 + k.shape[1] ** 2 + 1
      for k in (params[name]["kernel"] for name in params)
  )
  param_bytes = 4 * sum(leaf.size for leaf in jax.tree.leaves(params))
  compiled_output_bytes = []
  for batch in (BATCH, 64):
    x, y = _data(batch)
    lowered = step.lower(params, x, y)
    out_leaves = jax.tree.leaves(lowered.out_info)
    for leaf in out_leaves:
      assert batch not in leaf.shape
    out_bytes = sum(np.prod(leaf.shape, dtype=int) * leaf.dtype.itemsize for leaf in out_leaves)
    assert out_bytes == 4 + param_bytes + factor_bytes  # Loss, grads, statistics; nothing else.
    analysis = lowered.compile().memory_analysis()
    if analysis is not None:
      compiled_output_bytes.append(analysis.output_size_in_bytes)
  # What the executable hands back does not grow with the batch.
  assert len(set(compiled_output_bytes)) <= 1


def test_unbatched_input_raises_naming_the_layer():
  """A Dense applied to a 1-D input (no batch axis) raises a ValueError that names the layer."""
  model = Nested()
  params = _init(model, np.zeros((1, 4), np.float32))["params"]

  def loss_fn(params, x):
    return jnp.sum(model.apply({"params": params}, x) ** 2)

  with pytest.raises(ValueError, match="encoder/inner"):
    tkfac_jax.value_grad_and_stats(loss_fn)(params, np.ones(4, np.float32))
