import math

import pytest
import torch
from datasets import Dataset

from trl_tms.candidates import LABEL, mixture_candidates
from trl_tms.mixture import IS_LABEL, MixtureCollator, MixtureDataset


def synthetic_candidates(num_prompts: int, steps=(10, 20), samples: int = 2) -> Dataset:
    rows = {"prompt_index": [], "snapshot_step": [], "input_ids": [], "labels": []}
    for index in range(num_prompts):
        for step in (LABEL, *steps):
            for sample in range(1 if step == LABEL else samples):
                rows["prompt_index"].append(index)
                rows["snapshot_step"].append(step)
                # The token ids encode where the example came from, so a draw can be checked from the item alone.
                rows["input_ids"].append([index, step, sample])
                rows["labels"].append([index, step, sample])
    return Dataset.from_dict(rows)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_label_fraction_matches_alpha(alpha):
    n = 4000
    mixture = MixtureDataset(synthetic_candidates(n), label_weight=alpha, seed=3)
    for epoch in range(2):
        mixture.set_epoch(epoch)
        drawn = [mixture[i] for i in range(n)]
        fraction = sum(item[IS_LABEL] for item in drawn) / n
        sigma = math.sqrt(alpha * (1 - alpha) / n)
        assert abs(fraction - alpha) <= 4 * sigma + 1e-12
        assert fraction == pytest.approx(mixture.label_fraction(epoch))
        # A label flag always goes with the label's tokens, and vice versa.
        assert all((item["input_ids"][1] == LABEL) == item[IS_LABEL] for item in drawn)


def test_trajectories_are_uniform_over_snapshots_and_samples():
    n = 4000
    mixture = MixtureDataset(synthetic_candidates(n, steps=(10, 20, 30)), label_weight=0.0, seed=0)
    drawn = [tuple(mixture[i]["input_ids"][1:]) for i in range(n)]
    for step in (10, 20, 30):
        for sample in (0, 1):
            share = drawn.count((step, sample)) / n
            assert abs(share - 1 / 6) < 4 * math.sqrt((1 / 6) * (5 / 6) / n)


def test_draws_are_fresh_each_epoch_and_reproducible():
    candidates = synthetic_candidates(500)
    a = MixtureDataset(candidates, label_weight=0.25, seed=1)
    b = MixtureDataset(candidates, label_weight=0.25, seed=1)
    c = MixtureDataset(candidates, label_weight=0.25, seed=2)
    epoch0 = [a.draw(i, 0) for i in range(500)]
    assert epoch0 == [b.draw(i, 0) for i in range(500)]
    assert epoch0 != [a.draw(i, 1) for i in range(500)]
    assert epoch0 != [c.draw(i, 0) for i in range(500)]
    # Each item belongs to its own prompt.
    assert all(a[i]["input_ids"][0] == i for i in range(500))


def test_prompt_without_trajectories_uses_its_label():
    candidates = Dataset.from_dict(
        {"prompt_index": [0, 1, 1], "snapshot_step": [LABEL, LABEL, 5], "input_ids": [[0], [1], [2]], "labels": [[0], [1], [2]]}
    )
    mixture = MixtureDataset(candidates, label_weight=0.0, seed=0)
    assert mixture.draw(0) == (0, True)
    assert mixture.draw(1) == (2, False)


def test_empty_trajectories_are_left_out_and_counted():
    dataset = Dataset.from_list(
        [{"prompt": "what is one ?", "completion": " one ."}, {"prompt": "what is two ?", "completion": " two ."}]
    )
    trajectories = Dataset.from_dict(
        {"prompt_index": [0, 0, 1], "snapshot_step": [3, 6, 3], "completion": [" uno", "", "  "]}
    )
    candidates, empty = mixture_candidates(dataset, trajectories)
    assert empty == 2
    assert candidates["prompt_index"] == [0, 1, 0]
    assert candidates["snapshot_step"] == [LABEL, LABEL, 3]
    assert candidates["completion"] == [" one .", " two .", " uno"]
    assert candidates["prompt"] == ["what is one ?", "what is two ?", "what is one ?"]


