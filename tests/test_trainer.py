"""End-to-end tests of TMSTrainer on a tiny local model: the three phases, what they leave behind, and bad input."""

import os

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from trl_tms import AdapterHistory, TMSConfig, TMSTrainer
from trl_tms.history import adapter_parameters
from trl_tms.pld import score_trajectories
from trl_tms.history import snapshot_steps


def tms_config(tmp_path, **overrides) -> TMSConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        num_checkpoints=3,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=1e-2,
        max_new_tokens=8,
        logging_steps=2,
        tms_mode="two_pass",
        **QUIET_CPU,
    )
    values.update(overrides)
    return TMSConfig(**values)


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def adapter_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter_parameters(trainer.model, trainer.adapter_name).items()}


class Recorder(TrainerCallback):
    """Records the adapter after every optimizer step and at the start of each phase."""

    def __init__(self):
        self.trainer = None
        self.after_step = {"harvest": {}, "student": {}}
        self.at_begin = {}
        self.optimizer_state_at_begin = {}
        self.mixture_epoch = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.at_begin[self.trainer.phase] = adapter_state(self.trainer)
        self.optimizer_state_at_begin[self.trainer.phase] = len(optimizer.state) if optimizer is not None else None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer.phase == "student":
            self.mixture_epoch.append(self.trainer.train_dataset.epoch)

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step[self.trainer.phase][state.global_step] = adapter_state(self.trainer)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """One complete TMS run (24 prompts, 2 epochs of batch 4: 12 steps, T=3), shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("run")
    recorder = Recorder()
    trainer = TMSTrainer(
        model=tiny_llama,
        # Every trajectory, so that generation's cover can be checked (`trajectories_to_generate="drawn"` below).
        args=tms_config(tmp_path, samples_per_checkpoint=2, snapshots_per_generate=2, trajectories_to_generate="all",
                        log_pld=True),
        train_dataset=make_examples(24, seed=0),
        eval_dataset=make_examples(8, seed=1),
        processing_class=load_tokenizer(tiny_llama),
        peft_config=lora(),
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    initial = adapter_state(trainer)
    trainer.train()
    return trainer, recorder, initial


def test_snapshot_count_and_steps(trained):
    trainer, _, _ = trained
    assert trainer.history.steps == [4, 8, 12]
    assert sorted(os.listdir(trainer.history_dir)) == ["step-12", "step-4", "step-8", "tms_run.json", "trajectories"]
    for step in trainer.history.steps:
        folder = trainer.history.path(step)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))


@pytest.mark.parametrize(
    ("total", "t", "expected"), [(12, 3, [4, 8, 12]), (10, 10, list(range(1, 11))), (10, 4, [2, 5, 7, 10])]
)
def test_snapshot_schedule_is_even_and_ends_at_the_last_step(total, t, expected):
    assert snapshot_steps(total, t) == expected


def test_snapshots_equal_the_adapter_at_their_step_and_differ(trained):
    trainer, recorder, _ = trained
    model_keys = {}
    for step in trainer.history.steps:
        live = recorder.after_step["harvest"][step]
        snapshot = trainer.history[step]
        assert len(snapshot) == len(live) > 0
        for name, tensor in live.items():
            key = name.replace(f".{trainer.adapter_name}", "")
            model_keys[key] = name
            torch.testing.assert_close(snapshot[key], tensor.cpu(), rtol=0, atol=0)
        on_disk = load_file(os.path.join(trainer.history.path(step), "adapter_model.safetensors"))
        assert set(on_disk) == set(snapshot)
        for key in snapshot:
            assert torch.equal(on_disk[key], snapshot[key])
    steps = trainer.history.steps
    for a, b in zip(steps, steps[1:]):
        diff = sum((trainer.history[a][k] - trainer.history[b][k]).abs().sum().item() for k in trainer.history[a])
        assert diff > 0, f"snapshots {a} and {b} are identical"


def test_the_harvest_is_plain_sft(trained, tiny_llama, tmp_path):
    """The last harvest snapshot is what `trl.SFTTrainer` (with a PLD callback) trains from the same settings and
    seed, and the harvest's PLD curve is its PLD curve: the study (`benchmarks/study.py`) reports the harvest as its
    SFT arm on the strength of this."""
    from trl import SFTConfig, SFTTrainer

    from trl_tms import PLDCallback

    trainer, _, _ = trained
    sft = SFTTrainer(
        model=tiny_llama,
        args=SFTConfig(str(tmp_path / "sft"), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
                       logging_steps=2, **QUIET_CPU),
        train_dataset=make_examples(24, seed=0),
        eval_dataset=make_examples(8, seed=1),
        processing_class=load_tokenizer(tiny_llama),
        peft_config=lora(),
    )
    sft.add_callback(PLDCallback(sft))
    sft.train()
    final = trainer.history[trainer.history.steps[-1]]
    trained_sft = adapter_parameters(sft.model, "default")
    assert len(trained_sft) == len(final) > 0
    for name, tensor in trained_sft.items():
        torch.testing.assert_close(final[name.replace(".default", "")], tensor.detach().cpu(), rtol=1e-6, atol=1e-7)
    harvest_pld = [(e["step"], e["pld"]) for e in trainer.state.log_history if e.get("tms_phase") == 1 and "pld" in e]
    sft_pld = [(e["step"], e["pld"]) for e in sft.state.log_history if "pld" in e]
    assert [s for s, _ in sft_pld] == [s for s, _ in harvest_pld]
    assert [p for _, p in sft_pld] == pytest.approx([p for _, p in harvest_pld], rel=1e-6)


def test_history_reopens_from_disk(trained):
    trainer, _, _ = trained
    reopened = AdapterHistory.open(trainer.history_dir)
    assert reopened.steps == trainer.history.steps
    for step in reopened.steps:
        for key, tensor in trainer.history[step].items():
            assert torch.equal(reopened[step][key], tensor)
    assert not [name for name in os.listdir(trainer.history_dir) if name.startswith(".")], "staging folders left"


def test_student_starts_from_the_initial_adapter_with_a_fresh_optimizer(trained):
    trainer, recorder, initial = trained
    student_start = recorder.at_begin["student"]
    harvest_end = recorder.after_step["harvest"][12]
    for name, tensor in initial.items():
        assert torch.equal(student_start[name], tensor)
    assert any(not torch.equal(harvest_end[n], initial[n]) for n in initial), "harvest did not move the adapter"
    assert recorder.optimizer_state_at_begin["student"] == 0
    # The student's first step moves away from the initial adapter, not from the harvest result.
    first = recorder.after_step["student"][1]
    dist_initial = sum((first[n] - initial[n]).pow(2).sum().item() for n in initial)
    dist_harvest = sum((first[n] - harvest_end[n]).pow(2).sum().item() for n in initial)
    assert dist_initial < dist_harvest


def test_student_runs_as_many_steps_as_the_harvest(trained):
    trainer, recorder, _ = trained
    assert sorted(recorder.after_step["student"]) == sorted(recorder.after_step["harvest"]) == list(range(1, 13))
    assert trainer.state.global_step == 12


def test_the_mixture_is_drawn_afresh_each_student_epoch(trained):
    trainer, recorder, _ = trained
    assert recorder.mixture_epoch == [0] * 6 + [1] * 6


def test_a_new_run_replaces_the_previous_history(tiny_llama, tmp_path):
    def run(t):
        trainer = TMSTrainer(
            model=tiny_llama,
            args=tms_config(tmp_path, num_checkpoints=t, num_train_epochs=1, log_pld=False),
            train_dataset=make_examples(8),
            processing_class=load_tokenizer(tiny_llama),
            peft_config=lora(),
        )
        trainer.train()
        return trainer

    run(2)
    trainer = run(1)
    assert sorted(os.listdir(trainer.history_dir)) == ["step-2", "tms_run.json", "trajectories"]
    assert set(trainer.trajectories["snapshot_step"]) == {2}


def test_trajectories_cover_every_prompt_and_snapshot(trained):
    trainer, _, _ = trained
    trajectories = trainer.trajectories
    assert len(trajectories) == 24 * 3 * 2
    seen = {(r["prompt_index"], r["snapshot_step"], r["sample_index"]) for r in trajectories}
    assert seen == {(i, s, k) for i in range(24) for s in (4, 8, 12) for k in (0, 1)}
    assert all(n <= 8 for n in trajectories["num_tokens"])
    assert trajectories[0]["prompt"] == make_examples(24, seed=0)[trajectories[0]["prompt_index"]]["prompt"]
    from datasets import load_from_disk

    saved = load_from_disk(os.path.join(trainer.history_dir, "trajectories"))
    assert saved["completion"] == trajectories["completion"]
    assert saved.column_names == [
        "prompt_index", "prompt", "completion", "snapshot_step", "sample_index", "finished", "num_tokens"
    ]


def test_pld_is_logged_in_both_phases(trained):
    trainer, _, _ = trained
    history = trainer.state.log_history
    for phase in (1, 2):
        entries = [e for e in history if e.get("tms_phase") == phase and "pld" in e]
        assert [e["step"] for e in entries] == [0, 2, 4, 6, 8, 10, 12]
        assert all(e["pld"] > 0 and e["pld_drift"] >= 0 for e in entries)
        values = [e["pld"] for e in entries]
        assert [e["pld_drift"] for e in entries] == pytest.approx([v - min(values[: i + 1]) for i, v in enumerate(values)])
    harvest = [e["pld"] for e in history if e.get("tms_phase") == 1 and "pld" in e]
    student = [e["pld"] for e in history if e.get("tms_phase") == 2 and "pld" in e]
    assert student[0] == pytest.approx(harvest[0])  # both start from the same initial adapter
    assert harvest[-1] < harvest[0]  # SFT on the labels lowers their NLL


def test_label_fraction_and_trajectory_counts_are_logged(trained):
    trainer, _, _ = trained
    history = trainer.state.log_history
    fractions = [e["tms_label_fraction"] for e in history if "tms_label_fraction" in e]
    assert len(fractions) == 6 and all(0 <= f <= 1 for f in fractions)
    assert not any("tms_label_fraction" in e for e in history if e.get("tms_phase") == 1)
    stats = next(e for e in history if "tms_trajectories" in e)
    assert stats["tms_trajectories"] == 144
    assert stats["tms_empty_trajectories"] + stats["tms_unfinished_trajectories"] <= 144


def test_save_model_writes_only_the_student_adapter(trained, tmp_path):
    trainer, recorder, _ = trained
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [f for f in files if f.startswith("tms_slot") or os.path.isdir(tmp_path / "final" / f)]
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    final = recorder.after_step["student"][12]
    assert set(saved) == {n.replace(f".{trainer.adapter_name}", "") for n in final}
    for name, tensor in final.items():
        assert torch.equal(saved[name.replace(f".{trainer.adapter_name}", "")], tensor)
    assert list(trainer.model.peft_config) == [trainer.adapter_name]


@pytest.mark.parametrize(
    "temperature, samples, peft_routing",
    # 1e-6: the sampling path (several samples share one prompt pass), as good as greedy.
    [(0.0, 1, False), (1e-6, 2, False), (1e-6, 2, True)],
)
def test_hot_swapped_generation_equals_a_fresh_load(trained, tiny_llama, monkeypatch, temperature, samples, peft_routing):
    from trl_tms import SamplingParams, generate_trajectories
    from trl_tms.routing import RowRouter

    if peft_routing:
        monkeypatch.setattr(RowRouter, "_stackable", lambda self: False)
    trainer, _, _ = trained
    prompts = make_examples(5, seed=7)
    sampling = SamplingParams(temperature=temperature, samples_per_checkpoint=samples, max_new_tokens=6, batch_size=4,
                              snapshots_per_generate=2)
    swapped = generate_trajectories(trainer.model, trainer.processing_class, prompts, trainer.history, sampling)
    tokenizer = load_tokenizer(tiny_llama)
    for step in trainer.history.steps:
        fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), trainer.history.path(step))
        fresh.eval()
        for index, example in enumerate(prompts):
            ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            out = fresh.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids.shape[1] :].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            expected = tokenizer.decode(new, skip_special_tokens=True)
            rows = [r for r in swapped if r["prompt_index"] == index and r["snapshot_step"] == step]
            assert [r["sample_index"] for r in rows] == list(range(samples))
            assert all(r["completion"][0]["content"] == expected for r in rows), f"step {step}, prompt {index}"
    # The trained adapter is active and trainable again, and no slot is left behind.
    assert list(trainer.model.peft_config) == [trainer.adapter_name]
    assert all(p.requires_grad for p in adapter_parameters(trainer.model, trainer.adapter_name).values())


def test_generating_given_pairs_samples_those_only_and_reads_them_back(trained, tmp_path, monkeypatch):
    from trl_tms import SamplingParams, generate_trajectories
    from trl_tms import trajectories as module

    trainer, _, _ = trained
    sampling = SamplingParams(samples_per_checkpoint=2, max_new_tokens=6, batch_size=8, snapshots_per_generate=2)
    inputs = (trainer.model, trainer.processing_class, make_examples(6, seed=7), trainer.history, sampling)
    pairs = {(0, 4), (3, 4), (3, 12), (5, 8)}
    first = generate_trajectories(*inputs, pairs=pairs, parts_dir=str(tmp_path / "parts"))
    rows = zip(first["prompt_index"], first["snapshot_step"], first["sample_index"])
    assert sorted(rows) == sorted((i, step, k) for i, step in pairs for k in (0, 1))
    assert len(os.listdir(tmp_path / "parts")) == 2  # snapshots 4 and 8 share a call, 12 has its own
    monkeypatch.setattr(module, "_generate_samples", lambda *args, **kwargs: pytest.fail("sampled again"))
    again = generate_trajectories(*inputs, pairs=pairs, parts_dir=str(tmp_path / "parts"))
    assert again["completion"] == first["completion"]
    with pytest.raises(ValueError, match="outside the 6"):
        generate_trajectories(*inputs, pairs={(6, 4)})


def test_by_default_only_the_trajectories_the_student_draws_are_sampled(tiny_llama, tmp_path):
    trainer = make_trainer(tiny_llama, tmp_path, args=tms_config(tmp_path, samples_per_checkpoint=2))
    assert trainer.args.generates_drawn_trajectories_only
    trainer.train()
    trajectories, mixture = trainer.trajectories, trainer.train_dataset
    sampled = set(zip(trajectories["prompt_index"], trajectories["snapshot_step"]))
    assert len(trajectories) == 2 * len(sampled) < 24 * 3 * 2  # both samples of a pair, far from every pair
    drawn = set()
    for epoch in range(2):
        for position in range(len(mixture)):
            row, is_label = mixture.draw(position, epoch)
            if not is_label:
                candidate = mixture.candidate(row)
                drawn.add((candidate["prompt_index"], candidate["snapshot_step"]))
    assert drawn <= sampled
    # A pair sampled and never drawn is one a draw landed on and found without any usable trajectory.
    usable = {(r["prompt_index"], r["snapshot_step"]) for r in trajectories if r["completion"][0]["content"].strip()}
    assert not (sampled - drawn) & usable
    stats = next(e for e in trainer.state.log_history if "tms_trajectories" in e)
    assert stats["tms_trajectories"] == len(trajectories)
    assert stats["tms_trajectories_not_sampled"] == 24 * 3 * 2 - len(trajectories)


def test_drawn_trajectories_by_default_where_the_draw_allows_it(tmp_path):
    assert tms_config(tmp_path).generates_drawn_trajectories_only
    assert tms_config(tmp_path, trajectory_filter="verifier").generates_drawn_trajectories_only
    assert tms_config(tmp_path, tms_mode="online").generates_drawn_trajectories_only
    for every in (dict(trajectory_choice="pld"), dict(trajectory_choice="curriculum"),
                  dict(trajectory_filter="self_consistency"), dict(trajectories_to_generate="all")):
        assert not tms_config(tmp_path, **every).generates_drawn_trajectories_only, every
    with pytest.raises(ValueError, match="trajectories_to_generate='all'"):
        tms_config(tmp_path, trajectories_to_generate="drawn", trajectory_choice="pld")


@pytest.mark.parametrize("fmt", ["standard", "messages"])
def test_other_dataset_formats_run_end_to_end(fmt, tiny_llama, tmp_path):
    trainer = TMSTrainer(
        model=tiny_llama,
        args=tms_config(tmp_path, num_checkpoints=2, num_train_epochs=1, logging_steps=1),
        train_dataset=make_examples(8, seed=0, fmt=fmt),
        eval_dataset=make_examples(4, seed=1, fmt=fmt),
        processing_class=load_tokenizer(tiny_llama),
        peft_config=lora(),
    )
    trainer.train()
    assert trainer.history.steps == [1, 2]
    completion = trainer.trajectories[0]["completion"]
    assert isinstance(completion, str) if fmt == "standard" else completion[0]["role"] == "assistant"
    assert trainer.state.global_step == 2


def test_empty_trajectories_are_left_out_and_counted(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = load_tokenizer(tiny_llama)
    with torch.no_grad():  # a model that always says EOS first: every trajectory is empty
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
        model.model.norm.weight.fill_(100.0)
    trainer = TMSTrainer(
        model=model,
        args=tms_config(tmp_path, num_checkpoints=2, num_train_epochs=1, learning_rate=1e-5, temperature=0.0),
        train_dataset=make_examples(8, seed=0),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    assert all(text == "" for text in (c[0]["content"] for c in trainer.trajectories["completion"]))
    stats = next(e for e in trainer.state.log_history if "tms_empty_trajectories" in e)
    trajectories = trainer.trajectories
    assert stats["tms_empty_trajectories"] == len(trajectories) > 0
    assert len(trajectories) + stats.get("tms_trajectories_not_sampled", 0) == 8 * 2
    # Only drawn pairs are sampled: a prompt whose draw landed on an empty trajectory drew again, until it had tried
    # both snapshots and fell back to its label.
    assert all(trajectories["prompt_index"].count(i) == 2 for i in set(trajectories["prompt_index"]))
    fractions = [e["tms_label_fraction"] for e in trainer.state.log_history if "tms_label_fraction" in e]
    assert fractions and all(f == 1.0 for f in fractions)  # labels only: nothing else to train on


def test_label_weight_one_generates_no_trajectory(tiny_llama, tmp_path):
    trainer = make_trainer(tiny_llama, tmp_path, args=tms_config(tmp_path, label_weight=1.0, num_train_epochs=1))
    trainer.generator.generate = lambda steps=None: pytest.fail("generated trajectories nobody can draw")
    trainer.train()
    assert len(trainer.history) == 3 and len(trainer.trajectories) == 0
    fractions = [e["tms_label_fraction"] for e in trainer.state.log_history if "tms_label_fraction" in e]
    assert fractions and all(f == 1.0 for f in fractions)


# Bad input: a clear error before any training starts


def make_trainer(tiny_llama, tmp_path, **kwargs):
    values = dict(
        model=tiny_llama,
        args=tms_config(tmp_path),
        train_dataset=make_examples(24),
        processing_class=load_tokenizer(tiny_llama),
        peft_config=lora(),
    )
    values.update(kwargs)
    return TMSTrainer(**values)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("label_weight", 1.5, "label_weight"),
        ("label_weight", -0.1, "label_weight"),
        ("num_checkpoints", 0, "num_checkpoints"),
        ("samples_per_checkpoint", 0, "samples_per_checkpoint"),
        ("temperature", -1.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("max_new_tokens", 0, "max_new_tokens"),
    ],
)
def test_bad_config_values_raise(field, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        tms_config(tmp_path, **{field: value})


def test_no_lora_raises(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="peft_config=LoraConfig"):
        make_trainer(tiny_llama, tmp_path, peft_config=None)


def test_non_lora_adapter_raises(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="LoRA"):
        make_trainer(tiny_llama, tmp_path, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_peft_model_is_accepted(tiny_llama, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora())
    trainer = make_trainer(tiny_llama, tmp_path, model=model, peft_config=None)
    assert trainer.adapter_name == "default"


def test_text_dataset_raises(tiny_llama, tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="no prompts"):
        make_trainer(tiny_llama, tmp_path, train_dataset=Dataset.from_dict({"text": ["hello world"] * 8}))


def test_messages_without_final_assistant_turn_raise(tiny_llama, tmp_path):
    from datasets import Dataset

    bad = Dataset.from_list([{"messages": [{"role": "user", "content": "hello"}]}] * 8)
    with pytest.raises(ValueError, match="assistant turn"):
        make_trainer(tiny_llama, tmp_path, train_dataset=bad)


def test_empty_label_raises(tiny_llama, tmp_path):
    from datasets import Dataset

    bad = Dataset.from_list([{"prompt": "what is one plus one ?", "completion": "  "}] * 8)
    with pytest.raises(ValueError, match="empty completion"):
        make_trainer(tiny_llama, tmp_path, train_dataset=bad)


def test_more_checkpoints_than_steps_raises(tiny_llama, tmp_path):
    # 24 prompts, batch 4, 2 epochs: 12 optimizer steps.
    with pytest.raises(ValueError, match=r"`num_checkpoints` \(13\) exceeds the number of optimizer steps .*\(12\)"):
        make_trainer(tiny_llama, tmp_path, args=tms_config(tmp_path, num_checkpoints=13))


def test_eval_set_without_labels_raises(tiny_llama, tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match='no "completion" column'):
        make_trainer(tiny_llama, tmp_path, eval_dataset=Dataset.from_dict({"prompt": ["what is one plus one ?"] * 4}))


def test_formatting_func_and_optimizer_instances_raise(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="formatting_func"):
        make_trainer(tiny_llama, tmp_path, formatting_func=lambda example: example["prompt"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        make_trainer(tiny_llama, tmp_path, optimizers=(optimizer, None))


def test_sft_config_is_converted(tiny_llama, tmp_path):
    from trl import SFTConfig

    args = SFTConfig(
        output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, report_to="none", bf16=False, use_cpu=True,
        eos_token="</s>", max_length=64,
    )
    trainer = make_trainer(tiny_llama, tmp_path, args=args)
    assert isinstance(trainer.args, TMSConfig)
    assert (trainer.args.eos_token, trainer.args.max_length, trainer.args.output_dir) == ("</s>", 64, str(tmp_path / "o"))
    # With the TMS defaults: the default recipe (online TMS at label_weight 0.75), T = 5.
    assert (trainer.args.num_checkpoints, trainer.args.tms_mode, trainer.args.label_weight) == (5, "online", 0.75)


class LogSink(TrainerCallback):
    """Stands in for a reporter (wandb, tensorboard, trackio): they all read the logs in `on_log`."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_gradient_accumulation_reporters_and_seeded_trajectories(tiny_llama, tmp_path):
    def run(name):
        sink = LogSink()
        trainer = TMSTrainer(
            model=tiny_llama,
            args=tms_config(tmp_path / name, gradient_accumulation_steps=2, per_device_train_batch_size=2, log_pld=True),
            train_dataset=make_examples(24, seed=0),
            eval_dataset=make_examples(4, seed=1),
            processing_class=load_tokenizer(tiny_llama),
            peft_config=lora(),
            callbacks=[sink],
        )
        trainer.train()
        return trainer, sink

    trainer, sink = run("a")
    # 24 prompts, 2 x 2 per optimizer step, 2 epochs: 12 optimizer steps.
    assert trainer.history.steps == [4, 8, 12] and trainer.state.global_step == 12
    for phase in (1, 2):
        assert any("pld" in log and log.get("tms_phase") == phase for log in sink.logs)
    assert any("tms_label_fraction" in log for log in sink.logs)
    again, _ = run("b")
    assert again.trajectories["completion"] == trainer.trajectories["completion"]


