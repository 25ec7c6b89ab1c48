"""Run integrity of fit-stack and submit: provenance, skipping what is current, redoing or refusing what is stale."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oof import (PredictionTable, RunPaths, StackerError, file_digest, make_folds, read_json, read_table, record_of,
                 write_folds, write_table)
from stack_fixtures import (fast_config, make_run_folds, make_test_tables, noisy_copy, oof_tables, smoothed_copy,
                            strong_weak_run, write_run)
from stacker import StackGuard, fit_stack, write_submission
from stacker.provenance import decision_digest

REPO = Path(__file__).resolve().parents[1]
MEAN = {"candidates": ["mean"]}  # the one-candidate guard: these tests are about files, not choices


@pytest.fixture
def run(tmp_path):
    root, folds, test_ids = strong_weak_run(tmp_path / "run")
    return root, folds, test_ids


@pytest.fixture
def sample(run, tmp_path):
    test_ids = run[2]
    path = tmp_path / "sample_submission.csv"
    pd.DataFrame({"image_id": test_ids, "label": ["c0"] * len(test_ids)}).to_csv(path, index=False)
    return path


def stack_files(root) -> dict[str, tuple[bytes, int]]:
    """{name: (bytes, mtime_ns)} of stack/'s files."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(RunPaths(root).stack.iterdir())}


def rewrite_table(path: Path, classes, kind: str, change) -> None:
    """Rewrite a prediction table with `change` applied to its (N, C) probabilities."""
    table = read_table(path, classes, kind)
    proba = change(table.proba.copy())
    write_table(path, PredictionTable(table.ids, proba / proba.sum(axis=1, keepdims=True), table.classes,
                                      table.fold, table.meta))


def swap_two_classes(proba):
    return proba[:, [1, 0, *range(2, proba.shape[1])]]


# ---------------------------------------------------------------- provenance


def test_decision_records_its_inputs_and_the_stack_test_its_decision(run):
    root, folds, _ = run
    paths = RunPaths(root)
    decision = fit_stack(root, fast_config(**MEAN), log=None)
    saved = read_json(paths.decision)
    assert saved == json.loads(json.dumps(decision)) and saved["folds_sha256"] == folds.sha256
    assert saved["inputs"]["selection"] == "all" and list(saved["inputs"]["tables"]) == ["middle", "strong", "weak"]
    weak = saved["inputs"]["tables"]["weak"]
    assert weak == {"oof": {"path": "preds/weak/oof.parquet", "sha256": file_digest(paths.oof("weak"))},
                    "test": {"path": "preds/weak/test.parquet", "sha256": file_digest(paths.test("weak"))}}
    stack_test = read_table(paths.stack_test, folds.classes, "test")
    assert stack_test.meta["decision_sha256"] == decision_digest(saved) == decision_digest(decision)


def test_per_fold_tables_are_recorded_and_a_changed_one_refits(run):
    root, folds, test_ids = run
    paths = RunPaths(root)
    rng = np.random.default_rng(5)
    for m in ("strong", "middle", "weak"):
        for k in range(folds.k):
            write_table(paths.test_fold(m, k), PredictionTable(np.array(test_ids, dtype=object),
                                                               rng.dirichlet(np.ones(10), size=len(test_ids)),
                                                               folds.classes))
    config = fast_config(test_features="per_fold", **MEAN)
    decision = fit_stack(root, config, log=None)
    assert set(decision["inputs"]["tables"]["weak"]) == {"oof", "test", *(f"test_fold{k}" for k in range(5))}
    rewrite_table(paths.test_fold("weak", 3), folds.classes, "test", swap_two_classes)
    lines = []
    fit_stack(root, config, log=lines.append)
    assert "model 'weak': preds/weak/test_fold3.parquet changed" in lines[0]


# ---------------------------------------------------------------- fit-stack: skip, redo, force


def test_fit_stack_twice_skips_the_second_time_and_changes_nothing(run):
    root, _, _ = run
    first = fit_stack(root, fast_config(), log=None)
    before = stack_files(root)
    lines = []
    again = fit_stack(root, fast_config(), log=lines.append)
    assert again == json.loads(json.dumps(first))
    assert stack_files(root) == before  # same bytes, not even rewritten
    assert lines == [f"fit-stack: {RunPaths(root).decision} is current (same folds, models, tables and config; "
                     f"chosen {first['chosen']}); nothing to do, --force fits it again"]


