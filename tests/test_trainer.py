"""The RL loop end to end on tiny models: invariances, exact resume, LoRA reference, and learning."""

import copy

import pytest
import torch

from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
from tracerl.errors import UserError
from tracerl.models import build_tiny_model
from tracerl.rollout import RolloutConfig
from tracerl.tracking import read_metrics
from tracerl.trainer import RLTrainer

ROWS = [{"prompt": p, "target": "a"} for p in ["hello", "abc", "xyz", "the", "q"]]


def frac_target(prompts, completions, target, **kwargs):
    """Toy reward: share of the completion made of the row's target character."""
    return [c.count(t) / 16 for c, t in zip(completions, target)]


def distinct_chars(prompts, completions, **kwargs):
    """A reward with spread in every group, so every step has a gradient."""
    return [len(set(c)) / 16 for c in completions]


def make_config(tmp_path, block: bool, **sections) -> RLConfig:
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=16, steps=8, block_length=None if block else 8),
        algorithm=AlgorithmConfig(),
        optimizer=OptimizerConfig(learning_rate=3e-3),
        trainer=TrainerConfig(max_steps=2, num_generations=4, per_device_train_batch_size=8,
                              output_dir=str(tmp_path / "run"), logging_steps=100),
    )
    for name, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, name), k, v)
    return cfg


def tiny(block: bool, seed: int = 0):
    return build_tiny_model("qwen3" if block else "llama", block_size=4 if block else None, seed=seed)


@pytest.mark.parametrize("block", [False, True])
def test_gradient_accumulation_invariance(tmp_path, block):
    """8 completions in one micro-batch == 8 micro-batches of 1 completion (TRL's 1x8 == 8x1)."""
    grads = []
    for per_device, ga in [(8, 1), (1, 8)]:
        model = tiny(block)
        cfg = make_config(tmp_path, block, trainer={"per_device_train_batch_size": per_device,
                                                    "gradient_accumulation_steps": ga},
                          algorithm={"loss_aggregation": "step-mean"})
        RLTrainer(cfg, model, distinct_chars, ROWS).train_step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_first_ratio_is_one_with_rollout_logprobs(tmp_path):
    cfg = make_config(tmp_path, True, algorithm={"old_logprobs": "rollout", "num_iterations": 2})
    trainer = RLTrainer(cfg, tiny(True), distinct_chars, ROWS)
    seen, real = [], trainer._epoch

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    trainer._epoch = spy
    trainer.train_step()
    assert seen[0]["policy/ratio_max"] == pytest.approx(1.0, abs=1e-4)  # replay == rollout states
    assert seen[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(seen[1]["policy/ratio_mean"] - 1.0) > 1e-6  # second epoch: the policy has moved


@pytest.mark.parametrize("value", [False, True])
def test_resume_equals_uninterrupted_run(tmp_path, value):
    alg = {"use_value_model": value}
    full = RLTrainer(make_config(tmp_path / "a", True, trainer={"max_steps": 4}, algorithm=alg),
                     tiny(True), distinct_chars, ROWS).train()
    RLTrainer(make_config(tmp_path / "b", True, trainer={"max_steps": 2}, algorithm=alg),
              tiny(True), distinct_chars, ROWS).train()
    ckpt = tmp_path / "b" / "run" / "checkpoint-2"
    resumed = RLTrainer(make_config(tmp_path / "b", True, algorithm=alg,
                                    trainer={"max_steps": 4, "resume_from_checkpoint": str(ckpt)}),
                        tiny(True), distinct_chars, ROWS).train()
    assert len(resumed) == 2
    for key in ("reward", "loss", "grad_norm", "entropy"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in full[2:]], rel=1e-5, abs=1e-7), key
    logged = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [row["step"] for row in logged] == [1, 2, 3, 4]


