"""The format and length rewards."""
from __future__ import annotations

import pytest

from reward_models import RewardSpecError, load_reward
from reward_models.format_length import FormatReward, LengthReward


# --- format -------------------------------------------------------------------------------------------------
def test_default_tags_once_each_in_order():
    fmt = FormatReward()
    completions = [
        "<think>a</think>\n<answer>b</answer>",  # 1
        "<answer>b</answer><think>a</think>",  # wrong order: 0
        "<think>a</think><think>c</think><answer>b</answer>",  # think twice: 0
        "<think>a</think>",  # answer missing: 0
        [{"role": "assistant", "content": "<think>x</think><answer>y</answer>"}],  # conversational: 1
    ]
    assert fmt(None, completions) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_partial_tags_score_the_fraction_present_once():
    fmt = FormatReward(tags=["think", "answer", "check"], partial=True)
    texts = ["<think>a</think>", "<answer>b</answer><think>a</think><check>c</check>", "nothing"]
    assert fmt(None, texts) == [pytest.approx(1 / 3), 1.0, 0.0]


def test_pattern_fullmatch_and_search():
    full = load_reward("format", pattern=r"Answer: \d+")
    assert full(None, ["Answer: 42", "  Answer: 42\n", "So, Answer: 42"]) == [1.0, 1.0, 0.0]  # stripped first
    search = load_reward("format", pattern=r"Answer: \d+", mode="search")
    assert search(None, ["So, Answer: 42", "no"]) == [1.0, 0.0]


def test_format_option_errors():
    with pytest.raises(RewardSpecError, match="either pattern= or tags="):
        load_reward("format", pattern="x", tags=["a"])
    with pytest.raises(RewardSpecError, match="mode must be"):
        load_reward("format", mode="match")


# --- length -------------------------------------------------------------------------------------------------
def test_overlong_penalty_in_chars():
    length = LengthReward(max_length=10)
    # lengths 8, 10, 15, 30: 0 up to 10, then -(L - 10) / 10, floored at -1
    assert length(None, ["a" * 8, "a" * 10, "a" * 15, "a" * 30]) == [0.0, 0.0, -0.5, -1.0]


def test_target_length_in_words():
    length = LengthReward(target=4, unit="words")
    # 4 words: 1; 2 words: 1 - 2/4 = 0.5; 6 words: 0.5; 12 words: max(0, 1 - 8/4) = 0
    texts = ["a b c d", "a b", "a b c d e f", " ".join("w" * 12)]
    assert length(None, texts) == [1.0, 0.5, 0.5, 0.0]


def test_length_in_tokens_with_a_tokenizer_object_or_path(tmp_path):
    from tracerl.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()  # one token per character
    assert LengthReward(target=5, unit="tokens", tokenizer=tok)(None, ["abcde", "abc"]) == [1.0, pytest.approx(0.6)]
    tok.save_pretrained(tmp_path)
    by_path = load_reward("length", max_length=2, unit="tokens", tokenizer=str(tmp_path))
    assert by_path(None, ["abc"]) == [-0.5]


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one of max_length"), ({"max_length": 3, "target": 3}, "exactly one of max_length"),
    ({"target": 0}, "must be positive"), ({"target": 3, "unit": "bytes"}, "unit must be"),
    ({"target": 3, "unit": "tokens"}, "needs tokenizer="),
])
def test_length_option_errors(options, message):
    with pytest.raises(RewardSpecError, match=message):
        load_reward("length", **options)
