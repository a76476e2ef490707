"""Pushing to the Hub, without the network: the upload calls are intercepted and what they would send is checked."""

import os
from types import SimpleNamespace

import pytest
import yaml
from conftest import QUIET_CPU, load_tokenizer, make_examples
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from trl_tms import TMSConfig, TMSTrainer
from trl_tms.hub import resolve_base_model


class FakeHub:
    """Records every upload and the files it would send (same filtering as `huggingface_hub.upload_folder`)."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"someone/{repo_id}" if "/" not in repo_id else repo_id)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kw):
        files = [
            os.path.relpath(os.path.join(root, name), folder_path)
            for root, _, names in os.walk(folder_path)
            for name in names
        ]
        sent = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.uploads.append({"repo_id": repo_id, "folder": folder_path, "path_in_repo": path_in_repo, "files": sent})
        return SimpleNamespace(commit_url="fake")


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: fake)
    monkeypatch.setattr("trl_tms.hub.upload_folder", fake.upload_folder)
    return fake


def run(path, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "my-tms-adapter"),
        num_checkpoints=2,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        max_new_tokens=6,
        logging_steps=1,
        tms_mode="two_pass",
        log_pld=True,  # the card's PLD table
        **QUIET_CPU,
    )
    values.update(overrides)
    trainer = TMSTrainer(
        model=path,
        args=TMSConfig(**values),
        train_dataset=make_examples(8),
        eval_dataset=make_examples(4, seed=1),
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    return trainer


def front_matter(readme: str) -> dict:
    text = open(readme).read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_push_sends_the_student_adapter_and_a_tms_card(tiny_llama, tmp_path, hub):
    trainer = run(tiny_llama, tmp_path, hub_base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    trainer.push_to_hub()
    assert len(hub.uploads) == 1
    sent = hub.uploads[0]["files"]
    assert hub.uploads[0]["repo_id"] == "someone/my-tms-adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(sent)
    assert [f for f in sent if f.endswith(".safetensors")] == ["adapter_model.safetensors"]
    assert not [f for f in sent if f.startswith("_tms_history") or "step-" in f or "trajectories" in f]

    meta, text = front_matter(os.path.join(trainer.args.output_dir, "README.md"))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft"
    assert {"trl", "sft", "tms"} <= set(meta["tags"])
    assert "| tms_mode | two_pass |" in text and "online_snapshot_every" not in text and "a harvest SFT run" in text
    assert "| num_checkpoints (T) | 2 |" in text and "| label_weight (alpha) | 0.25 |" in text
    assert "| temperature | 1.0 |" in text and "| snapshot steps | 1, 2 |" in text
    final = [e for e in trainer.state.log_history if e.get("tms_phase") == 2 and "pld" in e][-1]
    assert f"| student (TMS) | {final['pld']:.4f} | {final['pld_drift']:.4f} |" in text
    assert "2602.03073" in text and "@article{khan2026tms" in text
    assert "fine-tuned version of [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2" in text


def test_push_history_uploads_loadable_snapshots(tiny_llama, tmp_path, hub):
    trainer = run(tiny_llama, tmp_path, push_history=True)
    trainer.push_to_hub()
    assert len(hub.uploads) == 2
    history = hub.uploads[1]
    assert history["path_in_repo"] == "history"
    expected = {f"step-{s}/{f}" for s in (1, 2) for f in ("adapter_config.json", "adapter_model.safetensors", "tms_snapshot.json")}
    assert set(history["files"]) == expected
    _, text = front_matter(os.path.join(trainer.args.output_dir, "README.md"))
    assert 'subfolder="history/step-<N>"' in text
    # What was sent loads the way the card says (a local folder stands in for the repo).
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), history["folder"], subfolder="step-2")
    assert "default" in model.peft_config


def test_base_model_of_a_local_folder_is_unknown_unless_given(tiny_llama, tmp_path, hub):
    trainer = run(tiny_llama, tmp_path)
    trainer.push_to_hub()
    meta, text = front_matter(os.path.join(trainer.args.output_dir, "README.md"))
    assert meta.get("base_model") is None
    assert "huggingface.co/None" not in text and "a base model not on the Hub" in text


def test_resolve_base_model(tmp_path):
    cache = tmp_path / "hub" / "models--Qwen--Qwen2.5-1.5B-Instruct" / "snapshots" / "abc123"
    cache.mkdir(parents=True)
    assert resolve_base_model(str(cache)) == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_base_model("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_base_model(str(tmp_path)) is None
    assert resolve_base_model(str(tmp_path), override="org/model") == "org/model"
    assert resolve_base_model(None) is None


def test_the_card_of_an_online_run_describes_one_run_and_its_mode(tiny_llama, tmp_path, hub):
    trainer = run(tiny_llama, tmp_path, tms_mode="online", num_checkpoints=2, online_snapshot_every=1,
                  push_history=True)
    trainer.push_to_hub()
    _, text = front_matter(os.path.join(trainer.args.output_dir, "README.md"))
    assert "| tms_mode | online |" in text and "| online_snapshot_every | 1 |" in text
    assert "one run (online TMS)" in text and "The adapter snapshots taken during the run are in `history/" in text
    # Nothing of the two-pass run: no harvest, no student restarted from the initial adapter.
    assert "harvest" not in text and "student" not in text
    final = [e for e in trainer.state.log_history if e.get("tms_phase") == 3 and "pld" in e][-1]
    assert f"| online TMS | {final['pld']:.4f} | {final['pld_drift']:.4f} |" in text
