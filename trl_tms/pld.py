"""Policy-Label Divergence (PLD): how far the supervision sits from the policy, logged during training."""

from __future__ import annotations

import time

import torch

from .quantization import keep_4bit_layers_trainable
from .signals import SignalCallback, check_alarm

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


def policy_label_divergence(trainer, dataset) -> float:
    """
    PLD of the trainer's current model on a tokenized labelled dataset: the mean per-token negative log-likelihood
    of the labels (tokens whose label is not -100), KL(delta(y*) || pi_theta) per token. See [`label_nll`].
    """
    nll, tokens = label_nll(trainer, dataset)
    if tokens.sum().item() == 0:
        raise ValueError("The PLD dataset has no label tokens (every label is -100).")
    return (nll.sum() / tokens.sum()).item()


def label_nll(trainer, dataset, description: str = "PLD") -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per example of a tokenized labelled dataset, in its order: the summed NLL of its label tokens under the trainer's
    current model, and their number (float64, on CPU). Runs through the trainer's own eval dataloader, so batches are
    sharded across processes; results are gathered with `gather_for_metrics`, which drops the examples repeated to even
    out the last batch, so every example counts once and every process gets the whole result.
    """
    model = trainer.model
    was_training = model.training
    model.eval()
    nll, tokens = [], []
    try:
        with torch.no_grad():
            # Not `get_eval_dataloader`: with persistent workers it would hand back the cached loader of the eval set.
            loader = trainer._get_dataloader(
                dataset=dataset,
                description=description,
                batch_size=trainer.args.eval_batch_size,
                sampler_fn=trainer._get_eval_sampler,
            )
            for batch in loader:
                batch = trainer._prepare_inputs({k: v for k, v in batch.items() if k in _MODEL_INPUTS})
                batch_nll, batch_tokens = trainer.accelerator.gather_for_metrics(_label_nll(model, batch))
                nll.append(batch_nll.cpu())
                tokens.append(batch_tokens.cpu())
    finally:
        model.train(was_training)
    return torch.cat(nll), torch.cat(tokens)


def _label_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed NLL of its label tokens and their number."""
    labels = batch["labels"]
    try:
        # SFTTrainer's fused LM head gives per-token log-probs without materialising the logits.
        outputs = model(**batch, fused_lm_head=True, use_cache=False)
        return -outputs.log_probs.double().sum(-1), outputs.label_mask.double().sum(-1)
    except TypeError:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(log_probs * mask).double().sum(-1), mask.double().sum(-1)


