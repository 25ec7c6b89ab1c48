"""The model leaderboard of a run, from the first model with predictions on (`stacker leaderboard`).

One row per model with OOF predictions: its OOF accuracy and log-loss with and without
TTA as predict-oof stored them in metrics.json (tables from another tool have no
metrics.json: then the same `oof.accuracy` / `oof.log_loss` on its OOF table), the
spread across repeats when the folds are repeated, the expected calibration error,
training time (the histories' epoch seconds), prediction time, epochs and the size of
the fold models' weights. Once fit-stack has run, the decision's candidates follow, as
`stacker.report.leaderboard_frame` gives them. The HTML report (`stacker.html_report`)
renders the same rows.

ECE: 15 equal-width bins of the top-class confidence, sum over bins of
(rows in bin / rows) x |accuracy in bin - mean confidence in bin| (Guo et al. 2017,
"On Calibration of Modern Neural Networks"; bins (i/15, (i+1)/15], confidence 0 in the first).
With repeats, figures of one OOF table are the mean over repeats of each repeat's own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from oof import (Folds, PredictionTable, RunPaths, StackerError, accuracy, log_loss, read_json, read_table,
                 table_file, validate_oof)
from oof.views import parse_unit

from .inputs import load_run_folds
from .report import leaderboard_frame, test_side_line

ECE_BINS = 15  # the usual choice since Guo et al.: enough bins to see the curve, enough rows per bin


def reliability_bins(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS):
    """Per equal-width bin of the top-class confidence: (mean confidence, accuracy, rows), each (n_bins,).

    Empty bins hold NaN confidence and accuracy and 0 rows.
    """
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)  # bins (i/B, (i+1)/B]
    rows = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / rows
        bin_accuracy = np.bincount(index, correct.astype(float), n_bins) / rows
    return mean_confidence, bin_accuracy, rows


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of (N, C) probabilities for labels (N,): the rows-weighted mean |accuracy - confidence| over bins."""
    if not len(y):
        return float("nan")
    mean_confidence, bin_accuracy, rows = reliability_bins(y, proba, n_bins)
    full = rows > 0
    return float(np.sum(rows[full] * np.abs(bin_accuracy[full] - mean_confidence[full])) / len(y))


