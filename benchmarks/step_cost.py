"""What a TKFAC step costs, and what the statistics and inverse cadence save.

Measures, on one model and batch in one run, the median wall-clock time of:

- ``adam``: a plain ``jax.value_and_grad`` step with Adam (the baseline);
- ``sgd``: the same with SGD and momentum;
- ``precondition_floor``: the same with ``P G Q`` for every layer's gradient block, fixed square
  matrices of the factors' sizes: the matrix products that any Kronecker-factored step adds;
- ``tkfac_stats``: a TKFAC step that captures statistics (no inverse refresh);
- ``tkfac_no_stats``: a TKFAC step with ``stats=None`` (plain ``value_and_grad``; no refresh);
- ``tkfac_refresh``: a TKFAC step that captures statistics and recomputes the inverses (by
  Cholesky, a full inversion);
- ``gated_due`` and ``gated_off``: the one train step a user writes with
  ``stats_due=tkfac_jax.stats_due(opt_state)``, on a step where statistics are due and on one
  where they are not (which should cost what ``tkfac_no_stats`` costs: the ratio is printed);

and from them the amortised cost per step of capturing statistics every ``T_stats`` steps and
recomputing inverses every ``T_inv`` steps; then runs whose every step is timed, each taken apart
into the step without statistics, the statistics' share and the refreshes'. Prints the machine,
versions and settings, writes JSON and a plot::

  python benchmarks/step_cost.py --out results/step_cost
"""

from __future__ import annotations

import argparse
import functools
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


def time_steps(cases: dict, batches, repeats: int, steps: int) -> dict[str, list[float]]:
  """Median-ready lists of seconds per step, per case: ``repeats`` rounds, each timing a block of
  ``steps`` steps of every case in turn (cycling through ``batches``, so that the factors move
  between refreshes as they do in training). Interleaved, so that a slow minute of a shared
  machine falls on every case alike rather than on one.

  ``cases[name] = (step, state)``; each step is compiled and run once before the timing.
  """
  states = {}
  for name, (step, state) in cases.items():
    state = jax.tree.map(jnp.copy, state)  # The step may donate its inputs.
    states[name] = jax.block_until_ready(step(*state, *batches[0]))  # Compile and warm up.
  per_step = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (step, _) in cases.items():
      state = states[name]
      start = time.perf_counter()
      for i in range(steps):
        state = step(*state, *batches[i % len(batches)])
      jax.block_until_ready(state)
      per_step[name].append((time.perf_counter() - start) / steps)
      states[name] = state
  return per_step


def step_times(step: Callable, state, batches, steps: int) -> list[float]:
  """Seconds of each of ``steps`` consecutive steps (cycling through ``batches``), each timed to
  ``block_until_ready``."""
  state = jax.tree.map(jnp.copy, state)  # The step may donate its inputs.
  state = jax.block_until_ready(step(*state, *batches[0]))  # Compile and warm up.
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state = jax.block_until_ready(step(*state, *batches[i % len(batches)]))
    times.append(time.perf_counter() - start)
  return times


BATCHES = 8  # Random batches cycled through, so that the factors keep moving.
# The first steps after the first also run branches (lax.cond) for the first time, which costs
# once: the largest step after these is reported as well as the largest of all.
WARMUP_STEPS = 10

