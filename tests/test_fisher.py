"""The sampled ("true") Fisher: value_grad_and_stats(..., fisher="sampled") and the loss helpers.

TKFAC.md, "Fisher flavours": with ``fisher="sampled"`` the output gradients ``g_n`` come from
targets drawn from the model's own predictive distribution, so that over many keys the statistics
converge to their expectation under the model. The references are independent of the library:
layer inputs, predictions and output covariances are float64 NumPy over the raw ``params``, and the
Jacobians of the output with respect to each layer's output come from ``jax.jacobian`` of a forward
pass written out by hand. With ``M_n`` the covariance of the output gradient ``p_n - e_y``
(categorical: ``diag(p) - p p^T``; Bernoulli: ``diag(s (1 - s))``; unit Gaussian: ``I``) and
``J_n`` that Jacobian, a layer's ``E[g g^T] = J^T M J`` and ``E|g|^2 = tr(J^T M J)`` per example.
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

BATCH, D_IN, HIDDEN, K = 3, 3, 4, 3
DISTRIBUTIONS = ("categorical", "bernoulli", "gaussian")
CURVATURES = ("tkfac", "kfac")
LOSSES = {
    "categorical": tkfac_jax.softmax_cross_entropy,
    "bernoulli": tkfac_jax.sigmoid_binary_cross_entropy,
    "gaussian": tkfac_jax.squared_error,
}
# Monte Carlo: the mean over SAMPLES keys must lie within SIGMAS standard errors of the exact
# expectation, entry by entry (about 70 entries per case, 6 cases: a false alarm at 5 sigma has
# probability below 1e-4), plus float32 rounding.
SAMPLES = 16384
SIGMAS = 5.0
ROUNDING = 1e-5


class _MLP(nn.Module):
  """Dense(HIDDEN) -> tanh -> Dense(features)."""

  features: int = K

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name="Dense_1")(jnp.tanh(nn.Dense(HIDDEN, name="Dense_0")(x)))


def _forward(params, x, eps):
  """The MLP on one example, by hand over the raw params, with each layer's output shifted."""
  y0 = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"] + eps["Dense_0"]
  y1 = jnp.tanh(y0) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  return y1 + eps["Dense_1"]


class _Case:
  """The MLP with NumPy-drawn parameters, one batch and the loss of one output distribution."""

  def __init__(self, distribution, seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    self.distribution = distribution
    self.model = _MLP()
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((1, D_IN)))["params"]
    # Non-zero biases and large enough weights that predictions are far from uniform.
    self.params = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), shapes
    )
    self.x = jnp.asarray(rng.standard_normal((batch, D_IN)), jnp.float32)
    if distribution == "categorical":
      self.labels = jnp.asarray(rng.integers(0, K, batch), jnp.int32)
    elif distribution == "bernoulli":
      self.labels = jnp.asarray(rng.integers(0, 2, (batch, K)), jnp.float32)
    else:
      self.labels = jnp.asarray(rng.standard_normal((batch, K)), jnp.float32)

  def loss(self, params, x, labels):
    """The training loss through Flax and the helper that marks the output."""
    return LOSSES[self.distribution](self.model.apply({"params": params}, x), labels)

  def plain_loss(self, params, x, labels):
    """The same loss, written without the helpers."""
    logits = self.model.apply({"params": params}, x)
    if self.distribution == "categorical":
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if self.distribution == "bernoulli":
      return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean()
    return 0.5 * jnp.mean(jnp.sum((logits - labels) ** 2, axis=-1))


@functools.cache
def _case(distribution):
  return _Case(distribution)


def _as64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# --- The exact expectation under the model. -------------------------------------------------------


def _output_covariance(distribution, z):
  """``E[(g - E g)(g - E g)^T] = E[g g^T]`` of the per-example output gradient, ``[B, K, K]``."""
  if distribution == "categorical":
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.stack([np.diag(q) - np.outer(q, q) for q in p])
  if distribution == "bernoulli":
    s = 1.0 / (1.0 + np.exp(-z))
    return np.stack([np.diag(q * (1.0 - q)) for q in s])
  return np.stack([np.eye(z.shape[-1])] * len(z))


