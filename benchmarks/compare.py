"""Runs optimizers side by side on one task and measures what a user would switch for.

For every optimizer, on the same data order and from the same initial parameters (per seed):

- training runs for a fixed budget of *training* seconds: each step is timed to
  ``block_until_ready``; compilation and evaluation are outside the clock;
- the model is evaluated at step 0, ``budget.evaluations`` times evenly in training seconds, and
  ``budget.early`` times more within the first interval (see :func:`evaluation_times`);
- figures: median step time (every step after the compiled warm-up), compile time, XLA's peak
  memory estimate of one step, the best value of the task's metric within the budget, and the
  steps and training seconds to reach a target (the first evaluation that meets it).

The target is chosen from the runs themselves, so that every method reaches it (see
:func:`choose_target`).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import tqdm

from benchmarks import data, methods, report, tasks

VALIDATION_EXAMPLES = {"fashion-mnist": 10000, "digits": 300,
                       **{name: data.VALIDATION_WINDOWS for name in ("fortunes", "python-stdlib")}}


class Split:
  """Training data and the evaluation sets of one run.

  ``x_train``/``y_train`` are trained on; ``train_eval`` is a fixed subset of them whose loss is
  the "train loss"; ``eval`` is the held-out set (the test set, or the validation split when
  tuning), named ``eval_name``.
  """

  def __init__(self, x_train, y_train, x_eval, y_eval, eval_name: str,
               held_out_examples: int | None = None,
               train_eval_examples: int = tasks.TRAIN_EVAL_EXAMPLES):
    self.x_train, self.y_train = x_train, y_train
    subset = np.sort(np.random.default_rng(0).permutation(len(y_train))[:train_eval_examples])
    self.train_eval = (x_train[subset], y_train[subset])
    held = np.sort(np.random.default_rng(0).permutation(len(y_eval))[:held_out_examples])
    self.eval = (x_eval[held], y_eval[held])
    self.eval_name = eval_name


def final_split(dataset: data.Dataset, held_out_examples: int | None = None,
                train_eval_examples: int = tasks.TRAIN_EVAL_EXAMPLES) -> Split:
  """Train on the whole training set; evaluate on the test set."""
  return Split(dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test, "test",
               held_out_examples, train_eval_examples)


def validation_split(dataset: data.Dataset, held_out_examples: int | None = None,
                     train_eval_examples: int = tasks.TRAIN_EVAL_EXAMPLES) -> Split:
  """A validation set carved from the training set by a fixed permutation; the rest trains."""
  order = np.random.default_rng(1234).permutation(len(dataset.y_train))
  held = VALIDATION_EXAMPLES[dataset.name]
  val, train = np.sort(order[:held]), np.sort(order[held:])
  return Split(
      dataset.x_train[train], dataset.y_train[train],
      dataset.x_train[val], dataset.y_train[val], "validation", held_out_examples,
      train_eval_examples,
  )


def batches(num_examples: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Example indices of each step: reshuffled every epoch, the last partial batch dropped."""
  rng = np.random.default_rng(seed)
  per_epoch = num_examples // batch_size
  while True:
    order = rng.permutation(num_examples)
    for b in range(per_epoch):
      yield order[b * batch_size : (b + 1) * batch_size]


def higher_is_better(metric: str) -> bool:
  return metric.endswith("accuracy")


# The metrics a target can be set on, and the evaluation point's key for each.
METRIC_KEYS = {"train_loss": "train_loss", "test_accuracy": "eval_accuracy",
               "test_loss": "eval_loss"}


def metric_of(metric: str, point: dict[str, Any]) -> float:
  """The value of ``metric`` (train loss, held-out accuracy or loss) at an evaluation point."""
  return point[METRIC_KEYS[metric]]


def better(metric: str, a: float, b: float) -> bool:
  """Whether value ``a`` of ``metric`` is strictly better than ``b`` (NaN is never better)."""
  if not math.isfinite(a):
    return False
  if not math.isfinite(b):
    return True
  return a > b if higher_is_better(metric) else a < b


