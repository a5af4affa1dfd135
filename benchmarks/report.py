"""The benchmark's outputs: a Markdown table per task and PNG curves, from the JSON report."""

from __future__ import annotations

import pathlib
from typing import Any

LABELS = {"tkfac": "TKFAC", "kfac": "K-FAC", "kfac_jax": "kfac-jax", "muon": "Muon", "adam": "Adam",
          "sgd": "SGD", "tkfac_defaults": "TKFAC defaults"}
COLORS = {"tkfac": "tab:blue", "kfac": "tab:orange", "kfac_jax": "tab:green", "adam": "tab:red",
          "sgd": "tab:purple", "muon": "tab:brown", "tkfac_defaults": "tab:cyan"}


def _num(value: float | None, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def setting(value: Any) -> str:
  """A hyperparameter's value for a label: numbers compactly, ``None`` (e.g. no KL clip) as none."""
  return "none" if value is None else format(value, "g")


def _hparams(h: dict[str, Any]) -> str:
  return ", ".join(f"{'lr' if k == 'learning_rate' else k} {setting(v)}" for k, v in h.items())


def _best_format(metric: str) -> str:
  """Accuracies to 4 decimals, a language model's loss (nats per token) to 3, others to 2."""
  return {"test_accuracy": ".4f", "test_loss": ".3f"}.get(metric, ".2f")


def _seconds(s: dict[str, Any], which: str) -> str:
  """Median seconds to the target (or stretch target), its range over seeds, how many reached."""
  text = _num(s[f"seconds_to_{which}"], ".3g")
  spread = s["spread"].get(f"seconds_to_{which}")
  if s["seeds"] > 1 and spread:
    text += f" ({spread[0]:.3g}–{spread[1]:.3g})"
  if s[f"reached_{which}"] < s["seeds"]:
    text += f" [{s[f'reached_{which}']}/{s['seeds']} reached]"
  return text


def task_table(task: dict[str, Any]) -> str:
  """One row per optimizer: medians over seeds, ratios to Adam, Muon and kfac-jax of the same run."""
  metric = task["metric"].replace("_", " ")
  target = task["target"].get("value")
  ratios = task["ratios"]
  bases = [b for b in ("adam", "muon", "kfac_jax") if ratios.get(b)]
  stretched = task.get("stretch_target", {}).get("value") is not None
  per_base = "".join(f" ×{LABELS[b]} |" for b in bases)
  header = (
      f"| optimizer | settings | median step ms |{per_base} mean step ms | compile s | peak MiB "
      f"| best {metric} | steps to target | s to target |{per_base}"
      + (" s to stretch target |" if stretched else "")
  )
  columns = header.count("|") - 1
  lines = [header, "| --- | --- |" + " ---: |" * (columns - 2)]
  for name, s in task["summary"].items():
    if "error" in s:
      lines.append(f"| {LABELS.get(name, name)} | did not run: {s['error']} |"
                   + " |" * (columns - 2))
      continue
    peak = None if s["peak_bytes"] is None else s["peak_bytes"] / 2**20
    best_fmt = _best_format(task["metric"])
    step_ratios = "".join(
        f" {_num(ratios[b].get(name, {}).get('median_step_seconds'), '.2f')} |" for b in bases)
    time_ratios = "".join(
        f" {_num(ratios[b].get(name, {}).get('seconds_to_target'), '.2f')} |" for b in bases)
    lines.append(
        f"| {LABELS.get(name, name)} | {_hparams(s['hparams'])} "
        f"| {_num(s['median_step_seconds'] * 1e3, '.2f')} |{step_ratios}"
        f" {_num(s['mean_step_seconds'] * 1e3, '.2f')} | {_num(s['compile_seconds'], '.1f')} "
        f"| {_num(peak, '.1f')} | {_num(s['best'], best_fmt)} "
        f"| {_num(s['steps_to_target'], '.0f')} | {_seconds(s, 'target')} |{time_ratios}"
        + (f" {_seconds(s, 'stretch') if 'reached_stretch' in s else '-'} |" if stretched else "")
    )
  budget = task["budget"]
  fixed = task["target"].get("fixed")
  header = (
      f"**{task['task']}**: {task['description']}; batch {task['batch_size']}; "
      f"{budget['seconds']:g} s of training per run; "
      f"medians over {max((s.get('seeds', 0) for s in task['summary'].values()), default=0)} "
      f"seed(s). Target: {metric} "
      + (f"{'≥' if task['metric'].endswith('accuracy') else '≤'} {target:g} "
         f"({'fixed before the runs: ' if fixed else ''}{task['target']['rule']})"
         + ("; a method that does not reach it says so in the s to target column." if fixed
            else ".")
         if target is not None else "none (no run trained).")
      + (f" Stretch target: {metric} {'≥' if task['metric'].endswith('accuracy') else '≤'} "
         f"{task['stretch_target']['value']:g} ({task['stretch_target']['rule']}); not every "
         "method reaches it." if stretched else "")
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
         else "") + (f", {m['platform']}" if m.get("platform") else "") + f"); {versions}.",
      f"Data: {report['dataset']}. Command: `{report['command']}`.",
      report["notes"],
  ]
  lines = verdict(report)
  if lines:
    parts.append("**Verdict**, from this run:\n\n" + "\n".join(f"- {line}" for line in lines))
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
      if target is not None and key == {"test_accuracy": "eval_accuracy",
                                        "test_loss": "eval_loss"}.get(task["metric"], "train_loss"):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target")
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_name(task: dict[str, Any]) -> str:
  """The curves' file name of a task's result: ``<task>_b<batch>.png``."""
  return f"{task['task']}_b{task['batch_size']}.png"


