"""`stacker audit` and the report's audit section: top losses, most confused, likely label errors, duplicates,
from the run's OOF rows and the thumbnails of its cache."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oof import RunPaths, read_json, write_json
from stack_fixtures import repeat_run
from stacker.audit import (CLUSTER_KINDS, AuditRows, audit_rows, duplicate_clusters, flag_issues, label_quality,
                           most_confused, top_losses)
from stacker.audit_html import run_audit
from stacker.leaderboard import read_run
from stacker.thumbnails import MAX_SIDE, Thumbnails, downsample, encode
from test_html_report import IMAGES_LOADED, chromium
from test_no_torch import without_torch
from tiny import run_cli


def synthetic_rows(n: int = 600, classes: int = 4, flipped: int = 30, seed: int = 0) -> tuple[AuditRows, np.ndarray]:
    """Three models that know the true class well, and given labels with `flipped` rows changed at random."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    given = truth.copy()
    flip = rng.choice(n, flipped, replace=False)
    given[flip] = (truth[flip] + rng.integers(1, classes, flipped)) % classes
    models = {}
    for name in ("a", "b", "c"):
        logits = rng.normal(0, 1, (n, classes))
        logits[np.arange(n), truth] += 3.5
        p = np.exp(logits)
        models[name] = p / p.sum(axis=1, keepdims=True)
    ids = np.array([f"img{i:04d}" for i in range(n)], dtype=object)
    ensemble = np.mean(list(models.values()), axis=0)
    return AuditRows(ids, given, tuple(f"c{c}" for c in range(classes)), models, ensemble, "the mean"), flip


def test_top_losses_are_the_wrong_rows_by_loss_with_the_models_agreeing():
    rows, _ = synthetic_rows()
    frame = top_losses(rows)
    pred = rows.ensemble.argmax(axis=1)
    assert len(frame) == int((pred != rows.y).sum()) > 0
    assert (frame["label"] != frame["predicted"]).all()
    assert frame["loss"].is_monotonic_decreasing and list(frame["rank"]) == list(range(1, len(frame) + 1))
    first = int(np.flatnonzero(rows.ids == frame["id"].iloc[0])[0])
    assert frame["loss"].iloc[0] == pytest.approx(-np.log(rows.ensemble[first, rows.y[first]]))
    agree = sum(int(p[first].argmax() == pred[first]) for p in rows.models.values())
    assert frame["models_agree"].iloc[0] == agree and frame["models"].iloc[0] == 3


def test_most_confused_counts_each_pair_and_orders_examples_by_confidence():
    rows, _ = synthetic_rows()
    pred = rows.ensemble.argmax(axis=1)
    pairs = most_confused(rows)
    counts = pd.crosstab(rows.y, pred)
    assert sum(c.count for c in pairs) == int((pred != rows.y).sum())
    assert [c.count for c in pairs] == sorted((c.count for c in pairs), reverse=True)
    for c in pairs:
        a, p = rows.classes.index(c.actual), rows.classes.index(c.predicted)
        assert c.count == counts.loc[a, p] == len(c.rows)
        assert np.all(np.diff(rows.ensemble[c.rows, p]) <= 0)
    assert most_confused(rows, min_count=10**6) == []


def test_label_issues_find_the_flipped_rows():
    rows, flip = synthetic_rows()
    quality = label_quality(rows)
    flagged = np.flatnonzero(flag_issues(rows.y, rows.ensemble))
    worst = np.argsort(quality)[:len(flip)]
    assert len(np.intersect1d(worst, flip)) >= 0.9 * len(flip)  # precision at k = number flipped
    hits = len(np.intersect1d(flagged, flip))
    assert hits >= 0.8 * len(flip) and hits >= 0.9 * len(flagged)  # recall and precision at the flagged count
    one = AuditRows(rows.ids, rows.y, rows.classes, {"a": rows.models["a"]}, rows.models["a"], "a")
    assert label_quality(one) == pytest.approx(rows.models["a"][np.arange(len(rows.y)), rows.y])  # self-confidence


def test_duplicate_clusters_put_label_conflicts_first_then_test_copies():
    rows, _ = synthetic_rows(n=20, flipped=0)
    i = rows.ids
    same = [a for a in range(20) if rows.y[a] == rows.y[0]]
    other = next(a for a in range(20) if rows.y[a] != rows.y[0])
    pairs = pd.DataFrame([
        ["train", i[same[0]], i[same[1]], "3"],  # same labels: a plain train cluster
        ["train-test", i[same[2]], "t1", "5"],
        ["train", i[4 if 4 not in (same[:3] + [other]) else 5], i[other], "8"],  # may or may not conflict
        ["train", i[same[3]], i[other], "2"], ["train", i[same[3]], i[same[4]], "9"],  # a chain: one cluster
        ["test", "t2", "t3", "1"]], columns=["kind", "id_a", "id_b", "distance"])
    frame = duplicate_clusters(pairs, rows)
    kinds = frame.drop_duplicates("cluster")["kind"].tolist()
    assert kinds == sorted(kinds, key=CLUSTER_KINDS.index) and kinds[0] == "label conflict"
    chain = frame[frame["id"] == i[same[3]]]["cluster"].iloc[0]
    assert set(frame[frame["cluster"] == chain]["id"]) >= {i[same[3]], i[other], i[same[4]]}
    assert frame[frame["id"] == "t1"][["kind", "split", "label"]].values.tolist() == [["train-test", "test", ""]]
    assert frame[frame["id"] == i[same[3]]]["distance"].iloc[0] == 2
    assert duplicate_clusters(None, rows).empty