def test_lora_dropout_runs_repeat_and_resume_exactly(tmp_path):
    """LoRA dropout draws from the global generator: seeded from trainer.seed, one seed gives one run, and a run
    resumed in a new process (model handed over in train mode) repeats the straight run's step 2 exactly."""
    from tracerl.config import PeftSection
    from tracerl.peft_utils import apply_lora

    def lora_model():
        model = apply_lora(tiny(False), PeftSection(r=4, lora_dropout=0.3), seed=0)
        return model.train()  # as a user's model may arrive

    def run(out, **trainer):
        torch.manual_seed(len(str(out)))  # whatever the process did before
        cfg = make_config(out, False, trainer=trainer)
        return RLTrainer(cfg, lora_model(), distinct_chars, ROWS).train()

    straight, again = run(tmp_path / "a", max_steps=2), run(tmp_path / "b", max_steps=2)
    for key in ("loss", "grad_norm", "entropy", "policy/ratio_max"):
        assert [m[key] for m in straight] == [m[key] for m in again], key
    run(tmp_path / "c", max_steps=1)
    resumed = run(tmp_path / "c", max_steps=2,
                  resume_from_checkpoint=str(tmp_path / "c" / "run" / "checkpoint-1"))
    for key in ("loss", "grad_norm", "entropy", "policy/ratio_max"):
        assert resumed[0][key] == pytest.approx(straight[1][key], rel=1e-6, abs=1e-8), key


def test_a_run_extended_by_resuming_with_more_steps_follows_the_new_schedule(tmp_path):
    """1 step of a 1-step linear schedule ends at lr 0; resumed with max_steps 2, step 2 must train at the 2-step
    schedule's rate (lr / 2), not at the rate the optimizer last used: the weights equal a straight 2-step run's."""
    def run(out, **trainer):
        cfg = make_config(out, False, trainer=trainer, optimizer={"lr_scheduler_type": "linear", "warmup_ratio": 0.0})
        t = RLTrainer(cfg, tiny(False), distinct_chars, ROWS)
        return t, t.train()

    straight, history = run(tmp_path / "a", max_steps=2)
    run(tmp_path / "b", max_steps=1)
    resumed, extended = run(tmp_path / "b", max_steps=2,
                            resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-1"))
    assert extended[0]["learning_rate"] == history[1]["learning_rate"] == 0.0  # after step 2, for a step 3
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_metrics_file_holds_one_run(tmp_path):
    config = make_config(tmp_path, False, trainer={"max_steps": 2, "save_steps": 1})
    RLTrainer(config, tiny(False), distinct_chars, ROWS).train()
    run = tmp_path / "run"
    # a crash after step 2 would leave rows the resumed run redoes; so does a row cut short
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward": 9.0}\n{"step": 4, "rew')
    resumed = make_config(tmp_path, False, trainer={"max_steps": 3, "resume_from_checkpoint": str(run / "checkpoint-1")})
    RLTrainer(resumed, tiny(False), distinct_chars, ROWS).train()
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]  # 2 and 3 redone, not doubled
    assert read_metrics(run / "metrics.jsonl")[-1]["reward"] != 9.0
    # a fresh run into the same directory starts its own file; the old one is kept beside it
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 1}), tiny(False), distinct_chars, ROWS).train()
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1]
    assert [m["step"] for m in read_metrics(run / "metrics.prev-1.jsonl")] == [1, 2, 3]


