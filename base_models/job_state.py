"""Whether a (model, fold) job finished and whether its weights are still current, from its files alone.

A finished job's `fold<k>.history.json` records what its weights were made from: the recipe
(`recipe`), the folds' sha256, the digest of the job's own training rows, the train cache's
sha256 (`Sources`) and the weights' own sha256. train-base and predict-oof trust a job only while
all of these still hold (`stale_reason`); `stacker jobs` reads the same records. No torch here: a
status view runs where it is absent.

The training rows' digest (`rows_digest`: ids and labels of the rows the job trains on, and of its
held-out rows under `train.keep: best`, which pick its epoch) is what decides, where a record has
it: `data.exclude` and `data.relabel` change the folds' digest, yet a job whose rows they did not
touch (an excluded row it held out) trains to the same weights and stays current. A record without
it is judged by the folds' digest.

The full fit (`train-base --full`, fold None: `full.*` beside the fold jobs' files) trains on every
row of the folds and holds none out, so its rows digest covers them all and no fold assignment
changes it; `train.keep: best` has no epoch to pick there (`full_keep_refusal`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from oof import Folds, RunPaths, StackerError, file_digest, read_json

from .config import ModelSpec

# Where and how fast a job runs does not change what it learns.
PLACEMENT_KEYS = ("device", "compile", "gpu_cache_gb", "gpu_reserve_gb")
# Nor does the size its weights later predict at: predict-oof records that in its tables.
# (A larger predict_size grows the cache, and the train cache's digest covers that.)
NOT_RECIPE_KEYS = (*PLACEMENT_KEYS, "predict_size")
# Train keys added after weights were first recorded, with the value such older weights were trained
# at: amp did not exist and was what auto picks on the cards then used (bf16 on CUDA, off on CPU).
ADDED_KEYS = {"amp": "auto"}


def recipe(spec: ModelSpec) -> dict:
    """What decides a job's weights, as plain JSON values: a finished job or a checkpoint
    is only reused when the config still asks for the same recipe."""
    train = {k: v for k, v in asdict(spec.train).items() if k not in NOT_RECIPE_KEYS}
    return json.loads(json.dumps({"arch": spec.arch, "pretrained": spec.pretrained,
                                  "model_kwargs": spec.model_kwargs, "train": train}))


def changed_keys(done: dict, now: dict) -> list[str]:
    """Keys of `recipe` (train keys by name) that differ between two recipes."""
    keys = [k for k in ("arch", "pretrained", "model_kwargs") if done.get(k) != now[k]]
    train = done.get("train", {})
    return keys + sorted(k for k in now["train"] if train.get(k, ADDED_KEYS.get(k)) != now["train"][k])


def is_trained(paths: RunPaths, model: str, fold: int | None) -> bool:
    """Whether the job finished; whether its weights are still current is `stale_reason`'s question."""
    # The history is written after the weights, so its presence marks a finished job.
    return paths.history(model, fold).is_file() and paths.weights(model, fold).is_file()


# A rows digest tells that the rows changed, not why: a new fold assignment, or data.exclude / data.relabel.
ROWS_CHANGED = ("trained on other training rows or labels (another fold assignment, or data.exclude / data.relabel "
                "changed its training part)")
# The full fit's rows are every row of the folds: only data.exclude / data.relabel change them.
FULL_ROWS_CHANGED = "trained on other training rows or labels (data.exclude / data.relabel changed them)"


def full_keep_refusal(model: str) -> str:
    """Why a model with `train.keep: best` gets no full fit, in one line."""
    return (f"{model}: train.keep: best cannot train a full fit (train-base --full): it has no epoch to keep "
            "without a validation fold; use keep: last")


def check_full_keep(specs: list[ModelSpec]) -> None:
    """A full fit keeps its last epoch: refuse `train.keep: best` in one line naming the first such model.

    Raises:
        StackerError: `full_keep_refusal` of the first model with `train.keep: best`.
    """
    for spec in specs:
        if spec.train.keep == "best":
            raise StackerError(full_keep_refusal(spec.name))


