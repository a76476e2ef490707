"""The plots: target gain against forgetting per arm with the Pareto frontier (a `pareto_<regime>.png` per regime), and
the live signals against forgetting at every checkpoint (`signals.png`; forgetting_meter.py's `meter_vs_probes.png`).
"""

from __future__ import annotations

import os

from .records import final
from .report import signal_points


def pyplot():
    """matplotlib's pyplot without a display, or None where matplotlib is not installed (the plots are skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def frontier(points: dict) -> list[tuple]:
    """The (forgetting, gain) points that learned something and that no other point beats on both, by forgetting."""
    return sorted(p for p in points.values() if p[1] > 0
                  and not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points.values()))


def plots(result: dict, arms: dict, output_dir: str) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    written = []
    for regime, r in result["regimes"].items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        base = final(arms[regime]["base"][0])
        colours = {arm: plt.get_cmap("tab20")(i % 20) for i, arm in enumerate(r["arms"])}
        for ax, key, label in ((axes[0], "chat_kl", "chat KL(base || model)"),
                               (axes[1], "wiki_nll", "WikiText NLL change vs base")):
            points = {arm: (s[key]["delta"], s["target_gain"]) for arm, s in r["arms"].items()}
            ax.plot(*zip(*frontier(points)), "--", color="grey", lw=1, label="frontier")
            if "sft" in r["arms"]:
                # Issue #17's bar: at least 0.9x SFT's gain with at most a third of its drift (up and left of both).
                ax.axhline(0.9 * r["arms"]["sft"]["target_gain"], color="grey", lw=0.6, alpha=0.6,
                           label="0.9x SFT's gain")
                ax.axvline(r["arms"]["sft"][key]["delta"] / 3, color="grey", lw=0.6, alpha=0.6, ls="-.",
                           label="1/3 of SFT's drift")
            for arm, (x, y) in points.items():
                ax.scatter([x], [y], s=55, color=colours[arm], marker="o" if arm.startswith("sft") else "s",
                           label=arm, zorder=3)
            for arm in ("sft", "tms", "tms_online"):  # the paths through their checkpoints (seed 0)
                for record in arms[regime].get(arm, [])[:1]:
                    xs = [0.0] + [(c["chat_kl"] if key == "chat_kl" else c["wikitext_nll"] - base["wikitext_nll"])
                                  for c in record["checkpoints"]]
                    ys = [0.0] + [c["target_accuracy"] - base["target_accuracy"] for c in record["checkpoints"]]
                    ax.plot(xs, ys, ":", lw=1, color=colours[arm], label=f"{arm} path (seed {record['seed']})")
            ax.set_xlabel(f"{label} (lower = retains more)")
            ax.set_ylabel("target accuracy gain over base")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"Regime {regime}: target gain vs forgetting (up and left is better)")
        fig.tight_layout()
        path = os.path.join(output_dir, f"pareto_{regime}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    written += frontier_plots(result, output_dir)
    points = signal_points(arms)  # SmolLM2's regimes: another family's signals run on scales of their own
    if points:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        for ax, name in zip(axes, ("pld", "pld_drift", "retention_kl")):
            for arm in sorted({p["arm"] for p in points}):
                sel = [p for p in points if p["arm"] == arm]
                ax.scatter([p[name] for p in sel], [p["chat_kl"] for p in sel], s=18, label=arm)
            ax.set_xlabel(name)
            ax.set_ylabel("chat KL (forgetting)")
        axes[0].legend(fontsize=7)
        fig.suptitle("Candidate signals vs forgetting, every checkpoint of every SmolLM2 run")
        fig.tight_layout()
        path = os.path.join(output_dir, "signals.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def frontier_plots(result: dict, output_dir: str) -> list[str]:
    """Issue #44: each method's frontier (its concave envelope, from the base model at the origin, as `curves.py` reads
    it), one figure per regime."""
    from .curves import DRIFTS
    from .frontier import ORIGIN, envelope

    plt = pyplot()
    written = []
    for regime, r in result["regimes"].items():
        curves = r.get("frontiers")
        if plt is None or not curves:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        styles = {"tms": "-", "cheap": "--", "verifier": ":"}
        for ax, (drift, (label, _)) in zip(axes, DRIFTS.items()):
            for i, (name, entry) in enumerate(curves["methods"].items()):
                if drift not in entry:
                    continue
                front = envelope([(p["drift"], p["gain"]) for p in entry[drift]["front"]] + [ORIGIN])
                family = "cheap" if name.startswith("cheap") or name.startswith("SFT") else (
                    "verifier" if "verifier" in name else "tms")
                width = 2.2 if name.startswith("cheap") or family == "tms" else 1.2
                ax.plot(*zip(*front), styles[family], marker="o", ms=4, lw=width, color=plt.get_cmap("tab10")(i),
                        label=f"{name} ({entry['points']} points)")
            for key, gain in curves["levels"].items():
                ax.axhline(gain, color="grey", lw=0.6, alpha=0.5)
                ax.annotate(f"{key} SFT's gain", (ax.get_xlim()[1], gain), fontsize=7, color="grey", ha="right",
                            va="bottom")
            ax.set_xlabel(f"{label} (lower = retains more)")
            ax.set_ylabel("target accuracy gain over base")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"Regime {regime}: each method's frontier over its dials (up and left is better)")
        fig.tight_layout()
        path = os.path.join(output_dir, f"frontier_{regime}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def meter_vs_probes(rows: list[dict], path: str) -> None:
    """forgetting_meter.py's checkpoints: each live signal against the forgetting other probes measured."""
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    runs = sorted({r["run"] for r in rows})
    colors = dict(zip(runs, ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]))
    for axis, (x_key, y_key, x_label, y_label) in zip(axes, [
        ("retention_kl", "chat_kl", "meter: retention_kl", "chat KL to base, other prompts"),
        ("retention_kl", "wikitext_nll", "meter: retention_kl", "WikiText NLL change"),
        ("pld", "chat_kl", "PLD (held-out labels' NLL)", "chat KL to base, other prompts"),
    ]):
        for r in rows:
            marker = "s" if r["phase"] == "student" else "o"
            axis.scatter(r[x_key], r[y_key], color=colors[r["run"]], marker=marker, s=30)
        for run in runs:
            axis.scatter([], [], color=colors[run], label=run)
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="run (square: TMS student)")
    figure.suptitle("Live signals against forgetting measured by other probes, at every checkpoint")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
