"""An instruction-following probe: does the model still obey simple, checkable format instructions?

A retained ability of a different kind from the study's other probes (log-likelihood multiple choice, WikiText NLL,
KL on chat answers): the model must *generate* an answer that satisfies a constraint stated in the prompt (all
lowercase, exactly three bullet points, under 20 words, start with a given word...). Modelled on IFEval (Zhou et al.,
2023, arXiv 2311.07911), whose data cannot be loaded offline here; the 48 prompts and their checkers were written for
this project, wrapping everyday requests disjoint from `trl_tms.probes.GENERAL_PROMPTS`, the forgetting meter's and
the rehearsal's prompts. Each check is a plain function of the answer text, so a score is reproducible without a judge
model.

    python benchmarks/harness/instruction_following.py          # the base model's score, item by item
"""

from __future__ import annotations

import json
import re

# (request, constraint kind, argument). The instruction text is generated from the kind so that prompt and checker
# cannot disagree.
ITEMS = [
    ("Describe your favourite season.", "lowercase", None),
    ("Explain why the sky looks blue.", "lowercase", None),
    ("Tell me what a library is.", "lowercase", None),
    ("Say hello to a new colleague.", "uppercase", None),
    ("Announce that the shop is closing in ten minutes.", "uppercase", None),
    ("Name three fruits that are red.", "bullets", 3),
    ("List reasons to visit a museum.", "bullets", 3),
    ("Give tips for staying warm in winter.", "bullets", 4),
    ("Suggest things to do at a park.", "bullets", 2),
    ("Give steps to plant a tree.", "numbered", 3),
    ("Give steps to wash your hands.", "numbered", 4),
    ("What is a bicycle?", "max_words", 20),
    ("Why do people keep pets?", "max_words", 25),
    ("What does a firefighter do?", "max_words", 15),
    ("What is the colour of grass?", "one_word", None),
    ("Which animal barks?", "one_word", None),
    ("What do bees make?", "one_word", None),
    ("Is water wet?", "yes_no", None),
    ("Can fish swim?", "yes_no", None),
    ("Is the moon bigger than the Earth?", "yes_no", None),
    ("Describe a busy train station.", "include", ["crowd"]),
    ("Write about a walk in the forest.", "include", ["green", "quiet"]),
    ("Describe your ideal breakfast.", "include", ["coffee"]),
    ("Describe a city at night.", "exclude", ["light", "lights"]),
    ("Write about a summer holiday.", "exclude", ["sun", "sunny"]),
    ("Describe a cup of hot chocolate.", "no_commas", None),
    ("Explain how to ride a bicycle.", "no_commas", None),
    ("Recommend a board game for a family evening.", "starts_with", "My recommendation"),
    ("Describe a good teacher.", "starts_with", "A good teacher"),
    ("Explain why people like music.", "starts_with", "Music"),
    ("Write a short note inviting a friend to lunch.", "ends_with", "See you soon!"),
    ("Give a short piece of advice about saving time.", "ends_with", "Good luck!"),
    ("Write a one-line motto for a gym.", "quoted", None),
    ("Write a slogan for a bookshop.", "quoted", None),
    ("Give the name and age of a fictional cat.", "json", None),
    ("Describe a car with its colour and number of doors.", "json", None),
    ("Write a short story about a lost key.", "title", None),
    ("Write a short poem about a river.", "title", None),
    ("Write a short message to a friend about a film you saw.", "postscript", None),
    ("Write a short letter to a pen pal.", "postscript", None),
    ("Write a template for a meeting invitation.", "placeholders", 2),
    ("Explain what a calendar is used for.", "min_words", 40),
    ("Describe the job of a baker.", "min_words", 40),
    ("Describe a garden in spring.", "sentences_max", 2),
    ("Explain what a map is.", "sentences_max", 1),
    ("Write about your favourite hobby.", "highlight", 2),
    ("What is the capital of Italy?", "repeat", None),
    ("What colour is a banana?", "repeat", None),
]