# The cadences whose every step is timed: the library's former behaviour (statistics every step,
# all inverses every 10 steps on one step, by Cholesky), the same by Newton-Schulz, staggered
# (the default), and sparser.
RUNS = {
    "before: stats 1, inverses 10 by Cholesky, all at once": dict(
        stats_every=1, inverse_every=10, stagger=False, inverse_method="cholesky"),
    "stats 1, inverses 10, all at once": dict(stats_every=1, inverse_every=10, stagger=False),
    "stats 1, inverses 10, staggered": dict(stats_every=1, inverse_every=10, stagger=True),
    "stats 10, inverses 100, all at once": dict(stats_every=10, inverse_every=100, stagger=False),
    "stats 10, inverses 100, spread (the defaults)": dict(
        stats_every=10, inverse_every=100, stagger=True),
}


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hidden", default="256,128", help="hidden widths of the MLP")
  parser.add_argument("--inputs", type=int, default=784)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
  parser.add_argument("--run-steps", type=int, default=300,
                      help="steps of each cadence run whose every step is timed (0: skip)")
  parser.add_argument("--runs", type=int, default=len(RUNS),
                      help=f"how many of the {len(RUNS)} cadence runs to time (the first ones)")
  parser.add_argument("--donate", action="store_true",
                      help="every step (Adam's too) donates params and optimizer state to XLA")
  parser.add_argument("--out", default="results/step_cost", help="path prefix for .json/.png")
  args = parser.parse_args(argv)
  jit = functools.partial(jax.jit, donate_argnums=(0, 1)) if args.donate else jax.jit
  hidden = tuple(int(w) for w in args.hidden.split(","))

  rng = np.random.default_rng(0)
  batches = [
      (jnp.asarray(rng.random((args.batch_size, args.inputs)), jnp.float32),
       jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32))
      for _ in range(BATCHES)
  ]
  x, y = batches[0]
  model = MLP(hidden)
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, x, y):
    return tkfac_jax.softmax_cross_entropy(model.apply({"params": params}, x), y)

  def plain(tx):
    @jit
    def step(params, opt_state, x, y):
      grads = jax.grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def tkfac_step(tx, capture: bool):
    @jit
    def step(params, opt_state, x, y):
      if capture:
        _, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y)
      else:
        grads, stats = jax.grad(loss_fn)(params, x, y), None
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state

    return step

  def gated_step(tx):
    @jit
    def step(params, opt_state, x, y):
      due = tkfac_jax.stats_due(opt_state)
      _, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y, stats_due=due)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state

    return step

  def floor_step(tx):
    """The least a Kronecker-factored step can cost: the gradient, then ``P G Q`` for every
    layer with fixed ``(d_in + 1)`` and ``d_out`` square matrices (the products a TKFAC step adds
    to Adam's, whatever their values), then SGD with momentum. No statistics, no inverses."""
    mats = {
        name: (jnp.eye(layer["kernel"].shape[0] + 1), jnp.eye(layer["kernel"].shape[1]))
        for name, layer in params.items()
    }
    precision = jax.lax.Precision.HIGHEST  # As the library's products.

    @jit
    def step(params, opt_state, x, y):
      grads = jax.grad(loss_fn)(params, x, y)
      directions = {}
      for name, g in grads.items():
        block = jnp.concatenate([g["kernel"], g["bias"][None]], axis=0)
        left, right = mats[name]
        u = jnp.matmul(jnp.matmul(left, block, precision=precision), right, precision=precision)
        directions[name] = {"kernel": u[:-1], "bias": u[-1]}
      updates, opt_state = tx.update(directions, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  # inverse_every=1 refreshes every step; a huge inverse_every never refreshes after step 0.
  huge = 2**30
  never = tkfac_jax.tkfac(0.01, 1e-2, stats_every=1, inverse_every=huge)
  # A refresh at every step by Cholesky: a full inversion each time (Newton-Schulz from the
  # previous step's inverse would be cheaper than at a real cadence, as the factors barely move).
  always = tkfac_jax.tkfac(0.01, 1e-2, stats_every=1, inverse_every=1,
                           inverse_method="cholesky")
  # Gated: statistics due on every step, or (after step 0) never.
  gated_due = tkfac_jax.tkfac(0.01, 1e-2, stats_every=1, inverse_every=huge)
  gated_off = tkfac_jax.tkfac(0.01, 1e-2, stats_every=huge, inverse_every=huge)
  adam, sgd = optax.adam(1e-3), optax.sgd(0.01, momentum=0.9)
  cases = {
      "adam": (plain(adam), adam),
      "sgd": (plain(sgd), sgd),
      "precondition_floor": (floor_step(sgd), sgd),
      "tkfac_stats": (tkfac_step(never, True), never),
      "tkfac_no_stats": (tkfac_step(never, False), never),
      "tkfac_refresh": (tkfac_step(always, True), always),
      "gated_due": (gated_step(gated_due), gated_due),
      "gated_off": (gated_step(gated_off), gated_off),
  }
  timed = {}
  for name, (step, tx) in cases.items():
    opt_state = tx.init(params)
    if tx is not always and name not in ("adam", "sgd", "precondition_floor"):
      # Take the step-0 statistics and refresh out of the way before timing.
      _, opt_state = tkfac_step(tx, True)(jax.tree.map(jnp.copy, params), opt_state, x, y)
    timed[name] = (step, (params, opt_state))
  timings = time_steps(timed, batches, args.repeats, args.steps)
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
      "donate": args.donate,
  })
  print("| step | median ms | x Adam |")
  print("| --- | ---: | ---: |")
  for name, seconds in median.items():
    print(f"| {name} | {1e3 * seconds:.2f} | {seconds / median['adam']:.2f} |")
  print()
  off_ratio = median["gated_off"] / median["tkfac_no_stats"]
  due_ratio = median["gated_due"] / median["tkfac_stats"]
  print(f"one train step with stats_due: off-cadence {off_ratio:.2f}x a stats=None step, "
        f"on-cadence {due_ratio:.2f}x a step that always captures.")
  print(f"statistics capture adds {1e3 * stats_cost:.2f} ms per capturing step; an inverse "
        f"refresh by Cholesky adds {1e3 * refresh_cost:.2f} ms.")
  print("| cadence | amortised ms per step | x Adam |")
  print("| --- | ---: | ---: |")
  for name, seconds in amortised.items():
    print(f"| {name} | {1e3 * seconds:.2f} | {seconds / median['adam']:.2f} |")

  runs = {}
  if args.run_steps:
    print()
    print(f"every step of {args.run_steps}-step runs, one jitted step with stats_due "
          "(the first step, which computes everything, excluded):")
    print(f"(largest after step {WARMUP_STEPS}: without the first executions of each branch)")
    print("| cadence | median ms | largest ms | largest / median | largest after warm-up / median "
          "| mean ms | mean x Adam |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, cadence in list(RUNS.items())[:args.runs]:
      tx = tkfac_jax.tkfac(0.01, **cadence)  # The default damping.
      times = step_times(gated_step(tx), (params, tx.init(params)), batches, args.run_steps)
      med, big, mean = statistics.median(times), max(times), statistics.mean(times)
      later = max(times[WARMUP_STEPS:], default=big)
      runs[name] = {"settings": cadence, "seconds": times, "median": med, "largest": big,
                    "mean": mean, "largest_over_median": big / med,
                    "largest_after_warmup_over_median": later / med,
                    "mean_over_adam": mean / median["adam"]}
      print(f"| {name} | {1e3 * med:.2f} | {1e3 * big:.2f} | {big / med:.1f} | "
            f"{later / med:.1f} | {1e3 * mean:.2f} | {mean / median['adam']:.2f} |")
      runs[name]["parts_over_adam"] = _parts(times, cadence["stats_every"], median["adam"])
    print()
    print("where each run's mean step goes, in Adam steps: the median step without statistics "
          "(a spread refresh's blocks fall on about half the steps of a period, so it may carry "
          "one), the statistics steps' extra cost spread over their period, and the rest (the "
          "refreshes that the median leaves out):")
    print("| cadence | mean | step without statistics | statistics | refreshes and rest |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, run in runs.items():
      parts = run["parts_over_adam"]
      print(f"| {name} | {run['mean_over_adam']:.2f} | {parts['plain_step']:.2f} | "
            f"{parts['statistics']:.2f} | {parts['refreshes_and_rest']:.2f} |")
    print(f"(a step of the gradient and the preconditioning products alone, with fixed "
          f"matrices: {median['precondition_floor'] / median['adam']:.2f}x Adam)")

  result = {
      **header,
      "cadence_runs": runs,
      "seconds_per_step": timings,
      "median_seconds_per_step": median,
      "statistics_cost_seconds": stats_cost,
      "refresh_cost_seconds": refresh_cost,
      "gated_off_over_no_stats": off_ratio,
      "gated_due_over_stats": due_ratio,
      "amortised_seconds_per_step": amortised,
      "ratios_to_adam": {k: v / median["adam"] for k, v in {**median, **amortised}.items()},
  }
  settings, where = header["settings"], header["machine"]
  title = (f"{settings['model']}, batch {settings['batch_size']} — {where['cpu']} "
           f"({where['cpu_count']} cores), {header['date']}")
  machine.write_timings(
      result, args.out,
      [("one step (median)", median), ("amortised over the cadence", amortised)],
      title,
      reference=("Adam step", median["adam"]),
  )
  if runs:
    _plot_runs(runs, median["adam"], pathlib.Path(args.out).with_name(
        pathlib.Path(args.out).name + "_steps.png"), title)
  return result


def _parts(times: list[float], stats_every: int, adam_seconds: float) -> dict[str, float]:
  """A run's mean step, taken apart in Adam steps: the median step without statistics, the
  statistics steps' extra time over ``stats_every`` steps, and what is left (the refreshes).

  ``times[i]`` is step ``i + 1``'s (step 0 is not timed); statistics are due where the step
  count is a multiple of ``stats_every``.
  """
  due = [(i + 1) % stats_every == 0 for i in range(len(times))]
  plain = statistics.median(t for t, d in zip(times, due) if not d) if not all(due) else 0.0
  with_stats = [t for t, d in zip(times, due) if d]
  extra = (statistics.median(with_stats) - plain) / stats_every if with_stats else 0.0
  rest = statistics.mean(times) - plain - extra
  return {"plain_step": plain / adam_seconds, "statistics": extra / adam_seconds,
          "refreshes_and_rest": rest / adam_seconds}


def _plot_runs(runs: dict, adam_seconds: float, path: pathlib.Path, title: str) -> None:
  """Each run's step times, step by step: the spikes are the inverse refreshes."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.1 * len(runs)), sharex=True, sharey=True)
  for ax, (name, run) in zip(axes, runs.items()):
    ax.plot([1e3 * t for t in run["seconds"]], lw=0.8)
    ax.axhline(1e3 * adam_seconds, color="gray", ls="--", lw=0.8, label="Adam step (median)")
    ax.set_yscale("log")
    ax.set_title(f"{name}: largest {run['largest_over_median']:.1f}x the median step, "
                 f"mean {run['mean_over_adam']:.2f}x Adam", fontsize=8)
    ax.set_ylabel("ms")
  axes[0].legend(fontsize=7)
  axes[-1].set_xlabel("step")
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
