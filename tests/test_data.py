import pytest
from conftest import load_tokenizer, make_examples
from datasets import Dataset, IterableDataset

from trl_tms.data import prompt_token_ids, to_prompt_completion


def test_prompt_completion_is_kept_as_is():
    for fmt in ("standard", "conversational"):
        data = make_examples(3, fmt=fmt)
        assert to_prompt_completion(data) is data


def test_messages_split_at_the_last_assistant_turn():
    data = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "one plus one ?"},
                    {"role": "assistant", "content": "two"},
                ]
            }
        ]
    )
    out = to_prompt_completion(data)
    assert out.column_names == ["prompt", "completion"]
    assert [m["content"] for m in out[0]["prompt"]] == ["be brief", "hi", "hello", "one plus one ?"]
    assert out[0]["completion"] == [{"role": "assistant", "content": "two"}]


def test_sharegpt_conversations_are_converted():
    data = Dataset.from_list(
        [{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}]
    )
    out = to_prompt_completion(data)
    assert out[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert out[0]["completion"] == [{"role": "assistant", "content": "hello"}]


def test_unusable_datasets_raise():
    with pytest.raises(ValueError, match="no prompts"):
        to_prompt_completion(Dataset.from_dict({"input_ids": [[1, 2]]}))
    with pytest.raises(ValueError, match="empty"):
        to_prompt_completion(Dataset.from_dict({"prompt": [], "completion": []}))
    with pytest.raises(TypeError, match="IterableDataset"):
        to_prompt_completion(make_examples(2).to_iterable_dataset())
    with pytest.raises(TypeError, match="datasets.Dataset"):
        to_prompt_completion([{"prompt": "a", "completion": "b"}])
    assert IterableDataset  # imported for the isinstance contract above


def test_prompt_token_ids_match_sft_tokenization(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    conversational = make_examples(1)[0]
    ids = prompt_token_ids(tokenizer, conversational)
    rendered = tokenizer.apply_chat_template(conversational["prompt"], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("assistant : ")
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    standard = make_examples(1, fmt="standard")[0]
    assert prompt_token_ids(tokenizer, standard) == tokenizer(standard["prompt"])["input_ids"]
