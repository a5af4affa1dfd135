"""Transformer stacks: attention projections, nn.remat, jax.checkpoint and nn.scan captured (the
same statistics and updates as the plain model), nn.cond captured (the branch that ran), nn.vmap
stacks reported and warned, a per-example jax.vmap an error that says what to do.

The reference for a rematerialised or scanned model is the same model unrolled, with the same
weights: remat changes when activations are computed, never what they are, and a scan over
stacked weights computes what the loop over its layers does.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax

VOCAB, WIDTH, HEADS, LENGTH, BATCH, DEPTH = 11, 8, 2, 5, 4, 2


class Block(nn.Module):
  """Pre-norm decoder block: causal self-attention and a Dense MLP on ``[B, T, d]``."""

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(WIDTH, name="down")(nn.gelu(nn.Dense(2 * WIDTH, name="up")(h))), None


class LM(nn.Module):
  """A tiny decoder-only LM; ``stack`` says how its blocks are built."""

  stack: str = "unrolled"  # "unrolled", "remat", "scan" or "scan+remat".

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, WIDTH, name="embed")(tokens)
    x = x + self.param("position", nn.initializers.normal(0.1), (LENGTH, WIDTH))[None]
    if self.stack.startswith("scan"):
      blocks = nn.scan(
          nn.remat(Block) if self.stack == "scan+remat" else Block,
          variable_axes={"params": 0}, split_rngs={"params": True}, length=DEPTH,
      )
      x, _ = blocks(name="blocks")(x, None)
    else:
      block = nn.remat(Block) if self.stack == "remat" else Block
      for i in range(DEPTH):
        x, _ = block(name=f"block_{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH + 1)), jnp.int32)
PARAMS = LM().init(jax.random.key(0), TOKENS[:, :-1])["params"]
KERNELS = [
    "embed", "head",
    *(f"block_{i}/{name}" for i in range(DEPTH)
      for name in ("attention/query", "attention/key", "attention/value", "attention/out", "up",
                   "down")),
]


def _loss(model, checkpoint=False):
  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  return jax.checkpoint(loss) if checkpoint else loss


def _flat(tree):
  is_stats = lambda x: isinstance(x, tkfac_jax.LayerStatistics)  # noqa: E731
  return {
      "/".join(str(k.key) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_stats)[0]
  }


def _step(loss, curvature="tkfac", params=PARAMS, **options):
  """Statistics and the first two updates of ``tkfac`` (the second with the refreshed inverses
  of the first step's statistics). A layer's first refresh is a Cholesky inverse whatever the
  method; asking for Cholesky leaves Newton-Schulz's iteration out of a program that never runs it
  (a third of the compile time)."""
  tx = tkfac_jax.tkfac(
      0.1, curvature=curvature, stats_every=1, inverse_every=1, inverse_method="cholesky",
      **options,
  )

  @jax.jit
  def step(params, opt_state, tokens):
    _, grads, stats = tkfac_jax.value_grad_and_stats(loss, curvature=curvature)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, stats, updates

  params, state, stats, _ = step(params, tx.init(params), TOKENS)
  _, _, _, updates = step(params, state, TOKENS)
  return stats, updates


@pytest.fixture(scope="module")
def unrolled():
  return {curvature: _step(_loss(LM()), curvature) for curvature in ("tkfac", "kfac")}


def test_every_kernel_of_the_unrolled_transformer_is_captured(unrolled):
  stats, _ = unrolled["tkfac"]
  assert stats.skipped == ()
  assert sorted(_flat(stats.layers)) == sorted(KERNELS)


# K-FAC's statistics come from the same captured inputs and output gradients as TKFAC's (its
# formula is checked against the exact Fisher in test_truths): one remat kind and one scan kind
# with K-FAC say that the capture hands it the same locations.
@pytest.mark.parametrize(("how", "curvature"), [
    ("nn.remat", "tkfac"), ("nn.remat", "kfac"), ("jax.checkpoint", "tkfac")])
def test_rematerialised_model_gives_the_unrolled_statistics_and_updates(unrolled, how, curvature):
  """Layers under nn.remat, or a loss under jax.checkpoint, are captured with the statistics and
  updates of the same model without remat (a dropped layer or a location counted twice fails)."""
  if how == "nn.remat":
    stats, updates = _step(_loss(LM("remat")), curvature)
  else:
    stats, updates = _step(_loss(LM(), checkpoint=True), curvature)
  want_stats, want_updates = unrolled[curvature]
  assert stats.skipped == ()
  got, want = _flat(stats.layers), _flat(want_stats.layers)
  assert sorted(got) == sorted(want) == sorted(KERNELS)
  for name in KERNELS:
    for field in ("phi", "psi", "delta"):
      references.assert_close(
          getattr(got[name], field), getattr(want[name], field), references.SAME_MATHS,
          err_msg=f"{name}.{field}",
      )
  references.assert_trees_close(updates, want_updates, references.REFERENCE)


def test_remat_keeps_its_memory_saving():
  """XLA's memory analysis of the compiled capture: under nn.remat it needs about what a plain
  gradient does, not the activations that remat drops (which capture without remat keeps)."""

  class Stack(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x):
      for i in range(8):
        block = nn.remat(_Residual) if self.remat else _Residual
        x = block(name=f"block_{i}")(x)
      return nn.Dense(10, name="head")(x)

  x = jnp.ones((512, 64))
  labels = jnp.zeros((512,), jnp.int32)

  def temp_bytes(fun, params):
    return jax.jit(fun).lower(params).compile().memory_analysis().temp_size_in_bytes

  sizes = {}
  for remat in (False, True):
    model = Stack(remat)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def loss(params, model=model):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    sizes[remat] = (
        temp_bytes(jax.grad(loss), params),
        temp_bytes(tkfac_jax.value_grad_and_stats(loss), params),
    )
  (_, capture), (plain_remat, capture_remat) = sizes[False], sizes[True]
  assert capture_remat < 0.6 * capture, sizes
  assert capture_remat < 1.5 * plain_remat, sizes


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(64, name="down")(nn.tanh(nn.Dense(256, name="up")(x)))


def _stacked(tree, name="blocks"):
  """An unrolled model's ``block_i`` entries stacked along a leading axis, as nn.scan holds them."""
  blocks = [tree[f"block_{i}"] for i in range(DEPTH)]
  out = {k: v for k, v in tree.items() if not k.startswith("block_")}
  out[name] = jax.tree.map(lambda *x: jnp.stack(x), *blocks)
  return out


def _unstacked(tree, name="blocks"):
  """The inverse of :func:`_stacked`."""
  out = {k: v for k, v in tree.items() if k != name}
  for i in range(DEPTH):
    out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[name])
  return out


