"""`TMSTrainer`: the TMS algorithm as phases of one `train()` call, on top of `trl.SFTTrainer`."""

from __future__ import annotations

import contextlib
import math
import os
import textwrap
import time
from functools import partial

from datasets import load_from_disk
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational

from .arguments import as_tms_config, check_trainer_arguments
from .candidates import CandidateBuilder, TrajectoryStats
from .config import TMSConfig
from .data import check_label_tokens_left, to_prompt_completion
from .generation import SamplingParams, empty_trajectories, fitted_max_new_tokens, sampling_within_memory
from .generation import save_trajectories
from .history import AdapterHistory, SnapshotCallback, adapter_weights, check_num_checkpoints, restore_adapter
from .history import snapshot_steps
from .hub import TMSHubMixin
from .mixture import FLAGS, IS_LABEL, IS_REHEARSAL, MixtureCallback, MixtureCollator, MixtureDataset
from .online import OnlineTMS
from .planning import drawn_trajectories
from .pld import PLDCallback, score_trajectories
from .quantization import is_quantized, keep_4bit_layers_trainable
from .rehearsal import SelfRehearsal
from .report import PHASE_IDS
from .resume import TMSRun, run_settings
from .retention import RetentionCallback
from .selection import DriftBudgetCallback
from .sharding import check_parallelism, whole_model_for_generation
from .trajectories import HotSwapGenerator
from .vllm_generation import VLLMGenerator, check_vllm_available

logger = logging.get_logger(__name__)


