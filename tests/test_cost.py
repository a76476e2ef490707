"""The cost breakdown benchmark (benchmarks/cost.py): its arithmetic on hand-made numbers, its arms on a tiny model."""

import json
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import cost  # noqa: E402
from harness import tasks, training  # noqa: E402

from trl_tms.mixture import IS_LABEL  # noqa: E402

LOAD = {"before": 0.5, "after": 1.0, "threads": 2}


def test_a_step_is_split_by_the_tokens_of_its_label_and_other_rows():
    assert cost.split_step(2.0, 30, 10) == pytest.approx((1.5, 0.5))
    assert cost.split_step(2.0, 0, 40) == (0.0, 2.0)
    assert cost.split_step(2.0, 0, 0) == (2.0, 0.0)  # nothing counted: labels, as a plain SFT step
    steps = [dict(seconds=2.0, label_tokens=30, other_tokens=10), dict(seconds=1.0, label_tokens=10, other_tokens=10)]
    assert cost.training_seconds(steps) == pytest.approx({"label_training": 2.0, "trajectory_training": 1.0})


def test_breakdown_divides_every_part_by_the_sft_wall_and_leaves_the_rest_to_other():
    parts = {"label_training": 80.0, "trajectory_training": 60.0, "generation": 90.0, "plan": 20.0, "pld": 0.0,
             "meter": 10.0, "snapshots": 5.0}
    record = {"wall_seconds": 300.0, "seconds": parts}
    fractions = cost.breakdown(record, sft_wall=100.0)
    assert fractions == pytest.approx({"label_training": 0.8, "trajectory_training": 0.6, "generation": 0.9,
                                       "plan": 0.2, "pld": 0.0, "meter": 0.1, "snapshots": 0.05,
                                       "other": 0.35, "total": 3.0})
    # The parts and the remainder add up to the total.
    assert sum(v for k, v in fractions.items() if k != "total") == pytest.approx(fractions["total"])
    # The sft arm: training only, its parts missing count 0.
    sft = cost.breakdown({"wall_seconds": 100.0, "seconds": {"label_training": 90.0, "trajectory_training": 0.0}},
                         sft_wall=100.0)
    assert sft["label_training"] == pytest.approx(0.9) and sft["other"] == pytest.approx(0.1) and sft["total"] == 1.0
    with pytest.raises(ValueError, match="must be positive"):
        cost.breakdown(record, sft_wall=0.0)


def test_the_step_timer_counts_the_non_padding_tokens_of_label_and_other_rows():
    timer = cost.StepTimer()
    timer.on_step_begin(None, None, None)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    timer.count({"attention_mask": mask, IS_LABEL: torch.tensor([1.0, 0.0, 1.0])})
    timer.count({"attention_mask": mask[:1]})  # a batch without flags (the harvest's, SFT's): all labels
    timer.on_step_end(None, None, None)
    (step,) = timer.steps
    assert (step["label_tokens"], step["other_tokens"], step["padded_tokens"]) == (3 + 2 + 3, 4, 12 + 4)
    assert step["seconds"] >= 0 and timer.current is None


def record(arm, wall, **seconds):
    return {"arm": arm, "wall_seconds": wall, "seconds": seconds, "load_average": LOAD}


def test_report_writes_the_table_json_and_caption_and_needs_the_sft_arm(tmp_path, capsys):
    arms = tmp_path / "arms"
    arms.mkdir()
    (arms / "online.json").write_text(json.dumps(record("online", 250.0, label_training=100.0, trajectory_training=50.0,
                                                        generation=60.0, plan=10.0, meter=5.0, snapshots=5.0)))
    assert "breakdown" not in cost.report(str(tmp_path))
    assert "No `sft` arm" in capsys.readouterr().out
    (arms / "sft.json").write_text(json.dumps(record("sft", 100.0, label_training=95.0, trajectory_training=0.0)))
    result = cost.report(str(tmp_path))
    assert result["breakdown"]["online"]["total"] == pytest.approx(2.5)
    assert result["breakdown"]["online"]["other"] == pytest.approx(0.2)
    markdown = (tmp_path / "cost.md").read_text()
    assert "| online | 250 s | 2.50 | 1.00 | 0.50 | 0.60 | 0.10 | 0.00 | 0.05 | 0.05 | 0.20 |" in markdown
    assert "| sft | 100 s | 1.00 | 0.95 | 0.00 |" in markdown
    assert cost.CAPTION in markdown and "online 0.5 / 1.0" in markdown
    assert json.loads((tmp_path / "cost.json").read_text())["breakdown"]["sft"]["total"] == 1.0


