"""Which trajectories the student may draw: unfinished ones, self-consistency and verifier filters, snapshot weights."""

import math

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from datasets import Dataset
from peft import LoraConfig

from trl_tms import TMSConfig, TMSTrainer
from trl_tms.candidates import LABEL, end_of_turn_ids, mixture_candidates, truncate_unfinished
from trl_tms.filters import extract_final_number, keep_flags, kept_by_snapshot, same_final_number
from trl_tms.mixture import MixtureDataset


def trajectories(rows):
    """(prompt_index, snapshot_step, text, finished) tuples as a trajectories dataset."""
    index, step, text, finished = zip(*rows)
    return Dataset.from_dict(
        {"prompt_index": list(index), "snapshot_step": list(step), "completion": list(text), "finished": list(finished)}
    )


PROMPTS = Dataset.from_dict(
    {"prompt": ["two plus two ?", "three times three ?"], "completion": [" 2 + 2 = 4 #### 4", " 3 * 3 = 9 #### 9"]}
)


# Unfinished trajectories


def test_drop_leaves_out_unfinished_and_empty_trajectories_keep_and_truncate_keep_them():
    rows = trajectories([(0, 1, " 4", True), (0, 2, " 2 + 2 = ", False), (1, 1, "", True), (1, 2, " 9", True)])
    assert keep_flags(rows, PROMPTS, unfinished="drop") == [True, False, False, True]
    for mode in ("keep", "truncate"):
        assert keep_flags(rows, PROMPTS, unfinished=mode) == [True, True, False, True]


def test_truncate_removes_the_end_tokens_of_unfinished_rows_only():
    end = [7, 8]
    candidates = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 7, 8], [1, 3, 7, 8], [1, 4, 5, 6]],  # the last row was cut by `max_length`
            "labels": [[-100, 2, 7, 8], [-100, 3, 7, 8], [-100, 4, 5, 6]],
            "finished": [True, False, False],
        }
    )
    out = truncate_unfinished(candidates, end)
    assert out["input_ids"] == [[1, 2, 7, 8], [1, 3], [1, 4, 5, 6]]
    assert out["labels"] == [[-100, 2, 7, 8], [-100, 3], [-100, 4, 5, 6]]


def test_end_of_turn_ids_are_what_the_preprocessing_appends(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)

    def tokenize(rows):  # the tiny chat template: "... assistant : <text> </s> "
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(rows["prompt"], rows["completion"])]
        return {"input_ids": [tokenizer(t)["input_ids"] for t in texts]}

    assert end_of_turn_ids(tokenize, [{"role": "user", "content": "what is one ?"}]) == [tokenizer.eos_token_id]


# Filters


def test_self_consistency_keeps_the_answer_most_snapshots_agree_on():
    rows = trajectories(
        [
            (0, 1, "so #### 5", True), (0, 2, "it is 4", True), (0, 3, "#### 4.0", True), (0, 4, "no idea", True),
            (1, 1, "#### 9", True), (1, 2, "#### 8", True),  # a tie: nothing agreed on, the label is used
        ]
    )
    assert keep_flags(rows, PROMPTS, trajectory_filter="self_consistency") == [False, True, True, False, False, False]
    # A custom extractor: the first word ("so", "it", "####", "no"; "####" twice).
    first_word = lambda text: text.split()[0] if text.split() else None  # noqa: E731
    assert keep_flags(rows, PROMPTS, trajectory_filter="self_consistency", answer_extractor=first_word) == [
        False, False, False, False, True, True
    ]


def test_self_consistency_ignores_dropped_trajectories():
    rows = trajectories([(0, 1, "#### 5", False), (0, 2, "#### 5", False), (0, 3, "#### 4", True), (0, 4, "#### 4", True)])
    assert keep_flags(rows, PROMPTS, unfinished="drop", trajectory_filter="self_consistency") == [
        False, False, True, True
    ]


def test_the_default_verifier_compares_final_numbers_with_the_label():
    rows = trajectories([(0, 1, "2+2 = 4 #### 4", True), (0, 2, "#### 5", True), (1, 1, "3*3 is 9", True)])
    assert keep_flags(rows, PROMPTS, trajectory_filter="verifier") == [True, False, True]
    assert same_final_number(None, "#### 1,200", "#### 1200.0")
    assert extract_final_number("x 2.50 y") == "2.5"


def test_a_verifier_gets_prompt_completion_and_label_and_its_scores_are_thresholded():
    calls = []

    def verifier(prompt, completion, label):
        calls.append((prompt, completion, label))
        return 0.3 if "4" in completion else 0.9

    rows = trajectories([(0, 1, " 4", True), (1, 1, " 9", True)])
    assert keep_flags(rows, PROMPTS, trajectory_filter="verifier", verifier=verifier) == [False, True]
    assert calls == [(PROMPTS[0]["prompt"], " 4", PROMPTS[0]["completion"]), (PROMPTS[1]["prompt"], " 9", PROMPTS[1]["completion"])]
    assert keep_flags(rows, PROMPTS, trajectory_filter="verifier", verifier=verifier, min_verifier_score=0.2) == [True, True]


