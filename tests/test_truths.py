"""Specifications from TKFAC.md, "Truths a test can check" (items 1-5), plus locations and sharing.

Each reference is independent of the library. Layer inputs ``a`` and per-example output gradients
``g = dl_n/dy`` come from forward passes written out by hand over the raw ``params`` (no Flax), with
a zero perturbation added to each layer output. Per-example gradients come from
``jax.vmap(jax.grad(...))``. Factors, Kronecker products and solves are float64 NumPy, with loops
over examples and locations. ``vec`` is column-major throughout: ``vec(a g^T) = kron(g, a)``.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references
import tkfac_jax

# Float32 library against float64 references: 1e-4 of the largest entry (references.py says why);
# each kind of comparison below also checks that a plausible mistake fails it.
RTOL = references.REFERENCE
_relative_error = references.relative_error


def _assert_close(actual, expected, rtol=RTOL, err_msg=""):
  references.assert_close(actual, expected, rtol, err_msg)


# --- The models, in Flax and written out by hand. -------------------------------------------------


class _MLP(nn.Module):
  """Dense layers ``Dense_i``, tanh between them unless ``linear``, optional output temperature."""

  features: Sequence[int]
  use_bias: Sequence[bool]
  linear: bool = False
  temperature: bool = False

  @nn.compact
  def __call__(self, x):
    for i, (features, use_bias) in enumerate(zip(self.features, self.use_bias)):
      if i and not self.linear:
        x = jnp.tanh(x)
      x = nn.Dense(features, use_bias=use_bias, name=f"Dense_{i}")(x)
    if self.temperature:
      x = x * self.param("temperature", nn.initializers.ones, ())
    return x


class _Locations(nn.Module):
  """A dense layer applied at every position of ``[B, T, d]``, then a head on the flattened map."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4, name="Dense_0")(x))
    return nn.Dense(3, name="Dense_1")(h.reshape(h.shape[:-2] + (-1,)))


class _Shared(nn.Module):
  """One dense module called twice (on ``[B, d]`` and on ``[B, T, d]``), then a head."""

  def setup(self):
    self.shared = nn.Dense(4)
    self.head = nn.Dense(3)

  def __call__(self, x1, x2):
    h = self.shared(x1) + jnp.mean(self.shared(x2), axis=-2)
    return self.head(jnp.tanh(h))


class _Tape:
  """Hand-written dense layers that record their inputs and perturb their outputs by ``eps``."""

  def __init__(self, eps=None):
    self.eps = eps
    self.inputs = {}
    self.outputs = {}

  def dense(self, params, name, x):
    p = params[name]
    y = x @ p["kernel"]
    if "bias" in p:
      y = y + p["bias"].reshape((1,) * (y.ndim - 1) + (-1,))
    calls = self.inputs.setdefault(name, [])
    if self.eps is not None:
      y = y + self.eps[name][len(calls)]
    calls.append(x)
    self.outputs.setdefault(name, []).append(y)
    return y


def _mlp_by_hand(n_layers, linear=False, temperature=False):
  def forward(params, tape, x):
    for i in range(n_layers):
      if i and not linear:
        x = jnp.tanh(x)
      x = tape.dense(params, f"Dense_{i}", x)
    if temperature:
      x = x * params["temperature"]
    return x

  return forward


def _locations_by_hand(params, tape, x):
  h = jnp.tanh(tape.dense(params, "Dense_0", x))
  return tape.dense(params, "Dense_1", h.reshape(-1))


def _shared_by_hand(params, tape, x1, x2):
  h = tape.dense(params, "shared", x1) + jnp.mean(tape.dense(params, "shared", x2), axis=0)
  return tape.dense(params, "head", jnp.tanh(h))


def _cross_entropy(logits, label):
  return -jax.nn.log_softmax(logits)[label]


def _squared_error(output, target):
  return 0.5 * jnp.sum((output - target) ** 2)


