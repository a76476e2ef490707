"""Self-rehearsal (`rehearsal_weight`, beta): the initial model's own answers to everyday prompts in the mixture."""

import copy
import math
import os

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from datasets import Dataset, load_from_disk
from peft import LoraConfig, get_peft_model
from test_mixture import synthetic_candidates
from transformers import AutoModelForCausalLM

from trl_tms import METER_PROMPTS, TMSConfig, TMSTrainer, mix_in_rehearsal, self_rehearsal_dataset
from trl_tms.mixture import IS_LABEL, IS_REHEARSAL, MixtureCollator, MixtureDataset
from trl_tms.probes.measures import GENERAL_PROMPTS
from trl_tms.rehearsal import REHEARSAL, REHEARSAL_PROMPTS, rehearsal_prompts
from trl_tms.report import format_summary


def rehearsal_rows(n: int) -> Dataset:
    # Token ids [index, REHEARSAL, 0], so a draw shows where it came from.
    return Dataset.from_dict(
        {"prompt_index": list(range(n)), "snapshot_step": [REHEARSAL] * n,
         "input_ids": [[i, REHEARSAL, 0] for i in range(n)], "labels": [[i, REHEARSAL, 0] for i in range(n)]}
    )


# The draw


def test_beta_zero_reproduces_the_mixture_exactly_and_beta_replaces_only_some_draws():
    n = 2000
    plain = MixtureDataset(synthetic_candidates(n), label_weight=0.25, seed=4)
    zero = MixtureDataset(synthetic_candidates(n), label_weight=0.25, seed=4)
    zero.add_rehearsal(rehearsal_rows(10), 0.0)
    some = MixtureDataset(synthetic_candidates(n), label_weight=0.25, seed=4)
    some.add_rehearsal(rehearsal_rows(10), 0.3)
    for epoch in range(2):
        expected = [plain.draw(i, epoch) for i in range(n)]
        assert [zero.draw(i, epoch) for i in range(n)] == expected
        drawn = [some.draw(i, epoch) for i in range(n)]
        replaced = [some.is_rehearsal(row) for row, _ in drawn]
        # A draw that is not a rehearsal answer is the one the mixture without rehearsal makes.
        assert all(d == e for d, e, r in zip(drawn, expected, replaced) if not r)
        assert 0 < sum(replaced) < n
    assert [zero[i][IS_REHEARSAL] for i in range(5)] == [False] * 5  # the flag is carried once answers exist


def test_planned_draws_skip_the_pairs_that_rehearsal_draws_replace():
    from test_mixture import drawn_examples, keep_pairs

    n, steps, epochs, beta = 300, (10, 20, 30, 40), 3, 0.5
    full = synthetic_candidates(n, steps=steps)
    everything = MixtureDataset(full, label_weight=0.25, seed=5)
    everything.add_rehearsal(rehearsal_rows(8), beta)
    untokenized = rehearsal_rows(8).remove_columns(["input_ids", "labels"])

    def sample(with_rehearsal: bool) -> set:
        sampled = set()
        while True:
            plan = MixtureDataset(keep_pairs(full, sampled).remove_columns(["input_ids", "labels"]), label_weight=0.25,
                                  seed=5, snapshot_steps=list(steps), sampled=set(sampled))
            if with_rehearsal:
                plan.add_rehearsal(untokenized, beta)
            missing = plan.missing_pairs(epochs)
            if not missing:
                return sampled
            sampled |= missing

    sampled = sample(with_rehearsal=True)
    mixture = MixtureDataset(keep_pairs(full, sampled), label_weight=0.25, seed=5, snapshot_steps=list(steps),
                             sampled=set(sampled))
    mixture.add_rehearsal(rehearsal_rows(8), beta)
    assert drawn_examples(mixture, epochs) == drawn_examples(everything, epochs)
    # About half the draws are rehearsal answers: about half the pairs are not needed.
    assert len(sampled) < 0.7 * len(sample(with_rehearsal=False))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_rehearsal_fraction_matches_beta_and_flags_match_the_tokens(beta):
    n = 4000
    mixture = MixtureDataset(synthetic_candidates(n), label_weight=0.25, seed=1)
    mixture.add_rehearsal(rehearsal_rows(8), beta)
    for epoch in range(2):
        mixture.set_epoch(epoch)
        items = [mixture[i] for i in range(n)]
        fraction = sum(item[IS_REHEARSAL] for item in items) / n
        assert abs(fraction - beta) <= 4 * math.sqrt(beta * (1 - beta) / n)
        assert fraction == pytest.approx(mixture.rehearsal_fraction(epoch))
        assert all((item["input_ids"][1] == REHEARSAL) == item[IS_REHEARSAL] for item in items)
        assert not any(item[IS_REHEARSAL] and item[IS_LABEL] for item in items)
        # Labels make up alpha of the draws that are not rehearsal.
        labels = sum(item[IS_LABEL] for item in items) / (n - sum(item[IS_REHEARSAL] for item in items))
        assert labels == pytest.approx(0.25, abs=0.04)
        # Uniform over the rehearsal answers.
        chosen = [item["input_ids"][0] for item in items if item[IS_REHEARSAL]]
        for answer in range(8):
            share = chosen.count(answer) / len(chosen)
            assert abs(share - 1 / 8) <= 4 * math.sqrt((1 / 8) * (7 / 8) / len(chosen))


