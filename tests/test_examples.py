"""The examples run as written: their functions on a tiny local model, their YAML configs through the CLI parser."""

import glob
import importlib.util
import json
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


def test_pld_on_sft_example(tiny_llama, tmp_path):
    entries = example("pld_on_sft").run(
        tiny_llama, make_examples(16), make_examples(4, seed=1), str(tmp_path), load_tokenizer(tiny_llama), **TINY
    )
    assert [e["step"] for e in entries] == [0, 2, 4, 6, 8]
    assert all(e["pld_drift"] >= 0 for e in entries)


def test_compare_sft_tms_example(tiny_llama, tmp_path):
    module = example("compare_sft_tms")
    curves = module.compare(
        lambda: tiny_llama, make_examples(16), make_examples(4, seed=1), str(tmp_path), load_tokenizer(tiny_llama),
        tms={"num_checkpoints": 2, "max_new_tokens": 4}, **TINY,
    )
    assert [s for s, _ in curves["sft"]] == [s for s, _ in curves["tms"]] == [0, 2, 4, 6, 8]
    assert curves["sft"][0][1] == pytest.approx(curves["tms"][0][1])  # same base, same held-out labels
    saved = json.load(open(tmp_path / "pld_curves.json"))
    assert [list(p) for p in curves["sft"]] == saved["sft"]
