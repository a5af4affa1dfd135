"""The optimizer behaves like any Optax transformation: jit, schedules, inject_hyperparams, chains.

Also the state-keeping contract of scale_by_tkfac: the moving averages start from the first batch,
the inverses are refreshed on their cadence, and stats=None steps with the curvature it has.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax

LR = 0.1


class MLP(nn.Module):
  """Two Dense layers (preconditioned) around a LayerNorm (passed through)."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.LayerNorm()(nn.Dense(6)(x)))
    return nn.Dense(3)(x)


MODEL = MLP()
DENSE = ("Dense_0", "Dense_1")


def _loss(params, x, y):
  return jnp.mean(jnp.sum((MODEL.apply({"params": params}, x) - y) ** 2, axis=-1))


def _batch(seed, batch=16, dtype=np.float32):
  rng = np.random.default_rng(seed)
  x, y = rng.standard_normal((batch, 4)), rng.standard_normal((batch, 3))
  return x.astype(dtype), y.astype(dtype)


def _params(dtype=np.float32):
  shapes = jax.eval_shape(lambda x: MODEL.init(jax.random.key(0), x), np.zeros((1, 4), np.float32))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: (0.5 * rng.standard_normal(s.shape)).astype(dtype), shapes["params"]
  )


_CAPTURE = {
    curvature: jax.jit(tkfac_jax.value_grad_and_stats(_loss, curvature=curvature))
    for curvature in ("tkfac", "kfac")
}


# Shared transformations, so that their jitted updates compile once for the whole file.
DECAY = 0.8
# The paper's absolute damping, under which the LayerNorm's gradient passes through unchanged.
PRECONDITIONER = tkfac_jax.scale_by_tkfac(
    1e-2, decay=DECAY, stats_every=1, inverse_every=3, scale_invariant=False
)
PRECONDITION = jax.jit(PRECONDITIONER.update)
PLAIN = tkfac_jax.tkfac(LR, damping=1e-2, kl_clip=None, momentum=None)
PLAIN_UPDATE = jax.jit(PLAIN.update)


def _capture(params, seed, curvature="tkfac"):
  """(grads, stats) of batch ``seed``."""
  _, grads, stats = _CAPTURE[curvature](params, *_batch(seed))
  return grads, stats


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(leaf, np.float32))) for leaf in jax.tree.leaves(tree))


def _assert_close(actual, expected, rtol=references.SAME_MATHS):
  """Leaf by leaf, within ``rtol`` of each leaf's largest entry (references.py)."""
  references.assert_trees_close(actual, expected, rtol)


def _tkfac_state(opt_state):
  """The ScaleByTKFACState inside a chain's (or inject_hyperparams') state."""
  is_state = lambda s: isinstance(s, tkfac_jax.ScaleByTKFACState)  # noqa: E731
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
  assert len(found) == 1
  return found[0]


def _specs(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]


# Jit, state, schedules, inject_hyperparams.


@pytest.mark.parametrize(
    "make",
    [
        lambda: tkfac_jax.tkfac(LR, damping=1e-2),
        lambda: optax.chain(tkfac_jax.scale_by_tkfac(1e-2), optax.scale(-LR)),
    ],
    ids=["tkfac", "chain"],
)
def test_jit_init_and_update_state_is_arrays(make):
  """init and update run under jit; the state is a pytree of arrays that keeps its structure."""
  tx = make()
  params = _params()
  state = jax.jit(tx.init)(params)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
  assert _specs(state)[0] == _specs(tx.init(params))[0]
  update = jax.jit(tx.update)
  for seed in range(2):
    grads, stats = _capture(params, seed)
    updates, new_state = update(grads, state, params, stats=stats)
    assert _specs(new_state) == _specs(state)
    state, params = new_state, optax.apply_updates(params, updates)
  assert _finite(params)
  assert _tkfac_state(state).count == 2


