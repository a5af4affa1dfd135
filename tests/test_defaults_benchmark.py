"""The defaults sweep (benchmarks/defaults.py) runs end to end on a tiny budget, so it cannot rot,
and the defaults it names are the library's."""

import inspect
import json

import pytest

from benchmarks import defaults
import tkfac_jax

pytestmark = pytest.mark.slow  # Benchmark smoke tests (see .ci/run).


def test_library_defaults_are_the_ones_the_sweep_names():
  signature = inspect.signature(tkfac_jax.tkfac).parameters
  for name, value in defaults.LIBRARY.items():
    if name == "damping":  # None: the mode's default.
      assert signature[name].default is None
      assert tkfac_jax._transform.RELATIVE_DAMPING == value  # pylint: disable=protected-access
    elif name != "learning_rate":  # tkfac has no default learning rate.
      assert signature[name].default == value, name


def test_defaults_sweep_runs_and_writes_its_outputs(tmp_path):
  out = tmp_path / "sweep"
  result = defaults.main([
      "--data-dir", str(tmp_path / "no-data"),  # The bundled digits: nothing to download.
      "--tasks", "mlp", "--batch-sizes", "32", "--seconds", "0.3", "--no-progress",
      "--candidates", "stats 1, inverses 10;stats 10, inverses 100", "--out", str(out),
  ])
  (cell,) = result["cells"]
  assert [r["candidate"] for r in cell["candidates"]] == [
      "stats 1, inverses 10", "stats 10, inverses 100"]
  assert len(cell["adam_runs"]) == 2 and 0 < cell["target"] <= 1
  for row in cell["candidates"]:
    assert row["steps"] > 1 and row["mean_step_ratio"] > 0 and row["max_over_median"] >= 1
    assert row["run"]["hparams"]["scale_invariant"] is True
  assert json.loads((out / "defaults.json").read_text())["cells"][0]["target"] == cell["target"]
  assert "| stats 10, inverses 100 |" in (out / "defaults.md").read_text()
  assert (out / "defaults.png").stat().st_size > 0


@pytest.mark.oldest_env  # See .ci/run.
def test_scales_sweep_runs_both_modes_on_both_losses(tmp_path):
  out = tmp_path / "scales"
  result = defaults.main([
      "--data-dir", str(tmp_path / "no-data"), "--tasks", "mlp", "--seconds", "0.2",
      "--no-progress", "--scales", "--out", str(out),
  ])
  rows = [(c["mode"], c["loss_scale"]) for c in result["scales"]]
  assert rows == [("scale-invariant", 1.0), ("scale-invariant", 128.0), ("paper", 1.0),
                  ("paper", 128.0)]
  assert "| mlp | paper |" in (out / "scales.md").read_text()
