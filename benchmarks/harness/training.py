"""Training an arm: its trainer built from its declared settings, its adapter kept at chosen steps.

`train_run` trains one `registry.ARMS` arm on a regime; `CaptureAdapter` copies the trainable weights at the steps
the probes will measure; the `tms` run's history can be rebuilt for its students (`rebuild_history`).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from transformers import TrainerCallback

from . import formats, models, registry
from .registry import ARMS, BATCH_SIZE, SDFT_TEMPLATE, reuses_history
from .trajectory_quality import trajectory_quality


class CaptureAdapter(TrainerCallback):
    """
    Copies the trainable weights at chosen steps. `phases` maps a name to the TMS phase whose steps it keeps (the
    trainer's `phase`: `"harvest"`, `"student"`, `"online"`; `None` for a plain trainer's run); the copies are in
    `weights[name][step]`.
    """

    def __init__(self, trainer, steps, phases: dict):
        self.trainer, self.steps, self.phases = trainer, set(steps), phases
        self.weights = {name: {} for name in phases}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in self.steps:
            return
        for name, phase in self.phases.items():
            if getattr(self.trainer, "phase", None) == phase:
                self.weights[name][state.global_step] = {
                    n: p.detach().to("cpu", copy=True) for n, p in self.trainer.model.named_parameters()
                    if p.requires_grad
                }


class Progress(TrainerCallback):
    """One line per quarter of a run's steps in the log (the study's trainers run without progress bars)."""

    def __init__(self, label: str):
        self.label, self.started = label, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step % max(1, state.max_steps // 4) == 0:
            print(f"{self.label}: step {state.global_step}/{state.max_steps}, "
                  f"{time.perf_counter() - self.started:.0f} s", flush=True)


def load_weights(model, weights: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_model(regime: dict | None = None):
    """The regime's model and tokenizer (`models.family`: the embedded SmolLM2 unless the regime names another)."""
    return models.family(regime).load()


