"""Every shipped recipe validates; the large ones also build with a tiny model swapped in and run one RL step."""

import json
from pathlib import Path

import pytest

from tracerl.config import RLConfig, SFTConfig
from tracerl.recipe import load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml"))


def kind_of(path: Path) -> type:
    return SFTConfig if "sft" in read_yaml(str(path)) else RLConfig


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_says_how_to_launch(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name paths relative to the repository root, as the README runs them
    config = load_config(str(path), kind=kind_of(path))
    head = path.read_text().splitlines()[:6]
    assert any("tracerl" in line and line.startswith("#") for line in head), "launch command missing"
    assert any("Hardware" in line for line in head), "hardware note missing"
    assert config.trainer.max_steps > 0


LARGE = {"llada_math": ("llama", None), "dream_math": ("qwen2", None), "trado_math": ("qwen3", 4),
         "code": ("qwen3", 4)}


@pytest.mark.parametrize("name", sorted(LARGE))
def test_large_recipe_runs_one_step_on_a_tiny_model(name, tmp_path, monkeypatch):
    pytest.importorskip("tracerl.peft_utils")
    from tracerl.build import build_model, build_rewards
    from tracerl.data import load_rows
    from tracerl.models import build_tiny_model
    from tracerl.trainer import RLTrainer

    arch, block = LARGE[name]
    build_tiny_model(arch, block_size=block).save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    rows = [{"question": "1+1?", "prompt": "1+1?", "answer": "#### 2", "tests": ["assert f() == 2"]}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(ROOT)
    config = load_config(str(ROOT / "recipes" / f"{name}.yaml"), [
        f"model.path={tmp_path / 'model'}", "model.dtype=float32", "model.device=cpu",
        f"data.train_files=[{data}]", "data.dataset_name=null", "rollout.max_completion_length=8",
        "rollout.steps=8", "trainer.max_steps=1", "trainer.num_generations=2",
        "trainer.per_device_train_batch_size=2", "trainer.gradient_accumulation_steps=1",
        f"trainer.output_dir={tmp_path / 'out'}", "distributed.deepspeed=null", "logging.report_to=[]",
        "rollout.block_length=null" if block else "rollout.block_length=4",
    ])
    model = build_model(config.model, config.peft)
    history = RLTrainer(config, model, build_rewards(config), load_rows(config.data)).train()
    assert len(history) == 1 and (tmp_path / "out" / "checkpoint-1").is_dir()
