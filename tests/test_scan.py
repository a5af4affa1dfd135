"""Layers stacked by ``nn.scan``: one set of factors per layer of the stack, held along the stack's
leading axis and inverted together.

The reference is the same model unrolled (a Python loop over the layers, each its own module),
with the scanned weights sliced out: every layer's statistics, updates and refreshed inverses must
be the unrolled layer's. The refresh spread over the period is checked against ``np.linalg.inv``
in float64 of the damped factors, layer by layer.
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

DEPTH, WIDTH, CLASSES, BATCH = 3, 6, 4, 16
# The scanned and unrolled nets of a comparison run the same update; Cholesky inverses make it a
# smaller program to compile than Newton-Schulz's, whose refresh of a stack has its own test below.
INVERSES = "cholesky"


class _Block(nn.Module):
  width: int = WIDTH
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.tanh(nn.Dense(2 * self.width, use_bias=self.use_bias, name="up")(x))
    return x + nn.Dense(self.width, use_bias=self.use_bias, name="down")(h), None


class _Net(nn.Module):
  scan: bool
  width: int = WIDTH
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="stem")(x)
    if self.scan:
      blocks = nn.scan(
          _Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=DEPTH
      )
      x, _ = blocks(self.width, self.use_bias, name="blocks")(x, None)
    else:
      for i in range(DEPTH):
        x, _ = _Block(self.width, self.use_bias, name=f"block_{i}")(x)
    return nn.Dense(CLASSES, name="head")(x)


def _problem(width=WIDTH, use_bias=True, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((BATCH, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32)
  scanned = _Net(True, width, use_bias)
  params = scanned.init(jax.random.key(seed), x)["params"]
  unrolled = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(DEPTH):
    unrolled[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])

  def loss(model):
    def fn(p, x, y):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return fn

  return (loss(scanned), params), (loss(_Net(False, width, use_bias)), unrolled), (x, y)


def _unstack(tree):
  out = {k: v for k, v in tree.items() if k != "blocks"}
  for i in range(DEPTH):
    out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], tree["blocks"])
  return out


def _run(loss, params, batch, tx, steps=3):
  """The updates of ``steps`` train steps (statistics every step) on one batch."""

  @jax.jit
  def step(params, state):
    _, grads, stats = tkfac_jax.value_grad_and_stats(loss)(params, *batch)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, updates

  state, out = tx.init(params), []
  for _ in range(steps):
    params, state, updates = step(params, state)
    out.append(updates)
  return out, state


@pytest.mark.parametrize("use_bias", [True, False])
def test_scanned_layers_get_their_own_factors_and_the_unrolled_updates(use_bias):
  """Three steps of the scanned net equal the unrolled net's, layer by layer; the state holds each
  stacked layer's factors along the stack's axis. Without a bias the stack needs ``stacked=``
  (the shapes alone could be a convolution's); with one the bias tells."""
  (loss_s, params_s), (loss_u, params_u), batch = _problem(use_bias=use_bias)
  hint = {} if use_bias else {"stacked": {"blocks": 1}}
  tx = lambda **kw: tkfac_jax.tkfac(0.1, stats_every=1, inverse_every=2, **kw)  # noqa: E731
  got, state = _run(loss_s, params_s, batch, tx(**hint))
  want, _ = _run(loss_u, params_u, batch, tx())
  for step, (g, w) in enumerate(zip(got, want)):
    references.assert_trees_close(_unstack(g), w, references.REFERENCE, f"step {step}")
  layers = _tree.flatten_with_paths(state[0].layers, is_leaf=_transform._is_layer_state)
  up = layers[("blocks", "up")]
  assert up.statistics.phi.shape == (DEPTH, WIDTH + use_bias, WIDTH + use_bias)
  assert up.inverses.psi.shape == (DEPTH, 2 * WIDTH, 2 * WIDTH)
  assert up.count.shape == (DEPTH,) and np.all(np.asarray(up.count) == 3)


def test_biasless_stack_without_the_hint_raises_with_the_fix():
  (loss, params), _, batch = _problem(use_bias=False)
  with pytest.raises(ValueError, match=r"'blocks/down', 'blocks/up'.*leading axes \[\(3,\), \(3,\)\].*stacked=\{'blocks/down': 1, 'blocks/up': 1\}"):
    _run(loss, params, batch, tkfac_jax.tkfac(0.1), steps=1)


def test_stack_whose_depth_equals_its_input_width_needs_the_hint():
  """``L == d_in`` (the up projection): kernel ``(L, d_in, d_out)`` and bias ``(L, d_out)`` also
  read as one layer with two output axes. The shapes cannot tell; the statistics can, and the error says what to
  pass; with it the stack matches the unrolled net."""
  (loss_s, params_s), (loss_u, params_u), batch = _problem(width=DEPTH)
  with pytest.raises(ValueError, match=r"'blocks/up'.*stacked=\{'blocks/up': 1\}"):
    _run(loss_s, params_s, batch, tkfac_jax.tkfac(0.1), steps=1)
  tx = lambda **kw: tkfac_jax.tkfac(0.1, stats_every=1, inverse_method=INVERSES, **kw)  # noqa: E731
  got, _ = _run(loss_s, params_s, batch, tx(stacked={"blocks": 1}), steps=2)
  want, _ = _run(loss_u, params_u, batch, tx(), steps=2)
  references.assert_trees_close([_unstack(g) for g in got], want, references.REFERENCE)


def test_layers_can_name_a_stack():
  """``layers=`` selects a stack by its path; the others take the fallback, as unrolled."""
  (loss_s, params_s), (loss_u, params_u), batch = _problem()
  tx_s = tkfac_jax.tkfac(
      0.1, stats_every=1, inverse_method=INVERSES, layers=["blocks/up", "head"]
  )
  tx_u = tkfac_jax.tkfac(
      0.1, stats_every=1, inverse_method=INVERSES,
      layers=[f"block_{i}/up" for i in range(DEPTH)] + ["head"],
  )
  got, state = _run(loss_s, params_s, batch, tx_s, steps=2)
  want, _ = _run(loss_u, params_u, batch, tx_u, steps=2)
  references.assert_trees_close([_unstack(g) for g in got], want, references.REFERENCE)
  layers = _tree.flatten_with_paths(state[0].layers, is_leaf=_transform._is_layer_state)
  assert sorted(layers) == [("blocks", "up"), ("head",)]


def test_multi_steps_and_diagnostics_with_a_stack(curvature="kfac"):
  """multi_steps accumulates a stack's statistics per layer (as the unrolled net's; K-FAC, whose
  ``1/T`` counts each call's locations once), and diagnostics reports one value per layer of the
  stack."""
  (loss_s, params_s), (loss_u, params_u), batch = _problem()
  tx = lambda: tkfac_jax.multi_steps(  # noqa: E731
      tkfac_jax.tkfac(0.1, curvature=curvature, stats_every=1, inverse_method=INVERSES),
      every_k=2,
  )

  def run(loss, params):
    inner = tx()

    @jax.jit
    def step(params, state, x, y):
      _, grads, stats = tkfac_jax.value_grad_and_stats(loss, curvature=curvature)(params, x, y)
      updates, state = inner.update(grads, state, params, stats=stats)
      return optax.apply_updates(params, updates), state

    state = inner.init(params)
    for i in range(4):  # Two micro-batches per update, different halves of the batch.
      half = slice(0, BATCH // 2) if i % 2 == 0 else slice(BATCH // 2, None)
      params, state = step(params, state, batch[0][half], batch[1][half])
    return params, state

  got, state = run(loss_s, params_s)
  want, _ = run(loss_u, params_u)
  references.assert_trees_close(_unstack(got), want, references.REFERENCE)
  report = tkfac_jax.diagnostics(state)["layers"]
  for name in ("delta", "damping", "phi_condition", "psi_condition", "count"):
    assert np.shape(report["blocks/up"][name]) == (DEPTH,), name
  assert np.all(np.isfinite(report["blocks/up"]["phi_condition"]))
  assert np.all(np.asarray(report["blocks/up"]["phi_condition"]) > 1)


def test_stack_refresh_spread_over_the_period_inverts_every_layer():
  """A stack large enough for its Newton-Schulz refresh to be spread over the period (one block of
  rows per step, for all the stack's layers at once): on the finish step every layer's inverses
  equal the float64 inverses of its damped factors as they were on the start step (fixed
  damping, TKFAC Eqs. 5.14-5.15)."""
  period, damping, width = 30, 1e-1, 150
  (loss, params), _, _ = _problem(width=width)
  rng = np.random.default_rng(1)
  tx = tkfac_jax.scale_by_tkfac(damping, scale_invariant=False, stats_every=1,
                                inverse_every=period)
  shapes = {("blocks", "up"): ((width + 1,) * 2, (2 * width,) * 2),
            ("blocks", "down"): ((2 * width + 1,) * 2, (width,) * 2)}
  copies = {key: DEPTH for key in shapes}
  plans = _schedule.plan(shapes, period, copies)
  assert all(p.chunked for p in plans.values())
  # No step does more than twice its share of the refreshes of all the stacks' layers.
  total = sum(_schedule.whole_cost(*s) * copies[k] for k, s in shapes.items())
  assert _schedule.peak_flops(plans, shapes, copies) <= 2 * total / period

  @jax.jit
  def step(params, state, x, y):
    _, grads, stats = tkfac_jax.value_grad_and_stats(loss)(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, jax.tree.map(lambda u: -0.01 * u, updates)), state

  state, started, checked = tx.init(params), {}, 0
  for i in range(2 * period + 1):
    x = jnp.asarray(rng.standard_normal((64, 5)), jnp.float32)
    params, state = step(params, state, x, jnp.asarray(rng.integers(0, CLASSES, 64), jnp.int32))
    layers = _tree.flatten_with_paths(state.layers, is_leaf=_transform._is_layer_state)
    for path, plan in plans.items():
      layer, phase = layers[path], plan.phases[i % period]
      if phase == _schedule.START:
        s = jax.tree.map(lambda v: np.asarray(v, np.float64), layer.statistics)
        started[path] = [
            [f[k] / np.sqrt(s.delta[k]) + np.sqrt(damping) * np.eye(f.shape[-1])
             for f in (s.phi, s.psi)]
            for k in range(DEPTH)
        ]
      elif phase == _schedule.FINISH and path in started:
        for k in range(DEPTH):
          for got, want in zip(layer.inverses, started[path][k]):
            exact = np.linalg.inv(want)
            error = np.linalg.norm(np.asarray(got[k], np.float64) - exact, 2)
            assert error <= _inverses.NEWTON_SCHULZ_TOLERANCE * np.linalg.norm(exact, 2), (path, k)
        checked += 1
  assert checked == 2 * len(plans)


def test_stacked_hint_that_fits_no_layer_raises():
  (_, params), _, _ = _problem()
  with pytest.raises(ValueError, match="stacked names 'blcks', under which params has no layer"):
    tkfac_jax.tkfac(0.1, stacked={"blcks": 1}).init(params)
  with pytest.raises(ValueError, match=r"'blocks/\w+' \(kernel shape \(3, \d+, \d+\)\) is not a stack of 2"):
    tkfac_jax.tkfac(0.1, stacked={"blocks": 2}).init(params)
  with pytest.raises(TypeError, match="stacked must map"):
    tkfac_jax.tkfac(0.1, stacked=["blocks"])


class _Shared(nn.Module):
  """One block applied DEPTH times: by nn.scan with its parameters broadcast, or by a loop."""

  scan: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="stem")(x)
    if self.scan:
      blocks = nn.scan(_Block, variable_broadcast="params", split_rngs={"params": False},
                       length=DEPTH)
      x, _ = blocks(name="block")(x, None)
    else:
      block = _Block(name="block")
      for _ in range(DEPTH):
        x, _ = block(x)
    return nn.Dense(CLASSES, name="head")(x)


@pytest.mark.parametrize("curvature", ["tkfac", "kfac"])
def test_scan_with_shared_parameters_sums_its_iterations_like_a_loop(curvature):
  """nn.scan with ``variable_broadcast='params'`` applies one layer at every iteration: its
  statistics are those of the loop that applies it DEPTH times (K-FAC's ``1/T`` counting every
  iteration's locations once, though Flax traces the scan's body more than once)."""
  _, _, (x, y) = _problem()
  params = _Shared(False).init(jax.random.key(0), x)["params"]
  assert _Shared(True).init(jax.random.key(0), x)["params"]["block"]["up"]["kernel"].ndim == 2

  def stats(model):
    def loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return tkfac_jax.value_grad_and_stats(loss, curvature=curvature)(params)[2]

  got, want = stats(_Shared(True)), stats(_Shared(False))
  assert got.skipped == ()
  references.assert_trees_close(got.layers, want.layers, references.SAME_MATHS)
