"""What every benchmark records about where it ran: the CPU, the devices, the versions, the date.

One place for the header each benchmark prints and writes into its JSON, so that their reports
can be compared line for line.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
from typing import Any

import flax
import jax
import optax

import tkfac_jax


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_count() -> int:
  """The cores this process may run on (its affinity mask where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
  """CPU, cores, JAX's devices and the platform; with the BLAS thread setting that sways timings.

  jaxlib's CPU LAPACK calls (the Cholesky and eigendecompositions behind the inverses) run on
  scipy's OpenBLAS, whose threads contend badly when the cores are oversubscribed, so
  ``OPENBLAS_NUM_THREADS`` is recorded with every figure.
  """
  devices = jax.devices()
  return {
      "cpu": cpu_model(),
      "cpu_count": cpu_count(),
      "device": str(devices[0].device_kind),
      "device_count": len(devices),
      "backend": jax.default_backend(),
      "platform": platform.platform(),
      "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
  }


def versions(**extra: str) -> dict[str, str]:
  """Python's and the libraries' versions, and any ``extra`` (e.g. ``kfac_jax=...``)."""
  return {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "tkfac_jax": tkfac_jax.__version__,
      **extra,
  }


def today() -> str:
  return datetime.date.today().isoformat()


def describe(machine: dict[str, Any], found: dict[str, str]) -> str:
  """One line for the top of a benchmark's printout."""
  load = machine.get("load_average")
  return (
      f"machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine['device_count']} "
      f"{machine['backend']} device(s) ({machine['device']})"
      + (f", load average {load[0]:.1f}" if load else "")
      + f", OPENBLAS_NUM_THREADS={machine['OPENBLAS_NUM_THREADS']} | "
      + ", ".join(f"{k} {v}" for k, v in found.items())
  )


def header(settings: dict[str, Any]) -> dict[str, Any]:
  """Machine, versions, ``settings`` and date, printed as the benchmark's first lines."""
  found = {"machine": machine_info(), "versions": versions(), "settings": settings,
           "date": today()}
  print(describe(found["machine"], found["versions"]))
  print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
  print()
  return found


def write_timings(result: dict[str, Any], out: str | pathlib.Path,
                  panels: list[tuple[str, dict[str, float]]], title: str,
                  reference: tuple[str, float] | None = None) -> None:
  """Writes ``result`` to ``out``.json and ``out``.png: one bar chart of seconds per panel.

  ``panels`` are (title, {name: seconds}); ``reference`` is (label, seconds) drawn as a line on
  every panel (the baseline the bars are read against).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, (panel_title, values) in zip(axes[0], panels):
    names = list(values)
    ax.barh(names, [1e3 * values[n] for n in names], color="tab:blue")
    if reference is not None:
      ax.axvline(1e3 * reference[1], color="tab:red", linestyle="--", label=reference[0])
      ax.legend(loc="lower right")
    ax.set_xlabel("milliseconds")
    ax.set_title(panel_title)
    ax.invert_yaxis()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out.with_suffix(".png"), dpi=120)
  plt.close(fig)
  print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
