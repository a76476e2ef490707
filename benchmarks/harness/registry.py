"""Every arm and regime the benchmarks train, declared as data: an arm is a training method and its settings.

An `Arm`'s `method` picks the trainer (`sft`: `trl.SFTTrainer`, `tms`: `TMSTrainer`, `grpo`: `trl.GRPOTrainer`,
`sdft`: TRL's `SDFTTrainer`); its `settings` are that trainer's config fields, plus three the harness reads itself:
`lr_scale` (times the regime's learning rate), `rehearsal_weight` for `sft` (the base model's own answers mixed in,
`trl_tms.mix_in_rehearsal`) and `snapshot_every_epoch` for online TMS. A new arm is one line in `ARMS`; a frontier is
one arm per value of its dial (`dial`). `study.py` trains `ARMS`; `cost_t10.py` times `COST_ARMS`, `cost.py`
`COST_BREAKDOWN_ARMS`, `speed.py` `SPEED_ARMS`; `forgetting_meter.py` correlates its signals over `METER_ARMS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BATCH_SIZE = 8
TASK_TOKENS = 128  # new tokens of a target-task answer (greedy probe and trajectories)
# SDFT's teacher prompt: the question, then the worked answer as an example to follow in the model's own words.
SDFT_TEMPLATE = "{prompt}\n\nHere is an example of a correct answer:\n{privileged_context}\n\nNow answer the question yourself."

REGIMES = {
    "zero": dict(task="leg_counting", lora_r=64, learning_rate=1e-3, epochs=4),
    # Chosen by the screen (results/study/screen.md): base 0.43, 0.77 after 16 SFT steps.
    "partly": dict(task="letter_counting_short", lora_r=64, learning_rate=1e-3, epochs=4),
    # retention.py's gentler regime (its `aggressive` one is `zero`; its `aggressive_2ep` SFT control is `sft_early`).
    "mild": dict(task="leg_counting", lora_r=16, learning_rate=3e-4, epochs=3),
    # Issue #44's second model family: Gemma-3-270M base in the plain "Question:/Answer:" format (`harness/models.py`,
    # `harness/formats.py`). Its screen (results/study/screen_gemma3_270m.md, 100 items per task): letter_counting_short
    # 0.55, every other candidate 0.00-0.08; 0.83 after 16 SFT steps. Smaller probes than the SmolLM2 regimes (its
    # 262k-token output layer makes every token dearer): WikiText on 300 texts, PIQA and SIQA on 200 items each.
    # A base model rarely ends its answer: every TMS arm leaves out trajectories cut at the length limit (mostly the
    # base's own, run on into questions of its own) rather than train on that text.
    "gemma": dict(model="gemma3_270m", task="letter_counting_short", lora_r=64, learning_rate=1e-3, epochs=4,
                  sizes=dict(wiki_items=300, mc_items=200), tms_settings=dict(unfinished_trajectories="drop")),
}


@dataclass(frozen=True)
class Arm:
    """
    One way to fine-tune, as data.

    Args:
        method (`str`):
            `"sft"`, `"tms"`, `"grpo"` or `"sdft"`.
        settings (`dict`):
            Config fields of the method's trainer (and `lr_scale`, `rehearsal_weight`, `snapshot_every_epoch`).
        in_study (`bool`, *optional*, defaults to `True`):
            Whether `study.py`'s full run trains it; arms folded in from `retention.py` are not (`--mode retention`).
    """

    method: str
    settings: dict = field(default_factory=dict)
    in_study: bool = True


def dial(arm: Arm, name: str, values: list) -> dict[str, Arm]:
    """One arm per value of setting `name` (a frontier's dial: `learning_rate` via `lr_scale`, `label_weight`, ...)."""
    return {f"{name}={value}": Arm(arm.method, {**arm.settings, name: value}, in_study=False) for value in values}


_TMS = dict(label_weight=0.25, num_checkpoints=10)
ARMS = {
    # `sft` comes from the `tms` run's harvest when `tms` runs in the same (regime, seed).
    "sft": Arm("sft"),
    "sft_low_lr": Arm("sft", {"lr_scale": 0.2}),
    "sft_dft": Arm("sft", {"loss_type": "dft"}),
    # Self-rehearsal for plain SFT (issue #23): the base model's greedy answers to the 64 built-in everyday prompts
    # added as a tenth of the rows (`mix_in_rehearsal`), at SFT's number of optimizer steps.
    "sft_rehearsal_10": Arm("sft", {"rehearsal_weight": 0.1}),
    "self_sft": Arm("tms", dict(tms_mode="online", label_weight=0.0, num_checkpoints=1, snapshot_every_epoch=True)),
    "self_sft_verified": Arm("tms", dict(tms_mode="online", label_weight=0.0, num_checkpoints=1,
                                         snapshot_every_epoch=True, trajectory_filter="verifier")),
    "grpo": Arm("grpo", dict(num_generations=4)),
    # TRL's SDFT (`trl.experimental.sdft`, "Self-Distillation Enables Continual Learning", arXiv 2601.19897): the
    # student samples its own answer and is distilled towards the base model shown the worked answer in context.
    # TRL's defaults (teacher = the base, adapter off; top-100 logit distillation), one sample per prompt.
    "sdft": Arm("sdft", dict(num_generations=1)),
    # GRPO at SFT's learning rate (1e-3) forgot more than SFT: at a fifth of it, as `sft_low_lr`, is it the gentle
    # "gold standard" the paper describes?
    "grpo_low_lr": Arm("grpo", dict(num_generations=4, lr_scale=0.2)),
    "tms": Arm("tms", dict(_TMS)),
    "tms_online": Arm("tms", dict(_TMS, tms_mode="online")),
    "tms_verified": Arm("tms", dict(_TMS, trajectory_filter="verifier")),
    # Online TMS's accuracy swung between checkpoints (partly regime, seed 0): does dropping its wrong trajectories
    # steady it, and at what cost in drift?
    "tms_online_verified": Arm("tms", dict(_TMS, tms_mode="online", trajectory_filter="verifier")),
    # Online TMS's label share alpha, the paper's knob between its own text (retention) and the labels (the task): the
    # trade-off curve between `tms_online` (0.25) and plain SFT (1.0).
    "tms_online_alpha_50": Arm("tms", dict(_TMS, tms_mode="online", label_weight=0.5)),
    "tms_online_alpha_75": Arm("tms", dict(_TMS, tms_mode="online", label_weight=0.75)),
    "tms_online_alpha_90": Arm("tms", dict(_TMS, tms_mode="online", label_weight=0.9)),
    # Issue #46, against `tms_online_alpha_75` (every pair sampled, up to `TASK_TOKENS`, T = 10): do the faster
    # settings learn and retain as before? (`cost.py --accuracy_check`.) The recipe (`recipe="retention"`: online,
    # alpha 0.75, only the pairs the draws until the next refresh need, whole trajectories) at T = 10...
    "recipe_t10": Arm("tms", dict(recipe="retention", tms_mode="online", trajectories_to_generate="drawn",
                                  num_checkpoints=10), in_study=False),
    # ... at T = 5 (half the refreshes, so half the `generate` calls)...
    "recipe_t5": Arm("tms", dict(recipe="retention", tms_mode="online", trajectories_to_generate="drawn",
                                 num_checkpoints=5), in_study=False),
    # ... and at T = 10 with trajectories as long as the longest label (the recipe's setting for an hour on
    # 2026-12-06; it drifted further).
    "recipe_budget": Arm("tms", dict(recipe="retention", tms_mode="online", trajectories_to_generate="drawn",
                                     num_checkpoints=10, max_new_tokens_from_labels=1.0), in_study=False),
    # Issue #23: self-rehearsal (the initial model's greedy answers to the 64 built-in everyday prompts, disjoint from
    # the chat probe's and the meter's prompts) drawn with probability beta; students on the `tms` run's history.
    "tms_rehearsal_10": Arm("tms", dict(_TMS, rehearsal_weight=0.1)),
    "tms_rehearsal_25": Arm("tms", dict(_TMS, rehearsal_weight=0.25)),
    # Paper-default TMS at `sft_low_lr`'s learning rate, harvest included (its own history): TMS against the free knob.
    "tms_low_lr": Arm("tms", dict(_TMS, lr_scale=0.2)),
    # Paper-default TMS sampling only the (prompt, snapshot) pairs its student draws (the package's default since
    # 2026-12-04; the other TMS arms sample all): the same mixture, a fraction of the generation. Its own run.
    "tms_drawn": Arm("tms", dict(_TMS, trajectories_to_generate="drawn")),
    # Folded in from retention.py (its records: results/retention*/): students on the `tms` history that differ in
    # the mixture only.
    "tms_alpha0.5": Arm("tms", dict(_TMS, label_weight=0.5), in_study=False),
    "tms_curriculum": Arm("tms", dict(_TMS, trajectory_choice="curriculum"), in_study=False),
    "tms_pld": Arm("tms", dict(_TMS, trajectory_choice="pld"), in_study=False),
    "tms_consistent": Arm("tms", dict(_TMS, trajectory_filter="self_consistency"), in_study=False),
    "tms_late": Arm("tms", dict(_TMS, snapshot_weights=[0.0] * 5 + [1.0] * 5), in_study=False),
    "tms_keep_unfinished": Arm("tms", dict(_TMS, unfinished_trajectories="keep"), in_study=False),
    # Issue #44's curves: plain SFT's learning-rate dial (with `sft` at 1x and `sft_low_lr` at 0.2x of the regime's)...
    "sft_lr_x0.5": Arm("sft", {"lr_scale": 0.5}, in_study=False),
    "sft_lr_x0.1": Arm("sft", {"lr_scale": 0.1}, in_study=False),
    # ... and online TMS's label share at a lower learning rate (SFT at a lower rate forgot far less).
    "tms_online_alpha_75_lr_x0.5": Arm("tms", dict(_TMS, tms_mode="online", label_weight=0.75, lr_scale=0.5),
                                       in_study=False),
}


@dataclass(frozen=True)
class Method:
    """
    One curve of issue #44's frontier study: the points a method reaches over its dials, from the records of `arms`.

    Args:
        arms (`tuple[str, ...]`):
            The arms whose final checkpoints are points (a dial: learning rate, label share...).
        checkpoints (`bool`, *optional*, defaults to `False`):
            Every evaluated checkpoint is a point too: stopping early.
        scaled (`bool`, *optional*, defaults to `False`):
            The final adapter scaled towards the base model at `SCALES` is a point too (WiSE-FT for LoRA); the study
            measures those scales for these arms' runs.
        family (`str`, *optional*, defaults to `"cheap"`):
            `"cheap"` (an alternative every TRL user has: its points also make up `CHEAP`), `"tms"` (compared with
            `CHEAP` at each gain level) or `"verifier"` (needs a verifier: shown, not in the ratio).
    """

    arms: tuple
    checkpoints: bool = False
    scaled: bool = False
    family: str = "cheap"


SCALES = (0.25, 0.5, 0.75)  # adapter scales measured for the `scaled` methods' final adapters
SFT_LR_ARMS = ("sft", "sft_lr_x0.5", "sft_low_lr", "sft_lr_x0.1")
ONLINE_TMS_ARMS = ("tms_online", "tms_online_alpha_50", "tms_online_alpha_75", "tms_online_alpha_90",
                   "tms_online_alpha_75_lr_x0.5")
METHODS = {
    "SFT: learning rate": Method(SFT_LR_ARMS),
    "SFT: stop early": Method(SFT_LR_ARMS, checkpoints=True),
    "SFT: adapter scale": Method(SFT_LR_ARMS, scaled=True),
    "online TMS": Method(ONLINE_TMS_ARMS, checkpoints=True, scaled=True, family="tms"),
    "paper TMS": Method(("tms",), checkpoints=True, scaled=True, family="tms"),
    "needs a verifier": Method(("self_sft_verified", "tms_online_verified"), checkpoints=True, family="verifier"),
}
CHEAP = "cheap alternatives (lr, stop, scale)"  # the union of the `cheap` methods' points
REFERENCE_ARM = "sft"  # the gain levels are fractions of this arm's gain (plain SFT at the regime's learning rate)

# cost_t10.py: `TMSTrainer` at the package's defaults (not the study's), each arm a process of its own.
SIGNALS_OFF = dict(log_pld=False, log_retention=False)
# Declared when the paper's two-pass TMS at alpha 0.25 was the package's default: they name it, so that their committed
# results keep their meaning.
PAPER = {"recipe": "paper"}
# Online arms declared when T defaulted to 10 in every mode (until 2026-12-06; online now defaults to 5): named.
PAPER_ONLINE = {"tms_mode": "online", "label_weight": 0.25, "num_checkpoints": 10}
# PLD was logged by default when they were measured (until 2026-12-06): named, so that they keep measuring it.
SIGNALS_ON = dict(log_pld=True)
COST_ARMS = {
    "sft": Arm("sft"),
    "tms": Arm("tms", {**PAPER, **SIGNALS_ON}),
    "tms_quiet": Arm("tms", {**PAPER, **SIGNALS_OFF}),
    "tms_all": Arm("tms", {**PAPER, **SIGNALS_ON, "trajectories_to_generate": "all"}),
    "tms_online": Arm("tms", {**PAPER_ONLINE, **SIGNALS_ON}),
    "tms_online_quiet": Arm("tms", {**PAPER_ONLINE, **SIGNALS_OFF}),
    # `tms` with its generation calls' KV cache and logits held to a share of the `sft` arm's peak memory.
    "tms_memory": Arm("tms", {**PAPER, **SIGNALS_ON}),
}

# cost.py's breakdown (issue #46): the recommended recipe and the paper's at the package's defaults (T = 10 named, so
# that a later default keeps the paper's meaning), against plain SFT; `online_pld` prices the PLD signal.
COST_BREAKDOWN_ARMS = {
    "sft": Arm("sft"),
    # The recipe as it ships: T = 10 until 2026-12-06 (the records in results/cost/ and results/cost/recipe_t10_t5/),
    # T = 5 since.
    "online": Arm("tms", {"recipe": "retention"}),
    # The recipe with trajectories as long as the longest label (the recipe's setting on 2026-12-06 from 16:00 to
    # 17:35, dropped when its accuracy check drifted further): what the length budget saves.
    "online_budget": Arm("tms", {"recipe": "retention", "max_new_tokens_from_labels": 1.0}),
    "two_pass": Arm("tms", {"recipe": "paper", "num_checkpoints": 10}),
    # The recipe with half the snapshots (T = 5): half the refreshes, so half the `generate` calls, each of whose
    # cost is set by its longest row, not by its number of rows.
    "online_t5": Arm("tms", {"recipe": "retention", "num_checkpoints": 5}),
    "online_pld": Arm("tms", {"recipe": "retention", "log_pld": True}),
}

# speed.py's TMS arms (SFT is a plain SFTTrainer), on its own small settings.
SPEED_ARMS = {
    "tms": Arm("tms", PAPER),  # only the trajectories the student draws are sampled (the default)
    "tms_all": Arm("tms", {**PAPER, "trajectories_to_generate": "all"}),  # every trajectory, as the paper
    "tms_pld": Arm("tms", {**PAPER, "trajectory_choice": "pld"}),
    "tms_online": Arm("tms", PAPER_ONLINE),
}

# forgetting_meter.py's runs of different forgetting: settings over its `JOB` (the main job until 2026-12-06;
# `loss_type` is SFTConfig's).
METER_ARMS = {
    "tms": Arm("tms"),
    "sft_long": Arm("sft", {"epochs": 4.0}),
    "sft_low_lr": Arm("sft", {"learning_rate": 2e-4}),
    "sft_dft": Arm("sft", {"loss_type": "dft"}),
}


def reuses_history(name: str) -> bool:
    """Whether the arm is a two-pass TMS student on the `tms` run's harvest and trajectories."""
    arm = ARMS[name]
    own_run = "lr_scale" in arm.settings or "trajectories_to_generate" in arm.settings
    return arm.method == "tms" and arm.settings.get("tms_mode") != "online" and name != "tms" and not own_run
