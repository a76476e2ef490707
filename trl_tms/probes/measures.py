"""
Measuring what a fine-tune learned and what it forgot, item by item so that two models compare with paired errors:

- target accuracy: greedy answers to held-out task prompts, scored by a verifier (`target_accuracy`);
- behaviour drift on everyday chat prompts (`GENERAL_PROMPTS`): mean per-token KL(initial || model) over the initial
  model's own greedy answers, and the model's NLL of them (`chat_drift`);
- per-token NLL of general text (`text_nll`; the WikiText slice is read by `readers.load_wikitext`), and
  multiple choice by log-likelihood (`multiple_choice`, for the benchmarks' PIQA and SIQA).

The quickstart's side-by-side summary and the benchmarks' probe suite (`benchmarks/harness/probes.py`) both use
these.
"""

from __future__ import annotations

import math

import torch

from ..data import prompt_token_ids
from ..generation import greedy_answers

# Everyday instructions for the behaviour-drift probe, written for this project: none is about counting or arithmetic.
GENERAL_PROMPTS = [
    "Give me three tips for sleeping better.",
    "How do I boil an egg?",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "What is the capital of France?",
    "Explain what a rainbow is to a child.",
    "Suggest a name for a small bakery.",
    "What should I pack for a weekend camping trip?",
    "How can I be more productive when working from home?",
    "Write a haiku about autumn.",
    "What is the difference between weather and climate?",
    "Recommend a good habit to start this month.",
    "How do I politely decline an invitation?",
    "Describe the taste of a lemon.",
    "Why do cats purr?",
    "Give me a simple recipe for a salad.",
    "What are the benefits of reading books?",
    "How do I clean a wooden table?",
    "Write one sentence encouraging a friend before an exam.",
    "What is photosynthesis?",
    "How can I save money on groceries?",
    "Tell me a fun fact about the ocean.",
    "What should I do if I feel stressed?",
    "Explain how to make a cup of tea.",
    "Why is exercise important?",
    "Write a short poem about the moon.",
    "What is a good way to learn a new language?",
    "How do plants grow from seeds?",
    "Describe a sunny day at the beach.",
    "What are some ways to reduce plastic waste?",
    "How do I write a good email subject line?",
    "What is the tallest mountain in the world?",
    "Give me advice for a job interview.",
    "Why do leaves change colour in the fall?",
    "How do I make my bed neatly?",
    "What is the role of the heart in the body?",
    "Suggest an activity for a rainy afternoon.",
    "How do I take care of a houseplant?",
    "What makes a good friend?",
    "Explain what the internet is in simple words.",
    "Write a short birthday message for my sister.",
    "What is the sun made of?",
    "How should I prepare for a long flight?",
    "What are some healthy breakfast ideas?",
    "Why do we need to drink water?",
    "Give me tips for keeping a tidy desk.",
    "What is a volcano?",
    "How can I be a better listener?",
    "Describe the sound of rain.",
]


# Scoring


def _padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int = 32) -> list[list[float]]:
    """Per-token log-probabilities of each continuation given its context, for `(context_ids, continuation_ids)`."""
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results: list[list[float] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in rows]
        ids, mask = _padded(seqs, tokenizer.pad_token_id, model.device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for r, i in enumerate(rows):
            ctx, cont = pairs[i]
            results[i] = logp[r, len(ctx) - 1 : len(ctx) - 1 + len(cont)].tolist()
    return results


def multiple_choice(model, tokenizer, items: list[dict], batch_size: int = 32) -> dict:
    """
    Log-likelihood multiple choice: the option whose tokens are most likely after the context wins (`acc`, summed
    log-probability, as lm-eval's `acc`). The context is tokenized with the tokenizer's special tokens (a model trained
    to see `<bos>` first, as Gemma, is far off without it). Returns the accuracy and the per-item correctness.
    """
    pairs, owners = [], []
    for n, item in enumerate(items):
        context = tokenizer(item["context"])["input_ids"]
        for option in item["options"]:
            pairs.append((context, tokenizer(" " + option, add_special_tokens=False)["input_ids"]))
            owners.append(n)
    logprobs = continuation_logprobs(model, tokenizer, pairs, batch_size)
    scores: list[list[float]] = [[] for _ in items]
    for n, lp in zip(owners, logprobs):
        scores[n].append(sum(lp))
    correct = [int(max(range(len(s)), key=s.__getitem__) == item["label"]) for s, item in zip(scores, items)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct}


def text_nll(model, tokenizer, texts: list[str], batch_size: int = 32) -> dict:
    """
    Mean per-token NLL of plain texts (token-weighted), with each text's own sum and token count; every token after the
    first is scored, the text tokenized with the tokenizer's special tokens (Gemma's `<bos>` first: without it its
    WikiText NLL nearly doubles).
    """
    pairs = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        pairs.append((ids[:1], ids[1:]))
    logprobs = continuation_logprobs(model, tokenizer, pairs, batch_size)
    sums = [-sum(lp) for lp in logprobs]
    counts = [len(lp) for lp in logprobs]
    return {"nll": sum(sums) / sum(counts), "n": len(texts), "sums": sums, "tokens": counts}


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def target_accuracy(model, tokenizer, dataset, max_new_tokens: int, is_correct, batch_size: int = 32,
                    stop=None) -> dict:
    """
    Greedy answers to a prompt-completion dataset with an `answer` column, scored by `is_correct(text, answer)`;
    prompts are tokenized as the SFT preprocessing does (chat template for conversational ones). `stop` ends an answer
    early as in [`greedy_answers`].
    """
    prompts = [prompt_token_ids(tokenizer, row) for row in dataset]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, stop=stop)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    correct = [int(is_correct(t, row["answer"])) for t, row in zip(texts, dataset)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct, "texts": texts,
            "examples": texts[:3]}


@torch.no_grad()
def chat_drift(model, tokenizer, conversations: list[tuple[list[int], list[int]]], reference=None, batch_size: int = 16) -> dict:
    """
    Behaviour drift over `(prompt_ids, base_answer_ids)` pairs: per answer, the mean per-token KL(base || model) and
    the model's mean per-token NLL of the base's answer. `reference` is a context manager under which `model` acts as
    the base (e.g. a PEFT model's `disable_adapter`); without one, the KL is 0 by definition.
    """
    model.eval()
    kls, nlls = [], []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        ids, mask = _padded([p + a for p, a in chunk], tokenizer.pad_token_id, model.device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
        if reference is None:
            base_logp = logp
        else:
            with reference():
                base_logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for r, (prompt, answer) in enumerate(chunk):
            span = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))  # positions that predict the answer tokens
            p, q = base_logp[r, span], logp[r, span]
            kls.append((p.exp() * (p - q)).sum(-1).mean().item())
            targets = ids[r, len(prompt) : len(prompt) + len(answer)]
            nlls.append(-q.gather(-1, targets.unsqueeze(-1)).mean().item())
    return {"kl": sum(kls) / len(kls), "nll": sum(nlls) / len(nlls), "n": len(kls), "kls": kls, "nlls": nlls}


# Statistics


def paired_se(after: list[float], before: list[float]) -> float:
    """Standard error of the mean of item-wise differences."""
    diffs = [a - b for a, b in zip(after, before)]
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)

