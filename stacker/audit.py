"""The data seen through the models (`stacker audit`, and a section of report.html).

From the run's OOF rows alone (no model runs again): the train images the ensemble is
most confidently wrong about (fastai's `plot_top_losses`), the class pairs it confuses
most (`most_confused`), the likely label errors (confident learning, cleanlab), and the
near-duplicate clusters the duplicate detection listed in duplicates.csv (rendered
here, never detected a second time). With repeated folds a row's OOF probabilities are
averaged over the repeats before anything is ranked.

The ensemble is the one the report shows (`leaderboard.ensemble_oof`): the chosen
candidate's meta-level OOF when fit-stack wrote one, else the mean of the used models'
OOF. The label-quality score uses every model's OOF (`label_quality`).

Findings land in `RunPaths.audit_*` CSVs (every row; the pages show the first ones as
thumbnails, `stacker.audit_html`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from oof import RunPaths, StackerError, atomic_path, log_loss_rows, read_csv_strings

from .leaderboard import RunView, ensemble_oof, per_repeat

TOP_LOSSES_COLUMNS = ["rank", "id", "label", "predicted", "p_predicted", "p_label", "loss", "models_agree",
                      "models"]
LABEL_ISSUE_COLUMNS = ["rank", "id", "label", "suggested", "quality", "p_label", "p_suggested", "models_agree",
                       "models"]
DUPLICATE_COLUMNS = ["cluster", "kind", "id", "split", "label", "predicted", "p_label", "distance"]
# Cluster kinds in the order the audit shows them: what a user must act on first.
CLUSTER_KINDS = ("label conflict", "train-test", "train", "test")


@dataclass(frozen=True)
class AuditRows:
    """The train rows and what the models said of them, one row per train image.

    Attributes:
        ids: (N,) train ids in folds order.
        y: (N,) class index of each row's given label.
        classes: class names.
        models: {model: (N, C) OOF probabilities, averaged over repeats}.
        ensemble: (N, C) the ensemble's OOF probabilities, averaged over repeats.
        ensemble_label: what the ensemble is, in words.
    """

    ids: np.ndarray
    y: np.ndarray
    classes: tuple
    models: dict
    ensemble: np.ndarray
    ensemble_label: str

    @property
    def predicted(self) -> np.ndarray:
        return self.ensemble.argmax(axis=1)

    def agreeing(self, label: np.ndarray) -> np.ndarray:
        """(N,) how many models' own argmax is `label` (one class index per row)."""
        return np.sum([p.argmax(axis=1) == label for p in self.models.values()], axis=0)


def audit_rows(view: RunView, ensemble: tuple | None = None) -> AuditRows:
    """The rows of a run read for the report (`leaderboard.read_run`); `ensemble`: `ensemble_oof(view)` when
    the caller has it already."""
    repeats = view.folds.repeats
    proba, _, label = ensemble_oof(view) if ensemble is None else ensemble
    models = {name: repeat_average(m.oof.proba, repeats) for name, m in view.models.items()}
    return AuditRows(np.asarray(view.folds.ids), np.asarray(view.folds.y), tuple(view.folds.classes), models,
                     repeat_average(proba, repeats), label)


def repeat_average(proba: np.ndarray, repeats: int) -> np.ndarray:
    """(N, C) mean over repeats of an OOF table's (R x N, C) repeat-major rows."""
    return per_repeat(np.asarray(proba, dtype=np.float64), repeats).mean(axis=0)


# ---------------------------------------------------------------- findings

def top_losses(rows: AuditRows) -> pd.DataFrame:
    """Every train row the ensemble gets wrong, worst first: by loss (-log p of the given label), then id."""
    pred = rows.predicted
    wrong = np.flatnonzero(pred != rows.y)
    n = np.arange(len(rows.y))
    loss = log_loss_rows(rows.y, rows.ensemble)
    order = wrong[np.lexsort((rows.ids[wrong].astype(str), -loss[wrong]))]
    classes = np.asarray(rows.classes, dtype=object)
    frame = pd.DataFrame({
        "rank": np.arange(1, len(order) + 1), "id": rows.ids[order], "label": classes[rows.y[order]],
        "predicted": classes[pred[order]], "p_predicted": rows.ensemble[n[order], pred[order]],
        "p_label": rows.ensemble[n[order], rows.y[order]], "loss": loss[order],
        "models_agree": rows.agreeing(pred)[order], "models": len(rows.models)}, columns=TOP_LOSSES_COLUMNS)
    return frame


@dataclass(frozen=True)
class Confusion:
    """One (given, predicted) class pair the ensemble confuses: its count and its rows, most confident first."""

    actual: str
    predicted: str
    count: int
    rows: np.ndarray


