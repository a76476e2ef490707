"""Does TMS keep what the model knew while it learns the task? SFT against TMS on a real model, in one run.

    python benchmarks/retention.py --quick        # ~15 minutes on 2 CPU cores
    python benchmarks/retention.py                # full: two regimes, two TMS points; ~90 minutes
    python benchmarks/retention.py --seeds 0,1    # adds a second seed (finished arms are reused)
    python benchmarks/retention.py --mode trajectories --arms tms_online_verified   # train only these arms
    python benchmarks/retention.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda   # any Hub model, on a GPU

Model: the embedded SmolLM2-135M-Instruct (LoRA, CPU) unless `--model`. Target task: reasoning-gym `leg_counting`
with worked answers (`gsm_symbolic` is available as `--task gsm_symbolic`, but the 135M model scores 0-2 of 40 on it
in every arm, so it cannot show the accuracy side of the trade-off). Retention probes, before and after training:
PIQA and SIQA (log-likelihood multiple choice), WikiText NLL, and behaviour drift on everyday chat prompts (KL from
the base model over its own greedy answers, and the trained model's NLL of them); see `benchmarks/probes.py`.

Arms share data, optimizer steps and seeds: `base`, `sft` (plain `trl.SFTTrainer`), `tms` (paper defaults,
alpha = 0.25) and `tms_alpha0.5`, in a `mild` and an `aggressive` regime. Changes are measured against the base
model item by item, with paired standard errors. Every finished arm is saved under `<output_dir>/arms/` at once, and a
rerun skips it, so an interrupted run continues where it stopped.

Writes `<output_dir>/retention.md` (the table), `retention.json` (every number; top-level keys per arm:
`base`, `sft`, `tms`, `tms_alpha0.5` for the aggressive regime, `sft_mild`, `tms_mild`, ... for the mild one),
`pareto.png` and `pld.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import probes  # noqa: E402
from trl_tms.atomic import write_json_atomically  # noqa: E402
from trajectory_quality import trajectory_quality  # noqa: E402

MODES = {
    "quick": dict(
        num_train=48, num_test=48, num_pld=32, mc_items=150, wiki_items=400, chat_prompts=24, chat_tokens=64,
        regimes={"aggressive": dict(lora_r=64, learning_rate=1e-3, epochs=2)},
        arms={"sft": None, "tms": dict(label_weight=0.25, num_checkpoints=4)},
        seeds=[0],
        # The TMS harvest is a plain SFT run of the same settings and seed (pinned by
        # tests/test_trainer.py::test_the_harvest_is_plain_sft): evaluate its final adapter as the SFT arm instead of
        # training SFT twice.
        sft_from_harvest=True,
    ),
    "full": dict(
        num_train=64, num_test=100, num_pld=48, mc_items=400, wiki_items=1000, chat_prompts=48, chat_tokens=96,
        regimes={
            "mild": dict(lora_r=16, learning_rate=3e-4, epochs=3, only=["sft", "tms", "tms_alpha0.5"]),
            "aggressive": dict(lora_r=64, learning_rate=1e-3, epochs=4),
            # The control for "same target accuracy": SFT stopped at half the aggressive run, where its target accuracy
            # comes near that of TMS.
            "aggressive_2ep": dict(lora_r=64, learning_rate=1e-3, epochs=2, only=["sft"]),
        },
        arms={
            "sft": None,
            "tms": dict(label_weight=0.25, num_checkpoints=10),
            # Same harvest and trajectories as `tms` (reused from its history folder): only the student differs.
            "tms_alpha0.5": dict(label_weight=0.5, num_checkpoints=10),
            "tms_curriculum": dict(label_weight=0.25, num_checkpoints=10, trajectory_choice="curriculum"),
            "tms_pld": dict(label_weight=0.25, num_checkpoints=10, trajectory_choice="pld"),
            # One run, its own history: snapshots every steps / 10, from step 0.
            "tms_online": dict(label_weight=0.25, num_checkpoints=10, tms_mode="online"),
        },
        seeds=[0],
    ),
    # Issue 17: which trajectory settings close TMS's target-accuracy gap. Every TMS arm of a seed shares one harvest
    # and one set of trajectories (the settings compared act on the mixture only); SFT is read off that harvest.
    "trajectories": dict(
        num_train=64, num_test=100, num_pld=48, mc_items=400, wiki_items=1000, chat_prompts=48, chat_tokens=96,
        regimes={"aggressive": dict(lora_r=64, learning_rate=1e-3, epochs=4)},
        arms={
            "sft": None,
            # The paper's recipe: every trajectory, cut ones with their end token, uniform over the 10 snapshots.
            "tms": dict(label_weight=0.25, num_checkpoints=10, unfinished_trajectories="keep"),
            # Only trajectories with the label's final answer (a prompt left without any trains on its label).
            "tms_verified": dict(label_weight=0.25, num_checkpoints=10, trajectory_filter="verifier"),
            # Reward-free: only trajectories whose final answer most of the prompt's snapshots agree on.
            "tms_consistent": dict(label_weight=0.25, num_checkpoints=10, trajectory_filter="self_consistency"),
            # The later half of the snapshots only.
            "tms_late": dict(label_weight=0.25, num_checkpoints=10, snapshot_weights=[0.0] * 5 + [1.0] * 5),
            # Online TMS (one run, its own snapshots from step 0): as before, and with the verifier filter.
            "tms_online": dict(label_weight=0.25, num_checkpoints=10, tms_mode="online", unfinished_trajectories="keep"),
            "tms_online_verified": dict(label_weight=0.25, num_checkpoints=10, tms_mode="online",
                                        trajectory_filter="verifier"),
        },
        seeds=[0],
        sft_from_harvest=True,
    ),
}
HEADLINE = "aggressive"
BATCH_SIZE = 8


def arm_key(arm: str, regime: str) -> str:
    return arm if regime == HEADLINE else f"{arm}_{regime}"


def regime_arms(mode: dict, regime: str) -> list[str]:
    """The arms trained in `regime` (a regime may restrict them with `only`)."""
    return [arm for arm in mode["arms"] if arm in mode["regimes"][regime].get("only", mode["arms"])]


# Data and model


def load_task(task: str, num_train: int, num_test: int):
    from trl_tms.embedded import load_gsm_symbolic, load_leg_counting

    if task == "leg_counting":
        return load_leg_counting(num_train, num_test, seed=0)
    if task == "gsm_symbolic":
        return load_gsm_symbolic(num_train, num_test, seed=0)
    raise ValueError(f"Unknown task {task!r}: use leg_counting or gsm_symbolic.")


def load_model(name: str | None, device: str):
    if name is None:
        from trl_tms.embedded import load_embedded_model

        model, tokenizer = load_embedded_model()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


class Probes:
    """The probe data, loaded once; `evaluate` runs every probe on a model."""

    def __init__(self, mode: dict, tokenizer, test, task_tokens: int):
        self.piqa = probes.load_piqa(mode["mc_items"])
        self.siqa = probes.load_siqa(mode["mc_items"])
        self.wiki = [t for t in probes.load_wikitext(mode["wiki_items"]) if len(tokenizer(t)["input_ids"]) > 1]
        self.chat_prompts = probes.CHAT_PROMPTS[: mode["chat_prompts"]]
        self.chat_tokens = mode["chat_tokens"]
        self.test = test
        self.task_tokens = task_tokens
        self.conversations = None  # the base model's own answers, set by `base_answers`

    def base_answers(self, model, tokenizer, cache: str) -> None:
        if os.path.isfile(cache):
            with open(cache) as f:
                self.conversations = [tuple(pair) for pair in json.load(f)]
            return
        prompts = [probes.chat_ids(tokenizer, p) for p in self.chat_prompts]
        answers = probes.greedy_answers(model, tokenizer, prompts, self.chat_tokens)
        self.conversations = list(zip(prompts, answers))
        write_json_atomically(cache, self.conversations)

    def evaluate(self, model, tokenizer, reference=None) -> dict:
        from trl_tms.embedded import is_correct

        started = time.perf_counter()
        target = probes.target_accuracy(model, tokenizer, self.test, self.task_tokens, is_correct)
        piqa = probes.multiple_choice(model, tokenizer, self.piqa)
        siqa = probes.multiple_choice(model, tokenizer, self.siqa)
        wiki = probes.text_nll(model, tokenizer, self.wiki)
        chat = probes.chat_drift(model, tokenizer, self.conversations, reference=reference)
        return {
            "target_accuracy": target["accuracy"],
            "retention": {
                "piqa_acc": piqa["accuracy"], "siqa_acc": siqa["accuracy"], "wikitext_nll": wiki["nll"],
                "chat_kl": chat["kl"], "chat_nll": chat["nll"],
            },
            "items": {
                "target": target["correct"], "piqa": piqa["correct"], "siqa": siqa["correct"],
                "wikitext": [s / n for s, n in zip(wiki["sums"], wiki["tokens"])], "chat_kl": chat["kls"],
                "chat_nll": chat["nlls"],
            },
            "target_examples": target["examples"],
            "eval_seconds": time.perf_counter() - started,
        }


# Training


def train_arm(arm: str, tms: dict | None, regime: dict, seed: int, model, tokenizer, train, pld_set, workdir: str,
              device: str, task_tokens: int, history_dir: str | None = None):
    """
    Train one arm. TMS arms of one regime and seed share `history_dir`: the first one runs all three phases, the next
    ones resume from its finished harvest and trajectories (`resume_from_checkpoint=True`) and train only a student.
    """
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from trl_tms import PLDCallback, TMSConfig, TMSTrainer

    steps = -(-len(train) // BATCH_SIZE) * regime["epochs"]
    common = dict(
        per_device_train_batch_size=BATCH_SIZE, num_train_epochs=regime["epochs"], learning_rate=regime["learning_rate"],
        lr_scheduler_type="linear", warmup_steps=0, max_length=task_tokens + 160, logging_steps=max(3, steps // 8),
        save_strategy="no", report_to="none", seed=seed, disable_tqdm=True, gradient_checkpointing=False,
        use_cpu=device == "cpu", bf16=device == "cuda", per_device_eval_batch_size=16,
    )
    lora = LoraConfig(r=regime["lora_r"], lora_alpha=2 * regime["lora_r"], lora_dropout=0.0, target_modules="all-linear")
    out = os.path.join(workdir, "runs", arm)
    started = time.perf_counter()
    if tms is None:
        trainer = SFTTrainer(model=model, args=SFTConfig(out, **common), train_dataset=train, eval_dataset=pld_set,
                             processing_class=tokenizer, peft_config=lora)
        trainer.add_callback(PLDCallback(trainer, num_samples=len(pld_set)))
        trainer.train()
        phases = {"train": time.perf_counter() - started}
        pld = [(e["step"], e["pld"], e["pld_drift"]) for e in trainer.state.log_history if "pld" in e]
        stats = {}
    else:
        # The results under results/ were measured before the forgetting meter existed: keep the arms' work as it was
        # (the meter's cost and usefulness are measured in forgetting_meter.py).
        config = TMSConfig(out, pld_num_samples=len(pld_set), max_new_tokens=task_tokens, generation_batch_size=64,
                           temperature=1.0, history_dir=history_dir, log_retention=False,
                           **{"trajectories_to_generate": "all", **tms}, **common)  # as in the committed results
        trainer = TMSTrainer(model=model, args=config, train_dataset=train, eval_dataset=pld_set,
                             processing_class=tokenizer, peft_config=lora)
        online = tms.get("tms_mode") == "online"
        reuse = history_dir is not None and os.path.isfile(os.path.join(history_dir, "tms_run.json"))
        trainer.train(resume_from_checkpoint=reuse or None)
        log = trainer.state.log_history
        if online:
            phases = {"online": log[-1]["train_runtime"], "trajectories": trainer.stats.seconds}
        else:
            phases = {
                "harvest": None if reuse else trainer.harvest_output.metrics["train_runtime"],
                "trajectories": None if reuse else trainer.stats.seconds,
                "student": log[-1]["train_runtime"],
            }
            scoring = [e["tms_scoring_seconds"] for e in log if "tms_scoring_seconds" in e]
            if scoring:
                phases["pld_scoring"] = sum(scoring)
        pld = [(e["step"], e["pld"], e["pld_drift"]) for e in log if "pld" in e and e.get("tms_phase") in (2, 3)]
        stats = trainer.stats.as_dict()
        stats["harvest_pld"] = [(e["step"], e["pld"], e["pld_drift"]) for e in log if "pld" in e and e.get("tms_phase") == 1]
        fractions = [e["tms_label_fraction"] for e in log if "tms_label_fraction" in e and e.get("tms_phase") in (2, 3)]
        if fractions:
            stats["label_fraction"] = sum(fractions) / len(fractions)  # labels actually trained on
        if "answer" in train.column_names:
            quality = trajectory_quality(trainer.trajectories, train["answer"], train["completion"])
            for step, q in quality["by_step"].items():
                q["kept"] = trainer.stats.kept_fraction.get(step)
            stats["trajectory_quality"] = quality
    phases["total"] = time.perf_counter() - started
    return trainer, {"steps": trainer.state.global_step, "wall_seconds": phases, "pld": pld, "tms_stats": stats}


def sft_from_harvest(model, history_dir: str, tms_run: dict):
    """The SFT arm read off a finished TMS arm: its last harvest snapshot, the harvest's PLD and wall time."""
    from peft import PeftModel

    from trl_tms import AdapterHistory

    last = AdapterHistory.open(history_dir).steps[-1]
    trained = PeftModel.from_pretrained(model, os.path.join(history_dir, f"step-{last}")).eval()
    harvest_seconds = tms_run["wall_seconds"]["harvest"]
    record = {
        "steps": last, "wall_seconds": {"train": harvest_seconds, "total": harvest_seconds},
        "pld": tms_run["tms_stats"]["harvest_pld"], "tms_stats": {}, "from_harvest_of": "tms",
    }
    return trained, record


