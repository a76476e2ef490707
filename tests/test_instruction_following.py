"""The study's instruction-following probe (benchmarks/harness/instruction_following.py): prompts and checkers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from harness import instruction_following as probe  # noqa: E402

from trl_tms import METER_PROMPTS, REHEARSAL_PROMPTS
from trl_tms.probes.measures import GENERAL_PROMPTS

# One answer that follows and one that does not, for every kind of constraint the probe uses.
CASES = {
    "lowercase": ("autumn is cool and calm.", "Autumn is cool."),
    "uppercase": ("HELLO, WELCOME!", "Hello, welcome!"),
    "bullets": ("* apple\n* cherry\n* strawberry", "* apple\n* cherry"),
    "numbered": ("1. Dig a hole.\n2. Place the tree.\n3. Water it.", "1. 1. 1. 2. 3."),
    "max_words": ("A bicycle has two wheels.", " ".join(["word"] * 30)),
    "min_words": (" ".join(["word"] * 45), "A short answer."),
    "one_word": ("Green.", "The colour is green."),
    "yes_no": ("No, it is not.", "The moon is smaller."),
    "include": ("The green forest was quiet.", "The forest was still."),
    "exclude": ("The city glows at night.", "The city lights shine."),
    "no_commas": ("Warm and sweet and rich.", "Warm, sweet and rich."),
    "starts_with": ("My recommendation is chess.", "I recommend chess."),
    "ends_with": ("Lunch on Friday? See you soon!", "See you soon! Bye."),
    "quoted": ('"Stronger every day"', "Stronger every day"),
    "json": ('```json\n{"name": "Tom", "age": 3}\n```', "The cat is Tom, 3 years old."),
    "title": ("<<The Key>>\nOnce upon a time...", "The Key\nOnce upon a time..."),
    "postscript": ("Dear Ana, ...\nP.S. Write soon.", "Dear Ana, write soon."),
    "placeholders": ("Meeting on [date] at [time].", "Meeting on Monday at [time]."),
    "sentences_max": ("A map shows places.", "A map shows places. It helps you travel."),
    "highlight": ("I *love* painting and *hiking*.", "I love painting."),
}


def item_of(kind):
    return next(item for item in probe.ITEMS if item[1] == kind)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_checker_accepts_a_following_answer_and_rejects_one_that_does_not(kind):
    good, bad = CASES[kind]
    item = item_of(kind)
    if kind in ("max_words", "min_words", "bullets", "numbered", "sentences_max", "highlight", "placeholders"):
        item = (item[0], kind, {"max_words": 20, "min_words": 40, "bullets": 3, "numbered": 3, "sentences_max": 1,
                                "highlight": 2, "placeholders": 2}[kind])
    elif kind in ("include", "exclude", "starts_with", "ends_with"):
        item = (item[0], kind, {"include": ["green", "quiet"], "exclude": ["light", "lights"],
                                "starts_with": "My recommendation", "ends_with": "See you soon!"}[kind])
    assert probe.follows(item, good)
    assert not probe.follows(item, bad)
    assert not probe.follows(item, "")


def test_repeat_needs_the_question_first():
    item = ("What is the capital of Italy?", "repeat", None)
    assert probe.follows(item, "What is the capital of Italy? The capital of Italy is Rome.")
    assert not probe.follows(item, "The capital of Italy is Rome.")


def test_every_kind_is_checked_and_the_prompts_are_new():
    assert {kind for _, kind, _ in probe.ITEMS} == set(probe.INSTRUCTIONS) == set(CASES) | {"repeat"}
    prompts = probe.prompts()
    assert len(prompts) == len(set(prompts)) == 48
    requests = {request for request, _, _ in probe.ITEMS}
    assert not requests & (set(GENERAL_PROMPTS) | set(METER_PROMPTS) | set(REHEARSAL_PROMPTS))
    with pytest.raises(ValueError, match="unknown constraint"):
        probe.follows(("x", "rhyme", None), "x")


def test_the_probe_scores_a_model_item_by_item(tiny_llama):
    from conftest import load_tokenizer
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama), load_tokenizer(tiny_llama)
    result = probe.instruction_following(model, tokenizer, max_new_tokens=4)
    assert len(result["followed"]) == len(result["texts"]) == 48
    assert set(result["followed"]) <= {0, 1}
    assert result["accuracy"] == pytest.approx(sum(result["followed"]) / 48)
    assert result["followed"] == [int(probe.follows(item, t)) for item, t in zip(probe.ITEMS, result["texts"])]
