"""Masked-diffusion SFT: the objective, and that a tiny model learns a small task with it."""

import pytest
import torch

from tracerl.config import OptimizerConfig, SFTConfig, SFTSection, SFTTrainerConfig, TrainerConfig
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


def test_answer_accuracy_leaves_out_the_eos_padding():
    """masked_token_accuracy scores every masked position, EOS padding included; masked_answer_accuracy only the
    answer and its first EOS. All masked (t near 1) and the model made to predict EOS everywhere: the padding is
    all right, the answer's two tokens wrong and its EOS right."""
    model = build_tiny_model("llama")
    eos = model.eos_token_id
    # every logit 0 but EOS's 1: the model predicts EOS everywhere
    model.backbone.lm_head.register_forward_hook(lambda m, a, out: torch.zeros_like(out).index_fill(-1,
                                                 torch.tensor([eos]), 1.0))
    response = torch.tensor([[20, 21, eos, eos, eos, eos, eos, eos]])  # answer 2 tokens + 6 EOS
    gen = torch.Generator()
    gen.manual_seed(0)
    while True:  # a draw that masks all 8 positions
        state = gen.get_state()
        t = 1e-3 + (1 - 1e-3) * torch.rand(1, 1, generator=gen)
        if bool((torch.rand(1, 8, generator=gen) < t).all()):
            break
    gen.set_state(state)
    prompt = torch.tensor([[10, 11]])
    _, metrics = masked_diffusion_loss(model, prompt, torch.ones_like(prompt, dtype=torch.bool), response, gen)
    assert metrics["mask_ratio"] == 1.0
    assert metrics["masked_token_accuracy"] == pytest.approx(6 / 8)
    assert metrics["masked_answer_accuracy"] == pytest.approx(1 / 3)


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


def test_dit_families_train_at_the_published_noise_level():
    """MDLM / SEDD (diffusion.py `_forward_pass_diffusion`): sigma = -log(1 - (1 - eps) t), mask with
    1 - exp(-sigma) = (1 - eps) t, the network told sigma (SEDD, time-conditioned), SUBS drops [MASK] (MDLM)."""
    for family in ("sedd", "mdlm"):
        model = build_tiny_model(family)
        prompt, response = torch.tensor([[10, 11, 12, 13, 14]]), torch.tensor([[20, 21, 22, 23, 24, 25, 26, 27]])
        seen = {}
        hook = model.backbone.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        loss, _ = masked_diffusion_loss(model, prompt, torch.ones_like(prompt, dtype=torch.bool), response,
                                        torch.Generator().manual_seed(0))
        hook.remove()
        gen = torch.Generator().manual_seed(0)
        t = 1e-3 + (1 - 1e-3) * torch.rand(1, 1, generator=gen)
        masked = torch.rand(1, 8, generator=gen) < (1 - 1e-3) * t
        sigma = -torch.log1p(-(1 - 1e-3) * t[:, 0])
        noisy = torch.where(masked, model.mask_token_id, response)
        logits = model.logits(torch.cat([prompt, noisy], 1), noise_level=sigma)[:, 5:].float()
        if family == "mdlm":
            logits[..., model.mask_token_id] = float("-inf")
        else:
            torch.testing.assert_close(seen["noise_level"], sigma)  # not the share of [MASK] over prompt + response
        ce = torch.nn.functional.cross_entropy(logits[0], response[0], reduction="none")
        assert loss.item() == pytest.approx(((ce * masked[0]) / t[0]).sum().item() / 8, rel=1e-5)


def test_a_completion_longer_than_the_budget_is_refused_not_cut(tmp_path):
    model = build_tiny_model("llama")
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "four, as it happens"}]
    cfg = SFTConfig(sft=SFTSection(max_completion_length=4), trainer=TrainerConfig(output_dir=str(tmp_path)))
    with pytest.raises(UserError, match=r"the completion of row 1 is \d+ tokens, longer than "
                                        r"sft.max_completion_length=4 \(1 of 2 rows"):
        train_sft(model, rows, cfg)


