"""The benchmark's outputs: a Markdown table per task and PNG curves, from the JSON report."""

from __future__ import annotations

import pathlib
from typing import Any

LABELS = {"tkfac": "TKFAC", "kfac": "K-FAC", "kfac_jax": "kfac-jax", "adam": "Adam", "sgd": "SGD"}
COLORS = {"tkfac": "tab:blue", "kfac": "tab:orange", "kfac_jax": "tab:green", "adam": "tab:red",
          "sgd": "tab:purple"}


def _num(value: float | None, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def setting(value: Any) -> str:
  """A hyperparameter's value for a label: numbers compactly, ``None`` (e.g. no KL clip) as none."""
  return "none" if value is None else format(value, "g")


def _hparams(h: dict[str, Any]) -> str:
  return ", ".join(f"{'lr' if k == 'learning_rate' else k} {setting(v)}" for k, v in h.items())


def _seconds(s: dict[str, Any], which: str) -> str:
  """Median seconds to the target (or stretch target), its range over seeds, how many reached."""
  text = _num(s[f"seconds_to_{which}"], ".1f")
  spread = s["spread"].get(f"seconds_to_{which}")
  if s["seeds"] > 1 and spread:
    text += f" ({spread[0]:.1f}–{spread[1]:.1f})"
  if s[f"reached_{which}"] < s["seeds"]:
    text += f" [{s[f'reached_{which}']}/{s['seeds']} reached]"
  return text


def task_table(task: dict[str, Any]) -> str:
  """One row per optimizer: medians over seeds, ratios to Adam and kfac-jax of the same run."""
  metric = task["metric"].replace("_", " ")
  target = task["target"].get("value")
  adam, kj = task["ratios"]["adam"], task["ratios"]["kfac_jax"]
  lines = [
      f"| optimizer | settings | median step ms | ×Adam | ×kfac-jax | mean step ms | compile s "
      f"| peak MiB | best {metric} | steps to target | s to target | ×Adam | ×kfac-jax "
      "| s to stretch target |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: |",
  ]
  for name, s in task["summary"].items():
    if "error" in s:
      lines.append(f"| {LABELS.get(name, name)} | did not run: {s['error']} |" + " |" * 12)
      continue
    peak = None if s["peak_bytes"] is None else s["peak_bytes"] / 2**20
    best_fmt = ".4f" if task["metric"].endswith("accuracy") else ".2f"
    seconds = _seconds(s, "target")
    stretch = _seconds(s, "stretch") if "reached_stretch" in s else "-"
    lines.append(
        f"| {LABELS.get(name, name)} | {_hparams(s['hparams'])} "
        f"| {_num(s['median_step_seconds'] * 1e3, '.2f')} "
        f"| {_num(adam.get(name, {}).get('median_step_seconds'), '.2f')} "
        f"| {_num(kj.get(name, {}).get('median_step_seconds'), '.2f')} "
        f"| {_num(s['mean_step_seconds'] * 1e3, '.2f')} | {_num(s['compile_seconds'], '.1f')} | {_num(peak, '.1f')} "
        f"| {_num(s['best'], best_fmt)} | {_num(s['steps_to_target'], '.0f')} | {seconds} "
        f"| {_num(adam.get(name, {}).get('seconds_to_target'), '.2f')} "
        f"| {_num(kj.get(name, {}).get('seconds_to_target'), '.2f')} | {stretch} |"
    )
  budget = task["budget"]
  header = (
      f"**{task['task']}**: {task['description']}; batch {task['batch_size']}; "
      f"{budget['seconds']:g} s of training per run, evaluated {budget['evaluations']} times "
      f"evenly and {budget.get('early_evaluations', 0)} times early; "
      f"medians over {max((s.get('seeds', 0) for s in task['summary'].values()), default=0)} "
      f"seed(s). Target: {metric} "
      + (f"{'≥' if task['metric'].endswith('accuracy') else '≤'} {target:g} "
         f"({task['target']['rule']})." if target is not None else "none (no run trained).")
      + (f" Stretch target: {metric} {'≥' if task['metric'].endswith('accuracy') else '≤'} "
         f"{task['stretch_target']['value']:g} ({task['stretch_target']['rule']}); not every "
         "method reaches it." if task.get("stretch_target", {}).get("value") is not None else "")
      + (f" The task took {task['wall_seconds'] / 60:.1f} minutes of wall time, tuning, "
         "compiling and evaluating included." if "wall_seconds" in task else "")
  )
  return header + "\n\n" + "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
  """The whole report as Markdown: machine, versions, settings, then a table per task."""
  m = report["machine"]
  versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
  load = m.get("load_average")
  parts = [
      f"Run of {report['date']} on {m['cpu']} ({m['cpu_count']} cores, jax device "
      f"{m['device']}" + (f", load average {load[0]:.1f} at the start" if load else "")
      + (f", OPENBLAS_NUM_THREADS={m['OPENBLAS_NUM_THREADS']}" if "OPENBLAS_NUM_THREADS" in m
         else "") + f"); {versions}.",
      f"Data: {report['dataset']}. Command: `{report['command']}`.",
      report["notes"],
  ]
  parts += [task_table(t) for t in report["tasks"]]
  return "\n\n".join(parts) + "\n"


def _representative(runs: list[dict[str, Any]], higher: bool) -> dict[str, Any]:
  """The seed whose best value is the median of the seeds' (the lower median for even counts)."""
  ordered = sorted(runs, key=lambda r: r["best"], reverse=higher)
  return ordered[(len(ordered) - 1) // 2]


def plot(task: dict[str, Any], path: pathlib.Path, title: str) -> None:
  """Train loss and the held-out figure against steps and against training seconds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  classifier = task["metric"].endswith("accuracy")
  rows = [("train_loss", "train loss")]
  rows.append(("eval_accuracy", "test accuracy") if classifier else ("eval_loss", "test loss"))
  fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
  higher = classifier
  for name in task["summary"]:
    runs = [r for r in task["runs"] if r["optimizer"] == name and "error" not in r]
    if not runs:
      continue
    run = _representative(runs, higher)
    history = run["history"]
    for row, (key, ylabel) in enumerate(rows):
      for col, xkey in enumerate(("step", "seconds")):
        ax = axes[row][col]
        xs = [p[xkey] for p in history]
        ax.plot(xs, [p[key] for p in history], marker=".", color=COLORS.get(name),
                label=f"{LABELS.get(name, name)} (seed {run['seed']})")
        ax.set_xlabel("steps" if xkey == "step" else "training seconds")
        ax.set_ylabel(ylabel)
  target = task["target"].get("value")
  for row, (key, _) in enumerate(rows):
    for col in range(2):
      ax = axes[row][col]
      # Logarithmic in steps and in seconds (linear near 0, where step 0 sits): the early
      # evaluations, where the targets are met, would otherwise be squeezed against the axis.
      ax.set_xscale("symlog", linthresh=10 if col == 0 else 0.1)
      if key != "eval_accuracy":
        ax.set_yscale("log")
      elif target is not None:  # Accuracy from a little below the target up: the part that differs.
        ax.set_ylim(max(0.0, target - 0.15), min(1.0, max(target + 0.05, ax.get_ylim()[1])))
      if target is not None and key == ("eval_accuracy" if classifier else "train_loss"):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target")
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
