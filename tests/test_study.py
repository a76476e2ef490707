"""The study's tasks, training and report (benchmarks/study.py over benchmarks/harness/): labels that score as right,
disjoint splits, every kind of arm, and statistics."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import study  # noqa: E402
from harness import plots, records, registry, report, training  # noqa: E402
from harness.tasks import CANDIDATES, load_task  # noqa: E402

from trl_tms.atomic import write_json_atomically
from trl_tms.probes.embedded import is_correct


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_worked_answers_end_in_the_right_number_and_splits_are_disjoint(name):
    train, test = load_task(name, 64, 100)
    assert len(train) == 64 and len(test) == 100
    for row in list(train) + list(test):
        text = row["completion"][0]["content"]
        assert text.endswith(f"#### {row['answer']}")
        assert is_correct(text, row["answer"])
        assert not is_correct(text, str(int(row["answer"]) + 1))
    questions = {r["prompt"][0]["content"] for r in train}
    assert not questions & {r["prompt"][0]["content"] for r in test}


def test_reserved_tasks_are_not_candidates():
    generators = {generator for generator, _, _ in CANDIDATES.values()}
    assert not generators & {"basic_arithmetic", "chain_sum"}
    with pytest.raises(ValueError, match="Unknown task"):
        load_task("chain_sum", 4, 4)


def checkpoint(step, target, chat_kl, wiki, pld, meter, items_target):
    return {"step": step, "fraction": step / 8, "target_accuracy": target, "chat_kl": chat_kl, "chat_nll": 1.0,
            "wikitext_nll": wiki, "pld": pld, "retention_kl": meter,
            "items": {"target": items_target, "chat_kl": [chat_kl, chat_kl], "chat_nll": [1.0, 1.0],
                      "wikitext": [wiki, wiki]}}


def write_arm(tmp_path, arm, seed, checkpoints, wall, load=None):
    record = {"arm": arm, "regime": "zero", "seed": seed, "task": "leg_counting", "steps": 8,
              "wall_seconds": wall, "checkpoints": checkpoints}
    if load is not None:
        record["load_average"] = load
    write_json_atomically(records.arm_path(str(tmp_path), "zero", arm, seed), record)


def test_summary_pairs_against_the_base_and_reads_sft_early_off_the_sft_run(tmp_path):
    base = checkpoint(0, 0.0, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])
    write_json_atomically(records.arm_path(str(tmp_path), "zero", "base", 0),
                                {"arm": "base", "regime": "zero", "seed": 0, "task": "leg_counting", "final": base})
    write_arm(tmp_path, "sft", 0, [checkpoint(4, 0.25, 0.2, 5.1, 1.0, 0.1, [1, 0, 0, 0]),
                                   checkpoint(8, 0.5, 0.4, 5.2, 0.5, 0.3, [1, 1, 0, 0])], {"train": 100.0, "total": 100.0})
    write_arm(tmp_path, "tms", 0, [checkpoint(4, 0.25, 0.1, 5.0, 1.2, 0.05, [1, 0, 0, 0]),
                                   checkpoint(8, 0.25, 0.2, 5.05, 0.9, 0.1, [0, 1, 0, 0])], {"total": 250.0})
    result = report.summary(str(tmp_path))
    arms = result["regimes"]["zero"]["arms"]
    assert arms["sft"]["target_gain"] == pytest.approx(0.5)
    assert arms["sft_early"]["target_gain"] == pytest.approx(0.25)  # its checkpoint at half the steps
    assert arms["tms"]["chat_kl"]["value"] == pytest.approx(0.2)
    assert arms["tms"]["wiki_nll_delta"] == pytest.approx(0.05)
    assert arms["tms"]["wall_ratio_to_sft"] == pytest.approx(2.5)
    # Paired SE of the target change: per-item differences [0, 1, 0, 0] -> sd 0.5 / sqrt(4).
    assert arms["tms"]["target"]["se"] == pytest.approx(0.25)
    # Four checkpoints; the signal that follows chat KL ranks perfectly, PLD (falling while KL rises) inversely.
    correlation = result["pld_correlation"]
    assert correlation["retention_kl"]["points"] == 4
    assert correlation["retention_kl"]["chat_kl"]["spearman"]["value"] == pytest.approx(1.0)
    assert correlation["pld"]["chat_kl"]["spearman"]["value"] < 0
    points = report.signal_points(records.load_arms(str(tmp_path)))
    drift = {(p["arm"], p["step"]): p["pld_drift"] for p in points}
    assert drift[("sft", 8)] == 0.0 and drift[("tms", 8)] == 0.0  # PLD fell at every checkpoint
    assert "| sft_early |" in report.table(result)
    assert result["regimes"]["zero"]["trajectory_quality"] == {}  # no TMS record carries it: no table
    assert "What the TMS students drew from" not in report.table(result)


def test_wall_ratios_compare_runs_timed_on_the_same_machine(tmp_path):
    """Sessions land on machines of different speeds: each run's wall is divided by the SFT walls of its own boot, and
    a run whose machine timed no SFT has no ratio (records without `machine` are one group, as before the field)."""
    assert records.machine()["boot_id"] == records.machine()["boot_id"]  # stable within a boot
    base = checkpoint(0, 0.0, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])
    write_json_atomically(records.arm_path(str(tmp_path), "zero", "base", 0),
                          {"arm": "base", "regime": "zero", "seed": 0, "task": "leg_counting", "final": base})
    last = [checkpoint(8, 0.5, 0.4, 5.2, 0.5, 0.3, [1, 1, 0, 0])]

    def on(boot, arm, seed, wall):
        write_arm(tmp_path, arm, seed, last, wall)
        path = records.arm_path(str(tmp_path), "zero", arm, seed)
        with open(path) as f:
            record = json.load(f)
        if boot is not None:
            record["machine"] = {"boot_id": boot, "cpu": "x86_64", "cpus": 2}
        write_json_atomically(path, record)

    on(None, "sft_low_lr", 0, {"train": 100.0, "total": 100.0})  # an older record, on the older machine
    on(None, "tms", 0, {"harvest": 150.0, "total": 300.0})
    on("slow", "sft_low_lr", 1, {"train": 200.0, "total": 200.0})
    on("slow", "tms", 1, {"harvest": 200.0, "total": 800.0})
    on("other", "tms", 2, {"total": 5000.0})  # no SFT timed on its machine: left out
    on("other", "tms_online", 0, {"total": 900.0})
    result = report.summary(str(tmp_path))["regimes"]["zero"]
    arms = result["arms"]
    # (300 / 100 + 800 / 200) / 2; across machines it would have read (300 + 800 + 5000) / 3 / 150.
    assert arms["tms"]["wall_ratio_to_sft"] == pytest.approx(3.5) and not arms["tms"]["wall_shared"]
    # TMS's harvest (plain SFT's work plus PLD) against SFT, likewise: (150 / 100 + 200 / 200) / 2, not 350 / 2 / 150.
    assert arms["tms"]["harvest_ratio_to_sft"] == pytest.approx(1.25)
    assert "harvest_ratio_to_sft" not in arms["tms_online"]
    assert result["wall_reference"] == {"arms": ["sft_low_lr"],
                                        "seconds_by_machine": {"not recorded": 100.0, "slow": 200.0}}
    assert arms["sft_low_lr"]["wall_ratio_to_sft"] == pytest.approx(1.0)
    assert arms["tms_online"]["wall_ratio_to_sft"] is None
    row = next(line for line in report.table(report.summary(str(tmp_path))).splitlines()
               if line.startswith("| tms_online |"))
    assert row.endswith("| - |")


def test_records_carry_the_library_versions_they_were_measured_under_and_the_report_counts_them(tmp_path):
    """A fresh install resolves the newest releases in our bounds: a record says which it ran under, the report how
    many records ran under each set (records written before the field existed: "not recorded")."""
    from importlib import metadata

    versions = records.library_versions()
    assert versions["peft"] == metadata.version("peft") and versions["torch"] == metadata.version("torch")
    assert set(versions) == {"python", *records.LIBRARIES}
    line = records.versions_line(versions)
    assert f"peft {metadata.version('peft')}" in line and records.versions_line(None) == "not recorded"
    base = checkpoint(0, 0.0, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])
    write_json_atomically(records.arm_path(str(tmp_path), "zero", "base", 0),
                          {"arm": "base", "regime": "zero", "seed": 0, "task": "leg_counting", "final": base,
                           "versions": versions})
    write_arm(tmp_path, "sft", 0, [checkpoint(8, 0.5, 0.4, 5.2, 0.5, 0.3, [1, 1, 0, 0])], {"train": 100.0, "total": 100.0})
    write_arm(tmp_path, "sft", 1, [checkpoint(8, 0.5, 0.4, 5.2, 0.5, 0.3, [1, 1, 0, 0])], {"train": 100.0, "total": 100.0})
    result = report.summary(str(tmp_path))
    assert result["regimes"]["zero"]["versions"] == {line: 1, "not recorded": 2}
    assert f"Measured under (records): not recorded (2); {line} (1)" in report.table(result)


def test_live_signals_are_correlated_within_one_model_family(tmp_path):
    # SmolLM2's checkpoints: the meter follows chat KL. Gemma's: an order of magnitude more drift, and its meter ranks
    # against it; pooled, Gemma's points would sit above SmolLM2's on both axes and lift the pooled correlation.
    write_json_atomically(records.arm_path(str(tmp_path), "zero", "base", 0),
                          {"arm": "base", "regime": "zero", "seed": 0, "task": "leg_counting",
                           "final": checkpoint(0, 0.0, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])})
    write_arm(tmp_path, "sft", 0, [checkpoint(4, 0.25, 0.2, 5.1, 1.0, 0.1, [1, 0, 0, 0]),
                                   checkpoint(8, 0.5, 0.4, 5.2, 0.5, 0.3, [1, 1, 0, 0])], {"train": 100.0, "total": 100.0})
    write_arm(tmp_path, "tms", 0, [checkpoint(4, 0.25, 0.1, 5.0, 1.2, 0.05, [1, 0, 0, 0]),
                                   checkpoint(8, 0.25, 0.3, 5.05, 0.9, 0.2, [0, 1, 0, 0])], {"total": 250.0})
    write_json_atomically(records.arm_path(str(tmp_path), "gemma", "base", 0),
                          {"arm": "base", "regime": "gemma", "seed": 0, "task": "letter_counting_short",
                           "final": checkpoint(0, 0.5, 0.0, 5.6, 3.0, 0.0, [1, 1, 0, 0])})
    gemma = [checkpoint(step, 0.75, kl, 9.0, 1.0, meter, [1, 1, 1, 0])
             for step, kl, meter in ((2, 2.0, 4.0), (4, 3.0, 3.0), (6, 4.0, 2.0), (8, 5.0, 1.0))]
    write_json_atomically(records.arm_path(str(tmp_path), "gemma", "sft", 0),
                          {"arm": "sft", "regime": "gemma", "seed": 0, "task": "letter_counting_short", "steps": 8,
                           "wall_seconds": {"train": 300.0, "total": 300.0}, "checkpoints": gemma})
    result = report.summary(str(tmp_path))
    smollm2 = result["pld_correlation"]["retention_kl"]
    assert smollm2["points"] == 4 and smollm2["chat_kl"]["spearman"]["value"] == pytest.approx(1.0)
    by_model = result["pld_correlation_by_model"]
    assert list(by_model) == ["gemma3_270m"]
    assert by_model["gemma3_270m"]["retention_kl"]["points"] == 4
    assert by_model["gemma3_270m"]["retention_kl"]["chat_kl"]["spearman"]["value"] == pytest.approx(-1.0)
    assert {p["regime"] for p in report.signal_points(records.load_arms(str(tmp_path)))} == {"zero"}
    text = report.table(result)
    assert "## Do the live signals predict forgetting? (every checkpoint of every run)" in text
    assert "## Do the live signals predict forgetting? (every checkpoint of every run, Gemma-3-270M base" in text


def test_trajectory_quality_is_averaged_over_the_seeds_that_recorded_it(tmp_path):
    base = checkpoint(0, 0.0, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])
    write_json_atomically(records.arm_path(str(tmp_path), "zero", "base", 0),
                                {"arm": "base", "regime": "zero", "seed": 0, "task": "leg_counting", "final": base})
    late = [checkpoint(8, 0.5, 0.2, 5.0, 1.0, 0.1, [1, 1, 0, 0])]

    def quality(by_step, kept):
        steps = {str(step): {"n": 4, "correct": c, "unfinished": u, "mean_tokens": 9.0, "kept": kept, "label_copy": c}
                 for step, (c, u) in by_step.items()}
        n, correct = 4 * len(by_step), sum(c for c, _ in by_step.values()) / len(by_step)
        return {"by_step": steps, "all": {"n": n, "correct": correct, "label_copy": correct / 2,
                                          "unfinished": sum(u for _, u in by_step.values()) / len(by_step),
                                          "mean_tokens": 9.0, "kept": kept}}

    for seed, by_step in ((0, {0: (0.0, 0.5), 10: (1.0, 0.0), 2: (0.5, 0.25)}), (1, {0: (0.5, 0.0), 10: (0.5, 0.0)})):
        write_arm(tmp_path, "tms_online", seed, late, {"total": 1.0})
        path = records.arm_path(str(tmp_path), "zero", "tms_online", seed)
        record = json.load(open(path))
        record["trajectory_quality"] = quality(by_step, kept=0.5 + 0.25 * seed)
        write_json_atomically(path, record)
    write_arm(tmp_path, "tms_online", 2, late, {"total": 1.0})  # measured before the report existed
    result = report.summary(str(tmp_path))
    q = result["regimes"]["zero"]["trajectory_quality"]["tms_online"]
    assert q["seeds"] == [0, 1]
    assert q["correct"] == pytest.approx((0.5 + 0.5) / 2)
    assert q["first_correct"] == pytest.approx(0.25)  # snapshots in step order, not as the JSON keys sort
    assert q["last_correct"] == pytest.approx(0.75)
    assert q["lowest_correct"] == pytest.approx(0.25) and q["highest_correct"] == pytest.approx(0.75)
    assert q["unfinished"] == pytest.approx((0.25 + 0.0) / 2)
    assert q["kept"] == pytest.approx(0.625)
    assert q["label_copy"] == pytest.approx(0.25)
    assert "| tms_online | 0,1 | 0.50 | 0.25 | 0.75 | 0.25 / 0.75 | 0.12 | 0.62 | 0.25 |" in report.table(result)


def test_trajectory_quality_counts_right_cut_and_copied_trajectories_per_snapshot():
    from harness.trajectory_quality import trajectory_quality

    labels = ["3 + 4 = 7\n#### 7", [{"role": "assistant", "content": "2 * 2 = 4\n#### 4"}]]
    rows = [  # (prompt, snapshot, text, finished)
        (0, 0, "3 + 4 = 7\n#### 7", True),    # right, the label itself
        (0, 0, "3 +  4 = 7 #### 7", True),     # right, the label up to whitespace
        (1, 0, "2 * 2 = 5\n#### 5", True),    # wrong
        (1, 5, "2 times 2 is 4\n#### 4", True),  # right in its own words
        (0, 5, "3 + 4 =", False),  # cut off (its last number is 4)
    ]
    trajectories = [{"prompt_index": p, "snapshot_step": s, "completion": [{"role": "assistant", "content": t}],
                     "finished": f, "num_tokens": 10} for p, s, t, f in rows]
    quality = trajectory_quality(trajectories, ["7", "4"], labels)
    assert quality["by_step"]["0"] == pytest.approx(
        {"n": 3, "correct": 2 / 3, "unfinished": 0.0, "mean_tokens": 10.0, "label_copy": 2 / 3})
    assert quality["by_step"]["5"]["correct"] == 0.5 and quality["by_step"]["5"]["label_copy"] == 0.0
    assert quality["by_step"]["5"]["unfinished"] == 0.5
    assert quality["all"]["label_copy"] == pytest.approx(2 / 5)
    assert "label_copy" not in trajectory_quality(trajectories, ["7", "4"])["all"]  # no labels given


@pytest.fixture
def tiny_study(monkeypatch, tiny_llama):
    """The study's trainers on a tiny local model: 16 prompts, batch 8, 2 epochs (4 steps), short generations."""
    from conftest import load_tokenizer, make_examples
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(training, "load_model", lambda regime=None: (AutoModelForCausalLM.from_pretrained(tiny_llama),
                                                                     load_tokenizer(tiny_llama)))
    monkeypatch.setattr(registry, "TASK_TOKENS", 6)
    train = make_examples(16, seed=0).add_column("answer", ["3"] * 16)
    pld = make_examples(4, seed=1).add_column("answer", ["3"] * 4)
    regime = dict(task="tiny", lora_r=4, learning_rate=1e-2, epochs=2)
    return train, pld, regime


