"""A regime's model family and prompt format (benchmarks/harness/models.py, formats.py): the plain "Question:/Answer:"
format for a base model without a chat template (issue #44's Gemma-3-270M regime), on tiny models (no Hub)."""

import os
import sys

import pytest
from datasets import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import study  # noqa: E402
from harness import formats, models, probes, records, registry, training  # noqa: E402


def conversational(question: str, worked: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "completion": [{"role": "assistant", "content": worked}],
            "answer": answer}


class Characters:
    """A tokenizer whose tokens are characters: token boundaries fall anywhere in a word."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_plain_rows_are_question_answer_text_and_chat_rows_are_unchanged():
    rows = Dataset.from_list([conversational(" what is 3 x 4 ?", "3 x 4 = 12\n#### 12", "12")])
    plain = formats.in_format(rows, "plain")
    assert plain[0]["prompt"] == "Question: what is 3 x 4 ?\nAnswer:"
    assert plain[0]["completion"] == " 3 x 4 = 12\n#### 12"
    assert plain[0]["answer"] == "12"
    assert formats.in_format(rows, "chat") is rows
    with pytest.raises(ValueError, match="plain"):
        formats.in_format(rows, "markdown")


def test_a_plain_answer_stops_once_its_text_starts_a_new_question():
    tok = Characters()
    stop = formats.answer_stop(tok, "plain")
    assert stop([ord(c) for c in " 12\nQuestion: why?"])
    assert not stop([ord(c) for c in " 12\nQuest"])
    assert not stop([ord(c) for c in " 12 Question: why?"])  # a new question starts a line
    assert formats.answer_stop(tok, "chat") is None
    with pytest.raises(ValueError, match="plain"):
        formats.answer_stop(tok, "markdown")


def test_a_plain_answer_is_read_before_the_question_the_model_goes_on_to_ask():
    text = " 3 x 4 = 12\n#### 12\nQuestion: what is 5 x 5?\nAnswer: 25\n#### 25"
    assert formats.answer_part(text) == " 3 x 4 = 12\n#### 12"
    assert formats.verifier("plain")(text, "12")
    assert not formats.verifier("plain")(text, "25")
    assert formats.verifier("chat")(text, "25")  # a chat answer is read whole, as before
    assert formats.verifier("plain")(" 12", "12")  # no new question: the whole continuation


def test_the_base_models_everyday_answer_is_cut_where_it_starts_a_new_question():
    tok = Characters()
    runs_on = [ord(c) for c in " Boil it for ten minutes.\nQuestion: What is tea?\nAnswer: A drink."]
    assert tok.decode(formats.cut_at_next_question(tok, runs_on)) == " Boil it for ten minutes."
    whole = [ord(c) for c in " Boil it.\n\nThen eat it."]
    assert formats.cut_at_next_question(tok, whole) == whole
    assert len(formats.cut_at_next_question(tok, [ord(c) for c in "\nQuestion: why?"])) == 1  # never empty


def test_regimes_name_their_model_and_existing_ones_keep_the_chat_smollm2(monkeypatch):
    for name, regime in registry.REGIMES.items():
        expected = "gemma3_270m" if name == "gemma" else models.DEFAULT_MODEL
        assert models.family(regime) is models.MODELS[expected], name
    assert "model" not in registry.REGIMES["zero"] and "model" not in registry.REGIMES["partly"]  # records unchanged
    assert models.family(registry.REGIMES["partly"]).prompt_format == "chat"
    assert models.family(registry.REGIMES["gemma"]).prompt_format == "plain"
    assert registry.REGIMES["gemma"]["task"] not in ("basic_arithmetic", "chain_sum")
    for name in models.MODELS:
        monkeypatch.setitem(models.MODELS, name, models.ModelFamily(lambda name=name: name, "chat", name))
    assert training.load_model() == models.DEFAULT_MODEL
    assert training.load_model(registry.REGIMES["zero"]) == "smollm2_135m"
    assert training.load_model(registry.REGIMES["gemma"]) == "gemma3_270m"
    with pytest.raises(ValueError, match="gemma3_270m"):
        models.family({"model": "gpt2"})


@pytest.fixture
def plain_study(monkeypatch, tiny_llama):
    """A tiny model whose tokenizer has no chat template (as Gemma-3-270M base), registered as a model family."""
    from conftest import load_tokenizer
    from transformers import AutoModelForCausalLM

    def load():
        tokenizer = load_tokenizer(tiny_llama)
        tokenizer.chat_template = None  # any use of a chat template fails
        return AutoModelForCausalLM.from_pretrained(tiny_llama), tokenizer

    monkeypatch.setitem(models.MODELS, "tiny_plain", models.ModelFamily(load, "plain", "tiny, plain"))
    monkeypatch.setattr(registry, "TASK_TOKENS", 6)
    words = ["one", "two", "three", "four"]
    rows = [conversational(f"what is {a} plus {b}", f"the answer is {a} plus {b} = 3", "3") for a in words for b in words]
    return Dataset.from_list(rows), dict(model="tiny_plain", task="tiny", lora_r=4, learning_rate=1e-2, epochs=2)


def test_a_plain_regime_trains_and_is_probed_without_a_chat_template(plain_study, tmp_path, monkeypatch):
    rows, regime = plain_study
    # The regime's own sizes win over the mode's; its TMS settings reach every TMS arm, two-pass and online.
    regime = dict(regime, sizes=dict(mc_items=2, checkpoints=1), tms_settings=dict(unfinished_trajectories="drop"))
    monkeypatch.setattr(study, "load_task", lambda task, n_train, n_test, seed=0: (rows, rows.select(range(4))))
    built, tms_trainer = [], training.tms_trainer
    monkeypatch.setattr(training, "tms_trainer", lambda *args: built.append(args[-1]) or tms_trainer(*args))
    mode = dict(study.MODES["quick"], regimes={"plain": regime}, num_train=16, num_test=4, num_pld=4, mc_items=3,
                wiki_items=6, chat_prompts=2, chat_tokens=4, checkpoints=2)
    out, scratch = str(tmp_path / "results"), str(tmp_path / "scratch")
    os.makedirs(scratch)
    study.run_regime(mode, "plain", ["tms", "self_sft"], out, scratch)  # `tms` also yields `sft`, its harvest
    saved = records.load_arms(out)["plain"]
    assert [(b.get("tms_mode", "two_pass"), b["unfinished_trajectories"]) for b in built] == [
        ("two_pass", "drop"), ("online", "drop")]
    base = saved["base"][0]["final"]
    assert len(base["items"]["piqa"]) == 2 and len(base["items"]["chat_kl"]) == 2
    assert "ifeval_acc" not in base and "ifeval" not in base["items"]  # needs a chat template: left out
    for arm in ("sft", "tms", "self_sft"):
        (record,) = saved[arm]
        assert record["settings"]["model"] == "tiny_plain" and record["steps"] == 4
        assert [c["step"] for c in record["checkpoints"]] == [4] and record["settings"]["sizes"]["checkpoints"] == 1
        last = record["checkpoints"][-1]
        assert last["chat_kl"] > 0 and last["pld"] > 0 and 0 <= last["piqa_acc"] <= 1 and "ifeval_acc" not in last


def test_a_regime_size_the_mode_does_not_have_is_refused():
    mode = study.MODES["frontier"]
    assert study.sized(mode, {"sizes": {"wiki_items": 300}})["wiki_items"] == 300
    assert study.sized(mode, {})["wiki_items"] == mode["wiki_items"]
    with pytest.raises(ValueError, match="wiki_item"):
        study.sized(mode, {"sizes": {"wiki_item": 300}})


def test_the_plain_probe_suite_reads_plain_prompts_labels_and_answers(plain_study):
    rows, regime = plain_study
    model, tokenizer = training.load_model(regime)
    test = formats.in_format(rows.select(range(4)), "plain")
    sizes = dict(wiki_items=4, mc_items=2, chat_prompts=3, chat_tokens=4)
    suite = probes.ProbeSuite(sizes, model, tokenizer, test, test, prompt_format="plain")
    first = probes.CHAT_PROMPTS[0]
    assert suite.conversations[0][0] == tokenizer(f"Question: {first}\nAnswer:")["input_ids"]
    prompt, label = suite.labels[0]
    assert prompt == tokenizer(test[0]["prompt"])["input_ids"]
    assert label[-1] == tokenizer.eos_token_id  # as SFTTrainer appends it to a plain completion
    assert tokenizer.decode(label[:-1]) == tokenizer.decode(tokenizer(" " + test[0]["completion"].strip())["input_ids"])
    assert suite.verify(" the answer is 3\nQuestion: what is 4\nAnswer: 4", "3")


@pytest.mark.parametrize("arm", ["sdft", "sft_rehearsal_10"])
def test_arms_written_as_chat_turns_refuse_a_plain_regime(plain_study, tmp_path, arm):
    rows, regime = plain_study
    plain = formats.in_format(rows, "plain")
    with pytest.raises(ValueError, match="chat template"):
        training.train_run(arm, regime, 0, plain, plain.select(range(4)), str(tmp_path), str(tmp_path / "h"), [4], {})
