"""Prompts and labels: the one place that knows the dataset formats TMS accepts.

TMS needs a prompt to generate from and a reference label to mix in, so every accepted format is brought to TRL's
prompt-completion form (standard or conversational) before anything else sees it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, IterableDataset
from transformers.utils import logging
from trl.data_utils import _tokenize, is_conversational, is_conversational_from_value, maybe_convert_to_chatml


logger = logging.get_logger(__name__)

_NO_PROMPT_HELP = (
    "TMS generates completions from the dataset's prompts, so it needs a prompt-completion dataset "
    '(columns "prompt" and "completion", standard or conversational) or a conversational "messages" dataset whose '
    "last turn is the assistant's answer."
)


def to_prompt_completion(dataset: Dataset | dict[str, Dataset] | None, name: str = "train"):
    """
    Bring a dataset to TRL's prompt-completion form, raising a clear error when it carries no prompts or labels.

    Args:
        dataset ([`~datasets.Dataset`]):
            A prompt-completion dataset (returned as is), a conversational `"messages"` (or ShareGPT
            `"conversations"`) dataset, whose last assistant turn becomes the completion.
        name (`str`, *optional*, defaults to `"train"`):
            Name of the dataset, used in error messages.

    Returns:
        [`~datasets.Dataset`]: The dataset with `"prompt"` and `"completion"` columns (a dict of datasets, such as an
        `eval_dataset`, gives a dict of them; `None` gives `None`).
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {key: to_prompt_completion(value, f"{name} ({key})") for key, value in dataset.items()}
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"The {name} dataset is an `IterableDataset`. TMS generates trajectories for every training prompt before "
            "the student run, so it needs a map-style `datasets.Dataset`; materialise it with "
            "`Dataset.from_generator` or `load_dataset(..., streaming=False)`."
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"The {name} dataset must be a `datasets.Dataset`, got `{type(dataset).__name__}`.")
    if len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty.")

    columns = set(dataset.column_names)
    if "conversations" in columns and is_conversational_from_value(dataset[0]):
        dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations", desc=f"Converting {name} to ChatML")
        columns = set(dataset.column_names)

    if "prompt" in columns and "completion" in columns:
        _check_labels(dataset, name)
        return dataset
    if "messages" in columns:
        dataset = dataset.map(_split_last_turn, fn_kwargs={"name": name}, remove_columns="messages")
        _check_labels(dataset, name)
        return dataset
    if "prompt" in columns:
        raise ValueError(
            f'The {name} dataset has a "prompt" column but no "completion" column: TMS needs a reference label per '
            'prompt (for the harvest run, the mixture and PLD). Add a "completion" column.'
        )
    found = ", ".join(sorted(columns))
    raise ValueError(f"The {name} dataset has no prompts (columns: {found}). {_NO_PROMPT_HELP}")


def _split_last_turn(example: dict[str, Any], name: str) -> dict[str, Any]:
    messages = example["messages"]
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise ValueError(
            f'Every "messages" example of the {name} dataset must end with an assistant turn (the label) that follows '
            f"at least one earlier turn (the prompt); found roles {[m.get('role') for m in messages]}."
        )
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _check_labels(dataset: Dataset, name: str) -> None:
    for index, completion in enumerate(dataset["completion"]):
        text = completion if isinstance(completion, str) else "".join(str(m.get("content") or "") for m in completion)
        if not text.strip():
            raise ValueError(
                f"Example {index} of the {name} dataset has an empty completion. Every prompt needs a non-empty "
                "reference label; drop or fix these examples first."
            )


def prompt_token_ids(tokenizer, example: dict[str, Any], chat_template: str | None = None) -> list[int]:
    """
    Token ids of an example's prompt, exactly as the SFT preprocessing tokenizes it (generation prompt included for
    conversational examples), so that a trajectory continues the context the student is trained on.
    """
    if is_conversational(example):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        return _tokenize(
            tokenizer,
            example["prompt"],
            add_generation_prompt=True,
            chat_template=chat_template,
            tools=tools,
            **example.get("chat_template_kwargs", {}),
        )["input_ids"]
    return _tokenize(tokenizer, example["prompt"], chat_template=chat_template)["input_ids"]