def test_lora_reference_is_the_adapter_disabled(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny(False)
    original = copy.deepcopy(model.backbone)
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    cfg = make_config(tmp_path, False, algorithm={"beta": 0.1}, optimizer={"learning_rate": 1e-2})
    trainer = RLTrainer(cfg, model, distinct_chars, ROWS)
    assert trainer.ref_model is None  # no second copy under LoRA
    history = [trainer.train_step() for _ in range(2)]
    ids = torch.tensor([[5, 6, 7, 8]])
    with model.backbone.disable_adapter():
        disabled = model.logits(ids)
    ref = original(input_ids=ids, attention_mask=torch.zeros(1, 1, 4, 4)).logits
    torch.testing.assert_close(disabled, ref, atol=1e-5, rtol=1e-5)
    assert (model.logits(ids) - ref).abs().max() > 1e-4  # the adapter did move the policy
    assert history[-1]["kl"] > 0


def test_bad_combinations_fail_early(tmp_path):
    with pytest.raises(UserError, match="not a multiple of trainer.num_generations=3"):
        RLTrainer(make_config(tmp_path, False, trainer={"num_generations": 3}), tiny(False), frac_target, ROWS)
    with pytest.raises(UserError, match="old_logprobs=rollout needs algorithm.estimator=trace"):
        RLTrainer(make_config(tmp_path, False, algorithm={"estimator": "coupled", "old_logprobs": "rollout"}),
                  tiny(False), frac_target, ROWS)


@pytest.mark.parametrize("block,value", [(False, False), (False, True), (True, False), (True, True)])
def test_tracerl_learns_a_toy_reward(tmp_path, block, value):
    """Reward = share of 'a' in the completion: rises clearly within a few dozen steps."""
    cfg = make_config(tmp_path, block, trainer={"max_steps": 25, "num_generations": 8,
                                                "per_device_train_batch_size": 16},
                      algorithm={"use_value_model": value})
    history = RLTrainer(cfg, tiny(block), frac_target, ROWS).train()
    start = sum(h["reward"] for h in history[:3]) / 3
    end = sum(h["reward"] for h in history[-3:]) / 3
    assert end > start + 0.15, (start, end)


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("estimator,rows", [("d1", 1), ("coupled", 3), ("wd1", 1)])
def test_published_estimators_train(tmp_path, estimator, rows, block):
    cfg = make_config(tmp_path, block, algorithm={"estimator": estimator, "num_iterations": 2},
                      trainer={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                               "replay_batch_size": 4})
    history = RLTrainer(cfg, tiny(block), distinct_chars, ROWS).train()
    assert len(history) == 2 and history[-1]["grad_norm"] > 0
    assert history[-1]["trajectory/replay_forwards_per_response"] == rows


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    """Reusing an output_dir must not mix two runs' checkpoints: left in place, the earlier run's would be
    overwritten step by step, outlive this run beside its own, be what `latest` resumes, and make
    save_total_limit delete this run's newest checkpoint instead of theirs."""
    run = tmp_path / "run"
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 3, "save_steps": 1}), tiny(False), distinct_chars,
              ROWS).train()
    earlier = (run / "checkpoint-1" / "model" / "model.safetensors").read_bytes()
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 1, "save_total_limit": 1}), tiny(False, seed=1),
              distinct_chars, ROWS).train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # this run's, kept by the limit
    aside = run / "checkpoints.prev-1"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert (aside / "checkpoint-1" / "model" / "model.safetensors").read_bytes() == earlier
    assert (run / "checkpoint-1" / "model" / "model.safetensors").read_bytes() != earlier


def test_checkpoint_housekeeping_leaves_the_users_folders_and_the_new_branch_alone(tmp_path):
    """Only checkpoint-<step> directories holding trainer_state.json are TraceRL's: a user's checkpoint-best-500 or
    checkpoint-2024-06-30 is never moved, resumed or pruned. Resuming from an earlier checkpoint abandons the later
    ones: they are set aside, so save_total_limit keeps the new branch's checkpoints, not the old branch's."""
    run = tmp_path / "run"
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 3, "save_steps": 1}), tiny(False), distinct_chars,
              ROWS).train()
    best, dated = run / "checkpoint-best-500", run / "checkpoint-2024-06-30"
    best.mkdir()
    (best / "trainer_state.json").write_text("{}")  # even with a state file: not a checkpoint-<step> name
    dated.mkdir()
    (dated / "README").write_text("mine")
    resumed = make_config(tmp_path, False, trainer={"max_steps": 2, "save_steps": 1, "save_total_limit": 1,
                                                    "resume_from_checkpoint": str(run / "checkpoint-1")})
    RLTrainer(resumed, tiny(False), distinct_chars, ROWS).train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-2024-06-30",
                                                                "checkpoint-best-500"]
    assert sorted(p.name for p in (run / "checkpoints.prev-1").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (dated / "README").read_text() == "mine"
    latest = make_config(tmp_path, False, trainer={"max_steps": 3, "resume_from_checkpoint": "latest"})
    assert len(RLTrainer(latest, tiny(False), distinct_chars, ROWS).train()) == 1  # from checkpoint-2, not best-500
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 1}), tiny(False), distinct_chars, ROWS).train()
    assert best.is_dir() and dated.is_dir()  # a fresh run sets aside only TraceRL's checkpoints


