"""The optimizer in the wider Flax/Optax ecosystem: TrainState, partition and masked, schedules,
MultiSteps (gradient accumulation), and checkpoints with Orbax and flax.serialization.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import references
import tkfac_jax

LR = 0.1


class MLP(nn.Module):
  """Three Dense layers and a LayerNorm: enough to send layers to different optimizers."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(6)(x))
    x = nn.tanh(nn.LayerNorm()(nn.Dense(5)(x)))
    return nn.Dense(3)(x)


MODEL = MLP()
DENSE = ("Dense_0", "Dense_1", "Dense_2")


def _loss(params, x, y):
  return jnp.mean(jnp.sum((MODEL.apply({"params": params}, x) - y) ** 2, axis=-1))


def _batch(seed, batch=16):
  rng = np.random.default_rng(seed)
  x, y = rng.standard_normal((batch, 4)), rng.standard_normal((batch, 3))
  return x.astype(np.float32), y.astype(np.float32)


def _params():
  shapes = jax.eval_shape(lambda x: MODEL.init(jax.random.key(0), x), np.zeros((1, 4), np.float32))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"]
  )


CAPTURE = jax.jit(tkfac_jax.value_grad_and_stats(_loss))


def _assert_close(actual, expected, rtol=references.SAME_MATHS):
  """Leaf by leaf, within ``rtol`` of each leaf's largest entry (references.py)."""
  references.assert_trees_close(actual, expected, rtol)


# The same program on the same machine (a restored checkpoint, a wrapper around the same step):
# bit for bit.
_assert_equal = references.assert_trees_equal


def _displacement(params):
  """How far training moved the parameters: trajectories are compared on this, since the
  parameters themselves are dominated by their (shared) starting values."""
  return jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - p0, params, _params())


def _tkfac_state(opt_state):
  """The ScaleByTKFACState inside a wrapper's or chain's state."""
  is_state = lambda s: isinstance(s, tkfac_jax.ScaleByTKFACState)  # noqa: E731
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
  assert len(found) == 1
  return found[0]


def _mean(trees):
  """The leafwise mean of pytrees of one structure (Statistics included), in float64."""
  return jax.tree.map(lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], axis=0), *trees)


# Flax TrainState.


def test_train_state_apply_gradients_equals_update_by_hand():
  """Under jit, TrainState.apply_gradients(grads=, stats=) is exactly tx.update + apply_updates."""
  tx = tkfac_jax.tkfac(LR, damping=1e-2, stats_every=1, inverse_every=2)
  params = _params()
  state = tkfac_jax.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)

  def make_steps(use_stats):
    """The two jitted steps, with this step's statistics or with stats=None."""

    @jax.jit
    def via_state(state, x, y):
      def loss_fn(p):
        return jnp.mean(jnp.sum((state.apply_fn({"params": p}, x) - y) ** 2, axis=-1))

      _, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(state.params)
      return state.apply_gradients(grads=grads, stats=stats if use_stats else None)

    @jax.jit
    def by_hand(params, opt_state, x, y):
      _, grads, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats if use_stats else None)
      return optax.apply_updates(params, updates), opt_state

    return via_state, by_hand

  steps = {flag: make_steps(flag) for flag in (True, False)}
  opt_state = tx.init(params)
  for seed, use_stats in enumerate([True, False, True]):
    via_state, by_hand = steps[use_stats]
    state = via_state(state, *_batch(seed))
    params, opt_state = by_hand(params, opt_state, *_batch(seed))
    _assert_equal(state.params, params)
    _assert_equal(state.opt_state, opt_state)
  assert int(state.step) == 3
  assert int(_tkfac_state(state.opt_state).layers["Dense_0"].count) == 2


def test_train_state_without_stats_is_an_error():
  """Flax's own TrainState.apply_gradients (no stats) raises; so does leaving stats out here."""
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx = tkfac_jax.tkfac(LR)
  flax_state = train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
  with pytest.raises(ValueError, match="keyword argument stats"):
    flax_state.apply_gradients(grads=grads)
  state = tkfac_jax.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
  with pytest.raises(TypeError, match="stats"):
    state.apply_gradients(grads=grads)


# optax.partition and optax.masked.

# optax 0.2.4, the oldest supported, has optax.partition only under its old name, multi_transform.
partition = optax.partition if hasattr(optax, "partition") else optax.multi_transform
LABELS = {"Dense_0": "tkfac", "Dense_1": "adam", "LayerNorm_0": "adam", "Dense_2": "tkfac"}
TKFAC_LAYERS = [name for name in DENSE if LABELS[name] == "tkfac"]
ADAM_NODES = [name for name, label in LABELS.items() if label == "adam"]


