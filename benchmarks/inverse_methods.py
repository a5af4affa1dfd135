"""How to invert the damped factors: Cholesky, eigh, LU, or matmul-only Newton-Schulz.

For each factor size, times (median over repeats, each inside a jitted function, to
``block_until_ready``) the candidate ways of computing the inverse of a damped factor (condition
number 100) that has drifted since the last refresh as much as the factors of an MLP on
Fashion-MNIST drift over 10 steps:

- ``cholesky``: Cholesky, a triangular solve against the identity and one product (the library's
  method);
- ``eigh``: the eigendecomposition (what an eigenbasis method such as TEKFAC would need);
- ``lu``: ``jnp.linalg.inv``;
- ``newton_schulz_k``: ``k`` plain Newton-Schulz steps ``X <- X (2I - A X)`` started from the
  previous inverse: matmuls only, and the residual ``|I - A X|_2`` it reaches on these synthetic
  factors (which drift far more than real ones);
- ``library_newton_schulz``: the library's Newton-Schulz, from the previous inverse scaled by the
  largest eigenvalue of ``A X_prev``, until its residual is below the tolerance (or its step limit).

Then, on real factors (an MLP trained on the benchmark's data with the default damping and decay),
how far each factor moves between two refreshes: ``|I - A_new X_prev|_2``, which a Newton-Schulz
warm start needs well below 1.

Each case runs in a subprocess twice: with the environment as it is, and with
``OPENBLAS_NUM_THREADS=1`` (jaxlib's CPU LAPACK runs on an OpenBLAS thread pool that contends with
XLA's threads). With ``--busy`` a third process keeps the cores busy with XLA matmuls, as a
training step does. Prints the machine, the settings and a table; writes JSON and a plot::

  python benchmarks/inverse_methods.py --out results/inverse_methods
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Sequence

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

METHODS = ("cholesky", "eigh", "lu", "newton_schulz_1", "newton_schulz_2", "newton_schulz_3",
           "library_newton_schulz")


def newton_schulz_inverse(matrix, start, iterations: int):
  """``iterations`` Newton-Schulz steps ``X <- X (2I - A X)`` from ``start``: matrix products
  only. The residual ``E = I - A X`` squares at each step, so it converges only from a start with
  ``|E|_2 < 1``."""
  import jax
  import jax.numpy as jnp

  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  highest = jax.lax.Precision.HIGHEST

  def step(_, x):
    return jnp.matmul(x, 2 * eye - jnp.matmul(matrix, x, precision=highest), precision=highest)

  x = jax.lax.fori_loop(0, iterations, step, start)
  return 0.5 * (x + x.T)


def _factors(n: int, seed: int = 0):
  """A damped factor before and after a drift like a real one's between two refreshes.

  Condition number 100 (the MLP's damped factors had 10 to 75), and ``A_new = R A_old R`` with
  ``R = I + 0.15 S`` (``S`` symmetric, ``|S|_2 = 1``), so that ``cond(A_new A_old^-1)`` is about
  1.8, the median measured on the MLP's factors (``warm_start_residuals``).
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  old = (q * np.logspace(0, -2, n)) @ q.T
  s = rng.standard_normal((n, n))
  s = s + s.T
  r = np.eye(n) + 0.15 * s / np.linalg.norm(s, 2)
  new = r @ old @ r
  return old.astype(np.float32), new.astype(np.float32)


def _measure(n: int, repeats: int) -> dict:
  """Runs in the subprocess: times every method on one size."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tkfac_jax import _inverses

  old, new = _factors(n)
  old, new = jnp.asarray(old), jnp.asarray(new)
  previous = jnp.asarray(np.linalg.inv(np.asarray(old, np.float64)), jnp.float32)

  def eigh_inverse(a):
    w, v = jnp.linalg.eigh(a)
    return (v / w) @ v.T

  fns = {
      "cholesky": lambda a, x0: _inverses.cholesky_inverse(a)[0],
      "eigh": lambda a, x0: eigh_inverse(a),
      "lu": lambda a, x0: jnp.linalg.inv(a),
  }
  fns["library_newton_schulz"] = lambda a, x0: _inverses.newton_schulz_inverse(a, x0)[0]
  for k in (1, 2, 3):
    fns[f"newton_schulz_{k}"] = (
        lambda a, x0, k=k: newton_schulz_inverse(a, x0, k)
    )
  exact = np.linalg.inv(np.asarray(new, np.float64))
  out = {}
  for name, fn in fns.items():
    fn = jax.jit(fn)
    x = jax.block_until_ready(fn(new, previous))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(new, previous))
      times.append(time.perf_counter() - start)
    residual = np.linalg.norm(np.eye(n) - np.asarray(new, np.float64) @ np.asarray(x, np.float64), 2)
    error = np.linalg.norm(np.asarray(x, np.float64) - exact) / np.linalg.norm(exact)
    out[name] = {
        "median_seconds": statistics.median(times),
        "max_seconds": max(times),
        "residual": float(residual),
        "relative_error": float(error),
    }
  start_residual = np.linalg.norm(np.eye(n) - np.asarray(new, np.float64) @ np.asarray(previous, np.float64), 2)
  return {"methods": out, "start_residual": float(start_residual)}


def warm_start_residuals(steps: int, batch_size: int, inverse_every: int = 10) -> dict:
  """``|I - A_new X_prev|_2`` at every refresh of a TKFAC run (MLP 784-256-128-10, the
  benchmark's data, default damping and decay): how far each damped factor has moved from the
  inverse in use, which is what a Newton-Schulz warm start would start from."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import tkfac_jax
  from benchmarks import data
  from tkfac_jax import _inverses
  from tkfac_jax import _transform

  dataset = data.load()
  x_train = np.asarray(dataset.x_train, np.float32).reshape(len(dataset.x_train), -1)
  y_train = np.asarray(dataset.y_train)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(256)(x))
      x = nn.relu(nn.Dense(128)(x))
      return nn.Dense(dataset.num_classes)(x)

  model = MLP()
  params = model.init(jax.random.key(0), x_train[:1])["params"]
  damping = 1e-2

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  tx = tkfac_jax.tkfac(0.01, damping, stats_every=1, inverse_every=inverse_every, stagger=False)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    _, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def residuals(opt_state):
    (state,) = _transform.find_states(opt_state)
    out = {}
    for name, layer in state.layers.items():
      factors = _inverses.damped_factors(layer.statistics, damping, "tkfac", False)
      for key, a, x in zip(("phi", "psi"), factors, layer.inverses):
        _, converged = _inverses.newton_schulz_inverse(a, x)
        out[f"{name}.{key}"] = (jnp.linalg.norm(jnp.eye(a.shape[0]) - a @ x, 2), converged)
    return out

  rng = np.random.default_rng(0)
  found: dict[str, list[float]] = {}
  converged: dict[str, list[bool]] = {}
  for i in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])
    if (i + 1) % inverse_every == 0:  # Statistics folded in up to the next refresh.
      for key, (value, ok) in residuals(opt_state).items():
        found.setdefault(key, []).append(float(value))
        converged.setdefault(key, []).append(bool(ok))
  return {key: {"min": min(v), "median": statistics.median(v), "max": max(v),
                "newton_schulz_converged": sum(converged[key]) / len(v)}
          for key, v in found.items()}


