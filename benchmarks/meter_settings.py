"""The forgetting meter's default size (issue #18): does a smaller meter rank checkpoints as the default does, and what
does each size cost per measurement?

    python benchmarks/meter_settings.py --histories /work/study/history-partly-s1,/work/study/history-partly-s2

Reads the adapter snapshots of saved TMS harvests (plain SFT runs; e.g. the study's `--work_dir` histories, whose
snapshots drift more and more from the base: `python benchmarks/study.py --regimes partly --arms tms --seeds 1,2
--work_dir W` leaves them in W as `history-partly-s1`, `-s2`; the harvest alone is all this needs) and measures at
every snapshot the meter (`trl_tms.retention`, the initial model's greedy answers to the first N `METER_PROMPTS`, at
most M tokens each) for several N x M, and the study's chat probe: KL(base || model) over the base's greedy answers to
`probes.CHAT_PROMPTS` (prompts the meter never sees).
Reports, per size, Spearman's rho against the chat probe and against the largest size over all snapshots, and the
seconds one measurement takes (median over snapshots; run it alone on the machine for the timings). Resumes from the
snapshots already measured (`settings_points.json`). Writes
`benchmarks/results/forgetting_meter/settings.json` and `settings.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import probes  # noqa: E402
from harness.report import spearman  # noqa: E402
from trl_tms.atomic import write_json_atomically  # noqa: E402

OUTPUT = os.path.join(HERE, "results", "forgetting_meter")
SIZES = [(16, 32), (8, 32), (8, 24), (6, 24), (4, 32), (4, 24), (8, 16), (6, 16), (4, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--histories", required=True, help="Comma-separated history folders of TMS runs.")
    parser.add_argument("--chat_prompts", type=int, default=48, help="CHAT_PROMPTS of the chat probe (the study's).")
    parser.add_argument("--chat_tokens", type=int, default=96, help="Longest base answer of the chat probe.")
    parser.add_argument("--output_dir", default=OUTPUT)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from trl_tms import METER_PROMPTS
    from trl_tms.data import prompt_token_ids
    from trl_tms.probes.embedded import load_embedded_model
    from trl_tms.retention import build_reference, meter_sums
    from trl_tms.history import AdapterHistory

    os.makedirs(args.output_dir, exist_ok=True)
    histories = [AdapterHistory.open(path) for path in args.histories.split(",")]
    with open(os.path.join(histories[0].path(histories[0].steps[0]), "adapter_config.json")) as handle:
        lora = json.load(handle)
    model, tokenizer = load_embedded_model()
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                                             target_modules=lora["target_modules"]))
    model.eval()
    chat_prompts = [probes.chat_ids(tokenizer, p) for p in probes.CHAT_PROMPTS[: args.chat_prompts]]
    meter_prompts = [prompt_token_ids(tokenizer, {"prompt": [{"role": "user", "content": p}]})
                     for p in METER_PROMPTS[: max(n for n, _ in SIZES)]]
    with torch.no_grad(), model.disable_adapter():
        conversations = list(zip(chat_prompts, probes.greedy_answers(model, tokenizer, chat_prompts, args.chat_tokens)))
        references = {}
        for count, tokens in SIZES:
            started = time.perf_counter()
            references[(count, tokens)] = build_reference(model, tokenizer, meter_prompts[:count], None, tokens,
                                                          top_k=256, batch_size=16)
            references[(count, tokens)].seconds = time.perf_counter() - started

    # Points are saved as they are measured, so an interrupted run resumes where it stopped.
    partial = os.path.join(args.output_dir, "settings_points.json")
    points = []
    if os.path.isfile(partial):
        with open(partial) as handle:
            points = json.load(handle)
    done = {(p["run"], p["step"]) for p in points}
    for history, folder in zip(histories, args.histories.split(",")):
        for step in history.steps:
            if (os.path.basename(folder), step) in done:
                continue
            history.load_into(model, step, "default")
            with torch.no_grad():
                point = {"run": os.path.basename(folder), "step": step,
                         "chat_kl": probes.chat_drift(model, tokenizer, conversations,
                                                      reference=model.disable_adapter)["kl"]}
                for (count, tokens), reference in references.items():
                    started = time.perf_counter()
                    sums = meter_sums(model, reference, tokenizer.pad_token_id, 16)
                    point[f"{count}x{tokens}"] = (sums[0] / sums[2]).item()
                    point[f"{count}x{tokens}_seconds"] = time.perf_counter() - started
            points.append(point)
            write_json_atomically(partial, points)
            print(f"{point['run']} step {step}: chat KL {point['chat_kl']:.3f}, meter 8x32 {point['8x32']:.3f}",
                  flush=True)

    largest = f"{SIZES[0][0]}x{SIZES[0][1]}"
    rows = []
    for count, tokens in SIZES:
        name = f"{count}x{tokens}"
        values = [p[name] for p in points]
        rows.append({
            "size": name, "prompts": count, "answer_tokens": tokens,
            "spearman_vs_chat_kl": spearman(values, [p["chat_kl"] for p in points]),
            "spearman_vs_largest": spearman(values, [p[largest] for p in points]),
            "measure_seconds": statistics.median(p[f"{name}_seconds"] for p in points),
            "reference_seconds": references[(count, tokens)].seconds,
            "answer_tokens_measured": references[(count, tokens)].num_tokens,
        })
    result = {"histories": args.histories.split(","), "points": points, "sizes": rows,
              "chat_probe": {"prompts": args.chat_prompts, "tokens": args.chat_tokens},
              "threads": torch.get_num_threads()}
    write_json_atomically(os.path.join(args.output_dir, "settings.json"), result)
    os.remove(partial)
    lines = [f"Meter sizes over {len(points)} snapshots of {len(histories)} runs "
             f"(`python benchmarks/meter_settings.py --histories ...`; {torch.get_num_threads()} threads):", "",
             "| prompts x answer tokens | answer tokens | Spearman vs chat KL | Spearman vs " + largest
             + " | one measurement (s) | reference (s) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['size']} | {row['answer_tokens_measured']} | {row['spearman_vs_chat_kl']:+.3f} | "
                     f"{row['spearman_vs_largest']:+.3f} | {row['measure_seconds']:.2f} | {row['reference_seconds']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.output_dir, "settings.md"), "w") as handle:
        handle.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
