"""oof.atomic: files get the umask's mode, a failed write leaves nothing, killed writers' temporaries go."""
from __future__ import annotations

import os
import stat

import pytest

from oof import atomic_path, remove_temps, write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_remove_temps_takes_only_the_named_files_temporaries(tmp_path):
    for name in (".fold0.safetensors.abc.tmp", ".fold1.safetensors.def.tmp", "fold0.safetensors"):
        (tmp_path / name).write_text("x")
    remove_temps(tmp_path, "fold0.")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fold1.safetensors.def.tmp", "fold0.safetensors"]


def test_a_damaged_json_file_is_one_line_naming_it(tmp_path):
    from oof import StackerError, read_json

    (tmp_path / "fold0.history.json").write_text('{"epochs": [')
    with pytest.raises(StackerError, match=r"fold0\.history\.json: damaged JSON \(JSONDecodeError"):
        read_json(tmp_path / "fold0.history.json")