def most_confused(rows: AuditRows, min_count: int = 1) -> list[Confusion]:
    """Off-diagonal (given, predicted) pairs with at least `min_count` rows, by count then name (fastai's
    `most_confused`)."""
    pred, y = rows.predicted, rows.y
    out = []
    for a, p in {(int(a), int(p)) for a, p in zip(y, pred) if a != p}:
        members = np.flatnonzero((y == a) & (pred == p))
        if len(members) >= min_count:
            confident = members[np.argsort(-rows.ensemble[members, p], kind="stable")]
            out.append(Confusion(rows.classes[a], rows.classes[p], len(members), confident))
    return sorted(out, key=lambda c: (-c.count, c.actual, c.predicted))


def label_quality(rows: AuditRows) -> np.ndarray:
    """(N,) label-quality score in [0, 1] of each row's given label, low = likely wrong: cleanlab's
    accuracy-weighted ensemble of the models' self-confidence (one model: its own self-confidence)."""
    from cleanlab.rank import get_label_quality_ensemble_scores, get_label_quality_scores

    probas = [normalised(p) for p in rows.models.values()]
    if len(probas) == 1:
        return get_label_quality_scores(rows.y, probas[0], method="self_confidence")
    return get_label_quality_ensemble_scores(rows.y, probas, method="self_confidence",
                                             weight_ensemble_members_by="accuracy", verbose=False)


# cleanlab's rule for how many rows of each class to flag. Per class (each class's estimated number of label
# errors, its lowest self-confidence first) found more flipped labels at the same precision than its default,
# by noise rate, on the demo with 5% flipped and on the synthetic sets of tests/test_audit.py (docs/audit.md).
FILTER_BY = "prune_by_class"


