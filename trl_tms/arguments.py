"""What `TMSTrainer` is given, checked before anything is loaded or trained: what TMS cannot work with is refused with
what to pass instead. The checks of one concept live with it (the adapter: `history`, the folders: `resume`,
bitsandbytes: `quantization`); this module only gathers them for the trainer."""

from __future__ import annotations

import dataclasses
import os

from transformers import TrainingArguments

from .config import TMSConfig
from .history import check_lora
from .quantization import check_bitsandbytes_for
from .resume import check_writable


def as_tms_config(args, model) -> TMSConfig:
    """`args` as a `TMSConfig`: an `SFTConfig` or `TrainingArguments` is converted, `None` gets the defaults."""
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        return TMSConfig(f"{str(name).rstrip('/').split('/')[-1]}-TMS")
    if isinstance(args, TMSConfig):
        return args
    if isinstance(args, TrainingArguments):
        # Not `to_dict()`: it masks every `*_token` field (hub_token, eos_token, pad_token).
        return TMSConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
    raise TypeError(f"`args` must be a TMSConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")


def check_trainer_arguments(
    args: TMSConfig, model, train_dataset, peft_config, quantization_config, formatting_func, optimizers, functions
) -> None:
    """The `TMSTrainer` arguments TMS cannot work with, refused with what to pass instead."""
    if train_dataset is None:
        raise ValueError("`train_dataset` is required.")
    if formatting_func is not None:
        raise ValueError(
            "`formatting_func` is not supported by TMSTrainer: it turns examples into plain text, and TMS needs the "
            "prompt apart from the label to generate trajectories. Format the dataset into prompt-completion "
            "columns beforehand."
        )
    if optimizers != (None, None):
        raise ValueError(
            "TMSTrainer trains twice (harvest, then student) and the student needs a fresh optimizer and "
            "schedule, so ready-made `optimizers` instances cannot be reused. Pass `optimizer_cls_and_kwargs` or "
            "set `optim` / `lr_scheduler_type` in the config."
        )
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        raise ValueError(
            "`dataset_kwargs={'skip_prepare_dataset': True}` is not supported: TMS reads the prompts and labels "
            "from an untokenized dataset."
        )
    for name, function in functions.items():
        if function is not None and not callable(function):
            raise TypeError(f"`{name}` must be a callable, got {type(function).__name__}.")
    check_lora(model, peft_config)
    if args.process_index == 0:  # fail now, not hours later at the first snapshot or checkpoint
        check_writable(args.output_dir, "output_dir")
        check_writable(args.history_dir or os.path.join(args.output_dir, "_tms_history"), "history_dir")
    if isinstance(model, str):  # TRL ignores `quantization_config` for a model that is already loaded
        check_bitsandbytes_for(quantization_config or (args.model_init_kwargs or {}).get("quantization_config"))