class _Case:
  """A model with its hand-written twin, per-example loss, parameters and one batch."""

  def __init__(self, model, by_hand, loss, inputs, targets, seed=0):
    self.model, self.by_hand, self.loss = model, by_hand, loss
    self.batch = tuple(inputs) + (targets,)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    # NumPy draws (nothing to compile); random biases too, where Flax starts them at zero.
    # Scalars (the temperature) start at 1.
    rng = np.random.default_rng(seed)
    self.params = jax.tree.map(
        lambda p: jnp.asarray(0.6 * rng.standard_normal(p.shape) if p.ndim else 1.0, p.dtype),
        shapes,
    )

  def batch_loss(self, params, *batch):
    """The training loss, through Flax: the mean over the batch of the per-example loss."""
    *inputs, targets = batch
    return jnp.mean(jax.vmap(self.loss)(self.model.apply({"params": params}, *inputs), targets))

  def example_loss(self, params, eps, *example):
    """``l_n`` through the hand-written forward pass, with layer outputs perturbed by ``eps``."""
    *inputs, target = example
    return self.loss(self.by_hand(params, _Tape(eps), *inputs), target)


def _inputs(seed, *shapes):
  rng = np.random.default_rng(100 + seed)
  return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _labels(seed, batch, classes):
  return jnp.asarray(np.random.default_rng(200 + seed).integers(0, classes, batch), jnp.int32)


def _make_case(name, batch=7, seed=0) -> _Case:
  if name == "mlp":  # Three layers, the middle one without bias, a non-dense parameter.
    model = _MLP((5, 4, 3), (True, False, True), temperature=True)
    by_hand = _mlp_by_hand(3, temperature=True)
    return _Case(
        model, by_hand, _cross_entropy, _inputs(seed, (batch, 4)), _labels(seed, batch, 3), seed
    )
  if name == "linear":  # A deep linear network with squared error.
    model = _MLP((4, 3, 3), (True, True, True), linear=True)
    by_hand = _mlp_by_hand(3, linear=True)
    x, t = _inputs(seed, (batch, 3), (batch, 3))
    return _Case(model, by_hand, _squared_error, [x], t, seed)
  if name == "locations":  # T = 3 locations per example.
    return _Case(
        _Locations(),
        _locations_by_hand,
        _cross_entropy,
        _inputs(seed, (batch, 3, 3)),
        _labels(seed, batch, 3),
        seed,
    )
  if name == "shared":  # One layer, 1 + 2 locations over two calls.
    return _Case(
        _Shared(),
        _shared_by_hand,
        _cross_entropy,
        _inputs(seed, (batch, 3), (batch, 2, 3)),
        _labels(seed, batch, 3),
        seed,
    )
  raise ValueError(name)


# --- Independent references. ------------------------------------------------------------------


