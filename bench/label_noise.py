"""Bench: how many planted label errors `stacker audit` finds, and what leaving its list out buys.

    python bench/label_noise.py [--out /tmp/label_noise] [--noise 0.05] [--seed 0] [--oracle] [--clean]

The demo's dataset (`base_models.demo_data.write_digits_dataset`, 32 px digits) is written into
OUT/data and `--noise` of its train labels are flipped (a numpy Generator seeded with `--seed`; each
flipped row gets a class drawn uniformly from the other classes): the PNG moves to the noisy label's
folder and train.csv is rewritten to match. OUT/flipped.csv lists the flipped rows (id, true_label,
noisy_label); its id column is what `data.exclude` reads. The test images and test_labels.csv are
the demo's own.

The demo's config (`base_models.demo.demo_config`) runs on the noisy data in OUT/noisy: train-base,
predict-oof, fit-stack and submit, each an installed `stacker` subprocess (HF_HUB_OFFLINE=1, its
output in OUT/logs/), then `stacker audit`. With the flipped rows as the positives it measures four
rankings and flag sets over the train rows:

    stacker audit                  `label_quality` (every model) ranks, `flag_issues` on the ensemble flags
                                   (the rows of audit/label_issues.csv)
    stacker audit, best model      the same functions on the model with the best OOF accuracy alone
    cleanlab defaults, mean        `find_label_issues(labels, pred_probs)` and `get_label_quality_scores`
                                   with cleanlab's defaults, on the mean of every model's OOF
    cleanlab defaults, best model  the same on the best model's OOF

and prints for each: precision at k = the number flipped (equal to recall at k), precision and
recall at the number flagged, the number flagged, and the AUROC of the label-quality score (low
quality = positive).

The demo then trains again with `data.exclude: OUT/noisy/audit/label_issues.csv` in OUT/cleaned;
`--oracle` adds a run excluding exactly the flipped rows (OUT/oracle), `--clean` the demo on the
unflipped dataset (OUT/clean_data, OUT/clean). Each run's submission is scored against
test_labels.csv as `base_models.demo.finish_demo` scores it.

A run whose stages finished is recorded in OUT/results/<run>.json and read from there by a later
invocation with the same --out (its seconds are those of the invocation that made it); delete OUT
to measure afresh. The figures, one markdown table with the machine, the date and the command, are
printed and written to OUT/label_noise.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from base_models.demo import demo_config  # noqa: E402
from base_models.demo_data import write_digits_dataset  # noqa: E402
from oof import RunPaths, file_digest, read_json, write_json, write_text  # noqa: E402

STAGES = ("train-base", "predict-oof", "fit-stack", "submit")
RUN_COLUMNS = ["train rows", "excluded (flipped)", "test accuracy", *(f"{s} s" for s in (*STAGES, "audit"))]
DETECTION_COLUMNS = ["P@k = R@k", "flagged", "precision", "recall", "AUROC"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/label_noise"), help="working folder (default %(default)s)")
    p.add_argument("--noise", type=float, default=0.05, help="share of train labels flipped (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the flips (default %(default)s)")
    p.add_argument("--oracle", action="store_true", help="also train excluding exactly the flipped rows")
    p.add_argument("--clean", action="store_true", help="also run the demo on the unflipped dataset")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the noisy dataset

def flip_plan(train: pd.DataFrame, noise: float, seed: int) -> pd.DataFrame:
    """The rows to flip (id, true_label, noisy_label): round(noise x rows) rows drawn without replacement,
    each given a class drawn uniformly from the classes other than its own."""
    rng = np.random.default_rng(seed)
    classes = np.array(sorted(train["label"].unique()))
    rows = np.sort(rng.choice(len(train), size=int(round(noise * len(train))), replace=False))
    true = train["label"].to_numpy()[rows]
    noisy = [rng.choice(classes[classes != t]) for t in true]
    return pd.DataFrame({"id": train["image_id"].to_numpy()[rows], "true_label": true, "noisy_label": noisy})


def write_noisy_dataset(out: Path, noise: float, seed: int) -> pd.DataFrame:
    """OUT/data with the flips applied and OUT/flipped.csv (written last: it marks the flips done); the
    flips of an earlier invocation when they were made with the same noise and seed."""
    data, flipped_csv, made = out / "data", out / "flipped.csv", out / "flips.json"
    if flipped_csv.is_file():
        recorded = read_json(made)
        if recorded != {"noise": noise, "seed": seed}:
            sys.exit(f"{out} holds flips made with {recorded}, not noise {noise} seed {seed}: use another --out")
        return pd.read_csv(flipped_csv, dtype=str)
    write_digits_dataset(data)  # the demo's dataset, as base_models.demo.prepare_demo writes it
    train = pd.read_csv(data / "train.csv", dtype=str)
    plan = flip_plan(train, noise, seed)
    images = data / "train_images"
    for image_id, true, noisy in plan.itertuples(index=False):
        (images / noisy).mkdir(exist_ok=True)
        os.replace(images / true / image_id, images / noisy / image_id)
    train["label"] = train["image_id"].map(dict(zip(plan["id"], plan["noisy_label"]))).fillna(train["label"])
    write_text(data / "train.csv", train.to_csv(index=False))
    write_json(made, {"noise": noise, "seed": seed})
    write_text(flipped_csv, plan.to_csv(index=False))
    return plan


# ---------------------------------------------------------------- runs

@dataclasses.dataclass
class Run:
    """One demo run of the bench: its name (also its folder under OUT), dataset and excluded-ids file."""

    name: str
    data: Path
    exclude: Path | None = None

    def config(self, out: Path) -> Path:
        """OUT/<name>.yaml: the demo's config pointed at this run's data and folder."""
        cfg = demo_config(out)
        cfg["run_dir"] = str(out / self.name)
        cfg["data"]["root"] = str(self.data)
        if self.exclude is not None:
            cfg["data"]["exclude"] = str(self.exclude)
        path = out / f"{self.name}.yaml"
        write_text(path, yaml.safe_dump(cfg, sort_keys=False))
        return path


def stacker(stage: str, args: list, log: Path) -> float:
    """Seconds of one `stacker STAGE ARGS` subprocess, its output in `log`; exits with the log's tail on
    failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["stacker", stage, *args], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"stacker {stage} {' '.join(map(str, args))}: exit {rc} after {seconds:.0f} s; {log}:\n{tail}")
    return seconds


