"""Online TMS: one training run on its own snapshots, taken every K optimizer steps from step 0."""

from __future__ import annotations

import os
import time

from datasets import concatenate_datasets, load_from_disk
from transformers import TrainerCallback

from .mixture import TrajectoryStats
from .resume import TMSRun
from .trajectories import save_trajectories


def online_snapshot_steps(total_steps: int, num_checkpoints: int, every: int | None = None) -> list[int]:
    """Online TMS: steps 0, `every`, 2 `every`, ... or, by default, `num_checkpoints` steps spread evenly from step 0."""
    if every:
        return list(range(0, total_steps, every))
    return sorted({k * total_steps // num_checkpoints for k in range(num_checkpoints)})


class OnlineTMS(TrainerCallback):
    """
    The online phase of a [`TMSTrainer`]: at each step of its schedule the adapter being trained is snapshotted and
    samples a trajectory for every prompt, and the mixture draws from the last `num_checkpoints` snapshots taken so far
    (labels only before step 0's trajectories exist). A callback of the online phase, it drives the run through the
    trainer's public methods.

    Args:
        trainer ([`TMSTrainer`]):
            The trainer, whose training dataset is already a mixture of the labels.
        run ([`TMSRun`]):
            The run's on-disk state (started).
    """

    def __init__(self, trainer, run: TMSRun):
        args = trainer.args
        self.trainer = trainer
        self.run = run
        self.steps = online_snapshot_steps(run.record["planned_steps"], args.num_checkpoints, args.online_snapshot_every)
        self.trajectories = []  # one dataset per snapshot, in the order taken
        # A finished run resumed again: its trajectories are on disk (the parts are removed when a run finishes).
        finished = run.done("trajectories") and os.path.isdir(run.trajectories_dir)
        self.finished = load_from_disk(run.trajectories_dir) if finished else None
        self.stats = TrajectoryStats()

    # Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        global_step = state.global_step
        if global_step == 0:
            self.refresh(0)
            return
        # A resumed run takes up the snapshots it had taken (and their trajectories, from the parts on disk).
        taken = [step for step in self.steps if step <= global_step]
        self.run.reopen_snapshots(self.trainer.history, taken)
        for step in taken:
            self.refresh(step, take=False)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.refresh(state.global_step)

    # The algorithm

    def refresh(self, step: int, take: bool = True) -> None:
        """
        Snapshot the adapter at `step` and add its trajectories to the mixture. A resumed run passes `take=False` for
        the snapshots taken before it stopped (on disk, and logged in the checkpoint's log history).
        """
        trainer = self.trainer
        if take:
            trainer.history.take(trainer.model, step, trainer.adapter_name)
        started = time.perf_counter()
        if not take and self.finished is not None:
            trajectories = self.finished.filter(
                lambda s: s == step, input_columns="snapshot_step", keep_in_memory=True  # no cache file in the history
            )
        else:
            trajectories = trainer.sample_trajectories(steps=[step])
        seconds = time.perf_counter() - started
        self.trajectories.append(trajectories)
        candidates, counts = trainer.candidate_builder.build(trajectories, with_labels=False)
        if len(candidates):
            window = set(trainer.history.steps[-trainer.args.num_checkpoints :])
            trainer.train_dataset.extend(candidates, keep_steps=window)
        counts.seconds = seconds
        self.stats.add(counts)
        if take:
            trainer.log_event(
                {
                    "tms_snapshot_step": step,
                    "tms_trajectory_seconds": seconds,
                    "tms_empty_trajectories": counts.empty,
                    "tms_unfinished_trajectories": counts.unfinished,
                    "tms_kept_fraction": counts.kept_fraction.get(step, 0.0),
                }
            )

    def finish(self):
        """Save every trajectory of the run in the history, record the phase as done, and return the trajectories."""
        trajectories = concatenate_datasets(self.trajectories)
        if self.run.is_main:
            save_trajectories(trajectories, self.run.trajectories_dir)
        self.run.remove_generation_scratch()
        self.run.finish(
            "online",
            trajectories_done=True,
            snapshot_steps=self.trainer.history.steps,
            trajectory_seconds=self.stats.seconds,
        )
        return trajectories
