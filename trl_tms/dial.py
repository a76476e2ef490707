"""
The retention dial: after training, scale the LoRA delta between the base model (scale 0) and the trained adapter
(scale 1), which is WiSE-FT for LoRA, and keep the scale that meets a forgetting budget or a score floor.

[`trace_adapter_scale`] measures, at each scale, the forgetting meter's `retention_kl` (KL from the base model on
everyday prompts) and a held-out score, under PEFT's `rescale_adapter_scale`. [`AdapterScaleCurve.choose`] picks a
scale from the curve; [`apply_adapter_scale`] makes it the adapter's own: the adapter's `lora_alpha` is multiplied by
the scale, so that `save_model()` / `push_to_hub()` write an `adapter_config.json` that plain
`PeftModel.from_pretrained` loads at the chosen scale, with no custom loader. Given a trainer, the curve and its plot
are saved beside the adapter in `output_dir` and the model card states the scale.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, PeftModel
from peft.helpers import rescale_adapter_scale
from peft.tuners.lora import LoraLayer
from transformers.utils import logging

from .atomic import write_json_atomically
from .hub import add_adapter_scale_to_card
from .pld import PLDCallback, policy_label_divergence
from .retention import RetentionCallback

logger = logging.get_logger(__name__)

CURVE_FILE = "adapter_scale.json"
PLOT_FILE = "adapter_scale.png"
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SCORE = "eval_nll"


@dataclass
class ScalePoint:
    """
    One scale of the dial: `retention_kl` and `retention_nll` (the forgetting meter's values, nats per token) and
    `score` (the held-out score, `None` when the trace measured none).
    """

    scale: float
    retention_kl: float
    retention_nll: float
    score: float | None = None


@dataclass
class AdapterScaleCurve:
    """
    The dial's curve: one [`ScalePoint`] per traced scale, in increasing scale, and what the score is.

    Args:
        points (`list[ScalePoint]`):
            The measured scales.
        score_name (`str`, *optional*):
            What `score` is: `"eval_nll"` (the default score: mean per-token NLL of the eval set's labels, lower is
            better) or the name of the user's score function.
        greater_is_better (`bool`, *optional*, defaults to `True`):
            Whether a higher score is better.
        chosen_scale (`float`, *optional*):
            The scale [`choose`] picked or [`apply_adapter_scale`] applied.
        criterion (`str`, *optional*):
            Why that scale, in words (e.g. `"largest scale with retention_kl <= 0.05"`).
    """

    points: list[ScalePoint]
    score_name: str | None = None
    greater_is_better: bool = True
    chosen_scale: float | None = None
    criterion: str | None = None

    @property
    def scales(self) -> list[float]:
        return [p.scale for p in self.points]

    def point(self, scale: float) -> ScalePoint:
        """The traced point at `scale`; an error if that scale was not traced."""
        for p in self.points:
            if p.scale == scale:
                return p
        raise ValueError(f"Scale {scale} was not traced; the curve has scales {self.scales}.")

    def choose(self, max_retention_kl: float | None = None, min_score: float | None = None,
               max_score: float | None = None) -> float:
        """
        Pick a traced scale, remember it (`chosen_scale`, `criterion`) and return it.

        With a drift budget (`max_retention_kl`), the largest scale whose `retention_kl` is within it (and that meets
        the score bound, if one is given): the most of the adapter the budget allows. With only a score bound, the
        smallest scale that meets it: the least drift that keeps the score.

        Args:
            max_retention_kl (`float`, *optional*):
                The forgetting budget: highest acceptable `retention_kl` (nats per token).
            min_score (`float`, *optional*):
                Lowest acceptable score, for a score where higher is better (`greater_is_better=True`).
            max_score (`float`, *optional*):
                Highest acceptable score, for a score where lower is better, such as the default `eval_nll`.

        Raises:
            `ValueError`: no bound given, a bound that does not fit the score's direction, or no scale meets them.
        """
        if max_retention_kl is None and min_score is None and max_score is None:
            raise ValueError("Give a drift budget (`max_retention_kl=`) and/or a score bound (`min_score=` or "
                             "`max_score=`) to choose a scale.")
        if min_score is not None and max_score is not None:
            raise ValueError("Give `min_score` or `max_score`, not both.")
        if (min_score is not None or max_score is not None) and self.score_name is None:
            raise ValueError("This curve has no score: trace it with an eval dataset or a `score_fn` to bound a score.")
        if min_score is not None and not self.greater_is_better:
            raise ValueError(f"`{self.score_name}` is better when lower: bound it with `max_score=`, not `min_score=`.")
        if max_score is not None and self.greater_is_better:
            raise ValueError(
                f"`{self.score_name}` is better when higher: bound it with `min_score=`, not `max_score=`."
            )
        conditions = []
        if max_retention_kl is not None:
            conditions.append((f"retention_kl <= {max_retention_kl}", lambda p: p.retention_kl <= max_retention_kl))
        if min_score is not None:
            conditions.append((f"{self.score_name} >= {min_score}", lambda p: p.score >= min_score))
        if max_score is not None:
            conditions.append((f"{self.score_name} <= {max_score}", lambda p: p.score <= max_score))
        within = [p.scale for p in self.points if all(check(p) for _, check in conditions)]
        wanted = " and ".join(text for text, _ in conditions)
        if not within:
            scores = [p.score for p in self.points if p.score is not None]
            score_range = f"; {self.score_name} from {min(scores):.4g} to {max(scores):.4g}" if scores else ""
            kls = [p.retention_kl for p in self.points]
            raise ValueError(
                f"No traced scale meets {wanted}: over scales {self.scales}, retention_kl runs from {min(kls):.4g} to "
                f"{max(kls):.4g}{score_range}. Loosen the budget or the score bound, or trace more scales."
            )
        if max_retention_kl is not None:
            self.chosen_scale, self.criterion = max(within), f"largest scale with {wanted}"
        else:
            self.chosen_scale, self.criterion = min(within), f"smallest scale with {wanted}"
        return self.chosen_scale

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AdapterScaleCurve:
        values = dict(values)
        values["points"] = [ScalePoint(**p) for p in values["points"]]
        return cls(**values)

    @classmethod
    def load(cls, folder: str) -> AdapterScaleCurve:
        """The curve saved in `folder` (its `adapter_scale.json`)."""
        with open(os.path.join(folder, CURVE_FILE)) as f:
            return cls.from_dict(json.load(f))

    def save(self, folder: str) -> list[str]:
        """
        Write the curve to `folder/adapter_scale.json` and, when matplotlib is installed, its plot to
        `folder/adapter_scale.png`; returns the paths written.
        """
        path = os.path.join(folder, CURVE_FILE)
        write_json_atomically(path, self.to_dict())
        written = [path]
        plot = self.plot(os.path.join(folder, PLOT_FILE))
        if plot:
            written.append(plot)
        return written

    def plot(self, path: str) -> str | None:
        """
        Plot `retention_kl` and the score against the scale, with the chosen scale marked, as a PNG at `path`
        (atomically). Returns `path`, or `None` without matplotlib (`pip install matplotlib`).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.info("matplotlib is not installed: the adapter-scale curve is saved as JSON only.")
            return None
        figure, kl_axis = plt.subplots(figsize=(6, 4))
        kl_axis.plot(self.scales, [p.retention_kl for p in self.points], "o-", color="tab:red")
        kl_axis.set_xlabel("adapter scale (0 = base model, 1 = trained adapter)")
        kl_axis.set_ylabel("retention_kl (nats/token)", color="tab:red")
        if any(p.score is not None for p in self.points):
            score_axis = kl_axis.twinx()
            scored = [p for p in self.points if p.score is not None]
            score_axis.plot([p.scale for p in scored], [p.score for p in scored], "s--", color="tab:blue")
            better = "higher" if self.greater_is_better else "lower"
            score_axis.set_ylabel(f"{self.score_name} ({better} is better)", color="tab:blue")
        if self.chosen_scale is not None:
            kl_axis.axvline(self.chosen_scale, color="gray", linestyle=":")
            kl_axis.set_title(f"chosen scale {self.chosen_scale:g}" + (f": {self.criterion}" if self.criterion else ""),
                              fontsize=9)
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        staging = f"{path}.tmp.png"
        figure.savefig(staging, dpi=120)
        plt.close(figure)
        os.replace(staging, path)
        return path


def check_scalable(model) -> None:
    """
    Raise a `ValueError` unless scaling `model`'s adapter moves it on the line from the base model to the trained
    adapter: a PEFT model whose active adapters are plain LoRA, without DoRA (its magnitude vector is not scaled), bias
    training, `modules_to_save` or trainable tokens (full copies that a LoRA scale does not reach).
    """
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"The adapter-scale dial scales a LoRA adapter; got a {type(model).__name__}. Train with "
            "`peft_config=LoraConfig(...)`, or load the adapter with `PeftModel.from_pretrained`."
        )
    for name in model.active_adapters:
        config = model.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise ValueError(
                f"The adapter-scale dial scales LoRA adapters; adapter {name!r} is {type(config).__name__}."
            )
        unscaled = [what for what, present in (
            ("use_dora=True", config.use_dora),
            (f"bias={config.bias!r}", config.bias != "none"),
            ("modules_to_save", config.modules_to_save),
            ("trainable_token_indices", getattr(config, "trainable_token_indices", None)),
        ) if present]
        if unscaled:
            raise ValueError(
                f"Adapter {name!r} has {', '.join(unscaled)}: a LoRA scale does not reach that part of the adapter, so "
                "scale 0 would not be the base model. The dial needs a plain LoRA adapter."
            )


