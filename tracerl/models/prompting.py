"""Prompt text for a diffusion LM: the tokenizer's chat template for instruct models, the raw prompt for base ones.

Instruct checkpoints (LLaDA-8B-Instruct, Dream-v0-Instruct-7B, SDAR-*-Chat, TraDo) were fine-tuned on their chat
format and answer poorly without it; base checkpoints have no template and continue raw text. The template comes
from the checkpoint's own tokenizer files, so each family gets its own format.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from tracerl.errors import UserError

Message = dict[str, Any]


def format_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[Message],
    use_chat_template: bool,
    system_prompt: str | None = None,
) -> str:
    """The text to tokenize for one prompt.

    prompt: a user message, or a conversation as TRL writes it ([{"role": ..., "content": ...}, ...]).
    use_chat_template: True applies the tokenizer's template to a string prompt too, with the assistant turn
    opened (add_generation_prompt=True); False returns a string prompt as is. A conversation always goes through
    the template, as in TRL (there is no neutral way to flatten one). system_prompt: a system message placed
    first (chat), or a paragraph placed before the prompt (raw).
    """
    if not use_chat_template and isinstance(prompt, str):
        return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        why = "use_chat_template is true" if use_chat_template else "the prompt is a conversation (chat messages)"
        raise UserError(
            f"{why} but the tokenizer {name!r} has no chat template (a base model?); give string prompts with "
            "use_chat_template: false, or add a chat_template to its tokenizer_config.json"
        )
    messages = _messages(prompt)
    if system_prompt:
        if messages[0]["role"] == "system":
            raise UserError("the prompt already starts with a system message; drop system_prompt or that message")
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _messages(prompt: str | list[Message]) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise UserError(f"a prompt must be a string or a non-empty list of chat messages, got {type(prompt).__name__}")
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise UserError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r}")
    return list(prompt)
