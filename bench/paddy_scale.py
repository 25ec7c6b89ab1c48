"""A Paddy-size rehearsal: the four stages on a Paddy Doctor-shaped set, timed per stage and per image.

    python bench/paddy_scale.py                       # CPU: 2k, 5k, 10k train images, 64 px, 1 epoch, k 2
    python bench/paddy_scale.py --gpu                 # one fold of examples/paddy.yaml's recipe, extrapolated
    python bench/paddy_scale.py --smoke [--gpu]       # a few hundred images, test_* models: checks the script

The data (`bench.photos.write_paddy_dataset`, the generator the duplicate bench hashes): 10,407 train
JPEGs of 480x640 in Paddy's ten imbalanced classes with a `variety` column, 3,469 test; photo-like fields
with a weak class cue (a colour cast and lesion-like spots). It is written once into --data and reused.

CPU mode takes the first 2k, 5k and 10k rows of train.csv (shuffled, so every class is in each) and a test
set a third of that size, and runs `stacker train-base`, `predict-oof`, `fit-stack` and `submit` as
subprocesses on each, with real timm architectures (resnet18 and convnext_nano by default, randomly
initialised: nothing is downloaded) and `variety` as a second target. Per stage it prints the wall
seconds, dataset images (train + test) per second, the peak RSS of the stage's largest process, and the
run directory's size after it; per size the cache's size, the cost per image of the four stages and its
ratio to the smallest size's (what stays flat is what scales), the models' training images/s and
the OOF and test accuracy.

GPU mode trains fold 0 of examples/paddy.yaml (convnext_small, random init, progressive resizing,
the freeze epoch, compile, TTA n 4) on the whole set with `--gpu-epochs` epochs per phase instead of the
recipe's, predicts that fold, and extrapolates the recipe's wall time per model (k folds, the recipe's
epochs: an epoch past a phase's first costs what the phase's last measured epoch did). It measures
the compute ceilings of `bench/throughput.py` (synthetic batches on the device, same model, batch and
precision, eager) at each phase's size and prints the train and TTA ratios against them.

Results go to <out>/paddy_scale.json (and <out>/paddy_gpu.json); stage logs under <out>/logs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from base_models.config import as_size  # noqa: E402
from bench.photos import PADDY_TEST, write_paddy_dataset  # noqa: E402
from oof import RunPaths, read_json  # noqa: E402

STAGES = ("train-base", "predict-oof", "fit-stack", "submit")
RECIPE = ROOT / "examples" / "paddy.yaml"
TEST_SHARE = PADDY_TEST / 10407  # Paddy's test set is a third of its train set
SMOKE_SCALE = 0.02  # 208 train and 69 test images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="train images per run (default: 2000 5000 10000)")
    p.add_argument("--models", nargs="+", help="timm architectures (default: resnet18 convnext_nano)")
    p.add_argument("--size", type=int, help="training and prediction side in px (default: 64)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--k", type=int, default=2, help="folds")
    p.add_argument("--tta", type=int, default=1, help="augmented views besides the plain one")
    p.add_argument("--batch", type=int, help="batch size (default: 64)")
    p.add_argument("--gpu", action="store_true", help="one fold of the Paddy recipe on CUDA, extrapolated")
    p.add_argument("--gpu-epochs", type=int, default=2, help="--gpu: epochs per phase (the recipe's: 6, 3, 3)")
    p.add_argument("--no-compile", action="store_true", help="--gpu: train eagerly (the recipe compiles)")
    p.add_argument("--device", default=None, help="train.device (default: cpu; --gpu: cuda)")
    p.add_argument("--smoke", action="store_true", help="a tiny set and test_* models: checks the script only")
    p.add_argument("--data", default=None, help="the Paddy-shaped set, written once (default: <out>/data)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out/paddy"), help="runs, logs and JSON")
    p.add_argument("--workers", type=int, default=None, help="processes writing the data (default: all cores)")
    args = p.parse_args(argv)
    # --smoke: a 278-image set and test_* models, every code path in a minute or two
    defaults = {"sizes": [100, 200], "models": ["test_resnet", "test_convnext"], "size": 32, "batch": 16} \
        if args.smoke else {"sizes": [2000, 5000, 10000], "models": ["resnet18", "convnext_nano"], "size": 64,
                            "batch": 64}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------- data and runs


def paddy_data(args) -> tuple[Path, float]:
    """The Paddy-shaped set (written unless --data holds it) and the seconds writing it took (0: reused)."""
    data = Path(args.data or Path(args.out) / "data")
    scale = SMOKE_SCALE if args.smoke else 1.0
    if (data / "sample_submission.csv").is_file():
        return data, 0.0
    t0 = time.perf_counter()
    print(f"writing the Paddy-shaped set into {data} (once) ...", flush=True)
    write_paddy_dataset(data, scale=scale, workers=args.workers)
    return data, time.perf_counter() - t0


def subset(full: Path, out: Path, n_train: int, n_test: int) -> Path:
    """A data folder of the first `n_train` train rows and `n_test` test ids of `full`, its image folders
    linked (train.csv lists, the sample submission orders: the other files are never read)."""
    out.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(full / "train.csv", dtype=str)
    sample = pd.read_csv(full / "sample_submission.csv", dtype=str)
    if n_train > len(train) or n_test > len(sample):
        raise SystemExit(f"{full}: {len(train)} train and {len(sample)} test images, fewer than the "
                         f"{n_train} and {n_test} asked for")
    train.head(n_train).to_csv(out / "train.csv", index=False)
    sample.head(n_test).to_csv(out / "sample_submission.csv", index=False)
    for folder in ("train_images", "test_images"):
        if not (out / folder).exists():
            (out / folder).symlink_to((full / folder).resolve(), target_is_directory=True)
    return out


def data_section(root: Path) -> dict:
    return {"root": str(root), "train_csv": "train.csv", "id_column": "image_id", "label_column": "label",
            "extra_targets": ["variety"], "sample_submission": "sample_submission.csv", "resize": "squish"}


def cpu_config(args, run: Path, data: Path) -> dict:
    """Every model at one size for `args.epochs`, random init (no `pretrained`), variety as a second head."""
    return {"run_dir": str(run), "data": data_section(data), "folds": {"k": args.k, "seed": 42},
            "train": {"size": args.size, "epochs": args.epochs, "batch_size": args.batch, "lr": 2e-3,
                      "lr_mult": 1, "freeze_epochs": 0, "device": args.device or "cpu",
                      "sampling": {"weights": "class_balanced", "power": 0.5}},
            "models": [{"arch": m} for m in args.models], "tta": {"n": args.tta}, "stack": {"metric": "accuracy"}}


def run_stage(argv: list[str], log: Path) -> dict:
    """Run `python cli.py *argv` to completion; its wall seconds and the peak RSS (MiB) of its largest process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *argv], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's usage: the largest of it and its waited-for children
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"stacker {argv[0]} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def test_accuracy(run: Path, full: Path) -> float:
    """The submission's accuracy against the labels the data writer kept aside."""
    sub = pd.read_csv(RunPaths(run).submission, dtype=str)
    truth = pd.read_csv(full / "test_labels.csv", dtype=str)
    merged = sub.merge(truth, on="image_id", suffixes=("", "_true"))
    return float((merged["label"] == merged["label_true"]).mean())


