"""Per-layer factor statistics: the maths of TKFAC's Phi, Psi and delta (and K-FAC's A and G).

A layer seen at ``T`` locations per example contributes pairs ``(a_nt, g_nt)``: ``a`` the layer
input with the bias folded in as a homogeneous coordinate, ``g = dl_n/dy`` the per-example output
gradient. Everything here reduces those pairs to small matrices inside the step, so that no
per-example activation leaves it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Curvature = Literal["tkfac", "kfac"]
CURVATURES = ("tkfac", "kfac")

# The statistics are float32 sums of many products; on accelerators the default matmul
# precision can be bfloat16, which would make the factors too noisy to invert.
_PRECISION = jax.lax.Precision.HIGHEST


class LayerStatistics(NamedTuple):
  """One layer's curvature statistics for one batch (or their running average).

  TKFAC mode (paper Eq. 4.9), stored un-normalised so that averages keep trace 1 exactly:

  .. math::
    \\phi = E_n \\sum_t |g_{nt}|^2 a_{nt} a_{nt}^T = \\delta\\,\\Phi, \\quad
    \\psi = E_n \\sum_t |a_{nt}|^2 g_{nt} g_{nt}^T = \\delta\\,\\Psi, \\quad
    \\delta = E_n \\sum_t |a_{nt}|^2 |g_{nt}|^2.

  K-FAC mode: ``phi = A = E_n sum_t a a^T`` and ``psi = G = (1/T) E_n sum_t g g^T``; ``delta`` is
  still the TKFAC trace (the exact Fisher block's trace when ``T = 1``), kept for diagnostics.

  Attributes:
    phi: ``(d_in + 1, d_in + 1)`` with a bias (``(d_in, d_in)`` without), input-side factor; for
      an embedding, its diagonal ``(num_embeddings,)``.
    psi: ``(d_out, d_out)``, output-side factor.
    delta: scalar, the trace of the Fisher block.
  """

  phi: jax.Array
  psi: jax.Array
  delta: jax.Array


def _gram(left: jax.Array, right: jax.Array) -> jax.Array:
  """``left^T @ right``, a sum over the (batch and location) rows.

  When the rows are sharded over an explicitly sharded mesh axis, JAX cannot guess how to shard
  the sum; the factors are small, so it is asked to replicate them.
  """
  spec = jax.typeof(left).sharding.spec
  out_sharding = jax.sharding.PartitionSpec() if any(s is not None for s in spec) else None
  return jnp.matmul(left.T, right, precision=_PRECISION, out_sharding=out_sharding)


def homogeneous(x: jax.Array) -> jax.Array:
  """Appends the constant 1 that folds a bias into the kernel: ``a = [x, 1]``."""
  # ones_like keeps x's sharding (explicitly sharded meshes need operands sharded alike).
  return jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)


def dense_statistics(
    a: jax.Array, g: jax.Array, curvature: Curvature = "tkfac", locations: int | None = None
) -> LayerStatistics:
  """Reduces a dense layer's inputs and per-example output gradients to factor statistics.

  Args:
    a: ``[B, T, d_in]`` layer inputs (already augmented with the homogeneous 1 if the layer has a
      bias), ``T`` locations per example.
    g: ``[B, T, d_out]`` per-example output gradients ``dl_n/dy_nt`` (that is ``B`` times the
      gradient of the mean loss).
    curvature: ``"tkfac"`` for TKFAC's weighted factors, ``"kfac"`` for K-FAC's.
    locations: K-FAC's ``T`` in ``G = (1/T) E_n sum_t g g^T``; ``None``: ``a.shape[1]``. (A
      layer applied several times sums its calls' statistics, and divides by all their locations.)

  Returns:
    The batch's :class:`LayerStatistics`.
  """
  batch = a.shape[0]
  locations = a.shape[1] if locations is None else locations
  a = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
  g = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  a_sq = jnp.sum(a * a, axis=-1)
  g_sq = jnp.sum(g * g, axis=-1)
  delta = jnp.sum(a_sq * g_sq) / batch
  if curvature == "tkfac":
    # Each example's outer product is weighted by the other side's squared norm.
    phi = _gram(a * g_sq[:, None], a) / batch
    psi = _gram(g * a_sq[:, None], g) / batch
  elif curvature == "kfac":
    phi = _gram(a, a) / batch
    psi = _gram(g, g) / (batch * locations)
  else:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
  return LayerStatistics(phi=phi, psi=psi, delta=delta)


def embedding_statistics(
    tokens: jax.Array,
    g: jax.Array,
    num_embeddings: int,
    curvature: Curvature = "tkfac",
    locations: int | None = None,
) -> LayerStatistics:
  """Factor statistics of an embedding lookup, whose inputs are one-hot vectors.

  With ``a_nt = onehot(token_nt)``, ``|a|^2 = 1`` and ``a a^T`` is diagonal, so the input factor
  is kept as its diagonal (a vector of per-token sums), never as a ``V x V`` matrix.

  Args:
    tokens: ``[B, T]`` integer token ids.
    g: ``[B, T, d]`` per-example output gradients.
    num_embeddings: ``V``.
    curvature: ``"tkfac"`` or ``"kfac"``.
    locations: as for :func:`dense_statistics`.

  Returns:
    :class:`LayerStatistics` with ``phi`` of shape ``(V,)`` (the diagonal).
  """
  batch = tokens.shape[0]
  locations = tokens.shape[1] if locations is None else locations
  tokens = tokens.reshape(-1)
  g = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  g_sq = jnp.sum(g * g, axis=-1)
  delta = jnp.sum(g_sq) / batch
  if curvature == "tkfac":
    phi = jax.ops.segment_sum(g_sq, tokens, num_segments=num_embeddings) / batch
    psi = _gram(g, g) / batch
  elif curvature == "kfac":
    counts = jax.ops.segment_sum(jnp.ones_like(g_sq), tokens, num_segments=num_embeddings)
    phi = counts / batch
    psi = _gram(g, g) / (batch * locations)
  else:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
  return LayerStatistics(phi=phi, psi=psi, delta=delta)
