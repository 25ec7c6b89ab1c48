"""Throughput of the data path: stacker's cached GPU-style batches against the compute ceiling
and against a plain torchvision DataLoader pipeline, for one model, batch and precision.

    python bench/throughput.py                                   # CPU: tiny model, small images
    python bench/throughput.py --model convnext_tiny --size 224 --batch 128 --images 4096 \
        --source-size 640 480 --workers 15 --compile             # one GPU, Paddy-like photos

Rows (images per second, ratios to the ceiling of the same kind):
- train ceiling: the same model, batch and precision on synthetic data already on the device;
- train stacker: `train_fold`'s own steps on the decode-once cache, as train-base runs them;
- train torchvision: PIL decode + RandomResizedCrop/flip per image in DataLoader workers,
  decoding every epoch;
- infer ceiling / TTA stacker: (1 + n) views per image, synthetic vs the cache.
Also the cache's decode rate and the share of a job spent outside the training steps.
Details go to <out>/throughput.json. Nothing is downloaded: models are randomly initialised.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from base_models.augment import PLAIN, tta_views  # noqa: E402
from base_models.batches import CacheBudget, ImageSource, place_images  # noqa: E402
from base_models.cache import CacheOptions, build_cache  # noqa: E402
from base_models.config import model_specs  # noqa: E402
from base_models.models import create_model, model_norm, resolve_device  # noqa: E402
from base_models.predict import ViewPlan, autocast, predict_views  # noqa: E402
from base_models.train import Target, TrainInputs, train_fold  # noqa: E402
from oof import RunPaths, make_folds, read_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--size", type=int, default=64, help="training/prediction side (px)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="synthetic JPEG photos to write")
    p.add_argument("--source-size", type=int, nargs=2, default=[240, 180], metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the stacker job (the last is timed)")
    p.add_argument("--tta", type=int, default=4)
    p.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 1, 1))
    p.add_argument("--compile", action="store_true", help="torch.compile the stacker job (CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    return p.parse_args(argv)


def write_photos(root: Path, n: int, size, classes: int = 10) -> tuple[list[str], list[str], list[Path]]:
    """n smooth random JPEGs (q=90) in the Kaggle folder layout; returns ids, labels, paths."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ids, labels, paths = [], [], []
    h, w = size
    for i in range(n):
        label = str(i % classes)
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        path = root / "train_images" / label / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        ids.append(path.name), labels.append(label), paths.append(path)
    return ids, labels, paths


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, steps: int, device, warmup: int = 3) -> float:
    """Seconds per call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def make_model(args, device, compiled=False):
    model = create_model(args.model, 10).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return (torch.compile(model) if compiled else model), model_norm(model)


def sgd_step(model, opt, x, y, device, amp: str = "auto") -> None:
    """One AdamW step as train-base takes it: autocast to `amp` (auto: bf16 on CUDA) and channels_last on CUDA."""
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_ceiling(args, device, compiled=False, hw=None, amp: str = "auto") -> float:
    """Images/s of AdamW steps on one synthetic batch already on the device, at (h, w) `hw` (default:
    args.size square) and precision `amp`."""
    model, _ = make_model(args, device, compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 3, *(hw or (args.size, args.size)), device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    return args.batch / timed(lambda: sgd_step(model, opt, x, y, device, amp), args.steps, device)


def infer_ceiling(args, device, hw=None, amp: str = "auto") -> float:
    """Images/s of (1 + tta) eval forward passes per image on synthetic data, at (h, w) `hw` (default:
    args.size square) and precision `amp`."""
    model, _ = make_model(args, device)
    model.eval()
    x = torch.randn(args.batch, 3, *(hw or (args.size, args.size)), device=device)

    @torch.no_grad()
    def step():
        for _ in range(1 + args.tta):
            with autocast(device, amp):
                torch.softmax(model(x).float(), 1)

    return args.batch / timed(step, args.steps, device)


def stacker_train(args, device, cache, labels, paths: RunPaths) -> dict:
    """One train-base job on the cache; images/s of its last epoch's steps and its overhead share."""
    folds = make_folds(cache.ids, labels, k=2, seed=0)
    spec = model_specs([{"arch": args.model}], {
        "size": args.size, "epochs": args.epochs, "batch_size": args.batch, "compile": args.compile,
        "device": device.type})[0]
    (source,) = place_images([cache.images], device, CacheBudget.of(spec.train))
    inputs = TrainInputs(paths, folds, [Target(None, folds.classes, folds.y)], source)
    t0 = time.perf_counter()
    history = train_fold(spec, 0, inputs, log=lambda s: None)
    job = time.perf_counter() - t0
    seconds = read_json(paths.history(spec.name, 0))["seconds"]
    return {"images_per_second": history[-1]["images_per_second"], "job_seconds": job, "seconds": seconds,
            "overhead_share": 1 - seconds["train"] / job, "placement": source.placement}