@pytest.fixture
def tiny_regime(tiny_study, tmp_path, monkeypatch):
    """`run_regime` on `tiny_study` in a small quick mode: (mode, results dir, scratch dir)."""
    from harness import probes

    train, pld, regime = tiny_study
    monkeypatch.setattr(study, "load_task", lambda task, n_train, n_test, seed=0: (train, pld))
    follow = probes.instruction_following
    monkeypatch.setattr(probes, "instruction_following", lambda model, tok: follow(model, tok, max_new_tokens=4))
    mode = dict(study.MODES["quick"], regimes={"zero": regime}, num_train=16, num_test=4, num_pld=4, mc_items=3,
                wiki_items=6, chat_prompts=2, chat_tokens=4, checkpoints=2)
    out, scratch = str(tmp_path / "results"), str(tmp_path / "scratch")
    os.makedirs(scratch)
    return mode, out, scratch


@pytest.mark.parametrize("arm", ["sft_dft", "sft_rehearsal_10", "grpo", "sdft", "self_sft_verified"])
def test_every_kind_of_arm_trains_and_keeps_its_checkpoints(tiny_study, tmp_path, arm):
    train, pld, regime = tiny_study
    runs, model, tokenizer = training.train_run(arm, regime, 0, train, pld, str(tmp_path), str(tmp_path / "history"),
                                             [2, 4], {})
    assert tokenizer.pad_token_id is not None
    assert list(runs) == [arm]
    assert sorted(runs[arm]["weights"]) == [2, 4]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(runs[arm]["weights"][4]) == trainable
    assert runs[arm]["wall_seconds"]["total"] > 0
    assert ("trajectory_quality" in runs[arm]) == (arm == "self_sft_verified")  # TMS runs only
    if arm == "self_sft_verified":  # online: the snapshot of every epoch, the verifier keeping exactly the right ones
        quality = runs[arm]["trajectory_quality"]
        assert sorted(quality["by_step"], key=int) == ["0", "2"] and quality["all"]["n"] == 2 * len(train)
        assert quality["all"]["kept"] == pytest.approx(quality["all"]["correct"])
    if arm == "sft_rehearsal_10":  # SFT's steps, a tenth of the rows the base model's own answers
        walls = runs[arm]["wall_seconds"]
        assert 0 < walls["rehearsal_answers"] < walls["total"]
        assert sorted(runs[arm]["weights"]) == [2, 4] and max(runs[arm]["weights"]) == training.planned_steps(regime, 16)