def test_thumbnails_are_small_and_the_page_budget_holds(tmp_path):
    assert downsample(np.zeros((224, 300, 3), np.uint8)).shape == (44, 60, 3)  # factor 5: both sides <= 64
    assert downsample(np.zeros((32, 32, 3), np.uint8)).shape == (32, 32, 3)  # never enlarged
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert encode(photo).startswith("data:image/jpeg;base64,")  # noise: a large PNG, sent as JPEG
    paths = RunPaths(tmp_path / "run")
    fake_cache(paths, n=300, side=256)
    thumbs = Thumbnails(paths, max_bytes=200_000)
    uris = [thumbs.uri("train", f"img{k:04d}") for k in range(300)]
    shown = [u for u in uris if u]
    assert thumbs.bytes <= 200_000 and thumbs.count == len(shown) and thumbs.left_out == 300 - len(shown) > 0
    assert thumbs.uri("train", "not-an-id") is None and thumbs.uri("test", "img0000") is None
    many = Thumbnails(paths)  # noise pictures: JPEGs of ~10 kB, so the byte budget binds before the count
    assert sum(many.uri("train", f"img{k:04d}") is not None for k in range(300)) == many.count <= 200
    assert many.bytes <= 1_900_000 and many.left_out == 300 - many.count


def fake_cache(paths: RunPaths, n: int, side: int) -> None:
    """A train cache of random pictures as the image side writes it: raw (N, H, W, 3) uint8 and its index."""
    paths.cache.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(1).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    pixels.tofile(paths.cache_data("train"))
    write_json(paths.cache_index("train"), {"ids": [f"img{k:04d}" for k in range(n)], "size": [side, side]})


def test_fit_stack_writes_the_section_and_the_csvs(trained_run):
    paths = RunPaths(trained_run.run)
    page = paths.report.read_text(encoding="utf-8")
    assert "Audit: the data through the models" in page
    losses = pd.read_csv(paths.audit_top_losses, dtype={"id": str})
    view = read_run(paths.root)
    rows = audit_rows(view)
    assert len(losses) == int((rows.ensemble.argmax(axis=1) != rows.y).sum())
    assert set(losses["id"]) <= set(view.folds.ids)
    issues = pd.read_csv(paths.audit_label_issues, dtype={"id": str})
    assert list(issues.columns[:4]) == ["rank", "id", "label", "suggested"] and issues["quality"].is_monotonic_increasing
    section = page[page.index("Audit: the data"):]
    assert 0 < section.count("<img ") <= 200
    assert all(MAX_SIDE >= max(Image.open(_png(u)).size) for u in _uris(section))


def _uris(page: str) -> list[str]:
    return re.findall(r'src="(data:image/[a-z]+;base64,[^"]+)"', page)


def _png(uri: str):
    import base64
    import io

    return io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))


def test_stacker_audit_renders_duplicates_and_every_thumbnail_decodes(trained_copy, tmp_path):
    paths = RunPaths(trained_copy.run)
    folds = read_run(paths.root).folds
    test_ids = read_json(paths.cache_index("test"))["ids"]
    ids, y = folds.ids, folds.y
    a, b = 0, int(np.flatnonzero(y != y[0])[0])
    pairs = pd.DataFrame({"kind": ["train", "train-test"], "id_a": [ids[a], ids[2]], "id_b": [ids[b], test_ids[0]],
                          "distance": [4, 6], "label_a": "", "label_b": "", "conflict": [True, False]})
    pairs.to_csv(paths.duplicates, index=False)
    result = run_cli("audit", "--run", paths.root)
    assert result.returncode == 0, result.stderr
    assert "likely label errors" in result.stdout and str(paths.audit_page) in result.stdout
    dups = pd.read_csv(paths.audit_duplicates, dtype=str)
    assert dups["kind"].tolist() == ["label conflict"] * 2 + ["train-test"] * 2
    assert dups[dups["id"] == test_ids[0]]["split"].tolist() == ["test"]
    page = paths.audit_page.read_text(encoding="utf-8")
    assert f'alt="{test_ids[0]}"' in page and f'alt="{ids[b]}"' in page  # both splits' thumbnails
    assert run_cli("report", "--run", paths.root).returncode == 0
    report = paths.report.read_text(encoding="utf-8")
    section = report[report.index("Audit: the data"):report.index("Config and provenance")]
    assert section.count("<img ") == page.count("<img ") and len(section) < 2_000_000
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    for name, text in (("audit", page), ("report", report)):
        probe = tmp_path / f"{name}.html"  # the page plus a script that counts the images that decoded
        probe.write_text(text.replace("</body>", IMAGES_LOADED + "</body>"), encoding="utf-8")
        loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', chromium("--dump-dom", probe.as_uri()).stdout)
        assert loaded and loaded[1] == loaded[2] == str(text.count("<img ")) and int(loaded[2]) > 10


