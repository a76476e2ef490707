"""What TMS costs on top of SFT, measured as ratios within one run (these machines are noisy; compare ratios, not
seconds across runs).

    python benchmarks/speed.py --model tiny          # a random tiny Llama built locally: seconds
    python benchmarks/speed.py --model smollm2       # the embedded SmolLM2-135M-Instruct: minutes on CPU
    python benchmarks/speed.py --model tiny --micro_only   # snapshot, swap and generation only, no training runs

Prints a table and writes `benchmarks/results/speed_<model>.json`. Measured:
- snapshot: what the training loop waits for when a snapshot is taken (the copy to CPU, or on a GPU a copy on the GPU:
  TMSTrainer does the rest in the background; the time until the file is on disk is shown beside it), as a fraction of
  one optimizer step;
- swap: hot-swapping a snapshot into a slot vs loading base model + adapter from disk;
- generation: trajectory tokens/s with all snapshots in one `generate` call (rows routed by stacked LoRA factors, and
  by PEFT's `adapter_names` for reference), one snapshot per call, and a model reloaded per snapshot (same prompts,
  same snapshots);
- the bandwidth bound (`bandwidth.py`): the machine's copy bandwidth and the bytes a decode step reads (weights, the
  call's LoRA factors, KV cache) give the most new tokens/s a batch of B rows could reach; generation tokens/s at
  B = 8, 32, 64 rows per call (4 snapshots per call) as a fraction of it, and of the matrix-product bound: the step's
  linear layers and LoRA factors timed on their own at B rows, plus the prompt pass's products at large-batch speed,
  which on a few CPU cores is the tighter limit;
- end to end: TMS / SFT wall time on the same data and step count, by phase, for two-pass TMS (the paper), two-pass
  TMS with `trajectory_choice="pld"` and online TMS (`tms_mode="online"`, one training run);
- memory: peak resident memory during training (sampled every 10 ms from the start of `train()`, so model loading is
  left out) of each TMS run / the SFT run, each in its own process, and history disk use vs T full model checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import registry  # noqa: E402
from harness.measure import PeakRSS  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BUNDLE_DATA = "speed_data.json"


def load(model_name: str, workdir: str):
    """Base model, tokenizer, a local folder holding the base (for reload timings), train and eval data."""
    if model_name == "tiny":
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from conftest import make_examples
        from tiny import build_model

        model, tokenizer = build_model("llama")
        train, heldout = make_examples(32, seed=0), make_examples(8, seed=1)
    elif model_name == "smollm2":
        from trl_tms.probes.embedded import load_embedded_model, load_gsm_symbolic

        model, tokenizer = load_embedded_model()
        train, heldout = load_gsm_symbolic(32, 8, seed=0)
    else:  # a bundle folder written by --export_bundle: SmolLM2's architecture with random weights
        from datasets import Dataset
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_name), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        with open(os.path.join(model_name, BUNDLE_DATA)) as f:
            data = json.load(f)
        train, heldout = Dataset.from_list(data["train"]), Dataset.from_list(data["heldout"])
    path = os.path.join(workdir, "base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path, train, heldout


def export_bundle(folder: str) -> None:
    """What a machine without the embedded model needs to run SmolLM2's architecture: config, tokenizer, data."""
    from trl_tms.probes.embedded import load_embedded_model, load_gsm_symbolic

    model, tokenizer = load_embedded_model()
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    train, heldout = load_gsm_symbolic(32, 8, seed=0)
    with open(os.path.join(folder, BUNDLE_DATA), "w") as f:
        json.dump({"train": train.to_list(), "heldout": heldout.to_list()}, f)


