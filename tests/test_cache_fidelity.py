"""benchmarks/cache_fidelity.py on a tiny model: the table has a row per cache name with its agreement."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_fidelity_table_compares_each_cache_with_the_exact_decoder(tmp_path, monkeypatch, capsys):
    from tracerl.models import build_tiny_model

    build_tiny_model("llama", seed=0).save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(ROOT)  # the shipped Repeat test file is read relative to the repository root
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cache_fidelity

    cache_fidelity.main(["--model", str(tmp_path / "tiny"), "--n", "3", "--batch", "2", "--threads", "1",
                         "--variants", "none", "dual:h8", "dual:r1"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| none") or line.startswith("| dual")}
    assert set(rows) == {"none", "dual:h8", "dual:r1"}
    assert rows["none"][4] == "100.0%"  # the reference agrees with itself
    assert rows["dual:r1"][4] == "100.0%"  # a refresh at every step is the exact decoder
