"""The measurements behind ``tkfac(...)``'s defaults, scored on wall-clock time.

Two sweeps, on a validation split carved from the training set (the test set is never looked at):

1. **Defaults.** For each task (the benchmark's MLP, CNN and autoencoder) and batch size (128 and
   1024), every candidate setting of TKFAC trains for the same budget of training seconds as
   Adam at the task's learning rate, on the same batches from the same initial parameters. A
   candidate is scored by its time to Adam's best held-out value within the budget (as a ratio
   of Adam's own time to it) and by its best held-out value: validation accuracy for the
   classifiers, validation loss for the autoencoder. The step costs (median, mean, and the
   largest step against the median) come from the same runs.
2. **Loss scale** (``--scales``). The library's default setting (scale-invariant) and the paper's
   (absolute damping), each on a task's loss and on the same loss multiplied by a constant (the
   classifiers' loss summed over the batch instead of averaged; the autoencoder's averaged over
   its 784 pixels instead of summed), at the same settings.

  python benchmarks/defaults.py                           # sweep 1, writes results/defaults/*
  python benchmarks/defaults.py --scales                  # sweep 2
  python benchmarks/defaults.py --tasks mlp --batch-sizes 128 --seconds 3   # a smaller sweep

Every run and its evaluations are in the JSON; the Markdown has one table per task and batch size,
and the plot TKFAC's time to target against Adam's per candidate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
from typing import Any, Sequence

if __package__ in (None, ""):  # Run as `python benchmarks/defaults.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import compare, data, machine, tasks  # noqa: E402

# Candidate settings of TKFAC, each against Adam: the statistics and inverse cadence first, then
# the damping and the KL clip around the library's defaults (LIBRARY).
CANDIDATES = {
    "stats 1, inverses 10": {"stats_every": 1, "inverse_every": 10},
    "stats 5, inverses 50": {"stats_every": 5, "inverse_every": 50},
    "stats 10, inverses 100": {"stats_every": 10, "inverse_every": 100},
    "stats 10, inverses 100, damping 0.3": {"stats_every": 10, "inverse_every": 100,
                                            "damping": 0.3},
    "stats 10, inverses 100, damping 1": {"stats_every": 10, "inverse_every": 100,
                                          "damping": 1.0},
    "stats 10, inverses 100, damping 10": {"stats_every": 10, "inverse_every": 100,
                                           "damping": 10.0},
    "stats 10, inverses 100, kl_clip 3e-7": {"stats_every": 10, "inverse_every": 100,
                                             "kl_clip": 3e-7},
    "stats 10, inverses 100, kl_clip 3e-6": {"stats_every": 10, "inverse_every": 100,
                                             "kl_clip": 3e-6},
    "stats 10, inverses 100, decay 0.9": {"stats_every": 10, "inverse_every": 100, "decay": 0.9},
    "stats 10, inverses 100, decay 0.99": {"stats_every": 10, "inverse_every": 100,
                                           "decay": 0.99},
}
# The library's defaults, as tkfac(...) has them (tests/test_defaults_benchmark.py checks that they
# agree), with the learning rate the benchmark passes.
LIBRARY = {"learning_rate": 0.3, "damping": 10.0, "kl_clip": 1e-6, "stats_every": 10,
           "inverse_every": 100, "decay": 0.95, "scale_invariant": True}
# The paper's damping, with the settings the benchmark tuned for it per task before the
# scale-invariant mode (tasks.py's former TKFAC defaults).
PAPER = {
    "mlp": {"learning_rate": 0.003, "damping": 1e-2, "kl_clip": 1e-4},
    "cnn": {"learning_rate": 0.003, "damping": 1e-2, "kl_clip": 1e-2},
    "autoencoder": {"learning_rate": 0.03, "damping": 1e-1, "kl_clip": 1e-2},
}
SECONDS = {"mlp": 8.0, "cnn": 10.0, "autoencoder": 10.0}


def held_out(task: tasks.Task) -> tuple[str, bool]:
  """The held-out figure a run is scored on, and whether higher is better."""
  return ("eval_accuracy", True) if task.classifier else ("eval_loss", False)


def _best(values: Sequence[float], higher: bool) -> float:
  finite = [v for v in values if math.isfinite(v)]
  if not finite:
    return math.nan
  return max(finite) if higher else min(finite)


def time_to(run: dict[str, Any], key: str, higher: bool, target: float) -> float | None:
  """Training seconds at the first evaluation at or beyond ``target``, or None."""
  for point in run["history"]:
    value = point[key]
    if math.isfinite(value) and (value >= target if higher else value <= target):
      return point["seconds"]
  return None


def tkfac_hparams(task_name: str, overrides: dict[str, Any]) -> dict[str, Any]:
  hparams = {**LIBRARY, **overrides}
  if not hparams.get("scale_invariant", True):
    hparams = {**hparams, **PAPER[task_name], **overrides}
  return hparams


def run_cell(task: tasks.Task, dataset: data.Dataset, candidates: dict[str, dict[str, Any]],
             seconds: float, progress: bool) -> dict[str, Any]:
  """Adam and every candidate on one task and batch size; the cell's runs and scores."""
  split = compare.validation_split(tasks.prepare(task, dataset), task.held_out_examples)
  evaluate = tasks.make_evaluate(task)
  budget = tasks.Budget(seconds, evaluations=10, early=2, resolution=None)
  key, higher = held_out(task)
  label = f"{task.name} b{task.batch_size}"
  # Adam at the task's learning rate and 3x it (a larger batch often takes a larger one); the
  # better of the two, by its best value, is the baseline.
  adams = []
  for lr in (task.defaults["adam"]["learning_rate"], 3 * task.defaults["adam"]["learning_rate"]):
    run = compare.run_safely(task, "adam", {"learning_rate": lr}, split, 0, budget, None, progress,
                             f"{label} adam {lr:g}", evaluate)
    if "history" in run:
      adams.append(run)
  if not adams:
    raise SystemExit(f"{label}: every Adam run failed.")
  bests = [_best([p[key] for p in run["history"]], higher) for run in adams]
  pick = max(range(len(adams)), key=lambda i: bests[i] if higher else -bests[i])
  adam, target = adams[pick], bests[pick]
  adam_time = time_to(adam, key, higher, target)
  rows = []
  for name, overrides in candidates.items():
    hparams = tkfac_hparams(task.name, overrides)
    run = compare.run_safely(task, "tkfac", hparams, split, 0, budget, None, progress,
                             f"{label} {name}", evaluate)
    rows.append({"candidate": name, "run": run, **score_run(run, adam, key, higher, target)})
    print(f"  {label} {name}: {_row_text(rows[-1])}", flush=True)
  return {"task": task.name, "batch_size": task.batch_size, "metric": key, "seconds": seconds,
          "target": target, "adam": adam, "adam_runs": adams,
          "adam_seconds_to_target": adam_time,
          "adam_mean_step": adam.get("mean_step_seconds"), "candidates": rows}