def test_main_trains_only_the_arms_not_saved_and_never_reuses_a_smoke_arm(tmp_path, monkeypatch):
    trained = []

    def fake_run(command, **kwargs):
        arm = command[command.index("--arm") + 1]
        trained.append((arm, "--smoke" in command))
        line = json.dumps({**record(arm, 10.0, label_training=9.0), "smoke": "--smoke" in command})
        return types.SimpleNamespace(stdout="log line\n" + line + "\n")

    monkeypatch.setattr(cost.subprocess, "run", fake_run)
    out = str(tmp_path)
    cost.main(["--arms", "sft,online", "--output_dir", out, "--smoke"])
    cost.main(["--arms", "sft,online,two_pass", "--output_dir", out, "--smoke"])
    assert trained == [("sft", True), ("online", True), ("two_pass", True)]  # the saved arms were kept
    cost.main(["--arms", "sft", "--output_dir", out])  # a real run trains again what only a smoke run saved
    assert trained[-1] == ("sft", False)
    with pytest.raises(SystemExit):
        cost.main(["--arms", "sft,nope", "--output_dir", out])


@pytest.fixture
def tiny_cost(monkeypatch, tiny_llama):
    from conftest import load_tokenizer, make_examples
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(training, "load_model", lambda: (AutoModelForCausalLM.from_pretrained(tiny_llama),
                                                         load_tokenizer(tiny_llama)))
    train, test = make_examples(16, seed=0), make_examples(8, seed=1)
    monkeypatch.setattr(tasks, "load_task", lambda task, n_train, n_test, seed=0: (train, test))
    # 16 prompts, batch 8, 2 epochs: 4 optimizer steps, room for T = 2.
    monkeypatch.setattr(cost, "SMOKE", dict(regime=dict(task="tiny", lora_r=4, learning_rate=1e-2, epochs=2),
                                            num_train=16, num_pld=4, task_tokens=6, generation_batch_size=64,
                                            num_checkpoints=2))


@pytest.mark.parametrize("arm", ["sft", "online", "two_pass", "online_pld"])
def test_each_arm_trains_the_same_steps_and_times_its_parts(tiny_cost, tmp_path, arm):
    record = cost.run_arm(arm, str(tmp_path), smoke=True)
    seconds, tokens = record["seconds"], record["tokens"]
    # Every arm the same optimizer steps; a two-pass run's harvest and student each take them.
    assert record["steps"] == 4 and record["smoke"] is True
    assert seconds["label_training"] > 0 and tokens["label"] > 0
    assert tokens["padded"] >= tokens["label"] + tokens["other"]
    assert sum(seconds.values()) < record["wall_seconds"]  # the parts are disjoint pieces of the wall time
    if arm == "sft":
        assert seconds["trajectory_training"] == 0 and tokens["other"] == 0 and "generation" not in seconds
        return
    # TMS: some rows of the batches were trajectories, generated by the trainer; snapshots were taken; the meter ran.
    assert seconds["trajectory_training"] > 0 and tokens["other"] > 0
    assert seconds["generation"] > 0 and record["trajectories_sampled"] > 0
    assert seconds["generation"] + seconds["plan"] == pytest.approx(record["trajectory_seconds"])
    assert seconds["snapshots"] > 0 and seconds["meter"] > 0
    # PLD is off by default; the `online_pld` arm asks for it.
    assert (seconds["pld"] > 0) == (arm == "online_pld")


def study_record(arm, seed, target, chat):
    return {"arm": arm, "regime": "partly", "seed": seed,
            "checkpoints": [{"step": 32, "target_accuracy": sum(target) / len(target), "chat_kl": sum(chat) / len(chat),
                             "wikitext_nll": 1.0, "items": {"target": target, "chat_kl": chat, "wikitext": [1.0, 1.0]}}]}


