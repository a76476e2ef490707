"""The forgetting meter (RetentionCallback): its value, where it is logged, its alarm, its reference, bad input."""

import os

import pytest
import torch
from conftest import QUIET_CPU, WeightsAtStep, load_tokenizer, make_examples
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from trl_tms import METER_PROMPTS, RetentionCallback, TMSConfig, TMSTrainer
from trl_tms.generation import greedy_answers
from trl_tms.probes.measures import GENERAL_PROMPTS, chat_drift
from trl_tms.retention import adapter_is_identity, build_reference, compact_kl

# Prompts in the tiny tokenizer's vocabulary, so that they are not all <unk>.
PROMPTS = ["what is one plus two ?", "hello world", "a b c d e", "yes or no ?", "the sum of five and six", "x y z"]


def sft_trainer(path, tmp_path, peft=True, **overrides):
    values = dict(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, num_train_epochs=1,
                  learning_rate=3e-2, logging_steps=2, **QUIET_CPU)
    values.update(overrides)
    return SFTTrainer(
        model=path,
        args=SFTConfig(**values),
        train_dataset=make_examples(16, seed=0),
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=4, target_modules="all-linear") if peft else None,
    )


def meter_entries(log_history, phase=None):
    return [e for e in log_history if "retention_kl" in e and (phase is None or e.get("tms_phase") == phase)]


def token_weighted_exact_kl(trainer, reference):
    """Full-vocabulary KL(base || model) per answer token, with the adapter disabled for the base (probes/measures.py)."""
    drift = chat_drift(trainer.model, trainer.processing_class, list(zip(reference.prompts, reference.answers)),
                       reference=trainer.model.disable_adapter)
    lengths = [len(a) for a in reference.answers]
    return sum(kl * n for kl, n in zip(drift["kls"], lengths)) / sum(lengths)


def test_meter_is_zero_at_step_0_rises_with_training_and_reaches_log_history(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, num_train_epochs=3)
    meter = RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=8)
    trainer.add_callback(meter)
    trainer.train()
    entries = meter_entries(trainer.state.log_history)
    assert [e["step"] for e in entries] == [0, 2, 4, 6, 8, 10, 12]
    assert entries[0]["retention_kl"] == 0.0  # the policy is the reference
    assert entries[-1]["retention_kl"] > 1e-3 and entries[-1]["retention_nll"] > entries[0]["retention_nll"]
    assert all(e["retention_kl"] >= 0 for e in entries)
    # The logged value is the meter's value for the final weights.
    assert meter.measure()["retention_kl"] == pytest.approx(entries[-1]["retention_kl"], rel=1e-6)


def test_reference_answers_are_the_initial_models_greedy_answers(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, max_steps=1)
    meter = RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=6)
    trainer.add_callback(meter)
    trainer.train()
    tokenizer = trainer.processing_class
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
               for p in PROMPTS]
    assert meter.reference.prompts == prompts
    assert meter.reference.answers == greedy_answers(base, tokenizer, prompts, max_new_tokens=6)


def test_reference_kept_from_the_generation_equals_a_forward_pass_over_the_answers(tiny_llama):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama), load_tokenizer(tiny_llama)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
               for p in PROMPTS]
    generated = build_reference(model, tokenizer, prompts, None, max_new_tokens=8, top_k=16, batch_size=4)
    forward = build_reference(model, tokenizer, prompts, generated.answers, max_new_tokens=8, top_k=16, batch_size=4)
    assert [len(v) for v in generated.top_logprobs] == [len(a) for a in generated.answers]
    for g_values, g_ids, f_values, f_ids in zip(generated.top_logprobs, generated.top_ids, forward.top_logprobs,
                                                forward.top_ids):
        assert g_values.shape == (g_ids.shape[0], 16)
        torch.testing.assert_close(g_values, f_values, atol=1e-4, rtol=0)
        assert torch.equal(g_ids, f_ids)
    assert generated.answer_nll == pytest.approx(forward.answer_nll, abs=1e-3)
    # Greedy answers: every answer token is the reference's most likely one.
    for answer, ids in zip(generated.answers, generated.top_ids):
        assert answer == ids[:, 0].tolist()


