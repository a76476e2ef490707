"""Where a TMS run's time goes, as fractions of a plain SFT run of the same data, steps and seed (issue #46).

    python benchmarks/cost.py                       # sft, online, two_pass, one after another, alone on the machine
    python benchmarks/cost.py --arms sft,online     # a subset; arms already in results/cost/arms/ are kept
    python benchmarks/cost.py --report_only         # the table from the saved arms
    python benchmarks/cost.py --smoke               # a few steps of each arm, to check the script (not a measurement)
    python benchmarks/cost.py --accuracy_check      # the recipe's accuracy and drift against before, from the study

The run is `cost_t10.py`'s: the study's learn-from-zero regime (`harness/registry.py`, `zero`), the embedded
SmolLM2-135M-Instruct, LoRA r=64, lr 1e-3, 64 `leg_counting` problems with worked answers, batch 8, 4 epochs (32
optimizer steps), seed 0, trajectories of at most 128 new tokens, 64 rows per `generate` call. The arms
(`registry.COST_BREAKDOWN_ARMS`), each in its own process:

- `sft`: plain `trl.SFTTrainer`, what a user would run instead;
- `online`: the recommended recipe, `TMSConfig(recipe="retention")` (online TMS at `label_weight` 0.75), everything
  else at the package's defaults but the run's generation length and call size above (`SETUP`), as in `cost_t10.py`;
- `two_pass`: the paper's, `recipe="paper"` at T = `num_checkpoints` = 10;
- `online_pld` (only when named): `online` with PLD logged (`log_pld=True`), what the signal costs;
- `online_budget` (only when named): `online` with trajectories as long as the longest label
  (`max_new_tokens_from_labels=1.0`), what the length budget saves.

Each arm's time is split into what it was spent on (`breakdown`), each part divided by the `sft` arm's wall time:

- training on labels / on trajectories: every optimizer step timed by a callback (from `on_step_begin` to
  `on_step_end`, called before any other callback's `on_step_end`, so snapshots, refreshes and signals fall outside),
  each step's time split in proportion to the non-padding tokens of its batch's label rows and the other rows
  (trajectories, and rehearsal answers if any), read from the per-example flag `trl_tms.mixture.IS_LABEL` in the
  inputs of the trainer's public `compute_loss` (a batch without it, the harvest's or SFT's, is all labels);
- generation: the time inside the trainer's `generator.generate` calls (plus the self-rehearsal answers' generation);
- plan: the rest of the trajectory phase or refreshes as the trainer counts it (`trainer.stats.seconds`, logged as
  `tms_trajectory_seconds`): planning the pairs to sample, building the candidates, saving the trajectories;
- PLD: the time inside `trainer.pld_callback.measure`; the forgetting meter: `trainer.retention_callback.seconds`;
- snapshots: the time inside `trainer.history.take` and `trainer.history.flush` (copying the adapter, writing it to
  disk, waiting for background writes);
- other: the rest of the arm's `train()` wall time (data loading, logging, the phases' setup).

Each arm is saved as it finishes (`results/cost/arms/<arm>.json`, with the machine's load average at both ends) and
skipped by a rerun (`--force` trains it again); the report (`cost.md`, `cost.json`) divides by the `sft` arm's wall
time, so rerun every arm together: this machine's speed varies between sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import registry, tasks, training  # noqa: E402
from harness.measure import OtherCPU, PeakRSS, load_average  # noqa: E402
from trl_tms.atomic import write_json_atomically  # noqa: E402
from trl_tms.mixture import IS_LABEL  # noqa: E402

OUTPUT_DIR = os.path.join(HERE, "results", "cost")
SMOKE_DIR = os.path.join(tempfile.gettempdir(), "trl_tms_cost_smoke")
ARMS = registry.COST_BREAKDOWN_ARMS
DEFAULT_ARMS = ("sft", "online", "two_pass")
# The run: cost_t10.py's, so that its arms and these measure the same work.
SETUP = dict(regime=registry.REGIMES["zero"], num_train=64, num_pld=48, task_tokens=registry.TASK_TOKENS,
             generation_batch_size=64)
# `--smoke`: a few steps of each arm, to check that the script runs end to end (T = 2 fits its 4 steps).
SMOKE = dict(SETUP, regime=dict(SETUP["regime"], epochs=1), num_train=32, num_pld=8, task_tokens=16, num_checkpoints=2)
PARTS = ("label_training", "trajectory_training", "generation", "plan", "pld", "meter", "snapshots")
COLUMNS = {  # a part and its column's heading, in the table's order
    "label_training": "train on labels", "trajectory_training": "train on trajectories", "generation": "generation",
    "plan": "plan", "pld": "PLD", "meter": "meter", "snapshots": "snapshots", "other": "other",
}
CAPTION = (
    "Each column is a share of the `sft` arm's wall time. Training: every optimizer step timed by a callback "
    "(`on_step_begin` to the first `on_step_end`), split between the label rows and the other rows (trajectories, "
    "rehearsal answers) of its batch in proportion to their non-padding tokens (the `tms_is_label` flag of each row). "
    "Generation: time inside `trainer.generator.generate`. Plan: the rest of the trainer's trajectory time "
    "(`tms_trajectory_seconds`: planning the pairs, building the candidates, saving). PLD: time inside "
    "`pld_callback.measure`; meter: `retention_callback.seconds`; snapshots: time inside `history.take` and "
    "`history.flush`. Other: the rest of the arm's `train()` wall time (data loading, logging, setup)."
)


# The arithmetic of the breakdown


def split_step(seconds: float, label_tokens: int, other_tokens: int) -> tuple[float, float]:
    """One optimizer step's `seconds` split between its label rows and its other rows by their tokens."""
    total = label_tokens + other_tokens
    if total == 0:  # nothing counted (no loss computed in the step): nothing to split by, call it labels
        return seconds, 0.0
    return seconds * label_tokens / total, seconds * other_tokens / total


