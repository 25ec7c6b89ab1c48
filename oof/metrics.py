"""The scores both sides of the contract compute: numpy only, arguments in scikit-learn's order (y, proba)."""
from __future__ import annotations

import numpy as np

EPS = 1e-15  # probability floor of log-loss: one confident miss costs at most -log(1e-15) = 34.5


def log_loss_rows(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(N,) -log of each row's probability on its true class, floored at EPS."""
    return -np.log(np.clip(proba[np.arange(len(y)), y], EPS, 1.0))


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean log-loss of (N, C) probabilities for labels (N,); NaN for no rows."""
    return float(log_loss_rows(y, proba).mean()) if len(y) else float("nan")


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Share of rows whose argmax is the label; NaN for no rows."""
    return float((proba.argmax(axis=1) == y).mean()) if len(y) else float("nan")
