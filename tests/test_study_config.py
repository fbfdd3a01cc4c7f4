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


def test_a_validated_config_is_read_only_and_survives_pickling():
    import pickle

    from study.config import dump_config
    from study.schema import Section

    cfg = load_config()
    assert cfg.finetune.patience == cfg["finetune"]["patience"] and isinstance(cfg.finetune, Section)
    with pytest.raises(TypeError, match="read-only"):
        cfg["finetune"]["patience"] = 1
    with pytest.raises(TypeError, match="read-only"):
        cfg.finetune.update(patience=1)
    with pytest.raises(AttributeError, match="no key 'patiencee'"):
        cfg.finetune.patiencee  # noqa: B018
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and isinstance(again.classify.lr, Section) and isinstance(again.tune.finetune, Section)
    changed = {**cfg.finetune, "patience": 1}  # a changed copy is a plain table
    assert changed["patience"] == 1 and cfg.finetune.patience != 1
    assert "patience" in dump_config(cfg)
    # Defaults are copies: changing one run's list does not change the next run's default.
    load_config().classify.heads.append("x")
    assert "x" not in load_config().classify.heads


def test_a_fine_tunes_keys_change_only_with_a_declared_field():
    """The fit and search keys are built from the [finetune] fields declared keyed (finetune/config.py) and the
    searched axes, so a key the config gains that is not declared — or a run setting like the worker count —
    leaves every key as it was."""
    import pandas as pd

    from finetune.config import FIXED_KEYS, SCHEMA, SEARCH_AXES
    from finetune.experiment import _Experiment
    from finetune.search import search_spec
    from study import tune
    from study.hashing import spec_hash

    class Inputs:  # what fit_spec asks of a fine-tune's inputs: whether a policy reads the store, and its rows
        def cached(self, policy):
            return True

        def identity(self, policy, parts):
            return f"rows of {policy} {parts}"

    cfg = load_config()
    space = tune.parse_space(cfg.tune.finetune, integers=tune.FINETUNE_INTEGERS)

    def keys(hp, point=None):
        manifest = pd.DataFrame({"label": [0, 1], "class_name": ["a", "b"]})
        exp = _Experiment(backbone=None, manifest=manifest, hp=hp, seed=0, device="cpu", finetune_dir=".",
                          rows=Inputs(), base={"backbone": "b"}, on_epoch_end=None)
        fit = exp.fit_spec(policy="last:1", params=point or {"lr": 1e-3, "backbone_lr_mult": 0.1, "epochs": 3,
                                                              "weight_decay": 0.01, "label_smoothing": 0.1},
                           fit_on="train", epochs=None, init=None)
        run = search_spec(base={"backbone": "b"}, policies=["last:1"], space=space, tune_cfg=cfg.tune, hp=hp,
                          inputs={})
        return spec_hash(fit), spec_hash(run)

    hp = {**cfg.finetune, "views": 2}
    base = keys(hp)
    assert keys({**hp, "a_key_added_later": 1, "num_workers": 7, "ensembles": [["a", "b"]]}) == base
    assert set(FIXED_KEYS) < set(SCHEMA) and "num_workers" not in FIXED_KEYS
    for field, value in (("dropout", 0.5), ("batch_size", 7), ("augment", "none")):
        assert field in FIXED_KEYS
        changed = keys({**hp, field: value})
        assert changed[0] != base[0] and changed[1] != base[1], field
    assert keys({**hp, "n_boot": 7})[0] == base[0] != keys({**hp, "n_boot": 7})[1]  # the bootstrap: the row only
    assert keys(hp, {"lr": 2e-3, "backbone_lr_mult": 0.1, "epochs": 3, "weight_decay": 0.01,
                     "label_smoothing": 0.1})[0] != base[0]  # a searched axis changes the fit
    assert set(SEARCH_AXES) == set(cfg.tune.finetune)
