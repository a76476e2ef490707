"""
Drawn-only sampling (`trajectories_to_generate="drawn"`): sample only the (prompt, snapshot) pairs that the mixture's
draws land on. The draw is a pure function of (seed, epoch, prompt), so it can be planned before any trajectory exists
([`MixtureDataset.missing_pairs`]); this module holds the loop that samples what the plan lists, for two-pass and online
TMS alike, and which dataset positions the plan covers.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable

import torch
from accelerate.data_loader import SeedableRandomSampler
from datasets import Dataset, concatenate_datasets
from torch.utils.data import SequentialSampler

Pairs = set[tuple[int, int]]  # (prompt_index, snapshot_step)


def sample_drawn_pairs(
    missing_pairs: Callable[[], Pairs], sample: Callable[[Pairs], Dataset], add: Callable[[Dataset, Pairs], Any]
) -> None:
    """
    The plan-sample-replan loop: plan the draws (`missing_pairs()`: the pairs they land on that were not sampled, as
    [`MixtureDataset.missing_pairs`] lists them), sample those (`sample(pairs) -> trajectories`), hand them to the plan
    (`add(trajectories, pairs)`), and plan again, since a draw that lands on a pair left without a trajectory (empty,
    filtered) draws again; until no draw lands on a pair not sampled.
    """
    while missing := missing_pairs():
        add(sample(missing), missing)


def drawn_trajectories(plan: Callable[[Dataset | None, Pairs], Pairs], sample, start: Dataset | None = None):
    """
    Two-pass TMS: the trajectories the student's draws land on, beyond those of `start` (sorted; None if there are
    none). `plan(trajectories, sampled)`: the pairs missing from the student's draws, given the trajectories sampled so
    far (None before any) and the pairs they were sampled for; `sample(pairs)`: the pairs' trajectories.
    """
    parts = [] if start is None or not len(start) else [start]
    sampled = set(zip(start["prompt_index"], start["snapshot_step"])) if parts else set()

    def add(trajectories, pairs):
        parts.append(trajectories)
        sampled.update(pairs)

    sample_drawn_pairs(lambda: plan(concatenate_datasets(parts) if parts else None, sampled), sample, add)
    return concatenate_datasets(parts).sort(["prompt_index", "snapshot_step", "sample_index"]) if parts else None


def epoch_order(dataloader, epoch: int) -> list[int] | None:
    """
    The dataset positions that the training `dataloader` takes in `epoch`, in order, over all processes; None where its
    sampler's order cannot be read without disturbing it (a sampler other than a sequential one or accelerate's
    seedable one, which re-seeds its generator from its seed and the epoch at each epoch).
    """
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    batch_sampler = getattr(batch_sampler, "batch_sampler", batch_sampler)  # a `BatchSamplerShard` wraps the whole one
    sampler = getattr(batch_sampler, "sampler", None)
    if isinstance(sampler, SequentialSampler):
        return list(sampler)
    if not isinstance(sampler, SeedableRandomSampler):
        return None
    sampler = copy.copy(sampler)  # with a generator of its own, so that the training's is left as it is
    if sampler.generator is not None:
        sampler.generator = torch.Generator(device=sampler.generator.device)
    sampler.set_epoch(epoch)
    return list(sampler)


def step_positions(
    dataloader, steps: range, updates_per_epoch: int, examples_per_step: int, num_examples: int, num_processes: int = 1
) -> dict[int, list[int]]:
    """
    By epoch, the dataset positions of the examples of optimizer `steps` (counted from 1 over the whole run), with
    `examples_per_step` examples per step over all processes; all `num_examples` positions of their epochs where the
    data loader's order cannot be read ([`epoch_order`]).
    """
    positions, orders = defaultdict(list), {}
    for optimizer_step in steps:
        epoch, index = divmod(optimizer_step - 1, updates_per_epoch)
        if epoch not in orders:
            orders[epoch] = epoch_order(dataloader, epoch)
        order = orders[epoch]
        if order is None:
            positions[epoch] = list(range(num_examples))
            continue
        start, stop = index * examples_per_step, (index + 1) * examples_per_step
        # Several processes (a `BatchSamplerShard`) even out the last batches with positions from the epoch's start.
        stop = stop if num_processes > 1 else min(stop, len(order))
        positions[epoch] += [order[j % len(order)] for j in range(start, stop)]
    return dict(positions)
