"""
What every generation backend and the greedy probes share: the sampling parameters (one definition of the distribution
for every backend), the backend interface, the part store and the trajectories' dataset, memory sizing, and the decode
loop that drops finished rows (used by the hot-swap backend, the forgetting meter, self-rehearsal and the probes).
The backends themselves are `trajectories.py` (PEFT hot-swap, the default) and `vllm_generation.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from datasets import Dataset
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging
from trl.data_utils import is_conversational

from .atomic import atomic_folder, write_json_atomically
from .data import as_completion, completion_text, prompt_token_ids
from .history import AdapterHistory

# transformers 5.24 renamed `generate`'s `past_key_values` (argument and output) to `cache`; the old name warns.
CACHE = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
PART_KEYS = ("prompt_index", "snapshot_step", "sample_index", "completion_ids", "finished")
# What a model's `generation_config` keeps while trajectories are sampled: token ids and how the cache is held, none of
# which changes the distribution sampled from.
KEPT_GENERATION_SETTINGS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache", "cache_implementation",
    "cache_config", "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size",
)

logger = logging.get_logger(__name__)


@dataclass
class SamplingParams:
    """
    How each snapshot samples its trajectories, and the whole definition of the distribution they are sampled from,
    the same for every generation backend: the snapshot's next-token distribution at `temperature` (`0`: greedy),
    restricted to the `top_k` most likely tokens (`0`: no limit) and to the nucleus of mass `top_p`, for at most
    `max_new_tokens` tokens, until an end-of-sequence token. Nothing else: the sampling settings of a model's
    `generation_config` (e.g. the `repetition_penalty` of many instruct models, `no_repeat_ngram_size`, `min_p`, a
    `top_k` of its own) do not apply (see [`sampling_params_only`]), so that the trajectories are the policy's own
    samples, whichever backend draws them.
    """

    samples_per_checkpoint: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 16
    snapshots_per_generate: int = 4
    seed: int = 0

    @classmethod
    def from_config(cls, args, max_new_tokens: int | None = None) -> SamplingParams:
        """The config's sampling settings; `max_new_tokens` overrides the config's (e.g. fitted to the labels)."""
        return cls(
            samples_per_checkpoint=args.samples_per_checkpoint,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=max_new_tokens or args.max_new_tokens,
            batch_size=args.generation_batch_size,
            snapshots_per_generate=args.snapshots_per_generate,
            seed=args.seed,
        )

    def generate_kwargs(self, tokenizer, model) -> dict:
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": eos,
            "use_cache": True,
            # Generation runs on whole weights (`sharding.whole_model_for_generation`), each process on its own share
            # of the batches: transformers' default under ZeRO-3 and FSDP, every process stepping until all are done,
            # would wait forever for a process that has fewer batches.
            "synced_gpus": False,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@contextlib.contextmanager
def sampling_params_only(model):
    """
    Within the block, `model.generate` samples from the distribution its arguments define and from nothing else: the
    model's `generation_config` keeps only its `KEPT_GENERATION_SETTINGS`, so that the sampling settings it may hold
    (repetition penalty, n-gram blocking, min-p, suppressed or forced tokens, beams, ...) are not applied. They are
    named in a warning, once.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = target.generation_config
    outputs = ("max_length", "max_new_tokens", "output_attentions", "output_hidden_states", "transformers_version")
    ignored = {
        key: value
        for key, value in original.to_diff_dict().items()
        if key not in KEPT_GENERATION_SETTINGS + outputs and not key.startswith("_")
    }
    if ignored:
        logger.warning_once(
            f"The model's `generation_config` sets {ignored}. TMS samples trajectories from `temperature`, `top_p`, "
            "`top_k` and `max_new_tokens` alone, whichever the generation backend, and leaves these out."
        )
    target.generation_config = GenerationConfig(
        **{key: value for key, value in original.to_dict().items() if key in KEPT_GENERATION_SETTINGS}
    )
    try:
        yield
    finally:
        target.generation_config = original


