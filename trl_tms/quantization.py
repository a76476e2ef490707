"""Quantized (QLoRA) bases: keeping bitsandbytes 4-bit layers trainable after generation on CPU."""

from __future__ import annotations


def keep_4bit_layers_trainable(model) -> int:
    """
    Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, the first no-grad eval-mode forward (e.g. `generate`) permanently repacks every
    `Linear4bit` weight; training afterwards then crashes (layers with bias) or silently computes wrong LoRA gradients
    (layers without bias). TMS generates and then trains on the same model, so the repacking must never happen.

    Returns:
        `int`: The number of 4-bit layers patched (0 when bitsandbytes is not installed or the model is not 4-bit).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    patched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched
