"""The README's main job and its side-by-side comparison, on a tiny model (fields and values, not timings)."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import load_tokenizer, make_examples
from peft import LoraConfig, get_peft_model
from peft.helpers import rescale_adapter_scale
from transformers import AutoModelForCausalLM

from trl_tms.history import adapter_weights, restore_adapter
from trl_tms.probes.comparison import ArmProbe, ArmResult, Comparison, compare_adapters, example_index

pytest.importorskip("reasoning_gym")


def heldout(n=6):
    examples = make_examples(n, seed=3)
    return examples.add_column("answer", [str(i % 2) for i in range(n)])


def peft_model(path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def perturbed(weights, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in weights.items()}


def probe_for(model, path):
    return ArmProbe(model, load_tokenizer(path), heldout(), lambda text, answer: answer == "1", answer_tokens=6,
                    general_prompts=["what is one plus two ?", "hello world"], chat_tokens=6,
                    wikitext=["one two three four five", "the answer is six seven .", "hello world yes no"])


def test_compare_adapters_measures_each_arm_and_its_dial_and_leaves_the_adapter(tiny_llama):
    model = peft_model(tiny_llama)
    own = adapter_weights(model, "default")
    arms = {"sft": perturbed(own, 0.3, 1), "tms": perturbed(own, 0.1, 2)}
    probe = probe_for(model, tiny_llama)
    comparison = compare_adapters(probe, arms, titles={"sft": "plain SFT", "tms": "TMS"}, scales={"sft": [0.5]},
                                  wall_seconds={"sft": 1.0, "tms": 2.0}, example_arms=("sft", "tms"))

    assert list(comparison.arms) == ["base", "sft", "tms", "sft@0.5"]
    for result in comparison.arms.values():
        assert len(result.correct) == 6 and result.accuracy == 0.5  # the verifier accepts the odd items whatever the text
        assert len(result.chat_kl) == 2 and len(result.wikitext_nll) == 3
    assert comparison.arms["base"].chat_kl == [0.0, 0.0]  # the base is the KL's reference
    assert all(kl > 0 for arm in ("sft", "tms", "sft@0.5") for kl in comparison.arms[arm].chat_kl)
    # The adapter's own weights are back.
    assert all(torch.equal(adapter_weights(model, "default")[k], v) for k, v in own.items())
    # Each arm is its weights: measured on their own, they give the same numbers; and the dial's point is the arm's
    # adapter under PEFT's scale.
    restore_adapter(model, "default", arms["sft"])
    torch.testing.assert_close(torch.tensor(probe.measure("x").chat_kl), torch.tensor(comparison.arms["sft"].chat_kl))
    with rescale_adapter_scale(model, 0.5):
        half = probe.measure("x")
    torch.testing.assert_close(torch.tensor(half.wikitext_nll), torch.tensor(comparison.arms["sft@0.5"].wikitext_nll))
    # A larger perturbation drifts further, and half of it drifts less than all of it.
    assert comparison.arms["sft"].mean_chat_kl > comparison.arms["sft@0.5"].mean_chat_kl
    assert [scale for scale, _ in comparison.dial("sft")] == [0.0, 0.5, 1.0]
    assert [point.name for _, point in comparison.dial("tms")] == ["base", "tms"]

    assert comparison.example["prompt"] in probe.general_prompts and set(comparison.example) >= {"rule", "base", "sft", "tms"}
    table = comparison.table()
    assert "plain SFT, adapter x 0.5" in table and "6 held-out problems" in table
    saved = json.loads(json.dumps(comparison.to_dict()))
    assert saved["scales"] == {"sft": [0.5]} and saved["wall_seconds"] == {"sft": 1.0, "tms": 2.0}
    assert saved["changes"]["tms"]["chat_kl"][0] == pytest.approx(comparison.arms["tms"].mean_chat_kl)


def test_compare_adapters_refuses_bad_scales_and_foreign_weights(tiny_llama):
    model = peft_model(tiny_llama)
    probe = probe_for(model, tiny_llama)
    arms = {"sft": adapter_weights(model, "default")}
    with pytest.raises(ValueError, match="strictly between 0"):
        compare_adapters(probe, arms, scales={"sft": [1.0]})
    with pytest.raises(ValueError, match="not one of the arms"):
        compare_adapters(probe, arms, scales={"tms": [0.5]})
    with pytest.raises(ValueError, match="LoRA configuration differs"):
        compare_adapters(probe, {"sft": {"some.other.weight": torch.zeros(1)}})


def result(name, correct, chat_kl, wiki):
    return ArmResult(name, correct, [""] * len(correct), chat_kl, [0.0] * len(chat_kl), wiki)


def test_the_verdict_needs_less_forgetting_beyond_the_se_and_most_of_the_accuracy():
    base = result("base", [0, 0, 0, 0], [0.0] * 4, [2.0] * 4)
    sft = result("sft", [1, 1, 1, 1], [0.9, 1.0, 1.1, 1.0], [3.0, 3.1, 2.9, 3.0])
    comparison = Comparison({"base": base, "sft": sft, "tms": result("tms", [1, 1, 1, 0], [0.1, 0.2, 0.1, 0.2],
                                                                      [2.1, 2.2, 2.0, 2.1])}, titles={})
    verdict = comparison.verdict("tms", "sft", 0.9)
    # 3 of 4 right against 4 of 4: 0.75x, below 0.9x; the drift is lower far beyond its standard error.
    assert verdict["accuracy_ratio"] == pytest.approx(0.75) and not verdict["accuracy_kept"]
    assert verdict["chat_kl"][0] == pytest.approx(-0.85) and verdict["chat_kl_lower_beyond_se"]
    assert verdict["wikitext_nll_lower_beyond_se"]
    assert comparison.verdict("tms", "sft", 0.7)["accuracy_kept"]
    # A difference within its standard error does not count.
    noisy = Comparison({"base": base, "sft": sft, "tms": result("tms", [1] * 4, [0.1, 1.9, 0.2, 1.7],
                                                                 [3.0, 3.1, 2.9, 3.0])}, titles={})
    verdict = noisy.verdict("tms", "sft")
    d, se = verdict["chat_kl"]
    assert d < 0 and -d < se and not verdict["chat_kl_lower_beyond_se"] and not verdict["wikitext_nll_lower_beyond_se"]


def test_the_verdict_in_words_says_plainly_when_tms_did_not_win():
    from trl_tms.quickstart import verdict_lines

    won = {"chat_kl": (-0.5, 0.1), "wikitext_nll": (-0.2, 0.05), "accuracy_ratio": 1.02, "accuracy_kept": True,
           "chat_kl_lower_beyond_se": True, "wikitext_nll_lower_beyond_se": True}
    assert "forgot less than plain SFT beyond the standard error (chat KL and WikiText NLL) with at least 0.9x" in \
        " ".join(verdict_lines(won))
    lost = {**won, "chat_kl": (-0.05, 0.1), "chat_kl_lower_beyond_se": False, "wikitext_nll_lower_beyond_se": False}
    assert "did NOT forget less" in verdict_lines(lost)[-1]
    weak = {**won, "accuracy_ratio": 0.7, "accuracy_kept": False}
    assert "less than 0.9x its target accuracy" in verdict_lines(weak)[-1]


def test_main_job_summary_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    from trl_tms.quickstart import parse_args, run

    args = parse_args([
        "--output_dir", str(tmp_path / "qs"), "--num_train", "10", "--num_test", "4", "--epochs", "1",
        "--batch_size", "2", "--lora_r", "4", "--max_new_tokens", "8", "--chat_prompts", "2", "--chat_tokens", "4",
        "--wikitext", "0", "--scales", "0.25,0.5", "--disable_tqdm",
    ])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    summary = run(args, model=model, tokenizer=load_tokenizer(tiny_llama))

    saved = json.load(open(tmp_path / "qs" / "summary.json"))
    assert saved["steps"] == summary["steps"] == {"sft": 5, "tms": 5}  # the recipe's T = 5 needs 5 steps
    arms = saved["comparison"]["arms"]
    assert list(arms) == ["base", "sft", "tms", "sft@0.25", "sft@0.5", "tms@0.25", "tms@0.5"]
    assert all(len(arms[a]["correct"]) == 4 for a in arms)
    assert arms["base"]["mean_chat_kl"] == 0.0 and arms["sft"]["mean_wikitext_nll"] is None
    assert arms["sft"]["chat_kl"] != arms["tms"]["chat_kl"]  # two runs, two adapters
    assert set(saved["wall_seconds"]) >= {"load", "sft", "tms", "measure", "total"}
    assert set(saved["verdict"]) >= {"accuracy_ratio", "accuracy_kept", "chat_kl", "chat_kl_lower_beyond_se"}
    assert saved["settings"]["recipe"] == "retention"
    assert os.path.isfile(tmp_path / "qs" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "qs" / "sft" / "adapter_model.safetensors")
    histories = json.load(open(tmp_path / "qs" / "log_history.json"))
    assert set(histories) == {"sft", "tms"}
    for history in histories.values():  # both runs log the forgetting meter, from step 0
        assert [e["step"] for e in history if "retention_kl" in e][0] == 0
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert len(saved["plots"]) == (2 if has_matplotlib else 0)
    for plot in saved["plots"]:
        assert os.path.getsize(plot) > 0 and plot.endswith(".png")
    out = capsys.readouterr().out
    assert "Plain SFT and TMS side by side" in out and "TMS minus plain SFT" in out and "One example" in out


def test_the_dial_scales_are_checked_when_parsed():
    from trl_tms.quickstart import parse_args

    assert parse_args(["--scales", ""]).scales == [] and parse_args(["--scales", "0.25, 0.75"]).scales == [0.25, 0.75]
    for bad in ("1.0", "0", "half"):
        with pytest.raises(SystemExit):
            parse_args(["--scales", bad])


def test_trl_tms_without_arguments_runs_the_main_job(monkeypatch):
    from trl_tms import cli

    calls = []
    monkeypatch.setattr("trl_tms.quickstart.main", lambda argv=None: calls.append(argv))
    cli.main([])
    assert calls == [[]]


def test_the_example_is_the_largest_gap_among_prompts_where_the_retaining_arm_stayed_close():
    drifting = [0.9, 0.5, 0.95, 0.2, 0.6]
    retaining = [0.8, 0.1, 0.3, 0.2, 0.1]
    # Prompt 2 has the largest gap (0.65), but the retaining arm drifted there too: the median of its KL is 0.2, so
    # prompts 1, 3 and 4 are eligible, and of those prompt 4's gap (0.5) is the largest.
    assert example_index(drifting, retaining) == 4
    # Where the retaining arm is close everywhere, the largest gap wins.
    assert example_index([0.5, 0.9, 0.3], [0.1, 0.1, 0.1]) == 1
    with pytest.raises(ValueError, match="one KL per prompt"):
        example_index([0.1], [0.1, 0.2])


def test_the_letter_counting_task_is_partly_solvable_text_with_distinct_splits():
    from trl_tms.probes.embedded import is_correct, load_letter_counting

    train, test = load_letter_counting(8, 4, seed=0)
    assert len(train) == 8 and len(test) == 4
    assert not {r[0]["content"] for r in train["prompt"]} & {r[0]["content"] for r in test["prompt"]}
    for row in train:
        worked = row["completion"][0]["content"]
        assert worked.endswith(f"#### {row['answer']}") and is_correct(worked, row["answer"])
    with pytest.raises(ValueError, match="at least 1"):
        load_letter_counting(0, 4)


def test_the_seed_table_counts_the_seeds_where_the_verdict_held(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import main_job

    base = result("base", [0, 0, 1, 1], [0.0] * 4, [2.0] * 4)
    sft = result("sft", [1, 1, 1, 1], [0.9, 1.0, 1.1, 1.0], [3.0, 3.1, 2.9, 3.0])
    for seed, tms_kl in ((0, [0.1, 0.2, 0.1, 0.2]), (1, [0.1, 1.9, 0.2, 1.7])):
        tms = result("tms", [1, 1, 1, 1], tms_kl, [2.1, 2.2, 2.0, 2.1])
        comparison = Comparison({"base": base, "sft": sft, "tms": tms}, titles={})
        summary = {"comparison": json.loads(json.dumps(comparison.to_dict())),
                   "verdict": comparison.verdict("tms", "sft"), "wall_seconds": {"total": 300, "sft": 50, "tms": 90}}
        os.makedirs(tmp_path / f"s{seed}")
        json.dump(summary, open(tmp_path / f"s{seed}" / "summary.json", "w"))
    out = main_job.main(["--seeds", "0,1", "--work_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    # Seed 1's chat KL difference lies within its standard error: the verdict held in one seed of two.
    assert [row["verdict_held"] for row in out["seeds"]] == [True, False] and out["verdict_held"] == 1
    assert out["seeds"][0]["arms"]["tms"]["chat_kl"] == pytest.approx(0.15)
    assert out["seeds"][0]["arms"]["sft"]["wikitext_change"] == pytest.approx(1.0)
    assert "held in **1 of 2** seeds" in open(tmp_path / "out" / "seeds.md").read()
    assert json.load(open(tmp_path / "out" / "seeds.json"))["of"] == 2


def test_both_runs_start_from_the_same_adapter_initialisation(tiny_llama, tmp_path):
    from trl_tms.quickstart import build_sft_trainer, build_trainer, parse_args

    args = parse_args(["--output_dir", str(tmp_path), "--lora_r", "4", "--disable_tqdm"])
    tokenizer, data = load_tokenizer(tiny_llama), make_examples(20)
    torch.manual_seed(1)  # whatever the global random state, each trainer seeds with `args.seed` first
    sft = build_sft_trainer(args, AutoModelForCausalLM.from_pretrained(tiny_llama), tokenizer, data)
    initial = adapter_weights(sft.model, "default")
    torch.manual_seed(2)
    tms = build_trainer(args, sft.model.unload(), tokenizer, data)
    again = adapter_weights(tms.model, tms.adapter_name)
    assert initial.keys() == again.keys()
    assert all(torch.equal(initial[k], again[k]) for k in initial)
    assert any(v.abs().sum() > 0 for v in initial.values())  # LoRA A is random: the equality is not of zeros
    args.seed = 1
    other = build_sft_trainer(args, AutoModelForCausalLM.from_pretrained(tiny_llama), tokenizer, data)
    assert not all(torch.equal(initial[k], v) for k, v in adapter_weights(other.model, "default").items())


def test_the_main_job_runs_the_papers_two_pass_tms_beside_sft_too(tiny_llama, tmp_path, capsys):
    from trl_tms.quickstart import parse_args, run

    args = parse_args([
        "--output_dir", str(tmp_path / "qs"), "--recipe", "paper", "--num_train", "20", "--num_test", "4",
        "--epochs", "1", "--batch_size", "2", "--lora_r", "4", "--max_new_tokens", "8", "--chat_prompts", "2",
        "--chat_tokens", "4", "--wikitext", "0", "--scales", "", "--disable_tqdm",
    ])
    summary = run(args, model=AutoModelForCausalLM.from_pretrained(tiny_llama), tokenizer=load_tokenizer(tiny_llama))
    assert summary["steps"] == {"sft": 10, "tms": 10}  # the student's steps; its harvest took T = 10 snapshots
    assert list(summary["comparison"]["arms"]) == ["base", "sft", "tms"]  # no dial points asked for
    assert sorted(os.listdir(tmp_path / "qs" / "_tms_history"))[:2] == ["step-1", "step-10"]
    assert summary["settings"]["recipe"] == "paper" and "TMS minus plain SFT" in capsys.readouterr().out