def test_kept_fraction_by_snapshot():
    rows = trajectories([(0, 1, "a", True), (1, 1, "b", True), (0, 2, "c", True), (1, 2, "d", True)])
    assert kept_by_snapshot(rows, [True, False, False, False]) == {1: 0.5, 2: 0.0}


def test_a_prompt_whose_trajectories_are_all_filtered_trains_on_its_label():
    rows = trajectories([(0, 1, "#### 7", True), (0, 2, "#### 6", True), (1, 1, "#### 9", True)])
    keep = keep_flags(rows, PROMPTS, trajectory_filter="verifier")
    candidates, _ = mixture_candidates(PROMPTS, rows, keep=keep)
    assert list(zip(candidates["prompt_index"], candidates["snapshot_step"])) == [(0, LABEL), (1, LABEL), (1, 1)]
    tokenized = candidates.map(lambda row, i: {"input_ids": [i], "labels": [i]}, with_indices=True)
    mixture = MixtureDataset(tokenized, label_weight=0.0, seed=0)
    assert mixture.draw(0) == (0, True)
    assert mixture.draw(1) == (2, False)


# Snapshot weights


def synthetic(num_prompts: int, steps=(10, 20, 30)) -> Dataset:
    rows = {"prompt_index": [], "snapshot_step": [], "input_ids": [], "labels": []}
    for index in range(num_prompts):
        for step in (LABEL, *steps):
            rows["prompt_index"].append(index)
            rows["snapshot_step"].append(step)
            rows["input_ids"].append([index, step])
            rows["labels"].append([index, step])
    return Dataset.from_dict(rows)


def test_snapshot_weights_set_the_draw_frequencies():
    n = 4000
    mixture = MixtureDataset(synthetic(n), label_weight=0.0, seed=0, snapshot_weights={10: 0.0, 20: 1.0, 30: 3.0})
    assert mixture.snapshot_steps == [20, 30]
    drawn = [mixture[i]["input_ids"][1] for i in range(n)]
    assert drawn.count(10) == 0
    share = drawn.count(30) / n
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)


def test_snapshot_weights_need_a_weight_for_every_snapshot():
    with pytest.raises(ValueError, match="no weight for the snapshots of steps \\[30\\]"):
        MixtureDataset(synthetic(4), label_weight=0.0, seed=0, snapshot_weights={10: 1.0, 20: 1.0})
    with pytest.raises(ValueError, match="uniform"):
        MixtureDataset(synthetic(4), label_weight=0.0, seed=0, trajectory_choice="pld", snapshot_weights={10: 1.0})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(unfinished_trajectories="cut"), "unfinished_trajectories"),
        (dict(trajectory_filter="majority"), "trajectory_filter"),
        (dict(max_new_tokens_from_labels=0.0), "max_new_tokens_from_labels"),
        (dict(trajectory_filter="self_consistency", tms_mode="online"), "two_pass"),
        (dict(snapshot_weights=[1.0, 1.0]), "3 snapshots"),
        (dict(snapshot_weights=[0.0, 0.0, 0.0]), "at least one positive"),
        (dict(snapshot_weights=[1.0, -1.0, 1.0]), "non-negative"),
        (dict(snapshot_weights=[1.0, 1.0, 1.0], trajectory_choice="curriculum"), "uniform"),
    ],
)
def test_bad_trajectory_settings_raise(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        TMSConfig(recipe="paper", output_dir=str(tmp_path), num_checkpoints=3, **QUIET_CPU, **overrides)


# In the trainer, on a tiny model


def run(tiny_llama, tmp_path, verifier=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), num_checkpoints=2, per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=1e-2, max_new_tokens=3, logging_steps=1, tms_mode="two_pass", **QUIET_CPU,
    )
    values.update(overrides)
    trainer = TMSTrainer(
        model=tiny_llama,
        args=TMSConfig(**values),
        train_dataset=make_examples(8, seed=0),
        processing_class=load_tokenizer(tiny_llama),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        verifier=verifier,
    )
    trainer.train()
    return trainer


def drawable_trajectories(trainer) -> list[dict]:
    """The mixture's trajectory candidates, each with the `finished` flag of the trajectory it came from."""
    finished = {
        (i, s): f
        for i, s, k, f in zip(*(trainer.trajectories[c] for c in ("prompt_index", "snapshot_step", "sample_index", "finished")))
        if k == 0
    }
    mixture = trainer.train_dataset
    return [
        {**row, "finished": finished[(row["prompt_index"], row["snapshot_step"])]}
        for row in map(mixture.candidate, mixture.trajectory_rows)
    ]


