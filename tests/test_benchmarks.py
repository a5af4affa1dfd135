"""The step-cost benchmark runs end to end on a tiny budget (no timing assertions)."""

import json
import math

from benchmarks import step_cost


def test_step_cost_benchmark_runs(tmp_path, capsys):
  """Every step kind is timed, ratios to Adam are reported, JSON and plot are written."""
  out = tmp_path / "step_cost"
  result = step_cost.main([
      "--hidden", "8", "--inputs", "12", "--batch-size", "4", "--repeats", "2", "--steps", "1",
      "--out", str(out),
  ])
  kinds = {"adam", "sgd", "tkfac_stats", "tkfac_no_stats", "tkfac_refresh"}
  assert set(result["median_seconds_per_step"]) == kinds
  assert all(len(v) == 2 for v in result["seconds_per_step"].values())
  assert all(math.isfinite(v) and v > 0 for v in result["median_seconds_per_step"].values())
  assert result["ratios_to_adam"]["adam"] == 1.0
  assert json.loads(out.with_suffix(".json").read_text())["settings"]["batch_size"] == 4
  assert out.with_suffix(".png").stat().st_size > 0
  printed = capsys.readouterr().out
  assert "machine:" in printed and "| tkfac_refresh |" in printed


def test_inverse_spread_benchmark_runs(tmp_path, capsys):
  """Replicated and spread refreshes are timed on the 8 test devices; the ratio, JSON and plot are
  written."""
  from benchmarks import inverse_spread

  out = tmp_path / "inverse_spread"
  result = inverse_spread.main([
      "--widths", "4", "--inputs", "3", "--batch-size", "8", "--repeats", "2", "--steps", "1",
      "--out", str(out),
  ])
  assert set(result["median_seconds_per_step"]) == {"no_refresh", "replicated", "spread"}
  assert math.isfinite(result["inverse_ratio_spread_to_replicated"])
  assert json.loads(out.with_suffix(".json").read_text())["settings"]["mesh"] == "data=8"
  assert out.with_suffix(".png").stat().st_size > 0
  assert "spread / replicated" in capsys.readouterr().out
