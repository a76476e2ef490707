"""The retention dial: the adapter-scale curve, the choice of a scale, the scaled adapter saved, reloaded and pushed."""

import json
import math
import os
import sys

import pytest
import torch
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig, PeftModel, get_peft_model
from peft.helpers import rescale_adapter_scale
from peft.tuners.lora import LoraLayer
from test_hub import hub, run  # noqa: F401 (the `hub` fixture intercepts uploads)
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from trl_tms import AdapterScaleCurve, RetentionCallback, ScalePoint, apply_adapter_scale, trace_adapter_scale

# Prompts in the tiny tokenizer's vocabulary, so that they are not all <unk>.
PROMPTS = ["what is one plus two ?", "hello world", "a b c d e", "yes or no ?", "the sum of five and six", "x y z"]
SCALES = [0.0, 0.25, 0.5, 0.75, 1.0]


def sft_trainer(model, tokenizer, output_dir, peft_config=None, **overrides):
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=3e-2,
                  logging_steps=2, **QUIET_CPU)
    values.update(overrides)
    return SFTTrainer(model=model, args=SFTConfig(**values), train_dataset=make_examples(16, seed=0),
                      eval_dataset=make_examples(8, seed=1), processing_class=tokenizer, peft_config=peft_config)


@pytest.fixture(scope="module")
def sft(tiny_llama, tmp_path_factory):
    """A plain `trl.SFTTrainer` with a LoRA adapter and the forgetting meter, trained 8 steps; its adapter saved."""
    out = tmp_path_factory.mktemp("sft")
    trainer = sft_trainer(tiny_llama, load_tokenizer(tiny_llama), out / "run",
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    meter = RetentionCallback(trainer, prompts=PROMPTS, max_new_tokens=8)
    trainer.add_callback(meter)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return trainer, meter, str(out / "adapter")


def ids():
    return torch.tensor([[2, 4, 5, 6, 7, 8, 9], [2, 10, 11, 12, 13, 14, 15]])


@torch.no_grad()
def logits(model):
    model.eval()
    return model(input_ids=ids()).logits


def reload(base_path, adapter_path):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter_path)


def test_curve_on_a_plain_sft_trainer(sft):
    trainer, meter, _ = sft
    logged = [e["retention_kl"] for e in trainer.state.log_history if "retention_kl" in e][-1]
    curve = trace_adapter_scale(trainer, scales=SCALES)
    assert curve.scales == SCALES
    kls = [p.retention_kl for p in curve.points]
    # Scale 0 is the base model, the meter's reference; scale 1 the trained adapter, as the meter logged it last.
    assert abs(kls[0]) < 1e-5
    assert kls[-1] == pytest.approx(logged, rel=1e-5) and kls[-1] > 1e-3
    assert all(b >= a for a, b in zip(kls, kls[1:])), kls  # monotone in scale on this run
    # The default score: the eval set's label NLL, lower is better; training lowered it.
    assert curve.score_name == "eval_nll" and not curve.greater_is_better
    assert curve.points[-1].score < curve.points[0].score
    # The trace leaves the adapter as it was.
    assert meter.measure()["retention_kl"] == pytest.approx(logged, rel=1e-6)


def test_kl_from_the_base_grows_with_the_scale_of_an_lm_head_adapter(tiny_llama, tmp_path):
    """
    With LoRA on the LM head only, the logits are affine in the scale s (z + s * delta), so KL(base || scaled) is
    convex in s with its minimum, 0, at s = 0: it cannot fall as s grows. The tiny vocabulary is within the meter's
    `top_k`, so the meter's KL is the full KL. The trained all-linear adapter above is monotone too, but only as found.
    SFTTrainer refuses an LM-head adapter, so this runs on a plain `transformers.Trainer` (no eval set: no score).
    """
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path / "out"), **QUIET_CPU),
                      processing_class=load_tokenizer(tiny_llama))
    scales = [0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]
    curve = trace_adapter_scale(trainer, scales=scales, meter=RetentionCallback(trainer, prompts=PROMPTS))
    kls = [p.retention_kl for p in curve.points]
    assert curve.score_name is None and all(p.score is None for p in curve.points)
    assert abs(kls[0]) < 1e-6
    assert all(b > a for a, b in zip(kls, kls[1:])), kls