def test_learning_rate_schedule_is_followed_including_by_kl_clipping():
  """KL clipping scales U by min(1, sqrt(kappa / (lr_k^2 <U, G>))) with the schedule's lr_k."""
  schedule = optax.linear_schedule(0.05, 0.5, transition_steps=3)
  kappa = 1e-3
  # The paper's mode, where the LayerNorm's update is outside the clip (the scale-invariant
  # mode's clip is checked in test_scale_invariance.py).
  clipped = tkfac_jax.tkfac(
      schedule, damping=1e-2, kl_clip=kappa, momentum=None, scale_invariant=False
  )
  unclipped = tkfac_jax.tkfac(
      schedule, damping=1e-2, kl_clip=None, momentum=None, scale_invariant=False
  )
  params = _params()
  state = clipped.init(params)
  update, reference = jax.jit(clipped.update), jax.jit(unclipped.update)
  scales = []
  for step in range(4):
    grads, stats = _capture(params, step)
    lr = float(schedule(step))
    plain, _ = reference(grads, state, params, stats=stats)  # -lr * U, unclipped.
    updates, state = update(grads, state, params, stats=stats)
    vg = lr * sum(
        np.vdot(-np.asarray(plain[n][k], np.float64), grads[n][k])
        for n in DENSE
        for k in ("kernel", "bias")
    )
    scale = min(1.0, np.sqrt(kappa / vg))
    expected = {n: jax.tree.map(lambda u: scale * u, plain[n]) for n in DENSE}
    # The expected scale is float64 from the float32 updates: REFERENCE.
    _assert_close({n: updates[n] for n in DENSE}, expected, rtol=references.REFERENCE)
    _assert_close(updates["LayerNorm_0"], plain["LayerNorm_0"])
    references.assert_close(_tkfac_state(state).kl_scale, scale, references.REFERENCE)
    scales.append(scale)
    params = optax.apply_updates(params, updates)
  assert min(scales) < 1  # Clipping was active on some step.
  assert _finite(params)


def test_schedule_without_curvature_is_plain_sgd():
  """With no statistics yet, the update is -schedule(step) * grads for every parameter."""
  schedule = optax.piecewise_constant_schedule(0.1, {2: 0.5})
  tx = tkfac_jax.tkfac(schedule, kl_clip=None, momentum=None)
  params = _params()
  state = tx.init(params)
  grads, _ = _capture(params, 0)
  update = jax.jit(tx.update)
  for step in range(3):
    updates, state = update(grads, state, params, stats=None)
    _assert_close(updates, jax.tree.map(lambda g: -schedule(step) * g, grads))


def test_inject_hyperparams_learning_rate_and_damping_are_live():
  """Under inject_hyperparams, editing hyperparams['learning_rate'] or ['damping'] acts at once."""
  tx = optax.inject_hyperparams(tkfac_jax.tkfac)(
      learning_rate=LR, damping=1e-2, kl_clip=None, momentum=None
  )
  params = _params()
  state = tx.init(params)
  assert set(state.hyperparams) >= {"learning_rate", "damping"}
  update = jax.jit(tx.update)
  grads, stats = _capture(params, 0)
  base, _ = update(grads, state, params, stats=stats)
  assert _finite(base)

  # float32 arrays like init's, so that the jitted update is not retraced.
  state.hyperparams["learning_rate"] = jnp.asarray(LR / 4, jnp.float32)
  quarter, _ = update(grads, state, params, stats=stats)
  _assert_close(quarter, jax.tree.map(lambda u: u / 4, base))

  state.hyperparams["learning_rate"] = jnp.asarray(LR, jnp.float32)
  state.hyperparams["damping"] = jnp.asarray(1.0, jnp.float32)
  damped, _ = update(grads, state, params, stats=stats)
  for name in DENSE:
    assert references.max_error(damped[name]["kernel"], base[name]["kernel"]) > 1e-3