def test_wall_ratios_are_to_a_plain_sft_run_that_had_the_machine_to_itself(tmp_path):
    base = checkpoint(0, 0.0, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])
    write_json_atomically(records.arm_path(str(tmp_path), "zero", "base", 0),
                                {"arm": "base", "regime": "zero", "seed": 0, "task": "leg_counting", "final": base})
    alone, shared = {"before": 2.0, "after": 2.1, "threads": 2}, {"before": 1.5, "after": 3.5, "threads": 2}
    last = [checkpoint(8, 0.5, 0.4, 5.2, 0.5, 0.3, [1, 1, 0, 0])]
    write_arm(tmp_path, "sft", 0, last, {"train": 300.0, "total": 300.0}, shared)
    write_arm(tmp_path, "tms", 0, last, {"total": 900.0}, shared)
    arms = report.summary(str(tmp_path))["regimes"]["zero"]["arms"]
    # Only shared runs so far: a ratio, flagged.
    assert arms["tms"]["wall_ratio_to_sft"] == pytest.approx(3.0) and arms["tms"]["wall_shared"]
    write_arm(tmp_path, "sft", 1, last, {"train": 100.0, "total": 100.0}, alone)
    arms = report.summary(str(tmp_path))["regimes"]["zero"]["arms"]
    # No plain SFT run yet: the harvest is the reference, and the shared one (seed 0) is left out: 900 / 100.
    assert arms["tms"]["wall_ratio_to_sft"] == pytest.approx(9.0) and arms["tms"]["wall_shared"]
    assert arms["sft"]["wall_ratio_to_sft"] == pytest.approx(1.0) and not arms["sft"]["wall_shared"]
    write_arm(tmp_path, "sft_dft", 0, last, {"train": 50.0, "total": 50.0})  # no load record: counted as alone
    write_arm(tmp_path, "sft_low_lr", 0, last, {"train": 500.0, "total": 500.0}, shared)
    # SFT with self-rehearsal also generates its answers: not a reference.
    write_arm(tmp_path, "sft_rehearsal_10", 0, last, {"train": 60.0, "rehearsal_answers": 10.0, "total": 70.0})
    result = report.summary(str(tmp_path))
    arms = result["regimes"]["zero"]["arms"]
    # A plain SFTTrainer run is the reference (the harvest also logs PLD); the shared one is left out: 50 s.
    assert result["regimes"]["zero"]["wall_reference"] == {"arms": ["sft_dft", "sft_low_lr"],
                                                           "seconds_by_machine": {"not recorded": 50.0}}
    assert arms["sft_dft"]["wall_ratio_to_sft"] == pytest.approx(1.0) and not arms["sft_dft"]["wall_shared"]
    assert arms["sft"]["wall_ratio_to_sft"] == pytest.approx(2.0) and not arms["sft"]["wall_shared"]
    assert arms["sft_early"]["wall_ratio_to_sft"] == pytest.approx(1.0)
    assert arms["sft_low_lr"]["wall_ratio_to_sft"] == pytest.approx(10.0) and arms["sft_low_lr"]["wall_shared"]
    rows = [line for line in report.table(result).splitlines() if line.startswith("| sft |")]
    assert rows[0].endswith("| 2.00 |")
    # A run marked by hand as contended (another job ran during its training, its load average fine at both ends)
    # is left out like a shared one: no plain run is clean any more, so the reference is the mean of both (275 s).
    with open(records.arm_path(str(tmp_path), "zero", "sft_dft", 0)) as f:
        record = json.load(f)
    write_json_atomically(records.arm_path(str(tmp_path), "zero", "sft_dft", 0),
                                {**record, "contended": "tests ran during its training"})
    result = report.summary(str(tmp_path))
    assert result["regimes"]["zero"]["wall_reference"]["seconds_by_machine"]["not recorded"] == pytest.approx(275.0)
    assert result["regimes"]["zero"]["arms"]["sft_dft"]["wall_shared"]


