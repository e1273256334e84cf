"""The clean + noisy packed layout of block-diffusion training rows (replay baselines, SFT).

References are computed the slow way: one block at a time, on the plain sequence `[prompt | clean blocks before
b | noisy block b]` with the model's own block-causal attention, which is exactly what the sampler showed block b.
"""

import pytest
import torch

from tests.conftest import encode
from tracerl.losses import policy_loss
from tracerl.packing import pack_rows
from tracerl.replay import build_replay, token_logprobs
from tracerl.rollout import RolloutConfig, generate, pad_prompts
from tracerl.rollout.policies import sampling_logprobs
from tracerl.sft import _block_logits

PROMPTS = ["xy", "hello", "abcdefg hij"]  # 2, 5, 11 tokens: every tail length 2, 1, 3 mod 4


def test_attention_pattern(block_model):
    B = block_model.block_size
    ids, mask = pad_prompts(encode(block_model, PROMPTS), block_model.pad_token_id)
    clean = torch.randint(10, 90, (3, 8))
    noisy = torch.where(torch.rand(3, 8) < 0.5, block_model.mask_token_id, clean)
    packed = pack_rows(ids, mask, clean, noisy, B)
    vis = packed.visibility()
    R, T = packed.input_ids.shape
    for r in range(R):
        real = packed.key_padding[r].bool()
        own_block = packed.position_ids[r] // B
        for q in range(T):
            if not real[q]:
                continue
            for k in range(T):
                if packed.noisy[r, q]:  # a noisy token: clean earlier blocks, and its own noisy block
                    want = real[k] and ((not packed.noisy[r, k] and own_block[k] < own_block[q])
                                        or (packed.noisy[r, k] and own_block[k] == own_block[q]))
                else:  # a clean token: block-causal over the clean tokens
                    want = real[k] and not packed.noisy[r, k] and own_block[k] <= own_block[q]
                assert bool(vis[r, q, k]) == bool(want), (r, q, k)
    # the noisy response sits at the same columns on every row; positions are each row's own
    start = packed.response_start
    assert torch.equal(packed.input_ids[:, start:], noisy)
    lengths = mask.sum(1)
    assert torch.equal(packed.position_ids[:, start], lengths)  # response token 0 follows the row's own prompt


def _block_at_a_time_logprobs(model, traj, batch, targets):
    """Log-prob of every scored token, recomputed with one plain forward per (row, block)."""
    out = torch.zeros(batch.loss_mask.shape)
    B, L = traj.block_size, traj.response_length
    start = batch.input_ids.shape[1] - L  # the noisy response is the last L columns of a packed row
    for i in range(batch.num_rows):
        n = int(batch.source_row[i])
        prompt = batch.input_ids[i, :traj.prompt_length][traj.prompt_mask[n]]  # as shown (d1 masks some of it)
        tail = len(prompt) % B
        noisy_resp = batch.input_ids[i, start:start + L]
        for b in range(int(traj.block_of_position()[n].max()) + 1):
            lo, hi = max(0, b * B - tail), min(L, (b + 1) * B - tail)
            seq = torch.cat([prompt, traj.response_ids[n, :lo], noisy_resp[lo:hi]])[None]
            logits = model.logits(seq)[0, len(prompt):]  # [hi, V] own block-causal attention, no padding
            # the published estimators score the full vocabulary at temperature 1
            logp = torch.log_softmax(logits, -1) if batch.published_logprob else sampling_logprobs(
                logits, model.mask_token_id)
            lp = logp.gather(-1, targets[i, start:start + hi, None])
            out[i, start + lo:start + hi] = lp[lo:hi, 0]
    return torch.where(batch.loss_mask, out, 0.0)


@pytest.mark.parametrize("estimator", ["d1", "coupled"])
def test_baseline_estimators_see_clean_context_on_block_models(block_model, estimator):
    traj = generate(block_model, encode(block_model, PROMPTS),
                    RolloutConfig(max_completion_length=12, steps=12, temperature=1.0, seed=0))
    batch = build_replay(traj, traj.unmask_step, estimator, p_mask_prompt=0.0 if estimator == "coupled" else 0.3,
                         generator=torch.Generator().manual_seed(1))
    assert batch.block is not None  # packed, not the model's block-causal attention over [MASK]ed blocks
    targets = batch.targets(traj)
    packed_lp = token_logprobs(block_model, batch, targets, 1.0).logprob
    packed_lp = torch.where(batch.loss_mask, packed_lp, 0.0)  # columns another row scores are not this row's
    reference = _block_at_a_time_logprobs(block_model, traj, batch, targets)
    torch.testing.assert_close(packed_lp, reference, atol=1e-5, rtol=0)
    # and so the loss: the same numbers enter it
    adv = torch.randn(batch.loss_mask.shape)
    a = policy_loss(packed_lp, reference, adv, batch.loss_mask).loss
    b = policy_loss(reference, reference, adv, batch.loss_mask).loss
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sft_block_logits_do_not_depend_on_the_batch(block_model):
    ids = encode(block_model, PROMPTS)
    responses = torch.randint(10, 90, (3, 8))
    noisy = torch.where(torch.rand(3, 8) < 0.5, block_model.mask_token_id, responses)
    p_ids, p_mask = pad_prompts(ids, block_model.pad_token_id)
    batched = _block_logits(block_model, p_ids, p_mask, responses, noisy)
    for row in range(3):
        a_ids, a_mask = pad_prompts([ids[row]], block_model.pad_token_id)
        alone = _block_logits(block_model, a_ids, a_mask, responses[row:row + 1], noisy[row:row + 1])
        torch.testing.assert_close(alone[0], batched[row], atol=1e-5, rtol=0)
