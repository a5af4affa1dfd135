"""Flax NNX models: the same statistics and updates as the equivalent linen model with the same
weights (so every linen truth test carries over), through ``nnx.Optimizer``.

The reference for each NNX layer type is the linen layer it mirrors (``nnx.Linear`` and
``nn.Dense``, ``nnx.LinearGeneral`` and ``nn.DenseGeneral``, ``nnx.Conv`` and ``nn.Conv``,
``nnx.Embed`` and ``nn.Embed``, ``nnx.MultiHeadAttention`` and ``nn.MultiHeadDotProductAttention``),
whose capture the truth tests check against brute-force per-example Fisher blocks.
"""

import doctest

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax

nnx = pytest.importorskip("flax.nnx", reason="flax.nnx does not import with this flax and jax",
                         exc_type=ImportError)
if not hasattr(nnx, "iter_modules"):
  pytest.skip(f"tkfac_jax.nnx needs flax >= 0.12.2 (this is {flax.__version__})",
              allow_module_level=True)

BATCH = 8


def test_docstring_examples():
  import tkfac_jax.nnx  # pylint: disable=g-import-not-at-top

  result = doctest.testmod(tkfac_jax.nnx, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 7, rngs=rngs)
    self.out = nnx.Linear(7, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(7, name="hidden")(x)))


class _NnxConv(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), strides=(2, 1), padding="SAME", rngs=rngs)
    self.out = nnx.Linear(6 * 6 * 3, 3, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.conv(x))
    return self.out(x.reshape(x.shape[0], -1))


class _LinenConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), strides=(2, 1), padding="SAME", name="conv")(x))
    return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


class _NnxAttention(nnx.Module):
  """Embedding, attention (LinearGeneral query/key/value with two output axes, and an output
  projection contracting two input axes), a head: the layers of a transformer."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
    self.head = nnx.Linear(8, 11, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attention(x, mask=nn.make_causal_mask(tokens))
    return self.head(x)


class _LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8, name="embed")(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(
        x, x, mask=nn.make_causal_mask(tokens)
    )
    return nn.Dense(11, name="head")(x)


def _data(kind):
  rng = np.random.default_rng(0)
  if kind == "attention":
    tokens = jnp.asarray(rng.integers(0, 11, (BATCH, 6)), jnp.int32)
    return tokens, jnp.asarray(rng.integers(0, 11, (BATCH, 6)), jnp.int32)
  shape = (5,) if kind == "mlp" else (12, 6, 2)
  x = jnp.asarray(rng.standard_normal((BATCH,) + shape), jnp.float32)
  return x, jnp.asarray(rng.integers(0, 3, BATCH), jnp.int32)


_MODELS = {"mlp": (_NnxMLP, _LinenMLP), "conv": (_NnxConv, _LinenConv),
           "attention": (_NnxAttention, _LinenAttention)}


def _models(kind):
  nnx_cls, linen_cls = _MODELS[kind]
  model = nnx_cls(nnx.Rngs(0))
  params = jax.tree.map(lambda x: x, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return model, linen_cls(), params


def _moved(params, start):
  """The parameters' displacement from ``start`` (what TRAJECTORY is relative to)."""
  return jax.tree.map(lambda p, s: p - s, params, start)


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Both sides of every comparison run the same update; Cholesky inverses make it a smaller program
# to compile than Newton-Schulz's (tested on its own in test_inverses and test_spread_refresh).
INVERSES = "cholesky"


# K-FAC's statistics come from the same captured inputs and output gradients as TKFAC's: one model
# with K-FAC says that the NNX capture hands it what linen's does.
@pytest.mark.parametrize(("kind", "curvature"), [
    ("mlp", "tkfac"), ("mlp", "kfac"), ("conv", "tkfac"), ("attention", "tkfac")])
def test_nnx_model_gives_the_linen_statistics_and_updates(kind, curvature):
  """The NNX model and the linen model with its weights: the same loss, gradient and statistics
  for every layer, and three nnx.Optimizer steps give the linen optimizer's parameters."""
  model, linen_model, params = _models(kind)
  x, y = _data(kind)
  tx = lambda: tkfac_jax.tkfac(  # noqa: E731
      0.1, curvature=curvature, stats_every=1, inverse_every=2, inverse_method=INVERSES
  )

  def nnx_loss(model, x, y):
    return _xent(model(x), y)

  def linen_loss(params, x, y):
    return _xent(linen_model.apply({"params": params}, x), y)

  optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    loss, grads, stats = tkfac_jax.nnx.value_grad_and_stats(nnx_loss, curvature=curvature)(
        model, x, y
    )
    optimizer.update(model, grads, stats=stats)
    return loss, grads, stats

  linen_tx = tx()

  @jax.jit
  def linen_step(params, opt_state, x, y):
    loss, grads, stats = tkfac_jax.value_grad_and_stats(linen_loss, curvature=curvature)(
        params, x, y
    )
    updates, opt_state = linen_tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss, grads, stats

  opt_state = linen_tx.init(params)
  start = params
  for step in range(3):
    loss, grads, stats = nnx_step(model, optimizer, x, y)
    params, opt_state, want_loss, want_grads, want_stats = linen_step(params, opt_state, x, y)
    assert stats.skipped == want_stats.skipped == ()
    references.assert_close(loss, want_loss, references.SAME_MATHS, f"loss {step}")
    references.assert_trees_close(
        nnx.to_pure_dict(grads), want_grads, references.SAME_MATHS, f"grads {step}"
    )
    references.assert_trees_close(stats.layers, want_stats.layers, references.SAME_MATHS,
                                  f"stats {step}")
    references.assert_trees_close(
        _moved(nnx.to_pure_dict(nnx.state(model, nnx.Param)), start), _moved(params, start),
        references.TRAJECTORY, f"displacement after step {step}",
    )


