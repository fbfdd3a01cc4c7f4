"""One source of defaults a config names (``extends``), and --show-config: every key, its meaning, its origin."""
import tomllib

import pytest

import run_study
from pipeline.config import load_config, show_config, study_schema
from study.config import REPO_ROOT
from study.schema import ConfigError, Field, plain, validate


def _write(path, text: str):
    path.write_text(text)
    return path


def test_a_config_that_extends_default_starts_from_the_default_study(tmp_path):
    mine = _write(tmp_path / "mine.toml", 'extends = "default"\nname = "mine"\n[[data.sources]]\nname = "m"\n'
                  'path = "/data/m"\n[data.split]\nprotocol = "fraction"\n')
    cfg, default = load_config(mine), load_config(REPO_ROOT / "configs" / "default.toml")
    assert cfg["name"] == "mine" and [s["name"] for s in cfg["data"]["sources"]] == ["m"]  # arrays replace
    assert cfg["data"]["split"]["protocol"] == "fraction"  # tables merge key by key...
    assert cfg["data"]["split"]["too_few"] == default["data"]["split"]["too_few"] == "drop"  # ...keeping the rest
    for key in ("seeds", "extract", "classify", "finetune", "tune"):
        assert plain(cfg[key]) == plain(default[key]), key
    bare = load_config(_write(tmp_path / "bare.toml", 'name = "bare"\n[[data.sources]]\nname = "m"\npath = "/d"\n'))
    assert bare["extract"]["backbones"] == ["efficientnet_lite0"] and bare["seeds"] == []  # the built-in defaults


def test_extends_takes_a_path_and_refuses_a_cycle_or_an_unknown_name(tmp_path):
    _write(tmp_path / "base.toml", 'extends = "quick"\n[tune]\ntrials = 3\n')
    assert load_config(_write(tmp_path / "top.toml", 'extends = "base.toml"\n'))["tune"]["trials"] == 3
    assert load_config(tmp_path / "top.toml")["extract"]["batch_size"] == 32  # from quick.toml, two levels down
    _write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    _write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match="'extends'.*'nope'.*default"):
        load_config(_write(tmp_path / "c.toml", 'extends = "nope"\n'))


def test_every_key_has_a_meaning():
    from dataset.config import SOURCE

    def missing(schema, prefix=""):
        for key, spec in schema.items():
            if isinstance(spec, dict):
                yield from missing(spec, f"{prefix}{key}.")
            elif isinstance(spec, Field) and not spec.help:
                yield prefix + key
    assert [*missing(study_schema()), *missing(SOURCE, "data.sources.")] == []


def test_show_config_is_the_resolved_config_with_meanings_and_origins(tmp_path, capsys):
    mine = _write(tmp_path / "mine.toml", 'extends = "quick"\n[tune]\ntrials = 4\n')
    assert run_study.main(["--config", str(mine), "--show-config", "--set", "classify.bootstrap=7"]) == 0
    text = capsys.readouterr().out
    assert plain(validate(tomllib.loads(text), study_schema())) == \
        plain(load_config(mine, overrides=["classify.bootstrap=7"]))  # it is itself the config
    origin, table, comment = {}, "", None  # dotted key -> the comment line above it
    for line in text.splitlines():
        if line.startswith("["):
            table = line.split("]")[0].strip("[") + "."
        elif line.startswith("# "):
            comment = line
        elif " = " in line and comment is not None:
            origin[table + line.split(" = ")[0]], comment = comment, None
    assert origin["tune.trials"].endswith("[" + str(mine) + "]") and "trials per (backbone" in origin["tune.trials"]
    assert origin["fewshot.trials"].endswith("quick.toml]")
    assert origin["classify.bootstrap"].endswith("[--set]") and origin["extract.batch_size"].endswith("quick.toml]")
    assert origin["dev_seeds"].endswith("[built-in default]")
    assert show_config(mine) != text  # the override shows


@pytest.mark.parametrize("name", ["a/b", "..", "", "x\\y"])
def test_a_run_name_that_is_not_one_folder_name_is_refused_naming_the_key(name, tmp_path, capsys):
    assert run_study.main(["--set", f'name="{name}"'.replace("\\", "\\\\"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'name'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
