"""What a TKFAC step costs, and what the statistics and inverse cadence save.

Measures, on one model and batch in one run, the median wall-clock time of:

- ``adam``: a plain ``jax.value_and_grad`` step with Adam (the baseline);
- ``sgd``: the same with SGD and momentum;
- ``tkfac_stats``: a TKFAC step that captures statistics (no inverse refresh);
- ``tkfac_no_stats``: a TKFAC step with ``stats=None`` (plain ``value_and_grad``; no refresh);
- ``tkfac_refresh``: a TKFAC step that captures statistics and recomputes the inverses.

and from them the amortised cost per step of capturing statistics every ``T_stats`` steps and
recomputing inverses every ``T_inv`` steps. Prints the machine, versions and settings, writes JSON
and a plot::

  python benchmarks/step_cost.py --out results/step_cost
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tkfac_jax  # noqa: E402
from benchmarks import machine  # noqa: E402


class MLP(nn.Module):
  hidden: Sequence[int]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def time_step(step: Callable, state, batch, repeats: int, steps: int) -> list[float]:
  """Median-ready list of seconds per step: ``repeats`` blocks of ``steps`` steps each."""
  state = jax.block_until_ready(step(*state, *batch))  # Compile and warm up.
  per_step = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state = step(*state, *batch)
    jax.block_until_ready(state)
    per_step.append((time.perf_counter() - start) / steps)
  return per_step


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hidden", default="256,128", help="hidden widths of the MLP")
  parser.add_argument("--inputs", type=int, default=784)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
  parser.add_argument("--out", default="results/step_cost", help="path prefix for .json/.png")
  args = parser.parse_args(argv)
  hidden = tuple(int(w) for w in args.hidden.split(","))

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((args.batch_size, args.inputs)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32)
  model = MLP(hidden)
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, x, y):
    return tkfac_jax.softmax_cross_entropy(model.apply({"params": params}, x), y)

  def plain(tx):
    @jax.jit
    def step(params, opt_state, x, y):
      grads = jax.grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def tkfac_step(tx, capture: bool):
    @jax.jit
    def step(params, opt_state, x, y):
      if capture:
        _, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y)
      else:
        grads, stats = jax.grad(loss_fn)(params, x, y), None
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state

    return step

  # inverse_every=1 refreshes every step; a huge inverse_every never refreshes after step 0.
  never, always = tkfac_jax.tkfac(0.01, 1e-2, inverse_every=2**30), tkfac_jax.tkfac(0.01, 1e-2, inverse_every=1)
  adam, sgd = optax.adam(1e-3), optax.sgd(0.01, momentum=0.9)
  cases = {
      "adam": (plain(adam), adam),
      "sgd": (plain(sgd), sgd),
      "tkfac_stats": (tkfac_step(never, True), never),
      "tkfac_no_stats": (tkfac_step(never, False), never),
      "tkfac_refresh": (tkfac_step(always, True), always),
  }
  timings = {}
  for name, (step, tx) in cases.items():
    opt_state = tx.init(params)
    if tx is never:  # Take the step-0 refresh out of the way before timing.
      _, opt_state = tkfac_step(never, True)(params, opt_state, x, y)
    timings[name] = time_step(step, (params, opt_state), (x, y), args.repeats, args.steps)
  median = {name: statistics.median(t) for name, t in timings.items()}

  stats_cost = median["tkfac_stats"] - median["tkfac_no_stats"]
  refresh_cost = median["tkfac_refresh"] - median["tkfac_stats"]
  cadences = [(1, 1), (1, 10), (1, 100), (10, 10), (10, 100), (100, 100)]
  amortised = {
      f"T_stats={ts},T_inv={ti}": median["tkfac_no_stats"] + stats_cost / ts + refresh_cost / ti
      for ts, ti in cadences
  }

  header = machine.header({
      "model": f"MLP {args.inputs}-{'-'.join(map(str, hidden))}-10",
      "batch_size": args.batch_size,
      "repeats": args.repeats,
      "steps_per_repeat": args.steps,
  })
  print("| step | median ms | x Adam |")
  print("| --- | ---: | ---: |")
  for name, seconds in median.items():
    print(f"| {name} | {1e3 * seconds:.2f} | {seconds / median['adam']:.2f} |")
  print()
  print(f"statistics capture adds {1e3 * stats_cost:.2f} ms per capturing step; an inverse "
        f"refresh adds {1e3 * refresh_cost:.2f} ms.")
  print("| cadence | amortised ms per step | x Adam |")
  print("| --- | ---: | ---: |")
  for name, seconds in amortised.items():
    print(f"| {name} | {1e3 * seconds:.2f} | {seconds / median['adam']:.2f} |")

  result = {
      **header,
      "seconds_per_step": timings,
      "median_seconds_per_step": median,
      "statistics_cost_seconds": stats_cost,
      "refresh_cost_seconds": refresh_cost,
      "amortised_seconds_per_step": amortised,
      "ratios_to_adam": {k: v / median["adam"] for k, v in {**median, **amortised}.items()},
  }
  settings, where = header["settings"], header["machine"]
  machine.write_timings(
      result, args.out,
      [("one step (median)", median), ("amortised over the cadence", amortised)],
      f"{settings['model']}, batch {settings['batch_size']} — {where['cpu']} "
      f"({where['cpu_count']} cores), {header['date']}",
      reference=("Adam step", median["adam"]),
  )
  return result


if __name__ == "__main__":
  main()