def test_nnx_capture_writes_back_batch_statistics_and_reports_unsupported_layers():
  """Non-parameter state that the loss changes (BatchNorm's running averages) reaches the model,
  as with nnx.value_and_grad; a grouped convolution is in stats.skipped and warned about."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), feature_group_count=2, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)
      self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      x = self.norm(jnp.tanh(self.conv(x)))
      return self.out(x.mean(axis=(1, 2)))

  x, y = _data("conv")
  model, plain = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  loss = lambda model, x, y: _xent(model(x), y)  # noqa: E731
  value, grads, stats = tkfac_jax.nnx.value_grad_and_stats(loss)(model, x, y)
  want_value, want_grads = nnx.value_and_grad(loss)(plain, x, y)
  references.assert_close(value, want_value, references.SAME_MATHS)
  references.assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(want_grads),
                                references.SAME_MATHS)
  references.assert_trees_close(
      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
      nnx.to_pure_dict(nnx.state(plain, nnx.BatchStat)), references.SAME_MATHS,
  )
  assert [p for p, _ in stats.skipped] == ["conv"]
  assert "grouped convolution" in dict(stats.skipped)["conv"]
  optimizer = nnx.Optimizer(model, tkfac_jax.tkfac(0.1), wrt=nnx.Param)
  with pytest.warns(UserWarning, match="Layer 'conv' is not preconditioned"):
    optimizer.update(model, grads, stats=stats)


def test_linen_and_nnx_apis_name_each_other_when_mixed_up():
  model, linen_model, params = _models("mlp")
  x, y = _data("mlp")
  with pytest.raises(TypeError, match="tkfac_jax.value_grad_and_stats"):
    tkfac_jax.nnx.value_grad_and_stats(lambda p, x, y: 0.0)(params, x, y)
  with pytest.raises(TypeError, match="tkfac_jax.nnx.value_grad_and_stats"):
    tkfac_jax.value_grad_and_stats(lambda m, x, y: _xent(m(x), y))(model, x, y)
  with pytest.raises(TypeError, match="tkfac_jax.nnx.value_grad_and_stats"):
    tkfac_jax.value_grad_and_stats(lambda s, x, y: 0.0)(nnx.state(model, nnx.Param), x, y)


# --- Stacks: nnx.vmap-created layers applied with nnx.scan get per-layer factors. ---

_DEPTH = 3


class _Block(nnx.Module):
  def __init__(self, rngs, use_bias=True):
    self.lin = nnx.Linear(6, 6, use_bias=use_bias, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class _ScannedNet(nnx.Module):
  """The stack as NNX's guide builds deep models: created by nnx.vmap, applied by nnx.scan."""

  def __init__(self, rngs, remat=False):
    self.inp = nnx.Linear(5, 6, rngs=rngs)

    @nnx.split_rngs(splits=_DEPTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(rngs)

    self.blocks = make(rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)
    self.remat = remat

  def __call__(self, x):
    def body(x, block):
      return block(x)

    if self.remat:
      body = nnx.remat(body)
    x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(self.inp(x), self.blocks)
    return self.out(x)


class _UnrolledNet(nnx.Module):
  """The same layers one attribute each (the reference)."""

  def __init__(self, rngs):
    self.inp = nnx.Linear(5, 6, rngs=rngs)
    self.block0, self.block1, self.block2 = (_Block(rngs) for _ in range(_DEPTH))
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = self.inp(x)
    for block in (self.block0, self.block1, self.block2):
      x = block(x)
    return self.out(x)


def _unroll(tree):
  """The scanned model's parameter (or statistics) tree in the unrolled model's layout."""
  tree = dict(tree)
  blocks = tree.pop("blocks")
  for i in range(_DEPTH):
    tree[f"block{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
  return tree


@pytest.mark.parametrize(("curvature", "remat"), [
    ("tkfac", False), ("kfac", False), ("tkfac", True)], ids=["tkfac-scan", "kfac-scan",
                                                             "tkfac-scan+remat"])
def test_nnx_scan_stack_gives_the_unrolled_statistics_and_updates(curvature, remat):
  """Each layer of an nnx.scan stack has its own factors: statistics and three optimizer steps
  equal those of the same layers unrolled, with the same weights."""
  scanned = _ScannedNet(nnx.Rngs(0), remat=remat)
  unrolled = _UnrolledNet(nnx.Rngs(1))
  nnx.update(unrolled, _unroll(nnx.to_pure_dict(nnx.state(scanned, nnx.Param))))
  x, y = _data("mlp")
  tx = lambda: tkfac_jax.tkfac(  # noqa: E731
      0.1, curvature=curvature, stats_every=1, inverse_every=2, inverse_method=INVERSES
  )
  loss = lambda model, x, y: _xent(model(x), y)  # noqa: E731

  @nnx.jit
  def step(model, optimizer, x, y):
    value, grads, stats = tkfac_jax.nnx.value_grad_and_stats(loss, curvature=curvature)(
        model, x, y
    )
    optimizer.update(model, grads, stats=stats)
    return value, stats

  runs = [(scanned, nnx.Optimizer(scanned, tx(), wrt=nnx.Param)),
          (unrolled, nnx.Optimizer(unrolled, tx(), wrt=nnx.Param))]
  start = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  for i in range(3):
    (value, stats), (want_value, want_stats) = (step(m, o, x, y) for m, o in runs)
    assert stats.skipped == ()
    assert stats.layers["blocks"]["lin"].phi.shape == (_DEPTH, 7, 7)
    references.assert_close(value, want_value, references.SAME_MATHS, f"loss {i}")
    references.assert_trees_close(_unroll(stats.layers), want_stats.layers,
                                  references.SAME_MATHS, f"stats {i}")
    references.assert_trees_close(
        _moved(_unroll(nnx.to_pure_dict(nnx.state(scanned, nnx.Param))), start),
        _moved(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)), start), references.TRAJECTORY,
        f"displacement after step {i}",
    )


