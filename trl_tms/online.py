"""Online TMS: one training run on its own snapshots, taken every K optimizer steps from step 0."""

from __future__ import annotations

import os
import time

from datasets import Dataset, concatenate_datasets, load_from_disk
from transformers import TrainerCallback

from .candidates import TrajectoryStats
from .generation import save_trajectories
from .planning import sample_drawn_pairs, step_positions
from .resume import TMSRun


def online_snapshot_steps(total_steps: int, num_checkpoints: int, every: int | None = None) -> list[int]:
    """Online TMS: steps 0, `every`, 2 `every`, ... or, by default, `num_checkpoints` steps spread evenly from step 0."""
    if every:
        return list(range(0, total_steps, every))
    return sorted({k * total_steps // num_checkpoints for k in range(num_checkpoints)})


class OnlineTMS(TrainerCallback):
    """
    The online phase of a [`TMSTrainer`]: at each step of its schedule the adapter being trained is snapshotted and
    samples trajectories, and the mixture draws from the last `num_checkpoints` snapshots taken so far (labels only
    before step 0's trajectories exist). With `trajectories_to_generate="all"` each snapshot samples every prompt; with
    `"drawn"` each refresh samples only the (prompt, snapshot) pairs that the draws of the batches until just past the
    next refresh land on (prompts still to come, in the data loader's order), from the new snapshot or an earlier one
    still in the window: the same draws for a fraction of the generation. A callback of the online phase, it drives the
    run through the trainer's public methods and generation backend.

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
        self.planned_steps = run.record["planned_steps"]
        self.steps = online_snapshot_steps(self.planned_steps, args.num_checkpoints, args.online_snapshot_every)
        self.drawn = args.generates_drawn_trajectories_only  # at label_weight=1.0 no draw needs a pair: none sampled
        self.sampled: set[tuple[int, int]] = set()
        self.trajectories = []  # one dataset per refresh (and round of drawn sampling), in the order sampled
        # A finished run resumed again: its trajectories are on disk (the parts are removed when a run finishes).
        finished = run.done("trajectories") and os.path.isdir(run.trajectories_dir)
        self.finished = load_from_disk(run.trajectories_dir) if finished else None
        self.stats = TrajectoryStats()
        self.dataloader = None

    # Trainer events

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.dataloader = train_dataloader
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
        the snapshots taken before it stopped (on disk, and logged in the checkpoint's log history); it samples the
        same pairs again, which the generation backend reads back from its parts on disk.
        """
        trainer = self.trainer
        if take:
            trainer.history.take(trainer.model, step, trainer.adapter_name)
        started = time.perf_counter()
        counts = TrajectoryStats()
        if not take and self.finished is not None:
            counts.add(self._add(step, self.finished.filter(
                lambda s: s == step, input_columns="snapshot_step", keep_in_memory=True  # no cache file in the history
            )))
        elif self.drawn:
            positions = self._positions_until_next_refresh(step)
            self._add(step)  # the new snapshot joins the draw, so that the plan sees it
            sample_drawn_pairs(
                lambda: trainer.train_dataset.missing_pairs(positions=positions),
                lambda pairs: trainer.generator.generate(pairs=pairs),
                lambda trajectories, pairs: counts.add(self._add(step, trajectories, pairs)),
            )
        else:
            counts.add(self._add(step, trainer.generator.generate(steps=[step])))
        counts.seconds = time.perf_counter() - started
        self.stats.add(counts)
        if take:
            trainer.log_event(
                {
                    "tms_snapshot_step": step,
                    "tms_trajectory_seconds": counts.seconds,
                    "tms_sampled_trajectories": counts.trajectories,
                    "tms_empty_trajectories": counts.empty,
                    "tms_unfinished_trajectories": counts.unfinished,
                    "tms_kept_fraction": counts.kept_fraction.get(step, 0.0),
                    "tms_label_copy_trajectories": counts.label_copies,
                }
            )

    def _add(self, step: int, trajectories=None, pairs: set[tuple[int, int]] | None = None) -> TrajectoryStats:
        """
        Add `trajectories` (the sampled `pairs`, or all of theirs) to the mixture, which draws from the window of the
        last `num_checkpoints` snapshots taken up to `step`; returns their counts. Up to `step`, not all those in the
        history: a resumed run replays its refreshes with every snapshot it had taken already reopened.
        """
        trainer = self.trainer
        taken = [s for s in trainer.history.steps if s <= step]
        window = set(taken[-trainer.args.num_checkpoints :])
        counts, candidates = TrajectoryStats(), []
        if trajectories is not None:
            self.trajectories.append(trajectories)
            candidates, counts = trainer.candidate_builder.build(trajectories, with_labels=False)
            self.sampled |= pairs if pairs is not None else set(zip(trajectories["prompt_index"], trajectories["snapshot_step"]))
        planning = dict(snapshot_steps=taken, sampled=self.sampled) if self.drawn else {}
        if len(candidates) or self.drawn:
            trainer.train_dataset.extend(candidates if len(candidates) else Dataset.from_dict({}), keep_steps=window,
                                         **planning)
        return counts

    def _positions_until_next_refresh(self, step: int) -> dict[int, list[int]]:
        """
        By epoch, the dataset positions of the batches drawn between the refresh at `step` and the next one: those of
        optimizer steps `step + 1` to one past the next refresh, since the data loader draws a batch ahead of the step
        it trains.
        """
        args = self.trainer.args
        later = [s for s in self.steps if s > step]
        last = min((later[0] if later else self.planned_steps) + 1, self.planned_steps)
        per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        return step_positions(self.dataloader, range(step + 1, max(last, step + 1) + 1), self.trainer.updates_per_epoch,
                              per_step, len(self.trainer.train_dataset), args.world_size)

    def finish(self):
        """Save every trajectory of the run in the history, record the phase as done, and return the trajectories."""
        if not self.trajectories:  # every draw took a label
            self.trajectories.append(self.trainer.generator.generate(pairs=set()))
        trajectories = concatenate_datasets(self.trajectories)
        if self.drawn:
            trajectories = trajectories.sort(["prompt_index", "snapshot_step", "sample_index"])
            self.stats.not_sampled = self.trainer.unsampled_count(trajectories)
        if self.run.is_main:
            save_trajectories(trajectories, self.run.trajectories_dir)
        self.run.finish(  # then the generation's scratch is removed
            "online",
            trajectories_done=True,
            snapshot_steps=self.trainer.history.steps,
            trajectory_seconds=self.stats.seconds,
        )
        return trajectories
