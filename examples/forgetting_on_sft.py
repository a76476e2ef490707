"""Watch an ordinary `trl.SFTTrainer` run for forgetting: attach the forgetting meter and PLD, and read them.

- `retention_kl` ([`RetentionCallback`]): mean per-token KL from the initial model over its own answers to everyday
  prompts. 0 at step 0; it rises as the model's everyday behaviour moves away from what it was.
- `pld` / `pld_drift` ([`PLDCallback`]): the held-out labels' NLL, and its rise above its running minimum.

    python examples/forgetting_on_sft.py                   # embedded SmolLM2 + leg_counting, CPU, ~4 minutes
    python examples/forgetting_on_sft.py --model Qwen/Qwen2.5-0.5B-Instruct --num_train 512   # on a GPU
"""

from __future__ import annotations

import argparse

from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_tms import PLDCallback, RetentionCallback

KEYS = ("pld", "pld_drift", "retention_kl", "retention_nll")


def run(model, train_dataset, eval_dataset, output_dir: str, processing_class=None, **config) -> list[dict]:
    """SFT with the forgetting meter and PLD attached; returns their values by logged step."""
    values = dict(output_dir=output_dir, logging_steps=2, save_strategy="no", report_to="none")
    values.update(config)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**values),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=LoraConfig(r=64, lora_alpha=128, target_modules="all-linear"),
    )
    trainer.add_callback(RetentionCallback(trainer))
    trainer.add_callback(PLDCallback(trainer, num_samples=64))
    trainer.train()
    # At step 0 each callback logs its own entry: merge the entries of a step.
    by_step: dict[int, dict] = {}
    for entry in trainer.state.log_history:
        if any(key in entry for key in KEYS):
            by_step.setdefault(entry["step"], {"step": entry["step"]}).update(
                {key: entry[key] for key in KEYS if key in entry}
            )
    return [by_step[step] for step in sorted(by_step)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or path; default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--num_train", type=int, default=32)
    parser.add_argument("--num_eval", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--output_dir", default="outputs/forgetting-on-sft")
    args = parser.parse_args()

    from trl_tms.probes.embedded import load_embedded_model, load_leg_counting

    train, heldout = load_leg_counting(args.num_train, args.num_eval, seed=0)
    model, tokenizer = (args.model, None) if args.model else load_embedded_model()
    cpu = args.model is None
    entries = run(
        model, train, heldout, args.output_dir, processing_class=tokenizer, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, per_device_train_batch_size=8, max_length=320, use_cpu=cpu, bf16=not cpu,
    )
    print(f"\n{'step':>6} " + " ".join(f"{key:>14}" for key in KEYS))
    for entry in entries:
        print(f"{entry['step']:>6} " + " ".join(f"{entry.get(key, float('nan')):>14.4f}" for key in KEYS))
    first, last = entries[0], entries[-1]
    print(f"\nForgetting meter: retention_kl {first['retention_kl']:.3f} -> {last['retention_kl']:.3f} nats/token; "
          f"PLD {first.get('pld', float('nan')):.3f} -> {last.get('pld', float('nan')):.3f}. A falling PLD with a rising "
          "retention_kl is SFT learning the task while moving away from the model's everyday behaviour.")


if __name__ == "__main__":
    main()
