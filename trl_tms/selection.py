"""
Checkpoint choice under a drift budget: the best checkpoint by a held-out score among those that forgot little enough.

The choice itself is transformers' own (`metric_for_best_model`, `greater_is_better`, `save_strategy`,
`load_best_model_at_end`); [`DriftBudgetCallback`] only measures the forgetting meter at every evaluation and takes the
checkpoints over the budget out of the running.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

OVER_BUDGET = "eval_over_drift_budget"


def best_metric_key(args) -> str:
    """The key of the evaluation metrics that the Trainer compares to choose its best checkpoint."""
    name = args.metric_for_best_model
    return name if name.startswith("eval_") else f"eval_{name}"


class DriftBudgetCallback(TrainerCallback):
    """
    Keep the best checkpoint by the held-out metric among the checkpoints whose forgetting meter (`retention_kl`) is
    within a budget, e.g. "the best eval accuracy among checkpoints with `retention_kl <= 0.15`".

    At every evaluation during training it measures `retention_kl` with the given meter and logs it as
    `eval_retention_kl`, with `eval_over_drift_budget` (1 when over the budget, else 0). For a checkpoint over the budget
    it sets the metric the Trainer compares (`metric_for_best_model`) to the worst possible value in the metrics the
    Trainer then reads, so that this checkpoint never becomes `state.best_model_checkpoint` (the value logged a moment
    before is the true one). Everything else is the Trainer's: which checkpoints are saved (`save_strategy`, e.g.
    `"best"`), `load_best_model_at_end`, `save_total_limit` and resuming (the judged evaluations are in the log history
    of every checkpoint). Works on any [`~transformers.Trainer`], [`~trl.SFTTrainer`] included; [`TMSTrainer`] adds it
    itself when `retention_kl_budget` is set.

    Example:

    ```python
    >>> args = SFTConfig(..., eval_strategy="steps", eval_steps=20, save_strategy="best",
    ...                  metric_for_best_model="eval_loss", load_best_model_at_end=True)
    >>> trainer = SFTTrainer(model=..., args=args, train_dataset=train, eval_dataset=held_out, peft_config=...)
    >>> meter = RetentionCallback(trainer)
    >>> trainer.add_callback(meter)
    >>> trainer.add_callback(DriftBudgetCallback(meter, max_retention_kl=0.15))
    >>> trainer.train()  # ends on the best-scoring checkpoint whose retention_kl <= 0.15
    ```

    Args:
        meter ([`RetentionCallback`]):
            The forgetting meter of the same trainer (added to it as a callback, so that it takes its reference when
            training starts).
        max_retention_kl (`float`):
            The budget: the largest `retention_kl` (nats per token) a checkpoint may have to be kept as the best.
    """

    def __init__(self, meter, max_retention_kl: float):
        if isinstance(max_retention_kl, bool) or not isinstance(max_retention_kl, (int, float)) or not max_retention_kl > 0:
            raise ValueError(
                f"`max_retention_kl` must be a positive number (nats per token), got {max_retention_kl!r}: every "
                "checkpoint's retention_kl is >= 0, so a budget of 0 or less keeps none. Typical values: 0.1 to 0.3."
            )
        self.meter = meter
        self.max_retention_kl = float(max_retention_kl)

    @property
    def trainer(self):
        return self.meter.trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if args.metric_for_best_model is None:
            raise ValueError(
                "A drift budget chooses among checkpoints by `metric_for_best_model`, which is not set: set "
                "`metric_for_best_model` (e.g. 'eval_loss', or a key returned by `compute_metrics`), "
                "`greater_is_better`, and `load_best_model_at_end=True` (with `save_strategy='best'`, or an "
                "`eval_strategy` matching `save_strategy`)."
            )
        if args.eval_strategy == "no":
            raise ValueError(
                "A drift budget judges checkpoints when they are evaluated, and `eval_strategy='no'`: set `eval_strategy` "
                "(e.g. 'steps' with `eval_steps`) and pass an `eval_dataset`."
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is None or self.meter.reference is None:
            return  # an evaluation outside training: no reference to measure against, and no choice to make
        kl = self.meter.measure(state.global_step)["retention_kl"]
        over = math.isnan(kl) or kl > self.max_retention_kl
        judged = {"eval_retention_kl": kl, OVER_BUDGET: float(over)}
        metrics.update(judged)
        if over:
            key = best_metric_key(args)
            if key in metrics:
                metrics[key] = -math.inf if args.greater_is_better else math.inf
        self.trainer.log(dict(judged))

    def on_train_end(self, args, state, control, **kwargs):
        judged = [entry for entry in state.log_history if OVER_BUDGET in entry]
        if judged and all(entry[OVER_BUDGET] for entry in judged):
            lowest = min(entry["eval_retention_kl"] for entry in judged)
            raise ValueError(
                f"No evaluated checkpoint met the drift budget retention_kl <= {self.max_retention_kl} (the lowest was "
                f"{lowest:.3f}, at {len(judged)} evaluations), so there is no best checkpoint to keep; the checkpoints are "
                f"in {args.output_dir}. Raise the budget, evaluate earlier (smaller `eval_steps`), or train with less "
                "drift (a lower learning rate; for TMS a lower `label_weight`)."
            )
