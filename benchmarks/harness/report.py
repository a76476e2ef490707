"""The report: every arm's change against the base model (paired over items, mean over seeds), the table, and whether
the live signals (PLD, its drift, the forgetting meter) predict forgetting across runs.
"""

from __future__ import annotations

import collections
import random
import statistics

from .curves import frontier_table, frontiers
from .models import DEFAULT_MODEL, MODELS
from .probes import paired_se
from .records import early, final, load_arms, machine_key, ran_alone, versions_line
from .registry import ARMS, REGIMES


def summarise_arm(records: list[dict], base: dict, pick=None) -> dict:
    """
    Mean over seeds of each measure and its change against the base, with the mean paired standard error, at the
    checkpoint `pick` chooses (default: the last).
    """
    out = {"seeds": [r["seed"] for r in records]}
    results = [(pick or final)(r) for r in records]
    for name, items, key in (("target", "target", "target_accuracy"), ("chat_kl", "chat_kl", "chat_kl"),
                             ("chat_nll", "chat_nll", "chat_nll"), ("wiki_nll", "wikitext", "wikitext_nll"),
                             ("piqa", "piqa", "piqa_acc"), ("siqa", "siqa", "siqa_acc"),
                             ("ifeval", "ifeval", "ifeval_acc")):
        points = [r for r in results if key in r]
        if not points or key not in base:
            continue
        deltas = [r[key] - base[key] for r in points]
        ses = [paired_se(r["items"][items], base["items"][items]) for r in points]
        out[name] = {"value": statistics.mean(r[key] for r in points), "delta": statistics.mean(deltas),
                     "se": statistics.mean(ses), "seed_spread": [min(deltas), max(deltas)], "seeds": len(points)}
    out["target_acc"] = out["target"]["value"]
    out["target_gain"] = out["target"]["delta"]
    out["chat_kl_value"] = out["chat_kl"]["value"]
    out["wiki_nll_delta"] = out["wiki_nll"]["delta"]
    return out


def train_wall(runs: list[dict]) -> float:
    """The mean training wall of `runs` (timed on one machine), from those that had the machine to themselves if any."""
    alone = [r for r in runs if ran_alone(r)]
    return statistics.mean(r["wall_seconds"]["train"] for r in alone or runs)


def wall_ratio(records: list[dict], reference: list[dict], part: str = "total") -> tuple[float | None, bool]:
    """
    The mean over `records` of each run's wall (`part` of `wall_seconds`: the whole run, or one phase such as TMS's
    harvest) / the mean training wall of the `reference` runs timed on the same machine (`machine_key`), and whether
    any run in it shared the machine. Runs that had the machine to themselves come first, on both sides; a run with no
    reference timed on its machine has no ratio (sessions land on machines of different speeds: a ratio across two
    machines measures the machines).
    """
    timed = [r for r in records if not r["wall_seconds"].get("reused_history")]
    clean = [r for r in timed if ran_alone(r)]
    ratios, shared = [], not clean
    for record in clean or timed:
        peers = [r for r in reference if machine_key(r) == machine_key(record)]
        if peers:
            ratios.append(record["wall_seconds"][part] / train_wall(peers))
            shared = shared or not any(ran_alone(r) for r in peers)
    return (statistics.mean(ratios) if ratios else None), bool(ratios) and shared


def reference_walls(reference: list[dict]) -> dict:
    """The mean training wall of the SFT reference runs on each machine (boot id; "not recorded" before the field)."""
    walls = collections.defaultdict(list)
    for record in reference:
        walls[machine_key(record) or "not recorded"].append(record)
    return {key: train_wall(runs) for key, runs in sorted(walls.items())}


