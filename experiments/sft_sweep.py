import sys, time, torch, statistics, json
sys.path.insert(0, "experiments")
from common import *
torch.set_num_threads(2)
out = "outputs/sft_sweep.jsonl"
configs = [json.loads(a) for a in sys.argv[1:]]
for c in configs:
    blanks = c.pop("blanks", 6)
    ntrain = c.pop("ntrain", 2000)
    train, test = sudoku_splits(ntrain, 256, blanks)
    cpu0 = time.process_time()
    m, t, h = sft_model(train, "/tmp/sftsweep", logging_steps=10000, **c)
    cpu = time.process_time() - cpu0
    res = {"blanks": blanks, "ntrain": ntrain, **c, "sft_wall": round(t, 1), "sft_cpu": round(cpu, 1),
           "final_loss": statistics.mean(x["loss"] for x in h[-20:])}
    for steps in (16, 8):
        ev = evaluate(m, test, RolloutConfig(max_completion_length=16, steps=steps, temperature=0))
        res[f"eval{steps}"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev.items() if k != "examples"}
    print(json.dumps(res), flush=True)
    dump(res, out)
