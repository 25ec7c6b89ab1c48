"""Groups travel with the folds: `Folds.groups` through folds.parquet and foreign tables, merged group
column and duplicate clusters, `folds.duplicates`, and train-base's fold step on images with planted copies."""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from base_models.config import DataConfig, FoldsConfig, split_clusters
from base_models.dataset import DatasetSpec
from oof import (RunPaths, StackerError, build_config, folds_from_table, group_folds, load_config, load_folds,
                 make_folds, make_group_folds, merge_groups, read_fold_file, write_folds)
from oof.folds import META_KEY

IDS = [f"r{i:02d}" for i in range(24)]
LABELS = ["a", "b", "c"] * 8
PAIRS = [f"g{i // 2}" for i in range(24)]  # 12 groups of two rows, sorted g0, g1, g10, g11, g2, ...

# Made before folds carried groups (pyarrow 26.0.1): an ungrouped file keeps its digest and its bytes,
# and grouped folds of a group column keep their fold numbers.
PLAIN_SHA256 = "a0dde57bdb31430725fc1f5e6bb31431cf3fcab2d730d4df208f13fd727814eb"
PLAIN_FILE_SHA256 = "48e29de31ad348a58ea6536866c88399a63cfcd039959b75a8a4310f5da32086"
REPEATS_SHA256 = "c30603a533f4b9dd15485daf39aa973dde421d5307f77c502f657743c4d32eb8"
REPEATS_FILE_SHA256 = "314694ee240e90ef470b8c6503953f5dada362a643e32cde19e79937701a9eb9"
GROUPED_SHA256 = "48fb448bb2c1c6d491a6beeaecc611e746047af925c903443b51a1203830019e"
GROUPED_REPEATS_SHA256 = "d58a6cd10969f37871e0afa2bb2c0ebf072da507dddef193a378e15d613afd2a"


def _train(**columns) -> pd.DataFrame:
    return pd.DataFrame({"id": IDS, "label": LABELS, "pair": PAIRS, **columns})


def _meta(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[META_KEY])


# ---------------------------------------------------------------- Folds.groups and folds.parquet


def test_groups_round_trip_through_folds_parquet(tmp_path):
    folds = make_group_folds(_train(), "pair", k=3, seed=5, repeats=2)
    assert list(folds.groups) == PAIRS and list(folds.table.columns) == ["id", "label", "fold", "repeat", "group"]
    sorted_number = [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 2, 3]  # of g0..g11 in sorted name order
    np.testing.assert_array_equal(folds.group_index, [sorted_number[i // 2] for i in range(24)])
    assert folds.group_index.dtype == np.int64
    rows = "".join(f"{i}\t{g}\n" for i, g in zip(IDS, PAIRS))
    assert folds.groups_sha256 == hashlib.sha256(rows.encode()).hexdigest()
    write_folds(tmp_path / "folds.parquet", folds)
    assert _meta(tmp_path / "folds.parquet") == {"k": 3, "seed": 5, "classes": ["a", "b", "c"],
                                                 "sha256": folds.sha256, "repeats": 2,
                                                 "groups_sha256": folds.groups_sha256}
    back = load_folds(tmp_path / "folds.parquet")
    assert (back.sha256, back.groups_sha256, list(back.groups)) == (folds.sha256, folds.groups_sha256, PAIRS)
    for view in back.each_repeat():  # each repeat keeps the groups, whole in its folds
        assert list(view.groups) == PAIRS and view.groups_sha256 == folds.groups_sha256
        assert (pd.Series(view.fold).groupby(PAIRS).nunique() == 1).all()


def test_folds_without_groups_keep_their_bytes_and_digest(tmp_path):
    plain, three = make_folds(IDS, LABELS, k=3, seed=5), make_folds(IDS, LABELS, k=3, seed=5, repeats=2)
    assert (plain.groups, plain.group_index, plain.groups_sha256) == (None, None, None)
    assert (plain.sha256, three.sha256) == (PLAIN_SHA256, REPEATS_SHA256)
    for name, folds, file_sha256 in (("plain", plain, PLAIN_FILE_SHA256), ("three", three, REPEATS_FILE_SHA256)):
        write_folds(tmp_path / f"{name}.parquet", folds)
        # the writer as it was before groups: the table alone, its metadata, nothing else
        meta = {"k": 3, "seed": 5, "classes": ["a", "b", "c"], "sha256": folds.sha256,
                **({"repeats": 2} if folds.repeats > 1 else {})}
        table = pa.Table.from_pandas(folds.table, preserve_index=False)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, META_KEY: json.dumps(meta).encode()}),
                       tmp_path / f"{name}.before.parquet")
        data = (tmp_path / f"{name}.parquet").read_bytes()
        assert data == (tmp_path / f"{name}.before.parquet").read_bytes()
        if pa.__version__ == "26.0.1":  # the file records the writer's version
            assert hashlib.sha256(data).hexdigest() == file_sha256
        assert "group" not in pq.read_schema(tmp_path / f"{name}.parquet").names


