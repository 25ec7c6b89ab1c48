"""The tests' tiny shared settings: timm's test_* models on 16 px digits, seeded, on CPU; and the CLI in process.

A plain module on the tests' path (as `stack_fixtures` is). It imports no torch itself: `QUIET` and
`specs` import the training side when they are first used.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

MODEL = "test_resnet"
MODELS = ("test_resnet", "test_efficientnet")
# One epoch at a high learning rate: a job on the 400 digits takes well under a second on 2 CPU cores.
TINY = {"size": 16, "epochs": 1, "batch_size": 32, "lr": 1e-2}
# Two epochs: an epoch boundary to interrupt at and resume from.
TWO_EPOCHS = {"size": 16, "epochs": 2, "batch_size": 32, "lr": 3e-3}
# The CLI's run: after three epochs its stacked submission scores 0.79 test accuracy (test_cli asks > 0.4).
CLI_TRAIN = {"size": 16, "epochs": 3, "batch_size": 32, "lr": 1e-2}


def silent(line: str) -> None:
    """A stage's `log` that drops every line."""


def __getattr__(name: str):
    if name == "QUIET":  # StageOptions lives beside the training code, which imports torch
        from base_models.jobs import StageOptions

        return StageOptions(log=silent)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def first_fold(log=silent, model: str = MODEL):
    """StageOptions that train `model`'s fold 0 alone: for a test that reads fold 0's files and no other's."""
    from base_models.jobs import StageOptions

    return StageOptions(log=log, only=((model, 0),))


def specs(*models, train: dict = TINY, **keys):
    """`model_specs` of `models` (timm names or model entries; default test_resnet) on `train`, `keys` over it."""
    from base_models.config import model_specs

    entries = [{"arch": m} if isinstance(m, str) else m for m in models or (MODEL,)]
    return model_specs(entries, {**train, **keys})


def prepared(root: Path, data_dir, k: int = 3, repeats: int = 1, size=(16, 16), **data):
    """A run at `root` with its folds (k folds, seed 0) and image caches, nothing trained: (RunPaths, Folds)."""
    from base_models.config import DataConfig, FoldsConfig
    from base_models.jobs import prepare_run
    from oof import RunPaths

    paths = RunPaths(root)
    _, folds = prepare_run(paths, DataConfig(root=str(data_dir), **data), FoldsConfig(k=k, repeats=repeats), size,
                           log=silent)
    return paths, folds


def predicted_run(root: Path, data_dir, model_specs, tta, k: int = 3, seed: int = 0):
    """A run at `root` with every fold of `model_specs` trained and predicted with `tta`: (RunPaths, Folds)."""
    from base_models.config import DataConfig, FoldsConfig
    from base_models.jobs import StageOptions, prepare_run, train_base
    from base_models.predict_oof import predict_oof
    from oof import RunPaths

    paths, quiet = RunPaths(root), StageOptions(log=silent)
    _, folds = prepare_run(paths, DataConfig(root=str(data_dir)), FoldsConfig(k=k, seed=seed), (16, 16), log=silent)
    train_base(paths, model_specs, folds, options=quiet)
    predict_oof(paths, model_specs, folds, tta, options=quiet)
    return paths, folds


def plain_copy(paths, dest: Path):
    """The run copied elsewhere as a plain copy does: every file's time is the copy's, not the original's."""
    from oof import RunPaths

    shutil.copytree(paths.root, dest, copy_function=shutil.copyfile)
    return RunPaths(dest)


def cli_config(data_root, run, **sections) -> dict:
    """The CLI tests' run.yaml: both test_* models, 3 folds, CLI_TRAIN, 2 TTA views; a section set to None is
    left out, any other replaces the default one."""
    cfg = {"run_dir": str(run), "data": {"root": str(data_root)}, "folds": {"k": 3}, "train": dict(CLI_TRAIN),
           "models": [{"arch": m} for m in MODELS], "tta": {"n": 2}, "stack": {"n_bootstrap": 200}}
    for key, value in sections.items():
        cfg[key] = value
        if value is None:
            del cfg[key]
    return cfg


def write_config(path: Path, data_root, run, **sections) -> Path:
    """`cli_config` written as YAML at `path`."""
    path.write_text(yaml.safe_dump(cli_config(data_root, run, **sections)))
    return path


def copy_run(source: Path, dest: Path) -> Path:
    """A run copied with its files' times (the image cache stays current); `dest` must sit as deep as `source`
    under the same folder, so that run.yaml's relative data.root still names the same dataset."""
    from oof import load_config

    shutil.copytree(source, dest)
    here = load_config(None, str(dest))["data"]["root"]
    there = load_config(None, str(source))["data"]["root"]
    assert Path(here).resolve() == Path(there).resolve(), (here, there)
    return dest


# ---------------------------------------------------------------- the CLI in this process


@dataclass(frozen=True)
class CliResult:
    """What a `stacker` command returned and printed, as `subprocess.run(capture_output=True)` reports it."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def kept_logging():
    """`cli.main` points the `stacker` logger (and captured warnings) at the stdout of its call; give the logger
    back as it was afterwards."""
    from oof import LOGGER

    handlers, level, propagate = LOGGER.handlers[:], LOGGER.level, LOGGER.propagate
    warnings_handlers = logging.getLogger("py.warnings").handlers[:]
    try:
        yield
    finally:
        LOGGER.handlers, LOGGER.level, LOGGER.propagate = handlers, level, propagate
        logging.getLogger("py.warnings").handlers = warnings_handlers
        logging.captureWarnings(False)


def _text_stream() -> io.TextIOWrapper:
    # a TextIOWrapper (not a StringIO): main() reconfigures sys.stdout; not a terminal, as a pipe is not
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)


def run_cli(*args) -> CliResult:
    """`stacker ARGS` through `stacker_cli.main` in this process: its exit code (argparse's SystemExit too, as
    for --help) and what it wrote to stdout and stderr."""
    import stacker_cli as cli

    out, err = _text_stream(), _text_stream()
    with kept_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    return CliResult(code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode())