# Reporting


METRICS = [  # (name, items key, higher is better, format)
    ("target_accuracy", "target", True, "{:.3f}"),
    ("piqa_acc", "piqa", True, "{:.3f}"),
    ("siqa_acc", "siqa", True, "{:.3f}"),
    ("wikitext_nll", "wikitext", False, "{:.3f}"),
    ("chat_kl", "chat_kl", False, "{:.3f}"),
    ("chat_nll", "chat_nll", False, "{:.3f}"),
]


def value(run: dict, name: str) -> float:
    return run["target_accuracy"] if name == "target_accuracy" else run["retention"][name]


def summarise(runs: list[dict], base: dict) -> dict:
    """Mean over seeds of each metric and of its change against the base (with the mean paired SE and the spread)."""
    summary = {"seeds": [r["seed"] for r in runs], "regime": runs[0]["regime"], "settings": runs[0]["settings"]}
    change = {}
    for name, items, _, _ in METRICS:
        values = [value(r, name) for r in runs]
        deltas = [v - value(base, name) for v in values]
        ses = [probes.paired_se(r["items"][items], base["items"][items]) for r in runs]
        change[name] = {
            "delta": statistics.mean(deltas), "paired_se": statistics.mean(ses),
            "seed_min": min(deltas), "seed_max": max(deltas),
        }
        if name == "target_accuracy":
            summary[name] = statistics.mean(values)
    summary["retention"] = {name: statistics.mean(value(r, name) for r in runs) for name, *_ in METRICS[1:]}
    summary["change_vs_base"] = change
    pld_ends = [r["pld"][-1][1] for r in runs if r.get("pld")]
    drifts = [r["pld"][-1][2] for r in runs if r.get("pld")]
    if pld_ends:
        summary["pld_end"] = statistics.mean(pld_ends)
        summary["pld_drift_end"] = statistics.mean(drifts)
        summary["pld_min"] = statistics.mean(min(p for _, p, _ in r["pld"]) for r in runs)
    summary["wall_seconds"] = {k: statistics.mean(r["wall_seconds"][k] for r in runs)
                               for k in runs[0]["wall_seconds"] if runs[0]["wall_seconds"][k] is not None}
    if runs[0]["wall_seconds"].get("harvest", 0) is None:
        summary["reused"] = "harvest and trajectories of the first TMS arm (only the student was trained)"
    summary["eval_seconds"] = statistics.mean(r["eval_seconds"] for r in runs)
    if "from_harvest_of" in runs[0]:
        summary["from_harvest_of"] = runs[0]["from_harvest_of"]
    qualities = [r["tms_stats"]["trajectory_quality"]["all"] for r in runs if "trajectory_quality" in r["tms_stats"]]
    if qualities:
        summary["trajectories_correct"] = statistics.mean(q["correct"] for q in qualities)
        summary["trajectories_unfinished"] = statistics.mean(q["unfinished"] for q in qualities)
        kept = [r["tms_stats"]["kept_trajectories"] / r["tms_stats"]["trajectories"] for r in runs
                if "kept_trajectories" in r["tms_stats"]]
        if kept:
            summary["trajectories_kept"] = statistics.mean(kept)
    if runs[0]["tms_stats"]:
        summary["tms_stats"] = {k: statistics.mean(r["tms_stats"][k] for r in runs)
                                for k, v in runs[0]["tms_stats"].items() if isinstance(v, (int, float))}
    return summary


