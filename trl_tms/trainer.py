from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import tempfile
import textwrap
import time
from functools import partial

import torch
from datasets import concatenate_datasets, load_from_disk
from peft import LoraConfig, PeftModel
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import get_config_model_id

from .config import TMSConfig
from .data import to_prompt_completion
from .history import AdapterHistory, adapter_parameters
from .hub import complete_model_card, push_history, resolve_base_model
from .filters import keep_flags, kept_by_snapshot
from .mixture import (
    IS_LABEL,
    MixtureCollator,
    MixtureDataset,
    end_of_turn_ids,
    mixture_candidates,
    truncate_unfinished,
)
from .pld import PLDCallback, label_nll
from .quantization import keep_4bit_layers_trainable
from .resume import (
    RUN_FILE,
    dataset_digest,
    differences,
    is_inside,
    latest_checkpoint,
    lora_summary,
    model_summary,
    read_run,
    write_run,
)
from .trajectories import SamplingParams, fitted_max_new_tokens, generate_trajectories, save_trajectories
from .vllm_generation import check_vllm_available, check_vllm_servable, generate_trajectories_vllm

logger = logging.get_logger(__name__)

PHASE_IDS = {"harvest": 1, "student": 2, "online": 3}
TRAJECTORY_PARTS = "trajectory-parts"
VLLM_DIR = "vllm"