@pytest.mark.parametrize(("stack", "curvature"), [
    ("scan", "tkfac"), ("scan", "kfac"), ("scan+remat", "tkfac")])
def test_scanned_stack_gives_the_unrolled_statistics_and_updates(unrolled, stack, curvature):
  """An nn.scan stack (alone, and over nn.remat blocks) with the unrolled model's weights stacked:
  every layer of the stack has its own statistics, which are the unrolled layer's, and its own
  factors, whose first two updates are the unrolled layer's. Nothing is skipped."""
  stats, updates = _step(_loss(LM(stack)), curvature, params=_stacked(PARAMS))
  want_stats, want_updates = unrolled[curvature]
  assert stats.skipped == ()
  got = _flat(stats.layers)
  want = _flat(want_stats.layers)
  per_layer = ("attention/query", "attention/key", "attention/value", "attention/out", "up",
               "down")
  assert sorted(got) == sorted(["embed", "head"] + [f"blocks/{n}" for n in per_layer])
  for name in per_layer:
    assert got[f"blocks/{name}"].delta.shape == (DEPTH,)
    for i in range(DEPTH):
      for field in ("phi", "psi", "delta"):
        references.assert_close(
            getattr(got[f"blocks/{name}"], field)[i], getattr(want[f"block_{i}/{name}"], field),
            references.SAME_MATHS, err_msg=f"blocks/{name}[{i}].{field}",
        )
  references.assert_trees_close(_unstacked(updates), want_updates, references.REFERENCE)


