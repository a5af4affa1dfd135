"""The damped factors' inverses: Newton-Schulz from the previous inverse, and Cholesky, against
``np.linalg.inv`` in float64.

Tolerances, norm-wise in the spectral norm: a converged Newton-Schulz inverse ``X`` has
``|I - A X|_F <= NEWTON_SCHULZ_TOLERANCE``, so ``|X - A^-1| <= NEWTON_SCHULZ_TOLERANCE |A^-1|``;
a Cholesky inverse in float32 is off by about ``cond(A)`` times the unit roundoff (6e-8).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax
from tkfac_jax import _inverses

N = 40
TOLERANCE = _inverses.NEWTON_SCHULZ_TOLERANCE


def _factor(cond, seed=0, drift=0.0):
  """A symmetric positive-definite ``N x N`` matrix with the given condition number; ``drift``
  moves its eigenvalues by up to that fraction (as a running average moves a factor)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(np.random.default_rng(100).standard_normal((N, N)))
  eigenvalues = np.logspace(0, -np.log10(cond), N) * (1 + drift * rng.random(N))
  return (q * eigenvalues) @ q.T


def _error(x, a):
  """``|x - A^-1|_2 / |A^-1|_2`` against the float64 inverse."""
  exact = np.linalg.inv(a)
  return np.linalg.norm(np.asarray(x, np.float64) - exact, 2) / np.linalg.norm(exact, 2)


@jax.jit
def _inverse_ns(a, previous):
  return _inverses.inverse(a, previous, jnp.bool_(True), "newton_schulz")


@jax.jit
def _inverse_cholesky(a):
  return _inverses.cholesky_inverse(a)


@pytest.mark.parametrize("cond", [1e1, 1e2, 1e3])
def test_newton_schulz_from_a_drifted_inverse_equals_the_inverse(cond):
  """From the inverse of a factor that has moved by up to 40% in every direction, it converges to
  within its tolerance; the start was far outside it, so the check can fail."""
  a, old = _factor(cond), _factor(cond, drift=0.4)
  previous = jnp.float32(np.linalg.inv(old))
  x, converged = jax.jit(_inverses.newton_schulz_inverse)(jnp.float32(a), previous)
  assert bool(converged)
  assert _error(x, a) <= TOLERANCE
  assert _error(previous, a) > 10 * TOLERANCE  # The start was not already the answer.
  # And what the refresh uses is this iterate, not the Cholesky fallback's.
  got, ok = _inverse_ns(jnp.float32(a), previous)
  assert bool(ok)
  references.assert_trees_equal(got, x)


def test_an_unmoved_factor_keeps_its_inverse_exactly():
  a = jnp.float32(_factor(1e2))
  previous, _ = _inverse_cholesky(a)
  x, converged = jax.jit(_inverses.newton_schulz_inverse)(a, previous)
  assert bool(converged)
  references.assert_trees_equal(x, previous)


@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_cholesky_inverse_equals_the_inverse(cond):
  """Cholesky in float32: within 10 cond(A) unit roundoffs of the float64 inverse."""
  a = _factor(cond)
  x, ok = _inverse_cholesky(jnp.float32(a))
  assert bool(ok)
  assert _error(x, a) <= 10 * cond * 6e-8


def test_ill_conditioned_factor_falls_back_to_cholesky():
  """cond 1e6: float32 products cannot reach the tolerance, so Newton-Schulz reports it has not
  converged and the inverse is the Cholesky one, never a half-converged iterate."""
  a, old = jnp.float32(_factor(1e6)), _factor(1e6, drift=0.3)
  previous = jnp.float32(np.linalg.inv(old))
  _, converged = jax.jit(_inverses.newton_schulz_inverse)(a, previous)
  assert not bool(converged)
  got, ok = _inverse_ns(a, previous)
  want, _ = _inverse_cholesky(a)
  assert bool(ok)
  references.assert_trees_close(got, want, references.SAME_MATHS)
  assert _error(got, np.asarray(a, np.float64)) <= 10 * 1e6 * 6e-8


