import pytest

from core.errors import SettingsError
from core.settings import load_runner_settings, validate_runner_settings

MINIMAL = {"model_name": "gpt_oss", "model_path": "/models/gpt_oss"}


def write_yaml(tmp_path, text):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_every_seed_key():
    settings = validate_runner_settings(MINIMAL)
    assert settings["exe_mode"] == "eager" and settings["world_size"] == 1
    assert settings["model_config"]["enable_online_split_weight"] is True
    assert settings["data_config"]["input_max_len"] == 1024
    assert settings["parallel_config"] == {"attn_tp_size": 1, "moe_tp_size": 1, "lmhead_tp_size": 1, "embed_tp_size": 1}


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write_yaml(tmp_path, "model_name: x\nmodel_path: /m\ndata_config:\n  max_new_token: 8\n")
    with pytest.raises(SettingsError, match=r"unknown key 'data_config.max_new_token'.*did you mean 'data_config.max_new_tokens'"):
        load_runner_settings(path)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write_yaml(tmp_path, "model_name: x\nmodel_path: /m\ndata_config:\n  batch_size: two\n")
    with pytest.raises(SettingsError, match=r"'data_config.batch_size' must be an integer, got 'two'"):
        load_runner_settings(path)


def test_boolean_is_not_an_integer():
    with pytest.raises(SettingsError, match="world_size' must be an integer"):
        validate_runner_settings({**MINIMAL, "world_size": True})


def test_yaml_syntax_error_gives_line(tmp_path):
    path = write_yaml(tmp_path, "model_name: x\nmodel_path: [unclosed\n")
    with pytest.raises(SettingsError, match=r"YAML syntax error at line \d+"):
        load_runner_settings(path)


def test_choice_lists_allowed_values():
    with pytest.raises(SettingsError, match=r"'exe_mode' is 'eagre'; did you mean 'eager'\?"):
        validate_runner_settings({**MINIMAL, "exe_mode": "eagre"})


def test_non_positive_size_rejected():
    with pytest.raises(SettingsError, match="'data_config.max_new_tokens' must be at least 1, got 0"):
        validate_runner_settings({**MINIMAL, "data_config": {"max_new_tokens": 0}})


def test_tp_groups_must_span_the_world():
    with pytest.raises(SettingsError, match="parallel_config.attn_tp_size is 3 but world_size is 4.*set attn_tp_size: 4"):
        validate_runner_settings({**MINIMAL, "world_size": 4, "parallel_config": {"attn_tp_size": 3}})


def test_overrides_apply_before_validation(tmp_path):
    path = write_yaml(tmp_path, "model_name: x\nmodel_path: /path/to/x\n")
    settings = load_runner_settings(path, {"model_path": "/real", "data_config.batch_size": 4})
    assert settings["model_path"] == "/real" and settings["data_config"]["batch_size"] == 4
