"""The Newton-Schulz refresh of the inverses, spread over the steps of the refresh period.

Refreshing a layer's inverses in one step is a latency spike: on an MLP 784-256-128-10 the step
that refreshed the 785x785 factor took over 10 times the median step, whichever step it fell on.
Here the refresh's matrix products are cut into blocks of rows, and the blocks of every layer are
laid out over the ``inverse_every`` steps of the period (:func:`plan`), each step doing at most one
block of each layer and about the same work as the others.

A layer's refresh, block by block (``X`` the iterate, ``A`` a damped factor):

- start: ``A`` (a copy, so that every product of the refresh is with the same matrix, while the
  statistics move on) and ``X`` = the inverse in use, scaled as in
  :func:`tkfac_jax._inverses.newton_schulz_start_scale`;
- product (rows): ``Y[rows] = A[rows] X``; after the last rows, the residual ``|I - Y|_F``;
- update (rows): ``X[rows] = 2 X[rows] - X[rows] Y``: the Newton-Schulz step ``X (2I - A X)``,
  a row at a time (a row of the new ``X`` needs that row of the old one, and all of ``Y``);
- ``NEWTON_SCHULZ_MAX_STEPS`` (product, update) pairs and a last product, for ``Phi_hat`` and then
  for ``Psi_hat``; a factor's remaining blocks are skipped (``lax.cond``) once its residual is
  within ``NEWTON_SCHULZ_TOLERANCE`` or stops shrinking;
- finish: the iterate (symmetrised) where the residual is within the tolerance, else a Cholesky
  inverse of ``A`` (a factor that moved far, or too ill-conditioned for float32 products: the
  only step that can cost more). The layer keeps its inverses when either factor cannot be
  inverted, as with a refresh in one step.

A layer whose whole refresh costs no more than a step's share, or than ``MIN_SPREAD_FLOPS``, is
refreshed in one step, by :func:`tkfac_jax._inverses.damped_inverses`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Hashable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tkfac_jax import _inverses

_PRECISION = jax.lax.Precision.HIGHEST

# Branch indices of a layer's units.
NOOP, WHOLE = 0, 1
START, PHI_PRODUCT, PHI_UPDATE, PSI_PRODUCT, PSI_UPDATE, FINISH = 1, 2, 3, 4, 5, 6


class FactorWork(NamedTuple):
  """One factor's refresh in progress.

  Attributes:
    factor: the damped factor ``A`` being inverted (a vector for a diagonal factor).
    x: the iterate (empty for a diagonal factor).
    y: ``A x``, built a block of rows at a time (empty for a diagonal factor).
    residual: ``|I - A x|_F`` after the last complete product (-1 for a refresh that does not
      iterate: no previous inverse to start from, or a diagonal factor).
    previous: the residual before it.
  """

  factor: jax.Array
  x: jax.Array
  y: jax.Array
  residual: jax.Array
  previous: jax.Array


class RefreshWork(NamedTuple):
  """A layer's refresh in progress: its two factors, the damping they were damped with, and
  whether the layer had statistics when it started."""

  phi: FactorWork
  psi: FactorWork
  damping: jax.Array
  valid: jax.Array


def empty_work(phi_shape, psi_shape, dtype) -> RefreshWork:
  def factor(shape):
    matrix = len(shape) == 2
    inner = shape if matrix else (0,)
    return FactorWork(
        factor=jnp.zeros(shape, dtype),
        x=jnp.zeros(inner, dtype),
        y=jnp.zeros(inner, dtype),
        residual=jnp.zeros((), dtype),
        previous=jnp.zeros((), dtype),
    )

  return RefreshWork(
      phi=factor(phi_shape),
      psi=factor(psi_shape),
      damping=jnp.zeros((), dtype),
      valid=jnp.zeros((), bool),
  )


# ---------------------------------------------------------------------------------------------
# The plan: which block of which layer runs on which step of the period (static, in Python).


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Where a layer's refresh runs in the period.

  ``phases[t]`` is the unit on step ``t`` of the period (``NOOP``; ``WHOLE`` for a layer
  refreshed in one step; else a chunked unit) and ``rows[t]`` the first row of its block.
  """

  chunked: bool
  phases: tuple[int, ...]
  rows: tuple[int, ...]
  phi_block: int = 0
  psi_block: int = 0


def _product_flops(rows: int, n: int) -> float:
  return 2.0 * rows * n * n


def whole_cost(phi_shape, psi_shape) -> float:
  """Matrix-product flops of a refresh in one step, at most (the Cholesky fallback aside)."""
  steps = _inverses.NEWTON_SCHULZ_MAX_STEPS
  return sum(
      (2 * steps + 2) * _product_flops(s[0], s[0]) for s in (phi_shape, psi_shape) if len(s) == 2
  )