class _Reference:
  """Per-layer pairs and gradients from the hand-written model, as float64 NumPy.

  Attributes:
    a: ``{layer: [B, T, d_in (+1)]}`` inputs, with the homogeneous 1 last if the layer has a bias.
    g: ``{layer: [B, T, d_out]}`` per-example output gradients ``dl_n/dy_nt``.
    blocks: ``{layer: [B, d_in (+1), d_out]}`` per-example gradients of ``[W; b]``.
    grad: ``{layer: [d_in (+1), d_out]}`` gradient of the mean loss, ``[dW; db]``.
    loss: the mean loss.
  """

  def __init__(self, case: _Case):
    params, batch = case.params, case.batch
    example = tuple(x[0] for x in batch)
    tape = _Tape()
    case.by_hand(params, tape, *example[:-1])
    eps = jax.tree.map(jnp.zeros_like, tape.outputs)

    def record(*inputs):
      tape = _Tape()
      case.by_hand(params, tape, *inputs)
      return tape.inputs

    over_batch = (None, None) + (0,) * len(batch)

    def mean_loss(params):
      return jnp.mean(jax.vmap(case.example_loss, in_axes=over_batch)(params, eps, *batch))

    @jax.jit
    def everything(params):
      per_example = jax.vmap(jax.grad(case.example_loss, argnums=(0, 1)), in_axes=over_batch)
      return (
          jax.vmap(record)(*batch[:-1]),
          per_example(params, eps, *batch),
          jax.value_and_grad(mean_loss)(params),
      )

    inputs, (per_example, output_grads), (loss, grad) = everything(params)
    self.loss = float(loss)
    self.a, self.g, self.blocks, self.grad = {}, {}, {}, {}
    size = len(batch[0])
    for name in tape.inputs:
      a = np.concatenate(
          [np.asarray(x, np.float64).reshape(size, -1, x.shape[-1]) for x in inputs[name]], axis=1
      )
      g = np.concatenate(
          [np.asarray(y, np.float64).reshape(size, -1, y.shape[-1]) for y in output_grads[name]],
          axis=1,
      )
      bias = "bias" in params[name]
      if bias:
        a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)
      self.a[name], self.g[name] = a, g
      self.blocks[name] = _augmented(per_example[name], bias, axis=1)
      self.grad[name] = _augmented(grad[name], bias, axis=0)


def _augmented(node, bias, axis):
  """``[W; b]`` as float64, the bias as the last row (``axis``: the row axis)."""
  kernel = np.asarray(node["kernel"], np.float64)
  if not bias:
    return kernel
  return np.concatenate([kernel, np.expand_dims(np.asarray(node["bias"], np.float64), axis)], axis)


def _vec(matrix):
  """Column-major ``vec``."""
  return matrix.T.reshape(-1)


def _unvec(vector, rows):
  return vector.reshape(-1, rows).T


def _exact_fisher(blocks):
  """``E_n vec(grad_n) vec(grad_n)^T`` from per-example gradient blocks."""
  vecs = np.stack([_vec(block) for block in blocks])
  return vecs.T @ vecs / len(blocks)


def _kronecker_block(stats, curvature):
  """The library's block: ``delta Psi kron Phi`` (TKFAC) or ``G kron A`` (K-FAC), in float64."""
  phi, psi, delta = (np.asarray(x, np.float64) for x in stats)
  if curvature == "tkfac":
    return np.kron(psi, phi) / delta
  return np.kron(psi, phi)


def _capture(case, curvature):
  """``(loss, grads, stats)`` from the library, under ``jax.jit`` as in a train step."""
  fun = jax.jit(tkfac_jax.value_grad_and_stats(case.batch_loss, curvature=curvature))
  return fun(case.params, *case.batch)


# Cases, references and captures are shared between tests: compiling them dominates the runtime.
@functools.cache
def _case(name, batch=7):
  return _make_case(name, batch)


@functools.cache
def _reference(name, batch=7):
  return _Reference(_case(name, batch))


@functools.cache
def _plain(name, batch=7):
  """The loss and gradient of the training loss, by ``jax.value_and_grad`` alone."""
  case = _case(name, batch)
  return jax.jit(jax.value_and_grad(case.batch_loss))(case.params, *case.batch)


@functools.cache
def _captured(name, batch, curvature):
  return _capture(_case(name, batch), curvature)


CURVATURES = ("tkfac", "kfac")

# Layers seen at several locations per example: a [B, 3, d] input, or one call on [B, d] and one
# on [B, 2, d] of a shared module.
_LOCATIONS = {("locations", "Dense_0"): 3, ("shared", "shared"): 3}


