"""Whether a (model, fold) job finished and whether its weights are still current, from its files alone.

A finished job's `fold<k>.history.json` records what its weights were made from: the recipe
(`recipe`), the folds' and the train cache's sha256 (`Sources`) and the weights' own sha256.
train-base and predict-oof trust a job only while all of these still hold (`stale_reason`);
`stacker jobs` reads the same records. No torch here: a status view runs where it is absent.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from oof import RunPaths, file_digest, read_json

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


def is_trained(paths: RunPaths, model: str, fold: int) -> bool:
    """Whether the job finished; whether its weights are still current is `stale_reason`'s question."""
    # The history is written after the weights, so its presence marks a finished job.
    return paths.history(model, fold).is_file() and paths.weights(model, fold).is_file()


@dataclass(frozen=True)
class Sources:
    """What a job's weights are made from besides its recipe, by digest.

    Attributes:
        folds_sha256: the fold assignment (`Folds.sha256`).
        cache_sha256: the train image cache (`ImageCache.digest`): ids, pixels, cache size, resize mode.
    """

    folds_sha256: str
    cache_sha256: str

    def reason(self, record: dict) -> str | None:
        """Why a job's record (history or checkpoint) was made from other sources; None when it was not.
        The phrase completes "<model> fold <k> was ..."."""
        if "folds_sha256" not in record:
            return "trained by an older version that recorded no fold or data digests"
        if record["folds_sha256"] != self.folds_sha256:
            return "trained on another fold assignment"
        if record.get("cache_sha256") != self.cache_sha256:
            return "trained on other images (the train image cache changed)"
        return None


def stale_reason(paths: RunPaths, spec: ModelSpec, fold: int, sources: Sources) -> str | None:
    """Why a finished job's weights are not what the run would train now; None when they are.

    Stale: another fold assignment (its OOF rows would come from a model that saw
    them), other train images, another recipe, or a weights file that is not the
    one its history recorded. The phrase completes "<model> fold <k> was ...".
    """
    record = read_json(paths.history(spec.name, fold))
    reason = sources.reason(record)
    changed = changed_keys(record, recipe(spec))
    if reason is None and changed:
        reason = f"trained with other settings ({', '.join(changed)})"
    if reason is None and file_digest(paths.weights(spec.name, fold)) != record.get("weights_sha256"):
        reason = "changed after training (the weights file is not the one its history records)"
    return reason


def weights_digest(paths: RunPaths, model: str, fold: int) -> str:
    """The sha256 a finished job's history records for its weights (checked by `stale_reason`)."""
    return read_json(paths.history(model, fold))["weights_sha256"]


def read_history(paths: RunPaths, model: str, fold: int) -> list[dict]:
    """A finished job's per-epoch records."""
    return read_json(paths.history(model, fold))["epochs"]
