"""What TMS costs on top of SFT at the paper's defaults (T = 10, alpha = 0.25), on a run long enough to be realistic:
wall time by phase against a plain `trl.SFTTrainer` run of the same data, steps and seed (issue #22).

    python benchmarks/cost_t10.py                 # every arm, alone on the machine: about two hours on 2 CPU cores
    python benchmarks/cost_t10.py --arms sft,tms  # a subset; arms already in results/cost_t10/arms/ are kept
    python benchmarks/cost_t10.py --report_only   # the table from the saved arms

The run is the study's learn-from-zero regime (`harness/registry.py`, `zero`): the embedded SmolLM2-135M-Instruct,
LoRA r=64 on every linear layer, lr 1e-3, 64 `leg_counting` problems with worked answers, batch 8, 4 epochs (32 optimizer steps),
trajectories of at most 128 new tokens, 64 rows per `generate` call. Arms, each in its own process (so its peak memory
is its own), one after another:

- `sft`: plain `trl.SFTTrainer`, what a user would run instead;
- `tms`: `TMSTrainer` at the package's defaults (two-pass, only the drawn trajectories sampled, PLD on 32 held-out
  worked answers and the forgetting meter logged at TRL's default `logging_steps`);
- `tms_quiet`: the same without the live signals (`log_pld=False`, `log_retention=False`): what the algorithm costs;
- `tms_all`: as `tms`, sampling every (prompt, snapshot) pair (`trajectories_to_generate="all"`, the paper's procedure);
- `tms_online`, `tms_online_quiet`: online TMS (`tms_mode="online"`), with and without the live signals;
- `tms_memory`: `tms` with `generation_memory_mb` at 5% of the `sft` arm's peak memory (generation calls sized to hold
  their KV cache and logits within it), against the issue's target of a peak within 1.05x SFT's.

Each arm is saved as it finishes (`results/cost_t10/arms/<arm>.json`, with the machine's load average at both ends: a
1-minute load well above the thread count flags a run that shared the machine) and skipped by a rerun; the report
(`cost_t10.md`, `cost_t10.json`) divides by the `sft` arm's wall time. Ratios from arms run on different days are
not comparable (this machine's speed varies by 1.3-1.5x between sessions): rerun every arm together (`--force`).
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import registry, tasks, training  # noqa: E402
from harness.measure import PeakRSS, load_average  # noqa: E402
from trl_tms.atomic import write_json_atomically  # noqa: E402

OUTPUT_DIR = os.path.join(HERE, "results", "cost_t10")
NUM_TRAIN, NUM_PLD = 64, 48
REGIME = registry.REGIMES["zero"]
TASK_TOKENS = registry.TASK_TOKENS
ARMS = registry.COST_ARMS  # TMSConfig fields on top of the package's defaults; `sft` is a plain SFTTrainer
MEMORY_FRACTION = 0.05  # `tms_memory`'s generation budget, a share of the `sft` arm's peak memory


def run_arm(arm: str, workdir: str, generation_memory_mb: float | None = None) -> dict:
    """Train one arm in this process; wall time by phase, peak resident memory during `train()`."""
    from trl import SFTConfig, SFTTrainer

    from trl_tms import TMSConfig, TMSTrainer

    train, test = tasks.load_task(REGIME["task"], NUM_TRAIN, 100, seed=0)
    pld_set = test.select(range(NUM_PLD))
    model, tokenizer = training.load_model()
    out = os.path.join(workdir, arm)
    common = dict(
        per_device_train_batch_size=registry.BATCH_SIZE, num_train_epochs=REGIME["epochs"],
        learning_rate=REGIME["learning_rate"],
        lr_scheduler_type="linear", warmup_steps=0, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=False, max_length=TASK_TOKENS + 160,
    )
    load_before = os.getloadavg()[0]
    plain = ARMS[arm].method == "sft"
    if plain:
        trainer = SFTTrainer(model=model, args=SFTConfig(out, **common), train_dataset=train,
                             processing_class=tokenizer, peft_config=training.lora_config(REGIME))
    else:
        fields = dict(ARMS[arm].settings)
        if arm == "tms_memory":
            fields["generation_memory_mb"] = generation_memory_mb
        config = TMSConfig(out, max_new_tokens=TASK_TOKENS, generation_batch_size=64, **fields, **common)
        trainer = TMSTrainer(model=model, args=config, train_dataset=train, eval_dataset=pld_set,
                             processing_class=tokenizer, peft_config=training.lora_config(REGIME))
    signal_seconds = [0.0]
    if getattr(trainer, "pld_callback", None) is not None:  # PLD keeps no timer of its own: time its measurements
        measure = trainer.pld_callback.measure

        def timed_measure(*a, **k):
            begun = time.perf_counter()
            try:
                return measure(*a, **k)
            finally:
                signal_seconds[0] += time.perf_counter() - begun

        trainer.pld_callback.measure = timed_measure
    started = time.perf_counter()
    with PeakRSS() as memory:
        output = trainer.train()
    wall = time.perf_counter() - started
    phases = {"train": output.metrics["train_runtime"]}
    if not plain:
        if trainer.args.tms_mode == "online":
            phases = {"online": output.metrics["train_runtime"], "trajectories": trainer.stats.seconds}
        else:
            phases = {"harvest": trainer.harvest_output.metrics["train_runtime"], "trajectories": trainer.stats.seconds,
                      "student": output.metrics["train_runtime"]}
        phases["trajectories_sampled"] = trainer.stats.trajectories
        phases["trajectories_not_sampled"] = trainer.stats.not_sampled
        phases["pld_seconds"] = signal_seconds[0]
        meter = trainer.retention_callback
        phases["retention_seconds"] = meter.seconds if meter is not None else 0.0
    if arm == "tms_memory":
        phases["generation_memory_mb"] = generation_memory_mb
        phases["rows_per_call"] = trainer.generator.sampling.batch_size
    return {
        "arm": arm, "settings": None if plain else dict(ARMS[arm].settings), "steps": trainer.state.global_step,
        "wall_seconds": wall, **phases,
        "train_peak_rss_mb": memory.peak / 2**20,
        "load_average": load_average(load_before),
    }


def report(output_dir: str) -> dict:
    arms = {}
    for arm in ARMS:
        path = os.path.join(output_dir, "arms", f"{arm}.json")
        if os.path.isfile(path):
            with open(path) as f:
                arms[arm] = json.load(f)
    if "sft" not in arms:
        print("No `sft` arm saved yet: nothing to divide by.")
        return {"arms": arms}
    sft = arms["sft"]
    rows, ratios = [], {}
    for arm, record in arms.items():
        ratio = record["wall_seconds"] / sft["wall_seconds"]
        ratios[arm] = {"wall_over_sft": ratio,
                       "train_peak_rss_over_sft": record["train_peak_rss_mb"] / sft["train_peak_rss_mb"]}
        phases = ", ".join(f"{name} {record[name]:.0f} s" for name in ("harvest", "trajectories", "student", "online")
                           if name in record)
        if record.get("pld_seconds") or record.get("retention_seconds"):
            phases += f"; PLD {record['pld_seconds']:.0f} s, meter {record['retention_seconds']:.0f} s"
        sampled = (f"{record['trajectories_sampled']} of {record['trajectories_sampled'] + record['trajectories_not_sampled']}"
                   if "trajectories_sampled" in record else "")
        if "rows_per_call" in record:
            sampled += f" ({record['rows_per_call']} rows per call, {record['generation_memory_mb']:.0f} MiB)"
        load = record["load_average"]
        rows.append((arm, f"{record['wall_seconds']:.0f} s", f"{ratio:.2f}", phases, sampled,
                     f"{record['train_peak_rss_mb']:.0f} MB ({ratios[arm]['train_peak_rss_over_sft']:.2f})",
                     f"{load['before']:.1f} / {load['after']:.1f}"))
    lines = ["| arm | wall | / SFT | phases | trajectories sampled | peak RSS in train() (/ SFT) | load before / after |",
             "|---|---|---|---|---|---|---|"] + ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    result = {"regime": REGIME, "num_train": NUM_TRAIN, "task_tokens": TASK_TOKENS, "threads": torch.get_num_threads(),
              "ratios": ratios, "arms": arms}
    write_json_atomically(os.path.join(output_dir, "cost_t10.json"), result)
    with open(os.path.join(output_dir, "cost_t10.md"), "w") as f:
        f.write("# TMS / SFT wall time at T = 10 (`python benchmarks/cost_t10.py`)\n\n" + table + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated subset of " + ", ".join(ARMS) + ".")
    parser.add_argument("--output_dir", default=OUTPUT_DIR)
    parser.add_argument("--force", action="store_true", help="Train the arms named even if they are saved.")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # one arm, in a child process
    parser.add_argument("--generation_memory_mb", type=float, help=argparse.SUPPRESS)  # of `tms_memory`
    args = parser.parse_args(argv)
    if args.arm:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(run_arm(args.arm, workdir, args.generation_memory_mb)))
        return
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"Unknown arms {sorted(unknown)}: choose among {', '.join(ARMS)}.")
    if not args.report_only:
        for arm in args.arms.split(","):
            path = os.path.join(args.output_dir, "arms", f"{arm}.json")
            if os.path.isfile(path) and not args.force:
                continue
            print(f"training {arm} ({time.strftime('%H:%M:%S')})", flush=True)
            command = [sys.executable, __file__, "--arm", arm]
            if arm == "tms_memory":
                sft_path = os.path.join(args.output_dir, "arms", "sft.json")
                if not os.path.isfile(sft_path):
                    parser.error("`tms_memory` takes its budget from the `sft` arm's peak memory: run `sft` first.")
                with open(sft_path) as f:
                    budget = MEMORY_FRACTION * json.load(f)["train_peak_rss_mb"]
                command += ["--generation_memory_mb", str(budget)]
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            write_json_atomically(path, record)
            print(f"{arm}: {record['wall_seconds']:.0f} s", flush=True)
    report(args.output_dir)


if __name__ == "__main__":
    main()
