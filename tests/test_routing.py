"""RowRouter: every row of a batch gets its own slot's LoRA output, stacked or through PEFT, and nothing is left patched."""

import os

import pytest
import torch
from conftest import load_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_tms.history import adapter_parameters
from trl_tms.quantization import keep_4bit_layers_trainable
from trl_tms.routing import RowRouter

SLOTS = ["tms_slot_0", "tms_slot_1", "tms_slot_2"]
DEVICE = os.environ.get("TMS_TEST_DEVICE", "cpu")


def model_with_slots(path, quantized=False, **lora_kwargs):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora_kwargs)
    if quantized:
        pytest.importorskip("bitsandbytes")
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, device_map=DEVICE)
        keep_4bit_layers_trainable(base)  # bitsandbytes' CPU inference layout cannot take 32-wide layers
    else:
        base = AutoModelForCausalLM.from_pretrained(path).to(DEVICE)
    model = get_peft_model(base, config)
    for slot in SLOTS:
        model.add_adapter(slot, config)  # init_lora_weights=False: every slot gets its own random, non-zero factors
    model.eval()
    return model


def batch(path, rows):
    tokenizer = load_tokenizer(path)
    text = ["what is one plus two ?", "ten plus ten", "what is six", "nine", "one two three four", "five ?"][:rows]
    return {k: v.to(DEVICE) for k, v in tokenizer(text, return_tensors="pt", padding=True).items()}


def logits_one_slot_per_row(model, inputs, row_slots):
    rows = []
    for i, slot in enumerate(row_slots):
        model.set_adapter(slot)
        rows.append(model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits)
    model.set_adapter("default")
    return torch.cat(rows)


@pytest.mark.parametrize("arch,quantized", [("tiny_llama", False), ("tiny_qwen2", False), ("tiny_llama", True)])
def test_stacked_routing_gives_each_row_its_own_adapter(arch, quantized, request):
    path = request.getfixturevalue(arch)
    model = model_with_slots(path, quantized)
    inputs = batch(path, 6)
    row_slots = [SLOTS[i] for i in (0, 1, 2, 2, 0, 1)]
    router = RowRouter(model, SLOTS)
    assert router.stacked
    with torch.no_grad():
        expected = logits_one_slot_per_row(model, inputs, row_slots)
        with router(row_slots) as kwargs:
            assert kwargs == {}
            stacked = model(**inputs).logits
        peft_routed = model(**inputs, adapter_names=row_slots).logits
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, peft_routed, rtol=1e-5, atol=1e-5)
    # The slots' outputs really differ, so a row sent to the wrong slot would fail the comparison above.
    assert (expected[0] - logits_one_slot_per_row(model, inputs, [SLOTS[1]] * 6)[0]).abs().max() > 1e-3


def test_routing_leaves_no_patched_layer_behind(tiny_llama):
    model = model_with_slots(tiny_llama)
    inputs = batch(tiny_llama, 3)
    with torch.no_grad():
        before = model(**inputs).logits
        router = RowRouter(model, SLOTS)
        with pytest.raises(RuntimeError, match="Routed 2 rows but the layer got a batch of 3"):
            with router(SLOTS[:2]):
                model(**inputs)
        assert not any("forward" in layer.__dict__ for layer in router.layers)
        torch.testing.assert_close(model(**inputs).logits, before)
    assert model.active_adapter == "default"


def test_one_slot_per_call_activates_it(tiny_llama):
    model = model_with_slots(tiny_llama)
    inputs = batch(tiny_llama, 2)
    router = RowRouter(model, SLOTS)
    with torch.no_grad():
        expected = logits_one_slot_per_row(model, inputs, [SLOTS[2]] * 2)
        with router([SLOTS[2]] * 2) as kwargs:
            assert kwargs == {} and model.active_adapter == SLOTS[2]
            torch.testing.assert_close(model(**inputs).logits, expected)
    assert model.active_adapter == "default"


def test_adapters_the_stacked_form_cannot_express_go_through_peft(tiny_llama):
    # LoRA biases and a fully trained lm_head (modules_to_save) are per-slot weights outside the stacked factors.
    for kwargs in ({"lora_bias": True}, {"modules_to_save": ["lm_head"]}):
        model = model_with_slots(tiny_llama, **kwargs)
        router = RowRouter(model, SLOTS)
        assert not router.stacked, kwargs
        row_slots = [SLOTS[0], SLOTS[2]]
        inputs = batch(tiny_llama, 2)
        with torch.no_grad(), router(row_slots) as routing:
            assert routing == {"adapter_names": row_slots}
            routed = model(**inputs, **routing).logits
            expected = logits_one_slot_per_row(model, inputs, row_slots)
        torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def test_stacking_can_be_switched_off_for_peft_routing(tiny_llama, monkeypatch):
    # The reference benchmarks/speed.py times stacked routing against.
    model = model_with_slots(tiny_llama)
    monkeypatch.setattr(RowRouter, "stack_factors", False)
    router = RowRouter(model, SLOTS)
    assert not router.stacked
    row_slots = [SLOTS[0], SLOTS[2]]
    inputs = batch(tiny_llama, 2)
    with torch.no_grad(), router(row_slots) as routing:
        assert routing == {"adapter_names": row_slots}
        routed = model(**inputs, **routing).logits
        expected = logits_one_slot_per_row(model, inputs, row_slots)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    assert RowRouter(model, SLOTS).stacked


def test_weights_copied_into_the_slots_are_routed_at_once(tiny_llama):
    # Snapshots are hot-swapped into the slots (in-place copies) after the router stacked them: the stacks must see them.
    model = model_with_slots(tiny_llama)
    router = RowRouter(model, SLOTS)
    torch.manual_seed(1)
    with torch.no_grad():
        for slot in SLOTS[:2]:
            for param in adapter_parameters(model, slot).values():
                param.copy_(torch.randn_like(param))
        inputs = batch(tiny_llama, 4)
        row_slots = [SLOTS[i] for i in (1, 0, 2, 1)]
        expected = logits_one_slot_per_row(model, inputs, row_slots)
        with router(row_slots):
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    stacked_bytes = sum(a.untyped_storage().nbytes() + b.untyped_storage().nbytes() for a, b, _ in router._stacks)
    slot_storages = {p.untyped_storage().data_ptr() for s in SLOTS for p in adapter_parameters(model, s).values()}
    assert slot_storages == {t.untyped_storage().data_ptr() for a, b, _ in router._stacks for t in (a, b)}
    assert stacked_bytes == sum(p.numel() * p.element_size() for s in SLOTS for p in adapter_parameters(model, s).values())