class PLDCallback(SignalCallback):
    """
    Logs Policy-Label Divergence while a trainer trains: `pld`, the mean per-token NLL of held-out reference labels
    under the current policy, and `pld_drift`, its rise above the lowest value seen so far in this run. Under SFT, PLD
    dips then rises; the rise predicts forgetting (TMS, arXiv 2602.03073).

    PLD is computed once at the start of training (step 0) and at every logging step, and goes through the trainer's
    own metrics, so `trainer.state.log_history` and every reporter (wandb, tensorboard, trackio, ...) receive it. Works
    on [`~trl.SFTTrainer`], [`TMSTrainer`] and, through `trainer.log`, any [`~transformers.Trainer`].

    Example:

    ```python
    >>> trainer = SFTTrainer(model=..., train_dataset=train, eval_dataset=heldout, ...)
    >>> trainer.add_callback(PLDCallback(trainer))
    >>> trainer.train()
    ```

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer to watch.
        eval_dataset ([`~datasets.Dataset`], *optional*):
            Labelled held-out examples. Defaults to the trainer's `eval_dataset` (the first one, if several). A raw
            dataset is preprocessed like the trainer's own eval data.
        num_samples (`int`, *optional*, defaults to `32`):
            Use at most this many examples; each logging step costs one forward pass over them.
        drift_threshold (`float`, *optional*):
            Forgetting alarm: when `pld_drift` passes this value (nats per token), log a warning and `pld_alarm=1`.
        stop_on_drift (`bool`, *optional*, defaults to `False`):
            When the alarm goes off, also stop training and put back the trainable weights (the adapter, for a PEFT
            model) of the lowest PLD seen in this run; the step they come from is logged as `pld_restored_step`. The
            best weights are kept on CPU: cheap for an adapter, a full copy for full fine-tuning.
    """

    name = "pld"

    def __init__(
        self,
        trainer,
        eval_dataset=None,
        num_samples: int = 32,
        drift_threshold: float | None = None,
        stop_on_drift: bool = False,
    ):
        check_alarm(drift_threshold, stop_on_drift, "drift_threshold", "stop_on_drift", "drift", 0.1)
        super().__init__(trainer, stop_on_alarm=stop_on_drift)
        self.drift_threshold = drift_threshold
        dataset = eval_dataset if eval_dataset is not None else trainer.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        if dataset is None:
            raise ValueError(
                "PLDCallback needs held-out labelled examples: pass `eval_dataset=` to the trainer or to the callback."
            )
        if "input_ids" not in dataset.column_names and hasattr(trainer, "_prepare_dataset"):
            dataset = trainer._prepare_dataset(
                dataset, trainer.processing_class, trainer.args, False, getattr(trainer, "_formatting_func", None), "pld"
            )
        if "labels" not in dataset.column_names:
            raise ValueError(
                "The PLD dataset has no labels: give it reference completions (prompt-completion or messages) so that "
                f"PLD can measure their likelihood; got columns {dataset.column_names}."
            )
        self.dataset = dataset.select(range(min(num_samples, len(dataset))))
        self.best = float("inf")
        # PLD's no-grad forwards must not repack a 4-bit base into bitsandbytes' CPU inference layout.
        keep_4bit_layers_trainable(trainer.model)

    def measure(self, step: int | None = None) -> dict[str, float]:
        """Compute PLD now and update the running minimum; returns `{"pld": ..., "pld_drift": ...}`."""
        pld = policy_label_divergence(self.trainer, self.dataset)
        if pld < self.best:
            self.best = pld
            self.keep(step)
        self.last = {"pld": pld, "pld_drift": pld - self.best}
        return self.last

    def start(self, state) -> None:
        # A run resumed from a checkpoint has its earlier PLD in the restored log: keep the drift relative to it.
        self.best = min((e["pld"] for e in state.log_history if "pld" in e), default=float("inf"))

    def alarm(self, values: dict[str, float], step: int) -> str | None:
        drift = values["pld_drift"]
        if self.drift_threshold is None or drift <= self.drift_threshold:
            return None
        return (
            f"PLD drift {drift:.3f} passed {self.drift_threshold} at step {step}: the policy is moving away from the "
            "held-out labels, which predicts forgetting."
            + (" Stopping and restoring the weights of the lowest PLD." if self.stop_on_alarm else "")
        )


def score_trajectories(trainer, mixture, candidates) -> dict[str, float]:
    """
    For `trajectory_choice="pld"`: score, under the trainer's current model, the trajectories that `mixture` may draw
    this epoch (mean NLL per token; prompts drawing their label need none), hand the scores to it, and return what to
    log: the time taken, the mean score of the chosen and of all scored trajectories, and the chosen ones' mean
    snapshot step.

    Args:
        trainer ([`~trl.SFTTrainer`]):
            The trainer whose model scores.
        mixture ([`MixtureDataset`]):
            The student's mixture.
        candidates ([`~datasets.Dataset`]):
            The tokenized candidates the mixture's rows index.
    """
    started = time.perf_counter()
    rows = mixture.rows_to_score()
    if not rows:
        mixture.set_scores({})
        return {"tms_scoring_seconds": time.perf_counter() - started}
    lengths = [len(ids) for ids in candidates.select(rows)["input_ids"]]
    # Longest first, so each batch pads little.
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    nll, tokens = label_nll(trainer, candidates.select([rows[i] for i in order]), "Scoring trajectories")
    mean = (nll / tokens.clamp(min=1)).tolist()
    mixture.set_scores({rows[i]: mean[k] for k, i in enumerate(order)})
    best = mixture.best_rows()
    chosen = [mixture.scores[row] for row in best]
    # Which snapshots the student is drawn to: late ones mean it is converging on the harvest's end.
    steps = candidates.select(best)["snapshot_step"]
    return {
        "tms_scoring_seconds": time.perf_counter() - started,
        "tms_chosen_nll": sum(chosen) / len(chosen),
        "tms_trajectory_nll": sum(mean) / len(mean),
        "tms_chosen_snapshot_step": sum(steps) / len(steps),
    }
