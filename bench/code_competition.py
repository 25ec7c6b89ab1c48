"""Bench: an inference budget and full-data refits, measured on the demo and on a harder image set.

    python bench/code_competition.py [--out /tmp/code_competition] [--sets demo,hard] [--seeds 0,1]

Per image set and seed, one run made by installed `stacker` subprocesses (HF_HUB_OFFLINE=1, output in
OUT/<set>_<seed>/logs/): the demo's config (`base_models.demo.demo_config`, folds seeded by the seed)
on its dataset, train-base, then train-base --full and predict-oof. "demo" is the demo's 32 px digits
with its 12 epochs; "hard" the same recipe stopped after 3 epochs (test_convnext needs 32 px, so the
set is made harder by training less: the models are weaker and disagree more). Then fit-stack again for each variant, and its stack/test.parquet scored against the
kept test labels:

    no budget                 every model at every view (stack.test_models folds)
    budget 1/2, 1/4           stack.predict_budget at that share of the whole ensemble's predicted seconds
    test_models full, both    the stack applied to the full fits, and to the fold models and full fits
    mean only, folds / full   the plain mean alone (stack.candidates: [mean]) on the fold models, on the
                              full fits: like for like, since full fits leave the meta-models out

Each line gives the guard's choice, the units stacked, the predicted seconds, the nested estimate and
the test accuracy. The figures, one markdown table per set with the machine, the date and the command,
are printed and written to OUT/code_competition.md.

`--predict-times` (after a run of the demo set) times `stacker predict` on 1,200 new digits through the
demo_0 run's stack with no budget, half and a quarter of the whole ensemble's predicted seconds:
predicted against measured seconds, three runs each (`predict_times`), into OUT/predict_times.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

SETS = {"demo": {"size": 32, "epochs": 12}, "hard": {"size": 32, "epochs": 3}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/code_competition")
    p.add_argument("--sets", default="demo,hard")
    p.add_argument("--seeds", default="0")
    p.add_argument("--predict-times", action="store_true",
                   help="only time stacker predict on 1,200 new images through the demo_0 run's stacks")
    return p.parse_args(argv)


def stacker(*args, log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, "-m", "stacker_cli", *map(str, args)], stdout=f, stderr=f, env=env)
    if done.returncode:
        raise SystemExit(f"stacker {' '.join(map(str, args))} failed; see {log}")


def make_run(out: Path, name: str, seed: int) -> Path:
    """The set's run trained (folds and full fits) and predicted; returns its config."""
    from base_models.demo import demo_config
    from base_models.demo_data import write_digits_dataset

    root = out / f"{name}_{seed}"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    data = write_digits_dataset(out / f"data_{name}", size=SETS[name]["size"])
    config = demo_config(root)
    config["data"]["root"] = str(data)
    config["folds"]["seed"] = seed
    config["train"].update(size=SETS[name]["size"], epochs=SETS[name]["epochs"], seed=seed)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = root / "logs" / "stages.log"
    for args in (("train-base", "--config", path), ("train-base", "--config", path, "--full"),
                 ("predict-oof", "--config", path)):
        stacker(*args, log=log)
    return path


def score(run: Path, data: Path) -> float:
    table = pd.read_parquet(run / "stack" / "test.parquet")
    truth = pd.read_csv(data / "test_labels.csv", dtype=str).set_index("image_id")["label"]
    classes = [c for c in table.columns if c != "id"]
    predicted = np.asarray(classes)[table[classes].to_numpy().argmax(axis=1)]
    return float((predicted == truth.loc[table["id"]].to_numpy()).mean())


def variant(config: Path, sets: list[str], log: Path) -> dict:
    stacker("fit-stack", "--config", config, "--force", *[a for s in sets for a in ("--set", s)], log=log)
    run = Path(yaml.safe_load(config.read_text())["run_dir"])
    decision = json.loads((run / "stack" / "decision.json").read_text())
    predict = decision.get("predict") or {}
    return {"chosen": decision["chosen"], "units": ", ".join(u["name"] for u in predict.get("units", [])),
            "predicted_seconds": predict.get("seconds"), "ensemble_seconds": predict.get("ensemble_seconds"),
            "nested": (decision.get("nested") or {}).get("score"),
            "test_side": decision["test_side"]["models"],
            "test_accuracy": score(run, Path(yaml.safe_load(config.read_text())["data"]["root"]))}


