"""The run's HTML report (`stacker report --run DIR`): one self-contained page, no network.

Sections: the leaderboard (per model and per fold, per repeat with repeats, with and
without TTA, log-loss, ECE, times, epochs, size), training curves, the OOF correlation
matrix and disagreement rates, reliability diagrams, the decision (forest plot of every
candidate's gain vs the mean, win probabilities, the choice and why, the nested
estimate, excluded and left-out models), the prediction time when decision.json records it
(score against predicted test seconds: the greedy path of plain means, the whole ensemble, the
candidates, the chosen one, the budget; the stack's units), the ensemble's confusion matrix and
per-class recall, and the run's config and provenance.

Every figure comes from the run's files as stored (metrics.json, decision.json, the
OOF tables, the histories) and is printed by one formatter (`fmt`); what is computed
here (per-fold accuracy, ECE, correlations, the confusion matrix) uses the same
functions as the leaderboard (`stacker.leaderboard`). Plots are matplotlib (Agg)
PNGs embedded as base64; every text is HTML-escaped.

The ensemble of the reliability diagram and the confusion matrix: the chosen candidate's
meta-level OOF (stack/oof.parquet, written by fit-stack); for a stack fitted before that
file existed, the mean of the used models' OOF probabilities (the page says which).
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np

import oof
from oof import write_text

from .audit import audit_view
from .audit_html import audit_section
from .html_parts import esc, fmt, html_page, table
from .leaderboard import (ECE_BINS, RunView, ensemble_oof, expected_calibration_error, fold_scores, leaderboard,
                          missing, read_run, reliability_bins, repeat_mean)
from .report import test_side_line
from .thumbnails import Thumbnails


def figure(fig, alt: str) -> str:
    """The figure as an embedded PNG <img>; the figure is closed."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit, also on a headless server
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- leaderboard

LEADERBOARD_COLUMNS = [("name", "model"), ("accuracy", "OOF accuracy"), ("accuracy_std", "sd across repeats"),
                       ("accuracy_no_tta", "accuracy, no TTA"), ("log_loss", "log-loss"),
                       ("log_loss_no_tta", "log-loss, no TTA"), ("ece", "ECE"), ("ece_no_tta", "ECE, no TTA"),
                       ("train_seconds", "train s"), ("predict_seconds", "predict s"),
                       ("image_ms", "test ms / image"), ("fixed_seconds", "test fixed s"), ("epochs", "epochs"),
                       ("weights_mb", "weights MB"), ("status", "in the stack"), ("views", "views in the stack")]


def leaderboard_section(view: RunView, models: list[dict]) -> str:
    """Models' OOF figures, then accuracy per fold (per repeat and fold with repeats)."""
    shown = {"accuracy_std": view.folds.repeats > 1, "views": any(row["views"] is not None for row in models)}
    columns = [c for c in LEADERBOARD_COLUMNS if shown.get(c[0], True)]
    rows = [[row[key] for key, _ in columns] for row in models]
    k, repeats = view.folds.k, view.folds.repeats
    fold_rows = []
    for row in models:
        scores = fold_scores(view.models[row["name"]], view.folds)
        for r in range(repeats):
            fold_rows.append([row["name"], *([r] if repeats > 1 else []), *scores[r]])
    fold_head = ["model", *(["repeat"] if repeats > 1 else []), *[f"fold {f}" for f in range(k)]]
    parts = [f"<h2>Leaderboard</h2>{table([h for _, h in columns], rows)}",
             f'<p class="note">OOF accuracy and log-loss as predict-oof stored them (metrics.json); ECE: '
             f"{ECE_BINS} equal-width bins of the top-class confidence; train s: the histories' epoch seconds, "
             "all folds; predict s: predict-oof's seconds; weights MB: all fold models"
             + ("; views in the stack: the TTA views its unit renders (decision.json's predict)"
                if shown["views"] else "") + ".</p>",
             f"<h3>OOF accuracy per fold</h3>{table(fold_head, fold_rows)}"]
    if repeats > 1:
        parts.append(repeats_table(view, models))
    return "".join(parts)