INSTRUCTIONS = {
    "lowercase": lambda a: "Your entire answer must be in lowercase letters; no capital letters at all.",
    "uppercase": lambda a: "Your entire answer must be in capital letters.",
    "bullets": lambda n: f"Answer with exactly {n} bullet points, each on its own line starting with '* '.",
    "numbered": lambda n: f"Answer with exactly {n} numbered steps (1., 2., ...), one per line.",
    "max_words": lambda n: f"Answer in fewer than {n} words.",
    "min_words": lambda n: f"Answer in at least {n} words.",
    "one_word": lambda a: "Answer with a single word.",
    "yes_no": lambda a: "Start your answer with 'Yes' or 'No'.",
    "include": lambda ws: "Include the word" + ("s " if len(ws) > 1 else " ") + " and ".join(f"'{w}'" for w in ws)
    + " in your answer.",
    "exclude": lambda ws: f"Do not use the word '{ws[0]}' in your answer.",
    "no_commas": lambda a: "Do not use any commas in your answer.",
    "starts_with": lambda p: f"Start your answer with the words '{p}'.",
    "ends_with": lambda p: f"End your answer with the exact phrase '{p}' and nothing after it.",
    "quoted": lambda a: "Wrap your entire answer in double quotation marks.",
    "json": lambda a: "Answer only with a JSON object, no other text.",
    "title": lambda a: "Give it a title wrapped in double angular brackets, like <<my title>>.",
    "postscript": lambda a: "At the end, add a postscript starting with 'P.S.'",
    "placeholders": lambda n: f"Use at least {n} placeholders in square brackets, like [name].",
    "sentences_max": lambda n: f"Answer in at most {n} sentence{'s' if n > 1 else ''}.",
    "highlight": lambda n: f"Highlight at least {n} parts of your answer with markdown, like *highlighted part*.",
    "repeat": lambda a: "First repeat the question word for word, then answer it.",
}


def prompts() -> list[str]:
    """The probe's 48 user messages: an everyday request followed by one format instruction."""
    return [f"{request} {INSTRUCTIONS[kind](arg)}" for request, kind, arg in ITEMS]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _lines(text: str, pattern: str) -> int:
    return sum(bool(re.match(pattern, line.strip())) for line in text.splitlines())


def follows(item: tuple, answer: str) -> bool:
    """Whether `answer` satisfies the item's constraint (checked on the text, as IFEval's strict mode does)."""
    request, kind, arg = item
    text = answer.strip()
    letters = [c for c in text if c.isalpha()]
    if kind == "lowercase":
        return bool(letters) and text == text.lower()
    if kind == "uppercase":
        return bool(letters) and text == text.upper()
    if kind == "bullets":
        return _lines(text, r"^[*\-\u2022]\s") == arg
    if kind == "numbered":
        return _lines(text, r"^\d+[.)]\s") == arg
    if kind == "max_words":
        return 0 < len(_words(text)) < arg
    if kind == "min_words":
        return len(_words(text)) >= arg
    if kind == "one_word":
        return len(_words(text)) == 1
    if kind == "yes_no":
        words = _words(text)
        return bool(words) and words[0].lower() in ("yes", "no")
    if kind == "include":
        return all(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in arg)
    if kind == "exclude":
        return bool(letters) and not any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in arg)
    if kind == "no_commas":
        return bool(letters) and "," not in text
    if kind == "starts_with":
        return text.lower().startswith(arg.lower())
    if kind == "ends_with":
        return text.lower().endswith(arg.lower())
    if kind == "quoted":
        return len(text) > 2 and text[0] in "\"\u201c" and text[-1] in "\"\u201d"
    if kind == "json":
        body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
        try:
            return isinstance(json.loads(body), dict)
        except ValueError:
            return False
    if kind == "title":
        return re.search(r"<<[^<>\n]+>>", text) is not None
    if kind == "postscript":
        return re.search(r"\bP\.\s?S\.", text) is not None
    if kind == "placeholders":
        return len(re.findall(r"\[[^\[\]\n]+\]", text)) >= arg
    if kind == "sentences_max":
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if _words(s)]
        return 0 < len(sentences) <= arg
    if kind == "highlight":
        return len(re.findall(r"\*[^*\n]+\*", text)) >= arg
    if kind == "repeat":
        return text.lower().startswith(request.lower().rstrip("?"))
    raise ValueError(f"unknown constraint kind {kind!r}")


def instruction_following(model, tokenizer, max_new_tokens: int = 128, batch_size: int = 16) -> dict:
    """Greedy answers to the probe's prompts and whether each follows its instruction: `accuracy`, `followed`, `texts`."""
    from trl_tms.generation import greedy_answers
    from trl_tms.probes.measures import chat_ids

    ids = [chat_ids(tokenizer, p) for p in prompts()]
    answers = greedy_answers(model, tokenizer, ids, max_new_tokens, batch_size=batch_size)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    followed = [int(follows(item, text)) for item, text in zip(ITEMS, texts)]
    return {"accuracy": sum(followed) / len(followed), "followed": followed, "texts": texts}


if __name__ == "__main__":
    from trl_tms.probes.embedded import load_embedded_model

    model, tokenizer = load_embedded_model()
    result = instruction_following(model, tokenizer)
    for item, ok, text in zip(ITEMS, result["followed"], result["texts"]):
        print(f"{'PASS' if ok else 'fail'} {item[1]:>13}: {text[:100]!r}")
    print(f"followed {sum(result['followed'])}/{len(ITEMS)} = {result['accuracy']:.3f}")