def test_nnx_vmap_application_is_reported_and_per_example_vmap_raises():
  """Layers applied under nnx.vmap (an ensemble) are skipped with the reason; the model called
  one example at a time under jax.vmap raises an error that names the library."""

  class Ensemble(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=2)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return _Block(rngs)

      self.members = make(rngs)
      self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      h = nnx.vmap(lambda block, x: block(x), in_axes=(0, None))(self.members, x)
      return self.out(h.mean(axis=0))

  model = Ensemble(nnx.Rngs(0))
  x = jnp.ones((BATCH, 6))
  y = jnp.zeros((BATCH,), jnp.int32)
  loss = lambda model, x, y: _xent(model(x), y)  # noqa: E731
  _, grads, stats = tkfac_jax.nnx.value_grad_and_stats(loss)(model, x, y)
  assert [p for p, _ in stats.skipped] == ["members/lin"]
  assert "nnx.vmap" in dict(stats.skipped)["members/lin"]
  assert set(stats.layers) == {"out"}
  optimizer = nnx.Optimizer(model, tkfac_jax.tkfac(0.1), wrt=nnx.Param)
  with pytest.warns(UserWarning, match="Layer 'members/lin' is not preconditioned"):
    optimizer.update(model, grads, stats=stats)

  mlp = _NnxMLP(nnx.Rngs(0))
  per_example = lambda model, x, y: _xent(  # noqa: E731
      nnx.vmap(lambda x: model(x[None])[0])(x), y
  )
  x, y = _data("mlp")
  with pytest.raises(ValueError, match=r"tkfac_jax.nnx.value_grad_and_stats: layer .* jax.vmap"):
    tkfac_jax.nnx.value_grad_and_stats(per_example)(mlp, x, y)


def test_nnx_optimizer_state_checkpoints_with_orbax_and_resumes_exactly(tmp_path):
  """nnx.state of the model and the optimizer saved with Orbax in the middle of a statistics
  period (the step gated by stats_due) and restored into a fresh model and optimizer: the rest of
  the run is bit for bit the uninterrupted run."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  x, y = _data("mlp")
  tx = lambda: tkfac_jax.tkfac(0.1, stats_every=3, inverse_every=6)  # noqa: E731
  loss = lambda model, x, y: _xent(model(x), y)  # noqa: E731

  @nnx.jit
  def step(model, optimizer, x, y):
    due = tkfac_jax.stats_due(optimizer.opt_state)
    _, grads, stats = tkfac_jax.nnx.value_grad_and_stats(loss)(model, x, y, stats_due=due)
    optimizer.update(model, grads, stats=stats)

  def fresh():
    model = _NnxMLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx(), wrt=nnx.Param)

  def batch(i):
    return x * (1 + 0.1 * i), y

  uninterrupted = fresh()
  for i in range(8):
    step(*uninterrupted, *batch(i))
  half = fresh()
  for i in range(4):
    step(*half, *batch(i))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state(half)))
    checkpointer.wait_until_finished()
  restored = fresh()
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      nnx.to_pure_dict(nnx.state(restored)),
  )
  with ocp.StandardCheckpointer() as checkpointer:
    nnx.replace_by_pure_dict(state := nnx.state(restored),
                             checkpointer.restore(tmp_path / "ckpt", abstract))
  nnx.update(restored, state)
  for i in range(4, 8):
    step(*restored, *batch(i))
  references.assert_trees_equal(nnx.to_pure_dict(nnx.state(restored)),
                                nnx.to_pure_dict(nnx.state(uninterrupted)))
