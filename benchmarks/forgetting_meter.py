"""The forgetting meter (`RetentionCallback`): what it costs, and whether it tracks forgetting measured otherwise.

    python benchmarks/forgetting_meter.py --mode cost          # ~25 min on 2 CPU cores; run it alone on the machine
    python benchmarks/forgetting_meter.py --mode correlation   # ~60 min on 2 CPU cores

`cost`: the training phases of the main job as it was when measured (`JOB`: two-pass TMS, its settings and seed)
twice, with the meter off and on at its defaults; the ratio of the phases' wall times (harvest + student; trajectory
generation is the same work in both) is the meter's cost. Wall times are only comparable within one run of this script, alone on the machine.

`correlation`: runs of different forgetting on that job's task (SmolLM2-135M-Instruct, LoRA r 64, leg_counting),
each logging the meter and PLD live at every logging step, and each checkpoint then measured by probes the meter does
not use: chat KL(base || model) over the base's greedy answers to `trl_tms.probes.GENERAL_PROMPTS` (a prompt set disjoint
from the meter's), WikiText NLL, PIQA accuracy. Runs: the TMS harvest (= plain SFT) and student at `JOB`'s
settings; SFT for twice as long; SFT at a 5x lower learning rate; SFT with TRL's DFT loss. Reports Spearman's and
Pearson's correlation, with 95% bootstrap intervals (checkpoints resampled), between each live signal (`retention_kl`,
`retention_nll` change, `pld`, `pld_drift`) and each probe's measured forgetting, over all checkpoints of all runs.

The meter is also measured offline at every checkpoint with 8, 16 and 64 prompts (32 answer tokens), to choose its
default by measurement (`meter_8x32`, ...; the live meter, at the default size of its time, is measured again);
`meter_settings.py` compares smaller sizes on the study's snapshots.

Each arm / run is saved under `--output_dir` as soon as it finishes, and a rerun skips it. Writes `cost.json` or
`correlation.json`, a markdown table beside it, and for correlation `meter_vs_probes.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import probes, registry  # noqa: E402
from harness.plots import meter_vs_probes  # noqa: E402
from harness.report import pearson, spearman, with_interval  # noqa: E402
from harness.training import CaptureAdapter  # noqa: E402
from trl_tms.atomic import write_json_atomically  # noqa: E402
from trl_tms.report import PHASE_IDS  # noqa: E402

DEFAULT_OUTPUT = os.path.join(HERE, "results", "forgetting_meter")


# The main job as it was when these runs were measured (`trl_tms.quickstart` until 2026-12-06: the paper's two-pass
# TMS on leg_counting, plain SFT read off its harvest); the records in results/forgetting_meter/ are of these settings.
JOB = dict(num_train=32, num_test=40, num_pld=8, epochs=2.0, batch_size=8, learning_rate=1e-3, lora_r=64,
           num_checkpoints=4, label_weight=0.25, max_new_tokens=128, generation_batch_size=128, logging_steps=2, seed=0)


def job_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**JOB, **overrides})


def build_trainer(args: argparse.Namespace, model, tokenizer, train_dataset, pld_dataset, **overrides):
    """That job's two-pass `TMSTrainer` (with `overrides` of `TMSConfig` fields on top)."""
    from peft import LoraConfig

    from trl_tms import TMSConfig, TMSTrainer

    settings = dict(
        output_dir=args.output_dir, recipe="paper", num_checkpoints=args.num_checkpoints, label_weight=args.label_weight,
        max_new_tokens=args.max_new_tokens, max_new_tokens_from_labels=1.25,
        generation_batch_size=args.generation_batch_size, snapshots_per_generate=min(4, args.num_checkpoints),
        temperature=1.0, log_pld=True, pld_num_samples=len(pld_dataset), max_length=320, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=16, learning_rate=args.learning_rate,
        lr_scheduler_type="linear", warmup_steps=0, logging_steps=args.logging_steps, save_strategy="no",
        report_to="none", seed=args.seed, disable_tqdm=True, use_cpu=True, bf16=False,
        activation_checkpointing=False,
    )
    settings.update(overrides)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
    return TMSTrainer(model=model, args=TMSConfig(**settings), train_dataset=train_dataset, eval_dataset=pld_dataset,
                      processing_class=tokenizer, peft_config=lora)


