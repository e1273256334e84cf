"""The published estimators (d1, coupled-GRPO, wd1) against references written here from their papers' code.

Two kinds of check:
  * hand-worked numbers for the objectives (the loss of given log-probs, advantages and masks);
  * end to end through the trainer on a tiny model (full attention and block diffusion): the test re-draws the
    masks with the published rule from the same generator, builds the masked inputs itself, runs its own forwards
    (block diffusion: one block at a time, on `[prompt | clean earlier blocks | masked block]`), and computes each
    PPO epoch's loss from the published equations; the trainer's loss must match.

The published rules (dllm-reasoning/d1 diffu_grpo_trainer.py; apple/ml-diffucoder coupled_grpo.py;
xiaohangt/wd1 rev_grpo_trainer.py):
  d1       every completion token masked; prompt token masked iff u < p_mask_prompt (u ~ U(0,1) per position of
           a [b, P + L] draw); log-prob = log_softmax over the full vocabulary; A = r - mean_group(r);
           loss per micro-batch = sum_ik m_ik [-min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3] / sum m,
           k3 = exp(ref - l) - (ref - l) - 1, averaged over micro-batches; a fresh mask per PPO iteration.
  coupled  t ~ U(0.2, 0.8), u ~ U(0,1) per completion position; passes: all masked / u < t / u > t; token score
           (l0 + [u < t] l1 / t + [u > t] l2 / (1 - t)) / 2; A = r - mean of the others; d1's loss on the scores.
  wd1      d1's masks and log-probs; loss per micro-batch = sum_i (softmax_g(-A)_i - softmax_g(A)_i) sum_k m_ik l_ik.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tracerl import credit, losses
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
from tracerl.models import build_tiny_model
from tracerl.rollout import RolloutConfig
from tracerl.rollout.config import derive_seed
from tracerl.trainer import REPLAY_STREAM, RLTrainer

ln = math.log


# ---- hand-worked objectives -----------------------------------------------------------------------------------
def test_d1_loss_by_hand():
    """Group of 2, rewards [1, 0] -> A = [0.5, -0.5]; eps 0.2; the masked-out (0, 2) must not count."""
    adv = credit.group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), "none")[0]
    assert adv.tolist() == [0.5, -0.5]
    lp = torch.tensor([[ln(.5), ln(.25), ln(.9)], [ln(.6), ln(.3), ln(.12)]])
    old = torch.tensor([[ln(.5), ln(.5), ln(.1)], [ln(.4), ln(.3), ln(.2)]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w = losses.token_weights(mask, "microbatch-token-mean", microbatch=torch.tensor([0, 0]))
    out = losses.policy_loss(lp, old, adv[:, None].expand(2, 3), mask, epsilon_low=0.2, weights=w)
    assert out.loss.item() == pytest.approx(0.18, abs=1e-6)  # (-0.5 - 0.25 + 0.75 + 0.5 + 0.4) / 5
    ref = lp.clone()
    ref[1, 0] = ln(1.2)
    out = losses.policy_loss(lp, old, adv[:, None].expand(2, 3), mask, epsilon_low=0.2, weights=w,
                             ref_logprob=ref, beta=0.04)
    assert out.loss.item() == pytest.approx((0.9 + 0.04 * (2 - ln(2) - 1)) / 5, abs=1e-6)


def test_coupled_advantage_and_loss_by_hand():
    adv = credit.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), "none",
                                  baseline="leave_one_out")[0]
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])  # r_i - mean of the other three
    # G = 2, rewards [1, 0] -> A = [1, -1]; eps 0.5; rho = [[1, 2], [0.4, 1]] with (1, 1) masked out
    a = credit.group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), "none", baseline="leave_one_out")[0]
    lp = torch.tensor([[0.0, ln(2)], [ln(0.4), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    w = losses.token_weights(mask, "microbatch-token-mean", microbatch=torch.tensor([0, 0]))
    out = losses.policy_loss(lp, torch.zeros(2, 2), a[:, None].expand(2, 2), mask, epsilon_low=0.5, weights=w)
    assert out.loss.item() == pytest.approx(-2 / 3, abs=1e-6)  # (-1 - 1.5 + 0.5) / 3


def test_wd1_weights_and_loss_by_hand():
    adv = torch.tensor([0.5, -0.5, 0.0])
    w = credit.wd1_weights(adv, torch.zeros(3, dtype=torch.long))
    plus = torch.softmax(adv.double(), 0)
    minus = torch.softmax(-adv.double(), 0)
    assert w.tolist() == pytest.approx((plus - minus).tolist())
    assert plus.tolist() == pytest.approx([0.5064804, 0.1863237, 0.3071959], abs=1e-6)
    # sequence sums S = [-2, -5, -3] (row 0: [-1, -1, -7] with the post-EOS -7 masked out)
    lp = torch.tensor([[-1.0, -1.0, -7.0], [-5.0, 0.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    weights = losses.token_weights(mask, "microbatch-sum", microbatch=torch.zeros(3, dtype=torch.long))
    out = losses.policy_loss(lp, None, w[:, None].expand(3, 3), mask, kind="reinforce", weights=weights)
    assert out.loss.item() == pytest.approx(-0.9604700, abs=1e-6)
    # two groups in one batch: the softmax is per group, the loss the sum of the two groups' losses
    two = credit.wd1_weights(torch.cat([adv, adv]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert two.tolist() == pytest.approx(torch.cat([w, w]).tolist())


# ---- end to end through the trainer ---------------------------------------------------------------------------
PROMPTS = [{"prompt": "hello"}, {"prompt": "ab"}]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.25])  # completions 0-1 answer prompt 0, 2-3 prompt 1
SETTINGS = {"d1": dict(epsilon=0.2, beta=0.04, p_mask_prompt=0.5), "coupled": dict(epsilon=0.2, beta=0.01),
            "wd1": dict(p_mask_prompt=0.5)}


def _completion_mask(response: torch.Tensor, eos: int) -> torch.Tensor:
    """Up to and including the first EOS (every position when there is none)."""
    is_eos = (response == eos).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def _draw_masks(name: str, traj, step: int, iteration: int, p: float):
    """The published rule, drawn from the trainer's replay generator: (prompt masks [N, P], passes, weights)."""
    N, P, L = traj.num_sequences, traj.prompt_length, traj.response_length
    gen = torch.Generator().manual_seed(derive_seed(0, REPLAY_STREAM, step, iteration, 0))
    if name == "coupled":
        t = 0.2 + 0.6 * float(torch.rand(1, generator=gen))
        u = torch.rand(N, L, generator=gen)
        none = torch.zeros(N, P, dtype=torch.bool)
        return none, [torch.ones(N, L, dtype=torch.bool), u < t, u > t], [0.5, 0.5 / t, 0.5 / (1 - t)]
    u = torch.rand(N, P + L, generator=gen)[:, :P]
    return (u < p) & traj.prompt_mask, [torch.ones(N, L, dtype=torch.bool)], [1.0]