# ---------------------------------------------------------------- CPU: the four stages at three sizes


def cpu_bench(args, full: Path, out: Path) -> list[dict]:
    rows = []
    for n in args.sizes:
        n_test = max(2, round(n * TEST_SHARE))
        run, cfg = out / f"run_{n}", out / f"run_{n}.yaml"
        shutil.rmtree(run, ignore_errors=True)
        data = subset(full, out / f"data_{n}", n, n_test)
        cfg.write_text(yaml.safe_dump(cpu_config(args, run, data), sort_keys=False))
        stages = {}
        for stage in STAGES:
            where = ["--config", str(cfg)] if stage == "train-base" else ["--run", str(run)]
            stages[stage] = run_stage([stage, *where], out / "logs" / f"{n}_{stage}.log")
            stages[stage]["run_dir_mib"] = folder_bytes(run) / 2**20
            stages[stage]["images_per_s"] = (n + n_test) / stages[stage]["wall_s"]
            print(f"{n:>6} {stage:<12} {stages[stage]['wall_s']:7.1f} s", flush=True)
        paths = RunPaths(run)
        models = paths.predicted_models()
        train_rate = {m: float(np.mean([read_json(paths.history(m, k))["epochs"][-1]["images_per_second"]
                                        for k in range(args.k)])) for m in models}
        total = sum(s["wall_s"] for s in stages.values())
        rows.append({"n_train": n, "n_test": n_test, "stages": stages, "total_s": total,
                     "ms_per_image": 1000 * total / (n + n_test),
                     "cache_mib": folder_bytes(paths.cache) / 2**20, "train_images_per_s": train_rate,
                     "oof_accuracy": {m: read_json(paths.predict_metrics(m))["accuracy"] for m in models},
                     "test_accuracy": test_accuracy(run, full)})
    return rows


