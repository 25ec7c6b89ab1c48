"""base_models.augment: batch augmentation and TTA views on small seeded uint8 batches (CPU)."""
from __future__ import annotations

import pytest
import torch

from base_models.augment import (PLAIN, View, normalize, train_batch, tta_views, view_batch,
                                 view_theta, warp)
from base_models.config import AugmentConfig, TTAConfig
from oof import StackerError

H, W = 12, 10
IDENTITY = AugmentConfig(min_scale=1.0, ratio=(1.0, 1.0), flip=False, max_rotate=0.0, max_zoom=1.0,
                         max_lighting=0.0)


@pytest.fixture
def images():
    """(4, 12, 10, 3) uint8 noise: no symmetry, so any flip or crop shows."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, H, W, 3), generator=g, dtype=torch.uint8)


def _plain(images):
    return images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_plain_view_at_same_size_is_exact(images):
    out = view_batch(images, (H, W))
    assert out.shape == (4, 3, H, W) and out.dtype == torch.float32
    assert torch.equal(out, _plain(images))
    # the general warp path agrees with the shortcut
    torch.testing.assert_close(warp(images, view_theta(PLAIN, 4, "cpu"), (H, W)), _plain(images), atol=1e-6, rtol=0)


def test_flip_view_mirrors_exactly(images):
    out = view_batch(images, (H, W), View(flip=True))
    torch.testing.assert_close(out, torch.flip(_plain(images), dims=[3]), atol=1e-6, rtol=0)


def test_zoom_view_crops_centre_and_corners(images):
    # 8x8 input, half-side crops rendered at 4x4 land exactly on pixel centres
    x = images[:, :8, :8]
    plain = _plain(x)
    centre = view_batch(x, (4, 4), View(zoom=0.5))
    torch.testing.assert_close(centre, plain[:, :, 2:6, 2:6], atol=1e-6, rtol=0)
    top_left = view_batch(x, (4, 4), View(zoom=0.5, cx=-1, cy=-1))
    torch.testing.assert_close(top_left, plain[:, :, :4, :4], atol=1e-6, rtol=0)
    bottom_right = view_batch(x, (4, 4), View(zoom=0.5, cx=1, cy=1))
    torch.testing.assert_close(bottom_right, plain[:, :, 4:, 4:], atol=1e-6, rtol=0)


def test_plain_view_at_another_size_resamples(images):
    out = view_batch(images, (6, 5))
    assert out.shape == (4, 3, 6, 5)
    assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("n", range(0, 12))
def test_tta_views_are_distinct_and_never_plain(n):
    views = tta_views(n)
    assert len(views) == n
    assert len(set(views)) == n
    assert PLAIN not in views
    if n:
        assert views[0] == View(flip=True)  # the mirrored whole image comes first


@pytest.mark.parametrize("n", [12, 13])
def test_tta_views_beyond_eleven_are_refused(n):
    # 6 crops x 2 flips hold 11 views besides the plain one: more would repeat a view
    with pytest.raises(ValueError, match=f"at most 11 distinct TTA views, asked for {n}"):
        tta_views(n)
    with pytest.raises(StackerError, match=r"tta\.n: expected an integer in \[0, 11\], got 1[23]"):
        TTAConfig(n=n)


def test_tta_views_render_differently(images):
    plain = view_batch(images, (H, W))
    rendered = [view_batch(images, (H, W), v) for v in tta_views(6)]
    for i, a in enumerate(rendered):
        assert not torch.allclose(a, plain, atol=1e-3)
        for b in rendered[i + 1:]:
            assert not torch.allclose(a, b, atol=1e-3)


def test_train_batch_is_seeded(images):
    cfg = AugmentConfig()
    a = train_batch(images, (8, 8), cfg, _gen(1))
    b = train_batch(images, (8, 8), cfg, _gen(1))
    c = train_batch(images, (8, 8), cfg, _gen(2))
    assert a.shape == (4, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    assert a.min() >= 0.0 and a.max() <= 1.0 and c.min() >= 0.0 and c.max() <= 1.0


def test_train_batch_does_not_change_its_input(images):
    before = images.clone()
    train_batch(images, (H, W), AugmentConfig(), _gen(0))
    assert torch.equal(images, before)


def test_identity_augmentation_returns_plain_image(images):
    out = train_batch(images, (H, W), IDENTITY, _gen(3))
    torch.testing.assert_close(out, _plain(images), atol=1e-6, rtol=0)


def test_flip_only_gives_image_or_mirror(images):
    cfg = AugmentConfig(min_scale=1.0, ratio=(1.0, 1.0), flip=True, max_rotate=0.0, max_zoom=1.0, max_lighting=0.0)
    batch = images[:1].expand(16, H, W, 3)
    out = train_batch(batch, (H, W), cfg, _gen(4))
    plain, mirror = _plain(images[:1])[0], torch.flip(_plain(images[:1])[0], dims=[2])
    flipped = []
    for x in out:
        is_plain = torch.allclose(x, plain, atol=1e-6)
        is_mirror = torch.allclose(x, mirror, atol=1e-6)
        assert is_plain != is_mirror  # exactly one of the two
        flipped.append(is_mirror)
    assert 0 < sum(flipped) < 16  # both outcomes occur in 16 seeded draws


def test_lighting_only_changes_brightness_not_geometry(images):
    cfg = AugmentConfig(min_scale=1.0, ratio=(1.0, 1.0), flip=False, max_rotate=0.0, max_zoom=1.0,
                        max_lighting=0.2)
    out = train_batch(images, (H, W), cfg, _gen(5))
    plain = _plain(images)
    assert not torch.allclose(out, plain, atol=1e-3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # per sample the change is (x - 0.5) * c + 0.5 + b: unclipped pixels keep a linear relation to the input
    for x, p in zip(out, plain):
        keep = (x > 0.01) & (x < 0.99)
        c = torch.linalg.lstsq(torch.stack([p[keep], torch.ones_like(p[keep])], 1), x[keep, None]).solution
        torch.testing.assert_close(p[keep] * c[0] + c[1], x[keep], atol=1e-4, rtol=0)
        assert 1 / 1.2 - 1e-4 <= c[0].item() <= 1.2 + 1e-4


def test_normalize_uses_given_mean_and_std():
    x = torch.rand(2, 3, 4, 4, generator=_gen(6))
    mean, std = (0.1, 0.5, 0.9), (0.5, 0.25, 2.0)
    out = normalize(x, mean, std)
    for ch in range(3):
        torch.testing.assert_close(out[:, ch], (x[:, ch] - mean[ch]) / std[ch])
    assert torch.equal(normalize(x, (0.0,) * 3, (1.0,) * 3), x)


def test_zoom_draws_a_scale_within_max_zoom_per_sample():
    from dataclasses import replace

    from base_models.augment import random_theta

    theta = random_theta(256, replace(IDENTITY, max_zoom=2.0), _gen(3), "cpu")
    scale = theta[:, 0, 0]
    assert (scale <= 1.0).all() and (scale >= 0.5).all() and scale.std() > 0.1  # zoom-in by 1..2x, varied
    assert torch.equal(theta[:, 0, 0], theta[:, 1, 1])  # square zoom, no rotation
