"""PLD on plain TRL trainers: the value is the labels' NLL, and it reaches log_history."""

import os
from functools import partial

import pytest
import torch
from conftest import QUIET_CPU, WeightsAtStep, load_tokenizer, make_examples
from peft import LoraConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from trl_tms import AdapterHistory, PLDCallback, SnapshotCallback, TMSConfig, policy_label_divergence
from trl_tms.history import adapter_parameters, snapshot_steps


def sft_trainer(path, tmp_path, eval_dataset=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        logging_steps=2,
        **QUIET_CPU,
    )
    values.update(overrides)
    return SFTTrainer(
        model=path,
        args=SFTConfig(**values),
        train_dataset=make_examples(16, seed=0),
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )


def manual_label_nll(trainer, dataset) -> float:
    model = trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in dataset:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            mask = labels != -100
            total += nll[mask].sum().item()
            count += mask.sum().item()
    return total / count


def test_pld_is_the_mean_token_nll_of_the_labels(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, eval_dataset=make_examples(6, seed=1))
    assert policy_label_divergence(trainer, trainer.eval_dataset) == pytest.approx(
        manual_label_nll(trainer, trainer.eval_dataset), rel=1e-5
    )


def test_pld_callback_on_plain_sft_trainer(tiny_qwen2, tmp_path):
    trainer = sft_trainer(tiny_qwen2, tmp_path, eval_dataset=make_examples(6, seed=1))
    callback = PLDCallback(trainer, num_samples=4)
    trainer.add_callback(callback)
    trainer.train()
    entries = [e for e in trainer.state.log_history if "pld" in e]
    assert [e["step"] for e in entries] == [0, 2, 4]
    assert entries[-1]["pld"] == pytest.approx(policy_label_divergence(trainer, callback.dataset))
    assert entries[-1]["pld"] < entries[0]["pld"]
    assert all(e["pld_drift"] >= 0 for e in entries)


def test_pld_callback_takes_its_own_raw_dataset(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path)
    callback = PLDCallback(trainer, eval_dataset=make_examples(5, seed=2))
    assert len(callback.dataset) == 5 and "labels" in callback.dataset.column_names
    first = callback.measure()
    assert first["pld_drift"] == 0.0 and first["pld"] > 0


def test_pld_callback_without_data_raises(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path)
    with pytest.raises(ValueError, match="eval_dataset"):
        PLDCallback(trainer)


def test_pld_follows_epoch_logging(tiny_llama, tmp_path):
    trainer = sft_trainer(
        tiny_llama, tmp_path, eval_dataset=make_examples(4, seed=1), logging_strategy="epoch", num_train_epochs=2
    )
    trainer.add_callback(PLDCallback(trainer))
    trainer.train()
    # 16 examples in batches of 4: 4 steps per epoch.
    assert [e["step"] for e in trainer.state.log_history if "pld" in e] == [0, 4, 8]


def scripted_pld(monkeypatch, values):
    """PLD at step 0, 1, 2, ... (logging every step) follows `values`: the alarm logic is tested, not the model."""
    sequence = iter(values)
    monkeypatch.setattr("trl_tms.pld.policy_label_divergence", lambda trainer, dataset: next(sequence))


def test_forgetting_alarm_warns_without_stopping(tiny_llama, tmp_path, monkeypatch):
    scripted_pld(monkeypatch, [3.0, 2.0, 1.0, 1.05, 1.3, 1.2])
    trainer = sft_trainer(tiny_llama, tmp_path, make_examples(4, seed=1), logging_steps=1, num_train_epochs=5,
                          per_device_train_batch_size=16)
    logger = logging.get_logger("trl_tms.pld")
    with CaptureLogger(logger) as captured:
        trainer.add_callback(PLDCallback(trainer, drift_threshold=0.2))
        trainer.train()
    assert trainer.state.global_step == 5
    alarms = [e["step"] for e in trainer.state.log_history if e.get("pld_alarm")]
    assert alarms == [4]  # drift 0.05, 0.3, 0.2: only step 4 is above 0.2
    assert captured.out.count("PLD drift 0.300 passed 0.2 at step 4") == 1


def test_forgetting_alarm_stops_and_restores_the_best_weights(tiny_llama, tmp_path, monkeypatch):
    scripted_pld(monkeypatch, [3.0, 2.0, 1.0, 1.05, 1.3, 1.2, 1.1, 1.0])
    trainer = sft_trainer(tiny_llama, tmp_path, make_examples(4, seed=1), logging_steps=1, num_train_epochs=7,
                          per_device_train_batch_size=16)
    recorder = WeightsAtStep(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(PLDCallback(trainer, drift_threshold=0.2, stop_on_drift=True))
    trainer.train()
    assert trainer.state.global_step == 4  # stopped at the alarm, not at step 7
    restored = [e["pld_restored_step"] for e in trainer.state.log_history if "pld_restored_step" in e]
    assert restored == [2.0]
    current = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, value in recorder.weights[2].items():
        torch.testing.assert_close(current[name], value)
    assert any(not torch.equal(current[n], v) for n, v in recorder.weights[4].items())


def test_forgetting_alarm_settings_are_checked(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, make_examples(4, seed=1))
    with pytest.raises(ValueError, match="must be positive"):
        PLDCallback(trainer, drift_threshold=0.0)
    with pytest.raises(ValueError, match="`stop_on_drift=True` needs `drift_threshold`"):
        PLDCallback(trainer, stop_on_drift=True)
    with pytest.raises(ValueError, match="pld_stop_on_drift=True` needs `pld_drift_threshold`"):
        TMSConfig(recipe="paper", output_dir=str(tmp_path), pld_stop_on_drift=True, **QUIET_CPU)
    # PLD is off by default: an alarm on it would never sound.
    with pytest.raises(ValueError, match="`pld_drift_threshold` watches the logged PLD.*set `log_pld=True`"):
        TMSConfig(recipe="paper", output_dir=str(tmp_path), pld_drift_threshold=0.1, **QUIET_CPU)
    assert TMSConfig(recipe="paper", output_dir=str(tmp_path), pld_drift_threshold=0.1, log_pld=True,
                     **QUIET_CPU).pld_drift_threshold == 0.1


def test_snapshot_callback_on_plain_sft_trainer(tiny_llama, tmp_path):
    # 16 examples, batch 4: 4 optimizer steps; two snapshots at steps 2 and 4, the last equal to the trained adapter.
    trainer = sft_trainer(tiny_llama, tmp_path)
    history = AdapterHistory(trainer.model.peft_config["default"], str(tmp_path / "history"), background_writes=True)
    trainer.add_callback(SnapshotCallback(history, trainer.model, "default", partial(snapshot_steps, num_checkpoints=2)))
    trainer.train()
    assert history.steps == [2, 4]
    assert sorted(os.listdir(tmp_path / "history")) == ["step-2", "step-4"]
    live = adapter_parameters(trainer.model, "default")
    final = history[4]
    assert len(final) == len(live)
    assert all(torch.equal(final[name.replace(".default", "")], value.detach().cpu()) for name, value in live.items())
    assert not all(torch.equal(history[2][name], final[name]) for name in final)  # step 2 is an earlier adapter
