"""Quantized (QLoRA) bases: keeping bitsandbytes 4-bit layers trainable after generation on CPU."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from functools import partial

# The loggers that report the Hub kernel lookup bitsandbytes makes at import, which `import_bitsandbytes_offline` skips.
_KERNEL_LOOKUP_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


@contextlib.contextmanager
def _hub_offline():
    """Turn huggingface_hub's offline switch on for the block only, and drop what the skipped lookup logs."""
    from huggingface_hub import constants

    def drop(record):
        return False

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    loggers = [logging.getLogger(name) for name in _KERNEL_LOOKUP_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
        for logger in loggers:
            logger.removeFilter(drop)


def import_bitsandbytes_offline() -> None:
    """
    Import bitsandbytes, if it is installed and not imported yet, with the Hugging Face Hub switched off meanwhile.

    On CPUs with AVX512-BF16, importing bitsandbytes asks the Hub (`kernels.get_kernel`) for an optional CPU inference
    kernel, and PEFT imports bitsandbytes whenever it is installed: without this, `import trl_tms` would make a network
    request for every user, quantized or not. `kernels` honours huggingface_hub's offline switch, so the import runs
    with it on, and the switch is restored afterwards. A kernel already in the local Hub cache is still used; none is
    downloaded, and without one bitsandbytes uses the CPU kernel built into its own library. Importing bitsandbytes
    before `trl_tms` keeps its own behaviour (the download included).
    """
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    with _hub_offline():
        import bitsandbytes  # noqa: F401


def keep_4bit_layers_trainable(model) -> int:
    """
    Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, the first no-grad eval-mode forward (e.g. `generate`) permanently repacks every
    `Linear4bit` weight; training afterwards then crashes (layers with bias) or silently computes wrong LoRA gradients
    (layers without bias). TMS generates and then trains on the same model, so the repacking must never happen. A
    model that was already repacked cannot be trained correctly (bitsandbytes rounds its scales to bf16 when it
    repacks, so the layout cannot be restored exactly): it is refused with an error.

    Returns:
        `int`: The number of 4-bit layers patched (0 when bitsandbytes is not installed or the model is not 4-bit).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    repacked = [m for m in layers if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
    if repacked:
        raise RuntimeError(
            f"{len(repacked)} of the model's 4-bit layers were already repacked by bitsandbytes for CPU inference (the "
            "model ran `generate` or an eval forward on CPU before training), and cannot be trained correctly any "
            "more. Load the model afresh and hand it to the trainer before any inference, or call "
            "`trl_tms.quantization.keep_4bit_layers_trainable(model)` right after loading it."
        )
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model) -> bool:
    """Whether the (PEFT-wrapped) model's base is loaded in 4 or 8 bits by bitsandbytes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(getattr(m, f"is_loaded_in_{bits}bit", False) for m in (model, base) for bits in (4, 8))


def check_bitsandbytes_for(quantization_config) -> None:
    """A 4-bit or 8-bit `quantization_config` (object or dict) needs bitsandbytes: say so before loading the model."""
    if quantization_config is None:
        return
    get = quantization_config.get if isinstance(quantization_config, dict) else partial(getattr, quantization_config)
    if (get("load_in_4bit", False) or get("load_in_8bit", False)) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "4-bit and 8-bit (QLoRA) loading needs bitsandbytes, which is not installed. Install it with "
            "`pip install 'bitsandbytes>=0.50.2'`, or drop `quantization_config` to train in full precision."
        )
