"""An interrupted TMS run resumed in any phase ends where an uninterrupted run with the same seed ends."""

import json
import os

import pytest
import torch
from conftest import QUIET_CPU, Interrupt, StopAt, load_tokenizer, make_examples
from peft import LoraConfig
from transformers import TrainerCallback

import trl_tms.trajectories as trajectories_module
from trl_tms import TMSConfig, TMSTrainer
from trl_tms.history import adapter_parameters
from trl_tms.resume import RUN_FILE, TMSRun

TOTAL_STEPS = 12  # 24 prompts, batch 4, 2 epochs


def config(tmp_path, **overrides) -> TMSConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), num_checkpoints=3, per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-2, max_new_tokens=6, logging_steps=2, snapshots_per_generate=1, generation_batch_size=8,
        seed=7, tms_mode="two_pass", **{**QUIET_CPU, "save_strategy": "steps"}, save_steps=2, log_pld=True,
    )
    values.update(overrides)
    return TMSConfig(**values)


def make(path, tmp_path, callbacks=(), lora_r=4, **overrides):
    trainer = TMSTrainer(
        model=path, args=config(tmp_path, **overrides), train_dataset=make_examples(24, seed=0),
        eval_dataset=make_examples(6, seed=1), processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=lora_r, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        callbacks=list(callbacks),
    )
    for callback in callbacks:
        callback.trainer = trainer
    return trainer


def adapter(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter_parameters(trainer.model, trainer.adapter_name).items()}


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    trainer = make(tiny_llama, tmp_path_factory.mktemp("reference"))
    trainer.train()
    return {
        "adapter": adapter(trainer),
        "trajectories": trainer.trajectories.to_list(),
        "snapshots": {s: dict(trainer.history[s]) for s in trainer.history.steps},
        "log": trainer.state.log_history,
    }


def assert_same_run(trainer, reference):
    assert trainer.history.steps == sorted(reference["snapshots"])
    for step, snapshot in reference["snapshots"].items():
        for key, tensor in snapshot.items():
            torch.testing.assert_close(trainer.history[step][key], tensor, rtol=1e-5, atol=1e-6)
    assert trainer.trajectories.to_list() == reference["trajectories"]
    for name, tensor in reference["adapter"].items():
        torch.testing.assert_close(adapter(trainer)[name], tensor, rtol=1e-5, atol=1e-6)
    assert trainer.state.global_step == TOTAL_STEPS


def test_resume_mid_harvest(tiny_llama, tmp_path, reference):
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path, callbacks=[StopAt("harvest", 5)]).train()
    history_dir = tmp_path / "out" / "_tms_history"
    assert sorted(n for n in os.listdir(history_dir / "harvest") if n.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4"]
    assert os.path.isdir(history_dir / "step-4")  # snapshot steps are 4, 8, 12
    resumed = make(tiny_llama, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, reference)
    harvest_pld = [e["step"] for e in resumed.state.log_history if e.get("tms_phase") == 1 and "pld" in e]
    assert harvest_pld == [e["step"] for e in reference["log"] if e.get("tms_phase") == 1 and "pld" in e]


def test_resume_mid_trajectories_reuses_the_sampled_groups(tiny_llama, tmp_path, reference, monkeypatch):
    calls = []
    original = trajectories_module.AdapterHistory.load_into

    def load_into(self, model, step, adapter_name, slot=None):
        calls.append(step)
        if len(calls) == 3 and crash:
            raise Interrupt("killed while generating the third group")
        return original(self, model, step, adapter_name, slot)

    monkeypatch.setattr(trajectories_module.AdapterHistory, "load_into", load_into)
    crash = True
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path).train()
    parts = os.listdir(tmp_path / "out" / "_tms_history" / "trajectory-parts")
    # Parts of the drawn pairs of each snapshot (`steps-4-pairs-<digest>.json`).
    assert sorted(part.split("-pairs-")[0] for part in parts) == ["steps-4", "steps-8"]

    crash, calls[:] = False, []
    resumed = make(tiny_llama, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    # Only the group that had not been sampled (then again if a draw landed on one of its empty trajectories).
    assert set(calls) == {12}
    assert_same_run(resumed, reference)
    assert not os.path.exists(tmp_path / "out" / "_tms_history" / "trajectory-parts")


def test_resume_mid_student(tiny_llama, tmp_path, reference):
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path, callbacks=[StopAt("student", 7)]).train()
    run = json.load(open(tmp_path / "out" / "_tms_history" / RUN_FILE))
    assert run["harvest_done"] and run["trajectories_done"]
    resumed = make(tiny_llama, tmp_path)
    generated = []
    resumed.generator.generate = lambda steps=None, _g=resumed.generator.generate: generated.append(steps) or _g(steps)
    resumed.train(resume_from_checkpoint=True)
    assert generated == []  # the trajectories are read from the history
    assert resumed.harvest_output is None  # the harvest was not run again
    assert_same_run(resumed, reference)
    student_pld = [e["step"] for e in resumed.state.log_history if e.get("tms_phase") == 2 and "pld" in e]
    assert student_pld == [e["step"] for e in reference["log"] if e.get("tms_phase") == 2 and "pld" in e]