def planned_steps(regime: dict, num_train: int) -> int:
    return -(-num_train // BATCH_SIZE) * regime["epochs"]


def common_args(regime: dict, seed: int, steps: int, lr_scale: float = 1.0) -> dict:
    return dict(
        per_device_train_batch_size=BATCH_SIZE, num_train_epochs=regime["epochs"],
        learning_rate=regime["learning_rate"] * lr_scale, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=max(1, steps // 8), save_strategy="no", report_to="none", seed=seed, disable_tqdm=True,
        gradient_checkpointing=False, use_cpu=True, bf16=False, per_device_eval_batch_size=16,
    )


def lora_config(regime: dict):
    from peft import LoraConfig

    return LoraConfig(r=regime["lora_r"], lora_alpha=2 * regime["lora_r"], lora_dropout=0.0, target_modules="all-linear")


def tms_trainer(model, tokenizer, regime: dict, out: str, history_dir: str | None, train, pld_set, settings: dict):
    """A `TMSTrainer` with the study's generation settings and the arm's `settings` (TMSConfig fields)."""
    from trl_tms import TMSConfig, TMSTrainer

    # Every trajectory is sampled, as in the arms measured before `trajectories_to_generate="drawn"` existed: one
    # procedure (and one generation cost) across the table. The arms were declared when the paper's two-pass TMS was
    # the package's default, and PLD was logged by default: the paper's recipe and `log_pld=True` keep their unset
    # fields meaning what they meant.
    config = TMSConfig(out, pld_num_samples=len(pld_set), max_new_tokens=registry.TASK_TOKENS, generation_batch_size=64,
                       temperature=1.0, history_dir=history_dir, log_retention=False, max_length=registry.TASK_TOKENS + 160,
                       **{"trajectories_to_generate": "all", "recipe": "paper", "log_pld": True, **settings})
    return TMSTrainer(model=model, args=config, train_dataset=train, eval_dataset=pld_set, processing_class=tokenizer,
                      peft_config=lora_config(regime))


def train_run(arm: str, regime: dict, seed: int, train, pld_set, workdir: str, history_dir: str, capture_steps,
              tms_overrides: dict, reuse: bool | None = None) -> dict:
    """
    Train one arm; returns `{arm name: {"wall_seconds": by phase, "weights": {step: trainable weights}}}` (one entry,
    or two for `tms`, whose harvest is also the `sft` arm), the trained model and its tokenizer. `reuse=True` trains
    only the student of a two-pass TMS arm on the harvest and trajectories already in `history_dir`.
    """
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    kind, settings = ARMS[arm].method, dict(ARMS[arm].settings)
    prompt_format = models.family(regime).prompt_format
    if prompt_format == "plain" and (kind == "sdft" or settings.get("rehearsal_weight")):
        # SDFT's teacher prompt and the rehearsal answers to everyday prompts are written as chat turns.
        raise ValueError(f"Arm {arm!r} needs a chat template; the regime's model reads plain prompts. Pick another arm.")
    is_correct = formats.verifier(prompt_format)
    steps = planned_steps(regime, len(train))
    common = common_args(regime, seed, steps, settings.pop("lr_scale", 1.0))
    model, tokenizer = load_model(regime)
    out = os.path.join(workdir, arm)
    online = settings.get("tms_mode") == "online"
    rehearsal_seconds = 0.0
    if kind == "sft":
        rehearsal_weight, data = settings.pop("rehearsal_weight", 0.0), train
        if rehearsal_weight:
            from trl_tms import mix_in_rehearsal, self_rehearsal_dataset

            begun = time.perf_counter()
            answers = self_rehearsal_dataset(model, tokenizer, max_new_tokens=registry.TASK_TOKENS)
            data = mix_in_rehearsal(train, answers, rehearsal_weight, seed=seed)
            rehearsal_seconds = time.perf_counter() - begun
            # SFT's optimizer steps, a `rehearsal_weight` share of their rows rehearsal answers (TMS's beta does the same).
            common.pop("num_train_epochs")
            settings["max_steps"] = steps
        trainer = SFTTrainer(model=model, args=SFTConfig(out, max_length=registry.TASK_TOKENS + 160, **settings, **common),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora_config(regime))
        phases = {arm: None}
    elif kind == "grpo":
        def reward(completions, answer, **kwargs):
            return [float(is_correct(c[-1]["content"] if isinstance(c, list) else c, a)) for c, a in zip(completions, answer)]

        # A GRPO step trains on BATCH_SIZE * 2 completions: 8 prompts' worth with 4 samples each would be 32, too
        # slow on CPU; 4 prompts x 4 samples per step, for the same number of optimizer steps.
        common.pop("num_train_epochs")
        config = GRPOConfig(out, max_steps=steps, num_generations=settings["num_generations"],
                            max_completion_length=registry.TASK_TOKENS, **{**common, "per_device_train_batch_size": 16})
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config,
                              train_dataset=train.remove_columns("completion"), processing_class=tokenizer,
                              peft_config=lora_config(regime))
        phases = {arm: None}
    elif kind == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        common.pop("num_train_epochs")
        config = SDFTConfig(out, max_steps=steps, num_generations=settings["num_generations"],
                            max_completion_length=registry.TASK_TOKENS, teacher_prompt_template=SDFT_TEMPLATE,
                            # TRL's default top-100 (a test's tiny vocabulary has fewer tokens).
                            distillation_topk=min(100, model.config.vocab_size), **common)
        # The teacher sees the worked answer (the SFT label) as privileged context; the student never does.
        demonstrations = train.map(lambda row: {"privileged_context": row["completion"][-1]["content"]})
        trainer = SDFTTrainer(model=model, args=config, train_dataset=demonstrations.remove_columns("completion"),
                              processing_class=tokenizer, peft_config=lora_config(regime))
        phases = {arm: None}
    else:
        if settings.pop("snapshot_every_epoch", False):
            settings["online_snapshot_every"] = -(-len(train) // BATCH_SIZE)
        if not online:
            settings.update(tms_overrides)
        settings.update(regime.get("tms_settings", {}))  # what the regime's model needs of every TMS arm
        # Only the `tms` run and its students share `history_dir`; other TMS runs keep their history in `out`.
        on_tms_history = arm == "tms" or reuses_history(arm)
        trainer = tms_trainer(model, tokenizer, regime, out, history_dir if on_tms_history else None, train, pld_set,
                              {**settings, **common})
        phases = {arm: "online"} if online else {"sft": "harvest", arm: "student"} if arm == "tms" else {arm: "student"}
    capture = CaptureAdapter(trainer, capture_steps, phases)
    trainer.add_callback(capture)
    trainer.add_callback(Progress(f"[{arm} s{seed}]"))
    if reuse is None:
        reuse = reuses_history(arm) and os.path.isfile(os.path.join(history_dir, "tms_run.json"))
    if reuse:
        phases.pop("sft", None)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=True if reuse else None)
    total = time.perf_counter() - started
    walls = {}
    if kind != "tms":
        walls[arm] = {"train": output.metrics["train_runtime"], "total": total + rehearsal_seconds}
        if rehearsal_seconds:
            walls[arm]["rehearsal_answers"] = rehearsal_seconds
    elif online:
        walls[arm] = {"online": output.metrics["train_runtime"], "trajectories": trainer.stats.seconds, "total": total}
    else:
        student = output.metrics["train_runtime"]
        if reuse:
            walls[arm] = {"student": student, "reused_history": True, "total": total}
            if trainer.stats.rehearsal_seconds:
                walls[arm]["rehearsal_answers"] = trainer.stats.rehearsal_seconds
        else:
            harvest = trainer.harvest_output.metrics["train_runtime"]
            if "sft" in phases:
                walls["sft"] = {"train": harvest, "total": harvest}
            walls[arm] = {"harvest": harvest, "trajectories": trainer.stats.seconds, "student": student, "total": total}
    runs = {name: {"wall_seconds": walls[name], "weights": capture.weights[name]} for name in phases}
    if kind == "tms" and "answer" in train.column_names:
        runs[arm]["trajectory_quality"] = trained_on(trainer, train["answer"], train["completion"])
    return runs, trainer.model, tokenizer


def trained_on(trainer, answers: list[str], labels: list) -> dict:
    """
    What a TMS arm's student drew from: per snapshot, the share of trajectories right, cut off, kept, and copies of
    their label.
    """
    quality = trajectory_quality(trainer.trajectories, answers, labels)
    for step, q in quality["by_step"].items():
        q["kept"] = trainer.stats.kept_fraction.get(int(step))
    quality["all"]["kept"] = trainer.stats.kept / trainer.stats.trajectories if trainer.stats.trajectories else None
    return quality


class StopStudent(TrainerCallback):
    """Ends a TMS run after the student's first step: what `rebuild_history` needs is already on disk."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.phase == "student":
            control.should_training_stop = True


def rebuild_history(regime: dict, seed: int, train, pld_set, scratch: str, history_dir: str, tms_overrides: dict):
    """Harvest and trajectories of the `tms` arm into `history_dir`, for its students, without its student run."""
    settings = {**ARMS["tms"].settings, **tms_overrides, **regime.get("tms_settings", {})}
    steps = planned_steps(regime, len(train))
    with tempfile.TemporaryDirectory(dir=scratch) as out:
        model, tokenizer = load_model(regime)
        trainer = tms_trainer(model, tokenizer, regime, out, history_dir, train, pld_set,
                              {**settings, **common_args(regime, seed, steps)})
        trainer.add_callback(StopStudent(trainer))
        trainer.train()


def final_path(scratch: str, regime: str, arm: str, seed: int) -> str:
    return os.path.join(scratch, "finals", regime, f"{arm}_s{seed}.safetensors")


def save_final(scratch: str, regime: str, arm: str, seed: int, weights: dict) -> None:
    """Keep a run's final adapter weights in scratch space, so that a probe added later needs no re-training."""
    from safetensors.torch import save_file

    path = final_path(scratch, regime, arm, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


