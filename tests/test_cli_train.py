"""The CLI a user runs: tiny -> train (W&B offline) -> resume -> eval -> sft, end to end in subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracerl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT, env_extra=None):
    import os

    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tracerl", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def read_wandb_records(run_file: Path) -> list:
    """Records of an offline W&B run file: a 7-byte header, then LevelDB-style chunks in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, out = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a chunk header: skip to the next block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    out = cli("tiny", str(path))
    assert out.returncode == 0, out.stderr
    return path


def test_train_logs_wandb_offline_resumes_and_evaluates(tiny_dir, tmp_path):
    run = tmp_path / "run"
    common = ["recipes/cpu_quickstart.yaml", f"model.path={tiny_dir}", f"trainer.output_dir={run}",
              "trainer.save_steps=2", "logging.report_to=[wandb]", "trainer.eval_steps=2", "data.max_eval_samples=8"]
    out = cli("train", *common, "trainer.max_steps=2")
    assert out.returncode == 0, out.stderr
    assert (run / "checkpoint-2" / "model" / "config.json").is_file()
    # the same command with resume=latest continues from step 2 to 4
    out = cli("train", *common, "trainer.max_steps=4", "trainer.resume_from_checkpoint=latest")
    assert out.returncode == 0, out.stderr
    logged_rows = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in logged_rows] == [0, 1, 2, 3, 4]  # step 0: the held-out eval before training
    assert [m["step"] for m in logged_rows if "eval/accuracy" in m] == [0, 2, 4]
    first = logged_rows[1]
    for key in ("reward", "reward_std", "rewards/math/mean", "rewards/length/mean", "completions/mean_length",
                "trajectory/steps_per_sequence", "perf/rollout_seconds", "clip_ratio", "entropy"):
        assert key in first, key
    # the offline W&B run holds the resolved config and every step's metrics
    runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs
    records = read_wandb_records(runs[0])
    config_keys = {item.key for r in records if r.HasField("run") for item in r.run.config.update}
    assert {"rollout", "algorithm", "trainer"} <= config_keys
    logged = [json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item
              if (i.key or "/".join(i.nested_key)) == "reward"]
    assert len(logged) == 2
    # eval writes prompts, completions, rewards and trajectories
    out = cli("eval", "recipes/cpu_quickstart.yaml", "--checkpoint", str(run / "checkpoint-4"),
              f"trainer.output_dir={run}")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and {"prompt", "completion", "reward", "rewards", "unmask_step", "steps"} <= set(rows[0])
    assert "accuracy" in out.stdout
    # another evaluation keeps the first one's results beside its own; one writing over its input is refused
    out = cli("eval", "recipes/cpu_quickstart.yaml", "--checkpoint", str(run / "checkpoint-2"),
              f"trainer.output_dir={run}", "data.max_eval_samples=2")
    assert out.returncode == 0, out.stderr
    assert len((run / "eval.prev-1.jsonl").read_text().splitlines()) == 32
    data = tmp_path / "eval_data.jsonl"
    data.write_text((ROOT / "recipes/data/arith_test.jsonl").read_text())
    before = data.read_text()
    out = cli("eval", "recipes/cpu_quickstart.yaml", f"model.path={tiny_dir}", f"data.eval_files=[{data}]",
              f"eval.output_file={data}")
    assert out.returncode == 2 and "is one of this run's inputs" in out.stderr
    assert data.read_text() == before


