"""Two CPU processes under `accelerate launch` (gloo; the code path of multi-GPU DDP) against one process."""

import json
import re
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import load_tokenizer
from peft import LoraConfig

from datasets import Dataset

from trl_tms import TMSTrainer
from trl_tms.data import completion_text
from trl_tms.mixture import MixtureDataset
from trl_tms.pld import policy_label_divergence
from trl_tms.history import snapshot_steps

HERE = os.path.dirname(os.path.abspath(__file__))
DDP_CONFIG = os.path.join(HERE, "..", "examples", "accelerate_configs", "ddp.yaml")
sys.path.insert(0, HERE)
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")


def run(args: list[str], processes: int, timeout: int = 600) -> None:
    # One thread per process, as `accelerate launch` sets for CPU processes, so both runs do the same arithmetic.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_LOG_LEVEL": "error"}
    if processes > 1:
        args = ["-m", "accelerate.commands.launch", "--config_file", DDP_CONFIG, "--num_processes", str(processes), *args]
    # Output to a file, not a pipe: a process left behind would keep a pipe open.
    with tempfile.TemporaryFile("w+") as output:
        launched = subprocess.Popen([sys.executable, *args], cwd=HERE, env=env, stdout=output, stderr=subprocess.STDOUT,
                                    text=True)
        try:
            launched.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Terminated, the launcher ends the processes it started (each in a session of its own) before it exits.
            launched.terminate()
            try:
                launched.wait(timeout=90)
            except subprocess.TimeoutExpired:
                launched.kill()
                launched.wait()
            output.seek(0)
            pytest.fail(f"{args} did not finish within {timeout} s (processes waiting for each other?):\n"
                        f"{output.read()[-4000:]}")
        output.seek(0)
        assert launched.returncode == 0, output.read()[-4000:]


