"""fit_stack and write_submission on real run directories: files, refusals, other tools' tables."""
import json
import subprocess
import sys
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from oof import PredictionTable, RunPaths, StackerError, read_table, validate_oof, write_table
from stack_fixtures import FAST, fast_config, make_run_folds, specialists, strong_weak_run, write_run
from stacker import fit_stack, write_submission
from stacker.inputs import meta_features

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path):
    root, folds, test_ids = strong_weak_run(tmp_path / "run")
    return root, folds, test_ids


def sample_csv(path: Path, ids, columns: dict) -> Path:
    pd.DataFrame({"image_id": list(ids), **columns}).to_csv(path, index=False)
    return path


def test_fit_stack_writes_the_stack_directory(run):
    root, folds, test_ids = run
    lines = []
    decision = fit_stack(root, fast_config(), log=lines.append)
    stack = RunPaths(root).stack
    assert sorted(p.name for p in stack.iterdir()) == [
        "combiner.json", "decision.json", "leaderboard.csv", "oof.parquet", "report.txt", "test.parquet"]
    chosen = validate_oof(read_table(stack / "oof.parquet", folds.classes, "oof"), folds)  # the report draws it
    score = decision["candidates"][decision["chosen"]]["score"]
    assert (chosen.proba.argmax(1) == folds.y).mean() == pytest.approx(score)
    saved = json.loads((stack / "decision.json").read_text())
    assert saved == json.loads(json.dumps(decision))
    assert saved["used"] == ["middle", "strong", "weak"] and saved["folds_sha256"] == folds.sha256
    assert set(saved["candidates"]) | set(saved["left_out"]) == set(fast_config().candidates)
    assert saved["nested"]["score"] > 0
    for scores in saved["candidates"].values():
        assert {"score", "log_loss", "interval", "gain", "win_probability", "admissible"} <= set(scores)
    assert json.loads((stack / "combiner.json").read_text())["candidate"] == decision["chosen"]
    test = read_table(stack / "test.parquet", folds.classes, "test")
    assert list(test.ids) == test_ids and test.meta["candidate"] == decision["chosen"]
    board = pd.read_csv(stack / "leaderboard.csv")
    assert list(board["kind"]).count("model") == 3 and board["chosen"].fillna(False).sum() == 1
    report = (stack / "report.txt").read_text()
    assert report in lines and f"chosen: {decision['chosen']}" in report and "nested estimate" in report


def test_a_chosen_booster_is_saved_as_text_and_reproduces_the_test_table(tmp_path):
    rng = np.random.default_rng(0)
    folds = make_run_folds(600, 4, seed=0)
    y_test = rng.integers(0, 4, 40)
    known = {"a": [0, 1], "b": [2, 3]}  # specialists: the mean fails, a booster does not
    oof = {m: specialists(folds.y, rng, k, n_classes=4) for m, k in known.items()}
    test = {m: specialists(y_test, rng, k, n_classes=4) for m, k in known.items()}
    root = write_run(tmp_path / "run", folds, oof, test, [f"t{i}" for i in range(40)])
    fit_stack(root, fast_config(candidates=["mean", "lgbm_wide"], lgbm_max_rounds=20, lgbm_learning_rate=0.3),
              log=None)
    stack = RunPaths(root).stack
    assert json.loads((stack / "decision.json").read_text())["chosen"] == "lgbm_wide"
    assert not list(stack.glob("*.pkl")) and not list(stack.glob("*.joblib"))
    booster = lgb.Booster(model_str=(stack / "combiner.lgbm.txt").read_text())
    assert booster.feature_name()[:2] == ["a_c0", "a_c1"]  # `<model>:<class>`, made LightGBM-safe
    tables = {m: read_table(RunPaths(root).test(m), folds.classes, "test") for m in ("a", "b")}
    X = meta_features(tables).reshape(40, -1)
    expected = read_table(stack / "test.parquet", folds.classes, "test").proba
    np.testing.assert_allclose(booster.predict(X), expected, rtol=1e-6)
    fit_stack(root, fast_config(candidates=["mean"]), force=True, log=None)
    assert not (stack / "combiner.lgbm.txt").exists()  # no stale booster beside a new decision