class TMSTrainer(TMSHubMixin, SFTTrainer):
    """
    Trainer for Trajectory-Mixed Supervision (TMS): reward-free, on-policy SFT (arXiv 2602.03073).

    A drop-in replacement for [`~trl.SFTTrainer`] (same constructor, same dataset formats that carry a prompt). With
    the default recipe (`TMSConfig.recipe="retention"`) `train()` is online TMS: one run whose adapter is snapshotted as
    it trains and mixes its own recent trajectories into the labels ([`OnlineTMS`]). With `recipe="paper"` (or
    `tms_mode="two_pass"`) it runs the paper's three phases:

    1. **harvest**: ordinary SFT of a LoRA adapter on the labels, taking `num_checkpoints` adapter snapshots evenly
       over the run into an [`AdapterHistory`] (written under `history_dir`);
    2. **trajectories**: every snapshot, hot-swapped into a spare adapter slot of the same model, samples
       `samples_per_checkpoint` completions for every training prompt (by default only for the (prompt, snapshot)
       pairs the student's draws will land on: `trajectories_to_generate`);
    3. **student**: the adapter restarts from its initial weights, with a fresh optimizer and schedule, and trains for
       the same number of steps on the mixture: each time an example is drawn, its label with probability
       `label_weight`, else one of its trajectories, uniformly over snapshots.

    With `rehearsal_weight` (beta) > 0 (beyond the paper), a drawn example is, with probability beta, the initial
    model's own answer to an everyday prompt instead; those answers are generated once, in the trajectories phase.

    With an `eval_dataset`, Policy-Label Divergence (`pld`, `pld_drift`) is logged in both phases, and the forgetting
    meter ([`RetentionCallback`]: `retention_kl`, `retention_nll`) in every phase unless `log_retention=False`. Log
    entries carry `tms_phase` (1 = harvest, 2 = student, 3 = online); `trainer.state.log_history` holds both phases
    after a two-pass `train()`. With `retention_kl_budget`, the best checkpoint of the student (or the online run) is
    chosen among those within that drift budget ([`DriftBudgetCallback`]).

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
        args = as_tms_config(args, model)
        functions = {"verifier": verifier, "answer_extractor": answer_extractor}
        check_trainer_arguments(
            args, model, train_dataset, peft_config, quantization_config, formatting_func, optimizers, functions
        )
        if args.generation_backend == "vllm":
            check_vllm_available()
        train_dataset = to_prompt_completion(train_dataset, "train")
        eval_dataset = to_prompt_completion(eval_dataset, "eval")
        self.prompts = train_dataset
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

        check_parallelism(
            self.accelerator,
            args.generation_backend,
            args.tms_mode,
            args.gradient_checkpointing,
            quantized=is_quantized(self.model),
        )
        check_label_tokens_left(len(self.train_dataset), len(train_dataset), args.max_length)
        keep_4bit_layers_trainable(self.model)  # TMS generates, then trains, on the same (maybe 4-bit) base
        self.adapter_name = self.model.active_adapter
        self._initial_adapter = adapter_weights(self.model, self.adapter_name)
        self.history_dir = args.history_dir or os.path.join(args.output_dir, "_tms_history")
        self.run = TMSRun(self.history_dir, is_main=self.is_world_process_zero())
        self.history = AdapterHistory(self.model.peft_config[self.adapter_name], background_writes=True,
                                      directory=self.history_dir if self.is_world_process_zero() else None)
        self.max_new_tokens = args.max_new_tokens if args.max_new_tokens_from_labels is None else fitted_max_new_tokens(
            self._tokenizer, self.prompts, args.max_new_tokens_from_labels, args.max_new_tokens
        )
        self.generator = self._make_generator(SamplingParams.from_config(args, self.max_new_tokens))
        self.rehearsal = None  # self-rehearsal, whose answers come from the adapter as it is now (the initial one)
        if args.rehearsal_weight > 0:
            self.rehearsal = SelfRehearsal(args, self.model, self.adapter_name, self._make_generator, self.run,
                                           conversational=is_conversational(self.prompts[0]))
        self.candidate_builder = CandidateBuilder(
            self.prompts,
            lambda candidates, name: self._prepare_dataset(candidates, self.processing_class, args, False, None, name),
            unfinished=args.unfinished_trajectories, trajectory_filter=args.trajectory_filter, verifier=verifier,
            min_verifier_score=args.min_verifier_score, answer_extractor=answer_extractor,
            process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes,
        )
        self.trajectories = None
        self.stats = TrajectoryStats()

        training_values = self.set_initial_training_values(self.args, self.get_train_dataloader())
        self.updates_per_epoch, self.planned_steps = training_values[1], training_values[-1]
        check_num_checkpoints(args.num_checkpoints, self.planned_steps)
        self.pld_callback, self.retention_callback = None, None
        if args.log_pld and self.eval_dataset is not None:
            self.pld_callback = PLDCallback(
                self, num_samples=args.pld_num_samples, drift_threshold=args.pld_drift_threshold,
                stop_on_drift=args.pld_stop_on_drift,
            )
            self.add_callback(self.pld_callback)
        if args.log_retention:
            self.retention_callback = RetentionCallback(
                self, prompts=args.retention_prompts, num_prompts=args.retention_num_prompts,
                max_new_tokens=args.retention_max_new_tokens, kl_threshold=args.retention_kl_threshold,
                stop_on_kl=args.retention_stop_on_kl,
            )
            self.add_callback(self.retention_callback)
        # The best-checkpoint choice is the student's (or the online run's): the harvest only feeds the snapshots.
        budget = args.retention_kl_budget
        self.drift_budget = None if budget is None else DriftBudgetCallback(self.retention_callback, budget)
        self._choice = [] if budget is None else [self.drift_budget]

    def _make_generator(self, sampling: SamplingParams, prompts=None, history=None, parts_dir: str | None = None):
        """The generation backend for `prompts` and the snapshots of `history` (default: this run's)."""
        common = dict(adapter_name=self.adapter_name, chat_template=self.chat_template,
                      parts_dir=parts_dir or self.run.parts_dir)
        prompts = self.prompts if prompts is None else prompts
        if self.args.generation_memory_mb is not None and self.args.generation_backend == "transformers":
            budget = self.args.generation_memory_mb
            sampling = sampling_within_memory(sampling, self.model, self._tokenizer, prompts, budget,
                                              self.args.num_checkpoints, self.chat_template)
        inputs = (self.model, self._tokenizer, prompts, self.history if history is None else history, sampling)
        if self.args.generation_backend == "vllm":
            return VLLMGenerator(*inputs, work_dir=self.run.vllm_dir, disable_tqdm=self.args.disable_tqdm,
                                 gpu_memory_utilization=self.args.vllm_gpu_memory_utilization, **common)
        return HotSwapGenerator(
            *inputs,
            # The wrapped model exists once training has started: look it up at each generation.
            generation_context=lambda _: whole_model_for_generation(
                self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
            ),
            disable_tqdm=self.args.disable_tqdm or not self.is_local_process_zero(),
            process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes, **common,
        )

    # The algorithm

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        Run harvest, trajectories and student; returns the student run's `TrainOutput`. Once per trainer.

        Args:
            resume_from_checkpoint (`bool` or `str`, *optional*):
                Continue an interrupted run of the same settings (same `history_dir`) instead of starting over: phases
                that finished are reused from the history folder (snapshots, trajectories), an interrupted generation
                keeps the groups of snapshots it had sampled, and the harvest and the student restart from their last
                Trainer checkpoint of this run (`<history_dir>/harvest/checkpoint-*` and `<output_dir>/checkpoint-*`,
                written according to `save_strategy`). `True` finds all of this on disk; a checkpoint path resumes that
                phase from that checkpoint.
        """
        run = self.run
        sampling = SamplingParams.from_config(self.args, self.max_new_tokens)
        rehearsal = None if self.rehearsal is None else (self.rehearsal.prompts, self.rehearsal.sampling)
        settings = run_settings(self.model, self.model.peft_config[self.adapter_name], self.prompts, self.args,
                                self.planned_steps, sampling, rehearsal)
        run.start(settings, self.planned_steps, resume_from_checkpoint, self.args.output_dir)
        train = partial(super().train, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        if self.args.tms_mode == "online":
            return self._train_online(train)

        # 1. Harvest: plain SFT on the labels, taking the snapshots.
        self.harvest_output = None  # the harvest's `TrainOutput`, when it runs
        if run.done("harvest"):
            run.reopen_snapshots(self.history, run.record["snapshot_steps"])
        else:
            checkpoint = run.resume_harvest(self.history, self.args.num_checkpoints)
            schedule = partial(snapshot_steps, num_checkpoints=self.args.num_checkpoints)
            snapshots = SnapshotCallback(self.history, self.model, self.adapter_name, schedule)
            with self._phase("harvest", [snapshots, run.identity("harvest")], output_dir=run.harvest_dir,
                             push_to_hub=False):
                self.harvest_output = train(resume_from_checkpoint=checkpoint)
            run.finish("harvest", harvest_steps=self.state.global_step, harvest_log=self.state.log_history,
                       snapshot_steps=self.history.steps)

        # 2. Trajectories: every snapshot samples its completions of every prompt (and, for self-rehearsal, the initial
        # adapter answers the rehearsal prompts).
        with self._phase("trajectories"):
            if self.rehearsal is not None:
                self.rehearsal.answers()
            started = time.perf_counter()
            self.trajectories = self._trajectories(reuse=run.done("trajectories"))
            seconds = run.record.get("trajectory_seconds", time.perf_counter() - started)
            run.finish("trajectories", trajectory_seconds=seconds)  # then the generation's scratch is removed

        # 3. Student: from the initial adapter, as many steps as the harvest, on the mixture.
        candidates, self.stats = self.candidate_builder.build(self.trajectories)
        self.stats.seconds = seconds
        sampled = None
        if self.args.generates_drawn_trajectories_only:
            self.stats.not_sampled = self.unsampled_count(self.trajectories)
            sampled = set(zip(self.trajectories["prompt_index"], self.trajectories["snapshot_step"]))
        self.stats.add(self._use_mixture(candidates, sampled))
        self._reset_adapter()
        score = partial(score_trajectories, self, self.train_dataset, candidates)
        mixture = MixtureCallback(self.train_dataset, self.log_event, begin_logs={
            f"tms_{key}": float(value) for key, value in self.stats.as_dict().items()
        }, score=score if self.args.trajectory_choice == "pld" else None)
        with self._phase("student", [mixture, run.identity("student"), *self._choice],
                         max_steps=run.record["harvest_steps"]):
            output = train(resume_from_checkpoint=run.checkpoint("student"))
        self.state.log_history = run.record["harvest_log"] + self.state.log_history
        return output

    def _train_online(self, train):
        """Online TMS: one run on its own snapshots (see [`OnlineTMS`])."""
        online = OnlineTMS(self, self.run)
        self.stats = online.stats
        # Sampling only the drawn pairs, the mixture knows which were sampled: none yet.
        self.stats.add(self._use_mixture(self.candidate_builder.build(None)[0], set() if online.drawn else None))
        callbacks = [online, SnapshotCallback(self.history, self.model, self.adapter_name),
                     MixtureCallback(self.train_dataset, self.log_event), self.run.identity("online"), *self._choice]
        with self._phase("online", callbacks):
            output = train(resume_from_checkpoint=self.run.checkpoint("online"))
        self.trajectories = online.finish()
        return output

    @contextlib.contextmanager
    def _phase(self, name: str, callbacks: list[TrainerCallback] = (), **overrides):
        """Run phase `name` (`self.phase`); its `callbacks` and the config fields in `overrides` hold while it runs."""
        saved = {key: getattr(self.args, key) for key in overrides}
        self.phase = name
        try:
            for key, value in overrides.items():
                setattr(self.args, key, value)
            for callback in callbacks:
                self.add_callback(callback)
            yield
        finally:
            for callback in callbacks:
                self.remove_callback(callback)
            for key, value in saved.items():
                setattr(self.args, key, value)
            self.phase = None

    def _trajectories(self, reuse: bool = False):
        drawn_only = self.args.generates_drawn_trajectories_only
        folder = self.run.trajectories_dir
        saved = load_from_disk(folder) if reuse and os.path.isdir(folder) else None
        if saved is not None and not drawn_only:
            return saved
        if saved is None and self.args.label_weight == 1.0:
            logger.warning("`label_weight=1.0`: the student trains on labels only, so no trajectory is generated.")
            trajectories = None
        elif drawn_only:
            # Given trajectories sampled for another student's draws (e.g. another `label_weight`), adds those it lacks.
            trajectories = drawn_trajectories(self._missing_pairs, lambda pairs: self.generator.generate(pairs=pairs),
                                              start=saved)
            if saved is not None and (trajectories is None or len(trajectories) == len(saved)):
                return saved
        else:
            trajectories = self.generator.generate()
        if trajectories is None:
            trajectories = empty_trajectories(self._tokenizer, self.prompts)
        self.generator.close()  # before the student trains: a vLLM engine gives its memory back
        if self.is_world_process_zero():
            save_trajectories(trajectories, self.run.trajectories_dir)
        return trajectories

    def _missing_pairs(self, trajectories, sampled: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """The pairs the student's draws land on that were not `sampled`, given the `trajectories` sampled so far."""
        # Untokenized: the plan reads only which prompt and snapshot each candidate is of.
        plan = MixtureDataset.from_config(self.candidate_builder.untokenized(trajectories), self.args,
                                          self.history.steps, sampled)
        if self.rehearsal is not None:  # a draw the rehearsal answers take needs no pair
            self.rehearsal.add_to(plan)
        return plan.missing_pairs(math.ceil(self.run.record["harvest_steps"] / self.updates_per_epoch))

    def unsampled_count(self, trajectories) -> int:
        """How many of the trajectories of every prompt x snapshot x sample are not among `trajectories`."""
        return len(self.prompts) * len(self.history) * self.args.samples_per_checkpoint - len(trajectories)

    def _reset_adapter(self) -> None:
        """The adapter back at its initial weights, with a fresh optimizer and schedule."""
        restore_adapter(self.model, self.adapter_name, self._initial_adapter)
        self.optimizer, self.lr_scheduler = None, None
        if self.is_deepspeed_enabled:
            # A DeepSpeed engine owns the optimizer and its partitioned state: let the next `train()` build a new one,
            # once the old one has taken its hooks off the model (ZeRO-3 gathers and releases weights through them).
            if hasattr(self.model_wrapped, "destroy"):
                self.model_wrapped.destroy()
            self.accelerator.free_memory()
            self.model_wrapped, self.deepspeed = self.model, None
        self._total_train_tokens = 0

    def _use_mixture(self, candidates, sampled: set[tuple[int, int]] | None = None) -> TrajectoryStats:
        """Train on a `MixtureDataset` of the tokenized `candidates` and the rehearsal answers from now on (`sampled`:
        the pairs generated, when not all were); returns the rehearsal answers' counts."""
        self.train_dataset = MixtureDataset.from_config(candidates, self.args, self.history.steps, sampled)
        if not isinstance(self.data_collator, MixtureCollator):
            self.data_collator = MixtureCollator(self.data_collator)
        if self.rehearsal is None:
            return TrajectoryStats()
        return self.rehearsal.add_to(self.train_dataset, self.candidate_builder)

    # Hooks into SFTTrainer

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(f for f in FLAGS if f not in self._signature_columns)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # The fractions of labels and rehearsal answers actually trained on.
        for flag, metric in ((IS_LABEL, "tms_label_fraction"), (IS_REHEARSAL, "tms_rehearsal_fraction")):
            values = inputs.pop(flag, None)
            if values is not None:
                self._metrics[mode][metric].append(self.accelerator.gather_for_metrics(values).mean().item())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.phase in PHASE_IDS:
            logs["tms_phase"] = PHASE_IDS[self.phase]
        super().log(logs, start_time)

    def log_event(self, logs: dict[str, float]) -> None:
        """
        Log what TMS did between two training logs (snapshot, scoring). Not through `SFTTrainer.log`, which would
        attach and reset the training metrics accumulating for the next regular log; and without cancelling a regular
        log due at this step.
        """
        if self.phase in PHASE_IDS:
            logs["tms_phase"] = PHASE_IDS[self.phase]
        # Logging clears `control.should_log`: keep it, or the regular log due at this step would be skipped.
        should_log = self.control.should_log
        Trainer.log(self, logs)
        self.control.should_log = should_log
