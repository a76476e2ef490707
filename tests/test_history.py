import os
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from trl_tms import AdapterHistory
from trl_tms.history import adapter_parameters

DEVICE = os.environ.get("TMS_TEST_DEVICE", "cpu")


def peft_model(path, r=4):
    torch.manual_seed(0)
    return get_peft_model(
        AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=r, target_modules="all-linear", init_lora_weights=False)
    )


@pytest.mark.parametrize("background_writes,staged", [(False, False), (True, False), (True, True)])
def test_take_copies_only_the_adapter_to_cpu(tiny_llama, tmp_path, monkeypatch, background_writes, staged):
    # On CUDA (scripts/gpu_check.sh runs this file with TMS_TEST_DEVICE=cuda) background snapshots are staged on the
    # GPU and copied to CPU later; `staged` takes that path with a CPU model (all but the asynchrony).
    if staged and DEVICE == "cpu":
        monkeypatch.setattr("trl_tms.history._one_gpu", lambda params: torch.device("cpu"))
        monkeypatch.setattr("trl_tms.history._recorded_event", lambda device: SimpleNamespace(synchronize=lambda: None))
    model = peft_model(tiny_llama).to(DEVICE)
    history = AdapterHistory(model.peft_config["default"], str(tmp_path / "h"), background_writes=background_writes)
    lora_params = adapter_parameters(model, "default")
    expected = {k: v.detach().cpu().clone() for k, v in lora_params.items()}
    history.take(model, step=5)
    # Training on at once (before a background copy could have run) leaves the snapshot alone: it is a copy.
    with torch.no_grad():
        for param in lora_params.values():
            param.add_(1.0)
    snapshot = history[5]
    assert len(snapshot) == len(lora_params)
    assert all("lora_" in key and ".default" not in key and t.device.type == "cpu" for key, t in snapshot.items())
    assert sum(t.numel() for t in snapshot.values()) < sum(p.numel() for p in model.parameters()) / 5
    for name, tensor in expected.items():
        assert torch.equal(snapshot[name.replace(".default", "")], tensor)
    history.flush()
    on_disk = AdapterHistory.open(str(tmp_path / "h"))[5]
    assert all(torch.equal(on_disk[k], snapshot[k]) for k in snapshot)


def test_snapshot_folder_loads_with_peft(tiny_llama, tmp_path):
    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], directory=str(tmp_path / "h"))
    history.take(model, step=3)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), history.path(3))
    ids = torch.tensor([[2, 5, 6, 7]])
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_rewriting_a_step_replaces_it_atomically(tiny_llama, tmp_path):
    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], directory=str(tmp_path / "h"))
    history.take(model, step=1)
    with torch.no_grad():
        for param in adapter_parameters(model, "default").values():
            param.mul_(2)
    history.take(model, step=1)
    assert os.listdir(tmp_path / "h") == ["step-1"]
    reopened = AdapterHistory.open(str(tmp_path / "h"))
    assert all(torch.equal(reopened[1][k], history[1][k]) for k in history[1])


