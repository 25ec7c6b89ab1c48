"""decision.json's "predict" on the pages: the report's prediction-time section and front plot, the text
report's line, and the leaderboard's units ("model@v") matched to their models."""
from __future__ import annotations

import base64
import io
import re
import shutil

import numpy as np
import pytest

from oof import RunPaths, read_json, table_file, write_json
from stacker.html_report import front_figure, prediction_section
from stacker.leaderboard import ensemble_oof, format_leaderboard, leaderboard, missing, read_run, used_models
from stacker.report import format_report
from test_html_report import Tables
from tiny import run_cli

UNITS = [{"name": "middle", "model": "middle", "views": 3, "fold_models": 2, "seconds": 5.0},
         {"name": "strong@2", "model": "strong", "views": 2, "fold_models": 2, "seconds": 3.0}]
PATH = [("strong@1", "strong", 1, 1.5, 0.80), ("strong@2", "strong", 2, 3.0, 0.83), ("middle", "middle", 3, 8.0, 0.86),
        ("weak", "weak", 3, 15.0, 0.865), ("strong", "strong", 3, 21.0, 0.87)]


def predict_record(budget: float | None) -> dict:
    """A "predict" as fit-stack writes it: under `budget` the units strong@2 and middle, without one every model."""
    units = UNITS if budget is not None else [
        {"name": m, "model": m, "views": 3, "fold_models": 2, "seconds": s} for m, s in
        (("strong", 9.0), ("middle", 5.0), ("weak", 7.0))]
    return {"budget": budget, "rows": 1000, "speed_ratio": 1.5, "folds": 2, "devices": ["cpu"],
            "seconds": float(sum(u["seconds"] for u in units)), "ensemble_seconds": 21.0, "units": units,
            "path": [{"unit": u, "model": m, "views": v, "seconds": s, "score": score, "log_loss": 1 - score}
                     for u, m, v, s, score in PATH],
            **({"outer": {"0": ["strong@2", "middle"], "1": ["strong@2"]}} if budget is not None else {})}


def with_predict(decision: dict, budget: float | None) -> dict:
    predict = predict_record(budget)
    candidates = {name: {**c, "predict_seconds": predict["seconds"]} for name, c in decision["candidates"].items()}
    used = [u["name"] for u in predict["units"]]
    return {**decision, "predict": predict, "candidates": candidates, "used": used}


@pytest.fixture(scope="module")
def budget_run(stacked_report_run, tmp_path_factory):
    """A copy of the stacked report run whose decision.json holds a budget's "predict" (strong@2 and middle
    used, weak left out) and no stack/oof.parquet (the page's ensemble is then the used models' mean)."""
    run = tmp_path_factory.mktemp("budget") / "run"
    shutil.copytree(stacked_report_run, run)
    paths = RunPaths(run)
    write_json(paths.decision, with_predict(read_json(paths.decision), budget=10.0))
    table_file(paths.stack_oof).unlink()
    return run


@pytest.fixture(scope="module")
def page(budget_run):
    result = run_cli("report", "--run", budget_run)
    assert result.returncode == 0, result.stderr
    return RunPaths(budget_run).report.read_text(encoding="utf-8")


def section(page: str) -> str:
    start = page.index("<h2>Prediction time</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end != -1 else None]


def test_the_report_shows_the_prediction_time_section_and_its_plot(page):
    import matplotlib.pyplot as plt

    text = section(page)
    sources = re.findall(r'<img alt="score against predicted test seconds" src="([^"]*)"', text)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    png = base64.b64decode(sources[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and plt.imread(io.BytesIO(png)).shape[0] > 100
    tables = Tables(text).tables
    settings = dict(tables[0][1:])
    assert settings["budget"] == "10 s" and settings["images"] == "1000" and settings["speed ratio"] == "1.5000"
    assert settings["fold models per model"] == "2" and settings["measured on"] == "cpu"
    assert settings["predicted seconds: the stack"] == "8.0000"
    assert settings["predicted seconds: the whole ensemble"] == "21.0000"
    assert tables[1][1:] == [["middle", "middle", "3", "2", "5.0000"], ["strong@2", "strong", "2", "2", "3.0000"]]
    assert [row[0] for row in tables[2][1:]] == [p[0] for p in PATH]  # the greedy path, step by step
    assert "outer folds chose: 0: strong@2, middle; 1: strong@2" in text


def test_the_front_plot_draws_the_path_candidates_chosen_and_budget(budget_run):
    import matplotlib.pyplot as plt

    decision = read_json(RunPaths(budget_run).decision)
    for budget in (10.0, None):
        fig = front_figure(with_predict(decision, budget))
        ax = fig.axes[0]
        labels = {line.get_label() for line in ax.get_lines()}
        texts = {t.get_text() for t in ax.texts}
        assert "greedy path: plain mean of the units so far" in labels and f"chosen: {decision['chosen']}" in labels
        assert {p[0] for p in PATH} <= texts and f"chosen: {decision['chosen']}" in texts
        assert ("budget 10 s" in labels) == (budget is not None)  # the dashed line
        # the whole ensemble's mean is known only when the stack uses every unit (no budget)
        assert ("whole ensemble (mean, every model at every view)" in labels) == (budget is None)
        if budget is None:
            point = next(line for line in ax.get_lines() if line.get_label().startswith("whole ensemble"))
            assert point.get_xdata()[0] == 21.0 and point.get_ydata()[0] == decision["candidates"]["mean"]["score"]
        step = next(line for line in ax.get_lines() if line.get_label().startswith("greedy path"))
        assert min(step.get_xdata()) == 1.5 and max(step.get_ydata()) == 0.87
        plt.close(fig)


def test_no_predict_no_section(stacked_report_run):
    decision = read_json(RunPaths(stacked_report_run).decision)
    assert prediction_section({k: v for k, v in decision.items() if k != "predict"}) == ""
    assert prediction_section(None) == ""


def test_the_text_report_has_the_predicted_time_line(budget_run):
    decision = read_json(RunPaths(budget_run).decision)
    lines = format_report(decision).splitlines()
    assert "predicted test time: 8 s for 1000 images (budget 10 s; whole ensemble 21 s)" in lines
    plain = format_report(with_predict(decision, None)).splitlines()
    assert "predicted test time: 21 s for 1000 images (no budget; whole ensemble 21 s)" in plain
    other_tool = format_report({k: v for k, v in decision.items() if k != "predict"})
    assert "predicted test time" not in other_tool


def test_the_leaderboard_finds_the_units_models(budget_run, page):
    view = read_run(budget_run)
    assert view.decision["used"] == ["middle", "strong@2"] and used_models(view.decision) == ["middle", "strong"]
    proba, _, label = ensemble_oof(view)
    assert np.allclose(proba, (view.models["middle"].oof.proba + view.models["strong"].oof.proba) / 2)
    assert "(middle, strong)" in label
    frame = leaderboard(view)
    rows = {row["name"]: row for row in frame[frame["kind"] == "model"].to_dict("records")}
    assert rows["strong"]["views"] == 2 and rows["middle"]["views"] == 3 and missing(rows["weak"]["views"])
    assert rows["weak"]["status"] == "not chosen (predict budget)" and rows["strong"]["status"] == "used"
    assert "views" in format_leaderboard(view, frame).splitlines()[0]
    board = {row[0]: row for row in Tables(page).headed("model")}  # the page's leaderboard
    assert Tables(page).tables[0][0][-1] == "views in the stack"
    assert board["strong"][-1] == "2" and board["weak"][-1] == "-"
