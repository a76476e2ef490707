"""
Refresh the study's tables in the README and in `docs/results.md` from `benchmarks/results/study/`.

    python benchmarks/study.py --report_only      # summary.json and study.md from the arm records
    python benchmarks/study_readme.py             # then this: the README's headline tables and the docs' full tables

The README block between `<!-- study-headline ... -->` and `<!-- /study-headline -->` is rewritten from
`summary.json` (a selection of arms, in the order a reader compares them); each `### Regime` table in
`docs/results.md`'s study section is replaced by the same regime's table in `study.md`. Prose around them is left
alone: read the new numbers and update it by hand.
"""

import argparse
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness.records import load_arms, ran_alone  # noqa: E402

ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "study")

REGIME_TITLES = {
    "partly": "**Partly solved (the paper's situation)**",
    "zero": "**Learn from zero**",
}
# The arms the README shows, in this order, where they were run.
LABELS = {
    "sft": "plain SFT",
    "sft_early": "SFT stopped at half (the matched-accuracy control)",
    "sft_low_lr": "SFT at a fifth of the learning rate",
    "sft_dft": "SFT with TRL's DFT loss",
    "sft_rehearsal_10": "SFT + self-rehearsal (a tenth of the rows the base model's own answers)",
    "tms": "**TMS, paper defaults** (T = 10, alpha = 0.25)",
    "tms_drawn": "TMS, paper defaults, sampling only the drawn pairs (the default since 2026-12-04)",
    "tms_online": "online TMS, paper defaults",
    "tms_online_alpha_50": "online TMS, alpha = 0.5",
    "tms_online_alpha_75": "online TMS, alpha = 0.75",
    "tms_online_alpha_90": "online TMS, alpha = 0.9",
    "tms_online_verified": "online TMS + verifier filter (needs a verifier)",
    "self_sft": "self-training, unfiltered",
    "self_sft_verified": "self-training + verifier (needs a verifier)",
    "grpo": "GRPO, verifier as reward (lr 1e-3)",
    "sdft": "TRL's SDFT (self-distillation from the base shown the worked answer)",
}
# Arms whose own run met a slower machine than the arms they are compared with: their wall is read against their
# own harvest (the same work as `tms`'s) and scaled by `tms`'s harvest / SFT.
HARVEST_NORMALISED = {"tms_drawn"}
START = "<!-- study-headline"
END = "<!-- /study-headline -->"


def load_records(regime: str, arm: str) -> list[dict]:
    return load_arms(RESULTS).get(regime, {}).get(arm, [])


def harvest_normalised_wall(regime: str, arm: str, sft_seconds: float) -> tuple[float, str]:
    """The arm's wall over its own harvest, times `tms`'s harvest over plain SFT; and the footnote that says so."""
    own = [r["wall_seconds"]["total"] / r["wall_seconds"]["harvest"] for r in load_records(regime, arm)]
    tms = [r for r in load_records(regime, "tms") if ran_alone(r)]
    tms_own = [r["wall_seconds"]["total"] / r["wall_seconds"]["harvest"] for r in tms]
    harvest_ratio = statistics.mean(r["wall_seconds"]["harvest"] for r in tms) / sft_seconds
    raw = statistics.mean(r["wall_seconds"]["total"] for r in load_records(regime, arm)) / sft_seconds
    estimate = statistics.mean(own) * harvest_ratio
    note = (f"Estimated: that run's machine was slower than the `tms` runs' (its harvest is the same work as theirs), "
            f"so its wall is read against its own harvest ({statistics.mean(own):.2f}x, against "
            f"{min(tms_own):.2f}-{max(tms_own):.2f}x for `tms` runs that had the machine to themselves) and scaled by their harvest / SFT "
            f"({harvest_ratio:.2f}); measured directly, {raw:.1f}x.")
    return estimate, note