def print_cpu(rows: list[dict], args) -> None:
    print(f"\n{', '.join(args.models)} at {args.size} px, {args.epochs} epoch(s), k {args.k}, TTA n {args.tta}, "
          f"variety as a second target")
    print(f"{'train':>6} {'test':>5} {'stage':<12} {'wall s':>7} {'img/s':>7} {'peak RSS MiB':>13} {'run dir MiB':>12}")
    for r in rows:
        for stage, s in r["stages"].items():
            print(f"{r['n_train']:>6} {r['n_test']:>5} {stage:<12} {s['wall_s']:>7.1f} {s['images_per_s']:>7.1f} "
                  f"{s['peak_rss_mib']:>13.0f} {s['run_dir_mib']:>12.1f}")
    base = rows[0]["ms_per_image"]
    print(f"\n{'train':>6} {'total s':>8} {'ms/image':>9} {'vs first':>9} {'cache MiB':>10} {'test acc':>9}  "
          "train img/s; OOF accuracy per model")
    for r in rows:
        models = "; ".join(f"{m} {r['train_images_per_s'][m]:.0f} img/s, OOF {r['oof_accuracy'][m]:.3f}"
                           for m in r["train_images_per_s"])
        print(f"{r['n_train']:>6} {r['total_s']:>8.1f} {r['ms_per_image']:>9.1f} {r['ms_per_image'] / base:>9.2f} "
              f"{r['cache_mib']:>10.1f} {r['test_accuracy']:>9.3f}  {models}")


# ---------------------------------------------------------------- GPU: one fold of the recipe, extrapolated


