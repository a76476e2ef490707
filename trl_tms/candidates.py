"""The candidates: every completion a prompt may train on (its label, its kept trajectories, rehearsal answers),
tokenized, and what the trajectories held (`TrajectoryStats`). The draw among them is `mixture.py`'s."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from accelerate.utils import broadcast_object_list
from datasets import Dataset

from .data import as_completion, completion_text
from .filters import keep_flags, kept_by_snapshot
from .rehearsal import rehearsal_candidates

LABEL = -1  # `snapshot_step` of a reference label among the candidates
_CARRIED = ("tools", "chat_template_kwargs")


def mixture_candidates(
    dataset: Dataset, trajectories: Dataset | None, with_labels: bool = True, keep: list[bool] | None = None
) -> tuple[Dataset, int]:
    """
    Every completion a prompt can be trained on, in prompt-completion form: its reference label
    (`snapshot_step == -1`, unless `with_labels=False`) and its non-empty trajectories (if any) that `keep` lets
    through (one flag per trajectory, see [`keep_flags`]; default: all). A `finished` column says whether each one
    ended by itself (labels do).

    Returns:
        `tuple[Dataset, int]`: The candidates and the number of empty trajectories left out.
    """
    conversational = not isinstance(dataset[0]["completion"], str)
    carried = [c for c in _CARRIED if c in dataset.column_names]
    rows: dict[str, list[Any]] = defaultdict(list)

    def add(index: int, completion, step: int, finished: bool = True) -> None:
        example = dataset[index]
        rows["prompt_index"].append(index)
        rows["snapshot_step"].append(step)
        rows["finished"].append(finished)
        rows["prompt"].append(example["prompt"])
        rows["completion"].append(completion)
        for column in carried:
            rows[column].append(example[column])

    if with_labels:
        for index, completion in enumerate(dataset["completion"]):
            add(index, completion, LABEL)
    empty = 0
    if trajectories is None:
        return Dataset.from_dict(dict(rows)), empty
    keep = [True] * len(trajectories) if keep is None else keep
    if len(keep) != len(trajectories):
        raise ValueError(f"`keep` has {len(keep)} flags for {len(trajectories)} trajectories.")
    finished = trajectories["finished"] if "finished" in trajectories.column_names else [True] * len(trajectories)
    for index, step, text, ended, kept in zip(
        trajectories["prompt_index"], trajectories["snapshot_step"], map(completion_text, trajectories["completion"]), finished, keep
    ):
        if not text.strip():
            empty += 1
        elif kept:
            add(index, as_completion(text, conversational), step, bool(ended))
    return Dataset.from_dict(dict(rows)), empty


def is_label_copy(completion, label) -> bool:
    """Whether a completion is the label word for word (whitespace aside); either may be a string or chat messages."""
    return completion_text(completion).split() == completion_text(label).split()


def label_copies(trajectories: Dataset, dataset: Dataset, keep: list[bool]) -> int:
    """
    How many of the kept trajectories are their prompt's label word for word ([`is_label_copy`]). Where most are, the
    student trains on what SFT trains on, and drifts as SFT does: the policy that wrote them has learned the labels.
    """
    labels = dataset["completion"]
    return sum(
        kept and is_label_copy(completion, labels[index])
        for index, completion, kept in zip(trajectories["prompt_index"], trajectories["completion"], keep)
    )


def end_of_turn_ids(tokenize, prompt) -> list[int]:
    """
    The tokens the SFT preprocessing appends after a completion's text (end of turn, EOS): the common tail of two
    one-word completions of `prompt`, tokenized by `tokenize` (a dataset of prompt-completion rows -> the same rows
    with `input_ids`).
    """
    conversational = not isinstance(prompt, str)
    probes = Dataset.from_dict(
        {"prompt": [prompt, prompt], "completion": [as_completion(" yes", conversational), as_completion(" no", conversational)]}
    )
    first, second = tokenize(probes)["input_ids"]
    if first == second:  # the probe's end was cut away
        return []
    tail = 0
    while tail < min(len(first), len(second)) and first[-1 - tail] == second[-1 - tail]:
        tail += 1
    return list(first[len(first) - tail :]) if tail else []


def truncate_unfinished(candidates: Dataset, end_ids: list[int]) -> Dataset:
    """
    Tokenized candidates in which every trajectory that did not end by itself (`finished` False) loses its trailing
    `end_ids`, so the student is not trained to stop where the length limit cut it. A row already cut by `max_length`
    (it does not end with them) is left as it is.
    """
    if not end_ids or all(candidates["finished"]):
        return candidates
    n = len(end_ids)

    def strip(example):
        if example["finished"] or list(example["input_ids"][-n:]) != end_ids:
            return {}
        return {"input_ids": example["input_ids"][:-n], "labels": example["labels"][:-n]}

    return candidates.map(strip, desc="Removing end tokens from unfinished trajectories")


@dataclass
class TrajectoryStats:
    """
    What the student's trajectories are made of: how many were generated (and in how many seconds), left out empty,
    cut at `max_new_tokens`, and kept by the filters, overall and per snapshot; and how many were not sampled because
    no draw landed on them.
    """

    trajectories: int = 0
    empty: int = 0
    unfinished: int = 0
    kept: int = 0
    label_copies: int = 0  # kept trajectories that are their prompt's label word for word: SFT's target, not the policy's
    seconds: float = 0.0
    kept_fraction: dict[int, float] = field(default_factory=dict)  # snapshot step -> kept fraction
    by_snapshot: dict[int, int] = field(default_factory=dict)  # snapshot step -> trajectories (weighs `kept_fraction`)
    rehearsal: int = 0  # rehearsal answers the student may draw (self-rehearsal)
    rehearsal_empty: int = 0
    rehearsal_unfinished: int = 0
    rehearsal_seconds: float = 0.0
    not_sampled: int = 0  # trajectories no draw landed on, so never sampled (`trajectories_to_generate="drawn"`)

    def add(self, other: TrajectoryStats) -> None:
        """Count `other`'s trajectories too (online TMS: one snapshot at a time)."""
        self.trajectories += other.trajectories
        self.empty += other.empty
        self.unfinished += other.unfinished
        self.kept += other.kept
        self.label_copies += other.label_copies
        self.seconds += other.seconds
        # Online TMS sampling only the drawn pairs meets a snapshot's trajectories over several refreshes.
        for step, fraction in other.kept_fraction.items():
            mine, theirs = self.by_snapshot.get(step, 0), other.by_snapshot.get(step, 0)
            if step in self.kept_fraction and mine + theirs:
                fraction = (self.kept_fraction[step] * mine + fraction * theirs) / (mine + theirs)
            self.kept_fraction[step] = fraction
            self.by_snapshot[step] = mine + theirs
        self.rehearsal += other.rehearsal
        self.rehearsal_empty += other.rehearsal_empty
        self.rehearsal_unfinished += other.rehearsal_unfinished
        self.rehearsal_seconds += other.rehearsal_seconds
        self.not_sampled += other.not_sampled

    def as_dict(self) -> dict[str, float]:
        """Flat, as logged (with a `tms_` prefix) and written by the benchmarks."""
        return {
            "trajectories": self.trajectories,
            "empty_trajectories": self.empty,
            "unfinished_trajectories": self.unfinished,
            "kept_trajectories": self.kept,
            "label_copy_trajectories": self.label_copies,
            "trajectory_seconds": self.seconds,
            **{f"kept_fraction_step_{step}": fraction for step, fraction in self.kept_fraction.items()},
            **({"trajectories_not_sampled": self.not_sampled} if self.not_sampled else {}),
            **(
                {
                    "rehearsal_answers": self.rehearsal,
                    "rehearsal_empty": self.rehearsal_empty,
                    "rehearsal_unfinished": self.rehearsal_unfinished,
                    "rehearsal_seconds": self.rehearsal_seconds,
                }
                if self.rehearsal or self.rehearsal_empty
                else {}
            ),
        }


