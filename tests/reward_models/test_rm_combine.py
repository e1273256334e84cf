"""RewardSet: weights, None skipping, metrics, TRL compatibility, async concurrency and every error kind."""
from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np
import pytest
import torch

from reward_models import RewardError, RewardSet

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["aa", "bbbb", "c"]


def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def ones(prompts, completions, **kwargs):
    return [1.0] * len(completions)


# --- weights, None, metrics -------------------------------------------------------------------------------
def test_weighted_sum_and_metrics():
    rs = RewardSet([{"fn": length, "weight": 2.0}, {"fn": ones, "name": "bonus", "weight": -0.5}])
    result = rs(PROMPTS, COMPLETIONS)
    # 2 * [2, 4, 1] - 0.5 * [1, 1, 1]
    assert result.total.tolist() == [3.5, 7.5, 1.5]
    assert result.total.dtype == torch.float32 and result.per_function.shape == (3, 2)
    assert result.metrics["rewards/length/mean"] == pytest.approx(7 / 3)  # unweighted, like TRL
    assert result.metrics["rewards/length/std"] == pytest.approx(math.sqrt(((2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2
                                                                            + (1 - 7 / 3) ** 2) / 2))
    assert result.metrics["rewards/bonus/mean"] == 1.0
    assert result.metrics["reward_errors/length"] == 0.0 and result.errors == []


def test_none_is_skipped_and_all_none_is_nan():
    def only_first(prompts, completions, **kwargs):
        return [5.0, None, None]

    def only_second(prompts, completions, **kwargs):
        return [None, 3.0, None]

    result = RewardSet([only_first, {"fn": only_second, "weight": 2.0}])(PROMPTS, COMPLETIONS)
    total = result.total.tolist()
    assert total[:2] == [5.0, 6.0] and math.isnan(total[2])  # NaN: no reward applies to sample 2
    assert result.metrics["rewards/only_first/mean"] == 5.0  # mean over the samples it applied to
    assert torch.isnan(result.per_function[1, 0])


def test_single_reward_and_tensor_or_numpy_returns_are_accepted():
    def as_tensor(prompts, completions, **kwargs):
        return torch.tensor([1.0, 2.0, 3.0])

    def as_numpy(prompts, completions, **kwargs):
        return np.array([1, 0, 1])

    assert RewardSet(as_tensor)(PROMPTS, COMPLETIONS).total.tolist() == [1.0, 2.0, 3.0]
    assert RewardSet([as_numpy])(PROMPTS, COMPLETIONS).total.tolist() == [1.0, 0.0, 1.0]


# --- the TRL contract -------------------------------------------------------------------------------------
def test_trl_reward_functions_work_unchanged_with_conversational_completions():
    # Copied in the style of TRL's documentation examples.
    def format_reward_func(completions, **kwargs):
        import re
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]

    def accuracy(completions, ground_truth, **kwargs):
        return [1.0 if c[0]["content"].endswith(gt) else 0.0 for c, gt in zip(completions, ground_truth)]

    prompts = [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "2+2?"}]]
    completions = [[{"role": "assistant", "content": "<think>easy</think><answer>2</answer>"}],
                   [{"role": "assistant", "content": "it is 5"}]]
    result = RewardSet([format_reward_func, accuracy])(prompts, completions, ground_truth=["</answer>", "4"])
    assert result.total.tolist() == [2.0, 0.0]


def test_columns_trajectory_and_trainer_state_arrive_as_kwargs():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    def named_only(prompts, completions, answer):  # no **kwargs: gets only what it names
        return [float(c == a) for c, a in zip(completions, answer)]

    traj = {"response_ids": torch.tensor([[1, 2]])}  # each call gets its own copy (test_trl_signature.py)
    result = RewardSet([spy, named_only])(PROMPTS, COMPLETIONS, answer=["aa", "x", "c"], trajectory=traj,
                                          trainer_state={"step": 3, "epoch": 1})
    assert seen["answer"] == ["aa", "x", "c"] and seen["trajectory"]["response_ids"].tolist() == [[1, 2]]
    assert seen["trainer_state"] == {"step": 3, "epoch": 1}
    assert result.total.tolist() == [1.0, 0.0, 1.0]


