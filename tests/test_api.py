"""The TRL-shaped Python API: TraceRLConfig <-> recipes, TraceRLTrainer over datasets, peft and rewards, the example."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from tracerl import TraceRLConfig, TraceRLTrainer
from tracerl.api import FIELDS
from tracerl.config import RLConfig
from tracerl.errors import UserError
from tracerl.models import build_tiny_model
from tracerl.recipe import load_config
from tracerl.trainer import RLTrainer

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": p, "target": t} for p, t in [("hello", "a"), ("abc", "b"), ("xyz", "a"), ("the", "c")]]


def target_share(prompts, completions, target, **kwargs):
    """A TRL reward reading another dataset column (`target`) as a keyword argument."""
    return [c.count(t) / max(len(c), 1) for c, t in zip(completions, target)]


def small_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, learning_rate=3e-3, num_generations=4,
                per_device_train_batch_size=8, max_completion_length=8, steps=4, block_length=4, logging_steps=100)
    return TraceRLConfig(**{**base, **kw})


def test_every_flat_field_is_one_recipe_field_with_its_default():
    flat = TraceRLConfig()
    nested = RLConfig()
    for name, path in FIELDS.items():
        value = nested
        for part in path.split("."):
            value = getattr(value, part)
        assert getattr(flat, name) == value, name
    # GRPOConfig's names where the meaning is the same
    for trl_name in ("output_dir", "learning_rate", "max_steps", "num_generations", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "max_completion_length", "temperature", "top_p", "top_k", "beta",
                     "epsilon", "epsilon_high", "num_iterations", "scale_rewards", "reward_weights", "report_to",
                     "logging_steps", "save_steps", "seed", "run_name", "deepspeed", "loss_type"):
        assert trl_name in {f.name for f in dataclasses.fields(TraceRLConfig)}, trl_name


def test_every_recipe_setting_has_a_flat_field():
    """A recipe key the flat config lacked would be dropped silently on the way through the API (the CLI's path)."""
    from tracerl.api import NOT_FLAT
    from tracerl.recipe import walk

    covered = set(FIELDS.values()) | NOT_FLAT
    sections = ("rollout", "algorithm", "optimizer", "trainer", "logging", "eval", "distributed")
    keys = [k for k, _ in walk(RLConfig()) if k.split(".")[0] in sections or "." not in k]
    missing = [k for k in keys if k not in covered and k != "rewards"]
    assert not missing, missing


def test_a_recipe_maps_onto_the_flat_config_and_back(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_config("recipes/sudoku_tracerl.yaml")
    flat = TraceRLConfig.from_recipe(recipe)
    assert (flat.learning_rate, flat.steps, flat.per_device_train_batch_size) == (2e-4, 4, 256)
    assert flat.reward_weights == [1.0, 0.0]
    back = flat.to_recipe()
    for section in ("rollout", "algorithm", "optimizer", "trainer", "logging", "eval", "distributed"):
        assert getattr(back, section) == getattr(recipe, section), section
    assert TraceRLConfig(loss_type="dr_grpo").to_recipe().algorithm.loss_aggregation == "sequence-sum"
    with pytest.raises(UserError, match="loss_type: 'ppo' is not one of TRL's"):
        TraceRLConfig(loss_type="ppo").to_recipe()


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache="prefx"), r"cache \(rollout.cache\): 'prefx' is not one of none, prefix, dual, elastic"),
    (dict(cache="dual", cache_horizon=2.5), r"cache_horizon \(rollout.cache_horizon\): expected an integer"),
    (dict(learning_rate=float("nan")), r"learning_rate \(optimizer.learning_rate\): must be a finite number"),
    (dict(steps="8"), r"steps \(rollout.steps\): expected an integer, got '8'"),
])
def test_the_flat_config_is_type_checked_as_a_recipe_is(kwargs, match):
    """Set from Python, a field meets the recipe's own checks: a typo in a choice must not run something else (an
    unknown cache name once ran the dual cache)."""
    with pytest.raises(UserError, match=match):
        TraceRLConfig(**kwargs).to_recipe()


def test_the_api_trains_on_a_dataset_with_lora_and_other_columns(tmp_path):
    from peft import LoraConfig

    seen = {}

    def spy(prompts, completions, target, **kwargs):
        seen["target"] = list(target)
        return target_share(prompts, completions, target)

    model = build_tiny_model("llama", seed=0)
    def short(prompts, completions, **kwargs):
        return [-len(c.strip()) / 8 for c in completions]

    trainer = TraceRLTrainer(model=model, reward_funcs=[spy, short], args=small_args(tmp_path, reward_weights=[1.0,
                             0.1]), train_dataset=Dataset.from_list(ROWS),
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    history = trainer.train()
    assert len(history) == 2 and history[-1]["grad_norm"] > 0
    assert set(seen["target"]) <= {"a", "b", "c"}  # the other column arrived, one value per completion
    assert hasattr(trainer.model.backbone, "peft_config")
    assert (tmp_path / "run" / "checkpoint-2" / "model" / "adapter_config.json").is_file()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").is_file()


def test_the_api_is_the_trainer(tmp_path):
    """TraceRLTrainer is RLTrainer over the same config: the same seed gives the same step, bit for bit."""
    args = small_args(tmp_path, max_steps=1)
    api = TraceRLTrainer(model=build_tiny_model("llama", seed=0), reward_funcs=target_share, args=args,
                         train_dataset=ROWS).train()
    direct = RLTrainer(args.to_recipe(), build_tiny_model("llama", seed=0),
                       __import__("reward_models").RewardSet([target_share]), ROWS).train()
    assert api[0]["loss"] == direct[0]["loss"] and api[0]["reward"] == direct[0]["reward"]


def test_user_mistakes_name_the_thing(tmp_path):
    with pytest.raises(UserError, match="row 0 has no 'prompt' column"):
        TraceRLTrainer(model=build_tiny_model("llama"), reward_funcs=target_share, args=small_args(tmp_path),
                       train_dataset=[{"question": "x"}])
    with pytest.raises(UserError, match="reward_weights has 1 values for 2 reward functions"):
        TraceRLTrainer(model=build_tiny_model("llama"), reward_funcs=[target_share, "sudoku"],
                       args=small_args(tmp_path, reward_weights=[1.0]), train_dataset=ROWS)
    with pytest.raises(UserError, match="reward_funcs: "):
        TraceRLTrainer(model=build_tiny_model("llama"), reward_funcs="no_such_reward", args=small_args(tmp_path),
                       train_dataset=ROWS)
    with pytest.raises(UserError, match="model_init_kwargs: unknown option"):
        TraceRLTrainer(model=str(tmp_path), reward_funcs=target_share, args=small_args(tmp_path,
                       model_init_kwargs={"attn": "x"}), train_dataset=ROWS)
    with pytest.raises(UserError, match="train_dataset: row 1: the prompt is null"):
        TraceRLTrainer(model=build_tiny_model("llama"), reward_funcs=target_share, args=small_args(tmp_path),
                       train_dataset=[ROWS[0], {"prompt": None, "target": "a"}])


def test_a_prompt_too_long_for_the_model_stops_the_run_before_its_first_step(tmp_path):
    # it used to fail at whichever RL step first drew the row, possibly hours in
    rows = [*ROWS, {"prompt": "x" * 60, "target": "a"}]  # 60 prompt + 8 completion tokens > 64 positions
    with pytest.raises(UserError, match=r"training row 4: prompt of 60 tokens \+ rollout.max_completion_length 8 "
                                        r"exceeds the model's maximum length 64"):
        TraceRLTrainer(model=build_tiny_model("llama", max_position_embeddings=64), reward_funcs=target_share,
                       args=small_args(tmp_path), train_dataset=rows)
    with pytest.raises(UserError, match="eval row 4: prompt of 60 tokens"):
        TraceRLTrainer(model=build_tiny_model("llama", max_position_embeddings=64), reward_funcs=target_share,
                       args=small_args(tmp_path), train_dataset=ROWS, eval_dataset=rows)


@pytest.mark.slow
def test_the_example_script_trains_sudoku_from_python(tmp_path):
    start = tmp_path / "start"
    build_tiny_model("llama", hidden_size=32, num_layers=2, seed=0).save_pretrained(start)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "examples/train_sudoku.py", "--start", str(start), "--max-steps", "2",
                          "--output-dir", str(tmp_path / "rl")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accuracy" in out.stdout and (tmp_path / "rl" / "checkpoint-2").is_dir()
    metrics = (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    assert any('"eval/accuracy"' in line for line in metrics)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reward_weights=2.0), "reward_weights: expected a list of numbers"),
    (dict(train_dataset={"prompt": ["a"]}), "train_dataset: expected a datasets.Dataset or a list of row dicts"),
    (dict(train_dataset=["a", "b"]), "train_dataset: row 0 is str 'a', not a dict of columns"),
    (dict(args={"max_steps": 1}), "args: expected a TraceRLConfig, got dict"),
    (dict(reward_funcs=[]), "reward_funcs: no reward function given"),
    (dict(peft_config={"r": 4}), "peft_config: expected a peft.LoraConfig"),
    (dict(reward_funcs=lambda prompts, completions, solution, **kw: [0.0] * len(completions)),
     r"rewards: '<lambda>' reads column 'solution', which train_dataset lacks"),
])
def test_wrong_arguments_are_named_before_the_model_loads(kwargs, match):
    """The model path does not exist: every one of these must be refused before it is looked at."""
    reward_weights = kwargs.pop("reward_weights", None)
    args = kwargs.pop("args", TraceRLConfig(reward_weights=reward_weights))
    options = dict(model="/no/such/model", reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
                   train_dataset=[{"prompt": "1+1="}], args=args)
    with pytest.raises(UserError, match=match):
        TraceRLTrainer(**{**options, **kwargs})


