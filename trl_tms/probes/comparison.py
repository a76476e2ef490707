"""
Fine-tunes side by side: each arm is a LoRA adapter's weights, measured in turn in one PEFT model (whose adapter
switched off is the base model) on what it learned (target accuracy on held-out problems) and on what it forgot
(behaviour drift on everyday prompts, WikiText NLL), item by item, so that differences come with paired standard
errors. An arm can also be measured at scales of its adapter's delta: the retention dial ([`trl_tms.dial`]), whose curve
runs from the base model (scale 0) to the adapter (scale 1).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field

import torch
from peft.helpers import rescale_adapter_scale

from ..generation import greedy_answers
from ..history import adapter_weights, restore_adapter
from .measures import GENERAL_PROMPTS, chat_drift, chat_ids, paired_se, target_accuracy, text_nll

METRICS = ("correct", "chat_kl", "wikitext_nll")


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


def scaled_name(arm: str, scale: float) -> str:
    """The name of `arm`'s adapter measured at `scale` of its delta, e.g. `sft@0.5`."""
    return f"{arm}@{scale:g}"


@dataclass
class Comparison:
    """
    The base model and each arm measured side by side (and each arm at the scales of its dial), with each run's wall
    time in seconds.

    Args:
        arms (`dict[str, ArmResult]`):
            `"base"`, then each arm by name, then its dial's points (`scaled_name(arm, scale)`).
        titles (`dict[str, str]`):
            Each arm's title in tables and plots.
        scales (`dict[str, list[float]]`):
            The dial's measured scales (strictly between 0 and 1) of each arm that has them.
        wall_seconds (`dict[str, float]`):
            Training time per arm.
        example (`dict[str, str]`):
            One everyday prompt and each model's answer to it.
    """

    arms: dict[str, ArmResult]
    titles: dict[str, str]
    scales: dict[str, list[float]] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)
    example: dict[str, str] = field(default_factory=dict)

    def change(self, arm: str, metric: str, against: str = "base") -> tuple[float, float]:
        """
        `arm`'s change against `against` in `metric` (`correct`, `chat_kl`, `wikitext_nll`), and its paired standard
        error; NaN for a metric that was not measured.
        """
        after, before = getattr(self.arms[arm], metric), getattr(self.arms[against], metric)
        if not after:
            return float("nan"), float("nan")
        return sum(after) / len(after) - sum(before) / len(before), paired_se(after, before)

    def dial(self, arm: str) -> list[tuple[float, ArmResult]]:
        """`arm`'s dial from the base model (scale 0) through its measured scales to the adapter (scale 1)."""
        inner = [(scale, self.arms[scaled_name(arm, scale)]) for scale in self.scales.get(arm, [])]
        return [(0.0, self.arms["base"]), *inner, (1.0, self.arms[arm])]

    def verdict(self, arm: str, against: str, accuracy_share: float = 0.9) -> dict:
        """
        Whether `arm` forgot less than `against` beyond the paired standard error of the difference, in chat KL and in
        WikiText NLL, while keeping at least `accuracy_share` of its target accuracy.
        """
        accuracy, reference = self.arms[arm].accuracy, self.arms[against].accuracy
        result = {"accuracy_ratio": accuracy / reference if reference else float("nan")}
        result["accuracy_kept"] = accuracy >= accuracy_share * reference
        for metric in METRICS[1:]:
            difference, se = self.change(arm, metric, against)
            result[metric] = (difference, se)
            result[f"{metric}_lower_beyond_se"] = bool(difference < 0 and -difference > se)
        return result

    def table(self) -> str:
        """The side-by-side table, as plain text: one row per model, the dial's points under their arm."""
        n_target = len(self.arms["base"].correct)
        n_chat = len(self.arms["base"].chat_kl)
        n_wiki = len(self.arms["base"].wikitext_nll)
        width = max(len(self.title(name)) for name in self.arms) + 2
        rows = [
            f"{'':{width}s}{'target accuracy':>22s}  {'chat KL to base':>16s}  {'WikiText NLL':>24s}  {'train s':>8s}",
        ]
        for name, result in self.arms.items():
            gain, gain_se = self.change(name, "correct")
            wiki, wiki_se = self.change(name, "wikitext_nll")
            kl_se = paired_se(result.chat_kl, [0.0] * len(result.chat_kl))
            target = f"{result.accuracy:.2f}" + ("" if name == "base" else f" ({gain:+.2f} ± {gain_se:.2f})")
            drift = "0 (reference)" if name == "base" else f"{result.mean_chat_kl:.3f} ± {kl_se:.3f}"
            if result.mean_wikitext_nll is None:
                text = "not measured"
            else:
                text = f"{result.mean_wikitext_nll:.3f}" + ("" if name == "base" else f" ({wiki:+.3f} ± {wiki_se:.3f})")
            seconds = self.wall_seconds.get(name)
            rows.append(
                f"{self.title(name):{width}s}{target:>22s}  {drift:>16s}  {text:>24s}  "
                f"{'' if seconds is None else f'{seconds:.0f}':>8s}"
            )
        rows += [
            "",
            f"Items: {n_target} held-out problems, {n_chat} everyday prompts, {n_wiki} WikiText sentences. Changes in "
            "brackets are against the base model (± paired standard errors). Lower KL and NLL = less forgetting.",
        ]
        return "\n".join(rows)

    def title(self, name: str) -> str:
        arm, _, scale = name.partition("@")
        return self.titles.get(arm, arm) + (f", adapter x {scale}" if scale else "")

    def to_dict(self) -> dict:
        return {
            "arms": {name: {**asdict(result), "accuracy": result.accuracy, "mean_chat_kl": result.mean_chat_kl,
                            "mean_wikitext_nll": result.mean_wikitext_nll} for name, result in self.arms.items()},
            "changes": {name: {m: self.change(name, m) for m in METRICS} for name in self.arms if name != "base"},
            "titles": self.titles,
            "scales": self.scales,
            "wall_seconds": self.wall_seconds,
            "example": self.example,
        }