def has_audit_command() -> bool:
    return subprocess.run(["stacker", "audit", "--help"], capture_output=True).returncode == 0


def audit(run_dir: Path, log: Path) -> float:
    """Seconds of `stacker audit --run RUN` (`stacker.audit_html.run_audit` in this process where the
    installed command has no audit)."""
    if has_audit_command():
        return stacker("audit", ["--run", str(run_dir)], log)
    from stacker.audit_html import run_audit

    start = time.perf_counter()
    run_audit(run_dir)
    return time.perf_counter() - start


def submission_accuracy(submission: Path, test_labels: Path) -> float:
    """The submission's accuracy against the kept test labels (`base_models.demo.finish_demo`'s score)."""
    sub = pd.read_csv(submission, dtype=str)
    truth = pd.read_csv(test_labels, dtype=str)
    merged = sub.merge(truth, on="image_id", suffixes=("", "_true"))
    return float((merged["label"] == merged["label_true"]).mean())


def run_demo(out: Path, run: Run, flipped: set, with_audit: bool = False) -> dict:
    """The run's figures: train rows, excluded rows (flipped among them), test accuracy, seconds per stage;
    read from OUT/results/<name>.json when an earlier invocation finished the run."""
    record = (out / "results" / run.name).with_suffix(".json")
    listed = file_digest(run.exclude) if run.exclude is not None else None
    if record.is_file() and RunPaths(out / run.name).submission.is_file() \
            and read_json(record).get("exclude_sha256") == listed:  # a run made from the same exclude list
        result = read_json(record)
        if with_audit:
            result["seconds"]["audit"] = audit(out / run.name, out / "logs" / run.name / "audit.log")
        return {**result, "reused": True}
    if record.is_file():  # finished from another exclude list: the bench's own run, made again (else resumed)
        shutil.rmtree(out / run.name, ignore_errors=True)
    config, logs = run.config(out), out / "logs" / run.name
    seconds = {stage: stacker(stage, ["--config", str(config)], logs / f"{stage}.log") for stage in STAGES}
    if with_audit:
        seconds["audit"] = audit(out / run.name, logs / "audit.log")
    from stacker.inputs import load_run_folds

    ids = {str(i) for i in load_run_folds(RunPaths(out / run.name)).ids}
    excluded = [i for i in _train_ids(run.data) if i not in ids]
    result = {"train_rows": len(ids), "excluded": len(excluded), "excluded_flipped": len(flipped & set(excluded)),
              "test_accuracy": submission_accuracy(RunPaths(out / run.name).submission, run.data / "test_labels.csv"),
              "seconds": seconds, "date": datetime.date.today().isoformat(), "exclude_sha256": listed}
    write_json(record, result)
    return {**result, "reused": False}