def test_paired_difference_is_seed_by_seed_over_shared_items_and_combines_the_errors():
    old = [study_record("old", 0, [1, 0, 1, 0], [0.1, 0.2]), study_record("old", 1, [1, 1, 0, 0], [0.3, 0.3]),
           study_record("old", 2, [0, 0, 0, 0], [0.0, 0.0])]  # a seed the new arm lacks: left out
    new = [study_record("new", 0, [1, 1, 1, 0], [0.1, 0.4]), study_record("new", 1, [1, 1, 0, 0], [0.2, 0.2])]
    result = cost.paired_difference(new, old, "target_accuracy", "target")
    assert [p["seed"] for p in result["seeds"]] == [0, 1]
    assert [p["difference"] for p in result["seeds"]] == pytest.approx([0.25, 0.0])
    # Seed 0: item differences [0, 1, 0, 0]: sample sd 0.5, so SE 0.5 / sqrt(4) = 0.25.
    assert result["seeds"][0]["se"] == pytest.approx(0.25)
    assert result["seeds"][1]["se"] == pytest.approx(0.0)
    assert result["difference"] == pytest.approx(0.125)
    assert result["se"] == pytest.approx((0.25**2 + 0.0) ** 0.5 / 2)
    assert (result["new"], result["old"]) == pytest.approx((0.625, 0.5))
    chat = cost.paired_difference(new, old, "chat_kl", "chat_kl")
    assert chat["difference"] == pytest.approx(((0.25 - 0.15) + (0.2 - 0.3)) / 2)
    with pytest.raises(ValueError, match="No seed measured in both arms"):
        cost.paired_difference([study_record("new", 5, [1], [0.1])], old, "target_accuracy", "target")
    with pytest.raises(ValueError, match="4 items against 3"):
        cost.paired_difference([study_record("new", 0, [1, 1, 1, 0], [0.1, 0.4])],
                               [study_record("old", 0, [1, 1, 1], [0.1, 0.4])], "target_accuracy", "target")


def test_the_accuracy_check_writes_its_table_from_the_study_records(tmp_path, capsys):
    from harness.records import write_record

    study = tmp_path / "study"
    write_record(str(study), study_record(cost.CHECK["old"], 0, [1, 0, 1, 0], [0.1, 0.2]))
    write_record(str(study), study_record(cost.CHECK["old"], 1, [1, 0, 0, 0], [0.1, 0.2]))
    assert cost.accuracy_check(str(study), str(tmp_path)) is None  # no new arm run yet: says how
    assert "--arms recipe_t10,recipe_t5,recipe_budget --seeds 0,1" in capsys.readouterr().out
    new = cost.CHECK["new"][1]
    for seed in (0, 1):
        write_record(str(study), study_record(new, seed, [1, 1, 1, 0], [0.1, 0.2]))
    results = cost.accuracy_check(str(study), str(tmp_path))
    assert list(results) == [new]  # only the arms measured
    target = results[new]["target accuracy"]
    assert target["difference"] == pytest.approx((0.25 + 0.5) / 2)
    assert target["old_seed_range"] == pytest.approx(0.25)
    assert results[new]["chat KL"]["difference"] == pytest.approx(0.0)
    text = (tmp_path / "accuracy_check.md").read_text()
    assert f"## `{new}` (seeds 0, 1)" in text
    assert "| target accuracy | 0.375 | 0.750 | +0.375 |" in text
    assert "| 0.250 |\n" in text  # the target's seed range, in the last column
    assert list(json.loads((tmp_path / "accuracy_check.json").read_text())["result"]) == [new]


def test_other_cpu_counts_a_busy_process_that_is_not_waited_for():
    import subprocess
    import sys
    import time

    from harness.measure import OtherCPU, busy_cpu_seconds

    if busy_cpu_seconds() is None:
        pytest.skip("no /proc/stat here")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the interpreter is up and spinning
        with OtherCPU() as others:
            time.sleep(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert others.cores > 0.6  # one spinning core (more if anything else ran), this process asleep


def test_the_report_marks_arms_that_shared_the_machine():
    records = {"sft": {"other_cores": 0.02}, "online": {"other_cores": 0.45}, "two_pass": {}}
    assert cost.contended(records) == ["online (0.45)"]
