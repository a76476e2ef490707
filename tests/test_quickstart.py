"""The README's main job and its side-by-side comparison, on a tiny model (fields and values, not timings)."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_tms import TMSConfig, TMSTrainer
from trl_tms.probes.comparison import ARMS, ArmProbe, compare_sft_and_tms
from trl_tms.history import adapter_parameters

pytest.importorskip("reasoning_gym")


def heldout(n=6):
    examples = make_examples(n, seed=3)
    return examples.add_column("answer", [str(i % 2) for i in range(n)])


def tms_trainer(path, tmp_path, **overrides):
    config = TMSConfig(
        recipe="paper",
        output_dir=str(tmp_path / "out"), num_checkpoints=2, max_new_tokens=8, per_device_train_batch_size=4,
        learning_rate=5e-2, logging_steps=1, pld_num_samples=4, **QUIET_CPU, **overrides,
    )
    return TMSTrainer(
        model=path, args=config, train_dataset=make_examples(16), eval_dataset=make_examples(4, seed=1),
        processing_class=load_tokenizer(path), peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )


def test_comparison_measures_base_sft_and_student(tiny_llama, tmp_path):
    trainer = tms_trainer(tiny_llama, tmp_path)
    trainer.train()
    student = {k: v.detach().clone() for k, v in adapter_parameters(trainer.model, "default").items()}
    texts = ["one two three four five", "the answer is six seven .", "hello world yes no"]
    probe = ArmProbe(trainer.model, trainer.processing_class, heldout(), lambda text, answer: answer == "1",
                     answer_tokens=6, general_prompts=["what is one plus two ?", "hello world"], chat_tokens=6,
                     wikitext=texts)
    comparison = compare_sft_and_tms(trainer, probe, wall_seconds={"sft": 1.0, "tms": 3.0})

    assert list(comparison.arms) == list(ARMS)
    for result in comparison.arms.values():
        assert len(result.correct) == len(result.answers) == 6
        assert result.accuracy == 0.5  # the verifier accepts the odd items whatever the text
        assert len(result.chat_kl) == 2 and len(result.wikitext_nll) == 3
    assert comparison.arms["base"].chat_kl == [0.0, 0.0]  # the base is the KL's reference
    sft, tms = comparison.arms["sft"], comparison.arms["tms"]
    assert all(kl > 0 for kl in sft.chat_kl + tms.chat_kl)
    assert sft.chat_kl != tms.chat_kl and sft.wikitext_nll != tms.wikitext_nll
    # The student's weights are back after the SFT arm borrowed the adapter.
    live = adapter_parameters(trainer.model, "default")
    assert all(torch.equal(live[k], v) for k, v in student.items())
    # Measuring the student again gives the same numbers: the comparison left the model as it found it.
    again = probe.measure("tms")
    torch.testing.assert_close(torch.tensor(again.chat_kl), torch.tensor(tms.chat_kl))
    # The SFT arm is the harvest's final snapshot: measured on its own, it gives the same drift.
    trainer.history.load_into(trainer.model, trainer.history.steps[-1], "default")
    torch.testing.assert_close(torch.tensor(probe.measure("sft").chat_kl), torch.tensor(sft.chat_kl))

    gain, se = comparison.change("tms", "chat_kl")
    assert gain == pytest.approx(sum(tms.chat_kl) / 2) and se >= 0
    table = comparison.table()
    assert "plain SFT (the harvest)" in table and "TMS minus SFT" in table and "6 held-out problems" in table
    assert comparison.example["prompt"] in probe.general_prompts
    assert set(comparison.example) >= {"rule", "base", "sft", "tms"}
    saved = json.loads(json.dumps(comparison.to_dict()))
    assert saved["arms"]["sft"]["accuracy"] == 0.5 and saved["wall_seconds"] == {"sft": 1.0, "tms": 3.0}
    d_kl, d_kl_se = comparison.tms_minus_sft("chat_kl")
    assert d_kl == pytest.approx(sum(tms.chat_kl) / 2 - sum(sft.chat_kl) / 2) and d_kl_se >= 0


def test_comparison_needs_a_two_pass_run(tiny_llama, tmp_path):
    trainer = tms_trainer(tiny_llama, tmp_path, tms_mode="online")
    probe = ArmProbe(trainer.model, trainer.processing_class, heldout(), lambda t, a: False, answer_tokens=4)
    with pytest.raises(ValueError, match="two_pass"):
        compare_sft_and_tms(trainer, probe)


def test_main_job_summary_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    from trl_tms.quickstart import parse_args, run

    args = parse_args([
        "--output_dir", str(tmp_path / "qs"), "--num_train", "8", "--num_test", "4", "--num_pld", "2",
        "--epochs", "1", "--batch_size", "4", "--num_checkpoints", "2", "--lora_r", "4", "--max_new_tokens", "8",
        "--chat_prompts", "2", "--chat_tokens", "4", "--wikitext", "0", "--disable_tqdm",
    ])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    summary = run(args, model=model, tokenizer=load_tokenizer(tiny_llama))

    saved = json.load(open(tmp_path / "qs" / "summary.json"))
    assert saved["steps"] == summary["steps"] == {"sft": 2, "tms": 2}
    arms = saved["comparison"]["arms"]
    assert set(arms) == set(ARMS) and all(len(arms[a]["correct"]) == 4 for a in ARMS)
    assert arms["base"]["mean_chat_kl"] == 0.0 and arms["sft"]["mean_wikitext_nll"] is None
    wall = saved["wall_seconds"]
    assert set(wall) >= {"load", "sft", "trajectories", "student", "tms", "measure", "total"}
    assert wall["tms"] == pytest.approx(wall["sft"] + wall["trajectories"] + wall["student"])
    stats = saved["trajectories"]
    assert 0 < stats["trajectories"] <= 2 * 8  # the (prompt, snapshot) pairs the student draws, of 8 x 2
    assert stats["trajectories"] + stats.get("trajectories_not_sampled", 0) == 2 * 8
    assert os.path.isdir(tmp_path / "qs" / "_tms_history" / "step-2")
    assert os.path.isfile(tmp_path / "qs" / "adapter_model.safetensors")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert len(saved["plots"]) == (2 if has_matplotlib else 0)
    for plot in saved["plots"]:
        assert os.path.getsize(plot) > 0 and plot.endswith(".png")
    out = capsys.readouterr().out
    assert "Plain SFT and TMS, side by side" in out and "TMS minus SFT" in out and "One example" in out


def test_trl_tms_without_arguments_runs_the_main_job(monkeypatch):
    from trl_tms import cli

    calls = []
    monkeypatch.setattr("trl_tms.quickstart.main", lambda argv=None: calls.append(argv))
    cli.main([])
    assert calls == [[]]


def test_the_example_is_the_largest_gap_among_prompts_where_the_student_stayed_close():
    from trl_tms.probes.comparison import example_index

    sft = [0.9, 0.5, 0.95, 0.2, 0.6]
    tms = [0.8, 0.1, 0.3, 0.2, 0.1]
    # Prompt 2 has the largest gap (0.65), but the student drifted there too: the median of its KL is 0.2, so prompts
    # 1, 3 and 4 are eligible, and of those prompt 4's gap (0.5) is the largest.
    assert example_index(sft, tms) == 4
    # Where the student is close everywhere, the largest gap wins.
    assert example_index([0.5, 0.9, 0.3], [0.1, 0.1, 0.1]) == 1
    with pytest.raises(ValueError, match="one KL per prompt"):
        example_index([0.1], [0.1, 0.2])