def repeats_table(view: RunView, models: list[dict]) -> str:
    """Each model's per-repeat accuracy and log-loss as metrics.json stored them."""
    repeats = view.folds.repeats
    rows = []
    for row in models:
        each = view.models[row["name"]].metrics.get("repeats") or [{}] * repeats
        rows.append([row["name"], *[e.get("accuracy") for e in each], *[e.get("log_loss") for e in each]])
    head = ["model", *[f"accuracy r{r}" for r in range(repeats)], *[f"log-loss r{r}" for r in range(repeats)]]
    return f"<h3>Per repeat</h3>{table(head, rows)}"


# ---------------------------------------------------------------- training curves

def curves_figure(name: str, histories: list[dict]):
    """Train and valid loss, and valid error rate, per epoch; one line per (repeat, fold) job."""
    plt = _pyplot()
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(10, 3.2))
    for i, h in enumerate(histories):
        color = plt.cm.tab10(i % 10)
        label = f"r{h['repeat']} f{h['fold']}" if h["repeat"] else f"fold {h['fold']}"
        epochs = [e["epoch"] for e in h["epochs"]]
        loss_ax.plot(epochs, [e.get("train_loss", np.nan) for e in h["epochs"]], color=color, label=f"{label} train")
        loss_ax.plot(epochs, [e.get("valid_loss", np.nan) for e in h["epochs"]], color=color, ls="--",
                     label=f"{label} valid")
        error_ax.plot(epochs, [e.get("error_rate", np.nan) for e in h["epochs"]], color=color, label=label)
    loss_ax.set(title=f"{name}: loss (solid train, dashed valid)", xlabel="epoch", ylabel="loss")
    error_ax.set(title=f"{name}: valid error rate", xlabel="epoch", ylabel="error rate")
    error_ax.legend(fontsize=7, ncol=2)
    return fig


def curves_section(view: RunView) -> str:
    parts = ["<h2>Training curves</h2>"]
    for name, model in view.models.items():
        if model.histories:
            parts.append(figure(curves_figure(name, model.histories), f"training curves of {name}"))
        else:
            parts.append(f'<p class="note">{esc(name)}: no training history in the run (tables from '
                         "another tool)</p>")
    return "".join(parts)


# ---------------------------------------------------------------- correlation

def true_class_probability(view: RunView) -> np.ndarray:
    """(rows, M) each model's OOF probability of the true class (every repeat's rows with repeats)."""
    y = np.tile(view.folds.y, view.folds.repeats)
    return np.stack([m.oof.proba[np.arange(len(y)), y] for m in view.models.values()], axis=1)


def correlation_order(corr: np.ndarray) -> np.ndarray:
    """Model order by average-linkage hierarchical clustering on 1 - correlation: similar models side by side."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(corr) < 3:
        return np.arange(len(corr))
    distance = np.clip(1 - np.nan_to_num(corr), 0, 2)
    np.fill_diagonal(distance, 0)
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


def disagreement(view: RunView) -> np.ndarray:
    """(M, M) share of OOF rows on which two models' argmax classes differ."""
    picks = np.stack([m.oof.proba.argmax(axis=1) for m in view.models.values()])
    return (picks[:, None, :] != picks[None, :, :]).mean(axis=2)