def test_other_tools_tables_get_the_csvs_and_text_sections(stacked_report_run, tmp_path):
    run = shutil.copytree(stacked_report_run, tmp_path / "run")
    result = without_torch("audit", "--run", run)  # stacker/ reads no image through torch or base_models
    assert result.returncode == 0, result.stderr
    audit, files = run_audit(run)
    assert all(f.is_file() for f in files)
    page = RunPaths(run).audit_page.read_text(encoding="utf-8")
    assert "<img " not in page and "no image cache" in page
    assert "Top losses" in page and "Most confused" in page and "Likely label errors" in page
    assert len(pd.read_csv(RunPaths(run).audit_top_losses)) == len(audit.top_losses) > 0


def test_repeats_rank_a_row_by_its_oof_averaged_over_repeats(tmp_path):
    run = repeat_run(tmp_path / "run")
    view = read_run(run)
    rows = audit_rows(view)
    alpha = view.models["alpha"].oof
    by_id = pd.DataFrame(alpha.proba, index=alpha.ids).groupby(level=0).mean()  # each id's rows, every repeat
    assert view.folds.repeats > 1 and len(alpha.ids) == view.folds.repeats * len(rows.ids)
    assert rows.models["alpha"] == pytest.approx(by_id.loc[rows.ids].to_numpy())
    audit, _ = run_audit(run)
    assert audit.top_losses["id"].is_unique
    first = int(np.flatnonzero(rows.ids == audit.top_losses["id"].iloc[0])[0])
    assert audit.top_losses["loss"].iloc[0] == pytest.approx(-np.log(rows.ensemble[first, rows.y[first]]))


def test_audit_without_oof_tables_is_one_line_exit_2(trained_copy):
    shutil.rmtree(RunPaths(trained_copy.run).preds)
    result = without_torch("audit", "--run", trained_copy.run)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no model has an OOF table" in result.stderr and "Traceback" not in result.stderr


def test_the_audits_list_excludes_its_rows_and_the_next_audit_says_so(trained_copy, tmp_path, small_digits_dir):
    import yaml

    paths = RunPaths(trained_copy.run)
    flagged = pd.read_csv(paths.audit_label_issues, dtype={"id": str})["id"].tolist()
    assert flagged  # the tiny models leave plenty of rows to flag
    config = yaml.safe_load(trained_copy.config.read_text())
    config["data"]["exclude"] = str(paths.audit_label_issues)
    trained_copy.config.write_text(yaml.safe_dump(config))
    refused = run_cli("train-base", "--config", trained_copy.config)  # every audit rewrites that file
    assert refused.returncode == 2 and "copy it out first" in refused.stderr
    kept = shutil.copy(paths.audit_label_issues, tmp_path / "exclude.csv")  # the audit's CSV as it is, kept
    config["data"]["exclude"] = str(kept)
    trained_copy.config.write_text(yaml.safe_dump(config))
    stale = run_cli("train-base", "--config", trained_copy.config)
    assert stale.returncode == 2 and "trained on other training rows or labels" in stale.stderr
    for args in (("train-base", "--config", trained_copy.config, "--force"), ("predict-oof", "--run", paths.root),
                 ("audit", "--run", paths.root)):  # the stack is the old folds': the audit shows the models' mean
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    assert "the stack was fitted on other folds; run fit-stack again" in paths.audit_page.read_text(encoding="utf-8")
    result = run_cli("fit-stack", "--run", paths.root)
    assert result.returncode == 0, result.stderr
    again = run_cli("train-base", "--config", trained_copy.config)  # the kept list still names the same rows
    assert again.returncode == 0 and "6 jobs, 6 already done, 0 to run" in again.stdout, again.stderr
    assert not set(flagged) & set(read_run(paths.root).folds.ids)
    assert not set(flagged) & set(pd.read_csv(paths.audit_top_losses, dtype={"id": str})["id"])
    page = paths.report.read_text(encoding="utf-8")
    assert f"{len(flagged)} train rows left out (data.exclude)" in page
