"""Scaling of train-base's (model, fold) grid over workers: the local engine and Ray, 1 and N workers.

    python bench/scale.py                      # CPU: 2 test models x 3 folds, 16 px, 1 and 2 workers
    python bench/scale.py --gpus --models resnet18 convnext_nano --size 128 --epochs 3 --images 4000
    CUDA_VISIBLE_DEVICES=0 python bench/scale.py --gpus ...   # the same on one GPU: the 1-worker baseline

Rows: jobs per minute of the stage (cluster start excluded), scaling efficiency against the same
engine with 1 worker (ideal: the worker count), and the per-job overhead the engine adds: a worker's
time per job (stage wall x workers / jobs) minus the mean time inside `train_fold` (its history's
clock). That overhead is process start and imports, scheduling, placing the cache and the model check.
On CPU every job gets one thread (OMP_NUM_THREADS=1), so the workers do not fight over cores.
A row whose run raises prints one line (engine, workers, error) and the others still run; the Ray rows
are skipped with a line where `import ray` fails; the table always shows the rows that ran.
Nothing is downloaded: test_* models are randomly initialised.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from base_models.config import DataConfig, EngineConfig, FoldsConfig, model_specs  # noqa: E402
from base_models.demo_data import write_digits_dataset  # noqa: E402
from base_models.engines import ENGINES  # noqa: E402
from base_models.jobs import StageOptions, job_grid, prepare_run, train_base  # noqa: E402
from oof import RunPaths, read_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["test_resnet", "test_efficientnet"])
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--gpus", action="store_true", help="train on CUDA, one worker per visible GPU")
    p.add_argument("--out", default=None, help="folder for the dataset and runs (default: a temporary one)")
    return p.parse_args(argv)


def worker_counts(gpus: bool) -> list[int]:
    """1 and 2 workers on CPU; on CUDA both engines use every visible GPU (CUDA_VISIBLE_DEVICES picks them)."""
    if not gpus:
        return [1, 2]
    import torch

    return [torch.cuda.device_count()]


def run_grid(out: Path, args, engine: str, workers: int) -> dict:
    """Train the grid from scratch with `engine` and `workers`; its wall time and mean train_fold time."""
    paths = RunPaths(out / f"run-{engine}-{workers}")
    data = DataConfig(root=str(out / "data"))
    train = {"size": args.size, "epochs": args.epochs, "batch_size": 32, "lr": 3e-3,
             "device": "cuda" if args.gpus else "cpu"}
    specs = model_specs([{"arch": m} for m in args.models], train)
    _, folds = prepare_run(paths, data, FoldsConfig(k=args.folds), (args.size, args.size), log=lambda s: None)
    if engine == "ray":
        start_ray(workers, args.gpus)
    t0 = time.perf_counter()
    train_base(paths, specs, folds, options=StageOptions(parallel=workers, engine=EngineConfig(name=engine),
                                                         log=lambda s: None))
    wall = time.perf_counter() - t0
    jobs = job_grid(specs, folds.k)
    inside = [sum(read_json(paths.history(j.model.name, j.fold))["seconds"].values()) for j in jobs]
    return {"engine": engine, "workers": workers, "jobs": len(jobs), "wall": wall,
            "train_fold": sum(inside) / len(inside)}


def start_ray(workers: int, gpus: bool) -> None:
    """A fresh local cluster of `workers` CPUs (GPUs: all), its start timed apart from the stage."""
    import ray

    ray.shutdown()
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             **({} if gpus else {"num_gpus": 0}))
    print(f"ray: local cluster of {workers} CPUs started in {time.perf_counter() - t0:.1f}s", flush=True)


def print_table(rows: list[dict]) -> None:
    print(f"{'engine':<7} {'workers':>7} {'jobs':>5} {'wall s':>7} {'jobs/min':>9} {'efficiency':>10} "
          f"{'train_fold s':>12} {'overhead s/job':>14}")
    base = {r["engine"]: r["wall"] for r in rows if r["workers"] == 1}
    for r in rows:
        per_min = 60 * r["jobs"] / r["wall"]
        efficiency = base[r["engine"]] / r["wall"] if r["engine"] in base else float("nan")
        overhead = r["wall"] * r["workers"] / r["jobs"] - r["train_fold"]
        print(f"{r['engine']:<7} {r['workers']:>7} {r['jobs']:>5} {r['wall']:>7.1f} {per_min:>9.1f} "
              f"{efficiency:>10.2f} {r['train_fold']:>12.2f} {overhead:>14.2f}")


def available_engines(engines: list[str]) -> list[str]:
    """The engines that can run here: ray only where `import ray` works (a printed line says why not)."""
    if "ray" not in engines:
        return engines
    try:
        import ray  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install failing at import
        print(f"ray: skipped, import ray failed ({type(e).__name__}: {one_line(e)})", flush=True)
        return [name for name in engines if name != "ray"]
    return engines


def one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.gpus:
        os.environ["OMP_NUM_THREADS"] = "1"  # one thread per job, here and in every worker
        import torch

        torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="stacker-scale-"))
    write_digits_dataset(out / "data", size=args.size, n_images=args.images)
    rows = []
    try:
        for engine in available_engines(args.engines):
            for workers in worker_counts(args.gpus):
                try:
                    rows.append(run_grid(out, args, engine, workers))
                except Exception as e:  # noqa: BLE001 - one row's failure is reported, the others still run
                    print(f"{engine} x{workers}: failed, {type(e).__name__}: {one_line(e)}", flush=True)
                else:
                    print(f"{engine} x{workers}: {rows[-1]['wall']:.1f}s", flush=True)
    finally:  # the rows that ran, also after an interrupt
        if rows:
            print_table(rows)
        else:
            print("no row ran")


if __name__ == "__main__":
    main()