def test_the_tms_run_yields_the_sft_arm_from_its_harvest_and_students_reuse_its_history(tiny_study, tmp_path):
    import torch

    train, pld, regime = tiny_study
    history = str(tmp_path / "history")
    runs, _, _ = training.train_run("tms", regime, 0, train, pld, str(tmp_path / "a"), history, [2, 4],
                                 {"num_checkpoints": 2})
    assert set(runs) == {"sft", "tms"}
    assert set(runs["tms"]["wall_seconds"]) == {"harvest", "trajectories", "student", "total"}
    assert runs["sft"]["wall_seconds"]["train"] == runs["tms"]["wall_seconds"]["harvest"]
    # The harvest's weights at its end are the last snapshot of the history; the student's differ from them.
    harvest_end, student_end = runs["sft"]["weights"][4], runs["tms"]["weights"][4]
    assert any(not torch.equal(harvest_end[n], student_end[n]) for n in harvest_end)
    # The report of what the student drew from: every snapshot's trajectories, scored against the answers.
    quality = runs["tms"]["trajectory_quality"]
    assert "trajectory_quality" not in runs["sft"]
    assert sorted(quality["by_step"], key=int) == ["2", "4"]  # the harvest's two snapshots
    assert quality["all"]["n"] == 2 * len(train)
    assert all(0.0 <= q["correct"] <= 1.0 and q["kept"] == 1.0 for q in quality["by_step"].values())  # no filter
    assert quality["all"]["kept"] == 1.0
    assert 0.0 <= quality["all"]["label_copy"] <= quality["all"]["correct"]  # a copy of the label is right
    again, _, _ = training.train_run("tms_verified", regime, 0, train, pld, str(tmp_path / "b"), history, [2, 4],
                                  {"num_checkpoints": 2})
    assert set(again) == {"tms_verified"} and again["tms_verified"]["wall_seconds"]["reused_history"]
    # The verifier keeps exactly the trajectories the report counts as right (same final number as the answer).
    checked = again["tms_verified"]["trajectory_quality"]["all"]
    assert checked["n"] == quality["all"]["n"] and checked["kept"] == pytest.approx(checked["correct"])
    rehearsed, _, _ = training.train_run("tms_rehearsal_25", regime, 0, train, pld, str(tmp_path / "c"), history, [2, 4],
                                      {"num_checkpoints": 2})
    walls = rehearsed["tms_rehearsal_25"]["wall_seconds"]
    assert walls["reused_history"] and 0 < walls["rehearsal_answers"] < walls["total"]
    assert os.path.isdir(os.path.join(history, "rehearsal"))
    # TMS at a lower learning rate harvests at that rate too: its own history, not the `tms` run's.
    low, _, _ = training.train_run("tms_low_lr", regime, 0, train, pld, str(tmp_path / "d"), history, [2, 4],
                                {"num_checkpoints": 2})
    assert set(low) == {"tms_low_lr"} and {"harvest", "trajectories", "student"} <= set(low["tms_low_lr"]["wall_seconds"])
    assert sorted(low["tms_low_lr"]["weights"]) == [2, 4]