# --- Truth 1: capture. ----------------------------------------------------------------------------


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", ["mlp", "linear", "locations", "shared"])
def test_loss_and_gradient_are_unchanged(name, curvature):
  """Truth 1: loss and gradients are jax.value_and_grad's, and sum_nt a g^T / B rebuilds them."""
  loss, grads, _ = _captured(name, 7, curvature)
  plain_loss, plain_grads = _plain(name)
  _assert_close(loss, plain_loss)
  jax.tree.map(_assert_close, grads, plain_grads)
  ref = _reference(name)
  _assert_close(loss, ref.loss)
  for layer, a in ref.a.items():
    # The per-example gradient is sum_t a_nt g_nt^T; averaged over the batch it is the gradient.
    rebuilt = np.einsum("nti,nto->io", a, ref.g[layer]) / a.shape[0]
    _assert_close(rebuilt, ref.grad[layer], err_msg=layer)
    _assert_close(_augmented(grads[layer], "bias" in grads[layer], 0), rebuilt, err_msg=layer)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_single_example_statistics_are_rank_one(curvature):
  """Truth 1: with B = 1 and T = 1 the statistics are outer products of the true a and g."""
  _, _, stats = _captured("mlp", 1, curvature)
  ref = _reference("mlp", 1)
  for name, a in ref.a.items():
    a, g = a[0, 0], ref.g[name][0, 0]
    phi, psi, delta = stats.layers[name]
    if curvature == "tkfac":
      _assert_close(phi, (g @ g) * np.outer(a, a), err_msg=name)
      _assert_close(psi, (a @ a) * np.outer(g, g), err_msg=name)
    else:
      _assert_close(phi, np.outer(a, a), err_msg=name)
      _assert_close(psi, np.outer(g, g), err_msg=name)
    _assert_close(delta, (a @ a) * (g @ g), err_msg=name)


# --- Truths 5 (first half) and locations: statistics by brute force. ------------------------------


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", ["mlp", "locations", "shared"])
def test_statistics_equal_brute_force(name, curvature):
  """Truth 5 and locations: phi, psi, delta equal loops over examples n and locations t."""
  _, _, stats = _captured(name, 7, curvature)
  ref = _reference(name)
  assert set(stats.layers) == set(ref.a)
  for layer, a in ref.a.items():
    g = ref.g[layer]
    assert a.shape[1] == _LOCATIONS.get((name, layer), 1)  # K-FAC's G carries this 1/T.
    phi, psi, delta = references.brute_tkfac(a, g)
    if curvature == "kfac":
      phi, psi = references.brute_kfac(a, g)
    got = stats.layers[layer]
    _assert_close(got.phi, phi, err_msg=layer)
    _assert_close(got.psi, psi, err_msg=layer)
    _assert_close(got.delta, delta, err_msg=layer)
    # The tolerance catches plausible mistakes: a factor off by 1%, a location dropped, the
    # bias's homogeneous coordinate left out.
    brute = references.brute_kfac if curvature == "kfac" else references.brute_tkfac
    expected = tuple(brute(a, g))
    references.assert_detects((1.01 * phi,) + expected[1:], expected, RTOL, "phi off by 1%")
    if a.shape[1] > 1:
      references.assert_detects(brute(a[:, 1:], g[:, 1:]), expected, RTOL, "a location dropped")
    if "bias" in _case(name).params[layer]:
      no_bias = a.copy()
      no_bias[..., -1] = 0.0
      references.assert_detects(brute(no_bias, g), expected, RTOL, "the bias row missing")


# --- Truth 2: the trace. --------------------------------------------------------------------------


def test_trace_equals_exact_fisher_trace():
  """Truth 2: tr(delta Psi kron Phi) = delta = tr(exact Fisher block) for B = 7; K-FAC's differs."""
  _, _, stats = _captured("mlp", 7, "tkfac")
  _, _, kfac = _captured("mlp", 7, "kfac")
  ref = _reference("mlp")
  for name, blocks in ref.blocks.items():
    exact = np.trace(_exact_fisher(blocks))
    phi, psi, delta = (np.asarray(x, np.float64) for x in stats.layers[name])
    _assert_close(delta, exact, err_msg=name)
    _assert_close(np.trace(phi), delta, err_msg=name)  # tr(Phi) = 1
    _assert_close(np.trace(psi), delta, err_msg=name)  # tr(Psi) = 1
    _assert_close(np.trace(_kronecker_block(stats.layers[name], "tkfac")), exact, err_msg=name)
    # K-FAC's trace E|a|^2 E|g|^2 is not the exact one: the check above can fail.
    big_a, big_g, _ = (np.asarray(x, np.float64) for x in kfac.layers[name])
    assert abs(np.trace(big_a) * np.trace(big_g) - exact) > 1e-3 * exact, name


