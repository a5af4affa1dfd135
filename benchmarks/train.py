"""Trains a small MLP classifier with TKFAC and with Adam (and optionally K-FAC and SGD).

Every optimizer starts from the same initial parameters and sees the same batches in the same
order. The script prints the machine and library versions, then a Markdown table of training time
(compilation timed separately), final loss on the training set and test accuracy::

  python benchmarks/train.py                                  # TKFAC and Adam, defaults below
  python benchmarks/train.py --optimizers tkfac,kfac,adam,sgd --json results.json

The data are Fashion-MNIST when the Debian package ``dataset-fashion-mnist`` is installed (or
``--data-dir`` points at its four ``*-ubyte.gz`` files), and scikit-learn's 8x8 digits otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

if __package__ in (None, ""):  # Run as `python benchmarks/train.py`: make `benchmarks` importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tkfac_jax  # noqa: E402
from benchmarks import data  # noqa: E402

OPTIMIZERS = ("tkfac", "kfac", "adam", "sgd")
# Hidden layer widths per data set: the 8x8 digits need far less than Fashion-MNIST.
HIDDEN = {"fashion-mnist": (256, 128), "digits": (64, 32)}
EVAL_BATCH = 10000

# Defaults from a learning-rate check on Fashion-MNIST (batch 128, seed 0), as final
# full-train-set loss (and test accuracy):
#   3 epochs: Adam lr 3e-4 0.341 (0.864), 1e-3 0.306 (0.869), 3e-3 0.326 (0.858).
#     SGD lr 0.01 0.377 (0.848), 0.03 0.364 (0.846), 0.1 0.369 (0.845).
#     TKFAC damping 1e-3, lr 0.01 / 0.03 / 0.1: 0.352 / 0.540 / 0.332.
#     TKFAC damping 1e-2, lr 0.001 / 0.003 / 0.01 / 0.03 / 0.1: 0.241 / 0.170 (0.893) / 0.220 /
#     0.242 / 0.260; lr 0.003, damping 3e-3 / 3e-2: 0.180 / 0.231; lr 0.01, damping 3e-2 / 1e-1:
#     0.188 / 0.226.
#   10 epochs: TKFAC lr 0.003 damping 1e-2 0.065 (0.892), lr 0.01 damping 1e-2 0.129 (0.884);
#     Adam lr 1e-3 0.214 (0.885), 3e-4 0.245 (0.882), 3e-3 0.224 (0.884).
# Ten epochs of TKFAC and Adam take about 65 s on 2 CPU cores.
DEFAULTS = dict(
    epochs=10,
    batch_size=128,
    lr_tkfac=0.003,
    damping=1e-2,
    lr_adam=1e-3,
    lr_sgd=0.03,
    momentum=0.9,
)


class MLP(nn.Module):
  """A ReLU multilayer perceptron returning logits."""

  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch (TKFAC's statistics assume a batch mean)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_optimizer(name: str, args: argparse.Namespace) -> optax.GradientTransformation:
  """The optimizer called ``name``, with its hyperparameters from the command line."""
  if name in ("tkfac", "kfac"):
    # K-FAC runs on the same code path with the same hyperparameters: an ablation of the factors.
    return tkfac_jax.tkfac(args.lr_tkfac, args.damping, momentum=args.momentum, curvature=name)
  if name == "adam":
    return optax.adam(args.lr_adam)
  if name == "sgd":
    return optax.sgd(args.lr_sgd, momentum=args.momentum)
  raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")


def learning_rate(name: str, args: argparse.Namespace) -> float:
  """The learning rate the command line gives the optimizer called ``name``."""
  return args.lr_adam if name == "adam" else args.lr_sgd if name == "sgd" else args.lr_tkfac


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, curvature: str | None):
  """One optimisation step; with a ``curvature`` it also captures the curvature statistics."""

  def loss_fn(params, x, y):
    return cross_entropy(model.apply({"params": params}, x), y)

  def train_step(params, opt_state, x, y):
    if curvature is None:
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      loss, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn, curvature=curvature)(
          params, x, y
      )
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(train_step)


def make_eval_step(model: nn.Module):
  """Summed loss and number of correct predictions on one batch."""

  @jax.jit
  def eval_step(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    return loss, jnp.sum(jnp.argmax(logits, -1) == y)

  return eval_step


def evaluate(eval_step, params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """Mean loss and accuracy over a whole data set, in batches to bound memory."""
  loss, correct = 0.0, 0
  for start in range(0, len(y), EVAL_BATCH):
    batch_loss, batch_correct = eval_step(
        params, x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
    )
    loss += float(batch_loss)
    correct += int(batch_correct)
  return loss / len(y), correct / len(y)


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """``[steps, batch_size]`` example indices: reshuffled every epoch, last partial batch dropped."""
  rng = np.random.default_rng(seed)
  per_epoch = num_examples // batch_size
  epochs = -(-steps // per_epoch)
  order = [
      rng.permutation(num_examples)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
      for _ in range(epochs)
  ]
  return np.concatenate(order)[:steps]


def run_one(
    name: str,
    model: nn.Module,
    params: Any,
    dataset: data.Dataset,
    order: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
  """Trains ``params`` with one optimizer over the batches in ``order`` and evaluates the result."""
  tx = create_optimizer(name, args)
  opt_state = tx.init(params)
  curvature = name if name in ("tkfac", "kfac") else None
  step = make_train_step(model, tx, curvature)

  # Compile ahead of time so that the training time below is only the steps themselves.
  start = time.perf_counter()
  x0, y0 = dataset.x_train[order[0]], dataset.y_train[order[0]]
  compiled = step.lower(params, opt_state, x0, y0).compile()
  compile_seconds = time.perf_counter() - start

  bar = tqdm.tqdm(order, desc=f"{name:>5}", unit="step", disable=True if args.no_progress else None)
  start = time.perf_counter()
  for i, indices in enumerate(bar):
    params, opt_state, loss = compiled(
        params, opt_state, dataset.x_train[indices], dataset.y_train[indices]
    )
    if i % 50 == 0 and not bar.disable:  # Reading the loss waits for the step: not too often.
      bar.set_postfix(loss=f"{float(loss):.3f}")
  jax.block_until_ready((params, opt_state))
  seconds = time.perf_counter() - start
  bar.close()

  eval_step = make_eval_step(model)
  train_loss, train_accuracy = evaluate(eval_step, params, dataset.x_train, dataset.y_train)
  test_loss, test_accuracy = evaluate(eval_step, params, dataset.x_test, dataset.y_test)
  return {
      "optimizer": name,
      "learning_rate": learning_rate(name, args),
      "steps": len(order),
      "seconds": seconds,
      "compile_seconds": compile_seconds,
      "train_loss": train_loss,
      "train_accuracy": train_accuracy,
      "test_loss": test_loss,
      "test_accuracy": test_accuracy,
  }


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  """The machine and the versions of the libraries, for the header and the JSON."""
  return {
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "device": str(jax.devices()[0].device_kind),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "tkfac_jax": tkfac_jax.__version__,
  }


def header(machine: dict[str, Any], settings: dict[str, Any]) -> str:
  """Three lines saying what ran where: machine and versions, data and model, settings."""
  libraries = ("python", "jax", "flax", "optax", "tkfac_jax")
  versions = ", ".join(f"{name} {machine[name]}" for name in libraries)
  widths = "-".join(str(w) for w in settings["layers"])
  rates = ", ".join(f"{name} lr {lr:g}" for name, lr in settings["learning_rates"].items())
  return "\n".join([
      f"machine: {machine['cpu']} ({machine['cpu_count']} cores), jax device {machine['device']} | "
      f"{versions}",
      f"data: {settings['dataset']}, {settings['train_examples']} train / "
      f"{settings['test_examples']} test examples | model: MLP {widths}, relu",
      f"settings: {settings['steps']} steps ({settings['epochs']:.3g} epochs) of batch "
      f"{settings['batch_size']}, seed {settings['seed']} | {rates} | TKFAC/K-FAC damping "
      f"{settings['damping']:g}, momentum {settings['momentum']:g}",
  ])


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
  """One row per optimizer: steps, training and compile seconds, train loss, test accuracy."""
  lines = [
      "| optimizer | steps | seconds | compile seconds | train loss | test accuracy |",
      "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in results:
    lines.append(
        f"| {r['optimizer']} | {r['steps']} | {r['seconds']:.1f} | {r['compile_seconds']:.1f} "
        f"| {r['train_loss']:.4f} | {r['test_accuracy']:.4f} |"
    )
  return "\n".join(lines)


def optimizer_list(text: str) -> list[str]:
  """Parses ``--optimizers``: comma-separated names from :data:`OPTIMIZERS`."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in OPTIMIZERS]
  if not names or unknown:
    raise argparse.ArgumentTypeError(
        f"expected a comma-separated list from {','.join(OPTIMIZERS)}, got {text!r}"
    )
  return names


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line; defaults from :data:`DEFAULTS`."""
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument(
      "--optimizers", type=optimizer_list, default="tkfac,adam",
      help=f"comma-separated, from {','.join(OPTIMIZERS)}",
  )
  p.add_argument("--epochs", type=positive_int, default=DEFAULTS["epochs"], help="over the data")
  p.add_argument("--steps", type=positive_int, help="train this many steps (overrides --epochs)")
  p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"], help="examples")
  p.add_argument("--lr-tkfac", type=float, default=DEFAULTS["lr_tkfac"], help="also K-FAC's")
  p.add_argument("--damping", type=float, default=DEFAULTS["damping"], help="TKFAC's and K-FAC's")
  p.add_argument("--lr-adam", type=float, default=DEFAULTS["lr_adam"], help="Adam's")
  p.add_argument("--lr-sgd", type=float, default=DEFAULTS["lr_sgd"], help="SGD's")
  p.add_argument(
      "--momentum", type=float, default=DEFAULTS["momentum"], help="TKFAC's, K-FAC's and SGD's"
  )
  p.add_argument("--seed", type=int, default=0, help="seeds the initial parameters and batches")
  p.add_argument(
      "--data-dir",
      help=f"directory of the Fashion-MNIST *-ubyte.gz files; if not given, ${data.DATA_DIR_ENV}, "
      f"then {data.DEFAULT_DATA_DIR}",
  )
  p.add_argument("--json", type=pathlib.Path, help="write the header and results to this file")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs every requested optimizer and reports; returns what ``--json`` writes."""
  start = time.perf_counter()
  args = parse_args(argv)
  dataset = data.load(args.data_dir)
  per_epoch = len(dataset.y_train) // args.batch_size
  if per_epoch == 0:
    raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(dataset.y_train)} examples.")
  steps = args.steps if args.steps is not None else args.epochs * per_epoch
  model = MLP(hidden=HIDDEN[dataset.name], num_classes=dataset.num_classes)
  settings = {
      "dataset": dataset.name,
      "train_examples": len(dataset.y_train),
      "test_examples": len(dataset.y_test),
      "layers": [dataset.x_train.shape[1], *model.hidden, model.num_classes],
      "steps": steps,
      "epochs": steps / per_epoch,
      "batch_size": args.batch_size,
      "seed": args.seed,
      "optimizers": args.optimizers,
      "learning_rates": {name: learning_rate(name, args) for name in args.optimizers},
      "damping": args.damping,
      "momentum": args.momentum,
  }
  machine = machine_info()
  print(header(machine, settings))

  params = model.init(jax.random.key(args.seed), dataset.x_train[:1])["params"]
  order = batch_order(len(dataset.y_train), args.batch_size, steps, args.seed)
  results = [run_one(name, model, params, dataset, order, args) for name in args.optimizers]

  print()
  print(markdown_table(results))
  total = time.perf_counter() - start
  print(f"\ntotal {total:.1f} s")
  report = {"machine": machine, "settings": settings, "results": results, "total_seconds": total}
  if args.json is not None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
