"""Masked-diffusion SFT: the objective, and that a tiny model learns a small task with it."""

import pytest
import torch

from tracerl.config import OptimizerConfig, SFTConfig, SFTSection, TrainerConfig
from tracerl.errors import UserError
from tracerl.models import build_tiny_model, load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.display import completions
from tracerl.sft import masked_diffusion_loss, train_sft

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]


def test_loss_is_the_weighted_masked_cross_entropy():
    model = build_tiny_model("llama")
    prompt = torch.tensor([[10, 11, 12]])
    response = torch.tensor([[20, 21, 22, 23]])
    gen = torch.Generator().manual_seed(0)
    loss, metrics = masked_diffusion_loss(model, prompt, torch.ones_like(prompt, dtype=torch.bool), response, gen)
    # recompute by hand with the same random draws
    gen = torch.Generator().manual_seed(0)
    t = 1e-3 + (1 - 1e-3) * torch.rand(1, 1, generator=gen)
    masked = torch.rand(1, 4, generator=gen) < t
    noisy = torch.where(masked, model.mask_token_id, response)
    logits = model.logits(torch.cat([prompt, noisy], 1))[:, 3:]
    ce = torch.nn.functional.cross_entropy(logits[0], response[0], reduction="none")
    assert loss.item() == pytest.approx(((ce * masked[0]) / t[0]).sum().item() / 4, rel=1e-5)
    assert metrics["mask_ratio"] == masked.float().mean().item()


def test_a_row_too_long_for_the_model_is_refused_by_index_before_training(tmp_path):
    model = build_tiny_model("llama", max_position_embeddings=32)
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "9" * 30, "completion": "9"}]
    cfg = SFTConfig(sft=SFTSection(max_completion_length=4), trainer=TrainerConfig(output_dir=str(tmp_path)))
    with pytest.raises(UserError, match=r"sft row 1: prompt of \d+ tokens \+ sft.max_completion_length 4 exceeds"):
        train_sft(model, rows, cfg)
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("block", [None, 4])
def test_sft_teaches_addition(tmp_path, block):
    model = build_tiny_model("qwen3", block_size=block)
    cfg = SFTConfig(sft=SFTSection(max_completion_length=4), optimizer=OptimizerConfig(learning_rate=3e-3),
                    trainer=TrainerConfig(max_steps=250, per_device_train_batch_size=32, output_dir=str(tmp_path),
                                          logging_steps=1000))
    history = train_sft(model, ROWS, cfg)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    ids = [model.tokenizer(r["prompt"])["input_ids"] for r in ROWS]
    traj = generate(model, ids, RolloutConfig(max_completion_length=4, steps=4, temperature=0))
    accuracy = sum(c == r["completion"] for c, r in zip(completions(traj, model.tokenizer), ROWS)) / len(ROWS)
    assert accuracy > 0.3  # chance is ~0.05
    reloaded = load_model(str(tmp_path / "final"))
    assert reloaded.block_size == block