def test_scale_0_is_the_base_model_and_1_the_adapter_exactly(sft, tiny_llama):
    _, _, adapter = sft
    model = reload(tiny_llama, adapter)
    trained = logits(model)
    with model.disable_adapter():
        base = logits(model)
    assert not torch.equal(base, trained)
    with rescale_adapter_scale(model, 0.0):  # how the trace scales
        assert torch.equal(logits(model), base)
    apply_adapter_scale(model, 1.0)
    assert torch.equal(logits(model), trained)
    apply_adapter_scale(model, 0.0)
    assert torch.equal(logits(model), base)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tiny_llama)), base)


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"alpha_pattern": {"q_proj": 16}}])
def test_the_saved_adapter_reloads_at_the_applied_scale(tiny_llama, tmp_path, options):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **options))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    with rescale_adapter_scale(model, 0.3):
        traced = logits(model)
    apply_adapter_scale(model, 0.3)
    applied = logits(model)
    torch.testing.assert_close(applied, traced, rtol=1e-6, atol=1e-6)  # the scaling's last bit may differ
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert saved["lora_alpha"] == pytest.approx(8 * 0.3)
    assert saved["alpha_pattern"] == {k: pytest.approx(v * 0.3) for k, v in options.get("alpha_pattern", {}).items()}
    assert torch.equal(logits(reload(tiny_llama, str(tmp_path / "adapter"))), applied)


def test_choose_takes_the_largest_scale_within_the_budget_or_the_smallest_meeting_the_score():
    kls, nlls = [0.0, 0.01, 0.03, 0.08, 0.2], [2.0, 1.5, 1.2, 1.1, 1.0]
    curve = AdapterScaleCurve([ScalePoint(s, k, 0.0, n) for s, k, n in zip(SCALES, kls, nlls)], "eval_nll", False)
    assert curve.choose(max_retention_kl=0.05) == 0.5
    assert curve.chosen_scale == 0.5 and curve.criterion == "largest scale with retention_kl <= 0.05"
    assert curve.choose(max_retention_kl=0.08) == 0.75
    assert curve.choose(max_retention_kl=0.0) == 0.0
    assert curve.choose(max_score=1.3) == 0.5  # the least drift that keeps the score
    assert curve.choose(max_retention_kl=0.2, max_score=1.3) == 1.0
    with pytest.raises(ValueError, match=r"No traced scale meets retention_kl <= 0.02 and eval_nll <= 1.1: .*0\.2"):
        curve.choose(max_retention_kl=0.02, max_score=1.1)
    with pytest.raises(ValueError, match="better when lower: bound it with `max_score=`"):
        curve.choose(min_score=1.5)
    with pytest.raises(ValueError, match="Give a drift budget"):
        curve.choose()
    accuracy = AdapterScaleCurve([ScalePoint(s, k, 0.0, a) for s, k, a in zip(SCALES, kls, [0.1, 0.3, 0.5, 0.6, 0.6])],
                                 "accuracy", True)
    assert accuracy.choose(min_score=0.6) == 0.75
    with pytest.raises(ValueError, match="better when higher"):
        accuracy.choose(max_score=0.5)
    unscored = AdapterScaleCurve([ScalePoint(0.0, 0.0, 0.0), ScalePoint(1.0, 0.1, 0.0)])
    with pytest.raises(ValueError, match="no score"):
        unscored.choose(min_score=0.5)


def test_user_score_function(sft):
    trainer, _, _ = sft
    calls = []

    def verifier_accuracy(model):
        calls.append(model.training)
        return 1.0 - next(m for m in model.modules() if isinstance(m, LoraLayer)).scaling["default"]

    curve = trace_adapter_scale(trainer, scales=[1.0, 0.0, 0.5], score_fn=verifier_accuracy)
    assert curve.scales == [0.0, 0.5, 1.0] and calls == [False] * 3
    assert curve.score_name == "verifier_accuracy" and curve.greater_is_better
    assert [p.score for p in curve.points] == [1.0, 0.0, -1.0]  # the score saw the scaled adapter (alpha 8 / r 4)