def test_tables_from_another_tool_fit_and_submit_without_torch(tmp_path):
    root, _, test_ids = strong_weak_run(tmp_path / "run", csv=True)
    assert (root / "folds.csv").is_file() and not (root / "folds.parquet").exists()
    sample = sample_csv(tmp_path / "sample_submission.csv", test_ids[::-1], {"label": ["c0"] * len(test_ids)})
    code = ("import sys\n"
            "from stacker import StackConfig, fit_stack, write_submission\n"
            f"decision = fit_stack(sys.argv[1], StackConfig(**{FAST!r}), log=None)\n"
            "write_submission(sys.argv[1], sys.argv[2], log=None)\n"
            "assert 'torch' not in sys.modules, 'fit-stack or submit imported torch'\n"
            "print(decision['chosen'])\n")
    out = subprocess.run([sys.executable, "-c", code, str(root), str(sample)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    submission = pd.read_csv(root / "submission.csv", dtype=str)
    assert list(submission["image_id"]) == test_ids[::-1]
    assert set(submission["label"]) <= {f"c{i}" for i in range(10)}


def test_another_fold_assignment_is_refused(run, tmp_path):
    root, folds, _ = run
    paths = RunPaths(root)
    table = read_table(paths.oof("weak"), folds.classes, "oof")
    write_table(paths.oof("weak"), PredictionTable(table.ids, table.proba, table.classes, table.fold,
                                                   {**table.meta, "folds_sha256": "f" * 64}))
    with pytest.raises(StackerError, match=r"weak/oof\.parquet: was made on another fold assignment"):
        fit_stack(root, fast_config(), log=None)
    moved = table.to_frame().assign(fold=(table.fold + 1) % folds.k)  # a CSV has no sha256 to compare
    paths.oof("weak").unlink()
    moved.to_csv(paths.preds_dir("weak") / "oof.csv", index=False)
    with pytest.raises(StackerError, match=r"weak/oof\.csv: fold differs from folds\.parquet .* first bad ids"):
        fit_stack(root, fast_config(), log=None)


def _break_test_ids(paths, folds):
    table = read_table(paths.test("weak"), folds.classes, "test")
    ids = table.ids.copy()
    ids[0] = "intruder"
    write_table(paths.test("weak"), PredictionTable(ids, table.proba, table.classes))


def _duplicate_oof_row(paths, folds):
    frame = read_table(paths.oof("weak"), folds.classes, "oof").to_frame()
    pd.concat([frame, frame.iloc[:1]]).to_csv(paths.preds_dir("weak") / "oof.csv", index=False)
    paths.oof("weak").unlink()


@pytest.mark.parametrize("breakage, kwargs, message", [
    (_break_test_ids, {}, r"weak/test\.parquet: 1 test id\(s\) missing, first 't000'"),
    (_duplicate_oof_row, {}, r"weak/oof\.csv: duplicate ids, first 'r"),
    (None, {"models": ["strong", "absent"]}, r"absent/oof\.parquet: prediction table not found"),
    (None, {"models": ["bad name!"]}, r"model name 'bad name!' is not allowed"),
    (None, {"config": fast_config(test_features="per_fold")},
     r"middle/test_fold0\.parquet: prediction table not found"),
])
def test_fit_stack_input_errors(run, breakage, kwargs, message):
    root, folds, _ = run
    if breakage:
        breakage(RunPaths(root), folds)
    kwargs = {"config": fast_config(), **kwargs}
    with pytest.raises(StackerError, match=message):
        fit_stack(root, log=None, **kwargs)


def test_models_subset_and_extra_target_tables_are_ignored(run):
    root, folds, _ = run
    paths = RunPaths(root)
    extra = read_table(paths.oof("weak"), folds.classes, "oof")
    write_table(paths.oof("weak", target="variety"), extra)  # oof.variety.parquet: another target
    decision = fit_stack(root, fast_config(candidates=["mean"]), models=["strong", "weak"], log=None)
    assert decision["used"] == ["strong", "weak"]


def test_per_fold_test_features_read_each_fold_models_table(run):
    root, folds, test_ids = run
    paths = RunPaths(root)
    rng = np.random.default_rng(5)
    for m in ("strong", "middle", "weak"):
        for k in range(folds.k):
            proba = rng.dirichlet(np.ones(10), size=len(test_ids))
            write_table(paths.test_fold(m, k), PredictionTable(np.array(test_ids, dtype=object), proba, folds.classes))
    decision = fit_stack(root, fast_config(candidates=["mean"], test_features="per_fold"), log=None)
    stack_test = read_table(paths.stack_test, folds.classes, "test")
    fold_tables = [[read_table(paths.test_fold(m, k), folds.classes, "test").proba
                    for m in ("middle", "strong", "weak")] for k in range(folds.k)]
    np.testing.assert_allclose(stack_test.proba, np.mean(fold_tables, axis=(0, 1)), atol=1e-12)
    assert decision["test_features"] == "per_fold"


# ---------------------------------------------------------------- submission


@pytest.fixture
def stacked(run):
    root, folds, test_ids = run
    fit_stack(root, fast_config(candidates=["mean", "logit_mean"]), log=None)
    return root, folds, test_ids


def test_submission_label_mode_follows_the_sample(stacked, tmp_path):
    root, folds, test_ids = stacked
    order = test_ids[::-1]
    sample = sample_csv(tmp_path / "sample_submission.csv", order, {"label": ["c3"] * len(order)})
    out = write_submission(root, sample, log=None)
    assert out == RunPaths(root).submission
    sub = pd.read_csv(out, dtype=str)
    assert list(sub.columns) == ["image_id", "label"] and list(sub["image_id"]) == order
    proba = read_table(RunPaths(root).stack_test, folds.classes, "test")
    expected = dict(zip(proba.ids, np.asarray(folds.classes)[proba.proba.argmax(axis=1)]))
    assert list(sub["label"]) == [expected[i] for i in order]


def test_submission_probability_mode_and_a_single_model_source(stacked, tmp_path):
    root, folds, test_ids = stacked
    columns = {c: [0.1] * len(test_ids) for c in reversed(folds.classes)}
    sample = sample_csv(tmp_path / "sample_submission.csv", test_ids, columns)
    out = write_submission(root, sample, out_path=tmp_path / "strong.csv", source="strong", log=None)
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["image_id", *reversed(folds.classes)]
    strong = read_table(RunPaths(root).test("strong"), folds.classes, "test")
    np.testing.assert_allclose(sub[list(folds.classes)].to_numpy(), strong.proba)


def test_numeric_class_names_are_written_as_the_folder_names(tmp_path):
    rng = np.random.default_rng(3)
    folds = make_run_folds(200, 3, seed=3)
    names = {"c0": "07", "c1": "08", "c2": "10"}
    folds.table["label"] = folds.table["label"].map(names)
    folds.table.to_csv(tmp_path / "folds.csv", index=False)
    table = pd.DataFrame({"id": [f"t{i}" for i in range(12)]})
    table[["07", "08", "10"]] = rng.dirichlet(np.ones(3), size=12)
    preds = RunPaths(tmp_path).preds_dir("m")
    preds.mkdir(parents=True)
    table.to_csv(preds / "test.csv", index=False)
    sample = sample_csv(tmp_path / "sample.csv", table["id"], {"label": ["0"] * 12})
    write_submission(tmp_path, sample, source="m", log=None)
    labels = pd.read_csv(tmp_path / "submission.csv", dtype=str)["label"]
    expected = np.array(["07", "08", "10"])[table[["07", "08", "10"]].to_numpy().argmax(axis=1)]
    assert list(labels) == list(expected)  # "07" stays "07", never 7 or 7.0


@pytest.mark.parametrize("ids, columns, message", [
    (lambda ids: ids[:-1], None, r"test\.parquet: 1 id\(s\) that are not sample_submission\.csv ids, first 't059'"),
    (lambda ids: ids + ["t999"], None, r"test\.parquet: 1 sample_submission\.csv id\(s\) missing, first 't999'"),
    (lambda ids: ids + ids[:1], None, r"sample_submission\.csv: duplicate ids, first 't000'"),
    (lambda ids: ids, {"label": "dog"}, r"sample_submission\.csv: label 'dog' is not a class \(first ids 't000'"),
    (lambda ids: ids, {"c0": 0.1, "c1": 0.9}, r"sample_submission\.csv: columns \['c0', 'c1'\] are neither"),
])
def test_submission_errors_name_the_file_and_ids(stacked, tmp_path, ids, columns, message):
    root, _, test_ids = stacked
    sample_ids = ids(list(test_ids))
    columns = columns or {"label": "c0"}
    sample = sample_csv(tmp_path / "sample_submission.csv", sample_ids,
                        {k: [v] * len(sample_ids) for k, v in columns.items()})
    with pytest.raises(StackerError, match=message):
        write_submission(root, sample, log=None)
    assert not RunPaths(root).submission.exists()


@pytest.mark.parametrize("candidate, data", [
    ("best_single", "strong_and_noise"), ("ensemble_selection", "strong_and_noise"),
    ("logreg", "specialists"), ("lgbm_wide", "specialists"), ("lgbm_class_shared", "specialists")])
def test_load_stack_rebuilds_the_chosen_candidate_from_its_files(tmp_path, candidate, data):
    from stack_fixtures import noisy_copy, pure_noise
    from stacker import load_stack

    rng = np.random.default_rng(1)
    folds = make_run_folds(600, 4, seed=0)
    y_test = rng.integers(0, 4, 40)
    if data == "specialists":  # the mean fails where a learned candidate does not
        oof = {m: specialists(folds.y, rng, k, n_classes=4) for m, k in (("a", [0, 1]), ("b", [2, 3]))}
        test = {m: specialists(y_test, rng, k, n_classes=4) for m, k in (("a", [0, 1]), ("b", [2, 3]))}
    else:  # one strong model and two noise models: the mean is diluted, a pick is not
        oof = {"a": noisy_copy(folds.y, 4, 0.95, rng), "b": pure_noise(600, 4, rng), "c": pure_noise(600, 4, rng)}
        test = {"a": noisy_copy(y_test, 4, 0.95, rng), "b": pure_noise(40, 4, rng), "c": pure_noise(40, 4, rng)}
    root = write_run(tmp_path / "run", folds, oof, test, [f"t{i}" for i in range(40)])
    fit_stack(root, fast_config(candidates=["mean", candidate], lgbm_max_rounds=10), log=None)
    guard = load_stack(root)
    assert guard.decision_["chosen"] == candidate
    tables = {m: read_table(RunPaths(root).test(m), folds.classes, "test") for m in oof}
    expected = read_table(RunPaths(root).stack_test, folds.classes, "test").proba
    np.testing.assert_allclose(guard.predict_table(tables).proba, expected, rtol=1e-6, atol=1e-9)


def test_load_stack_needs_a_fitted_stack(tmp_path):
    from stacker import load_stack

    with pytest.raises(StackerError, match=r"decision.json: no fitted stack; run fit-stack first"):
        load_stack(tmp_path)


def test_load_stack_names_damaged_files(stacked):
    from stacker import load_stack

    root = stacked[0]
    RunPaths(root).stack_state.write_text("{ truncated")
    with pytest.raises(StackerError, match=r"combiner\.json: damaged JSON \(JSONDecodeError"):
        load_stack(root)


def test_a_fractional_placeholder_asks_for_the_positive_class_probability(tmp_path):
    rng = np.random.default_rng(0)
    folds = make_run_folds(200, 2, seed=0)
    oof = {"a": specialists(folds.y, rng, [0, 1], n_classes=2)}
    test = {"a": specialists(np.array([0, 1, 1]), rng, [0, 1], n_classes=2)}
    root = write_run(tmp_path / "run", folds, oof, test, ["t0", "t1", "t2"])
    fit_stack(root, fast_config(candidates=["mean"]), log=None)
    sample = tmp_path / "sample.csv"
    sample.write_text("id,target\nt0,0.5\nt1,0.5\nt2,0.5\n")
    out = write_submission(root, sample, tmp_path / "sub.csv", log=None)
    sub = pd.read_csv(out)
    expected = read_table(RunPaths(root).stack_test, folds.classes, "test").proba[:, 1]
    np.testing.assert_allclose(sub["target"].to_numpy(), expected)