# ---- TRL's names and values: what a ported GRPO script gets --------------------------------------------------
def test_trl_loss_types_and_scale_rewards_mean_what_they_mean_in_trl():
    """bnpo is the token mean within each micro-batch (grpo_trainer: loss / num_items per micro-batch, then / GA),
    dapo over the whole accumulated batch; scale_rewards True / False are TRL's "group" / "none"."""
    aggregation = {t: TraceRLConfig(loss_type=t).to_recipe().algorithm.loss_aggregation
                   for t in ("grpo", "bnpo", "dapo", "dr_grpo")}
    assert aggregation == {"grpo": "sequence-mean", "bnpo": "microbatch-token-mean", "dapo": "token-mean",
                           "dr_grpo": "sequence-sum"}
    assert TraceRLConfig(scale_rewards=True).to_recipe().algorithm.scale_rewards == "group"
    assert TraceRLConfig(scale_rewards=False).to_recipe().algorithm.scale_rewards == "none"
    with pytest.raises(UserError, match=r"loss_type='dr_grpo' .* and loss_aggregation='token-mean' disagree"):
        TraceRLConfig(loss_type="dr_grpo", loss_aggregation="token-mean").to_recipe()


def test_grpo_config_fields_traceRL_lacks_are_named_with_what_to_use():
    with pytest.raises(UserError, match=r"no field num_generations_eval \(use eval_num_generations\), warmup_steps"):
        TraceRLConfig(num_generations_eval=4, warmup_steps=10)
    with pytest.raises(UserError, match=r"trainer.num_generations=1: the group baseline"):
        TraceRLConfig(num_generations=1, per_device_train_batch_size=4).to_recipe()
    TraceRLConfig(num_generations=1, per_device_train_batch_size=4, use_value_model=True).to_recipe()


def test_max_steps_counting_rl_steps_is_said_when_it_differs_from_trl():
    with pytest.warns(UserWarning, match=r"max_steps=10 counts RL steps here .* 20 optimizer steps in all"):
        TraceRLConfig(max_steps=10, num_iterations=2).to_recipe()


def test_a_loaded_transformers_model_is_refused_with_what_to_pass(tmp_path):
    from transformers import AutoModelForCausalLM

    build_tiny_model("llama").save_pretrained(str(tmp_path / "m"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(UserError, match=r"model: a LlamaForCausalLM object; pass the directory it was loaded from"):
        TraceRLTrainer(model=loaded, reward_funcs=target_share, args=small_args(tmp_path), train_dataset=ROWS)


def test_train_resume_false_starts_fresh(tmp_path):
    trainer = TraceRLTrainer(model=build_tiny_model("llama"), reward_funcs=target_share,
                             args=small_args(tmp_path, max_steps=1), train_dataset=ROWS)
    assert len(trainer.train(resume_from_checkpoint=False)) == 1