@functools.cache
def _exact(distribution, curvature):
  """``{layer: (phi, psi, delta)}``: the statistics' expectation over targets from the model."""
  case = _case(distribution)
  p = _as64(case.params)
  x = np.asarray(case.x, np.float64)
  h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  z = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  ones = np.ones((len(x), 1))
  a = {"Dense_0": np.concatenate([x, ones], -1), "Dense_1": np.concatenate([h, ones], -1)}
  eps = {"Dense_0": jnp.zeros(HIDDEN), "Dense_1": jnp.zeros(K)}
  jacobian = jax.vmap(jax.jacobian(_forward, argnums=2), in_axes=(None, 0, None))
  jacobians = _as64(jax.jit(jacobian)(case.params, case.x, eps))  # {layer: [B, K, d_out]}
  m = _output_covariance(distribution, z)
  exact = {}
  for layer, j in jacobians.items():
    cov = np.einsum("nko,nkl,nlp->nop", j, m, j)  # E[g g^T] per example
    g_sq = np.trace(cov, axis1=1, axis2=2)  # E|g|^2
    a_sq = np.sum(a[layer] ** 2, -1)
    outer = np.einsum("ni,nj->nij", a[layer], a[layer])
    delta = np.mean(a_sq * g_sq)
    if curvature == "tkfac":
      phi = np.mean(g_sq[:, None, None] * outer, 0)
      psi = np.mean(a_sq[:, None, None] * cov, 0)
    else:
      phi, psi = np.mean(outer, 0), np.mean(cov, 0)
    exact[layer] = (phi, psi, delta)
  return exact


# --- The library's statistics. --------------------------------------------------------------------


@functools.cache
def _capture(distribution, curvature, fisher):
  case = _case(distribution)
  return jax.jit(tkfac_jax.value_grad_and_stats(case.loss, curvature=curvature, fisher=fisher))


@functools.cache
def _sampled_over_keys(distribution, curvature):
  """The statistics for SAMPLES keys, ``{layer: (phi, psi, delta)}`` with a leading key axis."""
  case = _case(distribution)
  capture = tkfac_jax.value_grad_and_stats(case.loss, curvature=curvature, fisher="sampled")

  def stats(params, x, labels, key):
    return capture(params, x, labels, fisher_key=key)[2].layers

  over_keys = jax.jit(jax.vmap(stats, in_axes=(None, None, None, 0)))
  keys = jax.random.split(jax.random.key(1234), SAMPLES)
  layers = over_keys(case.params, case.x, case.labels, keys)
  return {name: tuple(_as64(s)) for name, s in layers.items()}


def _tolerance(samples, exact):
  """SIGMAS standard errors of the mean over keys, plus rounding relative to the largest entry."""
  stderr = samples.std(0, ddof=1) / np.sqrt(len(samples))
  return SIGMAS * stderr + ROUNDING * np.max(np.abs(exact))


FIELDS = ("phi", "psi", "delta")


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_sampled_statistics_converge_to_model_expectation(distribution, curvature):
  """Sampled phi, psi, delta average over keys to E_{y ~ model}, from J^T M J in closed form."""
  sampled = _sampled_over_keys(distribution, curvature)
  exact = _exact(distribution, curvature)
  assert set(sampled) == set(exact)
  _, _, empirical = _capture(distribution, curvature, "empirical")(
      _case(distribution).params, _case(distribution).x, _case(distribution).labels
  )
  for layer, expected in exact.items():
    for field, samples, want, emp in zip(
        FIELDS, sampled[layer], expected, _as64(tuple(empirical.layers[layer]))
    ):
      assert samples.shape == (SAMPLES,) + want.shape, (layer, field)
      tol = _tolerance(samples, want)
      error = np.abs(samples.mean(0) - want)
      worst = float(np.max(error / tol))
      assert worst <= 1.0, (layer, field, worst, samples.mean(0), want)
      if curvature == "kfac" and field == "phi":
        continue  # A = E[a a^T] does not depend on the targets.
      # Sanity: the empirical Fisher (the training labels) is far outside the tolerance, so the
      # check above can fail.
      excess = float(np.max(np.abs(emp - want) / tol))
      assert excess > 10.0, (layer, field, excess)


# --- Loss and gradient come from the real labels. -------------------------------------------------


@functools.cache
def _plain(distribution):
  """``jax.value_and_grad`` of the loss written without the helpers, with the real labels."""
  case = _case(distribution)
  return jax.jit(jax.value_and_grad(case.plain_loss))(case.params, case.x, case.labels)


