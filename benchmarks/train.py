"""Trains a small classifier (MLP or CNN) with TKFAC and with Adam (and optionally K-FAC and SGD).

Every optimizer starts from the same initial parameters and sees the same batches in the same
order (and, for the CNN, the same dropout masks). The script prints the machine and library
versions, then a Markdown table of training time (compilation timed separately), final loss on the
training set and test accuracy::

  python benchmarks/train.py                                  # MLP, TKFAC and Adam, defaults below
  python benchmarks/train.py --model cnn                      # CNN with BatchNorm and dropout
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
MODELS = ("mlp", "cnn")
# Layer sizes per model and data set: the 8x8 digits need far less than Fashion-MNIST.
HIDDEN = {"fashion-mnist": (256, 128), "digits": (64, 32)}
CNN_SIZES = {  # (conv channels, dense hidden width)
    "fashion-mnist": ((16, 32), 128),
    "digits": ((16, 32), 64),
}
EVAL_BATCH = 2000  # Bounds the memory of the CNN's activations in evaluation.

# Defaults per model. The MLP's come from a learning-rate check on Fashion-MNIST (batch 128,
# seed 0), as final full-train-set loss (and test accuracy):
#   3 epochs: Adam lr 3e-4 0.341 (0.864), 1e-3 0.306 (0.869), 3e-3 0.326 (0.858).
#     SGD lr 0.01 0.377 (0.848), 0.03 0.364 (0.846), 0.1 0.369 (0.845).
#     TKFAC damping 1e-3, lr 0.01 / 0.03 / 0.1: 0.352 / 0.540 / 0.332.
#     TKFAC damping 1e-2, lr 0.001 / 0.003 / 0.01 / 0.03 / 0.1: 0.241 / 0.170 (0.893) / 0.220 /
#     0.242 / 0.260; lr 0.003, damping 3e-3 / 3e-2: 0.180 / 0.231; lr 0.01, damping 3e-2 / 1e-1:
#     0.188 / 0.226.
#   10 epochs: TKFAC lr 0.003 damping 1e-2 0.065 (0.892), lr 0.01 damping 1e-2 0.129 (0.884);
#     Adam lr 1e-3 0.214 (0.885), 3e-4 0.245 (0.882), 3e-3 0.224 (0.884).
# Ten epochs of TKFAC and Adam take about 65 s on 2 CPU cores.
#
# The CNN's from the same check on Fashion-MNIST (batch 128, seed 0; BatchNorm's parameters take
# TKFAC's default plain-gradient fallback):
#   1 epoch: TKFAC damping 1e-2, nu 1e-2, lr 0.001 / 0.003 / 0.01 / 0.03 / 0.1: 0.267 / 0.242
#     (0.887) / 0.297 / 0.302 / 0.299; lr 0.003, damping 1e-3 / 1e-1: 0.262 / 0.281; lr 0.003,
#     damping 1e-2, nu 100 / 1000 / none (damping 1e-2 for the convolutions too): 0.243 / 0.249
#     / 0.249; with an Adam fallback for BatchNorm 0.245 (0.894).
#     Adam lr 3e-4 / 1e-3 / 3e-3: 0.363 / 0.304 (0.884) / 0.305. SGD lr 0.01 / 0.03 / 0.1: 0.342 /
#     0.325 (0.866) / 0.354.
#   3 epochs: TKFAC lr 0.003 damping 1e-2, nu 1e-2 0.143 (0.913), nu 100 0.141 (0.907), none
#     0.138 (0.912); lr 0.001 nu 1e-2 0.146 (0.911). Adam lr 1e-3 0.228 (0.899), 3e-3 0.215
#     (0.903), 1e-2 0.345 (0.847). SGD lr 0.03 0.223 (0.895).
# The conv layers' traces delta_l stayed between 15 and 145 in the first 400 steps, so a floor nu
# of 1e-2 does not bind and lambda_l = delta_l / (d_in d_out); on this small CNN the choice of nu
# (or none) moves the result by less than 0.01 in loss. Conv widths 16-32 rather than 32-64 cut a
# TKFAC step from 275 to 100 ms (Adam: 110 to 52 ms), so that three epochs of TKFAC and Adam take
# about 4 minutes on 2 CPU cores.
DEFAULTS = {
    "mlp": dict(
        epochs=10,
        batch_size=128,
        lr_tkfac=0.003,
        damping=1e-2,
        conv_damping_floor=None,  # No convolutions.
        lr_adam=1e-3,
        lr_sgd=0.03,
        momentum=0.9,
    ),
    "cnn": dict(
        epochs=3,
        batch_size=128,
        lr_tkfac=0.003,
        damping=1e-2,  # Dense layers.
        conv_damping_floor=1e-2,  # Conv layers: the paper's trace-based damping.
        lr_adam=3e-3,
        lr_sgd=0.03,
        momentum=0.9,
    ),
}


class MLP(nn.Module):
  """A ReLU multilayer perceptron returning logits."""

  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # The same call as the CNN's; nothing here behaves differently in training.
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """3x3 convolution, BatchNorm, ReLU and 2x2 max-pooling blocks, then a dropout MLP head.

  Takes ``[B, H, W, C]`` images and returns logits. In training (``train=True``) BatchNorm uses
  and updates the batch statistics (the mutable ``batch_stats`` collection) and dropout needs the
  ``dropout`` rng; in evaluation BatchNorm uses its running averages and dropout is off.
  """

  features: Sequence[int]
  hidden: int
  num_classes: int
  dropout_rate: float = 0.25

  @nn.compact
  def __call__(self, x, train: bool = False):
    for channels in self.features:
      # No conv bias: BatchNorm's mean subtraction would cancel it.
      x = nn.Conv(channels, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def create_model(name: str, dataset: data.Dataset) -> tuple[nn.Module, str]:
  """The model called ``name``, sized for ``dataset``, and a one-line description of it."""
  if name == "mlp":
    model = MLP(hidden=HIDDEN[dataset.name], num_classes=dataset.num_classes)
    widths = "-".join(str(w) for w in (dataset.x_train.shape[1], *model.hidden, model.num_classes))
    return model, f"MLP {widths}, relu"
  if name == "cnn":
    features, hidden = CNN_SIZES[dataset.name]
    model = CNN(features=features, hidden=hidden, num_classes=dataset.num_classes)
    convs = " ".join(f"conv3x3-{c} bn relu pool2" for c in features)
    return model, (
        f"CNN {'x'.join(str(d) for d in dataset.image_shape)} {convs} dense-{hidden} relu "
        f"dropout-{model.dropout_rate:g} dense-{model.num_classes}"
    )
  raise ValueError(f"Unknown model {name!r}; choose from {MODELS}.")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch (TKFAC's statistics assume a batch mean)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_optimizer(name: str, args: argparse.Namespace) -> optax.GradientTransformation:
  """The optimizer called ``name``, with its hyperparameters from the command line."""
  if name in ("tkfac", "kfac"):
    # K-FAC runs on the same code path with the same hyperparameters: an ablation of the factors.
    # BatchNorm's scale and bias are not preconditioned; they take the plain gradient (then the
    # same momentum and learning rate).
    return tkfac_jax.tkfac(
        args.lr_tkfac,
        args.damping,
        conv_damping_floor=args.conv_damping_floor,
        momentum=args.momentum,
        curvature=name,
    )
  if name == "adam":
    return optax.adam(args.lr_adam)
  if name == "sgd":
    return optax.sgd(args.lr_sgd, momentum=args.momentum)
  raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")


def learning_rate(name: str, args: argparse.Namespace) -> float:
  """The learning rate the command line gives the optimizer called ``name``."""
  return args.lr_adam if name == "adam" else args.lr_sgd if name == "sgd" else args.lr_tkfac


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, curvature: str | None):
  """One optimisation step; with a ``curvature`` it also captures the curvature statistics.

  ``model_state`` holds the model's other variable collections (``batch_stats`` for the CNN,
  nothing for the MLP); the step returns them updated. Step ``i`` draws its dropout masks from
  ``fold_in(dropout_key, i)``, so every optimizer sees the same masks.
  """

  def loss_fn(params, model_state, x, y, rng):
    logits, new_state = model.apply(
        {"params": params, **model_state},
        x,
        train=True,
        rngs={"dropout": rng},
        mutable=list(model_state),
    )
    return cross_entropy(logits, y), new_state

  def train_step(params, model_state, opt_state, x, y, dropout_key, i):
    rng = jax.random.fold_in(dropout_key, i)
    if curvature is None:
      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, model_state, x, y, rng
      )
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      (loss, model_state), grads, stats = tkfac_jax.value_grad_and_stats(
          loss_fn, has_aux=True, curvature=curvature
      )(params, model_state, x, y, rng)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), model_state, opt_state, loss

  return jax.jit(train_step)


def make_eval_step(model: nn.Module):
  """Summed loss and number of correct predictions on one batch, in evaluation mode."""

  @jax.jit
  def eval_step(params, model_state, x, y):
    logits = model.apply({"params": params, **model_state}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    return loss, jnp.sum(jnp.argmax(logits, -1) == y)

  return eval_step


def evaluate(eval_step, params, model_state, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """Mean loss and accuracy over a whole data set, in batches to bound memory."""
  loss, correct = 0.0, 0
  for start in range(0, len(y), EVAL_BATCH):
    batch_loss, batch_correct = eval_step(
        params, model_state, x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
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
    variables: Any,
    dataset: data.Dataset,
    order: np.ndarray,
    dropout_key: jax.Array,
    args: argparse.Namespace,
) -> dict[str, Any]:
  """Trains ``variables`` with one optimizer over the batches in ``order`` and evaluates them."""
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  tx = create_optimizer(name, args)
  opt_state = tx.init(params)
  curvature = name if name in ("tkfac", "kfac") else None
  step = make_train_step(model, tx, curvature)

  # Compile ahead of time so that the training time below is only the steps themselves.
  start = time.perf_counter()
  x0, y0 = dataset.x_train[order[0]], dataset.y_train[order[0]]
  compiled = step.lower(params, model_state, opt_state, x0, y0, dropout_key, 0).compile()
  compile_seconds = time.perf_counter() - start

  bar = tqdm.tqdm(order, desc=f"{name:>5}", unit="step", disable=True if args.no_progress else None)
  start = time.perf_counter()
  for i, indices in enumerate(bar):
    params, model_state, opt_state, loss = compiled(
        params,
        model_state,
        opt_state,
        dataset.x_train[indices],
        dataset.y_train[indices],
        dropout_key,
        i,
    )
    if i % 50 == 0 and not bar.disable:  # Reading the loss waits for the step: not too often.
      bar.set_postfix(loss=f"{float(loss):.3f}")
  jax.block_until_ready((params, model_state, opt_state))
  seconds = time.perf_counter() - start
  bar.close()

  eval_step = make_eval_step(model)
  train_loss, train_accuracy = evaluate(
      eval_step, params, model_state, dataset.x_train, dataset.y_train
  )
  test_loss, test_accuracy = evaluate(
      eval_step, params, model_state, dataset.x_test, dataset.y_test
  )
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
  rates = ", ".join(f"{name} lr {lr:g}" for name, lr in settings["learning_rates"].items())
  floor = settings["conv_damping_floor"]
  conv_damping = "" if floor is None else f" (conv layers: max(delta, {floor:g}) / (d_in d_out))"
  return "\n".join([
      f"machine: {machine['cpu']} ({machine['cpu_count']} cores), jax device {machine['device']} | "
      f"{versions}",
      f"data: {settings['dataset']}, {settings['train_examples']} train / "
      f"{settings['test_examples']} test examples | model: {settings['architecture']}",
      f"settings: {settings['steps']} steps ({settings['epochs']:.3g} epochs) of batch "
      f"{settings['batch_size']}, seed {settings['seed']} | {rates} | TKFAC/K-FAC damping "
      f"{settings['damping']:g}{conv_damping}, momentum {settings['momentum']:g}",
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


def floor_or_none(text: str) -> float | None:
  """Parses ``--conv-damping-floor``: a positive float, or ``none`` for one damping everywhere."""
  if text.strip().lower() == "none":
    return None
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
  return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line; the defaults of the training options depend on ``--model``."""
  models = argparse.ArgumentParser(add_help=False)
  models.add_argument("--model", choices=MODELS, default="mlp", help="what to train (default: mlp)")
  model = models.parse_known_args(argv)[0].model
  table = "\n".join(
      f"  {name}: " + ", ".join(f"{k}={v}" for k, v in defaults.items())
      for name, defaults in DEFAULTS.items()
  )
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      parents=[models],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"defaults of the training options per --model:\n{table}",
  )
  p.add_argument(
      "--optimizers", type=optimizer_list, default="tkfac,adam",
      help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: tkfac,adam)",
  )
  p.add_argument("--epochs", type=positive_int, help="over the data")
  p.add_argument("--steps", type=positive_int, help="train this many steps (overrides --epochs)")
  p.add_argument("--batch-size", type=positive_int, help="examples")
  p.add_argument("--lr-tkfac", type=float, help="also K-FAC's")
  p.add_argument("--damping", type=float, help="TKFAC's and K-FAC's (dense layers)")
  p.add_argument(
      "--conv-damping-floor", type=floor_or_none,
      help="nu of TKFAC's damping for conv layers, max(delta, nu) / (d_in d_out); 'none': "
      "--damping for them too",
  )
  p.add_argument("--lr-adam", type=float, help="Adam's")
  p.add_argument("--lr-sgd", type=float, help="SGD's")
  p.add_argument("--momentum", type=float, help="TKFAC's, K-FAC's and SGD's")
  p.add_argument(
      "--seed", type=int, default=0,
      help="seeds the initial parameters, batches and dropout (default: 0)",
  )
  p.add_argument(
      "--data-dir",
      help=f"directory of the Fashion-MNIST *-ubyte.gz files; if not given, ${data.DATA_DIR_ENV}, "
      f"then {data.DEFAULT_DATA_DIR}",
  )
  p.add_argument("--json", type=pathlib.Path, help="write the header and results to this file")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.set_defaults(**DEFAULTS[model])
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
  model, architecture = create_model(args.model, dataset)
  if args.model == "cnn":
    dataset = dataset.as_images()
  settings = {
      "dataset": dataset.name,
      "train_examples": len(dataset.y_train),
      "test_examples": len(dataset.y_test),
      "model": args.model,
      "architecture": architecture,
      "steps": steps,
      "epochs": steps / per_epoch,
      "batch_size": args.batch_size,
      "seed": args.seed,
      "optimizers": args.optimizers,
      "learning_rates": {name: learning_rate(name, args) for name in args.optimizers},
      "damping": args.damping,
      "conv_damping_floor": args.conv_damping_floor,
      "momentum": args.momentum,
  }
  machine = machine_info()
  print(header(machine, settings))

  variables = model.init(jax.random.key(args.seed), dataset.x_train[:1])
  # Dropout masks: a stream of their own, the same for every optimizer.
  dropout_key = jax.random.fold_in(jax.random.key(args.seed), 1)
  order = batch_order(len(dataset.y_train), args.batch_size, steps, args.seed)
  results = [
      run_one(name, model, variables, dataset, order, dropout_key, args)
      for name in args.optimizers
  ]

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
