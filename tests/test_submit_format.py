"""submit's formats on each Kaggle layout: labels, per-class probabilities, P(positive class), and `submit.format`."""
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oof import RunPaths, StackerError, make_folds, read_json, read_table, record_of
from stack_fixtures import fast_config, noisy_copy, strong_weak_run, write_run
from stacker import SubmitConfig, fit_stack, submit_config, write_submission
from tiny import run_cli as stacker

REPO = Path(__file__).resolve().parents[1]
# Histopathologic Cancer Detection's layout: ids as text, classes "0" and "1", scored by AUC.
TEST_IDS = ["007", "010", "0a1", "123", "999", "042"]


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """A stacked run of two classes "0"/"1" whose test ids keep leading zeros; returns (root, stack test table)."""
    root = binary_run(tmp_path_factory.mktemp("binary") / "run", seed=0)
    return root, read_table(RunPaths(root).stack_test, ("0", "1"), "test")


def binary_run(root: Path, seed: int, **stack) -> Path:
    """Two models of a two-class run ("0"/"1"), stacked with the mean under `stack`'s settings."""
    rng = np.random.default_rng(seed)
    labels = [str(c) for c in rng.integers(0, 2, 200)]
    folds = make_folds([f"r{i:03d}" for i in range(200)], labels, k=5, seed=0)
    y_test = rng.integers(0, 2, len(TEST_IDS))
    oof = {m: noisy_copy(folds.y, 2, a, rng) for m, a in (("a", 0.8), ("b", 0.7))}
    test = {m: noisy_copy(y_test, 2, a, rng) for m, a in (("a", 0.8), ("b", 0.7))}
    write_run(root, folds, oof, test, TEST_IDS)
    fit_stack(root, fast_config(candidates=["mean"], **stack), log=None)
    return root


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory):
    """A stacked run of ten classes c0..c9; returns (root, stack test table)."""
    root, folds, _ = strong_weak_run(tmp_path_factory.mktemp("multi") / "run")
    fit_stack(root, fast_config(candidates=["mean"]), log=None)
    return root, read_table(RunPaths(root).stack_test, folds.classes, "test")


def sample_csv(path: Path, ids, columns: dict) -> Path:
    """A sample submission with placeholders written as given (text: "0" stays "0", "0.5" stays "0.5")."""
    pd.DataFrame({"id": list(ids), **{c: [v] * len(ids) for c, v in columns.items()}}).to_csv(path, index=False)
    return path


def submit(root, sample, out, **options):
    """(submission read as text, its record, the log lines) of one write_submission call."""
    lines = []
    write_submission(root, sample, out, log=lines.append, **options)
    return pd.read_csv(out, dtype=str, keep_default_na=False), read_json(record_of(out)), lines


def by_id(table, ids) -> np.ndarray:
    """(N, C) the table's probabilities in the order of `ids`."""
    return table.proba[[list(table.ids).index(i) for i in ids]]


def test_a_multiclass_label_column_gets_class_names_whatever_the_metric(multiclass, tmp_path):
    root, table = multiclass
    ids = list(table.ids)[::-1]
    sample = sample_csv(tmp_path / "sample.csv", ids, {"label": "c3"})
    sub, record, lines = submit(root, sample, tmp_path / "sub.csv", metric="neg_log_loss")
    expected = np.asarray(table.classes)[by_id(table, ids).argmax(axis=1)]
    assert list(sub["id"]) == ids and list(sub["label"]) == list(expected)
    assert record["format"] == "labels" and not any("may hold" in line for line in lines)


@pytest.mark.parametrize("fmt", ["auto", "proba"])
def test_per_class_columns_get_a_probability_per_class(multiclass, tmp_path, fmt):
    root, table = multiclass
    columns = list(table.classes)[::-1]  # the sample's column order, not the run's
    sample = sample_csv(tmp_path / "sample.csv", table.ids, {c: "0.1" for c in columns})
    sub, record, _ = submit(root, sample, tmp_path / "sub.csv", fmt=fmt, metric="accuracy")
    assert list(sub.columns) == ["id", *columns] and record["format"] == "probabilities"
    np.testing.assert_allclose(sub[list(table.classes)].astype(float).to_numpy(), table.proba, rtol=1e-12)


def test_fractional_placeholders_ask_for_the_positive_class_probability(binary, tmp_path):
    root, table = binary
    sample = sample_csv(tmp_path / "sample.csv", TEST_IDS, {"label": "0.5"})
    sub, record, lines = submit(root, sample, tmp_path / "sub.csv", metric="accuracy")
    np.testing.assert_allclose(sub["label"].astype(float), by_id(table, TEST_IDS)[:, 1], rtol=1e-12)
    assert record["format"] == "positive-class probability"
    assert "submission: sample.csv asks for a probability: writing P('1') in 'label'" in lines