def _assert_trees_close(actual, expected):
  """The same values through another float32 route: references.SAME_MATHS of each leaf's scale."""
  references.assert_trees_close(actual, expected, references.SAME_MATHS)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_sampled_loss_and_grads_are_the_real_ones(distribution, curvature):
  """Loss and grads are jax.value_and_grad's with the real labels, whatever the key; stats vary."""
  case = _case(distribution)
  capture = _capture(distribution, curvature, "sampled")
  plain_loss, plain_grads = _plain(distribution)
  # Typed keys and a legacy uint32 key all work.
  keys = [jax.random.key(i) for i in range(4)] + [jax.random.PRNGKey(4)]
  results = [capture(case.params, case.x, case.labels, fisher_key=key) for key in keys]
  loss, grads, _ = results[0]
  _assert_trees_close(loss, plain_loss)
  _assert_trees_close(grads, plain_grads)
  for other_loss, other_grads, other_stats in results[1:]:
    np.testing.assert_array_equal(other_loss, loss)
    jax.tree.map(np.testing.assert_array_equal, other_grads, grads)
    assert other_stats.curvature == curvature
  # Different keys, different targets: with B = 3 two keys can draw the same categorical targets
  # (probability 6% here), so the check is that the five keys do not all agree.
  for layer in ("Dense_0", "Dense_1"):
    psis = {np.asarray(stats.layers[layer].psi).tobytes() for _, _, stats in results}
    assert len(psis) > 1, layer
  # The empirical capture of the same loss agrees on loss and grads too.
  emp_loss, emp_grads, _ = _capture(distribution, curvature, "empirical")(
      case.params, case.x, case.labels
  )
  _assert_trees_close(emp_loss, plain_loss)
  _assert_trees_close(emp_grads, plain_grads)


def test_sampled_with_aux_and_several_argnums():
  """has_aux and tuple argnums pass through fisher="sampled" as through jax.value_and_grad."""
  case = _case("categorical")

  def loss_with_aux(params, x, labels):
    logits = case.model.apply({"params": params}, x)
    return tkfac_jax.softmax_cross_entropy(logits, labels), logits

  def plain_with_aux(params, x, labels):
    logits = case.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  capture = tkfac_jax.value_grad_and_stats(
      loss_with_aux, argnums=(0, 1), has_aux=True, fisher="sampled"
  )
  (loss, aux), grads, stats = jax.jit(capture)(
      case.params, case.x, case.labels, fisher_key=jax.random.key(3)
  )
  (want_loss, want_aux), want_grads = jax.value_and_grad(
      plain_with_aux, argnums=(0, 1), has_aux=True
  )(case.params, case.x, case.labels)
  _assert_trees_close(loss, want_loss)
  _assert_trees_close(aux, want_aux)
  _assert_trees_close(grads, want_grads)
  # Statistics mirror the differentiated arguments: the params are argument 0 of the tuple.
  assert set(stats.layers[0]) == {"Dense_0", "Dense_1"}


# --- Errors. --------------------------------------------------------------------------------------


def test_sampled_without_key_raises():
  """fisher="sampled" called without fisher_key raises a ValueError naming fisher_key."""
  case = _case("categorical")
  capture = tkfac_jax.value_grad_and_stats(case.loss, fisher="sampled")
  with pytest.raises(ValueError, match="fisher_key"):
    capture(case.params, case.x, case.labels)


def test_key_with_empirical_raises():
  """A fisher_key passed to an empirical capture raises a ValueError."""
  case = _case("categorical")
  capture = tkfac_jax.value_grad_and_stats(case.loss)
  with pytest.raises(ValueError, match="fisher_key"):
    capture(case.params, case.x, case.labels, fisher_key=jax.random.key(0))


def test_unmarked_loss_raises():
  """A sampled capture of a loss computed with optax directly raises, naming the helpers."""
  case = _case("categorical")
  capture = tkfac_jax.value_grad_and_stats(case.plain_loss, fisher="sampled")
  with pytest.raises(ValueError, match="softmax_cross_entropy") as info:
    jax.jit(capture)(case.params, case.x, case.labels, fisher_key=jax.random.key(0))
  for helper in ("sigmoid_binary_cross_entropy", "squared_error", "marked 0"):
    assert helper in str(info.value)


def test_two_marked_outputs_raise():
  """A sampled capture of a loss that marks two outputs raises a ValueError."""
  case = _case("categorical")

  def two_heads(params, x, labels):
    logits = case.model.apply({"params": params}, x)
    return tkfac_jax.softmax_cross_entropy(logits, labels) + tkfac_jax.squared_error(
        logits, jnp.zeros_like(logits)
    )

  capture = tkfac_jax.value_grad_and_stats(two_heads, fisher="sampled")
  with pytest.raises(ValueError, match="exactly one model output.*marked 2"):
    capture(case.params, case.x, case.labels, fisher_key=jax.random.key(0))