@pytest.mark.parametrize("mode", ["truncate", "keep", "drop"])
def test_unfinished_trajectories_in_the_student_mixture(mode, tiny_llama, tmp_path):
    trainer = run(tiny_llama, tmp_path, unfinished_trajectories=mode)
    eos = load_tokenizer(tiny_llama).eos_token_id
    rows = drawable_trajectories(trainer)
    unfinished = [r for r in rows if not r["finished"]]
    total_unfinished = len(trainer.trajectories) - sum(trainer.trajectories["finished"])
    assert total_unfinished > 0  # 3 new tokens: most samples of the tiny model are cut
    if mode == "drop":
        kept = sum(f and bool(t[0]["content"].strip()) for t, f in zip(*(trainer.trajectories[c] for c in ("completion", "finished"))))
        assert unfinished == [] and len(rows) == kept
        return
    assert len(unfinished) == total_unfinished
    for row in unfinished:
        supervised = [t for t in row["labels"] if t != -100]
        assert supervised and (eos in supervised) == (mode == "keep")
        assert (supervised[-1] == eos) == (mode == "keep")
    # Labels and finished trajectories keep their end token either way.
    label_row = trainer.train_dataset.candidate(0)
    assert label_row["snapshot_step"] == LABEL and label_row["labels"][-1] == eos


def test_a_verifier_that_rejects_everything_leaves_the_labels(tiny_llama, tmp_path):
    seen = []

    def reject(prompt, completion, label):
        seen.append(label)
        return False

    trainer = run(tiny_llama, tmp_path, verifier=reject, trajectory_filter="verifier", max_new_tokens=4)
    assert seen and set(seen) <= set(c[0]["content"] for c in make_examples(8, seed=0)["completion"])
    assert trainer.train_dataset.trajectory_rows == []
    log = trainer.state.log_history
    counts = next(e for e in log if "tms_kept_trajectories" in e)
    assert counts["tms_kept_trajectories"] == 0 and counts["tms_label_copy_trajectories"] == 0
    assert sorted(k for k in counts if k.startswith("tms_kept_fraction_step_")) == [
        f"tms_kept_fraction_step_{s}" for s in sorted(trainer.history.steps, key=str)
    ]
    fractions = [e["tms_label_fraction"] for e in log if "tms_label_fraction" in e and e.get("tms_phase") == 2]
    assert fractions and all(f == 1.0 for f in fractions)


def test_snapshot_weights_leave_out_a_snapshot_in_the_trainer(tiny_llama, tmp_path):
    trainer = run(tiny_llama, tmp_path, snapshot_weights=[0.0, 1.0], max_new_tokens=4)
    first, last = trainer.history.steps
    assert {r["snapshot_step"] for r in drawable_trajectories(trainer)} == {last}
    assert trainer.train_dataset.snapshot_steps == [last]


def test_max_new_tokens_from_labels_fits_the_length_budget(tiny_llama, tmp_path):
    tokenizer = load_tokenizer(tiny_llama)
    longest = max(len(tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"])
                  for c in make_examples(8, seed=0)["completion"])
    trainer = run(tiny_llama, tmp_path, max_new_tokens=64, max_new_tokens_from_labels=2.5)
    assert trainer.max_new_tokens == 16 * math.ceil((2.5 * longest + 1) / 16) < 64
    assert max(trainer.trajectories["num_tokens"]) <= trainer.max_new_tokens
    capped = TMSTrainer(
        model=tiny_llama,
        args=TMSConfig(recipe="paper", output_dir=str(tmp_path / "capped"), num_checkpoints=2, max_new_tokens=5,
                       max_new_tokens_from_labels=2.5, per_device_train_batch_size=4, **QUIET_CPU),
        train_dataset=make_examples(8, seed=0),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    assert capped.max_new_tokens == 5


def test_a_verifier_must_be_callable(tiny_llama, tmp_path):
    with pytest.raises(TypeError, match="`verifier` must be a callable"):
        TMSTrainer(
            model=tiny_llama, args=TMSConfig(recipe="paper", output_dir=str(tmp_path), num_checkpoints=1, **QUIET_CPU),
            train_dataset=make_examples(8), processing_class=load_tokenizer(tiny_llama),
            peft_config=LoraConfig(r=4, target_modules="all-linear"), verifier="exact_match",
        )


def test_paper_settings_give_the_same_mixture_as_before(tiny_llama, tmp_path):
    """keep + no filter + uniform: every non-empty trajectory is a candidate, with its end token, drawn uniformly."""
    trainer = run(tiny_llama, tmp_path, unfinished_trajectories="keep", max_new_tokens=4)
    non_empty = sum(1 for c in trainer.trajectories["completion"] if c[0]["content"].strip())
    assert len(trainer.train_dataset.trajectory_rows) == non_empty
    assert trainer.train_dataset.snapshot_weights is None
    torch.testing.assert_close(torch.tensor(trainer.stats.kept), torch.tensor(non_empty))
