"""Issue #44's curves: each method as the points its dials reach, its frontier, and the drift it needs for a gain.

A method (`registry.METHODS`) gathers points from the records of its arms: their final checkpoints (a learning-rate or
label-share dial), every evaluated checkpoint when it may stop early, and its final adapters scaled towards the base
model when it may be scaled (the records' `scaled` evaluations). A point is one (arm, checkpoint or scale) over the
seeds that measured it; `frontier.py` does the arithmetic. Gain levels are fractions of plain SFT's gain
(`registry.REFERENCE_ARM`); the ratios set each TMS method against the union of the cheap alternatives (`CHEAP`).
"""

from __future__ import annotations

import statistics

from .frontier import Point, deciding_points, drift_needed, drift_ratio, pareto_front
from .records import final
from .registry import CHEAP, METHODS, REFERENCE_ARM

LEVELS = (0.8, 0.9, 1.0)  # fractions of the reference arm's gain
SEEDS_WANTED = 3  # issue #44: seeds for every point that decides a level
DRIFTS = {
    "chat_kl": ("chat KL(base || model)", lambda c, base: c["chat_kl"]),
    "wikitext": ("WikiText NLL change", lambda c, base: c["wikitext_nll"] - base["wikitext_nll"]),
}


def method_points(by_arm: dict, base: dict, method, drift: str) -> list[Point]:
    """The `Point`s of `method` (a `registry.Method`) in one regime's records, with `drift` one of `DRIFTS`."""
    measure = DRIFTS[drift][1]
    points = []
    for arm in method.arms:
        groups = {}
        for record in by_arm.get(arm, []):
            seen = record["checkpoints"] if method.checkpoints and "checkpoints" in record else [final(record)]
            for checkpoint in seen:
                groups.setdefault(("fraction", round(checkpoint.get("fraction") or 1.0, 3)), []).append(
                    (record["seed"], checkpoint))
            for scaled in record.get("scaled", []) if method.scaled else []:
                groups.setdefault(("scale", scaled["scale"]), []).append((record["seed"], scaled))
        for (kind, value), measured in sorted(groups.items()):
            measured.sort(key=lambda item: item[0])
            label = arm if (kind, value) == ("fraction", 1.0) else f"{arm} @{kind} {value:g}"
            points.append(Point(label, [measure(c, base) for _, c in measured],
                                [c["target_accuracy"] - base["target_accuracy"] for _, c in measured],
                                {"arm": arm, kind: value, "seeds": [s for s, _ in measured]}))
    return points


def labelled_front(points: list[Point], levels: list[float]) -> list[dict]:
    """
    The frontier of the points' means, each with its label, seeds and whether it `decides` a level (the drift needed at
    one of `levels` of gain is read off between it and a neighbour).
    """
    front = pareto_front([p.mean for p in points])
    deciding = set(deciding_points(front, levels))
    by_mean = {p.mean: p for p in points}
    return [{"label": by_mean[m].label, "drift": m[0], "gain": m[1], "seeds": by_mean[m].meta["seeds"],
             "decides": m in deciding} for m in front]


def frontiers(by_arm: dict, base: dict, levels=LEVELS, samples: int = 2000) -> dict:
    """
    One regime's curves: per drift measure, each method's frontier and the drift it needs at each gain level (with a
    bootstrap interval over seeds), and each TMS method's drift over that of the cheap alternatives' frontier. Empty
    when the reference arm has not run.
    """
    references = by_arm.get(REFERENCE_ARM, [])
    if not references:
        return {}
    reference_gain = statistics.mean(final(r)["target_accuracy"] - base["target_accuracy"] for r in references)
    gains = {f"{level:g}x": level * reference_gain for level in levels}
    out = {"reference": {"arm": REFERENCE_ARM, "gain": reference_gain, "seeds": len(references)}, "levels": gains,
           "methods": {}, "ratios": {}}
    for drift in DRIFTS:
        points = {name: method_points(by_arm, base, method, drift) for name, method in METHODS.items()}
        points[CHEAP] = [p for name, method in METHODS.items() if method.family == "cheap" for p in points[name]]
        for name, found in points.items():
            if not found:
                continue
            needed = drift_needed(found, list(gains.values()), samples=samples)
            entry = out["methods"].setdefault(name, {"points": len(found)})
            entry[drift] = {"front": labelled_front(found, list(gains.values())),
                            "needed": {key: needed[value] for key, value in gains.items()}}
        for name, method in METHODS.items():
            if method.family != "tms" or not points[name] or not points[CHEAP]:
                continue
            ratio = drift_ratio(points[name], points[CHEAP], list(gains.values()), samples=samples)
            out["ratios"].setdefault(name, {})[drift] = {key: ratio[value] for key, value in gains.items()}
    return out


def frontier_table(regime: str, curves: dict) -> list[str]:
    """Markdown lines: the drift each method's frontier needs per gain level, then TMS / cheap alternatives."""
    if not curves:
        return []

    def value(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    def cell(entry, key="drift", missing="not reached"):
        if entry[key] is None:
            return missing
        return f"{value(entry[key])} [{value(entry['low'])}, {value(entry['high'])}]"

    levels = list(curves["levels"])
    ref = curves["reference"]
    lines = [f"### Frontiers, regime `{regime}`: the drift each method needs for a share of plain SFT's gain", "",
             f"Gain levels are fractions of `{ref['arm']}`'s target gain ({ref['gain']:+.3f}, {ref['seeds']} seeds); "
             "drift read off each method's frontier of seed means, interpolated linearly from the base model "
             "(drift 0, gain 0); [95% bootstrap interval over seeds]. \"not reached\": no point of the method gains "
             "that much.", "",
             "| method | points | " + " | ".join(f"chat KL at {k}" for k in levels) + " | "
             + " | ".join(f"WikiText change at {k}" for k in levels) + " |",
             "|---|---|" + "---|" * (2 * len(levels))]
    for name, entry in curves["methods"].items():
        cells = [cell(entry[drift]["needed"][k]) if drift in entry else "-" for drift in DRIFTS for k in levels]
        lines.append(f"| {name} | {entry['points']} | " + " | ".join(cells) + " |")
    few = {point["label"]: len(point["seeds"]) for entry in curves["methods"].values() for drift in DRIFTS
           if drift in entry for point in entry[drift]["front"]
           if point.get("decides") and len(point["seeds"]) < SEEDS_WANTED}
    if few:
        lines += ["", f"Frontier points that decide a level (its drift is read off between them) measured on fewer than "
                      f"{SEEDS_WANTED} seeds (on one seed, resampling cannot move them and an interval through them is "
                      "too narrow): " + ", ".join(f"`{label}` ({n})" for label, n in sorted(few.items())) + "."]
    if curves["ratios"]:
        lines += ["", f"Drift needed by TMS / by the {CHEAP} (below 1: TMS needs less; the hoped-for bar is 0.5; "
                      "\"no ratio\": one of them does not reach the level, or the cheap alternatives reach it with no "
                      "drift at all):",
                  "", "| method | " + " | ".join(f"chat KL at {k}" for k in levels) + " | "
                  + " | ".join(f"WikiText change at {k}" for k in levels) + " |",
                  "|---|" + "---|" * (2 * len(levels))]
        for name, by_drift in curves["ratios"].items():
            cells = [cell(by_drift[drift][k], "ratio", "no ratio") if drift in by_drift else "-"
                     for drift in DRIFTS for k in levels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]
