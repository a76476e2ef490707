"""Bad input and hostile files: each gets a clear, early error (the table in docs/troubleshooting.md), and nothing the
user already has is lost or unpickled."""

import errno
import os
import pickle

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from tiny import save_tiny
from trl_tms import AdapterHistory, TMSConfig, TMSTrainer


def make(path, tmp_path, train=None, tokenizer=None, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), num_checkpoints=2, per_device_train_batch_size=4,
                  num_train_epochs=1, max_new_tokens=4, tms_mode="two_pass", **QUIET_CPU)
    values.update(overrides)
    return TMSTrainer(
        model=path, args=TMSConfig(**values), train_dataset=train if train is not None else make_examples(8),
        processing_class=tokenizer or load_tokenizer(path),
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"),
    )


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt


# Prompts and tokenizers


def test_prompts_longer_than_max_length(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"8 of 8 training examples have no label tokens left .*max_length=6.*Raise"):
        make(tiny_llama, tmp_path, max_length=6)
    rows = make_examples(8).to_list()
    rows[0]["prompt"][0]["content"] = " ".join(["what is one plus two ?"] * 20)
    logger = logging.get_logger("trl_tms.data")
    with CaptureLogger(logger) as captured:
        trainer = make(tiny_llama, tmp_path, train=Dataset.from_list(rows), max_length=40)
    assert "1 of 8 training examples have no label tokens left" in captured.out
    assert len(trainer.train_dataset) == 7


def test_tokenizer_without_pad_token(tiny_llama, tmp_path):
    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.pad_token = None
    trainer = make(tiny_llama, tmp_path, tokenizer=tokenizer)
    assert trainer.processing_class.pad_token == tokenizer.eos_token  # TRL pads with EOS, as for SFTTrainer
    trainer.train()
    assert 0 < len(trainer.trajectories) <= 8 * 2 and trainer.stats.trajectories == len(trainer.trajectories)
    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ValueError, match="pad_token"):
        make(tiny_llama, tmp_path, tokenizer=tokenizer)


# History folders from elsewhere, damaged or hostile


def interrupted_run(path, tmp_path):
    """Two harvest steps, snapshots at steps 1 and 2, stopped at step 2 before its checkpoint: checkpoint-1 remains."""
    trainer = make(path, tmp_path, save_strategy="steps", save_steps=1)
    trainer.add_callback(StopAt(2))
    with pytest.raises(Interrupt):
        trainer.train()
    history_dir = tmp_path / "out" / "_tms_history"
    assert os.path.isdir(history_dir / "step-1") and os.path.isdir(history_dir / "harvest" / "checkpoint-1")
    return history_dir


def test_history_from_another_base_model_is_refused(tiny_llama, tmp_path):
    interrupted_run(tiny_llama, tmp_path)
    other = save_tiny(str(tmp_path / "wider"), hidden_size=48)
    with pytest.raises(ValueError, match=r"other settings.*model.hidden_size: 32 there, 48 now"):
        make(other, tmp_path, save_strategy="steps", save_steps=1).train(resume_from_checkpoint=True)


def test_damaged_snapshot_is_refused_not_unpickled(tiny_llama, tmp_path, monkeypatch):
    history_dir = interrupted_run(tiny_llama, tmp_path)
    with open(history_dir / "step-1" / "adapter_model.safetensors", "wb") as f:
        f.write(b"\x00garbage, not a safetensors header")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match="step-1 .* is not a readable safetensors file"):
        AdapterHistory.open(str(history_dir))
    with pytest.raises(ValueError, match="cannot be read"):
        make(tiny_llama, tmp_path, save_strategy="steps", save_steps=1).train(resume_from_checkpoint=True)


class Payload:
    def __reduce__(self):
        return (open, (os.environ["TMS_PICKLE_MARKER"], "w"))


def test_pickled_snapshot_is_never_loaded(tiny_llama, tmp_path, monkeypatch):
    history_dir = interrupted_run(tiny_llama, tmp_path)
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("TMS_PICKLE_MARKER", str(marker))
    os.remove(history_dir / "step-1" / "adapter_model.safetensors")
    with open(history_dir / "step-1" / "adapter_model.bin", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(FileNotFoundError, match="only safetensors are read"):
        AdapterHistory.open(str(history_dir))
    with pytest.raises(ValueError, match="cannot be read"):
        make(tiny_llama, tmp_path, save_strategy="steps", save_steps=1).train(resume_from_checkpoint=True)
    assert not marker.exists()


# Output folders


def test_unwritable_output_dir_fails_before_training(tiny_llama, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"Cannot write to `output_dir` .*pass a writable `output_dir`"):
        make(tiny_llama, tmp_path, output_dir=str(blocker / "out"))
    with pytest.raises(PermissionError, match=r"Cannot write to `history_dir` .*pass a writable `history_dir`"):
        make(tiny_llama, tmp_path, history_dir=str(blocker / "history"))
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_output_dir_fails_before_training(tiny_llama, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="Cannot write to `output_dir`"):
            make(tiny_llama, tmp_path, output_dir=str(folder / "out"))
    finally:
        folder.chmod(0o700)


def test_full_disk_at_a_snapshot_keeps_the_work_and_resumes(tiny_llama, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trl_tms.history.save_file", no_space)
    trainer = make(tiny_llama, tmp_path, save_strategy="steps", save_steps=1)
    with pytest.raises(OSError, match=r"Could not write snapshot step-1 .*No space left.*resume_from_checkpoint=True"):
        trainer.train()
    history_dir = tmp_path / "out" / "_tms_history"
    assert not any(n.startswith(("step-", ".step-")) for n in os.listdir(history_dir))  # no half-written snapshot
    monkeypatch.undo()  # space freed
    resumed = make(tiny_llama, tmp_path, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.history.steps == [1, 2]
    assert 0 < len(resumed.trajectories) == resumed.stats.trajectories <= 16
    assert resumed.stats.trajectories + resumed.stats.not_sampled == 16


# Config fields that TMS cannot honour


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(packing=True), "packing"),
        (dict(dataloader_num_workers=2, dataloader_persistent_workers=True), "persistent"),
    ],
)
def test_refused_config_fields(fields, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        TMSConfig(recipe="paper", output_dir=str(tmp_path), **QUIET_CPU, **fields)
