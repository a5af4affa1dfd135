"""The statistics cadence inside one jitted train step: ``stats_every`` and ``stats_due``.

The reference is the way a user had to write it before: two jitted steps, one capturing the
statistics on the steps where they are due and one passing ``stats=None`` on the others, with an
optimizer that folds in whatever it is given.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import references
import tkfac_jax

EVERY = 3
STEPS = 7  # Statistics on steps 0, 3 and 6.
DUE = [step % EVERY == 0 for step in range(STEPS)]


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(3, (3, 3), padding="VALID")(x))
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.Dense(3)(x)


MODEL = _CNN()


def _loss(params, x, y):
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch(seed, size=16):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((size, 5, 5, 2)).astype(np.float32)
  return x, rng.integers(0, 3, size).astype(np.int32)


def _params():
  return MODEL.init(jax.random.key(0), _batch(0)[0][:1])["params"]


def _tx(stats_every, **kwargs):
  return tkfac_jax.tkfac(0.1, 1e-2, stats_every=stats_every, inverse_every=2, **kwargs)


def _gated_step(tx, **capture):
  """The one train step a user writes: statistics computed only when they are due."""

  def step(params, opt_state, x, y):
    due = tkfac_jax.stats_due(opt_state)
    loss, grads, stats = tkfac_jax.value_grad_and_stats(_loss, **capture)(
        params, x, y, stats_due=due
    )
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, (loss, due, stats)

  return step


def _two_step_reference(steps=STEPS):
  """Two jitted steps, chosen in Python: statistics on the due steps, stats=None on the others."""
  tx = _tx(1)

  @jax.jit
  def with_stats(params, opt_state, x, y):
    _, grads, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def without(params, opt_state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=None)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = _params(), tx.init(_params())
  for step in range(steps):
    params, opt_state = (with_stats if DUE[step] else without)(params, opt_state, *_batch(step))
  return params, opt_state


def _displacement(params):
  return jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - p0, params, _params())


def _layers(opt_state):
  is_state = lambda x: isinstance(x, tkfac_jax.ScaleByTKFACState)  # noqa: E731
  (state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  return state.layers


def _with_due(opt_state, due):
  """``opt_state`` with its TKFAC state's ``stats_due`` set to ``due``."""
  is_state = lambda x: isinstance(x, tkfac_jax.ScaleByTKFACState)  # noqa: E731
  return jax.tree.map(
      lambda x: x._replace(stats_due=jnp.asarray(due)) if is_state(x) else x,
      opt_state,
      is_leaf=is_state,
  )


def _assert_same_training(got, reference):
  """Another program (a cond inside the step) than the reference: float32 agreement of the
  curvature and of the parameters' displacement, and the same number of folded batches."""
  (params, opt_state), (ref_params, ref_state) = got, reference
  for name in ("Conv_0", "Dense_0"):
    layer, ref = _layers(opt_state)[name], _layers(ref_state)[name]
    assert int(layer.count) == int(ref.count) == sum(DUE), name
    references.assert_trees_close(layer, ref, references.TRAJECTORY, name)
  references.assert_trees_close(
      _displacement(params), _displacement(ref_params), references.TRAJECTORY
  )


def test_one_step_computes_statistics_only_when_due_and_equals_two_steps():
  """stats_every=3 in one jitted step: compiled once; stats_due is true on steps 0, 3, 6 only;
  off-cadence statistics are zeros and flagged; the run equals the two-step reference."""
  tx = _tx(EVERY)
  traces = []

  @jax.jit
  def step(params, opt_state, x, y):
    traces.append(1)
    return _gated_step(tx)(params, opt_state, x, y)

  params, opt_state = _params(), tx.init(_params())
  for i in range(STEPS):
    params, opt_state, (_, due, stats) = step(params, opt_state, *_batch(i))
    assert bool(due) == DUE[i] and bool(stats.due) == DUE[i], i
    delta = float(stats.layers["Conv_0"].delta)
    assert (delta > 0) if DUE[i] else (delta == 0.0), i  # Never computed when not due.
  assert len(traces) == 1
  _assert_same_training((params, opt_state), _two_step_reference())
  # Sanity: statistics on every step train differently, so the comparison above can fail.
  every = jax.jit(_gated_step(_tx(1)))
  other = _params(), _tx(1).init(_params())
  for i in range(STEPS):
    other = every(*other, *_batch(i))[:2]
  moved = _displacement(params)["Dense_0"]["kernel"]
  assert references.max_error(_displacement(other[0])["Dense_0"]["kernel"], moved) > 1e-3


