"""One process of a multi-process (multi-host) TKFAC run, started by test_multiprocess.py.

Each process calls ``jax.distributed.initialize`` with a loopback coordinator, contributes its
half of the global batch (``jax.make_array_from_process_local_data``), and runs the ordinary
jitted train step over a mesh of every process's devices, with CPU collectives over gloo. Process
0 writes the final parameters.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
"""

import sys

import numpy as np

GLOBAL_BATCH = 16
STEPS = 3


def problem():
  """The model, loss, initial parameters and global batch, the same in every process."""
  import flax.linen as nn
  import jax
  import optax

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.tanh(nn.Dense(8)(x))
      return nn.Dense(3)(x)

  model = MLP()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((GLOBAL_BATCH, 5)).astype(np.float32)
  y = rng.integers(0, 3, GLOBAL_BATCH).astype(np.int32)
  params = jax.device_get(model.init(jax.random.key(0), x[:1])["params"])

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn, params, x, y


def train(loss_fn, params, x, y, **options):
  """``STEPS`` TKFAC steps on the batch; returns the parameters."""
  import jax
  import optax

  import tkfac_jax

  tx = tkfac_jax.tkfac(0.1, 1e-2, inverse_every=2, **options)

  @jax.jit
  def step(params, opt_state, x, y):
    _, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state, x, y)
  return params


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=num_processes,
      process_id=process_id,
  )
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  loss_fn, params, x, y = problem()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  # This process's share of the global batch: its rows, in process order.
  rows = GLOBAL_BATCH // num_processes
  mine = slice(process_id * rows, (process_id + 1) * rows)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x[mine])
  y = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), y[mine])
  params = jax.tree.map(
      lambda p: jax.make_array_from_process_local_data(NamedSharding(mesh, P()), p), params
  )
  params = train(loss_fn, params, x, y, inverse_axis="data", mesh=mesh)
  # Replicated: every process holds the whole value.
  local = jax.tree.map(lambda p: np.asarray(p.addressable_shards[0].data), params)
  if process_id == 0:
    flat, _ = jax.tree_util.tree_flatten_with_path(local)
    np.savez(out, **{jax.tree_util.keystr(k): v for k, v in flat})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
