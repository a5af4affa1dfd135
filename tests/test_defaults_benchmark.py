"""The defaults sweep (benchmarks/defaults.py) runs end to end on a tiny budget, so it cannot rot."""

import json

from benchmarks import defaults


def test_defaults_sweep_runs_and_writes_its_outputs(tmp_path):
  out = tmp_path / "sweep"
  result = defaults.main([
      "--data-dir", str(tmp_path / "no-data"),  # The bundled digits: nothing to download.
      "--epochs", "1", "--wd-epochs", "1",
      "--lrs", "0.01", "--dampings", "1e-2", "--kl-clips", "none,1e-4",
      "--weight-decays", "none", "--out", str(out),
  ])
  rows = result["results"]
  assert [(r["sweep"], r["kl_clip"]) for r in rows] == [(1, None), (1, 1e-4), (2, 1e-4)]
  assert all(r["steps"] == 9 and 0 < r["val_loss"] < 5 and 0 <= r["val_acc"] <= 1 for r in rows)
  assert json.loads((tmp_path / "sweep.json").read_text())["results"] == rows
  table = (tmp_path / "sweep.md").read_text()
  assert "| 0.01 | none |" in table and "| 0.01 | 0.0001 |" in table
  assert (tmp_path / "sweep.png").stat().st_size > 0
