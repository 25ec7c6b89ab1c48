"""base_models.cache: the decode-once cache, built from real image files."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from base_models.cache import CHUNK, build_cache, cache_files, load_cache
from base_models.images import decode
from oof import StackerError, read_json

SIZE = (8, 6)  # (H, W)


def _images(folder, n, seed=0):
    """n small noise PNGs of varied shapes; returns (ids, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids, paths = [], []
    for i in range(n):
        h, w = 10 + i % 3, 12 + i % 5
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        ids.append(path.name)
        paths.append(path)
    return ids, paths


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@pytest.fixture
def small(tmp_path):
    return _images(tmp_path / "img", 5)


def test_build_writes_decoded_images(tmp_path, small):
    ids, paths = small
    logs = []
    cache = build_cache(tmp_path / "cache", "train", ids, paths, SIZE, "crop", workers=1, log=logs.append)
    assert cache.images.shape == (5, 8, 6, 3) and cache.images.dtype == np.uint8
    assert cache.size == SIZE and list(cache.ids) == ids
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(cache.images[i], decode(p, SIZE, "crop"))
    data, index = cache_files(tmp_path / "cache", "train")
    assert data.stat().st_size == 5 * 8 * 6 * 3
    assert read_json(index) == {"ids": ids, "paths": [str(p) for p in paths], "size": [8, 6], "resize": "crop"}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train.json", "train.u8"]
    assert len(logs) == 1 and "5 images at 8x6 (crop)" in logs[0]
    again = load_cache(tmp_path / "cache", "train")
    np.testing.assert_array_equal(again.images, cache.images)
    assert list(again.ids) == ids


def test_identical_build_does_not_decode_again(tmp_path, small):
    ids, paths = small
    cache_dir = tmp_path / "cache"
    first = np.array(build_cache(cache_dir, "train", ids, paths, SIZE, "squish", workers=1, log=lambda m: None).images)
    data, index = cache_files(cache_dir, "train")
    before = _stat(data), _stat(index)
    logs = []
    second = build_cache(cache_dir, "train", ids, paths, SIZE, "squish", workers=1, log=logs.append)
    assert (_stat(data), _stat(index)) == before and logs == []
    np.testing.assert_array_equal(second.images, first)


@pytest.mark.parametrize("change", ["size", "resize", "ids", "paths"])
def test_changed_inputs_rebuild(tmp_path, small, change):
    ids, paths = small
    cache_dir = tmp_path / "cache"
    build_cache(cache_dir, "train", ids, paths, SIZE, "squish", workers=1, log=lambda m: None)
    data, _ = cache_files(cache_dir, "train")
    before = _stat(data)
    size, resize = SIZE, "squish"
    if change == "size":
        size = (12, 10)
    elif change == "resize":
        resize = "pad"
    elif change == "ids":
        ids = [f"x{i}" for i in ids]
    else:
        paths = paths[::-1]
    logs = []
    cache = build_cache(cache_dir, "train", ids, paths, size, resize, workers=1, log=logs.append)
    assert _stat(data) != before and len(logs) == 1
    assert cache.images.shape == (5, *size, 3) and list(cache.ids) == list(ids)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(cache.images[i], decode(p, size, resize))


def test_one_and_two_workers_give_identical_bytes(tmp_path):
    ids, paths = _images(tmp_path / "img", CHUNK + 6)  # two chunks, so two workers really share the work
    logs = []
    build_cache(tmp_path / "one", "train", ids, paths, SIZE, "squish", workers=1, log=lambda m: None)
    build_cache(tmp_path / "two", "train", ids, paths, SIZE, "squish", workers=2, log=logs.append)
    one = cache_files(tmp_path / "one", "train")[0].read_bytes()
    two = cache_files(tmp_path / "two", "train")[0].read_bytes()
    assert len(one) == (CHUNK + 6) * 8 * 6 * 3
    assert one == two
    assert any(f"{CHUNK + 6}/{CHUNK + 6} images" in m for m in logs) and "with 2 workers" in logs[-1]


def _break(path, how):
    if how == "text":
        path.write_text("not an image")
    else:  # truncated PNG
        path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_image_fails_build_and_leaves_no_index(tmp_path, workers):
    ids, paths = _images(tmp_path / "img", CHUNK + 6)
    bad = paths[CHUNK + 2]  # in the second chunk
    _break(bad, "text")
    cache_dir = tmp_path / "cache"
    with pytest.raises(StackerError, match=rf"{bad.name}: cannot decode image"):
        build_cache(cache_dir, "train", ids, paths, SIZE, "squish", workers=workers, log=lambda m: None)
    assert not cache_files(cache_dir, "train")[1].exists()
    assert list(cache_dir.iterdir()) == []  # no data file, no temporary file
    with pytest.raises(StackerError, match=r"train\.json: image cache not found"):
        load_cache(cache_dir, "train")


def test_check_all_lists_every_bad_file(tmp_path, small):
    ids, paths = small
    _break(paths[1], "text")
    _break(paths[3], "truncated")
    with pytest.raises(StackerError, match=r"2 image\(s\) cannot be decoded") as e:
        build_cache(tmp_path / "cache", "train", ids, paths, SIZE, "squish", workers=1, check_all=True,
                    log=lambda m: None)
    msg = str(e.value)
    assert paths[1].name in msg and paths[3].name in msg
    for good in (paths[0], paths[2], paths[4]):
        assert good.name not in msg
    assert not cache_files(tmp_path / "cache", "train")[1].exists()


def test_empty_test_split(tmp_path):
    logs = []
    cache = build_cache(tmp_path / "cache", "test", [], [], SIZE, "squish", workers=2, log=logs.append)
    assert cache.images.shape == (0, 8, 6, 3) and len(cache.ids) == 0
    again = load_cache(tmp_path / "cache", "test")
    assert again.images.shape == (0, 8, 6, 3) and len(again.ids) == 0
    assert read_json(cache_files(tmp_path / "cache", "test")[1])["ids"] == []


class _Interrupt(Exception):
    pass


def _interrupt_after_data(message):
    # the summary line is logged after the data file is in place and before the index is written
    if "images at" in message:
        raise _Interrupt


def test_interrupted_rebuild_is_never_trusted(tmp_path, small):
    ids, paths = small
    cache_dir = tmp_path / "cache"
    build_cache(cache_dir, "train", ids, paths, SIZE, "squish", workers=1, log=lambda m: None)
    with pytest.raises(_Interrupt):
        build_cache(cache_dir, "train", ids, paths, (16, 12), "squish", workers=1, log=_interrupt_after_data)
    # back to the first settings: the cache must be rebuilt (or refused), never read with a stale index
    cache = build_cache(cache_dir, "train", ids, paths, SIZE, "squish", workers=1, log=lambda m: None)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(cache.images[i], decode(p, SIZE, "squish"))


def test_failed_rebuild_leaves_no_index(tmp_path, small):
    ids, paths = small
    cache_dir = tmp_path / "cache"
    build_cache(cache_dir, "train", ids, paths, SIZE, "squish", workers=1, log=lambda m: None)
    _break(paths[2], "text")
    with pytest.raises(StackerError, match=rf"{paths[2].name}: cannot decode image"):
        build_cache(cache_dir, "train", ids, paths, (12, 10), "squish", workers=1, log=lambda m: None)
    assert not cache_files(cache_dir, "train")[1].exists()