def test_inject_hyperparams_with_defaults_runs_under_jit():
  """The full default tkfac (KL clipping, momentum) also works under inject_hyperparams."""
  tx = optax.inject_hyperparams(tkfac_jax.tkfac)(learning_rate=LR)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for seed in range(2):
    grads, stats = _capture(params, seed)
    updates, state = step(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
  assert _finite(params)


# Chains.


def test_chain_with_clipping_and_weight_decay_forwards_stats():
  """In a chain with clipping before and after and weight decay, each part sees what it should."""
  first, second, wd = 0.3, 0.05, 1e-2
  tx = optax.chain(
      optax.clip_by_global_norm(first),
      tkfac_jax.scale_by_tkfac(
          1e-2, decay=DECAY, stats_every=1, inverse_every=3, scale_invariant=False
      ),
      optax.clip_by_global_norm(second),
      optax.add_decayed_weights(wd),
      optax.scale(-LR),
  )
  params = _params()
  grads, stats = _capture(params, 0)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)

  def norm(tree):
    return np.sqrt(sum(np.sum(np.asarray(t, np.float64) ** 2) for t in jax.tree.leaves(tree)))

  def clip(tree, max_norm):
    assert norm(tree) > max_norm  # So that no clipping is a no-op.
    return jax.tree.map(lambda t: np.asarray(t) * np.float32(max_norm / norm(tree)), tree)

  preconditioned, _ = PRECONDITION(
      clip(grads, first), PRECONDITIONER.init(params), params, stats=stats
  )
  expected = jax.tree.map(
      lambda u, p: -LR * (u + wd * np.asarray(p)), clip(preconditioned, second), params
  )
  _assert_close(updates, expected)


def test_reduce_on_plateau_in_a_chain_gets_its_value():
  """Optax's extra-arguments protocol: ``value=`` passes through TKFAC to reduce_on_plateau."""
  plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=1, atol=1e-3, rtol=0.0)
  tx = optax.chain(PLAIN, plateau)
  params = _params()
  state, plain_state = tx.init(params), PLAIN.init(params)
  update = jax.jit(tx.update)
  # The loss rises every step: with patience 1, every step after the first halves the scale.
  for step, (value, scale) in enumerate([(1.0, 1.0), (2.0, 0.5), (3.0, 0.25), (4.0, 0.125)]):
    grads, stats = _capture(params, step)
    updates, state = update(grads, state, params, stats=stats, value=jnp.asarray(value))
    expected, plain_state = PLAIN_UPDATE(grads, plain_state, params, stats=stats)
    _assert_close(updates, jax.tree.map(lambda e: scale * np.asarray(e), expected))


def test_extra_keyword_arguments_reach_the_fallback():
  """Keyword arguments that scale_by_tkfac does not use go to its fallback (here, the LayerNorm's
  parameters are multiplied by ``value``); the preconditioned layers do not see them."""

  def update(updates, state, params=None, *, value, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * value, updates), state

  scale_by_value = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
  tx = tkfac_jax.scale_by_tkfac(
      1e-2, decay=DECAY, stats_every=1, inverse_every=3, scale_invariant=False,
      fallback=scale_by_value,
  )
  params = _params()
  grads, stats = _capture(params, 0)
  updates, _ = jax.jit(tx.update)(
      grads, tx.init(params), params, stats=stats, value=jnp.asarray(3.0), unused=jnp.zeros(())
  )
  expected, _ = PRECONDITION(grads, PRECONDITIONER.init(params), params, stats=stats)
  for name in DENSE:
    _assert_close(updates[name], expected[name])
  _assert_close(updates["LayerNorm_0"], jax.tree.map(lambda g: 3 * g, grads["LayerNorm_0"]))


# Compilation.


def test_training_loop_traces_once():
  """A jitted step (capture, update, apply) compiles once over a loop, with or without stats."""
  tx = tkfac_jax.tkfac(LR, damping=1e-2, inverse_every=2)
  capture = tkfac_jax.value_grad_and_stats(_loss)
  traces = {"with": 0, "without": 0}

  @jax.jit
  def step_with(params, state, x, y):
    traces["with"] += 1
    loss, grads, stats = capture(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def step_without(params, state, x, y):
    traces["without"] += 1
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params, stats=None)
    return optax.apply_updates(params, updates), state, loss

  params = _params()
  state = tx.init(params)
  for seed in range(6):
    params, state, _ = step_with(params, state, *_batch(seed))
  assert traces == {"with": 1, "without": 0}
  for seed in range(6):
    step = step_with if seed % 2 else step_without
    params, state, _ = step(params, state, *_batch(seed))
  assert traces == {"with": 1, "without": 1}
  assert _finite(params)


