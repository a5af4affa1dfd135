"""The measurements behind ``tkfac(...)``'s defaults: damping, KL clipping and weight decay.

A default is good when it works across the learning rates a user is likely to try, not only at
the best one. So every (damping, kl_clip) pair is run at every learning rate of a grid, and
scored on a validation split carved from the training set (the test set is never looked at):

  python benchmarks/defaults.py                       # both sweeps, writes defaults.json / .md / .png
  python benchmarks/defaults.py --epochs 1 --lrs 0.01,0.1 --dampings 1e-2 --kl-clips none,1e-3

Sweep 1 crosses learning rates, dampings and KL clips; sweep 2 runs weight decays at the
learning rates of sweep 1, with the library's default damping and KL clip. Runs are
deterministic (fixed initialisation and batch order), so one seed per cell: ``--seeds`` adds
more.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

if __package__ in (None, ""):  # Run as `python benchmarks/defaults.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tkfac_jax  # noqa: E402
from benchmarks import data, machine  # noqa: E402

VALIDATION = 10_000  # Examples held out of the training set to score settings on (a fifth of
# the digits fallback, which has 1500).


def validation_size(num_train: int) -> int:
  return min(VALIDATION, num_train // 5)
HIDDEN = {"fashion-mnist": (256, 128), "digits": (64, 32)}


class MLP(nn.Module):
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def _float_or_none(text: str) -> float | None:
  return None if text.lower() == "none" else float(text)


def _floats(text: str) -> list[float]:
  return [float(t) for t in text.split(",")]


def _floats_or_none(text: str) -> list[float | None]:
  return [_float_or_none(t) for t in text.split(",")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--epochs", type=float, default=2.0, help="epochs of sweep 1 (default 2)")
  parser.add_argument("--wd-epochs", type=float, default=6.0, help="epochs of sweep 2 (6)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--lrs", type=_floats, default=[0.003, 0.01, 0.03, 0.1])
  parser.add_argument("--dampings", type=_floats, default=[1e-3, 1e-2, 1e-1])
  parser.add_argument("--kl-clips", type=_floats_or_none, default=[None, 1e-3, 1e-2])
  parser.add_argument("--weight-decays", type=_floats_or_none, default=[None, 1e-5, 1e-4, 1e-3])
  parser.add_argument("--wd-lrs", type=_floats, default=None, help="default: --lrs")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--skip-wd", action="store_true", help="run sweep 1 only")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", default="defaults", help="path prefix of the .json/.md/.png")
  return parser.parse_args(argv)


def make_run(dataset: data.Dataset, batch_size: int):
  """A function that trains one setting and returns its validation and training-split scores."""
  x_all, y_all = dataset.x_train, dataset.y_train
  n_val = validation_size(len(y_all))
  x_train, y_train = x_all[:-n_val], y_all[:-n_val]
  x_val, y_val = x_all[-n_val:], y_all[-n_val:]
  model = MLP(HIDDEN[dataset.name], dataset.num_classes)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def scores(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  def run(settings: dict[str, Any], epochs: float, seed: int) -> dict[str, Any]:
    tx = tkfac_jax.tkfac(
        settings["lr"],
        settings["damping"],
        kl_clip=settings["kl_clip"],
        weight_decay=settings["weight_decay"],
    )

    @jax.jit
    def step(params, opt_state, x, y):
      loss, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.key(seed), x_train[:1])["params"]
    opt_state = tx.init(params)
    per_epoch = len(y_train) // batch_size
    steps = int(round(epochs * per_epoch))
    rng = np.random.default_rng(seed)
    order = np.concatenate([
        rng.permutation(len(y_train))[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(int(np.ceil(epochs)))
    ])[:steps]
    start = time.perf_counter()
    for idx in order:
      params, opt_state, _ = step(params, opt_state, x_train[idx], y_train[idx])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    val_loss, val_acc = (float(v) for v in scores(params, x_val, y_val))
    train_loss, _ = (float(v) for v in scores(params, x_train, y_train))
    finite = bool(np.isfinite(val_loss) and np.isfinite(train_loss))
    return {
        **settings,
        "seed": seed,
        "steps": steps,
        "seconds": seconds,
        "val_loss": val_loss if finite else None,
        "val_acc": val_acc if finite else None,
        "train_loss": train_loss if finite else None,
        "kl_scale_last": float(tkfac_jax.diagnostics(opt_state)["kl_scale"]),
    }

  return run


def _fmt(x: float | None) -> str:
  return "none" if x is None else f"{x:g}"


def _cell(rows: list[dict[str, Any]]) -> str:
  losses = [r["val_loss"] for r in rows]
  if any(v is None for v in losses):
    return "diverged"
  return f"{np.median(losses):.4f}"


def summarise(results: list[dict[str, Any]], keys: Sequence[str], lrs: Sequence[float]) -> str:
  """A Markdown table: one row per setting of ``keys``, validation loss per learning rate."""
  settings = sorted(
      {tuple(r[k] for k in keys) for r in results},
      key=lambda t: tuple(-1 if v is None else v for v in t),
  )
  head = " | ".join(keys)
  lines = [
      f"| {head} | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | median over lr | worst |",
      "|" + " --- |" * len(keys) + " ---: |" * (len(lrs) + 2),
  ]
  for setting in settings:
    cells, per_lr = [], []
    for lr in lrs:
      rows = [r for r in results if tuple(r[k] for k in keys) == setting and r["lr"] == lr]
      cells.append(_cell(rows))
      per_lr.append(np.inf if cells[-1] == "diverged" else float(cells[-1]))
    median, worst = np.median(per_lr), max(per_lr)
    lines.append(
        "| " + " | ".join(_fmt(v) for v in setting) + " | " + " | ".join(cells)
        + f" | {median:.4f} | {worst:.4f} |"
    )
  return "\n".join(lines)


def plot(results, lrs, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  sweep1 = [r for r in results if r["sweep"] == 1]
  sweep2 = [r for r in results if r["sweep"] == 2]
  fig, axes = plt.subplots(1, 2 if sweep2 else 1, figsize=(12 if sweep2 else 6.5, 4.5), squeeze=False)
  ax = axes[0, 0]
  for damping, kl in sorted({(r["damping"], r["kl_clip"]) for r in sweep1}, key=str):
    ys = []
    for lr in lrs:
      rows = [r for r in sweep1 if (r["damping"], r["kl_clip"], r["lr"]) == (damping, kl, lr)]
      vals = [r["val_loss"] for r in rows]
      ys.append(np.nan if not vals or None in vals else np.median(vals))
    ax.plot(lrs, ys, marker="o", label=f"damping {damping:g}, kl_clip {_fmt(kl)}")
  ax.set(xscale="log", xlabel="learning rate", ylabel="validation loss", title="damping x KL clip")
  ax.legend(fontsize=7)
  if sweep2:
    ax = axes[0, 1]
    for wd in sorted({r["weight_decay"] for r in sweep2}, key=lambda v: -1 if v is None else v):
      ys = [
          np.median([r["val_loss"] for r in sweep2 if r["weight_decay"] == wd and r["lr"] == lr] or [np.nan])
          for lr in sorted({r["lr"] for r in sweep2})
      ]
      ax.plot(sorted({r["lr"] for r in sweep2}), ys, marker="o", label=f"weight_decay {_fmt(wd)}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="validation loss", title="weight decay")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  dataset = data.load(args.data_dir)
  run = make_run(dataset, args.batch_size)
  where, found = machine.machine_info(), machine.versions()
  defaults = {"damping": 1e-3, "kl_clip": 1e-3, "weight_decay": None}
  # What the library's own tkfac() defaults are, read from its signature.
  import inspect  # pylint: disable=import-outside-toplevel

  params = inspect.signature(tkfac_jax.tkfac).parameters
  defaults = {k: params[k].default for k in defaults}
  model = "-".join(str(w) for w in (dataset.x_train.shape[1], *HIDDEN[dataset.name], dataset.num_classes))
  print(
      f"{machine.describe(where, found)}\n"
      f"data: {dataset.name}, {len(dataset.y_train) - validation_size(len(dataset.y_train))} train"
      f" / {validation_size(len(dataset.y_train))} validation"
      f" | model: MLP {model} relu, softmax cross-entropy, batch {args.batch_size}\n"
      f"tkfac(lr, damping, kl_clip=, weight_decay=), momentum 0.9, statistics every step, "
      f"inverses every 10 | library defaults: {defaults}"
  )
  grid1 = [
      {"sweep": 1, "lr": lr, "damping": d, "kl_clip": kl, "weight_decay": None}
      for d, kl, lr in itertools.product(args.dampings, args.kl_clips, args.lrs)
  ]
  grid2 = [] if args.skip_wd else [
      {"sweep": 2, "lr": lr, "damping": defaults["damping"], "kl_clip": defaults["kl_clip"],
       "weight_decay": wd}
      for wd, lr in itertools.product(args.weight_decays, args.wd_lrs or args.lrs)
  ]
  jobs = [(s, seed) for s in grid1 + grid2 for seed in range(args.seeds)]
  results = []
  for settings, seed in tqdm.tqdm(jobs, desc="settings", disable=None):
    epochs = args.epochs if settings["sweep"] == 1 else args.wd_epochs
    results.append(run(settings, epochs, seed))
  out = {
      "date": machine.today(),
      "machine": where,
      "versions": found,
      "dataset": dataset.name,
      "settings": vars(args),
      "library_defaults": defaults,
      "results": results,
  }
  sweep1 = [r for r in results if r["sweep"] == 1]
  sweep2 = [r for r in results if r["sweep"] == 2]
  tables = [
      f"Sweep 1: validation loss after {args.epochs:g} epochs\n\n"
      + summarise(sweep1, ("damping", "kl_clip"), args.lrs)
  ]
  if sweep2:
    tables.append(
        f"Sweep 2: validation loss after {args.wd_epochs:g} epochs, damping "
        f"{_fmt(defaults['damping'])}, kl_clip {_fmt(defaults['kl_clip'])}\n\n"
        + summarise(sweep2, ("weight_decay",), args.wd_lrs or args.lrs)
    )
  text = "\n\n".join(tables)
  print(text)
  pathlib.Path(args.out + ".json").write_text(json.dumps(out, indent=1))
  pathlib.Path(args.out + ".md").write_text(text + "\n")
  plot(results, args.lrs, args.out + ".png")
  print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png")
  return out


if __name__ == "__main__":
  main()