def score_run(run: dict[str, Any], adam: dict[str, Any], key: str, higher: bool,
              target: float) -> dict[str, Any]:
  if "history" not in run:  # A failed run (compare.run_safely's row says why).
    return {"error": run.get("error", "failed")}
  adam_time = time_to(adam, key, higher, target)
  seconds = time_to(run, key, higher, target)
  return {
      "seconds_to_target": seconds,
      "time_ratio": seconds / adam_time if seconds is not None and adam_time else None,
      "best": _best([p[key] for p in run["history"]], higher),
      "mean_step_ratio": run["mean_step_seconds"] / adam["mean_step_seconds"],
      "max_over_median": run["max_step_seconds"] / run["median_step_seconds"],
      "steps": run["steps"],
  }


def _fmt(value: float | None, fmt: str = ".3g") -> str:
  return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
      value, fmt)


def _row_text(row: dict[str, Any]) -> str:
  if "error" in row:
    return f"failed: {row['error']}"
  reached = (f"target at {row['seconds_to_target']:.2f} s ({_fmt(row['time_ratio'], '.2f')}x "
             "Adam)" if row["seconds_to_target"] is not None else "target not reached")
  return (f"{reached}, best {row['best']:.4g}, mean step {row['mean_step_ratio']:.2f}x Adam, "
          f"largest step {row['max_over_median']:.1f}x median, {row['steps']} steps")


