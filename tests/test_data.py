"""Degradations, the built-in split, datasets and the patch sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmamba_deploy.data.builtin import EVAL_CROP, EVAL_PHOTOS, TRAIN_PHOTOS, builtin_split
from qmamba_deploy.data.datasets import Pair, PatchSampler, degrade_pair, load_pairs, to_channels
from qmamba_deploy.data.degrade import (
    Degradation,
    add_gaussian_noise,
    bicubic_down,
    bicubic_up,
    jpeg_compress,
    mod_crop,
)
from qmamba_deploy.data.io import write_image
from qmamba_deploy.errors import ImageError, OptionError

from .conftest import SHARED, need

METRICS = SHARED / "fixtures" / "metrics"


def test_noise_reproduces_the_fixture():
    pairs = json.loads(need(METRICS / "expected.json").read_text())["pairs"]
    assert "default_rng(20240517)" in pairs["baboon_crop vs baboon_crop_noisy_s10"]
    clean = np.load(METRICS / "baboon_crop.npy")
    noisy = add_gaussian_noise(clean, 10.0, np.random.default_rng(20240517))
    np.testing.assert_array_equal(noisy, np.load(METRICS / "baboon_crop_noisy_s10.npy"))


def test_jpeg_reproduces_the_fixture():
    clean = np.load(need(METRICS / "example.npy"))
    np.testing.assert_array_equal(jpeg_compress(clean, 30), np.load(METRICS / "example_q30_decoded.npy"))


def test_bicubic_round_trip_reproduces_the_fixture():
    hr = np.load(need(METRICS / "baboon_hr_90x108.npy"))
    up = bicubic_up(bicubic_down(hr, 3), 3)
    expected = np.load(METRICS / "baboon_bicubic_x3_90x108.npy")
    # BasicSR rounds its float32 result; a rare 1-LSB tie may round the other way
    assert np.abs(up.astype(int) - expected).max() <= 1
    assert (up != expected).mean() < 1e-3


def test_jpeg_gray_keeps_one_channel_and_quality_orders_error():
    rng = np.random.default_rng(0)
    img = (rng.random((40, 48, 1)) * 255).astype(np.uint8)
    lo, hi = jpeg_compress(img, 10), jpeg_compress(img, 95)
    assert lo.shape == img.shape and lo.dtype == np.uint8
    assert np.abs(lo.astype(int) - img).mean() > np.abs(hi.astype(int) - img).mean()


def test_mod_crop_and_sizes():
    img = np.zeros((37, 50, 3), np.uint8)
    assert mod_crop(img, 4).shape == (36, 48, 3)
    assert bicubic_down(mod_crop(img, 4), 4).shape == (9, 12, 3)


@pytest.mark.parametrize("kwargs,flag", [(dict(task="blur"), "--task"), (dict(scale=5), "--scale 5"),
                                         (dict(task="denoise", sigma=0), "--sigma"),
                                         (dict(task="jpeg", quality=0), "--quality")])
def test_degradation_rejects_bad_levels(kwargs, flag):
    with pytest.raises(OptionError, match=flag):
        Degradation(**kwargs)


def test_degradation_properties():
    sr, dn, jp = Degradation("sr", 4), Degradation("denoise", sigma=15), Degradation("jpeg", quality=10)
    assert (sr.out_scale, sr.crop_border, sr.label, sr.baseline_name) == (4, 4, "sr-x4", "bicubic")
    assert (dn.out_scale, dn.crop_border, dn.label, dn.baseline_name) == (1, 0, "denoise-s15", "noisy")
    assert jp.as_dict() == {"task": "jpeg", "label": "jpeg-q10", "quality": 10}


def test_builtin_split_is_fixed_and_disjoint():
    assert not set(TRAIN_PHOTOS) & set(EVAL_PHOTOS)
    first, again = builtin_split("eval"), builtin_split("eval")
    assert [n for n, _ in first] == list(EVAL_PHOTOS)
    for (_, a), (_, b) in zip(first, again):
        assert a.shape == (EVAL_CROP, EVAL_CROP, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="split"):
        builtin_split("test")


def test_builtin_train_pairs_have_lr_and_rgb():
    pairs = load_pairs("builtin", Degradation("sr", 4), 3, split="train")
    assert [p.name for p in pairs] == list(TRAIN_PHOTOS)
    for p in pairs:
        assert p.gt.shape[2] == 3 and p.gt.shape[0] % 4 == 0 and p.gt.shape[1] % 4 == 0
        assert p.lq.shape == (p.gt.shape[0] // 4, p.gt.shape[1] // 4, 3)
    assert any("gray replicated to RGB" in p.notes for p in pairs)


def test_to_channels():
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    gray, note = to_channels(rgb, 1)
    assert gray.shape == (4, 5, 1) and note == "RGB converted to gray"
    assert to_channels(rgb, 3) == (rgb, None)
    with pytest.raises(ImageError):
        to_channels(rgb, 2)


def _write(path, arr, bit_depth=8, alpha=None):
    write_image(path, arr.astype(np.float32) / 255.0, bit_depth=bit_depth, alpha=alpha)


def test_folder_pairs_with_16_bit_and_alpha_notes(tmp_path):
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (34, 30, 3)).astype(np.uint8)
    _write(tmp_path / "a.png", hr)
    _write(tmp_path / "b.png", hr, bit_depth=16)
    _write(tmp_path / "c.png", hr, alpha=np.ones(hr.shape[:2], np.float32))
    pairs = load_pairs(str(tmp_path), Degradation("sr", 4), 3)
    assert [p.name for p in pairs] == ["a", "b", "c"]
    for p in pairs:
        np.testing.assert_array_equal(p.gt, hr[:32, :28])  # mod-crop, and 16-bit reduces exactly
        np.testing.assert_array_equal(p.lq, bicubic_down(hr[:32, :28], 4))
    assert any("16-bit" in n for n in pairs[1].notes)
    assert pairs[2].notes == ["alpha channel ignored"]


def test_benchmark_layout(tmp_path):
    rng = np.random.default_rng(2)
    hr = rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)
    lr = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)  # given LR is used as it is, not recomputed
    (tmp_path / "HR").mkdir()
    (tmp_path / "LR_bicubic" / "X2").mkdir(parents=True)
    _write(tmp_path / "HR" / "img.png", hr)
    _write(tmp_path / "LR_bicubic" / "X2" / "imgx2.png", lr)
    (pair,) = load_pairs(str(tmp_path), Degradation("sr", 2), 3)
    np.testing.assert_array_equal(pair.lq, lr)
    np.testing.assert_array_equal(pair.gt, hr)
    with pytest.raises(ImageError, match="X4 does not exist"):
        load_pairs(str(tmp_path), Degradation("sr", 4), 3)
    with pytest.raises(ImageError, match="benchmark layout"):
        load_pairs(str(tmp_path), Degradation("denoise"), 3)
    _write(tmp_path / "LR_bicubic" / "X2" / "imgx2.png", lr[:11])
    with pytest.raises(ImageError, match="not an x2 pair"):
        load_pairs(str(tmp_path), Degradation("sr", 2), 3)


def test_denoise_eval_noise_is_seeded_by_name():
    gt = np.full((16, 16, 3), 128, np.uint8)
    deg = Degradation("denoise", sigma=20)
    a, b = degrade_pair(Pair("x", gt), deg), degrade_pair(Pair("x", gt), deg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, degrade_pair(Pair("y", gt), deg))
    assert abs(float(a.astype(float).std()) - 20) < 3


def _pairs(n=3, size=40, scale=2):
    rng = np.random.default_rng(3)
    deg = Degradation("sr", scale)
    out = []
    for i in range(n):
        gt = rng.integers(0, 256, (size + 8 * i, size, 3)).astype(np.uint8)
        out.append(Pair(f"p{i}", gt, deg.apply(gt)))
    return out


def test_sampler_batches_are_a_function_of_seed_iteration_rank():
    deg = Degradation("sr", 2)
    s = PatchSampler(_pairs(), deg, patch=8, batch=3, seed=5)
    x, y = s.batch(7, 0)
    assert x.shape == (3, 3, 8, 8) and y.shape == (3, 3, 16, 16) and x.dtype == y.dtype
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    x2, y2 = PatchSampler(_pairs(), deg, patch=8, batch=3, seed=5).batch(7, 0)
    assert x.equal(x2) and y.equal(y2)
    assert not s.batch(7, 1)[0].equal(x)
    assert not s.batch(8, 0)[0].equal(x)
    assert not PatchSampler(_pairs(), deg, patch=8, batch=3, seed=6).batch(7, 0)[0].equal(x)


def test_sampler_pairs_stay_aligned_under_augmentation():
    """Each LR patch is the crop of the LR image that belongs to its HR patch, after the same flips."""
    deg = Degradation("sr", 2)
    rng = np.random.default_rng(4)
    gt = np.kron(rng.integers(0, 256, (20, 20, 3)), np.ones((2, 2, 1))).astype(np.uint8)  # 2x2 blocks
    lr = gt[::2, ::2].copy()  # exact LR of a block image
    s = PatchSampler([Pair("blocks", gt, lr)], deg, patch=6, batch=16, seed=0)
    x, y = s.batch(0)
    assert x.equal(y[:, :, ::2, ::2])


def test_sampler_denoise_makes_fresh_noise_and_skips_small_images():
    deg = Degradation("denoise", sigma=30)
    big = Pair("big", np.full((32, 32, 3), 100, np.uint8))
    small = Pair("small", np.full((8, 8, 3), 100, np.uint8))
    s = PatchSampler([big, small], deg, patch=16, batch=2, seed=0)
    assert s.skipped == ["small"]
    x, y = s.batch(0)
    assert x.shape == y.shape == (2, 3, 16, 16)
    assert float((x - y).std() * 255) > 20
    with pytest.raises(ImageError, match="lower --patch"):
        PatchSampler([small], deg, patch=16, batch=2)