def stacker_tta(args, device, cache) -> float:
    model, norm = make_model(args, device)
    source = ImageSource(cache.images, device)
    rows = np.arange(len(cache.ids))
    plan = ViewPlan((args.size, args.size), [PLAIN, *tta_views(args.tta)], norm, args.batch)

    def run():
        predict_views(model, source, rows[:args.batch * args.steps], plan)

    return args.batch * args.steps / timed(run, 1, device, warmup=1)


def torchvision_train(args, device, paths, labels) -> float:
    """The usual pipeline: PIL decode + per-image transforms in DataLoader workers, every epoch."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    model, (mean, std) = make_model(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tf = T.Compose([T.RandomResizedCrop(args.size, scale=(0.75, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean, std)])

    class Files(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as img:
                return tf(img.convert("RGB")), int(labels[i])

    loader = DataLoader(Files(), batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    batches = iter(())

    def step():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        sgd_step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True), device)

    return args.batch / timed(step, args.steps, device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids, labels, paths = write_photos(tmp / "data", args.images, tuple(args.source_size))
        t0 = time.perf_counter()
        run = RunPaths(tmp / "run")  # the cache and the stacker job's files
        cache = build_cache(run, "train", ids, paths, CacheOptions((args.size, args.size)), log=lambda s: None)
        decode_rate = len(ids) / (time.perf_counter() - t0)
        results = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                   "args": vars(args), "decode_images_per_second": decode_rate,
                   "train_ceiling": train_ceiling(args, device),
                   "train_stacker": stacker_train(args, device, cache, labels, run),
                   "train_torchvision": torchvision_train(args, device, paths, labels),
                   "infer_ceiling": infer_ceiling(args, device),
                   "tta_stacker": stacker_tta(args, device, cache)}
        if args.compile and device.type == "cuda":
            results["train_ceiling_compiled"] = train_ceiling(args, device, compiled=True)
    (out / "throughput.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    return results


def print_table(r: dict) -> None:
    a = r["args"]
    ceiling, infer = r["train_ceiling"], r["infer_ceiling"]
    rows = [("train ceiling (synthetic, on device)", ceiling, 1.0),
            (f"train stacker (cache in {r['train_stacker']['placement']})", r["train_stacker"]["images_per_second"],
             r["train_stacker"]["images_per_second"] / ceiling),
            (f"train torchvision DataLoader ({a['workers']} workers)", r["train_torchvision"],
             r["train_torchvision"] / ceiling),
            (f"infer ceiling ({1 + a['tta']} views)", infer, 1.0),
            ("TTA stacker (cache)", r["tta_stacker"], r["tta_stacker"] / infer)]
    if "train_ceiling_compiled" in r:
        rows.insert(1, ("train ceiling, compiled", r["train_ceiling_compiled"], r["train_ceiling_compiled"] / ceiling))
    print(f"\n{a['model']} at {a['size']} px, batch {a['batch']}, on {r['device']} "
          f"({'compiled stacker job' if a['compile'] else 'eager'})")
    print(f"{'what':<52}{'images/s':>10}{'ratio':>8}")
    for name, rate, ratio in rows:
        print(f"{name:<52}{rate:>10.1f}{ratio:>8.2f}")
    s = r["train_stacker"]
    print(f"cache decode: {r['decode_images_per_second']:.0f} images/s; stacker job outside training steps: "
          f"{s['overhead_share']:.1%} of {s['job_seconds']:.1f}s (setup {s['seconds']['setup']:.2f}s, "
          f"evaluate {s['seconds']['evaluate']:.2f}s, checkpoint {s['seconds']['checkpoint']:.2f}s, "
          f"save {s['seconds']['save']:.2f}s)")


if __name__ == "__main__":
    main()
