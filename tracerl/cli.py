"""The `tracerl` command line. A `UserError` anywhere becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from tracerl.errors import UserError


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="denoise a completion for a prompt with a diffusion LM")
    p.add_argument("--model", required=True, help="local checkpoint directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat-template", action="store_true", help="format the prompt with the tokenizer's chat template")
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: max-completion-length)")
    p.add_argument("--block-length", type=int, default=None, help="semi-AR block length (default: the model's "
                   "block_size, or the whole response)")
    p.add_argument("--remasking", default="low_confidence", help="low_confidence | top_margin | entropy | random")
    p.add_argument("--threshold", type=float, default=None, help="dynamic unmasking: commit every token whose "
                   "confidence exceeds it (0 < threshold <= 1)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-kv-cache", action="store_true", help="block diffusion: recompute committed blocks")
    p.add_argument("--show-trajectory", action="store_true", help="print which tokens each step committed")
    p.add_argument("--save-trajectory", default=None, help="write the Trajectory to this file (torch format)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from tracerl.models import load_model
    from tracerl.models.prompting import format_prompt
    from tracerl.rollout import RolloutConfig, generate
    from tracerl.rollout.display import completions, format_unmask_order

    config = RolloutConfig(
        max_completion_length=args.max_completion_length,
        steps=args.steps or args.max_completion_length,
        block_length=args.block_length,
        remasking=args.remasking,
        threshold=args.threshold,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        use_kv_cache=not args.no_kv_cache,
        seed=args.seed,
    )
    config.validate()  # before the model loads: a bad flag should not cost a checkpoint load
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    text = format_prompt(model.tokenizer, args.prompt, use_chat_template=args.chat_template)
    prompt_ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    traj = generate(model, [prompt_ids], config)
    print(completions(traj, model.tokenizer)[0])
    if args.show_trajectory:
        print(f"\n# unmask order ({traj.num_forwards} forwards, {int(traj.steps_per_sequence()[0])} steps)")
        print(format_unmask_order(traj, model.tokenizer))
    if args.save_trajectory:
        traj.save(args.save_trajectory)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracerl", description="RL post-training of diffusion language models")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"tracerl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
