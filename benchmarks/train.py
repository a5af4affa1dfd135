"""Should you switch? TKFAC, K-FAC, kfac-jax, Muon, Adam and SGD side by side, in one run.

Every optimizer trains the same model from the same initial parameters on the same batches, for
the same budget of training seconds, at each batch size (128 and 1024 by default), and is
measured the same way: median step time, compile time, peak memory, the best value within the
budget, and the steps and seconds to reach the task's target, a value fixed in its definition
before any run (``benchmarks/tasks.py``, with the reason). A method that does not reach it says
so. Ratios against Adam, Muon and kfac-jax come from the same run, and the run ends with the
verdict: per task and batch size, TKFAC's time to target against theirs::

  python benchmarks/train.py                          # quick MLP run, all optimizers
  python benchmarks/train.py --task cnn --optimizers tkfac,adam,muon --batch-sizes 1024
  python benchmarks/train.py --task all --budget full --seeds 3 --tune --out results/full

Writes ``results.json`` (every figure and setting), ``results.md`` (the tables and the verdict),
one ``<task>_b<batch>.png`` of curves per task and batch size, and ``verdict.png`` to ``--out``.
The data are Fashion-MNIST when the Debian package ``dataset-fashion-mnist`` is installed (or
``--data-dir`` points at its four ``*-ubyte.gz`` files), and scikit-learn's 8x8 digits otherwise,
with a notice saying how to get Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time
from typing import Any, Sequence

import numpy as np

if __package__ in (None, ""):  # Run as `python benchmarks/train.py`: make `benchmarks` importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import compare, data, machine, methods, report, tasks  # noqa: E402

NOTES = (
    "Each run trains for a fixed budget of training seconds: every step is timed to "
    "`block_until_ready`, and compilation and evaluation are outside the clock. Median step time: "
    "over every step after the first; mean step time: training seconds over steps, inverse "
    "refreshes included. Compile seconds: initialising the optimizer, compiling "
    "its step and running it once (thrown away), less one median step. Peak "
    "memory: XLA's compiled memory analysis of one training step (arguments + outputs + "
    "temporaries - aliased), not the process's. Time to target: training seconds at the first "
    "evaluation that meets the task's fixed target; from a tenth of the budget on, evaluations "
    "are at most 8% of the elapsed training time apart, so a time to target is at most that "
    "late. Muon: optax.contrib.muon "
    "(Nesterov momentum 0.95, 5 Newton-Schulz steps) on every kernel, Adam on the other "
    "parameters at the task's Adam learning rate. Momentum 0.9 for TKFAC, K-FAC, kfac-jax and "
    "SGD; TKFAC and "
    "K-FAC (this library, empirical Fisher, scale-invariant, its defaults unless tuned: statistics "
    "every 10 steps, inverses every 100, relative damping 10, KL clip 1e-6 per parameter) and "
    "kfac-jax (its default GGN estimator, fixed learning rate and damping, no adaptive rules, "
    "curvature every step, inverses every 10 steps) all average their curvature with decay 0.95. "
    "Every optimizer sees the same "
    "batches; the Optax ones also the same dropout masks (kfac-jax splits the step's key itself)."
)


TUNE_EVALUATIONS = 5
# Kronecker methods gain most at large batches, where the preconditioning is spread over more
# examples: every task runs at both.
BATCH_SIZES = (128, 1024)


def batch_list(text: str) -> list[int]:
  """Parses a comma-separated list of positive batch sizes."""
  try:
    sizes = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    sizes = []
  if not sizes or any(b < 1 for b in sizes):
    raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
  return sizes


def versions() -> dict[str, str]:
  """The libraries' versions, kfac-jax's too where it imports."""
  try:
    return machine.versions(kfac_jax=methods.import_kfac_jax().__version__)
  except Exception:  # noqa: BLE001  Missing or broken: kfac_jax_unavailable says which.
    return machine.versions()


def name_list(choices: Sequence[str], everything: str):
  """Parses a comma-separated list of ``choices`` (or ``all``)."""

  def parse(text: str) -> list[str]:
    if text.strip() == "all":
      return list(choices)
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if not names or unknown:
      raise argparse.ArgumentTypeError(
          f"expected 'all' or a comma-separated list from {','.join(choices)}, got {text!r}"
      )
    return names

  parse.__name__ = everything
  return parse


def positive(kind):
  def parse(text: str):
    value = kind(text)
    if not value > 0:
      raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value

  parse.__name__ = kind.__name__
  return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="budgets (training seconds per run): " + "; ".join(
          f"{t}: quick {b['quick'].seconds:g}, full {b['full'].seconds:g}"
          for t, b in _budgets().items()
      ),
  )
  p.add_argument("--task", type=name_list(tasks.TASKS, "tasks"), default=["mlp"],
                 help=f"'all' or comma-separated from {','.join(tasks.TASKS)} (default: mlp)")
  p.add_argument("--optimizers", type=name_list(methods.OPTIMIZERS, "optimizers"),
                 default=list(methods.OPTIMIZERS),
                 help=f"'all' or comma-separated from {','.join(methods.OPTIMIZERS)} (default: "
                 "all; kfac_jax is left out, saying why, where it cannot run; tkfac_defaults, "
                 "TKFAC with the library's defaults beside TKFAC tuned, only with --tune: "
                 "without it, tkfac is the defaults)")
  p.add_argument("--batch-sizes", type=batch_list, default=list(BATCH_SIZES),
                 help="comma-separated batch sizes, each a run of every task (default: "
                 f"{','.join(map(str, BATCH_SIZES))})")
  p.add_argument("--budget", choices=("quick", "full"), default="quick",
                 help="training seconds per run, per task (below); default: quick")
  p.add_argument("--seconds", type=positive(float),
                 help="training seconds per run, overriding --budget")
  p.add_argument("--evaluations", type=positive(int),
                 help="evenly spaced evaluations per run (default: 10, 4 more early in the "
                 "run, and a grid 8%% apart from a tenth of the budget on, which this does not "
                 f"change; when tuning {TUNE_EVALUATIONS} and no grid)")
  p.add_argument("--steps", type=positive(int), help="stop every run after this many steps too")
  p.add_argument("--seeds", type=positive(int), default=1,
                 help="seeds 0..N-1 (initial parameters, batch order, dropout); default: 1")
  p.add_argument("--tune", action="store_true",
                 help="choose each optimizer's learning rate (and damping) by a grid search on a "
                 "validation split, seed 0, quick budget; otherwise the task's defaults")
  p.add_argument("--data-dir",
                 help=f"directory of the Fashion-MNIST *-ubyte.gz files; if not given, "
                 f"${data.DATA_DIR_ENV}, then {data.DEFAULT_DATA_DIR}")
  p.add_argument("--text-dir",
                 help=f"directory of the lm task's text files; if not given, ${data.TEXT_DIR_ENV}, "
                 f"then {data.DEFAULT_TEXT_DIR} (the Debian package fortunes), else Python's "
                 "standard library source")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"),
                 help="directory for results.json, results.md and <task>.png (default: results)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--rescore", type=pathlib.Path, metavar="JSON", nargs="+",
                 help="train nothing: recompute the targets, summaries and ratios of a "
                 "results.json with this version's rules and write the outputs to --out; "
                 "several (runs on one machine) make one report, one table per task and batch "
                 "size and one verdict plot")
  return p.parse_args(argv)


def _budgets() -> dict[str, dict[str, tasks.Budget]]:
  # Budgets do not depend on the data set: build the tasks on a one-example stand-in.
  stand_in = data.Dataset("digits", np.zeros((1, 64), np.float32), np.zeros(1, np.int32),
                          np.zeros((1, 64), np.float32), np.zeros(1, np.int32))
  return {name: tasks.create(name, stand_in).budgets for name in tasks.TASKS}


_REPORT_KEYS = ("tasks", "machine", "versions", "date", "command", "dataset", "total_seconds")


def _read_report(path: pathlib.Path) -> dict[str, Any]:
  """A ``results.json`` of this script, or an exit naming the file and what is wrong with it."""
  try:
    report = json.loads(path.read_text())
  except FileNotFoundError:
    raise SystemExit(f"--rescore: {path} does not exist.") from None
  except json.JSONDecodeError as e:
    raise SystemExit(f"--rescore: {path} is not JSON ({e}).") from None
  missing = [k for k in _REPORT_KEYS if k not in report] if isinstance(report, dict) else ["tasks"]
  if missing:
    raise SystemExit(f"--rescore: {path} is not a results.json of benchmarks/train.py (it has no "
                     f"{', '.join(repr(k) for k in missing)}).")
  return report


def _merged(reports: list[dict[str, Any]], paths: list[pathlib.Path]) -> dict[str, Any]:
  """One report of several runs' ``results.json``: their tasks in order, under the first one's
  machine and versions, which every other must share (figures from different processors, core
  counts, devices or versions are not put side by side). The operating system's build may
  differ (virtual machines of one type, on hosts of different kernels): the report names each."""
  full = dict(reports[0])
  # Not the machine's identity: its load when the run started, and its kernel's build.
  loose = ("load_average", "platform")
  for path, other in zip(paths[1:], reports[1:]):
    for key in ("machine", "versions"):
      mine = {k: v for k, v in full[key].items() if k not in loose}
      theirs = {k: v for k, v in other[key].items() if k not in loose}
      if mine != theirs:
        raise SystemExit(f"--rescore: {path} was run with another {key} than {paths[0]}: "
                         f"{theirs} against {mine}; rescore it on its own.")
  platforms = dict.fromkeys(r["machine"]["platform"] for r in reports
                            if r["machine"].get("platform"))
  full["machine"] = {**full["machine"], "platform": " / ".join(platforms)}
  full["tasks"] = [{"dataset": r["dataset"], **task} for r in reports for task in r["tasks"]]
  for key, join in (("date", ", "), ("command", "`; `"), ("dataset", ", ")):
    full[key] = join.join(dict.fromkeys(str(r[key]) for r in reports))
  for key in ("budget", "seeds"):
    if any(r.get(key) != full.get(key) for r in reports):
      full[key] = "mixed"
  full["total_seconds"] = sum(r["total_seconds"] for r in reports)
  full["rescored"] = ("by this version's rules from " + ", ".join(str(p) for p in paths))
  return full


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the comparison and writes its report; returns what ``results.json`` holds."""
  start = time.perf_counter()
  args = parse_args(argv)
  if args.rescore is not None:
    full = _merged([_read_report(path) for path in args.rescore], args.rescore)
    full["tasks"] = [compare.score(t) for t in full["tasks"]]
    full["notes"] = NOTES
    for result in full["tasks"]:
      print(report.task_table(result))
    write_outputs(full, args.out)
    return full
  names = list(args.optimizers)
  if not args.tune and "tkfac_defaults" in names:
    names.remove("tkfac_defaults")
    if "tkfac" not in names:  # Asked for by name: say what runs instead.
      print("tkfac_defaults runs as tkfac: without --tune, tkfac is the library's defaults",
            file=sys.stderr)
      names.insert(0, "tkfac")
  unavailable = methods.kfac_jax_unavailable() if "kfac_jax" in names else None
  if unavailable:
    print(f"kfac_jax left out: {unavailable}", file=sys.stderr)
    names.remove("kfac_jax")
  no_muon = methods.muon_unavailable() if "muon" in names else None
  if no_muon:
    print(f"muon left out: {no_muon}", file=sys.stderr)
    names.remove("muon")
  if not names:
    raise SystemExit("No optimizer left to run.")

  dataset = data.load(args.data_dir)
  where, found = machine.machine_info(), versions()
  print(machine.describe(where, found))
  print(f"data: {dataset.name} | optimizers: {', '.join(names)} | seeds: {args.seeds} | "
        f"budget: {args.budget}" + (" | tuning on a validation split" if args.tune else ""))

  text = None
  results = []
  for name in args.task:
    task_data = dataset
    if name in tasks.TEXT_TASKS:
      text = text or data.load_text(args.text_dir)
      task_data = text
    for batch_size in args.batch_sizes:
      task = tasks.create(name, task_data, batch_size)
      budget = task.budgets[args.budget]
      if args.seconds is not None or args.evaluations is not None:
        budget = tasks.Budget(args.seconds or budget.seconds,
                              args.evaluations or budget.evaluations, budget.early)
      tune_budget = None
      if args.tune:
        # A grid point is judged by its best value within the budget: a few evaluations will do,
        # and each costs as much time as the CNN's training steps of a second or two.
        quick = task.budgets["quick"]
        tune_budget = tasks.Budget(min(quick.seconds, budget.seconds),
                                   args.evaluations or TUNE_EVALUATIONS, early=0,
                                   resolution=None)
      print(f"\n{name}, batch {batch_size}, {task_data.name}: {task.description}")
      task_start = time.perf_counter()
      result = compare.run_task(
          task, task_data, names, budget, args.seeds, tune_budget, args.steps,
          progress=not args.no_progress,
      )
      result["wall_seconds"] = time.perf_counter() - task_start
      print(report.task_table(result))
      results.append(result)

  full = {
      "date": machine.today(),
      "machine": where,
      "versions": found,
      "command": "python benchmarks/train.py " + shlex.join(
          sys.argv[1:] if argv is None else list(argv)),
      "dataset": dataset.name,
      "optimizers": names,
      "kfac_jax_left_out": unavailable,
      "muon_left_out": no_muon,
      "seeds": args.seeds,
      "budget": args.budget,
      "tuned": args.tune,
      "settings": {
          "momentum": methods.MOMENTUM,
          "curvature_decay": methods.DECAY,
          "kfac_jax_inverse_every": methods.INVERSE_EVERY,
          "train_eval_examples": tasks.TRAIN_EVAL_EXAMPLES,
          "validation_examples": compare.VALIDATION_EXAMPLES[dataset.name],
      },
      "notes": NOTES,
      "tasks": results,
      "total_seconds": time.perf_counter() - start,
  }
  write_outputs(full, args.out)
  return full


def write_outputs(full: dict[str, Any], out: pathlib.Path) -> None:
  """results.json, results.md and a <task>.png per task, in ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(full, indent=1))
  (out / "results.md").write_text(report.markdown(full))
  where = full["machine"]
  machine_line = f"{where['cpu']}, {where['cpu_count']} cores, {full['date']}"
  for result in full["tasks"]:
    title = (f"{result['task']} on {result.get('dataset', full['dataset'])}, "
             f"batch {result['batch_size']}: "
             f"{result['description']}\n{machine_line}")
    report.plot(result, out / report.plot_name(result), title)
  plots = [report.plot_name(r) for r in full["tasks"]]
  datasets = ", ".join(dict.fromkeys(r.get("dataset", full["dataset"]) for r in full["tasks"]))
  if report.plot_verdict(full, out / "verdict.png",
                         f"Time to the fixed target against each method's, {datasets}, "
                         f"{full['budget']} budget\n{machine_line}"):
    plots.append("verdict.png")
  print(f"\nwrote {out}/results.json, results.md and " + ", ".join(plots)
        + f" | total {full['total_seconds']:.0f} s")
  lines = report.verdict(full)
  if lines:
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
  main()