def test_resuming_into_another_runs_directory_sets_that_run_aside(tmp_path):
    """A checkpoint from elsewhere resumed into an output_dir holding another run: that run's checkpoints and
    metrics are set aside (as for a fresh run), never pruned, overwritten or truncated."""
    other = tmp_path / "other" / "run"
    RLTrainer(make_config(tmp_path / "other", False, trainer={"max_steps": 3, "save_steps": 1}), tiny(False, seed=1),
              distinct_chars, ROWS).train()
    before = (other / "checkpoint-3" / "model" / "model.safetensors").read_bytes()
    RLTrainer(make_config(tmp_path / "mine", False, trainer={"max_steps": 1}), tiny(False), distinct_chars,
              ROWS).train()
    into_other = make_config(tmp_path / "other", False, trainer={
        "max_steps": 3, "save_steps": 1, "save_total_limit": 1,
        "resume_from_checkpoint": str(tmp_path / "mine" / "run" / "checkpoint-1")})
    RLTrainer(into_other, tiny(False), distinct_chars, ROWS).train()
    aside = other / "checkpoints.prev-1"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert (aside / "checkpoint-3" / "model" / "model.safetensors").read_bytes() == before
    assert [m["step"] for m in read_metrics(other / "metrics.prev-1.jsonl")] == [1, 2, 3]
    assert [m["step"] for m in read_metrics(other / "metrics.jsonl")] == [2, 3]
    assert sorted(p.name for p in other.glob("checkpoint-*")) == ["checkpoint-3"]


def test_a_finished_run_resumed_again_does_nothing_and_one_past_max_steps_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 2}), tiny(False), distinct_chars, ROWS).train()
    stamp = (run / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    again = make_config(tmp_path, False, trainer={"max_steps": 2, "resume_from_checkpoint": "latest"})
    assert RLTrainer(again, tiny(False), distinct_chars, ROWS).train() == []
    assert "nothing to train" in capsys.readouterr().out
    assert (run / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == stamp
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]
    fewer = make_config(tmp_path, False, trainer={"max_steps": 1, "resume_from_checkpoint": "latest"})
    with pytest.raises(UserError, match=r"checkpoint-2 is at step 2, past trainer.max_steps=1"):
        RLTrainer(fewer, tiny(False), distinct_chars, ROWS).train()


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "trainer_state.json").write_text("{not json"), r"trainer_state.json cannot be read as JSON"),
    (lambda c: (c / "trainer_state.json").write_text("[]"), r"is not a TraceRL checkpoint's state"),
    (lambda c: (c / "training_state.pt").write_bytes(b"garbage"), r"training_state.pt cannot be read"),
    (lambda c: (c / "training_state.pt").unlink(), r"training_state.pt is missing; the checkpoint is incomplete"),
])
def test_a_damaged_checkpoint_is_named_not_a_traceback(tmp_path, damage, message):
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 1}), tiny(False), distinct_chars, ROWS).train()
    damage(tmp_path / "run" / "checkpoint-1")
    config = make_config(tmp_path, False, trainer={"max_steps": 2, "resume_from_checkpoint": "latest"})
    with pytest.raises(UserError, match=r"trainer.resume_from_checkpoint: .*" + message):
        RLTrainer(config, tiny(False), distinct_chars, ROWS).train()


def test_resuming_with_other_data_or_seed_is_refused(tmp_path):
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 1}), tiny(False), distinct_chars, ROWS).train()
    latest = {"max_steps": 2, "resume_from_checkpoint": "latest"}
    with pytest.raises(UserError, match=rf"the training data's rows {len(ROWS)} -> 2"):
        RLTrainer(make_config(tmp_path, False, trainer=latest), tiny(False), distinct_chars, ROWS[:2]).train()
    with pytest.raises(UserError, match=r"trainer.seed 0 -> 5"):
        RLTrainer(make_config(tmp_path, False, trainer={**latest, "seed": 5}), tiny(False), distinct_chars,
                  ROWS).train()


@pytest.mark.parametrize("limit, kept", [(1, [4]), (2, [3, 4]), (5, [1, 2, 3, 4])])
def test_save_total_limit_keeps_the_newest(tmp_path, limit, kept):
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 4, "save_steps": 1, "save_total_limit": limit}),
              tiny(False), distinct_chars, ROWS).train()
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*")) == kept


def test_resuming_another_models_checkpoint_names_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 1}), tiny(False), distinct_chars, ROWS).train()
    other = build_tiny_model("llama", hidden_size=32)
    config = make_config(tmp_path, False, trainer={"max_steps": 2, "resume_from_checkpoint": "latest"})
    with pytest.raises(UserError, match=r"trainer.resume_from_checkpoint: .*checkpoint-1 does not fit this run's "
                                        "model"):
        RLTrainer(config, other, distinct_chars, ROWS).train()


