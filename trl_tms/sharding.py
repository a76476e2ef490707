"""What TMS needs from engines that partition the weights (DeepSpeed ZeRO-3): whole adapter weights, for a moment."""

from __future__ import annotations

import contextlib


def is_partitioned(param) -> bool:
    """Whether DeepSpeed ZeRO-3 holds this parameter in partitions (its local tensor is then empty)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """
    The whole `params` inside the block, on every process, where ZeRO-3 partitions them (elsewhere, nothing to do).
    A collective: every process must enter it at the same point. With `modifier_rank`, what that process writes into
    them is partitioned back to every process on exit; without it they are read-only.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
