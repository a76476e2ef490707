"""One run folder is one run: a resume with changed settings continues exactly or is refused, never mixes two runs."""

import json
import os
import shutil

import pytest
import torch
from conftest import QUIET_CPU, Interrupt, StopAt, load_tokenizer, make_examples
from peft import LoraConfig

import trl_tms.trajectories as trajectories_module
from trl_tms import TMSConfig, TMSTrainer
from trl_tms.history import adapter_parameters
from trl_tms.resume import RUN_FILE, TMSRun

STEPS = 6  # 12 prompts, batch 4, 2 epochs; two-pass snapshots at steps 3 and 6, online at 0 and 3


def make(path, tmp_path, callbacks=(), **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), num_checkpoints=2, per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-2, max_new_tokens=6, logging_steps=2, snapshots_per_generate=1, generation_batch_size=8,
        seed=7, label_weight=0.5, log_retention=False, tms_mode="two_pass", **{**QUIET_CPU, "save_strategy": "steps"},
        save_steps=2,
    )
    values.update(overrides)
    trainer = TMSTrainer(
        model=path, args=TMSConfig(**values), train_dataset=make_examples(12, seed=0),
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        callbacks=list(callbacks),
    )
    for callback in callbacks:
        callback.trainer = trainer
    return trainer


def adapter(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter_parameters(trainer.model, trainer.adapter_name).items()}


def outcome(trainer) -> dict:
    return {
        "adapter": adapter(trainer),
        "trajectories": trainer.trajectories.to_list(),
        "snapshots": {s: dict(trainer.history[s]) for s in trainer.history.steps},
    }


def assert_same_run(trainer, expected):
    assert trainer.state.global_step == STEPS
    assert trainer.history.steps == sorted(expected["snapshots"])
    for step, snapshot in expected["snapshots"].items():
        for key, tensor in snapshot.items():
            torch.testing.assert_close(trainer.history[step][key], tensor, rtol=1e-5, atol=1e-6)
    assert trainer.trajectories.to_list() == expected["trajectories"]
    for name, tensor in expected["adapter"].items():
        torch.testing.assert_close(adapter(trainer)[name], tensor, rtol=1e-5, atol=1e-6)


# One change of each kind, and the setting a refusal must name.
CHANGES = {
    "sampling": (dict(max_new_tokens=3), "max_new_tokens"),
    "mixture": (dict(label_weight=0.25), "label_weight"),
    "filters": (dict(unfinished_trajectories="drop"), "unfinished_trajectories"),
    "rehearsal": (dict(rehearsal_weight=0.2, rehearsal_num_prompts=4, rehearsal_max_new_tokens=4), "rehearsal_weight"),
    "mode": (dict(tms_mode="online"), "tms_mode"),
}


@pytest.fixture(scope="module")
def references(tiny_llama, tmp_path_factory):
    """The outcome of an uninterrupted two-pass run with each change, or `"unchanged"` (computed on first use)."""
    cache = {}

    def get(change: str) -> dict:
        if change not in cache:
            overrides = CHANGES[change][0] if change in CHANGES else {}
            trainer = make(tiny_llama, tmp_path_factory.mktemp(f"reference-{change}"), **overrides)
            trainer.train()
            cache[change] = outcome(trainer)
        return cache[change]

    return get


def interrupt(path, tmp_path, phase: str, monkeypatch, **overrides):
    """Run until `phase` is interrupted: after step 5 of a training phase, or while sampling the second snapshot."""
    if phase == "trajectories":
        calls = []
        original = trajectories_module.AdapterHistory.load_into

        def load_into(self, model, step, adapter_name, slot=None):
            calls.append(step)
            if len(calls) == 2:
                raise Interrupt("killed while sampling the second snapshot")
            return original(self, model, step, adapter_name, slot)

        monkeypatch.setattr(trajectories_module.AdapterHistory, "load_into", load_into)
        trainer, stop = make(path, tmp_path, **overrides), None
    else:
        stop = StopAt(phase, 5)
        trainer = make(path, tmp_path, callbacks=[stop], **overrides)
    with pytest.raises(Interrupt):
        trainer.train()
    monkeypatch.undo()


def on_disk(tmp_path) -> dict[str, list[str]]:
    return {root: sorted(files) for root, _, files in os.walk(tmp_path / "out")}


@pytest.mark.parametrize("change", ["sampling", "mixture", "filters", "rehearsal"])
@pytest.mark.parametrize("phase", ["harvest", "trajectories"])
def test_a_change_before_the_student_continues_exactly(tiny_llama, tmp_path, monkeypatch, references, phase, change):
    """What the interrupted run had done that does not depend on the change is kept; the rest follows the change."""
    interrupt(tiny_llama, tmp_path, phase, monkeypatch)
    if phase == "trajectories":
        assert os.listdir(tmp_path / "out" / "_tms_history" / "trajectory-parts")  # a sampled part to keep or not
    resumed = make(tiny_llama, tmp_path, **CHANGES[change][0])
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, references(change))


