"""Drawn-only sampling: the plan-sample-replan loop, and which dataset positions a plan covers."""

from accelerate.data_loader import SeedableRandomSampler
from datasets import Dataset
from torch.utils.data import DataLoader

from trl_tms.mixture import LABEL, MixtureDataset
from trl_tms.planning import epoch_order, sample_drawn_pairs, step_positions


def test_epoch_order_is_the_data_loaders_and_leaves_it_as_it_is():
    sampler = SeedableRandomSampler(range(10), data_seed=3)
    loader = DataLoader(range(10), sampler=sampler, batch_size=2)
    before = epoch_order(loader, 1)
    sampler.set_epoch(1)
    assert [i for batch in loader for i in batch.tolist()] == before == epoch_order(loader, 1)
    assert sorted(before) == list(range(10)) and epoch_order(loader, 0) != before
    assert epoch_order(DataLoader(range(10), batch_size=2), 0) == list(range(10))
    assert epoch_order(DataLoader(range(10), batch_size=2, shuffle=True), 0) is None  # not seedable: unknown


def test_step_positions_are_those_of_the_steps_examples():
    loader = DataLoader(range(10), batch_size=2)  # 3 steps of 4 examples per epoch, the last one of 2
    assert step_positions(loader, range(2, 5), 3, 4, 10) == {0: [4, 5, 6, 7, 8, 9], 1: [0, 1, 2, 3]}
    # Several processes even out the last step with examples from the start of the epoch.
    assert step_positions(loader, range(3, 4), 3, 4, 10, num_processes=2) == {0: [8, 9, 0, 1]}
    # An order that cannot be read: every position of the steps' epochs.
    shuffled = DataLoader(range(10), batch_size=2, shuffle=True)
    assert step_positions(shuffled, range(3, 5), 3, 4, 10) == {0: list(range(10)), 1: list(range(10))}


def candidates(pairs):
    tokens = [[index, step] for index, step in pairs]
    return Dataset.from_dict({"prompt_index": [index for index, _ in pairs], "snapshot_step": [s for _, s in pairs],
                              "input_ids": tokens, "labels": tokens})


def test_plan_sample_replan_samples_again_where_a_sampled_pair_left_no_trajectory():
    mixture = MixtureDataset(candidates([(i, LABEL) for i in range(40)]), 0.0, 1, snapshot_steps=[10, 20, 30], sampled=set())
    rounds = []

    def sample(pairs):  # the pairs of prompt 0 leave no trajectory (empty, filtered): its draw moves on
        rounds.append(set(pairs))
        return candidates([(i, s) for i, s in sorted(pairs) if i != 0])

    def add(trajectories, pairs):
        mixture.extend(trajectories if len(trajectories) else Dataset.from_dict({}), snapshot_steps=[10, 20, 30],
                       sampled=mixture.sampled | pairs)

    sample_drawn_pairs(lambda: mixture.missing_pairs(1), sample, add)
    assert len(rounds[0]) == 40 and [len(r) for r in rounds[1:]] == [1, 1]  # prompt 0 tries each of its snapshots
    assert mixture.missing_pairs(1) == set() and {s for i, s in set().union(*rounds) if i == 0} == {10, 20, 30}
