"""The bandwidth bound of `benchmarks/speed.py` (benchmarks/bandwidth.py): the bytes a decode step reads."""

import os
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import build_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bandwidth import copy_bandwidth, decode_step_bytes, matmul_seconds, tokens_per_s_bound  # noqa: E402


@pytest.mark.parametrize("tied", [False, True])
def test_decode_step_bytes_count_weights_lora_and_kv_cache(tied):
    model, _ = build_model("llama")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    config = model.config
    embedding = model.get_input_embeddings().weight
    everything = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    step = decode_step_bytes(model, batch=8, context=10, snapshots=3)
    # An untied embedding is read for the 8 rows' tokens only; a tied one whole, by the output layer.
    expected_weights = everything if tied else everything - embedding.numel() * 4 + 8 * config.hidden_size * 4
    assert step["weights"] == expected_weights
    assert step["lora"] == 3 * adapter > 0
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    assert step["kv_cache"] == 2 * config.num_hidden_layers * kv_heads * head_dim * 4 * 10 * 8
    assert step["total"] == step["weights"] + step["lora"] + step["kv_cache"]


def test_bound_scales_with_rows_and_bandwidth():
    assert tokens_per_s_bound(1e9, 1e6, 8) == pytest.approx(8000)
    assert tokens_per_s_bound(2e9, 1e6, 16) == pytest.approx(4 * tokens_per_s_bound(1e9, 1e6, 8))
    assert copy_bandwidth(megabytes=8, repeats=2) > 1e8  # any machine copies faster than 100 MB/s


def test_matmul_seconds_counts_every_linear_layer_and_the_stacked_lora_factors():
    model, _ = build_model("llama")
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    base_flops = sum(2 * 8 * w.numel() for w in linear)  # lm_head included
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    one = matmul_seconds(model, batch=8, snapshots=1, repeats=1)
    three = matmul_seconds(model, batch=8, snapshots=3, repeats=1)
    assert one["flops"] == base_flops + 2 * 8 * adapter
    assert three["flops"] == base_flops + 3 * 2 * 8 * adapter
    assert one["seconds"] > 0 and one["flops_per_s"] == pytest.approx(one["flops"] / one["seconds"])