def test_partition_needs_no_layers_for_the_tkfac_part():
  """In optax.partition, TKFAC ignores the statistics of layers masked out of its part."""
  tx = partition({"tkfac": tkfac_jax.tkfac(LR), "adam": optax.adam(1e-2)}, LABELS)
  explicit = partition(
      {"tkfac": tkfac_jax.tkfac(LR, layers=TKFAC_LAYERS), "adam": optax.adam(1e-2)}, LABELS
  )
  params = _params()
  state = tx.init(params)
  # The TKFAC part is initialised on its own layers only (the rest are optax.MaskedNode) ...
  assert set(_tkfac_state(state).layers) == set(TKFAC_LAYERS)
  _, grads, stats = CAPTURE(params, *_batch(0))
  # ... while the statistics cover every Dense layer; those of the Adam part are ignored.
  updates, _ = tx.update(grads, state, params, stats=stats)
  expected, _ = explicit.update(grads, explicit.init(params), params, stats=stats)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)


def test_partition_tkfac_and_adam_train_end_to_end():
  """partition({'tkfac': tkfac(layers=...), 'adam': adam}): each part equals its optimizer alone."""

  def make_tkfac():
    return tkfac_jax.tkfac(
        LR, damping=1e-2, kl_clip=1e-3, stats_every=1, inverse_every=2, layers=TKFAC_LAYERS
    )

  tx = partition({"tkfac": make_tkfac(), "adam": optax.adam(1e-2)}, LABELS)
  # References: TKFAC over the whole tree, preconditioning the same layers, and Adam run alone on
  # the Adam part's parameters.
  tkfac_alone, adam_alone = make_tkfac(), optax.adam(1e-2)

  @jax.jit
  def step(params, states, x, y):
    state, tkfac_state, adam_state = states
    loss, grads, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    tkfac_updates, tkfac_state = tkfac_alone.update(grads, tkfac_state, params, stats=stats)
    adam_grads = {name: grads[name] for name in ADAM_NODES}
    adam_params = {name: params[name] for name in ADAM_NODES}
    adam_updates, adam_state = adam_alone.update(adam_grads, adam_state, adam_params)
    params = optax.apply_updates(params, updates)
    return params, (state, tkfac_state, adam_state), loss, updates, (tkfac_updates, adam_updates)

  params = _params()
  states = (
      tx.init(params),
      tkfac_alone.init(params),
      adam_alone.init({name: params[name] for name in ADAM_NODES}),
  )
  x, y = _batch(0, batch=32)
  losses = []
  for _ in range(8):
    params, states, loss, updates, (tkfac_updates, adam_updates) = step(params, states, x, y)
    losses.append(float(loss))
    for name in TKFAC_LAYERS:
      _assert_close(updates[name], tkfac_updates[name])
    for name in ADAM_NODES:
      _assert_close(updates[name], adam_updates[name])
  # The TKFAC part folded in every step's statistics, and the loss fell at every step.
  layers = _tkfac_state(states[0]).layers
  assert all(int(layers[name].count) == 8 for name in TKFAC_LAYERS)
  assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
  assert losses[-1] < 0.75 * losses[0]


def test_masked_tkfac_equals_the_layers_option():
  """optax.masked(scale_by_tkfac(layers=...)) is scale_by_tkfac(layers=...) on the whole tree."""
  mask = {name: label == "tkfac" for name, label in LABELS.items()}
  masked = optax.chain(
      optax.masked(
          tkfac_jax.scale_by_tkfac(1e-2, layers=TKFAC_LAYERS, scale_invariant=False), mask
      ),
      optax.scale(-LR),
  )
  # The paper's mode: its fallback, like the mask, passes the other layers' gradients through.
  whole = optax.chain(
      tkfac_jax.scale_by_tkfac(1e-2, layers=TKFAC_LAYERS, scale_invariant=False),
      optax.scale(-LR),
  )
  params = _params()
  states = masked.init(params), whole.init(params)

  @jax.jit
  def step(params, states, x, y):
    _, grads, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y)
    masked_updates, masked_state = masked.update(grads, states[0], params, stats=stats)
    whole_updates, whole_state = whole.update(grads, states[1], params, stats=stats)
    return grads, masked_updates, whole_updates, (masked_state, whole_state)

  for seed in range(3):
    grads, masked_updates, whole_updates, states = step(params, states, *_batch(seed))
    _assert_close(masked_updates, whole_updates)
    for name in ADAM_NODES:  # Masked out: the plain gradient, scaled by -LR.
      _assert_close(masked_updates[name], jax.tree.map(lambda g: -LR * g, grads[name]))
    for name in TKFAC_LAYERS:
      plain = -LR * grads[name]["kernel"]
      assert references.max_error(masked_updates[name]["kernel"], plain) > 1e-3
    params = optax.apply_updates(params, masked_updates)