def test_failed_write_leaves_no_partial_snapshot(tiny_llama, tmp_path, monkeypatch):
    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], directory=str(tmp_path / "h"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("trl_tms.history.save_file", broken)
    with pytest.raises(OSError, match=r"Could not write snapshot step-2 .*disk full.*resume_from_checkpoint=True"):
        history.take(model, step=2)
    assert os.listdir(tmp_path / "h") == []


def test_open_ignores_staging_folders_and_refuses_non_safetensors(tiny_llama, tmp_path):
    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], directory=str(tmp_path / "h"))
    history.take(model, step=4)
    os.makedirs(tmp_path / "h" / ".step-8-abc")  # an interrupted write
    assert AdapterHistory.open(str(tmp_path / "h")).steps == [4]
    os.remove(tmp_path / "h" / "step-4" / "adapter_model.safetensors")
    torch.save({}, tmp_path / "h" / "step-4" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        AdapterHistory.open(str(tmp_path / "h"))
    with pytest.raises(FileNotFoundError, match="No adapter history"):
        AdapterHistory.open(str(tmp_path / "missing"))


def test_load_into_a_slot_and_mismatch_error(tiny_llama, tmp_path, monkeypatch):
    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"])
    history.take(model, step=1)
    model.add_adapter("slot", model.peft_config["default"])
    with monkeypatch.context() as patch:  # plain LoRA takes the in-place path, never PEFT's whole-model load
        patch.setattr("trl_tms.history.set_peft_model_state_dict", None)
        history.load_into(model, 1, "slot")
    slot = adapter_parameters(model, "slot")
    for name, param in adapter_parameters(model, "default").items():
        assert torch.equal(slot[name.replace(".default", ".slot")], param)
    # Swapping again through the slot's parameters found once (as generation does) copies the other snapshot in.
    with torch.no_grad():
        for param in adapter_parameters(model, "default").values():
            param.add_(1.0)
    history.take(model, step=2)
    found = history.slot_parameters(model, "slot")
    history.load_into(model, 2, "slot", found)
    for name, param in adapter_parameters(model, "default").items():
        assert torch.equal(slot[name.replace(".default", ".slot")], param)
    history.load_into(model, 1, "slot", found)
    assert not torch.equal(slot[name.replace(".default", ".slot")], param)

    other = peft_model(tiny_llama, r=2)
    other_history = AdapterHistory(other.peft_config["default"])
    other_history.take(other, step=1)
    with pytest.raises(ValueError, match="does not fit"):
        other_history.load_into(model, 1, "slot")
    with pytest.raises(ValueError, match="no directory"):
        other_history.path(1)


def test_taking_a_snapshot_never_asks_the_hub(tiny_llama, monkeypatch):
    model = peft_model(tiny_llama)
    model.peft_config["default"].base_model_name_or_path = "some-org/some-model"  # as for a model loaded by Hub id

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("peft.utils.save_and_load.check_file_exists_on_hf_hub", no_network)
    history = AdapterHistory(model.peft_config["default"])
    history.take(model, step=1)
    assert len(history[1]) > 0


def test_snapshot_folders_are_ordinary_folders(tiny_llama, tmp_path):
    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], directory=str(tmp_path / "h"))
    history.take(model, step=1)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(history.path(1)).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700


def test_background_writes_land_on_flush_and_failures_surface(tiny_llama, tmp_path, monkeypatch):
    import threading

    from safetensors.torch import save_file

    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], directory=str(tmp_path / "h"), background_writes=True)
    release = threading.Event()

    def held_back(*args, **kwargs):
        assert release.wait(10)
        save_file(*args, **kwargs)

    monkeypatch.setattr("trl_tms.history.save_file", held_back)
    history.take(model, step=1)
    snapshot = history[1]
    assert 1 in history and not os.path.exists(history.path(1))  # take returned while the write waits
    release.set()
    history.flush()
    reopened = AdapterHistory.open(str(tmp_path / "h"))
    assert all(torch.equal(reopened[1][k], snapshot[k]) for k in snapshot)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("trl_tms.history.save_file", broken)
    history.take(model, step=2)
    with pytest.raises(OSError, match=r"Could not write snapshot step-2 .*disk full"):
        history.flush()
    history.take(model, step=3)
    history._pending[0].exception()  # wait for it to fail
    with pytest.raises(OSError, match=r"Could not write snapshot step-3 .*disk full"):
        history.take(model, step=4)  # the next snapshot reports the failed one
    history.flush()
    assert sorted(os.listdir(tmp_path / "h")) == ["step-1"]
    # No writer thread idles on (the training loop may fork data-loader workers): each ends with its snapshot.
    for thread in threading.enumerate():
        if thread.name == "tms-snapshot-writer":
            thread.join(timeout=5)
            assert not thread.is_alive()


def test_snapshots_follow_the_model_they_are_taken_from(tiny_llama):
    # The parameters and keys found at the first snapshot are reused; they must follow moved weights and other models.
    model, other = peft_model(tiny_llama), peft_model(tiny_llama, r=2)
    history = AdapterHistory(model.peft_config["default"])
    history.take(model, step=1)
    before = {name: p.detach().clone() for name, p in adapter_parameters(model, "default").items()}
    for param in adapter_parameters(model, "default").values():
        param.data = param.data + 1.0  # as `model.to(...)` replaces `.data`
    history.take(model, step=2)
    history.take(other, step=3)
    for name, param in adapter_parameters(model, "default").items():
        key = name.replace(".default", "")
        assert torch.equal(history[2][key], param.detach()) and torch.equal(history[1][key], before[name])
    assert {t.shape[0] for k, t in history[3].items() if "lora_A" in k} == {2}