@pytest.mark.parametrize("change, config, models, message", [
    ("oof", {}, None, "model 'weak': preds/weak/oof.parquet changed"),
    ("test", {}, None, "model 'weak': preds/weak/test.parquet changed"),
    (None, {"min_gain": 0.01}, None, r"stack config changed (min_gain)"),
    (None, {}, ["strong", "weak"], "model(s) ['middle'] removed"),
    (None, {}, ["weak", "strong", "middle"], "the models' order changed"),
])
def test_a_changed_input_refits_and_names_the_change(run, change, config, models, message):
    root, folds, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(**MEAN), log=None)
    if change:
        path = paths.oof("weak") if change == "oof" else paths.test("weak")
        rewrite_table(path, folds.classes, change, swap_two_classes)
    lines = []
    decision = fit_stack(root, fast_config(**MEAN, **config), models=models, log=lines.append)
    assert lines[0].startswith(f"fit-stack: {paths.decision} is stale (") and message in lines[0]
    assert lines[0].endswith("; fitting the stack again")
    assert read_json(paths.decision) == json.loads(json.dumps(decision))
    assert decision["inputs"]["tables"]["weak"]["oof"]["sha256"] == file_digest(paths.oof("weak"))
    assert decision["inputs"]["selection"] == ("all" if models is None else "given")


def test_a_stack_test_of_another_decision_or_a_missing_file_refits(run):
    root, folds, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(**MEAN), log=None)
    old_test = paths.stack_test.read_bytes()
    fit_stack(root, fast_config(**MEAN, min_gain=0.01), log=None)
    paths.stack_test.write_bytes(old_test)  # a hand copy, or a crash between two fits' writes
    lines = []
    fit_stack(root, fast_config(**MEAN, min_gain=0.01), log=lines.append)
    assert "test.parquet was not predicted for this decision" in lines[0]
    paths.leaderboard.unlink()
    lines = []
    fit_stack(root, fast_config(**MEAN, min_gain=0.01), log=lines.append)
    assert "stack file(s) ['leaderboard.csv'] missing" in lines[0] and paths.leaderboard.is_file()


def test_force_removes_the_old_stack_first(run, monkeypatch):
    root, _, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(candidates=["mean", "lgbm_wide"], lgbm_max_rounds=20), log=None)
    seen = []

    def fit_and_look(self, *args):  # what stack/ holds while the forced fit runs
        seen.append(sorted(p.name for p in paths.stack.iterdir()))
        return fit(self, *args)

    fit = StackGuard.fit
    monkeypatch.setattr(StackGuard, "fit", fit_and_look)
    fit_stack(root, fast_config(**MEAN), force=True, log=None)
    assert seen == [[]] and not paths.stack_booster.exists()


KILLED_FIT = """
import sys, time
import stacker.fit
from stack_fixtures import fast_config

def hang(*args, **kwargs):  # a long fit: the parent kills the process here
    time.sleep(60)

stacker.fit.read_run_tables = hang
stacker.fit.fit_stack(sys.argv[1], fast_config(candidates=["mean"]), force=True, log=None)
"""


def test_an_interrupted_force_leaves_no_stack_that_submit_would_trust(run, sample):
    root, _, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(**MEAN), log=None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_FIT, str(root)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while paths.decision.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        output = child.communicate()[0]
    assert child.returncode == -signal.SIGKILL, output  # killed inside the fit, not finished or failed
    assert not paths.decision.exists()  # the rest may be half removed: the kill can fall inside clear_stack
    with pytest.raises(StackerError, match=r"stack/decision\.json: not found; run fit-stack$"):
        write_submission(root, sample, log=None)
    fit_stack(root, fast_config(**MEAN), log=None)  # the rerun fits: nothing looks finished
    assert write_submission(root, sample, log=None).is_file()


def test_a_crash_between_the_stack_files_leaves_no_decision(run, sample, monkeypatch):
    import stacker.fit

    root, _, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(**MEAN), log=None)
    write_json = stacker.fit.write_json

    def crash_at_the_decision(path, obj):
        if Path(path) == paths.decision:
            raise KeyboardInterrupt  # killed after test.parquet, before decision.json
        write_json(path, obj)

    monkeypatch.setattr(stacker.fit, "write_json", crash_at_the_decision)
    with pytest.raises(KeyboardInterrupt):
        fit_stack(root, fast_config(**MEAN, min_gain=0.01), log=None)
    assert paths.stack_test.is_file() and not paths.decision.exists()
    with pytest.raises(StackerError, match=r"decision\.json: not found; run fit-stack"):
        write_submission(root, sample, log=None)


# ---------------------------------------------------------------- submit


