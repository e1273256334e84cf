"""Recipes: YAML + overrides -> typed config; every user mistake is one message naming the key, exit code 2."""

import subprocess
import sys

import pytest
import yaml

from tracerl.config import RLConfig, SFTConfig
from tracerl.errors import UserError
from tracerl.recipe import help_texts, load_config, read_yaml


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_and_overrides_build_typed_sections(tmp_path):
    path = write(tmp_path, {"model": {"path": "m"}, "rollout": {"steps": 16, "max_completion_length": 16},
                            "rewards": [{"fn": "math", "weight": 2}]})
    cfg = load_config(path, ["algorithm.beta=0.04", "trainer.max_steps=3", "data.train_files=[a.jsonl, b.jsonl]",
                             "algorithm.epsilon_high=null"])
    assert isinstance(cfg, RLConfig)
    assert cfg.rollout.steps == 16 and cfg.algorithm.beta == 0.04 and cfg.trainer.max_steps == 3
    assert cfg.rewards[0].fn == "math" and cfg.rewards[0].weight == 2.0 and isinstance(cfg.rewards[0].weight, float)
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"] and cfg.algorithm.epsilon_high is None


def test_a_single_file_needs_no_brackets(tmp_path):
    # the README's held-out override: data.eval_files=other.csv is the one-file list [other.csv]
    cfg = load_config(write(tmp_path, {"data": {"eval_files": ["a.jsonl"]}}), ["data.eval_files=other.csv"])
    assert cfg.data.eval_files == ["other.csv"]
    cfg = load_config(write(tmp_path, {}), ["peft.target_modules=all-linear"])  # list[str] | str stays a str
    assert cfg.peft.target_modules == "all-linear"
    with pytest.raises(UserError, match="trainer.max_steps: expected an integer"):  # only str lists take a bare str
        load_config(write(tmp_path, {}), ["trainer.max_steps=[3]"])


