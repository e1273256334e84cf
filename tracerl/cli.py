"""The `tracerl` command line. A `UserError` anywhere becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
from pathlib import Path

from tracerl.errors import UserError


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="denoise a completion for a prompt with a diffusion LM")
    p.add_argument("--model", required=True,
                   help="model directory, TraceRL checkpoint (checkpoint-N) or LoRA adapter directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat-template", action="store_true", help="format the prompt with the tokenizer's chat template")
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: max-completion-length)")
    p.add_argument("--block-length", type=int, default=None, help="semi-AR block length (default: the model's "
                   "block_size, or the whole response)")
    p.add_argument("--remasking", default="low_confidence", help="low_confidence | top_margin | entropy | random | "
                   "mdlm_ancestral | dream_origin | sedd_euler | sedd_analytic (the published samplers)")
    p.add_argument("--threshold", type=float, default=None, help="dynamic unmasking: commit every token whose "
                   "confidence exceeds it (0 < threshold <= 1)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory, for checkpoints published without one "
                   "(MDLM, SEDD: GPT-2's)")
    p.add_argument("--no-kv-cache", action="store_true", help="block diffusion: recompute committed blocks")
    p.add_argument("--cache", default="none", help="full attention (LLaDA, Dream): none | prefix | dual | elastic, "
                   "with knobs as in the benchmarks: dual:h8 (cache_horizon), dual:r4 (cache_refresh), elastic:w64 "
                   "(cache_window), elastic:g0.8 (cache_gamma)")
    p.add_argument("--show-trajectory", action="store_true", help="print which tokens each step committed")
    p.add_argument("--save-trajectory", default=None, help="write the Trajectory to this file (torch format)")
    p.add_argument("--plot", default=None, help="draw the unmask order (step x position heatmap) to this PNG")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from tracerl.build import build_model
    from tracerl.config import ModelConfig
    from tracerl.models.prompting import format_prompt
    from tracerl.rollout import RolloutConfig, generate
    from tracerl.rollout.caching import cache_settings
    from tracerl.rollout.display import completions, format_unmask_order

    for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--threshold", args.threshold)):
        if value is not None and not math.isfinite(value):  # NaN passes the range checks
            raise UserError(f"{flag}: must be a finite number, got {value}")
    if args.block_length is not None and args.block_length <= 0:  # a negative block generated nothing, silently
        raise UserError(f"--block-length: must be > 0, got {args.block_length}")
    try:
        cache = cache_settings(args.cache)
    except ValueError as err:
        raise UserError(f"--cache: {err}") from None
    config = RolloutConfig(
        max_completion_length=args.max_completion_length,
        steps=args.max_completion_length if args.steps is None else args.steps,  # --steps 0 is an error, not L
        block_length=args.block_length,
        remasking=args.remasking,
        threshold=args.threshold,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        use_kv_cache=not args.no_kv_cache,
        seed=args.seed,
        **cache,
    )
    config.validate()  # before the model loads: a bad flag should not cost a checkpoint load
    for flag, value in (("--save-trajectory", args.save_trajectory), ("--plot", args.plot)):
        if value:  # found now, not after the generation
            _check_writable(Path(value), flag, what="a file")
    # a model directory, a TraceRL checkpoint (checkpoint-N/) or a LoRA adapter directory, as `tracerl eval` takes
    model_config = ModelConfig(dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    model_config.validate()
    model = build_model(model_config, path=args.model)
    text = format_prompt(model.tokenizer, args.prompt, use_chat_template=args.chat_template)
    prompt_ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    traj = generate(model, [prompt_ids], config)
    print(completions(traj, model.tokenizer)[0])
    if args.show_trajectory:
        print(f"\n# unmask order ({traj.num_forwards} forwards, {int(traj.steps_per_sequence()[0])} steps)")
        print(format_unmask_order(traj, model.tokenizer))
    if args.save_trajectory:
        traj.save(args.save_trajectory)
    if args.plot:
        from tracerl.rollout.plot import plot_unmask_order

        print(f"wrote {plot_unmask_order(traj, model.tokenizer, args.plot, title=args.prompt[-60:])}")
    return 0


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10 model.path=DIR")


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from tracerl.api import train_from_recipe
    from tracerl.build import build_rewards, check_reward_columns
    from tracerl.data import data_source, load_rows
    from tracerl.recipe import load_config

    config = load_config(args.recipe, args.overrides)
    _check_writable(Path(config.trainer.output_dir), "trainer.output_dir", directory=True)
    rows = load_rows(config.data, "train")  # data and rewards fail before the model loads
    rewards = build_rewards(config)
    eval_rows = load_rows(config.data, "eval") if config.trainer.eval_steps else None
    check_reward_columns(rewards, rows, data_source(config.data, "train"))
    if eval_rows is not None:
        check_reward_columns(rewards, eval_rows, data_source(config.data, "eval"))
    if args.local_rank is not None:  # the deepspeed launcher's --local_rank=N: the API reads it from LOCAL_RANK
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    history = train_from_recipe(config, rewards, rows, eval_rows)
    if history and int(os.environ.get("RANK", "0")) == 0:
        last = history[-1]
        print(f"done: {len(history)} steps, last reward {last['reward']:.4f}; checkpoints in "
              f"{config.trainer.output_dir}")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from tracerl.build import build_model
    from tracerl.config import SFTConfig
    from tracerl.data import load_rows
    from tracerl.recipe import load_config
    from tracerl.sft import train_sft

    config = load_config(args.recipe, args.overrides, kind=SFTConfig)
    _check_writable(Path(config.trainer.output_dir), "trainer.output_dir", directory=True)
    rows = load_rows(config.data, "train")
    column = config.sft.completion_column
    missing = [i for i, r in enumerate(rows) if column not in r]
    if missing:
        raise UserError(f"sft.completion_column: column {column!r} not found in row "
                        f"{missing[0]}; columns found: {sorted(rows[missing[0]])}")
    # a row without the column reads as null (a file whose rows differ), and str(None) would train on "None"; a
    # float has lost its text (a column mixing 27 and 2.5 reads 27 as 27.0, 10**21 as 1e+21); an empty cell (CSV)
    # would train an answer of nothing but EOS
    d = config.data
    source = f"data.train_files {d.train_files}" if d.train_files else f"data.dataset_name {d.dataset_name!r}"
    for i, r in enumerate(rows):
        value = r[column]
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            why = ("a number whose text was lost on reading; store the completions as strings" if isinstance(
                value, float) else "not text")
            raise UserError(f"sft.completion_column: row {i} of {source}: the completion in column {column!r} is "
                            f"{value!r}, {why}")
        if isinstance(value, str) and not value.strip():
            raise UserError(f"sft.completion_column: row {i} of {source}: the completion in column {column!r} is "
                            "empty (a missing cell?); drop the row")
    model = build_model(config.model, config.peft, seed=config.trainer.seed)
    history = train_sft(model, rows, config)
    if history:  # (none: a finished run resumed again, said so)
        print(f"done: {len(history)} steps, last loss {history[-1]['loss']:.4f}; model in "
              f"{config.trainer.output_dir}/final")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tracerl.build import build_model, build_rewards, check_reward_columns, write_jsonl
    from tracerl.data import data_source, expand_files, load_rows
    from tracerl.evaluate import evaluate
    from tracerl.recipe import load_config
    from tracerl.scoring import check_prompts

    config = load_config(args.recipe, args.overrides)
    rows = load_rows(config.data, "eval")
    out = Path(config.eval.output_file or Path(config.trainer.output_dir) / "eval.jsonl")
    key = "eval.output_file" if config.eval.output_file else "trainer.output_dir"
    _check_writable(out, key)
    inputs = [Path(args.recipe)] + [Path(f) for key, files in (("data.train_files", config.data.train_files),
                                                               ("data.eval_files", config.data.eval_files))
                                    for f in expand_files(files or [], key)]
    clash = next((p for p in inputs if p.exists() and out.exists() and p.resolve() == out.resolve()), None)
    if clash is not None:
        raise UserError(f"{key}: {str(out)!r} is one of this run's inputs ({clash}); write the results elsewhere")
    rewards = build_rewards(config)
    check_reward_columns(rewards, rows, data_source(config.data, "eval"))
    model = build_model(config.model, None, path=args.checkpoint or config.model.path)
    check_prompts(model, rows, config.rollout.max_completion_length, config.model.use_chat_template,
                  config.model.system_prompt, "eval")  # before the first batch, not in the middle
    summary, records = evaluate(model, rows, rewards, config, progress=True)
    if out.exists():  # an earlier evaluation's results: kept beside, as metrics.jsonl's are
        n = 1
        while (aside := out.with_name(f"{out.stem}.prev-{n}{out.suffix}")).exists():
            n += 1
        out.rename(aside)
        print(f"[eval] {out} held earlier results: moved to {aside.name}")
    write_jsonl(out, records)
    for key, value in summary.items():
        print(f"{key:>28}: {value:.4f}")
    print(f"wrote {len(records)} samples to {out}")
    return 0


def _check_writable(out: Path, key: str, directory: bool = False, what: str = "a JSONL file") -> None:
    """Fail before the model loads, not after the run: a path that cannot be written would lose its results."""
    if not directory and out.is_dir():
        raise UserError(f"{key}: {str(out)!r} is a directory; {what} is written there")
    existing = next((p for p in [*([out] if directory else []), *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{key}: cannot write {str(out)!r}: {str(existing)!r} is a file, not a directory")
    import tempfile

    target = out if directory else out.parent
    probe_in = next((p for p in [target, *target.parents] if p.exists()), Path("."))
    try:  # write a probe where the output will go (or its nearest existing parent, creating nothing before the
        # data and rewards are checked): a read-only or unreachable place fails now
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".tracerl-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"{key}: cannot write {str(out)!r}: {exc.strerror or exc}") from None


def _cmd_validate(args: argparse.Namespace) -> int:
    from tracerl.config import RLConfig, SFTConfig
    from tracerl.recipe import dump, help_texts, load_config, read_yaml

    kind = SFTConfig if "sft" in read_yaml(args.recipe) else RLConfig
    config = load_config(args.recipe, args.overrides, kind=kind)
    if args.docs:
        for key, text in help_texts(kind).items():
            print(f"{key}: {text}")
        return 0
    found = _check_runnable(config, sft=kind is SFTConfig)
    print(dump(config), end="")
    print(f"# {args.recipe}: valid {kind.__name__}; {found}", file=sys.stderr)
    return 0


def _check_runnable(config: object, sft: bool) -> str:
    """What the run would read before its first step, read now without loading the model: the model directory
    exists, the data loads and fits its columns, the reward functions import (their code runs)."""
    from tracerl.build import build_rewards, resolve_checkpoint
    from tracerl.data import load_rows

    source = resolve_checkpoint(config.model.path, key="model.path")
    if not source.is_dir() or not any((source / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise UserError(f"model.path: {str(source)!r} is not a model directory (no config.json)")
    rows = load_rows(config.data, "train")
    found = f"model {source}, {len(rows)} training rows"
    if config.data.eval_files or (not sft and config.trainer.eval_steps):
        found += f", {len(load_rows(config.data, 'eval'))} eval rows"
    if not sft:
        from tracerl.build import check_reward_columns

        rewards = build_rewards(config)
        check_reward_columns(rewards, rows, "the training data")
        found += f", rewards {', '.join(rewards.names)}"
        rewards.close()
    return found


def _cmd_export(args: argparse.Namespace) -> int:
    from tracerl.build import resolve_checkpoint
    from tracerl.models import load_model
    from tracerl.peft_utils import load_adapter, merge_lora

    source = resolve_checkpoint(args.checkpoint, key="checkpoint")
    options = dict(dtype=args.dtype, device="cpu", tokenizer=args.tokenizer)
    if (source / "adapter_config.json").is_file():
        model = merge_lora(load_adapter(source, base_path=args.base, **options))
        base = args.base or json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
    else:
        model = load_model(str(source), **options)
        base = source
    # --dtype auto loads in float32 on the CPU (the merge is then exact to float32); the checkpoint is written in
    # the dtype its base was published in (LLaDA / Dream / SDAR: bfloat16), not silently doubled in size
    published = None if args.dtype != "auto" else _config_dtype(Path(base))
    if published is not None and published != model.dtype:
        model = model.to(published)
    model.save_pretrained(args.output)
    print(f"wrote a full {model.family} checkpoint ({str(model.dtype).removeprefix('torch.')}) to {args.output}")
    return 0


def _config_dtype(directory: Path) -> "torch.dtype | None":
    """The dtype a checkpoint's weights are in: config.json's torch_dtype (transformers 5: dtype), else the
    floating-point dtype of the safetensors themselves (LLaDA's config.json names none, only "precision")."""
    import torch

    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("torch_dtype") or config.get("dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else _weights_dtype(directory)


def _weights_dtype(directory: Path) -> "torch.dtype | None":
    """The floating-point dtype of the first safetensors file's tensors (read from its header, no weights loaded)."""
    import struct

    import torch

    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with file.open("rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            continue
        found = {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        floats = [names[d] for d in found if d in names]
        if len(set(floats)) == 1:
            return floats[0]
    return None


def _cmd_tiny(args: argparse.Namespace) -> int:
    from tracerl.models import build_tiny_model

    model = build_tiny_model(args.arch, block_size=args.block_size, hidden_size=args.hidden_size,
                             num_layers=args.num_layers, seed=args.seed)
    model.save_pretrained(args.output)
    print(f"wrote a random {args.arch} diffusion LM ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, block_size={args.block_size}) to {args.output}")
    return 0


def _add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny", help="write a tiny random diffusion LM (char tokenizer) for CPU debugging")
    p.add_argument("output")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mdlm", "sedd"],
                   help="mdlm / sedd: the DiT of MDLM / SEDD, written in that family's published layout")
    p.add_argument("--block-size", type=int, default=None, help="block diffusion block size (default: full attention)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny)
    p = sub.add_parser("train", help="RL post-training from a recipe (deepspeed launcher: --module tracerl train)")
    _recipe_args(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("sft", help="masked-diffusion supervised fine-tuning from a recipe")
    _recipe_args(p)
    p.set_defaults(func=_cmd_sft)
    p = sub.add_parser("eval", help="reward and accuracy over the recipe's eval split; writes a JSONL")
    _recipe_args(p)
    p.add_argument("--checkpoint", default=None, help="checkpoint or model directory (default: model.path)")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("validate", help="print the resolved recipe, or the errors")
    _recipe_args(p)
    p.add_argument("--docs", action="store_true", help="print every key with its documentation")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("export", help="merge a LoRA adapter into a full checkpoint in the family's layout")
    p.add_argument("checkpoint", help="checkpoint, adapter or model directory")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--base", default=None, help="base model directory (default: the adapter's base_model path)")
    p.add_argument("--dtype", default="auto", help="the written weights' dtype (default: the base checkpoint's)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory, for bases published without one "
                   "(MDLM, SEDD; default: the one saved beside the adapter)")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracerl", description="RL post-training of diffusion language models")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_commands(sub)
    return parser


MULTI_PROCESS_COMMANDS = ("train",)  # the others run the whole job in every process they are started in


def _refuse_launcher(command: str) -> None:
    """Under deepspeed / torchrun every process runs the command: sft, eval or generate would each do the whole job
    into the same output, the processes moving each other's results aside."""
    world = os.environ.get("WORLD_SIZE", "1")
    if command not in MULTI_PROCESS_COMMANDS and world.isdigit() and int(world) > 1:
        raise UserError(f"`tracerl {command}` runs in one process, but a launcher started {world} (WORLD_SIZE={world});"
                        f" run it without deepspeed / torchrun (only `tracerl train` splits its work over processes)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`eval R --checkpoint C key=value`): argparse leaves those over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _refuse_launcher(args.command)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"tracerl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a reward that fails with on_error: raise is the user's code, not a TraceRL bug
        if type(exc).__name__ != "RewardError":
            raise
        print(f"tracerl {args.command}: error: {exc} (set reward_on_error: zero to score such samples 0 and "
              "go on; the last checkpoint is kept)", file=sys.stderr)
        return 2


EXIT_GRACE_S = 60.0  # how long interpreter shutdown may wait on leftover threads before the exit is forced


def entry() -> None:
    """The console script and `python -m tracerl`: main(), then an exit that leftover threads cannot hold up. A
    non-daemon thread that a reward (or a library it uses) started and never stopped would keep the process alive
    after the run ended, with the job looking hung; once shutdown has waited EXIT_GRACE_S for such threads, this
    names them and exits with the run's code anyway. Everything the run writes is written before main() returns."""
    code = 1  # an exception escaping main(): Python's own exit status for it

    def force_exit() -> None:
        left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        print(f"tracerl: the run ended (exit code {code}) but the process was still waiting after "
              f"{EXIT_GRACE_S:.0f}s on {len(left)} thread(s) something started and never stopped "
              f"({', '.join(left) or 'exit handlers'}); exiting anyway", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)

    try:
        code = main()
    finally:  # also when main() raises (out of memory, a NCCL error): its traceback, then the same bounded exit
        watchdog = threading.Timer(EXIT_GRACE_S, force_exit)
        watchdog.daemon = True  # it must not be one of the threads shutdown waits for
        watchdog.start()
    sys.exit(code)


if __name__ == "__main__":
    entry()