def test_a_dial_declares_one_arm_per_value_and_the_frontier_keeps_the_undominated_points():
    arms = registry.dial(registry.ARMS["tms_online"], "label_weight", [0.5, 0.9])
    assert list(arms) == ["label_weight=0.5", "label_weight=0.9"]
    assert arms["label_weight=0.9"].settings == {**registry.ARMS["tms_online"].settings, "label_weight": 0.9}
    assert all(arm.method == "tms" and not arm.in_study for arm in arms.values())
    # (forgetting, gain): b does worse than a on both, d learned nothing.
    points = {"a": (0.1, 0.5), "b": (0.2, 0.4), "c": (0.3, 0.6), "d": (0.0, 0.0)}
    assert plots.frontier(points) == [(0.1, 0.5), (0.3, 0.6)]


def test_students_on_the_tms_history_are_trained_right_after_it():
    students = [arm for arm in study.MODES["full"]["arms"] if registry.reuses_history(arm)]
    assert students == ["tms_verified", "tms_rehearsal_10", "tms_rehearsal_25"]
    assert not registry.reuses_history("tms") and not registry.reuses_history("tms_online")
    # retention.py's arms, folded in: students on the same history but for the online run.
    assert [arm for arm in study.MODES["retention"]["arms"] if registry.reuses_history(arm)] == [
        "tms_alpha0.5", "tms_curriculum", "tms_pld"]


def test_backfill_adds_the_new_probe_from_the_history_and_a_student_trained_again(tiny_study, tmp_path, monkeypatch):
    """The `sft` arm's checkpoints come from the `tms` history; `tms`'s student, trained again, equals the original."""
    import torch
    from safetensors.torch import load_file

    train, pld, regime = tiny_study
    scratch = str(tmp_path / "scratch")
    history = os.path.join(scratch, "history-zero-s0")
    runs, _, _ = training.train_run("tms", regime, 0, train, pld, str(tmp_path / "a"), history, [2, 4],
                                 {"num_checkpoints": 2})
    monkeypatch.setattr(study, "load_task", lambda task, n_train, n_test, seed=0: (train, pld))
    out = str(tmp_path / "results")
    base = checkpoint(0, 0.0, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])
    write_json_atomically(records.arm_path(out, "zero", "base", 0),
                                {"arm": "base", "regime": "zero", "seed": 0, "task": "tiny", "final": base})
    for arm in ("sft", "tms", "sft_dft"):
        write_json_atomically(records.arm_path(out, "zero", arm, 0), {
            "arm": arm, "regime": "zero", "seed": 0, "task": "tiny", "steps": 4, "wall_seconds": {"train": 1.0, "total": 1.0},
            "checkpoints": [dict(checkpoint(2, 0.0, 0.1, 5.0, 1.0, 0.1, [0, 0, 0, 0]), fraction=0.5),
                            dict(checkpoint(4, 0.0, 0.1, 5.0, 1.0, 0.1, [0, 0, 0, 0]), fraction=1.0)]})
    mode = dict(study.MODES["full"], regimes={"zero": regime}, seeds=[0], num_train=16, num_test=4, num_pld=4,
                tms_overrides={"num_checkpoints": 2})
    study.backfill(mode, "zero", ["sft", "tms", "sft_dft"], out, scratch)
    saved = records.load_arms(out)["zero"]
    assert 0 <= saved["base"][0]["final"]["ifeval_acc"] <= 1
    sft = saved["sft"][0]["checkpoints"]
    assert [c["backfilled"]["weights"] for c in sft] == ["tms history step-2", "tms history step-4"]
    assert all(len(c["items"]["ifeval"]) == 48 for c in sft)
    assert sft[1]["backfilled"]["target_items"] == 4 and "target_items_matching" not in sft[0]["backfilled"]
    tms = saved["tms"][0]["checkpoints"]
    assert "ifeval_acc" in tms[1] and "ifeval_acc" not in tms[0]
    assert tms[1]["backfilled"]["weights"] == "student trained again on the saved tms history"
    again = load_file(training.final_path(scratch, "zero", "tms", 0))
    assert set(again) == set(runs["tms"]["weights"][4])
    assert all(torch.allclose(again[n], runs["tms"]["weights"][4][n], atol=1e-6) for n in again)
    # No saved weights for the arm: left as it was, with a message.
    assert "ifeval_acc" not in saved["sft_dft"][0]["checkpoints"][-1]
    summary = report.summary(out)["regimes"]["zero"]["arms"]
    assert summary["sft"]["ifeval"]["seeds"] == 1 and "ifeval" in summary["sft_early"]
    assert "ifeval" not in summary["sft_dft"]


def test_a_regime_runs_end_to_end_into_records_and_resumes(tiny_regime, monkeypatch):
    """Base, then an arm measured at each checkpoint by the probe suite, saved as records; a rerun trains nothing."""
    mode, out, scratch = tiny_regime
    study.run_regime(mode, "zero", ["sft_dft"], out, scratch)
    saved = records.load_arms(out)["zero"]
    base = saved["base"][0]["final"]
    assert len(base["items"]["piqa"]) == len(base["items"]["siqa"]) == 3 and len(base["items"]["ifeval"]) == 48
    (record,) = saved["sft_dft"]
    assert record["settings"] == {**mode["regimes"]["zero"], "loss_type": "dft"} and record["steps"] == 4
    assert set(record["load_average"]) == {"before", "after", "threads"}
    assert record["versions"] == saved["base"][0]["versions"] == records.library_versions()
    first, last = record["checkpoints"]
    assert (first["step"], first["fraction"], last["step"], last["fraction"]) == (2, 0.5, 4, 1.0)
    assert len(last["items"]["target"]) == 4 and len(last["items"]["chat_kl"]) == 2
    assert "piqa_acc" not in first and 0 <= last["piqa_acc"] <= 1 and 0 <= last["ifeval_acc"] <= 1
    assert first["chat_kl"] > 0 and first["pld"] > 0 and first["retention_kl"] >= 0
    assert os.path.isfile(training.final_path(scratch, "zero", "sft_dft", 0))
    monkeypatch.setattr(training, "train_run", lambda *a, **k: pytest.fail("trained a finished arm again"))
    study.run_regime(mode, "zero", ["sft_dft"], out, scratch)