class CandidateBuilder:
    """
    Turns trajectories into the tokenized candidates the student may draw: the flags of [`keep_flags`] (unfinished
    trajectories dropped, the optional filter), [`mixture_candidates`], the SFT preprocessing (`tokenize`), and, with
    `unfinished="truncate"`, [`truncate_unfinished`].

    Args:
        prompts ([`~datasets.Dataset`]):
            The prompt-completion training set.
        tokenize (`Callable`):
            `tokenize(candidates, name) -> tokenized candidates`: the trainer's SFT preprocessing.
        unfinished, trajectory_filter, verifier, min_verifier_score, answer_extractor:
            As for [`keep_flags`].
        process_index (`int`, *optional*, defaults to `0`) and num_processes (`int`, *optional*, defaults to `1`):
            With several processes, the main one (`process_index == 0`) alone runs the filters (the verifier, the answer
            extractor) and sends its flags to the others, so that every process keeps the same trajectories.
    """

    def __init__(
        self,
        prompts: Dataset,
        tokenize,
        *,
        unfinished: str = "truncate",
        process_index: int = 0,
        num_processes: int = 1,
        **filter_options,
    ):
        self.prompts = prompts
        self.tokenize = tokenize
        self.unfinished = unfinished
        self.process_index, self.num_processes = process_index, num_processes
        self.filter_options = filter_options
        self._end_of_turn: dict[bool, list[int]] = {}  # by conversational form

    def build(self, trajectories: Dataset | None, with_labels: bool = True) -> tuple[Dataset, TrajectoryStats]:
        """The tokenized candidates (the labels too, unless `with_labels=False`) and what the trajectories held."""
        if trajectories is None:
            return self._tokenized(mixture_candidates(self.prompts, None)[0], "mixture"), TrajectoryStats()
        candidates, empty, keep = self._candidates(trajectories, with_labels)
        counts = TrajectoryStats(
            trajectories=len(trajectories),
            empty=empty,
            unfinished=len(trajectories) - sum(trajectories["finished"]),
            kept=sum(keep),
            label_copies=label_copies(trajectories, self.prompts, keep),
            kept_fraction=kept_by_snapshot(trajectories, keep),
            by_snapshot=dict(Counter(trajectories["snapshot_step"])),
        )
        if len(candidates):
            candidates = self._tokenized(candidates, "mixture" if with_labels else "trajectories")
        return candidates, counts

    def untokenized(self, trajectories: Dataset | None) -> Dataset:
        """The labels and the trajectories the student may draw, before tokenization: enough to plan the draws."""
        if trajectories is None or not len(trajectories):
            return mixture_candidates(self.prompts, None)[0]
        return self._candidates(trajectories, with_labels=True)[0]

    def _candidates(self, trajectories: Dataset, with_labels: bool) -> tuple[Dataset, int, list[bool]]:
        keep = self.keep_flags(trajectories)
        candidates, empty = mixture_candidates(self.prompts, trajectories, with_labels=with_labels, keep=keep)
        return candidates, empty, keep

    def keep_flags(self, trajectories: Dataset) -> list[bool]:
        """[`keep_flags`] of `trajectories`, decided by the main process for every process."""
        keep = None
        if self.process_index == 0:
            keep = keep_flags(trajectories, self.prompts, unfinished=self.unfinished, **self.filter_options)
        if self.num_processes > 1:
            # A verifier may not answer the same everywhere (a sampled judge, a remote call that times out). Every
            # process plans the pairs to sample from these flags, and sampling is a collective: flags that differ would
            # leave the processes waiting for each other. One process decides.
            keep = broadcast_object_list([keep])[0]
        return keep

    def build_rehearsal(self, answers: Dataset) -> tuple[Dataset, TrajectoryStats]:
        """
        The tokenized rehearsal candidates from the initial model's answers (empty ones left out; unfinished ones
        handled as `unfinished` says for trajectories), and their counts.
        """
        candidates, empty = rehearsal_candidates(answers)
        counts = TrajectoryStats(
            rehearsal_empty=empty, rehearsal_unfinished=len(candidates) - sum(candidates["finished"])
        )
        if self.unfinished == "drop":
            candidates = candidates.filter(bool, input_columns="finished", keep_in_memory=True)
        counts.rehearsal = len(candidates)
        if len(candidates):
            candidates = self._tokenized(candidates, "rehearsal")
        return candidates, counts

    def _tokenized(self, candidates: Dataset, name: str) -> Dataset:
        tokenized = self.tokenize(candidates, name)
        if self.unfinished != "truncate":
            return tokenized
        conversational = not isinstance(candidates[0]["prompt"], str)
        if conversational not in self._end_of_turn:
            # The shortest prompt, so that `max_length` cannot cut the probe's end: of the training set when the
            # candidates share its form (trajectories), else of the candidates (rehearsal answers).
            same_form = conversational == (not isinstance(self.prompts[0]["prompt"], str))
            shortest = min((self.prompts if same_form else candidates)["prompt"], key=lambda p: len(str(p)))
            self._end_of_turn[conversational] = end_of_turn_ids(
                lambda probes: self.tokenize(probes, "end-of-turn probe"), shortest
            )
        return truncate_unfinished(tokenized, self._end_of_turn[conversational])
