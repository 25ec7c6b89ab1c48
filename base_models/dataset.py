"""Where the images are: the two dataset layouts, resolved to one table of files.

(a) Kaggle folders (Paddy Doctor): `train_images/<label>/<file>`, `test_images/<file>`;
    the id is the file name.
(b) A CSV with an id (or path) column, a label column and optional extra
    columns, plus an image root. A row's file is `<root>/<path>` when a path
    column is named, else `<root>/<id>`, else `<root>/<label>/<id>` (Paddy's
    train.csv names files that live in label folders).

Test ids and their order come from `sample_submission.csv` when there is one,
else from the sorted test folder.

A new test set for `stacker predict` (`NewTestImages`, `resolve_new_test`) is read the
same ways, apart from any run's dataset: every image of a folder (id = file name), or a
CSV's id column (files `<folder>/<path column>` or `<folder>/<id>`); with a sample
submission its ids give the order and must be exactly the images' ids, without one
the ids are sorted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from oof import StackerError, check_unique, preview, read_csv_strings

from .config import DataConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    check_unique(df[id_col], str(csv), f"ids in column {id_col!r}")
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
        ids = list(df[df.columns[0]])
        check_unique(ids, str(sample))
    elif folder.is_dir():
        ids = [p.name for p in _image_files(folder)]
    else:
        ids = []  # no test set: OOF only (a valid run, e.g. to compare models)
    return pd.DataFrame({"id": ids, "path": [folder / i for i in ids]})


@dataclass(frozen=True)
class NewTestImages:
    """A test set to predict with a finished run (`stacker predict`), wherever its files are.

    Attributes:
        images: the folder of the images.
        csv: a CSV listing them; None: every image file in `images`, the id being its file name.
        id_column: the CSV's id column (default its first).
        path_column: the CSV's column of file paths under `images`; None: each file is `images/<id>`.
        sample_submission: its first column gives the ids and their order; None: the ids sorted.
    """

    images: str | Path
    csv: str | Path | None = None
    id_column: str | None = None
    path_column: str | None = None
    sample_submission: str | Path | None = None


def resolve_new_test(spec: NewTestImages) -> pd.DataFrame:
    """`id`, `path` of every image of a new test set, in the sample submission's order, else sorted by id.

    Raises:
        StackerError: no such folder or CSV column, duplicate or empty ids, an image id the sample
            submission lacks or a sample id without an image, a file that does not exist.
    """
    folder = Path(spec.images)
    if not folder.is_dir():
        raise StackerError(f"--images: folder {folder} not found")
    table = _listed_test_images(spec, folder) if spec.csv else _folder_test_images(folder)
    if spec.sample_submission is not None:
        table = _in_sample_order(table, Path(spec.sample_submission), folder)
    else:
        table = table.sort_values("id", kind="stable").reset_index(drop=True)
    if not len(table):
        raise StackerError(f"{spec.csv or folder}: no test images found")
    _check_files_exist(table["path"])
    return table


def _folder_test_images(folder: Path) -> pd.DataFrame:
    files = _image_files(folder)
    return pd.DataFrame({"id": [p.name for p in files], "path": files})


def _listed_test_images(spec: NewTestImages, folder: Path) -> pd.DataFrame:
    csv = Path(spec.csv)
    df = read_csv_strings(csv)
    id_col = spec.id_column or df.columns[0]
    missing = [c for c in (id_col, spec.path_column) if c is not None and c not in df.columns]
    if missing:
        raise StackerError(f"{csv}: missing column(s) {missing}; columns are {list(df.columns)}")
    empty = df[id_col].str.strip() == ""
    if empty.any():
        raise StackerError(f"{csv}: empty {id_col!r} in row(s) {preview(df.index[empty] + 2)} (line numbers)")
    check_unique(df[id_col], str(csv), f"ids in column {id_col!r}")
    names = df[spec.path_column or id_col]
    return pd.DataFrame({"id": df[id_col].to_numpy(), "path": [folder / name for name in names]})


def _in_sample_order(table: pd.DataFrame, sample: Path, folder: Path) -> pd.DataFrame:
    """The images in the sample submission's id order; both must hold the same ids."""
    sample_ids = read_csv_strings(sample).iloc[:, 0]
    check_unique(sample_ids, str(sample))
    extra = table.loc[~table["id"].isin(set(sample_ids)), "id"]
    if len(extra):
        raise StackerError(f"{sample}: no row for image id(s) {preview(extra)} of {folder}; the sample "
                           "submission must list every test image (ids are file names unless --csv maps them)")
    missing = sample_ids[~sample_ids.isin(set(table["id"]))]
    if len(missing):
        raise StackerError(f"{folder}: no image for id(s) {preview(missing)} of {sample}")
    return table.set_index("id", drop=False).loc[sample_ids.to_numpy()].reset_index(drop=True)


def _check_files_exist(paths: pd.Series) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise StackerError(f"{len(missing)} image file(s) not found, first {preview(missing)}")
