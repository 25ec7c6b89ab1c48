"""`stacker report`: one self-contained page whose figures are the run's stored ones, rendered by Chromium."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from oof import RunPaths, read_json
from stacker.html_report import build_report, fmt
from stack_fixtures import MODELS, report_run, repeat_run
from test_no_torch import without_torch


class Tables(HTMLParser):
    """Every <table> of a page as a list of rows, each a list of cell texts."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self._cell = [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def headed(self, first: str, having: str | None = None) -> list[list[str]]:
        """The rows (header left out) of the first table whose header starts with `first` (and holds `having`)."""
        return next(t[1:] for t in self.tables if t and t[0] and t[0][0] == first and (having or first) in t[0])


@pytest.fixture(scope="module")
def run(stacked_report_run):
    return stacked_report_run


@pytest.fixture(scope="module")
def report(run):
    return build_report(run)


def test_the_leaderboard_shows_metrics_json_as_stored(run, report):
    page, data = report
    rows = {row[0]: row for row in Tables(page).headed("model")}  # the first "model" table: the leaderboard
    for name in MODELS:
        metrics = read_json(RunPaths(run).predict_metrics(name))
        stored = next(row for row in data["models"] if row["name"] == name)
        assert stored["accuracy"] == metrics["accuracy"] and stored["predict_seconds"] == metrics["seconds"]
        assert rows[name][1:4] == [fmt(metrics["accuracy"]), fmt(metrics.get("accuracy_no_tta")),
                                   fmt(metrics["log_loss"])]
        assert rows[name][8] == fmt(metrics["seconds"])
    assert rows["weak"][2] == "-" and rows["weak"][6] == "-"  # no plain view: TTA only


def test_the_decision_table_shows_decision_json_as_stored(run, report):
    page, data = report
    decision = read_json(RunPaths(run).decision)
    assert data["decision"] == decision
    rows = {row[0]: row for row in Tables(page).headed("candidate")}
    assert list(rows) == list(decision["candidates"])
    for name, c in decision["candidates"].items():
        assert rows[name][1:8] == [fmt(c["score"]), *map(fmt, c["interval"]), fmt(c["gain"]),
                                   *map(fmt, c["gain_interval"]), fmt(c["win_probability"])]
    assert f"Chosen: {decision['chosen']}" in page
    assert f"{decision['metric']} {fmt(decision['nested']['score'])}" in page
    nested = Tables(page).headed("repeat")
    assert [row[2] for row in nested] == [f["chosen"] for f in decision["nested"]["folds"]]


def test_the_page_is_self_contained_and_escaped(report):
    page, data = report
    assert not re.search(r"(?i)(https?:|//[a-z0-9.-]+\.[a-z]{2,}|<link|<script|@import|url\()", page)
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(sources) >= 7  # curves x 3, correlation, reliability, forest plot, confusion matrix
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;script&gt;alert(&#x27;not run&#x27;)&lt;/script&gt; &amp; more" in page  # run.yaml's text
    assert data["confusion"].sum() == 300 and set(data["recall"]) == {f"c{c}" for c in range(10)}
    assert np.allclose(np.diag(data["correlation"]), 1) and data["order"][0] in MODELS


def test_repeats_and_a_missing_history_render(tmp_path):
    run = repeat_run(tmp_path / "run")
    shutil.rmtree(RunPaths(run).model_dir("beta"))  # beta: tables from another tool, no history, no weights
    page, data = build_report(run)
    per_repeat = {row[0]: row for row in Tables(page).headed("model", having="accuracy r1")}
    stored = read_json(RunPaths(run).predict_metrics("alpha"))["repeats"]
    assert per_repeat["alpha"][1:] == [fmt(stored[0]["accuracy"]), fmt(stored[1]["accuracy"]),
                                       fmt(stored[0]["log_loss"]), fmt(stored[1]["log_loss"])]
    assert "beta: no training history" in page and "of repeats agree with the combined choice" in page


def test_the_cli_writes_the_report_without_torch_before_any_stack(tmp_path):
    run = report_run(tmp_path / "run", stack=False)
    result = without_torch("report", "--run", run)
    assert result.returncode == 0, result.stderr
    assert "No stack yet" in RunPaths(run).report.read_text(encoding="utf-8")


IMAGES_LOADED = ('<script>addEventListener("load", () => { const i = [...document.images]; '
                 'document.body.dataset.imagesLoaded = i.filter(x => x.complete && x.naturalWidth > 0).length '
                 '+ "/" + i.length; });</script>')


def chromium(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run "
                                                               "installs it)")
def test_chromium_renders_the_page_and_every_image(run, report, tmp_path):
    import matplotlib.pyplot as plt

    page = tmp_path / "report.html"
    page.write_text(report[0], encoding="utf-8")
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri())
    pixels = plt.imread(shot)
    assert pixels.shape[:2] == (4000, 1280) and pixels.std() > 0.05  # not one blank colour
    probe = tmp_path / "probe.html"  # the page plus a script that counts the images that decoded
    probe.write_text(report[0].replace("</body>", IMAGES_LOADED + "</body>"), encoding="utf-8")
    dom = chromium("--dump-dom", probe.as_uri()).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-500:]
    assert loaded[1] == loaded[2] == str(report[0].count("<img "))