def snapshot_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """`num_checkpoints` optimizer steps spread evenly over `total_steps`, the last one being the final step."""
    return [k * total_steps // num_checkpoints for k in range(1, num_checkpoints + 1)]


def online_snapshot_steps(total_steps: int, num_checkpoints: int, every: int | None = None) -> list[int]:
    """Online TMS: steps 0, `every`, 2 `every`, ... or, by default, `num_checkpoints` steps spread evenly from step 0."""
    if every:
        return list(range(0, total_steps, every))
    return sorted({k * total_steps // num_checkpoints for k in range(num_checkpoints)})


class TMSTrainer(SFTTrainer):
    """
    Trainer for Trajectory-Mixed Supervision (TMS): reward-free, on-policy SFT (arXiv 2602.03073).

    A drop-in replacement for [`~trl.SFTTrainer`] (same constructor, same dataset formats that carry a prompt) whose
    `train()` runs the three phases of TMS:

    1. **harvest**: ordinary SFT of a LoRA adapter on the labels, taking `num_checkpoints` adapter snapshots evenly
       over the run into an [`AdapterHistory`] (written under `history_dir`);
    2. **trajectories**: every snapshot, hot-swapped into a spare adapter slot of the same model, samples
       `samples_per_checkpoint` completions for every training prompt;
    3. **student**: the adapter restarts from its initial weights, with a fresh optimizer and schedule, and trains for
       the same number of steps on the mixture: each time an example is drawn, its label with probability
       `label_weight`, else one of its trajectories, uniformly over snapshots.

    With an `eval_dataset`, Policy-Label Divergence (`pld`, `pld_drift`) is logged in both phases. Log entries carry
    `tms_phase` (1 = harvest, 2 = student); `trainer.state.log_history` holds both phases after `train()`.

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as for [`~trl.SFTTrainer`]. Needs a LoRA adapter: pass `peft_config` or a `PeftModel`.
        args ([`TMSConfig`], *optional*):
            Configuration. An [`~trl.SFTConfig`] or [`~transformers.TrainingArguments`] is converted with TMS defaults.
        train_dataset ([`~datasets.Dataset`]):
            Prompt-completion (standard or conversational) or conversational `"messages"` dataset, whose last
            assistant turn is the label.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Held-out labelled examples in the same formats; used for evaluation and PLD.
        peft_config ([`~peft.LoraConfig`], *optional*):
            LoRA configuration used to wrap the model.
        verifier (`Callable`, *optional*):
            With `trajectory_filter="verifier"`: `verifier(prompt, completion, label) -> bool | float`, given a
            training prompt (as in the dataset) and the texts of a trajectory and of the prompt's label; trajectories
            scoring below `min_verifier_score` are left out. Default: same final number as the label.
        answer_extractor (`Callable`, *optional*):
            With `trajectory_filter="self_consistency"`: `answer_extractor(text) -> str | None`, the final answer of a
            trajectory. Default: its final number (after the last `####` if any).

    The other arguments (`data_collator`, `processing_class`, `compute_metrics`, `callbacks`,
    `optimizer_cls_and_kwargs`, `preprocess_logits_for_metrics`, `quantization_config`, ...) are those of
    [`~trl.SFTTrainer`]. Not supported: `formatting_func` (it turns prompts into plain text) and ready-made `optimizers`
    instances (the student needs a fresh optimizer; pass `optimizer_cls_and_kwargs` instead).
    """

    _tag_names = ["trl", "sft", "tms"]
    _name = "TMS"
    _paper = {
        "title": "TMS: Trajectory-Mixed Supervision for Reward-Free, On-Policy SFT",
        "id": "2602.03073",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{khan2026tms,
                title        = {{TMS: Trajectory-Mixed Supervision for Reward-Free, On-Policy SFT}},
                author       = {Khan and Liu and Tan and Fleming and Chen},
                year         = 2026,
                eprint       = {arXiv:2602.03073}
            }"""),
    }

    def __init__(
        self,
        model,
        args: TMSConfig | SFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        verifier=None,
        answer_extractor=None,
    ):
        args = _as_tms_config(args, model)
        for name, function in (("verifier", verifier), ("answer_extractor", answer_extractor)):
            if function is not None and not callable(function):
                raise TypeError(f"`{name}` must be a callable, got {type(function).__name__}.")
        self.verifier, self.answer_extractor = verifier, answer_extractor
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        if formatting_func is not None:
            raise ValueError(
                "`formatting_func` is not supported by TMSTrainer: it turns examples into plain text, and TMS needs the "
                "prompt apart from the label to generate trajectories. Format the dataset into prompt-completion "
                "columns beforehand."
            )
        if optimizers != (None, None):
            raise ValueError(
                "TMSTrainer trains twice (harvest, then student) and the student needs a fresh optimizer and "
                "schedule, so ready-made `optimizers` instances cannot be reused. Pass `optimizer_cls_and_kwargs` or "
                "set `optim` / `lr_scheduler_type` in the config."
            )
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            raise ValueError(
                "`dataset_kwargs={'skip_prepare_dataset': True}` is not supported: TMS reads the prompts and labels "
                "from an untokenized dataset."
            )
        _check_lora(model, peft_config)
        if args.generation_backend == "vllm":
            check_vllm_available()
        if args.process_index == 0:  # fail now, not hours later at the first snapshot or checkpoint
            _check_writable(args.output_dir, "output_dir")
            _check_writable(args.history_dir or os.path.join(args.output_dir, "_tms_history"), "history_dir")
        if isinstance(model, str):  # TRL ignores `quantization_config` for a model that is already loaded
            _check_quantization(quantization_config or (args.model_init_kwargs or {}).get("quantization_config"))

        train_dataset = to_prompt_completion(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: to_prompt_completion(ds, f"eval ({key})") for key, ds in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = to_prompt_completion(eval_dataset, "eval")
        self._prompts = train_dataset
        self.phase: str | None = None

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=None,
        )

        _check_parallelism(self.accelerator)
        if args.generation_backend == "vllm":
            if self.accelerator.num_processes > 1:
                raise NotImplementedError(
                    "`generation_backend='vllm'` runs one engine in one process; with several processes use "
                    "`generation_backend='transformers'` (the prompts are then shared out across processes)."
                )
            check_vllm_servable(self.model, self.model.active_adapter)
        self._check_label_tokens_left(train_dataset)
        keep_4bit_layers_trainable(self.model)  # TMS generates, then trains, on the same (maybe 4-bit) base
        self.adapter_name = self.model.active_adapter
        self._initial_adapter = {
            name: param.detach().clone() for name, param in adapter_parameters(self.model, self.adapter_name).items()
        }
        self.history_dir = args.history_dir or os.path.join(args.output_dir, "_tms_history")
        self.history = AdapterHistory(
            self.model.peft_config[self.adapter_name],
            directory=self.history_dir if self.is_world_process_zero() else None,
            background_writes=True,
        )
        self.trajectories = None
        self.stats: dict[str, float] = {}
        self._end_of_turn: list[int] | None = None  # what the SFT preprocessing appends to a completion
        self.max_new_tokens = args.max_new_tokens
        if args.max_new_tokens_from_labels is not None:
            self.max_new_tokens = fitted_max_new_tokens(
                self._tokenizer, self._prompts, args.max_new_tokens_from_labels, args.max_new_tokens
            )

        planned = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        self._planned_steps = planned
        if args.num_checkpoints > planned:
            raise ValueError(
                f"`num_checkpoints` ({args.num_checkpoints}) exceeds the number of optimizer steps of the harvest run "
                f"({planned}). Lower `num_checkpoints`, or train longer (more epochs or data, or a smaller batch)."
            )
        self.add_callback(_PhaseCallback(self))
        self.pld_callback = None
        if args.log_pld and self.eval_dataset is not None:
            self.pld_callback = PLDCallback(
                self,
                num_samples=args.pld_num_samples,
                drift_threshold=args.pld_drift_threshold,
                stop_on_drift=args.pld_stop_on_drift,
            )
            self.add_callback(self.pld_callback)

    def _check_label_tokens_left(self, raw_dataset) -> None:
        """TRL silently drops examples whose label was truncated away; say so, and refuse when none is left."""
        kept, total = len(self.train_dataset), len(raw_dataset)
        if kept == total:
            return
        message = (
            f"{total - kept} of {total} training examples have no label tokens left after truncation to "
            f"`max_length={self.args.max_length}` (their prompts are that long or longer)"
        )
        if kept == 0:
            raise ValueError(f"{message}, so there is nothing to train on. Raise `max_length` or shorten the prompts.")
        logger.warning(f"{message}: they are left out of both phases. Raise `max_length` to keep them.")

    # The three phases

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        Run harvest, trajectories and student; returns the student run's `TrainOutput`.

        Args:
            resume_from_checkpoint (`bool` or `str`, *optional*):
                Continue an interrupted run of the same settings (same `history_dir`) instead of starting over: phases
                that finished are reused from the history folder (snapshots, trajectories), an interrupted generation
                keeps the groups of snapshots it had sampled, and the harvest and the student restart from their last
                Trainer checkpoint (`<history_dir>/harvest/checkpoint-*` and `<output_dir>/checkpoint-*`, written
                according to `save_strategy`). `True` finds all of this on disk; a checkpoint path resumes that phase
                from that checkpoint.
        """
        if self.args.tms_mode == "online":
            return self._train_online(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        args = self.args
        user_output_dir, user_max_steps, user_push = args.output_dir, args.max_steps, args.push_to_hub
        harvest_dir = os.path.join(self.history_dir, "harvest")
        run = self._start_run(resume_from_checkpoint)
        try:
            # Harvest checkpoints are not the result: keep them beside the history, out of `output_dir`'s top level,
            # and off the Hub.
            if run.get("harvest_done"):
                self._reopen_history(run["snapshot_steps"])
                self.harvest_output = None
            else:
                checkpoint = self._checkpoint_for(resume_from_checkpoint, harvest_dir)
                if checkpoint is not None:
                    planned = snapshot_steps(run["planned_steps"], args.num_checkpoints)
                    self._reopen_history([step for step in planned if step <= _checkpoint_step(checkpoint)])
                args.output_dir, args.push_to_hub = harvest_dir, False
                self.phase = "harvest"
                self.harvest_output = super().train(
                    resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
                )
                args.output_dir, args.push_to_hub = user_output_dir, user_push
                run.update(
                    harvest_done=True,
                    harvest_steps=self.state.global_step,
                    harvest_log=self.state.log_history,
                    snapshot_steps=self.history.steps,
                )
                self._save_run(run)
            harvest_log, harvest_steps = run["harvest_log"], run["harvest_steps"]

            self.phase = "trajectories"
            started = time.perf_counter()
            self.trajectories = self._generate_trajectories(reuse=run.get("trajectories_done", False))
            self.stats["trajectory_seconds"] = run.get("trajectory_seconds", time.perf_counter() - started)
            if not run.get("trajectories_done"):
                run.update(trajectories_done=True, trajectory_seconds=self.stats["trajectory_seconds"])
                self._save_run(run)

            self.phase = "student"
            checkpoint = self._checkpoint_for(resume_from_checkpoint, user_output_dir)
            self._prepare_student()
            args.max_steps = harvest_steps
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            args.output_dir, args.max_steps, args.push_to_hub = user_output_dir, user_max_steps, user_push
            self.phase = None
        self.state.log_history = harvest_log + self.state.log_history
        return output

    def _train_online(self, resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs):
        """
        Online TMS: one run. Every `online_snapshot_every` steps, from step 0, the adapter is snapshotted and samples a
        trajectory for every prompt; the mixture draws from the last `num_checkpoints` snapshots taken so far.
        """
        args = self.args
        run = self._start_run(resume_from_checkpoint)
        checkpoint = self._checkpoint_for(resume_from_checkpoint, args.output_dir)
        self._online_steps = online_snapshot_steps(run["planned_steps"], args.num_checkpoints, args.online_snapshot_every)
        self._use_mixture(mixture_candidates(self._prompts, None)[0])
        self._online_trajectories = []
        # A finished run resumed again: its trajectories are on disk (the parts are removed when a run finishes).
        saved = os.path.join(self.history_dir, "trajectories")
        finished = run.get("trajectories_done") and os.path.isdir(saved)
        self._finished_trajectories = load_from_disk(saved) if finished else None
        self.stats = {
            "trajectory_seconds": 0.0,
            "trajectories": 0,
            "empty_trajectories": 0,
            "unfinished_trajectories": 0,
            "kept_trajectories": 0,
        }
        self.phase = "online"
        try:
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            self.phase = None
        self.trajectories = concatenate_datasets(self._online_trajectories)
        if self.is_world_process_zero():
            save_trajectories(self.trajectories, os.path.join(self.history_dir, "trajectories"))
            shutil.rmtree(os.path.join(self.history_dir, TRAJECTORY_PARTS), ignore_errors=True)
        run.update(
            online_done=True,
            trajectories_done=True,
            snapshot_steps=self.history.steps,
            trajectory_seconds=self.stats["trajectory_seconds"],
        )
        self._save_run(run)
        return output

    def _refresh_online(self, step: int, take: bool = True) -> None:
        """
        Online TMS: snapshot the adapter at `step` and add its trajectories to the mixture. A resumed run passes
        `take=False` for the snapshots taken before it stopped (on disk, and logged in the checkpoint's log history).
        """
        if take:
            self.history.take(self.model, step, self.adapter_name)
        started = time.perf_counter()
        if not take and self._finished_trajectories is not None:
            trajectories = self._finished_trajectories.filter(
                lambda s: s == step, input_columns="snapshot_step", keep_in_memory=True  # no cache file in the history
            )
        else:
            trajectories = self._sample(steps=[step])
        seconds = time.perf_counter() - started
        self._online_trajectories.append(trajectories)
        keep = self._keep_flags(trajectories)
        candidates, empty = mixture_candidates(self._prompts, trajectories, with_labels=False, keep=keep)
        window = set(self.history.steps[-self.args.num_checkpoints :])
        if len(candidates):
            self.train_dataset.extend(self._tokenize_candidates(candidates, "trajectories"), keep_steps=window)
        unfinished = len(trajectories) - sum(trajectories["finished"])
        self.stats["trajectory_seconds"] += seconds
        self.stats["trajectories"] += len(trajectories)
        self.stats["empty_trajectories"] += empty
        self.stats["unfinished_trajectories"] += unfinished
        self.stats["kept_trajectories"] += sum(keep)
        self.stats[f"kept_fraction_step_{step}"] = sum(keep) / max(1, len(trajectories))
        if take:
            self.log_event(
                {
                    "tms_snapshot_step": step,
                    "tms_trajectory_seconds": seconds,
                    "tms_empty_trajectories": empty,
                    "tms_unfinished_trajectories": unfinished,
                    "tms_kept_fraction": sum(keep) / max(1, len(trajectories)),
                }
            )

    # Run record and resuming

    def _run_settings(self) -> dict:
        """What the snapshots (`harvest`) and the trajectories depend on."""
        args = self.args
        harvest = {
            "model": model_summary(self.model),
            "lora": lora_summary(self.model.peft_config[self.adapter_name]),
            "train_data": dataset_digest(self._prompts),
            "num_train_examples": len(self._prompts),
            "num_checkpoints": args.num_checkpoints,
            "tms_mode": args.tms_mode,
            "online_snapshot_every": args.online_snapshot_every,
            "planned_steps": self._planned_steps,
            "seed": args.seed,
            "learning_rate": args.learning_rate,
            "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "max_length": args.max_length,
        }
        trajectories = dataclasses.asdict(SamplingParams.from_config(args, self.max_new_tokens))
        trajectories.pop("batch_size")  # batching changes speed, not the distribution sampled
        trajectories["generation_backend"] = args.generation_backend  # each backend seeds its samples its own way
        return {"harvest": harvest, "trajectories": trajectories}

    def _start_run(self, resume_from_checkpoint) -> dict:
        settings = self._run_settings()
        fresh = {"settings": settings, "planned_steps": self._planned_steps}
        if not resume_from_checkpoint:
            self._clear_previous_history()
            self._save_run(fresh)
            return fresh
        run = read_run(self.history_dir)
        if run is None:
            if isinstance(resume_from_checkpoint, str):
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint!r}: {self.history_dir} holds no record of a TMS run "
                    f"({RUN_FILE}). Pass the same `history_dir` (or `output_dir`) as the interrupted run, or start again "
                    "without `resume_from_checkpoint`."
                )
            logger.warning(f"No interrupted TMS run in {self.history_dir}: starting from the beginning.")
            self._clear_previous_history()
            self._save_run(fresh)
            return fresh
        changed = differences(run["settings"]["harvest"], settings["harvest"])
        if changed:
            raise ValueError(
                f"The history in {self.history_dir} comes from a run with other settings, so its snapshots cannot be "
                f"reused: {'; '.join(changed)}. Resume with the settings of that run, pass another `history_dir`, or "
                "start again without `resume_from_checkpoint` (the history is then replaced)."
            )
        if run.get("trajectories_done") and run["settings"]["trajectories"] != settings["trajectories"]:
            logger.warning(
                "Sampling settings changed since the trajectories were generated "
                f"({'; '.join(differences(run['settings']['trajectories'], settings['trajectories']))}): the snapshots "
                "are reused and the trajectories sampled again."
            )
            run["trajectories_done"] = False
            run.pop("trajectory_seconds", None)
            if self.is_world_process_zero():
                for name in ("trajectories", TRAJECTORY_PARTS):
                    shutil.rmtree(os.path.join(self.history_dir, name), ignore_errors=True)
        run["settings"] = settings
        self._save_run(run)
        return run

    def _save_run(self, run: dict) -> None:
        if self.is_world_process_zero():
            write_run(self.history_dir, run)

    def _reopen_history(self, expected: list[int]) -> None:
        """Load the snapshots of `expected` steps from disk (a resumed harvest takes the later ones again)."""
        if not expected:
            return
        self.history.flush()
        try:
            reopened = AdapterHistory.open(self.history_dir)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"The snapshots of the interrupted run in {self.history_dir} cannot be read ({error}). Start again "
                "without `resume_from_checkpoint`."
            ) from error
        missing = [s for s in expected if s not in reopened]
        if missing:
            raise ValueError(
                f"The history in {self.history_dir} lacks the snapshots of steps {missing}, which the run should have "
                "taken before it stopped. Resume from an earlier checkpoint, or start again without "
                "`resume_from_checkpoint`."
            )
        for step in expected:
            # Served from its file, unless this process's history has no folder (not the main process): then in memory.
            self.history._snapshots[step] = reopened[step] if self.history.keep_in_memory else reopened._snapshots[step]

    def _checkpoint_for(self, resume_from_checkpoint, folder: str) -> str | None:
        """The Trainer checkpoint a phase writing to `folder` resumes from: the one named if it lies there, else the last."""
        if not resume_from_checkpoint:
            return None
        if isinstance(resume_from_checkpoint, str):
            if not os.path.isdir(resume_from_checkpoint):
                raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder.")
            return resume_from_checkpoint if is_inside(resume_from_checkpoint, folder) else None
        return latest_checkpoint(folder)

    def _clear_previous_history(self) -> None:
        """A new run replaces the snapshots and trajectories a previous run left in the same history folder."""
        if not self.is_world_process_zero() or not os.path.isdir(self.history_dir):
            return
        names = ("trajectories", TRAJECTORY_PARTS, VLLM_DIR, "harvest", RUN_FILE)
        stale = [n for n in os.listdir(self.history_dir) if n.startswith("step-") or n in names]
        if stale:
            logger.warning(f"Replacing the adapter history of a previous run in {self.history_dir} ({len(stale)} entries).")
        for name in stale:
            path = os.path.join(self.history_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def _generate_trajectories(self, reuse: bool = False):
        saved = os.path.join(self.history_dir, "trajectories")
        if reuse and os.path.isdir(saved):
            return load_from_disk(saved)
        trajectories = self._sample()
        if self.is_world_process_zero():
            save_trajectories(trajectories, saved)
            # The parts, and vLLM's copy of the base weights: the history keeps adapters and trajectories only.
            for name in (TRAJECTORY_PARTS, VLLM_DIR):
                shutil.rmtree(os.path.join(self.history_dir, name), ignore_errors=True)
        return trajectories

    def _sample(self, steps: list[int] | None = None):
        """Trajectories of the snapshots of `steps` (default: all), each group's part kept until the phase ends."""
        sampling = SamplingParams.from_config(self.args, self.max_new_tokens)
        inputs = (self.model, self._tokenizer, self._prompts, self.history, sampling)
        shared = dict(
            adapter_name=self.adapter_name,
            chat_template=self.chat_template,
            parts_dir=os.path.join(self.history_dir, TRAJECTORY_PARTS),
            steps=steps,
        )
        if self.args.generation_backend == "vllm":
            return generate_trajectories_vllm(
                *inputs,
                work_dir=os.path.join(self.history_dir, VLLM_DIR),
                gpu_memory_utilization=self.args.vllm_gpu_memory_utilization,
                disable_tqdm=self.args.disable_tqdm,
                **shared,
            )
        return generate_trajectories(
            *inputs,
            generation_context=lambda _: unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ),
            disable_tqdm=self.args.disable_tqdm or not self.is_local_process_zero(),
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            **shared,
        )

    def _keep_flags(self, trajectories) -> list[bool]:
        args = self.args
        return keep_flags(
            trajectories,
            self._prompts,
            unfinished=args.unfinished_trajectories,
            trajectory_filter=args.trajectory_filter,
            verifier=self.verifier,
            min_verifier_score=args.min_verifier_score,
            answer_extractor=self.answer_extractor,
        )

    def _prepare_student(self) -> None:
        keep = self._keep_flags(self.trajectories)
        candidates, empty = mixture_candidates(self._prompts, self.trajectories, keep=keep)
        self._use_mixture(candidates)
        self.stats.update(
            trajectories=len(self.trajectories),
            empty_trajectories=empty,
            unfinished_trajectories=len(self.trajectories) - sum(self.trajectories["finished"]),
            kept_trajectories=sum(keep),
        )
        self.stats.update(
            {f"kept_fraction_step_{step}": f for step, f in kept_by_snapshot(self.trajectories, keep).items()}
        )
        with torch.no_grad():
            for name, param in adapter_parameters(self.model, self.adapter_name).items():
                param.copy_(self._initial_adapter[name])
        self.optimizer, self.lr_scheduler = None, None
        self._total_train_tokens = 0

    def _tokenize_candidates(self, candidates, name: str):
        """The SFT preprocessing of `candidates`; unfinished trajectories lose their end tokens under "truncate"."""
        tokenized = self._prepare_dataset(candidates, self.processing_class, self.args, False, None, name)
        if self.args.unfinished_trajectories == "truncate":
            if self._end_of_turn is None:
                tokenize = partial(self._prepare_dataset, processing_class=self.processing_class, args=self.args,
                                   packing=False, formatting_func=None, dataset_name="end-of-turn probe")
                # The shortest prompt, so that `max_length` cannot cut the probe's end.
                shortest = min(self._prompts["prompt"], key=lambda p: len(str(p)))
                self._end_of_turn = end_of_turn_ids(tokenize, shortest)
            tokenized = truncate_unfinished(tokenized, self._end_of_turn)
        return tokenized

    def _use_mixture(self, candidates) -> None:
        """Train on a `MixtureDataset` of `candidates` (tokenized here) from now on."""
        self._candidates = self._tokenize_candidates(candidates, "mixture")
        weights = self.args.snapshot_weights
        self.train_dataset = MixtureDataset(
            self._candidates,
            self.args.label_weight,
            self.args.seed,
            trajectory_choice=self.args.trajectory_choice,
            snapshot_weights=None if weights is None else dict(zip(self.history.steps, weights)),
        )
        if not isinstance(self.data_collator, MixtureCollator):
            self.data_collator = MixtureCollator(self.data_collator)

    def _score_trajectories(self) -> dict[str, float]:
        """For `trajectory_choice="pld"`: the mean NLL per token of the trajectories the epoch may draw, under the student."""
        started = time.perf_counter()
        rows = self.train_dataset.rows_to_score()  # prompts drawing their label this epoch need no score
        if not rows:
            self.train_dataset.set_scores({})
            return {"tms_scoring_seconds": time.perf_counter() - started}
        lengths = [len(ids) for ids in self._candidates.select(rows)["input_ids"]]
        # Longest first, so each batch pads little.
        order = sorted(range(len(rows)), key=lambda i: -lengths[i])
        nll, tokens = label_nll(self, self._candidates.select([rows[i] for i in order]), "Scoring trajectories")
        mean = (nll / tokens.clamp(min=1)).tolist()
        self.train_dataset.set_scores({rows[i]: mean[k] for k, i in enumerate(order)})
        best = self.train_dataset.best_rows()
        chosen = [self.train_dataset.scores[row] for row in best]
        # Which snapshots the student is drawn to: late ones mean it is converging on the harvest's end.
        steps = self._candidates.select(best)["snapshot_step"]
        return {
            "tms_scoring_seconds": time.perf_counter() - started,
            "tms_chosen_nll": sum(chosen) / len(chosen),
            "tms_trajectory_nll": sum(mean) / len(mean),
            "tms_chosen_snapshot_step": sum(steps) / len(steps),
        }

    # Hooks into SFTTrainer

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if IS_LABEL not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, IS_LABEL]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        is_label = inputs.pop(IS_LABEL, None)
        if is_label is not None:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["tms_label_fraction"].append(self.accelerator.gather_for_metrics(is_label).mean().item())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.phase in PHASE_IDS:
            logs["tms_phase"] = PHASE_IDS[self.phase]
        super().log(logs, start_time)

    def log_event(self, logs: dict[str, float]) -> None:
        """
        Log what TMS did between two training logs (snapshot, scoring). Not through `SFTTrainer.log`, which would
        attach and reset the training metrics accumulating for the next regular log.
        """
        if self.phase in PHASE_IDS:
            logs["tms_phase"] = PHASE_IDS[self.phase]
        Trainer.log(self, logs)

    # The Hub

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        args = self.args
        settings = {
            "num_checkpoints (T)": args.num_checkpoints,
            "label_weight (alpha)": args.label_weight,
            "snapshot steps": ", ".join(map(str, self.history.steps)) or "none yet",
            "samples_per_checkpoint": args.samples_per_checkpoint,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "max_new_tokens": self.max_new_tokens,
        }
        final_pld = {}
        for phase, label in ((1, "harvest (SFT on the labels)"), (2, "student (TMS)")):
            entries = [e for e in self.state.log_history if e.get("tms_phase") == phase and "pld" in e]
            if entries:
                final_pld[label] = entries[-1]
        complete_model_card(
            os.path.join(args.output_dir, "README.md"),
            base_model=resolve_base_model(get_config_model_id(self.model.config), args.hub_base_model),
            settings=settings,
            pld=final_pld,
            history_repo_folder="history" if args.push_history else None,
        )

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **kwargs):
        """Push the student's adapter and its model card; with `push_history=True`, the snapshots too."""
        result = super().push_to_hub(
            commit_message=commit_message, blocking=blocking, token=token, revision=revision, **kwargs
        )
        if self.args.push_history and self.is_world_process_zero():
            push_history(
                self.history_dir,
                self.hub_model_id,
                "history",
                token=token if token is not None else self.args.hub_token,
                revision=revision if revision is not None else self.args.hub_revision,
            )
        return result