class TrajectoryGenerator:
    """
    The interface of every generation backend, built once by the trainer (as TRL's GRPO trainer builds its generation
    object): `generate(steps, pairs)` returns the trajectories of those snapshots of `history`, and `close()` frees what
    the backend holds for generation once the trainer is done sampling (also on leaving a `with` block).

    Args:
        model, tokenizer, prompts, history, sampling:
            What every backend samples with: the model being trained (a [`~peft.PeftModel`]), its tokenizer, the
            prompt-completion dataset (only the prompts are used), the [`AdapterHistory`] of snapshots to sample from,
            and the [`SamplingParams`].
    """

    def __init__(self, model, tokenizer, prompts: Dataset, history: AdapterHistory, sampling: SamplingParams):
        self.model, self.tokenizer, self.prompts, self.history, self.sampling = model, tokenizer, prompts, history, sampling

    def generate(self, steps: list[int] | None = None, pairs: set[tuple[int, int]] | None = None) -> Dataset:
        """The trajectories of the snapshots of `steps` (default: all of the history), or of the `(prompt_index,
        snapshot_step)` `pairs` only."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds for generation (nothing by default)."""

    def __enter__(self) -> TrajectoryGenerator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PartStore:
    """
    The trajectories of each group of snapshots, written atomically as one JSON part (`PART_KEYS` columns) as soon as
    they are sampled, and read back instead of sampled again: an interrupted generation continues where it stopped.
    With `folder=None` nothing is stored. Shared by every generation backend.
    """

    def __init__(self, folder: str | None):
        self.folder = folder

    def path(self, group: list[int], pairs: int | None = None) -> str:
        """The part of the snapshots of `group`: all of their trajectories, or those of the pairs named by `pairs` (a
        [`pairs_digest`])."""
        name = f"steps-{'-'.join(map(str, group))}" + ("" if pairs is None else f"-pairs-{pairs:012x}")
        return os.path.join(self.folder, f"{name}.json")

    def read(self, group: list[int], pairs: int | None = None) -> dict | None:
        """The stored part of `group` (and `pairs`), or None (none stored, or damaged: then it is sampled again)."""
        if self.folder is None or not os.path.isfile(self.path(group, pairs)):
            return None
        try:
            with open(self.path(group, pairs)) as f:
                part = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        if set(part) != set(PART_KEYS) or len({len(part[k]) for k in PART_KEYS}) != 1:
            return None
        return part

    def write(self, group: list[int], rows: list[tuple], pairs: int | None = None) -> dict:
        """Store `rows` (tuples in `PART_KEYS` order) as the part of `group` (and `pairs`), and return the part."""
        part = {key: [row[k] for row in rows] for k, key in enumerate(PART_KEYS)}
        if self.folder is not None:
            write_json_atomically(self.path(group, pairs), part)
        return part


def save_trajectories(trajectories: Dataset, path: str) -> None:
    """Write the trajectories with `save_to_disk`, atomically: a reader sees the old folder or the new, never half."""
    with atomic_folder(path) as staging:
        trajectories.save_to_disk(staging)


def steps_to_sample(
    history: AdapterHistory, steps: list[int] | None, pairs: set[tuple[int, int]] | None = None, num_prompts: int = 0
) -> list[int]:
    """
    The snapshot steps to sample from, sorted, checked against the history: those of `steps` (default: all), or those
    of the `(prompt_index, snapshot_step)` `pairs` when given (none for no pairs: nothing to sample), which name prompts
    among the first `num_prompts`.
    """
    if pairs is not None:
        steps = steps_of_pairs(pairs, steps, num_prompts)
        if not steps:
            return []
    if len(history) == 0:
        raise ValueError("The adapter history is empty: there is nothing to sample trajectories from.")
    steps = history.steps if steps is None else sorted(steps)
    if not set(steps) <= set(history.steps):
        raise ValueError(f"The history has no snapshots of steps {sorted(set(steps) - set(history.steps))}.")
    return steps