def test_grouped_folds_of_a_group_column_keep_their_fold_numbers():
    for repeats, digest in ((1, GROUPED_SHA256), (2, GROUPED_REPEATS_SHA256)):
        folds = make_group_folds(_train(), "pair", k=3, seed=5, repeats=repeats)
        assert folds.sha256 == digest
        rows = _train().rename(columns={"pair": "group"})
        assert group_folds(rows, 3, 5, None, repeats).sha256 == digest  # the same maker over group values


def _rename_group(t):
    t.loc[t["group"] == "g3", "group"] = "zz"  # still whole: only the digest tells


def _move_row(t):
    t.loc[0, "group"] = t.loc[t["fold"] == t.loc[0, "fold"], "group"].iloc[-1]


@pytest.mark.parametrize("edit, match", [
    (_rename_group, r"folds\.parquet: groups were changed after the file was made \(groups_sha256 differs"),
    (lambda t: t.pop("group"), r"folds\.parquet: groups were changed"),
    (_move_row, r"folds\.parquet: groups were changed"),
])
def test_hand_edited_groups_are_refused(tmp_path, edit, match):
    path = tmp_path / "folds.parquet"
    write_folds(path, make_group_folds(_train(), "pair", k=3, seed=5))
    pf = pq.read_table(path)
    table = pf.to_pandas()
    edit(table)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(pf.schema.metadata), path)
    with pytest.raises(StackerError, match=match):
        load_folds(path)


def test_groups_added_to_an_ungrouped_file_are_refused(tmp_path):
    path = tmp_path / "folds.parquet"
    write_folds(path, make_folds(IDS, LABELS, k=3, seed=5))
    pf = pq.read_table(path)
    table = pf.to_pandas().assign(group=IDS)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(pf.schema.metadata), path)
    with pytest.raises(StackerError, match=r"folds\.parquet: groups were changed after the file was made"):
        load_folds(path)


# ---------------------------------------------------------------- groups from other tools


def test_a_foreign_folds_csv_carries_its_groups(tmp_path):
    made = make_group_folds(_train(), "pair", k=3, seed=5, repeats=2)
    made.table.iloc[::-1].to_csv(tmp_path / "folds.csv", index=False)
    back = load_folds(tmp_path / "folds.csv")
    assert (back.sha256, back.groups_sha256, back.seed) == (made.sha256, made.groups_sha256, None)
    assert dict(zip(back.ids, back.groups)) == dict(zip(IDS, PAIRS))


def _straddling(table):
    table.loc[table["id"] == "r00", "group"] = table.loc[table["fold"] != table.loc[0, "fold"], "group"].iloc[0]


def _blank(table):
    table.loc[table["id"].isin(["r03", "r07"]), "group"] = ""


def _moved_in_repeat_1(table):
    table.loc[(table["repeat"] == 1) & (table["id"] == "r05"), "group"] = "other"


@pytest.mark.parametrize("edit, match", [
    (_straddling, r"folds\.csv repeat 0: group 'g\d+' straddles 2 folds; a group's rows must share one fold"),
    (_blank, r"folds\.csv: empty group for 2 row\(s\), first ids 'r03', 'r07'; every row needs a group"),
    (_moved_in_repeat_1, r"folds\.csv: ids with another group in another repeat, first 'r05'"),
])
def test_bad_groups_in_a_foreign_folds_csv(tmp_path, edit, match):
    table = make_group_folds(_train(), "pair", k=3, seed=5, repeats=2).table.copy()
    edit(table)
    table.to_csv(tmp_path / "folds.csv", index=False)
    with pytest.raises(StackerError, match=match):
        load_folds(tmp_path / "folds.csv")