def compare_adapters(
    probe: ArmProbe,
    adapters: dict[str, dict[str, torch.Tensor]],
    titles: dict[str, str] | None = None,
    scales: dict[str, list[float]] | None = None,
    adapter_name: str = "default",
    wall_seconds: dict[str, float] | None = None,
    example_arms: tuple[str, str] | None = None,
) -> Comparison:
    """
    Measure the base model (the probe's model with its adapter off), then each arm's adapter weights loaded in turn into
    the adapter `adapter_name` of the probe's model, and each arm at its dial's `scales` (PEFT's
    `rescale_adapter_scale`). The adapter's own weights are put back afterwards.

    Args:
        probe ([`ArmProbe`]):
            The probes, on a PEFT model with the adapter `adapter_name`.
        adapters (`dict[str, dict[str, torch.Tensor]]`):
            Each arm's adapter weights by full parameter name, as [`~trl_tms.history.adapter_weights`] returns them from
            a model with the same LoRA configuration (and adapter name).
        titles (`dict[str, str]`, *optional*):
            Each arm's title.
        scales (`dict[str, list[float]]`, *optional*):
            Scales of the delta to measure per arm, each strictly between 0 and 1 (0 is the base, 1 the arm).
        adapter_name (`str`, *optional*, defaults to `"default"`):
            The adapter the weights are loaded into.
        wall_seconds (`dict[str, float]`, *optional*):
            Training time per arm, carried into the result.
        example_arms (`tuple[str, str]`, *optional*):
            `(drifting, retaining)`: two arms whose answers to one everyday prompt, picked by [`EXAMPLE_RULE`], are
            shown with the base model's.
    """
    scales = {arm: sorted(float(s) for s in values) for arm, values in (scales or {}).items() if values}
    for arm, values in scales.items():
        if arm not in adapters:
            raise ValueError(f"Scales were given for {arm!r}, which is not one of the arms {sorted(adapters)}.")
        if any(not 0 < s < 1 for s in values):
            raise ValueError(f"Dial scales must lie strictly between 0 (the base) and 1 (the adapter); got {values}.")
    model = probe.model
    if probe.conversations is None:
        probe.initial_answers()
    own = adapter_weights(model, adapter_name)
    arms = {"base": probe.measure("base", initial=True)}
    try:
        for arm, weights in adapters.items():
            missing = set(own) - set(weights)
            if missing:
                raise ValueError(f"Arm {arm!r} lacks weights of the adapter {adapter_name!r}, e.g. {sorted(missing)[0]}: "
                                 "its LoRA configuration differs from the probe model's.")
            restore_adapter(model, adapter_name, weights)
            arms[arm] = probe.measure(arm)
            for scale in scales.get(arm, []):
                with rescale_adapter_scale(model, scale):
                    arms[scaled_name(arm, scale)] = probe.measure(scaled_name(arm, scale))
    finally:
        restore_adapter(model, adapter_name, own)
    example = {}
    if example_arms:
        drifting, retaining = example_arms
        prompt = probe.general_prompts[example_index(arms[drifting].chat_kl, arms[retaining].chat_kl)]
        example = {"prompt": prompt, "rule": EXAMPLE_RULE, "base": probe.answer(prompt, initial=True)}
        try:
            for arm in example_arms:
                restore_adapter(model, adapter_name, adapters[arm])
                example[arm] = probe.answer(prompt)
        finally:
            restore_adapter(model, adapter_name, own)
    ordered = {"base": arms["base"]}
    for arm in adapters:
        ordered[arm] = arms[arm]
    for arm in adapters:
        for scale in scales.get(arm, []):
            ordered[scaled_name(arm, scale)] = arms[scaled_name(arm, scale)]
    return Comparison(arms=ordered, titles={"base": "base model", **(titles or {})}, scales=scales,
                      wall_seconds=dict(wall_seconds or {}), example=example)


