"""Damped Kronecker factors and their inverses, computed with XLA's linear algebra."""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from tkfac_jax import _statistics

_PRECISION = jax.lax.Precision.HIGHEST

InverseMethod = Literal["newton_schulz", "cholesky"]
INVERSE_METHODS = ("newton_schulz", "cholesky")
# Newton-Schulz from the previous inverse: at most this many steps, stopping once the residual
# |I - A X|_F is at most the tolerance; past them, a Cholesky inverse. On an MLP on Fashion-MNIST
# (benchmarks/inverse_methods.py) the scaled start needed 2 to 4 steps at inverse_every=10.
NEWTON_SCHULZ_MAX_STEPS = 6
NEWTON_SCHULZ_TOLERANCE = 1e-2
_POWER_STEPS = 8


class DampedInverses(NamedTuple):
  """``Phi_hat^-1`` and ``Psi_hat^-1`` of one layer (``phi`` is a vector for an embedding,
  whose input factor is diagonal)."""

  phi: jax.Array
  psi: jax.Array


def scaled_factors(
    stats: _statistics.LayerStatistics, curvature: _statistics.Curvature
) -> tuple[jax.Array, jax.Array]:
  """The two undamped factors whose Kronecker product approximates the Fisher block.

  TKFAC: ``sqrt(delta) Phi`` and ``sqrt(delta) Psi``, so their product is ``delta Psi kron Phi``.
  K-FAC: ``A`` and ``G``.
  """
  if curvature == "kfac":
    return stats.phi, stats.psi
  # phi and psi hold delta*Phi and delta*Psi; a layer whose statistics are all zero gives zero.
  scale = jax.lax.rsqrt(jnp.maximum(stats.delta, jnp.finfo(stats.delta.dtype).tiny))
  return stats.phi * scale, stats.psi * scale


def _mean_diagonal(factor: jax.Array) -> jax.Array:
  return jnp.mean(factor) if factor.ndim == 1 else jnp.trace(factor) / factor.shape[0]


def _add_to_diagonal(factor: jax.Array, value: jax.Array) -> jax.Array:
  if factor.ndim == 1:
    return factor + value
  return factor + value * jnp.eye(factor.shape[0], dtype=factor.dtype)


def pi_adjustment(phi: jax.Array, psi: jax.Array) -> jax.Array:
  """Martens & Grosse (2015) Sec. 6.3: ``pi = sqrt((tr(phi)/d_in) / (tr(psi)/d_out))``."""
  phi_mean = _mean_diagonal(phi)
  psi_mean = _mean_diagonal(psi)
  ok = (phi_mean > 0) & (psi_mean > 0)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, phi_mean / jnp.where(ok, psi_mean, 1.0), 1.0)), 1.0)


def damped_factors(
    stats: _statistics.LayerStatistics,
    damping: jax.Array | float,
    curvature: _statistics.Curvature,
    pi_damping: bool,
) -> tuple[jax.Array, jax.Array]:
  """``Phi_hat`` and ``Psi_hat`` (TKFAC Eqs. 5.14-5.15), ``sqrt(damping)`` split over the two.

  With ``pi_damping`` the split is ``pi * sqrt(damping)`` and ``sqrt(damping) / pi``.
  """
  phi, psi = scaled_factors(stats, curvature)
  if phi.ndim == 2:
    phi = 0.5 * (phi + phi.T)
  psi = 0.5 * (psi + psi.T)
  root = jnp.sqrt(jnp.asarray(damping, phi.dtype))
  pi = pi_adjustment(phi, psi) if pi_damping else jnp.ones((), phi.dtype)
  return _add_to_diagonal(phi, pi * root), _add_to_diagonal(psi, root / pi)