def test_folds_from_table_refuses_a_split_group():
    table = make_folds(IDS, LABELS, k=3, seed=5).table.assign(group=PAIRS)  # stratified: pairs straddle
    with pytest.raises(StackerError, match=r"^memory: group 'g\d+' straddles 2 folds"):
        folds_from_table(table, "memory")


def test_a_fold_file_with_groups(tmp_path):
    made = make_group_folds(_train(), "pair", k=3, seed=5)
    made.table[["id", "fold", "group"]].sample(frac=1, random_state=1).to_csv(tmp_path / "mine.csv", index=False)
    folds = read_fold_file(tmp_path / "mine.csv", IDS, LABELS)
    assert list(folds.groups) == PAIRS and folds.sha256 == made.sha256
    split = make_folds(IDS, LABELS, k=3, seed=5).table.assign(group=PAIRS)
    split[["id", "fold", "group"]].to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(StackerError, match=r"split\.csv: group 'g\d+' straddles 2 folds"):
        read_fold_file(tmp_path / "split.csv", IDS, LABELS)


# ---------------------------------------------------------------- merged groups


def test_merge_groups_joins_a_group_column_and_clusters_transitively():
    ids = ["a", "b", "c", "d", "e", "f", "g"]
    column = np.array(["p2", "p2", "p1", "p3", "p3", "p4", "p5"], dtype=object)
    clusters = np.array([-1, 0, 0, -1, 1, 1, -1])  # b~c joins p2 and p1; e~f joins p3 and p4
    assert list(merge_groups(ids, column, clusters)) == ["p1", "p1", "p1", "p3", "p3", "p3", "p5"]
    assert list(merge_groups(ids, None, clusters)) == ["a", "b", "b", "d", "e", "e", "g"]  # named by smallest id
    chain = np.array([0, 0, 1, 1, 2, 2, -1])  # a~b inside p2; c~d joins p1 and p3, e~f p3 and p4
    assert list(merge_groups(ids, column, chain)) == ["p2", "p2", "p1", "p1", "p1", "p1", "p5"]
    assert list(merge_groups(ids, column, None)) == list(column)  # a column alone keeps its names
    assert merge_groups(ids, None, np.full(7, -1)) is None and merge_groups(ids, None, None) is None


def test_split_clusters_names_the_clusters_folds_split():
    folds = make_folds(IDS, LABELS, k=3, seed=5)
    fold = folds.fold
    same = np.flatnonzero(fold == fold[0])[:2]
    other = [0, int(np.flatnonzero(fold != fold[0])[0])]
    clusters = np.full(24, -1)
    clusters[same], clusters[other[1]] = 0, 1
    clusters[np.flatnonzero(fold == fold[other[1]])[1]] = 1
    assert list(split_clusters(folds, clusters)) == []
    clusters[[same[1], other[1]]] = 2
    assert list(split_clusters(folds, clusters)) == [2]


# ---------------------------------------------------------------- folds.duplicates


def test_duplicates_config_defaults_and_rules():
    cfg = build_config(FoldsConfig, {}, "folds")
    assert (cfg.duplicates, cfg.duplicate_distance) == ("group", None)
    assert build_config(FoldsConfig, {"duplicates": "warn", "duplicate_distance": 12}, "folds").duplicate_distance == 12


@pytest.mark.parametrize("section, match", [
    ({"duplicates": "yes"}, r"folds\.duplicates: expected one of \['group', 'warn', 'off'\], got 'yes'"),
    ({"duplicates": True}, r"folds\.duplicates: expected one of"),
    ({"duplicate_distance": -1}, r"folds\.duplicate_distance: expected an integer >= 0 or null, got -1"),
    ({"duplicate_distance": 2.5}, r"folds\.duplicate_distance: expected an integer >= 0 or null"),
])
def test_duplicates_config_refusals(section, match):
    with pytest.raises(StackerError, match=match):
        build_config(FoldsConfig, section, "folds")