def test_the_trainer_reads_the_result():
    """Training and evaluation read a RewardSet result: .total as the [N] rewards, .metrics merged into the log."""
    from tracerl.scoring import _read_rewards

    def half(prompts, completions, **kwargs):
        return [0.5, None, 1.0]

    rewards, per_function, metrics, steps, tokens = _read_rewards(RewardSet([half])(PROMPTS, COMPLETIONS,
                                                                                    answer=[1, 2, 3]))
    assert steps is None and tokens is None  # no process rewards returned
    assert per_function["half"][0] == 0.5
    assert rewards[0] == 0.5 and torch.isnan(rewards[1]) and rewards[2] == 1.0
    assert metrics["rewards/half/mean"] == 0.75


# --- async ------------------------------------------------------------------------------------------------
def test_async_rewards_run_concurrently():
    async def slow_a(prompts, completions, **kwargs):
        await asyncio.sleep(0.5)
        return [1.0] * len(completions)

    async def slow_b(prompts, completions, **kwargs):
        await asyncio.sleep(0.5)
        return [2.0] * len(completions)

    def slow_sync(prompts, completions, **kwargs):
        time.sleep(0.5)
        return [4.0] * len(completions)

    with RewardSet([slow_a, slow_b, slow_sync]) as rs:
        t0 = time.perf_counter()
        result = rs(PROMPTS, COMPLETIONS)
        elapsed = time.perf_counter() - t0
    assert result.total.tolist() == [7.0, 7.0, 7.0]
    assert elapsed < 1.0, f"{elapsed:.2f}s: the three 0.5 s rewards did not overlap (sequential = 1.5 s)"


def test_an_async_reward_blocking_its_loop_times_out_alone():
    """A sync sleep inside `async def` blocks the loop it runs on; on a loop shared by every async reward the others
    would time out too and be counted as errors. Each has its own loop: only the blocking one is blamed."""
    async def blocks(prompts, completions, **kwargs):
        time.sleep(1.0)  # not awaited: holds its loop
        return [1.0] * len(completions)

    async def polite(prompts, completions, **kwargs):
        await asyncio.sleep(0.05)
        return [2.0] * len(completions)

    with RewardSet([blocks, polite], on_error="zero", timeout_s=0.5) as rs:
        result = rs(PROMPTS, COMPLETIONS)
    assert result.total.tolist() == [2.0, 2.0, 2.0]
    assert result.metrics["reward_errors/blocks"] == 3 and result.metrics["reward_errors/polite"] == 0


# --- errors -----------------------------------------------------------------------------------------------
def raises_on_b(prompts, completions, **kwargs):
    if any("b" in c for c in completions):
        raise KeyError("no b allowed")
    return [1.0] * len(completions)


