"""run.yaml across train-base calls: hand-set sections survive, the file stays relocatable."""
from __future__ import annotations

import yaml

from oof import RunPaths, write_run_config


def test_submit_and_engine_sections_set_by_hand_survive_a_later_train_base(tmp_path):
    paths = RunPaths(tmp_path / "run")
    write_run_config(paths, {"data": {"root": str(tmp_path / "data")}, "models": [{"name": "a", "arch": "x"}]})
    saved = yaml.safe_load(paths.config.read_text())
    saved.update({"submit": {"format": "proba"}, "engine": {"name": "ray"}})
    paths.config.write_text(yaml.safe_dump(saved))
    write_run_config(paths, {"data": {"root": str(tmp_path / "data")}, "models": [{"name": "b", "arch": "y"}]})
    again = yaml.safe_load(paths.config.read_text())
    assert again["submit"] == {"format": "proba"} and again["engine"] == {"name": "ray"}
    assert [m["name"] for m in again["models"]] == ["a", "b"]
    assert again["run_dir"] == "." and again["data"]["root"] == "../data"
    write_run_config(paths, {"submit": {"format": "labels"}})  # given explicitly: the new value wins
    assert yaml.safe_load(paths.config.read_text())["submit"] == {"format": "labels"}


def test_an_older_run_yaml_inside_a_moved_run_names_the_run_it_is_in(tmp_path):
    """run.yaml from before `run_dir: .` (absolute paths), read with --config after the run moved."""
    from oof import load_config

    run = tmp_path / "moved"
    paths = RunPaths(run)
    run.mkdir()
    paths.config.write_text(yaml.safe_dump({"run_dir": "/old/place/run", "data": {"root": "/old/place/data"}}))
    assert load_config(str(paths.config))["run_dir"] == "/old/place/run"  # not a run yet: the file's word
    paths.folds.write_bytes(b"")  # the run's folds beside it: this folder is the run
    assert load_config(str(paths.config))["run_dir"] == str(run.resolve())
