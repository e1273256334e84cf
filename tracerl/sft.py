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

from tracerl.checkpoint import (already_finished, resume_if_asked, rng_state, save_checkpoint, save_weights,
                                set_aside_previous_run, set_rng_state)
from tracerl.config import SFTConfig
from tracerl.distributed import LocalBackend
from tracerl.data import PromptSampler
from tracerl.errors import UserError
from tracerl.models.dit import loglinear_sigma
from tracerl.models.mdlm import MODEL_TYPE as MDLM_FAMILY
from tracerl.models.base import DiffusionLM
from tracerl.packing import pack_rows
from tracerl.rollout.sampler import pad_prompts
from tracerl.scoring import check_prompts
from tracerl.tracking import MetricsLogger
from tracerl.update import resume_schedule


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
    # the answer and its first EOS; the EOS padding after it is trained too, but is easy and with short answers
    # would make up most of masked_token_accuracy
    is_eos = response_ids == model.eos_token_id  # [N, L]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), L)  # [N]
    answer = masked & (torch.arange(L) <= first_eos[:, None])  # [N, L]
    return loss, {"loss": loss.item(), "masked_token_accuracy": (correct.sum() / masked.sum().clamp(min=1)).item(),
                  "masked_answer_accuracy": ((correct & answer).sum() / answer.sum().clamp(min=1)).item(),
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
    """Train `model` in place on `rows` (dicts with a prompt and config.sft.completion_column); checkpoints every
    trainer.save_steps (resumable with trainer.resume_from_checkpoint, exactly), the model at the end in
    `<output_dir>/final`. Returns this run's step metrics."""
    # positions run to prompt + max_completion_length (the block-diffusion packing repeats the response positions):
    # a row past the model's maximum is refused by index before the first step, not partway through training
    check_prompts(model, rows, config.sft.max_completion_length, config.model.use_chat_template,
                  config.model.system_prompt, "sft", length_key="sft.max_completion_length")
    return SFTRun(model, rows, config).train()


class SFTRun:
    """One SFT run: the model, optimizer, schedule, row order and mask generator, with the state_dict /
    load_state_dict / engines the checkpoint module (tracerl/checkpoint.py) saves and resumes as it does an RL run."""

    def __init__(self, model: DiffusionLM, rows: Sequence[dict[str, Any]], config: SFTConfig):
        tr, o = config.trainer, config.optimizer
        torch.manual_seed(tr.seed)  # dropout draws from the global generator (a resumed run restores its state)
        self.model, self.config, self.backend, self.step = model, config, LocalBackend(), 0
        self.resumed_elsewhere = False  # set by resume_if_asked: the checkpoint lies outside trainer.output_dir
        self.prompts, self.responses = encode_rows(model, rows, config)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                           eps=o.adam_epsilon, weight_decay=o.weight_decay)
        self.scheduler = get_scheduler(o.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=int(o.warmup_ratio * tr.max_steps),
                                       num_training_steps=tr.max_steps)
        self.sampler = PromptSampler(len(rows), seed=tr.seed)
        self.masks = torch.Generator().manual_seed(tr.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                "optimizer": self.optimizer.state_dict(), "masks": self.masks.get_state(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "masks" not in state:
            raise UserError("the checkpoint is an RL run's, not an SFT run's; start SFT from its model/ directory "
                            "(model.path) instead")
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.optimizer.load_state_dict(state["optimizer"])
        resume_schedule(self.scheduler, state["scheduler"])  # after the optimizer's state, whose rates it sets
        self.masks.set_state(state["masks"])
        set_rng_state(state["rng"])

    def engines(self) -> dict[str, Any]:
        return {}

    def train(self) -> list[dict[str, float]]:
        tr, model = self.config.trainer, self.model
        final = Path(tr.output_dir) / "final"
        if final.exists() and not final.is_dir():  # found now, not after the training it would lose
            raise UserError(f"trainer.output_dir: {str(final)!r} is a file; the model is saved there (move it away)")
        resume_if_asked(self)
        if already_finished(self):
            return []
        if self.step == 0 or self.resumed_elsewhere:  # an earlier run's model is set aside, not mixed in
            set_aside_previous_run(self)
            set_aside_previous_final(Path(tr.output_dir))
        logger = MetricsLogger(tr.output_dir, self.config.logging.report_to, project=self.config.logging.project,
                               run_name=self.config.logging.run_name, logging_steps=tr.logging_steps,
                               start_step=self.step, resumed_elsewhere=self.resumed_elsewhere)
        history = []
        model.train()
        while self.step < tr.max_steps:
            metrics = self.train_step()
            history.append(metrics)
            logger.log(self.step, metrics)
            if tr.save_steps and self.step % tr.save_steps == 0 and self.step < tr.max_steps:
                model.eval()
                save_checkpoint(self)
                model.train()
        model.eval()
        logger.finish()
        if tr.save_steps:
            save_checkpoint(self)
        set_aside_previous_final(Path(tr.output_dir))  # a resumed run's earlier final/, if it had one
        save_weights(self, final)  # the LoRA adapter alone (a published layout cannot hold one), or the model
        return history

    def train_step(self) -> dict[str, float]:
        tr, o, model = self.config.trainer, self.config.optimizer, self.model
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for _ in range(tr.gradient_accumulation_steps):
            idx = self.sampler.next(tr.per_device_train_batch_size)
            p_ids, p_mask = pad_prompts([self.prompts[i] for i in idx], model.pad_token_id)
            loss, metrics = masked_diffusion_loss(model, p_ids, p_mask, self.responses[idx], self.masks,
                                                  self.config.sft.mask_eps)
            (loss / tr.gradient_accumulation_steps).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / tr.gradient_accumulation_steps
        if o.max_grad_norm:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        sums.update({"learning_rate": self.scheduler.get_last_lr()[0], "perf/step_seconds": time.perf_counter() - t0})
        return sums


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
