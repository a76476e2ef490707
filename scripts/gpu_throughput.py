"""One throughput line for the QLoRA path: snapshot ms, swap ms and trajectory tokens/s on a 4-bit base.

The base is a randomly initialised Llama built locally (no Hub), so the numbers measure the machinery, not a model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trl_tms import AdapterHistory, SamplingParams, generate_trajectories
from trl_tms.quantization import keep_4bit_layers_trainable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from speed import peft_routing  # noqa: E402


def build(device: str, hidden: int, layers: int, tmp: str):
    words = [f"w{i}" for i in range(2000)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, pad_token_id=0, eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map=device)
    keep_4bit_layers_trainable(model)
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    return model, tokenizer, words


def timed(fn, repeats: int, device: str) -> float:
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None, help="Also write the numbers to this JSON file.")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    hidden, layers, prompts, new_tokens = (2048, 16, 64, 64) if gpu else (256, 2, 8, 16)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, words = build(args.device, hidden, layers, tmp)
    history = AdapterHistory(model.peft_config["default"], background_writes=True)  # as TMSTrainer takes them
    take_s = timed(lambda: history.take(model, step=1), 10, args.device)
    for step in (2, 3, 4):
        history.take(model, step=step)
    model.add_adapter("probe", model.peft_config["default"])
    slot = history.slot_parameters(model, "probe")
    swap_s = timed(lambda: history.load_into(model, 1, "probe", slot), 10, args.device)
    model.delete_adapter("probe")
    model.set_adapter("default")

    data = Dataset.from_dict({"prompt": [" ".join(words[i : i + 24]) for i in range(prompts)], "completion": ["w1"] * prompts})
    rates = {}
    for label, per_call, routing in (("1", 1, contextlib.nullcontext()), ("4", 4, contextlib.nullcontext()),
                                     ("4_peft_routing", 4, peft_routing())):
        sampling = SamplingParams(max_new_tokens=new_tokens, batch_size=64, snapshots_per_generate=per_call)
        start = time.perf_counter()
        with routing:
            out = generate_trajectories(model, tokenizer, data, history, sampling, disable_tqdm=True)
        if gpu:
            torch.cuda.synchronize()
        rates[label] = sum(out["num_tokens"]) / (time.perf_counter() - start)

    result = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "base_params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "snapshot_ms": 1000 * take_s,
        "swap_ms": 1000 * swap_s,
        "tokens_per_s_1_snapshot_per_call": rates["1"],
        "tokens_per_s_4_snapshots_per_call": rates["4"],
        "tokens_per_s_4_snapshots_per_call_peft_routing": rates["4_peft_routing"],
    }
    print(
        f"{result['device']}: 4-bit Llama {hidden}x{layers}, LoRA r=16 | snapshot {result['snapshot_ms']:.2f} ms | "
        f"swap {result['swap_ms']:.2f} ms | trajectories {rates['1']:.0f} tok/s (1 snapshot/call), "
        f"{rates['4']:.0f} tok/s (4 snapshots/call), {rates['4_peft_routing']:.0f} tok/s (4/call, PEFT routing)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
