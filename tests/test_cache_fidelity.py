"""benchmarks/cache_fidelity.py on a tiny model: the table has a row per variant with its agreement and compute."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_fidelity(monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped Repeat test file is read relative to the repository root
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cache_fidelity

    return cache_fidelity


def table_rows(out: str) -> dict[str, list[str]]:
    cells = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    return {row[0]: row for row in cells[1:]}  # past the header ("|---|" does not start with "| ")


def test_the_fidelity_table_compares_each_variant_with_the_exact_decoder(tmp_path, cache_fidelity, capsys):
    from tracerl.models import build_tiny_model

    build_tiny_model("llama", seed=0).save_pretrained(tmp_path / "tiny")
    cache_fidelity.main(["--model", str(tmp_path / "tiny"), "--n", "3", "--batch", "2", "--threads", "1",
                         "--variants", "none", "dual:h8", "dual:r1", "dual", "none@0.000001", "elastic:g0",
                         "dual:r1@0.5"])
    rows = table_rows(capsys.readouterr().out)
    # dual:r1@0.5's exact counterpart at its own schedule, none@0.5, is run before it although not asked for
    assert list(rows) == ["none", "dual:h8", "dual:r1", "dual", "none@0.000001", "elastic:g0", "none@0.5",
                          "dual:r1@0.5"]
    forwards, compute, agreement, same = ({name: row[i] for name, row in rows.items()} for i in (1, 4, 5, 6))
    assert agreement["none"] == "100.0%" and compute["none"] == "1.00x"  # the reference against itself
    # a refresh at every step is the exact decoder: the same tokens from the same full-frame forwards
    assert agreement["dual:r1"] == "100.0%" and compute["dual:r1"] == "1.00x"
    # ... at the threshold's schedule too, where the fixed-schedule reference is no longer the right comparison
    assert same["dual:r1@0.5"] == "100.0%" and forwards["dual:r1@0.5"] == forwards["none@0.5"]
    assert same["none@0.000001"] == same["none"] == "100.0%"  # each exact decoder against itself
    assert same["dual"] == agreement["dual"]  # without a threshold the reference is the same-schedule one
    # the dual cache runs 32-position windows after each block's full forward; a horizon of 8 widens them
    assert 1.0 < float(compute["dual:h8"][:-1]) < float(compute["dual"][:-1])
    assert forwards["dual"] == forwards["none"]  # a cache changes what a forward runs, not how many
    # a threshold every position passes commits a whole block of 32 per forward, against 2 per forward
    assert int(forwards["none@0.000001"]) * 16 == int(forwards["none"])
    # Elastic-Cache without its trigger runs a window of 32 masks plus a few tokens per step: above dual's 32 + 32
    assert 1.0 < float(compute["elastic:g0"][:-1]) and forwards["elastic:g0"] == forwards["none"]


def test_the_position_counter_counts_positions_through_the_whole_network(cache_fidelity):
    """Positions are counted where every layer runs them (its MLP), then divided by the layers: a plain forward
    counts rows x length; Elastic-Cache's step 0 is a plain forward; a cached step that recomputes only its query
    rows in every layer counts exactly those rows."""
    import torch

    from tracerl.models import build_tiny_model
    from tracerl.rollout.elastic import ElasticCache

    model = build_tiny_model("llama", seed=0, num_layers=3).eval()
    counter = cache_fidelity.PositionCounter(model)
    with torch.no_grad():
        model.logits(torch.full((3, 7), 20))
        model.logits(torch.full((2, 5), 20))
        assert counter.positions == 3 * 7 + 2 * 5
        counter.positions = 0
        x = torch.full((2, 12), model.mask_token_id)
        x[:, :4] = 20
        cache = ElasticCache(model, window=4, gamma=0.0)  # gamma 0: no layer ever recomputes everything
        cache.block_logits(x, torch.ones_like(x), 4, 8)
        assert counter.positions == 2 * 12
        # each layer tracked one token; a row's query is their union, then the changed tokens, then the window
        tracked = max(len(set(cache.track[:, n].flatten().tolist())) for n in range(2))
        x[:, 4] = 30  # one committed token: query = tracked + 1 changed + the window's 4 masks, in every layer
        cache.block_logits(x, torch.ones_like(x), 5, 8)
    assert counter.positions == 2 * 12 + 2 * (tracked + 1 + 4)


@pytest.mark.parametrize("variant, says", [("dual@x", "the threshold after @ must be a number, got 'x'"),
                                           ("dual:z3", "knobs are :hH"),
                                           ("dual@1.5", "threshold must lie in (0, 1]")])
def test_a_bad_variant_is_refused_by_name(cache_fidelity, variant, says):
    with pytest.raises(SystemExit) as exc:
        cache_fidelity.variant_config(variant, 256)
    assert f"variant {variant!r}" in str(exc.value) and says in str(exc.value)


def test_the_reference_must_be_an_exact_decoder(cache_fidelity):
    with pytest.raises(SystemExit) as exc:
        cache_fidelity.main(["--variants", "dual@0.9", "none@0.9"])
    assert "must be an exact decoder" in str(exc.value) and "'dual@0.9'" in str(exc.value)
