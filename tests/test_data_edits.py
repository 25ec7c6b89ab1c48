"""`data.exclude` and `data.relabel`: applied on top of the base folds, every other row in its fold, and only the
jobs whose training rows changed go stale.

One run (test_resnet, 3 folds, one epoch) is trained and predicted once per module; a test that writes takes
its own copy. The folds-only tests prepare runs without training (`prepare_run`), the error rules stop before
anything is decoded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from base_models.config import DataConfig, FoldsConfig
from base_models.job_state import ROWS_CHANGED, Sources, rows_digest
from base_models.jobs import prepare_run
from oof import (DataEdits, RunPaths, StackerError, apply_edits, base_folds, file_digest, load_folds, make_folds,
                 read_table, write_folds)
from tiny import TINY, copy_run, run_cli, silent, write_config

MODEL = [{"arch": "test_resnet"}]


def config(path: Path, data_root, run, **data):
    """The module's run.yaml (test_resnet, TINY, 3 folds), `data` keys added to data.root."""
    return write_config(path, data_root, run, train=TINY, models=MODEL, data={"root": str(data_root), **data})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_digits_dir):
    """test_resnet trained on every fold of the 400 digits and predicted, without edits."""
    root = tmp_path_factory.mktemp("edits")
    cfg = config(root / "run.yaml", small_digits_dir, root / "run")
    for args in (("train-base", "--config", cfg), ("predict-oof", "--run", root / "run")):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    """This test's copy of the trained run."""
    return RunPaths(copy_run(trained, tmp_path / "run"))


def ids_in(folds, fold: int, n: int = 2, label: str | None = None) -> list[str]:
    rows = folds.fold == fold
    if label is not None:
        rows &= folds.table["label"].to_numpy() == label
    return folds.ids[rows][:n].tolist()


