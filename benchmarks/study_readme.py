"""
Refresh the study's tables in the README and in `docs/results.md` from `benchmarks/results/study/`.

    python benchmarks/study.py --report_only      # summary.json and study.md from the arm records
    python benchmarks/study_readme.py             # then this: the README's compact table and the docs' tables

From `summary.json`: the README block between `<!-- study-compact ... -->` and `<!-- /study-compact -->` (six arms,
every regime in each cell), and the block between `<!-- study-headline ... -->` and `<!-- /study-headline -->` in
`docs/results.md` (per regime, a selection of arms in the order a reader compares them, with footnotes). From
`study.md`: each `### Regime` table in `docs/results.md`'s study section. Prose around them is left alone: read the
new numbers and update it by hand.
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
    "gemma": "**A second model family: Gemma-3-270M base, partly solved**",
}
# The arms the README shows, in this order, where they were run.
LABELS = {
    "sft": "plain SFT",
    "sft_early": "SFT stopped at half (the matched-accuracy control)",
    "sft_low_lr": "SFT at a fifth of the learning rate",
    "sft_lr_x0.1": "SFT at a tenth of the learning rate",
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
# The README's table: the six arms a newcomer compares first, each cell "partly-solved / learn-from-zero / Gemma".
COMPACT_LABELS = {
    "sft": "plain SFT",
    "sft_low_lr": "SFT at a fifth of the learning rate",
    "sft_lr_x0.1": "SFT at a tenth of the learning rate",
    "sft_early": "SFT stopped at half its steps",
    "tms": 'TMS, paper defaults (`recipe="paper"`)',
    "tms_online_alpha_75": "**online TMS, alpha 0.75 (the default recipe at T = 10)**",
}
COMPACT_REGIMES = {"partly": "partly solved, the paper's situation", "zero": "learned from zero",
                   "gemma": "Gemma-3-270M base, partly solved"}
COMPACT_START = "<!-- study-compact"
COMPACT_END = "<!-- /study-compact -->"
GENERATED = "generated from benchmarks/results/study/summary.json by benchmarks/study_readme.py -->"


def load_records(regime: str, arm: str) -> list[dict]:
    return load_arms(RESULTS).get(regime, {}).get(arm, [])


def harvest_normalised_wall(regime: str, arm: str, r: dict) -> tuple[float, str] | None:
    """
    The arm's wall over its own harvest, times `tms`'s harvest over plain SFT (each timed on one machine); and the
    footnote that says so. None where no `tms` harvest has an SFT run timed on its machine.
    """
    harvest_ratio = r["arms"].get("tms", {}).get("harvest_ratio_to_sft")
    if harvest_ratio is None:
        return None
    own = [x["wall_seconds"]["total"] / x["wall_seconds"]["harvest"] for x in load_records(regime, arm)]
    tms = [x for x in load_records(regime, "tms") if ran_alone(x)]
    tms_own = [x["wall_seconds"]["total"] / x["wall_seconds"]["harvest"] for x in tms]
    raw = r["arms"][arm]["wall_ratio_to_sft"]
    estimate = statistics.mean(own) * harvest_ratio
    note = (f"Estimated: that run's machine was slower than the `tms` runs' (its harvest is the same work as theirs), "
            f"so its wall is read against its own harvest ({statistics.mean(own):.2f}x, against "
            f"{min(tms_own):.2f}-{max(tms_own):.2f}x for `tms` runs that had the machine to themselves) and scaled by their harvest / SFT "
            f"({harvest_ratio:.2f}); measured directly, {raw:.1f}x.")
    return estimate, note


def wall_cell(regime: str, arm: str, s: dict, r: dict) -> tuple[str, str | None, bool]:
    """The arm's wall / SFT as the tables write it, the footnote where it is an estimate, and whether it ran shared."""
    ratio = s.get("wall_ratio_to_sft")
    if arm == "sft":
        return "1x", None, False
    if arm == "sft_early":
        return "0.5x", None, False
    if ratio is None:
        return "-", None, False
    normalised = harvest_normalised_wall(regime, arm, r) if arm in HARVEST_NORMALISED else None
    if normalised:
        estimate, note = normalised
        return f"{estimate:.1f}x", note, False
    if s.get("wall_shared"):
        return f"{ratio:.1f}x (shared)", None, True
    return f"{ratio:.1f}x", None, False


SHARED_NOTE = ("(shared): no run of the arm had the machine to itself (the load average rose above its 2 cores), so "
               "its wall may read high.")


