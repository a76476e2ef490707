"""`TMSConfig.recipe`: the recommended setting by default, the paper's by name, explicit fields kept."""

import pytest
from conftest import QUIET_CPU, load_tokenizer, make_examples
from peft import LoraConfig
from trl import SFTConfig

from trl_tms import TMSConfig, TMSTrainer
from trl_tms.config import RECIPES


def config(**fields) -> TMSConfig:
    return TMSConfig(**{"output_dir": "out", **QUIET_CPU, **fields})


@pytest.mark.parametrize("fields, mode, alpha, snapshots", [
    ({}, "online", 0.75, 5),                                     # the recommended setting by default
    ({"recipe": "retention"}, "online", 0.75, 5),
    ({"recipe": "paper"}, "two_pass", 0.25, 10),                 # the paper's, by name
    ({"tms_mode": "two_pass"}, "two_pass", 0.25, 10),            # an explicit mode keeps meaning the paper's setting
    ({"tms_mode": "online"}, "online", 0.75, 5),
    ({"recipe": "paper", "tms_mode": "online"}, "online", 0.75, 5),
    ({"label_weight": 0.5}, "online", 0.5, 5),                   # explicit fields keep the user's value
    ({"num_checkpoints": 10}, "online", 0.75, 10),
    ({"recipe": "paper", "label_weight": 1.0, "num_checkpoints": 3}, "two_pass", 1.0, 3),
    ({"tms_mode": "two_pass", "label_weight": 0.0}, "two_pass", 0.0, 10),
])
def test_a_recipe_fills_only_the_fields_left_unset(fields, mode, alpha, snapshots):
    args = config(**fields)
    assert (args.tms_mode, args.label_weight, args.num_checkpoints) == (mode, alpha, snapshots)


def test_the_recipes_are_the_settings_the_docs_name():
    assert RECIPES == {"retention": {"tms_mode": "online", "label_weight": 0.75, "num_checkpoints": 5},
                       "paper": {"tms_mode": "two_pass", "label_weight": 0.25, "num_checkpoints": 10}}


def test_a_label_length_budget_never_cuts_a_label_length_answer(tiny_llama, tmp_path):
    """Every label, followed by its end token, fits the budget fitted at 1x the longest label; no recipe sets one."""
    tokenizer = load_tokenizer(tiny_llama)
    examples = make_examples(24, seed=3)
    lengths = [len(tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"]) for c in examples["completion"]]

    def trainer(**fields):
        return TMSTrainer(model=tiny_llama, args=config(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                                        max_new_tokens=256, **fields),
                          train_dataset=examples, processing_class=tokenizer,
                          peft_config=LoraConfig(r=2, target_modules="all-linear"))

    assert trainer().max_new_tokens == 256  # the recipe's default: no budget
    budget = trainer(max_new_tokens_from_labels=1.0).max_new_tokens
    assert max(lengths) + 1 <= budget < 256 and budget % 16 == 0
    assert budget - 16 < max(lengths) + 1  # the smallest multiple of 16 that fits


def test_an_unknown_recipe_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"`recipe` must be one of \['paper', 'retention'\], got 'best'"):
        config(recipe="best")


def test_a_two_pass_only_setting_under_the_default_recipe_says_where_the_mode_came_from():
    with pytest.raises(ValueError, match="comes from `recipe='retention'`: set `tms_mode` yourself, or `recipe='paper'`"):
        config(trajectory_choice="pld")
    # A mode the user chose: no hint about the recipe.
    with pytest.raises(ValueError) as error:
        config(tms_mode="online", trajectory_choice="pld")
    assert "recipe" not in str(error.value)
    config(recipe="paper", trajectory_choice="pld")  # the paper's two-pass mode takes it


def test_an_sft_config_converted_by_the_trainer_gets_the_default_recipe(tiny_llama, tmp_path):
    sft = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
**QUIET_CPU)
    trainer = TMSTrainer(model=tiny_llama, args=sft, train_dataset=make_examples(40),
                         processing_class=load_tokenizer(tiny_llama), peft_config=LoraConfig(r=2, target_modules="all-linear"))
    assert (trainer.args.recipe, trainer.args.tms_mode, trainer.args.label_weight, trainer.args.num_checkpoints) == (
        "retention", "online", 0.75, 5)
