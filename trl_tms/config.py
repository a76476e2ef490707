import dataclasses
from dataclasses import dataclass, field

from transformers.utils import is_torch_bf16_gpu_available, is_torch_npu_available, is_torch_xpu_available, logging
from trl import SFTConfig

from .signals import check_alarm


logger = logging.get_logger(__name__)


def _bf16_accelerator_available() -> bool:
    return is_torch_bf16_gpu_available() or is_torch_xpu_available() or is_torch_npu_available()


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); None where the flags cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) if flags else None


# The named settings of `TMSConfig.recipe`; the evidence for each is in docs/results.md. When the study's evidence
# changes, the recipe follows it (and the docs' "Choose a recipe" says so).
RECIPES = {
    "retention": {"tms_mode": "online", "label_weight": 0.75, "num_checkpoints": 5},
    "paper": {"tms_mode": "two_pass", "label_weight": 0.25, "num_checkpoints": 10},
}
# What a mode defaults to where a field is not set, whichever recipe is named: its own recipe's settings (so
# `tms_mode="two_pass"` alone is the paper's setting).
MODE_DEFAULTS = {recipe["tms_mode"]: {k: v for k, v in recipe.items() if k != "tms_mode"} for recipe in RECIPES.values()}


@dataclass
class TMSConfig(SFTConfig):
    r"""
    Configuration class for the [`TMSTrainer`].

    Extends [`~trl.SFTConfig`] with the parameters of Trajectory-Mixed Supervision (TMS, arXiv 2602.03073). Every
    `SFTConfig` / `TrainingArguments` parameter keeps its meaning and applies to both training phases (the harvest run
    on the labels and the student run on the mixture). Defaults follow the paper where it states them (T = 10, alpha =
    0.25 in two-pass TMS), except the mode: the default `recipe="retention"` is online TMS at alpha 0.75 and T = 5.
    One default differs from `SFTConfig`: when `bf16` is not set, `use_cpu` is off and no bf16-capable accelerator is
    present, it is `False` (fp32 on CPU) rather than an error.

    Parameters:
        > The recipe

        recipe (`str`, *optional*, defaults to `"retention"`):
            The settings TMS starts from, by name; a field you set yourself keeps your value. `"retention"` (the
            default): online TMS with `label_weight=0.75` and T = `num_checkpoints` = 5, the setting that learned
            about as much as SFT at a lower learning rate with less drift in both regimes of our study (T = 5 halves
            its `generate` calls against T = 10; see the how-to guide, "Choose a recipe", for what that changed).
            `"paper"`: the paper's two-pass TMS with `label_weight=0.25` and T = 10. A recipe sets `tms_mode` and,
            where they are not set, the `label_weight` and `num_checkpoints` of that mode (two-pass 0.25 and 10,
            online 0.75 and 5), so `tms_mode="two_pass"` alone is the paper's setting.

        > Parameters that control the adapter history (harvest phase)

        tms_mode (`str`, *optional*):
            Defaults to the recipe's (`"online"` for `"retention"`, `"two_pass"` for `"paper"`).
            `"two_pass"` (the paper): a harvest run on the labels takes the snapshots, then a student restarts from the
            initial adapter and trains on the mixture. `"online"`: one run; every `online_snapshot_every` steps, from
            step 0, the adapter being trained is snapshotted and samples trajectories (of the prompts the draws until
            the next snapshot need, see `trajectories_to_generate`), and the mixture draws from the last
            `num_checkpoints` snapshots taken so far (labels only are not needed at the start: step 0's snapshot is the
            initial model). Training costs one run instead of two. Needs `dataloader_num_workers=0` (the mixture
            grows during an epoch) and `trajectory_choice="uniform"`.
        online_snapshot_every (`int`, *optional*):
            Online TMS: optimizer steps between snapshots (taken at steps 0, K, 2K, ...; the mixture keeps the last
            `num_checkpoints`). By default, `num_checkpoints` snapshots at steps `k * steps // num_checkpoints`,
            `k = 0..T-1`, all kept in the mixture.

        num_checkpoints (`int`, *optional*):
            Number of adapter snapshots (T) taken during the harvest run, spaced evenly over its optimizer steps (the
            initial adapter, step 0, is not one of them), or, online, taken from step 0 on. Defaults to the mode's
            recipe's: 10 two-pass (the paper's), 5 online. Must not exceed the number of optimizer steps.
        history_dir (`str`, *optional*):
            Folder that receives the snapshots (one PEFT adapter folder `step-<N>` each) and the trajectories. Defaults
            to `<output_dir>/_tms_history`; the leading underscore keeps it out of `push_to_hub` uploads.

        push_history (`bool`, *optional*, defaults to `False`):
            Whether `push_to_hub` also uploads the adapter snapshots, to `history/step-<N>/` in the repo, each loadable
            with `PeftModel.from_pretrained(base, repo_id, subfolder="history/step-<N>")`. By default only the
            student's adapter and its model card are uploaded.
        hub_base_model (`str`, *optional*):
            Hub id of the base model, written as `base_model` in the model card. Needed only when it cannot be read
            from the model: one loaded from a local folder outside the Hugging Face cache, or one with no name.

        > Parameters that control trajectory generation

        samples_per_checkpoint (`int`, *optional*, defaults to `1`):
            Number of completions each snapshot samples for every training prompt. The samples of a prompt share one
            pass over it (its KV cache is repeated for them); with greedy decoding they are identical, so the prompt is
            generated once and repeated.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature for the trajectories. `0.0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus-sampling probability mass for the trajectories.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k filtering for the trajectories. `0` disables it.
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Maximum number of tokens generated per trajectory. Generation stops earlier at the EOS token.
        max_new_tokens_from_labels (`float`, *optional*):
            Fit the trajectory length to the task: at most this many times the longest training label in tokens, plus
            its end token, rounded up to a multiple of 16, and never more than `max_new_tokens`. Default: none (up to
            `max_new_tokens`). At `1.0` an answer as long as the longest label always fits and a longer one is cut
            (handled as `unfinished_trajectories` says): it made online TMS cheaper but drifted further from the base
            in our check (docs/results.md, "Does the faster recipe learn and retain as before?"), so no recipe sets it.
        generation_batch_size (`int`, *optional*, defaults to `16`):
            Number of sequences per `generate` call (prompts x resident snapshots x samples). A call holds at least one
            prompt, so it exceeds this when `snapshots_per_generate * samples_per_checkpoint` does.
        generation_memory_mb (`float`, *optional*):
            Size the generation calls by memory instead of a row count: as many rows (at most `generation_batch_size`)
            as fit in this many MiB of KV cache and next-token logits, counted for the longest prompt plus
            `max_new_tokens` from the model's config (layers, key-value heads, head size, vocabulary), so the same
            settings always give the same calls. Activations, which come and go within a step, are not counted. For
            example the headroom between SFT's peak memory and the GPU's. `None`: `generation_batch_size` rows.
        snapshots_per_generate (`int`, *optional*, defaults to `4`):
            Number of snapshots resident at once and served in the same `generate` call, each row routed to its own
            snapshot's LoRA factors. `1` swaps one snapshot at a time. Each resident snapshot costs one
            LoRA adapter of memory. With vLLM: the snapshots each `generate` call (and each saved part) covers.
        generation_backend (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"`: the snapshots are hot-swapped into adapter slots of the model being trained and sampled
            with its `generate`. `"vllm"`: one vLLM engine loads the base weights and serves every snapshot as a LoRA
            adapter (multi-LoRA, no merging), each (prompt, snapshot) encoding its prompt once for all its samples;
            the engine is shut down before the student trains. Needs the `vllm` package, `tms_mode="two_pass"`, one
            process, and a model loaded from a local folder of safetensors weights when it is quantized.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            With `generation_backend="vllm"`: the fraction of the GPU's memory the engine may take beside the model
            being trained. Ignored on CPU (there `VLLM_CPU_KVCACHE_SPACE`, in GiB, sizes vLLM's cache).

        > Parameters that control the mixture (student phase)

        label_weight (`float`, *optional*):
            Probability (alpha) of training on the reference label each time an example is drawn; otherwise a
            trajectory is drawn uniformly over the snapshots (then uniformly over that snapshot's samples). `1.0`
            reduces TMS to plain SFT, `0.0` trains on trajectories only. Defaults to the mode's: the paper's 0.25 for
            `tms_mode="two_pass"`; 0.75 for `"online"`, where the paper's alpha learned less and unsteadily in our
            study and 0.5 to 0.75 learned about as much as SFT (see the how-to guide, "Choose `label_weight`").
        trajectory_choice (`str`, *optional*, defaults to `"uniform"`):
            Which trajectory a prompt trains on when it does not draw its label. `"uniform"` (the paper): uniformly over
            the snapshots, then over that snapshot's samples. `"curriculum"`: uniformly within a slice of the snapshots
            that follows the student's progress (epoch `e` of `E` uses the `e`-th of `E` consecutive slices, earliest
            snapshots first; with one epoch it is uniform). `"pld"`: the trajectory with the lowest mean NLL per token
            under the current student (closest to the policy), every trajectory being scored in batches at the start
            of each epoch (one forward pass over all of them per epoch).

        unfinished_trajectories (`str`, *optional*, defaults to `"truncate"`):
            What the student does with a trajectory cut at the length limit (it did not end by itself). `"truncate"`:
            train on its text without the end-of-turn tokens, so the student is not taught to stop where the cut
            fell. `"drop"`: leave it out (its prompt draws among its other trajectories, or its label). `"keep"`: train
            on it like a finished one, end token included (what the paper's recipe does when applied literally).
        trajectory_filter (`str`, *optional*, defaults to `"none"`):
            Which trajectories the student may draw; a prompt left without any trains on its label. `"none"` (the
            paper: no filter). `"self_consistency"` (reward-free): keep a prompt's trajectories whose final answer
            (extracted by the trainer's `answer_extractor`, by default the final number) is the most frequent among
            its trajectories, shared by at least two and not tied. `"verifier"`: keep trajectories whose
            `verifier(prompt, completion, label)` (a trainer argument; by default: same final number as the label)
            scores at least `min_verifier_score`. Two-pass TMS only for `"self_consistency"`.
        min_verifier_score (`float`, *optional*, defaults to `0.5`):
            With `trajectory_filter="verifier"`: the lowest score kept (`True` counts as 1, `False` as 0).
        snapshot_weights (`list[float]`, *optional*):
            Draw probabilities over the snapshots, one non-negative weight per snapshot in step order
            (`num_checkpoints` of them; normalised over the snapshots that produced a trajectory for the prompt). A
            zero leaves that snapshot out, e.g. `[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]` keeps the later half, and
            `[1, 2, ..., 10]` favours later snapshots. `None` is uniform (the paper). Needs
            `trajectory_choice="uniform"` and `tms_mode="two_pass"`.
        trajectories_to_generate (`str`, *optional*):
            `"drawn"`: sample only the (prompt, snapshot) pairs the student's draws land on. The draws are planned
            before generation (they depend on the seed, the epoch and the prompt alone), and a draw that lands on a
            trajectory left out (empty, cut and dropped, rejected by the verifier) draws again, so the student trains
            on the paper's mixture while a prompt samples about `(1 - label_weight) x epochs` of its
            `num_checkpoints` snapshots instead of all of them. Online, each snapshot samples the pairs that the
            draws until the next snapshot land on (from it or an earlier snapshot in the window). `"all"`: sample
            every snapshot for every prompt (the paper's procedure; the trajectory statistics then cover every
            snapshot). Default: `"drawn"` where the draw allows it (`trajectory_choice="uniform"`, no
            `"self_consistency"` filter), else `"all"`.

        > Parameters that control self-rehearsal (beyond the paper)

        rehearsal_weight (`float`, *optional*, defaults to `0.0`):
            Probability (beta) that a drawn example is, instead of the prompt's label or trajectory, the initial
            model's own answer to an everyday prompt (uniformly over them), so the student keeps its general behaviour
            in place. The answers are generated once, with the trajectories (before training in online TMS), and kept
            in `history_dir/rehearsal`. `0.0` (the paper's TMS) generates nothing and leaves the mixture unchanged.
        rehearsal_prompts (`list[str]`, *optional*):
            The everyday prompts (texts or conversations). `None` uses the built-in set
            (`trl_tms.rehearsal.REHEARSAL_PROMPTS`: 64 prompts, disjoint from the forgetting meter's and from the
            benchmarks' chat probe).
        rehearsal_num_prompts (`int`, *optional*):
            Use the first this many prompts (default: all).
        rehearsal_max_new_tokens (`int`, *optional*, defaults to `128`):
            Longest rehearsal answer, in tokens. An answer cut there is handled as `unfinished_trajectories` says.
        rehearsal_temperature (`float`, *optional*, defaults to `0.0`):
            Sampling temperature of the rehearsal answers; `0.0` is greedy (the initial model's most likely answer).

        > Parameters that control Policy-Label Divergence (PLD) logging

        log_pld (`bool`, *optional*, defaults to `False`):
            Whether to log PLD (mean per-token NLL of the evaluation labels under the current policy) and PLD drift
            (its rise above the running minimum) at every logging step of both phases. Needs an `eval_dataset`. Off by
            default: it cost about a tenth of a run and did not predict forgetting in our study, where the forgetting
            meter (`log_retention`) did. `trajectory_choice="pld"` scores the trajectories without it.
        pld_num_samples (`int`, *optional*, defaults to `32`):
            Maximum number of evaluation examples used to compute PLD. Each logging step costs one forward pass over
            them, so this is a share of the training compute: at `logging_steps=10` and 8 examples per step, 32 add
            about an eighth, 256 as much again as the training. The same examples are read at every logging step,
            so PLD's changes (what the alarm watches) are paired and steadier than its level.
        pld_drift_threshold (`float`, *optional*):
            Forgetting alarm: warn (and log `pld_alarm`) when PLD drift passes this many nats per token. `None` turns
            the alarm off.
        pld_stop_on_drift (`bool`, *optional*, defaults to `False`):
            When the alarm goes off, stop the current phase and restore the adapter of the lowest PLD seen in it.

        > Parameters that control the forgetting meter

        log_retention (`bool`, *optional*, defaults to `True`):
            Whether to log the forgetting meter ([`RetentionCallback`]) at step 0 and every logging step of every
            phase: `retention_kl`, the mean per-token KL(initial model || policy) over the initial model's own greedy
            answers to everyday prompts, and `retention_nll`, the policy's NLL of those answers. Needs no data.
        retention_prompts (`list[str]`, *optional*):
            The meter's everyday prompts. `None` uses the built-in set (`trl_tms.retention.METER_PROMPTS`).
        retention_num_prompts (`int`, *optional*, defaults to `6`):
            How many of the prompts (the first ones) the meter uses. Each measurement costs one forward pass over them
            and their answers.
        retention_max_new_tokens (`int`, *optional*, defaults to `16`):
            Longest answer of the initial model to a meter prompt, in tokens.
        retention_kl_threshold (`float`, *optional*):
            Forgetting alarm on the meter: warn (and log `retention_alarm`) when `retention_kl` passes this many nats
            per token. `None` turns it off.
        retention_stop_on_kl (`bool`, *optional*, defaults to `False`):
            When that alarm goes off, stop the current phase and restore the adapter of its last measurement within
            the threshold.
        retention_kl_budget (`float`, *optional*):
            Keep the best checkpoint by `metric_for_best_model` among those whose `retention_kl` is at most this many
            nats per token ([`DriftBudgetCallback`], in the student's or the online run's evaluations): checkpoints
            over the budget never become `best_model_checkpoint`, so `load_best_model_at_end=True` ends on the best one
            within it. Needs the meter, `eval_strategy` and `metric_for_best_model`. `None`: the Trainer's usual choice.
    """

    # The recipe
    recipe: str = field(
        default="retention",
        metadata={
            "help": "The settings TMS starts from, by name; a field you set keeps your value. `retention` (default): "
            "online TMS with `label_weight=0.75` and `num_checkpoints=5`, which learned about as much as SFT at a lower "
            "learning rate with less drift in both regimes of our study. `paper`: the paper's two-pass TMS with "
            "`label_weight=0.25` and `num_checkpoints=10`.",
            "choices": list(RECIPES),
        },
    )

    # Parameters that control the adapter history
    tms_mode: str | None = field(
        default=None,
        metadata={
            "help": "Default: the recipe's (`online` for `retention`, `two_pass` for `paper`). `two_pass` (the paper: a harvest run takes the snapshots, then a student trains on the mixture) "
            "or `online` (one run: every `online_snapshot_every` steps, from step 0, the adapter being trained is "
            "snapshotted and samples trajectories (those the draws need, see `trajectories_to_generate`); the mixture "
            "draws from the last `num_checkpoints` snapshots). Online needs `dataloader_num_workers=0` and "
            "`trajectory_choice='uniform'`.",
            "choices": ["two_pass", "online"],
        },
    )
    online_snapshot_every: int | None = field(
        default=None,
        metadata={
            "help": "Online TMS: optimizer steps between snapshots (at steps 0, K, 2K, ...; the mixture keeps the last "
            "`num_checkpoints`). By default, `num_checkpoints` snapshots at steps `k * steps // num_checkpoints`, "
            "`k = 0..T-1`, all kept in the mixture."
        },
    )
    num_checkpoints: int | None = field(
        default=None,
        metadata={
            "help": "Number of adapter snapshots (T) taken during the harvest run, spaced evenly over its optimizer "
            "steps (the initial adapter, step 0, is not one of them), or, online, taken from step 0 on. Default: the "
            "mode's recipe's, 10 two-pass (the paper's), 5 online. Must not exceed the number of optimizer steps."
        },
    )
    history_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder that receives the snapshots (one PEFT adapter folder `step-<N>` each) and the "
            "trajectories. Defaults to `<output_dir>/_tms_history`; the leading underscore keeps it out of "
            "`push_to_hub` uploads."
        },
    )

    push_history: bool = field(
        default=False,
        metadata={
            "help": "Whether `push_to_hub` also uploads the adapter snapshots, to `history/step-<N>/` in the repo, each "
            'loadable with `PeftModel.from_pretrained(base, repo_id, subfolder="history/step-<N>")`. By default only '
            "the student's adapter and its model card are uploaded."
        },
    )
    hub_base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model, written as `base_model` in the model card. Needed only when it cannot "
            "be read from the model: one loaded from a local folder outside the Hugging Face cache, or one with no "
            "name."
        },
    )

    # Parameters that control trajectory generation
    samples_per_checkpoint: int = field(
        default=1,
        metadata={
            "help": "Number of completions each snapshot samples for every training prompt. The samples of a prompt "
            "share one pass over it; with greedy decoding they are identical (the prompt is generated once)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature for the trajectories. `0.0` means greedy decoding."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus-sampling probability mass for the trajectories."},
    )
    top_k: int = field(
        default=0,
        metadata={"help": "Top-k filtering for the trajectories. `0` disables it."},
    )
    max_new_tokens: int = field(
        default=256,
        metadata={
            "help": "Maximum number of tokens generated per trajectory. Generation stops earlier at the EOS token."
        },
    )
    max_new_tokens_from_labels: float | None = field(
        default=None,
        metadata={
            "help": "Fit the trajectory length to the task: at most this many times the longest training label in "
            "tokens, plus its end token, rounded up to a multiple of 16, and never more than `max_new_tokens`. "
            "Default: none (up to `max_new_tokens`); `1.0` made online TMS cheaper but drifted further in our check."
        },
    )
    generation_batch_size: int = field(
        default=16,
        metadata={
            "help": "Number of sequences per `generate` call (prompts x resident snapshots x samples). A call holds at "
            "least one prompt, so it exceeds this when `snapshots_per_generate * samples_per_checkpoint` does."
        },
    )
    generation_memory_mb: float | None = field(
        default=None,
        metadata={
            "help": "Size the generation calls by memory instead: as many rows (at most `generation_batch_size`) as "
            "fit in this many MiB of KV cache and logits, for the longest prompt plus `max_new_tokens`, by the "
            "model's config. E.g. the headroom between SFT's peak and the GPU's memory. None: "
            "`generation_batch_size` rows."
        },
    )
    snapshots_per_generate: int = field(
        default=4,
        metadata={
            "help": "Number of snapshots resident at once and served in the same `generate` call, each row routed to "
            "its own snapshot's LoRA factors. `1` swaps one snapshot at a time. Each resident snapshot costs one LoRA "
            "adapter of memory; more rows per call is faster (4 per call: 3x the tokens/s of 1 on an H100, 1.75x on "
            "CPU, for SmolLM2-135M)."
        },
    )

    generation_backend: str = field(
        default="transformers",
        metadata={
            "help": "`transformers` (hot-swapped adapter slots, PEFT's `generate`) or `vllm` (one vLLM engine serving "
            "every snapshot as a LoRA adapter; needs the `vllm` package and `tms_mode='two_pass'`).",
            "choices": ["transformers", "vllm"],
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={
            "help": "With `generation_backend='vllm'`: fraction of the GPU's memory the engine may take beside the "
            "model being trained. Ignored on CPU."
        },
    )

    # Parameters that control the mixture
    label_weight: float | None = field(
        default=None,
        metadata={
            "help": "Probability (alpha) of training on the reference label each time an example is drawn; otherwise "
            "a trajectory is drawn uniformly over the snapshots. `1.0` reduces TMS to plain SFT, `0.0` trains on "
            "trajectories only. Default: the mode's, the paper's 0.25 for `two_pass`, 0.75 for `online` "
            "(docs/how-to.md, 'Choose label_weight')."
        },
    )
    trajectory_choice: str = field(
        default="uniform",
        metadata={
            "help": "Which trajectory a prompt trains on when it does not draw its label: `uniform` (the paper: "
            "uniformly over snapshots, then samples), `curriculum` (uniformly within a slice of the snapshots that "
            "follows the student's progress: epoch e of E uses the e-th of E consecutive slices, earliest first) or "
            "`pld` (the trajectory with the lowest mean NLL per token under the current student, all trajectories "
            "being scored in batches at the start of each epoch).",
            "choices": ["uniform", "curriculum", "pld"],
        },
    )

    unfinished_trajectories: str = field(
        default="truncate",
        metadata={
            "help": "A trajectory cut at the length limit: `truncate` (train on its text without end-of-turn tokens), "
            "`drop` (leave it out) or `keep` (train on it with the end token, as if the model had stopped there).",
            "choices": ["truncate", "drop", "keep"],
        },
    )
    trajectory_filter: str = field(
        default="none",
        metadata={
            "help": "Which trajectories the student may draw (a prompt left without any trains on its label): `none` "
            "(the paper), `self_consistency` (those whose final answer is the most frequent among the prompt's "
            "trajectories, shared by at least two) or `verifier` (those the trainer's `verifier` scores at least "
            "`min_verifier_score`; by default: same final number as the label).",
            "choices": ["none", "self_consistency", "verifier"],
        },
    )
    min_verifier_score: float = field(
        default=0.5,
        metadata={"help": "With `trajectory_filter='verifier'`: the lowest verifier score kept (True = 1, False = 0)."},
    )
    snapshot_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Draw probabilities over the snapshots, one non-negative weight per snapshot in step order "
            "(`num_checkpoints` of them); 0 leaves a snapshot out. None is uniform (the paper). Needs "
            "`trajectory_choice='uniform'` and `tms_mode='two_pass'`."
        },
    )
    trajectories_to_generate: str | None = field(
        default=None,
        metadata={
            "help": "`drawn`: sample only the (prompt, snapshot) pairs the student's draws land on (planned before "
            "generation; a draw landing on a trajectory left out draws again): the same mixture for a fraction of the "
            "generation (online: the pairs the draws until the next snapshot need). `all`: every snapshot for every "
            "prompt (the paper's procedure). Default: `drawn` where the draw allows it (`trajectory_choice='uniform'`, "
            "no `self_consistency` filter), else `all`.",
            "choices": ["drawn", "all"],
        },
    )

    # Parameters that control self-rehearsal
    rehearsal_weight: float = field(
        default=0.0,
        metadata={
            "help": "Probability (beta) that a drawn example is the initial model's own answer to an everyday prompt "
            "instead of the prompt's label or trajectory. 0 (the paper's TMS) generates nothing and leaves the "
            "mixture unchanged."
        },
    )
    rehearsal_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "The rehearsal's everyday prompts. None: the built-in set (REHEARSAL_PROMPTS, 64 prompts)."},
    )
    rehearsal_num_prompts: int | None = field(
        default=None,
        metadata={"help": "Use the first this many rehearsal prompts (default: all)."},
    )
    rehearsal_max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "Longest rehearsal answer, in tokens; an answer cut there is handled as "
            "`unfinished_trajectories` says."
        },
    )
    rehearsal_temperature: float = field(
        default=0.0,
        metadata={"help": "Sampling temperature of the rehearsal answers; 0 is greedy."},
    )

    # Parameters that control PLD logging
    log_pld: bool = field(
        default=False,
        metadata={
            "help": "Whether to log PLD (mean per-token NLL of the evaluation labels under the current policy) and "
            "PLD drift (its rise above the running minimum) at every logging step of both phases. Needs an "
            "`eval_dataset`. Off by default: it cost about a tenth of a run and did not predict forgetting in our "
            "study, where the forgetting meter (`log_retention`) did. `trajectory_choice='pld'` works without it."
        },
    )
    pld_num_samples: int = field(
        default=32,
        metadata={
            "help": "Maximum number of evaluation examples used to compute PLD. Each logging step costs one forward "
            "pass over them, so this is a share of the training compute: at `logging_steps=10` and 8 examples per "
            "step, 32 add about an eighth, 256 as much again as the training. The same examples are read at every "
            "logging step, so PLD's changes (what the alarm watches) are paired and steadier than its level."
        },
    )
    pld_drift_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Forgetting alarm: warn (and log `pld_alarm`) when PLD drift passes this many nats per token. "
            "`None` turns the alarm off."
        },
    )
    pld_stop_on_drift: bool = field(
        default=False,
        metadata={
            "help": "When the alarm goes off, stop the current phase and restore the adapter of the lowest PLD seen "
            "in it."
        },
    )

    # Parameters that control the forgetting meter
    log_retention: bool = field(
        default=True,
        metadata={
            "help": "Whether to log the forgetting meter at step 0 and every logging step of every phase: "
            "`retention_kl` (mean per-token KL(initial model || policy) over the initial model's greedy answers to "
            "everyday prompts) and `retention_nll` (the policy's NLL of those answers)."
        },
    )
    retention_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "The forgetting meter's everyday prompts. None: the built-in set (METER_PROMPTS)."},
    )
    retention_num_prompts: int = field(
        default=6,
        metadata={
            "help": "How many meter prompts (the first ones) to use. Each measurement costs one forward pass over "
            "them and their answers."
        },
    )
    retention_max_new_tokens: int = field(
        default=16,
        metadata={"help": "Longest answer of the initial model to a meter prompt, in tokens."},
    )
    retention_kl_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Forgetting alarm on the meter: warn (and log `retention_alarm`) when `retention_kl` passes this "
            "many nats per token. `None` turns it off."
        },
    )
    retention_stop_on_kl: bool = field(
        default=False,
        metadata={
            "help": "When the meter's alarm goes off, stop the current phase and restore the adapter of its last "
            "measurement within `retention_kl_threshold`."
        },
    )
    retention_kl_budget: float | None = field(
        default=None,
        metadata={
            "help": "Keep the best checkpoint by `metric_for_best_model` among those whose `retention_kl` is at most "
            "this many nats per token (student or online run): with `load_best_model_at_end=True` training ends on it. "
            "Needs `log_retention`, `eval_strategy` and `metric_for_best_model`. `None`: the Trainer's usual choice."
        },
    )

    def __post_init__(self):
        # SFTConfig turns bf16 on by default, which stops a run on a machine without a bf16 accelerator unless
        # `use_cpu` is set; there, TMS defaults to fp32 instead. With `use_cpu` it keeps SFTConfig's choice, so that
        # SFT and TMS runs compare at the same precision.
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _bf16_accelerator_available():
            self.bf16 = False
        bf16_by_default = self.bf16 is None
        super().__post_init__()
        if bf16_by_default and self.bf16 and self.use_cpu and cpu_has_native_bf16() is False:
            logger.warning(
                "`use_cpu=True` turned bf16 on (SFTConfig's default), but this CPU has no native bf16 (no AVX512-BF16 "
                "or AMX): every bf16 operation is emulated, and training ran about 15x slower than in fp32 in our "
                "measurements (SmolLM2-135M, 2 cores). Pass `bf16=False` to train in fp32."
            )
        mode_from_recipe = self._apply_recipe()
        try:
            self._check_values()
        except ValueError as error:
            raise ValueError(str(error) + self._recipe_hint(mode_from_recipe, str(error))) from None

    def _apply_recipe(self) -> bool:
        """Fill `tms_mode`, then `label_weight` and `num_checkpoints` from that mode's recipe, where they are not set;
        whether the mode came from the recipe."""
        if self.recipe not in RECIPES:
            raise ValueError(f"`recipe` must be one of {sorted(RECIPES)}, got {self.recipe!r}.")
        mode_from_recipe = self.tms_mode is None
        if mode_from_recipe:
            self.tms_mode = RECIPES[self.recipe]["tms_mode"]
        defaults = MODE_DEFAULTS.get(self.tms_mode, MODE_DEFAULTS["two_pass"])  # an unknown mode is refused later
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return mode_from_recipe

    def _recipe_hint(self, mode_from_recipe: bool, message: str) -> str:
        """Where a mode the user did not choose is what a check refuses, say where it came from."""
        if not mode_from_recipe or "tms_mode" not in message:
            return ""
        return (
            f" (`tms_mode={self.tms_mode!r}` comes from `recipe={self.recipe!r}`: set `tms_mode` yourself, or "
            "`recipe='paper'` for the paper's two-pass TMS.)"
        )

    def _check_values(self) -> None:
        """Refuse a field value TMS cannot run with, saying what to set instead."""
        for name in _CHOICE_FIELDS:
            check_choice(name, getattr(self, name))
        for ok, message in self._rules():
            if not ok:
                raise ValueError(message)
        check_rehearsal_weight(self.rehearsal_weight)
        check_alarm(self.pld_drift_threshold, self.pld_stop_on_drift, "pld_drift_threshold", "pld_stop_on_drift",
                    "drift", 0.1)
        check_alarm(self.retention_kl_threshold, self.retention_stop_on_kl, "retention_kl_threshold",
                    "retention_stop_on_kl", "KL", 0.2)
        if self.snapshot_weights is not None:
            self.snapshot_weights = [float(w) for w in self.snapshot_weights]
            self._check_snapshot_weights()

    def _rules(self) -> list[tuple[bool, str]]:
        """The value checks of the fields, as (holds, what to change), grouped as the fields are."""
        online = self.tms_mode == "online"
        return [
            # the adapter history, the mode and the data loading it needs
            (self.num_checkpoints >= 1, f"`num_checkpoints` must be at least 1, got {self.num_checkpoints}."),
            (
                self.online_snapshot_every is None or self.online_snapshot_every >= 1,
                f"`online_snapshot_every` must be at least 1 (optimizer steps), got {self.online_snapshot_every}.",
            ),
            (
                not online or self.trajectory_choice == "uniform",
                f"`trajectory_choice={self.trajectory_choice!r}` works with `tms_mode='two_pass'` only: online TMS "
                "draws uniformly from the snapshots it has taken so far. Set `trajectory_choice='uniform'`.",
            ),
            (
                not online or self.dataloader_num_workers == 0,
                "`tms_mode='online'` needs `dataloader_num_workers=0`: the mixture gains trajectories during an epoch, "
                "and worker processes would keep the copy they started the epoch with.",
            ),
            (
                not (self.dataloader_persistent_workers and self.dataloader_num_workers > 0),
                "`dataloader_persistent_workers=True` is not supported by TMSTrainer: persistent workers keep copies of "
                "the mixture and would replay the first epoch's draws in every epoch. Set it to False.",
            ),
            (
                not self.packing,
                "`packing=True` is not supported by TMSTrainer: the mixture draws one completion per prompt each time "
                "an example is drawn, which needs one example per sequence. Set `packing=False`.",
            ),
            # trajectory generation
            (
                self.samples_per_checkpoint >= 1,
                f"`samples_per_checkpoint` must be at least 1, got {self.samples_per_checkpoint}.",
            ),
            (self.temperature >= 0.0, f"`temperature` must be >= 0 (0 means greedy), got {self.temperature}."),
            (0.0 < self.top_p <= 1.0, f"`top_p` must lie in (0, 1], got {self.top_p}."),
            (self.top_k >= 0, f"`top_k` must be >= 0 (0 disables it), got {self.top_k}."),
            (self.max_new_tokens >= 1, f"`max_new_tokens` must be at least 1, got {self.max_new_tokens}."),
            (
                self.max_new_tokens_from_labels is None or self.max_new_tokens_from_labels > 0,
                f"`max_new_tokens_from_labels` must be positive (a multiple of the longest label), got "
                f"{self.max_new_tokens_from_labels}.",
            ),
            (
                self.generation_batch_size >= 1,
                f"`generation_batch_size` must be at least 1, got {self.generation_batch_size}.",
            ),
            (
                self.generation_memory_mb is None or self.generation_memory_mb > 0,
                f"`generation_memory_mb` must be positive (MiB), got {self.generation_memory_mb}.",
            ),
            (
                self.generation_memory_mb is None or self.generation_backend == "transformers",
                "`generation_memory_mb` sizes the transformers backend's calls; vLLM sizes its own by "
                "`vllm_gpu_memory_utilization`.",
            ),
            (
                self.snapshots_per_generate >= 1,
                f"`snapshots_per_generate` must be at least 1, got {self.snapshots_per_generate}.",
            ),
            (
                self.generation_backend != "vllm" or self.tms_mode == "two_pass",
                "`generation_backend='vllm'` works with `tms_mode='two_pass'`: online TMS would keep the engine and "
                "its memory beside the training for the whole run, which has not been verified. Use "
                "`generation_backend='transformers'` for online TMS.",
            ),
            (
                0.0 < self.vllm_gpu_memory_utilization <= 1.0,
                f"`vllm_gpu_memory_utilization` must lie in (0, 1], got {self.vllm_gpu_memory_utilization}.",
            ),
            # the mixture
            (
                0.0 <= self.label_weight <= 1.0,
                f"`label_weight` (alpha) is a probability and must lie in [0, 1], got {self.label_weight}.",
            ),
            (
                not online or self.trajectory_filter != "self_consistency",
                "`trajectory_filter='self_consistency'` works with `tms_mode='two_pass'` only: it compares the answers "
                "of every snapshot, and online TMS trains before the later snapshots exist. Use "
                "`trajectory_filter='verifier'` online.",
            ),
            (
                self.trajectories_to_generate != "drawn" or not self._draws_need_every_trajectory(),
                "`trajectories_to_generate='drawn'` samples only the trajectories the draws land on, which needs "
                "`trajectory_choice='uniform'` and a filter that judges each trajectory on its own (not "
                "`'self_consistency'`). Set `trajectories_to_generate='all'`.",
            ),
            # self-rehearsal
            (
                self.rehearsal_num_prompts is None or self.rehearsal_num_prompts >= 1,
                f"`rehearsal_num_prompts` must be at least 1, got {self.rehearsal_num_prompts}. To turn rehearsal off, "
                "set `rehearsal_weight=0`.",
            ),
            (
                self.rehearsal_max_new_tokens >= 1,
                f"`rehearsal_max_new_tokens` must be at least 1, got {self.rehearsal_max_new_tokens}.",
            ),
            (
                self.rehearsal_temperature >= 0.0,
                f"`rehearsal_temperature` must be >= 0 (0 means greedy), got {self.rehearsal_temperature}.",
            ),
            # PLD and the forgetting meter (their alarms: `check_alarm`)
            (self.pld_num_samples >= 1, f"`pld_num_samples` must be at least 1, got {self.pld_num_samples}."),
            (
                self.retention_num_prompts >= 1,
                f"`retention_num_prompts` must be at least 1, got {self.retention_num_prompts}. To turn the forgetting "
                "meter off, set `log_retention=False`.",
            ),
            (
                self.retention_max_new_tokens >= 1,
                f"`retention_max_new_tokens` must be at least 1, got {self.retention_max_new_tokens}.",
            ),
            (
                not self.retention_stop_on_kl or self.log_retention,
                "`retention_stop_on_kl=True` needs the forgetting meter: leave `log_retention=True`.",
            ),
            (
                self.pld_drift_threshold is None or self.log_pld,
                "`pld_drift_threshold` watches the logged PLD, which is off by default: set `log_pld=True` (with an "
                "`eval_dataset` of held-out labels).",
            ),
            (
                self.retention_kl_budget is None or self.retention_kl_budget > 0,
                f"`retention_kl_budget` must be positive (nats per token; typical values 0.1 to 0.3), got "
                f"{self.retention_kl_budget}.",
            ),
            (
                self.retention_kl_budget is None or self.log_retention,
                "`retention_kl_budget` is a budget on the forgetting meter: leave `log_retention=True`.",
            ),
            (
                self.retention_kl_budget is None or (self.eval_strategy != "no" and self.metric_for_best_model),
                "`retention_kl_budget` keeps the best evaluated checkpoint within the budget: set `eval_strategy` (with "
                "an `eval_dataset`), `metric_for_best_model` (e.g. 'eval_loss'), and `load_best_model_at_end=True` to "
                "end on it.",
            ),
        ]

    def _check_snapshot_weights(self) -> None:
        if len(self.snapshot_weights) != self.num_checkpoints:
            raise ValueError(
                f"`snapshot_weights` has {len(self.snapshot_weights)} weights but there are {self.num_checkpoints} "
                "snapshots (`num_checkpoints`): give one weight per snapshot, in step order."
            )
        if any(not w >= 0 for w in self.snapshot_weights) or not any(w > 0 for w in self.snapshot_weights):
            raise ValueError(
                "`snapshot_weights` must be non-negative with at least one positive weight, got "
                f"{self.snapshot_weights}."
            )
        check_weighted_draw(self.trajectory_choice, self.tms_mode)

    @property
    def generates_drawn_trajectories_only(self) -> bool:
        """Whether the trajectories phase samples only the pairs the draws land on (`trajectories_to_generate`)."""
        if self.trajectories_to_generate is None:
            return not self._draws_need_every_trajectory()
        return self.trajectories_to_generate == "drawn"

    def _draws_need_every_trajectory(self) -> bool:
        """Whether the mixture's draw compares a prompt's trajectories (so all must exist before it is known)."""
        return self.trajectory_choice != "uniform" or self.trajectory_filter == "self_consistency"