def test_a_new_run_sets_the_old_final_aside_and_one_seed_gives_one_lora_run(tmp_path, monkeypatch):
    from tracerl.build import build_model
    from tracerl.config import ModelConfig, PeftSection

    monkeypatch.chdir(tmp_path)  # model.path relative, as in the shipped recipes
    tiny_dir = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(str(tiny_dir))
    cfg = SFTConfig(sft=SFTSection(max_completion_length=4), optimizer=OptimizerConfig(learning_rate=1e-2),
                    trainer=TrainerConfig(max_steps=3, per_device_train_batch_size=4, output_dir=str(tmp_path / "o"),
                                          logging_steps=1000))
    peft = PeftSection(r=4, lora_dropout=0.1)
    runs = [train_sft(build_model(ModelConfig(path="tiny"), peft, seed=7), ROWS, cfg) for _ in range(2)]
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]  # LoRA init and dropout from the seed
    assert (tmp_path / "o" / "final.prev-1" / "adapter_config.json").is_file()  # the first run's, set aside
    train_sft(build_model(ModelConfig(path=str(tiny_dir))), ROWS, cfg)  # a full fine-tune into the same place
    final = tmp_path / "o" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    import json
    adapter = json.loads((tmp_path / "o" / "final.prev-1" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_dir.resolve())  # loadable from any directory


def test_eval_keys_in_an_sft_recipe_are_refused():
    from tracerl.config import DataConfig

    with pytest.raises(UserError, match=r"data.eval_files: `tracerl sft` runs no evaluation"):
        SFTConfig(data=DataConfig(train_files=["x.jsonl"], eval_files=["y.jsonl"])).validate()


def test_an_interrupted_sft_run_resumes_exactly(tmp_path, monkeypatch):
    """Checkpoints every 3 steps; a run killed at step 5 and resumed from `latest` ends with the uninterrupted
    run's weights and metrics (row order, masks, dropout and optimizer state restored)."""
    from tracerl import sft

    def config(out):
        return SFTConfig(sft=SFTSection(max_completion_length=4), optimizer=OptimizerConfig(learning_rate=1e-2),
                         trainer=SFTTrainerConfig(max_steps=7, per_device_train_batch_size=8, output_dir=str(out),
                                                  save_steps=3, logging_steps=1000))

    def model():
        m = build_tiny_model("mdlm", seed=0)
        for module in m.backbone.modules():  # mdlm-owt's residual dropout, so the global RNG matters
            if hasattr(module, "dropout") and isinstance(module.dropout, float):
                module.dropout = 0.1
        return m

    whole = model()
    full = train_sft(whole, ROWS, config(tmp_path / "whole"))
    assert [p.name for p in sorted((tmp_path / "whole").glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-6",
                                                                                   "checkpoint-7"]
    step = sft.SFTRun.train_step

    def dies_at_5(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(sft.SFTRun, "train_step", dies_at_5)
    with pytest.raises(KeyboardInterrupt):
        train_sft(model(), ROWS, config(tmp_path / "cut"))
    monkeypatch.setattr(sft.SFTRun, "train_step", step)
    cfg = config(tmp_path / "cut")
    cfg.trainer.resume_from_checkpoint = "latest"
    resumed_model = model()
    rest = train_sft(resumed_model, ROWS, cfg)
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[3:]]
    for p, q in zip(whole.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    from tracerl.tracking import read_metrics
    assert [m["step"] for m in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, 8))


def test_an_sft_checkpoint_is_not_resumed_as_an_rl_run(tmp_path):
    from tracerl.config import RLConfig
    from tracerl.trainer import RLTrainer

    cfg = SFTConfig(sft=SFTSection(max_completion_length=4),
                    trainer=SFTTrainerConfig(max_steps=1, per_device_train_batch_size=4, output_dir=str(tmp_path / "s"),
                                             save_steps=1))
    train_sft(build_tiny_model("llama"), ROWS, cfg)
    rl = RLConfig(rollout=RolloutConfig(max_completion_length=4, steps=4),
                  trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=2,
                                        output_dir=str(tmp_path / "r"),
                                        resume_from_checkpoint=str(tmp_path / "s" / "checkpoint-1")))
    with pytest.raises(UserError, match="checkpoint is an SFT run's, not an RL run's"):
        RLTrainer(rl, build_tiny_model("llama"), lambda prompts, completions, **kw: [0.0] * len(prompts),
                  ROWS[:2]).train()


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_lora_sft_of_a_published_layout_saves_its_adapter(tmp_path, family):
    """A published layout cannot hold an adapter: final/ is the adapter (as RL checkpoints are), and it loads back
    onto the base with the trained weights."""
    from tests.models.published_checkpoints import write_dream, write_llada, write_sdar
    from tracerl.build import build_model
    from tracerl.config import ModelConfig, PeftSection

    base = tmp_path / family
    {"llada": write_llada, "dream": write_dream, "sdar": write_sdar}[family](base)
    model = build_model(ModelConfig(path=str(base)), PeftSection(r=4), seed=0)
    cfg = SFTConfig(sft=SFTSection(max_completion_length=4), optimizer=OptimizerConfig(learning_rate=1e-2),
                    trainer=SFTTrainerConfig(max_steps=2, per_device_train_batch_size=4, output_dir=str(tmp_path / "o"),
                                             logging_steps=1000))
    rows = [{"prompt": "ab", "completion": "cd"}, {"prompt": "ba", "completion": "dc"}]
    train_sft(model, rows, cfg)
    final = tmp_path / "o" / "final"
    assert (final / "adapter_config.json").is_file()
    if family == "dream":  # tokenizer_config.json's auto_map names it: the copy must not point at missing code
        assert (final / "tokenization_dream.py").read_text() == (base / "tokenization_dream.py").read_text()
    from tracerl.peft_utils import load_adapter

    reloaded = load_adapter(str(final))
    ids = torch.tensor([model.tokenizer("abcd", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.logits(ids), model.logits(ids))
