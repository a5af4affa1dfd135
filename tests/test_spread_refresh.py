"""The Newton-Schulz refresh spread over the steps of the period (``tkfac_jax._schedule``).

References: ``np.linalg.inv`` in float64 of damped factors computed here from the statistics
(TKFAC Eqs. 5.14-5.15), and a loop that visits every row block of every product. Tolerances are
those of ``test_inverses.py``: a converged iterate ``X`` has ``|I - A X|_F <=
NEWTON_SCHULZ_TOLERANCE``, so ``|X - A^-1|_2 <= NEWTON_SCHULZ_TOLERANCE |A^-1|_2``; a Cholesky
inverse in float32 is off by about ``cond(A)`` unit roundoffs.
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
from tkfac_jax import _schedule
from tkfac_jax import _transform
from tkfac_jax import _tree

TOLERANCE = _inverses.NEWTON_SCHULZ_TOLERANCE
N = 40


def _error(x, a):
  """``|x - A^-1|_2 / |A^-1|_2`` against the float64 inverse."""
  exact = np.linalg.inv(np.asarray(a, np.float64))
  return np.linalg.norm(np.asarray(x, np.float64) - exact, 2) / np.linalg.norm(exact, 2)


def _factor(cond, seed=0, drift=0.0, n=N):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(np.random.default_rng(100 + n).standard_normal((n, n)))
  eigenvalues = np.logspace(0, -np.log10(cond), n) * (1 + drift * rng.random(n))
  return (q * eigenvalues) @ q.T


def _layer(phi, psi, previous_phi, previous_psi):
  """A LayerState whose K-FAC factors at damping 0 are ``phi`` and ``psi`` (symmetric), with
  inverses ``previous_*`` in use, computed at damping 1."""
  dtype = jnp.float32
  return _transform.LayerState(
      statistics=_tree_stats(phi, psi),
      count=jnp.ones((), jnp.int32),
      inverses=_inverses.DampedInverses(phi=jnp.asarray(previous_phi, dtype),
                                        psi=jnp.asarray(previous_psi, dtype)),
      damping=jnp.ones((), dtype),
      peak=jnp.ones((), dtype),
      work=_schedule.empty_work(phi.shape, psi.shape, dtype),
  )


def _tree_stats(phi, psi):
  from tkfac_jax import _statistics
  return _statistics.LayerStatistics(
      phi=jnp.float32(phi), psi=jnp.float32(psi), delta=jnp.ones((), jnp.float32))


def _refresh_by_blocks(layer, phi_block, psi_block):
  """Every unit of a spread refresh, in order, one call each: the start, then for each factor
  ``NEWTON_SCHULZ_MAX_STEPS`` products and updates over all its row blocks and a last product,
  then the finish (damping 0: the damped factors are the statistics)."""
  plan = _schedule.LayerPlan(chunked=True, phases=(), rows=(), phi_block=phi_block,
                             psi_block=psi_block)

  @jax.jit
  def unit(layer, phase, row):
    return jax.lax.switch(phase, [
        lambda layer, p=p: _schedule.run_unit(p, layer, row, plan, jnp.float32(0.0),
                                              curvature="kfac", pi_damping=False)
        for p in range(_schedule.FINISH + 1)], layer)

  layer = unit(layer, _schedule.START, 0)
  for product, update, n, block in (
      (_schedule.PHI_PRODUCT, _schedule.PHI_UPDATE, layer.statistics.phi.shape[0], phi_block),
      (_schedule.PSI_PRODUCT, _schedule.PSI_UPDATE, layer.statistics.psi.shape[0], psi_block),
  ):
    if not block:  # A diagonal factor: no products.
      continue
    for _ in range(_inverses.NEWTON_SCHULZ_MAX_STEPS):
      for phase in (product, update):
        for row in range(0, n, block):
          layer = unit(layer, phase, row)
    for row in range(0, n, block):
      layer = unit(layer, product, row)
  return unit(layer, _schedule.FINISH, 0)


@pytest.mark.parametrize("block", [7, 40])  # 7 does not divide 40: the last block overlaps.
@pytest.mark.parametrize("cond", [1e1, 1e3])
def test_refresh_by_row_blocks_equals_the_inverse(block, cond):
  """From inverses of factors that have since moved by up to 40%, block by block: within the
  tolerance of the float64 inverse, and an iterate (not the Cholesky fallback)."""
  phi, psi = _factor(cond), _factor(cond, seed=1, n=24)
  old_phi, old_psi = _factor(cond, drift=0.4), _factor(cond, seed=1, drift=0.4, n=24)
  previous = (np.linalg.inv(old_phi), np.linalg.inv(old_psi))
  layer = _refresh_by_blocks(_layer(phi, psi, *previous), block, 5)
  for got, a, before in zip(layer.inverses, (phi, psi), previous):
    assert _error(before, a) > 10 * TOLERANCE  # The start was not already the answer.
    assert _error(got, a) <= TOLERANCE
    chol, _ = jax.jit(_inverses.cholesky_inverse)(jnp.float32(a))
    assert references.max_error(got, chol) > references.SAME_MATHS  # Iterated, not factorised.
  assert float(layer.damping) == 0.0  # The damping the new inverses were computed with.


def test_an_embeddings_diagonal_factor_is_inverted_entry_by_entry():
  """An embedding's input factor is a vector (a diagonal matrix): ``1 / phi`` exactly, while its
  output factor is iterated block by block."""
  phi = np.random.default_rng(0).uniform(0.5, 2.0, 30)
  psi, old_psi = _factor(1e2, seed=1, n=24), _factor(1e2, seed=1, drift=0.4, n=24)
  layer = _layer(phi, psi, np.ones(30), np.linalg.inv(old_psi))
  layer = layer._replace(work=_schedule.empty_work(phi.shape, psi.shape, jnp.float32))
  layer = _refresh_by_blocks(layer, 0, 5)
  references.assert_close(layer.inverses.phi, 1.0 / jnp.float32(phi), references.SAME_MATHS)
  assert _error(layer.inverses.psi, psi) <= TOLERANCE


def test_ill_conditioned_factor_falls_back_to_cholesky_at_the_finish():
  """cond 1e6: float32 products stall above the tolerance, so the finish takes the Cholesky
  inverse of the factor (within 10 cond(A) unit roundoffs), never the half-converged iterate."""
  phi, psi = _factor(1e6), _factor(1e2, seed=1, n=24)
  previous = (np.linalg.inv(_factor(1e6, drift=0.3)), np.linalg.inv(_factor(1e2, seed=1, n=24)))
  layer = _refresh_by_blocks(_layer(phi, psi, *previous), 7, 5)
  assert not float(layer.work.phi.residual) <= TOLERANCE
  chol, _ = jax.jit(_inverses.cholesky_inverse)(jnp.float32(phi))
  references.assert_close(layer.inverses.phi, chol, references.SAME_MATHS)
  assert _error(layer.inverses.phi, phi) <= 10 * 1e6 * 6e-8
  assert _error(layer.inverses.psi, psi) <= TOLERANCE


@pytest.mark.parametrize("which", ["phi", "psi"])
def test_factor_that_is_not_positive_definite_keeps_the_previous_inverses(which):
  """A negative eigenvalue in one factor: the iteration diverges, Cholesky fails, and the layer
  keeps both previous inverses and their damping."""
  factors = {"phi": _factor(1e2), "psi": _factor(1e2, seed=1, n=24)}
  previous = tuple(np.linalg.inv(f) for f in factors.values())
  w, v = np.linalg.eigh(factors[which])
  factors[which] = (v * np.where(np.arange(len(w)) == 0, -w, w)) @ v.T
  layer = _refresh_by_blocks(_layer(factors["phi"], factors["psi"], *previous), 7, 5)
  references.assert_trees_equal(
      layer.inverses, _inverses.DampedInverses(*(jnp.float32(p) for p in previous)))
  assert float(layer.damping) == 1.0


def _mlp_plan(period):
  shapes = {"0": ((785, 785), (256, 256)), "1": ((257, 257), (128, 128)),
            "2": ((129, 129), (10, 10))}
  return shapes, _schedule.plan(shapes, period)


def test_plan_visits_every_block_in_order_and_spreads_the_work():
  """MLP 784-256-128-10 at inverse_every=100: each chunked layer's units are the start, then
  NEWTON_SCHULZ_MAX_STEPS product/update rounds and a last product over blocks that cover every
  row once, then the finish; no step of the period does more than twice the average share of
  the flops (a refresh in one step does 100 times it)."""
  shapes, plans = _mlp_plan(100)
  assert plans["0"].chunked and plans["0"].phi_block < 785  # The big factor is cut in rows.
  rounds = 2 * _inverses.NEWTON_SCHULZ_MAX_STEPS + 1
  for key, plan in plans.items():
    units = [(p, r) for p, r in zip(plan.phases, plan.rows) if p != _schedule.NOOP]
    if not plan.chunked:
      assert units == [(_schedule.WHOLE, 0)]
      continue
    assert units[0][0] == _schedule.START and units[-1][0] == _schedule.FINISH
    body = units[1:-1]
    expect = []
    for (n, _), (product, update), block in (
        (shapes[key][0], (_schedule.PHI_PRODUCT, _schedule.PHI_UPDATE), plan.phi_block),
        (shapes[key][1], (_schedule.PSI_PRODUCT, _schedule.PSI_UPDATE), plan.psi_block),
    ):
      for i in range(rounds):
        expect += [(product if i % 2 == 0 else update, r) for r in range(0, n, block)]
    assert body == expect
  total = sum(_schedule.whole_cost(*s) for s in shapes.values())
  assert _schedule.peak_flops(plans, shapes) <= 2 * total / 100


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(300)(x))
    return nn.Dense(10)(x)


def test_optimizer_spread_refresh_equals_the_inverse_of_the_damped_factors():
  """scale_by_tkfac with statistics every step and inverses every 40: the inverses in use of each
  layer change only on its finish step, and then equal the float64 inverses of the damped
  factors computed here from the statistics held on its start step (fixed damping, TKFAC Eqs.
  5.14-5.15: ``Phi / sqrt(delta) + sqrt(lambda) I``)."""
  period, damping = 40, 1e-1
  model = _MLP()
  rng = np.random.default_rng(0)
  params = model.init(jax.random.key(0), jnp.zeros((1, 200)))["params"]

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  tx = tkfac_jax.scale_by_tkfac(damping, scale_invariant=False, stats_every=1,
                                inverse_every=period)
  state = tx.init(params)
  capture = tkfac_jax.value_grad_and_stats(loss)

  @jax.jit
  def step(params, state, x, y):
    _, grads, stats = capture(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates)), state

  shapes = {("Dense_0",): ((201, 201), (300, 300)), ("Dense_1",): ((301, 301), (10, 10))}
  plans = _schedule.plan(shapes, period)
  assert all(p.chunked for p in plans.values())
  started, checked = {}, 0
  previous = None
  for i in range(2 * period + 1):
    x = jnp.float32(rng.standard_normal((64, 200)))
    params, state = step(params, state, x, jnp.int32(rng.integers(0, 10, 64)))
    layers = _tree.flatten_with_paths(state.layers, is_leaf=_transform._is_layer_state)
    for path, plan in plans.items():
      if not plan.chunked:
        continue
      layer, phase = layers[path], plan.phases[i % period]
      if phase == _schedule.START:
        s = jax.tree.map(lambda v: np.asarray(v, np.float64), layer.statistics)
        started[path] = [f / np.sqrt(s.delta) + np.sqrt(damping) * np.eye(f.shape[0])
                         for f in (s.phi, s.psi)]
      elif phase == _schedule.FINISH and path in started:
        for got, want in zip(layer.inverses, started[path]):
          assert _error(got, want) <= TOLERANCE
        checked += 1
      elif i > 0 and previous is not None:  # Between finishes the inverses in use stay put.
        references.assert_trees_equal(layer.inverses, previous[path].inverses)
    previous = layers
  assert checked == 2 * len(plans)  # Two finishes of each layer.
