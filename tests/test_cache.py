"""base_models.cache: the decode-once cache, built from real image files."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from base_models.cache import CHUNK, CacheOptions, build_cache, load_cache, split_digest
from base_models.config import DataConfig
from base_models.images import decode
from oof import RunPaths, StackerError, read_json, write_json
from tiny import silent

SIZE = (8, 6)  # (H, W)


def _images(folder, n, seed=0):
    """n small noise PNGs of varied shapes; returns (ids, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids, files = [], []
    for i in range(n):
        h, w = 10 + i % 3, 12 + i % 5
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        ids.append(path.name)
        files.append(path)
    return ids, files


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def _options(size=SIZE, resize="squish", workers=1, check_all=False):
    return CacheOptions(size, resize, workers, check_all)


@pytest.fixture
def small(tmp_path):
    return _images(tmp_path / "img", 5)


@pytest.fixture
def run(tmp_path):
    return RunPaths(tmp_path / "run")


def test_build_writes_decoded_images(run, small):
    ids, files = small
    logs = []
    cache = build_cache(run, "train", ids, files, _options(resize="crop"), log=logs.append)
    assert cache.images.shape == (5, 8, 6, 3) and cache.images.dtype == np.uint8
    assert cache.size == SIZE and list(cache.ids) == ids
    for i, p in enumerate(files):
        np.testing.assert_array_equal(cache.images[i], decode(p, SIZE, "crop"))
    assert run.cache_data("train").stat().st_size == 5 * 8 * 6 * 3
    index = read_json(run.cache_index("train"))
    assert {k: index[k] for k in ("ids", "paths", "size", "resize")} == {
        "ids": ids, "paths": [str(p) for p in files], "size": [8, 6], "resize": "crop"}
    assert index["files"] == [[os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    assert index["pixels"] == [hashlib.sha256(decode(p, SIZE, "crop").tobytes()).hexdigest() for p in files]
    assert index["digest"] == cache.digest == split_digest(ids, index["pixels"], [8, 6], "crop")
    assert sorted(run.cache.iterdir()) == sorted([run.cache_data("train"), run.cache_index("train"),
                                                  run.cache_lock("train")])
    assert len(logs) == 1 and "5 images at 8x6 (crop)" in logs[0]
    again = load_cache(run, "train")
    np.testing.assert_array_equal(again.images, cache.images)
    assert list(again.ids) == ids


def test_options_come_from_the_data_section():
    data = DataConfig(resize="pad", decode_workers=3, check_all_images=True)
    assert CacheOptions.from_data(data, [16, 12]) == CacheOptions((16, 12), "pad", 3, True)


def test_identical_build_does_not_decode_again(run, small):
    ids, files = small
    first = np.array(build_cache(run, "train", ids, files, _options(), log=silent).images)
    data, index = run.cache_data("train"), run.cache_index("train")
    before = _stat(data), _stat(index)
    logs = []
    second = build_cache(run, "train", ids, files, _options(), log=logs.append)
    assert (_stat(data), _stat(index)) == before and logs == []
    np.testing.assert_array_equal(second.images, first)


@pytest.mark.parametrize("change", ["size", "resize", "ids", "paths"])
def test_changed_inputs_rebuild(run, small, change):
    ids, files = small
    build_cache(run, "train", ids, files, _options(), log=silent)
    before = _stat(run.cache_data("train"))
    size, resize = SIZE, "squish"
    if change == "size":
        size = (12, 10)
    elif change == "resize":
        resize = "pad"
    elif change == "ids":
        ids = [f"x{i}" for i in ids]
    else:
        files = files[::-1]
    logs = []
    cache = build_cache(run, "train", ids, files, _options(size, resize), log=logs.append)
    assert _stat(run.cache_data("train")) != before and len(logs) == 1
    assert cache.images.shape == (5, *size, 3) and list(cache.ids) == list(ids)
    for i, p in enumerate(files):
        np.testing.assert_array_equal(cache.images[i], decode(p, size, resize))


def test_one_and_two_workers_give_identical_bytes(tmp_path):
    ids, files = _images(tmp_path / "img", CHUNK + 6)  # two chunks, so two workers really share the work
    one, two = RunPaths(tmp_path / "one"), RunPaths(tmp_path / "two")
    logs = []
    build_cache(one, "train", ids, files, _options(workers=1), log=silent)
    build_cache(two, "train", ids, files, _options(workers=2), log=logs.append)
    one_bytes, two_bytes = one.cache_data("train").read_bytes(), two.cache_data("train").read_bytes()
    assert len(one_bytes) == (CHUNK + 6) * 8 * 6 * 3
    assert one_bytes == two_bytes
    assert any(f"{CHUNK + 6}/{CHUNK + 6} images" in m for m in logs) and "with 2 workers" in logs[-1]


def _break(path, how):
    if how == "text":
        path.write_text("not an image")
    else:  # truncated PNG
        path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_image_fails_build_and_leaves_no_index(tmp_path, run, workers):
    ids, files = _images(tmp_path / "img", CHUNK + 6)
    bad = files[CHUNK + 2]  # in the second chunk
    _break(bad, "text")
    with pytest.raises(StackerError, match=rf"{bad.name}: cannot decode image"):
        build_cache(run, "train", ids, files, _options(workers=workers), log=silent)
    assert not run.cache_index("train").exists()
    assert list(run.cache.iterdir()) == [run.cache_lock("train")]  # no data file, no temporary file
    with pytest.raises(StackerError, match=r"train\.json: image cache not found"):
        load_cache(run, "train")


def test_check_all_lists_every_bad_file(run, small):
    ids, files = small
    _break(files[1], "text")
    _break(files[3], "truncated")
    with pytest.raises(StackerError, match=r"2 image\(s\) cannot be decoded") as e:
        build_cache(run, "train", ids, files, _options(check_all=True), log=silent)
    msg = str(e.value)
    assert files[1].name in msg and files[3].name in msg
    for good in (files[0], files[2], files[4]):
        assert good.name not in msg
    assert not run.cache_index("train").exists()


def test_empty_test_split(run):
    logs = []
    cache = build_cache(run, "test", [], [], _options(workers=2), log=logs.append)
    assert cache.images.shape == (0, 8, 6, 3) and len(cache.ids) == 0
    again = load_cache(run, "test")
    assert again.images.shape == (0, 8, 6, 3) and len(again.ids) == 0
    assert read_json(run.cache_index("test"))["ids"] == []


class _Interrupt(Exception):
    pass


def _interrupt_after_data(message):
    # the summary line is logged after the data file is in place and before the index is written
    if "images at" in message:
        raise _Interrupt


def test_interrupted_rebuild_is_never_trusted(run, small):
    ids, files = small
    build_cache(run, "train", ids, files, _options(), log=silent)
    with pytest.raises(_Interrupt):
        build_cache(run, "train", ids, files, _options((16, 12)), log=_interrupt_after_data)
    # back to the first settings: the cache must be rebuilt (or refused), never read with a stale index
    cache = build_cache(run, "train", ids, files, _options(), log=silent)
    for i, p in enumerate(files):
        np.testing.assert_array_equal(cache.images[i], decode(p, SIZE, "squish"))


def test_failed_rebuild_leaves_no_index(run, small):
    ids, files = small
    build_cache(run, "train", ids, files, _options(), log=silent)
    _break(files[2], "text")
    with pytest.raises(StackerError, match=rf"{files[2].name}: cannot decode image"):
        build_cache(run, "train", ids, files, _options((12, 10)), log=silent)
    assert not run.cache_index("train").exists()


# ---------------------------------------------------------------- what the cache knows of its files


def _rewrite(path, seed):
    """Overwrite an image with other pixels (same shape), its mtime moved on so even a coarse clock sees it."""
    rng = np.random.default_rng(seed)
    h, w = np.asarray(Image.open(path)).shape[:2]
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    _touch(path)


def _touch(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_an_overwritten_image_is_redecoded_alone_and_changes_the_digest(run, small):
    ids, files = small
    first = build_cache(run, "train", ids, files, _options(), log=silent)
    before, digest = np.array(first.images), first.digest
    _rewrite(files[3], seed=99)
    logs = []
    cache = build_cache(run, "train", ids, files, _options(), log=logs.append)
    assert logs == [logs[0]] and "1 of 5 images changed on disk, re-decoded" in logs[0]
    assert cache.digest != digest
    np.testing.assert_array_equal(cache.images[3], decode(files[3], SIZE, "squish"))
    assert not np.array_equal(cache.images[3], before[3])
    np.testing.assert_array_equal(np.delete(np.array(cache.images), 3, axis=0), np.delete(before, 3, axis=0))
    fresh = build_cache(RunPaths(run.root.parent / "fresh"), "train", ids, files, _options(), log=silent)
    assert fresh.digest == cache.digest  # the row-by-row update is the same cache a full build makes


def test_a_touched_but_identical_image_keeps_the_digest(run, small):
    ids, files = small
    digest = build_cache(run, "train", ids, files, _options(), log=silent).digest
    _touch(files[1])
    logs = []
    cache = build_cache(run, "train", ids, files, _options(), log=logs.append)
    assert "1 of 5 images changed on disk, re-decoded" in logs[0]  # decoded again: a stat cannot tell
    assert cache.digest == digest  # the same pixels: every job trained on it stays current
    assert read_json(run.cache_index("train"))["files"][1][1] == os.stat(files[1]).st_mtime_ns


@pytest.mark.parametrize("change", ["add", "remove"])
def test_an_added_or_removed_image_rebuilds(tmp_path, run, small, change):
    ids, files = small
    digest = build_cache(run, "train", ids, files, _options(), log=silent).digest
    if change == "add":
        _, more_files = _images(tmp_path / "more", 6, seed=5)
        ids, files = ids + ["extra.png"], files + [more_files[5]]
    else:
        ids, files = ids[:-1], files[:-1]
    logs = []
    cache = build_cache(run, "train", ids, files, _options(), log=logs.append)
    assert len(logs) == 1 and f"{len(ids)} images at 8x6" in logs[0]  # a full build's line
    assert cache.digest != digest and list(cache.ids) == ids
    for i, p in enumerate(files):
        np.testing.assert_array_equal(cache.images[i], decode(p, SIZE, "squish"))


@pytest.mark.parametrize("change", ["size", "resize"])
def test_cache_size_and_resize_mode_are_part_of_the_digest(run, small, change):
    ids, files = small
    digest = build_cache(run, "train", ids, files, _options(), log=silent).digest
    options = _options((10, 6)) if change == "size" else _options(resize="pad")
    assert build_cache(run, "train", ids, files, options, log=silent).digest != digest


def test_an_index_of_an_older_version_is_rebuilt_and_never_loaded(run, small):
    ids, files = small
    build_cache(run, "train", ids, files, _options(), log=silent)
    old = read_json(run.cache_index("train"))
    write_json(run.cache_index("train"), {k: old[k] for k in ("ids", "paths", "size", "resize")})
    with pytest.raises(StackerError, match=r"train\.json: an image cache of an older version \(no digest\)"):
        load_cache(run, "train")
    logs = []
    assert build_cache(run, "train", ids, files, _options(), log=logs.append).digest == old["digest"]
    assert "5 images at 8x6" in logs[0]


def test_a_reader_of_the_old_cache_keeps_its_pixels_during_an_update(run, small):
    ids, files = small
    reader = build_cache(run, "train", ids, files, _options(), log=silent)  # a job's memmap, open while ...
    before = np.array(reader.images)
    _rewrite(files[0], seed=7)
    build_cache(run, "train", ids, files, _options(), log=silent)  # ... another process updates the cache
    np.testing.assert_array_equal(np.array(reader.images), before)


def test_interrupted_update_leaves_no_index(run, small):
    ids, files = small
    build_cache(run, "train", ids, files, _options(), log=silent)
    _rewrite(files[2], seed=3)
    with pytest.raises(_Interrupt):
        build_cache(run, "train", ids, files, _options(), log=_interrupt_after_update)
    assert not run.cache_index("train").exists()
    cache = build_cache(run, "train", ids, files, _options(), log=silent)
    np.testing.assert_array_equal(cache.images[2], decode(files[2], SIZE, "squish"))


def _interrupt_after_update(message):
    if "re-decoded" in message:  # logged after the data file is in place, before the index is written
        raise _Interrupt


def test_the_index_records_a_perceptual_hash_per_row_outside_the_digest(run, small):
    from base_models.cache import HASH_DRAFT
    from base_models.duplicates import HASH_SPEC, HASH_WORDS, hash_hex, image_hash
    from base_models.images import load_rgb

    ids, files = small
    cache = build_cache(run, "train", ids, files, _options(), log=silent)
    index = read_json(run.cache_index("train"))
    assert index["hash"] == HASH_SPEC
    assert index["hashes"] == [hash_hex(image_hash(load_rgb(p, draft_size=HASH_DRAFT))) for p in files]
    assert cache.hashes.shape == (5, HASH_WORDS) and list(cache.pixel_digests) == index["pixels"]
    assert cache.digest == split_digest(ids, index["pixels"], [8, 6], "squish")  # hashes are not in it
