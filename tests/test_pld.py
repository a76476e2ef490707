"""PLD on plain TRL trainers: the value is the labels' NLL, and it reaches log_history."""

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_tms import PLDCallback, policy_label_divergence


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
