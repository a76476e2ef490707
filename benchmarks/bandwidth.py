"""The memory-bandwidth bound of trajectory generation (issue #22), used by `benchmarks/speed.py`.

A decode step of a batch of B rows reads every weight once (shared by the rows), the LoRA factors of every snapshot in
the call, and each row's KV cache; at the machine's memory bandwidth that gives at most
`B * bandwidth / bytes_per_step` new tokens per second. Compute, Python and the prompt pass only lower the real rate,
so `measured / bound` is the fraction of the hardware generation uses.

On a CPU with few cores the matrix products of a decode step, not its memory traffic, set the limit at larger batches:
`matmul_seconds` times those products alone (every linear layer and the call's LoRA factors, on `batch` rows), the
least time a step can take however little Python, attention, sampling and cache handling it adds. The tighter of the
two bounds is the hardware's limit for generation.
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
        _synchronize(source.device)
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(source.device)
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


def matmul_seconds(model, batch: int, snapshots: int = 1, adapter_name: str = "default", repeats: int = 3) -> dict:
    """
    Seconds the matrix products of one decode step of `batch` rows take on their own: every linear layer of the base
    model (output layer included) and, for LoRA layers, the `snapshots` adapters' factors stacked as the router stacks
    them (`A` as `[snapshots*r, in]`, `B` as `[out, snapshots*r]`). Best of `repeats`; also the step's FLOPs.
    """
    shapes = []  # (base weight, stacked A or None, stacked B or None)
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter_name in lora_a and isinstance(module.get_base_layer(), torch.nn.Linear):
            a, b = lora_a[adapter_name].weight, module.lora_B[adapter_name].weight
            shapes.append((module.get_base_layer().weight, a.repeat(snapshots, 1), b.repeat(1, snapshots)))
    covered = {id(w) for w, _, _ in shapes} | {id(p) for n, p in model.named_parameters() if "lora_" in n}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in covered:
            shapes.append((module.weight, None, None))
    first = shapes[0][0]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device) for w, _, _ in shapes}
    flops = sum(2 * batch * (w.numel() + (a.numel() + b.numel() if a is not None else 0)) for w, a, b in shapes)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms the kernels up
            _synchronize(first.device)
            start = time.perf_counter()
            for weight, a, b in shapes:
                x = inputs[weight.shape[1]]
                torch.nn.functional.linear(x, weight)
                if a is not None:
                    torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
            _synchronize(first.device)
            best = min(best, time.perf_counter() - start)
    return {"seconds": best, "flops": flops, "flops_per_s": flops / best}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens_per_s_bound(bandwidth: float, step_bytes: float, batch: int) -> float:
    """New tokens per second if every decode step only had to read its bytes at `bandwidth`."""
    return batch * bandwidth / step_bytes