def progress(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def settings(model_name: str) -> dict:
    tiny = model_name == "tiny"  # the others: SmolLM2 (embedded, or its architecture from a bundle)
    return dict(
        per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-3, max_length=64 if tiny else 256,
        logging_steps=4, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        # Set for both arms: SFTConfig and TMSConfig default `bf16` differently on a CPU without a bf16 GPU.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        disable_tqdm=True, seed=0,
    )


def tms_fields(model_name: str) -> dict:
    return dict(num_checkpoints=4, max_new_tokens=16 if model_name == "tiny" else 64, generation_batch_size=32)


ARMS = registry.SPEED_ARMS  # TMS arms: their fields on top of `tms_fields`


# On a GPU: TMS with its generation calls' KV cache and logits sized to this fraction of SFT's peak GPU memory
# (`generation_memory_mb`): does a budget keep TMS's peak within 1.05x SFT's? Generation runs after the backward pass's
# activations are freed, so its calls may take more than 5% without raising the peak; 10% leaves SmolLM2-135M room for
# one prompt of 4 snapshots (about 15 MB per row at 256 + 64 tokens in fp32).
MEMORY_BUDGET_FRACTION = 0.10


def run_arm(arm: str, model_name: str, workdir: str, generation_memory_mb: float | None = None) -> dict:
    """One training run (SFT or a TMS arm) in this process; returns wall times and peak RSS."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from trl_tms import TMSConfig, TMSTrainer

    model, tokenizer, _, train, heldout = load(model_name, workdir)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    out = os.path.join(workdir, arm)
    if DEVICE == "cuda":
        model.to(DEVICE)
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if arm == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(out, **settings(model_name)), train_dataset=train,
                             eval_dataset=heldout, processing_class=tokenizer, peft_config=lora)
        with PeakRSS() as memory:
            trainer.train()
        phases = {"train": time.perf_counter() - started}
    else:
        fields = dict(ARMS[arm].settings) if arm in ARMS else {}
        if arm == "tms_memory":
            fields["generation_memory_mb"] = generation_memory_mb
        config = TMSConfig(out, log_pld=False, log_retention=False, **tms_fields(model_name), **fields, **settings(model_name))
        trainer = TMSTrainer(model=model, args=config, train_dataset=train, eval_dataset=heldout,
                             processing_class=tokenizer, peft_config=lora)
        with PeakRSS() as memory:
            trainer.train()
        log = trainer.state.log_history
        if config.tms_mode == "online":
            phases = {"online": log[-1]["train_runtime"], "trajectories": trainer.stats.seconds}
        else:
            phases = {
                "harvest": trainer.harvest_output.metrics["train_runtime"],
                "trajectories": trainer.stats.seconds,
                "student": log[-1]["train_runtime"],
                "pld_scoring": sum(e["tms_scoring_seconds"] for e in log if "tms_scoring_seconds" in e),
            }
        history_bytes = sum(
            os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(trainer.history_dir)
            for f in files if "step-" in root
        )
        phases["history_bytes"] = history_bytes
    return {
        "wall_s": time.perf_counter() - started,
        "steps": trainer.state.global_step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mb": memory.peak / 2**20,
        **({"train_peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if DEVICE == "cuda" else {}),
        **phases,
    }


def timed(fn, repeats: int) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def micro(model_name: str, workdir: str) -> dict:
    """Snapshot, swap and generation timings on one model in this process."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from trl_tms import AdapterHistory, SamplingParams, generate_trajectories
    from trl_tms.trainer import TMSTrainer  # noqa: F401  (imports the full stack before timing)

    model, tokenizer, base_path, train, _ = load(model_name, workdir)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.to(DEVICE)

    # One optimizer step on a batch of 4 at the run's max length.
    length = settings(model_name)["max_length"]
    batch = tokenizer([" ".join(["what is one plus two ?"] * 64)] * 4, return_tensors="pt", truncation=True,
                      max_length=length).to(DEVICE)
    batch["labels"] = batch["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step_s = timed(step, 3)
    progress(f"optimizer step {1000 * step_s:.0f} ms")
    # As TMSTrainer takes them: the training loop waits for the copy (on a GPU only for a copy on the GPU), the rest
    # happens in the background.
    history = AdapterHistory(model.peft_config["default"], directory=os.path.join(workdir, "history"),
                             background_writes=True)
    snapshot_s = timed(lambda: history.take(model, step=1), 5)
    history.flush()
    on_disk_s = timed(lambda: (history.take(model, step=1), history.flush()), 3)
    progress(f"snapshot {1000 * snapshot_s:.2f} ms, on disk after {1000 * on_disk_s:.2f} ms")
    for s in (2, 3, 4):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(0.01 * torch.randn_like(param))
        history.take(model, step=s)
    history.flush()

    model.add_adapter("probe", model.peft_config["default"])
    slot = history.slot_parameters(model, "probe")  # found once per generation call, as `generate_trajectories` does
    # The history serves written snapshots from their files. `generate_trajectories` reads each group's snapshots
    # ahead while the previous group samples (`prefetch`), so a swap waits for the copy only; the first group's swaps
    # read the file as well. Each swap takes the next of the 4 snapshots (75 MB in all), so that no timing copies from
    # a snapshot still in the CPU caches, as a run never does; a history that keeps its snapshots in memory is the
    # reference.
    kept = AdapterHistory(history.peft_config, keep_in_memory=True)
    kept.adopt(history, history.steps)  # read from the files: copies of their own

    def swap_time(serve, read_ahead: bool = False) -> float:
        total = 0.0
        for i in range(12):
            s = history.steps[i % len(history.steps)]
            if read_ahead:
                history.prefetch([s], wait=True)
            sync()
            start = time.perf_counter()
            serve.load_into(model, s, "probe", slot)
            sync()
            total += time.perf_counter() - start
        return total / 12

    swap_s = swap_time(history, read_ahead=True)
    swap_reading_s = swap_time(history)
    swap_in_memory_s = swap_time(kept)
    del kept
    model.delete_adapter("probe")
    model.set_adapter("default")

    def reload():  # to the device the swap serves: a reload has to put the weights there too
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), history.path(2)).to(DEVICE)

    progress(f"swap {1000 * swap_s:.2f} ms (read ahead), {1000 * swap_reading_s:.2f} ms (reading the file), "
             f"{1000 * swap_in_memory_s:.2f} ms (kept in memory)")
    reload_s = timed(reload, 2)
    progress(f"reload {1000 * reload_s:.0f} ms")

    prompts = train.select(range(8))
    new_tokens = tms_fields(model_name)["max_new_tokens"]
    rates = {}
    arms = {  # label: (snapshots per call, samples per prompt, reference context)
        "all_snapshots_per_call": (4, 1, contextlib.nullcontext()),
        "all_snapshots_per_call_peft_routing": (4, 1, peft_routing()),
        "one_snapshot_per_call": (1, 1, contextlib.nullcontext()),
        # samples_per_checkpoint > 1: the samples of a prompt share one pass over it, against one pass per sample.
        "4_samples_shared_prompt_pass": (4, 4, contextlib.nullcontext()),
        "4_samples_prompt_pass_per_sample": (4, 4, prompt_pass_per_sample()),
    }
    for label, (per_call, samples, reference) in arms.items():
        sampling = SamplingParams(samples_per_checkpoint=samples, max_new_tokens=new_tokens, batch_size=32,
                                  snapshots_per_generate=per_call)
        start = time.perf_counter()
        with reference:
            out = generate_trajectories(model, tokenizer, prompts, history, sampling, disable_tqdm=True)
        sync()
        rates[label] = sum(out["num_tokens"]) / (time.perf_counter() - start)
        progress(f"generation, {label}: {rates[label]:.0f} tokens/s")
    start, tokens = time.perf_counter(), 0
    for s in history.steps:
        fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), history.path(s)).to(DEVICE)
        sampling = SamplingParams(max_new_tokens=new_tokens, batch_size=32, snapshots_per_generate=1)
        single = one_snapshot(history, s)
        tokens += sum(generate_trajectories(fresh, tokenizer, prompts, single, sampling, disable_tqdm=True)["num_tokens"])
        sync()
    rates["reload_per_snapshot"] = tokens / (time.perf_counter() - start)
    bound = bandwidth_bound(model, tokenizer, train, history, new_tokens)

    model_bytes = sum(os.path.getsize(os.path.join(base_path, f)) for f in os.listdir(base_path) if f.endswith(".safetensors"))
    snapshot_bytes = os.path.getsize(os.path.join(history.path(1), "adapter_model.safetensors"))
    return {
        "optimizer_step_ms": 1000 * step_s,
        "snapshot_ms": 1000 * snapshot_s,
        "snapshot_over_step": snapshot_s / step_s,
        "snapshot_on_disk_ms": 1000 * on_disk_s,
        "swap_ms": 1000 * swap_s,
        "reload_ms": 1000 * reload_s,
        "reload_over_swap": reload_s / swap_s,
        "swap_reading_file_ms": 1000 * swap_reading_s,
        "swap_kept_in_memory_ms": 1000 * swap_in_memory_s,
        "reload_over_swap_reading_file": reload_s / swap_reading_s,
        "history_memory_mb": history_memory(model, workdir),
        "tokens_per_s": rates,
        "multi_over_single_per_token": rates["all_snapshots_per_call"] / rates["one_snapshot_per_call"],
        "stacked_over_peft_routing_per_token": rates["all_snapshots_per_call"] / rates["all_snapshots_per_call_peft_routing"],
        "shared_over_per_sample_prompt_pass_per_token": (rates["4_samples_shared_prompt_pass"] /
                                                         rates["4_samples_prompt_pass_per_sample"]),
        "snapshot_bytes": snapshot_bytes,
        "full_model_bytes": model_bytes,
        "bandwidth": bound,
    }