# --- Truths 3 and 5: exact blocks. ----------------------------------------------------------------


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", ["mlp", "linear"])
def test_single_example_block_is_exact(name, curvature):
  """Truths 3 and 5: with one example, delta Psi kron Phi (and G kron A) is the exact block."""
  _, _, stats = _captured(name, 1, curvature)
  ref = _reference(name, 1)
  for layer, blocks in ref.blocks.items():
    _assert_close(
        _kronecker_block(stats.layers[layer], curvature), _exact_fisher(blocks), err_msg=layer
    )


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", ["mlp", "linear"])
def test_many_examples_block_is_not_exact(name, curvature):
  """Truths 3 and 5, sanity: with B = 7 the empirical block is not a Kronecker product."""
  _, _, stats = _captured(name, 7, curvature)
  ref = _reference(name)
  for layer, blocks in ref.blocks.items():
    block = _kronecker_block(stats.layers[layer], curvature)
    error = _relative_error(block, _exact_fisher(blocks))
    assert error > 1e-3, (layer, error)


@pytest.mark.parametrize("linear", [True, False])
def test_kfac_is_exact_on_deep_linear_network(linear):
  """Truth 5: on a deep linear network with squared error, G kron A is the exact Fisher block.

  The Fisher of unit-variance Gaussian outputs is the Gauss-Newton matrix ``E_n J_n^T J_n``. Each
  input is repeated once per output ``j`` with a target that makes the residual ``sqrt(k) e_j``,
  so the residuals' covariance over the copies is exactly the identity and the empirical statistics
  are the true ones. With tanh the same construction must fail.
  """
  size, k = 4, 3
  model = _MLP((4, 3, k), (True, False, True), linear=linear)
  by_hand = _mlp_by_hand(3, linear=linear)
  (x,) = _inputs(3, (size, 3))
  case = _Case(model, by_hand, _squared_error, [x], jnp.zeros((size, k)), seed=3)
  # The batch: k copies of each input, the targets making the residuals sqrt(k) e_j.
  outputs = jax.jit(jax.vmap(lambda x: by_hand(case.params, _Tape(), x)))(x)
  residuals = np.sqrt(k) * np.eye(k, dtype=np.float32)
  case.batch = (
      jnp.repeat(x, k, axis=0),
      (outputs[:, None, :] - residuals[None, :, :]).reshape(size * k, k),
  )
  _, _, stats = _capture(case, "kfac")
  jacobian = jax.vmap(jax.jacobian(lambda p, x: by_hand(p, _Tape(), x)), in_axes=(None, 0))
  jacobians = jax.jit(jacobian)(case.params, x)
  for layer, node in jacobians.items():
    # node["kernel"]: [B, k, d_in, d_out]; each output's Jacobian is a [W; b]-shaped block.
    blocks = _augmented(node, "bias" in node, axis=2)
    vecs = np.stack([np.stack([_vec(block) for block in example]) for example in blocks])
    gauss_newton = np.einsum("nkd,nke->de", vecs, vecs) / size
    block = _kronecker_block(stats.layers[layer], "kfac")
    if linear:
      _assert_close(block, gauss_newton, err_msg=layer)
    elif layer != "Dense_2":  # The last layer's g is the residual itself: exact either way.
      assert _relative_error(block, gauss_newton) > 1e-2, layer


# --- Truth 4: the preconditioned update. ----------------------------------------------------------


