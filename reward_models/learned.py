"""Learned reward model: a transformers `AutoModelForSequenceClassification` directory with one label.

`load_reward("/path/to/rm")` (a directory holding config.json) returns a LearnedReward. The score of a
sample is the model's single logit on the prompt + completion text:
  - chat_template=None (default): use the tokenizer's chat template when it has one, rendering
    [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}] (conversational
    prompts/completions are used as given); otherwise plain concatenation prompt + completion
  - batched (batch_size), truncated to max_length tokens (keeping the end, where the answer is),
    in torch.no_grad on its own `device` ("cpu", "cuda:1", ...; default: cuda:0 if available else cpu)
Normalisation of the raw logit s (applied in this order):
  - normalize="none" (default): s
  - normalize="affine": scale * s + shift
  - normalize="running": (s - mean) / std over every score seen so far, this batch included (Welford;
    std floored at 1e-6; before 2 scores: s - mean)
  - clip=c (any mode): the result is clipped to [-c, c]
"""
from __future__ import annotations

import inspect
import math
import os
from typing import Any

from .protocol import completion_text, content_text


def is_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


class RunningStats:
    """Welford's online mean and variance."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        for x in values:
            self.n += 1
            delta = x - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 1.0


def is_reward_model(obj: Any) -> bool:
    """A loaded transformers model (TRL takes a PreTrainedModel in reward_funcs as a reward model)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(obj, PreTrainedModel)


class LearnedReward:
    """`path`: a model directory, or a loaded sequence-classification model (as TRL's reward_funcs take one; its
    tokenizer is `tokenizer` or, as in TRL, read from the directory it was loaded from)."""

    def __init__(self, path: Any, device: str | None = None, batch_size: int = 8, max_length: int = 2048,
                 chat_template: bool | None = None, normalize: str = "none", scale: float = 1.0,
                 shift: float = 0.0, clip: float | None = None, dtype: str | None = None,
                 tokenizer: Any = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if normalize not in ("none", "affine", "running"):
            raise ValueError(f"learned reward: normalize must be none, affine or running, got {normalize!r}")
        if is_reward_model(path):
            model, path = path, getattr(path.config, "_name_or_path", "") or type(path).__name__
            self.device = torch.device(device) if device else next(model.parameters()).device
            self.model = model.to(self.device).eval()
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(path)
                except Exception as e:  # noqa: BLE001 - built in memory, or from a place without a tokenizer
                    raise ValueError(f"learned reward: no tokenizer found where the model object was loaded from "
                                     f"({path!r}: {type(e).__name__}); pass it: LearnedReward(model, "
                                     "tokenizer=...)") from None
        else:
            self.device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
            kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
            self.model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs).to(self.device).eval()
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        if self.model.config.num_labels != 1:
            raise ValueError(f"learned reward {path}: the model has {self.model.config.num_labels} labels, "
                             "a reward model needs exactly 1")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # lets the model find the last token
        self.tokenizer.truncation_side = "left"
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        self.chat_template = has_template if chat_template is None else chat_template
        self.batch_size, self.max_length = batch_size, max_length
        self.normalize, self.scale, self.shift, self.clip = normalize, scale, shift, clip
        self.stats = RunningStats()
        # tokenizers may return inputs (e.g. token_type_ids) that a given architecture does not take
        self._accepts = set(inspect.signature(self.model.forward).parameters)
        self.__name__ = os.path.basename(os.path.normpath(path)) or "reward_model"

    def text(self, prompt: Any, completion: Any) -> str:
        """The text the model scores (see the module docstring); a missing prompt counts as empty."""
        prompt = "" if prompt is None else prompt
        if not self.chat_template:
            prompt_text = prompt if isinstance(prompt, str) else completion_text(prompt)
            return prompt_text + completion_text(completion)
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if isinstance(completion, list):
            messages += [{"role": m["role"], "content": content_text(m["content"])} for m in completion]
        else:
            messages.append({"role": "assistant", "content": completion})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def raw_scores(self, texts: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            # a chat template writes the special tokens itself (BOS...): added again they would be doubled, which
            # TRL avoids the same way; plain text gets the ones the model's tokenizer adds ([CLS] ... [SEP], BOS)
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length,
                                   add_special_tokens=not self.chat_template)
            inputs = {k: v.to(self.device) for k, v in batch.items() if k in self._accepts}
            with torch.no_grad():
                logits = self.model(**inputs).logits  # [B, 1]
            scores += logits[:, 0].float().cpu().tolist()  # one device->host sync per batch
        return scores

    def _normalise(self, scores: list[float]) -> list[float]:
        if self.normalize == "affine":
            scores = [self.scale * s + self.shift for s in scores]
        elif self.normalize == "running":
            self.stats.update(scores)
            scores = [(s - self.stats.mean) / max(self.stats.std, 1e-6) for s in scores]
        if self.clip is not None:
            scores = [min(self.clip, max(-self.clip, s)) for s in scores]
        return scores

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        prompts = prompts if prompts is not None else [None] * len(completions)
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        return self._normalise(self.raw_scores(texts))
