"""Data parallel training with DeepSpeed (ZeRO-2, ZeRO-3, ZeRO-3 offload) and LoRA.

The multi-process tests run ONE real launch on CPU,
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port <free> tests/distributed/worker.py --out DIR
whose scenarios (tests/distributed/worker.py) write one JSON file per rank; each test below reads its scenario.
One launch means the launcher, the imports and DeepSpeed's JIT-compiled CPU comm op (~1 minute on a fresh
machine, cached under ~/.cache/torch_extensions afterwards) are paid once for the whole module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tracerl.config import DistributedConfig, PeftSection
from tracerl.distributed import LocalBackend, make_backend
from tracerl.ds_config import EngineSpec, fill_config, read_config
from tracerl.errors import UserError
from tracerl.models import build_tiny_model
from tracerl.peft_utils import apply_lora, load_lora, merge_lora, resolve_targets, save_lora

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "worker.py"
RECIPES = ROOT / "recipes" / "deepspeed"
LAUNCH_TIMEOUT_S = 900


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two spinning OpenMP
    threads make a step ~100x slower; the launched ranks run with OMP_NUM_THREADS=1 too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the launch -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher() -> list[str]:
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ds")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    port = _free_port()
    cmd = [*_launcher(), "--num_gpus", "2", "--master_port", str(port), str(WORKER), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"launch timed out after {LAUNCH_TIMEOUT_S}s\n{exc.stdout or ''}{exc.stderr or ''}"
    (out / "master_port").write_text(str(port))
    return out, log


def scenario(launch: tuple[Path, str], name: str) -> list[dict]:
    """Both ranks' results of one scenario; a failure shows the scenario's traceback or the launch log."""
    out, log = launch
    results = []
    for rank in (0, 1):
        file = out / f"{name}.rank{rank}.json"
        if not file.is_file():
            pytest.fail(f"scenario {name} wrote no result for rank {rank}; launch log tail:\n{log[-6000:]}")
        result = json.loads(file.read_text())
        if "error" in result:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{result['error']}")
        results.append(result)
    return results


def _check_round(r: dict, grad_tol: float = 1e-5) -> None:
    assert r["ranks_prompts"] == [2, 2]  # each rank sampled its own half of the prompts
    assert r["grad_max_abs"] > 1e-3  # there is a gradient to compare
    assert r["grad_max_diff"] <= grad_tol * max(1.0, r["grad_max_abs"])  # the reduced gradient is the full one
    assert r["param_max_diff"] < 1e-5 < r["param_moved"]  # same update, and it did move the weights


# ---- multi-process: 2 ranks == 1 process ----------------------------------------------------------------------
@pytest.mark.slow
def test_zero2_update_equals_single_process(launch):
    """Half the completions on each of 2 ranks == all of them in one process: step-mean weights and the
    scale_rewards=batch std are global, DeepSpeed's rank averaging is accounted for."""
    rank0, _ = scenario(launch, "zero2_equivalence")
    (r,) = rank0["rounds"]
    _check_round(r)
    for key in ("loss", "grad_norm"):
        assert r["metrics"][key][0] == pytest.approx(r["metrics"][key][1], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_step_rewards_on_one_rank_only_train_as_one_process(launch):
    """Rank 0's prompts get per-step rewards and rank 1's do not: the batch std of the step rewards all-reduces,
    so both ranks take that path (it used to be a collective mismatch that aborted the run)."""
    rank0, _ = scenario(launch, "step_rewards_on_one_rank")
    (r,) = rank0["rounds"]
    _check_round(r)
    for key in ("loss", "rewards/process/mean"):
        if key in r["metrics"]:
            assert r["metrics"][key][0] == pytest.approx(r["metrics"][key][1], rel=1e-5, abs=1e-6), key
    assert "loss" in r["metrics"]


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_stops_every_rank_with_a_user_error(launch):
    rank0, rank1 = scenario(launch, "reward_fails_on_one_rank")
    assert rank1["raised"] == "RewardError" and "only fails on rank 1" in rank1["message"]
    assert rank0["raised"] == "UserError" and "the rewards failed on 1 other rank(s)" in rank0["message"]


@pytest.mark.slow
def test_eval_is_sharded_over_ranks_and_summarised_as_one_process(launch):
    """Each rank decodes and scores its share of the held-out prompts (a paid reward runs once per sample), and
    every rank logs the one-process summary; a reward failing on one rank during eval stops both."""
    rank0, rank1 = scenario(launch, "sharded_eval")
    prompts = ["abc", "xyz", "the", "foo", "bar"]
    assert rank0["scored"] == [p for p in prompts[0::2] for _ in range(2)]  # 2 samples each
    assert rank1["scored"] == [p for p in prompts[1::2] for _ in range(2)]
    local = rank0["local"]
    assert local["eval/samples"] == 10 and 0 < local["eval/accuracy"] < 1  # the threshold splits the samples
    for summary in (rank0["eval"], rank1["eval"]):
        for key in local:
            if key != "eval/seconds":
                assert summary[key] == pytest.approx(local[key], abs=1e-12), key
    assert rank1["raised"] == "RewardError" and "only fails on rank 1" in rank1["message"]
    assert rank0["raised"] == "UserError" and "evaluation at step 0: the rewards failed on 1 other" in rank0["message"]


@pytest.mark.slow
def test_a_callback_stopping_or_failing_on_one_rank_stops_every_rank(launch):
    rank0, rank1 = scenario(launch, "callback_stops_on_one_rank")
    for rank in (rank0, rank1):
        assert {k: rank[k] for k in ("steps", "global_step", "checkpoints")} == {
            "steps": 1, "global_step": 1, "checkpoints": ["checkpoint-1"]}
    assert rank0["raised"] == "UserError" and "LogFailsOnRank0.on_log at step 1 raised RuntimeError" in rank0["message"]
    assert rank1["raised"] == "UserError" and "on_log at step 1 failed on 1 other rank(s)" in rank1["message"]


@pytest.mark.slow
def test_zero3_value_model_and_reference_equal_single_process(launch):
    """ZeRO-3 policy + a second engine for the full-copy value model (globally whitened GAE) + a partitioned
    frozen reference for the KL term."""
    rank0, _ = scenario(launch, "zero3_equivalence")
    (r,) = rank0["rounds"]
    assert r["grad_max_diff"] <= 1e-5 * max(1.0, r["grad_max_abs"])
    assert r["ranks_prompts"] == [2, 2] and r["param_moved"] > 1e-4
    assert r["param_max_diff"] < 1e-4  # Adam's first step amplifies rounding on tiny gradients
    for key in ("loss", "grad_norm", "value/loss", "kl"):
        assert r["metrics"][key][0] == pytest.approx(r["metrics"][key][1], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_policy_and_value_adapters_equal_single_process(launch, stage):
    """LoRA policy + LoRA value adapter in one engine, two steps (the second catches gradients left over from the
    first); unclipped, so the joint step equals two separate optimizers."""
    rank0, _ = scenario(launch, f"zero{stage}_lora_equivalence")
    assert len(rank0["rounds"]) == 2
    for r in rank0["rounds"]:
        _check_round(r)
        assert r["metrics"]["value/loss"][0] == pytest.approx(r["metrics"]["value/loss"][1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", [("zero2", 2), ("zero2_lora", 2), ("zero3_resume", 3), ("zero3_lora", 2),
                                        ("zero3_offload", 1), ("plain_data_parallel", 2), ("zero3_mini_batches", 2)])
def test_ranks_hold_identical_weights_after_every_step(launch, name, steps):
    rank0, rank1 = scenario(launch, name)
    assert len(rank0["checksums"]) == steps
    assert rank0["checksums"] == rank1["checksums"]
    assert len(set(rank0["checksums"])) == steps  # every step changed the weights
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in rank0["full"])
    assert [m["reward"] for m in rank0["full"]] == [m["reward"] for m in rank1["full"]]  # metrics are global


def test_zero3_mini_batches_step_twice_per_epoch(launch):
    rank0, _ = scenario(launch, "zero3_mini_batches")
    assert rank0["lr_steps"] == 2 * 2 * 2  # RL steps x PPO epochs x optimizer steps per epoch
    assert all(m["kl"] > 0 for m in rank0["full"])  # the second epoch's policy has moved from the old one


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", [("zero3_resume", 3), ("zero3_lora", 2)])
def test_zero3_checkpoint_resumes_exactly(launch, name, steps):
    """A ZeRO-3 checkpoint (engine shards + HF weights or LoRA adapter) resumes to the uninterrupted run."""
    rank0, _ = scenario(launch, name)
    full, resumed = rank0["full"], rank0["resumed"]
    assert len(full) == steps and len(resumed) == 1
    for key in ("reward", "loss", "grad_norm", "entropy", "value/loss", "kl"):
        if key in full[-1]:
            assert resumed[0][key] == pytest.approx(full[-1][key], rel=1e-6, abs=1e-9), key
    assert rank0["resumed_checksums"] == rank0["checksums"][-1:]
    files = set(rank0["checkpoint_files"])
    assert {"trainer_state.json", "training_state.pt", "rng_state_0.pt", "rng_state_1.pt"} <= files
    assert any(f.startswith("deepspeed/policy/") and f.endswith("optim_states.pt") for f in files)
    if name == "zero3_lora":
        assert {"model/adapter_config.json", "model/adapter_model.safetensors",
                "model/value/adapter_model.safetensors"} <= files
    else:
        assert {"model/config.json", "model/model.safetensors"} <= files
        # the HF directory holds exactly the (gathered) weights of that step
        assert rank0["saved_model_checksum"] == rank0["checksums"][steps - 2]


# ---- single process: backend choice, DeepSpeed config filling, LoRA ---------------------------------------------
@pytest.mark.slow
def test_a_cpu_launch_leaves_no_shared_memory_behind(launch):
    """DeepSpeed's CPU all-reduce maps a 67 MB /dev/shm file per rank and never removes it; the backend unlinks
    its own once every rank has mapped them all."""
    out, _ = launch
    scenario(launch, "zero2")  # the launch ran
    port = (out / "master_port").read_text()
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_make_backend_is_local_without_a_config_or_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(make_backend(DistributedConfig(deepspeed=None)), LocalBackend)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs_fill_every_auto_field(name):
    spec = EngineSpec(micro_batch_size=16, max_grad_norm=1.0, hidden_size=2048)
    cpu = fill_config(read_config(RECIPES / name), spec, world_size=4, bf16_capable=False)
    gpu = fill_config(read_config(RECIPES / name), spec, world_size=4, bf16_capable=True)
    assert (cpu["train_micro_batch_size_per_gpu"], cpu["gradient_accumulation_steps"], cpu["train_batch_size"]) \
        == (16, 1, 64)
    assert cpu["gradient_clipping"] == 1.0 and cpu["zero_optimization"]["reduce_bucket_size"] == 2048 ** 2
    assert cpu["bf16"]["enabled"] is False and gpu["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(cpu)


def test_ds_config_conflicts_are_user_errors(tmp_path):
    spec = EngineSpec(micro_batch_size=8, max_grad_norm=1.0)
    with pytest.raises(UserError, match="gradient_accumulation_steps=4"):
        fill_config({"gradient_accumulation_steps": 4}, spec, 2, False)
    with pytest.raises(UserError, match="gradient_clipping=0.5 disagrees with optimizer.max_grad_norm"):
        fill_config({"gradient_clipping": 0.5}, spec, 2, False)
    with pytest.raises(UserError, match="cannot fill zero_optimization.sub_group_size"):
        fill_config({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, spec, 2, False)
    (tmp_path / "opt.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(UserError, match="remove the 'optimizer' section"):
        read_config(tmp_path / "opt.json")
    with pytest.raises(UserError, match="does not exist"):
        read_config(tmp_path / "missing.json")
    (tmp_path / "stage7.json").write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    with pytest.raises(UserError, match="zero_optimization.stage is 7; ZeRO has stages 0, 1, 2 and 3"):
        read_config(tmp_path / "stage7.json")
    for zero, says in [({"stage": 2, "overlap_com": True}, "zero_optimization.overlap_com: Extra inputs"),
                       ({"stage": 2, "reduce_bucket_size": "lots"}, "zero_optimization.reduce_bucket_size: Input "
                                                                    "should be a valid integer")]:
        (tmp_path / "typo.json").write_text(json.dumps({"zero_optimization": zero}))
        with pytest.raises(UserError, match=says):
            read_config(tmp_path / "typo.json")
    for shipped in ("zero2.json", "zero3.json", "zero3_offload.json"):  # "auto" fields are left for later
        read_config(ROOT / "recipes" / "deepspeed" / shipped)
    (tmp_path / "bad.json").write_text("{stage: 2")  # `tracerl validate` reads it as `train` would
    from tracerl.recipe import load_config

    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        load_config(None, [f"distributed.deepspeed={tmp_path / 'bad.json'}"])


def _lora_model(seed: int = 0, r: int = 4):
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = apply_lora(build_tiny_model("llama", seed=0), PeftSection(r=r, lora_alpha=8))
        for name, p in model.named_parameters():  # B = 0 at init: give the adapter an effect to merge / save
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def test_all_linear_lora_skips_the_lm_head_and_merges_exactly(tmp_path):
    backbone = build_tiny_model("llama").backbone
    assert resolve_targets(backbone, "all-linear") == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                        "up_proj", "v_proj"]
    model = _lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and not any("lm_head" in n for n in trainable)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = model.logits(ids)
        save_lora(model, tmp_path / "adapter")
        merged = merge_lora(model)
        assert not hasattr(merged.backbone, "peft_config")
        torch.testing.assert_close(merged.logits(ids), adapted, atol=1e-5, rtol=1e-5)
        reloaded = load_lora(build_tiny_model("llama", seed=0), tmp_path / "adapter")
        torch.testing.assert_close(reloaded.logits(ids), adapted, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_saved_adapter_finds_its_base_model(tmp_path):
    from tracerl.models import load_model
    from tracerl.peft_utils import load_adapter

    build_tiny_model("qwen3", block_size=4).save_pretrained(tmp_path / "base")
    model = apply_lora(load_model(str(tmp_path / "base")), PeftSection(r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    save_lora(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    reloaded = load_adapter(tmp_path / "adapter", device="cpu")
    assert reloaded.block_size == 4 and any(p.requires_grad for p in reloaded.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.logits(ids), model.logits(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merge_lora(reloaded).logits(ids), model.logits(ids), atol=1e-5, rtol=1e-5)


def test_lora_target_names_fall_back_to_full_names_when_the_head_suffix_is_shared():
    """LLaDA's published module tree names both its output head and every MLP output `ff_out`."""
    class Tree(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"ff_out": torch.nn.Linear(4, 4)})])
            self.ff_out = torch.nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.ff_out

    assert resolve_targets(Tree(), "all-linear") == ["blocks.0.ff_out"]


@pytest.mark.parametrize("value", [False, True])
def test_single_process_lora_checkpoint_resumes(tmp_path, value):
    """The checkpoint's model/ holds the adapter only; resume reloads it (and the value adapter + head)."""
    from tests.test_trainer import ROWS, distinct_chars, make_config
    from tracerl.trainer import RLTrainer

    def run(sub: str, steps: int, resume: str | None = None):
        cfg = make_config(tmp_path / sub, False, trainer={"max_steps": steps, "resume_from_checkpoint": resume,
                                                          "per_device_train_batch_size": 4},
                          algorithm={"use_value_model": value, "beta": 0.05})
        return RLTrainer(cfg, _lora_model(), distinct_chars, ROWS).train()

    full = run("a", 3)
    run("b", 2)
    ckpt = tmp_path / "b" / "run" / "checkpoint-2"
    assert (ckpt / "model" / "adapter_model.safetensors").is_file() and not (ckpt / "model" / "config.json").exists()
    resumed = run("b", 3, str(ckpt))
    for key in ("reward", "loss", "grad_norm", "kl"):
        assert resumed[0][key] == pytest.approx(full[2][key], rel=1e-5, abs=1e-7), key


def test_lora_checkpoint_into_a_model_without_lora_is_a_user_error(tmp_path):
    from tests.test_trainer import ROWS, distinct_chars, make_config
    from tracerl.trainer import RLTrainer

    cfg = make_config(tmp_path, False, trainer={"max_steps": 1, "per_device_train_batch_size": 4})
    RLTrainer(cfg, _lora_model(), distinct_chars, ROWS).train()
    cfg.trainer.resume_from_checkpoint = str(tmp_path / "run" / "checkpoint-1")
    cfg.trainer.max_steps = 2
    with pytest.raises(UserError, match="holds a LoRA adapter but the model has none"):
        RLTrainer(cfg, build_tiny_model("llama"), distinct_chars, ROWS).train()


def test_step_metrics_a_rank_lacks_are_averaged_over_the_ranks_that_have_them():
    """A reward's log_metric (or a reward that failed on one rank) gives a key on some ranks only: the job's metric
    is the mean over the ranks that logged it, on every rank alike, never a KeyError."""
    from types import SimpleNamespace

    from tracerl.data_parallel import across_ranks

    ranks = [{"reward": 1.0, "custom/a": 2.0}, {"reward": 3.0, "custom/b": 5.0}]
    for mine in ranks:
        backend = SimpleNamespace(world_size=2, all_gather_object=lambda _: ranks)
        assert across_ranks(backend, mine) == {"reward": 2.0, "custom/a": 2.0, "custom/b": 5.0}


def test_reward_error_counts_sum_and_reward_stds_pool_over_ranks():
    """Two ranks each with 2 completions: the job's reward_errors count is the sum, and a reward function's std is
    the std of all 4 values (the mean of the two per-rank stds is not), as one process computes them."""
    import statistics
    from types import SimpleNamespace

    from tracerl.data_parallel import across_ranks, per_function_stats

    values = [[0.0, 1.0], [0.25, float("nan")]]  # rank 1's second sample got no value (None)
    backend = SimpleNamespace(world_size=2, all_gather_object=lambda _: values)
    stats = per_function_stats(backend, {"acc": values[0]})
    assert stats["rewards/acc/mean"] == pytest.approx(statistics.mean([0.0, 1.0, 0.25]))
    assert stats["rewards/acc/std"] == pytest.approx(statistics.stdev([0.0, 1.0, 0.25]))
    ranks = [{"reward_errors/acc": 4.0, "reward": 1.0}, {"reward_errors/acc": 0.0, "reward": 1.0}]
    backend = SimpleNamespace(world_size=2, all_gather_object=lambda _: ranks)
    assert across_ranks(backend, ranks[0])["reward_errors/acc"] == 4.0
    assert per_function_stats(SimpleNamespace(world_size=1), {"acc": [1.0]}) == {}


def test_resuming_under_another_zero_stage_names_both_stages(tmp_path):
    """DeepSpeed cannot load ZeRO-2 optimizer shards into a ZeRO-3 engine (a bare assert deep inside it)."""
    import json
    from types import SimpleNamespace

    from tracerl.checkpoint import load_checkpoint

    ckpt = tmp_path / "checkpoint-1"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": 2, "deepspeed": True,
                                                         "zero_stage": 2}))
    backend = SimpleNamespace(engine_checkpoints=True, world_size=2, stage=3)
    with pytest.raises(UserError, match="written under ZeRO stage 2, and this run's distributed.deepspeed config is "
                                        "stage 3"):
        load_checkpoint(SimpleNamespace(backend=backend), ckpt)