def _entries(shape) -> int:
  """Entries of a factor: ``n^2`` for a matrix, ``n`` for a diagonal one (an embedding's)."""
  return shape[0] ** len(shape)


def _start_cost(shapes) -> float:
  """The start's power steps (matrix-vector products) and copies."""
  return sum(2.0 * (2 * _inverses._POWER_STEPS + 4) * _entries(s) for s in shapes)


def _chunked_units(phi_shape, psi_shape, budget: float) -> tuple[list, int, int]:
  """A chunked layer's units in order: ``(phase, first row, flops)``, and the block sizes."""
  units = [(START, 0, _start_cost((phi_shape, psi_shape)))]
  blocks = []
  for shape, product, update in (
      (phi_shape, PHI_PRODUCT, PHI_UPDATE),
      (psi_shape, PSI_PRODUCT, PSI_UPDATE),
  ):
    if len(shape) != 2:
      blocks.append(0)
      continue
    n = shape[0]
    block = n if budget == math.inf else int(min(n, max(1, budget // _product_flops(1, n))))
    blocks.append(block)
    starts = list(range(0, n, block))
    for phase in [product, update] * _inverses.NEWTON_SCHULZ_MAX_STEPS + [product]:
      units += [(phase, r, _product_flops(min(block, n - r), n)) for r in starts]
  units.append((FINISH, 0, sum(2.0 * _entries(s) for s in (phi_shape, psi_shape))))
  return units, blocks[0], blocks[1]


def _pack(shapes: dict, copies: dict, period: int, budget: float) -> dict | None:
  """Lays the layers' units on the steps of the period, each step's load within ``budget`` (a
  step with nothing yet takes any one unit), at most one unit of a layer per step, a layer's
  units in order. A stack of ``copies[key]`` layers runs each unit on all of them at once.
  ``None`` when they do not fit."""
  load = [0.0] * period
  out = {}
  order = sorted(shapes, key=lambda k: -whole_cost(*shapes[k]) * copies[k])
  for key in order:
    phi_shape, psi_shape = shapes[key]
    cost = whole_cost(phi_shape, psi_shape) * copies[key]
    phases, rows = [NOOP] * period, [0] * period
    units, phi_block, psi_block = _chunked_units(phi_shape, psi_shape, budget / copies[key])
    units = [(phase, row, flops * copies[key]) for phase, row, flops in units]
    fewest = len(_chunked_units(phi_shape, psi_shape, math.inf)[0])
    if cost <= max(budget, MIN_SPREAD_FLOPS) or fewest > period:
      # One step: the least loaded one (the earliest among equals).
      t = min(range(period), key=lambda i: (load[i], i))
      load[t] += cost
      phases[t] = WHOLE
      out[key] = LayerPlan(chunked=False, phases=tuple(phases), rows=tuple(rows))
      continue
    t = 0
    for phase, row, flops in units:
      while t < period and load[t] > 0 and load[t] + flops > budget:
        t += 1
      if t >= period:
        return None
      load[t] += flops
      phases[t], rows[t] = phase, row
      t += 1
    out[key] = LayerPlan(
        chunked=True,
        phases=tuple(phases),
        rows=tuple(rows),
        phi_block=phi_block,
        psi_block=psi_block,
    )
  return out


# A layer whose refresh in one step costs fewer flops than this is refreshed in one step (on a
# 2-core CPU, 1e8 flops of matrix products take about 2 ms): spreading it would save little, and
# cost compile time.
MIN_SPREAD_FLOPS = 1e8
# The refreshes are laid out over the first steps of the period, at most this many: beyond it a
# step's share of the work is already small, and the plan's tables stay small for a period that
# is in effect "never" (``inverse_every=2**30``).
MAX_WINDOW = 1000


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple, copies: tuple, period: int) -> tuple:
  layers, copies = dict(shapes), dict(copies)
  total = sum(whole_cost(*s) * copies[k] for k, s in layers.items())
  budget = max(total / period, 1.0)
  while True:
    packed = _pack(layers, copies, period, budget)
    if packed is not None:
      return tuple(packed.items())
    budget *= 1.1


def plan(
    shapes: dict[Hashable, tuple[tuple[int, ...], tuple[int, ...]]],
    period: int,
    copies: dict[Hashable, int] | None = None,
):
  """``{layer: LayerPlan}`` for layers with factor shapes ``{layer: (phi_shape, psi_shape)}``,
  over the first ``min(period, MAX_WINDOW)`` steps of the period. ``copies[layer]`` (default 1)
  is the number of layers in a stack (``nn.scan``), whose refreshes run together, unit by unit.

  The budget of a step starts at the average share (all the refreshes' flops over ``period``) and
  grows by 10% until every layer's units fit in order.
  """
  key = tuple((k, (tuple(a), tuple(b))) for k, (a, b) in shapes.items())
  counts = tuple((k, int((copies or {}).get(k, 1))) for k in shapes)
  return dict(_plan(key, counts, min(int(period), MAX_WINDOW)))


def peak_flops(plans: dict, shapes: dict, copies: dict | None = None) -> float:
  """The most matrix-product flops any step of the period does (for reports)."""
  period = len(next(iter(plans.values())).phases)
  load = np.zeros(period)
  for key, p in plans.items():
    phi_shape, psi_shape = shapes[key]
    n = (copies or {}).get(key, 1)
    if not p.chunked:
      load[list(p.phases).index(WHOLE)] += n * whole_cost(phi_shape, psi_shape)
      continue
    for t, (phase, row) in enumerate(zip(p.phases, p.rows)):
      if phase in (PHI_PRODUCT, PHI_UPDATE):
        load[t] += n * _product_flops(min(p.phi_block, phi_shape[0] - row), phi_shape[0])
      elif phase in (PSI_PRODUCT, PSI_UPDATE):
        load[t] += n * _product_flops(min(p.psi_block, psi_shape[0] - row), psi_shape[0])
  return float(load.max())


# ---------------------------------------------------------------------------------------------
# The units, traced into the step.


def _stopped(work: FactorWork) -> jax.Array:
  """Converged, stalled or diverging (or NaN, or not iterating): the factor's remaining blocks are
  skipped."""
  return ~(work.residual > _inverses.NEWTON_SCHULZ_TOLERANCE) | ~(work.residual < work.previous)


def _rows(matrix: jax.Array, row: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """The ``block`` rows from ``row`` (moved back to fit), and which of them are from ``row`` on."""
  start = jnp.minimum(row, matrix.shape[0] - block)
  mine = (start + jnp.arange(block)) >= row
  return start, mine


def _write_rows(matrix, start, mine, new):
  old = jax.lax.dynamic_slice_in_dim(matrix, start, new.shape[0], 0)
  return jax.lax.dynamic_update_slice_in_dim(matrix, jnp.where(mine[:, None], new, old), start, 0)


def start(factor: jax.Array, previous: jax.Array, has_previous: jax.Array) -> FactorWork:
  """A factor's refresh from the inverse in use (``has_previous``), else one that goes straight
  to the Cholesky inverse at the finish."""
  # Not yet measured: a residual below a previous one, both above any tolerance (finite, so
  # that the state stays finite); -1 for a refresh that does not iterate.
  big = jnp.asarray(jnp.finfo(factor.dtype).max, factor.dtype)
  none = jnp.asarray(-1.0, factor.dtype)
  if factor.ndim == 1:
    empty = jnp.zeros((0,), factor.dtype)
    return FactorWork(factor, empty, empty, none, big)
  scale = jax.lax.cond(
      has_previous,
      lambda: _inverses.newton_schulz_start_scale(factor, previous),
      lambda: jnp.ones((), factor.dtype),
  )
  return FactorWork(
      factor=factor,
      x=previous * scale,
      y=jnp.zeros_like(factor),
      residual=jnp.where(has_previous, big / 2, none),
      previous=big,
  )


def product(work: FactorWork, row: jax.Array, block: int) -> FactorWork:
  """``Y[rows] = A[rows] X``; after the last block, the residual ``|I - Y|_F``."""

  def run(work):
    first, mine = _rows(work.factor, row, block)
    a = jax.lax.dynamic_slice_in_dim(work.factor, first, block, 0)
    y = _write_rows(work.y, first, mine, jnp.matmul(a, work.x, precision=_PRECISION))
    last = row + block >= work.factor.shape[0]
    # The residual only once Y is complete: an n x n pass that the other blocks need not pay.
    norm = jax.lax.cond(
        last,
        lambda: jnp.linalg.norm(jnp.eye(y.shape[0], dtype=y.dtype) - y),
        lambda: work.residual,
    )
    return work._replace(
        y=y,
        residual=jnp.where(last, norm, work.residual),
        previous=jnp.where(last, work.residual, work.previous),
    )

  return jax.lax.cond(_stopped(work), lambda w: w, run, work)


def update(work: FactorWork, row: jax.Array, block: int) -> FactorWork:
  """``X[rows] = 2 X[rows] - X[rows] Y``, with ``Y = A X`` from the complete product."""

  def run(work):
    first, mine = _rows(work.x, row, block)
    x = jax.lax.dynamic_slice_in_dim(work.x, first, block, 0)
    new = 2 * x - jnp.matmul(x, work.y, precision=_PRECISION)
    return work._replace(x=_write_rows(work.x, first, mine, new))

  return jax.lax.cond(_stopped(work), lambda w: w, run, work)


def finish(work: FactorWork) -> tuple[jax.Array, jax.Array]:
  """The inverse and whether it is usable: the iterate (symmetrised) where it converged, else a
  Cholesky inverse of the factor."""
  if work.factor.ndim == 1:
    return _inverses.cholesky_inverse(work.factor)
  converged = (work.residual >= 0) & (work.residual <= _inverses.NEWTON_SCHULZ_TOLERANCE)
  return jax.lax.cond(
      converged,
      lambda: (0.5 * (work.x + work.x.T), jnp.all(jnp.isfinite(work.x))),
      lambda: _inverses.cholesky_inverse(work.factor),
  )


def run_unit(
    phase: int,
    layer,
    row: jax.Array,
    plan: LayerPlan,
    damping: jax.Array,
    *,
    curvature: str,
    pi_damping: bool,
):
  """One unit (a static ``phase``) of a chunked layer's refresh on its ``LayerState``."""
  work: RefreshWork = layer.work
  if phase == NOOP:
    return layer
  if phase == START:
    phi_hat, psi_hat = _inverses.damped_factors(layer.statistics, damping, curvature, pi_damping)
    has_previous = layer.damping > 0
    return layer._replace(
        work=RefreshWork(
            phi=start(phi_hat, layer.inverses.phi, has_previous),
            psi=start(psi_hat, layer.inverses.psi, has_previous),
            damping=jnp.asarray(damping, work.damping.dtype),
            valid=layer.count > 0,
        )
    )
  if phase in (PHI_PRODUCT, PHI_UPDATE) and work.phi.factor.ndim == 1:
    return layer  # A diagonal factor (an embedding's) has no products: never on the plan.
  if phase == PHI_PRODUCT:
    return layer._replace(work=work._replace(phi=product(work.phi, row, plan.phi_block)))
  if phase == PHI_UPDATE:
    return layer._replace(work=work._replace(phi=update(work.phi, row, plan.phi_block)))
  if phase == PSI_PRODUCT:
    return layer._replace(work=work._replace(psi=product(work.psi, row, plan.psi_block)))
  if phase == PSI_UPDATE:
    return layer._replace(work=work._replace(psi=update(work.psi, row, plan.psi_block)))
  assert phase == FINISH, phase
  phi_inv, phi_ok = finish(work.phi)
  psi_inv, psi_ok = finish(work.psi)
  use = work.valid & phi_ok & psi_ok
  new = _inverses.DampedInverses(phi=phi_inv, psi=psi_inv)
  return layer._replace(
      inverses=jax.tree.map(lambda n, o: jnp.where(use, n, o), new, layer.inverses),
      damping=jnp.where(use, work.damping, layer.damping),
  )


def step_units(layer, slot: jax.Array, plan: LayerPlan, damping, **kwargs):
  """Runs the unit of a chunked layer's refresh due on step ``slot`` of the period.

  Two-way ``lax.cond``s, each over only what its unit changes, rather than one ``lax.switch``
  over the layer: XLA updates a conditional's operands in place (with a donated state), where a
  switch whose branches write different arrays copied the whole layer state on every step.
  """
  phases = jnp.asarray(plan.phases, jnp.int32)
  rows = jnp.asarray(plan.rows, jnp.int32)
  inside = slot < len(plan.phases)
  slot = jnp.minimum(slot, len(plan.phases) - 1)
  row = rows[slot]
  phase = jnp.where(inside, phases[slot], NOOP)

  def when(due, fn, operand):
    return jax.lax.cond(due, fn, lambda x: x, operand)

  def unit(kind):
    return functools.partial(run_unit, kind, row=row, plan=plan, damping=damping, **kwargs)

  layer = when(phase == START, unit(START), layer)
  work = layer.work
  factors = {}
  for name, product_phase, block in (
      ("phi", PHI_PRODUCT, plan.phi_block), ("psi", PSI_PRODUCT, plan.psi_block)
  ):
    factor = getattr(work, name)
    if factor.factor.ndim == 2:
      is_product, is_update = phase == product_phase, phase == product_phase + 1
      factor = when(
          is_product | is_update,
          lambda w, p=is_product, b=block: jax.lax.cond(
              p, lambda w: product(w, row, b), lambda w: update(w, row, b), w
          ),
          factor,
      )
    factors[name] = factor
  layer = layer._replace(work=work._replace(**factors))
  return when(phase == FINISH, unit(FINISH), layer)


def whole_slot(plan: LayerPlan) -> int:
  return plan.phases.index(WHOLE)