def _scaled_factors(a, g, curvature):
  """The undamped factors from TKFAC.md's formulas, from the reference pairs."""
  if curvature == "tkfac":
    phi, psi, delta = references.brute_tkfac(a, g)
    return phi / np.sqrt(delta), psi / np.sqrt(delta)
  return references.brute_kfac(a, g)


def _mean_eigenvalue(phi, psi):
  """``tr(Psi kron Phi) / (d_in d_out)``, the block's mean eigenvalue."""
  return np.trace(phi) * np.trace(psi) / (len(phi) * len(psi))


def _damped_factors(a, g, curvature, damping, pi_damping, relative=False):
  """``Phi_hat`` and ``Psi_hat``; with ``relative``, ``lambda = damping`` times the block's mean
  eigenvalue (the scale-invariant mode)."""
  phi, psi = _scaled_factors(a, g, curvature)
  if relative:
    damping = damping * _mean_eigenvalue(phi, psi)
  pi = 1.0
  if pi_damping:
    pi = np.sqrt((np.trace(phi) / len(phi)) / (np.trace(psi) / len(psi)))
  root = np.sqrt(damping)
  return phi + pi * root * np.eye(len(phi)), psi + root / pi * np.eye(len(psi))


@functools.partial(jax.jit, static_argnames=("curvature", "pi_damping", "scale_invariant"))
def _first_update(grads, params, stats, damping, curvature, pi_damping, scale_invariant=False):
  """``scale_by_tkfac``'s first update; ``damping`` is traced, so one compile serves all values."""
  tx = tkfac_jax.scale_by_tkfac(
      damping=damping, curvature=curvature, pi_damping=pi_damping, inverse_every=10,
      scale_invariant=scale_invariant,
  )
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  return updates


@pytest.mark.parametrize("curvature", CURVATURES)
def test_vanished_curvature_is_floored(curvature):
  """Truth 4 once the curvature has vanished: the damping and the step's scale use at least
  ``curvature_floor`` times each block's largest trace so far.

  Two updates on the same batch, the second with the loss times 1e-4 (its Fisher 1e-8 times the
  first's), no averaging (``decay=0``), inverses refreshed on each step by Cholesky. With
  ``curvature_floor=1e-3`` the second update is ``sqrt(m) solve(kron(Psi_hat, Phi_hat), vec(G))``
  with the second batch's factors, ``lambda_l = damping * 1e-3 * m_l(first batch)`` and ``m`` the
  floored traces' mean, built explicitly.
  """
  floor, small, damping = 1e-3, 1e-4, 0.1
  case, ref = _case("mlp"), _reference("mlp")
  _, grads, stats = _captured("mlp", 7, curvature)

  def small_loss(params, *batch):
    return small * case.batch_loss(params, *batch)

  capture = tkfac_jax.value_grad_and_stats(small_loss, curvature=curvature)
  _, small_grads, small_stats = jax.jit(capture)(case.params, *case.batch)

  @jax.jit
  def second_update(params, grads, stats, small_grads, small_stats):
    tx = tkfac_jax.scale_by_tkfac(
        damping, decay=0.0, stats_every=1, inverse_every=1, inverse_method="cholesky",
        curvature=curvature, curvature_floor=floor,
    )
    _, state = tx.update(grads, tx.init(params), params, stats=stats)
    updates, _ = tx.update(small_grads, state, params, stats=small_stats)
    return updates

  updates = second_update(case.params, grads, stats, small_grads, small_stats)
  first = {l: _scaled_factors(a, ref.g[l], curvature) for l, a in ref.a.items()}
  second = {l: _scaled_factors(a, small * ref.g[l], curvature) for l, a in ref.a.items()}
  trace = lambda phi, psi: np.trace(phi) * np.trace(psi)  # noqa: E731
  for layer in ref.a:  # The floor binds.
    assert trace(*second[layer]) < 1e-2 * floor * trace(*first[layer])
  sizes = sum(len(phi) * len(psi) for phi, psi in first.values())
  scale = np.sqrt(floor * sum(trace(*f) for f in first.values()) / sizes)
  for layer, a in ref.a.items():
    lam = damping * floor * _mean_eigenvalue(*first[layer])
    phi_hat, psi_hat = _damped_factors(a, small * ref.g[layer], curvature, lam, pi_damping=True)
    grad = small * ref.grad[layer]
    expected = scale * _unvec(np.linalg.solve(np.kron(psi_hat, phi_hat), _vec(grad)), len(grad))
    got = _augmented(updates[layer], "bias" in updates[layer], axis=0)
    assert _relative_error(got, expected) < RTOL, (layer, _relative_error(got, expected))
    # Sanity: without the floor (damping and scale from the vanished curvature) the update is
    # far from this, so the check above can fail.
    lam = damping * _mean_eigenvalue(*second[layer])
    phi_hat, psi_hat = _damped_factors(a, small * ref.g[layer], curvature, lam, pi_damping=True)
    unfloored = np.sqrt(sum(trace(*f) for f in second.values()) / sizes) * _unvec(
        np.linalg.solve(np.kron(psi_hat, phi_hat), _vec(grad)), len(grad))
    assert _relative_error(unfloored, expected) > 10 * RTOL, layer