def test_statistics_passed_when_not_due_are_ignored():
  """Statistics captured on every step (no stats_due) are folded in only on the due steps."""
  tx = _tx(EVERY)

  @jax.jit
  def step(params, opt_state, x, y):
    _, grads, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = _params(), tx.init(_params())
  for i in range(STEPS):
    params, opt_state = step(params, opt_state, *_batch(i))
  _assert_same_training((params, opt_state), _two_step_reference())


def test_statistics_stay_due_until_every_layer_has_some():
  """A first batch of statistics that is not finite for a layer is not folded in, and the next
  step is due again, whatever stats_every says."""
  tx = _tx(10)
  params, opt_state = _params(), tx.init(_params())
  capture = jax.jit(tkfac_jax.value_grad_and_stats(_loss))
  _, grads, stats = capture(params, *_batch(0))
  bad = stats.layers["Dense_0"]._replace(delta=jnp.float32(jnp.nan))
  stats = tkfac_jax.Statistics(
      layers={**stats.layers, "Dense_0": bad}, curvature=stats.curvature
  )
  update = jax.jit(tx.update)
  _, opt_state = update(grads, opt_state, params, stats=stats)
  assert int(_layers(opt_state)["Dense_0"].count) == 0
  assert int(_layers(opt_state)["Conv_0"].count) == 1
  assert bool(tkfac_jax.stats_due(opt_state))
  _, grads, stats = capture(params, *_batch(1))
  _, opt_state = update(grads, opt_state, params, stats=stats)
  assert int(_layers(opt_state)["Dense_0"].count) == 1
  assert not bool(tkfac_jax.stats_due(opt_state))  # Step 2 of 10: not due.


def test_sampled_fisher_is_computed_only_when_due():
  """fisher='sampled' with stats_due: the same statistics as without it where due (the same key),
  zeros where not; its extra backward pass sits inside the lax.cond."""

  def loss(params, x, y):
    return tkfac_jax.softmax_cross_entropy(MODEL.apply({"params": params}, x), y)

  params, (x, y), key = _params(), _batch(0), jax.random.key(7)
  capture = tkfac_jax.value_grad_and_stats(loss, fisher="sampled")
  gated = jax.jit(lambda due: capture(params, x, y, fisher_key=key, stats_due=due))
  _, _, want = jax.jit(lambda: capture(params, x, y, fisher_key=key))()
  _, _, got = gated(jnp.bool_(True))
  references.assert_trees_close(got.layers, want.layers, references.SAME_MATHS)
  _, _, off = gated(jnp.bool_(False))
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(off.layers))
  # The sampling (an argmax over noised logits) and the second backward pass are inside the
  # cond's branch, not in the step around it as they are without stats_due.
  def outer(fun, *args):
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fun)(*args).jaxpr.eqns}

  assert "argmax" in outer(lambda: capture(params, x, y, fisher_key=key))
  gated_outer = outer(lambda due: capture(params, x, y, fisher_key=key, stats_due=due), True)
  assert "cond" in gated_outer and "argmax" not in gated_outer