def table(results: dict, mode: dict) -> str:
    base = results["base"]
    header = ("| arm | regime | seeds | target acc | PIQA | SIQA | WikiText NLL | chat KL | chat NLL | PLD end (drift) "
              "| wall s |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]

    def cells(summary, with_change: bool) -> list[str]:
        out = []
        for name, _, _, fmt in METRICS:
            v = summary["target_accuracy"] if name == "target_accuracy" else summary["retention"][name]
            cell = fmt.format(v)
            if with_change:
                c = summary["change_vs_base"][name]
                cell += f" ({c['delta']:+.3f} ± {c['paired_se']:.3f})"
            out.append(cell)
        return out

    lines.append("| base | - | - | " + " | ".join(cells(base, False)) + " | - | - |")
    for key, summary in results.items():
        if key in ("base", "settings", "runs") or not isinstance(summary, dict) or "change_vs_base" not in summary:
            continue
        pld = f"{summary['pld_end']:.3f} ({summary['pld_drift_end']:.3f})" if "pld_end" in summary else "-"
        seeds = ",".join(map(str, summary["seeds"]))
        lines.append(f"| {key} | {summary['regime']} | {seeds} | " + " | ".join(cells(summary, True)) +
                     f" | {pld} | {summary['wall_seconds']['total']:.0f} |")
    n = len(base["items"]["piqa"]), len(base["items"]["siqa"]), len(base["items"]["wikitext"]), len(base["items"]["target"])
    lines.append("")
    lines.append(f"Changes vs base in brackets: mean over seeds ± mean paired standard error (items: target {n[3]}, PIQA "
                 f"{n[0]}, SIQA {n[1]}, WikiText sentences {n[2]}, chat prompts {len(base['items']['chat_kl'])}). "
                 "Higher is better for accuracies; lower is better for NLL and KL. PLD: mean NLL per token of held-out "
                 "worked answers at the end of training (drift = rise above its minimum).")
    tms = [(k, v) for k, v in results.items() if isinstance(v, dict) and "trajectories_correct" in v]
    if tms:
        lines += ["", "| arm | trajectories correct | cut at max_new_tokens | kept for the student | labels trained on |",
                  "|---|---|---|---|---|"]
        for key, summary in tms:
            kept = summary.get("trajectories_kept")
            label = summary.get("tms_stats", {}).get("label_fraction")
            lines.append(f"| {key} | {summary['trajectories_correct']:.3f} | {summary['trajectories_unfinished']:.3f} | "
                         f"{'-' if kept is None else f'{kept:.3f}'} | {'-' if label is None else f'{label:.3f}'} |")
    for key, summary in results.items():
        if isinstance(summary, dict) and "from_harvest_of" in summary:
            lines.append(f"`{key}` is the harvest of `{summary['from_harvest_of']}`: that plain SFT run's final adapter, "
                         "PLD and wall time (identical to `trl.SFTTrainer` with the same settings and seed, pinned by "
                         "`tests/test_trainer.py::test_the_harvest_is_plain_sft`).")
    return "\n".join(lines)


def plots(results: dict, runs: list[dict], output_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    arms = {k: v for k, v in results.items() if isinstance(v, dict) and "change_vs_base" in v}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "chat_kl", "chat KL(base || model), nats/token (lower = retains more)"),
                              (axes[1], "wikitext_nll", "WikiText NLL change vs base (lower = retains more)")):
        base_x = 0.0
        ax.scatter([base_x], [results["base"]["target_accuracy"]], marker="*", s=160, color="black", label="base")
        for key, s in arms.items():
            x = s["change_vs_base"][metric]["delta"]
            y = s["target_accuracy"]
            marker = "o" if key.startswith("sft") else "s"
            ax.scatter([x], [y], marker=marker, s=60, label=key)
            ax.annotate(key, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("target accuracy")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Target accuracy vs forgetting (up and left is better)")
    fig.tight_layout()
    path = os.path.join(output_dir, "pareto.png")
    fig.savefig(path, dpi=120)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        if not run.get("pld"):
            continue
        label = f"{arm_key(run['arm'], run['regime'])} s{run['seed']}"
        steps, pld, drift = zip(*run["pld"])
        style = "-" if run["regime"] == HEADLINE else ":"
        axes[0].plot(steps, pld, style, marker=".", label=label)
        axes[1].plot(steps, drift, style, marker=".", label=label)
    axes[0].set_ylabel("PLD (NLL/token of held-out labels)")
    axes[1].set_ylabel("PLD drift (rise above its minimum)")
    for ax in axes:
        ax.set_xlabel("optimizer step (TMS: student phase)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Policy-Label Divergence over training: SFT vs TMS")
    fig.tight_layout()
    path = os.path.join(output_dir, "pld.png")
    fig.savefig(path, dpi=120)
    written.append(path)
    return written


def train_arms(args, mode: dict, bench, train, pld_set, arms_dir: str, task_tokens: int, scratch: str,
               histories: str) -> list:
    """Train and evaluate every arm of the mode not saved in `arms_dir` yet; load the ones that are."""
    runs = []
    # With `sft_from_harvest` the SFT arm comes after the TMS arm whose harvest it reads.
    arms = sorted(mode["arms"].items(), key=lambda item: bool(mode.get("sft_from_harvest")) and item[0] == "sft")
    for regime_name, regime in mode["regimes"].items():
        for arm, tms in arms:
            if arm not in regime.get("only", mode["arms"]):
                continue
            seeds = mode["seeds"]
            if args.report_only:
                prefix = f"{arm_key(arm, regime_name)}_s"
                seeds = sorted(int(n[len(prefix):-5]) for n in os.listdir(arms_dir)
                               if n.startswith(prefix) and n[len(prefix):-5].isdigit())
            for seed in seeds:
                key = f"{arm_key(arm, regime_name)}_s{seed}"
                path = os.path.join(arms_dir, f"{key}.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        runs.append(json.load(f))
                    print(f"[{key}] done earlier: {path}", flush=True)
                    continue
                if arm not in mode.get("train_only", mode["arms"]):
                    continue
                model, tokenizer = load_model(args.model, args.device)
                workdir = tempfile.mkdtemp(prefix=f"{key}-", dir=scratch)
                online = (tms or {}).get("tms_mode") == "online"
                history = os.path.join(histories, f"history-{regime_name}-s{seed}")
                harvested = [r for r in runs if r["arm"] == "tms" and r["regime"] == regime_name and r["seed"] == seed]
                if tms is None and mode.get("sft_from_harvest") and harvested and os.path.isdir(history):
                    print(f"[{key}] the final adapter of the TMS harvest (plain SFT, same settings and seed)", flush=True)
                    trained, record = sft_from_harvest(model, history, harvested[0])
                else:
                    print(f"[{key}] training ({regime_name}: {regime}; {tms or 'plain SFTTrainer'})", flush=True)
                    trainer, record = train_arm(arm, tms, regime, seed, model, tokenizer, train, pld_set, workdir,
                                                args.device, task_tokens,
                                                history_dir=history if tms and not online else None)
                    trained = trainer.model
                result = bench.evaluate(trained, tokenizer, reference=trained.disable_adapter)
                result.update(record, arm=arm, regime=regime_name, seed=seed,
                              settings={**{k: v for k, v in regime.items() if k != "only"}, **(tms or {}),
                                        "batch_size": BATCH_SIZE, "num_train": len(train)})
                write_json_atomically(path, result)
                runs.append(result)
                print(f"[{key}] target {result['target_accuracy']:.3f} {result['retention']} "
                      f"wall {record['wall_seconds']}", flush=True)
                del trained, model
                shutil.rmtree(workdir, ignore_errors=True)
    return runs


# Main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="One regime, one seed, fewer items, SFT read off the TMS "
                        "harvest: ~15 minutes on 2 CPU cores.")
    parser.add_argument("--mode", default=None, choices=sorted(MODES), help="A mode by name (`--quick` is "
                        "`--mode quick`); `trajectories` compares trajectory settings on one shared harvest.")
    parser.add_argument("--model", default=None, help="Hub id or local folder; default: embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="leg_counting", choices=["leg_counting", "gsm_symbolic"])
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds (default: 0 for --quick, 0,1 for full).")
    parser.add_argument("--regimes", default=None, help="Comma-separated subset of the mode's regimes.")
    parser.add_argument("--arms", default=None, help="Comma-separated subset of the mode's arms to train (the report "
                        "still includes every arm saved earlier).")
    parser.add_argument("--output_dir", default=None, help="Default: benchmarks/results/retention[_quick].")
    parser.add_argument("--report_only", action="store_true", help="Train nothing: build the report from every arm "
                        "result saved in the output folder (any seed), e.g. after runs of separate seeds or regimes.")
    parser.add_argument("--work_dir", default=None, help="Scratch space for checkpoints and histories (default: a "
                        "temporary folder, removed after each arm).")
    parser.add_argument("--keep_histories", default=None, help="Keep each (regime, seed)'s TMS history in this folder "
                        "after the run, so that arms added later train only their student on the same harvest and "
                        "trajectories.")
    args = parser.parse_args(argv)

    mode_name = args.mode or ("quick" if args.quick else "full")
    mode = dict(MODES[mode_name])
    if args.seeds:
        mode["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.regimes:
        unknown = set(args.regimes.split(",")) - set(mode["regimes"])
        if unknown:
            parser.error(f"unknown regime(s) {sorted(unknown)}; this mode has {sorted(mode['regimes'])}")
        mode["regimes"] = {r: mode["regimes"][r] for r in args.regimes.split(",")}
    if args.arms:
        unknown = set(args.arms.split(",")) - set(mode["arms"])
        if unknown:
            parser.error(f"unknown arm(s) {sorted(unknown)}; this mode has {sorted(mode['arms'])}")
        mode["train_only"] = args.arms.split(",")
    suffix = {"full": "", "quick": "_quick"}.get(mode_name, f"_{mode_name}")
    output_dir = args.output_dir or os.path.join(HERE, "results", "retention" + suffix)
    arms_dir = os.path.join(output_dir, "arms")
    os.makedirs(arms_dir, exist_ok=True)
    task_tokens = 128 if args.task == "leg_counting" else 256
    command = "python benchmarks/retention.py " + " ".join(sys.argv[1:] if argv is None else argv)

    train, test = load_task(args.task, mode["num_train"], mode["num_test"])
    pld_set = test.select(range(min(mode["num_pld"], len(test))))
    model, tokenizer = load_model(args.model, args.device)
    bench = Probes(mode, tokenizer, test, task_tokens)
    bench.base_answers(model, tokenizer, os.path.join(output_dir, "base_chat_answers.json"))

    base_path = os.path.join(arms_dir, "base.json")
    if os.path.isfile(base_path):
        with open(base_path) as f:
            base = json.load(f)
    else:
        print("[base] evaluating", flush=True)
        base = bench.evaluate(model, tokenizer)
        base.update(arm="base", regime="-", seed=None, settings={})
        write_json_atomically(base_path, base)
    print(f"[base] target {base['target_accuracy']:.3f} {base['retention']}", flush=True)
    del model

    scratch = tempfile.mkdtemp(prefix="retention-histories-", dir=args.work_dir)
    histories = args.keep_histories or scratch
    # On a kill (SIGTERM) the `finally` runs too, so scratch histories and checkpoints do not pile up in /tmp.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        runs = train_arms(args, mode, bench, train, pld_set, arms_dir, task_tokens, scratch, histories)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {"base": {k: base[k] for k in ("target_accuracy", "retention", "items", "eval_seconds")}}
    for regime_name in mode["regimes"]:
        for arm in regime_arms(mode, regime_name):
            group = [r for r in runs if r["arm"] == arm and r["regime"] == regime_name]
            if group:
                results[arm_key(arm, regime_name)] = summarise(group, base)
    report = table(results, mode)
    results["base"] = {k: v for k, v in results["base"].items() if k != "items"}
    results["settings"] = {
        "command": command, "mode": mode_name, "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "device": args.device, "task": args.task, "num_train": len(train), "num_test": len(test),
        "num_pld": len(pld_set), "batch_size": BATCH_SIZE, "regimes": mode["regimes"], "arms": mode["arms"],
        "seeds": sorted({r["seed"] for r in runs}), "torch_threads": torch.get_num_threads(),
    }
    results["runs"] = [{k: v for k, v in r.items() if k != "items"} for r in runs]
    write_json_atomically(os.path.join(output_dir, "retention.json"), results)
    with open(os.path.join(output_dir, "retention.md"), "w") as f:
        f.write(f"# Retention benchmark ({mode_name})\n\n`{command}`\n\n{report}\n")
    written = plots(results, runs, output_dir)
    print("\n" + report)
    print(f"\nWrote {output_dir}/retention.md, retention.json" + "".join(f", {os.path.basename(p)}" for p in written))
    return results


if __name__ == "__main__":
    main()
