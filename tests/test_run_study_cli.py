"""The command line: bad input fails before any work, with a message naming key, value and what is allowed."""
import tomllib

import pytest

import run_study


@pytest.mark.parametrize("args, message", [
    (["--set", "extract.viewz=1"], "unknown config key 'extract.viewz'"),
    (["--set", "classify.heads=[\"rf\"]"], "'classify.heads[0]' has value 'rf'; allowed: one of 'lr', 'svm', 'knn'"),
    (["--stages", "dataset,plot"], "'stages' has value"),
    (["--set", "seed=-3"], "'seed' has value -3"),
    (["--worker", "--stages", "dataset,report"], "--worker with stages ['dataset', 'report'] leaves nothing to help"),
])
def test_bad_config_fails_before_any_work(tmp_path, capsys, args, message):
    assert run_study.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    assert run_study.main(["--config", str(tmp_path / "none.toml"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    from pipeline.config import load_config
    from study.config import REPO_ROOT
    for path in sorted((REPO_ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert cfg["name"] == tomllib.loads(path.read_text()).get("name", "study"), path


def test_a_missing_source_folder_is_a_message_not_a_traceback(tmp_path, capsys):
    rc = run_study.main(["--config", "configs/quick.toml", "--data-root", str(tmp_path / "nowhere"),
                         "--out", str(tmp_path / "out"), "--stages", "dataset"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert "caltech101" in err


def test_a_random_test_network_in_a_study_is_warned_about_before_any_work(tmp_path, data_root, caplog):
    from pipeline.config import check_before_work, load_config

    config = load_config("configs/quick.toml",
                         overrides=['extract.backbones=["efficientnet_lite0", "test_efficientnet"]'])
    with caplog.at_level("WARNING"):
        check_before_work(config, data_root=data_root, out=tmp_path / "out")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "extract.backbones[1] = 'test_efficientnet' is a random-initialised test network" in warning
