"""`tracerl generate` as a user runs it: output, trajectory view, and one clear error (exit 2) per bad input."""

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracerl", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def block_dir(tmp_path_factory):
    from tracerl.models import build_tiny_model

    path = tmp_path_factory.mktemp("tiny_block")
    build_tiny_model("qwen3", block_size=4, max_position_embeddings=64).save_pretrained(path)
    return path


def test_generate_prints_completion_and_unmask_order(block_dir, tmp_path):
    out = run_cli("generate", "--model", str(block_dir), "--prompt", "hello", "--max-completion-length", "8",
                  "--steps", "8", "--show-trajectory", "--save-trajectory", str(tmp_path / "t.pt"))
    assert out.returncode == 0, out.stderr
    assert "# unmask order (" in out.stdout
    assert out.stdout.count("step ") == 8  # one token per step
    assert (tmp_path / "t.pt").is_file()


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model directory '/nonexistent/model' does not exist"),
    (["--steps", "3", "--block-length", "4"], "steps=3 cannot be divided over 2 blocks"),
    (["--threshold", "1.5"], "threshold must lie in (0, 1], got 1.5"),
    (["--threshold", "0"], "threshold must lie in (0, 1], got 0.0"),
    (["--steps", "0"], "steps must be >= 1, got 0"),  # used to mean max-completion-length silently
    (["--device", "gpu"], "model.device: 'gpu' is not a device"),
    (["--block-length", "-2"], "--block-length: must be > 0, got -2"),  # generated nothing, exit 0
    (["--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    (["--prompt", "x" * 70], "exceeds the model's maximum length 64"),
    (["--cache", "elastic:gx"], "--cache: cache 'elastic:gx': knobs are"),
    (["--cache", "elastic"], "rollout.cache=elastic is for full-attention models"),  # this model is block diffusion
    (["--save-trajectory", "/tmp"], "--save-trajectory: '/tmp' is a directory"),  # a traceback after generating
    (["--plot", "/proc/version/x.png"], "--plot: cannot write '/proc/version/x.png'"),
])
def test_bad_input_is_one_clear_line_and_exit_2(block_dir, args, message):
    base = {"--model": str(block_dir), "--prompt": "hi", "--max-completion-length": "8"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv] + [a for a in args if a.startswith("--") and a not in base]
    out = run_cli("generate", *flat)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_family_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba_diffusion"}')
    out = run_cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2
    assert "model_type='mamba_diffusion'" in out.stderr and "llada" in out.stderr and "sdar" in out.stderr


def test_generate_with_a_cache_on_a_full_attention_model(tmp_path):
    from tracerl.models import build_tiny_model

    build_tiny_model("llama", max_position_embeddings=64).save_pretrained(tmp_path / "llada_like")
    out = run_cli("generate", "--model", str(tmp_path / "llada_like"), "--prompt", "hello", "--max-completion-length",
                  "16", "--steps", "8", "--block-length", "8", "--cache", "elastic:g0.5", "--show-trajectory")
    assert out.returncode == 0, out.stderr
    assert "# unmask order (8 forwards, 8 steps)" in out.stdout
    out = run_cli("generate", "--model", str(tmp_path / "llada_like"), "--prompt", "hello", "--max-completion-length",
                  "16", "--steps", "8", "--block-length", "8", "--cache", "elastic:w4")
    assert out.returncode == 2 and "cache_window=4 is shorter than the block" in out.stderr