def _train_ids(data: Path) -> list[str]:
    return pd.read_csv(data / "train.csv", dtype=str)["image_id"].tolist()


def exclude_supported() -> bool:
    """Whether this checkout's `data:` section has the `exclude` key (`base_models.config.DataConfig`)."""
    from base_models.config import DataConfig

    return "exclude" in {f.name for f in dataclasses.fields(DataConfig)} and "exclude" in DataConfig.RULES


# ---------------------------------------------------------------- detection

def detection(positive: np.ndarray, quality: np.ndarray, flagged: np.ndarray) -> dict:
    """Figures of one ranking (`quality`, low = likely wrong) and flag set (bool) against the positives."""
    from sklearn.metrics import roc_auc_score

    k = int(positive.sum())
    ranked = np.argsort(quality, kind="stable")
    n_flagged = int(flagged.sum())
    hits = int(positive[flagged].sum())
    return {"P@k = R@k": positive[ranked[:k]].mean(), "flagged": n_flagged,
            "precision": hits / n_flagged if n_flagged else float("nan"), "recall": hits / k,
            "AUROC": roc_auc_score(positive, -quality)}


def best_model(rows) -> str:
    """The model whose (repeat-averaged) OOF argmax matches the given labels most often."""
    return max(rows.models, key=lambda m: (np.mean(rows.models[m].argmax(axis=1) == rows.y), m))


def cleanlab_defaults(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(quality, flagged) with cleanlab's defaults: `get_label_quality_scores` and `find_label_issues`
    (its default filter_by; the indices ranked by self-confidence)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from stacker.audit import normalised

    p = normalised(proba)
    flagged = np.zeros(len(y), dtype=bool)
    flagged[find_label_issues(y, p, return_indices_ranked_by="self_confidence")] = True
    return get_label_quality_scores(y, p), flagged


def measure(run_dir: Path, flipped_ids: set) -> tuple[list, dict]:
    """[(ranking, figures)] of the four rankings on the noisy run, and facts about them."""
    from stacker.audit import AuditRows, audit_rows, flag_issues, label_quality
    from stacker.leaderboard import read_run

    rows = audit_rows(read_run(run_dir))
    positive = np.array([str(i) in flipped_ids for i in rows.ids])
    best = best_model(rows)
    alone = AuditRows(rows.ids, rows.y, rows.classes, {best: rows.models[best]}, rows.models[best], best)
    flagged = flag_issues(rows.y, rows.ensemble)
    listed = set(pd.read_csv(RunPaths(run_dir).audit_label_issues, dtype=str)["id"])
    mean = np.mean(list(rows.models.values()), axis=0)
    figures = [("stacker audit", detection(positive, label_quality(rows), flagged)),
               (f"stacker audit, best model ({best})",
                detection(positive, label_quality(alone), flag_issues(alone.y, alone.ensemble))),
               ("cleanlab defaults, mean of every model's OOF", detection(positive, *cleanlab_defaults(rows.y, mean))),
               (f"cleanlab defaults, best model ({best})",
                detection(positive, *cleanlab_defaults(rows.y, rows.models[best])))]
    facts = {"rows": len(rows.y), "flipped": int(positive.sum()), "ensemble": rows.ensemble_label,
             "csv_matches": listed == {str(i) for i in rows.ids[flagged]},
             "best_accuracy": float(np.mean(rows.models[best].argmax(axis=1) == rows.y))}
    return figures, facts


# ---------------------------------------------------------------- the table

def fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def run_row(name: str, result: dict | None, note: str = "") -> list:
    """One run's cells under RUN_COLUMNS; `note` in its first cell when the run was not made."""
    if result is None:
        return [name, *[""] * len(DETECTION_COLUMNS), note, *[""] * (len(RUN_COLUMNS) - 1)]
    seconds = result["seconds"]
    label = f"{name} (made {result['date']} by an earlier invocation)" if result["reused"] else name
    cells = [result["train_rows"], f"{result['excluded']} ({result['excluded_flipped']})",
             fmt(result["test_accuracy"]), *(f"{seconds[s]:.0f}" if s in seconds else "" for s in (*STAGES, "audit"))]
    return [label, *[""] * len(DETECTION_COLUMNS), *cells]


def markdown(header: list[str], figures: list, runs: list) -> str:
    """The caption lines, then one table: a row per ranking (detection columns), a row per run."""
    columns = ["ranking / run", *DETECTION_COLUMNS, *RUN_COLUMNS]
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, fig in figures:
        lines.append("| " + " | ".join([name, *(fmt(fig[c]) for c in DETECTION_COLUMNS), *[""] * len(RUN_COLUMNS)])
                     + " |")
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in runs]
    return "\n".join(lines) + "\n"


