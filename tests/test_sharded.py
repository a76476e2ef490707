"""TMS under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on two CPU processes (gloo), with the shipped accelerate configs,
against one process.

ZeRO-2 partitions the optimizer state and the gradients; every process keeps the whole (LoRA) weights. ZeRO-3 also
partitions the weights, and FSDP2 shards them (DTensors): snapshots gather them (a collective), and generation runs on
weights gathered for it (TRL's generation context under ZeRO-3, as in its GRPO trainer; every FSDP2 unit unsharded).
What these tests hold to: the engine really partitions, every (prompt, snapshot, sample) is sampled once (on uneven
shares: 3 batches of prompts on one process, 2 on the other), the snapshots are the (gathered) live weights at their
step on every process, and the trajectories and the final adapter are those of one process training on the same
global batch; a run interrupted mid-harvest resumes to the same end.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="install the `distributed` extra: pip install -e '.[distributed]'")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ZERO2 = os.path.join("examples", "accelerate_configs", "zero2.yaml")  # as users run it, from the repository root
ZERO3 = os.path.join("examples", "accelerate_configs", "zero3.yaml")
FSDP2 = os.path.join("examples", "accelerate_configs", "fsdp2.yaml")
sys.path.insert(0, HERE)
import distributed_worker as worker  # noqa: E402

pytestmark = [
    pytest.mark.sharded,
    pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def extensions_dir(tmp_path_factory) -> str:
    # DeepSpeed compiles a small shared-memory extension on its first CPU run (about a minute): once per test session.
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.getbasetemp() / "torch_extensions")


def run_worker(mode: str, model: str, out: str, extensions: str, config: str | None = ZERO2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_LOG_LEVEL": "error", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": extensions}
    script = os.path.join("tests", "distributed_worker.py")
    command = [sys.executable, script, mode, model, out] if config is None else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, script, mode, model, out]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    # The process that failed first is often not the one whose traceback ends the output (the other dies waiting for
    # it): its error lines lead the message.
    errors = [line for line in result.stderr.splitlines() if re.search(r"Error:|what\(\):|terminate called", line)]
    assert result.returncode == 0, "\n".join(dict.fromkeys(errors)) + "\n...\n" + result.stderr[-4000:]


def launch(mode: str, model: str, out: str, extensions: str, config: str | None = ZERO2) -> list[dict]:
    """Run the worker (two processes under `config`, or one without) and read what each process wrote."""
    run_worker(mode, model, out, extensions, config)
    ranks = []
    for rank in range(1 if config is None else 2):
        with open(os.path.join(out, f"rank-{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def assert_same_adapters(out: str, one_out: str, atol: float) -> None:
    """The snapshots and the student adapter of two runs agree within `atol`."""
    for folder in [f"history/step-{s}" for s in (2, 4, 6)] + ["student"]:
        sharded = load_file(os.path.join(out, folder, "adapter_model.safetensors"))
        single = load_file(os.path.join(one_out, folder, "adapter_model.safetensors"))
        assert sharded.keys() == single.keys()
        for key in sharded:
            torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=atol, msg=f"{folder}: {key}")


def assert_online_run(main: dict, other: dict) -> None:
    """An online run on two processes: snapshots at 0, 2, 4 equal to the live weights, every trajectory sampled once
    and held by both, and the forgetting meter the same on both, rising."""
    assert main["history_steps"] == other["history_steps"] == [0, 2, 4]
    assert main["snapshot_differences"] == other["snapshot_differences"] == {"2": 0.0, "4": 0.0}
    assert main["trajectories_digest"] == other["trajectories_digest"]
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    assert sorted(keys) == sorted((p, s, k) for p in range(len(worker.TRAIN)) for s in (0, 2, 4) for k in range(2))
    meter = [[e["retention_kl"] for e in rank["log_history"] if "retention_kl" in e] for rank in (main, other)]
    assert len(meter[0]) == 7 and meter[0] == meter[1] and meter[0][-1] > meter[0][1] > 0


def live_signals(run: dict) -> dict[str, list[float]]:
    """PLD and the forgetting meter as logged, in order (both phases)."""
    return {key: [e[key] for e in run["log_history"] if key in e] for key in ("pld", "retention_kl")}


def assert_same_signals(sharded: dict, single: dict) -> None:
    # Each process evaluates its share of the held-out examples and of the meter's prompts; the reduced values are the
    # one-process values up to the weights' float differences.
    ours, theirs = live_signals(sharded), live_signals(single)
    assert len(ours["pld"]) == len(theirs["pld"]) == 14
    assert ours["pld"] == pytest.approx(theirs["pld"], rel=1e-6)
    assert ours["retention_kl"] == pytest.approx(theirs["retention_kl"], rel=0, abs=1e-5)


@pytest.fixture(scope="module")
def zero2_run(tiny_llama, tmp_path_factory, extensions_dir):
    out = str(tmp_path_factory.mktemp("zero2"))
    return out, launch("zero2", tiny_llama, out, extensions_dir)


@pytest.fixture(scope="module")
def one_process_run(tiny_llama, tmp_path_factory, extensions_dir):
    """One process on the same global batch (2 processes x 4 = 8) and seed."""
    out = str(tmp_path_factory.mktemp("one"))
    return out, launch("one-process-batch-8", tiny_llama, out, extensions_dir, config=None)


def test_the_engine_is_deepspeed_zero2_and_really_partitions(zero2_run):
    _, ranks = zero2_run
    for rank in ranks:
        assert rank["num_processes"] == 2 and rank["distributed_type"] == "DistributedType.DEEPSPEED"
        assert rank["zero_stage"] == 2 and rank["engine"] == "DeepSpeedEngine"
        # Each process holds half of the fp32 master weights (and so of the optimizer state).
        assert rank["partition_numel"] * 2 == rank["trainable_numel"]


def test_every_trajectory_is_sampled_once_and_every_process_holds_them_all(zero2_run):
    out, (main, other) = zero2_run
    steps = [2, 4, 6]
    assert main["history_steps"] == other["history_steps"] == steps
    expected = {(p, s, k) for p in range(len(worker.TRAIN)) for s in steps for k in range(2)}
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert main["trajectories_digest"] == other["trajectories_digest"]
    assert main["sampled_here"] + other["sampled_here"] == len(expected) and other["sampled_here"] > 0
    # Written once, by the main process.
    assert main["history_directory"] and other["history_directory"] is None
    assert sorted(n for n in os.listdir(os.path.join(out, "history")) if n.startswith("step-")) == [
        f"step-{s}" for s in steps]


def test_snapshots_are_the_live_weights_at_their_step_on_every_process(zero2_run):
    _, ranks = zero2_run
    for rank in ranks:
        assert rank["snapshot_differences"] == {"2": 0.0, "4": 0.0, "6": 0.0}


def test_trajectories_and_adapters_equal_one_process_on_the_same_global_batch(zero2_run, one_process_run):
    out, (main, _) = zero2_run
    one_out, (one,) = one_process_run
    assert main["trajectories_digest"] == one["trajectories_digest"]
    # Gradients reduced across two processes sum in another order than in one: equal up to float rounding.
    assert_same_adapters(out, one_out, atol=1e-5)
    losses = [[e["loss"] for e in run["log_history"] if "loss" in e] for run in (main, one)]
    assert len(losses[0]) == 12 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_online_tms_under_zero2(tiny_llama, tmp_path, extensions_dir):
    main, other = launch("zero2-online", tiny_llama, str(tmp_path), extensions_dir)
    assert main["partition_numel"] * 2 == main["trainable_numel"]
    assert_online_run(main, other)
    assert {e.get("tms_phase") for e in main["log_history"]} == {3}


# ZeRO-3


@pytest.fixture(scope="module")
def zero3_run(tiny_llama, tmp_path_factory, extensions_dir):
    out = str(tmp_path_factory.mktemp("zero3"))
    return out, launch("zero3", tiny_llama, out, extensions_dir, config=ZERO3)


def test_zero3_partitions_the_adapter_itself(zero3_run):
    _, ranks = zero3_run
    for rank in ranks:
        assert rank["zero_stage"] == 3 and rank["engine"] == "DeepSpeedEngine"
        # Nothing of the LoRA weights is held whole: each process keeps half of them, in ZeRO-3's partitions.
        assert rank["local_numel"] == 0 and rank["partition_numel"] * 2 == rank["trainable_numel"]


def test_zero3_snapshots_are_the_gathered_live_weights_and_trajectories_are_sampled_once(zero3_run):
    out, (main, other) = zero3_run
    for rank in (main, other):
        assert rank["snapshot_differences"] == {"2": 0.0, "4": 0.0, "6": 0.0}
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    assert sorted(keys) == sorted((p, s, k) for p in range(len(worker.TRAIN)) for s in (2, 4, 6) for k in range(2))
    assert main["trajectories_digest"] == other["trajectories_digest"]
    assert main["sampled_here"] + other["sampled_here"] == len(keys) and other["sampled_here"] > 0
    # Whole snapshots on disk, not the empty local partitions.
    snapshot = load_file(os.path.join(out, "history", "step-2", "adapter_model.safetensors"))
    assert all(t.numel() > 0 for t in snapshot.values())


def test_zero3_equals_one_process_on_the_same_global_batch(zero3_run, one_process_run):
    out, (main, _) = zero3_run
    one_out, (one,) = one_process_run
    assert main["trajectories_digest"] == one["trajectories_digest"]
    # ZeRO-3 reduce-scatters gradients in partitions: further from one process's float order than ZeRO-2 (1e-5 seen).
    assert_same_adapters(out, one_out, atol=5e-5)
    assert_same_signals(main, one)


def test_online_tms_under_zero3_with_gradient_checkpointing(tiny_llama, tmp_path, extensions_dir):
    main, other = launch("zero3-online", tiny_llama, str(tmp_path), extensions_dir, config=ZERO3)
    assert main["zero_stage"] == 3 and main["local_numel"] == 0
    assert_online_run(main, other)  # the forgetting meter measured on gathered weights


# FSDP2


@pytest.fixture(scope="module")
def fsdp2_run(tiny_llama, tmp_path_factory, extensions_dir):
    out = str(tmp_path_factory.mktemp("fsdp2"))
    return out, launch("fsdp2", tiny_llama, out, extensions_dir, config=FSDP2)


def test_fsdp2_shards_the_adapter_itself(fsdp2_run):
    _, ranks = fsdp2_run
    for rank in ranks:
        assert rank["num_processes"] == 2 and rank["distributed_type"] == "DistributedType.FSDP"
        assert rank["fsdp_version"] == 2
        # Each LoRA weight is a DTensor sharded by rows: each process holds half of them.
        assert rank["dtensor_placements"] == ["(Shard(dim=0),)"]
        assert rank["local_rows"][0] * 2 == rank["global_rows"][0]


def test_fsdp2_snapshots_are_the_whole_live_weights_and_trajectories_are_sampled_once(fsdp2_run):
    out, (main, other) = fsdp2_run
    for rank in (main, other):
        assert rank["snapshot_differences"] == {"2": 0.0, "4": 0.0, "6": 0.0}
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    assert sorted(keys) == sorted((p, s, k) for p in range(len(worker.TRAIN)) for s in (2, 4, 6) for k in range(2))
    assert main["trajectories_digest"] == other["trajectories_digest"]
    # Uneven shares (3 and 2 batches of prompts per group of snapshots): generation must not wait for the other process.
    assert sorted((main["sampled_here"], other["sampled_here"])) == [60, 84]
    snapshot = load_file(os.path.join(out, "history", "step-2", "adapter_model.safetensors"))
    assert all(t.shape[0] == worker.LORA["r"] for k, t in snapshot.items() if "lora_A" in k)  # whole, not a shard


def test_fsdp2_equals_one_process_on_the_same_global_batch(fsdp2_run, one_process_run):
    out, (main, _) = fsdp2_run
    one_out, (one,) = one_process_run
    assert main["trajectories_digest"] == one["trajectories_digest"]
    assert_same_adapters(out, one_out, atol=1e-5)
    assert_same_signals(main, one)


def test_online_tms_under_fsdp2_with_gradient_checkpointing(tiny_llama, tmp_path, extensions_dir):
    main, other = launch("fsdp2-online", tiny_llama, str(tmp_path), extensions_dir, config=FSDP2)
    assert main["dtensor_placements"] == ["(Shard(dim=0),)"]
    assert_online_run(main, other)  # the forgetting meter measured on unsharded weights


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_a_run_interrupted_mid_harvest_resumes_to_the_same_end(engine, request, tiny_llama, tmp_path, extensions_dir):
    out, (uninterrupted, _) = request.getfixturevalue(f"{engine}_run")
    config = {"zero2": ZERO2, "zero3": ZERO3, "fsdp2": FSDP2}[engine]
    resumed_out = str(tmp_path)
    # Stops after the harvest's checkpoint at step 4 (of 6) on both processes, as a crash would; then resumes.
    run_worker(f"{engine}-interrupted", tiny_llama, resumed_out, extensions_dir, config)
    assert not os.path.exists(os.path.join(resumed_out, "rank-0.json"))
    checkpoints = [n for n in os.listdir(os.path.join(resumed_out, "history", "harvest")) if n.startswith("checkpoint")]
    assert sorted(checkpoints) == ["checkpoint-2", "checkpoint-4"]
    main, other = launch(f"{engine}-resumed", tiny_llama, resumed_out, extensions_dir, config=config)
    assert main["trajectories_digest"] == other["trajectories_digest"] == uninterrupted["trajectories_digest"]
    # The snapshot taken after the restart (step 6) is the live weights there; the ones before it were reopened.
    assert main["snapshot_differences"] == other["snapshot_differences"] == {"6": 0.0}
    for folder in [f"history/step-{s}" for s in (2, 4, 6)] + ["student"]:
        resumed = load_file(os.path.join(resumed_out, folder, "adapter_model.safetensors"))
        reference = load_file(os.path.join(out, folder, "adapter_model.safetensors"))
        assert all(torch.equal(resumed[key], reference[key]) for key in reference), folder