# State: preconditioner, moving averages, inverse cadence.


def test_no_statistics_yet_means_identity_preconditioner():
  """stats=None at step 0: inverses stay identity and tkfac's update is -lr * grads."""
  params = _params()
  grads, _ = _capture(params, 0)
  updates, state = PLAIN_UPDATE(grads, PLAIN.init(params), params, stats=None)
  _assert_close(updates, jax.tree.map(lambda g: -LR * g, grads))
  layers = _tkfac_state(state).layers
  assert set(layers) == set(DENSE)
  for name in DENSE:
    inverses = layers[name].inverses
    np.testing.assert_array_equal(inverses.phi, np.eye(inverses.phi.shape[0]))
    np.testing.assert_array_equal(inverses.psi, np.eye(inverses.psi.shape[0]))
    assert int(layers[name].count) == 0


def test_moving_average_starts_from_the_first_batch():
  """After s1 the running statistics equal s1; after s2 they equal decay * s1 + (1 - decay) * s2."""
  decay = DECAY
  params = _params()
  (g1, s1), (g2, s2) = _capture(params, 1), _capture(params, 2)
  update = PRECONDITION
  _, state = update(g1, PRECONDITIONER.init(params), params, stats=s1)
  for name in DENSE:
    _assert_close(state.layers[name].statistics, s1.layers[name])
    assert int(state.layers[name].count) == 1
  _, state = update(g2, state, params, stats=s2)
  for name in DENSE:
    expected = jax.tree.map(
        lambda a, b: decay * a + (1 - decay) * b, s1.layers[name], s2.layers[name]
    )
    _assert_close(state.layers[name].statistics, expected)
    assert int(state.layers[name].count) == 2
  assert int(state.count) == 2


def test_parameters_of_other_layers_pass_through():
  """LayerNorm parameters (no captured layer owns them) leave scale_by_tkfac unchanged."""
  params = _params()
  grads, stats = _capture(params, 0)
  updates, _ = PRECONDITION(grads, PRECONDITIONER.init(params), params, stats=stats)
  references.assert_trees_equal(updates["LayerNorm_0"], grads["LayerNorm_0"])
  for name in DENSE:
    assert references.max_error(updates[name]["kernel"], grads[name]["kernel"]) > 1e-3


def test_layers_option_preconditions_only_the_named_layers():
  """layers=['Dense_0']: Dense_1 passes through; its statistics are accepted and ignored."""
  params = _params()
  grads, stats = _capture(params, 0)
  tx = tkfac_jax.scale_by_tkfac(1e-2, layers=["Dense_0"], scale_invariant=False)
  state = tx.init(params)
  assert set(state.layers) == {"Dense_0"}
  updates, state = jax.jit(tx.update)(grads, state, params, stats=stats)
  references.assert_trees_equal(updates["Dense_1"], grads["Dense_1"])
  moved = references.max_error(updates["Dense_0"]["kernel"], grads["Dense_0"]["kernel"])
  assert moved > 1e-3
  _assert_close(state.layers["Dense_0"].statistics, stats.layers["Dense_0"])