CLUSTERS = np.array([0, -1, -1, 0] + [-1] * 16 + [1, -1, 1, -1])  # r00~r03 and r20~r22


def test_assign_groups_clusters_only_when_asked():
    train = _train()
    plain = make_folds(IDS, LABELS, 3, 5)
    grouped = build_config(FoldsConfig, {"k": 3, "seed": 5}, "folds").assign(train, ("a", "b", "c"), CLUSTERS)
    assert grouped.groups[0] == grouped.groups[3] == "r00" and grouped.groups[1] == "r01"
    assert grouped.fold[0] == grouped.fold[3] and grouped.fold[20] == grouped.fold[22]
    for mode in ("warn", "off"):
        same = build_config(FoldsConfig, {"k": 3, "seed": 5, "duplicates": mode}, "folds")
        assert same.assign(train, ("a", "b", "c"), CLUSTERS).sha256 == plain.sha256
    none = build_config(FoldsConfig, {"k": 3, "seed": 5}, "folds").assign(train, ("a", "b", "c"), np.full(24, -1))
    assert none.sha256 == plain.sha256 and none.groups is None  # no duplicate: today's stratified folds
    column = build_config(FoldsConfig, {"k": 3, "seed": 5, "group_column": "pair"}, "folds")
    inside = np.array([0, 0] + [-1] * 22)  # a cluster inside one pair changes nothing
    assert column.assign(train, ("a", "b", "c"), inside).sha256 == GROUPED_SHA256
    joined = column.assign(train, ("a", "b", "c"), CLUSTERS)  # r00~r03 joins g0 and g1
    assert list(joined.groups[:4]) == ["g0"] * 4 and len(set(joined.fold[:4])) == 1


def test_assign_with_a_file_refuses_a_split_cluster_unless_warned(tmp_path):
    train = _train()
    plain = make_folds(IDS, LABELS, 3, 5)
    plain.table[["id", "fold"]].to_csv(tmp_path / "mine.csv", index=False)
    clusters = np.full(24, -1)
    clusters[[0, int(np.flatnonzero(plain.fold != plain.fold[0])[0])]] = 0
    cfg = build_config(FoldsConfig, {"k": 3, "file": str(tmp_path / "mine.csv")}, "folds")
    with pytest.raises(StackerError, match=r"folds\.file: .*mine\.csv: splits 1 near-duplicate cluster\(s\) over "
                                           r"folds, first the images 'r00', 'r0\d'; set folds\.duplicates: warn to "
                                           r"accept the file as it is"):
        cfg.assign(train, ("a", "b", "c"), clusters)
    warned = build_config(FoldsConfig, {"k": 3, "file": str(tmp_path / "mine.csv"), "duplicates": "warn"}, "folds")
    assert warned.assign(train, ("a", "b", "c"), clusters).sha256 == plain.sha256
    whole = np.full(24, -1)
    whole[np.flatnonzero(plain.fold == plain.fold[0])[:2]] = 0
    kept = cfg.assign(train, ("a", "b", "c"), whole)
    assert kept.sha256 == plain.sha256 and kept.groups is not None and len(set(kept.groups)) == 23


def test_a_saved_run_without_the_key_reads_as_off(tmp_path):
    run = RunPaths(tmp_path / "run")
    run.root.mkdir()
    write_folds(run.folds, make_folds(IDS, LABELS, 3, 5))
    run.config.write_text(yaml.safe_dump({"run_dir": ".", "folds": {"k": 3, "seed": 5}}))
    cfg = load_config(run=str(run.root))
    assert build_config(FoldsConfig, cfg["folds"], "folds").duplicates == "off"
    assert load_config(str(run.config))["folds"]["duplicates"] == "off"
    run.config.write_text(yaml.safe_dump({"run_dir": ".", "folds": {"k": 3, "duplicates": "warn"}}))
    assert load_config(run=str(run.root))["folds"]["duplicates"] == "warn"  # a saved key is kept
    mine = tmp_path / "run.yaml"  # a user's config of that name, outside any run: the new default
    mine.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "other"), "folds": {"k": 3}}))
    assert build_config(FoldsConfig, load_config(str(mine))["folds"], "folds").duplicates == "group"


