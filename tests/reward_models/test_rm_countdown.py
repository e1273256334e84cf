"""The countdown reward: a real parser (never eval), each number at most once, exact arithmetic."""
from __future__ import annotations

import builtins
from fractions import Fraction

import pytest

from reward_models.countdown import CountdownReward, ParseError, evaluate

reward = CountdownReward()


def score(text: str, nums: list[int], target: int) -> float:
    return reward(None, [text], nums=[nums], target=[target])[0]


@pytest.fixture(autouse=True)
def no_eval(monkeypatch):
    """The reward must never call eval or exec: make them explode."""
    def boom(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)


@pytest.mark.parametrize("text, nums, target, expected", [
    ("<answer>3*5+1</answer>", [3, 5, 1], 16, 1.0),  # valid
    ("<answer>(1 + 3) * 5</answer>", [3, 5, 1], 20, 1.0),  # parentheses
    ("<answer>5*3</answer>", [3, 5, 1], 15, 1.0),  # not every number has to be used
    ("<answer>5*3+1+1</answer>", [3, 5, 1], 17, 0.0),  # 1 used twice
    ("<answer>2*2+3</answer>", [2, 2, 3], 7, 1.0),  # a number given twice may be used twice
    ("<answer>4*4</answer>", [3, 5, 1], 16, 0.0),  # 4 is not a given number
    ("<answer>16/(2-2)</answer>", [16, 2, 2], 4, 0.0),  # division by zero
    ("<answer>3+5+1</answer>", [3, 5, 1], 16, 0.0),  # wrong value (9)
    ("<answer>7/2*2</answer>", [7, 2, 2], 7, 1.0),  # exact rationals: 7/2*2 == 7
    ("<answer>7/2</answer>", [7, 2], 3, 0.0),  # 3.5 is not 3 (no integer division)
    ("<answer>3*5+1 = 16</answer>", [3, 5, 1], 16, 1.0),  # "= target" suffix
    ("<answer>3*5+1 = 17</answer>", [3, 5, 1], 16, 0.0),  # a suffix that is not the target
    ("<answer>3*5+1 = 16 = 4*4</answer>", [3, 5, 1], 16, 0.0),  # only the target may follow
    ("<answer>3+5</answer> no wait <answer>(5*3)+1</answer>", [3, 5, 1], 16, 1.0),  # last <answer> counts
    ("<answer>(5*3)+1</answer> no wait <answer>3+5</answer>", [3, 5, 1], 16, 0.0),
    ("Let me think.\nAnswer: 3 * 5 + 1", [3, 5, 1], 16, 1.0),  # no tag: last line with a digit, prefix dropped
    ("<answer>$3 \\times 5 + 1$</answer>", [3, 5, 1], 16, 1.0),  # LaTeX operators
    ("<answer>-3+5*4</answer>", [3, 5, 4], 17, 0.0),  # no unary minus
    ("<answer>3.0*5+1</answer>", [3, 5, 1], 16, 0.0),  # no decimals (3.0 -> "0" is not a given number)
    ("<answer>__import__('os')</answer>", [3, 5, 1], 16, 0.0),  # not arithmetic
    ("<answer>(3*5+1</answer>", [3, 5, 1], 16, 0.0),  # unbalanced
    ("no numbers at all", [3, 5, 1], 16, 0.0),
])
def test_countdown_cases(text, nums, target, expected):
    assert score(text, nums, target) == expected


def test_evaluate_is_exact_and_reports_literals():
    assert evaluate("(10 - 4) / 4") == (Fraction(3, 2), [10, 4, 4])
    with pytest.raises(ParseError):
        evaluate("2 ** 3")
    with pytest.raises(ZeroDivisionError):
        evaluate("1/(3-3)")


def test_columns_and_not_applicable():
    out = CountdownReward()(None, ["<answer>1+2</answer>"] * 2, numbers=[[1, 2], None], target=[3, 3])
    assert out == [1.0, None]  # "numbers" is accepted as the column name; a missing row is not applicable
    with pytest.raises(ValueError, match="needs a 'nums' or 'numbers' or 'input' column"):
        CountdownReward()(None, ["1"], target=[1])


def test_d1_published_forms():
    """d1's evaluation file stores the numbers as one string and the target as a string, under input / output
    (dataset/countdown_cd3_test.jsonl: {"input": "30,100,93", "output": "23"}); its training data has nums as a
    list. Both score as published; a malformed value names the column and the expected form."""
    from reward_models import RewardError, RewardSet

    rs = RewardSet(["countdown"])
    done = rs(["p", "p"], ["<answer>100-93+30</answer>", "<answer>30+93</answer>"],
              input=["30,100,93", "30,100,93"], output=["37", "37"])
    assert done.total.tolist() == [1.0, 0.0]
    assert rs(["p"], ["<answer>2*4-3</answer>"], nums=["[2, 3, 4]"], target=[5]).total.tolist() == [1.0]
    with pytest.raises(RewardError, match=r"column 'nums' holds 'a,b'; expected a list of integers"):
        rs(["p"], ["x"], nums=["a,b"], target=[3])