def test_resume_from_a_named_student_checkpoint(tiny_llama, tmp_path, reference):
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path, callbacks=[StopAt("student", 9)]).train()
    resumed = make(tiny_llama, tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    assert_same_run(resumed, reference)


def test_finished_history_is_reused_by_another_student(tiny_llama, tmp_path, reference):
    """A second student (other label_weight) on a finished history: no harvest, no generation."""
    shared = str(tmp_path / "history")
    make(tiny_llama, tmp_path, history_dir=shared, output_dir=str(tmp_path / "a")).train()
    other = make(tiny_llama, tmp_path, history_dir=shared, output_dir=str(tmp_path / "b"), label_weight=0.9)
    other.train(resume_from_checkpoint=True)
    assert other.harvest_output is None
    assert other.trajectories.to_list() == reference["trajectories"]
    assert other.state.global_step == TOTAL_STEPS


def test_changed_sampling_regenerates_only_the_trajectories(tiny_llama, tmp_path, reference, caplog):
    make(tiny_llama, tmp_path).train()
    # The finished student's checkpoints were trained on the old trajectories: not continued on new ones.
    with pytest.raises(ValueError, match="trajectories.temperature: 1.0 there, 0.0 now"):
        make(tiny_llama, tmp_path, temperature=0.0).train(resume_from_checkpoint=True)
    # A new student (another output_dir) on the same history: the snapshots are reused, the trajectories sampled again.
    history = str(tmp_path / "out" / "_tms_history")
    resumed = make(tiny_llama, tmp_path, temperature=0.0, history_dir=history, output_dir=str(tmp_path / "b"))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.harvest_output is None
    assert resumed.trajectories.to_list() != reference["trajectories"]
    assert set(resumed.trajectories["snapshot_step"]) == {4, 8, 12}


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(lora_r=8), "lora.r: 4 there, 8 now"),
        (dict(learning_rate=5e-3), "learning_rate: 0.01 there, 0.005 now"),
        (dict(num_checkpoints=2), "num_checkpoints: 3 there, 2 now"),
    ],
)
def test_resume_with_other_settings_is_refused(tiny_llama, tmp_path, change, match):
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path, callbacks=[StopAt("harvest", 5)]).train()
    with pytest.raises(ValueError, match=match):
        make(tiny_llama, tmp_path, **change).train(resume_from_checkpoint=True)
    assert os.path.isdir(tmp_path / "out" / "_tms_history" / "step-4")  # the refused resume deleted nothing


