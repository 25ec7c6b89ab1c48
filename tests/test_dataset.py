"""base_models.dataset: both dataset layouts resolved from real folders, CSVs and PNG files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from base_models.config import DataConfig
from base_models.dataset import resolve_dataset
from oof import StackerError


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), value).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def folder_root(tmp_path):
    """Kaggle folder layout: 3 train images in 2 label folders, 2 test images, sample in non-sorted order."""
    root = tmp_path / "paddy"
    _png(root / "train_images" / "tungro" / "200.jpg")
    _png(root / "train_images" / "blast" / "110.png")
    _png(root / "train_images" / "blast" / "105.JPG")
    _png(root / "test_images" / "t1.png")
    _png(root / "test_images" / "t2.png")
    _write(root / "sample_submission.csv", "image_id,label\nt2.png,blast\nt1.png,blast\n")
    return root


def test_folder_layout(folder_root):
    spec = resolve_dataset(DataConfig(root=str(folder_root)))
    t = spec.train
    assert list(t["id"]) == ["105.JPG", "110.png", "200.jpg"]
    assert list(t["label"]) == ["blast", "blast", "tungro"]
    assert [Path(p) for p in t["path"]] == [folder_root / "train_images" / y / i for i, y in zip(t["id"], t["label"])]
    assert spec.classes == ("blast", "tungro")
    # the sample submission fixes test ids and their order
    assert list(spec.test["id"]) == ["t2.png", "t1.png"]
    assert [Path(p) for p in spec.test["path"]] == [folder_root / "test_images" / i for i in ("t2.png", "t1.png")]


@pytest.mark.parametrize("sample", [None, "no_such_sample.csv"])
def test_test_ids_from_sorted_folder_without_sample(folder_root, sample):
    _png(folder_root / "test_images" / "t0.png")
    _write(folder_root / "test_images" / ".DS_Store", "hidden files are skipped")
    spec = resolve_dataset(DataConfig(root=str(folder_root), sample_submission=sample))
    assert list(spec.test["id"]) == ["t0.png", "t1.png", "t2.png"]


def test_no_test_folder_means_no_test_rows(tmp_path):
    _png(tmp_path / "train_images" / "a" / "1.png")
    spec = resolve_dataset(DataConfig(root=str(tmp_path)))
    assert len(spec.test) == 0 and list(spec.test.columns) == ["id", "path"]


def test_digits_demo_in_folder_and_csv_layout(digits_dir):
    """The demo dataset: folder layout, and its train.csv naming files inside label folders (Paddy-style)."""
    by_folder = resolve_dataset(DataConfig(root=str(digits_dir)))
    by_csv = resolve_dataset(DataConfig(root=str(digits_dir), train_csv="train.csv"))
    train_csv = pd.read_csv(digits_dir / "train.csv", dtype=str)
    sample = pd.read_csv(digits_dir / "sample_submission.csv", dtype=str)
    assert by_folder.classes == by_csv.classes == tuple(str(d) for d in range(10))
    assert list(by_csv.train["id"]) == list(train_csv["image_id"])
    assert list(by_csv.train["label"]) == list(train_csv["label"])
    assert set(by_folder.train["id"]) == set(train_csv["image_id"])
    folder_by_id = by_folder.train.set_index("id")
    assert (folder_by_id.loc[by_csv.train["id"], "label"].to_numpy() == by_csv.train["label"].to_numpy()).all()
    assert list(by_folder.test["id"]) == list(sample["image_id"]) == list(by_csv.test["id"])


def test_csv_layout_flat_files(tmp_path):
    for i in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "images" / i)
    _write(tmp_path / "labels.csv", "file,disease\nb.png,rust\na.png,blight\nc.png,rust\n")
    cfg = DataConfig(root=str(tmp_path), train_csv="labels.csv", label_column="disease", train_dir="images")
    spec = resolve_dataset(cfg)
    assert list(spec.train["id"]) == ["b.png", "a.png", "c.png"]  # CSV order
    assert list(spec.train["label"]) == ["rust", "blight", "rust"]
    assert [Path(p) for p in spec.train["path"]] == [tmp_path / "images" / i for i in ("b.png", "a.png", "c.png")]
    assert spec.classes == ("blight", "rust")


def test_csv_layout_paddy_label_folders_and_extra_targets(tmp_path):
    _png(tmp_path / "train_images" / "blast" / "100.jpg")
    _png(tmp_path / "train_images" / "normal" / "101.jpg")
    _png(tmp_path / "train_images" / "blast" / "102.jpg")
    _write(tmp_path / "train.csv", "image_id,label,variety,age\n100.jpg,blast,ADT45,45\n"
                                   "101.jpg,normal,KarnatakaPonni,60\n102.jpg,blast,ADT45,50\n")
    spec = resolve_dataset(DataConfig(root=str(tmp_path), train_csv="train.csv", extra_targets=["variety"]))
    t = spec.train
    assert list(t.columns) == ["id", "path", "label", "variety", "age"]  # other columns kept (weights, metadata)
    assert list(t["variety"]) == ["ADT45", "KarnatakaPonni", "ADT45"]
    assert [Path(p) for p in t["path"]] == [tmp_path / "train_images" / y / i for i, y in zip(t["id"], t["label"])]


def test_csv_layout_path_column(tmp_path):
    _png(tmp_path / "train_images" / "batch1" / "x.png")
    _png(tmp_path / "train_images" / "batch2" / "x.png")
    _write(tmp_path / "train.csv", "label,name,where\ncat,img1,batch1/x.png\ndog,img2,batch2/x.png\n")
    cfg = DataConfig(root=str(tmp_path), train_csv="train.csv", id_column="name", path_column="where")
    spec = resolve_dataset(cfg)
    assert list(spec.train["id"]) == ["img1", "img2"]
    assert list(spec.train["label"]) == ["cat", "dog"]
    assert [Path(p) for p in spec.train["path"]] == [tmp_path / "train_images" / "batch1" / "x.png",
                                                     tmp_path / "train_images" / "batch2" / "x.png"]


def _layout(files=(), texts=None):
    """A dataset builder: PNG files and text files (relative path -> content) under root."""
    def build(root: Path):
        for f in files:
            _png(root / f)
        for name, text in (texts or {}).items():
            _write(root / name, text)
    return build


GOOD_CSV = "image_id,label\n1.png,a\n2.png,b\n"
CSV_FILES = ("train_images/1.png", "train_images/2.png")
CSV = {"train_csv": "train.csv"}

# (case, dataset on disk, DataConfig keys, rule the message must name, with the file or id)
DATASET_ERRORS = [
    ("same-name-two-labels", _layout(["train_images/a/x.png", "train_images/b/x.png", "train_images/b/y.png"]), {},
     r"train_images: the same file name in several label folders: '.*a/x\.png', '.*b/x\.png'"),
    ("image-outside-label-folder", _layout(["train_images/a/x.png", "train_images/stray.png"]), {},
     r"train_images/stray\.png: image outside a label folder"),
    ("non-image-in-label-folder", _layout(["train_images/a/x.png"], {"train_images/a/notes.txt": "hi"}), {},
     r"train_images/a/notes\.txt: not an image file name"),
    ("non-image-in-test-folder", _layout(["train_images/a/x.png"], {"test_images/labels.csv": "id\n"}), {},
     r"test_images/labels\.csv: not an image file name"),
    ("no-train-folder", _layout([], {"readme.md": "x"}), {}, r"train_images: train folder not found"),
    ("empty-train-folder", _layout([], {"train_images/.keep": ""}), {}, r"train_images: no train images found"),
    ("csv-not-found", _layout(CSV_FILES), CSV, r"train\.csv: file not found"),
    ("csv-missing-label", _layout(CSV_FILES, {"train.csv": "image_id,disease\n1.png,a\n"}), CSV,
     r"train\.csv: missing column\(s\) \['label'\]"),
    ("csv-missing-extra", _layout(CSV_FILES, {"train.csv": GOOD_CSV}), {**CSV, "extra_targets": ["variety"]},
     r"train\.csv: missing column\(s\) \['variety'\]"),
    ("csv-missing-path", _layout(CSV_FILES, {"train.csv": GOOD_CSV}), {**CSV, "path_column": "file"},
     r"train\.csv: missing column\(s\) \['file'\]"),
    ("csv-empty-label", _layout(CSV_FILES, {"train.csv": "image_id,label\n1.png,a\n2.png, \n"}), CSV,
     r"train\.csv: empty 'label' in row\(s\) '3' \(line numbers\)"),
    ("csv-empty-id", _layout(CSV_FILES, {"train.csv": "image_id,label\n,a\n2.png,b\n"}), CSV,
     r"train\.csv: empty 'image_id' in row\(s\) '2' \(line numbers\)"),
    ("csv-duplicate-id", _layout(CSV_FILES, {"train.csv": "image_id,label\n1.png,a\n2.png,b\n1.png,b\n"}),
     CSV, r"train\.csv: duplicate ids in column 'image_id', first '1\.png'"),
    ("csv-missing-image", _layout(CSV_FILES, {"train.csv": GOOD_CSV + "3.png,a\n"}), CSV,
     r"1 image file\(s\) not found, first '.*train_images/3\.png'"),
    ("sample-missing-image", _layout(["train_images/a/x.png", "test_images/t1.png"],
                                     {"sample_submission.csv": "id,label\nt1.png,a\nt9.png,a\n"}), {},
     r"1 image file\(s\) not found, first '.*test_images/t9\.png'"),
    ("sample-duplicate-id", _layout(["train_images/a/x.png", "test_images/t1.png"],
                                    {"sample_submission.csv": "id,label\nt1.png,a\nt1.png,a\n"}), {},
     r"sample_submission\.csv: duplicate ids, first 't1\.png'"),
]


@pytest.mark.parametrize("build, keys, match", [c[1:] for c in DATASET_ERRORS], ids=[c[0] for c in DATASET_ERRORS])
def test_dataset_errors(tmp_path, build, keys, match):
    root = tmp_path / "data"
    root.mkdir()
    build(root)
    with pytest.raises(StackerError, match=match):
        resolve_dataset(DataConfig(root=str(root), **keys))


def test_missing_root(tmp_path):
    with pytest.raises(StackerError, match=r"data\.root: folder .*nowhere not found"):
        resolve_dataset(DataConfig(root=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("value", ["stretch", "Squish", None])
def test_bad_resize_value(value):
    expected = rf"data\.resize: expected one of \['squish', 'crop', 'pad'\], got {value!r}"
    with pytest.raises(StackerError, match=expected):
        DataConfig(resize=value)


@pytest.mark.parametrize("value", ["squish", "crop", "pad"])
def test_resize_values_accepted(value):
    assert DataConfig(resize=value).resize == value