def test_a_layer_that_is_never_captured_does_not_hold_the_cadence():
  """A grouped convolution is in the optimizer state but never captured (it is skipped, with a
  warning): statistics are not kept due on its account once the other layers have theirs."""

  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), feature_group_count=2, padding="VALID")(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = Grouped()
  x, y = _batch(0)
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = _tx(EVERY)
  opt_state = tx.init(params)
  _, grads, stats = jax.jit(tkfac_jax.value_grad_and_stats(loss))(params, x, y)
  assert [path for path, _ in stats.skipped] == ["Conv_0"]
  with pytest.warns(UserWarning, match="Layer 'Conv_0' is not preconditioned"):
    _, opt_state = jax.jit(tx.update)(grads, opt_state, params, stats=stats)
  assert int(_layers(opt_state)["Dense_0"].count) == 1
  assert int(_layers(opt_state)["Conv_0"].count) == 0
  assert not bool(tkfac_jax.stats_due(opt_state))  # Step 1 of 3: not due.


def test_inject_hyperparams_and_a_chain_read_stats_due():
  """stats_due finds the TKFAC state inside inject_hyperparams and a chain; training matches."""
  tx = optax.chain(
      optax.clip_by_global_norm(10.0),
      optax.inject_hyperparams(tkfac_jax.tkfac)(
          learning_rate=0.1, damping=1e-2, stats_every=EVERY, inverse_every=2
      ),
  )
  step = jax.jit(_gated_step(tx))
  params, opt_state = _params(), tx.init(_params())
  for i in range(STEPS):
    params, opt_state, (_, due, _) = step(params, opt_state, *_batch(i))
    assert bool(due) == DUE[i]
  assert int(_layers(opt_state)["Dense_0"].count) == sum(DUE)


def test_multi_steps_with_stats_due_equals_full_batch_steps():
  """multi_steps over K micro-batches with the gated capture: the inner cadence counts updates,
  and the run equals full-batch gated steps on the micro-batches' union."""
  k = 2
  tx, multi = _tx(EVERY), tkfac_jax.multi_steps(_tx(EVERY), every_k=k)
  full_step, micro_step = jax.jit(_gated_step(tx)), jax.jit(_gated_step(multi))
  full = _params(), tx.init(_params())
  micro = _params(), multi.init(_params())
  for i in range(STEPS):
    x, y = _batch(i, size=16 * k)
    full = full_step(*full, x, y)[:2]
    for j in range(k):
      micro = micro_step(*micro, x[j::k], y[j::k])[:2]
  params, state = micro
  assert int(state.gradient_step) == STEPS
  for name in ("Conv_0", "Dense_0"):
    layer, ref = _layers(state.inner_state)[name], _layers(full[1])[name]
    assert int(layer.count) == int(ref.count) == sum(DUE)
    references.assert_trees_close(layer, ref, references.TRAJECTORY, name)
  references.assert_trees_close(
      _displacement(params), _displacement(full[0]), references.TRAJECTORY
  )


@pytest.mark.parametrize("how", ["jit_explicit", "shard_map_axis_name", "shard_map_per_shard"])
def test_sharded_steps_with_stats_due(how):
  """The gated step under jit over an Explicit mesh axis and under shard_map with axis_name
  equals the one-device run; inside shard_map without axis_name each shard gets its own
  statistics on the due steps and zeros on the others."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  tx = _tx(EVERY)
  params, opt_state = _params(), tx.init(_params())
  if how == "shard_map_per_shard":
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

    def local(params, opt_state, x, y):
      due = tkfac_jax.stats_due(opt_state)
      _, _, stats = tkfac_jax.value_grad_and_stats(_loss)(params, x, y, stats_due=due)
      return jax.tree.map(lambda s: s[None], stats.layers)

    per_shard = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                      out_specs=P("data"))
    )
    x, y = _batch(0)
    got = per_shard(params, opt_state, x, y)
    _, _, expected = jax.jit(tkfac_jax.value_grad_and_stats(_loss))(params, x[2:4], y[2:4])
    references.assert_trees_close(
        jax.tree.map(lambda s: s[1], got), expected.layers, references.SAME_MATHS
    )
    # A state whose next update is not due: zeros, never computed.
    zeros = per_shard(params, _with_due(opt_state, False), x, y)
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(zeros))
    return
  if how == "jit_explicit":
    step = jax.jit(_gated_step(tx))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    run = jax.device_put((params, opt_state), NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
      for i in range(STEPS):
        x, y = _batch(i)
        run = step(*run, shard(x), shard(y))[:2]
  else:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    step = jax.jit(
        jax.shard_map(
            _gated_step(tx, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=P(),
        )
    )
    run = params, opt_state
    for i in range(STEPS):
      run = step(*run, *_batch(i))[:2]
  _assert_same_training(run, _two_step_reference())


def test_orbax_restore_in_the_middle_of_a_period_continues_exactly(tmp_path):
  """Saved after step 4 (between two due steps), restored from an abstract target: the rest of
  the run is bit for bit the uninterrupted run (the same program on the same machine)."""
  tx = _tx(EVERY)
  step = jax.jit(_gated_step(tx))

  def train(run, steps):
    for i in steps:
      run = step(*run, *_batch(i))[:2]
    return run

  uninterrupted = train((_params(), tx.init(_params())), range(STEPS))
  half = train((_params(), tx.init(_params())), range(4))
  assert not bool(tkfac_jax.stats_due(half[1]))  # Step 4 is not due; step 6 is.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"run": half})
    checkpointer.wait_until_finished()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      jax.eval_shape(lambda p: {"run": (p, tx.init(p))}, _params()),
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)["run"]
  references.assert_trees_equal(train(tuple(restored), range(4, STEPS)), uninterrupted)


def test_cadence_bad_input():
  params = _params()
  with pytest.raises(ValueError, match="stats_every must be a positive integer"):
    tkfac_jax.tkfac(0.1, stats_every=0)
  with pytest.raises(ValueError, match="stats_every must be a positive integer"):
    tkfac_jax.scale_by_tkfac(stats_every=2.5)
  with pytest.raises(ValueError, match="stats_due needs an optimizer state holding"):
    tkfac_jax.stats_due(optax.adam(1e-3).init(params))
  capture = tkfac_jax.value_grad_and_stats(_loss)
  x, y = _batch(0)
  with pytest.raises(TypeError, match=r"stats_due must be a boolean.*stats_due\(opt_state\)"):
    capture(params, x, y, stats_due=1)
  with pytest.raises(TypeError, match="stats_due must be a boolean scalar"):
    capture(params, x, y, stats_due=jnp.ones((2,), bool))