@pytest.mark.parametrize("native, warned", [(False, True), (True, False), (None, False)])
def test_emulated_bf16_on_cpu_is_flagged(monkeypatch, native, warned):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    import trl_tms.config as config_module

    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native)
    with CaptureLogger(logging.get_logger("trl_tms.config")) as captured:
        TMSConfig("x", use_cpu=True)
    assert ("Pass `bf16=False`" in captured.out) == warned
    with CaptureLogger(logging.get_logger("trl_tms.config")) as captured:
        TMSConfig("x", use_cpu=True, bf16=False)  # the user chose: nothing to say
    assert "bf16" not in captured.out


def test_bf16_default_matches_sft_config_where_sft_config_works():
    from trl import SFTConfig

    assert TMSConfig("x", use_cpu=True).bf16 == SFTConfig("x", use_cpu=True).bf16
    assert TMSConfig("x", use_cpu=True, bf16=False).bf16 is False
    if not torch.cuda.is_available():
        assert TMSConfig("x").bf16 is False  # SFTConfig("x") raises here
        with pytest.raises(ValueError, match="bf16"):
            SFTConfig("x")


def test_pld_trajectory_choice_scores_every_trajectory_under_the_student(tiny_llama, tmp_path):
    args = tms_config(tmp_path, trajectory_choice="pld", samples_per_checkpoint=2, label_weight=0.25, eval_strategy="no")
    trainer = TMSTrainer(model=tiny_llama, args=args, train_dataset=make_examples(16), peft_config=lora(),
                         eval_dataset=make_examples(4, seed=1), processing_class=load_tokenizer(tiny_llama))
    trainer.train()
    # PLD logging is off by default (`log_pld`), even with an evaluation set: the choice scores the trajectories itself.
    assert trainer.pld_callback is None and not any("pld" in e for e in trainer.state.log_history)
    scored = [e for e in trainer.state.log_history if "tms_chosen_nll" in e]
    assert len(scored) == 2  # once per student epoch
    assert all(e["tms_chosen_nll"] <= e["tms_trajectory_nll"] for e in scored)

    # The student's candidates, built again from the trajectories as the trainer built them.
    mixture, candidates = trainer.train_dataset, trainer.candidate_builder.build(trainer.trajectories)[0]
    rescored = score_trajectories(trainer, mixture, candidates)  # again, under the final student, to check by hand
    model = trainer.model.eval()
    assert len(mixture.trajectory_rows) == 16 * 3 * 2 - trainer.stats.empty
    rows = mixture.rows_to_score()  # those of the prompts that draw a trajectory in the last epoch
    assert 0 < len(rows) < len(mixture.trajectory_rows)
    for row in rows[::5]:
        ids, labels = torch.tensor([candidates[row]["input_ids"]]), torch.tensor(candidates[row]["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        targets = labels[1:]
        mask = targets != -100
        nll = -torch.log_softmax(logits.double(), -1)[torch.arange(len(targets)), targets.clamp(min=0)][mask].mean()
        assert mixture.scores[row] == pytest.approx(nll.item(), rel=1e-4)
    prompt_of = list(candidates["prompt_index"])
    drawn_steps = []
    for position in range(len(mixture)):
        row, is_label = mixture.draw(position, epoch=1)
        if not is_label:
            own = [r for r in rows if prompt_of[r] == prompt_of[row]]
            assert mixture.scores[row] == min(mixture.scores[r] for r in own)
            drawn_steps.append(candidates[row]["snapshot_step"])
    assert rescored["tms_chosen_snapshot_step"] == pytest.approx(sum(drawn_steps) / len(drawn_steps))
    steps = trainer.history.steps
    assert all(steps[0] <= e["tms_chosen_snapshot_step"] <= steps[-1] for e in scored)  # logged each epoch


def test_curriculum_trajectory_choice_knows_the_number_of_student_epochs(tiny_llama, tmp_path):
    args = tms_config(tmp_path, trajectory_choice="curriculum", num_train_epochs=3, eval_strategy="no")
    trainer = TMSTrainer(model=tiny_llama, args=args, train_dataset=make_examples(16), peft_config=lora(),
                         processing_class=load_tokenizer(tiny_llama))
    trainer.train()
    mixture = trainer.train_dataset
    assert mixture.num_epochs == 3
    steps = trainer.history.steps  # 3 snapshots, 3 epochs: one snapshot an epoch, earliest first
    candidates = trainer.candidate_builder.build(trainer.trajectories)[0]
    step_of, prompt_of = list(candidates["snapshot_step"]), list(candidates["prompt_index"])
    has = {(prompt_of[row], step_of[row]) for row in mixture.trajectory_rows}
    for epoch, step in enumerate(steps):
        drawn = [mixture.draw(p, epoch)[0] for p in range(len(mixture)) if not mixture.draw(p, epoch)[1]]
        assert drawn
        for row in drawn:
            # A prompt whose trajectory of this snapshot came out empty takes a neighbouring snapshot's.
            assert step_of[row] == step or (prompt_of[row], step) not in has


def test_rows_that_reach_eos_leave_the_batch_and_the_rest_continue_unchanged(tiny_llama, monkeypatch):
    import contextlib

    import trl_tms.generation as generation
    import trl_tms.trajectories as trajectories

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = load_tokenizer(tiny_llama)
    prompts = [tokenizer(f"what is {a} plus {b} ?")["input_ids"] for a, b in
               [("one", "two"), ("ten", "six"), ("five", "five"), ("nine", "one"), ("two", "two"), ("six", "ten")]]
    input_ids, attention_mask = generation.left_pad(prompts, tokenizer.pad_token_id)
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    with torch.no_grad():
        free = model.generate(input_ids=input_ids, attention_mask=attention_mask, **greedy, eos_token_id=None)
    free = free[:, input_ids.shape[1]:].tolist()
    # An "EOS" that some rows produce early and others never: those rows must leave the batch.
    counts = {}
    for row in free:
        for token in set(row[:4]):
            counts[token] = counts.get(token, 0) + 1
    eos = min((t for t, c in counts.items() if 0 < c < len(free)), key=lambda t: abs(counts[t] - len(free) / 2))
    expected = [row[: row.index(eos)] if eos in row else row for row in free]

    batch_sizes = []

    @contextlib.contextmanager
    def route(row_slots):
        batch_sizes.append(len(row_slots))
        yield {}

    monkeypatch.setattr(generation, "DROP_FINISHED_EVERY", 4)
    with torch.no_grad():
        tokens = trajectories._generate_samples(
            model, input_ids, attention_mask, ["s"] * len(prompts), route, {**greedy, "eos_token_id": eos}, {eos}
        )
    assert [generation.until_eos(row, {eos})[0] for row in tokens] == expected
    assert batch_sizes[0] == len(prompts) and batch_sizes[-1] < len(prompts) and batch_sizes == sorted(batch_sizes)[::-1]
    assert len(batch_sizes) == 3  # 12 tokens, 4 at a time, some row still going until the end

    # A fixed-size cache can neither grow past its first call nor drop rows: one call, the same tokens.
    model.generation_config.cache_implementation = "static"
    batch_sizes.clear()
    with torch.no_grad():
        tokens = trajectories._generate_samples(
            model, input_ids, attention_mask, ["s"] * len(prompts), route, {**greedy, "eos_token_id": eos}, {eos}
        )
    assert [generation.until_eos(row, {eos})[0] for row in tokens] == expected
    assert batch_sizes == [len(prompts)]


def test_samples_of_a_prompt_share_one_pass_over_it(tiny_llama):
    import contextlib

    import trl_tms.generation as generation
    import trl_tms.trajectories as trajectories

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = load_tokenizer(tiny_llama)
    prompts = [tokenizer(text)["input_ids"] for text in ["what is one plus two ?", "name a color", "ten"]]
    input_ids, attention_mask = generation.left_pad(prompts, tokenizer.pad_token_id)
    width, samples = input_ids.shape[1], 4
    shapes = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)

    @contextlib.contextmanager
    def route(row_slots):
        yield {}

    base = dict(max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, use_cache=True, eos_token_id=None)
    sampled = dict(base, do_sample=True, temperature=1.0, top_p=1.0, top_k=None)
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = trajectories._generate_samples(
            model, input_ids, attention_mask, ["s"] * 3, route, sampled, set(), samples=samples
        )
    # The prompts (but their last token) are encoded once for the 3 rows; the 12 samples start at the last token.
    assert shapes[0] == (3, width - 1)
    assert shapes[1] == (3 * samples, 1) and all(s[1] == 1 for s in shapes[1:])
    assert len(tokens) == 3 * samples and all(len(t) == 6 for t in tokens)
    # The samples diverge from their first token on (the prompt pass samples nothing that is kept).
    for row in range(3):
        assert len({tuple(t) for t in tokens[row * samples : (row + 1) * samples]}) > 1
        assert len({t[0] for t in tokens[row * samples : (row + 1) * samples]}) > 1

    # The shared pass gives the samples the same distribution as separate rows would: with a temperature near 0
    # sampling is greedy, and every sample equals a plain `generate` of its prompt.
    with torch.no_grad():
        plain = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, **base)
        near_greedy = trajectories._generate_samples(
            model, input_ids, attention_mask, ["s"] * 3, route, dict(sampled, temperature=1e-6), set(), samples=samples
        )
    plain = plain[:, width:].tolist()
    assert near_greedy == [row for row in plain for _ in range(samples)]

    # Greedy samples are all the same: each prompt is generated once.
    shapes.clear()
    with torch.no_grad():
        greedy = trajectories._generate_samples(
            model, input_ids, attention_mask, ["s"] * 3, route, dict(base, do_sample=False), set(), samples=samples
        )
    hook.remove()
    assert greedy == [row for row in plain for _ in range(samples)]
    assert shapes[0] == (3, width) and all(s[0] == 3 for s in shapes)