VERDICT_BASELINES = ("adam", "muon", "kfac_jax")


def _reached(task: dict[str, Any], name: str) -> bool:
  s = task["summary"].get(name, {})
  return "error" not in s and bool(s.get("reached_target"))


# Whose times the verdict gives: TKFAC as run (tuned, when tuning), and the library's defaults
# where a tuned run raced them too.
SUBJECTS = ("tkfac", "tkfac_defaults")


def _subject_line(task: dict[str, Any], subject: str, present: list[str]) -> str:
  summary = task["summary"]
  metric = task["metric"].replace("_", " ")
  target = task["target"]["value"]
  sign = "≥" if task["metric"].endswith("accuracy") else "≤"
  mine, who = summary[subject], LABELS[subject]
  if _reached(task, subject):
    parts = []
    for b in present:
      if _reached(task, b):
        ratio = mine["seconds_to_target"] / summary[b]["seconds_to_target"]
        parts.append(f"{ratio:.2f}× {LABELS[b]}'s")
      else:
        parts.append(f"{LABELS[b]} did not reach it")
    return (f"{who} reached {metric} {sign} {target:g} in {mine['seconds_to_target']:.3g} s: "
            + "; ".join(parts))
  reached = [f"{LABELS[b]} in {summary[b]['seconds_to_target']:.3g} s" for b in present
             if _reached(task, b)]
  return (f"{who} did not reach {metric} {sign} {target:g} "
          + ("(" + ", ".join(reached) + " did)" if reached else "(nor did the others)"))


def verdict(report: dict[str, Any]) -> list[str]:
  """Per task and batch size, one line: TKFAC's time to the fixed target against Adam's, Muon's
  and kfac-jax's (medians over seeds, from this run), and the best values within the budget (and
  the same for the library's defaults where they ran beside TKFAC tuned); then, per subject, a
  count of where it got there before Adam."""
  lines = []
  sooner = {s: 0 for s in SUBJECTS}
  cells = {s: 0 for s in SUBJECTS}
  for task in report["tasks"]:
    summary = task["summary"]
    subjects = [s for s in SUBJECTS if s in summary and "error" not in summary[s]]
    if not subjects:
      continue
    head = f"{task['task']}, batch {task['batch_size']}: "
    if task["target"].get("value") is None:
      lines.append(head + "no target (no run trained).")
      continue
    fmt = _best_format(task["metric"])
    present = [b for b in VERDICT_BASELINES if b in summary and "error" not in summary[b]]
    text = ". ".join(_subject_line(task, s, present) for s in subjects)
    bests = ", ".join(f"{LABELS[b]} {_num(summary[b]['best'], fmt)}" for b in [*subjects, *present])
    lines.append(head + text + f". Best within the budget: {bests}.")
    if "adam" in present:
      for s in subjects:
        cells[s] += 1
        if _reached(task, s) and (
            not _reached(task, "adam")
            or summary[s]["seconds_to_target"] < summary["adam"]["seconds_to_target"]):
          sooner[s] += 1
  for s in SUBJECTS:
    if cells[s]:
      lines.append(f"Verdict: {LABELS[s]} reached the target sooner than Adam in {sooner[s]} of "
                   f"{cells[s]} task and batch size pairs of this run.")
  return lines