@pytest.mark.parametrize("fisher", ["true", "Sampled", "", None])
def test_unknown_fisher_raises(fisher):
  """An unknown fisher flavour is refused when the capture is built."""
  with pytest.raises(ValueError, match="fisher must be"):
    tkfac_jax.value_grad_and_stats(_case("categorical").loss, fisher=fisher)


# --- The helpers as plain losses. -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)], ids=["BK", "BTK"])
def test_helpers_are_plain_losses_outside_a_capture(shape):
  """Outside a capture the helpers equal optax's losses (and 0.5 |y - t|^2) averaged as stated."""
  rng = np.random.default_rng(7)
  logits = jnp.asarray(3.0 * rng.standard_normal(shape), jnp.float32)
  int_labels = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)
  probabilities = jnp.asarray(rng.uniform(size=shape), jnp.float32)
  targets = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cases = [
      (
          tkfac_jax.softmax_cross_entropy(logits, int_labels),
          optax.softmax_cross_entropy_with_integer_labels(logits, int_labels).mean(),
      ),
      (
          tkfac_jax.sigmoid_binary_cross_entropy(logits, probabilities),
          optax.sigmoid_binary_cross_entropy(logits, probabilities).sum(-1).mean(),
      ),
      (
          tkfac_jax.squared_error(logits, targets),
          0.5 * ((logits - targets) ** 2).sum(-1).mean(),
      ),
  ]
  for got, want in cases:
    assert got.shape == ()
    references.assert_close(got, want, references.SAME_MATHS)
  # And under jit and grad, as any loss.
  grad = jax.jit(jax.grad(tkfac_jax.squared_error))(logits, targets)
  expected = (logits - targets) / np.prod(shape[:-1])
  references.assert_close(grad, expected, references.SAME_MATHS)


# --- End to end. ----------------------------------------------------------------------------------


def test_tkfac_trains_with_sampled_fisher_in_a_jitted_step():
  """tkfac with fisher="sampled" in a jitted step, a new key per step: one trace, the loss falls."""
  rng = np.random.default_rng(11)
  size, classes = 256, 4
  x = rng.standard_normal((size, 6)).astype(np.float32)
  teacher = rng.standard_normal((6, classes)).astype(np.float32)
  y = np.argmax(x @ teacher, axis=-1).astype(np.int32)
  model = _MLP(features=classes)

  def loss_fn(params, x, y):
    return tkfac_jax.softmax_cross_entropy(model.apply({"params": params}, x), y)

  # The paper's damping and cadence, under which the figures below were measured.
  tx = tkfac_jax.tkfac(
      0.05, damping=1e-3, kl_clip=1e-4, stats_every=1, inverse_every=2, scale_invariant=False
  )
  capture = tkfac_jax.value_grad_and_stats(loss_fn, fisher="sampled")
  base_key = jax.random.key(5)
  traces = []

  @jax.jit
  def step(params, opt_state, x, y, i):
    traces.append(i)
    loss, grads, stats = capture(params, x, y, fisher_key=jax.random.fold_in(base_key, i))
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  params = model.init(jax.random.key(0), x[:1])["params"]
  opt_state = tx.init(params)
  initial = float(loss_fn(params, x, y))
  for i in range(20):
    batch = rng.choice(size, 64, replace=False)
    params, opt_state, loss = step(params, opt_state, x[batch], y[batch], jnp.asarray(i))
    assert np.isfinite(float(loss))
  final = float(loss_fn(params, x, y))
  assert len(traces) == 1
  # Measured: 1.46 -> 0.26 over 20 steps.
  assert final < 0.5 * initial, (initial, final)


def test_helper_under_a_transform_inside_the_loss_gives_a_clear_error():
  """A loss helper reached only through jax.checkpoint inside the loss raises a ValueError."""
  model = nn.Dense(3)
  x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p, x, y):
    inner = lambda p: tkfac_jax.softmax_cross_entropy(model.apply({"params": p}, x), y)
    return jax.checkpoint(inner)(p)

  with pytest.raises(ValueError, match="transformation inside the loss"):
    tkfac_jax.value_grad_and_stats(loss, fisher="sampled")(
        params, x, y, fisher_key=jax.random.key(0)
    )