def _meter(trainer, meter: RetentionCallback | None) -> RetentionCallback:
    """The forgetting meter to trace with: the given one, else the trainer's own, else a new one with defaults."""
    if meter is None:
        meter = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RetentionCallback)), None)
    if meter is None:
        meter = RetentionCallback(trainer)
    if meter.reference is None:
        meter.start(trainer.state)  # a PEFT model's reference: the base with the adapter disabled
    return meter


def _default_score(trainer, eval_dataset) -> Callable | None:
    dataset = eval_dataset if eval_dataset is not None else trainer.eval_dataset
    if dataset is None:
        return None
    # PLDCallback prepares a raw eval set like the trainer's own and checks it has labels; its PLD is the mean
    # per-token NLL of the labels, what eval loss measures.
    labelled = PLDCallback(trainer, eval_dataset=dataset, num_samples=sys.maxsize).dataset
    return lambda model: policy_label_divergence(trainer, labelled)


def trace_adapter_scale(
    trainer,
    scales: Sequence[float] = DEFAULT_SCALES,
    score_fn: Callable | None = None,
    *,
    score_name: str | None = None,
    greater_is_better: bool = True,
    eval_dataset=None,
    meter: RetentionCallback | None = None,
) -> AdapterScaleCurve:
    """
    Trace the retention dial of a trained LoRA adapter: at each scale of the adapter's delta (0 = base model, 1 = the
    adapter as trained, applied with PEFT's `rescale_adapter_scale`), the forgetting meter's `retention_kl` and
    `retention_nll` and a held-out score. The adapter is left as it was.

    Works on a [`TMSTrainer`] after `train()` and on any [`~trl.SFTTrainer`] whose model is a PEFT LoRA model (trained
    or loaded).

    Example:

    ```python
    >>> curve = trace_adapter_scale(trainer)  # after trainer.train()
    >>> scale = curve.choose(max_retention_kl=0.05)
    >>> apply_adapter_scale(trainer, scale, curve)
    >>> trainer.save_model()  # adapter_config.json loads at `scale`; adapter_scale.json/.png beside it
    ```

    Args:
        trainer ([`~trl.SFTTrainer`]):
            The trainer whose model's adapter is scaled.
        scales (`Sequence[float]`, *optional*, defaults to `(0.0, 0.25, 0.5, 0.75, 1.0)`):
            The scales to measure, each >= 0 (above 1 extrapolates the delta).
        score_fn (`Callable[[PreTrainedModel], float]`, *optional*):
            Your held-out score of the model at a scale, e.g. a verifier's accuracy; called with the trainer's model
            in eval mode. Defaults to `eval_nll`, the mean per-token NLL of the labels of `eval_dataset` (lower is
            better); without either, the curve has no score.
        score_name (`str`, *optional*):
            The score's name in the curve, the card and the plot. Defaults to `score_fn.__name__`.
        greater_is_better (`bool`, *optional*, defaults to `True`):
            Whether a higher `score_fn` value is better (ignored for the default score).
        eval_dataset ([`~datasets.Dataset`], *optional*):
            Labelled held-out examples for the default score. Defaults to the trainer's `eval_dataset` (the first, if
            several).
        meter ([`RetentionCallback`], *optional*):
            The forgetting meter. Defaults to the trainer's own (so the curve is on the scale of the training logs),
            else a new `RetentionCallback(trainer)`.
    """
    model = trainer.model
    check_scalable(model)
    scales = [float(s) for s in scales]
    if not scales or any(not math.isfinite(s) or s < 0 for s in scales):
        raise ValueError(
            f"`scales` must be non-empty, finite and >= 0 (0 = base model, 1 = the adapter); got {scales}."
        )
    if score_fn is None:
        score_fn, score_name, greater_is_better = _default_score(trainer, eval_dataset), DEFAULT_SCORE, False
        if score_fn is None:
            score_name = None
    else:
        score_name = score_name or getattr(score_fn, "__name__", "score")
    meter = _meter(trainer, meter)
    points = []
    for scale in sorted(set(scales)):
        with rescale_adapter_scale(model, scale):
            values = meter.measure()
            score = None
            if score_fn is not None:
                was_training = model.training
                model.eval()
                try:
                    score = float(score_fn(model))
                finally:
                    model.train(was_training)
        points.append(ScalePoint(scale, values["retention_kl"], values["retention_nll"], score))
        logger.info(f"Adapter scale {scale:g}: retention_kl {values['retention_kl']:.4f}"
                    + (f", {score_name} {score:.4f}" if score is not None else ""))
    return AdapterScaleCurve(points, score_name=score_name, greater_is_better=greater_is_better)