def test_pld_scoring_skips_prompts_that_draw_a_rehearsal_answer():
    mixture = MixtureDataset(synthetic_candidates(300), label_weight=0.0, seed=0, trajectory_choice="pld")
    everything = set(mixture.rows_to_score())
    mixture.add_rehearsal(rehearsal_rows(4), 0.5)
    scored = set(mixture.rows_to_score())
    mixture.set_scores({row: 0.0 for row in everything})
    rehearsing = {p for p in range(len(mixture)) if mixture.is_rehearsal(mixture.draw(p, 0)[0])}
    assert rehearsing
    assert scored == {row for row in everything if mixture.candidate(row)["prompt_index"] not in rehearsing}


def test_collator_carries_both_flags():
    collator = MixtureCollator(lambda examples: {"input_ids": torch.tensor([e["input_ids"] for e in examples])})
    batch = collator([{"input_ids": [1], "labels": [1], IS_LABEL: True, IS_REHEARSAL: False},
                      {"input_ids": [2], "labels": [2], IS_LABEL: False, IS_REHEARSAL: True}])
    assert batch[IS_LABEL].tolist() == [1.0, 0.0] and batch[IS_REHEARSAL].tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    "weight, rows, message",
    [(1.0, 3, r"must lie in \[0, 1\)"), (0.2, 0, "No rehearsal answer is left")],
)
def test_bad_rehearsal_for_the_mixture_is_refused(weight, rows, message):
    mixture = MixtureDataset(synthetic_candidates(4), label_weight=0.25, seed=0)
    with pytest.raises(ValueError, match=message):
        mixture.add_rehearsal(rehearsal_rows(rows), weight)
    with pytest.raises(ValueError, match="rehearsal answers to `add_rehearsal`"):
        mixture.extend(rehearsal_rows(2))


# The prompts


def test_built_in_prompts_are_disjoint_from_every_probe():
    assert len(REHEARSAL_PROMPTS) == len(set(REHEARSAL_PROMPTS)) == 64
    assert not set(REHEARSAL_PROMPTS) & set(METER_PROMPTS)
    assert not set(REHEARSAL_PROMPTS) & set(GENERAL_PROMPTS)  # the benchmarks' chat probe (`probes.CHAT_PROMPTS`)


