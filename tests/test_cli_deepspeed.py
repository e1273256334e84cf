"""The README's CPU launch, verbatim: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module tracerl train ...`."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from tracerl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cli_launch_with_zero2(tmp_path):
    subprocess.run([sys.executable, "-m", "tracerl", "tiny", str(tmp_path / "tiny")], check=True, cwd=ROOT,
                   capture_output=True)
    deepspeed = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "tracerl", "train",
         "recipes/cpu_quickstart.yaml", "distributed.deepspeed=recipes/deepspeed/zero2.json",
         f"model.path={tmp_path / 'tiny'}", "trainer.max_steps=2", f"trainer.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]  # rank 0 logs once
    assert (tmp_path / "run" / "checkpoint-2" / "model" / "config.json").is_file()
