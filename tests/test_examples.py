"""The examples run as written: their functions on a tiny local model, their YAML configs through the CLI parser."""

import glob
import json
import importlib.util
import os

import pytest
from conftest import load_tokenizer, make_examples

from trl_tms.cli import check_arguments, make_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = dict(per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2, use_cpu=True, bf16=False,
            disable_tqdm=True)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml"))))
def test_yaml_configs_parse(path):
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=["--config", path])
    check_arguments(script_args, model_args)
    assert model_args.use_peft and training_args.num_checkpoints >= 1
    if "qlora" in os.path.basename(path):
        assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4"


def test_retention_dial_example(tiny_llama, tmp_path):
    curve = example("retention_dial").run(
        tiny_llama, make_examples(16), make_examples(4, seed=1), str(tmp_path), load_tokenizer(tiny_llama),
        **dict(TINY, learning_rate=3e-2)
    )
    kls = [p.retention_kl for p in curve.points]
    assert curve.scales == [0.0, 0.25, 0.5, 0.75, 1.0] and kls[-1] > 0
    # Within half the trained adapter's drift, and the largest such scale.
    chosen = curve.point(curve.chosen_scale)
    assert chosen.retention_kl <= kls[-1] / 2
    assert all(p.retention_kl > kls[-1] / 2 for p in curve.points if p.scale > curve.chosen_scale)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["lora_alpha"] == 128 * curve.chosen_scale
    assert os.path.isfile(os.path.join(tmp_path, "adapter_scale.json"))


def test_forgetting_on_sft_example(tiny_llama, tmp_path):
    entries = example("forgetting_on_sft").run(
        tiny_llama, make_examples(16), make_examples(4, seed=1), str(tmp_path), load_tokenizer(tiny_llama), **TINY
    )
    assert [e["step"] for e in entries] == [0, 2, 4, 6, 8]
    assert entries[0]["retention_kl"] == 0.0 and entries[-1]["retention_kl"] > 0
    assert all(e["pld_drift"] >= 0 and "pld" in e for e in entries)
