"""Which trajectories the student may train on: unfinished ones, and the optional answer filters.

Sits between the trajectories and the mixture. Every function here returns one flag per trajectory; the mixture leaves
out the flagged-off ones, and a prompt left without any trajectory trains on its label.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from datasets import Dataset

from .config import check_choice
from .data import completion_text

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_final_number(text: str | None) -> str | None:
    """
    The final numeric answer of a completion: the number after the last `####` if there is one, otherwise the last
    number in the text. Thousands separators are dropped and `8.0` becomes `8`.

    Returns:
        `str` or `None`: The normalised number, or `None` when the text holds no number.
    """
    if not text:
        return None
    if "####" in text:
        after = _NUMBER.findall(text.rsplit("####", 1)[1])
        if after:
            return _normalise(after[0])
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def _normalise(number: str) -> str:
    number = number.replace(",", "")
    try:
        value = Decimal(number)
    except InvalidOperation:
        return number
    if value == value.to_integral_value():
        return str(int(value))  # exact, however long: "8.0" -> "8"
    return format(value.normalize(), "f")  # "2.50" -> "2.5"


def same_final_number(prompt, completion: str, label: str) -> bool:
    """The default verifier: whether the final numbers of `completion` and of the reference `label` are equal."""
    predicted, expected = extract_final_number(completion), extract_final_number(str(label))
    if predicted is None or expected is None:
        return False
    try:
        return abs(float(predicted) - float(expected)) < 1e-6
    except ValueError:
        return predicted == expected


def keep_flags(
    trajectories: Dataset,
    dataset: Dataset,
    *,
    unfinished: str = "truncate",
    trajectory_filter: str = "none",
    verifier: Callable | None = None,
    min_verifier_score: float = 0.5,
    answer_extractor: Callable[[str], str | None] | None = None,
) -> list[bool]:
    """
    One flag per trajectory: whether the student may draw it (never an empty one).

    Args:
        trajectories ([`~datasets.Dataset`]):
            Rows with `prompt_index`, `completion` and `finished` (as [`generate_trajectories`] returns them).
        dataset ([`~datasets.Dataset`]):
            The prompt-completion training set the trajectories answer (`prompt_index` indexes it).
        unfinished (`str`, *optional*, defaults to `"truncate"`):
            `"drop"` leaves out the trajectories cut at `max_new_tokens` before any filter sees them; `"truncate"` and
            `"keep"` keep them here (how their end is trained on is the mixture's business).
        trajectory_filter (`str`, *optional*, defaults to `"none"`):
            `"none"`; `"self_consistency"`: keep a prompt's trajectories whose extracted answer is the most frequent
            one among its trajectories, if at least two agree on it and no other answer is as frequent; `"verifier"`:
            keep the trajectories whose `verifier(prompt, completion, label)` score reaches `min_verifier_score`.
        verifier (`Callable`, *optional*):
            `(prompt, completion_text, label_text) -> bool | float`. Defaults to [`same_final_number`].
        min_verifier_score (`float`, *optional*, defaults to `0.5`):
            Lowest score kept (`True` counts as 1, `False` as 0).
        answer_extractor (`Callable`, *optional*):
            `completion_text -> answer or None`, for `"self_consistency"`. Defaults to [`extract_final_number`].
    """
    check_choice("unfinished_trajectories", unfinished)
    check_choice("trajectory_filter", trajectory_filter)
    texts = [completion_text(c) for c in trajectories["completion"]]
    keep = [bool(text.strip()) for text in texts]  # an empty trajectory has nothing to train on
    if unfinished == "drop":
        keep = [k and bool(f) for k, f in zip(keep, trajectories["finished"])]
    if trajectory_filter == "none":
        return keep
    indices = trajectories["prompt_index"]
    if trajectory_filter == "verifier":
        verifier = verifier or same_final_number
        prompts, labels = dataset["prompt"], [completion_text(c) for c in dataset["completion"]]
        for row, (index, text) in enumerate(zip(indices, texts)):
            if keep[row]:
                score = verifier(prompts[index], text, labels[index])
                keep[row] = float(score) >= min_verifier_score
        return keep
    extract = answer_extractor or extract_final_number
    answers = [extract(text) if k else None for text, k in zip(texts, keep)]
    votes: dict[int, Counter] = defaultdict(Counter)
    for index, answer in zip(indices, answers):
        if answer is not None:
            votes[index][answer] += 1
    winner = {}
    for index, counter in votes.items():
        ranked = counter.most_common(2)
        if ranked[0][1] >= 2 and (len(ranked) == 1 or ranked[1][1] < ranked[0][1]):
            winner[index] = ranked[0][0]
    return [k and a is not None and winner.get(i) == a for i, a, k in zip(indices, answers, keep)]


def kept_by_snapshot(trajectories: Dataset, keep: list[bool]) -> dict[int, float]:
    """The fraction of each snapshot's trajectories that `keep` lets through, by snapshot step."""
    totals, kept = Counter(), Counter()
    for step, k in zip(trajectories["snapshot_step"], keep):
        totals[step] += 1
        kept[step] += int(k)
    return {step: kept[step] / totals[step] for step in sorted(totals)}
