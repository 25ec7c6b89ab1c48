"""The run's own files (folds, targets, duplicates): a killed writer's temporary file never outlives the rerun."""
from __future__ import annotations

from base_models.config import DataConfig, FoldsConfig
from base_models.jobs import prepare_run
from oof import RunPaths


def test_a_rerun_deletes_what_a_killed_writer_of_the_run_files_left(tmp_path, small_digits_dir):
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir(parents=True)
    left = [paths.root / f".{name}.x1y2z3_.tmp" for name in ("folds.parquet", "targets.parquet", "duplicates.csv")]
    for tmp in left:
        tmp.write_bytes(b"half a file")  # SIGKILL mid-write: atomic_path's temporary file stays
    prepare_run(paths, DataConfig(root=str(small_digits_dir)), FoldsConfig(k=3), (16, 16), log=lambda s: None)
    assert paths.folds.is_file() and paths.targets.is_file() and paths.duplicates.is_file()
    assert not [tmp.name for tmp in left if tmp.exists()]
    assert not list(paths.root.glob(".*.tmp"))
