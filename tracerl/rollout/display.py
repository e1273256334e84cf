"""Human-readable views of a Trajectory: completions as text, and the order tokens were unmasked in."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from tracerl.rollout.trajectory import Trajectory


def completions(traj: Trajectory, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Decoded completions, cut at the first EOS (special tokens dropped)."""
    keep = traj.completion_mask() & (traj.response_ids != traj.eos_token_id)
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(traj.response_ids, keep)
    ]


def format_unmask_order(traj: Trajectory, tokenizer: PreTrainedTokenizerBase, row: int = 0) -> str:
    """One line per step: the response positions committed at that step and their tokens.

    Positions filled as padding after an EOS are shown once, as a count, on the step that filled them.
    """
    steps = traj.unmask_step[row]
    lines = []
    for step in sorted(set(steps.tolist())):
        at = (steps == step).nonzero().flatten().tolist()
        actions = [p for p in at if traj.action_mask[row, p]]
        padded = len(at) - len(actions)
        cells = [f"{p}:{tokenizer.decode([int(traj.response_ids[row, p])])!r}" for p in actions]
        tail = f"  (+{padded} EOS padding)" if padded else ""
        lines.append(f"step {step:>3}: " + " ".join(cells) + tail)
    return "\n".join(lines)
