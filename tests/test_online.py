"""Online TMS (`tms_mode="online"`): one run that snapshots itself and mixes in its own trajectories as it goes."""

import os

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig
from transformers import TrainerCallback

from trl_tms import TMSConfig, TMSTrainer
from trl_tms.candidates import LABEL
from trl_tms.history import adapter_parameters
from trl_tms.mixture import MixtureDataset
from trl_tms.online import online_snapshot_steps
import trl_tms.trajectories as trajectories_module
from trl_tms.trajectories import HotSwapGenerator


class Interrupt(Exception):
    pass


class Watch(TrainerCallback):
    """Records, before each optimizer step, which snapshots the mixture draws from; optionally stops at a step."""

    def __init__(self, stop_at=None):
        self.trainer, self.pools, self.stop_at = None, {}, stop_at

    def on_step_begin(self, args, state, control, **kwargs):
        mixture = self.trainer.train_dataset
        self.pools[state.global_step] = sorted({s for by_step in mixture._trajectories.values() for s in by_step})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop_at:
            raise Interrupt(f"stopped at step {self.stop_at}")


def make(path, tmp_path, watch=None, trainer_kwargs=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), tms_mode="online", num_checkpoints=3, per_device_train_batch_size=4,
        num_train_epochs=2, learning_rate=1e-2, max_new_tokens=6, logging_steps=2, seed=5, label_weight=0.25, **QUIET_CPU,
    )
    values.update(overrides)
    trainer = TMSTrainer(
        model=path, args=TMSConfig(**values), train_dataset=make_examples(24), eval_dataset=make_examples(6, seed=1),
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        callbacks=[watch] if watch else None, **(trainer_kwargs or {}),
    )
    if watch:
        watch.trainer = trainer
    return trainer


def adapter(trainer):
    return {n: p.detach().clone() for n, p in adapter_parameters(trainer.model, trainer.adapter_name).items()}


def test_one_run_snapshots_itself_from_step_0_and_trains_on_what_it_has_sampled(tiny_llama, tmp_path):
    watch = Watch()
    trainer = make(tiny_llama, tmp_path, watch, trajectories_to_generate="all")
    trainer.train()
    # 24 prompts, batch 4, 2 epochs: 12 steps in one run; 3 snapshots every 12 // 3 = 4 steps, from the start.
    assert trainer.state.global_step == 12
    assert trainer.history.steps == [0, 4, 8]
    assert sorted(os.listdir(trainer.history_dir)) == ["step-0", "step-4", "step-8", "tms_run.json", "trajectories"]
    assert {e.get("tms_phase") for e in trainer.state.log_history} == {3}
    assert [e["tms_snapshot_step"] for e in trainer.state.log_history if "tms_snapshot_step" in e] == [0, 4, 8]
    # Each refresh logs how many of its kept trajectories are their label word for word; in all, the run's count.
    copies = [e["tms_label_copy_trajectories"] for e in trainer.state.log_history if "tms_snapshot_step" in e]
    assert len(copies) == 3 and sum(copies) == trainer.stats.label_copies
    # Before step s+1 the mixture holds the trajectories of the snapshots taken at steps <= s, never later ones.
    assert watch.pools == {s: [t for t in (0, 4, 8) if t <= s] for s in range(12)}
    assert len(trainer.trajectories) == 24 * 3
    assert sorted(set(trainer.trajectories["snapshot_step"])) == [0, 4, 8]
    assert trainer.stats.trajectories == 72
    # Trajectories really are mixed in.
    fractions = [e["tms_label_fraction"] for e in trainer.state.log_history if "tms_label_fraction" in e]
    assert 0 < sum(fractions) / len(fractions) < 0.75


def test_rolling_window_keeps_the_last_num_checkpoints_snapshots(tiny_llama, tmp_path):
    watch = Watch()
    # Every pair sampled: the draws of the whole last epoch are defined (drawn-only sampling plans only those trained).
    trainer = make(tiny_llama, tmp_path, watch, num_checkpoints=2, online_snapshot_every=3, trajectories_to_generate="all")
    trainer.train()
    assert trainer.history.steps == [0, 3, 6, 9]
    assert watch.pools[2] == [0] and watch.pools[3] == [0, 3] and watch.pools[7] == [3, 6] and watch.pools[11] == [6, 9]
    mixture = trainer.train_dataset
    drawn_steps = {mixture._step_of[mixture.draw(p)[0]] for p in range(len(mixture))}
    assert drawn_steps <= {LABEL, 6, 9}


