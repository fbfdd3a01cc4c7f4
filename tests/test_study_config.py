import pytest

from pipeline.config import load_config
from study.config import parse_override
from study.schema import ConfigError


def test_default_config_loads_with_defaults_filled():
    cfg = load_config()
    assert cfg["seed"] == 0
    assert [s["name"] for s in cfg["data"]["sources"]] == ["caltech101", "flowers17", "imagenette"]
    assert cfg["extract"]["backbones"]


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'extract.viewz'.*views"):
        load_config(overrides=["extract.viewz=3"])


def test_bad_value_names_key_value_and_range():
    with pytest.raises(ConfigError, match=r"'extract.views' has value -1; allowed: an integer in \[0, 64\]"):
        load_config(overrides=["extract.views=-1"])
    with pytest.raises(ConfigError, match=r"'device' has value 'tpu'; allowed: one of 'auto'"):
        load_config(overrides=['device="tpu"'])


def test_bad_value_inside_an_array_of_tables_names_its_index():
    with pytest.raises(ConfigError, match=r"data.sources\[1\].kind' has value 'zip'"):
        load_config(overrides=['data.sources=[{name="a", path="x"}, {name="b", path="y", kind="zip"}]'])


def test_override_values_are_toml_or_bare_strings():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override('a=["x","y"]') == (["a"], ["x", "y"])
    assert parse_override("name=hello") == (["name"], "hello")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("novalue")


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_finetune_backbones_must_be_extracted_backbones_and_default_to_all():
    from pipeline.config import load_config
    from study.schema import ConfigError

    assert load_config("configs/quick.toml")["finetune"]["backbones"] == []  # quick.toml leaves it unset
    assert load_config(overrides=['finetune.backbones=["efficientnet_lite1"]'])["finetune"]["backbones"] == [
        "efficientnet_lite1"]
    with pytest.raises(ConfigError, match=r"finetune.backbones.*resnet18"):
        load_config(overrides=['finetune.backbones=["resnet18"]'])