def per_repeat(proba: np.ndarray, repeats: int) -> np.ndarray:
    """(R, N, C) view of an OOF table's (R x N, C) repeat-major probabilities."""
    return proba.reshape(repeats, len(proba) // repeats, proba.shape[1])


def repeat_mean(score, y: np.ndarray, proba: np.ndarray, repeats: int) -> float:
    """`score(y, p)` averaged over repeats (each repeat's own rows), as metrics.json averages them."""
    return float(np.mean([score(y, p) for p in per_repeat(proba, repeats)]))


@dataclass
class ModelRun:
    """What a run holds of one base model.

    Attributes:
        oof: its OOF table in folds row order (repeat-major with repeats).
        plain: the plain view's OOF table (no TTA), None when the run has none.
        metrics: metrics.json ({} for tables from another tool).
        histories: one dict per (repeat, fold) job with a history: "repeat", "fold", "epochs" (records).
        weight_bytes: total size of its fold models' weights (None without any).
    """

    name: str
    oof: PredictionTable
    plain: PredictionTable | None
    metrics: dict
    histories: list = field(default_factory=list)
    weight_bytes: int | None = None


@dataclass
class RunView:
    """A run read for the leaderboard and the report: folds, models with predictions, the decision if any."""

    paths: RunPaths
    folds: Folds
    models: dict
    decision: dict | None


def _read_oof(path, folds: Folds) -> PredictionTable | None:
    path = table_file(path)
    return validate_oof(read_table(path, folds.classes, "oof"), folds) if path.is_file() else None


def read_histories(paths: RunPaths, name: str, folds: Folds) -> list[dict]:
    """Each (repeat, fold) job's epoch records, for the jobs with a history file."""
    out = []
    for r in range(folds.repeats):
        for k in range(folds.k):
            path = paths.for_repeat(r).history(name, k)
            if path.is_file():
                out.append({"repeat": r, "fold": k, "epochs": read_json(path).get("epochs", [])})
    return out


def weight_bytes(paths: RunPaths, name: str, folds: Folds) -> int | None:
    sizes = [p.stat().st_size for r in range(folds.repeats) for k in range(folds.k)
             if (p := paths.for_repeat(r).weights(name, k)).is_file()]
    return sum(sizes) if sizes else None


def read_model(paths: RunPaths, name: str, folds: Folds) -> ModelRun:
    """One model's OOF tables, metrics, histories and weight sizes (what exists of them)."""
    metrics_path = paths.predict_metrics(name)
    return ModelRun(name, _read_oof(paths.oof(name), folds), _read_oof(paths.oof_plain(name), folds),
                    read_json(metrics_path) if metrics_path.is_file() else {},
                    read_histories(paths, name, folds), weight_bytes(paths, name, folds))


def read_run(run_dir: str | os.PathLike) -> RunView:
    """The run's folds, every model with an OOF table, and stack/decision.json when fit-stack has run.

    Raises:
        StackerError: no folds, or no model has predictions yet.
    """
    paths = RunPaths(run_dir)
    folds = load_run_folds(paths)
    names = paths.predicted_models()
    if not names:
        raise StackerError(f"{paths.preds}: no model has an OOF table yet; run predict-oof first")
    decision = read_json(paths.decision) if paths.decision.is_file() else None
    return RunView(paths, folds, {name: read_model(paths, name, folds) for name in names}, decision)


def fold_scores(model: ModelRun, folds: Folds) -> np.ndarray:
    """(R, K) OOF accuracy of each repeat's fold k rows (fold k's model alone)."""
    y = folds.y
    scores = np.empty((folds.repeats, folds.k))
    for r, (proba, fold) in enumerate(zip(per_repeat(model.oof.proba, folds.repeats), folds.fold_matrix)):
        for k in range(folds.k):
            scores[r, k] = accuracy(y[fold == k], proba[fold == k])
    return scores


def stored_scores(model: ModelRun, folds: Folds) -> dict:
    """OOF accuracy and log-loss with and without TTA: metrics.json's, else computed from the tables."""
    m, y, r = model.metrics, folds.y, folds.repeats
    out = {"accuracy": m.get("accuracy"), "log_loss": m.get("log_loss"),
           "accuracy_no_tta": m.get("accuracy_no_tta"), "log_loss_no_tta": m.get("log_loss_no_tta")}
    if out["accuracy"] is None:  # another tool's table: the same functions predict-oof uses
        out["accuracy"] = repeat_mean(accuracy, y, model.oof.proba, r)
        out["log_loss"] = repeat_mean(log_loss, y, model.oof.proba, r)
    if out["accuracy_no_tta"] is None and model.plain is not None:
        out["accuracy_no_tta"] = repeat_mean(accuracy, y, model.plain.proba, r)
        out["log_loss_no_tta"] = repeat_mean(log_loss, y, model.plain.proba, r)
    return out


def model_row(model: ModelRun, folds: Folds, decision: dict | None) -> dict:
    """The leaderboard row of one model; None (NaN in the frame) where the run holds no such figure."""
    y, r = folds.y, folds.repeats
    row = {"kind": "model", "name": model.name, **stored_scores(model, folds)}
    row["accuracy_std"] = model.metrics.get("accuracy_std") if r > 1 else None
    row["ece"] = repeat_mean(expected_calibration_error, y, model.oof.proba, r)
    row["ece_no_tta"] = (None if model.plain is None else
                         repeat_mean(expected_calibration_error, y, model.plain.proba, r))
    epochs = [len(h["epochs"]) for h in model.histories]
    row["train_seconds"] = sum(e.get("seconds", 0.0) for h in model.histories for e in h["epochs"]) or None
    row["predict_seconds"] = model.metrics.get("seconds")
    cost = model.metrics.get("cost") or {}  # predict-oof's measured cost of the test side, every fold model
    row["image_ms"] = None if "image_seconds" not in cost else 1000 * cost["image_seconds"]
    row["fixed_seconds"] = cost.get("fixed_seconds")
    row["epochs"] = max(epochs) if epochs else None
    row["weights_mb"] = None if model.weight_bytes is None else model.weight_bytes / 1e6
    row["fold_scores"] = " ".join(f"{s:.4f}" for s in fold_scores(model, folds).ravel())
    record = (decision or {}).get("models", {}).get(model.name)
    row["score"], row["status"] = (record["score"], record["status"]) if record else (None, None)
    if row["status"] == "used" and ((decision or {}).get("predict") or {}).get("budget") is not None \
            and model.name not in used_models(decision):
        row["status"] = "not chosen (predict budget)"
    row["views"] = unit_views(decision).get(model.name)
    return row


def used_models(decision: dict | None) -> list[str]:
    """The models of the units decision.json's "used" lists ("model" or "model@v"), each once, in order."""
    return list(dict.fromkeys(parse_unit(name)[0] for name in (decision or {}).get("used", [])))


def unit_views(decision: dict | None) -> dict[str, int]:
    """{model: the TTA views its unit in the stack renders}, from decision.json's "predict"; {} without it."""
    units = ((decision or {}).get("predict") or {}).get("units", [])
    return {u["model"]: int(u["views"]) for u in units}


MODEL_COLUMNS = ["kind", "name", "accuracy", "accuracy_std", "accuracy_no_tta", "log_loss", "log_loss_no_tta",
                 "ece", "ece_no_tta", "train_seconds", "predict_seconds", "image_ms", "fixed_seconds", "epochs",
                 "weights_mb", "fold_scores", "score", "status", "views"]


def leaderboard(view: RunView) -> pd.DataFrame:
    """Models (best OOF accuracy first), then the decision's candidates and nested estimate, if any."""
    models = pd.DataFrame([model_row(m, view.folds, view.decision) for m in view.models.values()],
                          columns=MODEL_COLUMNS).sort_values("accuracy", ascending=False, kind="stable")
    models["epochs"] = models["epochs"].astype("Int64")  # whole epochs, also when a model has no history
    models["views"] = models["views"].astype("Int64")  # a view count; missing for a model outside the stack
    if view.decision is None:
        return models.reset_index(drop=True)
    stack = leaderboard_frame(view.decision)
    stack = stack[stack["kind"] != "model"]  # the model rows above carry the decision's score and status
    return pd.concat([models, stack], ignore_index=True)[list(dict.fromkeys([*MODEL_COLUMNS, *stack.columns]))]


def missing(value) -> bool:
    """True for a figure the run does not hold: None, NaN or pandas' NA."""
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _cell(value, spec: str) -> str:
    """`value` formatted by `spec`, or "-" in the same width when the run holds no such figure."""
    if missing(value):
        return format("-", re.sub(r"\+|\..*$", "", spec))
    return format(value, spec)


def format_models(frame: pd.DataFrame, repeats: int) -> list[str]:
    """The model rows as text lines: accuracy (sd across repeats), TTA vs plain, log-loss, ECE, times."""
    sd = f"{'sd':>8}" if repeats > 1 else ""
    rows = frame[frame["kind"] == "model"].to_dict("records")
    views = any(not missing(row["views"]) for row in rows)  # the stack's view choice, with decision "predict"
    lines = [f"{'model':<24}{'accuracy':>9}{sd}{'no TTA':>9}{'log_loss':>9}{'no TTA':>9}{'ECE':>8}{'no TTA':>8}"
             f"{'train s':>9}{'pred s':>8}{'ms/img':>8}{'epochs':>7}{'MB':>8}" + (f"{'views':>7}" if views else "")]
    for row in rows:
        spread = _cell(row["accuracy_std"], ">8.4f") if repeats > 1 else ""
        lines.append(f"{row['name']:<24}{_cell(row['accuracy'], '>9.4f')}{spread}"
                     f"{_cell(row['accuracy_no_tta'], '>9.4f')}{_cell(row['log_loss'], '>9.4f')}"
                     f"{_cell(row['log_loss_no_tta'], '>9.4f')}{_cell(row['ece'], '>8.4f')}"
                     f"{_cell(row['ece_no_tta'], '>8.4f')}{_cell(row['train_seconds'], '>9.1f')}"
                     f"{_cell(row['predict_seconds'], '>8.1f')}{_cell(row['image_ms'], '>8.2f')}"
                     f"{_cell(row['epochs'], '>7.0f')}"
                     f"{_cell(row['weights_mb'], '>8.1f')}" + (_cell(row["views"], ">7.0f") if views else ""))
    return lines


def format_candidates(frame: pd.DataFrame, decision: dict) -> list[str]:
    """The decision's candidate rows (chosen marked *) and the choice with its reason."""
    metric = decision["metric"]
    lines = ["", f"{'candidate (meta-level OOF)':<28}{metric:>12}{'interval':>22}{'gain vs mean':>14}"
                 f"{'win p':>8}{'log_loss':>10}"]
    for row in frame[frame["kind"] == "candidate"].to_dict("records"):
        mark = "*" if row["chosen"] else " "
        interval = f"[{row['low']:.4f}, {row['high']:.4f}]"
        lines.append(f"{mark} {row['name']:<26}{row['score']:>12.4f}{interval:>22}{row['gain']:>+14.4f}"
                     f"{_cell(row['win_probability'], '>8.3f')}{row['log_loss']:>10.4f}")
    nested = decision.get("nested")
    lines.append(f"chosen: {decision['chosen']}: {decision['reason']}")
    if nested:
        lines.append(f"nested estimate: {metric} {nested['score']:.4f}, log_loss {nested['log_loss']:.4f}")
    lines += [f"warning: {w}" for w in decision.get("warnings", [])]
    return lines


def format_leaderboard(view: RunView, frame: pd.DataFrame) -> str:
    lines = format_models(frame, view.folds.repeats)
    if view.decision is None:
        lines += ["", "no stack yet: fit-stack adds the candidates"]
    else:
        lines += format_candidates(frame, view.decision)
    return "\n".join(lines) + "\n"


def print_leaderboard(run_dir: str | os.PathLike, csv: str | os.PathLike | None = None, log=print) -> pd.DataFrame:
    """Print the run's leaderboard (and write it to `csv` when given); return it as a frame."""
    from oof import atomic_path

    view = read_run(run_dir)
    frame = leaderboard(view)
    if csv is not None:
        with atomic_path(csv) as tmp:
            frame.to_csv(tmp, index=False)
    if log:
        log(format_leaderboard(view, frame).rstrip("\n"))
        if view.decision and view.decision.get("test_side"):
            log(test_side_line(view.decision["test_side"]))
    return frame


def ensemble_oof(view: RunView) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(rows, C) OOF probabilities of the ensemble the page shows, its plain-view twin (None unless every
    used model has one) and what it is, in words."""
    decision = view.decision
    used = [m for m in used_models(decision) if m in view.models]  # a unit "model@v" counts as its model
    used = used or list(view.models)  # no stack yet (or none of its models left): every model
    proba = np.mean([view.models[m].oof.proba for m in used], axis=0)
    plains = [view.models[m].plain for m in used]
    plain = None if any(p is None for p in plains) else np.mean([p.proba for p in plains], axis=0)
    stack = read_table(view.paths.stack_oof, view.folds.classes, "oof") \
        if decision is not None and table_file(view.paths.stack_oof).is_file() else None
    if stack is not None and stack.meta.get("folds_sha256", view.folds.sha256) == view.folds.sha256:
        chosen = validate_oof(stack, view.folds)
        return chosen.proba, None, f"the chosen candidate, {decision['chosen']}: its meta-level OOF (stack/oof.parquet)"
    if stack is not None:  # the folds changed since (data.exclude, data.relabel): the stack is fitted again later
        label = (f"the mean of the used models' OOF ({', '.join(used)}): the stack was fitted on other folds; "
                 "run fit-stack again")
    elif decision is None:
        label = f"the mean of every model's OOF ({', '.join(used)}); no stack yet"
    elif decision["chosen"] == "mean":
        label = f"the chosen candidate, mean: the mean of the used models' OOF ({', '.join(used)})"
    else:
        label = (f"the mean of the used models' OOF ({', '.join(used)}), not the chosen {decision['chosen']}: "
                 "the run keeps no meta-level OOF of the chosen candidate")
    return proba, plain, label