def steps_of_pairs(pairs: set[tuple[int, int]], steps: list[int] | None, num_prompts: int) -> list[int]:
    """The snapshot steps of `(prompt_index, snapshot_step)` `pairs`, sorted; `pairs` replace `steps`."""
    if steps is not None:
        raise ValueError("Pass `steps` or `pairs`, not both.")
    if not all(0 <= index < num_prompts for index, _ in pairs):
        raise ValueError(f"`pairs` name prompts outside the {num_prompts} given.")
    return sorted({step for _, step in pairs})


def eos_token_ids(eos: int | list[int]) -> set[int]:
    return set(eos if isinstance(eos, list) else [eos])


def trajectories_dataset(tokenizer, prompts: Dataset, records: dict[str, list]) -> Dataset:
    """The trajectories' dataset from the sampled rows (`PART_KEYS` columns), decoded and sorted by (prompt, snapshot,
    sample) so that it does not depend on how the rows were batched."""
    records = dict(records)
    completion_ids = records.pop("completion_ids")
    conversational = is_conversational(prompts[0])
    prompt_column = prompts["prompt"]  # one column read, not one row read per trajectory
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    order = sorted(
        range(len(texts)),
        key=lambda r: (records["prompt_index"][r], records["snapshot_step"][r], records["sample_index"][r]),
    )
    return Dataset.from_dict(
        {
            "prompt_index": [records["prompt_index"][r] for r in order],
            "prompt": [prompt_column[records["prompt_index"][r]] for r in order],
            "completion": [as_completion(texts[r], conversational) for r in order],
            "snapshot_step": [records["snapshot_step"][r] for r in order],
            "sample_index": [records["sample_index"][r] for r in order],
            "finished": [records["finished"][r] for r in order],
            "num_tokens": [len(completion_ids[r]) for r in order],
        }
    )


def empty_trajectories(tokenizer, prompts: Dataset) -> Dataset:
    """A trajectories' dataset with no row (its columns all there): what a run that sampled nothing saves."""
    return trajectories_dataset(tokenizer, prompts, {key: [] for key in PART_KEYS})


def batch_seed(seed: int, first_step: int, batch: int, salt: int = 0) -> int:
    """The seed of one batch of prompts for the group of snapshots starting at `first_step`: independent of processes.
    `salt` (see [`pairs_digest`]) tells apart batches of different pairs of a group."""
    return ((seed * 1_000_003 + first_step) * 10_007 + batch + salt * 7_919) % 2**63


def pairs_digest(pairs) -> int:
    """A 48-bit number that names a set of (prompt_index, snapshot_step) pairs: the same pairs, the same number."""
    text = json.dumps(sorted([int(i), int(step)] for i, step in pairs))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


LENGTH_GRAIN = 16  # a fitted length budget is rounded up to this many tokens


def fitted_max_new_tokens(tokenizer, dataset: Dataset, factor: float, cap: int) -> int:
    """`factor` times the longest completion of `dataset` in tokens, plus one for the end token (so that at `factor`
    1 an answer as long as the longest label ends inside the budget), rounded up to `LENGTH_GRAIN`, at most `cap`."""
    texts = [completion_text(c) for c in dataset["completion"]]
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return min(cap, LENGTH_GRAIN * math.ceil((factor * longest + 1) / LENGTH_GRAIN))


LOGIT_COPIES = 2  # a decode step holds the raw next-token logits and the processed scores of every row


