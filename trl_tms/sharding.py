"""
What TMS needs from engines that shard the weights (DeepSpeed ZeRO-3, FSDP2): whole adapter weights, for a moment,
and a model that can generate on every process without waiting for the others.
"""

from __future__ import annotations

import contextlib

import torch
from trl.distributed import DistributedBackend


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2 keeps each process's shard of a weight in one)."""
    return isinstance(tensor, torch.distributed.tensor.DTensor) if torch.distributed.is_available() else False


def is_partitioned(param) -> bool:
    """Whether this process holds only a part of `param`: a ZeRO-3 partition (its local tensor is empty) or an FSDP2
    shard (a DTensor)."""
    return hasattr(param, "ds_id") or is_dtensor(param)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """
    The whole value of `tensor`: for an FSDP2 shard, all shards gathered (a collective: every process calls it at the
    same point); otherwise `tensor` itself. ZeRO-3 partitions are made whole by `gathered` instead.
    """
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole `value` into `param`, of which this process may hold an FSDP2 shard (it keeps its shard)."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        # Every process holds the same `value`: each takes its own shard, with no communication.
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """
    The whole `params` inside the block, on every process, where ZeRO-3 partitions them (elsewhere, nothing to do).
    A collective: every process must enter it at the same point. With `modifier_rank`, what that process writes into
    them is partitioned back to every process on exit; without it they are read-only.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def fsdp_modules(model) -> list:
    """The modules of `model` that FSDP2 (`fully_shard`) manages."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def unsharded(model, reshard_after_forward: bool):
    """
    Under FSDP2, every weight of `model` whole on every process inside the block, and kept whole through forward
    passes: each process can then generate on its own, with any number of forward passes, where a sharded model would
    gather every layer in every pass and need all processes in lockstep. A collective on entry and exit. On exit the
    shards are back and every module reshards after forward as `reshard_after_forward` (the engine's setting) says.
    Elsewhere, nothing to do.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield
        return
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(reshard_after_forward, recurse=False)


@contextlib.contextmanager
def whole_model_for_generation(model, accelerator, gradient_checkpointing_kwargs: dict | None = None):
    """
    The trained model, ready to generate on every process independently: TRL's generation context (gradient
    checkpointing off; under ZeRO-3 the weights gathered, as TRL's GRPO trainer does by default), and under FSDP2
    every shard unsharded. The model must fit whole on one device meanwhile. A collective on entry and exit.
    """
    from trl.models import unwrap_model_for_generation

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    with unwrap_model_for_generation(
        model, accelerator, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
    ) as unwrapped, unsharded(unwrapped, getattr(plugin, "reshard_after_forward", True)):
        yield unwrapped


def check_parallelism(
    accelerator,
    generation_backend: str = "transformers",
    tms_mode: str = "two_pass",
    gradient_checkpointing: bool = False,
    quantized: bool = False,
) -> None:
    """
    Refuse what TMS cannot run on several processes: vLLM (one engine, one process), FSDP1, a 4-bit base under FSDP2 or
    DeepSpeed ZeRO-3, and two-pass TMS under ZeRO-3 with gradient checkpointing.
    """
    if generation_backend == "vllm" and accelerator.num_processes > 1:
        raise NotImplementedError(
            "`generation_backend='vllm'` runs one engine in one process; with several processes use "
            "`generation_backend='transformers'` (the prompts are then shared out across processes)."
        )
    backend = DistributedBackend(accelerator)
    if backend.is_fsdp:
        check_fsdp(backend.fsdp_version, accelerator.state.fsdp_plugin, quantized)
        return
    if not backend.is_zero3:
        return
    if quantized:
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 cannot partition a 4-bit (bitsandbytes) base model. For QLoRA on several GPUs use data "
            "parallelism (examples/accelerate_configs/ddp.yaml) or DeepSpeed ZeRO-2 (zero2.yaml): each GPU holds the "
            "small 4-bit base whole."
        )
    if tms_mode == "two_pass" and gradient_checkpointing:
        raise NotImplementedError(
            "Two-pass TMS under DeepSpeed ZeRO-3 needs `gradient_checkpointing=False` (the default of SFTConfig is "
            "True): the student trains with a second DeepSpeed engine on the same model, and gradient checkpointing "
            "then recomputes layers whose weights ZeRO-3 did not gather. Set `gradient_checkpointing=False` (more "
            "activation memory), or use `tms_mode='online'` (one engine, which works with it), or ZeRO-2."
        )


def check_fsdp(version: int, plugin, quantized: bool) -> None:
    """What TMS needs from FSDP: version 2 (whose shards it can gather and unshard), a full-precision base, and a
    `reshard_after_forward` it can set back after generating."""
    if version != 2:
        raise NotImplementedError(
            f"TMSTrainer supports FSDP2, not FSDP version {version}: set `fsdp_version: 2` in the accelerate config "
            "(examples/accelerate_configs/fsdp2.yaml), or use DeepSpeed ZeRO-2 / ZeRO-3 (zero2.yaml, zero3.yaml "
            "there). See docs/sharded.md."
        )
    if quantized:
        raise NotImplementedError(
            "TMS under FSDP2 with a 4-bit (bitsandbytes) base is not verified. For QLoRA on several GPUs use data "
            "parallelism (examples/accelerate_configs/ddp.yaml) or DeepSpeed ZeRO-2 (zero2.yaml): each GPU holds the "
            "small 4-bit base whole."
        )
    if not isinstance(plugin.reshard_after_forward, bool):
        raise NotImplementedError(
            f"TMS under FSDP2 needs `fsdp_reshard_after_forward` true or false (got {plugin.reshard_after_forward!r}): "
            "it unshards the model to generate and sets that setting back afterwards."
        )