def test_without_the_shared_prompt_pass_each_sample_encodes_its_prompt(tiny_llama, monkeypatch):
    """`SHARE_PROMPT_PASS = False`: the reference `benchmarks/speed.py` times the shared prompt pass against."""
    import contextlib

    import trl_tms.generation as generation
    import trl_tms.trajectories as trajectories

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = load_tokenizer(tiny_llama)
    prompts = [tokenizer(text)["input_ids"] for text in ["what is one plus two ?", "name a color", "ten"]]
    input_ids, attention_mask = generation.left_pad(prompts, tokenizer.pad_token_id)
    shapes = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)

    @contextlib.contextmanager
    def route(row_slots):
        yield {}

    monkeypatch.setattr(trajectories, "SHARE_PROMPT_PASS", False)
    sampled = dict(max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, use_cache=True, eos_token_id=None,
                   do_sample=True, temperature=1.0, top_p=1.0, top_k=None)
    with torch.no_grad():
        tokens = trajectories._generate_samples(model, input_ids, attention_mask, ["s"] * 3, route, sampled, set(),
                                                samples=4)
    hook.remove()
    assert shapes[0] == (12, input_ids.shape[1])  # every sample a row of its own, its whole prompt encoded
    assert len(tokens) == 12 and all(len(t) == 6 for t in tokens)