def test_apply_on_a_trainer_ships_the_chosen_adapter_curve_and_card(sft, tiny_llama, tmp_path, monkeypatch):
    _, _, adapter = sft
    trainer = sft_trainer(reload(tiny_llama, adapter), load_tokenizer(tiny_llama), tmp_path / "out")
    curve = trace_adapter_scale(trainer, scales=SCALES, meter=RetentionCallback(trainer, prompts=PROMPTS))
    budget = (curve.points[2].retention_kl + curve.points[3].retention_kl) / 2
    scale = curve.choose(max_retention_kl=budget)
    assert scale == 0.5
    with rescale_adapter_scale(trainer.model, scale):
        expected = logits(trainer.model)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # without the optional plot: JSON only
    apply_adapter_scale(trainer, scale, curve)
    trainer.save_model()
    out = trainer.args.output_dir
    assert json.load(open(os.path.join(out, "adapter_config.json")))["lora_alpha"] == 4.0
    saved = AdapterScaleCurve.load(out)
    assert saved == curve and saved.chosen_scale == 0.5 and not os.path.exists(os.path.join(out, "adapter_scale.png"))
    assert torch.equal(logits(reload(tiny_llama, out)), expected)
    trainer.create_model_card()  # what push_to_hub writes
    text = open(os.path.join(out, "README.md")).read()
    assert "## Adapter scale" in text and "scaled by **0.5**" in text
    assert f"| retention_kl | {round(curve.points[2].retention_kl, 4)} |" in text
    assert f"| chosen as | largest scale with retention_kl <= {budget} |" in text


def test_the_plot_is_saved_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    curve = AdapterScaleCurve([ScalePoint(0.0, 0.0, 1.0, 2.0), ScalePoint(1.0, 0.1, 1.2, 1.0)], "eval_nll", False, 1.0)
    assert curve.save(str(tmp_path)) == [str(tmp_path / "adapter_scale.json"), str(tmp_path / "adapter_scale.png")]
    assert open(tmp_path / "adapter_scale.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_works_on_a_tms_result_and_push_sends_it(tiny_llama, tmp_path, hub):  # noqa: F811
    trainer = run(tiny_llama, tmp_path, learning_rate=3e-2)
    curve = trace_adapter_scale(trainer, scales=[0.0, 0.5, 1.0])  # with the trainer's own meter
    logged = [e["retention_kl"] for e in trainer.state.log_history if "retention_kl" in e][-1]
    assert abs(curve.points[0].retention_kl) < 1e-5
    assert curve.points[-1].retention_kl == pytest.approx(logged, rel=1e-5)
    scale = curve.choose(max_retention_kl=curve.points[1].retention_kl)
    assert scale == 0.5
    apply_adapter_scale(trainer, scale, curve)
    trainer.push_to_hub()
    sent = hub.uploads[0]["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter_scale.json", "README.md"} <= set(sent)
    text = open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert "## Trajectory-Mixed Supervision" in text and "scaled by **0.5**" in text
    config = json.load(open(os.path.join(trainer.args.output_dir, "adapter_config.json")))
    assert config["lora_alpha"] == 4.0  # LoraConfig's default alpha 8, halved


def test_bad_input(sft, tiny_llama, tmp_path):
    trainer, _, adapter = sft
    with pytest.raises(ValueError, match=">= 0"):
        trace_adapter_scale(trainer, scales=[0.0, -0.5])
    with pytest.raises(ValueError, match=">= 0"):
        trace_adapter_scale(trainer, scales=[])
    with pytest.raises(ValueError, match=">= 0"):
        apply_adapter_scale(trainer, math.nan)
    with pytest.raises(ValueError, match="scales a LoRA adapter; got a LlamaForCausalLM"):
        apply_adapter_scale(AutoModelForCausalLM.from_pretrained(tiny_llama), 0.5)
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                          LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="use_dora=True: a LoRA scale does not reach"):
        apply_adapter_scale(dora, 0.5)
    with pytest.raises(ValueError, match="was not traced"):
        AdapterScaleCurve([ScalePoint(0.0, 0.0, 0.0)]).point(0.5)