def caption(args, facts: dict, measured_s: float) -> list[str]:
    command = "python bench/label_noise.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return [f"label noise, {datetime.date.today().isoformat()}, {platform.platform()} "
            f"({platform.processor() or platform.machine()}), {os.cpu_count()} cores; `{command.strip()}`",
            f"noisy run: {facts['flipped']} of {facts['rows']} train labels flipped ({args.noise:.0%}, seed "
            f"{args.seed}); positives = the flipped ids, k = {facts['flipped']}; the audit's ensemble: "
            f"{facts['ensemble']}; best model's OOF accuracy on the noisy labels {facts['best_accuracy']:.3f}; "
            f"audit/label_issues.csv {'matches' if facts['csv_matches'] else 'DIFFERS FROM'} `flag_issues` on "
            f"the ensemble; the four rankings measured in {measured_s:.1f} s. Test accuracy against "
            "test_labels.csv; excluded (flipped) = train rows left out of the run's folds (flipped among them)."]


# ---------------------------------------------------------------- main

def main(argv=None) -> str:
    args = parse_args(argv)
    out = args.out.resolve()
    plan = write_noisy_dataset(out, args.noise, args.seed)
    flipped = set(plan["id"])
    runs = [("noisy", run_demo(out, Run("noisy", out / "data"), flipped, with_audit=True))]
    start = time.perf_counter()
    figures, facts = measure(out / "noisy", flipped)
    measured_s = time.perf_counter() - start
    rows = [run_row("noisy", runs[0][1])]
    issues = out / "lists" / "cleaned_exclude.csv"  # a copy: every audit of the noisy run rewrites its own
    issues.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RunPaths(out / "noisy").audit_label_issues, issues)
    extra = [("cleaned (data.exclude: a copy of noisy/audit/label_issues.csv)", Run("cleaned", out / "data", issues))]
    if args.oracle:
        extra.append(("oracle (data.exclude: flipped.csv)", Run("oracle", out / "data", out / "flipped.csv")))
    for name, run in extra:
        if exclude_supported():
            rows.append(run_row(name, run_demo(out, run, flipped)))
        else:
            rows.append(run_row(name, None, "not run: this checkout's DataConfig has no data.exclude"))
    if args.clean:
        write_digits_dataset(out / "clean_data")
        rows.append(run_row("clean (no flips)", run_demo(out, Run("clean", out / "clean_data"), set())))
    table = markdown(caption(args, facts, measured_s), figures, rows)
    write_text(out / "label_noise.md", table)
    print(table)
    return table


if __name__ == "__main__":
    main()