def wrong_count(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def inf_at_0(prompts, completions, **kwargs):
    return [float("inf"), 1.0, 1.0]


def string_at_1(prompts, completions, **kwargs):
    return [1.0, "high", 1.0]


def huge_at_1(prompts, completions, **kwargs):
    return [1.0, 10 ** 400, 1.0]  # float() raises OverflowError, not TypeError / ValueError


class Unconvertible:
    def __float__(self):
        raise RuntimeError("boom")


def unconvertible_at_2(prompts, completions, **kwargs):
    return [1.0, 1.0, Unconvertible()]


def sleeps(prompts, completions, **kwargs):
    time.sleep(1.5)
    return [1.0] * len(completions)


async def async_sleeps(prompts, completions, **kwargs):
    await asyncio.sleep(1.5)
    return [1.0] * len(completions)


ERRORS = [  # (reward, timeout_s, message pattern, failing samples)
    (raises_on_b, None, r"reward 'raises_on_b' at sample 1: raised KeyError: 'no b allowed'", [1]),
    (wrong_count, None, r"reward 'wrong_count' on all 3 samples.*returned 2 values, expected a list of 3", [0, 1, 2]),
    (inf_at_0, None, r"reward 'inf_at_0' at sample 0: returned inf", [0]),
    (string_at_1, None, r"reward 'string_at_1' at sample 1: returned str 'high'", [1]),
    (huge_at_1, None, r"reward 'huge_at_1' at sample 1: int too large to convert to float", [1]),
    (unconvertible_at_2, None, r"reward 'unconvertible_at_2' at sample 2: boom", [2]),
    (sleeps, 0.3, r"reward 'sleeps' on all 3 samples.*timed out after 0.3s", [0, 1, 2]),
    (async_sleeps, 0.3, r"reward 'async_sleeps' on all 3 samples.*timed out after 0.3s", [0, 1, 2]),
]
IDS = ["raises", "wrong_count", "inf", "wrong_type", "overflow", "bad_float", "timeout", "async_timeout"]


@pytest.mark.parametrize("fn, timeout, pattern, bad", ERRORS, ids=IDS)
def test_error_raises_a_reward_error_naming_reward_and_sample(fn, timeout, pattern, bad):
    rs = RewardSet([ones, fn], timeout_s=timeout)
    with pytest.raises(RewardError, match=pattern) as info:
        rs(PROMPTS, COMPLETIONS)
    assert info.value.reward == fn.__name__
    assert info.value.index == (bad[0] if len(bad) == 1 else None)
    rs.close()


@pytest.mark.parametrize("fn, timeout, pattern, bad", ERRORS, ids=IDS)
def test_error_with_on_error_zero_scores_zero_counts_and_logs(fn, timeout, pattern, bad, caplog):
    rs = RewardSet([{"fn": ones, "weight": 10.0}, fn], on_error="zero", timeout_s=timeout)
    with caplog.at_level(logging.WARNING, logger="reward_models.combine"):
        result = rs(PROMPTS, COMPLETIONS)
    values = result.per_function[:, 1].tolist()
    for i in range(3):
        assert values[i] == (0.0 if i in bad else 1.0)  # the failing samples score 0, the others keep theirs
    assert result.total.tolist() == [10.0 + v for v in values]
    assert result.metrics[f"reward_errors/{fn.__name__}"] == len(bad)
    assert result.metrics["reward_errors/ones"] == 0.0
    assert [e.reward for e in result.errors] == [fn.__name__] * len(bad)
    assert f"reward '{fn.__name__}': {len(bad)} sample(s) scored 0" in caplog.text
    rs.close()


def test_a_reward_calling_sys_exit_is_a_reward_error_not_the_end_of_the_run():
    import sys

    def exits(prompts, completions, **kwargs):
        sys.exit(0)  # on a pool thread this used to reach the trainer as SystemExit: the run ended, exit code 0

    async def exits_async(prompts, completions, **kwargs):
        sys.exit(3)

    for fn in (exits, exits_async):
        with pytest.raises(RewardError, match=rf"reward '{fn.__name__}' at sample 0: raised SystemExit"):
            RewardSet([ones, fn])(PROMPTS, COMPLETIONS)
        result = RewardSet([ones, fn], on_error="zero")(PROMPTS, COMPLETIONS)
        assert result.per_function[:, 1].tolist() == [0.0, 0.0, 0.0]
        assert result.metrics[f"reward_errors/{fn.__name__}"] == 3


def test_a_reward_editing_its_arguments_does_not_change_what_others_see():
    def strips(prompts, completions, answer, **kwargs):
        completions[:] = ["X"] * len(completions)  # in place, as a careless reward might
        answer.clear()
        return [1.0] * 3

    def exact(prompts, completions, answer, **kwargs):
        time.sleep(0.05)  # runs while `strips` edits its lists
        return [float(c == a) for c, a in zip(completions, answer)]

    answers = ["aa", "x", "c"]
    columns = {"answer": answers}
    for _ in range(3):
        result = RewardSet([strips, exact])(PROMPTS, list(COMPLETIONS), **columns)
        assert result.per_function[:, 1].tolist() == [1.0, 0.0, 1.0]
    assert answers == ["aa", "x", "c"]  # the caller's columns (the trainer's records) are untouched


def test_a_reward_raising_on_a_single_sample_batch_names_sample_0():
    with pytest.raises(RewardError, match=r"reward 'raises_on_b' at sample 0"):
        RewardSet([raises_on_b])(["p"], ["b"])


def test_raise_mode_mentions_how_many_more_errors():
    def two_infs(prompts, completions, **kwargs):
        return [float("inf"), 1.0, float("-inf")]

    with pytest.raises(RewardError, match=r"at sample 0: .*\(and 1 more\)"):
        RewardSet([two_infs])(PROMPTS, COMPLETIONS)


def test_bad_options():
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'zero'"):
        RewardSet([ones], on_error="ignore")
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        RewardSet([ones], timeout_s=0)
    with pytest.raises(ValueError, match="at least one reward"):
        RewardSet([])
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        RewardSet([ones])(["a", "b"], COMPLETIONS)


def test_a_reward_that_changes_the_working_directory_is_undone(tmp_path, caplog):
    import os

    def wanders(prompts, completions, **kwargs):
        os.chdir(tmp_path)  # the run's relative output_dir would follow it
        return [1.0] * len(completions)

    before = os.getcwd()
    with caplog.at_level(logging.WARNING, logger="reward_models.combine"):
        result = RewardSet([wanders])(PROMPTS, COMPLETIONS)
    assert os.getcwd() == before and result.total.tolist() == [1.0, 1.0, 1.0]
    assert "a reward of 'wanders' changed the working directory" in caplog.text


# --- TRL's conventions, and what a reward may not change -------------------------------------------------------
def test_nan_means_no_reward_as_in_trl():
    """TRL turns None into NaN and sums with nansum: NaN and None both mean "does not apply"."""
    def half_nan(prompts, completions, **kwargs):
        return [1.0, float("nan"), 0.0]

    def numpy_nan(prompts, completions, **kwargs):
        return np.array([np.nan, np.nan, 2.0])

    result = RewardSet([half_nan, numpy_nan])(PROMPTS, COMPLETIONS)
    assert result.total[0] == 1.0 and torch.isnan(result.total[1]) and result.total[2] == 2.0
    assert result.metrics["rewards/half_nan/mean"] == 0.5  # over the two samples it applies to, as TRL's nanmean
    assert result.metrics["reward_errors/half_nan"] == 0


def test_any_iterable_of_values_is_accepted_as_trl_does():
    def generator(prompts, completions, **kwargs):
        return (float(len(c)) for c in completions)

    def mapped(prompts, completions, **kwargs):
        return map(lambda c: 1.0, completions)

    def breaks_midway(prompts, completions, **kwargs):
        yield 1.0
        raise ValueError("third-party parser failed")

    result = RewardSet([generator, mapped])(PROMPTS, COMPLETIONS)
    assert result.per_function.tolist() == [[2.0, 1.0], [4.0, 1.0], [1.0, 1.0]]
    with pytest.raises(RewardError, match=r"reward 'breaks_midway'.*raised ValueError: third-party parser failed"):
        RewardSet([breaks_midway])(PROMPTS, COMPLETIONS)
    for bad in ("0.5", {"a": 1.0}):
        with pytest.raises(RewardError, match=rf"returned a {type(bad).__name__}, expected a list of 3"):
            RewardSet([lambda prompts, completions, v=bad, **kw: v])(PROMPTS, COMPLETIONS)


def test_without_a_timeout_sync_rewards_run_on_the_callers_thread():
    """As in TRL: code that only works on the main thread (signal-based timeouts such as Math-Verify's, or
    asyncio.get_event_loop in some versions) works in a reward; with timeout_s it runs on a thread of its own."""
    import signal
    import threading

    def main_thread_only(prompts, completions, **kwargs):
        previous = signal.signal(signal.SIGALRM, lambda *a: None)  # raises ValueError off the main thread
        signal.signal(signal.SIGALRM, previous)
        return [float(threading.current_thread() is threading.main_thread())] * len(completions)

    assert RewardSet([main_thread_only])(PROMPTS, COMPLETIONS).total.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(RewardError, match="signal only works in main thread"):
        RewardSet([main_thread_only], timeout_s=5)(PROMPTS, COMPLETIONS)


def test_a_reward_cannot_change_the_runs_randomness_dtype_or_grad_mode(caplog):
    import random

    def meddles(prompts, completions, **kwargs):
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)
        torch.rand(3)
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        return [1.0] * len(completions)

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    with caplog.at_level(logging.WARNING, logger="reward_models.combine"):
        RewardSet([meddles])(PROMPTS, COMPLETIONS)
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert "a reward of 'meddles' changed torch's default dtype to torch.float64" in caplog.text
    assert "grad mode" in caplog.text


