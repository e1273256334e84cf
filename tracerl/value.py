"""The diffusion value model: a scalar head on the policy's own architecture, for every family.

V_j is read at the state the token was committed from (the same replay rows the policy loss uses), so the value of
a token is the value of the trace step it belongs to. Full fine-tuning keeps a separate copy of the backbone; with
LoRA the value model is a second adapter plus head on the policy's frozen base, so base weights are held once.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from tracerl.models.base import DiffusionLM
from tracerl.peft_utils import keep_requires_grad
from tracerl.replay import ReplayBatch

VALUE_ADAPTER = "value"


class ValueModel(nn.Module):
    def __init__(self, body: DiffusionLM, adapter: str | None = None):
        super().__init__()
        self.body = body
        self.adapter = adapter  # peft adapter name when sharing the policy's base, else None
        hidden = body.config.hidden_size
        self.head = nn.Linear(hidden, 1, dtype=torch.float32, device=body.device)
        with torch.random.fork_rng(devices=[]):  # creating a value model must not shift the run's RNG stream
            torch.manual_seed(0)
            nn.init.normal_(self.head.weight, std=0.1 / hidden ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: DiffusionLM) -> "ValueModel":
        """A value model for `policy`: a LoRA adapter on the same base when the policy is a peft model, otherwise
        a separate trainable copy of the backbone."""
        backbone = policy.backbone
        if hasattr(backbone, "peft_config"):
            active = backbone.active_adapter
            with torch.random.fork_rng(devices=[]):  # seeded: every rank (and a resumed run) gets the same init
                torch.manual_seed(0)
                backbone.add_adapter(VALUE_ADAPTER, copy.deepcopy(backbone.peft_config[active]))
            backbone.set_adapter(active)  # adding an adapter must not switch the policy's
            value = cls(policy, adapter=VALUE_ADAPTER)
            for p in value._adapter_params().values():  # trainable for good: switching adapters keeps the flags
                p.requires_grad_(True)
            return value
        body = DiffusionLM(copy.deepcopy(backbone), policy.tokenizer, policy.spec)
        body.requires_grad_(True)
        return cls(body)

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.body.backbone.named_parameters() if f".{self.adapter}." in n}

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.adapter is None:
            return list(self.body.parameters()) + list(self.head.parameters())
        return list(self._adapter_params().values()) + list(self.head.parameters())

    @contextmanager
    def _active(self) -> Iterator[None]:
        """Run the shared peft model with the value adapter, then hand it back to the policy's adapter."""
        if self.adapter is None:
            yield
            return
        backbone = self.body.backbone
        previous = backbone.active_adapter
        with keep_requires_grad(backbone):  # set_adapter's requires_grad side effects would break ZeRO's hooks
            backbone.set_adapter(self.adapter)
        try:
            yield
        finally:
            with keep_requires_grad(backbone):
                backbone.set_adapter(previous)

    def forward(self, batch: ReplayBatch) -> torch.Tensor:
        """[R, T] value of every position of the replay rows (read at the scored positions)."""
        dev = self.body.device
        visible = batch.visibility()  # packed rows: [R, T, T] built for this forward only
        visible = None if visible is None else visible.to(dev)
        with self._active():
            noise = getattr(batch, "noise_level", None)  # replay rows of a published sampler carry it
            noise = None if noise is None else noise.to(dev)
            hidden = self.body.hidden_states(batch.input_ids.to(dev), batch.key_padding.to(dev), visible=visible,
                                             position_ids=batch.position_ids.to(dev), noise_level=noise)
        # float32 head; under DeepSpeed bf16 the engine casts it to bf16 with everything else
        return self.head(hidden.to(self.head.weight.dtype)).float().squeeze(-1)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs: the head, plus the body (full copy) or only the value adapter's weights."""
        head = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.adapter is None:
            return self.state_dict()
        return {**head, **{f"adapter.{k}": v.detach() for k, v in self._adapter_params().items()}}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.adapter is None:
            self.load_state_dict(state)
            return
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        params = self._adapter_params()
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("adapter."):
                    params[k[8:]].copy_(v)


class Critic:
    """The value model and the optimizer (engine) that trains it: what a checkpoint saves of the critic.

    `shared`: a LoRA value adapter under DeepSpeed trains in the policy's own engine (two engines must not hook the
    same partitioned modules), so its optimizer state is the policy's and the critic saves only its weights.
    """

    def __init__(self, model: ValueModel, trainable: object, shared: bool):
        self.model, self.trainable, self.shared = model, trainable, shared

    def state_dict(self) -> dict[str, object]:
        """Single-process state: the value model (head + body or adapter) and, unless shared, its optimizer."""
        state: dict[str, object] = {"model": self.model.checkpoint_state()}
        if not self.shared:
            state["optimizer"] = self.trainable.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.model.load_checkpoint_state(state["model"])
        if not self.shared:
            self.trainable.optimizer.load_state_dict(state["optimizer"])