def load_task(args):
    from trl_tms.probes.embedded import load_embedded_model, load_leg_counting

    model, tokenizer = load_embedded_model()
    train, test = load_leg_counting(args.num_train, args.num_test, args.seed)
    return model, tokenizer, train, test.select(range(min(args.num_pld, len(test))))


# Cost


def run_cost_arm(arm: str, work_dir: str) -> dict:
    args = job_args(output_dir=os.path.join(work_dir, arm))
    model, tokenizer, train, pld = load_task(args)
    trainer = build_trainer(args, model, tokenizer, train, pld, log_retention=(arm == "meter_on"))
    output = trainer.train()
    meter = trainer.retention_callback
    return {
        "harvest_seconds": trainer.harvest_output.metrics["train_runtime"],
        "student_seconds": output.metrics["train_runtime"],
        "trajectory_seconds": trainer.stats.seconds,
        "steps_per_phase": output.global_step,
        "logging_steps": args.logging_steps,
        "meter_reference_seconds": meter.reference_seconds if meter else 0.0,
        "meter_seconds": meter.seconds if meter else 0.0,
        "meter_points": sum("retention_kl" in e for e in trainer.state.log_history),
        "meter_settings": {"num_prompts": meter.num_prompts, "max_new_tokens": meter.max_new_tokens,
                           "top_k": meter.top_k} if meter else None,
    }


def cost(output_dir: str) -> dict:
    arms = {}
    for arm in ("meter_off", "meter_on"):
        path = os.path.join(output_dir, "cost_arms", f"{arm}.json")
        if os.path.exists(path):
            with open(path) as f:
                arms[arm] = json.load(f)
            continue
        print(f"[cost] {arm} ...", flush=True)
        arms[arm] = run_cost_arm(arm, os.path.join(output_dir, "_work"))
        write_json_atomically(path, arms[arm])
    off, on = arms["meter_off"], arms["meter_on"]
    train = {arm: a["harvest_seconds"] + a["student_seconds"] for arm, a in arms.items()}
    result = {
        "arms": arms,
        "training_phases_seconds": train,
        "ratio_on_to_off": train["meter_on"] / train["meter_off"],
        "per_phase_ratio": {phase: on[f"{phase}_seconds"] / off[f"{phase}_seconds"] for phase in ("harvest", "student")},
    }
    # Two runs of the same work differ by several percent on a shared machine; the time the meter itself took, within
    # the meter-on run, is the steadier measure of what it adds.
    if "meter_seconds" in on:
        result["meter_share_in_run"] = on["meter_seconds"] / (train["meter_on"] - on["meter_seconds"])
    lines = [
        "| meter | harvest s | student s | training phases s | meter points | reference s | meter s (all) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        lines.append(f"| {arm.replace('meter_', '')} | {a['harvest_seconds']:.0f} | {a['student_seconds']:.0f} | "
                     f"{train[arm]:.0f} | {a['meter_points']} | {a['meter_reference_seconds']:.1f} | "
                     f"{a.get('meter_seconds', 0.0):.1f} |")
    lines.append("")
    if "meter_share_in_run" in result:
        lines.append(f"Meter time / the rest of the training phases, within the meter-on run: "
                     f"**{1 + result['meter_share_in_run']:.3f}x**.")
    lines.append(f"Training phases with the meter / without (two runs): {result['ratio_on_to_off']:.3f} "
                 f"(harvest {result['per_phase_ratio']['harvest']:.3f}, student {result['per_phase_ratio']['student']:.3f}).")
    write_json_atomically(os.path.join(output_dir, "cost.json"), result)
    _write(os.path.join(output_dir, "cost.md"), "\n".join(lines))
    print("\n".join(lines))
    return result


# Correlation

RUNS = registry.METER_ARMS  # settings over `JOB`'s


