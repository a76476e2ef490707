import os
import random

import pytest
from datasets import Dataset
from transformers import PreTrainedTokenizerFast, TrainerCallback

from tiny import save_tiny

NUMBERS = "one two three four five six seven eight nine ten".split()

# Trainer settings every tiny test run shares: CPU, fp32, quiet, nothing saved or reported. `TRL_TMS_TEST_ON_GPU=1`
# (set by scripts/gpu_check.sh) lets the trainers use the GPU instead, so that the GPU checks run them there.
QUIET_CPU = dict(save_strategy="no", report_to="none", bf16=False, use_cpu=os.environ.get("TRL_TMS_TEST_ON_GPU") != "1",
                 disable_tqdm=True)


def make_examples(n: int, seed: int = 0, fmt: str = "conversational") -> Dataset:
    """Tiny arithmetic-looking prompts with labels, in one of TRL's dataset formats."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(NUMBERS), rng.choice(NUMBERS)
        question, answer = f"what is {a} plus {b} ?", f"the answer is {a} {b} ."
        if fmt == "conversational":
            rows.append(
                {"prompt": [{"role": "user", "content": question}], "completion": [{"role": "assistant", "content": answer}]}
            )
        elif fmt == "standard":
            rows.append({"prompt": question, "completion": " " + answer})
        elif fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        else:
            raise ValueError(fmt)
    return Dataset.from_list(rows)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("tiny-qwen2")), "qwen2")


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    # AutoTokenizer rebuilds a custom WordLevel tokenizer wrongly in transformers 5 (see stack notes).
    return PreTrainedTokenizerFast.from_pretrained(path)


class WeightsAtStep(TrainerCallback):
    """Records the trainable weights at the end of every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = {
            n: p.detach().clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad
        }


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    """Raises after optimizer step `step` of `phase`, as a crash or a kill would stop the run."""

    def __init__(self, phase: str, step: int):
        self.phase, self.step, self.trainer = phase, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.phase == self.phase and state.global_step == self.step:
            raise Interrupt(f"{self.phase} stopped at step {self.step}")
