"""The mixture: what the student trains on, drawn afresh from labels and trajectories every epoch."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .data import as_completion

LABEL = -1  # `snapshot_step` of a reference label among the candidates
IS_LABEL = "tms_is_label"  # per-example flag carried to the loss, so the label fraction actually trained on is logged
_CARRIED = ("tools", "chat_template_kwargs")


def mixture_candidates(dataset: Dataset, trajectories: Dataset) -> tuple[Dataset, int]:
    """
    Every completion a prompt can be trained on, in prompt-completion form: its reference label
    (`snapshot_step == -1`) and its non-empty trajectories.

    Returns:
        `tuple[Dataset, int]`: The candidates and the number of empty trajectories left out.
    """
    conversational = not isinstance(dataset[0]["completion"], str)
    carried = [c for c in _CARRIED if c in dataset.column_names]
    rows: dict[str, list[Any]] = defaultdict(list)

    def add(index: int, completion, step: int) -> None:
        example = dataset[index]
        rows["prompt_index"].append(index)
        rows["snapshot_step"].append(step)
        rows["prompt"].append(example["prompt"])
        rows["completion"].append(completion)
        for column in carried:
            rows[column].append(example[column])

    for index, completion in enumerate(dataset["completion"]):
        add(index, completion, LABEL)
    empty = 0
    for index, step, text in zip(
        trajectories["prompt_index"], trajectories["snapshot_step"], _texts(trajectories["completion"])
    ):
        if text.strip():
            add(index, as_completion(text, conversational), step)
        else:
            empty += 1
    return Dataset.from_dict(dict(rows)), empty


def _texts(completions: list) -> list[str]:
    return [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]


class MixtureDataset(torch.utils.data.Dataset):
    """
    One example per prompt per epoch, drawn as TMS prescribes: the reference label with probability `label_weight`,
    otherwise a trajectory chosen uniformly over the snapshots that produced one, then uniformly over that snapshot's
    samples. The draw for prompt `i` in epoch `e` depends only on `(seed, e, i)`, so it is fresh every epoch,
    reproducible, and independent of batch order and of the number of dataloader workers.

    Args:
        candidates ([`~datasets.Dataset`]):
            Tokenized candidates (`input_ids`, `labels`) with `prompt_index` and `snapshot_step` columns (`-1` marks the
            label), as produced by [`mixture_candidates`] and the SFT preprocessing.
        label_weight (`float`):
            Probability (alpha) of drawing the label.
        seed (`int`):
            Seed of the draws.
    """

    def __init__(self, candidates: Dataset, label_weight: float, seed: int):
        self.label_weight = label_weight
        self.seed = seed
        self.epoch = 0
        self._examples = candidates.select_columns(["input_ids", "labels"])
        self._label: dict[int, int] = {}
        self._trajectories: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for row, (index, step) in enumerate(zip(candidates["prompt_index"], candidates["snapshot_step"])):
            if step == LABEL:
                self._label[index] = row
            else:
                self._trajectories[index][step].append(row)
        self.prompt_indices = sorted(set(self._label) | set(self._trajectories))
        if not self.prompt_indices:
            raise ValueError("The mixture is empty: no prompt has a label or a trajectory left after preprocessing.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.prompt_indices)

    def draw(self, position: int, epoch: int | None = None) -> tuple[int, bool]:
        """The candidate row drawn for the prompt at `position` in `epoch`, and whether it is the label."""
        index = self.prompt_indices[position]
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        by_step = self._trajectories.get(index)
        label_row = self._label.get(index)
        if label_row is not None and (not by_step or rng.random() < self.label_weight):
            return label_row, True
        steps = sorted(by_step)
        rows = by_step[steps[rng.integers(len(steps))]]
        return rows[rng.integers(len(rows))], False

    def label_fraction(self, epoch: int | None = None) -> float:
        """Fraction of prompts that draw their label in `epoch`."""
        return float(np.mean([self.draw(position, epoch)[1] for position in range(len(self))]))

    def __getitem__(self, position: int) -> dict[str, Any]:
        row, is_label = self.draw(position)
        example = self._examples[row]
        return {"input_ids": example["input_ids"], "labels": example["labels"], IS_LABEL: is_label}


class MixtureCollator:
    """
    Wraps the SFT collator: collates the tokens as usual and carries the label flags along as a tensor. Examples
    without flags (evaluation batches) pass straight through.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if IS_LABEL not in examples[0]:
            return self.collator(examples)
        flags = [example.pop(IS_LABEL) for example in examples]
        batch = self.collator(examples)
        batch[IS_LABEL] = torch.tensor(flags, dtype=torch.float32)
        return batch
