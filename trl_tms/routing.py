"""Routing: each row of one `generate` call runs through its own snapshot's LoRA weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from .history import adapter_parameters


class RowRouter:
    """
    Sends each row of a batch through the adapter slot it was sampled for, so that several snapshots share one `generate`
    call.

    The slots' LoRA factors are stacked per layer, `A` as `[K*r, in]` and `B` as `[out, K*r]`, and a per-row mask
    (times the slot's scaling) keeps each row's own `r` rank components: every LoRA layer costs two matrix products for
    all rows, as one adapter does. The slots' weights become views of the stacks, so a snapshot loaded into a slot is
    in the stack at once and the stacks cost no memory of their own. PEFT's own `adapter_names` routing instead indexes
    every LoRA layer's input per adapter at every token, which made four snapshots per call about half as fast per
    token as one on a GPU (stacked: 1.1x to 3x as fast as one). Adapters the stacked form cannot express (DoRA and
    other LoRA variants, LoRA biases, LoRA on embeddings or convolutions, `modules_to_save`) fall back to PEFT's
    routing (or, for DoRA, to one snapshot per call upstream).

    Args:
        model ([`~peft.PeftModel`]):
            The model holding the slots.
        slots (`list[str]`):
            The adapter slots rows can be routed to (already added to `model`).
    """

    # Class-wide: `False` routes every call through PEFT's `adapter_names`, the reference a benchmark times against.
    stack_factors: bool = True

    def __init__(self, model, slots: list[str]):
        self.model = model
        self.slots = slots
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer) and slots[0] in m.lora_A]
        self.stacked = len(slots) > 1 and self.stack_factors and self._stackable()
        self._stacks = [self._stack(layer) for layer in self.layers] if self.stacked else []

    def _stack(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Move the slots' factors of `layer` into one `A` and one `B` (the slots keep views); returns them and the
        scaling of each rank component."""
        a_parts = [layer.lora_A[s].weight for s in self.slots]
        b_parts = [layer.lora_B[s].weight for s in self.slots]
        rank = a_parts[0].shape[0]
        with torch.no_grad():
            a, b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        for j, (a_part, b_part) in enumerate(zip(a_parts, b_parts)):
            a_part.data = a[j * rank : (j + 1) * rank]
            b_part.data = b[:, j * rank : (j + 1) * rank]
        scales = torch.tensor([float(layer.scaling[s]) for s in self.slots], dtype=a.dtype, device=a.device)
        return a, b, scales.repeat_interleave(rank)

    def _stackable(self) -> bool:
        covered = set()
        for layer in self.layers:
            for slot in self.slots:
                if slot in layer.lora_variant or layer.lora_bias.get(slot):
                    return False
                a, b = layer.lora_A[slot], layer.lora_B[slot]
                if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
                    return False
                covered.update(map(id, (*a.parameters(), *b.parameters())))
        # Any slot parameter outside these layers (embeddings, modules_to_save, ...) needs PEFT's routing.
        return all(id(p) in covered for slot in self.slots for p in adapter_parameters(self.model, slot).values())

    @contextlib.contextmanager
    def __call__(self, row_slots: list[str]) -> Iterator[dict]:
        """Route the rows of the next `generate` call (row `i` to slot `row_slots[i]`); yields extra `generate` kwargs."""
        if len(set(row_slots)) == 1:
            # One snapshot in the call: activating its slot is the plain LoRA forward.
            previous = self.model.active_adapter
            self._activate(row_slots[0])
            try:
                yield {}
            finally:
                self._activate(previous)
        elif self.stacked:
            with self._stacked(row_slots):
                yield {}
        else:
            yield {"adapter_names": row_slots}

    def _activate(self, slot: str) -> None:
        """`PeftModel.set_adapter` for LoRA without the FSDP2 reshard PEFT 0.22 added to it: each process generates its
        own batches here, so after a reshard the next forward's gather would wait for processes with no batch."""
        self.model.active_adapter = slot
        self.model.base_model.set_adapter(slot)

    @contextlib.contextmanager
    def _stacked(self, row_slots: list[str]):
        rows = torch.tensor([self.slots.index(s) for s in row_slots])
        masks = {}  # one-hot rank components per row, one per (rank, dtype, device), shared by the layers that have it
        try:
            for layer, (a, b, scales) in zip(self.layers, self._stacks):
                key = (a.shape[0] // len(self.slots), a.dtype, a.device)
                if key not in masks:
                    components = torch.arange(len(self.slots), device=a.device).repeat_interleave(key[0])
                    masks[key] = (rows.to(a.device)[:, None] == components[None, :]).to(a.dtype)
                layer.forward = _stacked_forward(layer, a, b, masks[key] * scales)
            yield
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)


def _stacked_forward(layer, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.shape[0] != mask.shape[0]:
            raise RuntimeError(f"Routed {mask.shape[0]} rows but the layer got a batch of {x.shape[0]}.")
        result = layer.base_layer(x, *args, **kwargs)
        hidden = F.linear(x.to(a.dtype), a) * mask.view(mask.shape[0], *[1] * (x.dim() - 2), mask.shape[1])
        # Summed in the LoRA dtype, then cast, as PEFT's own LoRA forward does.
        return (result + F.linear(hidden, b)).to(result.dtype)

    return forward