@pytest.mark.parametrize("scale_invariant", [False, True])
@pytest.mark.parametrize("damping", [1e-1, 1e-3])
@pytest.mark.parametrize("pi_damping", [False, True])
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", ["mlp", "shared"])
def test_update_solves_damped_kronecker_system(name, curvature, pi_damping, damping,
                                               scale_invariant):
  """Truth 4: the first update is solve(kron(Psi_hat, Phi_hat), vec(G)), built explicitly.

  Scale-invariant mode: each layer's damping is ``damping`` times its block's mean eigenvalue,
  and the solve is multiplied by the square root of the mean eigenvalue over all blocks.
  """
  case = _case(name)
  _, grads, stats = _captured(name, 7, curvature)
  updates = _first_update(
      grads, case.params, stats, damping, curvature, pi_damping, scale_invariant
  )
  ref = _reference(name)
  scale = 1.0
  if scale_invariant:
    blocks = [_scaled_factors(a, ref.g[layer], curvature) for layer, a in ref.a.items()]
    traces = sum(np.trace(phi) * np.trace(psi) for phi, psi in blocks)
    scale = np.sqrt(traces / sum(len(phi) * len(psi) for phi, psi in blocks))
  for layer, a in ref.a.items():
    phi_hat, psi_hat = _damped_factors(
        a, ref.g[layer], curvature, damping, pi_damping, relative=scale_invariant
    )
    grad = ref.grad[layer]
    expected = scale * _unvec(np.linalg.solve(np.kron(psi_hat, phi_hat), _vec(grad)), len(grad))
    got = _augmented(updates[layer], "bias" in updates[layer], axis=0)
    assert _relative_error(got, expected) < RTOL, (layer, _relative_error(got, expected))
    # Sanity: the update is far from the raw gradient, and from the solve with a damped factor
    # off by 1%, so the check above can fail.
    assert _relative_error(grad, expected) > 1e-2, layer
    off = _unvec(np.linalg.solve(np.kron(psi_hat, 1.01 * phi_hat), _vec(grad)), len(grad))
    assert _relative_error(scale * off, expected) > 10 * RTOL, layer
  # Parameters no dense layer owns pass unchanged, or (scale-invariant) take the mean curvature.
  for key in set(case.params) - set(ref.a):
    if scale_invariant:
      expected = jax.tree.map(lambda g: g / (scale * (1 + damping)), grads[key])
      references.assert_trees_close(updates[key], expected, rtol=RTOL)
    else:
      np.testing.assert_array_equal(updates[key], grads[key])
