"""Rewards are called as TRL 1.16's GRPOTrainer calls them (completions as messages for conversational prompts,
completion_ids, a TrainerState, log_metric / log_extra), a hung sync reward never keeps the process alive, and a
reward that edits its arguments in place changes nothing the trainer or the dataset sees."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers.trainer_callback import TrainerState

from reward_models import RewardError, RewardSet
from reward_models.combine import MAX_ABANDONED
from tracerl.config import OptimizerConfig, RLConfig, TrainerConfig
from tracerl.models import build_tiny_model
from tracerl.rollout import RolloutConfig, Trajectory
from tracerl.scoring import completion_ids, sample_and_score
from tracerl.trainer import RLTrainer

ROLLOUT = RolloutConfig(max_completion_length=8, steps=4, block_length=4, temperature=1.0)
CHAT = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", seed=0)


def _score(model, rows, reward_fn, chat=False, seeds=((11, 12),), **kwargs):
    return sample_and_score(model, rows, ROLLOUT, reward_fn, 2, [list(s) for s in seeds], use_chat_template=chat,
                            **kwargs)


class Spy:
    """A TRL-style reward that records what it was given."""

    def __init__(self):
        self.seen = {}

    def __call__(self, prompts, completions, **kwargs):
        self.seen.update(prompts=prompts, completions=completions, **kwargs)
        return [0.0] * len(completions)


# ---- 1. TRL's arguments ----------------------------------------------------------------------------------------
def test_conversational_prompts_get_completions_as_assistant_messages(model):
    def trl_length(prompts, completions, **kwargs):  # as TRL's docs write a conversational reward
        return [float(len(c[0]["content"])) for c in completions]

    spy = Spy()
    batch = _score(model, [{"prompt": CHAT}], RewardSet([trl_length, spy]), chat=True)
    assert spy.seen["completions"] == [[{"role": "assistant", "content": t}] for t in batch.completions]
    assert batch.per_function["trl_length"] == [float(len(t)) for t in batch.completions]
    assert batch.completions and all(isinstance(t, str) for t in batch.completions)  # the trainer's texts
    # plain-text prompts keep plain-string completions
    spy = Spy()
    batch = _score(model, [{"prompt": "hi"}], RewardSet([spy]))
    assert spy.seen["completions"] == batch.completions


def test_builtin_rewards_score_conversational_completions_like_plain_ones():
    texts = ["<think>a</think><answer>3*5+1</answer>", "no tags 16", "<answer>5+3+1</answer>"]
    columns = {"nums": [[3, 5, 1]] * 3, "target": [16] * 3}
    specs = ["format", "countdown", {"fn": "length", "kwargs": {"target": 10}}]
    plain = RewardSet(specs)(["p"] * 3, texts, **columns)
    chat = RewardSet(specs)([CHAT] * 3, [[{"role": "assistant", "content": t}] for t in texts], **columns)
    assert chat.per_function.tolist() == plain.per_function.tolist()
    assert plain.per_function[:, 0].tolist() == [1.0, 0.0, 0.0]  # the built-ins did score something


def test_completion_ids_are_cut_after_the_first_eos_keeping_it():
    eos = 9
    response = torch.tensor([[5, 6, eos, eos], [5, 6, 7, 8], [eos, eos, eos, eos]])
    n, length = response.shape
    traj = Trajectory(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
                      response_ids=response, unmask_step=torch.zeros(n, length, dtype=torch.long),
                      action_mask=torch.ones(n, length, dtype=torch.bool), behaviour_logprob=torch.zeros(n, length),
                      block_offset=torch.zeros(n, dtype=torch.long), group_id=torch.arange(n), num_forwards=1,
                      mask_token_id=1, pad_token_id=eos, eos_token_id=eos, block_size=None, block_length=4,
                      temperature=1.0)
    assert completion_ids(traj) == [[5, 6, eos], [5, 6, 7, 8], [eos]]  # TRL: positions <= the first EOS


def test_completion_ids_reach_the_rewards_and_decode_to_the_completions(model):
    spy = Spy()
    batch = _score(model, [{"prompt": "hi"}], RewardSet([spy]))
    ids = spy.seen["completion_ids"]
    assert ids == completion_ids(batch.traj) and all(isinstance(t, int) for row in ids for t in row)
    assert [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids] == batch.completions


def test_trainer_state_is_a_transformers_trainer_state_with_the_rl_step(tmp_path, model):
    spy = Spy()
    cfg = RLConfig(rollout=ROLLOUT, optimizer=OptimizerConfig(learning_rate=1e-3),
                   trainer=TrainerConfig(max_steps=7, num_generations=2, per_device_train_batch_size=2,
                                         output_dir=str(tmp_path)))
    trainer = RLTrainer(cfg, model, RewardSet([spy]), [{"prompt": "hi"}])
    trainer.step = 3
    trainer.sample_and_score([0])
    state = spy.seen["trainer_state"]
    assert isinstance(state, TrainerState)
    assert (state.global_step, state.epoch, state.max_steps) == (3, 0.0, 7)
    assert (state["step"], state["epoch"], state.get("step"), "step" in state) == (3, 0, 3, True)  # the old dict
    # outside training (a standalone evaluation passes no state): global_step -1
    _score(model, [{"prompt": "hi"}], RewardSet([spy]))
    assert isinstance(spy.seen["trainer_state"], TrainerState) and spy.seen["trainer_state"].global_step == -1


def test_log_metric_reaches_the_step_metrics_and_log_extra_is_kept(model):
    def judge(prompts, completions, log_metric, log_extra, **kwargs):
        log_metric("judge/agreement", 0.5)
        log_extra("judge_reason", [f"why {i}" for i in range(len(completions))])
        return [1.0] * len(completions)

    def other(prompts, completions, log_metric, **kwargs):
        log_metric("judge/agreement", torch.tensor(1.0))  # two logs of one name in a step: their mean, as TRL
        return [0.0] * len(completions)

    batch = _score(model, [{"prompt": "hi"}], RewardSet([judge, other]))
    assert batch.metrics["judge/agreement"] == pytest.approx(0.75)
    assert batch.extra == {"judge_reason": ["why 0", "why 1"]}
    # a bare TRL callable (no RewardSet) gets them too
    batch = _score(model, [{"prompt": "hi"}], judge)
    assert batch.metrics["judge/agreement"] == 0.5 and batch.extra["judge_reason"] == ["why 0", "why 1"]
    # a RewardSet used on its own makes its own log
    result = RewardSet([judge])(["p", "q"], ["a", "b"])
    assert result.metrics["judge/agreement"] == 0.5 and result.extra == {"judge_reason": ["why 0", "why 1"]}


def test_a_step_keeps_a_reward_metric_named_like_the_trainers_and_tables_log_extra(tmp_path, model):
    def judge(prompts, completions, log_metric, log_extra, **kwargs):
        log_metric("loss", 123.0)  # a judge's own "loss": neither overwritten by the trainer's nor overwriting it
        log_metric("judge/agreement", 0.25)
        log_extra("judge_reason", [f"why {i}" for i in range(len(completions))])
        return [float(i) for i in range(len(completions))]

    cfg = RLConfig(rollout=ROLLOUT, optimizer=OptimizerConfig(learning_rate=1e-3),
                   trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=2,
                                         output_dir=str(tmp_path)))
    trainer = RLTrainer(cfg, copy.deepcopy(model), RewardSet([judge]), [{"prompt": "hi"}])
    metrics = trainer.train_step()
    assert metrics["reward_log/loss"] == 123.0 and metrics["loss"] != 123.0
    assert metrics["judge/agreement"] == 0.25 and "reward_log/judge/agreement" not in metrics
    columns, rows = trainer._sample_table()
    assert columns == ["prompt", "completion", "reward", "unmask_order", "judge_reason"]
    assert [row[-1] for row in rows] == ["why 0", "why 1"] and [row[2] for row in rows] == [0.0, 1.0]


@pytest.mark.parametrize("call, detail", [(lambda log: log("acc", "high"), "expected a number"),
                                          (lambda log: log(None, 1.0), "must be a non-empty string")])
def test_a_bad_log_metric_is_the_rewards_error(call, detail):
    def bad(prompts, completions, log_metric, **kwargs):
        call(log_metric)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=f"reward 'bad'.*{detail}"):
        RewardSet([bad])(["p"], ["a"])


def test_a_log_metric_named_like_a_reward_statistic_is_kept_aside_not_an_error():
    """TRL logs any name; here `rewards/<name>/mean` is the reward's own statistic: the logged value goes to
    reward_log/..., and the reward's values are untouched."""
    def accuracy(prompts, completions, log_metric, **kwargs):
        log_metric("rewards/accuracy/hard_subset", 0.5)
        log_metric("rewards/accuracy/mean", 99.0)
        log_metric("reward", 7.0)
        return [1.0, 0.0, 1.0]

    result = RewardSet([accuracy])(["p"] * 3, ["a", "b", "c"])
    assert result.total.tolist() == [1.0, 0.0, 1.0]
    assert result.metrics["rewards/accuracy/mean"] == pytest.approx(2 / 3)
    assert result.metrics["reward_log/rewards/accuracy/mean"] == 99.0
    assert result.metrics["reward_log/rewards/accuracy/hard_subset"] == 0.5
    assert result.metrics["reward_log/reward"] == 7.0