def evaluation_times(budget: tasks.Budget) -> list[float]:
  """Training seconds at which a run is evaluated (besides step 0 and its last step).

  ``budget.evaluations`` evenly spaced times, the last at the budget, and before the first of them
  ``budget.early`` more that halve the interval each time (1/2, 1/4, ... of it); with
  ``budget.resolution``, a geometric grid from the first evenly spaced time on. A fast optimizer
  can meet the target well before the first evenly spaced evaluation; without these its time to
  target would be that evaluation's time, an upper bound.
  """
  every = budget.seconds / budget.evaluations
  early = [every * 2.0**-k for k in range(budget.early, 0, -1)]
  times = early + [every * k for k in range(1, budget.evaluations + 1)]
  if budget.resolution:
    # And a geometric grid from the first evenly spaced time to the budget, so that a time to
    # target after it is never more than ``resolution`` of itself late (a crossing between two
    # evaluations is credited with the later one). The targets are set where a tuned Adam gets
    # in the second half of the full budget; the early evaluations cover a faster start.
    t = every
    while t < budget.seconds:
      times.append(t)
      t *= 1 + budget.resolution
  return sorted(set(round(t, 6) for t in times))


def train_one(
    task: tasks.Task,
    name: str,
    hparams: dict[str, Any],
    split: Split,
    seed: int,
    budget: tasks.Budget,
    max_steps: int | None = None,
    progress: bool = True,
    label: str = "",
    evaluate: Callable[..., dict[str, float]] | None = None,
) -> dict[str, Any]:
  """Trains with one optimizer for ``budget.seconds`` of training time; returns its figures.

  ``evaluate`` is ``tasks.make_evaluate(task)``; pass one to share its compilation between runs.
  """
  x0 = split.x_train[: task.batch_size]
  variables = task.model.init(jax.random.key(seed), x0)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  dropout_key = jax.random.fold_in(jax.random.key(seed), 1)  # The same masks for every optimizer.
  evaluate = evaluate or tasks.make_evaluate(task)

  def evaluation(state, step: int, seconds: float) -> dict[str, Any]:
    params, model_state, _ = state
    train = evaluate(params, model_state, *split.train_eval)
    held = evaluate(params, model_state, *split.eval)
    point = {"step": step, "seconds": seconds, "train_loss": train["loss"],
             "eval_loss": held["loss"]}
    if task.classifier:
      point["eval_accuracy"] = held["accuracy"]
    return point

  runner = methods.create(name, task, hparams, dropout_key)
  order = batches(len(split.y_train), task.batch_size, seed)
  first = next(order)
  state = runner.start(params, model_state, split.x_train[first], split.y_train[first])
  history = [evaluation(state, 0, 0.0)]
  step_seconds: list[float] = []
  trained, diverged = 0.0, False
  times = evaluation_times(budget)
  next_evaluation = 0  # Index into times.
  bar = tqdm.tqdm(
      total=round(budget.seconds, 1), desc=label or name, unit="s", leave=False,
      disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} s "
      "{postfix}",
  )
  indices = first
  while trained < budget.seconds and (max_steps is None or len(step_seconds) < max_steps):
    i = len(step_seconds)
    if i:
      indices = next(order)
    x, y = split.x_train[indices], split.y_train[indices]
    start = time.perf_counter()
    state, loss = runner.step(state, x, y, i)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    step_seconds.append(seconds)
    trained += seconds
    bar.update(min(seconds, budget.seconds - bar.n))
    loss = float(loss)
    diverged = not math.isfinite(loss)
    done = (diverged or trained >= budget.seconds
            or (max_steps is not None and len(step_seconds) >= max_steps))
    if done or (next_evaluation < len(times) and trained >= times[next_evaluation]):
      history.append(evaluation(state, i + 1, trained))
      value = metric_of(task.metric, history[-1])
      bar.set_postfix_str(f"step {i + 1} {task.metric} {value:.4g}")
      while next_evaluation < len(times) and times[next_evaluation] <= trained:
        next_evaluation += 1
    if diverged:
      break
  bar.close()

  # The first step after compiling is often slow (allocation, caches): leave it out of the median.
  warm = step_seconds[1:] or step_seconds
  median_step = statistics.median(warm)
  values = [metric_of(task.metric, p) for p in history]
  best = values[0]
  for v in values:
    if better(task.metric, v, best):
      best = v
  return {
      "optimizer": name,
      "hparams": dict(hparams),
      "seed": seed,
      "steps": len(step_seconds),
      "train_seconds": trained,
      "median_step_seconds": median_step,
      "mean_step_seconds": trained / len(step_seconds),
      "max_step_seconds": max(warm),
      "compile_seconds": max(runner.start_seconds - median_step, 0.0),
      "peak_bytes": runner.peak_bytes,
      "diverged": diverged,
      "best": best,
      "final": values[-1],
      "history": history,
  }