def test_submit_records_its_source_and_skips_when_current(run, sample):
    root, folds, _ = run
    paths = RunPaths(root)
    decision = fit_stack(root, fast_config(**MEAN), log=None)
    out = write_submission(root, sample, log=None)
    record = read_json(paths.submission_record)
    assert record == {
        "run": ".", "source": "stack", "table": "stack/test.parquet",
        "table_sha256": file_digest(paths.stack_test), "decision_sha256": decision_digest(decision),
        "folds_sha256": folds.sha256, "sample": "../sample_submission.csv", "sample_sha256": file_digest(sample),
        "format": "labels", "rows": 60, "submission_sha256": file_digest(out)}
    before = (out.read_bytes(), out.stat().st_mtime_ns, paths.submission_record.stat().st_mtime_ns)
    lines = []
    assert write_submission(root, sample, log=lines.append) == out
    assert lines == [f"submission: {out} is current (from stack/test.parquet); nothing to do"]
    assert (out.read_bytes(), out.stat().st_mtime_ns, paths.submission_record.stat().st_mtime_ns) == before


@pytest.mark.parametrize("change, message", [
    ("refit", "the stack was fitted again"),
    ("edit", "submission.csv is not the file recorded"),
    ("sample", "the sample submission changed"),
])
def test_a_stale_submission_of_ours_is_rewritten(run, sample, change, message):
    root, _, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(**MEAN), log=None)
    out = write_submission(root, sample, log=None)
    if change == "refit":
        fit_stack(root, fast_config(**MEAN, min_gain=0.01), log=None)
    elif change == "edit":
        out.write_text(out.read_text().replace("c", "d"))
    else:
        sample.write_text(sample.read_text().replace("c0", "c1"))
    lines = []
    write_submission(root, sample, log=lines.append)
    assert lines[0].startswith(f"submission: {out} is stale (") and lines[0].endswith("); writing it again")
    assert message in lines[0]
    record = read_json(paths.submission_record)
    assert record["submission_sha256"] == file_digest(out)
    assert record["decision_sha256"] == decision_digest(read_json(paths.decision))
    assert record["sample_sha256"] == file_digest(sample)


def test_a_file_stacker_did_not_write_needs_force(run, sample):
    root, _, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(**MEAN), log=None)
    paths.submission.write_text("my own file\n")
    with pytest.raises(StackerError, match=r"submission\.csv: already exists and has no "
                                           r"submission\.csv\.provenance\.json \(stacker did not write it\); "
                                           "pass --force to replace it"):
        write_submission(root, sample, log=None)
    assert paths.submission.read_text() == "my own file\n"
    write_submission(root, sample, force=True, log=None)
    assert read_json(paths.submission_record)["submission_sha256"] == file_digest(paths.submission)


def test_a_crash_between_the_csv_and_its_record_is_rewritten_not_refused(run, sample):
    root, _, _ = run
    paths = RunPaths(root)
    fit_stack(root, fast_config(**MEAN), log=None)
    write_submission(root, sample, log=None)
    fit_stack(root, fast_config(**MEAN, min_gain=0.01), log=None)
    record = read_json(paths.submission_record)
    write_submission(root, sample, log=None)
    record_of(paths.submission).write_text(json.dumps(record))  # the new CSV, the old record
    lines = []
    write_submission(root, sample, log=lines.append)
    assert "is stale" in lines[0]


def refit_on_other_folds(root, folds):
    write_folds(RunPaths(root).folds, make_folds(folds.ids, folds.table["label"], k=5, seed=99,
                                                  classes=folds.classes))


def change_an_oof_table(root, folds):
    rewrite_table(RunPaths(root).oof("weak"), folds.classes, "oof", swap_two_classes)


def predict_a_new_model(root, folds):
    rng = np.random.default_rng(9)
    test_ids = read_table(RunPaths(root).test("weak"), folds.classes, "test").ids
    write_run(Path(root), folds, {"new": noisy_copy(folds.y, 10, 0.8, rng)},
              {"new": noisy_copy(np.zeros(len(test_ids), dtype=int), 10, 0.8, rng)}, test_ids)


def delete_a_test_table(root, folds):
    RunPaths(root).test("middle").unlink()


def replace_the_stack_test(root, folds):
    paths = RunPaths(root)
    table = read_table(paths.stack_test, folds.classes, "test")
    write_table(paths.stack_test, PredictionTable(table.ids, table.proba, table.classes, None,
                                                  {**table.meta, "decision_sha256": "0" * 64}))


