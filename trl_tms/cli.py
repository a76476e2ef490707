"""The `trl-tms` command: `trl sft`'s flags, every `TMSConfig` field, and `--config file.yaml`.

```bash
trl-tms --config examples/configs/cpu_quickstart.yaml        # the embedded model and task, offline, CPU
trl-tms --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name openai/gsm8k --dataset_config main \\
    --prompt_column question --completion_column answer --load_in_4bit --output_dir qwen-gsm8k-tms
```
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from .config import TMSConfig
from .data import to_prompt_completion

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TMSScriptArguments(ScriptArguments):
    """Dataset arguments of `trl-tms` (those of `trl sft`, plus a column mapping and example counts)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, or a local .json/.jsonl/.parquet/.csv file. Default: the embedded `leg_counting` "
            "task of reasoning-gym with worked answers (offline), the main job's task."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding the prompt, for a dataset not in TRL's prompt-completion or messages format "
            "(e.g. `question` for openai/gsm8k). Becomes a user turn."
        },
    )
    completion_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the label when `--prompt_column` is set (e.g. `answer`)."},
    )
    num_train_examples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (default: all; 64 embedded)."}
    )
    num_eval_examples: int | None = field(
        default=None, metadata={"help": "Use at most this many eval examples (default: all; 16 embedded)."}
    )


@dataclass
class TMSModelConfig(ModelConfig):
    """Model arguments of `trl-tms`: those of `trl sft`, with LoRA always on (TMS trains a LoRA adapter)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of the base model. Default: the embedded SmolLM2-135M-Instruct."},
    )
    use_peft: bool = field(
        default=True, metadata={"help": "TMS trains and snapshots a LoRA adapter, so this must stay on."}
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules (default: all linear layers)."}
    )


def make_parser(prog: str | None = "trl-tms") -> TrlParser:
    return TrlParser((TMSScriptArguments, TMSConfig, TMSModelConfig), prog=prog)


def check_arguments(script_args: TMSScriptArguments, model_args: TMSModelConfig) -> None:
    """Contradictory flags fail here, before anything is loaded."""
    if not model_args.use_peft:
        raise ValueError("`--use_peft false` is not possible: TMS trains and snapshots a LoRA adapter.")
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError("`--load_in_4bit` and `--load_in_8bit` exclude each other: pick one.")
    if (script_args.prompt_column is None) != (script_args.completion_column is None):
        raise ValueError("`--prompt_column` and `--completion_column` go together: give both or neither.")
    if script_args.dataset_name is None and script_args.prompt_column is not None:
        raise ValueError("`--prompt_column` needs `--dataset_name`; the embedded task is already in prompt form.")
    for name in ("num_train_examples", "num_eval_examples"):
        value = getattr(script_args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be at least 1, got {value}.")


def load_datasets(script_args: TMSScriptArguments, seed: int) -> tuple[Dataset, Dataset | None]:
    """The train and eval datasets the flags ask for, in a format TMSTrainer accepts."""
    if script_args.dataset_name is None:
        from .probes.embedded import load_leg_counting

        return load_leg_counting(script_args.num_train_examples or 64, script_args.num_eval_examples or 16, seed)

    name = script_args.dataset_name
    extension = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if extension not in _FILE_BUILDERS:
            raise ValueError(f"Cannot read {name!r}: use a .json, .jsonl, .parquet or .csv file.")
        dataset = load_dataset(_FILE_BUILDERS[extension], data_files=name)
    elif extension in _FILE_BUILDERS:
        raise FileNotFoundError(f"No such dataset file: {name!r}.")
    else:
        dataset = load_dataset(name, name=script_args.dataset_config)
    if not isinstance(dataset, DatasetDict):
        dataset = DatasetDict({script_args.dataset_train_split: dataset})
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"{name!r} has no split {script_args.dataset_train_split!r} (splits: {', '.join(dataset)}); "
            "set `--dataset_train_split`."
        )
    train = _limit(_to_conversation(dataset[script_args.dataset_train_split], script_args), script_args.num_train_examples)
    eval_split = dataset.get(script_args.dataset_test_split)
    eval_dataset = None
    if eval_split is not None:
        eval_dataset = _limit(_to_conversation(eval_split, script_args), script_args.num_eval_examples)
    return train, eval_dataset


def _to_conversation(dataset: Dataset, script_args: TMSScriptArguments) -> Dataset:
    prompt, completion = script_args.prompt_column, script_args.completion_column
    if prompt is None:
        return dataset
    missing = [c for c in (prompt, completion) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Column(s) {missing} not found; the dataset has {dataset.column_names}.")
    return dataset.map(
        lambda ex: {
            "prompt": [{"role": "user", "content": str(ex[prompt])}],
            "completion": [{"role": "assistant", "content": str(ex[completion])}],
        },
        remove_columns=dataset.column_names,
    )


def _limit(dataset: Dataset, count: int | None) -> Dataset:
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def resume_argument(value: str | None) -> bool | str | None:
    """`--resume_from_checkpoint true` finds the interrupted run on disk; a path names a checkpoint."""
    if value is None or value.strip().lower() in ("", "false", "no", "0"):
        return None
    if value.strip().lower() in ("true", "yes", "1"):
        return True
    return value


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        # No arguments: the README's main job, plain SFT and TMS side by side on the embedded model and task.
        from . import quickstart

        quickstart.main([])
        return
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    check_arguments(script_args, model_args)

    from .report import answer, format_summary
    from .trainer import TMSTrainer

    train_dataset, eval_dataset = load_datasets(script_args, training_args.seed)
    quantization_config = get_quantization_config(model_args)
    processing_class = None
    if model_args.model_name_or_path is None:
        from .probes.embedded import load_embedded_model

        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        model, processing_class = load_embedded_model(**extra)
        if training_args.hub_base_model is None:
            training_args.hub_base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        model = model_args.model_name_or_path
        training_args.model_init_kwargs = {
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            # TRL's SFTTrainer also passes it to the tokenizer's `from_pretrained`.
            "trust_remote_code": training_args.trust_remote_code,
            **(training_args.model_init_kwargs or {}),
        }

    trainer = TMSTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config if isinstance(model, str) else None,
    )
    # One held-out prompt for the before/after answers, in prompt-completion form whatever the dataset's format.
    sample = to_prompt_completion(eval_dataset.select([0]), "eval")[0] if eval_dataset is not None else None
    base_answer = answer(trainer, sample, with_adapter=False) if sample is not None else None
    trainer.train(resume_from_checkpoint=resume_argument(training_args.resume_from_checkpoint))
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    if trainer.is_world_process_zero():
        print("\n" + "=" * 78 + "\nTMS run finished\n" + "=" * 78)
        print(format_summary(trainer, training_args.output_dir))
        if sample is not None:
            prompt = sample["prompt"] if isinstance(sample["prompt"], str) else sample["prompt"][-1]["content"]
            print(f"\nA held-out prompt:\n  {prompt}")
            print(f"\nBase model (greedy):\n  {base_answer}")
            print(f"\nTMS student (greedy):\n  {answer(trainer, sample)}")
        if training_args.push_to_hub:
            print(f"\nPushed to https://huggingface.co/{trainer.hub_model_id}")


def entry_point() -> None:
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"trl-tms: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entry_point()
