import sys, time, torch, statistics
sys.path.insert(0, "experiments")
from common import *
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
for tmpl in [sudoku.PROMPT_TEMPLATE, "{puzzle}\n"]:
    train, test = sudoku_splits(500, 64, 6, template=tmpl)
    for hidden, layers in [(128, 4), (256, 4)]:
        m, t, h = sft_model(train, "/tmp/probe", hidden=hidden, layers=layers, steps=20, logging_steps=1000)
        med = statistics.median(x["perf/step_seconds"] for x in h)
        ev = evaluate(m, test, RolloutConfig(max_completion_length=16, steps=16, temperature=0), batch=64)
        print(repr(tmpl[:10]), hidden, layers, f"sft median {med:.3f}s/step total {t:.1f}  eval64x16steps {ev['eval_seconds']:.2f}s", flush=True)