@pytest.mark.parametrize("phase", ["harvest", "trajectories", "student", "online"])
def test_a_change_the_interrupted_work_depends_on_is_refused(tiny_llama, tmp_path, monkeypatch, phase):
    """
    The student's checkpoints depend on every setting, the snapshots on the mode and, online, on every setting too:
    each change is refused with its name, before anything is deleted.
    """
    base = dict(tms_mode="online") if phase == "online" else {}
    interrupt(tiny_llama, tmp_path, "online" if phase == "online" else phase, monkeypatch, **base)
    before = on_disk(tmp_path)
    refused = ["mode"] if phase in ("harvest", "trajectories") else list(CHANGES)
    for change in refused:
        overrides, name = CHANGES[change]
        if phase == "online" and change == "mode":
            overrides = dict(tms_mode="two_pass")
        with pytest.raises(ValueError, match=name):
            make(tiny_llama, tmp_path, **{**base, **overrides}).train(resume_from_checkpoint=True)
        assert on_disk(tmp_path) == before


def test_a_checkpoint_of_another_run_in_output_dir_is_passed_over(tiny_llama, tmp_path, monkeypatch, references):
    # An older run (other settings) left its student checkpoints in the same output_dir; the last is a final one.
    make(tiny_llama, tmp_path, label_weight=0.25).train()
    interrupt(tiny_llama, tmp_path, "student", monkeypatch)  # a new run, stopped after its own checkpoint-4
    older = tmp_path / "out" / "checkpoint-100"
    shutil.copytree(tmp_path / "out" / f"checkpoint-{STEPS}", older)  # an older run's, the latest by far
    resumed = make(tiny_llama, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, references("unchanged"))
    with pytest.raises(ValueError, match="is not a checkpoint of the run recorded"):
        make(tiny_llama, tmp_path).train(resume_from_checkpoint=str(older))


def test_train_runs_once_per_trainer(tiny_llama, tmp_path, monkeypatch):
    trainer = make(tiny_llama, tmp_path, callbacks=[StopAt("harvest", 1)])
    with pytest.raises(Interrupt):
        trainer.train()
    with pytest.raises(RuntimeError, match="Create a new `TMSTrainer`"):
        trainer.train(resume_from_checkpoint=True)


def test_the_generation_scratch_outlives_an_interruption_before_the_phase_is_recorded(tiny_llama, tmp_path, monkeypatch):
    finish = TMSRun.finish

    def crash_at_trajectories(self, phase, **fields):
        if phase == "trajectories":
            raise Interrupt("killed as the trajectories phase ends")
        return finish(self, phase, **fields)

    monkeypatch.setattr(TMSRun, "finish", crash_at_trajectories)
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path).train()
    monkeypatch.undo()
    sampled = []
    original = trajectories_module.AdapterHistory.load_into
    monkeypatch.setattr(
        trajectories_module.AdapterHistory, "load_into",
        lambda self, model, step, *args, **kwargs: sampled.append(step) or original(self, model, step, *args, **kwargs),
    )
    resumed = make(tiny_llama, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert sampled == []  # every part was read back
    assert not os.path.exists(tmp_path / "out" / "_tms_history" / "trajectory-parts")


def test_a_history_of_every_pair_serves_a_student_that_samples_its_draws(tiny_llama, tmp_path, monkeypatch):
    shared = str(tmp_path / "history")
    first = make(tiny_llama, tmp_path, history_dir=shared, output_dir=str(tmp_path / "a"), trajectories_to_generate="all")
    first.train()
    sampled = []
    original = trajectories_module.AdapterHistory.load_into
    monkeypatch.setattr(
        trajectories_module.AdapterHistory, "load_into",
        lambda self, model, step, *args, **kwargs: sampled.append(step) or original(self, model, step, *args, **kwargs),
    )
    student = make(tiny_llama, tmp_path, history_dir=shared, output_dir=str(tmp_path / "b"), label_weight=0.25)
    student.train(resume_from_checkpoint=True)
    assert sampled == []  # nothing deleted, nothing sampled again
    assert student.trajectories.to_list() == first.trajectories.to_list()
    assert student.state.global_step == STEPS


def test_changed_rehearsal_settings_discard_the_rehearsal_parts(tmp_path):
    """A rehearsal generation interrupted with a part on disk: other rehearsal settings never read that part."""
    settings = {"harvest": {"tms_mode": "two_pass"}, "trajectories": {"temperature": 1.0}, "mixture": {},
                "rehearsal": {"max_new_tokens": 8}}
    run = TMSRun(str(tmp_path))
    run.start(settings, 6, None, str(tmp_path / "out"))
    os.makedirs(run.rehearsal_parts_dir)
    os.makedirs(run.parts_dir)
    resumed = TMSRun(str(tmp_path))
    resumed.start({**settings, "rehearsal": {"max_new_tokens": 4}}, 6, True, str(tmp_path / "out"))
    assert not os.path.exists(run.rehearsal_parts_dir) and os.path.isdir(run.parts_dir)
    resumed = TMSRun(str(tmp_path))
    resumed.start({**settings, "trajectories": {"temperature": 0.5}}, 6, True, str(tmp_path / "out"))
    assert not os.path.exists(run.parts_dir)
    record = json.load(open(tmp_path / RUN_FILE))
    assert record["settings"]["trajectories"] == {"temperature": 0.5} and not record.get("trajectories_done")