EXAMPLE_RULE = (
    "of the everyday prompts on which the retaining arm stayed at least as close to the base as on half of them, the "
    "one on which the drifting arm's KL to the base exceeds the retaining arm's the most"
)


def example_index(drifting_kl: list[float], retaining_kl: list[float]) -> int:
    """
    The prompt [`EXAMPLE_RULE`] picks, from each arm's KL to the base per prompt. Only prompts where the retaining arm's
    own KL is at most its median are eligible: the largest gap alone can land where both arms drifted far (the
    retaining arm's answer then shows no more of the base's than the other's does).
    """
    if len(drifting_kl) != len(retaining_kl) or not drifting_kl:
        raise ValueError(f"Need one KL per prompt for both arms, got {len(drifting_kl)} and {len(retaining_kl)}.")
    median = sorted(retaining_kl)[(len(retaining_kl) - 1) // 2]
    eligible = [i for i, kl in enumerate(retaining_kl) if kl <= median]
    return max(eligible, key=lambda i: drifting_kl[i] - retaining_kl[i])


COLORS = {"base": "grey", "sft": "tab:red", "tms": "tab:blue"}


def plot_comparison(comparison: Comparison, log_histories: dict[str, list[dict]], output_dir: str) -> list[str]:
    """
    Write `side_by_side.png` (each model's target accuracy against its forgetting, each dial as a dashed line from the
    base model to its arm) and `training_curves.png` (each run's loss and forgetting meter over its steps) into
    `output_dir`; returns their paths, or `[]` without matplotlib.

    Args:
        comparison ([`Comparison`]):
            What was measured.
        log_histories (`dict[str, list[dict]]`):
            Each arm's `trainer.state.log_history`.
        output_dir (`str`):
            Where the plots go.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cycle = iter(["tab:green", "tab:purple", "tab:orange", "tab:brown"])
    colors = {arm: COLORS.get(arm) or next(cycle, "black") for arm in comparison.titles}
    base = comparison.arms["base"]
    metrics = [("chat_kl", "behaviour drift: chat KL to the base (nats/token)")]
    if base.wikitext_nll:
        metrics.append(("wikitext_nll", "WikiText NLL change vs base (nats/token)"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.8 * len(metrics), 4.4), squeeze=False)
    for axis, (metric, label) in zip(axes[0], metrics):
        axis.plot(0.0, base.accuracy, "o", color=colors["base"], markersize=8, label=comparison.titles["base"])
        for arm in comparison.titles:
            if arm == "base":
                continue
            dial = comparison.dial(arm)
            if len(dial) > 2:
                xs = [0.0 if scale == 0 else comparison.change(point.name, metric)[0] for scale, point in dial]
                ys = [point.accuracy for _, point in dial]
                axis.plot(xs, ys, "--", color=colors[arm], alpha=0.6, label=f"{comparison.titles[arm]}: adapter scale")
                for (scale, _), x, y in list(zip(dial, xs, ys))[1:-1]:
                    axis.plot(x, y, "s", color=colors[arm], markersize=5, alpha=0.8)
                    axis.annotate(f"x{scale:g}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8,
                                  color=colors[arm])
            gain_se = comparison.change(arm, "correct")[1]
            drift, drift_se = comparison.change(arm, metric)
            axis.errorbar(drift, comparison.arms[arm].accuracy, xerr=drift_se, yerr=gain_se, fmt="o",
                          color=colors[arm], capsize=4, markersize=8, label=comparison.titles[arm])
        axis.set_xlabel(label + "  (less forgetting ←)")
        axis.set_ylabel("target accuracy (held-out)")
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    figure.suptitle("What each fine-tune learned and what it forgot (error bars: paired SE)")
    figure.tight_layout()
    paths = [os.path.join(output_dir, "side_by_side.png")]
    figure.savefig(paths[0], dpi=110)
    plt.close(figure)

    curves = [("loss", "training loss"),
              ("retention_kl", "forgetting meter: retention_kl (KL per token\nfrom the initial model, everyday prompts)")]
    curves = [(key, title) for key, title in curves if any(key in e for h in log_histories.values() for e in h)]
    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for arm, history in log_histories.items():
        for axis, (key, title) in zip(axes[0], curves):
            points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
            if points:
                axis.plot(*zip(*points), "-o", color=colors.get(arm, "black"), label=comparison.titles.get(arm, arm),
                          markersize=3)
            axis.set_title(title)
    for axis in axes[0]:
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "training_curves.png"))
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
    return paths