def test_online_resume_continues_with_the_snapshots_and_trajectories_on_disk(tiny_llama, tmp_path):
    full = make(tiny_llama, tmp_path / "full", save_strategy="steps", save_steps=2)
    full.train()
    with pytest.raises(Interrupt):
        make(tiny_llama, tmp_path / "cut", Watch(stop_at=7), save_strategy="steps", save_steps=2).train()
    watch = Watch()
    resumed = make(tiny_llama, tmp_path / "cut", watch, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.history.steps == [0, 4, 8]
    assert watch.pools[6] == [0, 4]  # step 0 and 4 snapshots reloaded from disk, not taken from resumed weights
    # Each snapshot is logged once: the resumed log history holds the events of the snapshots taken before the stop.
    assert [e["tms_snapshot_step"] for e in resumed.state.log_history if "tms_snapshot_step" in e] == [0, 4, 8]
    assert resumed.trajectories["completion"] == full.trajectories["completion"]
    final, expected = adapter(resumed), adapter(full)
    assert all(torch.allclose(final[n], expected[n], rtol=1e-5, atol=1e-7) for n in expected)


class RecordDraws:
    """Records every example the mixture hands the data loader: (epoch, position, snapshot step drawn, is label)."""

    def __init__(self, monkeypatch):
        self.draws = []
        getitem = MixtureDataset.__getitem__

        def recording(mixture, position):
            row, is_label = mixture.draw(position)
            self.draws.append((mixture.epoch, position, mixture.candidate(row)["snapshot_step"], is_label))
            return getitem(mixture, position)

        monkeypatch.setattr(MixtureDataset, "__getitem__", recording)


def test_sampling_only_the_drawn_pairs_makes_the_same_draws_from_fewer_trajectories(tiny_llama, tmp_path, monkeypatch):
    # Every trajectory the same three tokens, never empty: a draw can then differ between the runs only by the plan (with
    # real samples, a pair empty in one run and not in the other draws differently, as it should).
    tokenizer = load_tokenizer(tiny_llama)
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    text = [t for t in range(3, 50) if t not in special][:3]

    def fixed(model, input_ids, attention_mask, row_slots, route, kwargs, eos_ids, samples=1):
        return [list(text) for _ in range(input_ids.shape[0] * samples)]

    runs = {}
    for mode in ("all", "drawn"):
        record = RecordDraws(monkeypatch)
        monkeypatch.setattr(trajectories_module, "_generate_samples", fixed)
        trainer = make(tiny_llama, tmp_path / mode, trajectories_to_generate=mode, num_train_epochs=3)
        trainer.train()
        runs[mode] = (trainer, record.draws)
        monkeypatch.undo()
    (every, every_draws), (drawn, drawn_draws) = runs["all"], runs["drawn"]
    # 24 prompts, batch 4, 3 epochs: 18 steps, 3 snapshots (0, 6, 12); every example fetched once per epoch.
    assert len(drawn_draws) == 72 and sorted(d[:2] for d in drawn_draws) == sorted(d[:2] for d in every_draws)
    # The same prompts at the same steps draw the same (prompt, snapshot) pairs or labels; only the sampled text differs.
    assert drawn_draws == every_draws
    assert any(step == 12 for _, _, step, _ in drawn_draws)  # the last snapshot is drawn from too
    pairs = set(zip(drawn.trajectories["prompt_index"], drawn.trajectories["snapshot_step"]))
    trajectory_draws = {(p, step) for _, p, step, is_label in drawn_draws if not is_label}
    assert trajectory_draws <= pairs  # every pair drawn was sampled ...
    assert len(drawn.trajectories) < len(every.trajectories) == 72  # ... and fewer than all of them
    assert drawn.stats.trajectories == len(drawn.trajectories)
    assert drawn.stats.not_sampled == 72 - len(drawn.trajectories)
    sampled = [e["tms_sampled_trajectories"] for e in drawn.state.log_history if "tms_sampled_trajectories" in e]
    assert len(sampled) == 3 and sum(sampled) == len(drawn.trajectories)
    assert set(drawn.trajectories.to_pandas().groupby(["prompt_index", "snapshot_step"]).size()) == {1}


def test_online_drawn_plan_covers_only_the_prompts_still_to_come(tiny_llama, tmp_path, monkeypatch):
    record = RecordDraws(monkeypatch)
    calls = []  # (global step of the refresh, pairs sampled)
    generate = HotSwapGenerator.generate

    def recording(generator, steps=None, pairs=None):
        calls.append((trainer.state.global_step, set(pairs)))
        return generate(generator, steps=steps, pairs=pairs)

    monkeypatch.setattr(HotSwapGenerator, "generate", recording)
    trainer = make(tiny_llama, tmp_path, num_train_epochs=1, label_weight=0.25)
    trainer.train()
    # 24 prompts, batch 4, one epoch: 6 steps; snapshots at 0, 2 and 4. The k-th example fetched trains at step k // 4 + 1.
    assert trainer.history.steps == [0, 2, 4] and len(record.draws) == 24
    trained_at = {}
    for k, (_, position, _, _) in enumerate(record.draws):
        trained_at.setdefault(trainer.train_dataset.prompt_indices[position], k // 4 + 1)
    # A refresh at step s samples pairs only for the prompts of steps s + 1 to one past the next refresh.
    until = {0: 3, 2: 5, 4: 6}
    assert {step for step, _ in calls} == {0, 2, 4}
    for step, pairs in calls:
        assert pairs and all(step < trained_at[index] <= until[step] for index, _ in pairs), (step, pairs)
    # ... and the run still trains only on pairs it sampled.
    sampled = set(zip(trainer.trajectories["prompt_index"], trainer.trajectories["snapshot_step"]))
    assert {(index, step) for _, index, step, is_label in record.draws if not is_label} <= sampled


def test_online_tms_on_labels_only_samples_nothing(tiny_llama, tmp_path):
    trainer = make(tiny_llama, tmp_path, label_weight=1.0)
    trainer.train()
    assert trainer.state.global_step == 12 and trainer.history.steps == [0, 4, 8]
    assert len(trainer.trajectories) == 0 and trainer.stats.not_sampled == 24 * 3
    fractions = [e["tms_label_fraction"] for e in trainer.state.log_history if "tms_label_fraction" in e]
    assert fractions and all(f == 1.0 for f in fractions)


def test_online_drawn_sampling_with_a_verifier_draws_again_where_a_trajectory_is_rejected(tiny_llama, tmp_path):
    rejected = set()

    def verifier(prompt, completion, label):  # rejects about half the trajectories, by their text
        keep = len(completion) % 2 == 0
        if not keep:
            rejected.add(completion)
        return keep

    trainer = make(tiny_llama, tmp_path, trainer_kwargs=dict(verifier=verifier), trajectory_filter="verifier")
    trainer.train()  # a draw that landed on a pair never sampled would raise
    assert trainer.state.global_step == 12
    assert rejected and trainer.stats.kept < trainer.stats.trajectories
    assert min(trainer.stats.kept_fraction.values()) < 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(trajectory_choice="pld"), "works with `tms_mode='two_pass'` only"),
        (dict(dataloader_num_workers=2), "needs `dataloader_num_workers=0`"),
        (dict(online_snapshot_every=0), "`online_snapshot_every` must be at least 1"),
        (dict(tms_mode="offline"), "`tms_mode` must be `two_pass` or `online`"),
    ],
)
def test_online_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        TMSConfig(output_dir="x", **{"tms_mode": "online", **overrides}, **QUIET_CPU)