def plot_verdict(report: dict[str, Any], path: pathlib.Path, title: str) -> bool:
  """Two panels per task and batch size. Top: TKFAC's time to target over each baseline's (log
  scale; below 1: TKFAC first; where one of the two missed the target, a mark says which).
  Bottom: each method's best value within the budget against the target, in % of the target
  (above 0: past it). Returns whether there was anything to plot."""
  def subject(task):  # TKFAC as run; the library's defaults where they ran alone.
    return next((s for s in SUBJECTS if s in task["summary"]
                 and "error" not in task["summary"][s]), None)

  tasks = [t for t in report["tasks"] if subject(t) and t["target"].get("value")]
  baselines = [b for b in VERDICT_BASELINES
               if any(b in t["summary"] and "error" not in t["summary"][b] for t in tasks)]
  if not tasks or not baselines:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 1.3 * len(tasks) + 2), 7),
                                    sharex=True)
  width = 0.8 / len(baselines)
  drawn = [1.0]
  for j, base in enumerate(baselines):
    top.bar(0, 0, width, color=COLORS.get(base), label=LABELS[base])  # The legend's entry.
    for i, task in enumerate(tasks):
      x = i + (j - (len(baselines) - 1) / 2) * width
      if base not in task["summary"] or "error" in task["summary"][base]:
        continue
      if _reached(task, subject(task)) and _reached(task, base):
        ratio = (task["summary"][subject(task)]["seconds_to_target"]
                 / task["summary"][base]["seconds_to_target"])
        # From 1 (a tie) up or down: on a log scale a bar from the axis would hide the ratio.
        top.bar(x, ratio - 1.0, width, bottom=1.0, color=COLORS.get(base))
        top.annotate(f"{ratio:.2f}", (x, ratio), ha="center",
                     va="bottom" if ratio >= 1 else "top", fontsize=7)
        drawn.append(ratio)
      elif _reached(task, subject(task)):
        top.annotate(f"{LABELS[base]}\nmissed", (x, 1.0), ha="center", va="center",
                     fontsize=6, color=COLORS.get(base))
  for i, task in enumerate(tasks):
    if not _reached(task, subject(task)):
      top.annotate(f"{LABELS[subject(task)]} did not\nreach the target", (i, 1.0), ha="center",
                   va="center", fontsize=7, color=COLORS[subject(task)])
  top.axhline(1.0, color="gray", linewidth=1)
  top.set_yscale("log")
  top.set_ylim(min(drawn) / 1.6, max(drawn) * 1.6)
  top.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
  top.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  top.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  who = " / ".join(dict.fromkeys(LABELS[subject(t)] for t in tasks))
  top.set_ylabel(f"{who}: time to target\nover the other's (below 1:\ngot there first)",
                 fontsize=8)
  top.legend(fontsize=8, title="against", title_fontsize=8)
  top.grid(alpha=0.3, axis="y")
  top.set_title(title, fontsize=9)

  methods = [s for s in SUBJECTS if any(s in t["summary"] for t in tasks)] + baselines
  width = 0.8 / len(methods)
  for j, name in enumerate(methods):
    labelled = False  # One legend entry per method, from the first task it ran in.
    for i, task in enumerate(tasks):
      s = task["summary"].get(name, {})
      if "error" in s or s.get("best") is None:
        continue
      target = task["target"]["value"]
      higher = task["metric"].endswith("accuracy")
      past = 100 * ((s["best"] - target) if higher else (target - s["best"])) / abs(target)
      bottom.bar(i + (j - (len(methods) - 1) / 2) * width, past, width,
                 color=COLORS.get(name), label=None if labelled else LABELS[name])
      labelled = True
  bottom.axhline(0.0, color="gray", linewidth=1)
  bottom.set_ylabel("best within the budget,\n% past the target", fontsize=8)
  bottom.legend(fontsize=7, ncol=len(methods))
  bottom.grid(alpha=0.3, axis="y")
  bottom.set_xticks(range(len(tasks)))
  bottom.set_xticklabels([f"{t['task']}\nbatch {t['batch_size']}" for t in tasks], fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