def job_notes(result) -> dict[int, tuple[str, str]]:
    """{fold: (state, note)} from `stacker jobs`' table."""
    assert result.returncode == 0, result.stderr
    out = {}
    for line in result.stdout.splitlines()[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 8 and cells[1].isdigit():
            out[int(cells[1])] = (cells[2], cells[8] if len(cells) > 8 else "")
    return out


def stamp(path: Path) -> tuple[str, int]:
    return file_digest(path), path.stat().st_mtime_ns


def one_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stacker: error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- a trained run, edited


def test_excluded_rows_leave_every_other_row_in_its_fold_and_stale_only_the_jobs_that_trained_on_them(run, tmp_path,
                                                                                                      small_digits_dir):
    before = load_folds(run.folds)
    gone = ids_in(before, 0)  # both held out by fold 0: job 0 never trained on them
    (tmp_path / "drop.txt").write_text(f"{gone[0]}\n\n{gone[1]}\n")
    cfg = config(tmp_path / "edited.yaml", small_digits_dir, run.root, exclude=str(tmp_path / "drop.txt"))
    kept = stamp(run.weights("test_resnet", 0))

    error = one_error(run_cli("train-base", "--config", cfg))
    assert f"test_resnet folds 1, 2 were {ROWS_CHANGED}; pass --force --only test_resnet:1 --only test_resnet:2 " \
           "to train them again" in error and "fold 0" not in error  # the flags that keep job 0

    folds = load_folds(run.folds)
    assert folds.ids.tolist() == [i for i in before.ids.tolist() if i not in gone]
    old = dict(zip(before.ids, before.fold))
    assert all(old[i] == f for i, f in zip(folds.ids, folds.fold))  # no reshuffle
    assert folds.edits.excluded == tuple(sorted(gone)) and not folds.edits.relabelled
    assert [r.folds for r in folds.edits.excluded_rows] == [(0,), (0,)]
    meta = json.loads(pq.read_schema(run.folds).metadata[b"stacker"])
    assert meta["sha256"] == folds.sha256 != before.sha256 and meta["edits"]["sha256"] == folds.edits.sha256

    notes = job_notes(run_cli("jobs", "--run", run.root))
    assert notes[0] == ("done", "") and notes[1] == notes[2] == ("stale", ROWS_CHANGED)

    result = run_cli("train-base", "--config", cfg, "--force", "--only", "test_resnet:1", "--only", "test_resnet:2")
    assert result.returncode == 0, result.stderr
    assert stamp(run.weights("test_resnet", 0)) == kept  # current: not retrained
    result = run_cli("train-base", "--config", cfg)
    assert result.returncode == 0 and "3 jobs, 3 already done, 0 to run" in result.stdout, result.stderr

    result = run_cli("predict-oof", "--run", run.root)
    assert result.returncode == 0, result.stderr
    oof = read_table(run.oof("test_resnet"), folds.classes, "oof")
    assert oof.ids.tolist() == folds.ids.tolist() and not set(gone) & set(oof.ids)
    assert oof.meta["folds_sha256"] == folds.sha256
    part = read_table(run.oof_fold("test_resnet", 0), folds.classes, "oof")
    assert len(part.ids) == int((before.fold == 0).sum()) - 2
    assert stamp(run.weights("test_resnet", 0)) == kept


def test_rows_held_out_by_two_folds_stale_every_job(run, tmp_path, small_digits_dir):
    before = load_folds(run.folds)
    gone = ids_in(before, 0, 1) + ids_in(before, 1, 1)
    cfg = config(tmp_path / "edited.yaml", small_digits_dir, run.root, exclude=gone)
    error = one_error(run_cli("train-base", "--config", cfg))
    assert f"test_resnet folds 0, 1, 2 were {ROWS_CHANGED}" in error
    assert {r.id: r.folds for r in load_folds(run.folds).edits.excluded_rows} == {gone[0]: (0,), gone[1]: (1,)}


def test_a_relabel_changes_the_label_alone_and_stales_the_jobs_that_trained_on_the_row(run, tmp_path,
                                                                                        small_digits_dir):
    before = load_folds(run.folds)
    row, same = ids_in(before, 2, 2, label="3")
    pd.DataFrame({"id": [row, same], "label": ["8", "3"], "quality": [0.1, 0.9]}).to_csv(tmp_path / "fix.csv",
                                                                                      index=False)
    cfg = config(tmp_path / "edited.yaml", small_digits_dir, run.root, relabel=str(tmp_path / "fix.csv"))
    error = one_error(run_cli("train-base", "--config", cfg))
    assert f"test_resnet folds 0, 1 were {ROWS_CHANGED}" in error

    folds = load_folds(run.folds)
    assert folds.ids.tolist() == before.ids.tolist() and (folds.fold == before.fold).all()
    changed = folds.table["label"].to_numpy() != before.table["label"].to_numpy()
    assert folds.ids[changed].tolist() == [row] and folds.table["label"][changed].tolist() == ["8"]
    assert dict(folds.edits.relabelled) == {row: ("3", "8")}  # the relabel to its own label changed nothing
    assert not folds.edits.excluded
    notes = job_notes(run_cli("jobs", "--run", run.root))
    assert notes[2] == ("done", "") and notes[0][0] == notes[1][0] == "stale"


# ---------------------------------------------------------------- the folds alone


def prepare(root: Path, data: DataConfig, folds: FoldsConfig):
    return prepare_run(RunPaths(root), data, folds, (16, 16), log=silent)[1]


@pytest.fixture(scope="module")
def grouped_csv(tmp_path_factory, small_digits_dir) -> Path:
    """The digits' train CSV with a `plant` column: four images a group."""
    table = pd.read_csv(small_digits_dir / "train.csv", dtype=str)
    path = tmp_path_factory.mktemp("grouped") / "train.csv"
    table.assign(plant=[f"p{i // 4:03d}" for i in range(len(table))]).to_csv(path, index=False)
    return path


def test_edits_from_the_start_equal_edits_added_later_and_removing_them_restores_the_folds(
        tmp_path, small_digits_dir, grouped_csv):
    folds_cfg = FoldsConfig(k=3, seed=0, repeats=2, group_column="plant")
    plain = DataConfig(root=str(small_digits_dir), train_csv=str(grouped_csv), id_column="image_id")
    original = prepare(tmp_path / "later", plain, folds_cfg)
    first_bytes = RunPaths(tmp_path / "later").folds.read_bytes()
    gone = ids_in(original.for_repeat(0), 1, 3)
    moved = original.ids[~np.isin(original.ids, gone)][-1]
    new_label = "0" if original.table["label"].iloc[-1] != "0" else "1"
    edited = DataConfig(root=str(small_digits_dir), train_csv=str(grouped_csv), id_column="image_id",
                        exclude=gone, relabel={moved: new_label})

    later = prepare(tmp_path / "later", edited, folds_cfg)
    start = prepare(tmp_path / "start", edited, folds_cfg)
    assert RunPaths(tmp_path / "later").folds.read_bytes() == RunPaths(tmp_path / "start").folds.read_bytes()
    assert later.sha256 == start.sha256 and later.edits == start.edits and later.repeats == 2
    assert [r.group for r in later.edits.excluded_rows] == [original.groups[original.ids == i][0] for i in sorted(gone)]
    assert (later.fold_matrix == original.fold_matrix[:, ~np.isin(original.ids, gone)]).all()

    other = DataConfig(root=str(small_digits_dir), train_csv=str(grouped_csv), id_column="image_id", exclude=gone[:1])
    assert prepare(tmp_path / "later", other, folds_cfg).edits.excluded == (gone[0],)  # other edits: accepted
    restored = prepare(tmp_path / "later", plain, folds_cfg)
    assert restored.sha256 == original.sha256 and not restored.edits
    assert RunPaths(tmp_path / "later").folds.read_bytes() == first_bytes


def test_base_folds_rebuild_the_assignment_and_a_changed_record_is_refused(tmp_path):
    ids = [f"r{i:02d}" for i in range(30)]
    base = make_folds(ids, [str(i % 3) for i in range(30)], k=3, seed=1)
    edits = DataEdits(("r04", "r07"), {"r05": "0"})
    folds = apply_edits(base, edits)
    rebuilt = base_folds(folds)
    assert rebuilt.sha256 == base.sha256 and not rebuilt.edits
    write_folds(tmp_path / "folds.parquet", folds)
    assert load_folds(tmp_path / "folds.parquet").edits == folds.edits

    table = pq.read_table(tmp_path / "folds.parquet")
    meta = json.loads(table.schema.metadata[b"stacker"])
    meta["edits"]["excluded"][0]["folds"] = [(meta["edits"]["excluded"][0]["folds"][0] + 1) % 3]
    pq.write_table(table.replace_schema_metadata({b"stacker": json.dumps(meta).encode()}), tmp_path / "bad.parquet")
    with pytest.raises(StackerError, match=r"bad\.parquet: the edits it records .* were changed after the file"):
        load_folds(tmp_path / "bad.parquet")


def test_a_jobs_rows_digest_decides_where_recorded_and_keep_best_counts_its_held_out_rows():
    ids = [f"r{i:02d}" for i in range(30)]
    base = make_folds(ids, [str(i % 3) for i in range(30)], k=3, seed=1)
    out = base.ids[base.fold == 0][0]
    folds = apply_edits(base, DataEdits((out,)))
    assert rows_digest(folds, 0) == rows_digest(base, 0) and rows_digest(folds, 1) != rows_digest(base, 1)
    assert rows_digest(folds, 0, held_out=True) != rows_digest(base, 0, held_out=True)

    now = Sources(folds.sha256, "cache", rows_digest(folds, 0))
    record = {"folds_sha256": base.sha256, "rows_sha256": rows_digest(base, 0), "cache_sha256": "cache"}
    assert now.reason(record) is None  # another folds digest, the same training rows
    assert Sources(folds.sha256, "cache", rows_digest(folds, 1)).reason(record) == ROWS_CHANGED
    older = {"folds_sha256": base.sha256, "cache_sha256": "cache"}
    assert now.reason(older) == "trained on another fold assignment"


def test_an_image_source_reads_the_cache_through_the_folds_rows():
    from base_models.batches import ImageSource

    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    source = ImageSource(images, "cpu")
    assert source.select(np.arange(6)) is source
    picked = source.select(np.array([5, 0, 3]))
    assert len(picked) == 3 and picked.shape == (3, 2, 2, 3) and len(source) == 6
    batches = [b.numpy() for b, _ in picked.batches(np.array([2, 0, 1]), 2)]
    np.testing.assert_array_equal(np.concatenate(batches), images[[3, 5, 0]])


# ---------------------------------------------------------------- the rules


def rule_cases(folds, small_digits_dir, tmp_path):
    """(data keys, message) of each rule an edit can break."""
    test_id = pd.read_csv(small_digits_dir / "sample_submission.csv", dtype=str).iloc[0, 0]
    train_id = folds.ids[0]
    (tmp_path / "no_id.csv").write_text("image,label\na,1\n")
    (tmp_path / "no_label.csv").write_text(f"id,suggested\n{train_id},1\n")
    zeros = folds.ids[folds.table["label"].to_numpy() == "0"]
    audited = RunPaths(tmp_path / "audited")  # another run's audit output, which its next audit rewrites
    audited.audit.mkdir(parents=True)
    audited.config.write_text("run_dir: .\n")
    audited.audit_label_issues.write_text(f"rank,id\n1,{train_id}\n")
    outside = zeros[folds.fold[folds.table["label"].to_numpy() == "0"] != 0].tolist()
    return [
        ({"exclude": ["nope.png"]}, r"data\.exclude: 1 id\(s\) not a train id of the dataset, first 'nope\.png'"),
        ({"exclude": [test_id]}, rf"not a train id of the dataset, first '{test_id}' \('{test_id}' is a test id\)"),
        ({"relabel": {train_id: "cat"}}, rf"data\.relabel: 1 relabel\(s\) to a class the run does not have, first "
                                         rf"'{train_id}' -> 'cat'; the classes are \['0', '1', "),
        ({"exclude": [train_id], "relabel": {train_id: "1"}}, rf"data\.exclude, data\.relabel: 1 id\(s\) both "
                                                              rf"excluded and relabelled, first '{train_id}'"),
        ({"exclude": str(tmp_path / "missing.csv")}, r"data\.exclude: .*missing\.csv: file not found"),
        ({"exclude": str(tmp_path / "no_id.csv")}, r"data\.exclude: .*no_id\.csv: missing column\(s\) \['id'\]"),
        ({"relabel": str(tmp_path / "no_label.csv")}, r"data\.relabel: .*no_label\.csv: missing column\(s\) "
                                                      r"\['label'\]"),
        ({"exclude": [train_id, train_id]}, rf"data\.exclude: duplicate ids, first '{train_id}'"),
        ({"exclude": outside}, r"data\.exclude: fold 0's training part has no '0' image"),
        ({"exclude": zeros.tolist()}, r"data\.exclude: leaves class '0' without a train row"),
        ({"exclude": str(audited.audit_label_issues)}, r"data\.exclude: .*label_issues\.csv: is a run's audit "
                                                        r"output, which every audit of that run rewrites; copy it out"),
    ]


def test_each_rule_is_one_line_and_exit_2(trained, tmp_path, small_digits_dir):
    folds = load_folds(RunPaths(trained).folds)  # the same assignment a fresh run with duplicates: off makes
    for n, (data, message) in enumerate(rule_cases(folds, small_digits_dir, tmp_path)):
        cfg = write_config(tmp_path / f"run{n}.yaml", small_digits_dir, tmp_path / f"run{n}", train=TINY,
                           models=MODEL, data={"root": str(small_digits_dir), **data},
                           folds={"k": 3, "duplicates": "off"})
        error = one_error(run_cli("train-base", "--config", cfg))
        assert re.search(message, error), (message, error)
        assert not (tmp_path / f"run{n}" / "cache").exists()  # refused before anything was decoded


def test_a_moved_run_keeps_its_exclude_and_relabel_files(tmp_path, small_digits_dir):
    from oof import load_config, write_run_config

    project = tmp_path / "project"
    run, lists = project / "runs" / "a", project / "lists"
    lists.mkdir(parents=True)
    paths = RunPaths(run)
    write_run_config(paths, {"data": {"root": str(small_digits_dir), "exclude": str(lists / "out.txt"),
                                      "relabel": str(lists / "fix.csv")}, "models": []})
    saved = paths.config.read_text()
    assert "../../lists/out.txt" in saved and str(lists) not in saved  # relative to the run
    project.rename(tmp_path / "moved")  # the run and its lists move together
    data = load_config(None, str(tmp_path / "moved" / "runs" / "a"))["data"]
    assert Path(data["exclude"]) == tmp_path / "moved" / "lists" / "out.txt"
    assert Path(data["relabel"]) == tmp_path / "moved" / "lists" / "fix.csv"
    listed = load_config(None, str(tmp_path / "moved" / "runs" / "a"), {}, ["data.exclude=[00002.png]"])
    assert listed["data"]["exclude"] == ["00002.png"]  # a list of ids is not a path


def test_with_repeats_each_repeat_keeps_the_job_that_held_the_row_out(tmp_path, small_digits_dir):
    data = {"root": str(small_digits_dir)}
    folds_cfg = {"k": 3, "repeats": 2, "duplicates": "off"}
    cfg = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run", train=TINY, models=MODEL,
                       data=data, folds=folds_cfg)
    assert run_cli("train-base", "--config", cfg).returncode == 0
    paths = RunPaths(tmp_path / "run")
    before = load_folds(paths.folds)
    gone = before.ids[0]
    held = [int(f[0]) for f in before.fold_matrix]  # the fold that holds the row out, per repeat
    kept = {r: stamp(paths.for_repeat(r).weights("test_resnet", held[r])) for r in range(2)}
    cfg = write_config(tmp_path / "edited.yaml", small_digits_dir, paths.root, train=TINY, models=MODEL,
                       data={**data, "exclude": [gone]}, folds=folds_cfg)
    error = one_error(run_cli("train-base", "--config", cfg))
    stale = [f"test_resnet:{r}:{k}" for r in range(2) for k in range(3) if k != held[r]]
    assert "pass --force " + " ".join(f"--only {s}" for s in stale) + " to train them again" in error
    folds = load_folds(paths.folds)
    assert folds.repeats == 2 and gone not in set(folds.ids)
    assert [r.folds for r in folds.edits.excluded_rows] == [tuple(held)]  # its base fold in each repeat
    result = run_cli("train-base", "--config", cfg, "--force", *[a for s in stale for a in ("--only", s)])
    assert result.returncode == 0, result.stderr
    assert {r: stamp(paths.for_repeat(r).weights("test_resnet", held[r])) for r in range(2)} == kept
    again = run_cli("train-base", "--config", cfg)
    assert again.returncode == 0 and "6 jobs, 6 already done, 0 to run" in again.stdout, again.stderr