def test_conversational_trajectories_keep_the_message_form():
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}]
    )
    trajectories = Dataset.from_dict(
        {"prompt_index": [0], "snapshot_step": [2], "completion": [[{"role": "assistant", "content": "yes"}]]}
    )
    candidates, empty = mixture_candidates(dataset, trajectories)
    assert empty == 0
    assert candidates["completion"][1] == [{"role": "assistant", "content": "yes"}]


def test_collator_carries_flags_and_passes_eval_batches_through():
    seen = []

    def inner(examples):
        seen.append([sorted(e) for e in examples])
        return {"input_ids": torch.tensor([e["input_ids"] for e in examples])}

    collator = MixtureCollator(inner)
    batch = collator([{"input_ids": [1], "labels": [1], IS_LABEL: True}, {"input_ids": [2], "labels": [2], IS_LABEL: False}])
    assert batch[IS_LABEL].tolist() == [1.0, 0.0]
    assert seen[-1] == [["input_ids", "labels"]] * 2
    assert IS_LABEL not in collator([{"input_ids": [1], "labels": [1]}])


def test_empty_mixture_raises():
    empty = Dataset.from_dict({"prompt_index": [], "snapshot_step": [], "input_ids": [], "labels": []})
    with pytest.raises(ValueError, match="mixture is empty"):
        MixtureDataset(empty, label_weight=0.25, seed=0)


def test_curriculum_follows_the_epochs_through_the_snapshots():
    n, steps = 600, (10, 20, 30, 40, 50, 60)
    mixture = MixtureDataset(synthetic_candidates(n, steps=steps, samples=1), 0.0, seed=0, trajectory_choice="curriculum",
                             num_epochs=3)
    for epoch, window in enumerate([(10, 20), (30, 40), (50, 60)]):
        mixture.set_epoch(epoch)
        drawn = [mixture[i]["input_ids"][1] for i in range(n)]
        assert set(drawn) == set(window)  # both snapshots of the slice, no other
        assert abs(drawn.count(window[0]) / n - 0.5) < 4 * math.sqrt(0.25 / n)
    # More epochs than snapshots: each epoch still gets one, in order.
    mixture = MixtureDataset(synthetic_candidates(50, steps=(10, 20), samples=1), 0.0, seed=0,
                             trajectory_choice="curriculum", num_epochs=4)
    assert [{mixture.draw(i, e)[0] % 3 for i in range(50)} for e in range(4)] == [{1}, {1}, {2}, {2}]
    # A prompt without a trajectory of the epoch's snapshot takes the nearest one it has (earlier on a tie).
    candidates = synthetic_candidates(2, steps=(10, 20, 30, 40), samples=1).filter(
        lambda row: not (row["prompt_index"] == 0 and row["snapshot_step"] in (20, 30))
    )
    mixture = MixtureDataset(candidates, 0.0, seed=0, trajectory_choice="curriculum", num_epochs=4)
    assert [candidates[mixture.draw(0, e)[0]]["snapshot_step"] for e in range(4)] == [10, 10, 40, 40]
    assert [candidates[mixture.draw(1, e)[0]]["snapshot_step"] for e in range(4)] == [10, 20, 30, 40]
    # One epoch: uniform over all snapshots.
    mixture = MixtureDataset(synthetic_candidates(n, steps=steps, samples=1), 0.0, seed=0, trajectory_choice="curriculum")
    assert {mixture[i]["input_ids"][1] for i in range(n)} == set(steps)