# The fields whose value is one of the `choices` in their metadata (`recipe`, checked first, names its own).
_CHOICE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(TMSConfig)
    if "choices" in f.metadata and f.name in TMSConfig.__annotations__ and f.name != "recipe"
)


# Value rules that the components which take these values as arguments apply too (the mixture, the filters), so that a
# value is judged the same way, with the same message, wherever it is given.


def check_choice(name: str, value) -> None:
    """Refuse a `value` outside the `choices` of the `TMSConfig` field `name` (`None` passes where it is its default)."""
    field_ = TMSConfig.__dataclass_fields__[name]
    choices = field_.metadata["choices"]
    if value in choices or (value is None and field_.default is None):
        return
    expected = f"`{choices[0]}` or `{choices[1]}`" if len(choices) == 2 else f"one of {', '.join(choices)}"
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


def check_rehearsal_weight(weight: float) -> None:
    """`rehearsal_weight` (beta), the share of draws that are rehearsal answers."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(
            f"`rehearsal_weight` (beta) is a probability and must lie in [0, 1), got {weight}; at 1 the student would "
            "never see the task."
        )


def check_weighted_draw(trajectory_choice: str, tms_mode: str = "two_pass") -> None:
    """`snapshot_weights` weigh the uniform draw of two-pass TMS (the other draws choose by epoch or by score)."""
    if trajectory_choice != "uniform" or tms_mode != "two_pass":
        raise ValueError(
            "`snapshot_weights` sets the draw of `trajectory_choice='uniform'` in `tms_mode='two_pass'`; got "
            f"`trajectory_choice={trajectory_choice!r}`, `tms_mode={tms_mode!r}`. Drop "
            "`snapshot_weights` or use the uniform two-pass draw."
        )