def test_rewards_draw_a_continuing_random_stream_of_their_own():
    """A reward's random choices (tie-breaks, a subsampled judge) differ from batch to batch, while training's
    generators are left as if no reward had run."""
    import random

    draws = []

    def samples(prompts, completions, **kwargs):
        draws.append((random.random(), float(torch.rand(1)), float(np.random.rand())))
        return [1.0] * len(completions)

    rs = RewardSet([samples])
    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(1), random.random())
    torch.manual_seed(0)
    random.seed(0)
    for _ in range(3):
        rs(PROMPTS, COMPLETIONS)
    assert len(set(draws)) == 3  # not the same draws on every call
    assert torch.equal(torch.rand(1), expected[0]) and random.random() == expected[1]


def test_an_interrupted_reward_still_has_the_process_state_put_back(tmp_path):
    import os

    def interrupted(prompts, completions, **kwargs):
        os.chdir(tmp_path)
        torch.set_grad_enabled(False)
        raise KeyboardInterrupt

    before = os.getcwd()
    with pytest.raises(KeyboardInterrupt):
        RewardSet([interrupted])(PROMPTS, COMPLETIONS)
    assert os.getcwd() == before and torch.is_grad_enabled()


def test_a_lazy_return_value_is_read_inside_the_timeout():
    def slow_generator(prompts, completions, **kwargs):
        return (time.sleep(0.4) or 1.0 for _ in completions)  # the work happens while the values are read

    rs = RewardSet([slow_generator], timeout_s=0.3, on_error="zero")
    start = time.perf_counter()
    result = rs(PROMPTS, COMPLETIONS)
    assert time.perf_counter() - start < 1.0 and result.metrics["reward_errors/slow_generator"] == 3
    rs.close()


