"""ImageSource: batches gathered by index, padding for fixed shapes, the GPU placements; and the throughput bench."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from base_models.batches import CacheBudget, ImageSource, place_images

IMAGES = np.random.default_rng(0).integers(0, 256, (10, 4, 3, 3), dtype=np.uint8)  # (N, H, W, 3)


def test_batches_follow_the_order_and_the_last_one_is_partial():
    source = ImageSource(IMAGES, torch.device("cpu"))
    order = np.array([9, 2, 5, 0, 7])
    got = list(source.batches(order, 2))
    assert [n for _, n in got] == [2, 2, 1]
    np.testing.assert_array_equal(torch.cat([b for b, _ in got]).numpy(), IMAGES[order])


def test_padding_keeps_one_shape_and_counts_real_rows():
    source = ImageSource(IMAGES, torch.device("cpu"))
    got = list(source.batches(np.arange(5), 4, pad=True))
    assert [tuple(b.shape) for b, _ in got] == [(4, 4, 3, 3), (4, 4, 3, 3)] and [n for _, n in got] == [4, 1]
    np.testing.assert_array_equal(got[1][0].numpy(), IMAGES[[4, 4, 4, 4]])


def test_a_fixed_count_of_training_batches_drops_the_rest():
    source = ImageSource(IMAGES, torch.device("cpu"))
    assert [n for _, n in source.batches(np.arange(10), 3, count=3)] == [3, 3, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget_gb, placement", [(8.0, "gpu memory"), (0.0, "pinned host memory, prefetched")])
def test_gpu_placements_give_the_same_batches(budget_gb, placement):
    (source,) = place_images([IMAGES], torch.device("cuda"), CacheBudget(budget_gb, 0.0))
    assert source.placement == placement
    order = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    got = torch.cat([b for b, _ in source.batches(order, 3)]).cpu().numpy()
    np.testing.assert_array_equal(got, IMAGES[order])


def test_throughput_bench_runs_on_cpu_and_reports_ratios(tmp_path):
    bench = Path(__file__).parents[1] / "bench" / "throughput.py"
    args = ["--images", "96", "--size", "32", "--batch", "16", "--steps", "2", "--epochs", "1", "--tta", "2",
            "--workers", "1", "--device", "cpu", "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, str(bench), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "train torchvision DataLoader" in out.stdout and "TTA stacker" in out.stdout
    result = json.loads((tmp_path / "throughput.json").read_text())
    for key in ("train_ceiling", "train_torchvision", "infer_ceiling", "tta_stacker", "decode_images_per_second"):
        assert result[key] > 0, key
    assert 0 < result["train_stacker"]["images_per_second"] and 0 <= result["train_stacker"]["overhead_share"] < 1