def headline(summary: dict) -> str:
    lines = ["<!-- study-headline: generated from benchmarks/results/study/summary.json by "
             "benchmarks/study_readme.py -->", ""]
    notes, shared = [], False
    for regime, title in REGIME_TITLES.items():
        if regime not in summary["regimes"]:
            continue
        r = summary["regimes"][regime]
        lines += [f"{title}: `{r['task']}`, base accuracy {r['base']['target_accuracy']:.2f}", "",
                  "| arm | seeds | target accuracy | chat KL to the base | WikiText NLL change | "
                  "instruction following change ± SE | wall / SFT |", "|---|---|---|---|---|---|---|"]
        for arm, label in LABELS.items():
            s = r["arms"].get(arm)
            if s is None:
                continue
            seeds = len(s["seeds"])
            follow = "-"
            if "ifeval" in s:
                follow = f"{s['ifeval']['delta']:+.2f} ± {s['ifeval']['se']:.2f}"
                if s["ifeval"]["seeds"] < seeds:
                    follow += f" ({s['ifeval']['seeds']} seed{'s' if s['ifeval']['seeds'] > 1 else ''})"
            ratio = s.get("wall_ratio_to_sft")
            if arm == "sft":
                wall = "1x"
            elif arm == "sft_early":
                wall = "0.5x"
            elif ratio is None:
                wall = "-"
            elif arm in HARVEST_NORMALISED:
                estimate, note = harvest_normalised_wall(regime, arm, r["wall_reference"]["seconds"])
                notes.append("\\" + "*" * (len(notes) + 1) + " " + note)
                wall = f"{estimate:.1f}x" + "\\*" * len(notes)
            else:
                wall = f"{ratio:.1f}x"
                if s.get("wall_shared"):
                    wall += " (shared)"
                    shared = True
            lines.append(f"| {label} | {seeds} | {s['target_acc']:.2f} | {s['chat_kl']['value']:.2f} | "
                         f"{s['wiki_nll']['delta']:+.2f} | {follow} | {wall} |")
        lines.append("")
    for note in notes:
        lines += [note, ""]
    if shared:
        lines += ["(shared): no run of the arm had the machine to itself (the load average rose above its 2 cores), so "
                  "its wall may read high.", ""]
    lines.append(END)
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md has no `{START} ... {END}` block to refresh: add the two markers first.")
    return text[:start] + block + text[end + len(END):]


QUALITY = "What the TMS students drew from"


def regime_tables(study_md: str) -> dict:
    """`regime name -> table lines` from study.md; `(regime name, "quality") -> ...` for its trajectory-quality table."""
    tables = {}
    for match in re.finditer(r"^## Regime `(\w+)`.*?\n\n((?:\|.*\n)+)", study_md, flags=re.M):
        tables[match.group(1)] = match.group(2)
    for match in re.finditer(r"^" + QUALITY + r" \(regime `(\w+)`.*?\n\n((?:\|.*\n)+)", study_md, flags=re.M):
        tables[(match.group(1), "quality")] = match.group(2)
    return tables


def sync_docs(docs: str, tables: dict) -> str:
    """Each table under its heading in the docs: `### Regime `zero``, and `#### What the TMS students drew from
    (regime `zero`)` for the trajectory-quality one."""
    for key, table in tables.items():
        regime, quality = (key[0], True) if isinstance(key, tuple) else (key, False)
        heading = f"#### {QUALITY} (regime `{regime}`" if quality else f"### Regime `{regime}`"
        pattern = re.compile(r"(^" + re.escape(heading) + r".*?\n\n)((?:\|.*\n)+)", flags=re.M)
        if not pattern.search(docs):
            raise SystemExit(f"docs/results.md has no `{heading}...` heading followed by a table.")
        docs = pattern.sub(lambda m: m.group(1) + table, docs, count=1)
    return docs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say whether the README and docs are up to date")
    args = parser.parse_args(argv)
    with open(os.path.join(RESULTS, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(RESULTS, "study.md")) as f:
        tables = regime_tables(f.read())
    paths = {"README.md": lambda t: replace_block(t, headline(summary)),
             os.path.join("docs", "results.md"): lambda t: sync_docs(t, tables)}
    stale = []
    for path, refresh in paths.items():
        with open(os.path.join(ROOT, path)) as f:
            old = f.read()
        new = refresh(old)
        if new != old:
            stale.append(path)
            if not args.check:
                with open(os.path.join(ROOT, path), "w") as f:
                    f.write(new)
    print(("out of date: " if args.check else "refreshed: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