def test_train_base_keeps_the_saved_duplicates_of_a_run_with_folds(tmp_path, small_digits_dir, monkeypatch):
    from base_models import jobs
    from base_models.stages import train_base_stage

    seen = []
    monkeypatch.setattr(jobs, "prepare_run", lambda *a: seen.append(a[2].duplicates) or (None, None))
    monkeypatch.setattr(jobs, "train_base", lambda *a: None)
    run = RunPaths(tmp_path / "run")
    run.root.mkdir()
    write_folds(run.folds, make_folds(IDS, LABELS, 3, 5))
    run.config.write_text(yaml.safe_dump({"run_dir": ".", "folds": {"k": 3, "seed": 5}}))  # saved before the key

    def train_base(run, force=False, **folds):
        user = {"run_dir": str(run.root), "data": {"root": str(small_digits_dir)},
                "folds": {"k": 3, "seed": 5, **folds}, "models": [{"arch": "test_resnet"}]}
        train_base_stage(user, force=force, log=lambda m: None)
        return yaml.safe_load(run.config.read_text())["folds"]["duplicates"]

    assert train_base(run) == "off" and train_base(run, force=True) == "off"  # --force does not regroup
    assert train_base(run, duplicates="warn") == "warn" and train_base(run) == "warn"  # a key set is saved, then kept
    assert train_base(RunPaths(tmp_path / "new")) == "group"  # no folds yet: the default
    assert seen == ["off", "off", "warn", "warn", "group"]


def test_an_existing_folds_file_is_never_regrouped(tmp_path):
    from base_models.jobs import _new_folds, _run_folds
    from oof import DataEdits

    spec = DatasetSpec(_train().assign(path="unused"), pd.DataFrame({"id": [], "path": []}), ("a", "b", "c"))
    paths, lines = RunPaths(tmp_path / "run"), []
    cfg = build_config(FoldsConfig, {"k": 3, "seed": 5}, "folds")
    made = _new_folds(paths, spec, cfg, DataEdits(), lines.append, CLUSTERS)
    assert lines == [f"folds: k=3 seed=5 groups=22 duplicate_clusters=2 -> {paths.folds}"]
    for mode in ("group", "warn", "off"):  # the recorded groups stand for the clusters, whatever the key says now
        again = build_config(FoldsConfig, {"k": 3, "seed": 5, "duplicates": mode}, "folds")
        assert _run_folds(paths, spec, again, DataEdits(), False, lines.append).groups_sha256 == made.groups_sha256
    assert len(lines) == 1
    for section in ({"k": 3, "seed": 6}, {"k": 3, "seed": 5, "group_column": "pair"}):
        with pytest.raises(StackerError, match=r"folds\.parquet: made from another dataset or folds config"):
            _run_folds(paths, spec, build_config(FoldsConfig, section, "folds"), DataEdits(), False, lines.append)
    old = RunPaths(tmp_path / "old")  # ungrouped folds (an older run, or no duplicate found) stay as they are
    write_folds(old.folds, make_folds(IDS, LABELS, 3, 5))
    kept = _run_folds(old, spec, cfg, DataEdits(), False, lines.append)  # the clusters are never looked at
    assert (kept.sha256, kept.groups) == (PLAIN_SHA256, None) and len(lines) == 1


# ---------------------------------------------------------------- train-base's fold step on images


def _blobs(rng, side: int = 128) -> Image.Image:
    """A random colour texture: 16x16 random pixels upscaled, detail in every frequency the hash reads (a
    resized JPEG copy hashes within 4 bits of it, distinct textures about 128 bits apart)."""
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((side, side), Image.BICUBIC)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """24 train images in 3 classes and 4 test images; planted copies: a0 resized as a JPEG in a (a0 ~ a_copy),
    b1 recompressed into class c (a label conflict), a2 resized in test."""
    root = tmp_path_factory.mktemp("planted") / "data"
    rng = np.random.default_rng(0)
    images = {}
    for c in "abc":
        (root / "train_images" / c).mkdir(parents=True)
        for i in range(8 if c != "a" else 7):
            images[f"{c}{i}"] = _blobs(rng)
            images[f"{c}{i}"].save(root / "train_images" / c / f"{c}{i}.png")
    images["a0"].resize((96, 96), Image.BILINEAR).save(root / "train_images" / "a" / "a_copy.jpg", quality=90)
    images["b1"].save(root / "train_images" / "c" / "c_conflict.jpg", quality=85)
    (root / "test_images").mkdir()
    images["a2"].resize((112, 112), Image.BILINEAR).save(root / "test_images" / "t0.jpg", quality=90)
    for i in range(1, 4):
        _blobs(rng).save(root / "test_images" / f"t{i}.png")
    pd.DataFrame({"id": [f"t{i}.{'jpg' if i == 0 else 'png'}" for i in range(4)], "label": "a"}).to_csv(
        root / "sample_submission.csv", index=False)
    return root


