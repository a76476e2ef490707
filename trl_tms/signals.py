"""
Live training signals: what [`PLDCallback`] and [`RetentionCallback`] share.

A signal is measured once when a training run starts (step 0, or the step a resumed run starts from) and at every
logging step, and goes out with the trainer's own metrics, so `trainer.state.log_history` and every reporter (wandb,
tensorboard, trackio, ...) receive it. It can carry an alarm: a warning logged once per run and, optionally, a stop
that puts back the trainable weights the signal last approved of.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.utils import logging


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable parameters (the adapter, for a PEFT model)."""
    return {name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters() if param.requires_grad}


def restore_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def check_alarm(
    threshold: float | None, stop_on_alarm: bool, threshold_name: str, stop_name: str, signal: str, example: float
) -> None:
    """
    An alarm's threshold is positive (nats per token), and stopping on the alarm needs one. The names are those of the
    caller's arguments or config fields; `signal` says what the threshold bounds and `example` a typical value.
    """
    if threshold is not None and threshold <= 0:
        raise ValueError(f"`{threshold_name}` must be positive (nats per token), got {threshold}.")
    if stop_on_alarm and threshold is None:
        raise ValueError(
            f"`{stop_name}=True` needs `{threshold_name}`: set the {signal} (nats per token) that stops a phase, e.g. "
            f"{example}."
        )


class SignalCallback(TrainerCallback):
    """
    Base of the live signals. A subclass sets `name` (the prefix of its logged keys; `name` itself is the key whose
    presence in a log entry marks a measured step) and implements `measure`; it may implement `start` (run before the
    first measurement of every training run) and `alarm` (a warning when the values call for one).

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer to watch.
        stop_on_alarm (`bool`, *optional*, defaults to `False`):
            When the alarm goes off, stop training and put back the trainable weights kept by the last `keep()`. The
            kept step is logged as `<name>_restored_step`.
    """

    name: str = ""

    def __init__(self, trainer, stop_on_alarm: bool = False):
        self.trainer = trainer
        self.stop_on_alarm = stop_on_alarm
        self.last: dict[str, float] = {}
        self.alarm_step: int | None = None
        self.kept_weights: dict[str, torch.Tensor] | None = None
        self.kept_step: int | None = None
        self._measured_step: int | None = None

    def measure(self, step: int | None = None) -> dict[str, float]:
        raise NotImplementedError

    def start(self, state) -> None:
        """Prepare a training run (called from `on_train_begin`, before its first measurement)."""

    def alarm(self, values: dict[str, float], step: int) -> str | None:
        """The warning to log (once per run) if `values` set the alarm off, else `None`."""
        return None

    def keep(self, step: int | None) -> None:
        """Remember the current trainable weights as the ones an alarm's stop puts back (only when stopping is on)."""
        if self.stop_on_alarm:
            self.kept_weights, self.kept_step = trainable_weights(self.trainer.model), step

    def on_train_begin(self, args, state, control, **kwargs):
        self.alarm_step, self.kept_weights, self.kept_step = None, None, None
        self.start(state)
        self._measured_step = state.global_step
        # A run resumed from a checkpoint has this step's values in the restored log already.
        if not any(self.name in e and e.get("step") == state.global_step for e in state.log_history):
            self.trainer.log(self.measure(state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_measure(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        # `logging_strategy="epoch"` asks for a log here rather than after a step.
        self._maybe_measure(state, control)

    def _maybe_measure(self, state, control) -> None:
        if not control.should_log or state.global_step == self._measured_step:
            return
        self._measured_step = state.global_step
        values = self.measure(state.global_step)
        values.update(self._check_alarm(state, control, values))
        metrics = getattr(self.trainer, "_metrics", None)
        if metrics is None:
            # Logging clears `control.should_log`, which the trainer's own log due at this step needs.
            self.trainer.log(values)
            control.should_log = True
        else:
            # Into the metrics the next regular log averages and sends, so that the reporters receive them too.
            for key, value in values.items():
                metrics["train"][key].append(value)

    def _check_alarm(self, state, control, values: dict[str, float]) -> dict[str, float]:
        message = self.alarm(values, state.global_step)
        if message is None:
            return {}
        extra = {f"{self.name}_alarm": 1.0}
        if self.alarm_step is None:
            self.alarm_step = state.global_step
            # Through the subclass's module logger, so that users filter it by the signal's module.
            logging.get_logger(type(self).__module__).warning(message)
        if self.stop_on_alarm:
            control.should_training_stop = True
            if self.kept_weights is not None:
                restore_weights(self.trainer.model, self.kept_weights)
                extra[f"{self.name}_restored_step"] = float(self.kept_step)
        return extra
