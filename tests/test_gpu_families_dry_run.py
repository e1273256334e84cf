"""benchmarks/gpu_families.py --tiny: the GPU script's CPU dry run, with the approximate caches, runs and prints its
table; a bad cache name exits 2 before any model is built."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_prints_a_row_per_family_policy_and_cache(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_families

    gpu_families.main(["--tiny", "--caches", "none", "dual:h8"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| llada", "| sdar"))]
    cells = [[c.strip() for c in row.strip("|").split("|")][:3] for row in table]  # the final table's rows
    assert cells == [["llada", "static", "none"], ["llada", "dynamic 0.9", "none"],
                     ["llada", "static", "dual:h8"], ["llada", "dynamic 0.9", "dual:h8"],
                     ["sdar", "static", "none"], ["sdar", "dynamic 0.9", "none"]]  # block diffusion: exact cache only


def test_a_bad_cache_name_exits_2(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_families

    with pytest.raises(SystemExit) as exit_info:
        gpu_families.main(["--tiny", "--caches", "dual:q3"])
    assert exit_info.value.code == 2 and "knobs are :hH" in capsys.readouterr().err