@pytest.mark.parametrize("background_writes", [False, True])
def test_written_snapshots_are_served_from_their_files(tiny_llama, tmp_path, background_writes):
    from safetensors.torch import load_file, save_file

    from trl_tms.history import SNAPSHOT_WEIGHTS

    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], str(tmp_path / "h"), background_writes=background_writes)
    kept = AdapterHistory(model.peft_config["default"], str(tmp_path / "k"), keep_in_memory=True)
    for step in (1, 2):
        history.take(model, step=step)
        kept.take(model, step=step)
        with torch.no_grad():
            for param in adapter_parameters(model, "default").values():
                param.add_(1.0)
    history.flush()
    # Once written, the history holds no tensors: a snapshot is what its file holds when it is read.
    assert not any(isinstance(snapshot, dict) for snapshot in history._snapshots.values())
    weights = os.path.join(history.path(1), SNAPSHOT_WEIGHTS)
    changed = {key: tensor + 5.0 for key, tensor in load_file(weights).items()}
    save_file(changed, weights)
    assert all(torch.equal(history[1][k], changed[k]) for k in changed)
    assert not any(torch.equal(kept[1][k], changed[k]) for k in changed)  # `keep_in_memory` keeps its copy
    # A swap from the file puts those weights in the slot.
    model.add_adapter("slot", model.peft_config["default"])
    history.load_into(model, 1, "slot")
    slot = history.slot_parameters(model, "slot")
    assert all(torch.equal(slot[k].detach(), changed[k]) for k in changed)


def test_prefetch_reads_ahead_and_never_serves_a_stale_snapshot(tiny_llama, tmp_path, monkeypatch):
    import trl_tms.history as module

    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], str(tmp_path / "h"))
    for step in (1, 2, 3):
        history.take(model, step=step)
    reads = []
    read = module._read_weights
    monkeypatch.setattr(module, "_read_weights", lambda folder, step: reads.append(step) or read(folder, step))
    history.prefetch([1, 2])
    history._prefetched[1].result(), history._prefetched[2].result()
    assert sorted(reads) == [1, 2]
    expected = {k: t.clone() for k, t in read(history.path(1), 1).items()}
    snapshot = history[1]
    assert sorted(reads) == [1, 2]  # served from the prefetch, not read again
    assert all(torch.equal(snapshot[k], expected[k]) for k in expected)
    history.prefetch([3])  # replaces the earlier prefetch: step 2 is let go, and so is the step 1 served
    assert list(history._prefetched) == [3] and history._served == []
    # A step taken again after its prefetch is served as taken now.
    with torch.no_grad():
        for param in adapter_parameters(model, "default").values():
            param.add_(1.0)
    history.take(model, step=3)
    now = {name.replace(".default", ""): p.detach() for name, p in adapter_parameters(model, "default").items()}
    assert all(torch.equal(history[3][k], now[k]) for k in now)
    history.prefetch([])
    assert history._prefetched == {}


def test_prefetch_can_wait_until_the_snapshots_are_read(tiny_llama, tmp_path, monkeypatch):
    import time

    import trl_tms.history as module

    model = peft_model(tiny_llama)
    history = AdapterHistory(model.peft_config["default"], str(tmp_path / "h"))
    for step in (1, 2):
        history.take(model, step=step)
    reads = []
    read = module._read_weights

    def slow_read(folder, step):
        time.sleep(0.2)
        reads.append(step)
        return read(folder, step)

    monkeypatch.setattr(module, "_read_weights", slow_read)
    history.prefetch([1, 2], wait=True)
    assert sorted(reads) == [1, 2]  # read before `prefetch` returned
    assert history[1].keys() == read(history.path(1), 1).keys() and sorted(reads) == [1, 2]