def test_a_tms_run_leaves_the_sft_record_measured_before_alone(tiny_regime):
    """The `tms` arm trains its harvest (`sft`) too: where `sft` was measured alone before, its record (scales and all)
    is kept rather than measured a second time."""
    mode, out, scratch = tiny_regime
    records.write_record(out, {"arm": "base", "regime": "zero", "seed": 0, "final": {"target_accuracy": 0.0}})
    earlier = {"arm": "sft", "regime": "zero", "seed": 0, "checkpoints": [], "measured_alone": True}
    records.write_record(out, earlier)
    study.run_regime(mode, "zero", ["tms"], out, scratch)
    saved = records.load_arms(out)["zero"]
    assert saved["sft"] == [earlier]
    assert [c["step"] for c in saved["tms"][0]["checkpoints"]] == [2, 4]


def test_readme_and_docs_show_the_committed_study_results():
    # After `study.py --report_only`, run `python benchmarks/study_readme.py` and commit the README and docs with it.
    import study_readme

    assert study_readme.main(["--check"]) == 0


def _arm(acc, kl, wiki, wall, seeds, shared=False):
    return {"seeds": list(range(seeds)), "target_acc": acc, "chat_kl": {"value": kl}, "wiki_nll": {"delta": wiki},
            "wall_ratio_to_sft": wall, "wall_shared": shared}


def test_readme_compact_table_shows_the_six_arms_with_every_regime_in_each_cell():
    import study_readme

    partly = {"task": "letters", "base": {"target_accuracy": 0.43}, "arms": {
        "sft": _arm(0.805, 0.716, 0.8651, 1.22, 4), "sft_early": _arm(0.80, 0.65, 0.78, 0.61, 4),
        "sft_low_lr": _arm(0.807, 0.298, 0.297, 1.09, 3), "sft_lr_x0.1": _arm(0.827, 0.120, 0.177, 1.0, 3),
        "tms": _arm(0.823, 0.442, 0.334, 4.67, 3),
        "tms_online_alpha_75": _arm(0.785, 0.132, -0.064, 3.0, 2), "grpo": _arm(0.77, 1.62, 0.79, 9.2, 1)}}
    zero = {"task": "legs", "base": {"target_accuracy": 0.0}, "arms": {
        "sft": _arm(0.57, 0.32, 0.14, 1.3, 3), "sft_low_lr": _arm(0.47, 0.19, 0.03, 1.04, 2),
        "tms": _arm(0.37, 0.28, 0.06, 4.4, 3, shared=True), "tms_online_alpha_75": _arm(0.47, 0.11, -0.04, 3.04, 2)}}
    gemma = {"task": "letters", "base": {"target_accuracy": 0.55}, "arms": {
        "sft": _arm(0.83, 5.447, 6.41, 1.0, 1)}}
    block = study_readme.compact({"regimes": {"zero": zero, "gemma": gemma, "partly": partly}})
    lines = block.splitlines()
    assert lines[0].startswith(study_readme.COMPACT_START) and lines[-1] == study_readme.COMPACT_END
    assert ("Each cell: partly solved, the paper's situation (`letters`, base accuracy 0.43) / learned from zero "
            "(`legs`, base accuracy 0.00) / Gemma-3-270M base, partly solved (`letters`, base accuracy 0.55).") in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| arm |")]
    # The regimes in COMPACT_REGIMES' order whatever summary.json's; an arm missing from a regime shows "-" there;
    # GRPO is not one of the six; a wall that is the same in every regime is written once.
    assert rows == [
        "| plain SFT | 0.81 / 0.57 / 0.83 | 0.72 / 0.32 / 5.45 | +0.87 / +0.14 / +6.41 | 1x | 4 / 3 / 1 |",
        "| SFT at a fifth of the learning rate | 0.81 / 0.47 / - | 0.30 / 0.19 / - | +0.30 / +0.03 / - | 1.1x / 1.0x / - "
        "| 3 / 2 / - |",
        "| SFT at a tenth of the learning rate | 0.83 / - / - | 0.12 / - / - | +0.18 / - / - | 1.0x / - / - | 3 / - / - |",
        "| SFT stopped at half its steps | 0.80 / - / - | 0.65 / - / - | +0.78 / - / - | 0.5x / - / - | 4 / - / - |",
        '| TMS, paper defaults (`recipe="paper"`) | 0.82 / 0.37 / - | 0.44 / 0.28 / - | +0.33 / +0.06 / - | 4.7x / 4.4x '
        "(shared) / - | 3 / 3 / - |",
        "| **online TMS, alpha 0.75 (the default recipe at T = 10)** | 0.79 / 0.47 / - | 0.13 / 0.11 / - | -0.06 / -0.04 / - "
        "| 3.0x / 3.0x / - | 2 / 2 / - |",
    ]
    assert study_readme.SHARED_NOTE in lines
    # One regime only: one value per cell, no footnote without a shared wall.
    alone = study_readme.compact({"regimes": {"partly": partly}})
    assert "| plain SFT | 0.81 | 0.72 | +0.87 | 1x | 4 |" in alone and study_readme.SHARED_NOTE not in alone
    with pytest.raises(SystemExit, match="none of the regimes"):
        study_readme.compact({"regimes": {"other": zero}})


def test_readme_shows_the_compact_table_and_results_page_the_full_headline_tables():
    import study_readme

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(root, "docs", "results.md"), encoding="utf-8") as f:
        results = f.read()
    block = readme[readme.index(study_readme.COMPACT_START):readme.index(study_readme.COMPACT_END)]
    rows = [line.split(" | ")[0][2:] for line in block.splitlines() if line.startswith("| ")]
    assert rows == ["arm"] + list(study_readme.COMPACT_LABELS.values())
    assert study_readme.START not in readme and readme.count(study_readme.COMPACT_START) == 1
    headline = results[results.index(study_readme.START):results.index(study_readme.END)]
    assert "**Partly solved (the paper's situation)**" in headline and "**Learn from zero**" in headline
    assert study_readme.REGIME_TITLES["gemma"] in headline
    assert "\\* Estimated:" in headline and "(shared): no run of the arm" in headline