def run_ranks(mode: str, model: str, out: str, timeout: int = 600) -> list[dict]:
    """The worker's `mode` on two processes; what each process wrote."""
    run(["distributed_worker.py", mode, model, out], processes=2, timeout=timeout)
    ranks = []
    for rank in range(2):
        with open(os.path.join(out, f"rank-{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


@pytest.fixture(scope="module")
def two_process_run(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    return tiny_llama, out, run_ranks("train", tiny_llama, out)


def test_every_prompt_gets_its_trajectories_once_and_every_process_holds_them_all(two_process_run):
    _, _, (main, other) = two_process_run
    assert main["num_processes"] == other["num_processes"] == 2
    config = worker.config("unused")
    # 24 prompts, global batch 2 x 4 = 8: 3 steps an epoch, 2 epochs.
    steps = snapshot_steps(6, config.num_checkpoints)
    assert main["history_steps"] == other["history_steps"] == steps
    expected = {(p, s, k) for p in range(len(worker.TRAIN)) for s in steps for k in range(config.samples_per_checkpoint)}
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    assert len(keys) == len(set(keys)) == main["num_trajectories"] == other["num_trajectories"]
    assert set(keys) == expected
    assert main["trajectories_digest"] == other["trajectories_digest"]
    # The work was split, not repeated: each group of snapshots samples 24 batches (one prompt each), 12 per process.
    assert main["sampled_here"] + other["sampled_here"] == len(expected)
    assert 0 < other["sampled_here"] <= main["sampled_here"]


def test_two_processes_sample_each_drawn_pair_once_and_share_them(tiny_llama, tmp_path):
    main, other = run_ranks("drawn", tiny_llama, str(tmp_path))
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    assert len(keys) == len(set(keys)) == main["num_trajectories"] == other["num_trajectories"]
    assert main["trajectories_digest"] == other["trajectories_digest"]
    assert main["sampled_here"] + other["sampled_here"] == len(keys) and other["sampled_here"] > 0
    # The pairs the student's draws land on (planned from labels alone, as the trainer's first round), not every pair.
    config = worker.config("unused")
    labels = Dataset.from_dict({"prompt_index": list(range(len(worker.TRAIN))), "snapshot_step": [-1] * len(worker.TRAIN)})
    plan = MixtureDataset(labels, config.label_weight, config.seed, snapshot_steps=[2, 4, 6], sampled=set())
    pairs = {key[:2] for key in keys}
    assert plan.missing_pairs(2) <= pairs and len(pairs) < len(worker.TRAIN) * 3
    assert {k for *_, k in keys} == {0, 1}  # both samples of each pair


def test_a_verifier_answering_differently_on_each_process_is_asked_on_the_main_one_only(tiny_llama, tmp_path):
    """
    Each process plans the pairs to sample from the verifier's verdicts, and sampling is a collective: verdicts that
    differ between processes (here by design: the verifier keeps completions whose length has its rank's parity) would
    leave them waiting for each other. The main process's verdicts hold on every process.
    """
    main, other = run_ranks("rank-verifier", tiny_llama, str(tmp_path), timeout=300)
    assert main["verifier_calls"] > 0 and other["verifier_calls"] == 0
    assert main["trajectories_digest"] == other["trajectories_digest"]
    texts = [completion_text(row[3]) for row in main["trajectories"]]
    kept_by_main = sum(bool(text.strip()) and len(text) % 2 == 0 for text in texts)
    assert 0 < kept_by_main < len(texts)
    kept = [next(e["tms_kept_trajectories"] for e in rank["log_history"] if "tms_kept_trajectories" in e)
            for rank in (main, other)]
    assert kept == [kept_by_main, kept_by_main]


def test_history_is_written_by_the_main_process_only(two_process_run):
    _, out, (main, other) = two_process_run
    history = os.path.join(out, "history")
    assert main["history_directory"] == history and other["history_directory"] is None
    assert sorted(n for n in os.listdir(history) if n.startswith("step-")) == [f"step-{s}" for s in (2, 4, 6)]
    with open(os.path.join(history, "tms_run.json")) as f:
        record = json.load(f)
    assert record["harvest_done"] and record["trajectories_done"]
    assert os.path.isfile(os.path.join(out, "student", "adapter_model.safetensors"))


def test_sharded_trajectories_equal_one_process_sampling_the_same_snapshots(two_process_run):
    model, out, (main, _) = two_process_run
    run(["distributed_worker.py", "generate", model, out], processes=1)
    with open(os.path.join(out, "regenerated.json")) as f:
        assert main["trajectories"] == json.load(f)


def test_two_processes_sample_the_same_trajectories_as_one(two_process_run, tmp_path):
    model, out, _ = two_process_run
    os.symlink(os.path.join(out, "history"), tmp_path / "history")
    run(["distributed_worker.py", "generate", model, str(tmp_path)], processes=1)
    run(["distributed_worker.py", "generate", model, out], processes=2)
    with open(tmp_path / "regenerated.json") as one, open(os.path.join(out, "regenerated.json")) as two:
        assert json.load(one) == json.load(two)


def test_pld_counts_every_held_out_example_once(two_process_run, tmp_path):
    """7 held-out examples over 2 processes: the sampler repeats one to even the batches; PLD must not count it."""
    model, _, (main, _) = two_process_run
    trainer = TMSTrainer(
        model=model, args=worker.config(str(tmp_path)), train_dataset=worker.TRAIN, eval_dataset=worker.EVAL,
        processing_class=load_tokenizer(model), peft_config=LoraConfig(**worker.LORA),
    )
    # The LoRA B matrices start at zero, so the step-0 PLD of both runs is the base model's.
    one_process = policy_label_divergence(trainer, trainer.pld_callback.dataset)
    two_processes = next(e["pld"] for e in main["log_history"] if "pld" in e)
    assert two_processes == pytest.approx(one_process, rel=1e-6)


def test_online_tms_on_two_processes_samples_each_snapshot_once_and_shares_it(tiny_llama, tmp_path):
    out = str(tmp_path)
    main, other = run_ranks("online", tiny_llama, out)
    # 6 steps of global batch 8; snapshots every 6 // 3 = 2 steps from step 0, taken by both processes.
    assert main["history_steps"] == other["history_steps"] == [0, 2, 4]
    assert sorted(n for n in os.listdir(os.path.join(out, "history")) if n.startswith("step-")) == [
        "step-0", "step-2", "step-4"
    ]
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    expected = {(p, s, k) for p in range(len(worker.TRAIN)) for s in (0, 2, 4) for k in range(2)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert main["trajectories_digest"] == other["trajectories_digest"]
    assert main["sampled_here"] + other["sampled_here"] == len(expected) and other["sampled_here"] > 0
    assert {e.get("tms_phase") for e in main["log_history"]} == {3}


def test_online_tms_sampling_the_drawn_pairs_on_two_processes_shares_them_and_trains_alike(tiny_llama, tmp_path):
    main, other = run_ranks("online-drawn", tiny_llama, str(tmp_path))
    keys = [tuple(row[:3]) for row in main["trajectories"]]
    every = {(p, s, k) for p in range(len(worker.TRAIN)) for s in (0, 2, 4) for k in range(2)}
    assert len(keys) == len(set(keys)) and set(keys) < every  # each drawn pair once, not every pair
    assert main["trajectories_digest"] == other["trajectories_digest"]
    assert main["sampled_here"] + other["sampled_here"] == len(keys) and other["sampled_here"] > 0


@pytest.mark.parametrize(
    "deepspeed_stage, fsdp_version, options, refused",
    [
        (0, 2, {}, None),
        (0, 1, {}, r"supports FSDP2, not FSDP version 1.*fsdp_version: 2"),
        (0, 2, {"quantized": True}, r"FSDP2 with a 4-bit.*not verified.*ZeRO-2"),
        (0, 2, {"reshard_after_forward": 2}, r"needs `fsdp_reshard_after_forward` true or false \(got 2\)"),
        (0, 2, {"gradient_checkpointing": True}, None),
        (3, None, {"quantized": True}, r"cannot partition a 4-bit.*ZeRO-2"),
        (3, None, {"gradient_checkpointing": True}, r"needs `gradient_checkpointing=False`.*tms_mode='online'"),
        (3, None, {"gradient_checkpointing": True, "tms_mode": "online"}, None),
        (3, None, {}, None),
        (2, None, {"gradient_checkpointing": True, "quantized": True}, None),
    ],
)
def test_what_sharded_engines_cannot_run_is_refused_with_what_to_use_instead(deepspeed_stage, fsdp_version, options,
                                                                             refused):
    from types import SimpleNamespace

    from trl_tms.sharding import check_parallelism

    reshard = options.pop("reshard_after_forward", True)
    state = SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(zero_stage=deepspeed_stage) if deepspeed_stage else None,
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version, reshard_after_forward=reshard) if fsdp_version else None,
    )
    accelerator = SimpleNamespace(state=state, num_processes=2)
    if refused is None:
        check_parallelism(accelerator, **options)
        return
    with pytest.raises(NotImplementedError, match=refused):
        check_parallelism(accelerator, **options)


def test_forgetting_meter_over_two_processes_equals_one_process(two_process_run, tmp_path):
    """Each process measures its share of the meter's prompts; the reduced value is the one-process value."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, out, (main, other) = two_process_run
    final = [e for e in main["log_history"] if "retention_kl" in e and e.get("tms_phase") == 2][-1]
    assert final["step"] == 6 and final["retention_kl"] > 0
    assert [e for e in other["log_history"] if "retention_kl" in e][-1]["retention_kl"] == final["retention_kl"]
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), os.path.join(out, "student"),
                                        is_trainable=True)
    trainer = TMSTrainer(
        model=student, args=worker.config(str(tmp_path)), train_dataset=worker.TRAIN,
        processing_class=load_tokenizer(model),
    )
    trainer.retention_callback.start(trainer.state)
    # The reference's log-probs come from the batched generation of its answers, whose rows and padding differ between
    # one process and two: equal up to float rounding (6e-5 relative seen), not bit for bit.
    assert trainer.retention_callback.measure()["retention_kl"] == pytest.approx(final["retention_kl"], rel=1e-3)
