"""The Hugging Face Hub: the student's model card, and the adapter history when the user asks for it."""

from __future__ import annotations

import os
import re

from huggingface_hub import ModelCard, upload_folder
from trl.trainer.utils import get_config_model_id

_HUB_CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")
_TRL_BASE_SENTENCE = re.compile(r"This model is a fine-tuned version of \[[^\]]*\]\(https://huggingface\.co/[^)]*\)")
# What the card says of the run, and of where its snapshots come from, for each `tms_mode`.
_RUN_DESCRIPTIONS = {
    "two_pass": "a harvest SFT run on the labels, trajectories sampled from its adapter snapshots, and a student "
    "trained from the initial adapter on a mixture of labels and trajectories.",
    "online": "one run (online TMS) that snapshots the adapter it trains as it goes, from step 0, samples trajectories "
    "from each snapshot, and trains on a mixture of labels and the trajectories of its latest snapshots.",
}
_SNAPSHOTS_TAKEN = {"two_pass": "of the harvest run", "online": "taken during the run"}


def resolve_base_model(name_or_path: str | None, override: str | None = None) -> str | None:
    """
    The Hub id of the base model for the card's `base_model`: `override` if given, the name itself if it is a Hub id,
    the id encoded in a Hugging Face cache path (`.../models--org--name/snapshots/<rev>`), else `None` (unknown).
    """
    if override:
        return override
    if not name_or_path:
        return None
    match = _HUB_CACHE_SNAPSHOT.search(name_or_path)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if os.path.exists(name_or_path):
        return None
    return name_or_path


def complete_model_card(
    path: str,
    *,
    base_model: str | None,
    settings: dict[str, object],
    pld: dict[str, float],
    history_repo_folder: str | None,
    tms_mode: str = "two_pass",
) -> ModelCard:
    """
    Turn TRL's card at `path` into the card of a TMS adapter: PEFT front matter (`library_name: peft`, the base model,
    a `tms` tag) and a section with the TMS settings, the final PLD and PLD drift, and where the snapshots are. The
    section describes the run `tms_mode` names: two passes (a harvest and a student) or one online run.
    """
    card = ModelCard.load(path)
    card.data.base_model = base_model
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a base model not on the Hub"
    card.text = _TRL_BASE_SENTENCE.sub(f"This model is a fine-tuned version of {base_link}", card.text)
    card.data.library_name = "peft"
    card.data.tags = sorted({*(card.data.tags or []), "trl", "sft", "tms", "peft", "lora"})
    lines = [
        "",
        "## Trajectory-Mixed Supervision",
        "",
        "This LoRA adapter was trained with [TMS](https://huggingface.co/papers/2602.03073) (trl-tms): "
        + _RUN_DESCRIPTIONS[tms_mode],
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in settings.items()),
    ]
    if pld:
        lines += [
            "",
            "Policy-Label Divergence (mean per-token NLL of held-out reference labels; lower means the labels sit "
            "closer to the policy), at the end of each phase:",
            "",
            "| phase | PLD | PLD drift |",
            "|---|---|---|",
            *(f"| {phase} | {value['pld']:.4f} | {value['pld_drift']:.4f} |" for phase, value in pld.items()),
        ]
    if history_repo_folder:
        lines += [
            "",
            f"The adapter snapshots {_SNAPSHOTS_TAKEN[tms_mode]} are in `{history_repo_folder}/step-<N>/`; load one "
            "with "
            f'`PeftModel.from_pretrained(base_model, repo_id, subfolder="{history_repo_folder}/step-<N>")`.',
        ]
    card.text = card.text.rstrip() + "\n" + "\n".join(lines) + "\n"
    card.save(path)
    return card


def add_adapter_scale_to_card(path: str, scale: float, summary: dict[str, object]) -> ModelCard:
    """
    Add to the card at `path` that the adapter is its trained LoRA delta times `scale` (the retention dial, WiSE-FT
    for LoRA), with what `summary` says of that scale (its measured values, why it was chosen).
    """
    card = ModelCard.load(path)
    lines = [
        "",
        "## Adapter scale",
        "",
        f"This adapter is the trained LoRA delta scaled by **{scale:g}** (0 = the base model, 1 = the adapter as "
        f"trained): its `lora_alpha` in `adapter_config.json` is the trained value times {scale:g}, so PEFT loads it "
        "at this scale.",
    ]
    if summary:
        lines += [
            "",
            "The curve it was chosen from is `adapter_scale.json` (plot: `adapter_scale.png`, with matplotlib):",
            "",
            "| at this scale | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in summary.items()),
        ]
    card.text = card.text.rstrip() + "\n" + "\n".join(lines) + "\n"
    card.save(path)
    return card


def push_history(history_dir: str, repo_id: str, folder: str, **kwargs):
    """Upload the snapshot folders (`step-<N>/`, complete ones only) of a history to `repo_id` under `folder`."""
    return upload_folder(
        repo_id=repo_id,
        folder_path=history_dir,
        path_in_repo=folder,
        allow_patterns=["step-*/*"],
        commit_message="Upload TMS adapter history",
        **kwargs,
    )


def card_settings(args, snapshot_steps: list[int], max_new_tokens: int) -> dict[str, object]:
    """The TMS settings a model card lists."""
    online = {"online_snapshot_every": args.online_snapshot_every or "default"} if args.tms_mode == "online" else {}
    return {
        "tms_mode": args.tms_mode,
        **online,
        "num_checkpoints (T)": args.num_checkpoints,
        "label_weight (alpha)": args.label_weight,
        "snapshot steps": ", ".join(map(str, snapshot_steps)) or "none yet",
        "samples_per_checkpoint": args.samples_per_checkpoint,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": max_new_tokens,
        "unfinished_trajectories": args.unfinished_trajectories,
        "trajectory_filter": args.trajectory_filter,
    }


def final_pld(log_history: list[dict]) -> dict[str, dict]:
    """The last PLD log entry of each phase of a two-pass run, keyed by the phase's name in the card."""
    final = {}
    for phase, label in ((1, "harvest (SFT on the labels)"), (2, "student (TMS)"), (3, "online TMS")):
        entries = [e for e in log_history if e.get("tms_phase") == phase and "pld" in e]
        if entries:
            final[label] = entries[-1]
    return final


class TMSHubMixin:
    """
    The Hub side of [`TMSTrainer`]: the card TRL writes gains the TMS settings and the final PLD, and `push_to_hub`
    uploads the snapshots too with `push_history=True`. Mixed in before [`~trl.SFTTrainer`]; reads the trainer's
    public `args`, `history`, `history_dir` and `max_new_tokens`.
    """

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        complete_model_card(
            os.path.join(self.args.output_dir, "README.md"),
            base_model=resolve_base_model(get_config_model_id(self.model.config), self.args.hub_base_model),
            settings=card_settings(self.args, self.history.steps, self.max_new_tokens),
            pld=final_pld(self.state.log_history),
            history_repo_folder="history" if self.args.push_history else None,
            tms_mode=self.args.tms_mode,
        )

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **kwargs):
        """Push the student's adapter and its model card; with `push_history=True`, the snapshots too."""
        result = super().push_to_hub(
            commit_message=commit_message, blocking=blocking, token=token, revision=revision, **kwargs
        )
        if self.args.push_history and self.is_world_process_zero():
            push_history(
                self.history_dir,
                self.hub_model_id,
                "history",
                token=token if token is not None else self.args.hub_token,
                revision=revision if revision is not None else self.args.hub_revision,
            )
        return result