def _prepare(run, data_root, lines, **folds):
    from base_models.jobs import prepare_run

    data = build_config(DataConfig, {"root": str(data_root)}, "data")
    cfg = build_config(FoldsConfig, {"k": 3, "seed": 5, **folds}, "folds")
    return prepare_run(RunPaths(run), data, cfg, (32, 32), log=lines.append)


def _has_hashes() -> bool:
    from base_models.cache import ImageCache

    return "hashes" in {f.name for f in fields(ImageCache)}


needs_hashes = pytest.mark.skipif(not _has_hashes(), reason="the image cache records no hashes yet")


@needs_hashes
def test_train_base_groups_planted_duplicates_and_lists_them(tmp_path, planted):
    lines = []
    spec, folds = _prepare(tmp_path / "run", planted, lines)
    paths = RunPaths(tmp_path / "run")
    group = dict(zip(folds.ids, folds.groups))
    fold = dict(zip(folds.ids, folds.fold))
    assert group["a0.png"] == group["a_copy.jpg"] and fold["a0.png"] == fold["a_copy.jpg"]
    assert group["b1.png"] == group["c_conflict.jpg"] and fold["b1.png"] == fold["c_conflict.jpg"]
    assert len(set(folds.groups)) == len(folds.ids) - 2
    assert load_folds(paths.folds).groups_sha256 == folds.groups_sha256
    listing = pd.read_csv(paths.duplicates)
    assert sorted(listing["kind"]) == ["train", "train", "train-test"]
    assert set(listing.loc[listing["kind"] == "train-test", "id_a"]) == {"a2.png"}
    assert listing["conflict"].sum() == 1
    for start in ("duplicates: 4 train images in 2 clusters", "warning: 1 near-duplicate train pair(s) with different "
                  "labels", "warning: 1 train image(s) with a near-duplicate in test, first a2.png"):
        assert any(line.startswith(start) for line in lines), start
    assert f"folds: k=3 seed=5 groups={len(folds.ids) - 2} duplicate_clusters=2 -> {paths.folds}" in lines
    paths.duplicates.unlink()
    again = []
    assert _prepare(tmp_path / "run", planted, again)[1].sha256 == folds.sha256  # made once: no second look
    assert not paths.duplicates.exists() and not any(line.startswith("duplicates:") for line in again)


@needs_hashes
@pytest.mark.parametrize("mode", ["warn", "off"])
def test_warn_lists_duplicates_and_off_does_not_look(tmp_path, planted, mode):
    lines = []
    spec, folds = _prepare(tmp_path / "run", planted, lines, duplicates=mode)
    assert folds.groups is None
    assert folds.sha256 == make_folds(spec.train["id"], spec.train["label"], 3, 5, spec.classes).sha256
    assert RunPaths(tmp_path / "run").duplicates.exists() == (mode == "warn")
    warned = any(line.startswith("warning: folds.duplicates: warn: the folds split") for line in lines)
    assert warned == (mode == "warn")


@needs_hashes
def test_the_demo_has_no_duplicates_and_keeps_its_stratified_folds(tmp_path, small_digits_dir):
    lines = []
    spec, folds = _prepare(tmp_path / "run", small_digits_dir, lines)
    assert folds.groups is None and "group" not in pq.read_schema(RunPaths(tmp_path / "run").folds).names
    assert folds.sha256 == make_folds(spec.train["id"], spec.train["label"], 3, 5, spec.classes).sha256
    assert f"folds: k=3 seed=5 -> {RunPaths(tmp_path / 'run').folds}" in lines