FOR_LABELS = "(submit.format=labels writes labels)"
FOR_PROBA = "(submit.format=proba writes the probability, for AUC or log-loss)"


@pytest.mark.parametrize("fmt, metric, written, why", [
    ("auto", "accuracy", "labels", f"stack.metric 'accuracy' scores labels {FOR_PROBA}"),
    ("auto", None, "labels", f"no metric was given {FOR_PROBA}"),
    ("auto", "roc_auc", "P('1')", f"stack.metric 'roc_auc' scores probabilities {FOR_LABELS}"),
    ("auto", "roc_auc_ovr", "P('1')", f"stack.metric 'roc_auc_ovr' scores probabilities {FOR_LABELS}"),
    ("auto", "average_precision", "P('1')", f"stack.metric 'average_precision' scores probabilities {FOR_LABELS}"),
    ("auto", "neg_log_loss", "P('1')", f"stack.metric 'neg_log_loss' scores probabilities {FOR_LABELS}"),
    ("proba", "accuracy", "P('1')", "submit.format=proba"),
    ("labels", "roc_auc", "labels", "submit.format=labels"),
])
def test_zero_placeholders_of_two_classes_follow_the_format_then_the_metric(binary, tmp_path, fmt, metric,
                                                                            written, why):
    """Histopathologic Cancer Detection's `id,label` of 0s: labels or P(positive class); the log says which and why."""
    root, table = binary
    sample = sample_csv(tmp_path / "sample.csv", TEST_IDS, {"label": "0"})
    sub, record, lines = submit(root, sample, tmp_path / "sub.csv", fmt=fmt, metric=metric)
    assert [line for line in lines if "may hold" in line] == [
        f"submission: sample.csv: column 'label' (placeholders '0') may hold labels or P('1'); "
        f"writing {written}, as {why}"]
    proba = by_id(table, TEST_IDS)
    if written == "labels":
        assert record["format"] == "labels" and list(sub["label"]) == list(np.array(["0", "1"])[proba.argmax(1)])
    else:
        assert record["format"] == "positive-class probability"
        np.testing.assert_allclose(sub["label"].astype(float), proba[:, 1], rtol=1e-12)


@pytest.mark.parametrize("fmt", ["labels", "proba"])
def test_string_ids_keep_their_leading_zeros(binary, tmp_path, fmt):
    root, _ = binary
    sample = sample_csv(tmp_path / "sample.csv", TEST_IDS, {"label": "0"})
    write_submission(root, sample, tmp_path / "sub.csv", log=None, fmt=fmt)
    rows = (tmp_path / "sub.csv").read_text().splitlines()
    assert rows[0] == "id,label" and [r.split(",")[0] for r in rows[1:]] == TEST_IDS  # "007", never 7
    if fmt == "labels":
        assert {r.split(",")[1] for r in rows[1:]} <= {"0", "1"}  # the class names, never 0.0


def test_class_name_placeholders_ask_for_labels_even_under_a_probability_metric(tmp_path):
    rng = np.random.default_rng(1)
    folds = make_folds([f"r{i:03d}" for i in range(100)], [f"c{c}" for c in rng.integers(0, 2, 100)], k=5, seed=1)
    root = write_run(tmp_path / "run", folds, {"a": noisy_copy(folds.y, 2, 0.8, rng)},
                     {"a": noisy_copy(rng.integers(0, 2, 6), 2, 0.8, rng)}, TEST_IDS)
    sample = sample_csv(tmp_path / "sample.csv", TEST_IDS, {"label": "c1"})
    sub, record, lines = submit(root, sample, tmp_path / "a.csv", source="a", metric="roc_auc")
    assert record["format"] == "labels" and set(sub["label"]) <= {"c0", "c1"}
    assert not any("may hold" in line for line in lines)  # the sample said labels: nothing to explain
    sub, record, _ = submit(root, sample, tmp_path / "b.csv", source="a", fmt="proba")
    proba = by_id(read_table(RunPaths(root).test("a"), folds.classes, "test"), TEST_IDS)
    assert record["format"] == "positive-class probability"
    np.testing.assert_allclose(sub["label"].astype(float), proba[:, 1], rtol=1e-12)