# ---- 2. a hung sync reward never keeps the process alive -----------------------------------------------------
def test_a_timed_out_sync_reward_does_not_block_interpreter_exit():
    script = textwrap.dedent("""
        import time
        from reward_models import RewardSet

        def hangs(prompts, completions, **kwargs):
            time.sleep(60)
            return [1.0] * len(completions)

        rs = RewardSet([hangs], timeout_s=1, on_error="zero")
        result = rs(["p"], ["a"])
        print("total", result.total.tolist(), "errors", len(result.errors), flush=True)
        rs.close()
    """)
    start = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: the abandoned reward thread kept it alive")
    assert out.returncode == 0, out.stderr
    assert "total [0.0] errors 1" in out.stdout
    assert time.monotonic() - start < 15


def test_a_reward_that_keeps_hanging_holds_a_bounded_number_of_threads():
    release, calls = threading.Event(), []

    def stuck(prompts, completions, **kwargs):
        calls.append(1)
        release.wait(30)
        return [1.0] * len(completions)

    rs = RewardSet([stuck], timeout_s=0.1, on_error="zero")
    try:
        for _ in range(MAX_ABANDONED + 3):
            result = rs(["p"], ["a"])
            assert result.total.tolist() == [0.0] and len(result.errors) == 1
        assert len(calls) == MAX_ABANDONED  # past the bound the reward is not called (and counted as timed out)
        assert "still running" in result.errors[0].detail
        release.set()
        deadline = time.monotonic() + 5
        while any(t.is_alive() for t in threading.enumerate() if t.name == "reward-stuck"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert rs(["p"], ["a"]).total.tolist() == [1.0]  # the threads finished: called again
    finally:
        release.set()
        rs.close()


def test_timeout_still_raises_or_zeroes():
    def slow(prompts, completions, **kwargs):
        time.sleep(2)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="reward 'slow'.*timed out after 0.2s"):
        RewardSet([slow], timeout_s=0.2)(["p", "q"], ["a", "b"])
    result = RewardSet([slow], timeout_s=0.2, on_error="zero")(["p", "q"], ["a", "b"])
    assert result.total.tolist() == [0.0, 0.0] and result.metrics["reward_errors/slow"] == 2.0