def headline(summary: dict) -> str:
    """docs/results.md's headline tables: per regime, every arm of `LABELS` that ran, with footnotes."""
    lines = [f"{START}: {GENERATED}", ""]
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
            wall, note, arm_shared = wall_cell(regime, arm, s, r)
            shared |= arm_shared
            if note:
                notes.append("\\" + "*" * (len(notes) + 1) + " " + note)
                wall += "\\*" * len(notes)
            lines.append(f"| {label} | {seeds} | {s['target_acc']:.2f} | {s['chat_kl']['value']:.2f} | "
                         f"{s['wiki_nll']['delta']:+.2f} | {follow} | {wall} |")
        lines.append("")
    for note in notes:
        lines += [note, ""]
    if shared:
        lines += [SHARED_NOTE, ""]
    lines.append(END)
    return "\n".join(lines)


def compact(summary: dict) -> str:
    """The README's table: the arms of `COMPACT_LABELS`, one row each, every cell one value per regime of
    `COMPACT_REGIMES` that summary.json has ("partly-solved / from zero / Gemma")."""
    regimes = {name: summary["regimes"][name] for name in COMPACT_REGIMES if name in summary["regimes"]}
    if not regimes:
        raise SystemExit(f"summary.json has none of the regimes {', '.join(COMPACT_REGIMES)}: nothing to show.")
    where = " / ".join(f"{COMPACT_REGIMES[name]} (`{r['task']}`, base accuracy {r['base']['target_accuracy']:.2f})"
                       for name, r in regimes.items())
    lines = [f"{COMPACT_START}: {GENERATED}", "", f"Each cell: {where}.", "",
             "| arm | target accuracy | chat KL to the base | WikiText NLL change | wall / SFT | seeds |",
             "|---|---|---|---|---|---|"]
    shared = False
    for arm, label in COMPACT_LABELS.items():
        stats = {name: r["arms"].get(arm) for name, r in regimes.items()}
        if all(s is None for s in stats.values()):
            continue
        walls = {}
        for name, s in stats.items():
            if s is None:
                continue
            wall, note, arm_shared = wall_cell(name, arm, s, regimes[name])
            if note:
                raise SystemExit(f"The README's table cannot show `{arm}`: its wall is an estimate with a footnote.")
            walls[name], shared = wall, shared or arm_shared

        def cells(write) -> str:
            return " / ".join("-" if s is None else write(name, s) for name, s in stats.items())

        # One wall where every regime has the same (plain SFT's 1x), so that the cell reads as a ratio, not a pair.
        if len(walls) == len(stats) and len(set(walls.values())) == 1:
            wall = next(iter(walls.values()))
        else:
            wall = cells(lambda name, s: walls[name])
        lines.append(f"| {label} | {cells(lambda name, s: format(s['target_acc'], '.2f'))} | "
                     f"{cells(lambda name, s: format(s['chat_kl']['value'], '.2f'))} | "
                     f"{cells(lambda name, s: format(s['wiki_nll']['delta'], '+.2f'))} | {wall} | "
                     f"{cells(lambda name, s: str(len(s['seeds'])))} |")
    lines.append("")
    if shared:
        lines += [SHARED_NOTE, ""]
    lines.append(COMPACT_END)
    return "\n".join(lines)


def replace_block(text: str, block: str, start: str = START, end: str = END, where: str = "docs/results.md") -> str:
    """`text` with its `start ... end` block (both markers included) replaced by `block`."""
    first, last = text.find(start), text.find(end)
    if first < 0 or last < first:
        raise SystemExit(f"{where} has no `{start} ... {end}` block to refresh: add the two markers first.")
    return text[:first] + block + text[last + len(end):]


QUALITY = "What the TMS students drew from"


def regime_tables(study_md: str) -> dict:
    """`regime name -> table lines` from study.md; `(regime name, "quality") -> ...` for its trajectory-quality table."""
    tables = {}
    # The first table under each heading: prose may come between (e.g. the versions the records ran under).
    for match in re.finditer(r"^## Regime `(\w+)`.*\n(?:\n|(?!#)[^|\n].*\n)*?((?:\|.*\n)+)", study_md, flags=re.M):
        tables[match.group(1)] = match.group(2)
    headings = re.findall(r"^## Regime `(\w+)`", study_md, flags=re.M)
    if sorted(headings) != sorted(tables):
        raise SystemExit(f"study.md: no table under the heading of regime(s) {sorted(set(headings) - set(tables))}.")
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
    results = os.path.join("docs", "results.md")
    paths = {"README.md": lambda t: replace_block(t, compact(summary), COMPACT_START, COMPACT_END, "README.md"),
             results: lambda t: sync_docs(replace_block(t, headline(summary), where=results), tables)}
    stale = []
    for path, refresh in paths.items():
        with open(os.path.join(ROOT, path)) as f:
            old = f.read()
        new = refresh(old)
        if new != old:
            stale.append(path)
            if not args.check:
                # Written beside and renamed over, so that an interrupted refresh leaves the old page whole.
                target = os.path.join(ROOT, path)
                with open(target + ".tmp", "w") as f:
                    f.write(new)
                os.replace(target + ".tmp", target)
    print(("out of date: " if args.check else "refreshed: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
