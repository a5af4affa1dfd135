"""Across processes: two processes on this machine, joined by ``jax.distributed.initialize`` on a
loopback address (CPU collectives over gloo), train on a global batch split between them and end
with the parameters of one process training on the whole batch."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import multiprocess_worker
import references

TIMEOUT_SECONDS = 180
WORKER = pathlib.Path(multiprocess_worker.__file__)
ROOT = WORKER.parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  """2 processes with one CPU device each, the batch sharded over both, the inverses spread over
  both: the final parameters equal a single process's run on the whole batch."""
  out = tmp_path / "params.npz"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  procs = [
      subprocess.Popen(
          [sys.executable, str(WORKER), str(i), "2", str(port), str(out)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT_SECONDS)[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    logs = [proc.communicate()[0] for proc in procs]
    pytest.fail(f"The processes did not finish in {TIMEOUT_SECONDS} s (a hang?):\n" + "\n".join(logs))
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f"process {i} failed:\n{logs[i]}"

  loss_fn, params, x, y = multiprocess_worker.problem()
  expected = multiprocess_worker.train(loss_fn, params, x, y)
  flat, _ = jax.tree_util.tree_flatten_with_path(expected)
  start = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  got = np.load(out)
  assert sorted(got.files) == sorted(jax.tree_util.keystr(k) for k, _ in flat)
  # Two processes run another program than one (a cross-process psum): float32 agreement on how
  # far training moved each parameter, not bit for bit (references.TRAJECTORY).
  for keypath, value in flat:
    moved = got[jax.tree_util.keystr(keypath)] - np.asarray(start[keypath], np.float64)
    expected_moved = np.asarray(value, np.float64) - np.asarray(start[keypath], np.float64)
    references.assert_close(moved, expected_moved, references.TRAJECTORY, str(keypath))