def test_step_0_values_are_what_a_forward_pass_measures(tiny_llama, tmp_path, monkeypatch):
    trainer = sft_trainer(tiny_llama, tmp_path, max_steps=1)
    meter = RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=8)
    meter.start(trainer.state)
    assert adapter_is_identity(trainer.model)
    known = meter.measure(0)
    monkeypatch.setattr("trl_tms.retention.adapter_is_identity", lambda model: False)
    measured = meter.measure(0)
    assert known["retention_kl"] == 0.0 and measured["retention_kl"] == pytest.approx(0.0, abs=1e-5)
    assert known["retention_nll"] == pytest.approx(measured["retention_nll"], abs=1e-4)


@pytest.mark.parametrize(
    "overrides, identity",
    [({}, True), ({"init_lora_weights": False}, False), ({"use_dora": True}, False),
     ({"modules_to_save": ["lm_head"]}, False)],
    ids=["fresh-lora", "random-B", "dora", "modules-to-save"],
)
def test_only_a_fresh_plain_lora_adapter_counts_as_the_reference(tiny_llama, overrides, identity):
    from peft import get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear", **overrides))
    assert adapter_is_identity(model) is identity
    assert adapter_is_identity(AutoModelForCausalLM.from_pretrained(tiny_llama)) is False
    if identity:
        next(p for n, p in model.named_parameters() if "lora_B" in n).data[0, 0] = 1e-3
        assert adapter_is_identity(model) is False


def test_an_adapter_that_starts_away_from_the_base_is_measured_at_step_0(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, max_steps=1)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=torch.Generator().manual_seed(0))
    trainer.add_callback(RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=8))
    trainer.train()
    assert meter_entries(trainer.state.log_history)[0]["retention_kl"] > 1e-3


def test_with_the_whole_vocabulary_the_meter_is_the_exact_kl_and_with_fewer_tokens_a_lower_bound(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, num_train_epochs=2)
    full = RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=8, top_k=10_000)
    coarse = RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=8, top_k=3)
    trainer.add_callback(full)
    trainer.add_callback(coarse)
    trainer.train()
    exact = token_weighted_exact_kl(trainer, full.reference)
    assert exact > 1e-3
    # Not bit-equal: the meter runs the LM head on the answer positions only, a matmul of another shape.
    assert full.measure()["retention_kl"] == pytest.approx(exact, rel=1e-3)
    assert 0 < coarse.measure()["retention_kl"] < exact


def test_compact_kl_of_two_known_distributions():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    top_logp, top_ids = p.log().topk(2, dim=-1)
    # Buckets: {0}, {1}, {2, 3}: p = (0.5, 0.3, 0.2), q = (0.25, 0.25, 0.5).
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.3 * torch.log(torch.tensor(0.3 / 0.25)) + 0.2 * torch.log(torch.tensor(0.4))
    assert compact_kl(top_logp, top_ids, q.log()).item() == pytest.approx(expected.item(), rel=1e-6)
    assert compact_kl(top_logp, top_ids, p.log()).item() == pytest.approx(0.0, abs=1e-7)


def test_meter_in_both_tms_phases_restarts_at_zero_for_the_student(tiny_llama, tmp_path):
    config = TMSConfig(recipe="paper", output_dir=str(tmp_path / "tms"), num_checkpoints=2, per_device_train_batch_size=4,
                       num_train_epochs=1, learning_rate=3e-2, logging_steps=2, max_new_tokens=4,
                       retention_prompts=PROMPTS, retention_max_new_tokens=6, **QUIET_CPU)
    trainer = TMSTrainer(model=tiny_llama, args=config, train_dataset=make_examples(16, seed=0),
                         processing_class=load_tokenizer(tiny_llama), peft_config=LoraConfig(r=4, target_modules="all-linear"))
    assert trainer.retention_callback.num_prompts == len(PROMPTS)
    trainer.train()
    harvest, student = meter_entries(trainer.state.log_history, 1), meter_entries(trainer.state.log_history, 2)
    assert [e["step"] for e in harvest] == [e["step"] for e in student] == [0, 2, 4]
    assert harvest[0]["retention_kl"] == student[0]["retention_kl"] == 0.0  # both start at the initial adapter
    assert harvest[0]["retention_nll"] == pytest.approx(student[0]["retention_nll"], rel=1e-6)
    assert harvest[-1]["retention_kl"] > 0 and student[-1]["retention_kl"] > 0