@pytest.mark.parametrize("override,message", [
    ("trainer.max_step=3", "trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
    ("algorithim.beta=0.1", "algorithim: unknown key (did you mean algorithm?)"),
    ("trainer.max_steps=ten", "trainer.max_steps: expected an integer, got 'ten'"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate: expected a number, got 'fast'"),
    ("model.use_chat_template=maybe", "model.use_chat_template: expected true or false, got 'maybe'"),
    ("algorithm.estimator=d2", "algorithm.estimator: 'd2' is not one of trace, d1, coupled, wd1"),
    ("algorithm.estimator=random_masking", "use algorithm.estimator=d1 (diffu-GRPO as published)"),
    (("algorithm.estimator=wd1", "algorithm.loss_type=ppo"),
     "algorithm.loss_type=ppo does not go with algorithm.estimator=wd1"),
    (("algorithm.estimator=coupled", "algorithm.p_mask_prompt=0.1"), "coupled-GRPO never masks the prompt"),
    ("trainer.num_generations=3", "not a multiple of trainer.num_generations=3"),
    ("rollout.threshold=1.5", "rollout.threshold must lie in (0, 1]"),
    ("rollout.steps=7", "rollout.steps=7 cannot be divided over"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate: must be > 0"),
    ("rewards=[{weight: 1}]", "rewards[0].fn: every reward needs fn"),
    ("rewards=[{fn: math, wieght: 1}]", "rewards[0].wieght: unknown key (did you mean rewards[0].weight?)"),
    # NaN passes every `x > 0` check: any non-finite number is refused where it is read
    ("optimizer.learning_rate=.nan", "optimizer.learning_rate: must be a finite number, got nan"),
    ("algorithm.epsilon=.inf", "algorithm.epsilon: must be a finite number, got inf"),
    ("rewards=[{fn: math, weight: .nan}]", "rewards[0].weight: must be a finite number"),
    # ranges that used to pass and then delete checkpoints, skip training, or fail after the model loaded
    ("trainer.save_total_limit=-1", "trainer.save_total_limit: must be > 0, got -1"),
    ("trainer.replay_batch_size=-1", "trainer.replay_batch_size: must be >= 0, got -1"),
    ("trainer.logging_steps=0", "trainer.logging_steps: must be > 0, got 0"),
    ("trainer.eval_steps=-1", "trainer.eval_steps: must be >= 0, got -1"),
    ("data.max_eval_samples=0", "data.max_eval_samples: must be > 0, got 0"),
    ("peft.r=0", "peft.r: must be > 0 (the LoRA rank), or null for full fine-tuning; got 0"),
    ("peft.lora_dropout=1.5", "peft.lora_dropout: must lie in [0, 1), got 1.5"),
    ("optimizer.adam_epsilon=-1", "optimizer.adam_epsilon: must be >= 0, got -1.0"),
    ("optimizer.adam_beta2=1.5", "optimizer.adam_beta2: must lie in [0, 1), got 1.5"),
    ("optimizer.max_grad_norm=-1", "optimizer.max_grad_norm: must be > 0, got -1.0"),
    ("optimizer.lr_scheduler_type=cosin", "optimizer.lr_scheduler_type='cosin' is not usable here: cosin is not"),
    ("algorithm.value_clip=-0.2", "algorithm.value_clip: must be > 0, got -0.2"),
    ("model.device=gpu", "model.device: 'gpu' is not a device"),
    ("model.block_size=0", "model.block_size: must be > 0, got 0"),
    ("model.mask_token_id=-1", "model.mask_token_id: must be >= 0, got -1"),
    ("rollout.block_length=-4", "rollout.block_length must be >= 1 (or null for the model's own), got -4"),
    ("eval.temperature=-1", "eval.temperature: must be >= 0, got -1.0"),
    ("reward_timeout_s=0", "reward_timeout_s: must be > 0, got 0.0"),
    # passed validation, then failed after the model had loaded
    ("optimizer.lr_scheduler_type=reduce_lr_on_plateau", "steps on a validation metric"),
    ("trainer.seed=1764756000000000000", "trainer.seed: must lie in [0, 4294967295]"),
    ("logging.report_to=[wandbb]", "logging.report_to: 'wandbb' is not a tracker"),
])
def test_mistakes_name_the_key(tmp_path, override, message):
    path = write(tmp_path, {"rollout": {"steps": 8, "max_completion_length": 16, "block_length": 4}})
    with pytest.raises(UserError) as err:
        load_config(path, list(override) if isinstance(override, tuple) else [override])
    assert message in str(err.value)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads `1e-5` as text (YAML 1.1 wants 1.0e-5); a number field takes it as the number it spells
    path = tmp_path / "r.yaml"
    path.write_text("optimizer:\n  learning_rate: 1e-5\nalgorithm:\n  beta: 4E-2\n")
    cfg = load_config(str(path), ["optimizer.adam_epsilon=1e-6"])
    assert cfg.optimizer.learning_rate == 1e-5 and cfg.algorithm.beta == 0.04 and cfg.optimizer.adam_epsilon == 1e-6
    with pytest.raises(UserError, match="optimizer.learning_rate: expected a number, got '1e-5x'"):
        load_config(None, ["optimizer.learning_rate=1e-5x"])


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("trainer:\n  max_steps: 3\n  seed: 1\nrollout:\n  steps: 8\ntrainer:\n  output_dir: x\n")
    with pytest.raises(UserError, match=r"dup.yaml: not valid YAML .*key 'trainer' appears twice \(lines 1 and 6\)"):
        load_config(str(path))
    path.write_text("base: &b {steps: 8}\nrollout:\n  <<: *b\n  max_completion_length: 8\n")  # merges still work
    assert read_yaml(str(path))["rollout"] == {"steps": 8, "max_completion_length": 8}


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="recipe file .* does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    binary = tmp_path / "data.parquet"  # a data file where the recipe goes
    binary.write_bytes(b"PAR1\x15\x04\x15\xa0\xff\xfe")
    with pytest.raises(UserError, match="data.parquet: not a text file, so not a YAML recipe"):
        load_config(str(binary))


def test_sft_schema(tmp_path):
    cfg = load_config(write(tmp_path, {"sft": {"max_completion_length": 32}}), ["trainer.max_steps=2"],
                      kind=SFTConfig)
    assert cfg.sft.max_completion_length == 32 and cfg.trainer.max_steps == 2


def test_every_field_is_documented():
    for kind in (RLConfig, SFTConfig):
        undocumented = [k for k, text in help_texts(kind).items() if not text]
        assert not undocumented, undocumented


def test_validate_cli_exit_codes(tmp_path):
    """`validate` says whether the run can start: the recipe's keys and values, and what the run reads before its
    first step (the model directory, the data, the reward functions), without loading the model."""
    from tracerl.models import build_tiny_model

    build_tiny_model("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    good = write(tmp_path, {"rewards": [{"fn": "math"}], "rollout": {"steps": 8, "max_completion_length": 8},
                            "model": {"path": str(tmp_path / "model")},
                            "data": {"train_files": [str(tmp_path / "train.jsonl")]}})

    def validate(*overrides):
        return subprocess.run([sys.executable, "-m", "tracerl", "validate", good, *overrides], capture_output=True,
                              text=True)

    ok = validate("trainer.max_steps=4")
    assert ok.returncode == 0 and "max_steps: 4" in ok.stdout and "1 training rows, rewards math" in ok.stderr
    for override, message in [("trainer.max_step=4", "did you mean trainer.max_steps?"),
                              (f"model.path={tmp_path / 'none'}", "model.path: "),
                              ("rewards=[{fn: mathh}]", "rewards: "),
                              ("rewards=[{fn: sudoku}]", "rewards: 'sudoku' reads column 'puzzle' or 'Puzzle', which "
                               "the training data lacks"),
                              (f"data.train_files=[{tmp_path / 'none.jsonl'}]", "none.jsonl' does not exist")]:
        bad = validate(override)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (override, bad.stderr)


@pytest.mark.parametrize("override,message", [
    ("trainer.eval_steps=5", "trainer.eval_steps: unknown key"),
    ("distributed.deepspeed=recipes/deepspeed/zero2.json", "distributed: unknown key"),
    ("trainer.num_generations=4", "trainer.num_generations: unknown key"),
])
def test_sft_refuses_rl_only_keys(tmp_path, override, message):
    from tracerl.config import SFTConfig

    path = write(tmp_path, {"sft": {"max_completion_length": 8}})
    with pytest.raises(UserError, match=message):
        load_config(path, [override], kind=SFTConfig)


def test_choices_are_declared_once_as_literal_types():
    """The loader reads a field's choices from its Literal type; `validate` names them."""
    from tracerl.choices import Remasking, options
    from tracerl.rollout.config import REMASKING

    assert options(Remasking) == REMASKING
    with pytest.raises(UserError, match="algorithm.kl_estimator: 'k4' is not one of k1, k2, k3"):
        load_config(None, ["algorithm.kl_estimator=k4"])


def test_an_override_given_twice_is_an_error_not_the_last_one_silently():
    with pytest.raises(UserError, match=r"override trainer.max_steps is given twice \('trainer.max_steps=3' and "
                                        r"'trainer.max_steps=30'\)"):
        load_config(None, ["trainer.max_steps=3", "algorithm.beta=0.1", "trainer.max_steps=30"])


def test_a_section_with_every_key_commented_out_keeps_its_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rollout:\n  # steps: 8\ntrainer:\n  max_steps: 3\n")
    cfg = load_config(str(path))
    assert cfg.rollout == RLConfig().rollout and cfg.trainer.max_steps == 3


def test_a_hash_in_an_override_is_text_not_a_yaml_comment():
    cfg = load_config(None, ["model.system_prompt=#1 rule: be brief", "data.prompt_template=Q{question} #",
                             "trainer.output_dir=runs/#3"])
    assert cfg.model.system_prompt == "#1 rule: be brief"
    assert load_config(None, ["data.prompt_template={question} #1 rule"]).data.prompt_template == "{question} #1 rule"
    assert load_config(None, ['rewards=[{fn: "#sharp.py:f"}]']).rewards[0].fn == "#sharp.py:f"  # quoted: YAML's
    assert cfg.data.prompt_template == "Q{question} #"
    assert cfg.trainer.output_dir == "runs/#3"
    with pytest.raises(UserError, match=r"trainer.max_steps"):
        load_config(None, ["trainer.max_steps=3 # three"])  # not silently 3
    with pytest.raises(UserError, match=r"trainer.output_dir: '' is empty"):
        load_config(None, ["trainer.output_dir="])
