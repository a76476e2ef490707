import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import make_examples
from trl import SFTConfig

from trl_tms import TMSConfig
from trl_tms.cli import check_arguments, load_datasets, main, make_parser


def qa_file(tmp_path, n=8, name="qa.jsonl"):
    path = tmp_path / name
    rows = [{"question": f"what is {w} plus {w} ?", "answer": f"the answer is {w} {w} ."} for w in ("one", "two") * (n // 2)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def parse(argv):
    return make_parser().parse_args_and_config(args=argv)


def test_help_documents_every_tms_field():
    text = make_parser().format_help()
    tms_fields = {f.name for f in dataclasses.fields(TMSConfig)} - {f.name for f in dataclasses.fields(SFTConfig)}
    assert tms_fields and all(f"--{name}" in text for name in tms_fields)
    assert "--prompt_column" in text and "--use_peft" in text


def test_yaml_config_and_flags_combine(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"num_checkpoints": 3, "label_weight": 0.5, "lora_r": 8, "output_dir": "x"}))
    script_args, training_args, model_args = parse(["--config", str(config), "--label_weight", "0.75"])
    assert (training_args.num_checkpoints, training_args.label_weight) == (3, 0.75)
    assert model_args.lora_r == 8 and model_args.use_peft is True
    assert script_args.dataset_name is None


@pytest.mark.parametrize("argv, mode, alpha", [
    ([], "online", 0.75), (["--recipe", "paper"], "two_pass", 0.25), (["--tms_mode", "two_pass"], "two_pass", 0.25),
])
def test_the_recipe_is_a_flag(argv, mode, alpha):
    _, training_args, _ = parse(["--output_dir", "x", *argv])
    assert (training_args.tms_mode, training_args.label_weight) == (mode, alpha)


@pytest.mark.parametrize("name", ["cpu_quickstart", "qlora_24gb", "qlora_8gb"])
def test_shipped_configs_parse(name):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", f"{name}.yaml")
    with open(path) as handle:
        settings = yaml.safe_load(handle)
    script_args, training_args, model_args = parse(["--config", path])
    check_arguments(script_args, model_args)
    assert training_args.output_dir == settings["output_dir"]
    assert training_args.num_checkpoints == settings["num_checkpoints"]
    assert model_args.lora_r == settings["lora_r"]
    assert script_args.num_eval_examples == settings.get("num_eval_examples")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--use_peft", "false"], "use_peft"),
        (["--dataset_name", "x.jsonl", "--prompt_column", "question"], "go together"),
        (["--prompt_column", "q", "--completion_column", "a"], "needs `--dataset_name`"),
        (["--num_train_examples", "0"], "at least 1"),
    ],
)
def test_contradictory_flags_raise(argv, match):
    script_args, _, model_args = parse(["--output_dir", "x", *argv])
    with pytest.raises(ValueError, match=match):
        check_arguments(script_args, model_args)


def test_bad_values_and_unknown_flags_raise():
    with pytest.raises(ValueError, match="label_weight"):
        parse(["--output_dir", "x", "--label_weight", "2"])
    with pytest.raises(ValueError, match="not used"):
        parse(["--output_dir", "x", "--no_such_flag", "1"])


def test_local_files_with_a_column_mapping(tmp_path):
    script_args, training_args, _ = parse(
        ["--output_dir", "x", "--dataset_name", qa_file(tmp_path), "--prompt_column", "question",
         "--completion_column", "answer", "--num_train_examples", "6"]
    )
    train, eval_dataset = load_datasets(script_args, seed=0)
    assert len(train) == 6 and eval_dataset is None
    assert train[0]["prompt"] == [{"role": "user", "content": "what is one plus one ?"}]
    assert train[0]["completion"] == [{"role": "assistant", "content": "the answer is one one ."}]

    parquet = str(tmp_path / "pc.parquet")
    make_examples(5, fmt="standard").to_parquet(parquet)
    script_args, _, _ = parse(["--output_dir", "x", "--dataset_name", parquet])
    train, _ = load_datasets(script_args, seed=0)
    assert train.column_names == ["prompt", "completion"] and len(train) == 5


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym")
def test_without_a_dataset_the_embedded_task_is_the_main_jobs():
    from trl_tms.probes.embedded import load_leg_counting

    script_args, _, _ = parse(["--output_dir", "x", "--num_train_examples", "5", "--num_eval_examples", "3"])
    train, eval_dataset = load_datasets(script_args, seed=2)
    expected_train, expected_eval = load_leg_counting(5, 3, seed=2)
    assert train.to_list() == expected_train.to_list() and eval_dataset.to_list() == expected_eval.to_list()
    script_args, _, _ = parse(["--output_dir", "x"])
    train, eval_dataset = load_datasets(script_args, seed=0)
    assert (len(train), len(eval_dataset)) == (64, 16)


def test_bad_dataset_arguments_raise(tmp_path):
    script_args, _, _ = parse(["--output_dir", "x", "--dataset_name", str(tmp_path / "missing.jsonl")])
    with pytest.raises(FileNotFoundError, match="No such dataset file"):
        load_datasets(script_args, seed=0)
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    script_args, _, _ = parse(["--output_dir", "x", "--dataset_name", str(odd)])
    with pytest.raises(ValueError, match="json, .jsonl, .parquet"):
        load_datasets(script_args, seed=0)
    script_args, _, _ = parse(
        ["--output_dir", "x", "--dataset_name", qa_file(tmp_path), "--prompt_column", "q", "--completion_column", "a"]
    )
    with pytest.raises(ValueError, match="not found"):
        load_datasets(script_args, seed=0)