# Learning-rate schedules.


def test_warmup_cosine_schedule_scales_the_preconditioned_direction():
  """tkfac(schedule): update_k = -schedule(k) * U_k (no momentum), -schedule(k) * m_k (momentum)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=0.3, warmup_steps=3, decay_steps=8, end_value=0.01
  )
  beta = 0.9
  kwargs = dict(damping=1e-2, decay=0.8, inverse_every=2, kl_clip=None)
  plain = tkfac_jax.tkfac(schedule, momentum=None, **kwargs)
  heavy = tkfac_jax.tkfac(schedule, momentum=beta, **kwargs)
  direction = tkfac_jax.scale_by_tkfac(1e-2, decay=0.8, inverse_every=2)

  @jax.jit
  def step(params, states, x, y):
    _, grads, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y)
    outs = [
        tx.update(grads, state, params, stats=stats)
        for tx, state in zip((plain, heavy, direction), states)
    ]
    return tuple(u for u, _ in outs), tuple(s for _, s in outs)

  params = _params()
  states = tuple(tx.init(params) for tx in (plain, heavy, direction))
  momentum = jax.tree.map(np.zeros_like, params)
  lrs = []
  for k in range(8):
    (plain_updates, heavy_updates, u), states = step(params, states, *_batch(k))
    lr = float(schedule(k))
    lrs.append(lr)
    _assert_close(plain_updates, jax.tree.map(lambda d: -lr * np.asarray(d), u))
    momentum = jax.tree.map(lambda d, m: np.asarray(d) + beta * m, u, momentum)
    _assert_close(heavy_updates, jax.tree.map(lambda m: -lr * m, momentum))
    params = optax.apply_updates(params, plain_updates)
  assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.3) and lrs[-1] < 0.1  # Warm-up and decay.
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


# Gradient accumulation: optax.MultiSteps.

K = 3


def _micro_batches():
  """K micro-batches of 16 and the batch of 48 they make up."""
  x, y = _batch(7, batch=16 * K)
  return [(x[i::K], y[i::K]) for i in range(K)], (x, y)


def _multi_steps_run(stats_for_step):
  """Runs K micro-steps of MultiSteps(tkfac); stats_for_step(i, micro_stats) gives each step's."""
  tx = tkfac_jax.tkfac(LR, damping=1e-2)
  multi = optax.MultiSteps(tx, every_k_schedule=K)
  update = jax.jit(multi.update)
  params, state = _params(), multi.init(_params())
  micro, _ = _micro_batches()
  grads, stats, updates = [], [], []
  for i, batch in enumerate(micro):
    _, g, s = CAPTURE(params, *batch)
    grads.append(g)
    stats.append(s)
    u, state = update(g, state, params, stats=stats_for_step(i, stats))
    updates.append(u)
  return tx, params, state, grads, stats, updates


def test_multi_steps_keeps_only_the_last_micro_steps_statistics():
  """MultiSteps passes stats to every micro-step but keeps the inner state of the last one only."""
  tx, params, state, grads, stats, updates = _multi_steps_run(lambda i, stats: stats[i])
  for u in updates[:-1]:  # Accumulating: zero updates.
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(u))
  assert int(state.gradient_step) == 1 and int(state.mini_step) == 0
  inner = _tkfac_state(state.inner_opt_state)
  assert int(inner.count) == 1
  for name in DENSE:
    # One batch folded in, and it is the last micro-batch's: the first K - 1 are dropped.
    assert int(inner.layers[name].count) == 1
    _assert_equal(inner.layers[name].statistics, stats[-1].layers[name])
    first = stats[0].layers[name].phi
    assert references.max_error(inner.layers[name].statistics.phi, first) > 1e-3
  # The update is TKFAC's on the mean gradient, with the last micro-batch's statistics.
  mean_grads = jax.tree.map(lambda m, g: m.astype(g.dtype), _mean(grads), grads[0])
  expected, _ = jax.jit(tx.update)(mean_grads, tx.init(params), params, stats=stats[-1])
  # The gradient is averaged in another order, then goes through a damped inverse: REFERENCE.
  _assert_close(updates[-1], expected, rtol=references.REFERENCE)


