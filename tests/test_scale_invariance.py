"""The default step does not depend on the loss's scale, and the KL clip bounds every parameter.

Multiplying the loss by ``c`` multiplies the gradient by ``c`` and the empirical Fisher by ``c^2``.
In scale-invariant mode (the default) the damping is relative to each block's mean eigenvalue and
the update is multiplied by the square root of the network's mean eigenvalue, so the updates of a
mean loss and of the same loss times 784 (a sum over pixels) are the same; the parameters without
a Kronecker block (here a LayerNorm's) are preconditioned by that mean curvature and are inside
the KL clip.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax

LR, DAMPING, KL_CLIP = 0.1, 0.1, 1e-3


class Net(nn.Module):
  """A convolution, a LayerNorm (no Kronecker block) and a dense head."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.Dense(3)(x)


MODEL = Net()
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))["params"]


def _batch(seed):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((8, 5, 5, 2)).astype(np.float32), rng.integers(0, 3, 8)


def _loss(scale):
  def loss(params, x, y):
    logits = MODEL.apply({"params": params}, x)
    return scale * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


@functools.cache
def _trainer(scale_invariant=True):
  """``tkfac`` and its jitted step, the loss's scale an argument: one compile serves every scale."""
  tx = tkfac_jax.tkfac(LR, DAMPING, kl_clip=KL_CLIP, inverse_every=2,
                       scale_invariant=scale_invariant)

  @jax.jit
  def step(params, state, x, y, scale):
    _, grads, stats = tkfac_jax.value_grad_and_stats(_loss(scale))(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  return tx, step


def _train(scale, steps=3, scale_invariant=True):
  """The parameters after ``steps`` updates of ``tkfac`` on the loss times ``scale``."""
  tx, step = _trainer(scale_invariant)
  params, state = PARAMS, tx.init(PARAMS)
  for i in range(steps):
    params, state = step(params, state, *_batch(i), jnp.float32(scale))
  return params


def _displacement(params):
  return jax.tree.map(lambda p, p0: p - p0, params, PARAMS)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("scale", [784.0, 1e-3])
def test_training_does_not_depend_on_the_loss_scale(scale):
  """A mean loss and the same loss times ``scale`` train alike, conv, dense and LayerNorm."""
  mean = _displacement(_train(1.0))
  scaled = _displacement(_train(scale))
  references.assert_trees_close(scaled, mean, rtol=references.TRAJECTORY)
  # Sanity: the paper's absolute damping does depend on it, so the check above can fail.
  paper = _displacement(_train(scale, scale_invariant=False))
  assert references.max_error(_flat(paper), _flat(mean)) > 1e-2


def test_kl_clip_bounds_every_parameter():
  """With the clip binding, ``lr^2 nu sum_all <u, G> / (s n) = kl_clip``, over all ``n``
  parameters.

  The update is ``u = nu s U`` for the layers and ``u = nu s G / (m (1 + damping))`` for the
  LayerNorm, ``s = sqrt(m)`` with ``m`` the blocks' mean eigenvalue, computed here from the
  statistics: the clip's sum ``sum <U, G> + <G, G> / (m (1 + damping))`` is ``sum_all <u, G> /
  (nu s)``. Leaving the LayerNorm out of the clip would make the left side larger.
  """
  x, y = _batch(0)
  _, grads, stats = tkfac_jax.value_grad_and_stats(_loss(1.0))(PARAMS, x, y)
  tx = tkfac_jax.scale_by_tkfac(DAMPING, kl_clip=1e-10, learning_rate=LR)
  updates, state = tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats)
  nu = float(state.kl_scale)
  assert nu < 0.5  # The clip binds.
  deltas = {name: float(stats.layers[name].delta) for name in ("Conv_0", "Dense_0")}
  sizes = {"Conv_0": (3 * 3 * 2 + 1) * 4, "Dense_0": (5 * 5 * 4 + 1) * 3}
  s = np.sqrt(sum(deltas.values()) / sum(sizes.values()))
  inner = sum(
      float(jnp.vdot(u, g)) for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads))
  )
  n = sum(x.size for x in jax.tree.leaves(PARAMS))
  predicted = LR**2 * nu * inner / (s * n)
  references.assert_close(predicted, 1e-10, rtol=references.REFERENCE)
  # The LayerNorm's update is the gradient over the mean curvature, damped.
  for name in ("scale", "bias"):
    expected = nu * grads["LayerNorm_0"][name] / (s * (1 + DAMPING))
    references.assert_close(updates["LayerNorm_0"][name], expected, rtol=references.REFERENCE)


def test_a_users_fallback_is_used_as_given():
  """With ``fallback=`` the parameters without a block take exactly the fallback's update."""
  x, y = _batch(0)
  _, grads, stats = tkfac_jax.value_grad_and_stats(_loss(1.0))(PARAMS, x, y)
  tx = tkfac_jax.scale_by_tkfac(DAMPING, fallback=optax.scale_by_adam())
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats)
  adam = optax.scale_by_adam()
  expected, _ = adam.update(grads, adam.init(PARAMS), PARAMS)
  references.assert_trees_equal(updates["LayerNorm_0"], expected["LayerNorm_0"])


