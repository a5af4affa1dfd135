"""Damped Kronecker factors and their inverses, computed with XLA's linear algebra."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tkfac_jax import _statistics

_PRECISION = jax.lax.Precision.HIGHEST


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

  Chosen by measurement (``benchmarks/inverse_methods.py``): on a CPU it is as fast as an LU
  inverse and 2 to 3 times faster than ``eigh``; Newton-Schulz steps from the previous inverse,
  the matmul-only alternative, do not converge reliably here, since between two refreshes
  (``inverse_every=10``, decay 0.95) a factor moves so far that ``|I - A X_prev|_2`` had a
  median of 0.16 to 0.91 and a maximum of 0.9 to 4.3 across the factors of an MLP on
  Fashion-MNIST (Newton-Schulz needs it well below 1).

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


def damped_inverses(
    stats: _statistics.LayerStatistics,
    damping: jax.Array | float,
    curvature: _statistics.Curvature,
    pi_damping: bool,
) -> tuple[DampedInverses, jax.Array]:
  """``Phi_hat^-1`` and ``Psi_hat^-1``, and whether both factors could be inverted."""
  phi_hat, psi_hat = damped_factors(stats, damping, curvature, pi_damping)
  phi_inv, phi_ok = cholesky_inverse(phi_hat)
  psi_inv, psi_ok = cholesky_inverse(psi_hat)
  return DampedInverses(phi=phi_inv, psi=psi_inv), phi_ok & psi_ok


def precondition(inverses: DampedInverses, grad: jax.Array) -> jax.Array:
  """``Phi_hat^-1 G Psi_hat^-1`` for a ``(d_in[+1], d_out)`` gradient block ``G``."""
  if inverses.phi.ndim == 1:
    left = inverses.phi[:, None] * grad
  else:
    left = jnp.matmul(inverses.phi, grad, precision=_PRECISION)
  return jnp.matmul(left, inverses.psi, precision=_PRECISION)