def run_correlation_arm(name: str, work_dir: str) -> tuple[list[dict], object, object, list[dict]]:
    """Train one run; returns its checkpoints (step, phase, live signals, weights), the model, tokenizer and log."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from trl_tms import PLDCallback, RetentionCallback

    kind, overrides = RUNS[name].method, dict(RUNS[name].settings)
    args = job_args(output_dir=os.path.join(work_dir, name))
    loss_type = overrides.pop("loss_type", None) if kind == "sft" else None
    for key, value in overrides.items():
        setattr(args, key, value)
    model, tokenizer, train, pld = load_task(args)
    if kind == "tms":
        trainer = build_trainer(args, model, tokenizer, train, pld)
        phases = {name: PHASE_IDS[name] for name in ("harvest", "student")}
    else:
        config = SFTConfig(
            output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=16, learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
            logging_steps=args.logging_steps, save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True,
            use_cpu=True, bf16=False, max_length=320, **({"loss_type": loss_type} if loss_type else {}),
        )
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=pld, processing_class=tokenizer,
                             peft_config=lora)
        trainer.add_callback(PLDCallback(trainer, num_samples=len(pld)))
        trainer.add_callback(RetentionCallback(trainer))
        phases = {None: None}
    total = trainer.get_train_dataloader().__len__() * int(args.epochs)
    steps = [round(total * k / 4) for k in range(1, 5)]
    capture = CaptureAdapter(trainer, steps, {phase: phase for phase in phases})
    trainer.add_callback(capture)
    trainer.train()
    log = trainer.state.log_history
    checkpoints = []
    for phase, phase_id in phases.items():
        entries = [e for e in log if phase_id is None or e.get("tms_phase") == phase_id]
        live = {}
        for e in entries:
            for key in ("retention_kl", "retention_nll", "pld", "pld_drift"):
                if key in e:
                    live.setdefault(e["step"], {})[key] = e[key]
        for step, weights in sorted(capture.weights[phase].items()):
            checkpoints.append({"run": name, "phase": phase or "sft", "step": step, "live": live.get(step, {}),
                                "start": live.get(0, {}), "weights": weights})
    return checkpoints, trainer.model, tokenizer, log


def evaluate_checkpoint(model, tokenizer, weights, probe_data) -> dict:
    from peft import PeftModel

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    model.eval()
    result = {}
    result["wikitext_nll"] = probes.text_nll(model, tokenizer, probe_data["wikitext"])["nll"]
    assert isinstance(model, PeftModel)
    result["chat_kl"] = probes.chat_drift(model, tokenizer, probe_data["conversations"], reference=model.disable_adapter)["kl"]
    result["piqa"] = probes.multiple_choice(model, tokenizer, probe_data["piqa"])["accuracy"]
    from trl_tms.retention import meter_sums

    for name, reference in probe_data["meters"].items():
        started = time.perf_counter()
        sums = meter_sums(model, reference, tokenizer.pad_token_id, batch_size=16)
        result[name] = (sums[0] / sums[2]).item()
        result[name + "_seconds"] = time.perf_counter() - started
    return result


# Meter settings measured offline at every checkpoint beside the live default, to choose the default by measurement:
# name -> (prompts, answer tokens).
METER_VARIANTS = {"meter_8x32": (8, 32), "meter_16x32": (16, 32), "meter_64x32": (64, 32)}


def probe_data_for(model, tokenizer, args) -> dict:
    from trl_tms import METER_PROMPTS
    from trl_tms.data import prompt_token_ids
    from trl_tms.retention import build_reference

    prompts = [probes.chat_ids(tokenizer, p) for p in probes.CHAT_PROMPTS[: args.chat_prompts]]
    with model.disable_adapter():
        answers = probes.greedy_answers(model, tokenizer, prompts, args.chat_tokens)
        meters = {}
        for name, (count, tokens) in METER_VARIANTS.items():
            meter_prompts = [prompt_token_ids(tokenizer, {"prompt": [{"role": "user", "content": p}]})
                             for p in METER_PROMPTS[:count]]
            meters[name] = build_reference(model, tokenizer, meter_prompts, None, tokens, top_k=256, batch_size=16)
    return {
        "wikitext": probes.load_wikitext(args.wiki_items),
        "conversations": list(zip(prompts, answers)),
        "piqa": probes.load_piqa(args.piqa_items),
        "meters": meters,
    }


def correlation(output_dir: str, options) -> dict:
    points = []
    base, data = None, None
    for name in RUNS:
        path = os.path.join(output_dir, "correlation_runs", f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            points += saved["points"]
            base = base or saved["base"]
            continue
        print(f"[correlation] {name}: training ...", flush=True)
        started = time.perf_counter()
        checkpoints, model, tokenizer, log = run_correlation_arm(name, os.path.join(output_dir, "_work"))
        train_seconds = time.perf_counter() - started
        print(f"[correlation] {name}: trained in {train_seconds:.0f} s; measuring {len(checkpoints)} checkpoints ...",
              flush=True)
        data = data or probe_data_for(model, tokenizer, options)  # every run starts from the same base model
        with model.disable_adapter():
            base_values = {"wikitext_nll": probes.text_nll(model, tokenizer, data["wikitext"])["nll"], "chat_kl": 0.0,
                           "piqa": probes.multiple_choice(model, tokenizer, data["piqa"])["accuracy"]}
        base = base or base_values
        run_points = []
        for checkpoint in checkpoints:
            probes_now = evaluate_checkpoint(model, tokenizer, checkpoint.pop("weights"), data)
            run_points.append({**checkpoint, "probes": probes_now})
            print(f"  {name} {checkpoint['phase']} step {checkpoint['step']}: live {checkpoint['live']} "
                  f"probes {probes_now}", flush=True)
        write_json_atomically(path, {"points": run_points, "base": base_values, "train_seconds": train_seconds,
                                     "log_history": log})
        points += run_points
    # One point per checkpoint, plus the shared start (the base: meter 0, probes at the base's values).
    rows = []
    for p in points:
        live, start = p["live"], p["start"]
        if "retention_kl" not in live or "pld" not in live:
            continue
        rows.append({
            "run": p["run"], "phase": p["phase"], "step": p["step"],
            "retention_kl": live["retention_kl"],
            "retention_nll": live["retention_nll"] - start["retention_nll"],
            "pld": live["pld"], "pld_drift": live["pld_drift"],
            "chat_kl": p["probes"]["chat_kl"],
            "wikitext_nll": p["probes"]["wikitext_nll"] - base["wikitext_nll"],
            "piqa_drop": base["piqa"] - p["probes"]["piqa"],
            **{name: p["probes"][name] for name in METER_VARIANTS},
        })
    signals = ["retention_kl", "retention_nll", "pld", "pld_drift", *METER_VARIANTS]
    targets = ["chat_kl", "wikitext_nll", "piqa_drop"]
    table = {}
    for signal in signals:
        table[signal] = {}
        for target in targets:
            x, y = [r[signal] for r in rows], [r[target] for r in rows]
            table[signal][target] = {"spearman": with_interval(spearman, x, y), "pearson": with_interval(pearson, x, y)}
    result = {"checkpoints": rows, "base": base, "pld_correlation": table, "n": len(rows),
              "settings": {"chat_prompts": options.chat_prompts, "chat_tokens": options.chat_tokens,
                           "wiki_items": options.wiki_items, "piqa_items": options.piqa_items}}
    write_json_atomically(os.path.join(output_dir, "correlation.json"), result)
    lines = [f"Correlation over {len(rows)} checkpoints of {len({r['run'] for r in rows})} runs "
             "(95% bootstrap intervals over checkpoints):", "",
             "| live signal | vs chat KL (other prompts) | vs WikiText NLL change | vs PIQA drop |", "|---|---|---|---|"]
    for signal in signals:
        cells = []
        for target in targets:
            s, p = table[signal][target]["spearman"], table[signal][target]["pearson"]
            cells.append(f"rho {s['value']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}]; r {p['value']:+.2f}")
        lines.append(f"| `{signal}` | " + " | ".join(cells) + " |")
    lines += ["", "| run | phase | step | retention_kl | pld | pld_drift | chat KL | WikiText change | PIQA drop |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['phase']} | {r['step']} | {r['retention_kl']:.4f} | {r['pld']:.3f} | "
                     f"{r['pld_drift']:.3f} | {r['chat_kl']:.4f} | {r['wikitext_nll']:+.4f} | {r['piqa_drop']:+.3f} |")
    _write(os.path.join(output_dir, "correlation.md"), "\n".join(lines))
    print("\n".join(lines))
    meter_vs_probes(rows, os.path.join(output_dir, "meter_vs_probes.png"))
    return result


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["cost", "correlation"], required=True)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT)
    parser.add_argument("--chat_prompts", type=int, default=32, help="correlation: GENERAL_PROMPTS for the chat KL probe")
    parser.add_argument("--chat_tokens", type=int, default=40, help="correlation: longest base answer to them")
    parser.add_argument("--wiki_items", type=int, default=150, help="correlation: WikiText sentences")
    parser.add_argument("--piqa_items", type=int, default=100, help="correlation: PIQA items")
    options = parser.parse_args()
    os.makedirs(options.output_dir, exist_ok=True)
    if options.mode == "cost":
        cost(options.output_dir)
    else:
        correlation(options.output_dir, options)


if __name__ == "__main__":
    main()
