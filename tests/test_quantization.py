"""QLoRA: a 4-bit base through all three phases, and training after generation that stays correct on CPU."""

import importlib.util
import os

import pytest
import torch
from conftest import load_tokenizer, make_examples
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_tms import AdapterHistory, SamplingParams, TMSConfig, TMSTrainer, generate_trajectories
from trl_tms.quantization import keep_4bit_layers_trainable

from tiny import save_tiny

bnb = pytest.importorskip("bitsandbytes")
has_avx512bf16 = bnb.functional.has_avx512bf16
# scripts/gpu_check.sh runs this file with TMS_TEST_DEVICE=cuda.
DEVICE = os.environ.get("TMS_TEST_DEVICE", "cpu")


def nf4() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def qlora_model(path, seed=0):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4(), device_map=DEVICE)
    torch.manual_seed(seed)
    # Non-zero B so that every LoRA factor gets a gradient.
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def lora_grads(model, batch):
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])  # no bias / bias in the attention projections
def test_gradients_after_generation_equal_those_of_a_model_that_never_generated(arch, request):
    path = request.getfixturevalue(arch)
    tokenizer = load_tokenizer(path)
    text = ["what is one plus two ? the answer is one two .", "what is ten plus ten ? the answer is ten ten ."]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}

    reference = lora_grads(qlora_model(path), batch)

    model = qlora_model(path)
    assert keep_4bit_layers_trainable(model) == sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) > 0
    history = AdapterHistory(model.peft_config["default"])
    history.take(model, step=1)
    out = generate_trajectories(
        model, tokenizer, make_examples(4), history, SamplingParams(max_new_tokens=4, snapshots_per_generate=1)
    )
    assert len(out) == 4
    after = lora_grads(model, batch)

    assert set(after) == set(reference)
    for name in reference:
        torch.testing.assert_close(after[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(DEVICE != "cpu" or not has_avx512bf16(), reason="the repacking happens on AVX512-BF16 CPUs")
def test_a_model_repacked_before_training_is_refused(tmp_path):
    # Wide enough for bitsandbytes' CPU repacking to succeed (on the 32-wide model it crashes instead).
    path = save_tiny(str(tmp_path / "llama128"), "llama", hidden_size=128)
    tokenizer = load_tokenizer(path)
    model = qlora_model(path)
    model.eval()
    with torch.no_grad():  # the user samples once before training: bitsandbytes repacks every 4-bit layer
        model.generate(**tokenizer(["what is one"], return_tensors="pt"), max_new_tokens=2, do_sample=False)
    with pytest.raises(RuntimeError, match="Load the model afresh"):
        TMSTrainer(
            model=model,
            args=TMSConfig(recipe="paper", output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False),
            train_dataset=make_examples(8),
            processing_class=tokenizer,
        )


def test_tms_runs_all_phases_on_a_4bit_base(tiny_qwen2, tmp_path):
    trainer = TMSTrainer(
        model=tiny_qwen2,
        args=TMSConfig(
            recipe="paper",
            output_dir=str(tmp_path / "out"),
            num_checkpoints=2,
            per_device_train_batch_size=4,
            num_train_epochs=1,
            learning_rate=1e-2,
            max_new_tokens=6,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=False,
            use_cpu=DEVICE == "cpu",
            disable_tqdm=True,
            model_init_kwargs={"device_map": DEVICE},
        ),
        train_dataset=make_examples(8),
        eval_dataset=make_examples(4, seed=1),
        processing_class=load_tokenizer(tiny_qwen2),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        quantization_config=nf4(),
    )
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    trainer.train()
    assert trainer.history.steps == [1, 2] and 0 < len(trainer.trajectories) <= 16
    assert len(trainer.trajectories) + trainer.stats.not_sampled == 16  # the pairs the student draws, of 8 x 2
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in layers)  # never merged into the 4-bit weights
    entries = [e for e in trainer.state.log_history if "loss" in e]
    assert entries and all(torch.isfinite(torch.tensor(e["loss"])) for e in entries)


def test_tms_runs_all_phases_on_a_model_already_loaded_in_4bit(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=nf4(), device_map=DEVICE)
    trainer = TMSTrainer(
        model=model,
        args=TMSConfig(
            recipe="paper",
            output_dir=str(tmp_path / "out"), num_checkpoints=2, per_device_train_batch_size=4, num_train_epochs=1,
            max_new_tokens=4, save_strategy="no", report_to="none", bf16=False, use_cpu=DEVICE == "cpu",
            disable_tqdm=True, log_pld=True,
        ),
        train_dataset=make_examples(8),
        eval_dataset=make_examples(4, seed=1),
        processing_class=load_tokenizer(tiny_llama),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    assert trainer.history.steps == [1, 2] and 0 < len(trainer.trajectories) <= 16
    assert len(trainer.trajectories) + trainer.stats.not_sampled == 16  # the pairs the student draws, of 8 x 2
    assert [e["tms_phase"] for e in trainer.state.log_history if "pld" in e and e["step"] == 0] == [1, 2]


def test_4bit_without_bitsandbytes_raises(tiny_llama, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k)
    )
    with pytest.raises(ImportError, match="pip install"):
        TMSTrainer(
            model=tiny_llama,
            args=TMSConfig(recipe="paper", output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
            train_dataset=make_examples(8),
            processing_class=load_tokenizer(tiny_llama),
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
            quantization_config=nf4(),
        )


def test_8bit_with_a_non_lora_adapter_raises(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="LoraConfig"):
        TMSTrainer(
            model=tiny_llama,
            args=TMSConfig(recipe="paper", output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
            train_dataset=make_examples(8),
            processing_class=load_tokenizer(tiny_llama),
            peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        )


# Run before `import trl_tms` in a fresh interpreter: every network connection raises and is recorded (bitsandbytes
# swallows the error, so only the record shows it), and bitsandbytes is told the CPU has AVX512-BF16, the CPUs on which
# its import looks a kernel up on the Hub, so that the check does not depend on the machine.
NO_NETWORK_PRELUDE = """
import importlib.abc, importlib.machinery, socket, sys, traceback
attempts, claimed = [], []

def refuse(*args, **kwargs):
    attempts.append("".join(traceback.format_stack(limit=12)))
    raise RuntimeError("network")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse

class ClaimAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
            claimed.append(name)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, ClaimAvx512Bf16())
"""


def test_importing_trl_tms_makes_no_network_request():
    import json
    import subprocess
    import sys

    check = NO_NETWORK_PRELUDE + (
        "import json, os\n"
        "import trl_tms\n"
        "from huggingface_hub import constants\n"
        "print(json.dumps({'attempts': attempts, 'claimed': claimed, 'offline_after': constants.HF_HUB_OFFLINE,"
        " 'env': os.environ.get('HF_HUB_OFFLINE')}))\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["claimed"] == ["bitsandbytes.functional"]  # the Hub lookup's code path did run
    assert result["attempts"] == [], result["attempts"][0]
    # The offline switch was on only while bitsandbytes was imported; the user's settings are as they were.
    assert result["offline_after"] is False and result["env"] is None
    assert "gemm_4bit_forward" not in done.stderr