@pytest.mark.parametrize("breakage, message", [
    (refit_on_other_folds, r"stack/decision\.json: the stack is stale \(the folds changed \(sha256 \w{12} -> "
                           r"\w{12}\)\); run fit-stack$"),
    (change_an_oof_table, r"stack/decision\.json: the stack is stale \(model 'weak': preds/weak/oof\.parquet "
                          r"changed\); run fit-stack$"),
    (predict_a_new_model, r"the stack is stale \(model\(s\) \['new'\] added\); run fit-stack$"),
    (delete_a_test_table, r"the stack is stale \(model 'middle': preds/middle/test\.parquet is missing\)"),
    (replace_the_stack_test, r"stack/test\.parquet: was not predicted for .*decision\.json \(an interrupted "
                             r"fit-stack\?\); run fit-stack$"),
])
def test_submit_refuses_a_stale_stack(run, sample, breakage, message):
    root, folds, _ = run
    fit_stack(root, fast_config(**MEAN), log=None)
    out = write_submission(root, sample, log=None)
    before = out.read_bytes()
    breakage(root, folds)
    with pytest.raises(StackerError, match=message):
        write_submission(root, sample, log=None)
    with pytest.raises(StackerError, match=message):  # --force replaces a submission, never trusts a stack
        write_submission(root, sample, force=True, log=None)
    assert out.read_bytes() == before


def test_a_subset_stack_ignores_models_it_was_not_asked_for(run, sample):
    root, folds, _ = run
    fit_stack(root, fast_config(**MEAN), models=["strong", "weak"], log=None)
    predict_a_new_model(root, folds)
    assert write_submission(root, sample, log=None).is_file()


def test_a_model_source_is_checked_against_the_folds_and_recorded(run, sample, tmp_path):
    root, folds, _ = run
    paths = RunPaths(root)
    out = write_submission(root, sample, tmp_path / "strong.csv", source="strong", log=None)
    record = read_json(record_of(out))
    assert record["source"] == "strong" and record["table"] == "preds/strong/test.parquet" and record["run"] == "run"
    assert record["decision_sha256"] is None and record["table_sha256"] == file_digest(paths.test("strong"))
    table = read_table(paths.test("strong"), folds.classes, "test")
    write_table(paths.test("strong"), PredictionTable(table.ids, table.proba, table.classes, None,
                                                      {"model": "strong", "folds_sha256": "f" * 64}))
    with pytest.raises(StackerError, match=r"strong/test\.parquet: was made on another fold assignment "
                                           r"\(folds sha256 ffffffffffff != \w{12}\); run predict-oof again"):
        write_submission(root, sample, tmp_path / "strong.csv", source="strong", log=None)
    write_table(paths.test("strong"), PredictionTable(table.ids, table.proba, table.classes, None, {"model": "weak"}))
    with pytest.raises(StackerError, match=r"strong/test\.parquet: records model 'weak', not 'strong'"):
        write_submission(root, sample, tmp_path / "strong.csv", source="strong", log=None)


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("kind", ["oof", "test"])
def test_a_header_only_table_is_named(tmp_path, kind):
    root, _, _ = strong_weak_run(tmp_path / "run", csv=True)
    table = RunPaths(root).preds_dir("middle") / f"{kind}.csv"  # middle: the first model, the test ids' reference
    table.write_text(table.read_text().splitlines()[0] + "\n")
    with pytest.raises(StackerError, match=rf"preds/middle/{kind}\.csv: no rows \(a header only\)$"):
        fit_stack(root, fast_config(**MEAN), log=None)


def test_a_test_table_of_other_folds_is_refused(run):
    root, folds, _ = run
    paths = RunPaths(root)
    table = read_table(paths.test("weak"), folds.classes, "test")
    write_table(paths.test("weak"), PredictionTable(table.ids, table.proba, table.classes, None,
                                                    {"folds_sha256": "f" * 64}))
    with pytest.raises(StackerError, match=r"weak/test\.parquet: was made on another fold assignment"):
        fit_stack(root, fast_config(**MEAN), log=None)