def test_readme_check_fails_when_the_readme_or_the_results_page_is_stale(tmp_path, monkeypatch, capsys):
    import study_readme

    root = os.path.join(os.path.dirname(__file__), "..")
    os.makedirs(tmp_path / "docs")
    for name in ("README.md", os.path.join("docs", "results.md")):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            (tmp_path / name).write_text(f.read(), encoding="utf-8")
    monkeypatch.setattr(study_readme, "ROOT", str(tmp_path))
    assert study_readme.main(["--check"]) == 0
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    (tmp_path / "README.md").write_text(readme.replace("| plain SFT | 0.81 /", "| plain SFT | 0.79 /"), "utf-8")
    results = (tmp_path / "docs" / "results.md").read_text(encoding="utf-8")
    (tmp_path / "docs" / "results.md").write_text(results.replace("| plain SFT | 4 | 0.81 |", "| plain SFT | 4 | 0.7 |"),
                                                  "utf-8")
    capsys.readouterr()
    assert study_readme.main(["--check"]) == 1
    assert capsys.readouterr().out.strip() == f"out of date: README.md, {os.path.join('docs', 'results.md')}"
    assert study_readme.main([]) == 0 and study_readme.main(["--check"]) == 0
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == readme
    assert (tmp_path / "docs" / "results.md").read_text(encoding="utf-8") == results
    assert sorted(os.listdir(tmp_path)) == ["README.md", "docs"]


def test_readme_refresh_replaces_only_the_marked_block_and_refuses_a_readme_without_markers():
    import study_readme

    text = "intro\n<!-- study-headline: old -->\nold table\n<!-- /study-headline -->\noutro\n"
    assert study_readme.replace_block(text, "<!-- study-headline -->\nnew\n<!-- /study-headline -->") == (
        "intro\n<!-- study-headline -->\nnew\n<!-- /study-headline -->\noutro\n")
    with pytest.raises(SystemExit, match="add the two markers"):
        study_readme.replace_block("no markers here", "x")
    docs = "### Regime `zero` (task)\n\n| a |\n|---|\n| 1 |\n\nprose stays\n"
    assert study_readme.sync_docs(docs, {"zero": "| a |\n|---|\n| 2 |\n"}) == (
        "### Regime `zero` (task)\n\n| a |\n|---|\n| 2 |\n\nprose stays\n")
    # The trajectory-quality table, under its own heading (the regime's main table is not touched by it).
    # Prose between a heading and its table (the versions line) is skipped.
    study_md = ("## Regime `zero` (x)\n\nMeasured under (records): not recorded (3)\n\n| a |\n|---|\n| 3 |\n\n"
                "What the TMS students drew from (regime `zero`; y):"
                "\n\n| q |\n|---|\n| 4 |\n")
    tables = study_readme.regime_tables(study_md)
    assert tables == {"zero": "| a |\n|---|\n| 3 |\n", ("zero", "quality"): "| q |\n|---|\n| 4 |\n"}
    docs = docs + "#### What the TMS students drew from (regime `zero`)\n\n| q |\n|---|\n| 0 |\n"
    assert study_readme.sync_docs(docs, tables) == (
        "### Regime `zero` (task)\n\n| a |\n|---|\n| 3 |\n\nprose stays\n"
        "#### What the TMS students drew from (regime `zero`)\n\n| q |\n|---|\n| 4 |\n")
    with pytest.raises(SystemExit, match="What the TMS students drew from"):
        study_readme.sync_docs("### Regime `zero` (task)\n\n| a |\n", tables)
    with pytest.raises(SystemExit, match="no table under the heading of regime"):
        study_readme.regime_tables("## Regime `zero` (x)\n\nno table\n")