def as_completion(text: str, conversational: bool) -> str | list[dict[str, str]]:
    """A generated text in the same form as the dataset's completions."""
    return [{"role": "assistant", "content": text}] if conversational else text


def completion_text(completion) -> str:
    """The text of a completion, standard (a string) or conversational (a list of messages)."""
    return completion if isinstance(completion, str) else "".join(str(m.get("content") or "") for m in completion)


def is_chat(value) -> bool:
    """Whether `value` is a non-empty list of chat messages (`{"role": ..., "content": ...}`)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def as_prompt_rows(prompts, purpose: str, completions: bool = True) -> list[dict]:
    """
    User-given prompts (the forgetting meter's, the rehearsal's) as rows with a `prompt` (text or messages) and, where
    given and `completions` allows it, a `completion`; a clear error for anything else.

    Args:
        prompts (`list[str]`, `list[list[dict]]` or [`~datasets.Dataset`]):
            Texts, conversations, or a dataset with a `prompt` column (and optionally a `completion` column).
        purpose (`str`):
            What the prompts are for (`"meter"`, `"rehearsal"`), named in error messages.
        completions (`bool`, *optional*, defaults to `True`):
            Whether a dataset may carry a `completion` column (reference answers given by the user).
    """
    if hasattr(prompts, "column_names"):
        if "prompt" not in prompts.column_names:
            extra = " and may have a `completion` column of reference answers" if completions else ""
            raise ValueError(
                f"A dataset of {purpose} prompts needs a `prompt` column (text or a list of messages){extra}; got "
                f"columns {prompts.column_names}."
            )
        if "completion" in prompts.column_names and not completions:
            raise ValueError(
                f"The {purpose} prompts come with a `completion` column, but their answers are generated by the initial "
                "model: pass the prompts alone (to train on answers of your own, add them to the training dataset)."
            )
        rows = [{"prompt": row["prompt"], **({"completion": row["completion"]} if "completion" in row else {})}
                for row in prompts]
    elif isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"The {purpose} prompts must be a list of prompts (strings or lists of chat messages) or a dataset with a "
            f"`prompt` column, got {type(prompts).__name__}."
        )
    else:
        rows = [{"prompt": prompt} for prompt in prompts]
    if not rows:
        raise ValueError(f"The {purpose} prompts are empty: give at least one prompt.")
    for n, row in enumerate(rows):
        prompt = row["prompt"]
        is_text = isinstance(prompt, str) and prompt.strip()
        if not (is_text or is_chat(prompt)):
            raise ValueError(
                f"The {purpose} prompt {n} is {prompt!r}: each prompt must be non-empty text or a list of chat messages "
                "({'role': ..., 'content': ...})."
            )
        if "completion" in row and not (isinstance(row["completion"], str) or is_chat(row["completion"])):
            raise ValueError(
                f"The reference completion of {purpose} prompt {n} is {row['completion']!r}: give text or a list of "
                "chat messages, for every prompt or for none."
            )
    return rows


def check_label_tokens_left(kept: int, total: int, max_length: int | None) -> None:
    """TRL silently drops examples whose label was truncated away; say so, and refuse when none is left."""
    if kept == total:
        return
    message = (
        f"{total - kept} of {total} training examples have no label tokens left after truncation to "
        f"`max_length={max_length}` (their prompts are that long or longer)"
    )
    if kept == 0:
        raise ValueError(f"{message}, so there is nothing to train on. Raise `max_length` or shorten the prompts.")
    logger.warning(f"{message}: they are left out of both phases. Raise `max_length` to keep them.")