def _inverse_changes(params, with_stats, stagger=True):
  """For each layer, the steps at which its inverses changed, over len(with_stats) steps of a
  scale_by_tkfac with inverse_every=3."""
  tx = tkfac_jax.scale_by_tkfac(
      1e-2, decay=DECAY, stats_every=1, inverse_every=3, stagger=stagger
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  changed = {name: [] for name in DENSE}
  for step, has_stats in enumerate(with_stats):
    grads, stats = _capture(params, step)
    before = {n: state.layers[n].inverses for n in DENSE}
    _, state = update(grads, state, params, stats=stats if has_stats else None)
    for name in DENSE:
      pairs = zip(jax.tree.leaves(before[name]), jax.tree.leaves(state.layers[name].inverses))
      if not all(np.array_equal(a, b) for a, b in pairs):
        changed[name].append(step)
  return changed


def test_inverses_refresh_every_inverse_every_steps():
  """inverse_every=3, stats every step, not staggered: every layer changes at steps 0, 3, 6."""
  changed = _inverse_changes(_params(), [True] * 8, stagger=False)
  assert changed == {name: [0, 3, 6] for name in DENSE}


def test_staggered_refreshes_spread_the_layers_over_the_period():
  """Staggered (the default), two layers, inverse_every=3: both refresh when their first
  statistics arrive, then each once per period, on its own step, the largest layer first."""
  changed = _inverse_changes(_params(), [True] * 9)
  offsets = {}
  for name, steps in changed.items():
    assert steps[0] == 0, name
    offset = steps[1] % 3
    assert steps[1:] == list(range(offset or 3, 9, 3)), (name, steps)
    offsets[name] = offset
  assert sorted(offsets.values()) == [0, 1]  # One layer per step: no step refreshes both.
  # Cost of inverting [W; b]'s two factors: (d_in + 1)^3 + d_out^3.
  costs = {n: (p["kernel"].shape[0] + 1) ** 3 + p["kernel"].shape[1] ** 3
           for n, p in _params().items() if n in DENSE}
  assert offsets[max(costs, key=costs.get)] == 0


def test_inverses_refresh_when_first_statistics_arrive():
  """Statistics first arriving at step 2 refresh the inverses at once, then the cadence resumes."""
  with_stats = [False, False] + [True] * 6
  changed = _inverse_changes(_params(), with_stats, stagger=False)
  assert changed == {name: [2, 3, 6] for name in DENSE}
  for name, steps in _inverse_changes(_params(), with_stats).items():
    assert steps[0] == 2 and all(b - a == 3 for a, b in zip(steps[1:], steps[2:])), name


# Modes and dtypes.


def test_kfac_mode_runs_and_differs_from_tkfac():
  """curvature='kfac' (capture and optimizer) gives finite updates, other than TKFAC's."""
  params = _params()
  kfac = tkfac_jax.tkfac(LR, damping=1e-2, curvature="kfac", kl_clip=None, momentum=None)
  updates = {}
  modes = [("tkfac", PLAIN, PLAIN_UPDATE), ("kfac", kfac, jax.jit(kfac.update))]
  for curvature, tx, update in modes:
    grads, stats = _capture(params, 0, curvature)
    updates[curvature], _ = update(grads, tx.init(params), params, stats=stats)
    assert _finite(updates[curvature])
  for name in DENSE:
    kfac, tkfac = updates["kfac"][name]["kernel"], updates["tkfac"][name]["kernel"]
    assert references.max_error(kfac, tkfac) > 1e-3


def test_low_precision_params():
  """Params in bfloat16 get finite updates of their own dtype; the factors stay float32."""
  dtype = jnp.bfloat16
  tx = tkfac_jax.tkfac(LR, damping=1e-2)
  params = _params(dtype)
  state = tx.init(params)
  update = jax.jit(tx.update)
  capture = jax.jit(tkfac_jax.value_grad_and_stats(_loss))
  for seed in range(2):
    _, grads, stats = capture(params, *_batch(seed, dtype=dtype))
    assert all(g.dtype == dtype for g in jax.tree.leaves(grads))
    updates, state = update(grads, state, params, stats=stats)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    assert _finite(updates)
    params = optax.apply_updates(params, updates)
  assert all(p.dtype == dtype for p in jax.tree.leaves(params))
  assert _finite(params)
  layer = _tkfac_state(state).layers["Dense_0"]
  assert layer.statistics.phi.dtype == jnp.float32
  assert layer.inverses.phi.dtype == jnp.float32
