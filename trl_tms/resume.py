"""What a TMS run leaves in its history folder so that an interrupted run can continue instead of starting over.

`<history_dir>/tms_run.json` records what the snapshots and the trajectories depend on (model, LoRA, data, schedule,
sampling, and for online TMS the mixture), the harvest's log and, once each phase ends, that it is complete. A resumed
run reuses a phase only when its record matches the current settings. Every Trainer checkpoint of a phase carries the
run's id (and the student's, the settings it trained under), so that a run never resumes from another run's checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid

from transformers import TrainerCallback
from transformers.utils import logging

from .atomic import write_json_atomically
from .history import snapshot_steps

logger = logging.get_logger(__name__)

RUN_FILE = "tms_run.json"
HARVEST_DIR = "harvest"
TRAJECTORIES_DIR = "trajectories"
TRAJECTORY_PARTS = "trajectory-parts"
REHEARSAL_DIR = "rehearsal"
REHEARSAL_PARTS = "rehearsal-parts"
VLLM_DIR = "vllm"
# The key of a checkpoint's `trainer_state.json` (`stateful_callbacks`) that names the run and phase that wrote it.
CHECKPOINT_KEY = "TMSRun"
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


def checkpoints(folder: str) -> list[str]:
    """The complete Trainer checkpoints in `folder` (those that hold their `trainer_state.json`), the latest first."""
    if not os.path.isdir(folder):
        return []
    steps = sorted((int(m.group(1)) for m in map(_CHECKPOINT.match, os.listdir(folder)) if m), reverse=True)
    paths = [os.path.join(folder, f"checkpoint-{step}") for step in steps]
    return [path for path in paths if os.path.isfile(os.path.join(path, "trainer_state.json"))]


def checkpoint_identity(checkpoint: str) -> dict | None:
    """The run id, phase and settings a checkpoint was written under ([`RunIdentity`]); None if it has none."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            return json.load(f).get("stateful_callbacks", {}).get(CHECKPOINT_KEY)
    except (OSError, json.JSONDecodeError):
        return None


class RunIdentity(TrainerCallback):
    """
    Writes which run and phase a Trainer checkpoint belongs to, and the settings it trained under, into the
    `trainer_state.json` of every checkpoint of that phase (written with it, so never without it).
    """

    def __init__(self, run_id: str, phase: str, settings: dict):
        self.identity = {"run_id": run_id, "phase": phase, "settings": settings}

    def on_train_begin(self, args, state, control, **kwargs):
        state.stateful_callbacks[CHECKPOINT_KEY] = self.identity


def is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return json.load(f)["global_step"]


