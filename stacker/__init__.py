"""The meta level: combine base models' out-of-fold probabilities, guarded against meta-overfitting.

Reads prediction tables (ours or any tool's) through `oof`; imports lightgbm and
scikit-learn, never torch, so fit-stack and submit run anywhere.

    from stacker import StackConfig, StackGuard, fit_stack, write_submission
    decision = fit_stack("runs/paddy", StackConfig(metric="accuracy"))
    write_submission("runs/paddy", "data/sample_submission.csv")

Modules: `candidates/` (the registry and one module per family), `guard`
(the procedure: meta-level OOF, the decision, the nested estimate), `workers` (the fit
worker processes, the rows they share, the decision threads), `estimator`
(`StackGuard`, the procedure as an estimator), `fit` (a run's stack/ files),
`submit`, `provenance` (what a stack was made from; current or stale), `inputs`,
`metrics`, `report`, `config`.
"""
from .candidates import (CANDIDATES, BestSingle, Candidate, EnsembleSelection, LGBMClassShared, LGBMWide,
                         LogitMean, LogRegLogits, Mean, candidate_class, candidate_names, create_candidate,
                         ensemble_selection, register, registered, unregister)
from .config import SUBMIT_FORMATS, TEST_FEATURES, StackConfig, SubmitConfig, stack_config, submit_config
from .estimator import StackGuard
from .fit import fit_stack, load_stack
from .guard import decide, nested_estimate, run_guard
from .inputs import MetaData
from .metrics import Metric
from .report import format_report, leaderboard_frame
from .submit import write_submission

__all__ = [
    "CANDIDATES", "SUBMIT_FORMATS", "TEST_FEATURES", "BestSingle", "Candidate", "EnsembleSelection",
    "LGBMClassShared", "LGBMWide", "LogRegLogits", "LogitMean", "Mean", "MetaData", "Metric", "StackConfig",
    "StackGuard", "SubmitConfig", "candidate_class", "candidate_names", "create_candidate", "decide",
    "ensemble_selection", "fit_stack", "format_report", "leaderboard_frame", "load_stack", "nested_estimate",
    "register", "registered", "run_guard", "stack_config", "submit_config", "unregister", "write_submission",
]