def test_resume_refuses_a_different_number_of_optimizer_steps_per_rl_step(tmp_path):
    """The scheduler counts optimizer steps: resumed under another steps_per_generation its position would no longer
    be step x optimizer steps per step, and the lr curve would end early or late."""
    RLTrainer(make_config(tmp_path, False, trainer={"max_steps": 1, "steps_per_generation": 2}),
              tiny(False), distinct_chars, ROWS).train()
    config = make_config(tmp_path, False, trainer={"max_steps": 2, "steps_per_generation": 1,
                                                   "resume_from_checkpoint": "latest"})
    with pytest.raises(UserError, match=r"checkpoint-1: .*trainer.steps_per_generation / "
                                        r"trainer.gradient_accumulation_steps: 2 -> 1"):
        RLTrainer(config, tiny(False), distinct_chars, ROWS).train()


def test_rows_with_different_columns_give_every_batch_every_column(tmp_path):
    """A mixed-task list of rows (math rows with `answer`, code rows with `tests`): whichever rows a batch draws,
    the rewards get both columns, None where a row has none (as a datasets.Dataset would hold them)."""
    seen = []

    def by_task(prompts, completions, answer, tests, **kwargs):
        seen.append((list(answer), list(tests)))
        return [1.0 if a is not None else None for a in answer]

    rows = [{"prompt": "ab", "answer": "x"}, {"prompt": "cd", "tests": "t"}]
    trainer = RLTrainer(make_config(tmp_path, False, trainer={"per_device_train_batch_size": 4}), tiny(False),
                        by_task, rows)
    trainer.sample_and_score([1])
    trainer.sample_and_score([0])
    assert seen == [([None] * 4, ["t"] * 4), (["x"] * 4, [None] * 4)]


def test_rl_from_an_sft_adapter_keeps_the_sft_model_as_its_reference(tmp_path):
    """model.path an SFT LoRA adapter, peft.r set (TRL's rule): the adapter is merged and a new one trained on top,
    so the KL reference is the SFT model (KL 0 at the first step), and the RL adapter is saved with the adapter it
    was trained on top of, which load_adapter merges first. peft.r unset: the loaded adapter trains on and the
    reference is the pre-SFT base, which is warned about."""
    from tracerl.build import build_model
    from tracerl.config import ModelConfig, PeftSection, SFTConfig, SFTSection, SFTTrainerConfig
    from tracerl.peft_utils import load_adapter
    from tracerl.sft import train_sft

    base = tmp_path / "base"
    tiny(False).save_pretrained(str(base))
    sft = SFTConfig(sft=SFTSection(max_completion_length=4), optimizer=OptimizerConfig(learning_rate=3e-2),
                    trainer=SFTTrainerConfig(max_steps=3, per_device_train_batch_size=4, output_dir=str(tmp_path / "sft"),
                                             logging_steps=1000))
    train_sft(build_model(ModelConfig(path=str(base)), PeftSection(r=4)), [{"prompt": "ab", "completion": "cd"}], sft)
    adapter = tmp_path / "sft" / "final"
    config = make_config(tmp_path, False, algorithm={"beta": 0.1}, trainer={"max_steps": 1})
    model = build_model(ModelConfig(path=str(adapter)), PeftSection(r=4))
    trainer = RLTrainer(config, model, distinct_chars, ROWS)
    assert trainer.train()[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    saved = tmp_path / "run" / "checkpoint-1" / "model"
    assert (saved / "tracerl_merged_adapters.json").is_file()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(saved).logits(ids), trainer.model.logits(ids))
    with pytest.warns(UserWarning, match="the KL reference is the model with its adapter disabled"):
        RLTrainer(config, build_model(ModelConfig(path=str(adapter))), distinct_chars, ROWS)
    # a later SFT run writing its final/ in the same place is not merged in the first one's stead
    train_sft(build_model(ModelConfig(path=str(base)), PeftSection(r=4)), [{"prompt": "ab", "completion": "dd"}], sft)
    with pytest.raises(UserError, match=r"trained on top of the LoRA adapter in .*final.*whose weights have changed"):
        load_adapter(saved)


