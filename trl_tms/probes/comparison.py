"""
Plain SFT and TMS side by side, from one TMS run: its harvest *is* plain SFT on the same data, steps and seed, so its
final snapshot is the SFT arm, the student is the TMS arm, and the adapter switched off is the base model. Each arm is
measured on what it learned (target accuracy on held-out problems) and on what it forgot (behaviour drift on everyday
prompts, WikiText NLL), item by item, so that differences come with paired standard errors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field

import torch

from ..generation import greedy_answers
from ..history import adapter_parameters
from .measures import GENERAL_PROMPTS, chat_drift, chat_ids, paired_se, target_accuracy, text_nll

ARMS = ("base", "sft", "tms")
ARM_TITLES = {"base": "base model", "sft": "plain SFT (the harvest)", "tms": "TMS student"}


@dataclass
class ArmResult:
    """What one arm scored: per-item values (for paired errors) and their means."""

    name: str
    correct: list[int]
    answers: list[str]
    chat_kl: list[float]
    chat_nll: list[float]
    wikitext_nll: list[float] = field(default_factory=list)  # per sentence; empty when WikiText is not available

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def mean_chat_kl(self) -> float:
        return sum(self.chat_kl) / len(self.chat_kl)

    @property
    def mean_wikitext_nll(self) -> float | None:
        return sum(self.wikitext_nll) / len(self.wikitext_nll) if self.wikitext_nll else None


class ArmProbe:
    """
    Measures the adapter currently active in a PEFT model against the same model with its adapter switched off (the
    initial model, as long as the base weights are frozen).

    Args:
        model ([`~peft.PeftModel`]):
            The model; its adapter is switched off to read the initial model.
        tokenizer:
            Its tokenizer (with a chat template and a pad token).
        heldout ([`~datasets.Dataset`]):
            Held-out prompt-completion problems with an `answer` column.
        is_correct (`Callable`):
            `is_correct(text, answer) -> bool`.
        answer_tokens (`int`):
            Longest greedy answer to a held-out problem.
        general_prompts (`list[str]`):
            Everyday prompts for the behaviour drift.
        chat_tokens (`int`):
            Longest reference answer of the initial model to a general prompt.
        wikitext (`list[str]`, *optional*):
            General text whose NLL is measured (see [`load_wikitext`]).
        batch_size (`int`, *optional*, defaults to `64`):
            Rows per `generate` call and per scoring forward. A decode step of a small model costs about the same for
            32 rows as for 64, so fewer, fuller calls finish sooner.
    """

    def __init__(
        self,
        model,
        tokenizer,
        heldout,
        is_correct,
        answer_tokens: int,
        general_prompts: list[str] = GENERAL_PROMPTS[:24],
        chat_tokens: int = 64,
        wikitext: list[str] | None = None,
        batch_size: int = 64,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.heldout = heldout
        self.is_correct = is_correct
        self.answer_tokens = answer_tokens
        self.general_prompts = list(general_prompts)
        self.chat_tokens = chat_tokens
        self.wikitext = [t for t in wikitext or [] if len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 1]
        self.batch_size = batch_size
        self.conversations = None

    def initial_answers(self) -> None:
        """The initial model's greedy answers to the general prompts: the references of the behaviour drift."""
        prompts = [chat_ids(self.tokenizer, prompt) for prompt in self.general_prompts]
        with self.initial_model():
            answers = greedy_answers(self.model, self.tokenizer, prompts, self.chat_tokens, self.batch_size)
        self.conversations = list(zip(prompts, answers))

    def initial_model(self):
        return self.model.disable_adapter()

    @torch.no_grad()
    def measure(self, name: str, initial: bool = False) -> ArmResult:
        """Every probe on the model as it is now (`initial=True`: with its adapter switched off)."""
        if self.conversations is None:
            self.initial_answers()
        was_training = self.model.training
        try:
            with self.initial_model() if initial else contextlib.nullcontext():
                target = target_accuracy(
                    self.model, self.tokenizer, self.heldout, self.answer_tokens, self.is_correct, self.batch_size
                )
                wiki = text_nll(self.model, self.tokenizer, self.wikitext, self.batch_size) if self.wikitext else None
                chat = chat_drift(self.model, self.tokenizer, self.conversations, reference=None if initial else self.initial_model)
        finally:
            self.model.train(was_training)
        return ArmResult(
            name=name,
            correct=target["correct"],
            answers=target["texts"],
            chat_kl=chat["kls"],
            chat_nll=chat["nlls"],
            wikitext_nll=[s / n for s, n in zip(wiki["sums"], wiki["tokens"])] if wiki else [],
        )

    @torch.no_grad()
    def answer(self, prompt: str, initial: bool = False) -> str:
        """Greedy answer of the model as it is now (or initial) to one general prompt."""
        ids = [chat_ids(self.tokenizer, prompt)]
        with self.initial_model() if initial else contextlib.nullcontext():
            tokens = greedy_answers(self.model, self.tokenizer, ids, self.chat_tokens, 1)[0]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@dataclass