def measure(out: Path, name: str, seed: int) -> list[dict]:
    """The set's variants on one seed; kept in OUT/<set>_<seed>/result.json, read back by a later call."""
    saved = out / f"{name}_{seed}" / "result.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    config = make_run(out, name, seed)
    log = config.parent / "logs" / "fit-stack.log"
    rows = [{"variant": "no budget", **variant(config, [], log)}]
    whole = rows[0]["ensemble_seconds"]
    for share in (0.5, 0.25):
        rows.append({"variant": f"budget {share:g} x", **variant(config, [f"stack.predict_budget={share * whole}"], log)})
    for models in ("full", "both"):
        rows.append({"variant": f"test_models {models}", **variant(config, [f"stack.test_models={models}"], log)})
    for models in ("folds", "full"):  # like for like: the plain mean either way (full fits leave meta-models out)
        rows.append({"variant": f"mean only, {models}",
                     **variant(config, [f"stack.test_models={models}", "stack.candidates=[mean]"], log)})
    rows = [{"set": name, "seed": seed, **row} for row in rows]
    saved.write_text(json.dumps(rows))
    return rows


def markdown(frame: pd.DataFrame) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def predict_times(out: Path, config: Path, images: int = 1200, runs: int = 3) -> list[dict]:
    """`stacker predict` on `images` new digits through the stack chosen with no budget, half and a quarter of
    the whole ensemble's predicted seconds for that many images: predicted seconds (its log line) against
    measured (from the first model's start to the stack's line in OUT/logs/predict.log), `runs` times each,
    the decoded cache kept between runs."""
    from base_models.demo_data import write_digits_dataset

    data = write_digits_dataset(out / "predict_data", size=32, test_fraction=images / 1797)
    n = len(list((data / "test_images").iterdir()))
    log, rows = config.parent / "logs" / "predict_times.log", []
    whole = None
    for share in (None, 0.5, 0.25):
        sets = [f"stack.predict_rows={n}"] + ([f"stack.predict_budget={share * whole}"] if share else [])
        stacker("fit-stack", "--config", config, "--force", *[a for s in sets for a in ("--set", s)], log=log)
        run = Path(yaml.safe_load(config.read_text())["run_dir"])
        decision = json.loads((run / "stack" / "decision.json").read_text())
        whole = whole or decision["predict"]["ensemble_seconds"]
        measured = []
        for _ in range(runs):
            target = out / "predict_out"
            for part in ("preds", "stack", "logs"):
                subprocess.run(["rm", "-rf", str(target / part)], check=True)
            stacker("predict", "--run", run, "--images", data / "test_images", "--sample-submission",
                    data / "sample_submission.csv", "--out", target, "--force", log=log)
            measured.append(_logged_seconds(target / "logs" / "predict.log"))
        rows.append({"budget": "none" if share is None else f"{share:g} x", "images": n,
                     "units": ", ".join(u["name"] for u in decision["predict"]["units"]),
                     "predicted_seconds": decision["predict"]["seconds"],
                     "measured_seconds": ", ".join(f"{m:.2f}" for m in measured),
                     "ratio": float(np.median(measured)) / decision["predict"]["seconds"]})
    return rows


def _logged_seconds(log: Path) -> float:
    """Seconds from the first model's line ("N of M fold models to run") to the stack's line of a predict log."""
    stamps = [(datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), line) for line in
              log.read_text().splitlines() if line[:4].isdigit()]
    start = next(t for t, line in stamps if "fold models to run" in line)
    end = next(t for t, line in stamps if "predict: stack " in line)
    return (end - start).total_seconds()


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.predict_times:
        text = markdown(pd.DataFrame(predict_times(out, out / "demo_0" / "run.yaml")))
        (out / "predict_times.md").write_text(text + "\n")
        print(text)
        return
    rows = [row for name in args.sets.split(",") for seed in map(int, args.seeds.split(","))
            for row in measure(out, name, seed)]
    frame = pd.DataFrame(rows)
    head = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"`python bench/code_competition.py --sets {args.sets} --seeds {args.seeds}`\n\n")
    text = head + markdown(frame)
    (out / "code_competition.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