def test_meter_can_be_turned_off_and_sized(tiny_llama, tmp_path):
    common = dict(output_dir=str(tmp_path / "tms"), num_checkpoints=2, per_device_train_batch_size=4,
                  num_train_epochs=1, max_new_tokens=4, **QUIET_CPU)
    args = dict(model=tiny_llama, train_dataset=make_examples(8, seed=0), processing_class=load_tokenizer(tiny_llama),
                peft_config=LoraConfig(r=4, target_modules="all-linear"))
    assert TMSTrainer(args=TMSConfig(recipe="paper", log_retention=False, **common), **args).retention_callback is None
    meter = TMSTrainer(args=TMSConfig(recipe="paper", retention_num_prompts=5, retention_max_new_tokens=3, **common), **args).retention_callback
    assert meter.num_prompts == 5 and meter.max_new_tokens == 3


def test_reference_completions_are_used_instead_of_generating(tiny_llama, tmp_path, monkeypatch):
    trainer = sft_trainer(tiny_llama, tmp_path, max_steps=1)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "hello world"}],
                                  "completion": [{"role": "assistant", "content": "yes ."}]},
                                 {"prompt": [{"role": "user", "content": "a b c"}],
                                  "completion": [{"role": "assistant", "content": "no no"}]}])
    monkeypatch.setattr("trl_tms.retention.greedy_answers", lambda *a, **k: pytest.fail("generated an answer"))
    meter = RetentionCallback(trainer, prompts=prompts)
    trainer.add_callback(meter)
    trainer.train()
    tokenizer = trainer.processing_class
    assert meter.reference.answers == [tokenizer("yes .", add_special_tokens=False)["input_ids"],
                                       tokenizer("no no", add_special_tokens=False)["input_ids"]]


def scripted_kl(monkeypatch, values):
    """
    retention_kl at step 1, 2, ... follows `values` (NLL fixed at 1): the alarm is tested, not the model. Step 0 is
    not measured: the fresh adapter is the reference, whose KL is 0.
    """
    sequence = iter(values)
    monkeypatch.setattr("trl_tms.retention.meter_sums",
                        lambda *a, **k: torch.tensor([next(sequence), 1.0, 1.0], dtype=torch.float64))


def test_alarm_warns_once_without_stopping(tiny_llama, tmp_path, monkeypatch):
    scripted_kl(monkeypatch, [0.05, 0.1, 0.3, 0.2, 0.4])
    trainer = sft_trainer(tiny_llama, tmp_path, logging_steps=1, num_train_epochs=5, per_device_train_batch_size=16)
    with CaptureLogger(logging.get_logger("trl_tms.retention")) as captured:
        trainer.add_callback(RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=2, kl_threshold=0.25))
        trainer.train()
    assert trainer.state.global_step == 5
    assert [e["step"] for e in trainer.state.log_history if e.get("retention_alarm")] == [3, 5]
    assert captured.out.count("retention_kl 0.300 passed 0.25 at step 3") == 1
    assert "passed 0.25 at step 5" not in captured.out  # warned once per run


def test_alarm_stops_and_restores_the_last_weights_within_the_threshold(tiny_llama, tmp_path, monkeypatch):
    scripted_kl(monkeypatch, [0.05, 0.1, 0.3, 0.2, 0.1, 0.1])
    trainer = sft_trainer(tiny_llama, tmp_path, logging_steps=1, num_train_epochs=6, per_device_train_batch_size=16)
    recorder = WeightsAtStep(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=2, kl_threshold=0.25,
                                           stop_on_kl=True))
    trainer.train()
    assert trainer.state.global_step == 3
    assert [e["retention_restored_step"] for e in trainer.state.log_history if "retention_restored_step" in e] == [2.0]
    current = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, value in recorder.weights[2].items():
        torch.testing.assert_close(current[name], value)