class _PhaseCallback(TrainerCallback):
    """Takes the harvest snapshots, and opens the student run's log with the trajectory counts."""

    def __init__(self, trainer: TMSTrainer):
        self.trainer = trainer
        self.steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = set()
        if self.trainer.phase == "harvest":
            self.steps = set(snapshot_steps(state.max_steps, args.num_checkpoints))
        elif self.trainer.phase == "student":
            self.trainer.train_dataset.num_epochs = state.num_train_epochs
            self.trainer.log_event({f"tms_{key}": float(value) for key, value in self.trainer.stats.items()})
        elif self.trainer.phase == "online":
            self.steps = set(self.trainer._online_steps)
            if state.global_step == 0:
                self.trainer._refresh_online(0)
                return
            # A resumed run takes up the snapshots it had taken (and their trajectories, from the parts on disk).
            taken = [step for step in self.trainer._online_steps if step <= state.global_step]
            self.trainer._reopen_history(taken)
            for step in taken:
                self.trainer._refresh_online(step, take=False)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Not left to accelerate: its `set_epoch` does not reach the dataset behind a multi-process sampler.
        if self.trainer.phase in ("student", "online"):
            # Floor with a margin: `state.epoch` is a float sum (0.9999...) at an epoch's start, and 1.5 when a run
            # resumes in the middle of its second epoch.
            self.trainer.train_dataset.set_epoch(math.floor(state.epoch + 1e-6))
            if args.trajectory_choice == "pld":
                self.trainer.log_event(self.trainer._score_trajectories())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            if self.trainer.phase == "online":
                self.trainer._refresh_online(state.global_step)
            else:
                self.trainer.history.take(self.trainer.model, state.global_step, self.trainer.adapter_name)
        if control.should_save:
            # The checkpoint written after this step must not get ahead of the snapshots it resumes with.
            self.trainer.history.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.history.flush()


