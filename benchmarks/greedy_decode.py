"""
Greedy answers with finished rows dropped (`trl_tms.generation.greedy_answers`, through the shared chunked decode
loop) against one `generate` call per batch (the earlier implementation, kept here as the reference): the same tokens,
and how long each takes, on the embedded SmolLM2-135M-Instruct (CPU).

    python benchmarks/greedy_decode.py [--adapter PATH]   # PATH: a LoRA adapter folder, e.g. outputs/quickstart

Prints a table and writes `benchmarks/results/greedy_decode.json`. The held-out `leg_counting` problems (as the
study's and the main job's target accuracy) and the everyday chat prompts (the behaviour-drift probe), 64 rows per
call. A base model rambles to the length cap on the task, so rows drop out late; a trained adapter's answers end
early and at different lengths, where dropping them pays more.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from trl_tms.atomic import write_json_atomically
from trl_tms.data import prompt_token_ids
from trl_tms.generation import greedy_answers
from trl_tms.probes.measures import GENERAL_PROMPTS, chat_ids
from trl_tms.probes.embedded import load_embedded_model, load_leg_counting


@torch.no_grad()
def one_call_per_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The reference: `generate` runs every row of a batch until the whole batch is done."""
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True)
        for r, i in enumerate(rows):
            tokens = out.sequences[r, width:].tolist()
            answers[i] = tokens[: next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="A LoRA adapter folder to load on the embedded model.")
    parser.add_argument("--num_test", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "greedy_decode.json"))
    args = parser.parse_args()

    model, tokenizer = load_embedded_model()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    _, test = load_leg_counting(32, args.num_test, 0)
    probes = {
        "leg_counting": ([prompt_token_ids(tokenizer, row) for row in test], 112),
        "chat": ([chat_ids(tokenizer, p) for p in GENERAL_PROMPTS], 96),
    }
    one_call_per_batch(model, tokenizer, probes["leg_counting"][0][:8], 8, 8)  # warm-up: neither timed arm pays it
    result = {"model": "SmolLM2-135M-Instruct (embedded)", "adapter": args.adapter, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "probes": {}}
    for name, (prompts, max_new_tokens) in probes.items():
        started = time.perf_counter()
        reference = one_call_per_batch(model, tokenizer, prompts, max_new_tokens, args.batch_size)
        middle = time.perf_counter()
        dropped = greedy_answers(model, tokenizer, prompts, max_new_tokens, args.batch_size)
        ended = time.perf_counter()
        result["probes"][name] = {
            "items": len(prompts), "identical": sum(a == b for a, b in zip(reference, dropped)),
            "one_call_seconds": middle - started, "dropping_seconds": ended - middle,
            "answer_tokens": sum(map(len, dropped)), "max_new_tokens": max_new_tokens,
        }
    print(f"{'probe':14s} {'items':>5s} {'identical':>9s} {'one call s':>10s} {'dropping s':>10s} {'ratio':>6s} {'tokens':>7s}")
    for name, row in result["probes"].items():
        print(f"{name:14s} {row['items']:5d} {row['identical']:9d} {row['one_call_seconds']:10.1f} "
              f"{row['dropping_seconds']:10.1f} {row['dropping_seconds'] / row['one_call_seconds']:6.2f} {row['answer_tokens']:7d}")
    write_json_atomically(args.output, result)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