def test_under_keep_best_the_job_that_held_the_row_out_goes_stale_too(tmp_path, small_digits_dir):
    data = {"root": str(small_digits_dir)}
    train = {**TINY, "keep": "best"}  # the held-out rows pick the epoch: they are part of what the job used
    cfg = write_config(tmp_path / "run.yaml", small_digits_dir, tmp_path / "run", train=train, models=MODEL,
                       data=data, folds={"k": 3, "duplicates": "off"})
    assert run_cli("train-base", "--config", cfg).returncode == 0
    folds = load_folds(RunPaths(tmp_path / "run").folds)
    cfg = write_config(tmp_path / "edited.yaml", small_digits_dir, tmp_path / "run", train=train, models=MODEL,
                       data={**data, "exclude": ids_in(folds, 0, n=1)}, folds={"k": 3, "duplicates": "off"})
    error = one_error(run_cli("train-base", "--config", cfg))
    assert f"test_resnet folds 0, 1, 2 were {ROWS_CHANGED}; pass --force to train them again" in error


@pytest.mark.parametrize("held_by_the_job", [True, False])
def test_an_interrupted_job_resumes_only_when_its_training_rows_are_unchanged(tmp_path, small_digits_dir,
                                                                             held_by_the_job):
    from base_models.jobs import StageOptions, train_base
    from tiny import TWO_EPOCHS, first_fold, prepared, specs

    paths, folds = prepared(tmp_path / "run", small_digits_dir)

    def stop_after_first_epoch(line):
        if "epoch  1/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # as by Ctrl-C: fold 0 holds its first epoch's checkpoint
        train_base(paths, specs(train=TWO_EPOCHS), folds, options=StageOptions(log=stop_after_first_epoch))
    assert paths.checkpoint("test_resnet", 0).is_file()
    gone = ids_in(folds, 0 if held_by_the_job else 1, n=1)
    _, edited = prepared(tmp_path / "run", small_digits_dir, exclude=gone)
    lines = []
    if not held_by_the_job:  # fold 0 trained on the row: its checkpoint is refused, naming why
        refused = rf"fold0\.checkpoint\.pt: an interrupted job was {re.escape(ROWS_CHANGED)}"
        with pytest.raises(StackerError, match=refused):
            train_base(paths, specs(train=TWO_EPOCHS), edited, options=first_fold(lines.append))
        return
    train_base(paths, specs(train=TWO_EPOCHS), edited, options=first_fold(lines.append))
    assert not any("fold 0 epoch  1/2" in s for s in lines) and any("fold 0 epoch  2/2" in s for s in lines)
