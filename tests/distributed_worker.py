"""Run by tests/test_distributed.py, under `accelerate launch` or as one plain process.

    distributed_worker.py train MODEL OUT      a whole TMS run; every process writes OUT/rank-<i>.json
    distributed_worker.py online MODEL OUT     the same with `tms_mode="online"` (and online-drawn, sampling the drawn pairs)
    distributed_worker.py zero2 MODEL OUT      `train` under DeepSpeed ZeRO-2 (launched with a DeepSpeed config)
    distributed_worker.py zero2-online MODEL OUT
    distributed_worker.py zero3 MODEL OUT      `train` under DeepSpeed ZeRO-3 (and zero3-online)
    distributed_worker.py fsdp2 MODEL OUT      `train` under FSDP2 (and fsdp2-online)
    distributed_worker.py one-process-batch-8 MODEL OUT   `train` in one process on the global batch of two
    distributed_worker.py generate MODEL OUT   trajectories of the snapshots in OUT/history, into OUT/regenerated.json
    distributed_worker.py rank-verifier MODEL OUT   `drawn` with a verifier whose answers depend on the process
"""

import hashlib
import json
import os
import sys
from functools import partial

import torch
from accelerate import PartialState
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

import trl_tms.trajectories as trajectories_module
from trl_tms import AdapterHistory, TMSConfig, TMSTrainer
from trl_tms.history import adapter_parameters
from trl_tms.sharding import gathered, whole
from trl_tms.generation import SamplingParams
from trl_tms.trajectories import generate_trajectories

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
TRAIN, EVAL = make_examples(24, seed=0), make_examples(7, seed=1)  # 7: uneven across two processes on purpose


def config(out: str, **overrides) -> TMSConfig:
    values = dict(
        output_dir=os.path.join(out, "student"), history_dir=os.path.join(out, "history"), num_checkpoints=3,
        per_device_train_batch_size=4, per_device_eval_batch_size=2, num_train_epochs=2, learning_rate=1e-2,
        # 5 prompts (x 2 snapshots x 2 samples) per `generate` call: 5 batches of prompts, 3 on one process and 2 on
        # the other, as a sharded engine's generation must allow.
        max_new_tokens=6, samples_per_checkpoint=2, snapshots_per_generate=2, generation_batch_size=20,
        logging_steps=1, seed=7, trajectories_to_generate="all", tms_mode="two_pass", label_weight=0.25, log_pld=True,
        **QUIET_CPU,
    )
    return TMSConfig(**{**values, **overrides})


def trajectory_rows(trajectories) -> list:
    columns = ("prompt_index", "snapshot_step", "sample_index", "completion", "finished")
    return [list(row) for row in zip(*(trajectories[c] for c in columns))]


def digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def count_sampled_rows() -> list[int]:
    """Counts the trajectories this process samples (every `generate` call of them goes through one function)."""
    rows, sample = [0], trajectories_module._generate_samples

    def counting(*args, **kwargs):
        tokens = sample(*args, **kwargs)
        rows[0] += len(tokens)
        return tokens

    trajectories_module._generate_samples = counting
    return rows


class LiveWeights(TrainerCallback):
    """The adapter's weights as this process holds them after every optimizer step, by phase."""

    def __init__(self):
        self.trainer, self.weights = None, {}

    def on_step_end(self, args, state, control, **kwargs):
        params = adapter_parameters(self.trainer.model, self.trainer.adapter_name)
        with gathered(params.values()):  # whole weights where ZeRO-3 partitions them (or FSDP2 shards them)
            self.weights[(self.trainer.phase, state.global_step)] = {
                n: whole(p).detach().clone() for n, p in params.items()
            }


