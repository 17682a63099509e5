"""Round configs: YAML and --set values onto the method's dataclass, with actionable errors."""

from __future__ import annotations

import pytest

from align.config import ConfigError, config_from_dict, field_help, load_config_file, parse_assignments
from align.dpo import DPORoundConfig
from align.kto import KTORoundConfig
from align.reward import RewardConfig
from align.round_config import RoundConfig, parse_round_config


def test_parse_round_config_splits_round_and_method_keys():
    round_config, dpo = parse_round_config("dpo", {"beta": "0.2", "data": "new", "learning_rate": "2e-4"})
    assert isinstance(dpo, DPORoundConfig) and (dpo.beta, dpo.learning_rate) == (0.2, 2e-4)
    assert isinstance(round_config, RoundConfig) and round_config.data == "new"


def test_parse_round_config_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as info:
        parse_round_config("rm", {"betta": 0.1})
    message = str(info.value)
    assert "unknown key 'betta' for a rm round" in message
    assert "learning_rate" in message and "eval_pairs" in message and "max_length" in message


def test_parse_round_config_rejects_unknown_method():
    with pytest.raises(ConfigError, match="use one of rm, dpo, kto, ppo, sft"):
        parse_round_config("orpo", {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": "two"}, "epochs must be a number"),
        ({"max_steps": "1.5"}, "max_steps must be a whole number"),
        ({"gradient_checkpointing": "maybe"}, "must be true or false"),
        ({"truncation_side": "middle"}, "truncation_side must be 'left'"),
        ({"learning_rate": 0}, "learning_rate must be greater than 0"),
        ({"max_length": 8}, "max_length must be at least 16"),
    ],
)
def test_reward_config_rejects_bad_values_with_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(RewardConfig, values)


def test_strings_from_command_line_become_field_types():
    config = config_from_dict(RewardConfig, {"epochs": "3", "batch_size": "4", "gradient_checkpointing": "true",
                                             "lora_target_modules": "q_proj,v_proj"})
    assert (config.epochs, config.batch_size, config.gradient_checkpointing) == (3.0, 4, True)
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config_from_dict(RewardConfig, {"lora_target_modules": "all-linear"}).lora_target_modules == "all-linear"


def test_dpo_config_checks_loss_type_and_weights():
    assert config_from_dict(DPORoundConfig, {"loss_type": "ipo"}).loss_type == "ipo"
    with pytest.raises(ConfigError, match="unknown: use one or more of sigmoid"):
        config_from_dict(DPORoundConfig, {"loss_type": "sigmoidal"})
    with pytest.raises(ConfigError, match="one weight per loss"):
        config_from_dict(DPORoundConfig, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})


def test_kto_config_needs_two_examples_per_batch():
    with pytest.raises(ConfigError, match="batch_size must be at least 2 for the 'kto' loss"):
        config_from_dict(KTORoundConfig, {"batch_size": 1})
    assert config_from_dict(KTORoundConfig, {"desirable_weight": "none"}).desirable_weight is None


def test_defaults_fit_cpu_and_every_field_has_help():
    config = RewardConfig()
    assert (config.learning_rate, config.max_length, config.truncation_side) == (2e-4, 512, "left")
    for cls in (RewardConfig, DPORoundConfig, KTORoundConfig, RoundConfig):
        assert all(field_help(cls).values()), cls


def test_yaml_file_and_assignments(tmp_path):
    path = tmp_path / "round.yaml"
    path.write_text("beta: 0.3\nloss_type: [sigmoid, sft]\n")
    values = {**load_config_file(path), **parse_assignments(["beta=0.5", "data=new"])}
    _, dpo = parse_round_config("dpo", values)
    assert (dpo.beta, dpo.loss_type) == (0.5, ["sigmoid", "sft"])
    with pytest.raises(ConfigError, match="not key=value"):
        parse_assignments(["beta"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
