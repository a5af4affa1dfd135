"""What every benchmark records about where it ran: the CPU, the devices, the versions, the date.

One place for the header each benchmark prints and writes into its JSON, so that their reports
can be compared line for line.
"""

from __future__ import annotations

import datetime
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