def summary(output_dir: str) -> dict:
    arms = load_arms(output_dir)
    result = {"regimes": {}}
    for regime, by_arm in arms.items():
        base = final(by_arm["base"][0])
        rows = {}
        # SFT's wall is that of a plain `SFTTrainer` run of the same steps (`sft_low_lr`, `sft_dft`: neither the
        # learning rate nor the loss changes the work). The `sft` arm is TMS's harvest, which, like every TMS phase
        # here, also logs PLD on the held-out labels at each logging step; it is the reference only where no plain run
        # exists. Runs that had the machine to themselves first (the wall barely depends on the seed), and each run
        # against the reference runs timed on the same machine (`wall_ratio`).
        plain = [r for arm, records in by_arm.items() if arm != "sft" and arm in ARMS and ARMS[arm].method == "sft"
                 and "rehearsal_weight" not in ARMS[arm].settings for r in records]
        reference = plain or by_arm.get("sft", [])
        for arm, records in sorted(by_arm.items()):
            if arm == "base":
                continue
            rows[arm] = summarise_arm(records, base)
            rows[arm]["wall_ratio_to_sft"], rows[arm]["wall_shared"] = wall_ratio(records, reference)
            harvested = [r for r in records if "harvest" in r["wall_seconds"]]  # TMS's first pass: SFT's work + PLD
            if harvested:
                rows[arm]["harvest_ratio_to_sft"] = wall_ratio(harvested, reference, "harvest")[0]
            if arm == "sft" and not any(r.get("final_only") for r in records):  # measured at half its steps
                rows["sft_early"] = summarise_arm(records, base, early)
                rows["sft_early"]["wall_ratio_to_sft"] = (None if rows["sft"]["wall_ratio_to_sft"] is None
                                                          else rows["sft"]["wall_ratio_to_sft"] / 2)
                rows["sft_early"]["note"] = "the sft run's checkpoint at 50% of its steps"
        task = next(r["task"] for arm, records in by_arm.items() if arm != "base" for r in records)
        quality = {arm: trajectory_summary(records) for arm, records in sorted(by_arm.items())
                   if any("trajectory_quality" in r for r in records)}
        result["regimes"][regime] = {"task": task, "trajectory_quality": quality, "base": {
            k: base[k] for k in ("target_accuracy", "wikitext_nll", "chat_nll", "pld", "piqa_acc", "siqa_acc", "ifeval_acc")
            if k in base},
            "arms": rows, "wall_reference": {"arms": sorted({r["arm"] for r in reference}),
                                               "seconds_by_machine": reference_walls(reference)},
            "frontiers": frontiers(by_arm, base), "versions": dict(collections.Counter(
                versions_line(r.get("versions")) for records in by_arm.values() for r in records).most_common())}
    # Per model family: the signals' scales are the model's own (PLD is a likelihood under it, and Gemma's chat KL runs
    # ten times SmolLM2's), so pooling two families would rank one family's points above the other's.
    result["pld_correlation"] = correlations(arms)
    result["pld_correlation_by_model"] = {}
    for name in MODELS:
        if name != DEFAULT_MODEL and (table_ := correlations(arms, name)):
            result["pld_correlation_by_model"][name] = table_
    return result


def trajectory_summary(records: list[dict]) -> dict:
    """
    Mean over the seeds that recorded it of what a TMS arm's student drew from: the share of trajectories that are
    right, cut at `max_new_tokens` and kept by the filters, overall and from the first and the last snapshot, and the
    lowest and highest share right among its snapshots (online TMS: among its refreshes).
    """
    qualities = [r["trajectory_quality"] for r in records if "trajectory_quality" in r]
    out = {"seeds": [r["seed"] for r in records if "trajectory_quality" in r]}

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    for key in ("correct", "unfinished", "kept", "label_copy"):
        out[key] = mean(q["all"].get(key) for q in qualities)
    steps = [sorted(q["by_step"].items(), key=lambda item: int(item[0])) for q in qualities]
    out["first_correct"] = mean(s[0][1]["correct"] for s in steps)
    out["last_correct"] = mean(s[-1][1]["correct"] for s in steps)
    out["lowest_correct"] = mean(min(q["correct"] for _, q in s) for s in steps)
    out["highest_correct"] = mean(max(q["correct"] for _, q in s) for s in steps)
    return out


def model_of(regime: str) -> str:
    """The model family a regime's records come from (`REGIMES[...]["model"]`; the embedded SmolLM2 without one)."""
    return REGIMES.get(regime, {}).get("model", DEFAULT_MODEL)


def signal_points(arms: dict, model: str = DEFAULT_MODEL) -> list[dict]:
    """Every evaluated checkpoint of every run on `model`'s regimes: its signals and its forgetting (change against
    the base)."""
    points = []
    for regime, by_arm in arms.items():
        if model_of(regime) != model:
            continue
        base = final(by_arm["base"][0]) if "base" in by_arm else None
        if base is None or "pld" not in base:  # runs measured without the live signals (retention.py's)
            continue
        for arm, records in by_arm.items():
            if arm == "base":
                continue
            for record in records:
                lowest = base["pld"]
                for c in record["checkpoints"]:
                    lowest = min(lowest, c["pld"])
                    points.append({"regime": regime, "arm": arm, "seed": record["seed"], "step": c["step"],
                                   "pld": c["pld"], "pld_drift": c["pld"] - lowest, "retention_kl": c["retention_kl"],
                                   "chat_kl": c["chat_kl"], "wiki_delta": c["wikitext_nll"] - base["wikitext_nll"]})
                    if "train_kl" in c:  # measured from issue #44 on
                        points[-1]["train_kl"] = c["train_kl"]
    return points


SIGNALS = ("pld", "pld_drift", "retention_kl", "train_kl")


def correlations(arms: dict, model: str = DEFAULT_MODEL) -> dict:
    out = {}
    for signal_name in SIGNALS:
        points = [p for p in signal_points(arms, model) if signal_name in p]
        if len(points) < 4:
            continue
        out[signal_name] = {"points": len(points)}
        for measure in ("chat_kl", "wiki_delta"):
            x, y = [p[signal_name] for p in points], [p[measure] for p in points]
            out[signal_name][measure] = {"spearman": with_interval(spearman, x, y),
                                         "pearson": with_interval(pearson, x, y)}
    return out


