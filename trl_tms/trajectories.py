"""Trajectories: completions sampled from each snapshot of the history, on the one model being trained."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, replace

import torch
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging
from trl.data_utils import is_conversational

from .atomic import atomic_folder, write_json_atomically
from .data import as_completion, completion_text, prompt_token_ids
from .history import AdapterHistory
from .routing import RowRouter

SLOT_PREFIX = "tms_slot_"
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


class HotSwapGenerator:
    """
    The default generation backend, built once by the trainer (as TRL's GRPO trainer builds its generation object):
    the snapshots of `history` are hot-swapped into spare adapter slots of `model` and sampled with its `generate`.
    Every backend has this interface: `generate(steps)` returns the trajectories of those snapshots, and `close()` frees
    what the backend holds for generation once the trainer is done sampling.

    Args:
        model, tokenizer, prompts, history, sampling:
            As for [`generate_trajectories`].
        **options:
            The other arguments of [`generate_trajectories`] (`adapter_name`, `chat_template`, `generation_context`,
            `disable_tqdm`, `parts_dir`, `process_index`, `num_processes`).
    """

    def __init__(self, model, tokenizer, prompts: Dataset, history: AdapterHistory, sampling: SamplingParams, **options):
        self.model, self.tokenizer, self.prompts, self.history, self.sampling = model, tokenizer, prompts, history, sampling
        self.options = options

    def generate(self, steps: list[int] | None = None, pairs: set[tuple[int, int]] | None = None) -> Dataset:
        """The trajectories of the snapshots of `steps` (default: all of the history), or of the `(prompt_index,
        snapshot_step)` `pairs` only."""
        return generate_trajectories(
            self.model, self.tokenizer, self.prompts, self.history, self.sampling, steps=steps, pairs=pairs,
            **self.options,
        )

    def close(self) -> None:
        """Nothing to free: the model is the one being trained (a backend with an engine of its own shuts it down)."""


def generate_trajectories(
    model,
    tokenizer,
    prompts: Dataset,
    history: AdapterHistory,
    sampling: SamplingParams,
    *,
    adapter_name: str = "default",
    chat_template: str | None = None,
    generation_context=None,
    disable_tqdm: bool = False,
    parts_dir: str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    steps: list[int] | None = None,
    pairs: set[tuple[int, int]] | None = None,
) -> Dataset:
    """
    Sample `sampling.samples_per_checkpoint` completions for every prompt from every snapshot in `history` (or for the
    given `pairs` of a prompt and a snapshot only).

    Snapshots are hot-swapped into spare adapter slots of `model` (a `PeftModel`), so one base model serves the whole
    history; several snapshots share one `generate` call, each row routed to its own snapshot by [`RowRouter`]. The
    slots are removed before returning, and the trained adapter is left active and trainable.

    Args:
        model ([`~peft.PeftModel`]):
            The model being trained.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer with a pad token.
        prompts ([`~datasets.Dataset`]):
            Prompt-completion dataset; only the prompts are used.
        history ([`AdapterHistory`]):
            The snapshots to sample from.
        sampling ([`SamplingParams`]):
            Sampling settings.
        adapter_name (`str`, *optional*, defaults to `"default"`):
            The trained adapter, whose configuration the slots copy.
        chat_template (`str`, *optional*):
            Chat template override, as used by the SFT preprocessing.
        generation_context (`Callable`, *optional*):
            Context manager factory yielding the model to generate with (e.g. TRL's `unwrap_model_for_generation`).
        disable_tqdm (`bool`, *optional*, defaults to `False`):
            Hide the progress bar.
        parts_dir (`str`, *optional*):
            Folder where the trajectories of each group of snapshots are written (atomically) as soon as they are
            sampled, and read back instead of sampled again: an interrupted generation continues where it stopped.
            Only the main process (`process_index == 0`) reads and writes them.
        process_index (`int`, *optional*, defaults to `0`) and num_processes (`int`, *optional*, defaults to `1`):
            With several processes (launched by `accelerate` or `torchrun`), the batches of prompts are dealt out across
            them and the trajectories gathered, so every process returns all of them and every prompt is sampled once.
            Each batch is seeded on its own, from `sampling.seed`, its snapshots and its position: the trajectories do
            not depend on the number of processes nor on where an interrupted generation stopped.
        steps (`list[int]`, *optional*):
            Sample from these snapshots of the history only (default: all of them).
        pairs (`set[tuple[int, int]]`, *optional*):
            Sample these `(prompt_index, snapshot_step)` pairs only, e.g. those the student will draw
            ([`MixtureDataset.missing_pairs`]). Their rows fill each `generate` call whatever snapshot they come from;
            the batches' seeds and stored parts are keyed by the pairs, so the same pairs give the same trajectories.

    Returns:
        [`~datasets.Dataset`]: One row per trajectory with columns `prompt_index`, `prompt`, `completion`,
        `snapshot_step`, `sample_index`, `finished` (stopped at EOS) and `num_tokens`.
    """
    if pairs is not None:
        steps = steps_of_pairs(pairs, steps, len(prompts))
        if not steps:
            return trajectories_dataset(tokenizer, prompts, {key: [] for key in PART_KEYS})
    steps = steps_to_sample(history, steps)
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before generating trajectories.")

    peft_config = model.peft_config[adapter_name]
    # PEFT cannot route rows to different DoRA adapters within one batch.
    use_dora = getattr(peft_config, "use_dora", False)
    per_call = 1 if use_dora else min(sampling.snapshots_per_generate, len(steps))
    slots = [f"{SLOT_PREFIX}{j}" for j in range(per_call)]

    prompt_ids = [prompt_token_ids(tokenizer, example, chat_template) for example in prompts]
    # Longest prompts first: similar lengths share a batch (less padding) and an out-of-memory error shows at once.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    groups = [steps[i : i + per_call] for i in range(0, len(steps), per_call)]
    rows_per_prompt = per_call * sampling.samples_per_checkpoint
    prompts_per_call = max(1, sampling.batch_size // rows_per_prompt)
    # Each group's calls: (prompt, snapshot) pairs, longest prompts first. All pairs: a call is a batch of prompts times
    # the group's snapshots. Given pairs: as many pairs per call, whatever their snapshots.
    calls, salts = [], []
    for group in groups:
        wanted = [(i, step) for i in order for step in group if pairs is None or (i, step) in pairs]
        size = prompts_per_call * (len(group) if pairs is None else per_call)
        calls.append([wanted[i : i + size] for i in range(0, len(wanted), size)])
        salts.append(None if pairs is None else pairs_digest(wanted))
    mine = [range(process_index, len(group_calls), num_processes) for group_calls in calls]

    records = {key: [] for key in PART_KEYS}
    store = PartStore(parts_dir)
    generation_context = generation_context or contextlib.nullcontext
    was_training = model.training
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        # Seeded sampling that leaves the caller's random streams (CPU and GPU) as they were.
        with torch.random.fork_rng(devices=devices), generation_context(model) as gen_model, torch.no_grad(), \
                _slots(model, slots, peft_config, adapter_name), sampling_params_only(gen_model):
            # The slots live inside the generation context only: under ZeRO-3 it gathers the weights the engine
            # partitioned, and the slots are none of them.
            slot_parameters = {slot: history.slot_parameters(model, slot) for slot in slots}
            route = RowRouter(model, slots)
            gen_model.eval()
            kwargs = sampling.generate_kwargs(tokenizer, gen_model)
            device = next(gen_model.parameters()).device
            eos_ids = eos_token_ids(kwargs["eos_token_id"])

            def sample(call: list[tuple[int, int]], slot_of: dict[int, str]) -> list[tuple]:
                """One `generate` call: each (prompt, snapshot) pair of `call` x each sample, as PART_KEYS rows."""
                input_ids, attention_mask = _left_pad([prompt_ids[i] for i, _ in call], tokenizer.pad_token_id)
                new_tokens = _generate_samples(
                    gen_model, input_ids.to(device), attention_mask.to(device), [slot_of[step] for _, step in call],
                    route, kwargs, eos_ids, samples=sampling.samples_per_checkpoint,
                )
                row_meta = [(i, step, k) for i, step in call for k in range(sampling.samples_per_checkpoint)]
                return [(*meta, *until_eos(tokens, eos_ids)) for meta, tokens in zip(row_meta, new_tokens)]

            progress = tqdm(total=sum(map(len, mine)), desc="Generating trajectories", disable=disable_tqdm)
            for g, group in enumerate(groups):
                part = store.read(group, salts[g]) if process_index == 0 else None
                if num_processes > 1:
                    part = broadcast_object_list([part])[0]
                if part is None:
                    for slot, step in zip(slots, group):
                        history.load_into(model, step, slot, slot_parameters[slot])
                    # The next group's snapshots are read while this one samples.
                    history.prefetch(groups[g + 1] if g + 1 < len(groups) else [], pin_memory=device.type == "cuda")
                    rows = []
                    for b in mine[g]:
                        torch.manual_seed(batch_seed(sampling.seed, group[0], b, salts[g] or 0))
                        rows += sample(calls[g][b], dict(zip(group, slots)))
                        progress.update(1)
                    if num_processes > 1:
                        rows = gather_object(rows)
                    part = PartStore(parts_dir if process_index == 0 else None).write(group, rows, salts[g])
                else:
                    progress.update(len(mine[g]))
                for key, values in part.items():
                    records[key].extend(values)
            progress.close()
    finally:
        history.prefetch([])
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        model.train(was_training)

    return trajectories_dataset(tokenizer, prompts, records)


@contextlib.contextmanager
def _slots(model, slots: list[str], peft_config, adapter_name: str):
    """Spare adapter slots on `model` for the block; removed after it, with the trained adapter active again."""
    for slot in slots:
        model.add_adapter(slot, peft_config)
    try:
        yield
    finally:
        for slot in slots:
            model.delete_adapter(slot)
        model.set_adapter(adapter_name)


LENGTH_GRAIN = 16  # a fitted length budget is rounded up to this many tokens


def fitted_max_new_tokens(tokenizer, dataset: Dataset, factor: float, cap: int) -> int:
    """`factor` times the longest completion of `dataset` in tokens, rounded up to `LENGTH_GRAIN`, at most `cap`."""
    texts = [completion_text(c) for c in dataset["completion"]]
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return min(cap, LENGTH_GRAIN * math.ceil(factor * longest / LENGTH_GRAIN))


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


def steps_to_sample(history: AdapterHistory, steps: list[int] | None) -> list[int]:
    """The snapshot steps to sample from, sorted (default: all), checked against the history."""
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


def batch_seed(seed: int, first_step: int, batch: int, salt: int = 0) -> int:
    """The seed of one batch of prompts for the group of snapshots starting at `first_step`: independent of processes.
    `salt` (see [`pairs_digest`]) tells apart batches of different pairs of a group."""
    return ((seed * 1_000_003 + first_step) * 10_007 + batch + salt * 7_919) % 2**63


def pairs_digest(pairs) -> int:
    """A 48-bit number that names a set of (prompt_index, snapshot_step) pairs: the same pairs, the same number."""
    text = json.dumps(sorted([int(i), int(step)] for i, step in pairs))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


DROP_FINISHED_EVERY = 16  # new tokens between two checks for rows that reached EOS
# `False` encodes a prompt once per sample, as rows of their own: the reference a benchmark times the shared prompt
# pass against.
SHARE_PROMPT_PASS = True


def _generate_samples(
    model, input_ids, attention_mask, row_slots, route, kwargs, eos_ids, samples: int = 1
) -> list[list[int]]:
    """
    `generate` `samples` continuations of each row, dropping finished rows as they end (see [`decode_until_eos`]).
    Returns the new tokens of each row's samples, row by row (`samples` consecutive lists per row).

    The samples of a row share one pass over its prompt: the prompt but its last token is encoded once per row, the
    cache repeated for the samples, and sampling starts from the last token (so the first sampled tokens differ).
    Greedy samples are all the same: each row is generated once and repeated.
    """
    if samples > 1 and not kwargs.get("do_sample"):
        once = _generate_samples(model, input_ids, attention_mask, row_slots, route, kwargs, eos_ids)
        return [list(tokens) for tokens in once for _ in range(samples)]
    cache = None
    if samples > 1:
        if SHARE_PROMPT_PASS and _cache_is_growable(model) and input_ids.shape[1] > 1:
            cache = _encode_prompts(model, input_ids[:, :-1], attention_mask[:, :-1], row_slots, route, kwargs)
            cache.batch_repeat_interleave(samples)
        input_ids = input_ids.repeat_interleave(samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(samples, dim=0)
        row_slots = [slot for slot in row_slots for _ in range(samples)]
    return decode_until_eos(model, input_ids, attention_mask, kwargs, eos_ids, row_slots=row_slots, route=route,
                            cache=cache)


def _cache_is_growable(model) -> bool:
    # A cache of fixed size (a generation config's `cache_implementation="static"`, "hybrid", ...) can neither grow past
    # the call that made it nor drop rows: such models generate in one call.
    return getattr(model.generation_config, "cache_implementation", None) in (None, "dynamic")


def decode_until_eos(
    model, input_ids, attention_mask, kwargs: dict, eos_ids: set[int], row_slots: list | None = None, route=None,
    cache=None, output_logits: bool = False,
):
    """
    `model.generate(**kwargs)` from left-padded `input_ids`, in chunks of `DROP_FINISHED_EVERY` new tokens: after each
    chunk the rows that produced a token of `eos_ids` leave the batch (with their KV-cache rows) and the others continue
    from the cache. `generate` alone keeps computing every finished row until the whole batch is done.

    Returns the new tokens of each row (a finished row's chunk is padded after its EOS, as `generate` pads it). With
    `output_logits=True`, returns `(tokens, logits)`: per row, the raw next-token logits that chose its tokens
    (`[new tokens, vocab]`). `route(row_slots)` (see [`RowRouter`]) gives the routing arguments of each call's rows;
    `cache` continues from an existing KV cache of `input_ids` but their last token.
    """
    every = DROP_FINISHED_EVERY if _cache_is_growable(model) else kwargs["max_new_tokens"]
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
            if not eos_ids.intersection(row_tokens):
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


def _encode_prompts(model, input_ids, attention_mask, row_slots, route, kwargs):
    """The KV cache of `input_ids`, made by `generate` itself (its position ids, masks and model-specific inputs) in a
    one-token greedy call whose token is dropped: the cache holds the inputs only."""
    greedy = {**kwargs, "max_new_tokens": 1, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with route(row_slots) as routing:
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **greedy, return_dict_in_generate=True, **routing
        )
    return getattr(output, CACHE)


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
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
