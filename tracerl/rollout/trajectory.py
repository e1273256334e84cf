"""The Trajectory: what happened at every denoising step of a batch of rollouts.

Coordinates: each row is `[prompt (left-padded to P) | response (L)]`, the *frame* the sampler ran on. Nothing
about a row depends on the other rows of its batch: its positions and its blocks are counted from its own first real
token (left padding is invisible), and its steps are its own: step t of a row is the t-th denoising forward in
which that row committed tokens (a row waiting for the rest of the batch spends no step). So a prompt's trajectory
is the same alone and in any batch, and the training replay rebuilds exactly the states and attention it saw.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

FORMAT = "tracerl.Trajectory/3"  # 3: noise_level; 2: per-row steps and blocks (1 had batch-global ones)
READABLE = ("tracerl.Trajectory/2", FORMAT)  # a format-2 file fed no noise level: it loads with noise_level None


@dataclass
class Trajectory:
    prompt_ids: torch.Tensor  # [N, P] int64, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [N, P] bool, True = real prompt token
    response_ids: torch.Tensor  # [N, L] int64, the committed tokens (never re-tokenised text)
    unmask_step: torch.Tensor  # [N, L] int64, the row's own step at which the position was filled (>= 0)
    action_mask: torch.Tensor  # [N, L] bool, True = sampled by the policy; False = padding filled after an EOS
    behaviour_logprob: torch.Tensor  # [N, L] float32, log-prob of the committed token under its sampling dist.
    block_offset: torch.Tensor  # [N] int64, response position j of row n lies in block (j + offset) // block_length
    #   (block diffusion: the prompt's tail in the response's first block, prompt_length % block_size; else 0)
    group_id: torch.Tensor  # [N] int64, rows with equal id answer the same prompt (G samples per prompt)
    num_forwards: int  # model forwards the sampler spent on the whole batch
    mask_token_id: int
    pad_token_id: int  # the token written after an EOS (the EOS itself, as LLaDA/Dream are trained)
    eos_token_id: int
    block_size: int | None  # None = full attention (semi-AR blocks are a schedule, not an attention pattern)
    block_length: int  # the block length the sampler walked (block_size for block diffusion)
    temperature: float  # the temperature behaviour_logprob was taken at (0 = greedy: log-prob at temperature 1)
    noise_level: torch.Tensor | None = None  # [N, S] float32, the sigma fed to the network at each of the row's own
    #   steps (S = num_steps; NaN: the row has no such step). None: no sigma was fed, and a time-conditioned model
    #   derived it from the state (tracerl.models.dit.derive_noise_level). Set by the published samplers
    #   (mdlm_ancestral, dream_origin, sedd_*) on time-conditioned models: replay step s with noise_level[:, s].
    behaviour_top1: torch.Tensor | None = None  # [N, L] int64, the sampling distribution's most likely token where
    #   each position was committed (its greedy choice): with an approximate cache, compared with the exact model's

    # ---- shapes ---------------------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    @property
    def num_steps(self) -> int:
        """Steps of the longest row (max step index + 1)."""
        return int(self.unmask_step.max().item()) + 1 if self.unmask_step.numel() else 0

    # ---- derived views --------------------------------------------------------------------------------------
    def sequences(self) -> torch.Tensor:
        """[N, P + L] the full final frame."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """[N, P + L] int64, 1 = real token (left padding of the prompt = 0)."""
        resp = torch.ones_like(self.response_ids)
        return torch.cat([self.prompt_mask.long(), resp], dim=1)

    def state_before(self, step: int | torch.Tensor) -> torch.Tensor:
        """[N, P + L] frame before `step`: response tokens with unmask_step < step, `[MASK]` elsewhere.

        `step` may be an int or a [N] tensor (a different step per row).
        """
        step = torch.as_tensor(step, device=self.unmask_step.device)
        if step.dim() == 1:
            step = step[:, None]
        committed = self.unmask_step < step
        resp = torch.where(committed, self.response_ids, torch.full_like(self.response_ids, self.mask_token_id))
        return torch.cat([self.prompt_ids, resp], dim=1)

    def completion_mask(self) -> torch.Tensor:
        """[N, L] bool: positions up to and including the first EOS (what the completion text is made of)."""
        is_eos = self.response_ids == self.eos_token_id
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        return ~after_eos

    def completion_lengths(self) -> torch.Tensor:
        """[N] int64, completion tokens per row, EOS excluded."""
        eos = self.response_ids == self.eos_token_id
        return (self.completion_mask() & ~eos).sum(-1)

    def steps_per_sequence(self) -> torch.Tensor:
        """[N] number of distinct steps in which the row committed at least one sampled token."""
        from tracerl.steps import distinct_steps

        return distinct_steps(self.unmask_step, self.action_mask)

    def block_of_position(self) -> torch.Tensor:
        """[N, L] int64, index of the response block (0 = the first) each response position was denoised in."""
        j = torch.arange(self.response_length, device=self.block_offset.device)
        return torch.div(j[None, :] + self.block_offset[:, None], self.block_length, rounding_mode="floor")

    def select(self, rows: torch.Tensor | list[int]) -> "Trajectory":
        """A trajectory holding only `rows` (for sharding or filtering)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[rows]
            values[f.name] = v
        return Trajectory(**values)

    def to(self, device: torch.device | str) -> "Trajectory":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Trajectory(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    # ---- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        version = data.pop("format", None) if isinstance(data, dict) else None
        if version not in READABLE:
            what = f"format {version!r}" if isinstance(version, str) else "not a TraceRL trajectory file"
            raise ValueError(f"{path}: {what}; this TraceRL reads {', '.join(READABLE)} (format 1 counted steps "
                             "over the whole batch: record the rollout again)")
        return cls(**data)

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
        """Join trajectories of equal frame shape (e.g. gathered from ranks); num_forwards adds up."""
        first = parts[0]
        values = {}
        for f in fields(first):
            items = [getattr(p, f.name) for p in parts]
            if f.name == "num_forwards":
                values[f.name] = sum(items)
            elif f.name == "noise_level":
                values[f.name] = _concat_noise_levels(items)
            elif isinstance(items[0], torch.Tensor):
                values[f.name] = torch.cat(items, dim=0)
            else:
                values[f.name] = items[0]
        return Trajectory(**values)


def _concat_noise_levels(items: list[torch.Tensor | None]) -> torch.Tensor | None:
    """[N_k, S_k] parts -> [sum N_k, max S_k], NaN-padded (parts may have taken different numbers of steps)."""
    if all(v is None for v in items):
        return None
    if any(v is None for v in items):
        raise ValueError("cannot concatenate trajectories with and without recorded noise levels")
    width = max(v.shape[1] for v in items)
    padded = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=float("nan")) for v in items]
    return torch.cat(padded, dim=0)
