"""Data parallelism over a device mesh: sharded ``jax.jit`` (Auto and Explicit mesh axes),
``jax.shard_map`` with ``axis_name=``, parameters boxed by ``nn.with_partitioning``, and the
inverses spread over devices. The reference is always the same step on one device with the
whole batch.

conftest.py gives the process 8 CPU devices.
"""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tkfac_jax
from tkfac_jax import _spread
import references

BATCH = 16  # Two examples on each of 8 devices.


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(6)(x))
    return nn.Dense(3)(x)


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(3, (3, 3), padding="VALID")(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(6)(x)), None


class _Scan(nn.Module):
  """A stack of three Dense layers under nn.scan: one set of factors per layer of the stack."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x)
    blocks = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = blocks()(x, None)
    return nn.Dense(3)(x)


_MODELS = {"dense": (_Dense(), (4,)), "conv": (_Conv(), (4, 4, 2)), "scan": (_Scan(), (4,))}


@functools.cache
def _problem(name):
  model, shape = _MODELS[name]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH,) + shape).astype(np.float32)
  y = rng.integers(0, 3, BATCH).astype(np.int32)
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn, params, x, y


def _optimizer(**kwargs):
  # Every comparison here runs the same update on one device and on several; Cholesky inverses
  # make it a smaller program than Newton-Schulz's, which test_cadence runs sharded.
  return tkfac_jax.tkfac(0.1, 1e-2, inverse_every=2, inverse_method="cholesky", **kwargs)


def _train(step, params, opt_state, x, y, steps=3):
  """Runs ``steps`` steps on the same batch; returns what every step produced, stacked."""
  outs = []
  for _ in range(steps):
    params, opt_state, loss, grads, stats = step(params, opt_state, x, y)
    outs.append((loss, grads, stats.layers))
  return params, opt_state, outs


def _jit_step(loss_fn, tx, **capture):
  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn, **capture)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss, grads, stats

  return step


@functools.cache
def _one_device(name, first_shard_twice=False):
  """The reference: the same train step on one device with the whole batch.

  ``first_shard_twice``: the mistake of counting the first device's shard (2 examples) twice.
  """
  loss_fn, params, x, y = _problem(name)
  if first_shard_twice:
    x, y = np.concatenate([x, x[:2]]), np.concatenate([y, y[:2]])
  tx = _optimizer()
  return _train(_jit_step(loss_fn, tx), params, tx.init(params), x, y)


def _displacement(run, start):
  """A run with its parameters replaced by how far training moved them from ``start``."""
  params, opt_state, outs = run
  moved = jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - np.asarray(p0), params, start)
  return moved, opt_state, outs


def _assert_same_run(actual, expected, start, detect_twice=None):
  """A run on 8 devices is another program than on one (sums split over devices, then a psum),
  so the two agree to float32 tolerances, not bit for bit: every step's loss, gradients and
  statistics within SAME_MATHS of each leaf's largest entry, the optimizer state (through damped
  inverses) and the parameters' displacement from ``start`` within TRAJECTORY.

  ``detect_twice``: also check that the one-device run of this model with the first device's
  shard counted twice fails the same comparisons.
  """
  actual, expected = _displacement(actual, start), _displacement(expected, start)
  references.assert_trees_close(actual[2], expected[2], references.SAME_MATHS, "steps")
  references.assert_trees_close(actual[:2], expected[:2], references.TRAJECTORY, "run")
  if detect_twice is not None:
    wrong = _displacement(_one_device(detect_twice, first_shard_twice=True), start)
    for part, rtol in ((2, references.SAME_MATHS), (0, references.TRAJECTORY)):
      references.assert_detects(wrong[part], expected[part], rtol, "a shard counted twice")


# Dense on Explicit axes is covered by the inverse-spreading test below.
@pytest.mark.parametrize(
    "name, axis_type",
    [("dense", "Auto"), ("conv", "Auto"), ("conv", "Explicit"), ("scan", "Explicit")],
)
def test_sharded_jit_equals_one_device(name, axis_type):
  """Batch sharded over a ``data`` axis, parameters replicated: the unchanged train step gives the
  one-device statistics, gradients, losses, optimizer state and parameters."""
  loss_fn, params, x, y = _problem(name)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(AxisType, axis_type),))
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  y = jax.device_put(y, NamedSharding(mesh, P("data")))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  tx = _optimizer()
  with jax.set_mesh(mesh):
    opt_state = tx.init(params)
    got = _train(_jit_step(loss_fn, tx), params, opt_state, x, y)
  assert len(x.sharding.device_set) == 8
  _assert_same_run(got, _one_device(name), params, detect_twice=name)


def _shard_map_step(loss_fn, tx, mesh, check_vma, axis_name="data"):
  def step(params, opt_state, x, y):
    loss, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn, axis_name=axis_name)(
        params, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss, grads, stats

  return jax.jit(
      jax.shard_map(
          step,
          mesh=mesh,
          in_specs=(P(), P(), P("data"), P("data")),
          out_specs=P(),
          check_vma=check_vma,
      )
  )


@pytest.mark.parametrize(
    "name, check_vma", [("dense", True), ("dense", False), ("conv", True)]
)
def test_shard_map_with_axis_name_equals_one_device(name, check_vma):
  """Under ``jax.shard_map``, ``axis_name='data'`` averages loss, gradient and statistics over the
  shards once: the gradient equals the one-device gradient (not 8 times it), whether or not
  shard_map tracks replication, and training equals the one-device run."""
  loss_fn, params, x, y = _problem(name)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  tx = _optimizer()
  got = _train(_shard_map_step(loss_fn, tx, mesh, check_vma), params, tx.init(params), x, y)
  _assert_same_run(got, _one_device(name), params)


def test_shard_map_without_axis_name_gives_each_shard_its_own_statistics():
  """Without ``axis_name`` the statistics inside shard_map are the shard's own: those of one
  device on that shard's examples (their mean over shards is the global statistics)."""
  loss_fn, params, x, y = _problem("dense")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

  def local(params, x, y):
    _, _, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y)
    return jax.tree.map(lambda s: s[None], stats.layers)

  got = jax.jit(
      jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data"))
  )(params, x, y)
  capture = jax.jit(tkfac_jax.value_grad_and_stats(loss_fn))
  for shard in range(8):
    part = slice(2 * shard, 2 * shard + 2)
    _, _, expected = capture(params, x[part], y[part])
    references.assert_trees_close(
        jax.tree.map(lambda s: s[shard], got), expected.layers, references.SAME_MATHS
    )


