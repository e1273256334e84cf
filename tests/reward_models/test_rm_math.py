"""The math reward: answer extraction, gold answers, equivalence (cheap and Math-Verify), threads."""
from __future__ import annotations

import threading

import pytest

from reward_models import RewardSet, RewardSpecError, load_reward
from reward_models.math_reward import MathReward, cheap_equal, extract_answer, gold_answer, last_boxed


@pytest.fixture(scope="module")
def process_reward():
    reward = MathReward(isolation="process", timeout_s=5)
    yield reward
    reward.close()


# --- extraction ---------------------------------------------------------------------------------------------
def test_last_boxed_with_nested_braces():
    text = r"first \boxed{1} then \boxed{\frac{a_{1}}{\sqrt{b}}} done"
    assert last_boxed(text) == r"\frac{a_{1}}{\sqrt{b}}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"cut off \boxed{\frac{1}{2") is None  # unbalanced: a truncated generation
    assert last_boxed(r"\fbox{7}") == "7"


def test_extraction_order_boxed_then_gsm8k_then_pattern():
    assert extract_answer(r"#### 3 and \boxed{4}") == "4"  # \boxed wins over ####
    assert extract_answer("work...\n#### 1,234\n") == "1,234"
    assert extract_answer("#### 5 then #### 6") == "6"
    assert extract_answer("no answer here") is None
    assert extract_answer("Answer: 12. Final Answer: 13", pattern=r"Answer:\s*(\d+)") == "13"
    assert extract_answer("ANS=7", pattern=r"\d+") == "7"  # no group: the whole match


def test_gold_answer_forms():
    assert gold_answer("Natalia sold 48/2 = 24 clips... #### 72") == "72"
    assert gold_answer(r"The answer is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert gold_answer(5) == "5"


@pytest.mark.parametrize("pred, gold", [("1/2", "0.5"), ("0.50", "1/2"), ("1,234", "1234"), ("$7$", "7"),
                                        (r"\text{5}", "5"), (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("3.", "3")])
def test_cheap_equivalences(pred, gold):
    assert cheap_equal(pred, gold)


def test_cheap_inequality():
    assert not cheap_equal("2", "3") and not cheap_equal(r"\frac{1}{2}", "0.5")  # the latter needs Math-Verify


# --- the reward ---------------------------------------------------------------------------------------------
COMPLETIONS = [
    r"so the answer is \boxed{\frac{1}{2}}",  # vs 0.5: only Math-Verify sees these are equal -> 1
    r"\boxed{0.5}",  # vs 1/2: exact number comparison -> 1
    "She earned 8 * 9 = 72.\n#### 72",  # GSM8K vs a GSM8K solution -> 1
    r"\boxed{\frac{\sqrt{2}}{2}}",  # vs \sqrt{2}/2 -> 1 (Math-Verify)
    r"\boxed{3}",  # vs 4 -> 0
    "I don't know",  # no answer -> 0
    r"\boxed{1}",  # answer None -> None (not applicable)
]
ANSWERS = ["0.5", "1/2", "Natalia sold 48... #### 72", r"\sqrt{2}/2", "4", "4", None]
EXPECTED = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None]


def test_math_reward_process_isolation(process_reward):
    assert process_reward(None, COMPLETIONS, answer=ANSWERS) == EXPECTED


def test_math_reward_inline():
    assert MathReward(isolation="inline")(None, COMPLETIONS, answer=ANSWERS) == EXPECTED


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_math_reward_from_a_worker_thread(isolation):
    """Math-Verify's own timeouts use SIGALRM (main thread only); the reward must work from any thread."""
    reward = MathReward(isolation=isolation)
    out: dict = {}

    def work() -> None:
        try:
            out["r"] = reward(None, COMPLETIONS[:5], answer=ANSWERS[:5])
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            out["e"] = e

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    reward.close()
    assert "e" not in out, out.get("e")
    assert out["r"] == EXPECTED[:5]


def test_pattern_option_and_conversational_completions():
    reward = load_reward("math", pattern=r"ANSWER:\s*(\S+)", isolation="inline")
    completions = [[{"role": "assistant", "content": "blah ANSWER: 0.25"}],
                   [{"role": "assistant", "content": r"\boxed{0.25}"}]]  # no pattern match -> 0
    assert reward(None, completions, answer=["1/4", "1/4"]) == [1.0, 0.0]


def test_answer_column_option_and_missing_column():
    reward = MathReward(answer_column="solution", isolation="inline")
    assert reward(None, [r"\boxed{2}"], solution=["2"]) == [1.0]
    with pytest.raises(ValueError, match=r"needs a 'solution' column.*columns given: \['answer'\]"):
        reward(None, [r"\boxed{2}"], answer=["2"])


def test_bad_isolation_is_a_spec_error():
    with pytest.raises(RewardSpecError, match="isolation must be 'process' or 'inline'"):
        load_reward("math", isolation="thread")


def test_math_in_a_reward_set_runs_on_a_pool_thread(process_reward):
    rs = RewardSet([{"fn": process_reward, "name": "math"}])
    result = rs(None, COMPLETIONS[:3], answer=ANSWERS[:3])
    assert result.total.tolist() == [1.0, 1.0, 1.0] and result.metrics["rewards/math/mean"] == 1.0
