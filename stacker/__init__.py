"""The meta level: combine base models' out-of-fold probabilities, guarded against meta-overfitting.

Reads prediction tables (ours or any tool's) through `oof`; imports lightgbm and
scikit-learn, never torch, so fit-stack and submit run anywhere.

    from stacker import StackConfig, StackGuard, fit_stack, write_submission
    decision = fit_stack("runs/paddy", StackConfig(metric="accuracy"))
    write_submission("runs/paddy", "data/sample_submission.csv")
"""
from .combiners import (BestSingle, Combiner, EnsembleSelection, LogitMean, LogRegLogits, Mean,
                        ensemble_selection, make_combiner)
from .config import CANDIDATES, TEST_FEATURES, StackConfig
from .fit import fit_stack, load_stack
from .guard import decide, nested_estimate, run_guard
from .lgbm import LGBMClassShared, LGBMWide
from .metrics import Metric
from .report import format_report, leaderboard_frame
from .stack_guard import StackGuard
from .submit import write_submission

__all__ = [
    "CANDIDATES", "TEST_FEATURES", "BestSingle", "Combiner", "EnsembleSelection", "LGBMClassShared",
    "LGBMWide", "LogRegLogits", "LogitMean", "Mean", "Metric", "StackConfig", "StackGuard", "decide",
    "ensemble_selection", "fit_stack", "format_report", "leaderboard_frame", "load_stack", "make_combiner",
    "nested_estimate", "run_guard", "write_submission",
]