def _full_batch_steps(tx, windows, first_twice=False):
  """Params and state after one full-batch step per window (each K micro-batches' union).

  ``first_twice``: the mistake of counting the first micro-batch twice.
  """
  params, state = _params(), tx.init(_params())
  step = jax.jit(tx.update)
  for seed in windows:
    x, y = _batch(seed, batch=16 * K)
    if first_twice:
      x, y = np.concatenate([x, x[0::K]]), np.concatenate([y, y[0::K]])
    _, grads, stats = CAPTURE(params, x, y)
    updates, state = step(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
  return params, state


def _micro_steps(tx, windows, stats_on=lambda i: True):
  """The same data as K micro-batches per window through tkfac_jax.multi_steps."""
  multi = tkfac_jax.multi_steps(tx, every_k=K)
  params, state = _params(), multi.init(_params())
  steps = {flag: jax.jit(lambda g, s, p, st: multi.update(g, s, p, stats=st)) for flag in (0, 1)}
  all_updates = []
  for seed in windows:
    x, y = _batch(seed, batch=16 * K)
    for i in range(K):
      _, grads, stats = CAPTURE(params, x[i::K], y[i::K])
      use = stats_on(i)
      updates, state = steps[use](grads, state, params, stats if use else None)
      all_updates.append(updates)
      params = optax.apply_updates(params, updates)
  return params, state, all_updates


def test_multi_steps_equals_full_batch_steps():
  """K micro-steps of multi_steps are one step on the K micro-batches' union: factors, params.

  The two programs differ (sums over another split of the batch), so they agree to float32
  tolerances, not bit for bit: SAME_MATHS for the statistics, REFERENCE for the inverses and
  TRAJECTORY for the parameters' displacement, each relative to the largest entry. Counting one
  micro-batch twice must fail every one of them.
  """
  tx = tkfac_jax.tkfac(LR, damping=1e-2, stats_every=1, inverse_every=2)
  windows = [7, 8, 9]
  params, state, updates = _micro_steps(tx, windows)
  full_params, full_state = _full_batch_steps(tx, windows)
  twice_params, twice_state = _full_batch_steps(tx, windows, first_twice=True)
  for i, u in enumerate(updates):
    if i % K != K - 1:  # Accumulating: zero updates.
      assert all(not np.any(leaf) for leaf in jax.tree.leaves(u))
  assert int(state.gradient_step) == len(windows) and int(state.mini_step) == 0
  inner, full = _tkfac_state(state.inner_state), _tkfac_state(full_state)
  twice = _tkfac_state(twice_state)
  assert int(inner.count) == len(windows)
  for name in DENSE:
    assert int(inner.layers[name].count) == len(windows)
    # TKFAC's factors are per-example means: micro-batch means average to the full batch's.
    got, want, wrong = (s.layers[name] for s in (inner, full, twice))
    _assert_close(got.statistics, want.statistics)
    _assert_close(got.inverses, want.inverses, rtol=references.REFERENCE)
    references.assert_detects(
        wrong.statistics, want.statistics, references.SAME_MATHS, "a micro-batch counted twice"
    )
    references.assert_detects(
        wrong.inverses, want.inverses, references.REFERENCE, "a micro-batch counted twice"
    )
  moved, full_moved = _displacement(params), _displacement(full_params)
  _assert_close(moved, full_moved, rtol=references.TRAJECTORY)
  references.assert_detects(
      _displacement(twice_params), full_moved, references.TRAJECTORY, "a micro-batch twice"
  )


def test_multi_steps_averages_the_micro_steps_that_have_statistics():
  """With stats on micro-steps 0 and 2 only, the factors are the mean of those two batches'."""
  tx = tkfac_jax.tkfac(LR, damping=1e-2)
  _, state, _ = _micro_steps(tx, [7], stats_on=lambda i: i != 1)
  x, y = _batch(7, batch=16 * K)
  params = _params()  # Micro-steps do not move the params: the statistics are all at the start.
  stats = [CAPTURE(params, x[i::K], y[i::K])[2] for i in (0, 2)]
  inner = _tkfac_state(state.inner_state)
  for name in DENSE:
    expected = _mean([s.layers[name] for s in stats])
    _assert_close(inner.layers[name].statistics, expected)
  assert int(state.stats_count) == 0


def test_multi_steps_keeps_statistics_for_a_window_that_ends_without():
  """Statistics received in a window whose last micro-step passes None are kept for later."""
  tx = tkfac_jax.tkfac(LR, damping=1e-2)
  _, state, _ = _micro_steps(tx, [7], stats_on=lambda i: i == 0)
  assert int(state.stats_count) == 1 and int(state.gradient_step) == 1
  inner = _tkfac_state(state.inner_state)
  assert all(int(inner.layers[name].count) == 0 for name in DENSE)


def test_multi_steps_bad_input():
  tx = tkfac_jax.tkfac(LR)
  with pytest.raises(ValueError, match="every_k must be a positive int"):
    tkfac_jax.multi_steps(tx, every_k=0)
  multi = tkfac_jax.multi_steps(tx, every_k=2)
  params = _params()
  state = multi.init(params)
  _, grads, stats = CAPTURE(params, *_batch(0))
  with pytest.raises(ValueError, match="needs the keyword argument stats"):
    multi.update(grads, state, params)
  with pytest.raises(TypeError, match="stats must be the statistics"):
    multi.update(grads, state, params, stats=stats.layers)
  # Statistics of another model than the params given to init: the layers are named.
  part = {"Dense_0": params["Dense_0"]}
  other = multi.init(part)
  with pytest.raises(ValueError, match=r"Statistics for layer\(s\) \['Dense_1', 'Dense_2'\]"):
    multi.update({"Dense_0": grads["Dense_0"]}, other, part, stats=stats)


# Checkpoints: Orbax and flax.serialization.

CKPT_TX = tkfac_jax.tkfac(LR, damping=1e-2, stats_every=1, inverse_every=2)
CKPT_STEPS = 6
TRACES = []


@jax.jit
def _train_step(params, opt_state, x, y):
  TRACES.append(1)
  _, grads, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y)
  updates, opt_state = CKPT_TX.update(grads, opt_state, params, stats=stats)
  return optax.apply_updates(params, updates), opt_state


