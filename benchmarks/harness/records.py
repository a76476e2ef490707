"""The result format: one JSON record per (regime, arm, seed), written as the run finishes, so that a rerun resumes.

`<output_dir>/arms/<regime>/<arm>_s<seed>.json` holds `arm`, `regime`, `seed`, `task`, `settings`, `steps`,
`wall_seconds` (by phase), `load_average` (before and after training) and `checkpoints`: one dict per evaluated step
(`step`, `fraction` of the run, and `ProbeSuite.evaluate`'s values: `target_accuracy`, `wikitext_nll`, `chat_kl`,
`chat_nll`, `pld`, `retention_kl`, at the last one `piqa_acc`, `siqa_acc`, `ifeval_acc`; per-item values under
`items`), `versions` (`library_versions`: what it was measured under; records before it have none) and `machine`
(`machine`: which boot of which machine timed it; walls are compared only within one). The base model's
record (`base_s0.json`) has one `final` checkpoint instead.

`retention.py`, folded into the harness, wrote another layout (`<output_dir>/arms/<arm>[_<regime>]_s<seed>.json`
with one `base.json`, results/retention*/): `load_arms` reads it as records of this format, each with its one final
checkpoint (`from_retention_layout`).
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata

from trl_tms.atomic import write_json_atomically


def arm_path(output_dir: str, regime: str, arm: str, seed: int) -> str:
    return os.path.join(output_dir, "arms", regime, f"{arm}_s{seed}.json")


LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "trl-tms")


def library_versions() -> dict:
    """
    Python's and `LIBRARIES`' versions in this process (None: not installed). A fresh install resolves the newest
    releases within the package's bounds, so a record measured later may have run under another PEFT or transformers.
    """
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict:
    """
    The machine a run is timed on: the kernel's boot id (a fresh machine, or this one rebooted, has another), its CPU
    and core count. Sessions may land on different machines; a wall is comparable only with walls of the same boot.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = None
    return {"boot_id": boot, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


def machine_key(record: dict) -> str | None:
    """The boot a record was timed on; None for records written before `machine` was stored (one group)."""
    return (record.get("machine") or {}).get("boot_id")


def versions_line(versions: dict | None) -> str:
    """`versions` in one line, e.g. `torch 2.13.0 · peft 0.21.2 · ...`; "not recorded" for a record without them."""
    if not versions:
        return "not recorded"
    return " · ".join(f"{name} {version}" for name, version in versions.items() if version)


def write_record(output_dir: str, record: dict) -> str:
    """Write `record` (with its `regime`, `arm` and `seed`) atomically where `load_arms` finds it; returns the path."""
    path = arm_path(output_dir, record["regime"], record["arm"], record["seed"])
    write_json_atomically(path, record)
    return path


def load_arms(output_dir: str) -> dict:
    """Every record under `output_dir`: `{regime: {arm: [records, by seed]}}`."""
    root = os.path.join(output_dir, "arms")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    if any(name.endswith(".json") for name in names):
        return from_retention_layout(root)
    found = {}
    for regime in names:
        for name in sorted(os.listdir(os.path.join(root, regime))):
            with open(os.path.join(root, regime, name)) as f:
                record = json.load(f)
            found.setdefault(regime, {}).setdefault(record["arm"], []).append(record)
    return found


def final(record: dict) -> dict:
    return record["final"] if "final" in record else record["checkpoints"][-1]


def early(record: dict) -> dict:
    """The checkpoint at half the run's steps (SFT stopped early)."""
    return min(record["checkpoints"], key=lambda c: abs(c["fraction"] - 0.5))


def ran_alone(record: dict) -> bool:
    """
    Whether the run had the machine to itself: no `contended` note in its record (added by hand, with the reason, when
    another job is known to have run during its training) and a 1-minute load average within the run's own threads
    (+0.5) at both ends.
    """
    if record.get("contended"):
        return False
    load = record.get("load_average")
    return load is None or max(load["before"], load["after"]) <= load["threads"] + 0.5


def from_retention_layout(root: str) -> dict:
    """
    `retention.py`'s records as this format's: each run's probe values (measured once, after training) become its one
    final checkpoint (`final_only`: the report reads no `sft_early` off it); the logged PLD curve is kept as
    `pld_curve`, what a TMS student drew from as `trajectory_quality`; a student on another arm's history has
    `reused_history` in its wall times. The one base record is every regime's base.
    """
    base, found = None, {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(root, name)) as f:
            old = json.load(f)
        checkpoint = {"step": old.get("steps"), "fraction": 1.0, "target_accuracy": old["target_accuracy"],
                      **old["retention"], "items": old["items"], "target_examples": old.get("target_examples"),
                      "eval_seconds": old.get("eval_seconds")}
        if old["arm"] == "base":
            base = checkpoint
            continue
        walls = {k: v for k, v in old["wall_seconds"].items() if v is not None}
        if old["wall_seconds"].get("harvest", 0) is None:
            walls["reused_history"] = True
        stats = dict(old.get("tms_stats") or {})
        record = {"arm": old["arm"], "regime": old["regime"], "seed": old["seed"],
                  # The committed retention runs all trained on leg_counting (`--task` defaulted to it).
                  "task": old["settings"].get("task", "leg_counting"), "settings": old["settings"],
                  "steps": old.get("steps"), "wall_seconds": walls, "checkpoints": [checkpoint], "final_only": True,
                  "pld_curve": old.get("pld", [])}
        if "trajectory_quality" in stats:
            record["trajectory_quality"] = stats.pop("trajectory_quality")
        if stats:
            record["tms_stats"] = stats
        if "from_harvest_of" in old:
            record["from_harvest_of"] = old["from_harvest_of"]
        found.setdefault(old["regime"], {}).setdefault(old["arm"], []).append(record)
    if base is None:
        raise FileNotFoundError(f"{root} holds retention.py records but no base.json: the changes need the base.")
    for regime, by_arm in found.items():
        by_arm["base"] = [{"arm": "base", "regime": regime, "seed": 0, "final": base}]
    return {regime: found[regime] for regime in sorted(found)}