def test_generation_rows_by_memory_count_the_kv_cache_a_call_really_holds(tiny_llama):
    import trl_tms.generation as generation

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = load_tokenizer(tiny_llama)
    prompts = [tokenizer(f"what is {a} plus two ?")["input_ids"] for a in ("one", "ten", "five")]
    input_ids, attention_mask = generation.left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
    cache = output.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    positions = cache.get_seq_length()  # the prompt and the new tokens but the last
    per_token = generation.generation_bytes_per_row(model, 1, 0) - generation.generation_bytes_per_row(model, 0, 0)
    assert held == 3 * positions * per_token
    logits = generation.generation_bytes_per_row(model, 0, 0)
    assert logits == generation.LOGIT_COPIES * model.config.vocab_size * 4
    per_row = generation.generation_bytes_per_row(model, 10, 6)
    assert per_row == 16 * per_token + logits
    assert generation.rows_within_memory(model, 10, 6, budget_mb=7 * per_row / 2**20) == 7
    with pytest.raises(ValueError, match=r"holds 2 rows.*needs at least 4.*Raise it to at least"):
        generation.rows_within_memory(model, 10, 6, budget_mb=2.5 * per_row / 2**20, min_rows=4)


def test_a_memory_budget_sets_the_rows_per_generate_call(tiny_llama, tmp_path):
    from trl_tms.data import prompt_token_ids
    from trl_tms.generation import generation_bytes_per_row

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = load_tokenizer(tiny_llama)
    examples = make_examples(24)
    longest = max(len(prompt_token_ids(tokenizer, example)) for example in examples)
    per_row = generation_bytes_per_row(model, longest, 8)
    trainer = make_trainer(tiny_llama, tmp_path, model=model, train_dataset=examples,
                           args=tms_config(tmp_path, generation_memory_mb=6.5 * per_row / 2**20))
    assert trainer.generator.sampling.batch_size == 6  # 6 rows fit; generation_batch_size (16) would be more
    trainer.train()
    assert trainer.stats.trajectories > 0
    roomy = make_trainer(tiny_llama, tmp_path / "roomy", args=tms_config(tmp_path / "roomy", generation_memory_mb=1e4))
    assert roomy.generator.sampling.batch_size == 16  # never more rows than generation_batch_size
    with pytest.raises(ValueError, match=r"`generation_memory_mb=0.001` holds 0 rows.*needs at least 3.*Raise it to at least 0.0"):
        make_trainer(tiny_llama, tmp_path / "tight", args=tms_config(tmp_path / "tight", generation_memory_mb=1e-3))
    with pytest.raises(ValueError, match="must be positive"):
        tms_config(tmp_path, generation_memory_mb=0)