def training_seconds(steps: list[dict]) -> dict[str, float]:
    """Per-step records (`seconds`, `label_tokens`, `other_tokens`) summed into label and trajectory training time."""
    label = other = 0.0
    for step in steps:
        a, b = split_step(step["seconds"], step["label_tokens"], step["other_tokens"])
        label, other = label + a, other + b
    return {"label_training": label, "trajectory_training": other}


def breakdown(record: dict, sft_wall: float) -> dict[str, float]:
    """
    An arm's `seconds` by part (`PARTS`; missing parts count 0) as fractions of `sft_wall`, with `other` (its wall time
    not in any part; negative if the parts overlap) and `total` (its wall time over `sft_wall`).
    """
    if sft_wall <= 0:
        raise ValueError(f"The `sft` arm's wall time must be positive, got {sft_wall}.")
    seconds = record["seconds"]
    fractions = {part: seconds.get(part, 0.0) / sft_wall for part in PARTS}
    fractions["other"] = (record["wall_seconds"] - sum(seconds.get(part, 0.0) for part in PARTS)) / sft_wall
    fractions["total"] = record["wall_seconds"] / sft_wall
    return fractions


def table(breakdowns: dict[str, dict[str, float]], walls: dict[str, float]) -> str:
    """The markdown table of `breakdown`s by arm (`walls`: each arm's wall time in seconds)."""
    lines = ["| arm | wall | / SFT | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for arm, fractions in breakdowns.items():
        cells = [arm, f"{walls[arm]:.0f} s", f"{fractions['total']:.2f}"] + [f"{fractions[c]:.2f}" for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Measuring an arm


class StepTimer(TrainerCallback):
    """
    Times every optimizer step and counts the label and other tokens it trained on, through `compute_loss` (wrapped by
    `attach`). Put first among the callbacks, so that its `on_step_end` runs before the others' work.
    """

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict | None = None

    def attach(self, trainer) -> None:
        trainer.callback_handler.callbacks.insert(0, self)
        compute_loss = trainer.compute_loss

        def counting_compute_loss(model, inputs, *args, **kwargs):
            if self.current is not None:
                self.count(inputs)
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting_compute_loss

    def count(self, inputs: dict) -> None:
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = inputs["labels"] != -100
        tokens = mask.sum(dim=1).float().cpu()
        is_label = inputs.get(IS_LABEL)
        is_label = torch.ones_like(tokens) if is_label is None else is_label.float().cpu()
        self.current["label_tokens"] += int((tokens * is_label).sum())
        self.current["other_tokens"] += int((tokens * (1 - is_label)).sum())
        self.current["padded_tokens"] += int(mask.numel())

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self.current = dict(seconds=time.perf_counter(), label_tokens=0, other_tokens=0, padded_tokens=0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.current is not None:
            synchronize()  # on a GPU, the step's kernels are its time, not that of whatever waits on them next
            self.current["seconds"] = time.perf_counter() - self.current["seconds"]
            self.steps.append(self.current)
            self.current = None


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(owner, name: str, clock: dict, key: str) -> None:
    """Replace `owner.name` by a wrapper that adds its seconds to `clock[key]`."""
    method = getattr(owner, name)

    def wrapper(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - begun

    setattr(owner, name, wrapper)


def run_arm(arm: str, workdir: str, smoke: bool = False) -> dict:
    """Train one arm in this process; its wall time by part (see `breakdown`) and its peak resident memory."""
    from trl import SFTConfig, SFTTrainer

    from trl_tms import TMSConfig, TMSTrainer

    setup = SMOKE if smoke else SETUP
    regime = setup["regime"]
    train, test = tasks.load_task(regime["task"], setup["num_train"], 100, seed=0)
    pld_set = test.select(range(setup["num_pld"]))
    model, tokenizer = training.load_model()
    out = os.path.join(workdir, arm)
    common = dict(
        per_device_train_batch_size=registry.BATCH_SIZE, num_train_epochs=regime["epochs"],
        learning_rate=regime["learning_rate"], lr_scheduler_type="linear", warmup_steps=0, save_strategy="no",
        report_to="none", seed=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(), bf16=False,
        max_length=setup["task_tokens"] + 160,
    )
    plain = ARMS[arm].method == "sft"
    if plain:
        trainer = SFTTrainer(model=model, args=SFTConfig(out, **common), train_dataset=train,
                             processing_class=tokenizer, peft_config=training.lora_config(regime))
    else:
        fields = dict(ARMS[arm].settings)
        if "num_checkpoints" in setup:
            fields["num_checkpoints"] = setup["num_checkpoints"]
        config = TMSConfig(out, max_new_tokens=setup["task_tokens"],
                           generation_batch_size=setup["generation_batch_size"], **fields, **common)
        trainer = TMSTrainer(model=model, args=config, train_dataset=train, eval_dataset=pld_set,
                             processing_class=tokenizer, peft_config=training.lora_config(regime))
    timer = StepTimer()
    timer.attach(trainer)
    clock = dict.fromkeys(("generation", "pld", "snapshots"), 0.0)
    if not plain:
        timed(trainer.generator, "generate", clock, "generation")
        timed(trainer.history, "take", clock, "snapshots")
        timed(trainer.history, "flush", clock, "snapshots")
        if trainer.pld_callback is not None:
            timed(trainer.pld_callback, "measure", clock, "pld")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with PeakRSS() as memory, OtherCPU() as others:
        trainer.train()
    wall = time.perf_counter() - started
    seconds = training_seconds(timer.steps)
    record = {"arm": arm, "smoke": smoke, "settings": None if plain else dict(ARMS[arm].settings),
              "steps": trainer.state.global_step, "wall_seconds": wall, "seconds": seconds,
              "tokens": {kind: sum(step[f"{kind}_tokens"] for step in timer.steps)
                         for kind in ("label", "other", "padded")}}
    if not plain:
        stats = trainer.stats
        generation = clock["generation"] + stats.rehearsal_seconds
        meter = trainer.retention_callback
        seconds.update(generation=generation, plan=max(0.0, stats.seconds - clock["generation"]), pld=clock["pld"],
                       meter=meter.seconds if meter is not None else 0.0, snapshots=clock["snapshots"])
        record.update(trajectory_seconds=stats.seconds, trajectories_sampled=stats.trajectories,
                      trajectories_not_sampled=stats.not_sampled)
    record.update(train_peak_rss_mb=memory.peak / 2**20, load_average=load_average(load_before),
                  other_cores=others.cores)
    return record


# The report


def load_records(output_dir: str) -> dict[str, dict]:
    records = {}
    for arm in ARMS:
        path = os.path.join(output_dir, "arms", f"{arm}.json")
        if os.path.isfile(path):
            with open(path) as f:
                records[arm] = json.load(f)
    return records


def report(output_dir: str) -> dict:
    """The breakdown of every saved arm over the `sft` arm's wall time: printed, and written as `cost.{md,json}`."""
    records = load_records(output_dir)
    if "sft" not in records:
        print("No `sft` arm saved yet: nothing to divide by.")
        return {"arms": records}
    sft_wall = records["sft"]["wall_seconds"]
    breakdowns = {arm: breakdown(record, sft_wall) for arm, record in records.items()}
    text = table(breakdowns, {arm: record["wall_seconds"] for arm, record in records.items()})
    loads = ", ".join(f"{arm} {r['load_average']['before']:.1f} / {r['load_average']['after']:.1f}"
                      for arm, r in records.items())
    shared = contended(records)
    others = ", ".join(f"{arm} {r['other_cores']:.2f}" for arm, r in records.items() if r.get("other_cores") is not None)
    if shared:
        text += (f"\n\nNot comparable: other processes kept {', '.join(shared)} core(s) busy while these arms trained "
                 f"(more than {OTHER_CORES_LIMIT}); rerun them alone.")
    print(text)
    result = {"setup": SMOKE if any(r.get("smoke") for r in records.values()) else SETUP,
              "threads": torch.get_num_threads(), "breakdown": breakdowns, "arms": records}
    write_json_atomically(os.path.join(output_dir, "cost.json"), result)
    with open(os.path.join(output_dir, "cost.md"), "w") as f:
        f.write(f"# Where TMS's time goes, as shares of plain SFT's (`python benchmarks/cost.py`)\n\n{text}\n\n"
                f"{CAPTION}\n\n1-minute load average before / after each arm (threads: {torch.get_num_threads()}): "
                f"{loads}.\n" + (f"\nCores other processes kept busy while each arm trained: {others}.\n" if others else ""))
    return result


OTHER_CORES_LIMIT = 0.1  # cores other processes may keep busy while an arm trains before its wall time is not its own


def contended(records: dict[str, dict]) -> list[str]:
    """The arms during whose training other processes kept more than `OTHER_CORES_LIMIT` cores busy ("arm (cores)")."""
    return [f"{arm} ({r['other_cores']:.2f})" for arm, r in records.items()
            if (r.get("other_cores") or 0.0) > OTHER_CORES_LIMIT]


# Does the faster recipe learn and retain as before? (Issue #46: partly regime, two seeds, within standard errors.)

STUDY_DIR = os.path.join(HERE, "results", "study")
# `new`: the faster settings checked (study arms, `harness/registry.py`), each against `old`, the online TMS the study
# measured before the cuts.
CHECK = dict(regime="partly", new=("recipe_t10", "recipe_t5", "recipe_budget"), old="tms_online_alpha_75",
             measures={"target accuracy": ("target_accuracy", "target"), "chat KL": ("chat_kl", "chat_kl"),
                       "WikiText NLL": ("wikitext_nll", "wikitext")})


def paired_difference(new: list[dict], old: list[dict], key: str, items: str) -> dict:
    """
    `new` minus `old` at their final checkpoints, seed by seed (records of the same seed share their items), each with
    the standard error of its item-wise differences, and their mean over the seeds both have with its standard error
    (the seeds' errors combined). `old_seed_range`: the spread of `old` itself over its seeds (max - min; 0 with one
    seed), the training-seed noise the item-wise errors leave out. Raises if no seed is in both.
    """
    from harness.probes import paired_se
    from harness.records import final

    by_seed = {r["seed"]: final(r) for r in old}
    seeds = sorted(r["seed"] for r in new if r["seed"] in by_seed)
    if not seeds:
        raise ValueError(f"No seed measured in both arms: new {sorted(r['seed'] for r in new)}, old {sorted(by_seed)}.")
    per_seed = []
    for record in sorted(new, key=lambda r: r["seed"]):
        if record["seed"] not in by_seed:
            continue
        a, b = final(record), by_seed[record["seed"]]
        if len(a["items"][items]) != len(b["items"][items]):
            raise ValueError(f"Seed {record['seed']}: {len(a['items'][items])} items against {len(b['items'][items])}.")
        per_seed.append({"seed": record["seed"], "new": a[key], "old": b[key], "difference": a[key] - b[key],
                         "se": paired_se(a["items"][items], b["items"][items])})
    difference = sum(p["difference"] for p in per_seed) / len(per_seed)
    se = sum(p["se"] ** 2 for p in per_seed) ** 0.5 / len(per_seed)
    old_values = [c[key] for c in by_seed.values()]
    return {"seeds": per_seed, "difference": difference, "se": se,
            "new": sum(p["new"] for p in per_seed) / len(per_seed), "old": sum(p["old"] for p in per_seed) / len(per_seed),
            "old_seed_range": max(old_values) - min(old_values)}


def check_table(new: str, result: dict) -> str:
    """One markdown table: `new` against `CHECK["old"]`, a row per measure."""
    lines = [f"| measure | `{CHECK['old']}` | `{new}` | difference | paired SE | within 2 SE | per seed | "
             f"`{CHECK['old']}` seed range |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        seeds = "; ".join(f"s{p['seed']}: {p['difference']:+.3f} ± {p['se']:.3f}" for p in r["seeds"])
        lines.append(f"| {name} | {r['old']:.3f} | {r['new']:.3f} | {r['difference']:+.3f} | {r['se']:.3f} | "
                     f"{'yes' if abs(r['difference']) <= 2 * r['se'] else 'no'} | {seeds} | {r['old_seed_range']:.3f} |")
    return "\n".join(lines)


def accuracy_check(study_dir: str, output_dir: str) -> dict | None:
    """Each of `CHECK["new"]`'s arms that the study has measured, compared with `CHECK["old"]` measure by measure from
    the study's records: printed, written as `accuracy_check.{md,json}`. None (and how to run them) if none is."""
    from harness.records import load_arms

    arms = load_arms(study_dir).get(CHECK["regime"], {})
    measured = [arm for arm in CHECK["new"] if arm in arms]
    if CHECK["old"] not in arms or not measured:
        print(f"The study has no {CHECK['old']} record or none of {', '.join(CHECK['new'])} in {CHECK['regime']} "
              f"yet: run `python benchmarks/study.py --regimes {CHECK['regime']} --arms {','.join(CHECK['new'])} "
              f"--seeds 0,1`.")
        return None
    results = {arm: {name: paired_difference(arms[arm], arms[CHECK["old"]], key, items)
                     for name, (key, items) in CHECK["measures"].items()} for arm in measured}
    sections = []
    for arm, result in results.items():
        seeds = ", ".join(str(p["seed"]) for p in next(iter(result.values()))["seeds"])
        sections.append(f"## `{arm}` (seeds {seeds})\n\n{check_table(arm, result)}\n")
    text = "\n".join(sections)
    print(text)
    write_json_atomically(os.path.join(output_dir, "accuracy_check.json"), {"check": CHECK, "result": results})
    with open(os.path.join(output_dir, "accuracy_check.md"), "w") as f:
        f.write(f"# The faster settings against the one they replace (`python benchmarks/cost.py --accuracy_check`)\n\n"
                f"Study regime `{CHECK['regime']}`, final checkpoints, seed by seed (same training data, held-out "
                f"items and everyday prompts), from `benchmarks/results/study/arms/`. The paired SE is over items; "
                f"the last column is how far `{CHECK['old']}`'s own seeds lie apart (training-seed noise).\n\n{text}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help="Comma-separated subset of " + ", ".join(ARMS) + ".")
    parser.add_argument("--output_dir", help=f"Default: {OUTPUT_DIR} ({SMOKE_DIR} with --smoke).")
    parser.add_argument("--force", action="store_true", help="Train the arms named even if they are saved.")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="A few steps per arm: checks the script, measures nothing.")
    parser.add_argument("--accuracy_check", action="store_true",
                        help=f"Compare the study's records of {', '.join(CHECK['new'])} with `{CHECK['old']}`'s, then stop.")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # one arm, in a child process
    args = parser.parse_args(argv)
    if args.accuracy_check:
        accuracy_check(STUDY_DIR, args.output_dir or OUTPUT_DIR)
        return
    if args.arm:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(run_arm(args.arm, workdir, args.smoke)))
        return
    output_dir = args.output_dir or (SMOKE_DIR if args.smoke else OUTPUT_DIR)
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"Unknown arms {sorted(unknown)}: choose among {', '.join(ARMS)}.")
    if not args.report_only:
        for arm in arms:
            path = os.path.join(output_dir, "arms", f"{arm}.json")
            if os.path.isfile(path) and not args.force:
                with open(path) as f:
                    if json.load(f).get("smoke", False) == args.smoke:
                        continue
            print(f"training {arm} ({time.strftime('%H:%M:%S')})", flush=True)
            command = [sys.executable, __file__, "--arm", arm] + (["--smoke"] if args.smoke else [])
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            write_json_atomically(path, record)
            print(f"{arm}: {record['wall_seconds']:.0f} s", flush=True)
    report(output_dir)


if __name__ == "__main__":
    main()
