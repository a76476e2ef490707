"""How good are the trajectories a TMS student trains on? Per snapshot: the share that reach the right final number,
the share cut at `max_new_tokens`, the share that are their prompt's label word for word, and their mean length.

    python benchmarks/harness/trajectory_quality.py <history_dir>/trajectories --num_train 64 [--output quality.json]

The training set is rebuilt with `load_leg_counting(num_train, ..., seed=0)` (as the harness loads it), so that each
trajectory's `prompt_index` finds its reference answer. `training.train_run` records the same numbers for every TMS
arm.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def text_of(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def trajectory_quality(trajectories, answers: list[str], labels: list | None = None) -> dict:
    """
    `{"by_step": {step: {...}}, "all": {...}}` with `n`, `correct`, `unfinished` (fractions) and `mean_tokens`; given
    the prompts' `labels` (completions), also `label_copy`: the share of trajectories that are their prompt's label word
    for word (whitespace aside), i.e. teach nothing the label would not.
    """
    from trl_tms.candidates import is_label_copy
    from trl_tms.probes.embedded import is_correct

    sums = defaultdict(lambda: {"n": 0, "correct": 0, "unfinished": 0, "tokens": 0, "label_copy": 0})
    for row in trajectories:
        text = text_of(row["completion"])
        for key in (row["snapshot_step"], "all"):
            s = sums[key]
            s["n"] += 1
            s["correct"] += int(is_correct(text, answers[row["prompt_index"]]))
            s["unfinished"] += int(not row["finished"])
            s["tokens"] += row["num_tokens"]
            if labels is not None:
                s["label_copy"] += int(is_label_copy(text, labels[row["prompt_index"]]))

    def rates(s):
        out = {"n": s["n"], "correct": s["correct"] / s["n"], "unfinished": s["unfinished"] / s["n"],
               "mean_tokens": s["tokens"] / s["n"]}
        if labels is not None:
            out["label_copy"] = s["label_copy"] / s["n"]
        return out

    return {"by_step": {str(k): rates(v) for k, v in sorted((k, v) for k, v in sums.items() if k != "all")},
            "all": rates(sums["all"])}


def format_quality(quality: dict) -> str:
    lines = ["| snapshot step | trajectories | correct | cut at max_new_tokens | mean tokens | kept for the student | "
             "copies of the label |", "|---|---|---|---|---|---|---|"]
    for step, q in list(quality["by_step"].items()) + [("all", quality["all"])]:
        kept = "-" if q.get("kept") is None else f"{q['kept']:.3f}"
        copies = "-" if q.get("label_copy") is None else f"{q['label_copy']:.3f}"
        lines.append(f"| {step} | {q['n']} | {q['correct']:.3f} | {q['unfinished']:.3f} | {q['mean_tokens']:.1f} | {kept} | "
                     f"{copies} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trajectories", help="A saved trajectories folder (`<history_dir>/trajectories`).")
    parser.add_argument("--num_train", type=int, default=64)
    parser.add_argument("--output", default=None, help="Write the numbers as JSON here.")
    args = parser.parse_args()

    from datasets import load_from_disk

    from trl_tms.probes.embedded import load_leg_counting

    train, _ = load_leg_counting(args.num_train, 1, seed=0)
    quality = trajectory_quality(load_from_disk(args.trajectories), train["answer"], train["completion"])
    print(format_quality(quality))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(quality, f, indent=1)


if __name__ == "__main__":
    main()