@pytest.mark.parametrize("layout, options, message", [
    ("per_class", {"fmt": "labels"}, r"^sample\.csv: submit\.format=labels needs one label column, but the sample "
                                     r"has one probability column per class \['c9', .*\]$"),
    ("label", {"fmt": "proba"}, r"^sample\.csv: submit\.format=proba writes P\(positive class\) in its one column "
                                r"'label' \(a probability per class needs a column per class\), but there are 10 "
                                r"classes, not 2$"),
    ("fractional", {}, r"^sample\.csv: column 'label' holds fractional placeholders \(a probability\), but there "
                       r"are 10 classes, not 2$"),
    ("label", {"fmt": "probs"}, r"^submit\.format: expected one of \['auto', 'labels', 'proba'\], got 'probs'$"),
])
def test_a_format_the_sample_cannot_hold_is_one_line_naming_the_file(multiclass, tmp_path, layout, options,
                                                                     message):
    root, table = multiclass
    columns = {"per_class": {c: "0.1" for c in list(table.classes)[::-1]}, "label": {"label": "c0"},
               "fractional": {"label": "0.5"}}[layout]
    sample = sample_csv(tmp_path / "sample.csv", table.ids, columns)
    with pytest.raises(StackerError, match=message):
        write_submission(root, sample, tmp_path / "sub.csv", log=None, **options)
    assert not (tmp_path / "sub.csv").exists()


def test_a_changed_format_makes_the_submission_stale_not_refused(binary, tmp_path):
    root, _ = binary
    sample = sample_csv(tmp_path / "sample.csv", TEST_IDS, {"label": "0"})
    out = tmp_path / "sub.csv"
    assert submit(root, sample, out, metric="accuracy")[1]["format"] == "labels"
    _, record, lines = submit(root, sample, out, fmt="proba", metric="accuracy")
    assert lines[0] == f"submission: {out} is stale (the format changed); writing it again"
    assert record["format"] == "positive-class probability"
    assert submit(root, sample, out, metric="roc_auc")[2][0].endswith("is current (from stack/test.parquet); "
                                                                      "nothing to do")  # auto resolves the same
    _, record, lines = submit(root, sample, out, metric="accuracy")
    assert "is stale (the format changed)" in lines[0] and record["format"] == "labels"


def test_submit_config_reads_the_submit_section():
    assert submit_config({}).format == "auto" and submit_config({"submit": {"format": "proba"}}).format == "proba"
    assert {f.name for f in fields(SubmitConfig)} == set(SubmitConfig.RULES) and SubmitConfig.SECTION == "submit"
    with pytest.raises(StackerError, match=r"^submit\.format: expected one of \['auto', 'labels', 'proba'\], "
                                           r"got 'probs'$"):
        submit_config({"submit": {"format": "probs"}})
    with pytest.raises(StackerError, match=r"^submit: unknown key\(s\) \['fromat'\]; known: \['format'\]$"):
        submit_config({"submit": {"fromat": "proba"}})


def shim_process(*args):
    """`python cli.py ARGS` from the checkout, in a real process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_the_cli_format_flag_and_set_key(binary, tmp_path):
    root, table = binary
    sample = sample_csv(tmp_path / "sample.csv", TEST_IDS, {"label": "0"})
    out = tmp_path / "sub.csv"
    common = ["submit", "--run", root, "--sample-submission", sample, "--out", out]
    done = stacker(*common, "--format", "proba")
    assert done.returncode == 0, done.stderr
    assert "writing P('1'), as submit.format=proba" in done.stdout
    sub = pd.read_csv(out, dtype=str)
    assert list(sub["id"]) == TEST_IDS
    np.testing.assert_allclose(sub["label"].astype(float), by_id(table, TEST_IDS)[:, 1], rtol=1e-12)
    done = stacker(*common, "--set", "submit.format=labels")
    assert done.returncode == 0 and "is stale (the format changed)" in done.stdout, done.stderr
    assert read_json(record_of(out))["format"] == "labels"
    bad = shim_process(*common, "--set", "submit.format=probs")  # the exit and stderr of a real process
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("stacker: error: submit.format: expected one of "
                                                   "['auto', 'labels', 'proba'], got 'probs'")


def test_the_cli_follows_the_metric_the_stack_was_fitted_on(tmp_path):
    """fit-stack --metric neg_log_loss does not change run.yaml: submit must read the decision's metric."""
    root = binary_run(tmp_path / "run", seed=1, metric="neg_log_loss")
    sample = sample_csv(tmp_path / "sample.csv", TEST_IDS, {"label": "0"})
    done = stacker("submit", "--run", root, "--sample-submission", sample)
    assert done.returncode == 0, done.stderr
    assert read_json(record_of(root / "submission.csv"))["format"] == "positive-class probability", done.stdout