def test_axis_name_outside_shard_map_raises():
  loss_fn, params, x, y = _problem("dense")
  with pytest.raises(ValueError, match="axis_name='data'.*not bound"):
    tkfac_jax.value_grad_and_stats(loss_fn, axis_name="data")(params, x, y)


class _Partitioned(nn.Module):
  """``_Dense`` with its kernels boxed by ``nn.with_partitioning`` (tensor-parallel style)."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.tanh(nn.Dense(6, kernel_init=nn.with_partitioning(init, (None, "model")))(x))
    return nn.Dense(3, kernel_init=nn.with_partitioning(init, ("model", None)))(x)


# Old Flax (0.10) unboxes through a JAX API that jax 0.9 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources:DeprecationWarning")
def test_with_partitioning_is_captured_and_preconditioned_on_a_mesh():
  """Kernels boxed in ``nn.Partitioned`` are captured and preconditioned like plain ones: on a
  (data, model) mesh, with kernels sharded over ``model``, training equals the one-device run of
  the same model without boxes."""
  model = _Partitioned()
  _, plain, x, y = _problem("dense")
  boxed = model.init(jax.random.key(0), x[:1])["params"]
  assert isinstance(boxed["Dense_0"]["kernel"], nn.Partitioned)
  references.assert_trees_equal(nn.unbox(boxed), plain)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = _optimizer()
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    params = jax.device_put(boxed, nn.get_sharding(boxed, mesh))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    opt_state = tx.init(params)
    assert set(tkfac_jax.diagnostics(opt_state)["layers"]) == {"Dense_0", "Dense_1"}
    got = _train(_jit_step(loss_fn, tx), params, opt_state, x, y)
  assert isinstance(got[0]["Dense_0"]["kernel"], nn.Partitioned)
  assert got[0]["Dense_0"]["kernel"].value.sharding.spec == P(None, "model")
  _assert_same_run(nn.unbox(got), _one_device("dense"), plain)


@pytest.mark.parametrize(
    "name, how",
    [("dense", "explicit_set_mesh"), ("dense", "mesh_argument"), ("dense", "shard_map"),
     ("scan", "shard_map")],
)
def test_spread_inverses_equal_replicated_inverses(name, how):
  """``inverse_axis='data'``: each device inverts only its layers and shares them; training
  equals the one-device run, in which one device inverts every layer. The mesh comes from
  jax.set_mesh (Explicit axes), from the ``mesh`` argument (Auto axes), or from shard_map."""
  loss_fn, params, x, y = _problem(name)
  axis_type = AxisType.Explicit if how == "explicit_set_mesh" else AxisType.Auto
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  if how == "shard_map":
    tx = _optimizer(inverse_axis="data")
    got = _train(_shard_map_step(loss_fn, tx, mesh, check_vma=True), params, tx.init(params), x, y)
  else:
    tx = _optimizer(inverse_axis="data", mesh=mesh if how == "mesh_argument" else None)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh) if how == "explicit_set_mesh" else contextlib.nullcontext():
      got = _train(_jit_step(loss_fn, tx), params, tx.init(params), x, y)
  _assert_same_run(got, _one_device(name), _problem(name)[1])


def test_spread_assigns_layers_balanced_by_cost():
  """Longest inversions first, each to the least loaded device."""
  # 64 -> device 0; then 27, 8, 1, 1 all go to device 1, still the lighter (37 against 64).
  assert _spread.assign([1.0, 8.0, 27.0, 64.0, 1.0], 2) == [1, 1, 1, 0, 1]
  assert _spread.assign([4.0, 3.0, 3.0, 2.0], 2) == [0, 1, 1, 0]
  assert _spread.assign([5.0, 5.0], 4) == [0, 1]


def test_spread_inverses_without_a_mesh_raises():
  loss_fn, params, x, y = _problem("dense")
  tx = _optimizer(inverse_axis="data")
  with pytest.raises(ValueError, match="inverse_axis='data' needs a mesh"):
    _jit_step(loss_fn, tx)(params, tx.init(params), x, y)
  with pytest.raises(ValueError, match="without inverse_axis='model'"):
    _optimizer(inverse_axis="model", mesh=jax.make_mesh((8,), ("data",)))