def apply_adapter_scale(trainer_or_model, scale: float, curve: AdapterScaleCurve | None = None):
    """
    Scale the active LoRA adapter's delta by `scale` for good, relative to the adapter as it is now: each LoRA layer's
    `lora_alpha` and the adapter config's `lora_alpha` and `alpha_pattern` are multiplied by `scale`, so the model
    computes what it computed under `rescale_adapter_scale(model, scale)` and `save_pretrained` writes an adapter that
    `PeftModel.from_pretrained` loads at that scale (PEFT's scaling is `lora_alpha / r`, or `/ sqrt(r)` with
    rsLoRA). The adapter weights are not touched.

    Given a trainer, also: `curve` (with `chosen_scale` set to `scale`) is saved in `args.output_dir` as
    `adapter_scale.json` and `adapter_scale.png`, which `save_model()` / `push_to_hub()` ship with the adapter, and the
    model card the trainer writes (at `push_to_hub`, and with checkpoints) gains a section with the scale.

    Args:
        trainer_or_model ([`~trl.SFTTrainer`] or [`~peft.PeftModel`]):
            Where the adapter is.
        scale (`float`):
            The multiplier, >= 0: 0 makes the adapter the base model's identity, 1 changes nothing.
        curve ([`AdapterScaleCurve`], *optional*):
            The traced curve the scale comes from; with a trainer, it is saved and summarized in the card.

    Returns:
        The PEFT model.
    """
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"`scale` must be finite and >= 0 (0 = base model, 1 = the adapter as it is); got {scale}.")
    trainer = None if isinstance(trainer_or_model, torch.nn.Module) else trainer_or_model
    model = trainer_or_model if trainer is None else trainer.model
    check_scalable(model)
    for name in model.active_adapters:
        config = model.peft_config[name]
        config.lora_alpha = config.lora_alpha * scale
        config.alpha_pattern = {key: alpha * scale for key, alpha in (config.alpha_pattern or {}).items()}
        for module in model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_alpha:
                # The same product PEFT computes from the saved config, so the model and its reload agree exactly.
                module.lora_alpha[name] = module.lora_alpha[name] * scale
                module.set_scale(name, 1.0)
    if trainer is not None:
        if curve is not None:
            if curve.chosen_scale != scale:
                curve.chosen_scale, curve.criterion = scale, None
            if trainer.is_world_process_zero():
                curve.save(trainer.args.output_dir)
        _card_states_scale(trainer, scale, curve)
    return model


