"""Checkpoint choice under a drift budget (DriftBudgetCallback), on a plain SFTTrainer and in TMSTrainer."""

import os

import pytest
import torch
from conftest import QUIET_CPU, WeightsAtStep, load_tokenizer, make_examples
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_tms import DriftBudgetCallback, RetentionCallback, TMSConfig, TMSTrainer

# Per step: the held-out score and the forgetting meter's retention_kl. Within a budget of 0.15: steps 1, 2, 5, so the
# best allowed checkpoint is step 5 (score 0.7), while the best overall is step 6 (0.99).
SCORES = {1: 0.1, 2: 0.5, 3: 0.9, 4: 0.95, 5: 0.7, 6: 0.99}
KLS = {1: 0.05, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.12, 6: 0.4}


def score_evaluations(trainer):
    """Every evaluation of `trainer` also returns (and logs) `eval_score`, known per step."""
    loop = trainer.evaluation_loop

    def scored(*args, **kwargs):
        output = loop(*args, **kwargs)
        output.metrics["eval_score"] = SCORES[trainer.state.global_step]
        return output

    trainer.evaluation_loop = scored


class ScriptedMeter:
    """A forgetting meter whose retention_kl is known per step."""

    def __init__(self, trainer, kls=KLS):
        self.trainer, self.kls, self.reference = trainer, kls, "ready"

    def measure(self, step=None):
        return {"retention_kl": self.kls[step], "retention_nll": 1.0}


def sft_trainer(path, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=16, max_steps=6, learning_rate=3e-2,
                  logging_steps=1, eval_strategy="steps", eval_steps=1, metric_for_best_model="eval_score",
                  greater_is_better=True, load_best_model_at_end=True, **QUIET_CPU)
    values.update(save_strategy="steps", save_steps=1)
    values.update(overrides)
    return SFTTrainer(
        model=path,
        args=SFTConfig(**values),
        train_dataset=make_examples(16, seed=0),
        eval_dataset=make_examples(4, seed=1),
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )


