"""The README's main job end to end, shrunk: start model by SFT, held-out eval, TraceRL, table, plot, results."""

import json
import subprocess
import sys
from pathlib import Path

from tracerl import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_writes_table_plot_and_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the recipes name their data relative to the repository root
    out = tmp_path / "sudoku"
    assert demo.main(["--out", str(out), "--sft-override", "trainer.max_steps=30",
                      "trainer.max_steps=2", "trainer.eval_steps=1", "trainer.num_generations=4",
                      "trainer.per_device_train_batch_size=8", "data.max_eval_samples=8", "eval.batch_size=8"]) == 0
    results = json.loads((out / "results.json").read_text())
    labels = [label for label, _ in demo.DECODERS]
    assert list(results["before"]) == labels and list(results["after"]["0"]) == labels
    for scores in (results["before"][labels[0]], results["after"]["0"][labels[0]]):
        assert 0.0 <= scores["solved"] <= scores["cells"] <= 1.0 and scores["steps"] == 4.0
    assert results["before"]["16 steps"]["steps"] == 16.0
    metrics = [json.loads(line) for line in (out / "rl_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/accuracy" in m] == [0, 1, 2]  # before, every step, after
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "rl_seed0" / "checkpoint-2").is_dir()
    text = capsys.readouterr().out
    assert "full-solve gain with the trained decoder" in text and "TraceRL" in text

    # the README's trajectory picture, drawn straight from an RL checkpoint directory
    png = tmp_path / "trajectory.png"
    checkpoint = out / "rl_seed0" / "checkpoint-2"
    done = subprocess.run([sys.executable, "-m", "tracerl", "generate", "--model", str(checkpoint),
                           "--prompt", "Sudoku: 1003201001320241\n", "--max-completion-length", "16", "--steps", "4",
                           "--temperature", "0", "--show-trajectory", "--plot", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("step ") == 4 and png.stat().st_size > 5_000


def test_table_reports_mean_and_spread_over_seeds(capsys):
    row = {label: {"cells": 0.5, "solved": 0.2, "steps": 4.0} for label, _ in demo.DECODERS}
    after = [{k: {**v, "solved": s} for k, v in row.items()} for s in (0.3, 0.4, 0.5)]
    demo.print_table(row, after, n_eval=10)
    text = capsys.readouterr().out
    assert "0.400 (0.300..0.500)" in text  # mean (min..max)
    assert "+20.0 points (per seed: +10.0, +20.0, +30.0)" in text