def test_online_snapshot_schedule():
    assert online_snapshot_steps(32, 10) == [0, 3, 6, 9, 12, 16, 19, 22, 25, 28]  # exactly T, from step 0
    assert online_snapshot_steps(12, 3) == [0, 4, 8]
    assert online_snapshot_steps(32, 10, every=3) == list(range(0, 32, 3))  # 11: the mixture keeps the last 10
    assert online_snapshot_steps(4, 10) == [0, 1, 2, 3]  # never a step twice


def test_a_finished_online_run_resumed_again_reuses_its_trajectories(tiny_llama, tmp_path, monkeypatch):
    first = make(tiny_llama, tmp_path, save_strategy="steps", save_steps=4)
    first.train()
    history_files = {root: sorted(files) for root, _, files in os.walk(first.history_dir)}

    def no_sampling(self, steps=None, pairs=None):
        raise AssertionError(f"sampled snapshots {steps} (pairs {pairs}) again")

    monkeypatch.setattr(HotSwapGenerator, "generate", no_sampling)
    again = make(tiny_llama, tmp_path, save_strategy="steps", save_steps=4)
    again.train(resume_from_checkpoint=True)
    assert again.history.steps == [0, 4, 8]
    assert [e["tms_snapshot_step"] for e in again.state.log_history if "tms_snapshot_step" in e] == [0, 4, 8]
    assert again.trajectories.to_list() == first.trajectories.to_list()
    # Nothing added to the history (no dataset cache files next to the saved trajectories).
    assert {root: sorted(files) for root, _, files in os.walk(again.history_dir)} == history_files

    # Online, every snapshot after step 0 was trained on trajectories of the recorded settings: other ones are refused.
    for change, name in [(dict(max_new_tokens=3), "max_new_tokens"), (dict(label_weight=0.5), "label_weight"),
                         (dict(trajectory_filter="verifier"), "trajectory_filter")]:
        with pytest.raises(ValueError, match=f"{name}: .* there, .* now"):
            make(tiny_llama, tmp_path, save_strategy="steps", save_steps=4, **change).train(resume_from_checkpoint=True)
    assert {root: sorted(files) for root, _, files in os.walk(first.history_dir)} == history_files
