"""benchmarks/compare_estimators.py --quick: every estimator trains under the budget and the report is written."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_comparison_trains_every_estimator_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped Sudoku files are read relative to the repository root
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # for this process and the spawned run workers
    import compare_estimators
    compare_estimators.main(["--quick", "--out", str(tmp_path), "--estimators", "trace_s1", "trace_value",
                             "d1"])
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["estimator"] for r in runs] == ["trace_s1", "trace_value", "d1"]
    for run in runs:
        assert run["curve"][-1]["step"] >= 1 and run["curve"][-1]["seconds"] >= 3.0  # stopped at the budget
        assert 0.0 <= run["curve"][-1]["cell_accuracy"] <= 1.0
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} | 1 |" in table for name in ("trace_s1", "trace_value", "d1"))
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 10_000
    # --summarize rebuilds the same table from the per-run files alone
    compare_estimators.main(["--quick", "--summarize", "--out", str(tmp_path), "--estimators", "trace_s1",
                             "trace_value", "d1"])
    assert (tmp_path / "results.md").read_text() == table
