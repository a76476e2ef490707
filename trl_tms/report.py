"""
What a finished TMS run has to say for itself: where things went, how PLD and the forgetting meter moved, one answer
before and after.
"""

from __future__ import annotations

import torch

from .data import prompt_token_ids

PHASE_IDS = {"harvest": 1, "student": 2, "online": 3}  # the `tms_phase` of each training phase's log entries
PHASE_NAMES = {phase: name for name, phase in PHASE_IDS.items()}


def pld_by_phase(log_history: list[dict]) -> dict[str, dict[str, float]]:
    """Start, minimum and end of PLD, and the end's drift, for each phase found in a TMS run's `log_history`."""
    summary = {}
    for phase, name in PHASE_NAMES.items():
        entries = [e for e in log_history if e.get("tms_phase") == phase and "pld" in e]
        if entries:
            values = [e["pld"] for e in entries]
            summary[name] = {
                "start": values[0],
                "start_step": entries[0]["step"],
                "min": min(values),
                "end": values[-1],
                "end_step": entries[-1]["step"],
                "end_drift": entries[-1]["pld_drift"],
                "points": len(entries),
            }
    return summary


def meter_by_phase(log_history: list[dict]) -> dict[str, dict[str, float]]:
    """Start and end of the forgetting meter (`retention_kl`, `retention_nll`) for each phase of a TMS run's log."""
    summary = {}
    for phase, name in PHASE_NAMES.items():
        entries = [e for e in log_history if e.get("tms_phase") == phase and "retention_kl" in e]
        if entries:
            summary[name] = {
                "start": entries[0]["retention_kl"],
                "end": entries[-1]["retention_kl"],
                "end_step": entries[-1]["step"],
                "start_nll": entries[0]["retention_nll"],
                "end_nll": entries[-1]["retention_nll"],
                "points": len(entries),
            }
    return summary


def answer(trainer, example: dict, max_new_tokens: int = 128, with_adapter: bool = True) -> str:
    """Greedy answer of the trained model (or, `with_adapter=False`, of its base) to a prompt-completion example."""
    model = trainer.model
    tokenizer = trainer.processing_class
    ids = torch.tensor([prompt_token_ids(tokenizer, example, trainer.chat_template)], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if with_adapter:
                output = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
            else:
                with model.disable_adapter():
                    output = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        model.train(was_training)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def format_summary(trainer, output_dir: str) -> str:
    """A short, plain-text account of a finished run."""
    lines = [
        f"Student adapter:   {output_dir}",
        f"Adapter history:   {trainer.history_dir}  (step-<N>/ snapshots: {', '.join(map(str, trainer.history.steps))};"
        " trajectories/)",
    ]
    stats = trainer.stats
    if stats.trajectories:
        args = trainer.args
        lines.append(
            f"Trajectories:      {stats.trajectories} generated in {stats.seconds:.0f} s; {stats.empty} empty (left "
            f"out), {stats.unfinished} cut at max_new_tokens={trainer.max_new_tokens} ({args.unfinished_trajectories})"
        )
        if stats.not_sampled:
            lines.append(
                f"                   only those the student draws: {stats.not_sampled} of "
                f"{stats.trajectories + stats.not_sampled} not sampled (trajectories_to_generate='drawn')"
            )
        lines.append(
            f"Student draws from {stats.kept} of them (trajectory_filter={args.trajectory_filter}); kept by snapshot: "
            + ", ".join(f"step {step} {fraction:.0%}" for step, fraction in stats.kept_fraction.items())
        )
    if stats.rehearsal or stats.rehearsal_empty:
        lines.append(
            f"Self-rehearsal:    {stats.rehearsal} answers of the initial model to everyday prompts, drawn with "
            f"probability {trainer.args.rehearsal_weight} ({stats.rehearsal_seconds:.0f} s; {stats.rehearsal_empty} "
            f"empty, {stats.rehearsal_unfinished} cut at rehearsal_max_new_tokens; {trainer.history_dir}/rehearsal/)"
        )
    pld = pld_by_phase(trainer.state.log_history)
    if pld:
        lines.append("PLD (mean NLL per token of the held-out labels; lower = labels closer to the policy):")
        for name, v in pld.items():
            lines.append(
                f"  {name:8s} start {v['start']:.3f}  min {v['min']:.3f}  end {v['end']:.3f} (step {v['end_step']}, "
                f"drift {v['end_drift']:.3f})"
            )
    else:
        lines.append("PLD:               not measured (no eval_dataset, or log_pld=False)")
    meter = meter_by_phase(trainer.state.log_history)
    if meter:
        lines.append("Forgetting meter (retention_kl: KL per token from the initial model on everyday prompts; lower = "
                     "less forgetting):")
        for name, v in meter.items():
            lines.append(f"  {name:8s} start {v['start']:.3f}  end {v['end']:.3f} (step {v['end_step']}, NLL of the "
                         f"initial answers {v['start_nll']:.3f} -> {v['end_nll']:.3f})")
    else:
        lines.append("Forgetting meter:  not measured (log_retention=False)")
    return "\n".join(lines)
