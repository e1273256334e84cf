"""Masked-diffusion supervised fine-tuning (LLaDA / MDLM objective), and its block-diffusion variant.

Per row, t ~ U(eps, 1); each response token is masked with probability t; the loss is the cross-entropy of the
masked tokens weighted by 1 / t and averaged over response tokens:

    L = - E_t [ 1/t * sum_{j masked} log p(x_j | x_t) ] / |response|        (LLaDA's ELBO bound)

The DiT families (MDLM, SEDD) train as their published trainers do: masked with 1 - exp(-sigma(t)) = (1 - eps) t
of the loglinear schedule, the network told sigma(t) when it is time-conditioned, and (MDLM's SUBS) the [MASK]
column left out of the softmax. A completion longer than sft.max_completion_length is refused, not cut.

Full-attention models see the noised frame. Block-diffusion models train like they sample: one packed row
`[prompt | clean response | noisy copy of every block]` where each noisy block sees the clean blocks before it
(the same layout as the RL replay).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import get_scheduler

from tracerl.config import SFTConfig
from tracerl.data import PromptSampler
from tracerl.errors import UserError
from tracerl.models.dit import loglinear_sigma
from tracerl.models.mdlm import MODEL_TYPE as MDLM_FAMILY
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
    prompts, responses, too_long = [], torch.full((len(rows), L), model.eos_token_id, dtype=torch.long), []
    for i, row in enumerate(rows):
        text = format_prompt(tok, row["prompt"], m.use_chat_template, m.system_prompt)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        ids = tok(str(row[config.sft.completion_column]), add_special_tokens=False)["input_ids"]
        if len(ids) > L:  # cut, it would lose its end and its EOS: the model would learn answers that never end
            too_long.append((i, len(ids)))
            continue
        responses[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    if too_long:
        i, n = too_long[0]
        raise UserError(f"sft.max_completion_length: the completion of row {i} is {n} tokens, longer than "
                        f"sft.max_completion_length={L} ({len(too_long)} of {len(rows)} rows are; the longest has "
                        f"{max(k for _, k in too_long)}); raise it or drop those rows")
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
    move_chance, noise_level = t, None
    noise_eps = getattr(model.config, "noise_eps", None)  # the DiT families (MDLM, SEDD): loglinear noise
    if noise_eps is not None:  # their trainers mask with 1 - exp(-sigma(t)) and tell the network sigma(t)
        move_chance = (1 - float(noise_eps)) * t  # [N, 1]; the weight dsigma / expm1(sigma) is still 1 / t
        noise_level = loglinear_sigma(t[:, 0], float(noise_eps)).to(model.device)  # [N], unused unless conditioned
    masked = torch.rand(N, L, generator=generator) < move_chance  # [N, L]
    noisy = torch.where(masked, model.mask_token_id, response_ids)
    key_padding = torch.cat([prompt_mask.long(), torch.ones(N, L, dtype=torch.long)], dim=1)
    dev = model.device
    if model.block_size is None:
        logits = model.logits(torch.cat([prompt_ids, noisy], 1).to(dev), key_padding.to(dev),
                              keep=torch.arange(P, P + L, device=dev), noise_level=noise_level)  # [N, L, V]
    else:
        logits = _block_logits(model, prompt_ids, prompt_mask, response_ids, noisy)
    logits = logits.float()
    if model.family == MDLM_FAMILY:  # SUBS: MDLM never predicts [MASK] (its published loss drops that column)
        logits = logits.index_fill(-1, torch.tensor([model.mask_token_id], device=dev), float("-inf"))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), response_ids.to(dev).flatten(),
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
    torch.manual_seed(tr.seed)  # dropout draws from the global generator
    final = set_aside_previous_final(Path(tr.output_dir))
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
    model.save_pretrained(str(final))
    return history


def set_aside_previous_final(output_dir: Path) -> Path:
    """output_dir/final, emptied of an earlier run first: it moves to final.prev-N/ (nothing is deleted), as an
    RL run sets earlier checkpoints aside. Saved over in place, a LoRA run's adapter_config.json beside a later full
    run's weights made loaders read the stale adapter."""
    final = output_dir / "final"
    if final.exists() and not final.is_dir():
        raise UserError(f"trainer.output_dir: {str(final)!r} is a file; the model is saved there (move it away)")
    if final.is_dir() and any(final.iterdir()):
        n = 1
        while (aside := output_dir / f"final.prev-{n}").exists():
            n += 1
        final.rename(aside)
        print(f"[sft] {final} held an earlier run's model: moved to {aside.name}/", flush=True)
    return final