def flag_issues(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(N,) bool: confident learning's label issues (cleanlab `find_label_issues`, `FILTER_BY`) of OOF
    probabilities `proba`; one process, so the result does not depend on the machine."""
    from cleanlab.filter import find_label_issues

    present = np.bincount(y, minlength=proba.shape[1]) > 0
    if present.sum() < 2:
        return np.zeros(len(y), dtype=bool)
    with warnings.catch_warnings():  # "may not flag all label issues in class ...": a small class, as expected
        warnings.simplefilter("ignore", UserWarning)
        return np.asarray(find_label_issues(y, normalised(proba), filter_by=FILTER_BY, n_jobs=1), dtype=bool)


def normalised(proba: np.ndarray) -> np.ndarray:
    """Rows of non-negative probabilities summing to 1 (tables store float32 sums within ~1e-6)."""
    p = np.clip(np.asarray(proba, dtype=np.float64), 0.0, None)
    return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)


def label_issues(rows: AuditRows) -> pd.DataFrame:
    """The flagged rows (`flag_issues` on the ensemble's OOF), lowest label quality first, then id."""
    quality = label_quality(rows)
    flagged = np.flatnonzero(flag_issues(rows.y, rows.ensemble))
    order = flagged[np.lexsort((rows.ids[flagged].astype(str), quality[flagged]))]
    suggested = rows.ensemble.argmax(axis=1)
    n, classes = np.arange(len(rows.y)), np.asarray(rows.classes, dtype=object)
    return pd.DataFrame({
        "rank": np.arange(1, len(order) + 1), "id": rows.ids[order], "label": classes[rows.y[order]],
        "suggested": classes[suggested[order]], "quality": quality[order],
        "p_label": rows.ensemble[n[order], rows.y[order]], "p_suggested": rows.ensemble[n[order], suggested[order]],
        "models_agree": rows.agreeing(suggested)[order], "models": len(rows.models)}, columns=LABEL_ISSUE_COLUMNS)


# ---------------------------------------------------------------- duplicates

def read_pairs(paths: RunPaths) -> pd.DataFrame | None:
    """duplicates.csv's pairs (kind, id_a, id_b, distance, ...); None when the run has none (tables from
    other tools, `folds.duplicates: off`)."""
    if not paths.duplicates.is_file():
        return None
    pairs = read_csv_strings(paths.duplicates)
    missing = [c for c in ("kind", "id_a", "id_b", "distance") if c not in pairs.columns]
    if missing:
        raise StackerError(f"{paths.duplicates}: missing column(s) {missing}; it is the duplicate detection's "
                           "listing (kind, id_a, id_b, distance, label_a, label_b, conflict)")
    return pairs


def duplicate_clusters(pairs: pd.DataFrame | None, rows: AuditRows) -> pd.DataFrame:
    """One row per image of each cluster of connected pairs: label-conflict clusters first, then those
    with a test image, then the rest; within a kind, larger clusters first."""
    if pairs is None or not len(pairs):
        return pd.DataFrame(columns=DUPLICATE_COLUMNS)
    nodes = [(s, i) for s, i in zip(*_pair_nodes(pairs))]
    cluster = _connected(nodes)
    index = {i: k for k, i in enumerate(rows.ids.astype(str))}
    members: dict[int, list] = {}
    for (split, image), c in cluster.items():
        members.setdefault(c, []).append((split, image))
    kinds = [(_kind(m, rows, index), m) for m in members.values()]
    ranked = sorted(kinds, key=lambda km: (CLUSTER_KINDS.index(km[0]), -len(km[1]), sorted(km[1])))
    distance, out = _distances(pairs), []
    for number, (kind, images) in enumerate(ranked, start=1):
        for split, image in sorted(images, key=lambda m: (m[0] != "train", m[1])):
            out.append([number, kind, image, split, *_models_view(rows, index, split, image),
                        distance.get((split, image))])
    return pd.DataFrame(out, columns=DUPLICATE_COLUMNS)


def _pair_nodes(pairs: pd.DataFrame) -> tuple[list, list]:
    split_a = np.where(pairs["kind"] == "test", "test", "train")
    split_b = np.where(pairs["kind"] == "train", "train", "test")
    a = list(zip(split_a, pairs["id_a"]))
    b = list(zip(split_b, pairs["id_b"]))
    return a, b


def _connected(edges) -> dict:
    """{node: its cluster's smallest node} over the pairs (union-find)."""
    parent: dict = {}

    def root(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {node: root(node) for node in parent}


def _kind(images, rows: AuditRows, index: dict) -> str:
    labels = {rows.y[index[i]] for s, i in images if s == "train" and i in index}
    if len(labels) > 1:
        return "label conflict"
    if any(s == "test" for s, _ in images):
        return "train-test" if any(s == "train" for s, _ in images) else "test"
    return "train"


def _distances(pairs: pd.DataFrame) -> dict:
    """{(split, id): the smallest distance of a pair it is in}."""
    out: dict = {}
    a, b = _pair_nodes(pairs)
    for node_a, node_b, d in zip(a, b, pd.to_numeric(pairs["distance"], errors="coerce")):
        for node in (node_a, node_b):
            out[node] = min(out.get(node, d), d)
    return out


def _models_view(rows: AuditRows, index: dict, split: str, image: str) -> list:
    """[label, predicted, p_label] of a train row; blanks for a test image or a train image the folds leave
    out (data.exclude)."""
    at = index.get(image) if split == "train" else None
    if at is None:
        return ["", "", np.nan]
    pred = int(rows.ensemble[at].argmax())
    return [rows.classes[rows.y[at]], rows.classes[pred], float(rows.ensemble[at, rows.y[at]])]


# ---------------------------------------------------------------- the audit

@dataclass(frozen=True)
class Audit:
    """Everything the audit found (each table: every row; the pages show the first ones)."""

    rows: AuditRows
    top_losses: pd.DataFrame
    confused: list
    label_issues: pd.DataFrame
    duplicates: pd.DataFrame
    has_duplicates_file: bool
    edits: str = ""  # what data.exclude / data.relabel left out or changed, in words ("" for none)

    def write_tables(self, paths: RunPaths) -> list:
        """The three CSVs under `paths.audit`, each written atomically; returns their paths."""
        out = []
        for frame, path in ((self.label_issues, paths.audit_label_issues), (self.top_losses, paths.audit_top_losses),
                            (self.duplicates, paths.audit_duplicates)):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                frame.to_csv(tmp, index=False, float_format="%.6g")
            out.append(path)
        return out

    def summary(self) -> str:
        """One line: what the audit found."""
        conflicts = self.duplicates.loc[self.duplicates["kind"] == "label conflict", "cluster"].nunique()
        in_test = self.duplicates.loc[self.duplicates["kind"] == "train-test", "cluster"].nunique()
        first = self.confused[0] if self.confused else None
        confused = f"{first.actual} -> {first.predicted} ({first.count})" if first else "none"
        return (f"{len(self.label_issues)} likely label errors, {len(self.top_losses)} of {len(self.rows.y)} train "
                f"rows wrong out of fold, most confused {confused}, {conflicts} duplicate clusters with label "
                f"conflicts, {in_test} with a test image")


def audit_view(view: RunView, ensemble: tuple | None = None) -> Audit:
    """The audit of a run already read (`leaderboard.read_run`); `ensemble`: `ensemble_oof(view)` when the
    caller has it already."""
    rows = audit_rows(view, ensemble)
    pairs = read_pairs(view.paths)
    edits = view.folds.edits
    said = (f"{len(edits.excluded)} train rows left out (data.exclude) and {len(edits.relabelled)} relabelled "
            "(data.relabel): the audit sees the rows and labels the models trained on" if edits else "")
    return Audit(rows, top_losses(rows), most_confused(rows), label_issues(rows), duplicate_clusters(pairs, rows),
                 pairs is not None, said)