def run_settings(model, peft_config, prompts, args, planned_steps: int, sampling, rehearsal=None) -> dict:
    """
    What the snapshots (`harvest`), the trajectories (`trajectories`, from `SamplingParams`), the mixture the student
    draws from (`mixture`; online, the snapshots too) and, with `rehearsal` (the rehearsal prompts and their
    `SamplingParams`), the rehearsal answers (`rehearsal`) depend on.
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
    weights = args.snapshot_weights
    mixture = {
        "label_weight": args.label_weight,
        "trajectory_choice": args.trajectory_choice,
        "snapshot_weights": None if weights is None else list(weights),
        "trajectory_filter": args.trajectory_filter,
        "min_verifier_score": args.min_verifier_score,
        "unfinished_trajectories": args.unfinished_trajectories,
        "trajectories_to_generate": "drawn" if args.generates_drawn_trajectories_only else "all",
        "rehearsal_weight": args.rehearsal_weight,
    }
    settings = {"harvest": harvest, "trajectories": trajectories, "mixture": mixture}
    if rehearsal is not None:
        rehearsal_prompts, rehearsal_sampling = rehearsal
        settings["rehearsal"] = {
            "prompts": dataset_digest(rehearsal_prompts),
            "num_prompts": len(rehearsal_prompts),
            **{k: v for k, v in dataclasses.asdict(rehearsal_sampling).items() if k != "batch_size"},
            "generation_backend": args.generation_backend,
        }
    return settings


def sampling_changes(recorded: dict, current: dict) -> list[str]:
    """
    The differences between the sampling settings the trajectories on disk were `recorded` with and the `current` ones
    that make them unusable: any but `trajectories_to_generate` from every pair (`"all"`) to the drawn ones, which a
    student that samples only what it draws finds among them.
    """
    changed = differences(recorded, current)
    if recorded.get("trajectories_to_generate") != "drawn":
        changed = [change for change in changed if not change.startswith("trajectories_to_generate:")]
    return changed


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
        self.checkpoints: dict[str, str | None] = {}  # the Trainer checkpoint each phase resumes from
        self.started = False  # one run per trainer: a second `start` would train on the first one's state
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

    def start(self, settings: dict, planned_steps: int, resume_from_checkpoint, output_dir: str) -> None:
        """
        Begin a run: a fresh one replaces what a previous run left in the folder; a resumed one checks that the record
        has the same harvest settings (online: the same settings of every kind, since every snapshot after step 0
        depends on the mixture and the sampling) and that the checkpoints it resumes from belong to it, and samples
        again what was sampled under other settings. `output_dir` holds the checkpoints of the student (or of the
        online run).
        """
        if self.started:
            raise RuntimeError(
                "This `TMSTrainer` has already run `train()`: its model, training data and history are those of that "
                "run. Create a new `TMSTrainer` for another run (with `train(resume_from_checkpoint=True)` to continue "
                "an interrupted one)."
            )
        self.checkpoints = {}
        online = settings["harvest"]["tms_mode"] == "online"
        fresh = {"run_id": uuid.uuid4().hex, "settings": settings, "planned_steps": planned_steps}
        record = read_run(self.history_dir) if resume_from_checkpoint else None
        if record is None:
            if resume_from_checkpoint and isinstance(resume_from_checkpoint, str):
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint!r}: {self.history_dir} holds no record of a TMS run "
                    f"({RUN_FILE}). Pass the same `history_dir` (or `output_dir`) as the interrupted run, or start "
                    "again without `resume_from_checkpoint`."
                )
            if resume_from_checkpoint:
                logger.warning(f"No interrupted TMS run in {self.history_dir}: starting from the beginning.")
            self.clear()
            self.record, self.started = fresh, True
            self.save()
            return
        record.setdefault("run_id", fresh["run_id"])  # a record of an older version: none of its checkpoints is taken
        kinds = set(settings) | set(record["settings"]) if online else {"harvest"}
        changed = differences({k: record["settings"].get(k) for k in kinds}, {k: settings.get(k) for k in kinds})
        if changed:
            raise ValueError(
                f"The history in {self.history_dir} comes from a run with other settings, so its snapshots cannot be "
                f"reused: {'; '.join(changed)}. Resume with the settings of that run, pass another `history_dir`, or "
                "start again without `resume_from_checkpoint` (the history is then replaced)."
            )
        self.record = record
        resampled = sampling_changes(record["settings"]["trajectories"], settings["trajectories"])
        if not resampled:  # the trajectories on disk keep the settings they were sampled with (every pair serves all)
            settings = {**settings, "trajectories": record["settings"]["trajectories"]}
        # Found (and checked) before anything is deleted: a refused resume leaves the run as it was.
        last = "online" if online else "student"
        self.checkpoints = {
            "harvest": self._checkpoint(resume_from_checkpoint, self.harvest_dir, "harvest"),
            last: self._checkpoint(resume_from_checkpoint, output_dir, last, self.phase_settings(last, settings)),
        }
        if resampled:
            self._discard("trajectories", (self.trajectories_dir, self.parts_dir), resampled)
            record.pop("trajectory_seconds", None)
        if record["settings"].get("rehearsal") != settings.get("rehearsal"):
            changed = differences(record["settings"].get("rehearsal") or {}, settings.get("rehearsal") or {})
            self._discard("rehearsal", (self.rehearsal_dir, self.rehearsal_parts_dir), changed)
        record["settings"] = settings
        self.started = True
        self.save()

    def _discard(self, phase: str, folders: tuple[str, ...], changed: list[str]) -> None:
        """Delete what `phase` generated (finished, or in parts), because the settings it depends on `changed`."""
        if self.done(phase) or any(os.path.isdir(folder) for folder in folders):
            logger.warning(
                f"Settings of the {phase} changed since it was generated ({'; '.join(changed)}): the snapshots are "
                f"reused and the {phase} generated again."
            )
        self.record[f"{phase}_done"] = False
        if self.is_main:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)

    def phase_settings(self, phase: str, settings: dict | None = None) -> dict:
        """
        What a phase's training depends on beyond the run (written into its checkpoints): for the student, the
        mixture, the trajectories and the rehearsal answers it draws from; the harvest and the online run depend on
        nothing the record does not hold.
        """
        if phase != "student":
            return {}
        settings = self.record["settings"] if settings is None else settings
        return {kind: settings.get(kind) for kind in ("mixture", "trajectories", "rehearsal")}

    def identity(self, phase: str) -> RunIdentity:
        """The callback that marks each Trainer checkpoint of `phase` as this run's."""
        return RunIdentity(self.record["run_id"], phase, self.phase_settings(phase))

    def done(self, phase: str) -> bool:
        """
        Whether `phase` (`"harvest"`, `"trajectories"`, `"rehearsal"`, `"online"`) finished in this run or the one it
        resumes.
        """
        return bool(self.record.get(f"{phase}_done"))

    def finish(self, phase: str, **fields) -> None:
        """
        Record that `phase` finished, with what a resumed run needs of it. Once the generation is recorded as done
        (`"trajectories"`, `"online"`), its scratch is removed: never before, so that an interruption in between
        loses no sampled part.
        """
        self.record.update({f"{phase}_done": True, **fields})
        self.save()
        if phase in ("trajectories", "online"):
            self.remove_generation_scratch()

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

    def checkpoint(self, phase: str) -> str | None:
        """The Trainer checkpoint `phase` resumes from (None: from its first step), as found by `start`."""
        return self.checkpoints.get(phase)

    def resume_harvest(self, history, num_checkpoints: int) -> str | None:
        """
        The harvest's checkpoint to resume from (None: from its first step), once `history` holds the snapshots the
        harvest had taken up to it (of its `num_checkpoints`); the later ones it takes again.
        """
        checkpoint = self.checkpoint("harvest")
        if checkpoint is not None:
            planned = snapshot_steps(self.record["planned_steps"], num_checkpoints)
            self.reopen_snapshots(history, [s for s in planned if s <= checkpoint_step(checkpoint)])
        return checkpoint

    def _checkpoint(self, resume_from_checkpoint, folder: str, phase: str, settings: dict | None = None) -> str | None:
        """
        The checkpoint of this run's `phase` in `folder` to resume from: the one named if it lies there, else the
        latest one of this run (those of another run, e.g. an older run in the same `output_dir`, are passed over).
        Raises if the named one is another run's, or if the one found was trained under other `settings`.
        """
        named = isinstance(resume_from_checkpoint, str)
        if named and not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder.")
        if named and not is_inside(resume_from_checkpoint, folder):
            return None
        others = []
        for path in [resume_from_checkpoint] if named else checkpoints(folder):
            identity = checkpoint_identity(path) or {}
            if identity.get("run_id") == self.record["run_id"] and identity.get("phase") != phase:
                if named:  # a checkpoint of another phase of this run (the harvest's lie under `output_dir` too)
                    return None
                continue
            if identity.get("run_id") != self.record["run_id"]:
                if named:
                    raise ValueError(
                        f"{path} is not a checkpoint of the run recorded in {self.history_dir} (it was written by "
                        "another run, or by an older version). Resume from one of this run's checkpoints, or start "
                        "again without `resume_from_checkpoint`."
                    )
                others.append(os.path.basename(path))
                continue
            changed = differences(identity.get("settings") or {}, settings or {})
            if changed:
                raise ValueError(
                    f"The {phase} checkpoint {path} was trained with other settings: {'; '.join(changed)}. Resume with "
                    f"the settings of that run, or train this {phase} from its first step: delete its checkpoints or "
                    "pass another `output_dir`."
                )
            break
        else:
            path = None
        if others:
            logger.warning(
                f"Passing over {', '.join(others)} in {folder}: written by another run, not the one recorded in "
                f"{self.history_dir}."
            )
        return path


def check_writable(folder: str, field: str) -> None:
    """Fail at the start, not hours later at the first snapshot or checkpoint, when `folder` cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(
            f"Cannot write to `{field}` {folder!r} ({error.strerror or error}). TMS writes its snapshots, trajectories "
            f"and checkpoints there: pass a writable `{field}`."
        ) from error
