"""What a TMS run leaves in its history folder so that an interrupted run can continue instead of starting over.

`<history_dir>/tms_run.json` records what the snapshots and the trajectories depend on (model, LoRA, data, schedule,
sampling), the harvest's log and, once each phase ends, that it is complete. A resumed run reuses a phase only when
its record matches the current settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from transformers.trainer_utils import get_last_checkpoint

from .atomic import write_json_atomically

RUN_FILE = "tms_run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def dataset_digest(dataset) -> str:
    """A content hash of the prompt and completion columns (in-memory datasets get random fingerprints)."""
    digest = hashlib.sha256()
    for column in ("prompt", "completion"):
        for value in dataset[column]:
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