def markdown(result: dict[str, Any]) -> str:
  lines = [f"# TKFAC defaults sweep ({result['date']})", "",
           machine.describe(result["machine"], result["versions"]), ""]
  for cell in result["cells"]:
    adam = cell["adam"]
    lines += [
        f"## {cell['task']}, batch {cell['batch_size']} ({cell['seconds']:g} s of training)", "",
        f"Target: Adam's best {cell['metric']} within the budget, {cell['target']:.4g} (learning "
        f"rate {adam['hparams']['learning_rate']:g}, the better of "
        + " and ".join(f"{r['hparams']['learning_rate']:g}" for r in cell["adam_runs"])
        + f"), reached at {_fmt(cell['adam_seconds_to_target'], '.2f')} s; Adam's mean step "
        f"{1e3 * adam['mean_step_seconds']:.2f} ms.", "",
        "| candidate | time to target | × Adam's | best | mean step × Adam | largest / median "
        "step | steps |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in cell["candidates"]:
      if "error" in row:
        lines.append(f"| {row['candidate']} | failed: {row['error']} | | | | | |")
        continue
      reached = row["seconds_to_target"]
      when = f"{reached:.2f} s" if reached is not None else "not reached"
      lines.append(
          f"| {row['candidate']} | {when} "
          f"| {_fmt(row['time_ratio'], '.2f')} | {row['best']:.4g} | "
          f"{row['mean_step_ratio']:.2f} | {row['max_over_median']:.1f} | {row['steps']} |")
    lines.append("")
  return "\n".join(lines)


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  cells = result["cells"]
  columns = min(2, len(cells))  # Batch sizes side by side, a task per row.
  rows = -(-len(cells) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 3.2 * rows), squeeze=False)
  for ax in axes.flat[len(cells):]:
    ax.axis("off")
  for ax, cell in zip(axes.flat, cells):
    names = [r["candidate"] for r in cell["candidates"]]
    ratios = [r.get("time_ratio") for r in cell["candidates"]]
    ax.barh(names, [r if r is not None else 0 for r in ratios],
            color=["tab:blue" if r is not None else "lightgray" for r in ratios])
    for i, r in enumerate(ratios):
      if r is None:
        ax.text(0.02, i, "not reached", va="center", fontsize=8)
    ax.axvline(1.0, color="tab:red", linestyle="--", label="Adam")
    ax.set_xlim(0, max([1.2] + [r * 1.1 for r in ratios if r is not None]))
    ax.set_title(f"{cell['task']}, batch {cell['batch_size']}", fontsize=9)
    ax.set_xlabel("time to Adam's best ÷ Adam's time")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
  fig.suptitle(f"TKFAC candidates against Adam ({result['date']}); lower is sooner", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def scales_sweep(dataset: data.Dataset, names: Sequence[str], seconds: dict[str, float],
                 progress: bool) -> list[dict[str, Any]]:
  """Sweep 2: each mode's settings on the task's loss and on the loss times a constant."""
  cells = []
  for name in names:
    task = tasks.create(name, dataset)
    split = compare.validation_split(tasks.prepare(task, dataset), task.held_out_examples)
    evaluate = tasks.make_evaluate(task)
    budget = tasks.Budget(seconds[name], evaluations=8, early=0, resolution=None)
    key, higher = held_out(task)
    # Classifiers: summed over the batch; the autoencoder: averaged over its pixels.
    other = (float(task.batch_size), "summed over the batch") if task.classifier else (
        1.0 / dataset.x_train.shape[1], "averaged over the pixels")
    for mode, overrides in (("scale-invariant", {}), ("paper", {"scale_invariant": False})):
      hparams = tkfac_hparams(name, overrides)
      for scale, loss in ((1.0, "as in the task"), other):
        scaled = dataclasses.replace(task, loss_scale=scale)
        run = compare.run_safely(scaled, "tkfac", hparams, split, 0, budget, None, progress,
                                 f"{name} {mode} x{scale:g}", evaluate)
        best = _best([p[key] for p in run.get("history", [])], higher)
        cells.append({"task": name, "mode": mode, "hparams": hparams, "loss_scale": scale,
                      "loss": loss, "metric": key, "best": best, "run": run})
        print(f"  {name} {mode}, loss {loss} (x{scale:g}): best {key} {best:.4g}", flush=True)
  return cells


def scales_markdown(result: dict[str, Any]) -> str:
  lines = [f"# TKFAC on a loss and on the same loss times a constant ({result['date']})", "",
           machine.describe(result["machine"], result["versions"]), "",
           "| task | mode | loss | best held-out | steps |", "| --- | --- | --- | ---: | ---: |"]
  for c in result["scales"]:
    lines.append(f"| {c['task']} | {c['mode']} | {c['loss']} (×{c['loss_scale']:.4g}) | "
                 f"{c['metric']} {c['best']:.4g} | {c['run'].get('steps', '—')} |")
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="mlp,cnn,autoencoder", help="comma-separated task names")
  p.add_argument("--batch-sizes", default="128,1024", help="comma-separated batch sizes")
  p.add_argument("--candidates", default=None,
                 help="names from CANDIDATES separated by ';' (default: all), or a JSON object "
                 "{name: settings}")
  p.add_argument("--seconds", type=float, default=None,
                 help="training seconds per run (default: per task, " + ", ".join(
                     f"{k} {v:g}" for k, v in SECONDS.items()) + ")")
  p.add_argument("--scales", action="store_true", help="run sweep 2 (loss scale) instead")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/defaults"))
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  names = [n for n in args.tasks.split(",") if n]
  image_tasks = tuple(t for t in tasks.TASKS if t not in tasks.TEXT_TASKS)
  for n in names:
    if n not in image_tasks:
      raise SystemExit(f"Unknown task {n!r} for the defaults sweep; choose from {image_tasks} "
                       "(the sweep runs on the image data).")
  if args.candidates is None:
    candidates = dict(CANDIDATES)
  elif args.candidates.lstrip().startswith("{"):
    candidates = json.loads(args.candidates)
  else:
    unknown = [c for c in args.candidates.split(";") if c not in CANDIDATES]
    if unknown:
      raise SystemExit(f"Unknown candidates {unknown}; choose from {list(CANDIDATES)}.")
    candidates = {c: CANDIDATES[c] for c in args.candidates.split(";")}
  seconds = {n: args.seconds or SECONDS[n] for n in names}
  dataset = data.load(args.data_dir)
  settings = {"data": dataset.name, "tasks": names, "seconds": seconds,
              "library defaults": LIBRARY}
  if not args.scales:
    settings["batch sizes"] = args.batch_sizes
    settings["candidates"] = candidates
  result = machine.header(settings)
  progress = not args.no_progress
  args.out.mkdir(parents=True, exist_ok=True)
  if args.scales:
    result["scales"] = scales_sweep(dataset, names, seconds, progress)
    (args.out / "scales.json").write_text(json.dumps(result, indent=1))
    (args.out / "scales.md").write_text(scales_markdown(result))
    print(f"\nwrote {args.out / 'scales.json'} and {args.out / 'scales.md'}")
    return result
  cells = []
  for name in names:
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      task = dataclasses.replace(tasks.create(name, dataset), batch_size=batch)
      print(f"{name}, batch {batch}:", flush=True)
      cells.append(run_cell(task, dataset, candidates, seconds[name], progress))
  result["cells"] = cells
  (args.out / "defaults.json").write_text(json.dumps(result, indent=1))
  (args.out / "defaults.md").write_text(markdown(result))
  plot(result, args.out / "defaults.png")
  print(f"\nwrote {args.out}/defaults.json, .md and .png")
  for name in candidates:
    ratios = [next(r.get("time_ratio") for r in c["candidates"] if r["candidate"] == name)
              for c in cells]
    print(f"{name}: time to Adam's best / Adam's: " + ", ".join(
        f"{c['task']} b{c['batch_size']} {_fmt(r, '.2f')}" for c, r in zip(cells, ratios)))
  return result


if __name__ == "__main__":
  main()
