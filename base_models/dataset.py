"""Where the images are: the two dataset layouts, resolved to one table of files.

(a) Kaggle folders (Paddy Doctor): `train_images/<label>/<file>`, `test_images/<file>`;
    the id is the file name.
(b) A CSV with an id (or path) column, a label column and optional extra
    columns, plus an image root. A row's file is `<root>/<path>` when a path
    column is named, else `<root>/<id>`, else `<root>/<label>/<id>` (Paddy's
    train.csv names files that live in label folders).

Test ids and their order come from `sample_submission.csv` when there is one,
else from the sorted test folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from oof import StackerError, preview, read_csv_strings

from .images import RESIZE_MODES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class DataConfig:
    """The `data:` section of run.yaml.

    Attributes:
        root: dataset folder; relative names below are under it.
        train_dir: train image folder (label sub-folders in the folder layout).
        test_dir: test image folder.
        train_csv: CSV of train rows; when set the CSV layout is used.
        id_column: id column of train_csv (default: its first column).
        label_column: label column of train_csv.
        path_column: column of image paths relative to train_dir, if the ids are not file names.
        extra_targets: further label columns, trained as extra heads (Paddy's `variety`).
        sample_submission: Kaggle's sample submission; gives test ids and order.
        resize: how images become the cache size: squish, crop or pad (fastai's names).
        check_all_images: decode every image before failing, and list all bad files.
        decode_workers: processes decoding the cache (0: all cores).
    """

    root: str = "."
    train_dir: str = "train_images"
    test_dir: str = "test_images"
    train_csv: str | None = None
    id_column: str | None = None
    label_column: str = "label"
    path_column: str | None = None
    extra_targets: list[str] = field(default_factory=list)
    sample_submission: str | None = "sample_submission.csv"
    resize: str = "squish"
    check_all_images: bool = False
    decode_workers: int = 0

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise StackerError(f"data.resize: {self.resize!r} is not one of {list(RESIZE_MODES)}")
        self.extra_targets = list(self.extra_targets or [])
        if self.extra_targets and not self.train_csv:
            raise StackerError("data.extra_targets: extra targets are columns of a train CSV; set data.train_csv")

    def path(self, name: str | None) -> Path | None:
        return None if name is None else Path(self.root) / name


@dataclass
class DatasetSpec:
    """The resolved dataset.

    Attributes:
        train: one row per train image: `id`, `path`, `label` and the CSV's other columns.
        test: one row per test image in submission order: `id`, `path`.
        classes: sorted class names of the main target.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    classes: tuple[str, ...]


def resolve_dataset(cfg: DataConfig) -> DatasetSpec:
    """Find every train and test image and check that each file exists."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise StackerError(f"data.root: folder {root} not found")
    train = _train_from_csv(cfg) if cfg.train_csv else _train_from_folders(cfg)
    if len(train) == 0:
        raise StackerError(f"{cfg.path(cfg.train_dir)}: no train images found")
    test = _test_table(cfg)
    _check_files_exist(pd.concat([train["path"], test["path"]]))
    return DatasetSpec(train, test, tuple(sorted(train["label"].unique())))


def _train_from_folders(cfg: DataConfig) -> pd.DataFrame:
    folder = cfg.path(cfg.train_dir)
    if not folder.is_dir():
        raise StackerError(f"{folder}: train folder not found (expected <label>/<image> sub-folders, "
                           "or set data.train_csv)")
    rows = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows += [(f.name, f, label_dir.name) for f in _image_files(label_dir)]
    stray = _image_files(folder)
    if stray:
        raise StackerError(f"{stray[0]}: image outside a label folder; the folder layout is "
                           f"{folder}/<label>/<image>")
    df = pd.DataFrame(rows, columns=["id", "path", "label"])
    dup = df["id"].duplicated(keep=False)
    if dup.any():
        raise StackerError(f"{folder}: the same file name in several label folders: "
                           f"{preview(df.loc[dup, 'path'])}; ids are file names and must be unique")
    return df


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    other = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if other:
        raise StackerError(f"{other[0]}: not an image file name (suffixes {list(IMAGE_SUFFIXES)}); "
                           "move it out of the image folder")
    return files


def _train_from_csv(cfg: DataConfig) -> pd.DataFrame:
    csv = cfg.path(cfg.train_csv)
    df = read_csv_strings(csv)
    id_col = cfg.id_column or df.columns[0]
    needed = [id_col, cfg.label_column, *cfg.extra_targets] + ([cfg.path_column] if cfg.path_column else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise StackerError(f"{csv}: missing column(s) {missing}; columns are {list(df.columns)}")
    for col in (id_col, cfg.label_column, *cfg.extra_targets):
        empty = df[col].str.strip() == ""
        if empty.any():
            raise StackerError(f"{csv}: empty {col!r} in row(s) {preview(df.index[empty] + 2)} (line numbers)")
    dup = df[id_col].duplicated()
    if dup.any():
        raise StackerError(f"{csv}: duplicate ids in column {id_col!r}, first {preview(df.loc[dup, id_col])}")
    image_root = cfg.path(cfg.train_dir)
    if cfg.path_column:
        paths = [image_root / p for p in df[cfg.path_column]]
    else:
        paths = [_locate(image_root, i, y) for i, y in zip(df[id_col], df[cfg.label_column])]
    out = pd.DataFrame({"id": df[id_col].to_numpy(), "path": paths, "label": df[cfg.label_column].to_numpy()})
    for col in df.columns:  # extra targets, weight columns, metadata: kept for later stages
        if col not in (id_col, cfg.label_column, cfg.path_column) and col not in out.columns:
            out[col] = df[col].to_numpy()
    return out


def _locate(image_root: Path, image_id: str, label: str) -> Path:
    flat = image_root / image_id
    if flat.is_file():
        return flat
    nested = image_root / label / image_id
    return nested if nested.is_file() else flat


def _test_table(cfg: DataConfig) -> pd.DataFrame:
    folder = cfg.path(cfg.test_dir)
    sample = cfg.path(cfg.sample_submission)
    if sample is not None and sample.is_file():
        df = read_csv_strings(sample)
        ids = df[df.columns[0]]
        dup = ids.duplicated()
        if dup.any():
            raise StackerError(f"{sample}: duplicate ids, first {preview(ids[dup])}")
        ids = list(ids)
    elif folder.is_dir():
        ids = [p.name for p in _image_files(folder)]
    else:
        ids = []  # no test set: OOF only (a valid run, e.g. to compare models)
    return pd.DataFrame({"id": ids, "path": [folder / i for i in ids]})


def _check_files_exist(paths: pd.Series) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise StackerError(f"{len(missing)} image file(s) not found, first {preview(missing)}")