def test_resume_with_other_data_is_refused(tiny_llama, tmp_path):
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path, callbacks=[StopAt("harvest", 5)]).train()
    trainer = TMSTrainer(
        model=tiny_llama, args=config(tmp_path), train_dataset=make_examples(24, seed=3),
        processing_class=load_tokenizer(tiny_llama), peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    with pytest.raises(ValueError, match="train_data"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_without_a_record(tiny_llama, tmp_path, caplog):
    with pytest.raises(ValueError, match="holds no record of a TMS run"):
        make(tiny_llama, tmp_path).train(resume_from_checkpoint=str(tmp_path))
    trainer = make(tiny_llama, tmp_path)
    trainer.train(resume_from_checkpoint=True)  # nothing to resume: a warning, then a full run
    assert trainer.state.global_step == TOTAL_STEPS and len(trainer.history) == 3


def test_a_fresh_run_replaces_an_interrupted_one(tiny_llama, tmp_path, reference):
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path, callbacks=[StopAt("student", 3)]).train()
    fresh = make(tiny_llama, tmp_path)
    fresh.train()
    assert_same_run(fresh, reference)


class SnapshotsOnDiskAtSave(TrainerCallback):
    """Records, at every harvest checkpoint, the snapshot steps whose files are on disk."""

    def __init__(self):
        self.trainer, self.seen = None, {}

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.phase == "harvest":
            history = self.trainer.history_dir
            self.seen[state.global_step] = sorted(int(n[5:]) for n in os.listdir(history) if n.startswith("step-"))


def slow_snapshot_writes(monkeypatch) -> SnapshotsOnDiskAtSave:
    """Snapshot files take 0.5 s to write (in the background); returns a recorder of what is on disk at each save."""
    import time

    from safetensors.torch import save_file

    def slow(*args, **kwargs):
        time.sleep(0.5)
        save_file(*args, **kwargs)

    monkeypatch.setattr("trl_tms.history.save_file", slow)
    return SnapshotsOnDiskAtSave()


def test_checkpoints_never_get_ahead_of_the_snapshots_written_in_the_background(tiny_llama, tmp_path, monkeypatch):
    recorder = slow_snapshot_writes(monkeypatch)
    trainer = make(tiny_llama, tmp_path, callbacks=[recorder], num_train_epochs=1)  # 6 steps, snapshots 2, 4, 6
    trainer.train()
    assert trainer.history.steps == [2, 4, 6]
    assert recorder.seen == {2: [2], 4: [2, 4], 6: [2, 4, 6]}


@pytest.mark.parametrize("strategy", ["epoch", "best"])
def test_epoch_and_best_checkpoints_never_get_ahead_of_the_snapshots(tiny_llama, tmp_path, monkeypatch, strategy):
    # These strategies decide to save after `on_step_end` (at the epoch's end, after evaluating).
    recorder = slow_snapshot_writes(monkeypatch)
    best = dict(eval_strategy="epoch", metric_for_best_model="eval_loss") if strategy == "best" else {}
    # 12 steps, 2 epochs, snapshots at 6 and 12: each epoch ends on a snapshot.
    trainer = make(tiny_llama, tmp_path, callbacks=[recorder], num_checkpoints=2, save_strategy=strategy,
                   log_retention=False, log_pld=False, **best)
    trainer.train()
    assert 6 in recorder.seen
    assert recorder.seen == {step: [s for s in (6, 12) if s <= step] for step in recorder.seen}


@pytest.mark.parametrize("main_process", [True, False])
def test_reopened_snapshots_are_served_on_every_process(tiny_llama, tmp_path, main_process):
    # Processes other than the main one have a history without a folder: reopened snapshots must still be readable.
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trl_tms import AdapterHistory

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules="all-linear"))
    written = AdapterHistory(model.peft_config["default"], str(tmp_path / "h"))
    written.take(model, step=3)
    expected = {k: t.clone() for k, t in written[3].items()}
    history = AdapterHistory(model.peft_config["default"], str(tmp_path / "h") if main_process else None)
    TMSRun(str(tmp_path / "h"), is_main=main_process).reopen_snapshots(history, [3])
    assert all(torch.equal(history[3][k], expected[k]) for k in expected)