def test_single_sample_reruns_pass_each_sample_its_own_trajectory_row_and_keep_log_extra_aligned():
    """After a batch fails, each sample is re-scored alone: its trajectory is its own row (a reward reading
    trajectory.unmask_step[0] must see the sample's steps, not sample 0's), and log_extra gets one value per
    sample, None where the sample's call failed; what the failed batch call logged is dropped."""
    from tracerl.rollout.trajectory import Trajectory

    steps = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 1, 1]])
    n, L = steps.shape
    traj = Trajectory(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
                      response_ids=torch.zeros(n, L, dtype=torch.long), unmask_step=steps,
                      action_mask=torch.ones(n, L, dtype=torch.bool), behaviour_logprob=torch.zeros(n, L),
                      block_offset=torch.zeros(n, dtype=torch.long), group_id=torch.arange(n), num_forwards=4,
                      mask_token_id=1, pad_token_id=0, eos_token_id=0, block_size=None, block_length=L,
                      temperature=1.0)

    def steps_taken(prompts, completions, trajectory, log_extra, **kwargs):
        log_extra("note", [f"steps {int(trajectory.unmask_step[i].max()) + 1}" for i in range(len(completions))])
        if any("b" in c for c in completions):
            raise ValueError("cannot score b")
        return [float(trajectory.unmask_step[i].max()) + 1 for i in range(len(completions))]

    result = RewardSet([steps_taken], on_error="zero")(PROMPTS, COMPLETIONS, trajectory=traj)
    assert result.per_function[:, 0].tolist() == [1.0, 0.0, 2.0]  # sample 1 failed; 2 took 2 steps, not 1
    assert result.extra == {"note": ["steps 1", None, "steps 2"]}
