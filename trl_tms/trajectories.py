"""
The default generation backend: trajectories sampled from each snapshot of the history on the one model being trained,
the snapshots hot-swapped into spare PEFT adapter slots. What it shares with the vLLM backend is in `generation.py`.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset
from tqdm.auto import tqdm

from .data import prompt_token_ids
from .generation import (
    CACHE,
    PART_KEYS,
    PartStore,
    SamplingParams,
    TrajectoryGenerator,
    batch_seed,
    cache_is_growable,
    decode_until_eos,
    empty_trajectories,
    eos_token_ids,
    left_pad,
    pairs_digest,
    sampling_params_only,
    steps_to_sample,
    trajectories_dataset,
    until_eos,
)
from .history import AdapterHistory
from .routing import RowRouter

SLOT_PREFIX = "tms_slot_"


class HotSwapGenerator(TrajectoryGenerator):
    """
    The default generation backend ([`TrajectoryGenerator`]): the snapshots of `history` are hot-swapped into spare
    adapter slots of `model` and sampled with its `generate`.

    Args:
        model, tokenizer, prompts, history, sampling:
            As for [`generate_trajectories`].
        **options:
            The other arguments of [`generate_trajectories`] (`adapter_name`, `chat_template`, `generation_context`,
            `disable_tqdm`, `parts_dir`, `process_index`, `num_processes`).
    """

    def __init__(self, model, tokenizer, prompts: Dataset, history: AdapterHistory, sampling: SamplingParams, **options):
        super().__init__(model, tokenizer, prompts, history, sampling)
        self.options = options

    def generate(self, steps: list[int] | None = None, pairs: set[tuple[int, int]] | None = None) -> Dataset:
        """The trajectories of the snapshots of `steps` (default: all of the history), or of the `(prompt_index,
        snapshot_step)` `pairs` only. Nothing to free at `close()`: the model is the one being trained."""
        return generate_trajectories(
            self.model, self.tokenizer, self.prompts, self.history, self.sampling, steps=steps, pairs=pairs,
            **self.options,
        )


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
    steps = steps_to_sample(history, steps, pairs, len(prompts))
    if not steps:
        return empty_trajectories(tokenizer, prompts)
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
                input_ids, attention_mask = left_pad([prompt_ids[i] for i, _ in call], tokenizer.pad_token_id)
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
        if SHARE_PROMPT_PASS and cache_is_growable(model) and input_ids.shape[1] > 1:
            cache = _encode_prompts(model, input_ids[:, :-1], attention_mask[:, :-1], row_slots, route, kwargs)
            cache.batch_repeat_interleave(samples)
        input_ids = input_ids.repeat_interleave(samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(samples, dim=0)
        row_slots = [slot for slot in row_slots for _ in range(samples)]
    return decode_until_eos(model, input_ids, attention_mask, kwargs, eos_ids, row_slots=row_slots, route=route,
                            cache=cache)


def _encode_prompts(model, input_ids, attention_mask, row_slots, route, kwargs):
    """The KV cache of `input_ids`, made by `generate` itself (its position ids, masks and model-specific inputs) in a
    one-token greedy call whose token is dropped: the cache holds the inputs only."""
    greedy = {**kwargs, "max_new_tokens": 1, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with route(row_slots) as routing:
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **greedy, return_dict_in_generate=True, **routing
        )
    return getattr(output, CACHE)
