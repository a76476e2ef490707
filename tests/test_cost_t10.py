"""The T = 10 cost benchmark (benchmarks/cost_t10.py) on a tiny model: its arms train, time their phases and report."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import cost_t10  # noqa: E402
from harness import tasks, training  # noqa: E402
from harness.registry import Arm  # noqa: E402


@pytest.fixture
def tiny_cost(monkeypatch, tiny_llama):
    from conftest import load_tokenizer, make_examples
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(training, "load_model", lambda: (AutoModelForCausalLM.from_pretrained(tiny_llama),
                                                         load_tokenizer(tiny_llama)))
    train, test = make_examples(16, seed=0), make_examples(8, seed=1)
    monkeypatch.setattr(tasks, "load_task", lambda task, n_train, n_test, seed=0: (train, test))
    monkeypatch.setattr(cost_t10, "REGIME", dict(task="tiny", lora_r=4, learning_rate=1e-2, epochs=2))
    monkeypatch.setattr(cost_t10, "TASK_TOKENS", 6)
    monkeypatch.setattr(cost_t10, "NUM_PLD", 4)
    # 4 optimizer steps allow at most 4 snapshots (the benchmark's T = 10 needs 10 steps).
    monkeypatch.setattr(cost_t10, "ARMS", {name: arm if arm.method == "sft" else
                                           Arm(arm.method, {**arm.settings, "num_checkpoints": 2})
                                           for name, arm in cost_t10.ARMS.items()})


@pytest.mark.parametrize("arm", ["sft", "tms", "tms_online_quiet"])
def test_each_kind_of_arm_trains_the_same_steps_and_times_its_phases(tiny_cost, tmp_path, arm):
    record = cost_t10.run_arm(arm, str(tmp_path))
    assert record["steps"] == 4  # 16 prompts, batch 8, 2 epochs: every arm the same optimizer steps
    assert record["wall_seconds"] > 0 and record["train_peak_rss_mb"] > 0
    if arm == "sft":
        assert record["train"] > 0 and "trajectories" not in record
    elif arm == "tms":
        assert record["harvest"] > 0 and record["student"] > 0 and record["trajectories"] >= 0
        # Drawn only: fewer pairs sampled than the 16 prompts x 4 snapshots (at alpha = 0.25 over 2 epochs).
        assert 0 < record["trajectories_sampled"] < record["trajectories_sampled"] + record["trajectories_not_sampled"]
        assert record["pld_seconds"] > 0 and record["retention_seconds"] > 0  # the live signals are on by default
    else:
        assert record["online"] > 0 and record["trajectories_sampled"] > 0
        assert record["pld_seconds"] == 0 and record["retention_seconds"] == 0


def test_report_divides_by_the_sft_arm_and_needs_one(tmp_path, capsys):
    arms = tmp_path / "arms"
    arms.mkdir()
    load = {"before": 0.5, "after": 1.5, "threads": 2}
    (arms / "tms.json").write_text(json.dumps({
        "arm": "tms", "wall_seconds": 250.0, "harvest": 100.0, "trajectories": 40.0, "student": 100.0,
        "trajectories_sampled": 150, "trajectories_not_sampled": 490, "pld_seconds": 5.0, "retention_seconds": 3.0,
        "train_peak_rss_mb": 1100.0, "load_average": load}))
    assert "ratios" not in cost_t10.report(str(tmp_path))
    assert "No `sft` arm" in capsys.readouterr().out
    (arms / "sft.json").write_text(json.dumps({"arm": "sft", "wall_seconds": 100.0, "train": 100.0,
                                               "train_peak_rss_mb": 1000.0, "load_average": load}))
    result = cost_t10.report(str(tmp_path))
    assert result["ratios"]["tms"] == {"wall_over_sft": pytest.approx(2.5), "train_peak_rss_over_sft": pytest.approx(1.1)}
    table = (tmp_path / "cost_t10.md").read_text()
    assert "| tms | 250 s | 2.50 | harvest 100 s, trajectories 40 s, student 100 s; PLD 5 s, meter 3 s | 150 of 640 |" in table
    assert json.loads((tmp_path / "cost_t10.json").read_text())["ratios"]["sft"]["wall_over_sft"] == 1.0


def test_the_memory_arm_sizes_its_generation_calls_by_the_budget(tiny_cost, tmp_path):
    from trl_tms.generation import generation_bytes_per_row

    record = cost_t10.run_arm("tms_memory", str(tmp_path), generation_memory_mb=0.05)
    assert record["generation_memory_mb"] == 0.05 and record["steps"] == 4
    assert 2 <= record["rows_per_call"] < 64  # fewer than the other arms' 64 rows, at least one prompt's two snapshots
    model, _ = training.load_model()
    # The longest tiny prompt is a dozen tokens: the rows that fit, at 6 new tokens each, bound those used.
    assert record["rows_per_call"] <= 0.05 * 2**20 // generation_bytes_per_row(model, 1, cost_t10.TASK_TOKENS)


def test_the_online_arms_keep_the_t_they_were_measured_at():
    """Their committed records ran at T = 10, the default in every mode then; online TMS now defaults to 5."""
    from trl_tms import TMSConfig

    for name in ("tms_online", "tms_online_quiet"):
        settings = dict(cost_t10.ARMS[name].settings)
        args = TMSConfig("out", use_cpu=True, report_to="none", **settings)
        assert (args.tms_mode, args.num_checkpoints, args.label_weight) == ("online", 10, 0.25)