def _check_parallelism(accelerator) -> None:
    """Refuse the backends that shard parameters: snapshots and hot-swapped slots read the adapter weights whole."""
    backend = DistributedBackend(accelerator)
    if backend.is_zero3 or backend.is_fsdp:
        name = "DeepSpeed ZeRO-3" if backend.is_zero3 else f"FSDP (version {backend.fsdp_version})"
        raise NotImplementedError(
            f"TMSTrainer does not support {name} yet: it shards the LoRA weights, which the adapter snapshots and the "
            "trajectory slots read whole. Use data parallelism (examples/accelerate_configs/ddp.yaml) or DeepSpeed "
            "ZeRO-1/2; a LoRA adapter and its optimizer state are small, and a 4-bit base fits where ZeRO-3 was needed."
        )


def _check_writable(folder: str, field: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(
            f"Cannot write to `{field}` {folder!r} ({error.strerror or error}). TMS writes its snapshots, trajectories "
            f"and checkpoints there: pass a writable `{field}`."
        ) from error


def _checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return json.load(f)["global_step"]


def _as_tms_config(args, model) -> TMSConfig:
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        return TMSConfig(f"{str(name).rstrip('/').split('/')[-1]}-TMS")
    if isinstance(args, TMSConfig):
        return args
    if isinstance(args, TrainingArguments):
        # Not `to_dict()`: it masks every `*_token` field (hub_token, eos_token, pad_token).
        return TMSConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
    raise TypeError(f"`args` must be a TMSConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")


def _check_quantization(quantization_config) -> None:
    if quantization_config is None:
        return
    get = quantization_config.get if isinstance(quantization_config, dict) else partial(getattr, quantization_config)
    if (get("load_in_4bit", False) or get("load_in_8bit", False)) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "4-bit and 8-bit (QLoRA) loading needs bitsandbytes, which is not installed. Install it with "
            "`pip install 'bitsandbytes>=0.50.2'`, or drop `quantization_config` to train in full precision."
        )


def _check_lora(model, peft_config) -> None:
    if peft_config is None and not isinstance(model, PeftModel):
        raise ValueError(
            "TMSTrainer trains and snapshots a LoRA adapter, but no adapter was given. Pass "
            "`peft_config=LoraConfig(...)` (e.g. `LoraConfig(r=16, target_modules='all-linear')`) or a `PeftModel`."
        )
    config = peft_config if peft_config is not None else model.peft_config[model.active_adapter]
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"TMSTrainer snapshots and hot-swaps LoRA adapters; got a {type(config).__name__}. Use a `LoraConfig` "
            "(it also works on 4-bit and 8-bit bases)."
        )