class _TinyLM(nn.Module):
  """A one-block decoder: embedding, causal self-attention, LayerNorms, an MLP, a dense head."""

  vocab: int = 11
  width: int = 16

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width)(tokens)
    x = x + self.param(
        "position", nn.initializers.normal(0.02), (1, tokens.shape[1], self.width))
    mask = nn.make_causal_mask(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x), mask=mask)
    x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x))))
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


@pytest.mark.filterwarnings("ignore:Layer .* is not preconditioned")
def test_a_loss_summed_over_positions_trains_with_the_defaults():
  """A tiny language model whose loss is summed over 12 positions (the attention's projections
  and every norm and position parameter take the fallback): with the defaults it trains and its
  parameters stay finite.

  Measured over 40 steps: the defaults 33.0 -> 3.3; the paper's step (absolute damping, its
  former defaults) 33.0 -> 28.9, its KL clip binding hard on the summed loss; Adam 1e-3 14.3.
  """
  model = _TinyLM()
  rng = np.random.default_rng(0)
  # A learnable sequence task: each token is the previous one plus 1, modulo the vocabulary.
  start = rng.integers(0, 11, (64, 1))
  tokens = (start + np.arange(13)[None, :]) % 11
  params = model.init(jax.random.key(0), tokens[:, :-1])["params"]

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum(-1).mean()

  def train(tx, steps=40):
    state = tx.init(params)

    @jax.jit
    def step(p, state, x, y):
      value, grads, stats = tkfac_jax.value_grad_and_stats(loss)(
          p, x, y, stats_due=tkfac_jax.stats_due(state))
      updates, state = tx.update(grads, state, p, stats=stats)
      return optax.apply_updates(p, updates), state, value

    p, values = params, []
    for i in range(steps):
      batch = tokens[(16 * i) % 64:(16 * i) % 64 + 16]
      p, state, value = step(p, state, batch[:, :-1], batch[:, 1:])
      values.append(float(value))
    return p, values

  p, values = train(tkfac_jax.tkfac(0.3))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(p))
  assert np.mean(values[-5:]) < 0.5 * np.mean(values[:5]), values
  _, paper = train(tkfac_jax.tkfac(
      0.3, 1e-2, kl_clip=1e-4, stats_every=1, inverse_every=10, scale_invariant=False))
  # Sanity: the paper's step on the summed loss does much worse, so the check above can fail.
  assert not np.mean(paper[-5:]) < 0.5 * np.mean(paper[:5]), paper


class _Memoriser(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4)(x)


def _memorise(steps=8000, **options):
  """The training losses and update norms of ``tkfac(0.3)`` (the defaults otherwise) fitting 64
  random labels with batches of 32 until the loss is zero, and whether the parameters stay
  finite. One ``lax.scan``: one compile for all the steps."""
  model = _Memoriser()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 64))
  params = model.init(jax.random.key(0), x)["params"]
  tx = tkfac_jax.tkfac(0.3, **options)

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  def step(carry, i):
    p, state = carry
    batch = jax.random.permutation(jax.random.fold_in(jax.random.key(1), i), 64)[:32]
    value, grads, stats = tkfac_jax.value_grad_and_stats(loss)(
        p, x[batch], y[batch], stats_due=tkfac_jax.stats_due(state))
    updates, state = tx.update(grads, state, p, stats=stats)
    norm = jnp.sqrt(sum(jnp.sum(u**2) for u in jax.tree.leaves(updates)))
    return (optax.apply_updates(p, updates), state), (value, norm)

  run = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), jnp.arange(steps)))
  (p, _), (values, norms) = run(params, tx.init(params))
  finite = all(bool(np.isfinite(leaf).all()) for leaf in jax.tree.leaves(p))
  return np.asarray(values), np.asarray(norms), finite


def test_a_training_loss_that_reaches_zero_does_not_blow_up_the_step():
  """A network that fits its training set drives the empirical Fisher to zero with the loss. With
  the default ``curvature_floor`` the damping and the step stop following it down: the steps
  shrink with the gradient and the parameters stay finite.

  Measured: the defaults' largest update falls from 0.0028 (steps 1000-2000) to 0.0002 (the last
  1000 steps); with ``curvature_floor=0`` the inverses grow as the curvature vanishes and the
  parameters are NaN by step ~5000 (``tkfac``; K-FAC's loss reached 1e22).
  """
  values, norms, finite = _memorise()
  assert finite
  assert values[-1000:].max() < 1e-5  # Memorised.
  early, late = norms[1000:2000].max(), norms[-1000:].max()
  assert late < 0.5 * early, (early, late)
  # Sanity: without the floor the same run blows up, so the checks above can fail.
  values, norms, finite = _memorise(curvature_floor=0.0)
  assert not (finite and np.isfinite(norms).all() and norms[-1000:].max() < 0.5 * norms[1000:2000].max())


def test_scale_invariant_must_be_a_bool():
  """A string or None (which would read as true or false) is refused, naming the argument."""
  for bad in ("yes", None, 1):
    with pytest.raises(TypeError, match="scale_invariant"):
      tkfac_jax.scale_by_tkfac(scale_invariant=bad)
    with pytest.raises(TypeError, match="scale_invariant"):
      tkfac_jax.tkfac(0.1, scale_invariant=bad)
