"""Prompts and labels: the one place that knows the dataset formats TMS accepts.

TMS needs a prompt to generate from and a reference label to mix in, so every accepted format is brought to TRL's
prompt-completion form (standard or conversational) before anything else sees it.
"""

from __future__ import annotations

import json
from typing import Any

from datasets import Dataset, IterableDataset
from trl.data_utils import _tokenize, is_conversational, is_conversational_from_value, maybe_convert_to_chatml

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
