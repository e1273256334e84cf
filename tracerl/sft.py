"""Masked-diffusion supervised fine-tuning (LLaDA / MDLM objective), and its block-diffusion variant.

Per row, t ~ U(eps, 1); each response token is masked with probability t; the loss is the cross-entropy of the
masked tokens weighted by 1 / t and averaged over response tokens:

    L = - E_t [ 1/t * sum_{j masked} log p(x_j | x_t) ] / |response|        (LLaDA's ELBO bound)

Full-attention models see the noised frame. Block-diffusion models train like they sample: one packed row
`[prompt | clean response | noisy copy of every block]` where each noisy block sees the clean blocks before it
(the same layout as the RL replay).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from transformers import get_scheduler

from tracerl.config import SFTConfig
from tracerl.data import PromptSampler
from tracerl.models.base import DiffusionLM
from tracerl.packing import pack_rows
from tracerl.rollout.sampler import pad_prompts
from tracerl.scoring import check_prompts
from tracerl.tracking import MetricsLogger


def encode_rows(model: DiffusionLM, rows: Sequence[dict[str, Any]], config: SFTConfig
                ) -> tuple[list[list[int]], torch.Tensor]:
    """Prompt token lists and response ids [N, L] (EOS-terminated, EOS-padded, cut at L)."""
    from tracerl.models.prompting import format_prompt

    tok, m, L = model.tokenizer, config.model, config.sft.max_completion_length
    prompts, responses = [], torch.full((len(rows), L), model.eos_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        text = format_prompt(tok, row["prompt"], m.use_chat_template, m.system_prompt)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        ids = tok(str(row[config.sft.completion_column]), add_special_tokens=False)["input_ids"][:L]
        responses[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return prompts, responses


def masked_diffusion_loss(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """prompt_ids/prompt_mask [N, P] (left-padded), response_ids [N, L] -> (loss, metrics)."""
    N, P = prompt_ids.shape
    L = response_ids.shape[1]
    t = eps + (1 - eps) * torch.rand(N, 1, generator=generator)  # [N, 1]
    masked = torch.rand(N, L, generator=generator) < t  # [N, L]
    noisy = torch.where(masked, model.mask_token_id, response_ids)
    key_padding = torch.cat([prompt_mask.long(), torch.ones(N, L, dtype=torch.long)], dim=1)
    dev = model.device
    if model.block_size is None:
        logits = model.logits(torch.cat([prompt_ids, noisy], 1).to(dev), key_padding.to(dev),
                              keep=torch.arange(P, P + L, device=dev))  # [N, L, V]
    else:
        logits = _block_logits(model, prompt_ids, prompt_mask, response_ids, noisy)
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), response_ids.to(dev).flatten(),
                                           reduction="none").view(N, L)
    loss = ((ce * masked.to(dev)) / t.to(dev)).sum() / (N * L)
    correct = (logits.argmax(-1).cpu() == response_ids) & masked
    return loss, {"loss": loss.item(), "masked_token_accuracy": (correct.sum() / masked.sum().clamp(min=1)).item(),
                  "mask_ratio": masked.float().mean().item()}


def _block_logits(model: DiffusionLM, prompt_ids, prompt_mask, response_ids, noisy) -> torch.Tensor:
    """Packed block-diffusion forward (tracerl.packing); returns logits [N, L, V] of the noisy response copy."""
    packed = pack_rows(prompt_ids, prompt_mask, response_ids, noisy, model.block_size)
    L = response_ids.shape[1]
    keep = torch.arange(packed.response_start, packed.response_start + L)  # noisy response j, same column per row
    dev = model.device
    return model.logits_packed(packed.input_ids.to(dev), packed.visibility().to(dev), packed.position_ids.to(dev),
                               keep=keep.to(dev))


def train_sft(model: DiffusionLM, rows: Sequence[dict[str, Any]], config: SFTConfig) -> list[dict[str, float]]:
    """Train `model` in place on `rows` (dicts with a prompt and config.sft.completion_column); save at the end
    to `<output_dir>/final`."""
    tr, o = config.trainer, config.optimizer
    # positions run to prompt + max_completion_length (the block-diffusion packing repeats the response positions):
    # a row past the model's maximum is refused by index before the first step, not partway through training
    check_prompts(model, rows, config.sft.max_completion_length, config.model.use_chat_template,
                  config.model.system_prompt, "sft", length_key="sft.max_completion_length")
    prompts, responses = encode_rows(model, rows, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                  eps=o.adam_epsilon, weight_decay=o.weight_decay)
    scheduler = get_scheduler(o.lr_scheduler_type, optimizer, num_warmup_steps=int(o.warmup_ratio * tr.max_steps),
                              num_training_steps=tr.max_steps)
    sampler = PromptSampler(len(rows), seed=tr.seed)
    gen = torch.Generator().manual_seed(tr.seed)
    logger = MetricsLogger(tr.output_dir, config.logging.report_to, project=config.logging.project,
                           run_name=config.logging.run_name, logging_steps=tr.logging_steps)
    history = []
    model.train()
    for step in range(1, tr.max_steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for _ in range(tr.gradient_accumulation_steps):
            idx = sampler.next(tr.per_device_train_batch_size)
            p_ids, p_mask = pad_prompts([prompts[i] for i in idx], model.pad_token_id)
            loss, metrics = masked_diffusion_loss(model, p_ids, p_mask, responses[idx], gen, config.sft.mask_eps)
            (loss / tr.gradient_accumulation_steps).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / tr.gradient_accumulation_steps
        if o.max_grad_norm:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm))
        optimizer.step()
        scheduler.step()
        sums.update({"learning_rate": scheduler.get_last_lr()[0], "perf/step_seconds": time.perf_counter() - t0})
        history.append(sums)
        logger.log(step, sums)
    model.eval()
    logger.finish()
    model.save_pretrained(f"{tr.output_dir}/final")
    return history
