"""Train and save a start model; print SFT time and held-out eval.
python experiments/make_start.py --out outputs/start/sudoku --steps 250 --hidden 64"""
import argparse, json, sys, time, torch
sys.path.insert(0, "experiments")
from common import *
p = argparse.ArgumentParser()
p.add_argument("--out", required=True); p.add_argument("--steps", type=int, default=250)
p.add_argument("--hidden", type=int, default=64); p.add_argument("--layers", type=int, default=4)
p.add_argument("--lr", type=float, default=2e-3); p.add_argument("--batch", type=int, default=64)
p.add_argument("--blanks", default="6"); p.add_argument("--seed", type=int, default=0)
p.add_argument("--ntest", type=int, default=512); p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
from tracerl.tasks.sudoku import parse_blanks
train, test = sudoku_splits(2000, a.ntest, parse_blanks(a.blanks))
out = fresh_dir(a.out)
c0 = time.process_time()
m, t, h = sft_model(train, out, hidden=a.hidden, layers=a.layers, steps=a.steps, lr=a.lr, batch=a.batch, seed=a.seed,
                    logging_steps=50)
res = {"args": vars(a), "sft_wall": t, "sft_cpu": time.process_time() - c0}
for name, cfg in {"greedy16": RolloutConfig(max_completion_length=16, steps=16, temperature=0),
                  "dyn0.9": RolloutConfig(max_completion_length=16, steps=16, temperature=0, threshold=0.9)}.items():
    res[name] = evaluate(load_model(f"{out}/final"), test, cfg)
print("RESULT", json.dumps(res))
dump(res, "outputs/start_models.jsonl")