def snapshot_differences(trainer, live: LiveWeights) -> dict[int, float]:
    """Largest difference between each snapshot on disk and the weights this process held at its step."""
    history = AdapterHistory.open(trainer.history_dir)
    phase = "online" if trainer.args.tms_mode == "online" else "harvest"
    differences = {}
    for step in history.steps:
        if (phase, step) not in live.weights:
            continue  # online TMS's step-0 snapshot (before any step), or one taken before a resumed run started
        snapshot, weights = history[step], live.weights[(phase, step)]
        slots = AdapterHistory.slot_parameters(trainer.model, trainer.adapter_name)
        names = {id(p): n for n, p in adapter_parameters(trainer.model, trainer.adapter_name).items()}
        differences[step] = max(
            (snapshot[key] - weights[names[id(param)]]).abs().max().item() for key, param in slots.items()
        )
    return differences


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    """Interrupts a run at the end of one step of one phase (after its checkpoint, if one is due)."""

    def __init__(self, phase: str, step: int):
        self.trainer, self.phase, self.step = None, phase, step

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.phase == self.phase and state.global_step == self.step:
            raise Interrupt(f"{self.phase} stopped at step {self.step}")


class RankVerifier:
    """A verifier answering differently on each process: it keeps the completions whose length has its rank's parity."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, completion: str, label: str) -> bool:
        self.calls += 1
        return (len(completion) + PartialState().process_index) % 2 == 0


def train(model_path: str, out: str, resume: bool = False, stop_at: tuple[str, int] | None = None, verifier=None,
          **overrides) -> None:
    sampled_here = count_sampled_rows()
    live = LiveWeights()
    stop = StopAt(*stop_at) if stop_at else None
    trainer = TMSTrainer(
        model=model_path, args=config(out, **overrides), train_dataset=TRAIN, eval_dataset=EVAL,
        processing_class=load_tokenizer(model_path), peft_config=LoraConfig(**LORA),
        callbacks=[live] + ([stop] if stop else []), verifier=verifier,
    )
    live.trainer = trainer
    if stop:
        stop.trainer = trainer
        try:
            trainer.train()
        except Interrupt:
            return  # as a crash would leave it, on every process
        raise AssertionError(f"the run was not interrupted at {stop_at}")
    trainer.train(resume_from_checkpoint=True if resume else None)
    state = PartialState()
    rows = trajectory_rows(trainer.trajectories)
    summary = {
        "num_processes": state.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_trajectories": len(rows),
        "sampled_here": sampled_here[0],
        "trajectories_digest": digest(rows),
        "log_history": trainer.state.log_history,
        "history_steps": trainer.history.steps,
        "history_directory": trainer.history.directory,
        "snapshot_differences": snapshot_differences(trainer, live),
        "verifier_calls": getattr(verifier, "calls", None),
    }
    if trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        summary["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
        summary["engine"] = type(engine).__name__
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        if summary["zero_stage"] == 3:
            # ZeRO-3 keeps this process's partition of every weight: the parameter itself is empty.
            summary["partition_numel"] = sum(p.ds_tensor.numel() for p in trainable)
            summary["trainable_numel"] = sum(p.ds_numel for p in trainable)
            summary["local_numel"] = sum(p.numel() for p in trainable)
        else:
            # ZeRO-2 keeps this process's partition of the fp32 master weights (and their optimizer state) only.
            summary["partition_numel"] = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
            summary["trainable_numel"] = sum(p.numel() for p in trainable)
    if trainer.is_fsdp_enabled:
        lora = [p for n, p in trainer.model.named_parameters() if "lora_A" in n]
        summary["dtensor_placements"] = sorted({str(p.placements) for p in lora if hasattr(p, "placements")})
        summary["local_rows"] = [p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0] for p in lora][:1]
        summary["global_rows"] = [p.shape[0] for p in lora][:1]
        summary["fsdp_version"] = trainer.accelerator.state.fsdp_plugin.fsdp_version
    trainer.save_model()  # on every process: under ZeRO-3 and FSDP2 it gathers the weights (the main process writes)
    if state.is_main_process:
        summary["trajectories"] = rows
    with open(os.path.join(out, f"rank-{state.process_index}.json"), "w") as f:
        json.dump(summary, f)


def generate(model_path: str, out: str) -> None:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), LoraConfig(**LORA))
    state = PartialState(cpu=True)
    trajectories = generate_trajectories(
        model, load_tokenizer(model_path), TRAIN, AdapterHistory.open(os.path.join(out, "history")),
        SamplingParams.from_config(config(out)), chat_template=None, disable_tqdm=True,
        process_index=state.process_index, num_processes=state.num_processes,
    )
    if state.is_main_process:
        with open(os.path.join(out, "regenerated.json"), "w") as f:
            json.dump(trajectory_rows(trajectories), f)


def deepspeed_train(model_path: str, out: str, **overrides) -> None:
    """
    `train` under the DeepSpeed config (ZeRO-2 or ZeRO-3) `accelerate launch` was given. On CPU, DeepSpeed needs a gloo
    process group made before the config, kept by the Trainer (`use_configured_state`), and `use_cpu` off (a test-only
    setup: on GPUs plain `accelerate launch` with NCCL needs none of this).
    """
    PartialState(backend="gloo")
    train(model_path, out, use_cpu=False, accelerator_config={"use_configured_state": True}, **overrides)


def fsdp2_train(model_path: str, out: str, **overrides) -> None:
    """
    `train` under the FSDP2 config `accelerate launch` was given. accelerate enables FSDP only for GPU states: a
    test-only patch lets it see its MULTI_CPU state as MULTI_GPU when an FSDP plugin is given (tied to accelerate
    1.15, as in shared/recipes/sharded-cpu); the model then really is sharded across the two CPU processes (gloo).
    """
    import accelerate.state as accelerate_state
    from accelerate.utils import DistributedType

    original = accelerate_state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        shared = accelerate_state.PartialState._shared_state
        if shared.get("distributed_type") == DistributedType.MULTI_CPU and kwargs.get("fsdp_plugin") is not None:
            shared["distributed_type"] = DistributedType.MULTI_GPU
        original(self, *args, **kwargs)

    accelerate_state.AcceleratorState.__init__ = init
    train(model_path, out, **overrides)


if __name__ == "__main__":
    modes = {
        "train": train,
        "online": partial(train, tms_mode="online"),
        "drawn": partial(train, trajectories_to_generate="drawn"),
        "online-drawn": partial(train, tms_mode="online", trajectories_to_generate="drawn"),
        "generate": generate,
        "rank-verifier": partial(train, trajectories_to_generate="drawn", trajectory_filter="verifier",
                                 verifier=RankVerifier()),
        "zero2": deepspeed_train,
        "zero2-online": partial(deepspeed_train, tms_mode="online"),
        # Two-pass TMS under ZeRO-3 needs gradient checkpointing off (TMSTrainer says so); online TMS keeps it on.
        "zero3": partial(deepspeed_train, gradient_checkpointing=False),
        "zero3-online": partial(deepspeed_train, tms_mode="online"),
        # Interrupted after the harvest's checkpoint at step 4, then resumed (checkpoints every 2 steps).
        "zero2-interrupted": partial(deepspeed_train, stop_at=("harvest", 4), save_strategy="steps", save_steps=2),
        "zero2-resumed": partial(deepspeed_train, resume=True, save_strategy="steps", save_steps=2),
        "zero3-interrupted": partial(deepspeed_train, stop_at=("harvest", 4), save_strategy="steps", save_steps=2,
                                     gradient_checkpointing=False),
        "zero3-resumed": partial(deepspeed_train, resume=True, save_strategy="steps", save_steps=2,
                                 gradient_checkpointing=False),
        "fsdp2": fsdp2_train,
        "fsdp2-online": partial(fsdp2_train, tms_mode="online"),
        "fsdp2-interrupted": partial(fsdp2_train, stop_at=("harvest", 4), save_strategy="steps", save_steps=2),
        "fsdp2-resumed": partial(fsdp2_train, resume=True, save_strategy="steps", save_steps=2),
        # The reference of the two-process runs: one process on their global batch.
        "one-process-batch-8": partial(train, per_device_train_batch_size=8),
    }
    modes[sys.argv[1]](sys.argv[2], sys.argv[3])