def _busy_loop():
  """Keeps the cores busy with XLA matmuls until killed."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((1024, 1024))
  f = jax.jit(lambda x: jnp.tanh(x @ x) * 1e-3)
  while True:
    x = jax.block_until_ready(f(x))


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="129,257,785,1025")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--busy", action="store_true", help="also time with the cores kept busy")
  parser.add_argument("--one-blas-thread-too", type=int, default=1,
                      help="1: also time every case with OPENBLAS_NUM_THREADS=1; 0: only as is")
  parser.add_argument("--out", default="results/inverse_methods", help="path prefix for .json/.png")
  parser.add_argument("--drift-steps", type=int, default=300,
                      help="steps of the MLP run whose factors' drift is measured (0: skip)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_measure(int(args.child), args.repeats)))
    return {}

  from benchmarks import machine

  sizes = [int(s) for s in args.sizes.split(",")]
  header = machine.header({"sizes": sizes, "repeats": args.repeats, "busy": args.busy})
  environments = {"default": dict(os.environ)}
  if args.one_blas_thread_too:
    environments["OPENBLAS_NUM_THREADS=1"] = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
  loads = ["idle", "busy"] if args.busy else ["idle"]
  results: dict = {}
  for load in loads:
    busy = None
    if load == "busy":
      busy = subprocess.Popen([sys.executable, "-c", "from benchmarks.inverse_methods import "
                               "_busy_loop; _busy_loop()"], cwd=pathlib.Path(__file__).parents[1])
      time.sleep(3)
    try:
      for env_name, env in environments.items():
        for n in sizes:
          proc = subprocess.run(
              [sys.executable, "-m", "benchmarks.inverse_methods", "--child", str(n),
               "--repeats", str(args.repeats)],
              env=env, capture_output=True, text=True, check=True,
              cwd=pathlib.Path(__file__).parents[1],
          )
          results.setdefault(load, {}).setdefault(env_name, {})[n] = json.loads(
              proc.stdout.strip().splitlines()[-1])
    finally:
      if busy is not None:
        busy.kill()
        busy.wait()

  for load, by_env in results.items():
    for env_name, by_size in by_env.items():
      print(f"\n{load}, {env_name}: median ms (max ms) [residual |I - A X|_2]")
      print("| n | start residual | " + " | ".join(METHODS) + " |")
      print("| ---: | ---: |" + " ---: |" * len(METHODS))
      for n, r in by_size.items():
        cells = [f"{1e3 * r['methods'][m]['median_seconds']:.2f} "
                 f"({1e3 * r['methods'][m]['max_seconds']:.2f}) "
                 f"[{r['methods'][m]['residual']:.1e}]" for m in METHODS]
        print(f"| {n} | {r['start_residual']:.2f} | " + " | ".join(cells) + " |")

  drift = {}
  if args.drift_steps:
    drift = warm_start_residuals(args.drift_steps, 128)
    print("\nHow far a factor moves between refreshes, |I - A_new X_prev|_2 (plain Newton-Schulz "
          "from X_prev converges only below 1), and how often the library's scaled start reached "
          "the tolerance (elsewhere it falls back to Cholesky):")
    print("| factor | min | median | max | scaled Newton-Schulz converged |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, r in drift.items():
      print(f"| {key} | {r['min']:.2f} | {r['median']:.2f} | {r['max']:.2f} | "
            f"{100 * r['newton_schulz_converged']:.0f}% |")

  result = {**header, "results": results, "warm_start_residuals": drift}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  _plot(results, out.with_suffix(".png"), header)
  print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
  return result


def _plot(results, path, header):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(load, env) for load in results for env in results[load]]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), sharey=True)
  axes = [axes] if len(panels) == 1 else list(axes)
  for ax, (load, env) in zip(axes, panels):
    by_size = results[load][env]
    sizes = sorted(by_size, key=int)
    for m in METHODS:
      ax.plot([int(n) for n in sizes], [1e3 * by_size[n]["methods"][m]["median_seconds"]
                                        for n in sizes], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("factor size n")
    ax.set_title(f"{load}, {env}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("ms per inverse (median)")
  axes[-1].legend(fontsize=7)
  where = header["machine"]
  fig.suptitle(f"Inverting a damped factor — {where['cpu']} ({where['cpu_count']} cores), "
               f"{header['date']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