def _reference_logprobs(model, traj, hide_prompt, hide) -> torch.Tensor:
    """log_softmax over the full vocabulary of every response token [N, L], on the masked input built here:
    full attention one forward per sequence; block diffusion one forward per block, clean blocks before it."""
    mask_id, B = traj.mask_token_id, traj.block_size
    out = torch.zeros(traj.response_ids.shape)
    for n in range(traj.num_sequences):
        real = traj.prompt_mask[n]
        prompt = torch.where(hide_prompt[n], mask_id, traj.prompt_ids[n])[real]
        clean = traj.response_ids[n]
        noisy = torch.where(hide[n], mask_id, clean)
        L = len(clean)
        spans = [(0, L)] if B is None else [(max(0, b * B - len(prompt) % B), min(L, (b + 1) * B - len(prompt) % B))
                                            for b in range((len(prompt) % B + L + B - 1) // B)]
        for lo, hi in spans:
            ids = torch.cat([prompt, clean[:lo], noisy[lo:hi]]) if B else torch.cat([prompt, noisy])
            with torch.no_grad():
                logits = model.logits(ids[None])[0, len(prompt):]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, clean[:logits.shape[0], None])[:, 0]
            out[n, lo:hi] = logp[lo:hi]
    return out


def _scores(name, model, traj, masks) -> torch.Tensor:
    hide_prompt, passes, weights = masks
    lps = [_reference_logprobs(model, traj, hide_prompt, h) for h in passes]
    if name != "coupled":
        return lps[0]
    return weights[0] * lps[0] + torch.where(passes[1], weights[1] * lps[1], weights[2] * lps[2])


def _reference_loss(name, cur, old, ref, traj, beta, eps) -> float:
    m = _completion_mask(traj.response_ids, traj.eos_token_id)
    r = REWARDS.view(2, 2)
    if name == "coupled":
        adv = (r - (r.sum(1, keepdim=True) - r) / 1).flatten()  # r_i - mean of the other (G - 1 = 1) rows
    else:
        adv = (r - r.mean(1, keepdim=True)).flatten()
    total = 0.0
    for mb in (slice(0, 2), slice(2, 4)):  # two micro-batches of one group each; their losses are averaged
        if name == "wd1":
            a = adv[mb].double()
            w = torch.softmax(-a, 0) - torch.softmax(a, 0)
            total += float((w * (cur[mb] * m[mb]).sum(1).double()).sum()) / 2
            continue
        rho = torch.exp(cur[mb] - old[mb])
        A = adv[mb][:, None]
        per = -torch.minimum(rho * A, rho.clamp(1 - eps, 1 + eps) * A)
        d = ref[mb] - cur[mb]
        per = per + beta * (torch.exp(d) - d - 1)
        total += float((per * m[mb]).sum() / m[mb].sum().clamp(min=1)) / 2
    return total


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("name", ["d1", "coupled", "wd1"])
def test_trainer_loss_equals_the_published_equations(tmp_path, monkeypatch, name, block):
    model = build_tiny_model("qwen3", block_size=4, seed=1) if block else build_tiny_model("llama", seed=0)
    initial = copy.deepcopy(model)
    s = SETTINGS[name]
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=8, steps=4, block_length=None if block else 4, temperature=1.0),
        algorithm=AlgorithmConfig(estimator=name, num_iterations=2, **s),
        optimizer=OptimizerConfig(learning_rate=3e-2),
        trainer=TrainerConfig(max_steps=1, num_generations=2, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, output_dir=str(tmp_path)),
    )
    trainer = RLTrainer(cfg, model, lambda prompts, completions, **kw: [0.0] * len(completions), PROMPTS)
    epochs = []
    real_epoch = RLTrainer._epoch

    def spy(self, trainable, objectives, replay, state):
        before = copy.deepcopy(self.model)
        out = real_epoch(self, trainable, objectives, replay, state)
        epochs.append((before, out["loss"]))
        return out

    monkeypatch.setattr(RLTrainer, "_epoch", spy)
    traj = trainer.sample_and_score([0, 1]).traj
    # EOS at different places, so micro-batches hold different token counts (their normalisation shows)
    for n, end in ((0, 3), (2, 6)):
        traj.response_ids[n, end:] = traj.eos_token_id
        traj.action_mask[n, end + 1:] = False
    trainer.learn(traj, REWARDS.clone())
    assert len(epochs) == 2
    for iteration, (weights_now, loss) in enumerate(epochs):
        masks = _draw_masks(name, traj, 0, iteration, s.get("p_mask_prompt", 0.0))
        cur = _scores(name, weights_now, traj, masks)
        old = _scores(name, initial, traj, masks)  # the pre-update policy, on this iteration's masks
        want = _reference_loss(name, cur, old, old, traj, s.get("beta", 0.0), s.get("epsilon", 0.2))
        assert loss == pytest.approx(want, rel=1e-4, abs=1e-6), (iteration, loss, want)
    # the policy moved in the first epoch, so the second epoch's ratio was not 1
    assert not torch.allclose(_scores(name, epochs[1][0], traj, masks), _scores(name, initial, traj, masks))
