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