class Comparison:
    """Base, plain SFT and TMS measured side by side, with each phase's wall time (seconds)."""

    arms: dict[str, ArmResult]
    wall_seconds: dict[str, float]
    example: dict[str, str] = field(default_factory=dict)  # one general prompt and each arm's answer to it

    def change(self, arm: str, metric: str, against: str = "base") -> tuple[float, float]:
        """
        `arm`'s change against `against` in `metric` (`correct`, `chat_kl`, `wikitext_nll`), and its paired standard
        error; NaN for a metric that was not measured.
        """
        after, before = getattr(self.arms[arm], metric), getattr(self.arms[against], metric)
        if not after:
            return float("nan"), float("nan")
        return sum(after) / len(after) - sum(before) / len(before), paired_se(after, before)

    def tms_minus_sft(self, metric: str) -> tuple[float, float]:
        return self.change("tms", metric, against="sft")

    def table(self) -> str:
        """The side-by-side table, as plain text."""
        n_target = len(self.arms["base"].correct)
        n_chat = len(self.arms["base"].chat_kl)
        n_wiki = len(self.arms["base"].wikitext_nll)
        rows = [
            f"{'':26s}{'target accuracy':>22s}  {'chat KL to base':>16s}  {'WikiText NLL':>24s}  {'train s':>8s}",
        ]
        for arm in ARMS:
            result = self.arms[arm]
            gain, gain_se = self.change(arm, "correct")
            wiki, wiki_se = self.change(arm, "wikitext_nll")
            kl_se = paired_se(result.chat_kl, [0.0] * len(result.chat_kl))
            target = f"{result.accuracy:.2f}" + ("" if arm == "base" else f" ({gain:+.2f} ± {gain_se:.2f})")
            drift = "0 (reference)" if arm == "base" else f"{result.mean_chat_kl:.3f} ± {kl_se:.3f}"
            if result.mean_wikitext_nll is None:
                text = "not measured"
            else:
                text = f"{result.mean_wikitext_nll:.3f}" + ("" if arm == "base" else f" ({wiki:+.3f} ± {wiki_se:.3f})")
            seconds = self.wall_seconds.get(arm)
            rows.append(
                f"{ARM_TITLES[arm]:26s}{target:>22s}  {drift:>16s}  {text:>24s}  "
                f"{'' if seconds is None else f'{seconds:.0f}':>8s}"
            )
        d_acc, d_acc_se = self.tms_minus_sft("correct")
        d_kl, d_kl_se = self.tms_minus_sft("chat_kl")
        line = f"TMS minus SFT: target accuracy {d_acc:+.2f} ± {d_acc_se:.2f}, chat KL {d_kl:+.3f} ± {d_kl_se:.3f}"
        if n_wiki:
            d_wiki, d_wiki_se = self.tms_minus_sft("wikitext_nll")
            line += f", WikiText NLL {d_wiki:+.3f} ± {d_wiki_se:.3f}"
        rows += [
            "",
            line + " (paired standard errors).",
            f"Items: {n_target} held-out problems, {n_chat} everyday prompts, {n_wiki} WikiText sentences. Changes in "
            "brackets are against the base model. Lower KL and NLL = less forgetting.",
        ]
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "arms": {name: {**asdict(result), "accuracy": result.accuracy, "mean_chat_kl": result.mean_chat_kl,
                            "mean_wikitext_nll": result.mean_wikitext_nll} for name, result in self.arms.items()},
            "changes": {arm: {m: self.change(arm, m) for m in ("correct", "chat_kl", "wikitext_nll")} for arm in ARMS[1:]},
            "tms_minus_sft": {m: self.tms_minus_sft(m) for m in ("correct", "chat_kl", "wikitext_nll")},
            "wall_seconds": self.wall_seconds,
            "example": self.example,
        }