def generation_bytes_per_row(model, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """
    The memory one row of a `generate` call holds at its longest: its KV cache over `max_prompt_tokens +
    max_new_tokens` positions (every layer's keys and values, in the activations' dtype, read off the embedding's) and
    its next-token logits (fp32, `LOGIT_COPIES` of them). Activations of the forward pass come and go within a step and
    are left out. Derived from the model's config alone, so the same settings always give the same number.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype_bytes = model.get_input_embeddings().weight.element_size()
    kv_per_token = config.num_hidden_layers * 2 * kv_heads * head_dim * dtype_bytes
    logits = LOGIT_COPIES * config.vocab_size * 4
    return kv_per_token * (max_prompt_tokens + max_new_tokens) + logits


def rows_within_memory(model, max_prompt_tokens: int, max_new_tokens: int, budget_mb: float, min_rows: int = 1) -> int:
    """
    The most rows a `generate` call can hold within `budget_mb` MiB by [`generation_bytes_per_row`]. Raises a
    `ValueError` saying which budget is needed when fewer than `min_rows` (the rows of one prompt: resident snapshots
    x samples) fit.
    """
    per_row = generation_bytes_per_row(model, max_prompt_tokens, max_new_tokens)
    rows = int(budget_mb * 2**20 // per_row)
    if rows < min_rows:
        needed = math.ceil(min_rows * per_row / 2**20 * 1000) / 1000
        raise ValueError(
            f"`generation_memory_mb={budget_mb}` holds {rows} rows of {max_prompt_tokens} prompt + {max_new_tokens} "
            f"new tokens ({per_row / 2**20:.3f} MiB each), and a call needs at least {min_rows} (one prompt for each "
            f"resident snapshot and sample). Raise it to at least {needed}, or lower "
            "`snapshots_per_generate`, `samples_per_checkpoint` or `max_new_tokens`."
        )
    return rows


def sampling_within_memory(
    sampling: SamplingParams, model, tokenizer, prompts, budget_mb: float, num_checkpoints: int, chat_template=None
) -> SamplingParams:
    """
    `sampling` with as many rows per `generate` call as `budget_mb` MiB hold ([`rows_within_memory`]) for the longest of
    `prompts`, at least those of one prompt (its resident snapshots, of at most `num_checkpoints`, x samples).
    """
    longest = max(len(prompt_token_ids(tokenizer, example, chat_template)) for example in prompts)
    per_prompt = min(sampling.snapshots_per_generate, num_checkpoints) * sampling.samples_per_checkpoint
    rows = rows_within_memory(model, longest, sampling.max_new_tokens, budget_mb, min_rows=per_prompt)
    logger.info(
        f"generation_memory_mb={budget_mb}: up to {rows} rows per generate call "
        f"(longest prompt {longest} tokens + {sampling.max_new_tokens} new)."
    )
    return replace(sampling, batch_size=min(sampling.batch_size, rows))


DROP_FINISHED_EVERY = 16  # new tokens between two checks for rows that reached EOS


def cache_is_growable(model) -> bool:
    # A cache of fixed size (a generation config's `cache_implementation="static"`, "hybrid", ...) can neither grow past
    # the call that made it nor drop rows: such models generate in one call.
    return getattr(model.generation_config, "cache_implementation", None) in (None, "dynamic")


def decode_until_eos(
    model, input_ids, attention_mask, kwargs: dict, eos_ids: set[int], row_slots: list | None = None, route=None,
    cache=None, output_logits: bool = False, stop: Callable[[list[int]], bool] | None = None,
):
    """
    `model.generate(**kwargs)` from left-padded `input_ids`, in chunks of `DROP_FINISHED_EVERY` new tokens: after each
    chunk the rows that produced a token of `eos_ids` leave the batch (with their KV-cache rows) and the others continue
    from the cache. `generate` alone keeps computing every finished row until the whole batch is done. With `stop`, a
    row also leaves once `stop(its new tokens so far)` is true (its tokens then run to the end of that chunk).

    Returns the new tokens of each row (a finished row's chunk is padded after its EOS, as `generate` pads it). With
    `output_logits=True`, returns `(tokens, logits)`: per row, the raw next-token logits that chose its tokens
    (`[new tokens, vocab]`). `route(row_slots)` (see [`RowRouter`]) gives the routing arguments of each call's rows;
    `cache` continues from an existing KV cache of `input_ids` but their last token.
    """
    every = DROP_FINISHED_EVERY if cache_is_growable(model) else kwargs["max_new_tokens"]
    count = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(count)]
    logits: list[list[torch.Tensor]] = [[] for _ in range(count)]
    rows, budget = list(range(count)), kwargs["max_new_tokens"]
    while True:
        routed = route([row_slots[r] for r in rows]) if route is not None else contextlib.nullcontext({})
        with routed as routing:
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **{CACHE: cache},
                **{**kwargs, "max_new_tokens": min(every, budget)}, return_dict_in_generate=True,
                output_logits=output_logits, **routing,
            )
        new = output.sequences[:, input_ids.shape[1] :]
        going = []
        for position, (row, row_tokens) in enumerate(zip(rows, new.tolist())):  # one device sync per chunk
            tokens[row] += row_tokens
            if output_logits:
                logits[row].append(torch.stack([step[position] for step in output.logits]))
            if not eos_ids.intersection(row_tokens) and not (stop is not None and stop(tokens[row])):
                going.append(position)
        budget -= new.shape[1]
        if not going or budget <= 0:
            return (tokens, [torch.cat(parts) for parts in logits]) if output_logits else tokens
        keep = torch.tensor(going, device=input_ids.device)
        cache = getattr(output, CACHE)
        if len(going) < len(rows):
            cache.batch_select_indices(keep)
        input_ids = output.sequences[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(new.shape)], dim=1)[keep]
        rows = [rows[p] for p in going]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def until_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """The tokens before the first EOS, and whether there was one (else the row ran out of `max_new_tokens`)."""
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position], True
    # Finished rows of a batch are padded after their EOS; an unfinished row ran out of `max_new_tokens`.
    return tokens, False


def end_tokens(model, tokenizer) -> set[int]:
    """The tokens that end a greedy answer: every end token the tokenizer or the generation config names, and pad."""
    config_eos = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} | set(config_eos if isinstance(config_eos, list) else [config_eos])
    eos.discard(None)
    return eos


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                   summarize_logits: Callable[[torch.Tensor, list[int]], Any] | None = None,
                   stop: Callable[[list[int]], bool] | None = None):
    """
    Greedy continuations (token ids, up to and including end of turn) of tokenized prompts, batched, left-padded.

    With `stop`, a continuation also ends once `stop(its tokens so far)` is true, checked every `DROP_FINISHED_EVERY`
    tokens (so it may run a few tokens past that point; a model whose cache cannot drop rows runs to the end): for a
    base model that never ends its answer but goes on to text of its own, whose caller reads only what comes before it.

    With `summarize_logits`, returns `(answers, summaries)`: per answer, `summarize_logits(logits, answer)` of the raw
    next-token logits that chose its tokens (float32, `[answer tokens, vocab]`), for a caller that needs the model's
    distributions over its own answers without a second forward pass.
    """
    model.eval()
    eos = end_tokens(model, tokenizer)
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=sorted(eos),
                  # Whole weights here (see `sharding.whole_model_for_generation`): no process waits.
                  synced_gpus=False)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int] | None] = [None] * len(prompts)
    summaries: list[Any] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], tokenizer.pad_token_id)
        # Finished rows leave the batch as they end: a batch costs its answers' tokens, not its rows x the longest.
        out = decode_until_eos(model, ids.to(model.device), mask.to(model.device), kwargs, eos,
                               output_logits=summarize_logits is not None, stop=stop)
        tokens, logits = out if summarize_logits is not None else (out, None)
        for r, i in enumerate(rows):
            cut = next((k + 1 for k, t in enumerate(tokens[r]) if t in eos), len(tokens[r]))
            answers[i] = tokens[r][:cut]
            if summarize_logits is not None:
                summaries[i] = summarize_logits(logits[r][:cut].float(), answers[i])
    return (answers, summaries) if summarize_logits is not None else answers