def bandwidth_bound(model, tokenizer, train, history, new_tokens: int, rows=(8, 32, 64)) -> dict:
    """Generation tokens/s at several rows per call (4 snapshots each) against the memory-bandwidth bound."""
    from bandwidth import copy_bandwidth, decode_step_bytes, matmul_seconds, tokens_per_s_bound

    from trl_tms import SamplingParams, generate_trajectories
    from trl_tms.data import prompt_token_ids

    per_call = 4
    prompts = train.select(range(max(rows) // per_call))  # the same prompts for every batch size
    prompt_tokens = sum(len(prompt_token_ids(tokenizer, row)) for row in prompts) / len(prompts)
    bandwidth = copy_bandwidth(DEVICE)
    # Every row's prompt goes through the model once, its products then having rows x prompt tokens rows: at the speed
    # of large batches, timed on 512 rows and scaled. With prompts twice as long as the samples it is a large share.
    wide = matmul_seconds(model, 512, snapshots=per_call)
    prompt_pass = len(prompts) * per_call * prompt_tokens * wide["seconds"] / 512
    results = {"copy_bytes_per_s": bandwidth, "mean_prompt_tokens": prompt_tokens, "snapshots_per_call": per_call,
               "matmul_512_rows": wide, "prompt_pass_matmul_seconds": prompt_pass, "rows": {}}
    for batch in rows:
        sampling = SamplingParams(max_new_tokens=new_tokens, batch_size=batch, snapshots_per_generate=per_call)
        start = time.perf_counter()
        out = generate_trajectories(model, tokenizer, prompts, history, sampling, disable_tqdm=True)
        sync()
        seconds = time.perf_counter() - start
        mean_new = sum(out["num_tokens"]) / len(out)
        # A row's cache holds its prompt and, on average over its decode steps, half of its new tokens.
        step = decode_step_bytes(model, batch, prompt_tokens + mean_new / 2, snapshots=per_call)
        measured = sum(out["num_tokens"]) / seconds
        limit = tokens_per_s_bound(bandwidth, step["total"], batch)
        # The step's matrix products alone: on a few CPU cores they, not the memory traffic, bound larger batches.
        products = matmul_seconds(model, batch, snapshots=per_call)
        compute_limit = batch / products["seconds"]
        # The whole generation's products: the prompt pass, and every new token as a share of a full batch's step.
        new_total = sum(out["num_tokens"])
        whole_limit = new_total / (prompt_pass + new_total * products["seconds"] / batch)
        results["rows"][batch] = {"tokens_per_s": measured, "bound_tokens_per_s": limit, "fraction": measured / limit,
                                  "step_bytes": step, "mean_new_tokens": mean_new, "matmul": products,
                                  "matmul_bound_tokens_per_s": compute_limit,
                                  "matmul_bound_with_prompt_pass_tokens_per_s": whole_limit,
                                  "fraction_of_matmul_bound_with_prompt_pass": measured / whole_limit}
        progress(f"generation, {batch} rows per call: {measured:.0f} tokens/s, bandwidth bound {limit:.0f} "
                 f"({measured / limit:.1%}), matrix-product bound {compute_limit:.0f} decoding only, "
                 f"{whole_limit:.0f} with the prompt pass ({measured / whole_limit:.1%})")
    return results


def history_memory(model, workdir: str, T: int = 10) -> dict:
    """Resident memory the history adds while T snapshots are taken: kept in memory, or served from their files."""
    import ctypes

    import psutil

    from trl_tms import AdapterHistory

    def resident_mb() -> float:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc only: freed memory back to the system
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return psutil.Process().memory_info().rss / 2**20

    grown = {}
    for label, keep in (("kept_in_memory", True), ("served_from_files", False)):
        before = resident_mb()
        history = AdapterHistory(model.peft_config["default"], os.path.join(workdir, f"memory-{label}"),
                                 background_writes=True, keep_in_memory=keep)
        for step in range(T):
            history.take(model, step=step)
        history.flush()
        grown[label] = resident_mb() - before
        del history
    return {"T": T, **grown}


@contextlib.contextmanager
def peft_routing():
    """Route rows through PEFT's `adapter_names` instead of RowRouter's stacked LoRA factors (the reference arm)."""
    from trl_tms.routing import RowRouter

    RowRouter.stack_factors = False
    try:
        yield
    finally:
        RowRouter.stack_factors = True


@contextlib.contextmanager
def prompt_pass_per_sample():
    """Encode each prompt once per sample, as rows of their own (the reference arm for the shared prompt pass)."""
    from trl_tms import trajectories

    trajectories.SHARE_PROMPT_PASS = False
    try:
        yield
    finally:
        trajectories.SHARE_PROMPT_PASS = True


def one_snapshot(history, step):
    from trl_tms import AdapterHistory

    single = AdapterHistory(history.peft_config)
    single.adopt(history, [step])
    return single


def training_rows(results: dict, T: int) -> list[tuple]:
    """Ratios and table rows of the training runs (SFT and the TMS arms)."""
    m, sft, tms = results["micro"], results["sft"], results["tms"]
    results["ratios"].update({
        "tms_over_sft_wall": tms["wall_s"] / sft["wall_s"],
        "tms_over_sft_peak_rss": tms["peak_rss_mb"] / sft["peak_rss_mb"],
        "tms_over_sft_train_peak_rss": tms["train_peak_rss_mb"] / sft["train_peak_rss_mb"],
        "tms_all_over_sft_wall": results["tms_all"]["wall_s"] / sft["wall_s"],
        "tms_over_tms_all_trajectory_seconds": tms["trajectories"] / results["tms_all"]["trajectories"],
        "tms_pld_over_sft_wall": results["tms_pld"]["wall_s"] / sft["wall_s"],
        "tms_online_over_sft_wall": results["tms_online"]["wall_s"] / sft["wall_s"],
        "tms_online_over_tms_wall": results["tms_online"]["wall_s"] / tms["wall_s"],
        "tms_online_over_sft_train_peak_rss": results["tms_online"]["train_peak_rss_mb"] / sft["train_peak_rss_mb"],
        "history_disk_over_T_model_copies": tms["history_bytes"] / (T * m["full_model_bytes"]),
    })
    if DEVICE == "cuda":
        results["ratios"]["tms_over_sft_train_peak_gpu"] = tms["train_peak_gpu_mb"] / sft["train_peak_gpu_mb"]
        results["ratios"]["tms_online_over_sft_train_peak_gpu"] = (results["tms_online"]["train_peak_gpu_mb"] /
                                                                   sft["train_peak_gpu_mb"])
        results["ratios"]["tms_memory_over_sft_train_peak_gpu"] = (results["tms_memory"]["train_peak_gpu_mb"] /
                                                                   sft["train_peak_gpu_mb"])
    return [
        ("TMS / SFT wall time", f"{tms['wall_s']:.1f} s / {sft['wall_s']:.1f} s "
         f"(harvest {tms['harvest']:.1f}, trajectories {tms['trajectories']:.1f}, student {tms['student']:.1f})",
         f"{results['ratios']['tms_over_sft_wall']:.2f}", "low"),
        ("TMS sampling every trajectory / SFT wall time", f"{results['tms_all']['wall_s']:.1f} s (trajectories "
         f"{results['tms_all']['trajectories']:.1f}: drawn only / every one = "
         f"{results['ratios']['tms_over_tms_all_trajectory_seconds']:.2f})",
         f"{results['ratios']['tms_all_over_sft_wall']:.2f}", ""),
        ("TMS (pld choice) / SFT wall time", f"{results['tms_pld']['wall_s']:.1f} s (scoring "
         f"{results['tms_pld']['pld_scoring']:.1f})", f"{results['ratios']['tms_pld_over_sft_wall']:.2f}", ""),
        ("online TMS / SFT wall time", f"{results['tms_online']['wall_s']:.1f} s (training "
         f"{results['tms_online']['online']:.1f}, of which trajectories {results['tms_online']['trajectories']:.1f})",
         f"{results['ratios']['tms_online_over_sft_wall']:.2f}", "below two-pass"),
        ("online TMS / two-pass TMS wall time", "", f"{results['ratios']['tms_online_over_tms_wall']:.2f}", "< 1"),
        ("TMS / SFT peak RSS, whole process", f"{tms['peak_rss_mb']:.0f} MB / {sft['peak_rss_mb']:.0f} MB",
         f"{results['ratios']['tms_over_sft_peak_rss']:.3f}", ""),
        ("TMS / SFT peak RSS during train()", f"{tms['train_peak_rss_mb']:.0f} MB / {sft['train_peak_rss_mb']:.0f} MB",
         f"{results['ratios']['tms_over_sft_train_peak_rss']:.3f}", "<= 1.10"),
        ("online TMS / SFT peak RSS during train()", f"{results['tms_online']['train_peak_rss_mb']:.0f} MB",
         f"{results['ratios']['tms_online_over_sft_train_peak_rss']:.3f}", "<= 1.10"),
        *([("TMS / SFT peak GPU memory during train()", f"{tms['train_peak_gpu_mb']:.0f} MB / "
            f"{sft['train_peak_gpu_mb']:.0f} MB", f"{results['ratios']['tms_over_sft_train_peak_gpu']:.3f}", "<= 1.10"),
           ("online TMS / SFT peak GPU memory during train()", f"{results['tms_online']['train_peak_gpu_mb']:.0f} MB",
            f"{results['ratios']['tms_online_over_sft_train_peak_gpu']:.3f}", "<= 1.10"),
           (f"TMS, generation within {MEMORY_BUDGET_FRACTION:.0%} of SFT's peak / SFT peak GPU memory during train()",
            f"{results['tms_memory']['train_peak_gpu_mb']:.0f} MB (wall {results['tms_memory']['wall_s']:.1f} s)",
            f"{results['ratios']['tms_memory_over_sft_train_peak_gpu']:.3f}", "<= 1.05")] if DEVICE == "cuda" else []),
        ("history disk / T model copies", f"{tms['history_bytes'] / 1e6:.2f} MB / {T * m['full_model_bytes'] / 1e6:.1f} MB",
         f"{results['ratios']['history_disk_over_T_model_copies']:.4f}", "adapters only"),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a folder written by --export_bundle "
                        "(SmolLM2's architecture with random weights, for a machine without the embedded model)")
    parser.add_argument("--arm", choices=["sft", *ARMS, "tms_memory"], help=argparse.SUPPRESS)  # one run, for peak RSS
    parser.add_argument("--generation_memory_mb", type=float, help=argparse.SUPPRESS)  # of the tms_memory arm
    parser.add_argument("--output", default=None)
    parser.add_argument("--micro_only", action="store_true", help="Snapshot, swap and generation timings only: skip "
                        "the four training runs (for a short GPU session).")
    parser.add_argument("--export_bundle", metavar="FOLDER", help="Write SmolLM2's config, tokenizer and the data "
                        "to FOLDER and exit.")
    args = parser.parse_args()
    if args.export_bundle:
        export_bundle(args.export_bundle)
        return
    if args.model not in ("tiny", "smollm2") and not os.path.isfile(os.path.join(args.model, BUNDLE_DATA)):
        parser.error(f"--model {args.model!r}: use tiny, smollm2, or a folder written by --export_bundle.")
    name = args.model if args.model in ("tiny", "smollm2") else "smollm2_random"

    with tempfile.TemporaryDirectory() as workdir:
        if args.arm:
            print(json.dumps(run_arm(args.arm, args.model, workdir, args.generation_memory_mb)))
            return
        results = {"model": name, "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
                   "threads": torch.get_num_threads(), "micro": micro(args.model, workdir)}
        for arm in () if args.micro_only else ("sft", *ARMS, *(["tms_memory"] if DEVICE == "cuda" else [])):
            progress(f"training arm {arm}")
            command = [sys.executable, __file__, "--model", args.model, "--arm", arm]
            if arm == "tms_memory":
                budget = MEMORY_BUDGET_FRACTION * results["sft"]["train_peak_gpu_mb"]
                command += ["--generation_memory_mb", str(budget)]
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            results[arm] = json.loads(proc.stdout.strip().splitlines()[-1])

    m = results["micro"]
    T = 4
    results["ratios"] = {
        "snapshot_over_optimizer_step": m["snapshot_over_step"],
        "reload_over_swap": m["reload_over_swap"],
        "multi_snapshot_over_single_tokens_per_s": m["multi_over_single_per_token"],
        "stacked_over_peft_routing_tokens_per_s": m["stacked_over_peft_routing_per_token"],
        "shared_over_per_sample_prompt_pass_tokens_per_s": m["shared_over_per_sample_prompt_pass_per_token"],
    }
    rates = m["tokens_per_s"]
    rows = [
        ("snapshot / optimizer step", f"{m['snapshot_ms']:.2f} ms / {m['optimizer_step_ms']:.0f} ms (on disk "
         f"after {m['snapshot_on_disk_ms']:.1f} ms, in the background)", f"{m['snapshot_over_step']:.4f}", "< 0.01"),
        ("reload / swap (snapshot read ahead)", f"{m['reload_ms']:.0f} ms / {m['swap_ms']:.2f} ms",
         f"{m['reload_over_swap']:.0f}x", ">= 100x"),
        ("reload / swap reading the file (first group of a phase)", f"{m['reload_ms']:.0f} ms / "
         f"{m['swap_reading_file_ms']:.2f} ms", f"{m['reload_over_swap_reading_file']:.0f}x", ""),
        ("swap from a history kept in memory", f"{m['swap_kept_in_memory_ms']:.2f} ms", "", ""),
        (f"history memory, {m['history_memory_mb']['T']} snapshots: kept in memory / served from files",
         f"{m['history_memory_mb']['kept_in_memory']:.0f} MB / {m['history_memory_mb']['served_from_files']:.0f} MB",
         "", ""),
        ("tokens/s: 4 snapshots per call / 1", f"{rates['all_snapshots_per_call']:.0f} / "
         f"{rates['one_snapshot_per_call']:.0f}", f"{m['multi_over_single_per_token']:.2f}", ">= 1"),
        ("tokens/s: 4 per call, stacked / PEFT routing", f"{rates['all_snapshots_per_call']:.0f} / "
         f"{rates['all_snapshots_per_call_peft_routing']:.0f}", f"{m['stacked_over_peft_routing_per_token']:.2f}", ""),
        ("tokens/s: 4 samples per prompt, one prompt pass / one per sample", f"{rates['4_samples_shared_prompt_pass']:.0f} / "
         f"{rates['4_samples_prompt_pass_per_sample']:.0f}", f"{m['shared_over_per_sample_prompt_pass_per_token']:.2f}", ">= 1"),
        ("tokens/s: reload per snapshot", f"{rates['reload_per_snapshot']:.0f}", "", ""),
    ]
    bound = m["bandwidth"]
    rows.append(("copy bandwidth (read + write)", f"{bound['copy_bytes_per_s'] / 1e9:.1f} GB/s", "", ""))
    for batch, r in bound["rows"].items():
        rows.append((f"tokens/s at {batch} rows per call / bandwidth bound "
                     f"({r['step_bytes']['total'] / 2**20:.1f} MiB per decode step)",
                     f"{r['tokens_per_s']:.0f} / {r['bound_tokens_per_s']:.0f}", f"{r['fraction']:.1%}", ">= 50%"))
        if "matmul_bound_with_prompt_pass_tokens_per_s" in r:
            rows.append((f"tokens/s at {batch} rows per call / matrix-product bound, prompt pass included "
                         f"(decoding only: {r['matmul_bound_tokens_per_s']:.0f}; the step's products alone run at "
                         f"{r['matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s)",
                         f"{r['tokens_per_s']:.0f} / {r['matmul_bound_with_prompt_pass_tokens_per_s']:.0f}",
                         f"{r['fraction_of_matmul_bound_with_prompt_pass']:.1%}", ""))
    if not args.micro_only:
        rows += training_rows(results, T)
    print(f"\n{name} on {results['device']} ({results['threads']} threads), T={T}, LoRA r=16 all-linear\n")
    print("| measure | values | ratio | target |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    output = args.output or os.path.join(HERE, "results", f"speed_{name}{'_cuda' if DEVICE == 'cuda' else ''}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nWrote {output}")


if __name__ == "__main__":
    main()
