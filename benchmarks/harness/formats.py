"""
How a regime's prompts are written: `"chat"` for a model with a chat template (the tasks' conversational
prompt-completion rows, as they are loaded) or `"plain"` for a base model without one.

The plain format is standard (non-conversational) prompt-completion text: the prompt `"Question: {question}\nAnswer:"`
and the completion `" {worked answer}"`, to which `SFTTrainer` (and so `TMSTrainer`) appends the end-of-sequence
token. A base model's greedy continuation may not end there and run on into a question of its own: its answer is the
text before the first line that starts a new `"Question:"` (`answer_part`), both for scoring and for the everyday
answers the chat-KL probe compares against.
"""

from __future__ import annotations

PLAIN_PROMPT = "Question: {question}\nAnswer:"
NEXT_QUESTION = "\nQuestion:"
FORMATS = ("chat", "plain")


def _check(prompt_format: str) -> None:
    if prompt_format not in FORMATS:
        raise ValueError(f"Unknown prompt format {prompt_format!r}: use one of {FORMATS}.")


def plain_prompt(question: str) -> str:
    return PLAIN_PROMPT.format(question=question.strip())


def text_of(completion) -> str:
    """A completion's text, whether conversational (a list of messages) or plain."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def in_format(dataset, prompt_format: str):
    """A task split (conversational prompt-completion rows, as `tasks.load_task` returns them) in `prompt_format`."""
    _check(prompt_format)
    if prompt_format == "chat":
        return dataset
    return dataset.map(lambda row: {"prompt": plain_prompt(row["prompt"][-1]["content"]),
                                    "completion": " " + text_of(row["completion"])})


def answer_part(text: str) -> str:
    """The answer in a plain continuation: the text before a line that starts a new question."""
    return text.split(NEXT_QUESTION, 1)[0]


def verifier(prompt_format: str):
    """`is_correct(text, answer)` for a greedy answer in `prompt_format` (the final number of the answer part)."""
    from trl_tms.probes.embedded import is_correct

    _check(prompt_format)
    if prompt_format == "chat":
        return is_correct
    return lambda text, answer: is_correct(answer_part(text), answer)


def answer_stop(tokenizer, prompt_format: str):
    """
    `stop(token_ids)` for greedy decoding in `prompt_format`: a plain answer is done once its text starts a new
    question (all that is read of it comes before; a base model rarely ends its answer itself). `None` for chat, whose
    answers end with the end-of-turn token.
    """
    _check(prompt_format)
    if prompt_format == "chat":
        return None
    return lambda ids: NEXT_QUESTION in tokenizer.decode(ids)


def question_ids(tokenizer, question: str) -> list[int]:
    """Token ids of an everyday question in the plain format (with the tokenizer's special tokens: Gemma's `<bos>`)."""
    return tokenizer(plain_prompt(question))["input_ids"]


def label_ids(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """A plain row's prompt ids and its completion's ids as `SFTTrainer` trains on them (the end token appended)."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    full = tokenizer(row["prompt"] + row["completion"])["input_ids"]
    return prompt, list(full[len(prompt):]) + [tokenizer.eos_token_id]


def cut_at_next_question(tokenizer, answer: list[int]) -> list[int]:
    """
    The tokens of a plain greedy answer up to where its text starts a new question: the longest prefix whose text
    stays within `answer_part` (the whole answer when it never asks one; at least one token, so that every answer has
    a KL to average).
    """
    text = tokenizer.decode(answer)
    kept = answer_part(text)
    if kept == text:
        return list(answer)
    cut = 0
    for k in range(1, len(answer) + 1):
        if not kept.startswith(tokenizer.decode(answer[:k])):
            break
        cut = k
    return list(answer[:max(cut, 1)])