def job_rows(folds: Folds, fold: int | None) -> np.ndarray:
    """(n,) rows of `folds` job `fold` trains on: every fold but `fold`; every row for the full fit (None)."""
    return np.arange(len(folds.ids)) if fold is None else folds.train_rows(fold)


@dataclass(frozen=True)
class Sources:
    """What a job's weights are made from besides its recipe, by digest.

    Attributes:
        folds_sha256: the fold assignment (`Folds.sha256`, of the job's repeat).
        cache_sha256: the train image cache (`ImageCache.digest`): ids, pixels, cache size, resize mode.
        rows_sha256: the job's own training rows (`rows_digest`); None where unknown (a job outside a
            run's grid): the folds' digest decides.
    """

    folds_sha256: str
    cache_sha256: str
    rows_sha256: str | None = None

    def reason(self, record: dict) -> str | None:
        """Why a job's record (history or checkpoint) was made from other sources; None when it was not.
        The phrase completes "<model> fold <k> was ..."."""
        if "folds_sha256" not in record:
            return "trained by an older version that recorded no fold or data digests"
        rows = record.get("rows_sha256")
        if rows is not None and self.rows_sha256 is not None:
            if rows != self.rows_sha256:
                return ROWS_CHANGED
        elif record["folds_sha256"] != self.folds_sha256:
            return "trained on another fold assignment"
        if record.get("cache_sha256") != self.cache_sha256:
            return "trained on other images (the train image cache changed)"
        return None


def rows_digest(folds: Folds, fold: int | None, held_out: bool = False) -> str:
    """sha256 over the (id, label) rows job `fold` trains on (fold != `fold`; every row for the full fit),
    sorted by id; with `held_out` its held-out rows too, apart (they pick the epoch under `train.keep: best`).

    Args:
        folds: the job's repeat's one-repeat folds.
        fold: the job's held-out fold; None for the full fit.
        held_out: include the held-out rows.
    """
    ids, labels = folds.ids.tolist(), folds.table["label"].tolist()
    train = [True] * len(ids) if fold is None else (folds.fold != fold).tolist()
    parts = [("train", True)] + ([("held out", False)] if held_out else [])
    h = hashlib.sha256()
    for name, side in parts:
        h.update(f"{name}\n".encode())
        h.update("".join(sorted(f"{i}\t{y}\n" for i, y, t in zip(ids, labels, train) if t == side)).encode())
    return h.hexdigest()


def job_sources(folds: Folds, fold: int | None, spec: ModelSpec, cache_sha256: str) -> Sources:
    """What job (`spec`, `fold`; None: the full fit) trains from: `folds` (its repeat's), its training rows,
    the train cache."""
    return Sources(folds.sha256, cache_sha256, rows_digest(folds, fold, spec.train.keep == "best"))


def stale_reason(paths: RunPaths, spec: ModelSpec, fold: int | None, sources: Sources) -> str | None:
    """Why a finished job's weights are not what the run would train now; None when they are.

    Stale: other training rows or labels (or, for a history without a rows digest, another
    fold assignment: its OOF rows would come from a model that saw them), other train images,
    another recipe, or a weights file that is not the one its history recorded. The phrase
    completes "<model> fold <k> was ..." (the full fit, fold None: "<model> full fit was ...").
    """
    record = read_json(paths.history(spec.name, fold))
    reason = sources.reason(record)
    if fold is None and reason == ROWS_CHANGED:
        reason = FULL_ROWS_CHANGED
    changed = changed_keys(record, recipe(spec))
    if reason is None and changed:
        reason = f"trained with other settings ({', '.join(changed)})"
    if reason is None and file_digest(paths.weights(spec.name, fold)) != record.get("weights_sha256"):
        reason = "changed after training (the weights file is not the one its history records)"
    return reason


def weights_digest(paths: RunPaths, model: str, fold: int | None) -> str:
    """The sha256 a finished job's history records for its weights (checked by `stale_reason`)."""
    return read_json(paths.history(model, fold))["weights_sha256"]


def read_history(paths: RunPaths, model: str, fold: int | None) -> list[dict]:
    """A finished job's per-epoch records."""
    return read_json(paths.history(model, fold))["epochs"]