def test_per_example_vmap_names_the_library_and_the_fix():
  model = LM()

  def loss(params, tokens):
    def one(sequence):
      logits = model.apply({"params": params}, sequence[None, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, sequence[None, 1:]).mean()

    return jax.vmap(one)(tokens).mean()

  with pytest.raises(ValueError, match="tkfac_jax.value_grad_and_stats.*jax.vmap.*whole batch"):
    tkfac_jax.value_grad_and_stats(loss)(PARAMS, TOKENS)


def test_transformer_trains_with_every_kernel_preconditioned():
  """A tiny budget: the loss of a repeated batch falls well below its start (and no warning:
  nothing takes the fallback but the norms and the position table)."""
  loss = _loss(LM())
  tx = tkfac_jax.tkfac(0.05)

  @jax.jit
  def step(params, opt_state, tokens):
    due = tkfac_jax.stats_due(opt_state)
    value, grads, stats = tkfac_jax.value_grad_and_stats(loss)(params, tokens, stats_due=due)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, value

  params, opt_state = PARAMS, tx.init(PARAMS)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    losses = []
    for _ in range(60):
      params, opt_state, value = step(params, opt_state, TOKENS)
      losses.append(float(value))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses[::10]


class _Ensemble(nn.Module):
  """nn.vmap with the parameters mapped: a stack of 3 Dense layers, each on its own input; then a
  Dense head."""

  @nn.compact
  def __call__(self, x):
    members = nn.vmap(
        nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0
    )
    return nn.Dense(2, name="head")(members(4, name="members")(x))


def test_nn_vmap_stack_is_reported_and_warned():
  """Never silent: an nn.vmap stack (kernels with a leading member axis) is skipped with the
  reason and warned about; its gradient takes the fallback."""
  model = _Ensemble()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6, 5)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]

  def loss(params):
    return jnp.mean(model.apply({"params": params}, x) ** 2)

  _, grads, stats = tkfac_jax.value_grad_and_stats(loss)(params)
  skipped = dict(stats.skipped)
  assert list(skipped) == ["members"] and "leading axes (3,)" in skipped["members"]
  assert list(stats.layers) == ["head"]
  tx = tkfac_jax.scale_by_tkfac(fallback=optax.identity())
  with pytest.warns(UserWarning, match="Layer 'members' is not preconditioned"):
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  references.assert_trees_close(updates["members"], grads["members"], references.SAME_MATHS)


class _Branches(nn.Module):
  """nn.cond between two Dense layers."""

  def setup(self):
    self.left = nn.Dense(3)
    self.right = nn.Dense(3)

  def __call__(self, x, pred):
    if self.is_initializing():  # nn.cond needs both branches' parameters to exist.
      self.left(x), self.right(x)
    return nn.cond(pred, lambda m, x: m.left(x), lambda m, x: m.right(x), self, x)


@pytest.mark.parametrize("pred", [True, False])
def test_nn_cond_captures_the_branch_that_ran(pred):
  """Layers under nn.cond are captured: the branch taken has the statistics of the same layer
  applied without nn.cond, the other (not in this step's loss) has zero statistics."""
  model = _Branches()
  x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 5)), jnp.float32)
  params = model.init(jax.random.key(0), x, True)["params"]
  ran, idle = ("left", "right") if pred else ("right", "left")

  def loss(params):
    return jnp.mean(model.apply({"params": params}, x, jnp.asarray(pred)) ** 2)

  def plain_loss(layer_params):
    return jnp.mean(nn.Dense(3).apply({"params": layer_params}, x) ** 2)

  _, grads, stats = jax.jit(tkfac_jax.value_grad_and_stats(loss))(params)
  _, want_grads, want = tkfac_jax.value_grad_and_stats(plain_loss)(params[ran])
  assert stats.skipped == ()
  references.assert_trees_close(grads[ran], want_grads, references.SAME_MATHS)
  for got, expected in zip(stats.layers[ran], want.layers):
    references.assert_close(got, expected, references.SAME_MATHS)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(stats.layers[idle]))