def run_safely(*args, **kwargs) -> dict[str, Any]:
  """:func:`train_one`, but a failure becomes a row saying why instead of ending the benchmark."""
  try:
    return train_one(*args, **kwargs)
  except Exception as error:  # noqa: BLE001  Report and go on with the other optimizers.
    name = args[1]
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    tqdm.tqdm.write(f"{name} failed: {message}")
    return {"optimizer": name, "hparams": dict(args[2]), "seed": args[4], "error": message}


def grid_points(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Every combination of a grid's values, in order."""
  points = [{}]
  for key, values in grid.items():
    points = [{**p, key: v} for p in points for v in values]
  return points


# How a tuning result says that no grid point trained, so that the run keeps the task's defaults.
UNTUNED = "defaults: every grid point failed or diverged"


def tune(
    task: tasks.Task,
    name: str,
    split: Split,
    budget: tasks.Budget,
    max_steps: int | None,
    progress: bool,
    evaluate: Callable[..., dict[str, float]] | None = None,
) -> dict[str, Any]:
  """Grid search on the validation split (seed 0): the point with the best metric in budget."""
  trials = []
  for point in grid_points(task.grid[name]):
    label = f"tune {name} " + " ".join(f"{k[:2]}={report.setting(v)}" for k, v in point.items())
    trials.append(run_safely(task, name, point, split, 0, budget, max_steps, progress, label,
                             evaluate))
  scored = [t for t in trials if "error" not in t and not t["diverged"]]
  chosen = None
  for t in scored:
    if chosen is None or better(task.metric, t["best"], chosen["best"]):
      chosen = t
  return {
      "grid": {k: list(v) for k, v in task.grid[name].items()},
      "trials": [
          {"hparams": t["hparams"], **({"error": t["error"]} if "error" in t else {
              "best": t["best"], "steps": t["steps"], "diverged": t["diverged"]})}
          for t in trials
      ],
      "chosen": dict(chosen["hparams"]) if chosen else dict(task.defaults[name]),
      "chosen_by": (
          {"test_accuracy": "best validation accuracy", "test_loss": "best validation loss"}.get(
              task.metric, "best training loss")
          + " within the tuning budget" if chosen
          else UNTUNED
      ),
  }


# A run counts as having trained when it closed at least this fraction of the gap between the
# initial value and the best value of any run; the target is chosen among those runs.
PROGRESS = 0.1


def choose_target(metric: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The best value that the weakest run reached, rounded to a value that run also reaches.

  Among the runs that trained (no error, no divergence, and at least :data:`PROGRESS` of the way
  from the initial value to the best of any run), the weakest just reaches the target at the end
  of its budget, so each of them has a time to target; a run that made no such progress is named
  in the rule (and, short of rounding, does not reach it). Accuracy is rounded down to a multiple
  of 0.005; a loss is rounded up to 3 significant digits.
  """
  higher = higher_is_better(metric)
  good = [r for r in runs if "error" not in r and not r["diverged"]]
  if not good:
    return {"value": None, "rule": "no run trained", "no_progress": []}
  initial = statistics.median(metric_of(metric, r["history"][0]) for r in good)
  best = (max if higher else min)(r["best"] for r in good)
  gap = best - initial
  trained = [r for r in good if gap == 0 or (r["best"] - initial) / gap >= PROGRESS]
  stalled = [f"{r['optimizer']} seed {r['seed']}" for r in good if r not in trained]
  worst = (min if higher else max)(r["best"] for r in trained)
  value = _round_target(metric, worst)
  rule = (
      f"the best {metric.replace('_', ' ')} that the weakest run reached within the budget, "
      "rounded " + ("down to 0.005" if higher else "up to 3 digits") + ", so that every run "
      f"reaches it, among the runs that closed at least {PROGRESS:.0%} of the gap between the "
      f"initial value ({initial:.4g}) and the best of any run ({best:.4g})"
  )
  if stalled:
    rule += "; " + ", ".join(stalled) + " did not"
  return {"value": value, "weakest_best": worst, "rule": rule, "no_progress": stalled}


def _round_target(metric: str, value: float) -> float:
  """Accuracy rounded down to a multiple of 0.005; a loss rounded up to 3 significant digits."""
  if higher_is_better(metric):
    return math.floor(value * 200) / 200
  scale = 10 ** (math.floor(math.log10(abs(value))) - 2) if value else 1.0
  return math.ceil(value / scale) * scale


def choose_stretch_target(metric: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """A harder target than :func:`choose_target`'s: not every method reaches it.

  The weakest method sets the common target, so when one method is far behind, every other one
  meets it within a second and the times to target say little. The stretch target is the median
  over optimizers of each optimizer's median best value (over seeds), rounded as the target is:
  about half of the methods reach it, and the table says which, how many seeds, and when.
  """
  good = [r for r in runs if "error" not in r and not r["diverged"]]
  names = list(dict.fromkeys(r["optimizer"] for r in good))
  if not names:
    return {"value": None, "rule": "no run trained"}
  per_optimizer = [statistics.median(r["best"] for r in good if r["optimizer"] == n)
                   for n in names]
  middle = statistics.median_low(per_optimizer) if higher_is_better(metric) else (
      statistics.median_high(per_optimizer))
  return {
      "value": _round_target(metric, middle),
      "rule": f"the median over optimizers of each one's median best {metric.replace('_', ' ')} "
      "within the budget, rounded " + ("down to 0.005" if higher_is_better(metric)
                                       else "up to 3 digits"),
  }


def to_target(metric: str, run: dict[str, Any], target: float | None) -> tuple:
  """Steps and training seconds at the first evaluation after step 0 meeting ``target``."""
  if target is None or "error" in run:
    return None, None
  for point in run["history"][1:]:
    value = metric_of(metric, point)
    if math.isfinite(value) and (value >= target if higher_is_better(metric) else value <= target):
      return point["step"], point["seconds"]
  return None, None


def median(values: Sequence[float | None]) -> float | None:
  """The median of the finite values (``None`` for a run that did not get there), or None."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  return statistics.median(values) if values else None


def _spread(values: Sequence[float | None]) -> list[float] | None:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return [min(values), max(values)] if values else None


def summarize(metric: str, runs: Sequence[dict[str, Any]], names: Sequence[str],
              target: float | None, stretch: float | None = None) -> dict[str, dict[str, Any]]:
  """Per optimizer, medians over seeds (and min-max spreads) of every figure."""
  summary = {}
  for name in names:
    mine = [r for r in runs if r["optimizer"] == name]
    ok = [r for r in mine if "error" not in r]
    if not ok:
      summary[name] = {"error": mine[0]["error"] if mine else "not run"}
      continue
    reached = [to_target(metric, r, target) for r in ok]
    stretched = [to_target(metric, r, stretch) for r in ok]
    figures = {
        "median_step_seconds": [r["median_step_seconds"] for r in ok],
        "mean_step_seconds": [r["mean_step_seconds"] for r in ok],
        "compile_seconds": [r["compile_seconds"] for r in ok],
        "peak_bytes": [r["peak_bytes"] for r in ok],
        "steps": [r["steps"] for r in ok],
        "best": [r["best"] for r in ok],
        "steps_to_target": [s for s, _ in reached],
        "seconds_to_target": [t for _, t in reached],
        "steps_to_stretch": [s for s, _ in stretched],
        "seconds_to_stretch": [t for _, t in stretched],
    }
    summary[name] = {
        "hparams": ok[0]["hparams"],
        "seeds": len(ok),
        "diverged": sum(r["diverged"] for r in ok),
        "reached_target": sum(s is not None for s, _ in reached),
        "reached_stretch": sum(s is not None for s, _ in stretched),
        **{k: median(v) for k, v in figures.items()},
        "spread": {k: _spread(v) for k, v in figures.items()},
    }
  return summary


def ratios(summary: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, float]]:
  """Each optimizer's median step time, steps and seconds to target over ``baseline``'s."""
  base = summary.get(baseline, {})
  out = {}
  for name, s in summary.items():
    if "error" in s or "error" in base or not base:
      continue
    row = {}
    for key in ("median_step_seconds", "steps_to_target", "seconds_to_target",
                "seconds_to_stretch"):
      if s.get(key) is not None and base.get(key):
        row[key] = s[key] / base[key]
    out[name] = row
  return out


def run_task(
    task: tasks.Task,
    dataset: data.Dataset,
    names: Sequence[str],
    budget: tasks.Budget,
    seeds: int,
    tune_budget: tasks.Budget | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Tunes (if ``tune_budget``), then trains every optimizer for every seed; the task's report."""
  dataset = tasks.prepare(task, dataset)
  evaluate = tasks.make_evaluate(task)
  hparams = {name: dict(task.defaults[name]) for name in names}
  tuning = {}
  if tune_budget is not None:
    val = validation_split(dataset, task.held_out_examples, task.train_eval_examples)
    for name in names:
      if name not in task.grid:  # TKFAC's defaults: raced as they are, never tuned.
        tuning[name] = {"chosen": hparams[name], "chosen_by": "not tuned: the library's defaults"}
        continue
      tuning[name] = tune(task, name, val, tune_budget, max_steps, progress, evaluate)
      hparams[name] = tuning[name]["chosen"]
      settings = ", ".join(f"{k} {report.setting(v)}" for k, v in hparams[name].items())
      if tuning[name]["chosen_by"] == UNTUNED:
        log(f"{task.name}: {name} not tuned, every grid point failed or diverged; its defaults "
            f"{settings}")
      else:
        log(f"{task.name}: {name} tuned to {settings}")
  split = final_split(dataset, task.held_out_examples, task.train_eval_examples)
  runs = []
  for seed in range(seeds):
    for name in names:  # Interleaved, so that a change in the machine's load hits all alike.
      label = f"{task.name} {name} seed {seed}"
      runs.append(run_safely(task, name, hparams[name], split, seed, budget, max_steps, progress,
                             label, evaluate))
  return score({
      "task": task.name,
      "dataset": dataset.name,
      "description": task.description,
      "metric": task.metric,
      "batch_size": task.batch_size,
      "fixed_target": {"value": task.target, "rule": task.target_reason},
      "conv_damping_floor": task.conv_damping_floor,
      "budget": {"seconds": budget.seconds, "evaluations": budget.evaluations,
                 "early_evaluations": budget.early},
      "tune_budget": (
          {"seconds": tune_budget.seconds, "evaluations": tune_budget.evaluations,
           "early_evaluations": tune_budget.early}
          if tune_budget else None
      ),
      "max_steps": max_steps,
      "train_examples": len(split.y_train),
      "eval_set": split.eval_name,
      "eval_examples": len(split.eval[1]),
      "hparams": hparams,
      "tuning": tuning,
      "optimizers": list(names),
      "runs": runs,
  })


def score(result: dict[str, Any]) -> dict[str, Any]:
  """A task's result with its target, per-optimizer summary and ratios (re)computed from its runs.

  Works on a result read back from ``results.json`` too (``train.py --rescore``).
  """
  metric, runs = result["metric"], result["runs"]
  names = result.get("optimizers") or list(dict.fromkeys(r["optimizer"] for r in runs))
  fixed = result.get("fixed_target") or {}
  if fixed.get("value") is not None:
    # Fixed before the runs, in the task's definition: a method may not reach it.
    target = {"value": fixed["value"], "rule": fixed["rule"], "fixed": True, "no_progress": []}
    stretch = {"value": None, "rule": "none: the target is fixed"}
  else:  # A report from before fixed targets, or a task without one.
    target = choose_target(metric, runs)
    stretch = choose_stretch_target(metric, runs)
  summary = summarize(metric, runs, names, target["value"], stretch["value"])
  return {
      **result,
      "target": target,
      "stretch_target": stretch,
      "summary": summary,
      "ratios": {base: ratios(summary, base) for base in BASELINES},
  }


# The methods every other one's figures are divided by, in the tables and the verdict.
BASELINES = ("adam", "muon", "kfac_jax")