def test_frontier_mode_measures_scales_and_task_kl_and_adds_scales_to_an_older_record(tiny_study, tmp_path, monkeypatch):
    """Issue #44: a scaled arm's record holds its final adapter at each scale (scale 1 is the final checkpoint), every
    checkpoint the KL on training prompts; an older record without scales gets them by training the arm again."""
    from harness import probes

    train, pld, regime = tiny_study
    monkeypatch.setattr(study, "load_task", lambda task, n_train, n_test, seed=0: (train, pld))
    follow = probes.instruction_following
    monkeypatch.setattr(probes, "instruction_following", lambda model, tok: follow(model, tok, max_new_tokens=4))
    mode = dict(study.MODES["frontier"], regimes={"zero": regime}, num_train=16, num_test=4, num_pld=4, mc_items=3,
                wiki_items=6, chat_prompts=2, chat_tokens=4, checkpoints=2, seeds=[0], scales=[0.0, 0.5, 1.0],
                train_kl_prompts=3)
    out, scratch = str(tmp_path / "results"), str(tmp_path / "scratch")
    os.makedirs(scratch)
    study.run_regime(mode, "zero", ["sft_lr_x0.5"], out, scratch)
    (record,) = records.load_arms(out)["zero"]["sft_lr_x0.5"]
    assert record["settings"]["lr_scale"] == 0.5
    zero, half, whole = record["scaled"]
    assert [s["scale"] for s in record["scaled"]] == [0.0, 0.5, 1.0]
    final = record["checkpoints"][-1]
    # Scale 1 is the adapter as trained, scale 0 the base model (no drift at all).
    assert whole["items"]["target"] == final["items"]["target"]
    assert whole["chat_kl"] == pytest.approx(final["chat_kl"], rel=1e-4)
    assert zero["chat_kl"] == pytest.approx(0.0, abs=1e-5) and zero["train_kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < half["chat_kl"] < whole["chat_kl"]
    assert all(len(c["items"]["train_kl"]) == 3 and c["train_kl"] > 0 for c in record["checkpoints"])

    # A record written before the scales existed: the arm is trained again (same seed, same weights).
    del record["scaled"]
    records.write_record(out, record)
    os.remove(training.final_path(scratch, "zero", "sft_lr_x0.5", 0))
    study.run_regime(mode, "zero", ["sft_lr_x0.5"], out, scratch)
    (again,) = records.load_arms(out)["zero"]["sft_lr_x0.5"]
    assert again["scaled_weights"] == {"source": "trained again with the same seed", "target_items_matching": 4,
                                       "target_items": 4, "versions": records.library_versions()}
    assert [s["chat_kl"] for s in again["scaled"]] == pytest.approx([s["chat_kl"] for s in (zero, half, whole)], rel=1e-4)
    monkeypatch.setattr(training, "train_run", lambda *a, **k: pytest.fail("trained a finished arm again"))
    study.run_regime(mode, "zero", ["sft_lr_x0.5"], out, scratch)


def test_curves_gather_each_methods_points_and_compare_tms_with_the_cheap_alternatives(tmp_path):
    """Hand-made records: the points of each method (finals, checkpoints, scales), its frontier and the ratio."""
    from harness import curves

    base = checkpoint(0, 0.2, 0.0, 5.0, 2.0, 0.0, [0, 0, 0, 0])

    def record(arm, seed, points, scaled=()):
        cps = [dict(checkpoint(step, acc, kl, 5.0 + wiki, 1.0, 0.1, [0] * 4), fraction=step / 8)
               for step, acc, kl, wiki in points]
        return {"arm": arm, "seed": seed, "checkpoints": cps,
                "scaled": [dict(checkpoint(8, acc, kl, 5.0 + wiki, 1.0, 0.1, [0] * 4), scale=s)
                           for s, acc, kl, wiki in scaled]}

    by_arm = {
        "sft": [record("sft", seed, [(4, 0.5, 0.3, 0.2), (8, 0.8 + 0.02 * seed, 0.6, 0.4)],
                       [(0.5, 0.6, 0.2, 0.1)]) for seed in (0, 1)],
        "sft_low_lr": [record("sft_low_lr", 0, [(4, 0.3, 0.05, 0.0), (8, 0.6, 0.3, 0.1)])],
        "tms_online_alpha_75": [record("tms_online_alpha_75", seed, [(4, 0.5, 0.05, 0.0), (8, 0.79, 0.15, -0.05)])
                                for seed in (0, 1)],
    }
    cheap = [p for name in ("SFT: learning rate", "SFT: stop early", "SFT: adapter scale")
             for p in curves.method_points(by_arm, base, registry.METHODS[name], "chat_kl")]
    labels = sorted({p.label for p in cheap})
    assert labels == ["sft", "sft @fraction 0.5", "sft @scale 0.5", "sft_low_lr", "sft_low_lr @fraction 0.5"]
    final_sft = next(p for p in cheap if p.label == "sft")
    assert final_sft.gain == pytest.approx([0.6, 0.62]) and final_sft.drift == [0.6, 0.6]
    result = curves.frontiers(by_arm, base, samples=200)
    assert result["reference"]["gain"] == pytest.approx(0.61)
    assert result["levels"]["0.9x"] == pytest.approx(0.549)
    assert "paper TMS" not in result["methods"] and "paper TMS" not in result["ratios"]
    # Cheap alternatives' envelope: (0, 0) -> (0.05, 0.1) -> (0.2, 0.4) -> (0.6, 0.61); TMS: (0.05, 0.3) -> (0.15, 0.59).
    need_cheap = result["methods"][registry.CHEAP]["chat_kl"]["needed"]["0.9x"]["drift"]
    need_tms = result["methods"]["online TMS"]["chat_kl"]["needed"]["0.9x"]["drift"]
    assert need_cheap == pytest.approx(0.2 + 0.4 * (0.549 - 0.4) / 0.21)
    assert need_tms == pytest.approx(0.05 + 0.1 * (0.549 - 0.3) / 0.29)
    assert result["ratios"]["online TMS"]["chat_kl"]["0.9x"]["ratio"] == pytest.approx(need_tms / need_cheap)
    # In WikiText change the final checkpoint (-0.05, 0.59) beats the half-way one (0.0, 0.3) on both.
    assert [p["label"] for p in result["methods"]["online TMS"]["wikitext"]["front"]] == ["tms_online_alpha_75"]
    table = "\n".join(curves.frontier_table("zero", result))
    assert "| online TMS | 2 |" in table and "not reached" in table  # two points; it never reaches 1x SFT's gain
    # A level TMS never reaches has no ratio (not "not reached", which the table above says of a method's own points).
    assert result["ratios"]["online TMS"]["chat_kl"]["1x"]["ratio"] is None
    ratio_row = next(line for line in table.splitlines() if line.startswith("| online TMS |") and "no ratio" in line)
    assert "not reached" not in ratio_row
    # The points each level's drift is read between, with fewer than three seeds: the cheap curve's (0.2, 0.4) and
    # (0.6, 0.61), TMS's two, and `sft_low_lr` (one seed), which is on the learning-rate and stop-early curves' segments
    # at 0.8x and 0.9x; `sft_low_lr @fraction 0.5` is on the cheap front but decides no level.
    cheap_front = result["methods"][registry.CHEAP]["chat_kl"]["front"]
    assert [p["label"] for p in cheap_front if p["decides"]] == ["sft @scale 0.5", "sft"]
    assert [p["label"] for p in cheap_front if not p["decides"]] == ["sft_low_lr @fraction 0.5"]
    few = next(line for line in table.splitlines() if line.startswith("Frontier points that decide a level"))
    assert "`sft` (2), `sft @scale 0.5` (2)" in few and "`sft_low_lr` (1)" in few
    assert "`tms_online_alpha_75` (2), `tms_online_alpha_75 @fraction 0.5` (2)" in few
    assert "`sft_low_lr @fraction 0.5`" not in few


def test_the_screen_measures_learnability_in_its_window_or_for_the_tasks_named(tmp_path, monkeypatch):
    """Gemma's one partly solved task sat just above the window (0.55): naming it measures it anyway."""
    rows = {"low": {"base_accuracy": 0.05}, "mid": {"base_accuracy": 0.3}, "high": {"base_accuracy": 0.55},
            "done": {"base_accuracy": 0.3, "sft_accuracy": 0.9}}
    write_json_atomically(str(tmp_path / "screen.json"), rows)
    trained = []
    monkeypatch.setattr(study, "task_splits", lambda regime, n_train, n_test: (regime["task"], FakeSplit()))
    monkeypatch.setattr(training, "train_run", lambda arm, regime, seed, train, *a: trained.append(train) or
                        (None, train, None))
    monkeypatch.setattr(study.probes, "target_accuracy", lambda model, *a, **k: {"accuracy": 0.8, "texts": [model]})

    def measured(only):
        write_json_atomically(str(tmp_path / "screen.json"), rows)
        trained.clear()
        result = study.learnability(str(tmp_path), 4, only=only)
        return trained[:], {k: v.get("sft_accuracy") for k, v in result.items()}

    assert measured(None) == (["mid"], {"low": None, "mid": 0.8, "high": None, "done": 0.9})
    assert measured(["high"]) == (["high"], {"low": None, "mid": None, "high": 0.8, "done": 0.9})
    assert measured(["-"])[0] == []  # `--screen_learn none`


class FakeSplit:
    def select(self, indices):
        return self