def test_a_prompt_drawn_twice_in_one_step_gets_two_different_groups(tmp_path):
    """3 rows and 4 prompts per step: one prompt is drawn twice. Seeded by (step, row, g) alone its two groups were
    bit-identical, the prompt counted double with nothing new; the second draw has seeds of its own."""
    trainer = RLTrainer(make_config(tmp_path, False, trainer={"per_device_train_batch_size": 16}), tiny(False),
                        distinct_chars, ROWS[:3])
    indices, repeats = trainer._step_draw()
    assert len(indices) == 4 and sorted(repeats) == [0, 0, 0, 1]
    batch = trainer.sample_and_score(indices, repeats)
    ids = batch.traj.response_ids.view(4, 4, -1)  # [prompt, g, L]
    twice = [j for j, i in enumerate(indices) if indices.count(i) == 2]
    assert not torch.equal(ids[twice[0]], ids[twice[1]])
    first = [j for j, r in enumerate(repeats) if r == 0]  # a first draw keeps the seeds it always had
    alone = trainer.sample_and_score([indices[first[0]]]).traj.response_ids
    assert torch.equal(alone, ids[first[0]])


def _scored_with(trainer, rewards):
    """A real rollout of two prompts x 4 whose rewards are then set by hand, and its replay."""
    from tracerl import credit

    batch = trainer.sample_and_score([0, 1])
    traj = batch.traj
    train_step = credit.shrink_steps(traj.unmask_step, traj.action_mask, 1)
    return traj, torch.tensor(rewards), train_step, trainer._replay(traj, train_step, 0)


def test_dllm_rl_settings_filter_groups_untrain_padding_and_feed_the_z_score_to_the_value_model(tmp_path):
    """dLLM-RL's pass-rate band, post_num 0 and z-scored value-model reward, against its published numbers."""
    cfg = make_config(tmp_path, False, algorithm={
        "use_value_model": True, "value_outcome": "group", "scale_rewards": "group-population",
        "whiten_advantages": False, "pass_rate_filter": [0.2, 0.8], "trained_pad_tokens": 0})
    trainer = RLTrainer(cfg, tiny(False), frac_target, ROWS)
    traj, rewards, train_step, replay = _scored_with(trainer, [1.0, 0, 0, 0, 1, 1, 1, 1])
    pad = trainer.model.pad_token_id
    traj.response_ids[0, 3:6] = pad  # row 0 wrote padding at positions 3-5: none of it is trained (post_num 0)
    adv, _ = trainer.assign_credit(traj, rewards, train_step, replay)
    trained = adv.token_mask
    assert not trained[4:].any()  # group 2 solved 4 of 4: outside [0.2, 0.8], dropped
    assert not trained[0, 3:6].any() and trained[0, :3].all()
    not_pad = traj.action_mask[:4] & (traj.response_ids[:4] != pad)
    assert torch.equal(trained[:4], not_pad)
    # gamma = lam = 1: every trained token's value target is the row's z-score, dLLM-RL's [sqrt3, -1/sqrt3 x 3]
    r3 = 3 ** 0.5
    for row, z in enumerate([r3, -1 / r3, -1 / r3, -1 / r3]):
        torch.testing.assert_close(adv.returns[row][trained[row]], torch.full((int(trained[row].sum()),), z),
                                   atol=1e-5, rtol=0)
    assert adv.metrics["trajectory/pass_rate_kept"] == 0.5
    # post_num 1: the first pad token of a completion stays trained
    trainer.config.algorithm.trained_pad_tokens = 1
    adv, _ = trainer.assign_credit(traj, rewards, train_step, replay)
    assert adv.token_mask[0, 3] and not adv.token_mask[0, 4:6].any()


def test_bad_dllm_rl_settings_name_the_key(tmp_path):
    for alg, key in [({"pass_rate_filter": [0.8, 0.2]}, "pass_rate_filter"),
                     ({"pass_rate_filter": [0.2]}, "pass_rate_filter"),
                     ({"trained_pad_tokens": -1}, "trained_pad_tokens")]:
        with pytest.raises(UserError, match=f"algorithm.{key}"):
            make_config(tmp_path, False, algorithm=alg).validate()


