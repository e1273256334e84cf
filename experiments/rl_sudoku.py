"""RL from an SFT start model on 4x4 Sudoku: held-out eval before/after (and periodically), wall and CPU time.

    python experiments/rl_sudoku.py --start outputs/sudoku_sft/final --seed 0 --lr 3e-4 --budget 480
"""
import argparse
import json
import sys
import time

import torch

sys.path.insert(0, "experiments")
from common import dump, evaluate, fresh_dir, sudoku_splits  # noqa: E402

from reward_models import load_reward  # noqa: E402
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig  # noqa: E402
from tracerl.models import load_model  # noqa: E402
from tracerl.rollout import RolloutConfig  # noqa: E402
from tracerl.tasks import countdown  # noqa: E402
from tracerl.trainer import RLTrainer  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--start", required=True)
    p.add_argument("--task", default="sudoku")
    p.add_argument("--blanks", default="6")
    p.add_argument("--ntrain", type=int, default=2000)
    p.add_argument("--ntest", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rsteps", type=int, default=16)
    p.add_argument("--L", type=int, default=16)
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--shrink", type=int, default=1)
    p.add_argument("--estimator", default="trace")
    p.add_argument("--p-mask-prompt", type=float, default=0.0)
    p.add_argument("--value", action="store_true")
    p.add_argument("--value-lr", type=float, default=None)
    p.add_argument("--agg", default="token-mean")
    p.add_argument("--scale", default="group")
    p.add_argument("--old", default="recompute")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--budget", type=float, default=480, help="RL wall seconds (eval time excluded)")
    p.add_argument("--eval-every", type=float, default=0, help="eval every N RL wall seconds (0 = only end)")
    p.add_argument("--threshold", type=float, default=0.9, help="dynamic-decoding eval threshold (steps metric)")
    p.add_argument("--out", default="outputs/rl_runs.jsonl")
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--print-every", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    if a.task == "sudoku":
        from tracerl.tasks.sudoku import parse_blanks
        train, test = sudoku_splits(a.ntrain, a.ntest, parse_blanks(a.blanks))
        reward_name = "sudoku"
    else:
        from tracerl.tasks import apply_template
        train = countdown.generate(a.ntrain, 0, counts=(3,), max_num=9, max_target=50)
        test = countdown.generate(a.ntest, 1000, counts=(3,), max_num=9, max_target=50,
                                  exclude={countdown.problem_key(r) for r in train})
        train, test = apply_template(train, countdown.PROMPT_TEMPLATE), apply_template(test, countdown.PROMPT_TEMPLATE)
        reward_name = "countdown"
    model = load_model(a.start)
    greedy = RolloutConfig(max_completion_length=a.L, steps=a.rsteps, temperature=0)
    dyn = RolloutConfig(max_completion_length=a.L, steps=a.rsteps, temperature=0, threshold=a.threshold)

    def ev():
        e = evaluate(model, test, greedy, reward_name)
        d = evaluate(model, test, dyn, reward_name)
        return {"reward": e["reward"], "solve": e["solve"], "dyn_reward": d["reward"], "dyn_solve": d["solve"],
                "dyn_steps": d["steps"], "eval_seconds": e["eval_seconds"] + d["eval_seconds"]}

    out_dir = fresh_dir(f"/tmp/rl_{a.tag or 'run'}_{a.seed}")
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=a.L, steps=a.rsteps, temperature=a.temp),
        algorithm=AlgorithmConfig(estimator=a.estimator, shrink=a.shrink, p_mask_prompt=a.p_mask_prompt,
                                  loss_aggregation=a.agg, scale_rewards=a.scale, old_logprobs=a.old,
                                  num_iterations=a.iters, use_value_model=a.value, beta=a.beta,
                                  value_learning_rate=a.value_lr),
        optimizer=OptimizerConfig(learning_rate=a.lr),
        trainer=TrainerConfig(max_steps=a.max_steps, num_generations=a.G, per_device_train_batch_size=a.G * a.prompts,
                              seed=a.seed, output_dir=str(out_dir), logging_steps=10**9),
    )
    torch.manual_seed(a.seed)
    trainer = RLTrainer(cfg, model, load_reward(reward_name), train)
    curve = [{"rl_seconds": 0.0, "cpu_seconds": 0.0, "step": 0, **ev()}]
    print(json.dumps(curve[-1]), flush=True)
    wall = cpu = 0.0
    next_eval = a.eval_every or float("inf")
    hist = []
    while trainer.step < a.max_steps and wall < a.budget:
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        hist.append(m)
        dump({"step": trainer.step, **m}, out_dir / "metrics.jsonl")
        if trainer.step % a.print_every == 0:
            print(f"step {trainer.step} wall {wall:.0f} reward {m['reward']:.3f} std {m['reward_std']:.3f} "
                  f"rollout {m['perf/rollout_seconds']:.1f}s train {m['perf/train_seconds']:.1f}s", flush=True)
        if wall >= next_eval:
            curve.append({"rl_seconds": wall, "cpu_seconds": cpu, "step": trainer.step, **ev()})
            print(json.dumps(curve[-1]), flush=True)
            next_eval += a.eval_every
    if curve[-1]["step"] != trainer.step:
        curve.append({"rl_seconds": wall, "cpu_seconds": cpu, "step": trainer.step, **ev()})
        print(json.dumps(curve[-1]), flush=True)
    res = {"tag": a.tag, "args": vars(a), "steps": trainer.step, "rl_wall": wall, "rl_cpu": cpu,
           "before": curve[0], "after": curve[-1], "curve": curve,
           "train_reward_first10": sum(h["reward"] for h in hist[:10]) / max(1, len(hist[:10])),
           "train_reward_last10": sum(h["reward"] for h in hist[-10:]) / max(1, len(hist[-10:]))}
    dump(res, a.out)
    print("RESULT", json.dumps({k: v for k, v in res.items() if k not in ("curve", "args")}), flush=True)


if __name__ == "__main__":
    main()