def table(result: dict) -> str:
    lines = []
    for regime, r in result["regimes"].items():
        b = r["base"]
        lines += [f"## Regime `{regime}` (task `{r['task']}`; base target accuracy {b['target_accuracy']:.3f})", "",
                  *([] if not r.get("versions") else ["Measured under (records): " + "; ".join(
                      f"{line} ({n})" for line, n in r["versions"].items()), ""]),
                  "| arm | seeds | target acc (gain ± SE) | chat KL ± SE | WikiText NLL change ± SE | PIQA change | "
                  "SIQA change | instruction following change (seeds) | wall / SFT |", "|---|---|---|---|---|---|---|---|---|"]
        for arm, s in r["arms"].items():
            def cell(name, fmt="{:+.3f}"):
                if name not in s:
                    return "-"
                return fmt.format(s[name]["delta"]) + f" ± {s[name]['se']:.3f}"
            # The probe came later than the others: not every seed of an arm has it.
            ifeval = "-" if "ifeval" not in s else f"{cell('ifeval')} ({s['ifeval']['seeds']})"
            wall = "-" if s.get("wall_ratio_to_sft") is None else f"{s['wall_ratio_to_sft']:.2f}"
            wall += " (shared)" if s.get("wall_shared") else ""
            lines.append(f"| {arm} | {','.join(map(str, s['seeds']))} | {s['target_acc']:.3f} ({cell('target')}) | "
                         f"{s['chat_kl']['value']:.3f} ± {s['chat_kl']['se']:.3f} | {cell('wiki_nll')} | "
                         f"{cell('piqa')} | {cell('siqa')} | {ifeval} | {wall} |")
        lines.append("")
        if r.get("trajectory_quality"):
            lines += [f"What the TMS students drew from (regime `{regime}`; share of the trajectories, mean over the "
                      "seeds that recorded it):", "",
                      "| arm | seeds | right | right, first snapshot | right, last snapshot | right, lowest / highest "
                      "snapshot | cut at max_new_tokens | kept by the filters | copies of the label |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for arm, q in r["trajectory_quality"].items():
                def share(value):
                    return "-" if value is None else f"{value:.2f}"
                lines.append(f"| {arm} | {','.join(map(str, q['seeds']))} | {share(q['correct'])} | "
                             f"{share(q['first_correct'])} | {share(q['last_correct'])} | "
                             f"{share(q['lowest_correct'])} / {share(q['highest_correct'])} | "
                             f"{share(q['unfinished'])} | {share(q['kept'])} | {share(q['label_copy'])} |")
            lines.append("")
        lines += frontier_table(regime, r.get("frontiers", {}))
    tables = {DEFAULT_MODEL: result.get("pld_correlation"), **result.get("pld_correlation_by_model", {})}
    for model, table_ in tables.items():
        if not table_:
            continue
        title = "every checkpoint of every run" + ("" if model == DEFAULT_MODEL else f", {MODELS[model].title}")
        lines += [f"## Do the live signals predict forgetting? ({title})", "",
                  "| signal | points | Spearman vs chat KL [95% CI] | Spearman vs WikiText change [95% CI] | "
                  "Pearson vs chat KL |", "|---|---|---|---|---|"]
        for name, c in table_.items():
            def fmt(v):
                return f"{v['value']:.2f} [{v['low']:.2f}, {v['high']:.2f}]"
            lines.append(f"| {name} | {c['points']} | {fmt(c['chat_kl']['spearman'])} | "
                         f"{fmt(c['wiki_delta']['spearman'])} | {fmt(c['chat_kl']['pearson'])} |")
        lines.append("")
    if lines and lines[-1] != "":
        lines.append("")
    lines += ["Changes against the base model, item by item (paired standard errors; mean over seeds). Lower chat "
              "KL and WikiText change = more retained. `sft_early`: the `sft` run's checkpoint at half its steps. "
              "Wall: training time over that of a plain `SFTTrainer` run of the same steps (the `sft_low_lr` and "
              "`sft_dft` runs; TMS: harvest, generation and student), from runs that had the machine to themselves. "
              "The `sft` row is TMS's harvest: like every TMS phase here it also logs PLD on the held-out labels at "
              "each logging step, which plain SFT does not; \"(shared)\": only runs that shared it exist (1-minute load average above "
              "their threads + 0.5), so the ratio is rough. Students on the `tms` history: see their records."]
    return "\n".join(lines)


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    return pearson(ranks(x), ranks(y))


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")


def with_interval(fn, x, y, rounds: int = 2000, seed: int = 0) -> dict:
    rng = random.Random(seed)
    values = []
    for _ in range(rounds):
        idx = [rng.randrange(len(x)) for _ in x]
        value = fn([x[i] for i in idx], [y[i] for i in idx])
        if value == value:  # not NaN
            values.append(value)
    values.sort()
    if not values:  # a constant series has no correlation
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    return {"value": fn(x, y), "low": values[int(0.025 * len(values))], "high": values[int(0.975 * len(values)) - 1]}
