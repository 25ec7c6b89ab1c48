"""StackConfig: defaults in one place, every bad value refused with the key that holds it."""
import pytest

from oof import StackerError, build_config
from stacker import CANDIDATES, StackConfig, stack_config


def test_defaults_are_valid_and_hold_every_candidate():
    config = StackConfig()
    assert config.metric == "accuracy" and config.candidates == CANDIDATES
    assert config.candidates[0] == "mean" and config.nested and not config.allow_suspicious
    assert config.to_dict()["candidates"] == list(CANDIDATES)


def test_candidates_are_put_in_complexity_order():
    assert StackConfig(candidates=["lgbm_wide", "mean", "best_single"]).candidates == (
        "mean", "best_single", "lgbm_wide")


@pytest.mark.parametrize("options, message", [
    ({"metric": "r2"}, r"stack\.metric: 'r2' scores regressions"),
    ({"metric": "adjusted_rand_score"}, r"stack\.metric: 'adjusted_rand_score' scores clusterings"),
    ({"metric": "accuracyy"}, r"stack\.metric: 'accuracyy' is not a scikit-learn scorer"),
    ({"candidates": ["mean", "xgboost"]}, r"stack\.candidates: unknown candidate 'xgboost'"),
    ({"candidates": ["logreg"]}, r"stack\.candidates: must include 'mean'"),
    ({"candidates": ["mean", "mean"]}, r"stack\.candidates: a candidate is listed twice"),
    ({"candidates": "mean"}, r"stack\.candidates: expected a list"),
    ({"min_gain": -0.1}, r"stack\.min_gain: expected a number >= 0"),
    ({"confidence": 1.0}, r"stack\.confidence: expected a probability"),
    ({"n_bootstrap": 10}, r"stack\.n_bootstrap: expected an integer in \[100, 100000\]"),
    ({"n_bootstrap": 10**6}, r"stack\.n_bootstrap: expected an integer in \[100, 100000\]"),
    ({"min_gain": float("nan")}, r"stack\.min_gain: expected a number >= 0, got nan"),
    ({"logreg_alpha": float("inf")}, r"stack\.logreg_alpha: expected a number > 0, got inf"),
    ({"lgbm_lambda_l2": float("nan")}, r"stack\.lgbm_lambda_l2: expected a number >= 0"),
    ({"confidence": float("nan")}, r"stack\.confidence: expected a probability"),
    ({"seed": -1}, r"stack\.seed: expected an integer in \[0, 4294967295\]"),
    ({"seed": True}, r"stack\.seed: expected an integer"),
    ({"nested": 1}, r"stack\.nested: expected true or false"),
    ({"candidates": ["mean", 3]}, r"stack\.candidates: expected a list of candidate names"),
    ({"metric": ""}, r"stack\.metric: expected a scikit-learn scorer name"),
    ({"test_features": "median"}, r"stack\.test_features: expected one of"),
    ({"allow_suspicious": "yes"}, r"stack\.allow_suspicious: expected true or false"),
    ({"lgbm_num_leaves": 1}, r"stack\.lgbm_num_leaves"),
    ({"lgbm_max_depth": 0}, r"stack\.lgbm_max_depth: expected an integer >= 1 or -1 for no limit"),
    ({"lgbm_feature_fraction": 0}, r"stack\.lgbm_feature_fraction: expected a fraction"),
    ({"lgbm_max_rounds": 2.5}, r"stack\.lgbm_max_rounds: expected an integer"),
    ({"n_jobs": 0}, r"stack\.n_jobs: expected an integer >= 1 or -1 for every core"),
    ({"es_init": 9, "es_steps": 5}, r"stack\.es_init: 9 initial picks exceed es_steps=5"),
])
def test_bad_values_are_refused_naming_the_key(options, message):
    with pytest.raises(StackerError, match=message):
        StackConfig(**options)


def test_built_from_a_yaml_mapping_like_the_cli():
    config = build_config(StackConfig, {"metric": "neg_log_loss", "min_gain": 0.01}, "stack")
    assert config.metric == "neg_log_loss" and config.min_gain == 0.01
    with pytest.raises(StackerError, match=r"stack: unknown key\(s\) \['min_gian'\]"):
        build_config(StackConfig, {"min_gian": 0.01}, "stack")


def test_stack_config_reads_the_stack_section_of_a_raw_config():
    assert stack_config({"run_dir": "runs/x", "stack": {"metric": "f1_macro"}}).metric == "f1_macro"
    assert stack_config({}) == StackConfig()
    assert StackConfig(lgbm_max_depth=-1, n_jobs=-1).n_jobs == -1
    with pytest.raises(StackerError, match=r"stack: unknown key\(s\) \['nbootstrap'\]"):
        stack_config({"stack": {"nbootstrap": 100}})
    with pytest.raises(StackerError, match=r"stack: must be a mapping"):
        stack_config({"stack": ["mean"]})
