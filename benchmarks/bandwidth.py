"""The memory-bandwidth bound of trajectory generation (issue #22), used by `benchmarks/speed.py`.

A decode step of a batch of B rows reads every weight once (shared by the rows), the LoRA factors of every snapshot in
the call, and each row's KV cache; at the machine's memory bandwidth that gives at most
`B * bandwidth / bytes_per_step` new tokens per second. Compute, Python and the prompt pass only lower the real rate,
so `measured / bound` is the fraction of the hardware generation uses.
"""

from __future__ import annotations

import time

import torch


def copy_bandwidth(device: str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (each byte read and written once, both counted); best of `repeats`."""
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def decode_step_bytes(model, batch: int, context: float, snapshots: int = 1, adapter_name: str = "default") -> dict:
    """
    Bytes one decode step of `batch` rows reads, by kind: the base weights (the input embedding only for the rows'
    tokens, unless it is tied to the output layer, which reads it whole), the LoRA factors of `snapshots` adapters
    (those of `adapter_name` as the size of one), and the KV cache of rows holding `context` tokens on average.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    embedding = base.get_input_embeddings().weight
    tied = base.get_output_embeddings() is not None and base.get_output_embeddings().weight is embedding
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in lora)
    if not tied:  # an untied input embedding is read for the rows' tokens only
        weights -= embedding.numel() * embedding.element_size()
        weights += batch * embedding.shape[1] * embedding.element_size()
    adapter = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "lora_" in n and f".{adapter_name}." in n)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * heads * head_dim * embedding.element_size() * context * batch
    return {"weights": weights, "lora": snapshots * adapter, "kv_cache": kv,
            "total": weights + snapshots * adapter + kv}


def tokens_per_s_bound(bandwidth: float, step_bytes: float, batch: int) -> float:
    """New tokens per second if every decode step only had to read its bytes at `bandwidth`."""
    return batch * bandwidth / step_bytes