def test_steps_per_generation_takes_one_optimizer_step_per_mini_batch_as_trl(tmp_path):
    """8 completions per RL step, an optimizer step every 4 (TRL's steps_per_generation = 2 x accumulation): the
    first step is exactly a 4-completion run's step on the same first prompt (same seeds, the loss normalised over
    its own mini-batch), and a second step follows within the same RL step."""
    cfg_a = make_config(tmp_path, False, trainer={"per_device_train_batch_size": 4, "steps_per_generation": 2,
                                                  "max_steps": 1})
    def recording(trainer):  # the gradients each optimizer step is given
        grads, step = [], trainer.policy.step

        def record(max_grad_norm):
            grads.append([p.grad.clone() for p in trainer.model.parameters() if p.grad is not None])
            return step(max_grad_norm)

        trainer.policy.step = record
        return grads

    a = RLTrainer(cfg_a, tiny(False), distinct_chars, ROWS)
    grads_a = recording(a)
    a.train_step()
    assert len(grads_a) == 2 and a.scheduler.last_epoch == 2
    b = RLTrainer(make_config(tmp_path / "b", False, trainer={"per_device_train_batch_size": 4, "max_steps": 1}),
                  tiny(False), distinct_chars, ROWS)
    grads_b = recording(b)
    b.train_step()
    assert len(grads_b) == 1
    for ga, gb in zip(grads_a[0], grads_b[0]):  # its own normalisation: a whole-batch one would halve it
        torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-4)
    assert any(not torch.allclose(g, h) for g, h in zip(grads_a[0], grads_a[1]))


def test_kl_against_the_old_policy_needs_no_reference_and_acts_once_the_policy_has_stepped(tmp_path):
    cfg = make_config(tmp_path, False, algorithm={"beta": 0.5, "kl_against": "old", "num_iterations": 2})
    trainer = RLTrainer(cfg, tiny(False), distinct_chars, ROWS)
    assert trainer.ref_model is None
    epochs = []
    epoch = trainer._epoch
    trainer._epoch = lambda *args: epochs.append(epoch(*args)) or epochs[-1]
    trainer.train_step()
    assert epochs[0]["kl"] == 0.0 and epochs[1]["kl"] > 0.0  # zero until the first update moved the policy
    with pytest.raises(UserError, match="kl_against=old does not go with algorithm.estimator=wd1"):
        make_config(tmp_path, False, algorithm={"beta": 0.1, "kl_against": "old", "estimator": "wd1"}).validate()
    with pytest.raises(UserError, match="trainer.steps_per_generation=3 is not a multiple of"):
        make_config(tmp_path, False, trainer={"steps_per_generation": 3, "gradient_accumulation_steps": 2}).validate()


def test_mini_batch_metrics_are_per_step_and_the_sampler_gap_is_measured_before_any_step(tmp_path):
    """With two optimizer steps per RL step: the logged loss is the mean of the steps' losses (not their sum), and
    rollout/* compares the sampler with the model it ran, not with the policy after the first step."""
    base = {"per_device_train_batch_size": 4, "max_steps": 1}
    runs = {}
    for name, trainer_cfg, lr in [("one", {"gradient_accumulation_steps": 2}, 1e-12),
                                  ("two", {"steps_per_generation": 2}, 1e-12),
                                  ("two_fast", {"steps_per_generation": 2}, 3e-2)]:
        cfg = make_config(tmp_path / name, False, trainer={**base, **trainer_cfg},
                          algorithm={"loss_aggregation": "sequence-sum"}, optimizer={"learning_rate": lr})
        runs[name] = RLTrainer(cfg, tiny(False), distinct_chars, ROWS).train_step()
    assert runs["two"]["loss"] == pytest.approx(runs["one"]["loss"], rel=1e-5)
    assert runs["two_fast"]["rollout/logprob_gap_mean"] < 1e-5  # exact sampler: no gap before the first step
    assert runs["two_fast"]["rollout/greedy_mismatch"] == 0.0


def test_sequence_sum_counts_only_the_groups_the_pass_rate_filter_keeps(tmp_path):
    # dLLM-RL removes the filtered groups before batching: the normaliser is L x the sequences that remain
    cfg = make_config(tmp_path, False, algorithm={"loss_aggregation": "sequence-sum", "pass_rate_filter": [0.2, 0.8]})
    trainer = RLTrainer(cfg, tiny(False), frac_target, ROWS)
    traj, rewards, train_step, replay = _scored_with(trainer, [1.0, 0, 0, 0, 1, 1, 1, 1])
    adv, _ = trainer.assign_credit(traj, rewards, train_step, replay)
    seen = {}
    trainer._epoch = lambda trainable, objectives, rows, state: seen.update(w=state.weights) or {}
    trainer.update(traj, train_step, replay, adv, None)
    w = seen["w"]
    assert torch.all(w[:4][adv.token_mask[:4]] == 1.0 / (traj.response_length * 4)) and not w[4:].any()