def test_prompts_take_the_training_set_form():
    chat = rehearsal_prompts(None, 3, conversational=True)
    assert chat["prompt"][0] == [{"role": "user", "content": REHEARSAL_PROMPTS[0]}] and len(chat) == 3
    assert rehearsal_prompts(["say hi"], conversational=False)["prompt"] == ["say hi"]
    given = [[{"role": "user", "content": "hello"}]]
    assert rehearsal_prompts(["plain", *given], conversational=False)["prompt"][1] == given[0]


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "at least one prompt"),
        ("hello", "must be a list of prompts"),
        (["fine", "  "], "rehearsal prompt 1 is"),
        (Dataset.from_dict({"text": ["a"]}), "needs a `prompt` column"),
        (Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}), "generated by the initial model"),
    ],
)
def test_bad_rehearsal_prompts_are_refused_clearly(prompts, message):
    with pytest.raises(ValueError, match=message):
        rehearsal_prompts(prompts)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rehearsal_weight", 1.0, r"must lie in \[0, 1\)"),
        ("rehearsal_weight", -0.1, r"must lie in \[0, 1\)"),
        ("rehearsal_num_prompts", 0, "rehearsal_weight=0"),
        ("rehearsal_max_new_tokens", 0, "at least 1"),
        ("rehearsal_temperature", -1.0, ">= 0"),
    ],
)
def test_bad_rehearsal_settings_are_refused(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        TMSConfig(str(tmp_path), recipe="paper", **{field: value}, **QUIET_CPU)


# End to end


PROMPTS = ["name a colour", "say something kind", "what is a tree ?", "greet me", "name an animal", "describe rain"]


def make_trainer(tiny_llama, tmp_path, model=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), num_checkpoints=2, per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-2, max_new_tokens=6, logging_steps=2, rehearsal_weight=0.5, rehearsal_prompts=PROMPTS,
        rehearsal_max_new_tokens=5, seed=3, tms_mode="two_pass", label_weight=0.25, **QUIET_CPU,
    )
    values.update(overrides)
    return TMSTrainer(
        model=model if model is not None else tiny_llama,
        args=TMSConfig(**values),
        train_dataset=make_examples(24, seed=0),
        eval_dataset=make_examples(4, seed=1),
        processing_class=load_tokenizer(tiny_llama),
        peft_config=None if model is not None else LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def rehearsed(tiny_llama, tmp_path_factory):
    """A two-pass run with beta = 0.5 from an adapter that is not the identity (so "initial" differs from the base)."""
    tmp_path = tmp_path_factory.mktemp("rehearsal")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    initial = copy.deepcopy(model).eval()
    trainer = make_trainer(tiny_llama, tmp_path, model=model)
    trainer.train()
    return trainer, initial, tmp_path


def test_rehearsal_answers_are_the_initial_models_greedy_answers(rehearsed, tiny_llama):
    trainer, initial, _ = rehearsed
    tokenizer = load_tokenizer(tiny_llama)
    stored = load_from_disk(os.path.join(trainer.history_dir, "rehearsal"))
    assert stored["prompt_index"] == list(range(len(PROMPTS)))
    expected = [greedy(initial, tokenizer, p, 5) for p in PROMPTS]
    assert [c[0]["content"] for c in stored["completion"]] == expected
    # The initial adapter is not the identity, so these are not the base model's answers.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert [greedy(base, tokenizer, p, 5) for p in PROMPTS] != expected


def test_rehearsal_fraction_is_logged_in_the_student_phase_only(rehearsed):
    trainer, _, _ = rehearsed
    history = trainer.state.log_history
    logged = [e["tms_rehearsal_fraction"] for e in history if "tms_rehearsal_fraction" in e]
    assert len(logged) == 6  # 12 student steps, a log every 2
    assert not any("tms_rehearsal_fraction" in e for e in history if e.get("tms_phase") == 1)
    mixture = trainer.train_dataset
    drawn = [mixture.rehearsal_fraction(epoch) for epoch in range(2)]
    # Every log covers the same number of examples, so the mean of the logs is the fraction drawn over both epochs.
    assert sum(logged) / len(logged) == pytest.approx(sum(drawn) / 2)
    stats = next(e for e in history if "tms_rehearsal_answers" in e)
    assert stats["tms_rehearsal_answers"] + stats["tms_rehearsal_empty"] == len(PROMPTS)
    assert "Self-rehearsal:" in format_summary(trainer, trainer.args.output_dir)


def test_resume_reuses_the_rehearsal_answers(rehearsed, tiny_llama, monkeypatch):
    trainer, _, tmp_path = rehearsed
    folder = os.path.join(trainer.history_dir, "rehearsal")
    before = (os.path.getmtime(folder), sorted(os.listdir(folder)))
    again = make_trainer(tiny_llama, tmp_path)
    monkeypatch.setattr(again.rehearsal.generator, "generate", lambda *a, **k: pytest.fail("generated again"))
    again.train(resume_from_checkpoint=True)
    assert (os.path.getmtime(folder), sorted(os.listdir(folder))) == before  # neither written again nor cached into
    assert again.stats.rehearsal + again.stats.rehearsal_empty == len(PROMPTS)


def test_changed_rehearsal_settings_generate_again(rehearsed, tiny_llama):
    trainer, _, tmp_path = rehearsed
    again = make_trainer(tiny_llama, tmp_path, rehearsal_prompts=PROMPTS[:3])
    again.train(resume_from_checkpoint=True)
    assert len(load_from_disk(os.path.join(again.history_dir, "rehearsal"))) == 3


def test_beta_zero_generates_nothing(tiny_llama, tmp_path):
    trainer = make_trainer(tiny_llama, tmp_path, rehearsal_weight=0.0, num_train_epochs=1)
    trainer.train()
    assert trainer.rehearsal is None
    assert not os.path.exists(os.path.join(trainer.history_dir, "rehearsal"))
    assert not any("tms_rehearsal_fraction" in e or "tms_rehearsal_answers" in e for e in trainer.state.log_history)


def test_online_tms_rehearses_the_base_models_answers(tiny_llama, tmp_path):
    online = make_trainer(tiny_llama, tmp_path, tms_mode="online", num_checkpoints=2)
    online.train()
    answers = load_from_disk(os.path.join(online.history_dir, "rehearsal"))
    # The same base model with a fresh LoRA (B = 0) is the base model: answers as the base's greedy ones.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = load_tokenizer(tiny_llama)
    assert [c[0]["content"] for c in answers["completion"]] == [greedy(base, tokenizer, p, 5) for p in PROMPTS]
    assert any("tms_rehearsal_fraction" in e for e in online.state.log_history)


# Self-rehearsal for a plain SFTTrainer


def test_self_rehearsal_dataset_holds_the_models_greedy_answers_and_leaves_out_unfinished_ones(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    answers = [greedy_ids(model, tokenizer, p, 6, stops=[tokenizer.eos_token_id]) for p in PROMPTS]
    kept = self_rehearsal_dataset(model, tokenizer, prompts=PROMPTS, max_new_tokens=6, keep_unfinished=True)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in answers]
    assert kept["prompt"] == [[{"role": "user", "content": p}] for p, t in zip(PROMPTS, texts) if t.strip()]
    assert [c[0]["content"] for c in kept["completion"]] == [t for t in texts if t.strip()]
    assert all(c[0]["role"] == "assistant" for c in kept["completion"])
    # Name a later token of the first answer an end token, one that some unfinished answer does not hold: the first
    # answer now ends there, and an answer still cut at max_new_tokens is left out by default.
    stop = next(t for t in answers[0][0][1:] if any(not done and t not in ids for ids, done in answers))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    answers = [greedy_ids(model, tokenizer, p, 6, stops=[tokenizer.eos_token_id, stop]) for p in PROMPTS]
    assert answers[0][1] and not all(finished for _, finished in answers)
    expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids, finished in answers if finished]
    only_finished = self_rehearsal_dataset(model, tokenizer, prompts=PROMPTS, max_new_tokens=6)
    assert [c[0]["content"] for c in only_finished["completion"]] == [t for t in expected if t.strip()]