def with_budget(trainer, budget=0.15, kls=KLS):
    score_evaluations(trainer)
    trainer.add_callback(DriftBudgetCallback(ScriptedMeter(trainer, kls), max_retention_kl=budget))
    return trainer


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_keeps_the_best_checkpoint_within_the_budget_not_the_best_overall(tiny_llama, tmp_path):
    trainer = with_budget(sft_trainer(tiny_llama, tmp_path))
    recorder = WeightsAtStep(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert os.path.basename(trainer.state.best_model_checkpoint) == "checkpoint-5"
    assert trainer.state.best_metric == pytest.approx(0.7)
    # load_best_model_at_end put back the weights of step 5.
    current = trainable(trainer.model)
    for name, value in recorder.weights[5].items():
        torch.testing.assert_close(current[name], value)
    judged = {e["step"]: e for e in trainer.state.log_history if "eval_over_drift_budget" in e}
    assert {s: e["eval_over_drift_budget"] for s, e in judged.items()} == {1: 0, 2: 0, 3: 1, 4: 1, 5: 0, 6: 1}
    assert {s: e["eval_retention_kl"] for s, e in judged.items()} == KLS
    # The logged score stays the true one, over budget or not.
    scores = {e["step"]: e["eval_score"] for e in trainer.state.log_history if "eval_score" in e}
    assert scores == SCORES


def test_without_a_budget_the_trainer_keeps_the_best_overall(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path)
    score_evaluations(trainer)
    trainer.train()
    assert os.path.basename(trainer.state.best_model_checkpoint) == "checkpoint-6"


def test_lower_is_better_metrics_are_kept_out_the_other_way(tiny_llama, tmp_path):
    # eval_score as a loss: the best allowed is the lowest score within budget, step 1 (0.1); overall it would be too,
    # so make step 1 over budget: then step 2 (0.5).
    kls = {**KLS, 1: 0.9}
    trainer = with_budget(sft_trainer(tiny_llama, tmp_path, greater_is_better=False), kls=kls)
    trainer.train()
    assert os.path.basename(trainer.state.best_model_checkpoint) == "checkpoint-2"


def test_save_strategy_best_saves_only_checkpoints_within_the_budget(tiny_llama, tmp_path):
    trainer = with_budget(sft_trainer(tiny_llama, tmp_path, save_strategy="best"))
    trainer.train()
    saved = sorted(n for n in os.listdir(trainer.args.output_dir) if n.startswith("checkpoint-"))
    # New bests within the budget: step 1 (0.1), 2 (0.5), 5 (0.7); steps 3, 4 and 6 score higher but are over it.
    assert saved == ["checkpoint-1", "checkpoint-2", "checkpoint-5"]


def test_a_resumed_run_remembers_which_checkpoints_were_over_the_budget(tiny_llama, tmp_path):
    with_budget(sft_trainer(tiny_llama, tmp_path)).train()
    resumed = with_budget(sft_trainer(tiny_llama, tmp_path))
    resumed.train(resume_from_checkpoint=str(tmp_path / "sft" / "checkpoint-4"))
    assert os.path.basename(resumed.state.best_model_checkpoint) == "checkpoint-5"
    judged = [e["step"] for e in resumed.state.log_history if e.get("eval_over_drift_budget") == 1]
    assert judged == [3, 4, 6]


def test_a_budget_no_checkpoint_meets_is_refused_at_the_end_with_what_to_change(tiny_llama, tmp_path):
    trainer = with_budget(sft_trainer(tiny_llama, tmp_path), budget=0.01)
    with pytest.raises(ValueError, match=r"No evaluated checkpoint met the drift budget retention_kl <= 0.01 \(the "
                                         r"lowest was 0.050"):
        trainer.train()


@pytest.mark.parametrize("budget", [0, -0.1, float("nan"), "0.1", True])
def test_a_budget_that_is_not_a_positive_number_is_refused(budget):
    with pytest.raises(ValueError, match="`max_retention_kl` must be a positive number"):
        DriftBudgetCallback(ScriptedMeter(None), max_retention_kl=budget)


@pytest.mark.parametrize("overrides, message", [
    (dict(metric_for_best_model=None, load_best_model_at_end=False), "`metric_for_best_model`, which is not set"),
    (dict(eval_strategy="no", load_best_model_at_end=False), "eval_strategy='no'"),
])
def test_settings_without_evaluations_or_a_metric_are_refused_before_training(tiny_llama, tmp_path, overrides, message):
    trainer = with_budget(sft_trainer(tiny_llama, tmp_path, **overrides))
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0


def test_works_with_the_real_forgetting_meter_on_a_plain_sft_trainer(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, metric_for_best_model="eval_loss", greater_is_better=False,
                          max_steps=4, save_strategy="best")
    meter = RetentionCallback(trainer, prompts=["what is one plus two ?", "hello world"], max_new_tokens=4)
    trainer.add_callback(meter)
    trainer.add_callback(DriftBudgetCallback(meter, max_retention_kl=1e9))
    trainer.train()
    judged = [e for e in trainer.state.log_history if "eval_retention_kl" in e]
    assert [e["step"] for e in judged] == [1, 2, 3, 4]
    assert all(e["eval_retention_kl"] >= 0 and e["eval_over_drift_budget"] == 0 for e in judged)
    # The value judged at the last evaluation is the meter's value for the final weights.
    assert judged[-1]["eval_retention_kl"] == pytest.approx(meter.measure()["retention_kl"], rel=1e-5)
    losses = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert trainer.state.best_metric == pytest.approx(min(losses.values()))


def tms_trainer(path, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "tms"), num_checkpoints=2, per_device_train_batch_size=16, max_steps=6,
                  learning_rate=3e-2, max_new_tokens=4, logging_steps=1, eval_strategy="steps", eval_steps=1,
                  save_strategy="steps", save_steps=1, metric_for_best_model="eval_score", greater_is_better=True,
                  load_best_model_at_end=True, retention_kl_budget=0.15, retention_num_prompts=2,
                  retention_max_new_tokens=2, log_pld=False)
    values.update({**QUIET_CPU, "save_strategy": "steps", **overrides})
    trainer = TMSTrainer(model=path, args=TMSConfig(**values), train_dataset=make_examples(16, seed=0),
                         eval_dataset=make_examples(4, seed=1), processing_class=load_tokenizer(path),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    score_evaluations(trainer)
    trainer.drift_budget.meter = ScriptedMeter(trainer)  # known retention_kl per step; the wiring is what is tested
    return trainer


@pytest.mark.parametrize("mode", ["two_pass", "online"])
def test_tms_keeps_the_best_checkpoint_within_its_budget_in_the_student_or_online_run(tiny_llama, tmp_path, mode):
    trainer = tms_trainer(tiny_llama, tmp_path, tms_mode=mode)
    trainer.train()
    assert trainer.state.best_model_checkpoint == os.path.join(trainer.args.output_dir, "checkpoint-5")
    judged = [e for e in trainer.state.log_history if "eval_over_drift_budget" in e]
    assert [e["step"] for e in judged] == [1, 2, 3, 4, 5, 6]
    # Only the student's evaluations (two-pass: phase 2; online: phase 3) are judged: the harvest trains on.
    assert {e["tms_phase"] for e in judged} == {2 if mode == "two_pass" else 3}


@pytest.mark.parametrize("overrides, message", [
    (dict(retention_kl_budget=0.0), "`retention_kl_budget` must be positive"),
    (dict(log_retention=False), "leave `log_retention=True`"),
    (dict(eval_strategy="no", load_best_model_at_end=False), "set `eval_strategy`"),
    (dict(metric_for_best_model=None, load_best_model_at_end=False), "`metric_for_best_model`"),
])
def test_a_budget_the_config_cannot_apply_is_refused_by_it(tmp_path, overrides, message):
    values = dict(output_dir=str(tmp_path), eval_strategy="steps", metric_for_best_model="eval_loss",
                  retention_kl_budget=0.15, **QUIET_CPU)
    values.update(overrides)
    with pytest.raises(ValueError, match=message):
        TMSConfig(**values)
