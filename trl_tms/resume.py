"""What a TMS run leaves in its history folder so that an interrupted run can continue instead of starting over.

`<history_dir>/tms_run.json` records what the snapshots and the trajectories depend on (model, LoRA, data, schedule,
sampling), the harvest's log and, once each phase ends, that it is complete. A resumed run reuses a phase only when
its record matches the current settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil

from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .atomic import write_json_atomically

logger = logging.get_logger(__name__)

RUN_FILE = "tms_run.json"
HARVEST_DIR = "harvest"
TRAJECTORIES_DIR = "trajectories"
TRAJECTORY_PARTS = "trajectory-parts"
REHEARSAL_DIR = "rehearsal"
REHEARSAL_PARTS = "rehearsal-parts"
VLLM_DIR = "vllm"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def dataset_digest(dataset) -> str:
    """A content hash of the prompt and completion columns (in-memory datasets get random fingerprints)."""
    digest = hashlib.sha256()
    for column in ("prompt", "completion"):
        for value in dataset[column] if column in dataset.column_names else []:
            digest.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode())
            digest.update(b"\x00")
    return digest.hexdigest()


def lora_summary(peft_config) -> dict:
    """The LoRA settings that decide the shape and the training of the snapshots."""
    targets = peft_config.target_modules
    return {
        "r": peft_config.r,
        "lora_alpha": peft_config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "use_dora": bool(getattr(peft_config, "use_dora", False)),
        "use_rslora": bool(getattr(peft_config, "use_rslora", False)),
        "bias": peft_config.bias,
        "modules_to_save": sorted(peft_config.modules_to_save or []),
    }


def model_summary(model) -> dict:
    config = model.config
    return {
        "name_or_path": getattr(config, "_name_or_path", ""),
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def read_run(history_dir: str) -> dict | None:
    path = os.path.join(history_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is unreadable ({error}); it records the interrupted run. Start again without "
            "`resume_from_checkpoint` (the history folder is then replaced)."
        ) from error


def write_run(history_dir: str, record: dict) -> None:
    """Written atomically: an interruption leaves the previous record, never half of one."""
    write_json_atomically(os.path.join(history_dir, RUN_FILE), record)


def _flat(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(recorded: dict, current: dict) -> list[str]:
    """`"lora.r: 16 there, 32 now"` for every setting that differs (nested settings get dotted names)."""
    recorded, current = _flat(recorded), _flat(current)
    return [
        f"{key}: {recorded.get(key)!r} there, {current.get(key)!r} now"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]


def latest_checkpoint(folder: str) -> str | None:
    """The last complete Trainer checkpoint in `folder` (one that holds its `trainer_state.json`)."""
    if not os.path.isdir(folder):
        return None
    steps = sorted(
        (int(m.group(1)) for m in map(_CHECKPOINT.match, os.listdir(folder)) if m),
        reverse=True,
    )
    for step in steps:
        path = os.path.join(folder, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    return get_last_checkpoint(folder)


def is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return json.load(f)["global_step"]


def run_settings(model, peft_config, prompts, args, planned_steps: int, sampling, rehearsal=None) -> dict:
    """
    What the snapshots (`harvest`), the trajectories (`trajectories`, from `SamplingParams`) and, with `rehearsal` (the
    rehearsal prompts and their `SamplingParams`), the rehearsal answers (`rehearsal`) depend on.
    """
    harvest = {
        "model": model_summary(model),
        "lora": lora_summary(peft_config),
        "train_data": dataset_digest(prompts),
        "num_train_examples": len(prompts),
        "num_checkpoints": args.num_checkpoints,
        "tms_mode": args.tms_mode,
        "online_snapshot_every": args.online_snapshot_every,
        "planned_steps": planned_steps,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "max_length": args.max_length,
    }
    trajectories = dataclasses.asdict(sampling)
    trajectories.pop("batch_size")  # batching changes speed, not the distribution sampled
    trajectories["generation_backend"] = args.generation_backend  # each backend seeds its samples its own way
    if args.generates_drawn_trajectories_only:
        # Which pairs were sampled followed the draws of the run that sampled them; a student with other mixture
        # settings samples the pairs it lacks (`TMSTrainer`), so those settings need not match.
        trajectories["trajectories_to_generate"] = "drawn"
    settings = {"harvest": harvest, "trajectories": trajectories}
    if rehearsal is not None:
        rehearsal_prompts, rehearsal_sampling = rehearsal
        settings["rehearsal"] = {
            "prompts": dataset_digest(rehearsal_prompts),
            "num_prompts": len(rehearsal_prompts),
            **{k: v for k, v in dataclasses.asdict(rehearsal_sampling).items() if k != "batch_size"},
            "generation_backend": args.generation_backend,
        }
    return settings


class TMSRun:
    """
    A TMS run's state on disk, in its history folder: the record (`tms_run.json`: the settings, which phases are done,
    the harvest's log), every folder a phase writes, and starting, resuming or clearing a run. Only the main process
    (`is_main`) writes; every process reads the same record.

    Args:
        history_dir (`str`):
            The run's history folder.
        is_main (`bool`, *optional*, defaults to `True`):
            Whether this process writes (the main process of a multi-process run).
    """

    def __init__(self, history_dir: str, is_main: bool = True):
        self.history_dir = history_dir
        self.is_main = is_main
        self.record: dict = {}
        # The harvest's Trainer checkpoints are not the result: beside the history, out of `output_dir` and the Hub.
        self.harvest_dir = os.path.join(history_dir, HARVEST_DIR)
        self.trajectories_dir = os.path.join(history_dir, TRAJECTORIES_DIR)
        # Trajectories of each group of snapshots while a generation phase runs (an interrupted one resumes there).
        self.parts_dir = os.path.join(history_dir, TRAJECTORY_PARTS)
        self.vllm_dir = os.path.join(history_dir, VLLM_DIR)
        # The initial model's answers to the rehearsal prompts (self-rehearsal), and their parts while generated.
        self.rehearsal_dir = os.path.join(history_dir, REHEARSAL_DIR)
        self.rehearsal_parts_dir = os.path.join(history_dir, REHEARSAL_PARTS)

    # The record

    def start(self, settings: dict, planned_steps: int, resume_from_checkpoint) -> None:
        """
        Begin a run: a fresh one replaces what a previous run left in the folder; a resumed one checks that the record
        has the same harvest settings (and samples again if the sampling settings changed).
        """
        fresh = {"settings": settings, "planned_steps": planned_steps}
        if not resume_from_checkpoint:
            self.clear()
            self.record = fresh
            self.save()
            return
        record = read_run(self.history_dir)
        if record is None:
            if isinstance(resume_from_checkpoint, str):
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint!r}: {self.history_dir} holds no record of a TMS run "
                    f"({RUN_FILE}). Pass the same `history_dir` (or `output_dir`) as the interrupted run, or start again "
                    "without `resume_from_checkpoint`."
                )
            logger.warning(f"No interrupted TMS run in {self.history_dir}: starting from the beginning.")
            self.clear()
            self.record = fresh
            self.save()
            return
        changed = differences(record["settings"]["harvest"], settings["harvest"])
        if changed:
            raise ValueError(
                f"The history in {self.history_dir} comes from a run with other settings, so its snapshots cannot be "
                f"reused: {'; '.join(changed)}. Resume with the settings of that run, pass another `history_dir`, or "
                "start again without `resume_from_checkpoint` (the history is then replaced)."
            )
        if record.get("trajectories_done") and record["settings"]["trajectories"] != settings["trajectories"]:
            logger.warning(
                "Sampling settings changed since the trajectories were generated "
                f"({'; '.join(differences(record['settings']['trajectories'], settings['trajectories']))}): the "
                "snapshots are reused and the trajectories sampled again."
            )
            record["trajectories_done"] = False
            record.pop("trajectory_seconds", None)
            if self.is_main:
                for folder in (self.trajectories_dir, self.parts_dir):
                    shutil.rmtree(folder, ignore_errors=True)
        if record.get("rehearsal_done") and record["settings"].get("rehearsal") != settings.get("rehearsal"):
            logger.warning("Rehearsal settings changed since the rehearsal answers were generated: they are generated "
                           "again.")
            record["rehearsal_done"] = False
            if self.is_main:
                for folder in (self.rehearsal_dir, self.rehearsal_parts_dir):
                    shutil.rmtree(folder, ignore_errors=True)
        record["settings"] = settings
        self.record = record
        self.save()

    def done(self, phase: str) -> bool:
        """
        Whether `phase` (`"harvest"`, `"trajectories"`, `"rehearsal"`, `"online"`) finished in this run or the one it
        resumes.
        """
        return bool(self.record.get(f"{phase}_done"))

    def finish(self, phase: str, **fields) -> None:
        """Record that `phase` finished, with what a resumed run needs of it."""
        self.record.update({f"{phase}_done": True, **fields})
        self.save()

    def save(self) -> None:
        if self.is_main:
            write_run(self.history_dir, self.record)

    def clear(self) -> None:
        """A new run replaces the snapshots and trajectories a previous run left in the same history folder."""
        if not self.is_main or not os.path.isdir(self.history_dir):
            return
        names = (TRAJECTORIES_DIR, TRAJECTORY_PARTS, REHEARSAL_DIR, REHEARSAL_PARTS, VLLM_DIR, HARVEST_DIR, RUN_FILE)
        stale = [n for n in os.listdir(self.history_dir) if n.startswith("step-") or n in names]
        if stale:
            logger.warning(f"Replacing the adapter history of a previous run in {self.history_dir} ({len(stale)} entries).")
        for name in stale:
            path = os.path.join(self.history_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def remove_generation_scratch(self) -> None:
        """The parts, and vLLM's copy of the base weights: a finished history keeps adapters and trajectories only."""
        if self.is_main:
            for folder in (self.parts_dir, self.rehearsal_parts_dir, self.vllm_dir):
                shutil.rmtree(folder, ignore_errors=True)

    # Resuming

    def reopen_snapshots(self, history, expected: list[int]) -> None:
        """Give `history` the snapshots of `expected` steps from disk (a resumed harvest takes the later ones again)."""
        if not expected:
            return
        history.flush()
        try:
            reopened = type(history).open(self.history_dir)
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
        history.adopt(reopened, expected)

    @staticmethod
    def checkpoint_for(resume_from_checkpoint, folder: str) -> str | None:
        """The Trainer checkpoint a phase writing to `folder` resumes from: the one named if it lies there, else the last."""
        if not resume_from_checkpoint:
            return None
        if isinstance(resume_from_checkpoint, str):
            if not os.path.isdir(resume_from_checkpoint):
                raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder.")
            return resume_from_checkpoint if is_inside(resume_from_checkpoint, folder) else None
        return latest_checkpoint(folder)