def greedy_ids(model, tokenizer, prompt: str, max_new_tokens: int, stops: list[int]) -> tuple[list[int], bool]:
    """The greedy answer's tokens before its first stop token (or pad), and whether it reached one."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    new = out[0, ids.shape[1]:].tolist()
    ends = [k for k, t in enumerate(new) if t in (*stops, tokenizer.pad_token_id)]
    return (new[: ends[0]], True) if ends else (new, False)


def test_self_rehearsal_dataset_text_prompts_stay_text(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    kept = self_rehearsal_dataset(model, tokenizer, prompts=PROMPTS[:2], max_new_tokens=4, conversational=False,
                                  keep_unfinished=True)
    assert model.training  # left in the mode it was given in
    assert all(isinstance(p, str) for p in kept["prompt"]) and all(isinstance(c, str) for c in kept["completion"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        self_rehearsal_dataset(model, tokenizer, max_new_tokens=0)


def rehearsal_answers(n: int, conversational: bool = True) -> Dataset:
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"r{i}"}] for i in range(n)],
                                  "completion": [[{"role": "assistant", "content": f"a{i}"}] for i in range(n)]})
    return Dataset.from_dict({"prompt": [f"r{i}" for i in range(n)], "completion": [f"a{i}" for i in range(n)]})


@pytest.mark.parametrize("fmt", ["conversational", "standard", "messages"])
def test_mix_in_rehearsal_adds_the_share_asked_for_and_keeps_every_training_row(fmt):
    train = make_examples(90, seed=0, fmt=fmt)
    rehearsal = rehearsal_answers(7, conversational=fmt != "standard")
    mixed = mix_in_rehearsal(train, rehearsal, weight=0.1)
    assert len(mixed) == 100  # 90 / (1 - 0.1)
    key = "messages" if fmt == "messages" else "prompt"
    as_text = (lambda rows: [str(r) for r in rows])
    train_rows, mixed_rows = as_text(train[key]), as_text(mixed[key])
    assert sorted(r for r in mixed_rows if r in set(train_rows)) == sorted(train_rows)  # every training row, once
    added = [r for r in mixed_rows if r not in set(train_rows)]
    assert len(added) == 10
    # The 10 rehearsal rows cycle through the 7 answers: each used once or twice.
    counts = {r: added.count(r) for r in set(added)}
    assert len(counts) == 7 and set(counts.values()) <= {1, 2}
    if fmt == "messages":  # prompt and answer joined into one conversation
        assert mixed.column_names == ["messages"] and {"role": "assistant", "content": "a0"} in [
            m for row in mixed["messages"] for m in row]
    assert mixed_rows != train_rows + added  # shuffled
    assert mix_in_rehearsal(train, rehearsal, weight=0.1)[key] == mixed[key]  # seeded
    assert len(mix_in_rehearsal(train, rehearsal, weight=0.0)) == 90


def test_mix_in_rehearsal_bad_input_gets_a_clear_error():
    train = make_examples(10, fmt="conversational")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        mix_in_rehearsal(train, rehearsal_answers(3), weight=1.0)
    with pytest.raises(ValueError, match="conversational=False"):
        mix_in_rehearsal(make_examples(10, fmt="standard"), rehearsal_answers(3), weight=0.2)
    with pytest.raises(ValueError, match="non-empty"):
        mix_in_rehearsal(train, rehearsal_answers(0), weight=0.2)
    with pytest.raises(ValueError, match="to_prompt_completion"):
        mix_in_rehearsal(Dataset.from_dict({"text": ["a b"]}), rehearsal_answers(3), weight=0.2)
    with pytest.raises(ValueError, match="is empty"):
        mix_in_rehearsal(train.select([]), rehearsal_answers(3), weight=0.2)


def test_sft_trainer_trains_on_the_mixed_dataset(tiny_llama, tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    rehearsal = self_rehearsal_dataset(model, tokenizer, prompts=PROMPTS, max_new_tokens=5, keep_unfinished=True)
    mixed = mix_in_rehearsal(make_examples(12), rehearsal, weight=0.25)
    trainer = SFTTrainer(model=model, args=SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                                     **QUIET_CPU),
                         train_dataset=mixed, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainer.train()
    assert len(trainer.train_dataset) == 16 and trainer.state.global_step == 2