def test_full_fine_tuning_measures_from_step_0_weights_and_refuses_a_resume(tiny_llama, tmp_path):
    trainer = sft_trainer(tiny_llama, tmp_path, peft=False, learning_rate=1e-2, num_train_epochs=2)
    meter = RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=6)
    trainer.add_callback(meter)
    trainer.train()
    entries = meter_entries(trainer.state.log_history)
    assert entries[0]["retention_kl"] == 0.0 and entries[-1]["retention_kl"] > 1e-3
    late = RetentionCallback(trainer, prompts=PROMPTS)
    with pytest.raises(ValueError, match="resumes at step 8.*LoRA adapter"):
        late.start(trainer.state)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_full_fine_tuning_keeps_the_reference_in_its_checkpoints_and_resumes_with_it(tiny_llama, tmp_path):
    settings = dict(peft=False, learning_rate=1e-2, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2)

    def run(folder: str, stop_at: int | None = None, resume: bool = False, **meter):
        trainer = sft_trainer(tiny_llama, tmp_path, output_dir=str(tmp_path / folder), **settings)
        trainer.add_callback(RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=6, **meter))
        if stop_at is not None:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=True if resume else None)
        return {e["step"]: e["retention_kl"] for e in meter_entries(trainer.state.log_history)}

    whole = run("whole")
    assert whole[4] > 1e-3
    assert os.path.isfile(tmp_path / "whole" / "checkpoint-2" / "retention_reference-0.safetensors")
    first = run("split", stop_at=2)
    assert first == {step: whole[step] for step in (0, 1, 2)}
    resumed = run("split", resume=True)
    # The resumed run measures against the initial weights' reference, not against the weights it resumes from.
    for step in (3, 4):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-4)
    # A checkpoint's reference is not reused by a meter with other settings.
    with pytest.raises(ValueError, match="other prompts or settings"):
        run("split", resume=True, top_k=8)


def test_built_in_prompts_are_64_and_disjoint_from_the_benchmarks_chat_probe():
    assert len(METER_PROMPTS) == len(set(METER_PROMPTS)) == 64
    assert not set(METER_PROMPTS) & set(GENERAL_PROMPTS)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "at least one prompt"),
        ("hello world", {}, "must be a list of prompts"),
        (["hello", ""], {}, "meter prompt 1 is ''"),
        ([3], {}, "meter prompt 0 is 3"),
        (Dataset.from_list([{"text": "a"}]), {}, "needs a `prompt` column"),
        (Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]), {},
         "reference completion of meter prompt 1 is None"),
        (None, {"num_prompts": 0}, "`num_prompts` must be a positive integer"),
        (None, {"kl_threshold": 0.0}, "must be positive"),
        (None, {"stop_on_kl": True}, "`stop_on_kl=True` needs `kl_threshold`"),
    ],
)
def test_bad_meter_input_is_refused_clearly(tiny_llama, tmp_path, prompts, kwargs, message):
    trainer = sft_trainer(tiny_llama, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=message):
        RetentionCallback(trainer, prompts=prompts, **kwargs)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"retention_num_prompts": 0}, "`retention_num_prompts` must be at least 1.*log_retention=False"),
        ({"retention_max_new_tokens": 0}, "`retention_max_new_tokens` must be at least 1"),
        ({"retention_kl_threshold": -1.0}, "`retention_kl_threshold` must be positive"),
        ({"retention_stop_on_kl": True}, "needs `retention_kl_threshold`"),
        ({"retention_stop_on_kl": True, "retention_kl_threshold": 0.2, "log_retention": False}, "needs the forgetting"),
    ],
)
def test_bad_meter_settings_are_refused_by_the_config(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        TMSConfig(recipe="paper", output_dir=str(tmp_path), **fields, **QUIET_CPU)


def test_meter_runs_in_online_tms(tiny_llama, tmp_path):
    config = TMSConfig(output_dir=str(tmp_path / "online"), tms_mode="online", num_checkpoints=2,
                       per_device_train_batch_size=4, num_train_epochs=1, learning_rate=3e-2, logging_steps=2,
                       max_new_tokens=4, retention_prompts=PROMPTS, retention_max_new_tokens=4, **QUIET_CPU)
    trainer = TMSTrainer(model=tiny_llama, args=config, train_dataset=make_examples(16, seed=0),
                         processing_class=load_tokenizer(tiny_llama), peft_config=LoraConfig(r=4, target_modules="all-linear"))
    trainer.train()
    entries = meter_entries(trainer.state.log_history, 3)
    assert [e["step"] for e in entries] == [0, 2, 4]
    # Step 2 also takes a snapshot, whose own log entry must not cancel the regular one.
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
    assert entries[0]["retention_kl"] == 0.0 and entries[-1]["retention_kl"] > 0
