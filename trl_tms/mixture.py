"""The mixture: what the student trains on, drawn afresh from labels and trajectories every epoch."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from transformers import TrainerCallback

from .candidates import LABEL
from .config import check_choice, check_rehearsal_weight, check_weighted_draw
from .rehearsal import REHEARSAL

IS_LABEL = "tms_is_label"  # per-example flag carried to the loss, so the label fraction actually trained on is logged
IS_REHEARSAL = "tms_is_rehearsal"  # the same for rehearsal answers (only when the mixture has some)
FLAGS = (IS_LABEL, IS_REHEARSAL)
REHEARSAL_STREAM = 1  # extra seed word of the rehearsal draw, whose stream leaves the label/trajectory draw unchanged


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a 64-bit integer to a well-mixed one."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def snapshot_key(seed: int, epoch: int, index: int, step: int) -> float:
    """
    A number uniform in (0, 1) fixed by `(seed, epoch, prompt index, snapshot step)`: the uniform draw picks, among a
    prompt's snapshots, the one of the largest key. A hash rather than a random stream, so that a key does not depend on
    which other snapshots exist, and cheap enough to plan millions of draws.
    """
    x = 0
    for part in (seed, epoch, index, step):
        x = _mix64((x ^ (part & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64)
    return ((x >> 11) + 0.5) / 2.0**53


def _slice(steps: list[int], epoch: int, num_epochs: int) -> list[int]:
    """The `epoch`-th of `num_epochs` consecutive, non-empty slices of `steps` (slices overlap when steps are fewer)."""
    start = epoch * len(steps) // num_epochs
    stop = max(start + 1, (epoch + 1) * len(steps) // num_epochs)
    return steps[start:stop]


class MixtureDataset(torch.utils.data.Dataset):
    """
    One example per prompt per epoch, drawn as TMS prescribes: the reference label with probability `label_weight`,
    otherwise one of the prompt's trajectories, picked by `trajectory_choice`:

    - `"uniform"` (the paper): uniformly over the snapshots that produced one, then uniformly over that snapshot's
      samples;
    - `"curriculum"`: as uniform, but within the snapshots of the student's progress: in epoch `e` of `E`, the `e`-th of
      `E` consecutive slices of the snapshots (earliest first), so the student follows the harvest run's path. A prompt
      with no trajectory in the slice (all of them empty) takes its nearest snapshot's. With one epoch it is uniform;
    - `"pld"`: the trajectory closest to the policy, i.e. with the lowest mean NLL per token under the current student,
      as given by [`set_scores`] (at the start of each epoch the trainer scores the trajectories of the prompts that
      will not draw their label, `rows_to_score()`).

    With rehearsal answers ([`add_rehearsal`]), each draw is first, with probability `rehearsal_weight` (beta), one of
    them (uniformly) instead; this draw has a random stream of its own, so the other draws are those of the mixture
    without rehearsal.

    The draw for prompt `i` in epoch `e` depends only on `(seed, e, i)` (and the scores), so it is fresh every epoch,
    reproducible, and independent of batch order and of the number of dataloader workers. `"uniform"` gives each of
    the prompt's snapshots a key fixed by `(seed, e, i, snapshot)` ([`snapshot_key`]) and takes the largest among those
    that left the prompt a trajectory (not empty, not left out by a filter): a uniform draw among them, in which a
    snapshot that was never sampled for the prompt takes part as if it had one. So the draws can be planned before any
    trajectory exists ([`missing_pairs`]), only the (prompt, snapshot) pairs they land on need sampling (`sampled`),
    and a snapshot added later (online TMS) changes a prompt's draw only where its own key is the largest.

    Args:
        candidates ([`~datasets.Dataset`]):
            Tokenized candidates (`input_ids`, `labels`) with `prompt_index` and `snapshot_step` columns (`-1` marks the
            label), as produced by [`mixture_candidates`] and the SFT preprocessing.
        label_weight (`float`):
            Probability (alpha) of drawing the label.
        seed (`int`):
            Seed of the draws.
        trajectory_choice (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"`, `"curriculum"` or `"pld"`, as above.
        num_epochs (`int`, *optional*, defaults to `1`):
            Number of epochs the student trains for; sets the slices of `"curriculum"`.
        snapshot_weights (`dict[int, float]`, *optional*):
            With `"uniform"`: a weight per snapshot step, so that a prompt draws among the snapshots that produced one
            of its trajectories with probabilities proportional to their weights (a zero leaves a snapshot out; a
            prompt left with none draws its label). `None`: uniform.
        snapshot_steps (`list[int]`, *optional*):
            With `"uniform"`: every snapshot a trajectory can come from (the history's steps). Default: the snapshots of
            the candidates' trajectories.
        sampled (`set[tuple[int, int]]`, *optional*):
            With `"uniform"`: the `(prompt_index, snapshot_step)` pairs whose trajectories were sampled, when not all of
            them were; a prompt without a trajectory of a pair left out may still draw one ([`missing_pairs`] lists
            those the draws need). Default: every pair was sampled.

    Candidates without `input_ids` (untokenized) make a mixture that plans its draws but cannot be trained on: two-pass
    TMS plans the student's draws this way before any trajectory is tokenized (the draw reads only `prompt_index` and
    `snapshot_step`), so that planning costs no tokenization.
    """

    def __init__(
        self,
        candidates: Dataset,
        label_weight: float,
        seed: int,
        trajectory_choice: str = "uniform",
        num_epochs: int = 1,
        snapshot_weights: dict[int, float] | None = None,
        snapshot_steps: list[int] | None = None,
        sampled: set[tuple[int, int]] | None = None,
    ):
        check_choice("trajectory_choice", trajectory_choice)
        if sampled is not None and trajectory_choice != "uniform":
            raise ValueError(
                f'`trajectory_choice={trajectory_choice!r}` compares all of a prompt\'s trajectories: it needs every one '
                'sampled (`sampled=None`).'
            )
        if snapshot_steps is not None:
            unknown = set(candidates["snapshot_step"]) - {LABEL, REHEARSAL} - set(snapshot_steps)
            if unknown:
                raise ValueError(f"`snapshot_steps` lacks the steps {sorted(unknown)} of the candidates' trajectories.")
        if snapshot_weights is not None:
            check_weighted_draw(trajectory_choice)
            unknown = set(candidates["snapshot_step"]) - {LABEL} - set(snapshot_weights)
            if unknown:
                raise ValueError(f"`snapshot_weights` has no weight for the snapshots of steps {sorted(unknown)}.")
        self.snapshot_weights = snapshot_weights
        self.label_weight = label_weight
        self.seed = seed
        self.trajectory_choice = trajectory_choice
        self.num_epochs = num_epochs
        self.epoch = 0
        self.scores: dict[int, float] | None = None
        self._examples = (
            candidates.select_columns(["input_ids", "labels"]) if "input_ids" in candidates.column_names else None
        )
        self._given_steps = None if snapshot_steps is None else sorted(snapshot_steps)
        self.sampled = sampled
        self._prompt_of = list(candidates["prompt_index"])
        self._step_of = list(candidates["snapshot_step"])
        self.rehearsal_weight = 0.0
        self._rehearsal: list[int] = []  # candidate rows of rehearsal answers
        self._index(keep_steps=None)

    @classmethod
    def from_config(
        cls, candidates: Dataset, args, snapshot_steps: list[int], sampled: set[tuple[int, int]] | None = None
    ) -> MixtureDataset:
        """
        The mixture of `candidates` under a [`TMSConfig`]'s settings, drawing from a history of `snapshot_steps`;
        `sampled`: the (prompt, snapshot) pairs generated, when not all were.
        """
        weights = args.snapshot_weights
        return cls(
            candidates,
            args.label_weight,
            args.seed,
            trajectory_choice=args.trajectory_choice,
            snapshot_weights=None if weights is None else dict(zip(snapshot_steps, weights)),
            snapshot_steps=None if sampled is None else snapshot_steps,
            sampled=sampled,
        )

    def _index(self, keep_steps: set[int] | None) -> None:
        self._label: dict[int, int] = {}
        self._trajectories: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for row, (index, step) in enumerate(zip(self._prompt_of, self._step_of)):
            if step == REHEARSAL:
                continue
            if step == LABEL:
                self._label[index] = row
            elif (keep_steps is None or step in keep_steps) and (
                self.snapshot_weights is None or self.snapshot_weights[step] > 0
            ):
                self._trajectories[index][step].append(row)
        self._trajectories = dict(self._trajectories)
        self.prompt_indices = sorted(set(self._label) | set(self._trajectories))
        self.snapshot_steps = sorted({step for by_step in self._trajectories.values() for step in by_step})
        if not self.prompt_indices:
            raise ValueError("The mixture is empty: no prompt has a label or a trajectory left after preprocessing.")
        # The snapshots of the uniform draw.
        universe = self.snapshot_steps if self._given_steps is None else self._given_steps
        if keep_steps is not None:
            universe = [step for step in universe if step in keep_steps]
        if self.snapshot_weights is not None:
            universe = [step for step in universe if self.snapshot_weights[step] > 0]
        self._draw_steps = universe
        # Prompts that may have a trajectory not sampled yet: they draw as if they had one.
        self._unsampled = set()
        if self.sampled is not None:
            self._unsampled = {
                index for index in self._label if any((index, step) not in self.sampled for step in universe)
            }

    def extend(
        self,
        candidates: Dataset,
        keep_steps: set[int] | None = None,
        snapshot_steps: list[int] | None = None,
        sampled: set[tuple[int, int]] | None = None,
    ) -> None:
        """
        Add tokenized trajectory candidates (online TMS; there may be none) and draw from those of `keep_steps` only
        (default: all). The prompts stay the same, so the length of the dataset does not change under the sampler. A
        mixture that knows which pairs were sampled (`sampled` given to the constructor) takes the snapshots taken so
        far (`snapshot_steps`) and every pair sampled so far (`sampled`): a new snapshot joins the draw before any of
        its trajectories exists, so that [`missing_pairs`] can say which to sample.
        """
        if (snapshot_steps is None) != (sampled is None) or (sampled is not None and self.sampled is None):
            raise ValueError(
                "`snapshot_steps` and `sampled` go together, to a mixture made with `sampled` (drawn-only sampling)."
            )
        if sampled is not None:
            unknown = (set(candidates["snapshot_step"]) if len(candidates) else set()) - set(snapshot_steps)
            if unknown:
                raise ValueError(f"`snapshot_steps` lacks the steps {sorted(unknown)} of the candidates' trajectories.")
            self._given_steps, self.sampled = sorted(snapshot_steps), set(sampled)
        if not len(candidates):
            self._index(keep_steps)
            return
        if {LABEL, REHEARSAL} & set(candidates["snapshot_step"]):
            raise ValueError(
                "`extend` takes trajectories only; the labels are given once, to the constructor, and rehearsal answers "
                "to `add_rehearsal`."
            )
        if not set(candidates["prompt_index"]) <= set(self._label):
            raise ValueError("`extend` got trajectories of prompts that have no label in the mixture.")
        self._examples = concatenate_datasets([self._examples, candidates.select_columns(["input_ids", "labels"])])
        self._prompt_of += list(candidates["prompt_index"])
        self._step_of += list(candidates["snapshot_step"])
        self._index(keep_steps)

    def add_rehearsal(self, candidates: Dataset, weight: float) -> None:
        """
        From now on, draw one of these tokenized rehearsal candidates (uniformly) instead of the prompt's usual draw,
        with probability `weight` (beta). Their `prompt_index` counts the rehearsal prompts, not the training prompts.
        A planning mixture (untokenized candidates) takes untokenized ones: its draws then skip the pairs that a
        rehearsal draw replaces (see [`missing_pairs`]).
        """
        check_rehearsal_weight(weight)
        if not len(candidates):
            raise ValueError(
                "No rehearsal answer is left to train on (all empty, or all cut at the length limit and dropped): raise "
                "`rehearsal_max_new_tokens`, or use other rehearsal prompts."
            )
        start = len(self._prompt_of)
        if self._examples is not None:
            self._examples = concatenate_datasets([self._examples, candidates.select_columns(["input_ids", "labels"])])
        self._prompt_of += list(candidates["prompt_index"])
        self._step_of += [REHEARSAL] * len(candidates)
        self._rehearsal = list(range(start, start + len(candidates)))
        self.rehearsal_weight = weight

    def candidate(self, row: int) -> dict[str, Any]:
        """Candidate `row` (as `draw` returns it): its `input_ids`, `labels`, `prompt_index` and `snapshot_step`."""
        return {**self._example(row), "prompt_index": self._prompt_of[row], "snapshot_step": self._step_of[row]}

    def _example(self, row: int) -> dict[str, Any]:
        if self._examples is None:
            raise ValueError("This mixture was made from untokenized candidates: it plans draws, it cannot be trained on.")
        return self._examples[row]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def trajectory_rows(self) -> list[int]:
        """Candidate rows that are trajectories (not labels), in row order."""
        return sorted(row for by_step in self._trajectories.values() for rows in by_step.values() for row in rows)

    def rows_to_score(self, epoch: int | None = None) -> list[int]:
        """For `"pld"`: the trajectory rows of the prompts that draw a trajectory, not their label, in `epoch`."""
        return sorted(
            row
            for index in self._drawing_trajectories(epoch)
            for rows in self._trajectories[index].values()
            for row in rows
        )

    def set_scores(self, scores: dict[int, float]) -> None:
        """Mean NLL per token of trajectory rows under the current student (at least `rows_to_score()`), for `"pld"`."""
        missing = set(self.rows_to_score()) - set(scores)
        if missing:
            raise ValueError(f"Scores are missing for {len(missing)} trajectory rows (e.g. row {min(missing)}).")
        self.scores = dict(scores)

    def __len__(self) -> int:
        return len(self.prompt_indices)

    def best_rows(self) -> list[int]:
        """For `"pld"`: the lowest-scored trajectory row of each prompt that draws a trajectory in the current epoch."""
        return [self._best_row(self._trajectories[index]) for index in self._drawing_trajectories()]

    def _drawing_trajectories(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else epoch
        return [
            i
            for i in self.prompt_indices
            if i in self._trajectories and self._rehearsal_row(i, epoch) is None and not self._draws_label(i, epoch)[0]
        ]

    def _best_row(self, by_step: dict[int, list[int]]) -> int:
        if self.scores is None:
            raise ValueError('`trajectory_choice="pld"` draws need scores: call `set_scores` first.')
        return min((row for rows in by_step.values() for row in rows), key=lambda row: (self.scores[row], row))

    def draw(self, position: int, epoch: int | None = None) -> tuple[int, bool]:
        """
        The candidate row drawn for the prompt at `position` in `epoch`, and whether it is the label (a rehearsal row,
        see `is_rehearsal`, is not).
        """
        index = self.prompt_indices[position]
        epoch = self.epoch if epoch is None else epoch
        rehearsal = self._rehearsal_row(index, epoch)
        if rehearsal is not None:
            return rehearsal, False
        is_label, rng = self._draws_label(index, epoch)
        if is_label:
            return self._label[index], True
        by_step = self._trajectories.get(index, {})
        if self.trajectory_choice == "pld":
            return self._best_row(by_step), False
        if self.trajectory_choice == "curriculum":
            steps = self._curriculum_steps(sorted(by_step), min(epoch, self.num_epochs - 1))
            step = steps[rng.integers(len(steps))]
        else:
            step = self._uniform_step(index, epoch)
            if step not in by_step:
                raise RuntimeError(
                    f"Prompt {index} draws its trajectory of the snapshot of step {step} in epoch {epoch}, which was "
                    "never sampled: the trajectories were generated for fewer epochs or other mixture settings. "
                    "Generate the pairs `missing_pairs()` lists."
                )
        rows = by_step[step]
        return rows[rng.integers(len(rows))], False

    def _uniform_step(self, index: int, epoch: int) -> int:
        """
        The snapshot prompt `index` draws a trajectory of in `epoch`: among the snapshots that left it a trajectory, or
        were not sampled for it, the one of the largest key (see [`snapshot_key`]). Keys are independent and uniform, so
        this draws uniformly over those snapshots (by `snapshot_weights` if given: key `log(u) / weight`), and a snapshot
        that joins the draw later (online TMS) changes a draw only where its own key is the largest.
        """
        by_step = self._trajectories.get(index, {})
        weights = self.snapshot_weights
        best, best_key = None, -math.inf
        for step in self._draw_steps:
            if step in by_step or (self.sampled is not None and (index, step) not in self.sampled):
                key = snapshot_key(self.seed, epoch, index, step)
                key = key if weights is None else math.log(key) / weights[step]
                if key > best_key:
                    best, best_key = step, key
        return best

    def missing_pairs(
        self, num_epochs: int = 0, first_epoch: int = 0, positions: dict[int, Iterable[int]] | None = None
    ) -> set[tuple[int, int]]:
        """
        The `(prompt_index, snapshot_step)` pairs that the draws of epochs `first_epoch .. num_epochs - 1` (or, given
        `positions`, of the dataset positions `positions[epoch]` of each of its epochs) land on and that were not
        sampled (see `sampled`): sample them (all of the snapshot's samples of the prompt), then ask again with them
        added, since a draw that lands on a pair left without a trajectory draws again (`planning.sample_drawn_pairs`).
        """
        if positions is None:
            positions = {epoch: range(len(self)) for epoch in range(first_epoch, num_epochs)}
        missing = set()
        for epoch, at in positions.items():
            for index in sorted({self.prompt_indices[position] for position in at}):
                if self._rehearsal_row(index, epoch) is not None:
                    continue
                if not self._draws_label(index, epoch)[0]:
                    step = self._uniform_step(index, epoch)
                    if step not in self._trajectories.get(index, {}):
                        missing.add((index, step))
        return missing

    def _rehearsal_row(self, index: int, epoch: int) -> int | None:
        """The rehearsal row prompt `index` draws in `epoch` instead of its usual draw, or None."""
        if not self._rehearsal or self.rehearsal_weight == 0.0:
            return None
        rng = np.random.default_rng([self.seed, epoch, index, REHEARSAL_STREAM])
        if rng.random() >= self.rehearsal_weight:
            return None
        return self._rehearsal[rng.integers(len(self._rehearsal))]

    def is_rehearsal(self, row: int) -> bool:
        """Whether candidate `row` is a rehearsal answer."""
        return self._step_of[row] == REHEARSAL

    def _draws_label(self, index: int, epoch: int) -> tuple[bool, np.random.Generator]:
        """Whether prompt `index` draws its label in `epoch`, and the random stream its trajectory draw continues."""
        rng = np.random.default_rng([self.seed, epoch, index])
        if index not in self._label:
            return False, rng
        has_trajectories = index in self._trajectories or index in self._unsampled
        return not has_trajectories or rng.random() < self.label_weight, rng

    def _curriculum_steps(self, steps: list[int], epoch: int) -> list[int]:
        """The prompt's snapshots within the epoch's slice of all snapshots, else (empty trajectories) the nearest."""
        window = _slice(self.snapshot_steps, epoch, self.num_epochs)
        inside = [step for step in steps if step in window]
        if inside:
            return inside
        rank = {step: i for i, step in enumerate(self.snapshot_steps)}
        middle = (rank[window[0]] + rank[window[-1]]) / 2
        return [min(steps, key=lambda step: (abs(rank[step] - middle), step))]

    def label_fraction(self, epoch: int | None = None) -> float:
        """Fraction of prompts that draw their label in `epoch`."""
        return float(np.mean([self.draw(position, epoch)[1] for position in range(len(self))]))

    def rehearsal_fraction(self, epoch: int | None = None) -> float:
        """Fraction of prompts whose draw in `epoch` is a rehearsal answer."""
        return float(np.mean([self.is_rehearsal(self.draw(position, epoch)[0]) for position in range(len(self))]))

    def __getitem__(self, position: int) -> dict[str, Any]:
        row, is_label = self.draw(position)
        example = self._example(row)
        item = {"input_ids": example["input_ids"], "labels": example["labels"], IS_LABEL: is_label}
        if self._rehearsal:
            item[IS_REHEARSAL] = self.is_rehearsal(row)
        return item


class MixtureCollator:
    """
    Wraps the SFT collator: collates the tokens as usual and carries the per-example flags (`FLAGS`: label, rehearsal)
    along as tensors. Examples without flags (evaluation batches) pass straight through.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        names = [name for name in FLAGS if name in examples[0]]
        flags = {name: [example.pop(name) for example in examples] for name in names}
        batch = self.collator(examples)
        for name, values in flags.items():
            batch[name] = torch.tensor(values, dtype=torch.float32)
        return batch


class MixtureCallback(TrainerCallback):
    """
    Keeps a [`MixtureDataset`] in step with the Trainer that trains on it: its number of epochs when training begins,
    and its epoch at each epoch's start (not left to accelerate, whose `set_epoch` does not reach the dataset behind a
    multi-process sampler), optionally scoring the trajectories before each epoch's draw.

    Args:
        mixture ([`MixtureDataset`]):
            The training dataset.
        log (`Callable`):
            `log(logs)`: how to log (the trainer's `log_event`).
        begin_logs (`dict[str, float]`, *optional*):
            Logged when training begins: what the mixture is made of.
        score (`Callable`, *optional*):
            `score() -> logs`: run at each epoch's start, once the epoch is set (`trajectory_choice="pld"`).
    """

    def __init__(self, mixture: MixtureDataset, log, begin_logs: dict[str, float] | None = None, score=None):
        self.mixture = mixture
        self.log = log
        self.begin_logs = begin_logs
        self.score = score

    def on_train_begin(self, args, state, control, **kwargs):
        self.mixture.num_epochs = state.num_train_epochs
        if self.begin_logs:
            self.log(dict(self.begin_logs))

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Floor with a margin: `state.epoch` is a float sum (0.9999...) at an epoch's start, and 1.5 when a run resumes
        # in the middle of its second epoch.
        self.mixture.set_epoch(math.floor(state.epoch + 1e-6))
        if self.score is not None:
            self.log(self.score())
