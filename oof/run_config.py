"""The run's config: one YAML file, then named flags, then `--set KEY=VALUE`, resolved into a raw mapping.

    cfg = load_config(config="run.yaml", overrides={"train.epochs": 3}, sets=["tta.n=2"])

Each package builds its own dataclasses from its sections (`base_models.config.base_configs`,
`stacker.config.stack_config`); defaults live in those dataclasses only. The resolved
config is saved as `<run>/run.yaml` by `write_run_config`.

A run directory is relocatable: copy or upload it anywhere (a read-only Kaggle dataset) and
its run.yaml still describes it. The saved file says `run_dir: .`, which a run.yaml read
from its own folder resolves to that folder, and gives `data.root` relative to the run
(resolved against the run's folder on load). Read with `--run DIR`, the run is DIR
whatever the file says.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from filelock import FileLock

from .atomic import write_text
from .errors import StackerError
from .paths import RunPaths

SECTIONS = ("run_dir", "data", "folds", "train", "models", "tta", "engine", "stack", "submit")
RUN_HERE = "."  # run.yaml's run_dir: the folder the file is in, wherever the run has moved
# data: keys that name a file or folder (a string; data.exclude may also be a list of ids): saved relative to
# the run in run.yaml and read back against the run's folder, so a moved run keeps them.
DATA_PATHS = ("root", "exclude", "relabel")
PRE_DUPLICATES = "off"  # folds.duplicates of a run whose saved folds section predates the key
# submit.format's vocabulary: `stacker.config.SubmitConfig` checks it, the CLI offers it (without importing
# the stacking side, whose imports take seconds)
SUBMIT_FORMATS = ("auto", "labels", "proba")


def load_config(config: str | None = None, run: str | None = None, overrides: dict | None = None,
                sets=()) -> dict:
    """The raw config: `config` (else `<run>/run.yaml` when it exists), then `overrides`, then `sets`.

    Args:
        config: a YAML file; required to exist when given.
        run: the run directory (also the `run_dir` key, via `overrides` when the caller maps it); without
            `config` its run.yaml is read and the run is `run`, whatever run_dir the file names.
        overrides: {dotted key: value} from named flags.
        sets: "KEY=VALUE" strings, each value read as YAML.

    Raises:
        StackerError: a missing or malformed file, a bad `--set`, or an unknown section.
    """
    cfg = {}
    if config is not None:
        cfg = read_run_yaml(Path(config))
    elif run is not None and RunPaths(run).config.is_file():
        cfg = {**read_run_yaml(RunPaths(run).config), "run_dir": str(run)}  # the run is where it was found
    for key, value in (overrides or {}).items():
        override(cfg, key, value)
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise StackerError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        override(cfg, key.strip(), yaml.safe_load(text))
    unknown = sorted(set(map(str, cfg)) - set(SECTIONS))
    if unknown:
        raise StackerError(f"config: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    return cfg


def read_yaml(path: Path) -> dict:
    """A YAML mapping from a file, or one line saying why not."""
    if not path.is_file():
        raise StackerError(f"{path}: config file not found")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise StackerError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise StackerError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise StackerError(f"{path}: the config must be a mapping of sections")
    return cfg


def read_run_yaml(path: Path) -> dict:
    """A config file; a run's own run.yaml (`run_dir: .`) relocated to the folder it is in now.

    Its `run_dir` becomes that folder and a relative `data.root` (and data.exclude, data.relabel file) is
    resolved against it, so a run copied elsewhere keeps working; so does an older run.yaml with an absolute `run_dir` that
    sits beside its run's folds. A saved `folds:` section without `duplicates` reads as `off`, as
    that run's folds were made. Any other config's relative paths are the caller's.
    """
    cfg = read_yaml(path)
    beside = RunPaths(path.parent)
    if path.name != beside.config.name:
        return cfg
    # An older run.yaml names its run by absolute path; inside a run (its folds beside it) it is that run now.
    moved = cfg.get("run_dir") != RUN_HERE and (beside.folds.is_file() or beside.folds_csv.is_file())
    if cfg.get("run_dir") != RUN_HERE and not moved:
        return cfg
    here = path.parent.resolve()
    cfg["run_dir"] = str(here)
    data = cfg.get("data")
    if isinstance(data, dict):
        cfg["data"] = {**data, **{key: os.path.normpath(here / data[key]) for key in DATA_PATHS
                                  if isinstance(data.get(key), str) and not Path(data[key]).is_absolute()}}
    folds = cfg.get("folds")
    if isinstance(folds, dict) and "duplicates" not in folds:
        # A run saved before folds.duplicates existed made its folds without looking for duplicates.
        cfg["folds"] = {**folds, "duplicates": PRE_DUPLICATES}
    return cfg


def override(cfg: dict, dotted: str, value) -> None:
    """Set a key from the command line. A `train.*` key also beats every model entry's own value:
    run.yaml stores each model's resolved train keys, and a flag must still win over them."""
    _set_key(cfg, dotted, value)
    section, _, rest = dotted.partition(".")
    if section == "train" and rest and isinstance(cfg.get("models"), list):
        for entry in cfg["models"]:
            if isinstance(entry, dict):
                _set_key(entry, rest, value)


def _set_key(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise StackerError(f"--set {dotted}: {p!r} is not a section")
    node[last] = value


def run_paths(cfg: dict) -> RunPaths:
    """The run directory a config names (`run_dir`, set by --run)."""
    run_dir = cfg.get("run_dir")
    if not run_dir:
        raise StackerError("no run directory: pass --run DIR or set run_dir in the config")
    if not isinstance(run_dir, str):
        raise StackerError(f"run_dir: expected a folder name, got {run_dir!r}")
    return RunPaths(Path(run_dir).resolve())


def write_run_config(paths: RunPaths, sections: dict) -> None:
    """Write the resolved config as `<run>/run.yaml`; models already in the run and not in `sections` are kept,
    and so are `submit:` and `engine:` sections the file has and `sections` does not (set by hand)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with FileLock(paths.config_lock):  # two train-base processes on one run: each keeps the other's models
        saved = read_yaml(paths.config) if paths.config.is_file() else {}
        models = {m["name"]: m for m in saved.get("models") or [] if isinstance(m, dict) and "name" in m}
        models.update({m["name"]: m for m in sections.get("models", [])})
        kept = {k: saved[k] for k in ("submit", "engine") if k in saved and k not in sections}  # set by hand
        resolved = {"run_dir": RUN_HERE, **kept, **_relocatable(paths, sections), "models": list(models.values())}
        resolved = {k: resolved[k] for k in SECTIONS if k in resolved}
        write_text(paths.config, yaml.safe_dump(_plain(resolved), sort_keys=False))


def _relocatable(paths: RunPaths, sections: dict) -> dict:
    """`sections` with data.root and the data.exclude / data.relabel files relative to the run (absolute only
    where no relative path exists: another Windows drive)."""
    data = sections.get("data")
    if not isinstance(data, dict):
        return sections
    moved = {}
    for key in DATA_PATHS:
        if isinstance(data.get(key), str):
            try:
                moved[key] = Path(os.path.relpath(Path(data[key]).resolve(), paths.root.resolve())).as_posix()
            except ValueError:
                pass
    return {**sections, "data": {**data, **moved}}


def _plain(obj):
    """Config values as YAML-safe plain types (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