def cholesky_inverse(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverse of a symmetric positive-definite matrix through its Cholesky factor.

  Returns the inverse and whether it is usable (the factorisation succeeded and is finite): a
  matrix that is not positive definite gives NaNs in XLA's Cholesky, never an exception. A
  vector is taken as the diagonal of a diagonal matrix.
  """
  if matrix.ndim == 1:
    return 1.0 / matrix, jnp.all(matrix > 0) & jnp.all(jnp.isfinite(matrix))
  chol = jnp.linalg.cholesky(matrix)
  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
  inverse = jnp.matmul(inv_chol.T, inv_chol, precision=_PRECISION)
  return inverse, jnp.all(jnp.isfinite(inverse))


def newton_schulz_start_scale(matrix: jax.Array, previous: jax.Array) -> jax.Array:
  """What to multiply the previous inverse ``P`` by to start Newton-Schulz on ``matrix``.

  1 when a few power steps (matrix-vector products, no matrix product) put the largest
  eigenvalue ``mu`` of ``A P`` below 1.5, else ``1 / mu``: the iteration converges when every
  eigenvalue of ``A X`` lies in ``(0, 2)``.
  """
  n = matrix.shape[0]
  mv = functools.partial(jnp.matmul, precision=_PRECISION)

  def power(_, v):
    w = mv(matrix, mv(previous, v))
    return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)

  v = jax.lax.fori_loop(0, _POWER_STEPS, power, jnp.full((n,), n**-0.5, matrix.dtype))
  mu = jnp.linalg.norm(mv(matrix, mv(previous, v)))
  return jnp.where(mu <= 1.5, 1.0, 1.0 / mu).astype(matrix.dtype)


def newton_schulz_inverse(
    matrix: jax.Array, previous: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``A^-1`` by Newton-Schulz steps ``X <- X + X (I - A X)`` from the previous inverse.

  ``A P`` (``P`` the previous inverse) has positive real eigenvalues, close to 1 when the factor
  has moved little since ``P``. The iteration converges when they all lie in ``(0, 2)`` (the
  residual ``I - A X`` then has spectral radius below 1, and it squares at every step), so it
  starts from ``P`` itself when a few power steps (matrix-vector products) put the largest below
  1.5, and from ``P / mu``, ``mu`` that estimate, otherwise. It stops once
  ``|I - A X|_F <= NEWTON_SCHULZ_TOLERANCE``, after ``NEWTON_SCHULZ_MAX_STEPS`` steps, or as soon
  as the residual stops shrinking (a factor too ill-conditioned for float32 products, or not
  positive definite, on which it diverges). A previous inverse already within the tolerance is returned unchanged.

  Returns:
    The iterate (symmetrised) and whether it converged.
  """
  n = matrix.shape[0]
  eye = jnp.eye(n, dtype=matrix.dtype)
  mm = functools.partial(jnp.matmul, precision=_PRECISION)

  def residual(x):
    return eye - mm(matrix, x)

  # A factor that has not moved (within the tolerance) keeps its inverse exactly.
  moved = residual(previous)
  kept = jnp.linalg.norm(moved) <= NEWTON_SCHULZ_TOLERANCE
  scale = jnp.where(kept, 1.0, newton_schulz_start_scale(matrix, previous))
  # I - A (P / mu), from I - A P without another product.
  start = (previous * scale, eye - (eye - moved) * scale)

  def unfinished(carry):
    i, _, _, norm, previous_norm = carry
    return (
        (i < NEWTON_SCHULZ_MAX_STEPS)
        & (norm > NEWTON_SCHULZ_TOLERANCE)
        & (norm < previous_norm)  # Still shrinking: not stalled at float32's floor, or diverging.
    )

  def step(carry):
    i, x, error, norm, _ = carry
    x = x + mm(x, error)
    # The residual is computed, not predicted as error^2: in float32 an ill-conditioned factor's
    # residual stalls well above what exact arithmetic would give.
    error = residual(x)
    return i + 1, x, error, jnp.linalg.norm(error), norm

  norm = jnp.linalg.norm(start[1])
  steps, x, _, norm, _ = jax.lax.while_loop(
      unfinished, step, (0, *start, norm, jnp.asarray(jnp.inf, norm.dtype))
  )
  converged = norm <= NEWTON_SCHULZ_TOLERANCE
  x = jnp.where(steps > 0, 0.5 * (x + x.T), x)
  return x, converged & jnp.all(jnp.isfinite(x))


def inverse(
    matrix: jax.Array, previous: jax.Array, has_previous: jax.Array, method: InverseMethod
) -> tuple[jax.Array, jax.Array]:
  """The inverse of a damped factor, and whether it is usable.

  ``"cholesky"``: through the Cholesky factor. ``"newton_schulz"``: by
  :func:`newton_schulz_inverse` from ``previous`` (the inverse in use) where there is one and it
  converges, else (a layer's first refresh, a factor that moved far or is too ill-conditioned for
  float32 to reach the tolerance) through the Cholesky factor, under ``lax.cond`` so that the
  factorisation runs only then. A vector is the diagonal of a diagonal matrix.

  Why Newton-Schulz by default: it is matrix products only. On a CPU those run on XLA's own
  threads, whereas jaxlib's Cholesky runs on an OpenBLAS thread pool that contends with them:
  on a 2-core machine each refresh that called it slowed the following steps by some 30 ms in
  all, and a 785x785 Cholesky took up to 260 ms instead of 23 ms while XLA was busy
  (``benchmarks/inverse_methods.py``); GPUs and TPUs, too, do products far faster than
  factorisations.
  """
  if matrix.ndim == 1:
    return 1.0 / matrix, jnp.all(matrix > 0) & jnp.all(jnp.isfinite(matrix))
  if method == "cholesky":
    return cholesky_inverse(matrix)

  x, converged = jax.lax.cond(
      has_previous,
      lambda: newton_schulz_inverse(matrix, previous),
      lambda: (previous, jnp.zeros((), bool)),
  )
  # One Cholesky in the program, for every case that needs it.
  return jax.lax.cond(
      converged, lambda: (x, jnp.ones((), bool)), lambda: cholesky_inverse(matrix)
  )


def damped_inverses(
    stats: _statistics.LayerStatistics,
    damping: jax.Array | float,
    previous: DampedInverses,
    has_previous: jax.Array,
    curvature: _statistics.Curvature,
    pi_damping: bool,
    method: InverseMethod = "newton_schulz",
) -> tuple[DampedInverses, jax.Array]:
  """``Phi_hat^-1`` and ``Psi_hat^-1``, and whether both factors could be inverted.

  ``previous`` are the inverses in use (Newton-Schulz starts from them), ``has_previous`` whether
  they were computed from statistics (rather than the initial identity).
  """
  phi_hat, psi_hat = damped_factors(stats, damping, curvature, pi_damping)
  phi_inv, phi_ok = inverse(phi_hat, previous.phi, has_previous, method)
  psi_inv, psi_ok = inverse(psi_hat, previous.psi, has_previous, method)
  return DampedInverses(phi=phi_inv, psi=psi_inv), phi_ok & psi_ok


def precondition(inverses: DampedInverses, grad: jax.Array) -> jax.Array:
  """``Phi_hat^-1 G Psi_hat^-1`` for a ``(d_in[+1], d_out)`` gradient block ``G``."""
  if inverses.phi.ndim == 1:
    left = inverses.phi[:, None] * grad
  else:
    left = jnp.matmul(inverses.phi, grad, precision=_PRECISION)
  return jnp.matmul(left, inverses.psi, precision=_PRECISION)
