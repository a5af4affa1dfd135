"""What spreading the inverses over devices saves: ``inverse_axis`` against replicated inverses.

A data-parallel train step (batch sharded over a ``data`` mesh axis, parameters replicated) on a
model with many Dense layers of varied widths. Measures the median wall-clock time of:

- ``no_refresh``: a step with statistics and no inverse refresh;
- ``replicated``: the same step refreshing the inverses, every device inverting every layer;
- ``spread``: the same with ``inverse_axis="data"``, each layer inverted on one device.

The inverse cost per refresh is the refresh step minus the step without refresh. Prints the
machine, versions and settings, writes JSON and a plot::

  python benchmarks/inverse_spread.py --out results/inverse_spread

On a CPU, JAX is given 8 virtual devices (``--devices``) unless ``XLA_FLAGS`` already sets a
count; virtual devices share the machine's cores, which bounds what spreading can gain.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from typing import Sequence

if __name__ == "__main__":
  # Before JAX starts: the number of virtual CPU devices is fixed when its backend initialises.
  _count = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_count}"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tkfac_jax  # noqa: E402
from benchmarks.step_cost import MLP  # noqa: E402
from benchmarks import machine  # noqa: E402

DEFAULT_WIDTHS = "128,256,96,192,64,320,160,224,128,288,96,256"


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--widths", default=DEFAULT_WIDTHS, help="hidden widths (one Dense each)")
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
  parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices (set at start)")
  parser.add_argument("--out", default="results/inverse_spread", help="path prefix for .json/.png")
  args = parser.parse_args(argv)
  widths = tuple(int(w) for w in args.widths.split(","))
  devices = jax.devices()
  if len(devices) < 2:
    raise SystemExit(
        "inverse_spread needs several devices; on a CPU run it as a script, which sets "
        "--xla_force_host_platform_device_count before JAX starts."
    )
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  if args.batch_size % len(devices):
    raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {len(devices)} devices")

  rng = np.random.default_rng(0)
  data = NamedSharding(mesh, P("data"))
  x = jax.device_put(rng.standard_normal((args.batch_size, args.inputs), np.float32), data)
  y = jax.device_put(rng.integers(0, 10, args.batch_size).astype(np.int32), data)
  model = MLP(widths)
  params = model.init(jax.random.key(0), x[:1])["params"]
  params = jax.device_put(params, NamedSharding(mesh, P()))

  def loss_fn(params, x, y):
    return tkfac_jax.softmax_cross_entropy(model.apply({"params": params}, x), y)

  def make_step(tx):
    @jax.jit
    def step(params, opt_state, x, y):
      _, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state

    return step

  # A huge inverse_every refreshes at step 0 only; inverse_every=1 refreshes every step.
  optimizers = {
      "no_refresh": tkfac_jax.tkfac(1e-3, 1e-2, stats_every=1, inverse_every=2**30),
      "replicated": tkfac_jax.tkfac(1e-3, 1e-2, stats_every=1, inverse_every=1),
      "spread": tkfac_jax.tkfac(1e-3, 1e-2, stats_every=1, inverse_every=1,
                                inverse_axis="data", mesh=mesh),
  }
  states, steps = {}, {}
  for name, tx in optimizers.items():
    steps[name] = make_step(tx)
    # Compile, take the step-0 refresh out of the way, and warm up.
    states[name] = jax.block_until_ready(steps[name](params, tx.init(params), x, y))
    states[name] = jax.block_until_ready(steps[name](*states[name], x, y))
  # Blocks of the three steps are interleaved, so that changes in the machine's load (it may be
  # shared) fall on all three alike.
  timings = {name: [] for name in optimizers}
  for _ in range(args.repeats):
    for name in optimizers:
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name] = steps[name](*states[name], x, y)
      jax.block_until_ready(states[name])
      timings[name].append((time.perf_counter() - start) / args.steps)
  median = {name: statistics.median(t) for name, t in timings.items()}
  inverse_cost = {
      name: median[name] - median["no_refresh"] for name in ("replicated", "spread")
  }
  ratio = inverse_cost["spread"] / inverse_cost["replicated"]

  dims = [args.inputs + 1] + [w + 1 for w in widths] + [10]
  header = machine.header({
      "model": f"MLP {args.inputs}-{'-'.join(map(str, widths))}-10 "
      f"({len(widths) + 1} Dense layers)",
      "batch_size": args.batch_size,
      "mesh": f"data={len(devices)}",
      "repeats": args.repeats,
      "steps_per_repeat": args.steps,
      "factor_sizes": sorted(set(dims)),
  })
  print("| step | median ms | inverse refresh ms |")
  print("| --- | ---: | ---: |")
  for name, seconds in median.items():
    extra = f"{1e3 * inverse_cost[name]:.1f}" if name in inverse_cost else "-"
    print(f"| {name} | {1e3 * seconds:.1f} | {extra} |")
  print()
  print(f"inverse refresh, spread / replicated: {ratio:.2f} "
        f"(refresh step: {median['spread'] / median['replicated']:.2f})")

  result = {
      **header,
      "seconds_per_step": timings,
      "median_seconds_per_step": median,
      "inverse_refresh_seconds": inverse_cost,
      "inverse_ratio_spread_to_replicated": ratio,
      "refresh_step_ratio_spread_to_replicated": median["spread"] / median["replicated"],
  }
  settings, where = header["settings"], header["machine"]
  machine.write_timings(
      result, args.out,
      [("whole step (median)", median), ("inverse refresh (step minus no_refresh)", inverse_cost)],
      f"{settings['model']}, batch {settings['batch_size']}, {settings['mesh']} — {where['cpu']} "
      f"({where['cpu_count']} cores), {header['date']}",
  )
  return result


if __name__ == "__main__":
  main()