def _train(params, opt_state, steps):
  for seed in steps:
    params, opt_state = _train_step(params, opt_state, *_batch(seed))
  return params, opt_state


@pytest.fixture(scope="module")
def uninterrupted():
  """Params and optimizer state after CKPT_STEPS steps in one go."""
  params = _params()
  return _train(params, CKPT_TX.init(params), range(CKPT_STEPS))


def _check_resumed(half, resumed, uninterrupted):
  """The run resumed from the checkpoint ends exactly where the uninterrupted one does."""
  _assert_equal(resumed, uninterrupted)
  # The checkpoint is taken between two refreshes of the inverses (every 2 steps): the run
  # restored from it must keep the cadence.
  assert int(_tkfac_state(half[1]).count) == CKPT_STEPS // 2
  before = _tkfac_state(half[1]).layers["Dense_0"].inverses.phi
  after = _tkfac_state(resumed[1]).layers["Dense_0"].inverses.phi
  assert not np.array_equal(before, after)


def test_orbax_checkpoint_resumes_exactly(tmp_path, uninterrupted):
  """Saved with Orbax after 3 steps, restored from an abstract target: 3 more steps match 6."""
  params = _params()
  half = _train(params, CKPT_TX.init(params), range(CKPT_STEPS // 2))
  path = tmp_path / "checkpoint"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"params": half[0], "opt_state": half[1]})
    checkpointer.wait_until_finished()

  # A fresh process knows only the model and the optimizer: the target is their abstract state.
  tx = tkfac_jax.tkfac(LR, damping=1e-2, stats_every=1, inverse_every=2)
  abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, _params())
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, abstract)
  assert isinstance(restored["opt_state"][0], tkfac_jax.ScaleByTKFACState)
  _assert_equal((restored["params"], restored["opt_state"]), half)

  traces = len(TRACES)
  resumed = _train(restored["params"], restored["opt_state"], range(CKPT_STEPS // 2, CKPT_STEPS))
  assert len(TRACES) == traces  # The restored state has the same types: no recompilation.
  _check_resumed(half, resumed, uninterrupted)


def test_msgpack_checkpoint_resumes_exactly(uninterrupted):
  """flax.serialization.to_bytes/from_bytes of params and state: 3 + 3 steps match 6."""
  params = _params()
  half = _train(params, CKPT_TX.init(params), range(CKPT_STEPS // 2))
  data = flax.serialization.to_bytes({"params": half[0], "opt_state": half[1]})

  template = {"params": _params(), "opt_state": CKPT_TX.init(_params())}
  restored = flax.serialization.from_bytes(template, data)
  assert isinstance(restored["opt_state"][0], tkfac_jax.ScaleByTKFACState)
  _assert_equal((restored["params"], restored["opt_state"]), half)

  traces = len(TRACES)
  resumed = _train(restored["params"], restored["opt_state"], range(CKPT_STEPS // 2, CKPT_STEPS))
  assert len(TRACES) == traces
  _check_resumed(half, resumed, uninterrupted)
