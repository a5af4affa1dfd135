"""Attention projections: one Kronecker block over all heads, or one block per head?

The query, key and value projections of ``nn.MultiHeadDotProductAttention`` are ``DenseGeneral``
layers with ``features=(heads, head_dim)``. tkfac_jax preconditions each with one block over all
its ``heads * head_dim`` outputs. The alternative is one block per head: the same input factor
(each head sees the same inputs) but a damping and an output factor per head, which drops the
correlations between heads. This trains the benchmark's language model (``tasks.LanguageModel``:
width 32, 4 heads, 2 pre-LN blocks) on the same batches from the same initial weights with:

- ``layer``: the library's one block per projection;
- ``head``: one block per head, by a model whose projections are one ``nn.Dense(head_dim)`` per
  head (the same function with the same weights, checked at the start: every head is then its
  own layer to tkfac_jax, with its own factors, damping and trace);
- ``none``: the projections left to the fallback (the default one: their gradient over the
  blocks' mean curvature), every other kernel preconditioned;
- ``adam``: Adam alone, for reference.

It reports, per arm and over seeds: steps and training seconds to each validation loss of
``--targets``, the median and mean step (statistics and refreshes included), the optimizer
state's bytes for the projections and XLA's peak-memory estimate of one step. Prints the machine, versions and
settings, writes JSON and a plot::

  python benchmarks/attention_blocks.py --out benchmarks/results/attention_blocks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tkfac_jax  # noqa: E402
from benchmarks import compare, data, machine, methods, tasks  # noqa: E402

ARMS = ("layer", "head", "none", "adam")
PROJECTIONS = ("query", "key", "value")


class HeadwiseAttention(nn.Module):
  """``nn.MultiHeadDotProductAttention``'s function with each head's query, key and value
  projections a layer of their own (``query_0`` ... ``value_{heads-1}``, ``nn.Dense``)."""

  num_heads: int

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    head_dim = width // self.num_heads

    def project(name):
      return jnp.stack(
          [nn.Dense(head_dim, name=f"{name}_{h}")(x) for h in range(self.num_heads)], axis=-2
      )

    y = nn.dot_product_attention(project("query"), project("key"), project("value"), mask=mask)
    return nn.DenseGeneral(width, axis=(-2, -1), name="out")(y)


FLAX_ATTENTION = nn.MultiHeadDotProductAttention.__name__  # Its modules' names: FLAX_ATTENTION_0.
HEADWISE_ATTENTION = HeadwiseAttention.__name__


def headwise_params(params: dict[str, Any], heads: int) -> dict[str, Any]:
  """The parameters of ``tasks.LanguageModel`` with Flax's attention in the layout of the same
  model with :class:`HeadwiseAttention` (the same numbers)."""
  out = {}
  for name, node in params.items():
    if name.startswith(FLAX_ATTENTION + "_"):
      node = dict(node)
      for projection in PROJECTIONS:
        p = node.pop(projection)
        for h in range(heads):
          node[f"{projection}_{h}"] = {"kernel": p["kernel"][:, h, :], "bias": p["bias"][h]}
      name = name.replace(FLAX_ATTENTION, HEADWISE_ATTENTION, 1)
    out[name] = node
  return out


def projection_layers(params: dict[str, Any]) -> list[str]:
  """Paths of every preconditionable layer of ``params`` except the attention's query, key and
  value projections (for the ``none`` arm's ``layers=``)."""
  paths = []

  def visit(node, path):
    if "kernel" in node or "embedding" in node:
      in_attention = len(path) > 1 and path[-2].startswith(FLAX_ATTENTION + "_")
      if not (in_attention and path[-1] in PROJECTIONS):
        paths.append("/".join(path))
      return
    for key, child in node.items():
      if isinstance(child, dict):
        visit(child, (*path, key))

  visit(params, ())
  return paths


def state_bytes(opt_state) -> int:
  """Bytes of the preconditioner state of the attention's query, key and value layers (one
  block each, or one per head)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]  # Dict keys, fields.
    names = [n for n in names if isinstance(n, str)]
    if "layers" in names and any(n.split("_")[0] in PROJECTIONS for n in names):
      total += leaf.size * leaf.dtype.itemsize
  return total


def train(task: tasks.Task, arm: str, params, split: compare.Split, seed: int, steps: int,
          eval_every: int, evaluate) -> dict[str, Any]:
  """``steps`` steps of one arm; the validation loss every ``eval_every`` steps."""
  if arm == "adam":
    hparams = {"learning_rate": task.defaults["adam"]["learning_rate"]}
    runner = methods.create("adam", task, hparams, jax.random.key(seed))
  else:
    hparams = dict(task.defaults["tkfac"])
    given = {k: hparams[k] for k in ("damping", "kl_clip", "stats_every", "inverse_every")}
    layers = projection_layers(params) if arm == "none" else None
    tx = tkfac_jax.tkfac(hparams["learning_rate"], momentum=methods.MOMENTUM,
                         decay=methods.DECAY, layers=layers, **given)
    runner = methods.OptaxRunner(task, tx, "tkfac", jax.random.key(seed))
  order = compare.batches(len(split.y_train), task.batch_size, seed)
  first = next(order)
  state = runner.start(params, {}, split.x_train[first], split.y_train[first])
  projection_bytes = state_bytes(state[2]) if arm != "adam" else 0
  history = [(0, 0.0, evaluate(state[0], {}, *split.eval)["loss"])]
  seconds = []
  indices = first
  for i in range(steps):
    if i:
      indices = next(order)
    start = time.perf_counter()
    state, _ = runner.step(state, split.x_train[indices], split.y_train[indices], i)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - start)
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      history.append((i + 1, sum(seconds), evaluate(state[0], {}, *split.eval)["loss"]))
  warm = seconds[1:] or seconds
  return {
      "arm": arm, "seed": seed, "history": history,
      "median_step_seconds": statistics.median(warm),
      "mean_step_seconds": sum(warm) / len(warm),
      "projection_state_bytes": projection_bytes,
      "peak_bytes": runner.peak_bytes,
  }


def reached(history, target: float) -> tuple[int | None, float | None]:
  """(steps, seconds) of the first evaluation at or below ``target``."""
  for step, seconds, loss in history:
    if loss <= target:
      return step, seconds
  return None, None


def summarize(runs: list[dict[str, Any]], arms: list[str], targets: list[float]) -> dict:
  """Per arm, medians over seeds: steps and seconds to each target, final loss, step times."""
  summary = {}
  for arm in arms:
    mine = [r for r in runs if r["arm"] == arm]
    to = {}
    for target in targets:
      hits = [reached(r["history"], target) for r in mine]
      to[str(target)] = {
          "steps": [s for s, _ in hits], "seconds": [t for _, t in hits],
          "median_steps": compare.median([s for s, _ in hits]),
          "median_seconds": compare.median([t for _, t in hits]),
      }
    summary[arm] = {
        "to_target": to,
        "final_loss": statistics.median(r["history"][-1][2] for r in mine),
        "median_step_seconds": statistics.median(r["median_step_seconds"] for r in mine),
        "mean_step_seconds": statistics.median(r["mean_step_seconds"] for r in mine),
        "projection_state_bytes": mine[0]["projection_state_bytes"],
        "peak_bytes": mine[0]["peak_bytes"],
    }
  return summary


def report(summary: dict, targets: list[float], seeds: int) -> None:
  print(f"\nmedians over {seeds} seed(s): steps / training seconds to each validation loss")
  print(f"{'arm':6s} " + " ".join(f"{'to ' + str(t):>14s}" for t in targets)
        + f" {'final':>7s} {'step ms':>8s} {'mean ms':>8s} {'qkv state':>10s} {'peak MB':>8s}")
  for arm, s in summary.items():
    cells = [f"{_fmt(c['median_steps'])} / {_fmt(c['median_seconds'], 1)}"
             for c in s["to_target"].values()]
    print(f"{arm:6s} " + " ".join(f"{c:>14s}" for c in cells)
          + f" {s['final_loss']:7.4f} {1e3 * s['median_step_seconds']:8.2f} "
          f"{1e3 * s['mean_step_seconds']:8.2f} {s['projection_state_bytes']:10d} "
          f"{(s['peak_bytes'] or 0) / 2**20:8.2f}")
  if "layer" not in summary:
    return
  ref = summary["layer"]
  for arm, s in summary.items():
    if arm == "layer":
      continue
    cells = ", ".join(
        f"to {t}: steps {_ratio(c['median_steps'], ref['to_target'][t]['median_steps'])}, "
        f"seconds {_ratio(c['median_seconds'], ref['to_target'][t]['median_seconds'])}"
        for t, c in s["to_target"].items())
    print(f"{arm} / layer: mean step {s['mean_step_seconds'] / ref['mean_step_seconds']:.2f}x; "
          + cells)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--eval-every", type=int, default=25)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--targets", default="2.4,2.2,2.1",
                      help="validation losses (nats per character) whose first crossing is timed")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--text-dir", default=None)
  parser.add_argument("--out", default="benchmarks/results/attention_blocks")
  parser.add_argument("--rescore", default=None,
                      help="a JSON this wrote: summarise its runs again (for other --targets)")
  args = parser.parse_args(argv)
  targets = [float(t) for t in args.targets.split(",")]
  if args.rescore:
    result = json.loads(pathlib.Path(args.rescore).read_text())
    if not all(k in result for k in ("runs", "machine", "versions", "settings")):
      raise SystemExit(f"--rescore: {args.rescore} is not a JSON that attention_blocks.py wrote.")
    print(machine.describe(result["machine"], result["versions"]), result["date"])
    arms = list(dict.fromkeys(r["arm"] for r in result["runs"]))
    seeds = len({r["seed"] for r in result["runs"]})
    result["settings"]["targets"] = targets
  else:
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
      raise SystemExit(f"--arms: unknown {unknown or args.arms!r}; choose from {ARMS}.")
    seeds = args.seeds
    result = _train_all(args, arms, targets)
  result["summary"] = summarize(result["runs"], arms, targets)
  report(result["summary"], targets, seeds)
  _plot(result, args.out, targets)
  return result


def _train_all(args, arms: list[str], targets: list[float]) -> dict[str, Any]:
  dataset = data.load_text(args.text_dir)
  task = tasks.create("lm", dataset, args.batch_size)
  base = task.model
  headwise = base.clone(attention=HeadwiseAttention)
  found = machine.header({
      "task": task.description, "corpus": dataset.name, "batch": task.batch_size,
      "steps": args.steps, "seeds": args.seeds, "targets": targets,
      "tkfac": task.defaults["tkfac"], "adam": task.defaults["adam"],
  })
  split = compare.validation_split(dataset, task.held_out_examples, task.train_eval_examples)
  runs = []
  for seed in range(args.seeds):
    x0 = split.x_train[: task.batch_size]
    params = base.init(jax.random.key(seed), x0)["params"]
    params_h = headwise_params(params, base.heads)
    # The headwise model is the same function with the same weights.
    gap = float(jnp.max(jnp.abs(base.apply({"params": params}, x0)
                                - headwise.apply({"params": params_h}, x0))))
    assert gap < 1e-4, f"the headwise model differs from Flax's attention by {gap}"
    for arm in arms:
      model = headwise if arm == "head" else base
      arm_task = dataclasses.replace(task, model=model)
      run = train(arm_task, arm, params_h if arm == "head" else params, split, seed, args.steps,
                  args.eval_every, tasks.make_evaluate(arm_task))
      steps, seconds = reached(run["history"], targets[0])
      print(f"seed {seed} {arm:6s} final loss {run['history'][-1][2]:.4f}, to {targets[0]}: "
            f"{steps} steps, {seconds and round(seconds, 2)} s; median step "
            f"{1e3 * run['median_step_seconds']:.2f} ms, mean {1e3 * run['mean_step_seconds']:.2f} "
            f"ms; projections' state {run['projection_state_bytes']} bytes", flush=True)
      runs.append(run)
  return {**found, "runs": runs}


def _fmt(value, digits: int = 0) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a, b) -> str:
  return "-" if a is None or b is None else f"{a / b:.2f}x"


def _plot(result: dict[str, Any], out: str, targets: list[float]) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = dict(zip(ARMS, ("tab:blue", "tab:orange", "tab:gray", "tab:red")))
  for run in result["runs"]:
    steps, seconds, losses = zip(*run["history"])
    label = run["arm"] if run["seed"] == 0 else None
    axes[0].plot(steps, losses, color=colors[run["arm"]], alpha=0.8, label=label)
    axes[1].plot(seconds, losses, color=colors[run["arm"]], alpha=0.8, label=label)
  for ax, xlabel in zip(axes, ("step", "training seconds")):
    for target in targets:
      ax.axhline(target, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=min(3.5, max(l for r in result["runs"] for *_, l in r["history"])))
    ax.legend()
  fig.suptitle(f"attention projections: one block (layer) or per head, {result['date']}\n"
               f"{machine.describe(result['machine'], result['versions'])}", fontsize=7)
  fig.tight_layout()
  fig.savefig(out.with_suffix(".png"), dpi=120)
  plt.close(fig)
  print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  main()