# ---- 3. a reward that edits its arguments in place ---------------------------------------------------------------
def vandal(prompts, completions, trajectory, meta, **kwargs):
    trajectory.response_ids.fill_(5)
    trajectory.action_mask.fill_(False)
    trajectory.unmask_step += 1
    for m in meta:
        m["n"] += 1
        m["tags"].append("x")
    prompts[0][0]["content"] = "vandalised"
    if isinstance(completions[0], list):
        completions[0][0]["content"] = "vandalised"
    if "completion_ids" in kwargs:
        kwargs["completion_ids"][0].append(5)
    return [1.0] * len(completions)


@pytest.mark.parametrize("wrap", [lambda f: RewardSet([f, Spy()]), lambda f: f], ids=["RewardSet", "bare callable"])
def test_a_reward_editing_its_arguments_changes_nothing_outside_its_call(model, wrap):
    def rows():
        return [{"prompt": [{"role": "user", "content": "hi"}], "meta": {"n": 0, "tags": []}}]

    clean = _score(model, rows(), RewardSet([Spy()]), chat=True)
    data = rows()
    batch = _score(model, data, wrap(vandal), chat=True, trainer_state={"step": 2, "epoch": 0})
    for field in ("response_ids", "action_mask", "unmask_step", "behaviour_logprob"):
        assert torch.equal(getattr(batch.traj, field), getattr(clean.traj, field)), field
    assert batch.completions == clean.completions
    assert data == rows()  # the dataset's rows: the dict column and the conversational prompt untouched
    assert batch.columns["meta"] == [{"n": 0, "tags": []}] * 2 and batch.prompts == [rows()[0]["prompt"]] * 2


def test_each_reward_and_each_call_gets_its_own_copies():
    seen = []

    def counts(prompts, completions, meta, trajectory, **kwargs):
        seen.append((meta[0]["n"], trajectory["ids"].tolist()))
        meta[0]["n"] += 1
        trajectory["ids"].add_(1)
        return [1.0] * len(completions)

    def counts_too(prompts, completions, meta, trajectory, **kwargs):
        return counts(prompts, completions, meta, trajectory)

    meta, traj = [{"n": 0}], {"ids": torch.tensor([1, 2])}
    rs = RewardSet([counts, counts_too])
    rs(["p"], ["a"], meta=meta, trajectory=traj)
    rs(["p"], ["a"], meta=meta, trajectory=traj)
    assert seen == [(0, [1, 2])] * 4  # neither the other reward's edit nor the previous call's reached a call
    assert meta == [{"n": 0}] and traj["ids"].tolist() == [1, 2]