def test_trajectories_ignore_the_sampling_settings_of_the_model_generation_config(tiny_llama):
    """
    TMS samples from `SamplingParams` alone (the distribution the vLLM backend samples too), not from whatever a
    model's `generation_config` adds: a repetition penalty, n-gram blocking, suppressed tokens, a top-k of its own.
    """
    from trl_tms import SamplingParams, generate_trajectories
    from trl_tms.data import prompt_token_ids

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear"))
    tokenizer = load_tokenizer(tiny_llama)
    history = AdapterHistory(model.peft_config["default"])
    history.take(model, 1)  # LoRA B at zero: the snapshot samples as the base model does
    prompts = make_examples(4, seed=5)
    eos, new_tokens = tokenizer.eos_token_id, 8

    def argmax_decode(ids: list[int]) -> str:
        ids, new = list(ids), []
        with torch.no_grad():
            while len(new) < new_tokens:
                token = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
                if token == eos:
                    break
                ids.append(token)
                new.append(token)
        return tokenizer.decode(new, skip_special_tokens=True)

    model.eval()
    prompt_ids = [prompt_token_ids(tokenizer, example, None) for example in prompts]
    expected = [argmax_decode(ids) for ids in prompt_ids]
    extras = dict(repetition_penalty=5.0, no_repeat_ngram_size=1, top_k=1,
                  suppress_tokens=[tokenizer.convert_tokens_to_ids("the")])
    for key, value in extras.items():
        setattr(model.generation_config, key, value)
    with torch.no_grad():  # the model's own `generate` applies them: they change these greedy answers
        plain = [model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0, len(ids):]
                 for ids in prompt_ids]
    assert [tokenizer.decode(t[t != eos] if eos not in t else t[: t.tolist().index(eos)], skip_special_tokens=True)
            for t in plain] != expected

    greedy = generate_trajectories(model, tokenizer, prompts, history,
                                   SamplingParams(temperature=0.0, max_new_tokens=new_tokens), disable_tqdm=True)
    assert [row["completion"][0]["content"] for row in greedy] == expected
    # Sampled at temperature 1 without top-k (`top_k=0`), not with the model's `top_k=1`, which makes samples greedy.
    sampled = generate_trajectories(model, tokenizer, prompts, history, SamplingParams(
        temperature=1.0, top_k=0, samples_per_checkpoint=4, max_new_tokens=new_tokens), disable_tqdm=True)
    for index in range(len(prompts)):
        samples = [row["completion"][0]["content"] for row in sampled if row["prompt_index"] == index]
        assert len(set(samples)) > 1, samples
    # The model's settings are its own again.
    assert {key: getattr(model.generation_config, key) for key in extras} == extras
