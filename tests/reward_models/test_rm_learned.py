"""The learned reward model: a tiny random classifier + char tokenizer saved in a temp dir (no downloads)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_models import RewardSet, load_reward
from reward_models.learned import LearnedReward, RunningStats

PROMPTS = ["2+2?", "Name a colour.", "Hi", "Longer prompt with more characters in it"]
COMPLETIONS = ["4", "blue", "hello there, how are you", "ok"]


def reference_scores(path, texts: list[str]) -> list[float]:
    """The model's logit on each text alone (no padding), computed without the reward's code."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(**{k: v for k, v in tok(t, return_tensors="pt").items() if k != "token_type_ids"}
                      ).logits[0, 0].item() for t in texts]


def test_scores_equal_the_model_logit_and_batching_does_not_change_them(tiny_rm_dir):
    plain = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = reference_scores(tiny_rm_dir, plain)
    batched = LearnedReward(str(tiny_rm_dir), device="cpu", batch_size=4, chat_template=False)
    single = LearnedReward(str(tiny_rm_dir), device="cpu", batch_size=1, chat_template=False)
    assert batched(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)  # padded batch == one by one
    assert single(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in expected)) == 4  # a random model: the samples really differ


def test_chat_template_renders_the_conversation(tiny_rm_dir):
    rm = LearnedReward(str(tiny_rm_dir), device="cpu")  # the char tokenizer has a template: used by default
    assert rm.chat_template is True
    assert rm.text("2+2?", "4") == "<|user|>2+2?\n<|assistant|>4\n"
    conversational = rm.text([{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "4"}])
    assert conversational == "<|user|>2+2?\n<|assistant|>4\n"
    expected = reference_scores(tiny_rm_dir, ["<|user|>2+2?\n<|assistant|>4\n"])
    assert rm(["2+2?"], ["4"]) == pytest.approx(expected, abs=1e-5)
    assert LearnedReward(str(tiny_rm_dir), device="cpu", chat_template=False).text("a", "b") == "ab"


def test_a_template_that_writes_bos_is_not_given_a_second_one(tmp_path):
    """Llama-3-style reward models: the tokenizer adds BOS and the chat template writes it too. The templated text
    is tokenized without special tokens (as TRL does), so the model sees one BOS, as in its training."""
    from tokenizers.processors import TemplateProcessing

    from tests.reward_models.conftest import save_tiny_classifier

    path = save_tiny_classifier(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(path)
    bos = "<|endoftext|>"
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.bos_token = bos
    tok.chat_template = bos + "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS
    rm = LearnedReward(str(path), device="cpu")
    seen = []
    rm.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    text = rm.text("2+2?", "4")
    assert text.startswith(bos)
    score = rm(["2+2?"], ["4"])
    assert seen[0] == tok(text, add_special_tokens=False)["input_ids"]  # one BOS, the template's
    assert seen[0].count(tok.bos_token_id) == 1
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([seen[0]])).logits[0, 0].item()
    assert score == pytest.approx([expected], abs=1e-5)


def test_affine_and_clip(tiny_rm_dir):
    raw = LearnedReward(str(tiny_rm_dir), device="cpu")(PROMPTS, COMPLETIONS)
    affine = LearnedReward(str(tiny_rm_dir), device="cpu", normalize="affine", scale=10.0, shift=1.0)
    assert affine(PROMPTS, COMPLETIONS) == pytest.approx([10 * s + 1 for s in raw], abs=1e-4)
    clipped = LearnedReward(str(tiny_rm_dir), device="cpu", normalize="affine", scale=1000.0, clip=0.5)
    assert all(abs(s) <= 0.5 for s in clipped(PROMPTS, COMPLETIONS))


def test_running_normalisation(tiny_rm_dir):
    raw = LearnedReward(str(tiny_rm_dir), device="cpu")(PROMPTS, COMPLETIONS)
    rm = LearnedReward(str(tiny_rm_dir), device="cpu", normalize="running")
    scores = rm(PROMPTS, COMPLETIONS)
    mean = sum(raw) / 4
    std = math.sqrt(sum((s - mean) ** 2 for s in raw) / 3)
    assert scores == pytest.approx([(s - mean) / std for s in raw], abs=1e-4)
    assert sum(scores) == pytest.approx(0.0, abs=1e-4)


def test_running_stats_by_hand():
    stats = RunningStats()
    stats.update([1.0, 2.0, 3.0, 4.0])
    assert stats.mean == 2.5 and stats.std == pytest.approx(math.sqrt(5 / 3))


def test_learned_reward_in_a_reward_set(tiny_rm_dir):
    rs = RewardSet([{"fn": str(tiny_rm_dir), "name": "rm", "weight": 2.0, "kwargs": {"device": "cpu"}}])
    result = rs(PROMPTS, COMPLETIONS)
    raw = load_reward(str(tiny_rm_dir), device="cpu")(PROMPTS, COMPLETIONS)
    assert result.total.tolist() == pytest.approx([2 * s for s in raw], abs=1e-4)
    assert "rewards/rm/mean" in result.metrics


def test_missing_prompts_count_as_empty(tiny_rm_dir):
    rm = LearnedReward(str(tiny_rm_dir), device="cpu", chat_template=False)
    assert rm(None, ["abc"]) == pytest.approx(reference_scores(tiny_rm_dir, ["abc"]), abs=1e-5)


def test_a_loaded_reward_model_object_works_as_in_trl(tiny_rm_dir):
    """TRL's reward_funcs take a PreTrainedModel; its tokenizer comes from where it was loaded."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    from_path = LearnedReward(str(tiny_rm_dir), device="cpu")
    result = RewardSet([model])(PROMPTS, COMPLETIONS)
    assert result.total.tolist() == pytest.approx(from_path(PROMPTS, COMPLETIONS), abs=1e-5)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    in_memory = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           num_labels=1))
    with pytest.raises(ValueError, match=r"no tokenizer found .*pass it: LearnedReward\(model, tokenizer=...\)"):
        RewardSet([in_memory])
