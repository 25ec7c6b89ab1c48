"""base_models.duplicates: the perceptual hash, near pairs and capped clusters, and the hashes the cache records."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from base_models import duplicates
from base_models.cache import HASH_DRAFT, CacheOptions, build_cache, load_cache, split_digest
from base_models.duplicates import (HASH_SPEC, HASH_WORDS, PAIR_COLUMNS, DuplicateOptions, SplitImages,
                                    find_duplicates, hash_hex, hash_table, hash_words, image_hash, near_pairs,
                                    popcount, write_duplicates)
from base_models.images import decode, load_rgb
from oof import RunPaths, StackerError, read_json, write_json
from tiny import silent


def _photo(rng, h=96, w=128) -> Image.Image:
    """A smooth random RGB field with a little noise: photo-like low frequencies."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    z = (rng.standard_normal((3, h, w // 2 + 1)) + 1j * rng.standard_normal((3, h, w // 2 + 1))) / f
    a = np.moveaxis(np.fft.irfft2(z, s=(h, w)), 0, -1)
    a = (a - a.mean()) / a.std() * 40 + 128 + rng.normal(0, 3, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _save(img: Image.Image, path, quality=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=quality) if path.suffix == ".jpg" else img.save(path)
    return path


def _hashes(files) -> np.ndarray:
    return np.stack([image_hash(load_rgb(f, draft_size=HASH_DRAFT)) for f in files])


def _find(train_ids, labels, hashes, pixels=None, test_ids=(), test_hashes=None, test_pixels=None, **options):
    test_hashes = np.zeros((0, HASH_WORDS), np.uint64) if test_hashes is None else test_hashes
    return find_duplicates(SplitImages(train_ids, labels, hashes, pixels),
                           SplitImages(list(test_ids), None, test_hashes, test_pixels), DuplicateOptions(**options))


def _split(cache, labels=None) -> SplitImages:
    return SplitImages(cache.ids, labels, cache.hashes, cache.pixel_digests)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Six distinct JPEG sources in train, three planted train copies and one test copy, built into a cache.

    Rows: src0..src5, then copy0 (resized 0.7x, JPEG 75), copy1 (JPEG 60), copy2 (10% darker); test: t0 (a
    copy of src3 resized 0.5x) and t1 (distinct).
    """
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    sources = [_photo(rng) for _ in range(6)]
    train = [_save(img, root / f"src{i}.jpg") for i, img in enumerate(sources)]
    train += [_save(sources[0].resize((90, 67), Image.BICUBIC), root / "copy0.jpg", 75),
              _save(sources[1], root / "copy1.jpg", 60),
              _save(ImageEnhance.Brightness(sources[2]).enhance(0.9), root / "copy2.jpg")]
    test = [_save(sources[3].resize((64, 48), Image.BICUBIC), root / "t0.jpg"), _save(_photo(rng), root / "t1.jpg")]
    run = RunPaths(root / "run")
    options = CacheOptions((16, 16), workers=1)
    caches = [build_cache(run, split, [f.stem for f in files], files, options, log=silent)
              for split, files in (("train", train), ("test", test))]
    labels = ["a", "b", "c", "d", "e", "f", "a", "b", "x"]  # copy2 is labelled unlike its source
    return caches, labels


def test_planted_copies_are_found_and_clustered_and_distinct_images_are_not(planted):
    (train, test), labels = planted
    found = find_duplicates(_split(train, labels), _split(test), DuplicateOptions())
    assert list(found.pairs.columns) == PAIR_COLUMNS
    pairs = found.pairs[["kind", "id_a", "id_b"]].values.tolist()
    assert sorted(pairs) == [["train", "src0", "copy0"], ["train", "src1", "copy1"], ["train", "src2", "copy2"],
                             ["train-test", "src3", "t0"]]
    assert found.pairs["distance"].between(0, DuplicateOptions().max_distance).all()
    assert found.cluster.dtype == np.int64
    np.testing.assert_array_equal(found.cluster, [0, 1, 2, -1, -1, -1, 0, 1, 2])  # train-test pairs: no cluster
    conflict = found.pairs.set_index("id_b")["conflict"]
    assert conflict["copy2"] and not conflict["copy0"] and not conflict["t0"]
    assert found.pairs.set_index("id_b").loc["t0", "label_b"] == ""
    assert found.summary() == ("duplicates: 6 train images in 3 clusters (largest 2), 1 label conflicts, "
                               "1 train images also in test, 0 test pairs")
    assert found.warnings == []


def test_many_distinct_images_make_no_pair(tmp_path):
    rng = np.random.default_rng(1)
    files = [_save(_photo(rng, 48, 64), tmp_path / f"{i}.png") for i in range(40)]
    found = _find([f.stem for f in files], ["a"] * 40, _hashes(files))
    assert found.pairs.empty and (found.cluster == -1).all()
    assert found.summary().startswith("duplicates: 0 train images in 0 clusters (largest 0)")


def test_equal_pixels_pair_at_distance_zero_whatever_the_hashes(tmp_path):
    rng = np.random.default_rng(2)
    img = _photo(rng, 48, 64)
    files = [_save(img, tmp_path / "a.png"), _save(img, tmp_path / "b.png"), _save(_photo(rng, 48, 64),
                                                                                  tmp_path / "c.png")]
    hashes = _hashes(files)
    assert hash_hex(hashes[0]) == hash_hex(hashes[1])
    far = np.stack([hashes[0], ~hashes[0], hashes[2]])  # equal pixel digests, hashes 256 bits apart
    pixels = ["p0", "p0", "p2"]
    for h in (hashes, far):
        found = _find(["a", "b", "c"], ["1", "1", "1"], h, pixels)
        assert found.pairs[["id_a", "id_b", "distance"]].values.tolist() == [["a", "b", 0]]


def test_test_pairs_are_listed_after_train_and_train_test_pairs():
    h = np.zeros((1, HASH_WORDS), np.uint64)
    found = _find(["tr"], ["a"], h, test_ids=["t1", "t2"], test_hashes=np.concatenate([h, h]))
    assert found.pairs[["kind", "id_a", "id_b"]].values.tolist() == [
        ["train-test", "tr", "t1"], ["train-test", "tr", "t2"], ["test", "t1", "t2"]]
    assert found.summary().endswith("1 train images also in test, 1 test pairs")
    np.testing.assert_array_equal(found.cluster, [-1])


def test_clusters_stop_at_max_cluster_with_a_warning_and_merge_nearest_first():
    base = np.zeros(HASH_WORDS, np.uint64)
    one_bit = base.copy()
    one_bit[0] = 1
    hashes = np.stack([base, base, base, base, one_bit])  # four at 0 bits, one at 1 bit from them
    found = _find(list("abcde"), list("xxxxx"), hashes, max_cluster=3)
    np.testing.assert_array_equal(found.cluster, [0, 0, 0, 1, 1])  # a-b-c first; d joins e, at 1 bit
    assert len(found.pairs) == 10  # every pair is listed, merged or not
    assert len(found.warnings) == 1
    assert found.warnings[0].startswith("duplicates: cluster 0 (3 train images: a, b, c) reached max_cluster=3; ")
    assert "a ~ d at distance 0" in found.warnings[0]
    assert found.summary().endswith(", 1 clusters capped")


def test_output_is_deterministic_and_written_as_csv(tmp_path, planted):
    (train, test), labels = planted
    runs = [find_duplicates(_split(train, labels), _split(test), DuplicateOptions()) for _ in range(2)]
    pd.testing.assert_frame_equal(runs[0].pairs, runs[1].pairs)
    write_duplicates(tmp_path / "dups.csv", runs[0])
    back = pd.read_csv(tmp_path / "dups.csv", keep_default_na=False)
    assert back[["kind", "id_a", "id_b", "distance", "conflict"]].values.tolist() == \
        runs[0].pairs[["kind", "id_a", "id_b", "distance", "conflict"]].values.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["dups.csv"]


def test_near_pairs_match_brute_force_and_the_byte_table(monkeypatch):
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, (300, HASH_WORDS), dtype=np.uint64)
    hashes[150:] = hashes[:150] ^ (rng.random((150, HASH_WORDS)) < 0.02) * rng.integers(1, 2**63, (150, 4),
                                                                                         dtype=np.uint64)
    bits = np.unpackbits(hashes.view(np.uint8), axis=1)
    brute = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    a, b, d = near_pairs(hashes, 100)
    want = np.argwhere(np.triu(brute <= 100, 1))
    np.testing.assert_array_equal(np.stack([a, b], 1), want)
    np.testing.assert_array_equal(d, brute[a, b])
    fast = popcount(hashes)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    np.testing.assert_array_equal(popcount(hashes), fast)


def test_hash_text_round_trip_and_errors():
    words = np.array([0, 1, 2**64 - 1, 0x0123456789ABCDEF], dtype=np.uint64)
    text = hash_hex(words)
    assert text == "0" * 16 + "0" * 15 + "1" + "f" * 16 + "0123456789abcdef"
    np.testing.assert_array_equal(hash_words(text), words)
    np.testing.assert_array_equal(hash_table([text, text]), np.stack([words, words]))
    assert hash_table([]).shape == (0, HASH_WORDS)
    for bad, match in [("abc", "16 hex digits per word"), ("g" * 16, "not hexadecimal"), ("", "16 hex digits")]:
        with pytest.raises(StackerError, match=match):
            hash_words(bad)
    with pytest.raises(StackerError, match="not all strings of 16 hex digits"):
        hash_table(["0" * 16, "0" * 32])


def test_image_hash_is_256_bits_of_any_mode():
    img = _photo(np.random.default_rng(4), 40, 50)
    h = image_hash(img)
    assert h.shape == (HASH_WORDS,) and h.dtype == np.uint64 and duplicates.HASH_BITS == 256
    assert hash_hex(image_hash(img.convert("L"))) == hash_hex(h)
    assert 100 <= int(popcount(h).sum()) <= 156  # about half the bits: a median threshold


@pytest.mark.parametrize("options, match", [({"max_distance": -1}, "max_distance -1"),
                                            ({"max_distance": 256}, "max_distance 256"),
                                            ({"max_cluster": 1}, "max_cluster 1 is under 2")])
def test_bad_options(options, match):
    with pytest.raises(StackerError, match=match):
        DuplicateOptions(**options)


def test_bad_inputs_are_named():
    h = np.zeros((2, HASH_WORDS), np.uint64)
    with pytest.raises(StackerError, match=r"train hashes of shape \(2, 4\) for 3 train ids"):
        _find(["a", "b", "c"], ["x"] * 3, h)
    with pytest.raises(StackerError, match="1 train labels for 2 train ids"):
        _find(["a", "b"], ["x"], h)
    with pytest.raises(StackerError, match="train hashes of 4 words, test hashes of 2"):
        _find(["a", "b"], ["x"] * 2, h, test_ids=["t"], test_hashes=np.zeros((1, 2), np.uint64))


# The cache's hashes.

@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory):
    """Two 500x460 JPEGs: large enough that the decoder's draft scale depends on the cache size."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(5)
    files = [_save(_photo(rng, 460, 500), root / f"big{i}.jpg") for i in range(2)]
    return [f.stem for f in files], files


@pytest.mark.parametrize("size, resize", [((8, 6), "squish"), ((224, 224), "crop"), ((300, 280), "pad")])
def test_cache_hashes_do_not_depend_on_cache_size_or_resize_mode(tmp_path, big_jpegs, size, resize):
    ids, files = big_jpegs
    run = RunPaths(tmp_path / "run")
    cache = build_cache(run, "train", ids, files, CacheOptions(size, resize, workers=1), log=silent)
    index = read_json(run.cache_index("train"))
    assert index["hash"] == HASH_SPEC
    assert index["hashes"] == [hash_hex(image_hash(load_rgb(f, draft_size=HASH_DRAFT))) for f in files]
    assert cache.hashes.shape == (2, HASH_WORDS) and cache.hashes.dtype == np.uint64
    np.testing.assert_array_equal(cache.hashes, hash_table(index["hashes"]))
    # The pixels, and so the split's digest, are decode()'s: hashing changes neither.
    pixels = [hashlib.sha256(decode(f, size, resize).tobytes()).hexdigest() for f in files]
    assert list(cache.pixel_digests) == index["pixels"] == pixels
    assert cache.digest == index["digest"] == split_digest(ids, pixels, list(size), resize)


@pytest.mark.parametrize("old", [{"hash": None, "hashes": None}, {"hash": {"kind": "dct256", "version": 0}}])
def test_an_index_without_current_hashes_is_decoded_again_in_full(tmp_path, big_jpegs, old):
    ids, files = big_jpegs
    run = RunPaths(tmp_path / "run")
    options = CacheOptions((8, 6), workers=1)
    first = build_cache(run, "train", ids, files, options, log=silent)
    index = read_json(run.cache_index("train"))
    write_json(run.cache_index("train"), {k: v for k, v in {**index, **old}.items() if v is not None})
    assert load_cache(run, "train").hashes is None  # an index of no (or another) hash gives no hashes
    logs = []
    again = build_cache(run, "train", ids, files, options, log=logs.append)
    assert "2 images at 8x6" in logs[0]  # everything decoded, not "changed on disk"
    assert again.digest == first.digest
    np.testing.assert_array_equal(again.hashes, first.hashes)
    assert read_json(run.cache_index("train"))["hash"] == HASH_SPEC


def test_a_partial_update_keeps_the_other_rows_hashes(tmp_path, big_jpegs):
    ids, shared = big_jpegs
    files = [tmp_path / f.name for f in shared]
    for src, dst in zip(shared, files):
        dst.write_bytes(src.read_bytes())
    run = RunPaths(tmp_path / "run")
    options = CacheOptions((8, 6), workers=1)
    first = build_cache(run, "train", ids, files, options, log=silent)
    _save(_photo(np.random.default_rng(9), 60, 80), files[1])
    logs = []
    again = build_cache(run, "train", ids, files, options, log=logs.append)
    assert "1 of 2 images changed on disk" in logs[0]
    np.testing.assert_array_equal(again.hashes[0], first.hashes[0])
    np.testing.assert_array_equal(again.hashes[1], image_hash(load_rgb(files[1], draft_size=HASH_DRAFT)))