def recipe_config(args, run: Path, data: Path) -> tuple[dict, dict]:
    """examples/paddy.yaml for this machine: random init, `--gpu-epochs` per phase; and the recipe itself."""
    recipe = yaml.safe_load(RECIPE.read_text())
    cfg = json.loads(json.dumps(recipe))  # a deep copy
    model = cfg["models"][0]
    model.pop("pretrained", None)  # random init: the same architecture and speed, nothing to download
    train = cfg["train"]
    train["phases"] = [{**p, "epochs": args.gpu_epochs} for p in train["phases"]]
    train["device"] = args.device or "cuda"
    if args.no_compile:
        train["compile"] = False
    if args.smoke:  # a test model at a quarter of the sizes: the same phases, freeze epoch and TTA
        model["arch"] = "test_convnext"
        train["phases"] = [{**p, "size": ([s // 4 for s in p["size"]] if isinstance(p["size"], list)
                                          else p["size"] // 4)} for p in train["phases"]]
        train["batch_size"] = 16
    cfg.update(run_dir=str(run), data={**cfg["data"], **data_section(data)})
    return cfg, recipe


def ceilings(arch: str, phases: list, tta: int, batch: int, device: str, amp: str, steps: int) -> dict:
    """bench/throughput.py's ceilings, eager, at each phase's size and the precision the job trained at:
    AdamW steps and (1 + tta)-view inference on synthetic batches already on the device (images/s)."""
    import torch

    from bench.throughput import infer_ceiling, train_ceiling

    dev = torch.device(device)
    spec = SimpleNamespace(model=arch, batch=batch, steps=steps, tta=tta)
    return {"x".join(map(str, size)): {"train": train_ceiling(spec, dev, hw=size, amp=amp),
                                       "infer": infer_ceiling(spec, dev, hw=size, amp=amp)}
            for size in (as_size(p["size"], "phases.size") for p in phases)}


def gpu_rehearsal(args, full: Path, out: Path) -> dict:
    run, cfg_file = out / "run_recipe", out / "run_recipe.yaml"
    shutil.rmtree(run, ignore_errors=True)
    cfg, recipe = recipe_config(args, run, full)
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    name = cfg["models"][0].get("name", cfg["models"][0]["arch"])
    only = ["--only", f"{name}:0"]
    train = run_stage(["train-base", "--config", str(cfg_file), *only], out / "logs" / "recipe_train-base.log")
    predict = run_stage(["predict-oof", "--run", str(run), *only], out / "logs" / "recipe_predict-oof.log")
    paths = RunPaths(run)
    history = read_json(paths.history(name, 0))
    k = cfg["folds"]["k"]
    n_train = len(pd.read_csv(full / "train.csv"))
    n_test = len(pd.read_csv(full / "sample_submission.csv"))
    n_valid = round(n_train / k)
    recipe_train = recipe["train"]
    tta = cfg["tta"]["n"]
    ceiling = ceilings(cfg["models"][0]["arch"], cfg["train"]["phases"], tta, cfg["train"]["batch_size"],
                       cfg["train"]["device"], history["amp"], steps=5 if args.smoke else 20)
    rows = extrapolate(history["epochs"], recipe_train["phases"], recipe_train.get("freeze_epochs", 0))
    for row in rows:
        row["train_ceiling"] = ceiling.get(row["size"], {}).get("train")
    fold_s = history["seconds"]["setup"] + sum(r["recipe_s_per_fold"] for r in rows)
    last_size = "x".join(map(str, as_size(cfg["train"]["phases"][-1]["size"], "phases.size")))
    views_per_s = (n_valid + n_test) * (1 + tta) / predict["wall_s"]
    infer = ceiling.get(last_size, {}).get("infer")
    result = {"device": history.get("device_name"), "amp": history.get("amp"), "arch": cfg["models"][0]["arch"],
              "k": k, "n_train": n_train, "n_test": n_test, "train_base_s": train["wall_s"],
              "predict_oof_fold_s": predict["wall_s"], "groups": rows, "ceilings": ceiling,
              "tta_images_per_s": views_per_s / (1 + tta), "tta_ceiling": infer,
              "recipe_train_s_per_fold": fold_s,
              "recipe_s_per_model": k * (fold_s + predict["wall_s"]) + (train["wall_s"] - history_total(history)),
              "peak_rss_mib": max(train["peak_rss_mib"], predict["peak_rss_mib"])}
    return result


def extrapolate(epochs: list[dict], recipe_phases: list[dict], freeze_epochs: int) -> list[dict]:
    """The recipe's training seconds per fold from a shortened run's history, per group of epochs (the
    freeze epochs, then each phase): the group's first measured epoch (compile and cuDNN autotuning
    included) once, and its last measured epoch for each further epoch the recipe trains.

    Args:
        epochs: the history's epoch records (`phase`, `frozen`, `size`, `seconds`, `images_per_second`).
        recipe_phases: the recipe's phases (their `epochs` are what is extrapolated to).
        freeze_epochs: the recipe's frozen epochs at the first phase's size.
    """
    groups = [("freeze", 0, True, freeze_epochs)]
    groups += [(f"phase {i}", i, False, p["epochs"]) for i, p in enumerate(recipe_phases)]
    rows = []
    for label, phase, frozen, recipe_epochs in groups:
        got = [e for e in epochs if e["phase"] == phase and bool(e["frozen"]) == frozen]
        if frozen and not got and recipe_epochs:
            # a random-init model is not fine-tuned, so it trains no frozen epoch; the recipe's pretrained
            # one does: counted as phase 0's warm epoch, an upper bound (its backward stops at the heads)
            got = [e for e in epochs if e["phase"] == 0 and not e["frozen"]][-1:]
            label = "freeze (as phase 0)"
        if not got or recipe_epochs == 0:
            continue
        first, warm = got[0], got[-1]
        size = f"{warm['size'][0]}x{warm['size'][1]}"
        rows.append({"group": f"{label} {size}", "size": size, "measured_epochs": len(got),
                     "recipe_epochs": recipe_epochs, "first_epoch_s": first["seconds"],
                     "warm_epoch_s": warm["seconds"], "train_images_per_s": warm["images_per_second"],
                     "recipe_s_per_fold": first["seconds"] + (recipe_epochs - 1) * warm["seconds"]})
    return rows


def history_total(history: dict) -> float:
    """Seconds inside the job (setup, epochs, save): train-base's wall minus this is the stage's own share
    (start, decoding the cache, folds), paid once per run."""
    return float(sum(history["seconds"].values()))


def print_gpu(r: dict) -> None:
    print(f"\nthe Paddy recipe, fold 0 of {r['k']}: {r['arch']} on {r['device']} ({r['amp']}), "
          f"{r['n_train']} train / {r['n_test']} test images")
    print(f"{'group':<22} {'epochs':>6} {'recipe':>6} {'first s':>8} {'warm s':>7} {'img/s':>7} {'ceiling':>8} "
          f"{'ratio':>6} {'recipe s':>9}")
    for g in r["groups"]:
        ceil = g["train_ceiling"]
        ratio = f"{g['train_images_per_s'] / ceil:>6.2f}" if ceil else f"{'-':>6}"
        print(f"{g['group']:<22} {g['measured_epochs']:>6} {g['recipe_epochs']:>6} {g['first_epoch_s']:>8.1f} "
              f"{g['warm_epoch_s']:>7.1f} {g['train_images_per_s']:>7.0f} {(ceil or 0):>8.0f} {ratio} "
              f"{g['recipe_s_per_fold']:>9.1f}")
    tta_ratio = r["tta_images_per_s"] / r["tta_ceiling"] if r["tta_ceiling"] else float("nan")
    print(f"TTA: {r['tta_images_per_s']:.0f} images/s over predict-oof's fold (process start included), ceiling "
          f"{r['tta_ceiling'] or 0:.0f}, ratio {tta_ratio:.2f}")
    print(f"recipe per model, extrapolated: {r['recipe_s_per_model'] / 60:.1f} min ({r['k']} folds of "
          f"{r['recipe_train_s_per_fold']:.0f} s training + {r['predict_oof_fold_s']:.0f} s prediction); "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB")


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    full, write_s = paddy_data(args)
    if write_s:
        n = len(pd.read_csv(full / "train.csv")) + len(pd.read_csv(full / "sample_submission.csv"))
        print(f"data: {n} JPEGs written in {write_s:.0f} s ({n / write_s:.0f}/s)", flush=True)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d")}
    if args.gpu:
        result = {"machine": machine, "data_write_s": write_s, **gpu_rehearsal(args, full, out)}
        (out / "paddy_gpu.json").write_text(json.dumps(result, indent=2))
        print_gpu(result)
        return result
    result = {"machine": machine, "args": vars(args), "data_write_s": write_s, "runs": cpu_bench(args, full, out)}
    (out / "paddy_scale.json").write_text(json.dumps(result, indent=2))
    print_cpu(result["runs"], args)
    return result


if __name__ == "__main__":
    main()