def _card_states_scale(trainer, scale: float, curve: AdapterScaleCurve | None) -> None:
    """
    Make the card `trainer` writes state the scale. TRL writes the card anew at every `push_to_hub` (and checkpoint),
    from the trainer class alone, so the section is added after its `create_model_card` on this trainer object. Scales
    applied one after another multiply, as the adapter's do.
    """
    previous = getattr(trainer, "adapter_scale", None)
    trainer.adapter_scale = scale if previous is None else previous * scale
    trainer.adapter_scale_curve = curve if curve is not None else getattr(trainer, "adapter_scale_curve", None)
    if "create_model_card" in vars(trainer):
        return  # already wrapped; it reads the attributes above
    class_card = trainer.create_model_card

    def create_model_card(*args, **kwargs):
        class_card(*args, **kwargs)
        path = os.path.join(trainer.args.output_dir, "README.md")
        if trainer.is_world_process_zero() and os.path.isfile(path):
            add_adapter_scale_to_card(path, trainer.adapter_scale, adapter_scale_summary(trainer.adapter_scale_curve))

    trainer.create_model_card = create_model_card


def adapter_scale_summary(curve: AdapterScaleCurve | None) -> dict[str, object]:
    """What the card says about the chosen point of `curve`: its criterion and measured values."""
    if curve is None or curve.chosen_scale is None or curve.chosen_scale not in curve.scales:
        return {}
    point = curve.point(curve.chosen_scale)
    summary = {"retention_kl": round(point.retention_kl, 4)}
    if point.score is not None:
        summary[curve.score_name] = round(point.score, 4)
    if curve.criterion:
        summary["chosen as"] = curve.criterion
    return summary
