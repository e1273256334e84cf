"""The code reward: program extraction, every test format, fraction passed. Programs run in the sandbox,
so run this file only from a throwaway copy of the repo (see tests/reward_models/test_rm_sandbox_hostile.py)."""
from __future__ import annotations

import json
import os

import pytest

from reward_models import RewardError, RewardSet
from reward_models.code_reward import CodeReward, extract_program, parse_tests

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the sandbox needs Linux")

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
SUM_STDIN = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


@pytest.fixture(scope="module")
def code():
    reward = CodeReward(timeout_s=3.0, num_workers=2)
    yield reward
    reward.close()


# --- extraction (no sandbox) --------------------------------------------------------------------------------
def test_extract_last_python_block():
    text = "plan\n```python\nx = 1\n```\nbetter:\n```py\nx = 2\n```\n```text\nnot code\n```"
    assert extract_program(text) == "x = 2\n"


def test_extract_untagged_block_unclosed_block_and_whole_completion():
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert extract_program("sure:\n```python\nprint(4)\nprint(5)") == "print(4)\nprint(5)"  # cut off
    assert extract_program("print(6)") == "print(6)"  # no fence: the whole completion


def test_parse_tests_formats():
    assert parse_tests(["assert f(1) == 1", "assert f(2) == 4"]) == \
        ("assert", "", [{"code": "assert f(1) == 1"}, {"code": "assert f(2) == 4"}])
    mode, setup, cases = parse_tests("import math\nassert f(1) == 1\nassert f(4) == 16\n")
    assert (mode, setup, len(cases)) == ("assert", "import math", 2)
    assert parse_tests({"inputs": ["1\n"], "outputs": ["2\n"]}) == ("stdio", "", [{"input": "1\n", "expected": "2\n"}])
    assert parse_tests(json.dumps({"inputs": [["1", "2"]], "outputs": [["3"]]}))[2] == \
        [{"input": "1\n2", "expected": "3"}]  # lists of lines are joined
    assert parse_tests(None) is None and parse_tests([]) is None
    with pytest.raises(ValueError, match="unrecognised tests format"):
        parse_tests([1, 2])


# --- running ------------------------------------------------------------------------------------------------
def test_assert_list_fraction(code):
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]]
    assert code(None, [ADD], tests=tests) == [pytest.approx(2 / 3)]  # the third assert is wrong on purpose


def test_assert_string_with_setup_runs_before_each_case(code):
    tests = ["import math\nHALF = 0.5\nassert add(HALF, HALF) == 1\nassert add(math.floor(2.7), 1) == 3\n"]
    assert code(None, [ADD], tests=tests) == [1.0]


def test_stdin_stdout_dict_and_livecodebench_list(code):
    apps = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "8\n"]}  # 3 + 4 != 8: half pass
    lcb = [{"input": "10 5", "output": "15", "testtype": "stdin"}]
    assert code(None, [SUM_STDIN, SUM_STDIN], tests=[apps, json.dumps(lcb)]) == [0.5, 1.0]


def test_call_based_and_humaneval(code):
    call = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 8]}
    humaneval = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}
    assert code(None, [ADD, ADD], tests=[call, humaneval]) == [0.5, 1.0]


def test_no_tests_is_none_and_no_program_or_a_crash_is_zero(code):
    completions = [ADD, "", "```python\nraise SystemExit(3)\n```", "```python\nimport os\nos._exit(0)\n```"]
    tests = [None, ["assert True"], ["assert True"], ["assert True"]]
    # os._exit(0) skips the asserts: the harness' per-case nonce is never written, so it cannot pass
    assert code(None, completions, tests=tests) == [None, 0.0, 0.0, 0.0]


def test_conversational_completion_and_tests_column_option():
    reward = CodeReward(tests_column="checks", timeout_s=3.0, num_workers=1)
    try:
        completion = [{"role": "assistant", "content": ADD}]
        assert reward(None, [completion], checks=[["assert add(1, 1) == 2"]]) == [1.0]
    finally:
        reward.close()


def test_bad_tests_in_a_reward_set_name_the_sample(code):
    rs = RewardSet([{"fn": code, "name": "code"}])
    with pytest.raises(RewardError, match=r"reward 'code' at sample 1: raised ValueError: unrecognised tests"):
        rs(None, [ADD, ADD], tests=[["assert add(1, 1) == 2"], [42]])