def test_sft_command(tiny_dir, tmp_path):
    out = cli("sft", "recipes/sft_example.yaml", f"model.path={tiny_dir}", "trainer.max_steps=3",
              f"trainer.output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "final" / "config.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["train", "recipes/cpu_quickstart.yaml", "trainer.max_step=2"], "did you mean trainer.max_steps?"),
    (["train", "recipes/cpu_quickstart.yaml", "data.train_files=[missing.jsonl]"], "'missing.jsonl' does not exist"),
    (["train", "recipes/cpu_quickstart.yaml", "rewards=[{fn: nosuchreward}]"], "nosuchreward"),
    (["train", "recipes/cpu_quickstart.yaml", "model.path=/no/model"], "'/no/model' does not exist"),
    (["eval", "recipes/cpu_quickstart.yaml", "--checkpoint", "/no/ckpt"], "'/no/ckpt' does not exist"),
])
def test_user_mistakes_exit_2(args, message):
    out = cli(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr


def test_data_and_output_mistakes_exit_2_before_the_model_loads(tmp_path):
    # model.path names no model: each mistake must be found before the load is tried
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')  # row 1 lacks the answer
    out = cli("sft", "recipes/sft_example.yaml", "model.path=/no/model", f"data.train_files=[{data}]",
              f"trainer.output_dir={tmp_path / 'sft'}")  # used to train on the text "None"
    assert out.returncode == 2, out.stderr[-2000:]
    assert "sft.completion_column: row 1 of data.train_files" in out.stderr and "is None, not text" in out.stderr
    data.write_text('{"question": "1+1", "answer": 2}\n{"question": "1/2", "answer": 0.5}\n')  # 2 reads as 2.0
    out = cli("sft", "recipes/sft_example.yaml", "model.path=/no/model", f"data.train_files=[{data}]",
              f"trainer.output_dir={tmp_path / 'sft'}")
    assert out.returncode == 2 and "row 0 of data.train_files" in out.stderr, out.stderr[-2000:]
    assert "is 2.0, a number whose text was lost" in out.stderr
    table = tmp_path / "d.csv"
    table.write_text("question,answer,answer\n1+1,2,3\n")
    out = cli("sft", "recipes/sft_example.yaml", "model.path=/no/model", f"data.train_files=[{table}]",
              f"trainer.output_dir={tmp_path / 'sft'}")
    assert out.returncode == 2 and "names column 'answer' more than once" in out.stderr, out.stderr[-2000:]
    table.write_text("question,answer\n1+1,\n")  # a missing cell
    out = cli("sft", "recipes/sft_example.yaml", "model.path=/no/model", f"data.train_files=[{table}]",
              f"trainer.output_dir={tmp_path / 'sft'}")
    assert out.returncode == 2 and "row 0 of data.train_files" in out.stderr and "is empty" in out.stderr, (
        out.stderr[-2000:])
    out = cli("eval", "recipes/cpu_quickstart.yaml", "model.path=/no/model", f"eval.output_file={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]  # used to evaluate everything, then fail to write it
    assert f"eval.output_file: '{tmp_path}' is a directory" in out.stderr and "Traceback" not in out.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = cli("eval", "recipes/cpu_quickstart.yaml", "model.path=/no/model", f"data.eval_files=[{empty}]")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]  # used to write 0 samples
    assert "empty.jsonl" in out.stderr
    out = cli("train", "recipes/cpu_quickstart.yaml", "model.path=/no/model", f"trainer.output_dir={data}/run")
    assert out.returncode == 2, out.stderr[-2000:]  # used to fail after the model load with FileExistsError
    assert f"trainer.output_dir: cannot write '{data}/run': '{data}' is a file" in out.stderr


def test_lora_checkpoint_exports_to_a_full_model(tiny_dir, tmp_path):
    import torch

    from tracerl.build import build_model
    from tracerl.config import ModelConfig
    from tracerl.models import load_model

    run = tmp_path / "run"
    reward = tmp_path / "spread.py"  # a random tiny model rarely ends its answers: give every group a spread
    reward.write_text("def distinct(prompts, completions, **kw):\n    return [len(set(c)) / 8 for c in completions]\n")
    out = cli("train", "recipes/cpu_quickstart.yaml", f"model.path={tiny_dir}", "trainer.max_steps=1",
              f"trainer.output_dir={run}", "peft.r=4", "optimizer.learning_rate=0.05",
              f"rewards=[{{fn: '{reward}:distinct'}}]")
    assert out.returncode == 0, out.stderr
    assert (run / "checkpoint-1" / "model" / "adapter_config.json").is_file()
    out = cli("export", str(run / "checkpoint-1"), "--output", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    merged = load_model(str(tmp_path / "merged"))
    adapted = build_model(ModelConfig(), path=str(run / "checkpoint-1"))  # base + adapter, unmerged
    ids = torch.tensor([[10, 11, 12, 13]])
    torch.testing.assert_close(merged.logits(ids), adapted.logits(ids), atol=1e-4, rtol=1e-4)
    assert (merged.logits(ids) - load_model(str(tiny_dir)).logits(ids)).abs().max() > 1e-5  # training moved it


def test_eval_records_write_a_reward_that_does_not_apply_as_null_not_bare_nan(tmp_path):
    from tracerl.build import write_jsonl

    out = tmp_path / "eval.jsonl"
    nan, inf = float("nan"), float("inf")
    write_jsonl(out, [{"reward": nan, "rewards": {"math": inf, "format": 1.0}, "steps": [0.5, nan]}])
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"reward": None, "rewards": {"math": None, "format": 1.0}, "steps": [0.5, None]}


def test_an_output_place_that_cannot_be_written_is_refused_before_the_run(tmp_path):
    """/proc takes no new directories, even for root: the stand-in for a read-only disk, refused up front rather
    than after an evaluation (whose results would be lost) or a model load."""
    from tracerl.cli import _check_writable
    from tracerl.errors import UserError

    with pytest.raises(UserError, match="trainer.output_dir: cannot write '/proc/tracerl-test/run'"):
        _check_writable(Path("/proc/tracerl-test/run"), "trainer.output_dir", directory=True)
    with pytest.raises(UserError, match="eval.output_file: cannot write '/proc/tracerl-test/eval.jsonl'"):
        _check_writable(Path("/proc/tracerl-test/eval.jsonl"), "eval.output_file")
    _check_writable(tmp_path / "new" / "run", "trainer.output_dir", directory=True)
    assert not list(tmp_path.iterdir())  # nothing created before the data and rewards are checked, probe removed


def test_a_thread_left_running_does_not_keep_the_finished_process_alive():
    """A reward that starts a non-daemon thread and never stops it would hold the process at exit for ever; the
    entry point waits a grace period, names the thread, and exits with the run's own code."""
    program = ("import threading, time, tracerl.cli as cli\n"
               "cli.EXIT_GRACE_S = 1.0\n"
               "def run():\n"
               "    threading.Thread(target=time.sleep, args=(600,), name='reward-leftover').start()\n"
               "    return 3\n"
               "cli.main = run\n"
               "cli.entry()\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert "reward-leftover" in done.stderr and "exiting anyway" in done.stderr
    clean = subprocess.run([sys.executable, "-c", "import tracerl.cli as cli\ncli.main = lambda: 0\ncli.entry()\n"],
                           capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0 and clean.stderr == ""


@pytest.mark.parametrize("command", [["sft", "recipes/repeat_sft.yaml"], ["eval", "recipes/sudoku_tracerl.yaml"],
                                     ["generate", "--model", "m", "--prompt", "x"]])
def test_single_process_commands_refuse_a_launcher(command, monkeypatch, capsys):
    """Under deepspeed every process would run the whole sft / eval / generate into the same output."""
    from tracerl.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"`tracerl {command[0]}` runs in one process" in err and "WORLD_SIZE=2" in err