def test_main_runs_a_tms_job_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    data = qa_file(tmp_path, n=8)
    main(
        [
            "--model_name_or_path", tiny_llama, "--dataset_name", data, "--prompt_column", "question",
            "--completion_column", "answer", "--output_dir", str(out), "--num_checkpoints", "2", "--recipe", "paper",
            "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--max_new_tokens", "4", "--report_to", "none",
            "--save_strategy", "no", "--lora_r", "4", "--disable_tqdm", "true",
        ]
    )
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert sorted(os.listdir(out / "_tms_history")) == ["step-1", "step-2", "tms_run.json", "trajectories"]
    printed = capsys.readouterr().out
    assert f"Student adapter:   {out}" in printed and "step-<N>/ snapshots: 1, 2" in printed
    # Of the 8 prompts x 2 snapshots, only the pairs the student's one epoch draws are sampled.
    sampled = int(re.search(r"Trajectories: +(\d+) generated", printed).group(1))
    skipped = int(re.search(r"only those the student draws: (\d+) of 16 not sampled", printed).group(1))
    assert sampled + skipped == 16 and 0 < sampled <= 8


def test_main_runs_online_tms_with_trajectory_settings(tiny_llama, tmp_path, capsys):
    """Online mode prints its summary (it used to end with a KeyError) and takes the trajectory flags."""
    out = tmp_path / "out"
    main(
        [
            "--model_name_or_path", tiny_llama, "--dataset_name", qa_file(tmp_path, n=8), "--prompt_column", "question",
            "--completion_column", "answer", "--output_dir", str(out), "--num_checkpoints", "2", "--tms_mode", "online",
            "--per_device_train_batch_size", "4", "--num_train_epochs", "2", "--max_new_tokens", "4", "--label_weight", "0.25",
            "--unfinished_trajectories", "drop", "--trajectory_filter", "verifier", "--report_to", "none",
            "--save_strategy", "no", "--lora_r", "4", "--disable_tqdm", "true",
        ]
    )
    printed = capsys.readouterr().out
    assert "Trajectories:      16 generated" in printed and "(drop)" in printed  # 8 prompts x snapshots at steps 0, 2
    # No trajectory of the untrained tiny model has the label's final answer (there is none to find).
    assert "Student draws from 0 of them (trajectory_filter=verifier); kept by snapshot: step 0 0%, step 2 0%" in printed


def test_console_script_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trl_tms.cli", "--output_dir", str(tmp_path), "--use_peft", "false"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "trl-tms: error:" in result.stderr and "Traceback" not in result.stderr


def test_main_with_a_messages_eval_split(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "trl_tms.cli.load_datasets",
        lambda script_args, seed: (make_examples(8, fmt="messages"), make_examples(2, seed=1, fmt="messages")),
    )
    main(["--model_name_or_path", tiny_llama, "--dataset_name", "chat.jsonl", "--output_dir", str(tmp_path / "out"),
          "--num_checkpoints", "2", "--recipe", "paper", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
          "--max_new_tokens", "4", "--report_to", "none", "--save_strategy", "no", "--lora_r", "4",
          "--disable_tqdm", "true", "--retention_num_prompts", "3", "--retention_max_new_tokens", "4", "--log_pld"])
    printed = capsys.readouterr().out
    assert "A held-out prompt:\n  what is" in printed and "TMS student (greedy):" in printed
    assert "PLD (mean NLL" in printed
    assert "Forgetting meter (retention_kl" in printed and "  student  start 0.000" in printed


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("false", None), ("True", True), ("yes", True), ("out/checkpoint-8", "out/checkpoint-8")],
)
def test_resume_flag(value, expected):
    from trl_tms.cli import resume_argument

    assert resume_argument(value) == expected


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust_remote_code"], True)], ids=["default", "flag"])
def test_trust_remote_code_reaches_the_model_and_tokenizer_loading(tiny_llama, tmp_path, monkeypatch, flag, expected):
    import transformers

    seen = {}

    class Stop(Exception):
        pass

    def recording(name, real, stop=False):
        def from_pretrained(cls, *args, **kwargs):
            seen[name] = kwargs.get("trust_remote_code")
            if stop:
                raise Stop
            return real.__func__(cls, *args, **kwargs)

        return classmethod(from_pretrained)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        recording("model", transformers.PreTrainedModel.from_pretrained))
    # The tokenizer is loaded after the model: nothing more is needed from the run.
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        recording("tokenizer", transformers.AutoProcessor.from_pretrained, stop=True))
    with pytest.raises(Stop):
        main(["--model_name_or_path", tiny_llama, "--dataset_name", qa_file(tmp_path), "--prompt_column", "question",
              "--completion_column", "answer", "--output_dir", str(tmp_path / "out"), "--report_to", "none", *flag])
    assert seen == {"model": expected, "tokenizer": expected}
