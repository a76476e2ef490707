"""Turn the retention dial after an ordinary `trl.SFTTrainer` run: scale the LoRA adapter back to a forgetting budget.

Trains a LoRA adapter with SFT, traces the adapter-scale curve (0 = base model, 1 = the trained adapter: WiSE-FT for
LoRA) with the forgetting meter's `retention_kl` and the held-out label NLL at each scale, keeps the largest scale
within the budget and saves that adapter (plain `PeftModel.from_pretrained` loads it at that scale), with the curve as
`adapter_scale.json` and, with matplotlib, `adapter_scale.png`.

    python examples/retention_dial.py                          # embedded SmolLM2 + leg_counting, on CPU
    python examples/retention_dial.py --max_retention_kl 0.1   # a budget in nats per token (default: half the drift)
"""

from __future__ import annotations

import argparse

from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_tms import RetentionCallback, apply_adapter_scale, trace_adapter_scale


def run(model, train_dataset, eval_dataset, output_dir: str, processing_class=None, max_retention_kl=None,
        scales=(0.0, 0.25, 0.5, 0.75, 1.0), **config):
    """SFT with the forgetting meter, then the dial: returns the curve, with the chosen scale applied and saved."""
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
    trainer.train()
    curve = trace_adapter_scale(trainer, scales=scales)
    if max_retention_kl is None:  # half the trained adapter's drift
        max_retention_kl = curve.point(max(curve.scales)).retention_kl / 2
    apply_adapter_scale(trainer, curve.choose(max_retention_kl=max_retention_kl), curve)
    trainer.save_model()
    return curve


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or path; default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--num_train", type=int, default=32)
    parser.add_argument("--num_eval", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_retention_kl", type=float, default=None)
    parser.add_argument("--output_dir", default="outputs/retention-dial")
    args = parser.parse_args()

    from trl_tms.probes.embedded import load_embedded_model, load_leg_counting

    train, heldout = load_leg_counting(args.num_train, args.num_eval, seed=0)
    model, tokenizer = (args.model, None) if args.model else load_embedded_model()
    cpu = args.model is None
    curve = run(
        model, train, heldout, args.output_dir, processing_class=tokenizer, max_retention_kl=args.max_retention_kl,
        num_train_epochs=args.epochs, learning_rate=args.learning_rate, per_device_train_batch_size=8, max_length=320,
        use_cpu=cpu, bf16=not cpu,
    )
    print(f"\n{'scale':>6} {'retention_kl':>14} {curve.score_name:>14}")
    for point in curve.points:
        print(f"{point.scale:>6g} {point.retention_kl:>14.4f} {point.score:>14.4f}")
    print(f"\nChosen scale {curve.chosen_scale:g} ({curve.criterion}); the adapter in {args.output_dir} loads at it.")


if __name__ == "__main__":
    main()
