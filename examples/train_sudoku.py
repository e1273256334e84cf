"""TraceRL on 4x4 Sudoku from Python: the README's proof as a TRL-style script (what `tracerl train
recipes/sudoku_tracerl.yaml` runs).

    python -m tracerl.demo --seeds 0              # once: makes the start model outputs/sudoku/sft/final
    python examples/train_sudoku.py [--start outputs/sudoku/sft/final] [--max-steps 300]
"""
import argparse

from datasets import load_dataset

from tracerl import TraceRLConfig, TraceRLTrainer
from tracerl.tasks.sudoku import PROMPT_TEMPLATE, solved_reward

parser = argparse.ArgumentParser()
parser.add_argument("--start", default="outputs/sudoku/sft/final")
parser.add_argument("--max-steps", type=int, default=300)
parser.add_argument("--output-dir", default="outputs/sudoku/rl_python")
cli = parser.parse_args()


def with_prompt(row):
    return {"prompt": PROMPT_TEMPLATE.format(**row)}  # the other columns (puzzle, solution) reach the rewards


train = load_dataset("json", data_files="recipes/data/sudoku_train.jsonl", split="train").map(with_prompt)
test = load_dataset("json", data_files="recipes/data/sudoku_test.jsonl", split="train").map(with_prompt)
args = TraceRLConfig(
    output_dir=cli.output_dir, max_steps=cli.max_steps, learning_rate=2e-4, num_generations=8,
    per_device_train_batch_size=256, max_completion_length=16, steps=4, temperature=1.0,
    reward_weights=[1.0, 0.0],  # train on the full solve; log the share of right cells ("sudoku") beside it
    eval_steps=25, per_device_eval_batch_size=256, logging_steps=10,
)
trainer = TraceRLTrainer(model=cli.start, reward_funcs=[solved_reward, "sudoku"], args=args,
                         train_dataset=train, eval_dataset=test)
trainer.train()
print({k: round(v, 4) for k, v in trainer.evaluate().items()})