def _dllm_rl_rounds(step_map: torch.Tensor, block: torch.Tensor) -> list[torch.Tensor]:
    """dLLM-RL's training rows of one response (train/rl_sdar.py one_round_vectorized, commit 10b4fd1): round after
    round, every block gives up the positions at its smallest remaining step; -1 = no step. Returns each round's
    p_mask [L]."""
    remaining, rounds = step_map.clone(), []
    while (remaining >= 0).any():
        p_mask = torch.zeros_like(remaining, dtype=torch.bool)
        for b in block.unique():
            in_block = (block == b) & (remaining >= 0)
            if in_block.any():
                p_mask |= in_block & (remaining == remaining[in_block].min())
        rounds.append(p_mask)
        remaining = torch.where(p_mask, -1, remaining)
    return rounds


def test_state_sum_is_dllm_rl_block_diffusion_normaliser(tmp_path):
    """dLLM-RL's rl_sdar.py divides each training row's sum by the response length L1 and the rows' total by their
    count B; a row is one round (every block's next step), and rows left without a trained token (post_num) go.
    So a token's weight is 1 / (L1 x the kept rounds of the kept groups), not 1 / (L1 x responses)."""
    cfg = make_config(tmp_path, True, algorithm={"loss_aggregation": "state-sum", "pass_rate_filter": [0.2, 0.8],
                                                 "trained_pad_tokens": 0},
                      rollout={"threshold": 0.01, "steps": 16})  # dynamic: a varying number of steps per block
    trainer = RLTrainer(cfg, tiny(True), frac_target, ROWS)
    traj, rewards, train_step, replay = _scored_with(trainer, [1.0, 0, 0, 0, 1, 1, 1, 1])
    traj.response_ids[1, -5:] = trainer.model.pad_token_id  # row 1 ends in padding: not trained (post_num 0)
    adv, _ = trainer.assign_credit(traj, rewards, train_step, replay)
    seen = {}
    trainer._epoch = lambda trainable, objectives, rows, state: seen.update(w=state.weights) or {}
    trainer.update(traj, train_step, replay, adv, None)
    L, block = traj.response_length, traj.block_of_position()
    rows_per_response = []
    for n in range(4):  # group 2 (rows 4-7) solved 4 of 4: dropped before batching
        rounds = _dllm_rl_rounds(torch.where(traj.action_mask[n], train_step[n], -1), block[n])
        rows_per_response.append(sum(bool((p & adv.token_mask[n]).any()) for p in rounds))
    assert len(set(rows_per_response)) > 1  # responses differ in rounds: sequence-sum's L x 4 would not match
    w = seen["w"]
    torch.testing.assert_close(w[:4][adv.token_mask[:4]], torch.full((int(adv.token_mask[:4].sum()),),
                               1.0 / (L * sum(rows_per_response))), rtol=1e-6, atol=0)
    assert not w[4:].any() and not w[:4][~adv.token_mask[:4]].any()
    with pytest.raises(UserError, match="loss_aggregation=state-sum needs algorithm.estimator=trace"):
        make_config(tmp_path, True, algorithm={"loss_aggregation": "state-sum", "estimator": "d1"}).validate()


def test_bad_mini_batch_and_kl_combinations_name_the_keys(tmp_path):
    for sections, message in [
        ({"trainer": {"steps_per_generation": 2}, "algorithm": {"loss_type": "reinforce"}},
         "steps_per_generation > trainer.gradient_accumulation_steps needs algorithm.loss_type=ppo"),
        ({"algorithm": {"beta": 0.1, "kl_against": "old"}}, "kl_against=old with one optimizer step"),
        ({"algorithm": {"value_outcome": "group"}}, "value_outcome=group needs algorithm.use_value_model"),
    ]:
        with pytest.raises(UserError, match=message):
            make_config(tmp_path, False, **sections).validate()


def test_a_bare_reward_function_is_checked_like_a_reward_set(tmp_path):
    from reward_models import RewardError

    def short(prompts, completions, **kwargs):
        return [0.5] * (len(completions) - 1)

    def text(prompts, completions, **kwargs):
        return ["0.9"] * len(completions)  # once read as 0.9 without a word

    for fn, message in [(short, r"reward 'short' on all 8 samples.*returned 7 values"),
                        (text, r"reward 'text' at sample 0: returned str '0.9'")]:
        trainer = RLTrainer(make_config(tmp_path, False), tiny(False), fn, ROWS)
        with pytest.raises(RewardError, match=message):
            trainer.train_step()