def test_pld_choice_takes_each_prompts_lowest_scored_trajectory():
    n = 300
    candidates = synthetic_candidates(n, steps=(10, 20, 30), samples=2)
    mixture = MixtureDataset(candidates, label_weight=0.25, seed=0, trajectory_choice="pld")
    with pytest.raises(ValueError, match="need scores"):
        [mixture[i] for i in range(n)]
    rows = mixture.trajectory_rows
    assert len(rows) == n * 3 * 2
    scores = {row: float(torch.rand(1, generator=torch.Generator().manual_seed(row))) for row in rows}
    mixture.set_scores(scores)
    drawn = [mixture[i] for i in range(n)]
    trajectories = [item for item in drawn if not item[IS_LABEL]]
    assert abs(len(trajectories) / n - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    prompt_of, tokens_of = list(candidates["prompt_index"]), list(candidates["input_ids"])
    best = {i: min((r for r in rows if prompt_of[r] == i), key=scores.get) for i in range(n)}
    for item in trajectories:
        assert item["input_ids"] == tokens_of[best[item["input_ids"][0]]]
    drawing = {item["input_ids"][0] for item in trajectories}
    assert sorted(mixture.best_rows()) == sorted(best[i] for i in drawing)
    # Only the prompts that draw a trajectory this epoch need scores.
    needed = mixture.rows_to_score()
    assert {prompt_of[row] for row in needed} == {prompt_of[row] for row, is_label in map(mixture.draw, range(n))
                                                   if not is_label}
    assert len(needed) == 6 * len({prompt_of[row] for row in needed})
    mixture.set_scores({row: scores[row] for row in needed})
    with pytest.raises(ValueError, match="missing for 1 trajectory rows"):
        mixture.set_scores({row: 0.0 for row in needed[1:]})


def test_unknown_trajectory_choice_is_refused():
    with pytest.raises(ValueError, match="trajectory_choice"):
        MixtureDataset(synthetic_candidates(2), 0.5, seed=0, trajectory_choice="best")


# Planned draws: sampling only the (prompt, snapshot) pairs the draws land on


def keep_pairs(candidates: Dataset, pairs: set) -> Dataset:
    """The labels and the trajectories of `pairs` only, as if only those pairs had been sampled."""
    return candidates.filter(
        lambda row: row["snapshot_step"] == LABEL or (row["prompt_index"], row["snapshot_step"]) in pairs
    )


def drawn_examples(mixture: MixtureDataset, epochs: int) -> list:
    """What each prompt trains on in each epoch, by content (prompt, snapshot, sample), not by row."""
    return [tuple(mixture.candidate(mixture.draw(i, e)[0])["input_ids"]) for e in range(epochs) for i in range(len(mixture))]


def plan(full: Dataset, steps, epochs: int, **kwargs) -> tuple[MixtureDataset, set, int]:
    """Sample pairs as the trainer does: what the draws need, again until nothing is missing. Returns the final mixture,
    the sampled pairs and the number of rounds."""
    sampled, rounds = set(), 0
    while True:
        mixture = MixtureDataset(keep_pairs(full, sampled), snapshot_steps=list(steps), sampled=set(sampled), **kwargs)
        missing = mixture.missing_pairs(epochs)
        if not missing:
            return mixture, sampled, rounds
        assert not missing & sampled  # a pair is never asked for twice
        sampled |= missing
        rounds += 1


@pytest.mark.parametrize("weights", [None, {10: 1.0, 20: 0.0, 30: 3.0, 40: 1.0}])
def test_sampling_only_the_drawn_pairs_gives_the_same_draws(weights):
    n, steps, epochs = 300, (10, 20, 30, 40), 3
    full = synthetic_candidates(n, steps=steps)
    settings = dict(label_weight=0.25, seed=5, snapshot_weights=weights)
    everything = MixtureDataset(full, **settings)
    mixture, sampled, rounds = plan(full, steps, epochs, **settings)
    assert rounds == 1  # every sampled pair has trajectories: nothing to draw again
    assert drawn_examples(mixture, epochs) == drawn_examples(everything, epochs)
    # Each prompt samples the snapshots it draws in some epoch, far fewer than all of them.
    assert len(sampled) < 0.75 * epochs * n
    assert len(sampled) < 0.6 * n * len(steps)
    if weights is not None:
        assert not any(step == 20 for _, step in sampled)


def test_a_draw_landing_on_a_pair_left_without_trajectories_draws_again_as_with_every_pair_sampled():
    n, steps, epochs = 200, (10, 20, 30), 4
    # Some pairs produced nothing usable (empty, or filtered out); prompt 7 none at all.
    gone = {(i, s) for i in range(n) for s in steps if (i * 7 + s) % 5 == 0} | {(7, s) for s in steps}
    full = synthetic_candidates(n, steps=steps).filter(
        lambda row: (row["prompt_index"], row["snapshot_step"]) not in gone
    )
    settings = dict(label_weight=0.25, seed=1)
    everything = MixtureDataset(full, **settings)
    mixture, sampled, rounds = plan(full, steps, epochs, **settings)
    assert rounds >= 2  # the draws that landed on the lost pairs asked for more
    assert drawn_examples(mixture, epochs) == drawn_examples(everything, epochs)
    assert {(7, s) for s in steps} <= sampled  # all of prompt 7's snapshots were tried before it fell back to its label
    assert all(mixture.draw(7, e)[1] for e in range(epochs))


def test_a_prompt_draws_uniformly_among_the_snapshots_that_left_it_a_trajectory():
    n = 3000
    full = synthetic_candidates(n, steps=(10, 20, 30), samples=1).filter(
        lambda row: not (row["snapshot_step"] == 20 and row["prompt_index"] % 2 == 0)
    )
    mixture = MixtureDataset(full, label_weight=0.0, seed=0)
    drawn = [mixture[i]["input_ids"][1] for i in range(0, n, 2)]
    assert set(drawn) == {10, 30}
    assert abs(drawn.count(10) / len(drawn) - 0.5) < 4 * math.sqrt(0.25 / len(drawn))


def test_drawing_a_pair_never_sampled_says_what_to_do():
    full = synthetic_candidates(50, steps=(10, 20))
    mixture, _, _ = plan(full, (10, 20), epochs=1, label_weight=0.0, seed=0)
    with pytest.raises(RuntimeError, match="never sampled.*missing_pairs"):
        [mixture.draw(i, epoch) for epoch in range(1, 4) for i in range(50)]


def test_untokenized_candidates_plan_but_do_not_train():
    planning = Dataset.from_dict({"prompt_index": [0, 1], "snapshot_step": [LABEL, LABEL], "completion": ["a", "b"]})
    mixture = MixtureDataset(planning, label_weight=0.0, seed=0, snapshot_steps=[3, 6], sampled=set())
    missing = mixture.missing_pairs(1)
    assert sorted(i for i, _ in missing) == [0, 1] and {step for _, step in missing} <= {3, 6}
    with pytest.raises(ValueError, match="untokenized"):
        MixtureDataset(planning, label_weight=1.0, seed=0)[0]


def test_planned_draws_need_the_uniform_choice_and_known_steps():
    full = synthetic_candidates(4, steps=(10, 20))
    with pytest.raises(ValueError, match="needs every one sampled"):
        MixtureDataset(full, 0.25, 0, trajectory_choice="pld", sampled=set())
    with pytest.raises(ValueError, match=r"lacks the steps \[20\]"):
        MixtureDataset(full, 0.25, 0, snapshot_steps=[10], sampled=set())


def test_a_growing_mixture_plans_each_window_as_a_mixture_that_had_every_pair():
    """Online TMS sampling only the drawn pairs: snapshots join one by one, before any of their trajectories exists."""
    n, steps = 200, (0, 10, 20, 30, 40, 50)  # two snapshots per epoch, 3 epochs
    full = synthetic_candidates(n, steps=steps)
    labels = full.filter(lambda row: row["snapshot_step"] == LABEL)
    trajectories = full.filter(lambda row: row["snapshot_step"] != LABEL)
    growing = MixtureDataset(labels, label_weight=0.25, seed=2, snapshot_steps=[], sampled=set())
    everything = MixtureDataset(labels, label_weight=0.25, seed=2)
    assert all(growing.draw(i, 0)[1] for i in range(n))  # before any snapshot: labels only
    sampled = set()
    for k, step in enumerate(steps):
        taken, epoch = list(steps[: k + 1]), k // 2
        window = set(taken[-4:])  # the mixture keeps the last four snapshots
        growing.extend(Dataset.from_dict({}), keep_steps=window, snapshot_steps=taken, sampled=sampled)
        missing = growing.missing_pairs(epoch + 1, first_epoch=epoch)  # the epoch of the batches until the next one
        assert missing and {s for _, s in missing} <= window and not missing & sampled
        assert step in {s for _, s in missing}
        sampled |= missing
        growing.extend(keep_pairs(trajectories, missing), keep_steps=window, snapshot_steps=taken, sampled=sampled)
        assert growing.missing_pairs(epoch + 1, first_epoch=epoch) == set()
        everything.extend(trajectories.filter(lambda row: row["snapshot_step"] == step), keep_steps=window)
        assert [growing.candidate(growing.draw(i, epoch)[0])["input_ids"] for i in range(n)] == [
            everything.candidate(everything.draw(i, epoch)[0])["input_ids"] for i in range(n)
        ]
    assert len(sampled) < 0.5 * n * len(steps), len(sampled)


def test_extend_checks_the_planning_arguments():
    full = synthetic_candidates(4, steps=(10,))
    labels = full.filter(lambda row: row["snapshot_step"] == LABEL)
    trajectories = full.filter(lambda row: row["snapshot_step"] == 10)
    with pytest.raises(ValueError, match="go together"):
        MixtureDataset(labels, 0.25, 0).extend(trajectories, snapshot_steps=[10], sampled=set())
    planned = MixtureDataset(labels, 0.25, 0, snapshot_steps=[], sampled=set())
    with pytest.raises(ValueError, match="go together"):
        planned.extend(trajectories, sampled={(0, 10)})
    with pytest.raises(ValueError, match=r"lacks the steps \[10\]"):
        planned.extend(trajectories, snapshot_steps=[0], sampled={(0, 10)})


def test_kept_fractions_of_a_snapshot_met_in_several_parts_are_weighted_by_their_trajectories():
    from trl_tms.candidates import TrajectoryStats

    total = TrajectoryStats(kept_fraction={10: 1.0}, by_snapshot={10: 3}, label_copies=2)
    total.add(TrajectoryStats(kept_fraction={10: 0.0, 20: 0.5}, by_snapshot={10: 1, 20: 2}, label_copies=1))
    assert total.kept_fraction == {10: 0.75, 20: 0.5} and total.by_snapshot == {10: 4, 20: 2}
    assert total.label_copies == 3


def test_a_snapshot_that_joins_the_draw_changes_only_the_draws_it_wins():
    n = 3000
    labels = synthetic_candidates(n, steps=()).filter(lambda row: row["snapshot_step"] == LABEL)
    mixture = MixtureDataset(labels, label_weight=0.0, seed=4, snapshot_steps=[0, 10, 20], sampled=set())
    before = {(i, e): step for e in range(2) for i, step in mixture.missing_pairs(e + 1, first_epoch=e)}
    mixture.extend(Dataset.from_dict({}), snapshot_steps=[0, 10, 20, 30], sampled=set())
    after = {(i, e): step for e in range(2) for i, step in mixture.missing_pairs(e + 1, first_epoch=e)}
    changed = [key for key in before if after[key] != before[key]]
    assert all(after[key] == 30 for key in changed)  # a draw moves only to the new snapshot ...
    fraction = len(changed) / len(before)  # ... and about a quarter of them do (uniform over four)
    assert abs(fraction - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(before))


@pytest.mark.parametrize("conversational", [False, True])
def test_label_copies_count_the_kept_trajectories_that_are_their_label_word_for_word(conversational):
    from trl_tms.data import as_completion
    from trl_tms.candidates import CandidateBuilder

    def form(text):
        return as_completion(text, conversational)

    prompts = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": q}] if conversational else q for q in ("2+2?", "3+3?")],
        "completion": [form("2 + 2 = 4\n#### 4"), form("3 + 3 = 6\n#### 6")],
    })
    texts = [
        (0, "2 + 2 = 4\n#### 4", True),     # the label
        (0, " 2 + 2  = 4 #### 4 ", True),   # the label, whitespace aside
        (1, "2 + 2 = 4\n#### 4", True),     # another prompt's label
        (1, "3 + 3 = 6, so #### 6", True),  # right, in other words
        (1, "3 + 3 = 6\n#### 6", False),    # the label's words, cut short: left out by "drop"
        (0, "   ", True),                   # empty: never kept
    ]
    trajectories = Dataset.from_dict({
        "prompt_index": [i for i, _, _ in texts], "snapshot_step": [5] * len(texts),
        "completion": [form(t) for _, t, _ in texts], "finished": [f for _, _, f in texts],
    })
    for unfinished, copies in (("keep", 3), ("drop", 2)):
        builder = CandidateBuilder(prompts, lambda candidates, name: candidates, unfinished=unfinished)
        _, stats = builder.build(trajectories)
        assert stats.label_copies == copies and stats.as_dict()["label_copy_trajectories"] == copies
    # A filter that rejects everything keeps no copy either.
    builder = CandidateBuilder(prompts, lambda candidates, name: candidates, unfinished="keep",
                               trajectory_filter="verifier", verifier=lambda *args: False)
    assert builder.build(trajectories)[1].label_copies == 0