def test_factor_that_is_not_positive_definite_is_not_usable():
  """A negative eigenvalue: Newton-Schulz diverges along it, Cholesky fails, and the inverse is
  reported unusable (the optimizer then keeps the previous one)."""
  a = _factor(1e2)
  w, v = np.linalg.eigh(a)
  indefinite = jnp.float32((v * np.where(np.arange(N) == 0, -w, w)) @ v.T)
  previous = jnp.float32(np.linalg.inv(a))
  _, converged = jax.jit(_inverses.newton_schulz_inverse)(indefinite, previous)
  assert not bool(converged)
  _, ok = _inverse_ns(indefinite, previous)
  assert not bool(ok)


def test_first_refresh_uses_cholesky():
  """Without a previous inverse (the initial identity), the first refresh is the Cholesky one,
  even for a factor near the identity, from which Newton-Schulz would converge (to another
  float32 result, within its tolerance only)."""
  rng = np.random.default_rng(3)
  s = rng.standard_normal((N, N))
  a = jnp.float32(np.eye(N) + 0.05 * (s + s.T) / np.linalg.norm(s + s.T, 2))
  eye = jnp.eye(N)
  want, _ = _inverse_cholesky(a)
  iterated, converged = jax.jit(_inverses.newton_schulz_inverse)(a, eye)
  assert bool(converged)
  assert references.max_error(iterated, want) > references.SAME_MATHS  # The check can fail.
  got, ok = jax.jit(lambda a: _inverses.inverse(a, eye, jnp.bool_(False), "newton_schulz"))(a)
  assert bool(ok)
  references.assert_trees_close(got, want, references.SAME_MATHS)


def test_optimizer_with_either_method_trains_alike():
  """scale_by_tkfac with Newton-Schulz and with Cholesky, fed the same gradients and statistics
  over 7 steps (refreshes every 2): inverses within the Newton-Schulz tolerance of each other,
  and updates close."""
  model = nn.Dense(4)
  rng = np.random.default_rng(0)
  params = {"dense": model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]}

  def loss(params, x, y):
    return jnp.mean((model.apply({"params": params["dense"]}, x) - y) ** 2)

  txs = {m: tkfac_jax.scale_by_tkfac(1e-2, stats_every=1, inverse_every=2, inverse_method=m)
         for m in ("newton_schulz", "cholesky")}
  updates_fns = {m: jax.jit(tx.update) for m, tx in txs.items()}
  states = {m: tx.init(params) for m, tx in txs.items()}
  capture = jax.jit(tkfac_jax.value_grad_and_stats(loss))
  updates = {}
  for _ in range(7):
    x = jnp.float32(rng.standard_normal((32, 6)))
    y = jnp.float32(rng.standard_normal((32, 4)))
    _, grads, stats = capture(params, x, y)
    for m in txs:
      updates[m], states[m] = updates_fns[m](grads, states[m], params, stats=stats)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates["cholesky"]))
  ns, chol = (states[m].layers["dense"].inverses for m in ("newton_schulz", "cholesky"))
  assert not np.array_equal(ns.phi, chol.phi)  # The refreshes after the first were iterations.
  for got, want in zip(ns, chol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.linalg.norm(got - want, 2) <= 1.01 * TOLERANCE * np.linalg.norm(want, 2)
  u_ns, u_chol = (np.asarray(updates[m]["dense"]["kernel"]) for m in ("newton_schulz", "cholesky"))
  assert references.relative_error(u_ns, u_chol) <= 2 * TOLERANCE


def test_inverse_method_bad_input():
  with pytest.raises(ValueError, match="inverse_method must be one of"):
    tkfac_jax.scale_by_tkfac(inverse_method="qr")
  with pytest.raises(ValueError, match="inverse_method must be one of"):
    tkfac_jax.tkfac(0.1, inverse_method="lu")