def heatmap(matrix: np.ndarray, names: list[str], title: str, cmap: str):
    plt = _pyplot()
    size = 2 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap=cmap)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    middle = (np.nanmin(matrix) + np.nanmax(matrix)) / 2
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                color="white" if matrix[i, j] < middle else "black")  # viridis is dark at the low end
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def correlation_section(view: RunView) -> tuple[str, dict]:
    """Pearson correlation of the models' true-class OOF probabilities, clustered; argmax disagreement."""
    names = list(view.models)
    if len(names) < 2:
        return "<h2>Correlation</h2><p class=note>one model: nothing to correlate</p>", {}
    corr = np.corrcoef(true_class_probability(view), rowvar=False)
    order = correlation_order(corr)
    ordered = [names[i] for i in order]
    differ = disagreement(view)
    html_ = ("<h2>OOF correlation and disagreement</h2>"
             '<p class="note">Pearson correlation of each model\'s OOF probability of the true class, models '
             "ordered by average-linkage hierarchical clustering (scipy) on 1 - correlation.</p>"
             + figure(heatmap(corr[np.ix_(order, order)], ordered, "OOF correlation (true-class probability)",
                              "viridis"), "OOF correlation heatmap")
             + "<h3>Pairwise disagreement rate of the argmax class</h3>"
             + table(["model", *ordered], [[a, *differ[i, order]] for a, i in zip(ordered, order)]))
    return html_, {"correlation": corr, "disagreement": differ, "order": ordered}


# ---------------------------------------------------------------- calibration

def reliability_axes(ax, y: np.ndarray, curves: list, title: str) -> None:
    """One reliability diagram: accuracy against mean confidence per bin, one line per (label, proba)."""
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls=":")
    for (label, proba), style in zip(curves, ("o-", "s--")):
        confidence, bin_accuracy, rows = reliability_bins(y, proba)
        ece = expected_calibration_error(y, proba)
        ax.plot(confidence[rows > 0], bin_accuracy[rows > 0], style, ms=3, label=f"{label} ECE {ece:.4f}")
    ax.set(title=title, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")


def reliability_figure(view: RunView, ensemble: tuple) -> object:
    """Per model TTA vs plain view, then the ensemble; all rows of every repeat."""
    plt = _pyplot()
    y = np.tile(view.folds.y, view.folds.repeats)
    panels = [(name, [("TTA", m.oof.proba), *([("plain", m.plain.proba)] if m.plain is not None else [])])
              for name, m in view.models.items()]
    proba, plain, _ = ensemble
    panels.append(("ensemble", [("TTA", proba), *([("plain", plain)] if plain is not None else [])]))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows), squeeze=False)
    for ax, (title, curves) in zip(axes.ravel(), panels):
        reliability_axes(ax, y, curves, title)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def calibration_section(view: RunView, models: list[dict], ensemble: tuple) -> tuple[str, dict]:
    """Reliability diagrams and the ECE table: each model with and without TTA, and the ensemble."""
    proba, plain, label = ensemble
    y, r = view.folds.y, view.folds.repeats
    after = repeat_mean(expected_calibration_error, y, proba, r)
    before = None if plain is None else repeat_mean(expected_calibration_error, y, plain, r)
    rows = [[row["name"], row["ece_no_tta"], row["ece"]] for row in models] + [["ensemble", before, after]]
    note = ("" if all(m.plain is not None for m in view.models.values()) else
            " Models without an oof_plain table (runs before it existed, other tools) show TTA only.")
    text = ("<h2>Calibration</h2>"
            f'<p class="note">Reliability diagrams ({ECE_BINS} equal-width bins of the top-class confidence; '
            f"points: bins with rows). Ensemble: {esc(label)}.{esc(note)}</p>"
            + figure(reliability_figure(view, ensemble), "reliability diagrams")
            + "<h3>Expected calibration error: plain view (before TTA) and after TTA</h3>"
            + table(["model", "ECE plain", "ECE with TTA"], rows))
    return text, {"ensemble_ece": after, "ensemble_ece_plain": before, "ensemble_label": label}


# ---------------------------------------------------------------- decision