def test_a_class_named_fold_is_refused_in_one_line(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    pd.DataFrame({"id": [f"r{i}" for i in range(20)], "label": ["fold", "cat"] * 10,
                  "fold": [0, 0, 1, 1] * 5}).to_csv(root / "folds.csv", index=False)
    with pytest.raises(StackerError, match=r"folds\.csv: class 'fold' is also a column name of the prediction "
                                           r"tables .*; rename the class"):
        fit_stack(root, fast_config(**MEAN), log=None)


def test_a_notebook_checkpoints_folder_under_preds_is_ignored(run):
    root, folds, _ = run
    checkpoints = RunPaths(root).preds / ".ipynb_checkpoints"
    checkpoints.mkdir()
    read_table(RunPaths(root).oof("weak"), folds.classes, "oof").to_frame().to_csv(checkpoints / "oof.csv",
                                                                                  index=False)
    (checkpoints / "oof-checkpoint.csv").write_text("id,fold\n")
    decision = fit_stack(root, fast_config(**MEAN), log=None)
    assert list(decision["inputs"]["tables"]) == ["middle", "strong", "weak"]


# ---------------------------------------------------------------- the leak check

C = 10


def leak_folds(seed=3):
    return make_run_folds(400, C, seed=seed)


def test_a_memoriser_trained_with_label_smoothing_is_flagged():
    rng = np.random.default_rng(3)
    folds = leak_folds()
    probas = {m: smoothed_copy(folds.y, C, 0.85, rng) for m in ("a", "b")}
    probas["leaky"] = smoothed_copy(folds.y, C, 1.0, rng, low=0.88)  # never above 0.91: the old 0.99 rule missed it
    lines = []
    guard = StackGuard(fast_config(**MEAN), log=lines.append).fit(oof_tables(folds, probas), folds)
    assert guard.models_ == ["a", "b"] and list(guard.decision_["excluded"]) == ["leaky"]
    assert guard.decision_["models"]["leaky"]["sure_share"] == 1.0
    assert any("warning: model 'leaky' looks leaked: 100.0% of OOF rows are sure" in line for line in lines)


def lone_run(root: Path, oof, test) -> Path:
    folds = leak_folds()
    test_ids = [f"t{i}" for i in range(len(test))]
    return write_run(root, folds, {"only": oof(folds.y)}, {"only": test}, test_ids)


def test_a_lone_leaked_model_is_flagged_against_its_own_test_rows(tmp_path):
    rng = np.random.default_rng(4)
    honest_test = smoothed_copy(rng.integers(0, C, 100), C, 0.7, rng)
    root = lone_run(tmp_path / "run", lambda y: smoothed_copy(y, C, 1.0, rng, low=0.88), honest_test)
    with pytest.raises(StackerError, match=r"every model looks leaked \(only\); nothing is left to stack\. "
                                           r"Pass --allow-suspicious"):
        fit_stack(root, fast_config(**MEAN), log=None)
    decision = fit_stack(root, fast_config(**MEAN, allow_suspicious=True), log=None)
    assert decision["models"]["only"]["status"] == "suspicious, kept" and decision["used"] == ["only"]
    folds = leak_folds()
    oof = {"only": read_table(RunPaths(root).oof("only"), folds.classes, "oof")}
    guard = StackGuard(fast_config(**MEAN), log=None).fit(oof, folds)  # no test rows: nothing to compare with
    assert guard.models_ == ["only"]


@pytest.mark.parametrize("model", [
    lambda y, rng: noisy_copy(y, C, 0.85, rng),
    lambda y, rng: smoothed_copy(y, C, 0.9, rng),
    lambda y, rng: noisy_copy(y, C, 0.99, rng, confidence=0.995),  # honest and near-perfect: as sure on test
    lambda y, rng: smoothed_copy(y, C, 0.99, rng, low=0.85),
], ids=["noisy", "smoothed", "near_perfect", "near_perfect_smoothed"])
def test_honest_lone_models_are_not_flagged(tmp_path, model):
    rng = np.random.default_rng(5)
    root = lone_run(tmp_path / "run", lambda y: model(y, rng), model(rng.integers(0, C, 100), rng))
    decision = fit_stack(root, fast_config(**MEAN), log=None)
    assert decision["excluded"] == {} and decision["models"]["only"]["status"] == "used"


@pytest.mark.parametrize("accuracies, kind", [
    ((0.85, 0.75, 0.6), "noisy"), ((0.99, 0.99, 0.99), "near_perfect"), ((0.9, 0.8, 0.7), "smoothed"),
    ((0.99, 0.98, 0.97), "smoothed_strong"),
])
def test_honest_groups_are_not_flagged(accuracies, kind):
    rng = np.random.default_rng(6)
    folds = leak_folds(6)
    y_test = rng.integers(0, C, 50)

    def model(y, a):
        if kind.startswith("smoothed"):
            return smoothed_copy(y, C, a, rng, low=0.85 if kind == "smoothed_strong" else 0.4)
        return noisy_copy(y, C, a, rng, confidence=0.995 if kind == "near_perfect" else 0.7)

    probas = {f"m{i}": model(folds.y, a) for i, a in enumerate(accuracies)}
    test = make_test_tables([f"t{i}" for i in range(50)], folds.classes,
                            {m: model(y_test, a) for m, a in zip(probas, accuracies)})
    guard = StackGuard(fast_config(**MEAN), log=None).fit(oof_tables(folds, probas), folds, test)
    assert guard.decision_["excluded"] == {} and guard.models_ == list(probas)
