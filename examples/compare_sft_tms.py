"""SFT and TMS on the same data, same steps, same seed: PLD over training, printed and plotted.

    python examples/compare_sft_tms.py                  # embedded SmolLM2 + gsm_symbolic, CPU, ~15 minutes
    python examples/compare_sft_tms.py --model Qwen/Qwen2.5-1.5B-Instruct --num_train 512 --num_checkpoints 10

Writes `<output_dir>/pld_curves.json` and, when matplotlib is installed, `<output_dir>/pld_curves.png`. For the
measured comparison (retention probes, several seeds) see `benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import os

from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_tms import PLDCallback, TMSConfig, TMSTrainer


def compare(load_model, train_dataset, eval_dataset, output_dir: str, processing_class=None, tms=None, **config):
    """
    Train SFT and TMS with the same settings; returns `{"sft": [(step, pld)], "tms": [(step, pld)]}`.

    `load_model()` gives the base model (a fresh one per arm: PEFT wraps a model in place) or its name; `tms` holds
    the `TMSConfig` fields, `config` those shared by both arms.
    """
    common = dict(logging_steps=2, save_strategy="no", report_to="none", seed=0)
    common.update(config)
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear")

    sft = SFTTrainer(
        model=load_model(), args=SFTConfig(output_dir=os.path.join(output_dir, "sft"), **common),
        train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
        peft_config=LoraConfig(**lora),
    )
    sft.add_callback(PLDCallback(sft, num_samples=64))
    sft.train()

    tms_trainer = TMSTrainer(
        model=load_model(),
        args=TMSConfig(output_dir=os.path.join(output_dir, "tms"), pld_num_samples=64, **(tms or {}), **common),
        train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
        peft_config=LoraConfig(**lora),
    )
    tms_trainer.train()
    curves = {
        "sft": [(e["step"], e["pld"]) for e in sft.state.log_history if "pld" in e],
        "tms": [(e["step"], e["pld"]) for e in tms_trainer.state.log_history if "pld" in e and e.get("tms_phase") == 2],
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "pld_curves.json"), "w") as f:
        json.dump(curves, f, indent=2)
    return curves


def plot(curves, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", label=name.upper())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("PLD (nats/token on held-out labels)")
    ax.set_title("Policy-Label Divergence: SFT vs TMS")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or path; default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--num_train", type=int, default=32)
    parser.add_argument("--num_eval", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_checkpoints", type=int, default=4)
    parser.add_argument("--output_dir", default="outputs/compare-sft-tms")
    args = parser.parse_args()

    from trl_tms.embedded import load_embedded_model, load_gsm_symbolic

    train, heldout = load_gsm_symbolic(args.num_train, args.num_eval, seed=0)
    tokenizer = None if args.model else load_embedded_model()[1]
    cpu = args.model is None
    curves = compare(
        (lambda: args.model) if args.model else (lambda: load_embedded_model()[0]),
        train, heldout, args.output_dir, processing_class=tokenizer,
        tms={"num_checkpoints": args.num_checkpoints, "max_new_tokens": 128},
        num_train_epochs=args.epochs, learning_rate=args.learning_rate, per_device_train_batch_size=4,
        max_length=320, use_cpu=cpu, bf16=not cpu,
    )
    print(f"\n{'step':>6} {'SFT pld':>9} {'TMS pld':>9}")
    for (step, sft_pld), (_, tms_pld) in zip(curves["sft"], curves["tms"]):
        print(f"{step:>6} {sft_pld:>9.4f} {tms_pld:>9.4f}")
    png = os.path.join(args.output_dir, "pld_curves.png")
    print(f"\nCurves: {os.path.join(args.output_dir, 'pld_curves.json')}" + (f" and {png}" if plot(curves, png) else
          " (pip install matplotlib for the plot)"))


if __name__ == "__main__":
    main()
