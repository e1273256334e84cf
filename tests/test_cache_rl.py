"""benchmarks/cache_rl.py --quick: exact and cached arms train under the budget; the gap and IS weights are logged."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cache_comparison_logs_the_gap_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the shipped Repeat files are read relative to the repository root
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # for this process and the spawned run workers
    import cache_rl
    cache_rl.main(["--quick", "--out", str(tmp_path), "--arms", "none", "dual_tis"])
    runs = {r["arm"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert set(runs) == {"none", "dual_tis"}
    for run in runs.values():
        assert run["curve"][-1]["seconds"] >= 5.0 and run["log"]  # stopped at the budget, after >= 1 step
        assert all(0.0 <= p[k] <= 1.0 for p in run["curve"] for k in ("exact_decoder", "own_decoder"))
    # the exact sampler is the model: no gap; the dual cache is not, and its IS weights are capped at 2
    assert all(row["rollout/logprob_gap_mean"] == 0.0 for row in runs["none"]["log"])
    assert all(row["rollout/logprob_gap_mean"] > 0.0 for row in runs["dual_tis"]["log"])
    assert all(0.0 < row["rollout/is_weight_mean"] <= 2.0 for row in runs["dual_tis"]["log"])
    table = (tmp_path / "results.md").read_text()
    assert "| none |" in table and "| dual_tis |" in table
    assert (tmp_path / "reward_and_accuracy.png").stat().st_size > 10_000
    # --time-rollout prints one RL step's rollout time per cache mode
    capsys.readouterr()
    cache_rl.main(["--quick", "--out", str(tmp_path), "--time-rollout"])
    printed = capsys.readouterr().out
    assert all(f"| {mode} |" in printed for mode in ("none", "prefix", "dual")) and "| none | " in printed