def compare_sft_and_tms(trainer, probe: ArmProbe, wall_seconds: dict[str, float] | None = None) -> Comparison:
    """
    Measure a finished two-pass TMS run's three arms with `probe`: the base (adapter off), plain SFT (the harvest's final
    snapshot, swapped into the adapter for the time of its measurement) and the TMS student. Also picks, by a stated
    rule, one everyday prompt to show ([`example_index`]).
    """
    if trainer.args.tms_mode != "two_pass":
        raise ValueError("The side-by-side comparison reads plain SFT off the harvest: it needs `tms_mode='two_pass'`.")
    model, adapter = trainer.model, trainer.adapter_name
    if probe.conversations is None:
        probe.initial_answers()
    arms = {"base": probe.measure("base", initial=True), "tms": probe.measure("tms")}
    student = {name: param.detach().clone() for name, param in adapter_parameters(model, adapter).items()}
    try:
        trainer.history.load_into(model, trainer.history.steps[-1], adapter)
        arms["sft"] = probe.measure("sft")
        prompt = probe.general_prompts[example_index(arms["sft"].chat_kl, arms["tms"].chat_kl)]
        sft_answer = probe.answer(prompt)
    finally:
        with torch.no_grad():
            for name, param in adapter_parameters(model, adapter).items():
                param.copy_(student[name])
    example = {
        "prompt": prompt,
        "rule": EXAMPLE_RULE,
        "base": probe.answer(prompt, initial=True),
        "sft": sft_answer,
        "tms": probe.answer(prompt),
    }
    return Comparison(arms={arm: arms[arm] for arm in ARMS}, wall_seconds=dict(wall_seconds or {}), example=example)


EXAMPLE_RULE = (
    "of the everyday prompts on which the TMS student stayed at least as close to the base as on half of them, the one "
    "on which plain SFT's KL to the base exceeds the student's the most"
)


def example_index(sft_kl: list[float], tms_kl: list[float]) -> int:
    """
    The prompt [`EXAMPLE_RULE`] picks, from each arm's KL to the base per prompt. Only prompts where the student's own
    KL is at most its median are eligible: the largest gap alone can land where both arms drifted far (the student's
    answer then shows no more of the base's than SFT's does).
    """
    if len(sft_kl) != len(tms_kl) or not sft_kl:
        raise ValueError(f"Need one KL per prompt for both arms, got {len(sft_kl)} and {len(tms_kl)}.")
    median = sorted(tms_kl)[(len(tms_kl) - 1) // 2]
    eligible = [i for i, kl in enumerate(tms_kl) if kl <= median]
    return max(eligible, key=lambda i: sft_kl[i] - tms_kl[i])


def plot_comparison(comparison: Comparison, log_history: list[dict], output_dir: str) -> list[str]:
    """
    Write `side_by_side.png` (each arm's target accuracy against its forgetting) and `training_curves.png` (loss, PLD
    and the forgetting meter over each phase) into `output_dir`; returns their paths, or `[]` without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    colors = {"base": "grey", "sft": "tab:red", "tms": "tab:blue"}
    metrics = [("chat_kl", "behaviour drift: chat KL to the base (nats/token)")]
    if comparison.arms["base"].wikitext_nll:
        metrics.append(("wikitext_nll", "WikiText NLL change vs base (nats/token)"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for axis, (metric, label) in zip(axes[0], metrics):
        for arm in ARMS:
            accuracy, accuracy_se = comparison.change(arm, "correct") if arm != "base" else (0.0, 0.0)
            accuracy += comparison.arms["base"].accuracy
            drift, drift_se = comparison.change(arm, metric) if arm != "base" else (0.0, 0.0)
            axis.errorbar(drift, accuracy, xerr=drift_se, yerr=accuracy_se, fmt="o", color=colors[arm], capsize=4,
                          markersize=8, label=ARM_TITLES[arm])
        axis.set_xlabel(label + "  (less forgetting ←)")
        axis.set_ylabel("target accuracy (held-out)")
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    figure.suptitle("What each arm learned and what it forgot (error bars: paired SE)")
    figure.tight_layout()
    paths = [os.path.join(output_dir, "side_by_side.png")]
    figure.savefig(paths[0], dpi=110)
    plt.close(figure)

    curves = [("loss", "training loss"), ("pld", "PLD (held-out labels' NLL per token)"),
              ("retention_kl", "forgetting meter: retention_kl (KL per token\nfrom the initial model, everyday prompts)")]
    curves = [(key, title) for key, title in curves if any(key in e for e in log_history)]
    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    axes = axes[0]
    for phase, name, color in ((1, "harvest (plain SFT)", "tab:red"), (2, "TMS student", "tab:blue")):
        for axis, (key, title) in zip(axes, curves):
            points = [(e["step"], e[key]) for e in log_history if e.get("tms_phase") == phase and key in e]
            if points:
                axis.plot(*zip(*points), "-o", color=color, label=name, markersize=3)
            axis.set_title(title)
    for axis in axes:
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "training_curves.png"))
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
    return paths