def forest_figure(decision: dict):
    """Every candidate's gain over the mean with its bootstrap interval; the chosen one in green."""
    plt = _pyplot()
    names = list(decision["candidates"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    for i, name in enumerate(names):
        c = decision["candidates"][name]
        low, high = c["gain_interval"]
        color = "tab:green" if name == decision["chosen"] else "tab:blue"
        ax.errorbar(c["gain"], i, xerr=[[c["gain"] - low], [high - c["gain"]]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="#666", lw=1)
    ax.axvline(decision["config"]["min_gain"], color="#aaa", lw=1, ls=":")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    conf = decision["config"]["confidence"]
    ax.set(xlabel=f"gain in {decision['metric']} vs the mean ({conf:.0%} paired bootstrap interval; "
                  "dotted: min_gain)", title="Candidates (meta-level OOF)")
    return fig


def candidates_table(decision: dict) -> str:
    repeats = decision.get("repeats", 1)
    head = ["candidate", decision["metric"], "low", "high", "gain vs mean", "gain low", "gain high",
            "win probability", "admissible", "log-loss", *(["sd across repeats"] if repeats > 1 else [])]
    rows = [[name, c["score"], *c["interval"], c["gain"], *c["gain_interval"], c["win_probability"],
             c["admissible"], c["log_loss"], *([c["repeat_std"]] if repeats > 1 else [])]
            for name, c in decision["candidates"].items()]
    return table(head, rows, chosen={decision["chosen"]})


def nested_html(decision: dict) -> str:
    nested = decision.get("nested")
    if not nested:
        why = decision.get("nested_note", "stack.nested is false")
        return f"<p>Nested estimate: off ({esc(why)}); the chosen score above is optimistic.</p>"
    spread = f", sd {fmt(nested['repeat_std'])} across repeats" if "repeat_std" in nested else ""
    rows = [[f.get("repeat", 0), f["fold"], f["chosen"], f["score"]] for f in nested["folds"]]
    return (f"<p>Nested estimate of what submit uses: {esc(decision['metric'])} {fmt(nested['score'])}{spread}, "
            f"log-loss {fmt(nested['log_loss'])}.</p>" + table(["repeat", "outer fold", "chosen", "score"], rows))


def models_html(decision: dict) -> str:
    """The decision's view of the base models, then excluded and left-out ones with the reasons."""
    rows = [[name, m["score"], m["log_loss"], m["sure_share"], m.get("consistency"), m["status"],
             m.get("reason", "")] for name, m in decision["models"].items()]
    parts = ["<h3>Base models at the meta level</h3>",
             table(["model", decision["metric"], "log-loss", "sure rows", "OOF/test z", "status", "reason"], rows)]
    for title, entries in (("Excluded as suspicious", decision.get("excluded") or {}),
                           ("Candidates left out", decision.get("left_out") or {})):
        items = "".join(f"<li>{esc(name)}: {esc(why)}</li>" for name, why in entries.items())
        parts.append(f"<p>{title}: {'none' if not entries else ''}</p>" + (f"<ul>{items}</ul>" if items else ""))
    return "".join(parts)


def repeats_html(decision: dict) -> str:
    if decision.get("repeats", 1) < 2:
        return ""
    rows = [[d["repeat"], d["chosen"], d["best"], d["reason"]] for d in decision["repeat_decisions"]]
    return (f"<h3>Each repeat's own choice</h3>{table(['repeat', 'chosen', 'best', 'reason'], rows)}"
            f"<p>{fmt(decision['agreement'])} of repeats agree with the combined choice.</p>")


def decision_section(decision: dict | None) -> str:
    if decision is None:
        return "<h2>Decision</h2><p>No stack yet: run fit-stack to add the candidates and the decision.</p>"
    return ("<h2>Decision</h2>" + figure(forest_figure(decision), "forest plot of the candidates' gains")
            + candidates_table(decision)
            + f"<p><b>Chosen: {esc(decision['chosen'])}</b> (best: {esc(decision['best'])}). "
              f"{esc(decision['reason'])}</p>"
            + (f"<p>{esc(test_side_line(decision['test_side']))}</p>" if decision.get("test_side") else "")
            + warnings_html(decision) + nested_html(decision) + repeats_html(decision) + models_html(decision))


def warnings_html(decision: dict) -> str:
    """The decision's warnings (a split leak kept with allow_suspicious, a nested estimate too good to be true)."""
    warnings = decision.get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return f'<div class="warning"><p><b>Warnings</b></p><ul>{items}</ul></div>'


# ---------------------------------------------------------------- prediction time

def front_figure(decision: dict):
    """The guard metric against predicted test seconds: the greedy path of plain means as a step line (each point
    labelled by the unit it adds), the whole ensemble's mean without a budget, every candidate at its predicted
    seconds (the chosen one starred), the budget as a dashed line."""
    plt = _pyplot()
    predict = decision["predict"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    path = predict.get("path") or []
    if path:
        xs, ys = [p["seconds"] for p in path], [p["score"] for p in path]
        ax.step(xs, ys, where="post", color="tab:blue", lw=1.5, label="greedy path: plain mean of the units so far")
        ax.plot(xs, ys, "o", color="tab:blue", ms=4)
        for p in path:
            ax.annotate(p["unit"], (p["seconds"], p["score"]), xytext=(4, -11), textcoords="offset points",
                        fontsize=7, color="tab:blue")
    mean = decision["candidates"].get("mean")
    if predict["budget"] is None and mean is not None:  # every unit stacked: the mean is the whole ensemble's
        ax.plot(predict["ensemble_seconds"], mean["score"], "D", color="tab:orange", mfc="none", mew=2, ms=13,
                label="whole ensemble (mean, every model at every view)")  # hollow: the star may sit inside
    if predict["budget"] is not None:
        ax.axvline(predict["budget"], color="tab:red", ls="--", lw=1, label=f"budget {predict['budget']:g} s")
    candidate_points(ax, decision)
    ax.set_xlim(left=0)
    ax.set(xlabel=f"predicted test seconds ({predict['rows']} images)", ylabel=f"{decision['metric']} (OOF)",
           title="Score against predicted test time")
    ax.legend(fontsize=7, loc="best")
    return fig


def candidate_points(ax, decision: dict) -> None:
    """Each candidate's meta-level OOF score at its predicted seconds: small grey points, labelled where they do
    not crowd one another; the chosen one a large star with its name."""
    seconds = decision["predict"]["seconds"]
    points = {name: (c.get("predict_seconds", seconds), c["score"]) for name, c in decision["candidates"].items()}
    others = {name: xy for name, xy in points.items() if name != decision["chosen"]}
    if others:
        ax.plot(*zip(*others.values()), ".", color="#666", ms=6, label="candidates (meta-level OOF)")
    x, y = points[decision["chosen"]]
    ax.plot(x, y, "*", color="tab:green", mec="black", ms=16, zorder=5, label=f"chosen: {decision['chosen']}")
    ax.annotate(f"chosen: {decision['chosen']}", (x, y), xytext=(9, 5), textcoords="offset points", fontsize=9,
                fontweight="bold", color="tab:green")
    low, high = ax.get_ylim()
    last = None
    for name, (x, y) in sorted(others.items(), key=lambda item: item[1][1]):
        if last is None or y - last > (high - low) / 30:  # about one label's height apart
            ax.annotate(name, (x, y), xytext=(-5, 0), textcoords="offset points", ha="right", va="center",
                        fontsize=6, color="#444")
            last = y


def prediction_section(decision: dict | None) -> str:
    """decision.json's "predict": the front figure, the settings with the stack's and the whole ensemble's
    predicted seconds, the stack's units, and the greedy path; "" without it."""
    predict = (decision or {}).get("predict")
    if not predict:
        return ""
    rows = [["budget", "none" if predict["budget"] is None else f"{predict['budget']:g} s"],
            ["images", predict["rows"]], ["speed ratio", predict["speed_ratio"]],
            ["fold models per model", "every one (R x K)" if predict["folds"] == -1 else predict["folds"]],
            ["measured on", ", ".join(predict.get("devices") or []) or "-"],
            ["predicted seconds: the stack", predict["seconds"]],
            ["predicted seconds: the whole ensemble", predict["ensemble_seconds"]]]
    units = [[u["name"], u["model"], u["views"], u["fold_models"], u["seconds"]] for u in predict["units"]]
    outer = predict.get("outer") or {}
    chose = "; ".join(f"{fold}: {', '.join(names)}" for fold, names in outer.items())
    return ("<h2>Prediction time</h2>"
            '<p class="note">Predicted seconds per unit (a model at its first v TTA views): fold models x (load '
            "+ images x views x seconds per image and view, as predict-oof measured them) / speed ratio. The "
            "greedy path adds, from nothing and without a budget, the unit (or more views of a chosen model) "
            "that gains most per second: the score-vs-seconds front of plain means. Every candidate stacks the "
            "same units, so all share the stack's predicted seconds.</p>"
            + figure(front_figure(decision), "score against predicted test seconds")
            + table(["", ""], rows)
            + "<h3>Units in the stack</h3>"
            + table(["unit", "model", "views", "fold models", "predicted s"], units)
            + (f'<p class="note">The nested estimate\'s outer folds chose: {esc(chose)}.</p>' if chose else "")
            + path_table(decision))


def path_table(decision: dict) -> str:
    """The greedy path's steps, folded away: unit added, its model and views, cumulative seconds, score, log-loss."""
    path = decision["predict"].get("path") or []
    if not path:
        return '<p class="note">No greedy path recorded.</p>'
    rows = [[p["unit"], p["model"], p["views"], p["seconds"], p["score"], p["log_loss"]] for p in path]
    return ("<details><summary>Greedy path, step by step</summary>"
            + table(["unit added", "model", "views", "seconds so far", decision["metric"], "log-loss"], rows)
            + "</details>")


# ---------------------------------------------------------------- confusion

def confusion_matrix(y: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) row counts: true class by row, predicted (argmax) class by column."""
    return np.bincount(y * n_classes + proba.argmax(axis=1), minlength=n_classes * n_classes
                       ).reshape(n_classes, n_classes)


def confusion_figure(counts: np.ndarray, classes: tuple):
    plt = _pyplot()
    size = min(12, 2.5 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    if len(classes) <= 25:
        for i, j in np.ndindex(counts.shape):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (counts; colour: share of the true class)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def confusion_section(view: RunView, ensemble: tuple) -> tuple[str, dict]:
    """The ensemble's OOF confusion matrix and per-class recall (every repeat's rows with repeats)."""
    proba, _, label = ensemble
    classes = view.folds.classes
    y = np.tile(view.folds.y, view.folds.repeats)
    counts = confusion_matrix(y, proba, len(classes))
    rows_per_class = counts.sum(axis=1)
    recall = np.diag(counts) / np.maximum(rows_per_class, 1)
    rows = [[c, int(n), int(p), float(r)] for c, n, p, r in zip(classes, rows_per_class, counts.sum(axis=0), recall)]
    repeats = f" (all {view.folds.repeats} repeats' rows)" if view.folds.repeats > 1 else ""
    text = ("<h2>Confusion matrix and per-class recall</h2>"
            f'<p class="note">OOF of {esc(label)}{repeats}.</p>'
            + figure(confusion_figure(counts, classes), "confusion matrix")
            + table(["class", "rows", "predicted", "recall"], sorted(rows, key=lambda row: row[3])))
    return text, {"confusion": counts, "recall": dict(zip(classes, recall.tolist()))}


# ---------------------------------------------------------------- provenance

def tta_cell(meta: dict) -> str:
    """A table's TTA settings in one short cell: the views it records (schema 2) as their count."""
    tta = meta.get("tta")
    if not isinstance(tta, dict):
        return "-"
    settings = {k: v for k, v in tta.items() if k != "views"}
    return f"{settings}" + (f", {len(tta['views'])} views recorded" if isinstance(tta.get("views"), list) else "")


def provenance_section(view: RunView) -> str:
    """Toolkit version, the folds (digest, K, repeats, seed), each table's metadata, and run.yaml's text."""
    folds, paths = view.folds, view.paths
    rows = [["toolkit version", oof.__version__], ["run", str(paths.root)], ["train rows", str(folds.n_rows)],
            ["classes", str(len(folds.classes))], ["folds K", str(folds.k)], ["repeats", str(folds.repeats)],
            ["folds seed", "-" if folds.seed is None else str(folds.seed)], ["folds sha256", folds.sha256]]
    if view.decision:
        rows += [["stack made by version", view.decision.get("version", "-")],
                 ["stack folds sha256", view.decision.get("folds_sha256", "-")]]
    tables = [[name, m.oof.meta.get("folds_sha256", "-"), m.oof.meta.get("version", "-"), tta_cell(m.oof.meta)]
              for name, m in view.models.items()]
    config = paths.config.read_text(encoding="utf-8") if paths.config.is_file() else "(no run.yaml in the run)"
    return ("<h2>Config and provenance</h2>" + table(["", ""], rows)
            + table(["model OOF table", "folds sha256", "version", "TTA"], tables)
            + f"<details><summary>{esc(paths.config.name)}</summary><pre>{esc(config)}</pre></details>")


# ---------------------------------------------------------------- page

def summary(view: RunView, models: list[dict]) -> str:
    """One paragraph: the models, the best one, and the stack's choice with its nested estimate."""
    best = models[0]
    text = (f"{len(models)} model(s) on {view.folds.n_rows} train rows, {len(view.folds.classes)} classes, "
            f"{view.folds.k} folds" + (f" x {view.folds.repeats} repeats" if view.folds.repeats > 1 else "")
            + f". Best model: {best['name']} (OOF accuracy {fmt(best['accuracy'])}).")
    decision = view.decision
    if decision:
        nested = decision.get("nested")
        chosen = decision["chosen"]
        text += (f" Stack: {chosen} ({decision['metric']} {fmt(decision['candidates'][chosen]['score'])}"
                 + (f", nested estimate {fmt(nested['score'])}" if nested else "") + ").")
    else:
        text += " No stack yet."
    return f"<p>{esc(text)}</p>"


def build_report(run_dir: str | os.PathLike) -> tuple[str, dict]:
    """The page and the figures it shows: {"models": leaderboard rows, "decision": decision.json or None,
    "ensemble_ece", "confusion", "recall", "correlation", "disagreement", ...}."""
    view = read_run(run_dir)
    frame = leaderboard(view)
    models = [{k: (None if missing(v) else v) for k, v in row.items()}
              for row in frame[frame["kind"] == "model"].to_dict("records")]
    ensemble = ensemble_oof(view)
    correlation, corr_data = correlation_section(view)
    calibration, cal_data = calibration_section(view, models, ensemble)
    confusion, conf_data = confusion_section(view, ensemble)
    audit = audit_view(view, ensemble)
    body = (summary(view, models) + leaderboard_section(view, models) + curves_section(view) + correlation + calibration
            + decision_section(view.decision) + prediction_section(view.decision) + confusion
            + audit_section(audit, Thumbnails(view.paths)) + provenance_section(view))
    title = f"stacker report: {view.paths.root.parent.name}/{view.paths.root.name}"  # e.g. stacker-demo/run
    return html_page(title, body), {"models": models, "decision": view.decision, "audit": audit, **corr_data, **cal_data, **conf_data}


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write the run's report.html and the audit's CSVs it points to (each atomically); return the page's path."""
    from oof import RunPaths

    page, data = build_report(run_dir)
    path = RunPaths(run_dir).report
    data["audit"].write_tables(RunPaths(run_dir))
    write_text(path, page)
    return path
