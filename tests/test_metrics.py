"""BasicSR-exact PSNR / SSIM / MATLAB bicubic imresize.

Expected numbers were produced with BasicSR's own functions (see
../shared/fixtures/metrics/README.md). Arrays are read from the small copy in
tests/data/metrics/bundle.npz (built by make_bundle.py there) and otherwise
from ../shared/fixtures/metrics; a case whose arrays are in neither place is
skipped with the reason.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from qmamba_deploy.data.imresize import imresize, resize_weights
from qmamba_deploy.metrics import (
    calculate_psnr,
    calculate_ssim,
    psnr_y,
    rgb2ycbcr_y,
    ssim_y,
    to_uint8,
    to_y_channel,
)

LOCAL = Path(__file__).resolve().parent / "data" / "metrics"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "metrics"
EXPECTED = json.loads((LOCAL / "expected.json").read_text())

PSNR_TOL = 1e-6  # dB
SSIM_TOL = 1e-8
IMRESIZE_TOL = 1e-6


@cache
def _bundle():
    with np.load(LOCAL / "bundle.npz") as z:
        return {k: z[k] for k in z.files}


def load(filename: str) -> np.ndarray:
    """A fixture array by its .npy file name (bundle first, then ../shared)."""
    stem = filename[:-4] if filename.endswith(".npy") else filename
    bundle = _bundle()
    if stem in bundle:
        a = bundle[stem]
        return a.astype(np.float64) if a.dtype == np.float32 else a
    path = SHARED / f"{stem}.npy"
    if not path.exists():
        pytest.skip(f"{stem}.npy is not in tests/data/metrics and {SHARED} is not available")
    return np.load(path)


def load_input(filename: str) -> np.ndarray:
    """imresize inputs: RGB float64 = uint8 / 255 (bit-identical to the *_f64.npy files)."""
    return load(filename.replace("_rgb_f64", "_rgb_u8")) / 255.0


def need_shared(filename: str) -> Path:
    path = SHARED / filename
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared beside the clone)")
    return path


# ---------------------------------------------------------------- PSNR / SSIM

CASES = EXPECTED["cases"]


def _case_arrays(case, rgb: bool):
    a, b = load(case["img"]), load(case["img2"])
    if rgb and a.ndim == 3:
        a, b = a[..., ::-1], b[..., ::-1]
    if case["input_order"] == "CHW":
        a, b = a.transpose(2, 0, 1), b.transpose(2, 0, 1)
    return a, b


@pytest.mark.parametrize("rgb", [False, True], ids=["bgr", "rgb"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_psnr_ssim_match_basicsr(case, rgb):
    a, b = _case_arrays(case, rgb)
    kw = dict(
        crop_border=case["crop_border"],
        test_y_channel=case["test_y_channel"],
        input_order=case["input_order"],
        channel_order="RGB" if rgb else "BGR",
    )
    psnr = calculate_psnr(a, b, **kw)
    ssim = calculate_ssim(a, b, **kw)
    assert abs(psnr - case["psnr"]) <= PSNR_TOL, (psnr, case["psnr"])
    assert abs(ssim - case["ssim"]) <= SSIM_TOL, (ssim, case["ssim"])


def test_channel_order_matters_for_y():
    """Feeding BGR arrays as RGB must give a different (wrong) number."""
    case = CASES[0]
    a, b = load(case["img"]), load(case["img2"])
    right = calculate_psnr(a, b, 4, channel_order="BGR")
    wrong = calculate_psnr(a, b, 4, channel_order="RGB")
    assert right == pytest.approx(case["psnr"], abs=PSNR_TOL)
    assert abs(wrong - right) > 1e-3


def test_bicubic_baseline_pipeline_and_psnr_y():
    """img2 = tensor2img(imresize(round_u8(imresize(HR/255, 1/3))/255, 3)) with our functions,
    then psnr_y / ssim_y on the float [0, 1] RGB arrays (as our pipeline has them)."""
    case = next(c for c in CASES if c["name"] == "baboon_sr_bicubic_x3_y_b3")
    hr_rgb = load(case["img"])[..., ::-1] / 255.0
    lr = to_uint8(imresize(hr_rgb, 1 / 3))
    sr = imresize(lr / 255.0, 3)
    assert sr.shape == hr_rgb.shape
    np.testing.assert_array_equal(to_uint8(sr)[..., ::-1], load(case["img2"]))
    assert abs(psnr_y(sr, hr_rgb, 3) - case["psnr"]) <= PSNR_TOL
    assert abs(ssim_y(sr, hr_rgb, 3) - case["ssim"]) <= SSIM_TOL


def test_bundle_is_a_faithful_copy():
    need_shared("expected.json")
    assert json.loads((SHARED / "expected.json").read_text()) == EXPECTED
    for name, arr in _bundle().items():
        ref = np.load(SHARED / f"{name}.npy")
        assert np.array_equal(arr.astype(ref.dtype), ref), name
    for n in ("20x16", "60x48"):
        f64 = np.load(SHARED / f"imresize_input_{n}_rgb_f64.npy")
        assert np.array_equal(load_input(f"imresize_input_{n}_rgb_f64.npy"), f64)


# ---------------------------------------------------------------- imresize

RESIZE = [c for c in EXPECTED["imresize"]["cases"] if c["output"] is not None]
RESIZE_IDS = [c["output"][:-4] for c in RESIZE]


@pytest.mark.parametrize("case", RESIZE, ids=RESIZE_IDS)
def test_imresize_matches_official_float32(case):
    x = load_input(case["input"])
    out = imresize(x, case["scale"], antialiasing=case["antialiasing"])
    ref = load(case["output"])
    assert out.dtype == np.float32
    assert list(out.shape) == case["out_shape"] == list(ref.shape)
    assert np.abs(out - ref).max() <= IMRESIZE_TOL


@pytest.mark.parametrize("case", RESIZE, ids=RESIZE_IDS)
def test_imresize_float64_matches_f64compute(case):
    ref = np.load(need_shared(case["output_f64compute"]))
    out = imresize(load_input(case["input"]), case["scale"], antialiasing=case["antialiasing"], dtype=np.float64)
    assert out.dtype == np.float64
    assert np.abs(out - ref).max() <= 1e-12


@pytest.mark.parametrize("case", RESIZE, ids=RESIZE_IDS)
def test_imresize_float64_close_to_official(case):
    out = imresize(load_input(case["input"]), case["scale"], antialiasing=case["antialiasing"], dtype=np.float64)
    diff = np.abs(out - load(case["output"])).max()
    assert diff <= case["max_abs_diff_f32_vs_f64compute"] + 1e-12


def test_imresize_quarter_without_antialiasing_works():
    """BasicSR raises here (padding-length-0 bug); we return the MATLAB result."""
    case = next(c for c in EXPECTED["imresize"]["cases"] if c["output"] is None)
    x = load_input(case["input"])
    out = imresize(x, case["scale"], antialiasing=case["antialiasing"], dtype=np.float64)
    assert out.shape == (15, 12, 3)
    # no antialiasing, scale 1/4: output row k samples 1-based position 4k + 2.5, i.e. the
    # a=-0.5 cubic taps rows 4k..4k+3 (0-based) with weights (-1, 9, 9, -1) / 16
    rows = imresize(x, (case["scale"], 1.0), antialiasing=False, dtype=np.float64)
    w = np.array([-1, 9, 9, -1]) / 16
    expect = np.stack([np.tensordot(w, x[4 * k : 4 * k + 4], axes=1) for k in range(15)])
    np.testing.assert_allclose(rows, expect, atol=1e-12)
    np.testing.assert_allclose(imresize(rows, (1.0, case["scale"]), antialiasing=False, dtype=np.float64), out,
                               atol=1e-12)


# ---------------------------------------------------------------- properties


def test_identical_images():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    assert calculate_psnr(img, img, 4) == math.inf
    assert calculate_ssim(img, img, 4) == pytest.approx(1.0, abs=1e-12)
    assert calculate_ssim(img, img, 0, test_y_channel=False) == pytest.approx(1.0, abs=1e-12)
    f = img / 255.0
    assert psnr_y(f, f, 2) == math.inf
    assert ssim_y(f, f, 2) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value_and_crop():
    a = np.zeros((20, 20), np.uint8)
    b = a.copy()
    b[:2] = 10  # only the top border differs
    assert calculate_psnr(a, b, 2, test_y_channel=False) == math.inf
    assert calculate_psnr(a, b, 0, test_y_channel=False) == pytest.approx(10 * math.log10(255**2 / 10.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale,aa", [(2, True), (3, True), (1 / 2, True), (1 / 3, True), (1 / 3, False),
                                     (1 / 4, False)])
def test_imresize_constant_stays_constant(scale, aa, dtype):
    img = np.full((24, 18, 3), 0.37)
    out = imresize(img, scale, antialiasing=aa, dtype=dtype)
    assert out.shape == (math.ceil(24 * scale), math.ceil(18 * scale), 3)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert np.abs(out - 0.37).max() <= tol


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_up_then_down_sizes(scale):
    img = np.random.default_rng(1).random((17, 13, 3))
    up = imresize(img, scale)
    assert up.shape == (17 * scale, 13 * scale, 3)
    down = imresize(up, 1 / scale)
    assert down.shape == img.shape
    assert imresize(np.zeros((10, 7)), 0.5).shape == (5, 4)  # ceil, and 2-D stays 2-D


def test_imresize_weights_normalised_and_in_range():
    for n, s, aa in [(20, 3, True), (60, 1 / 3, True), (60, 0.5, False), (7, 1 / 4, True)]:
        w, idx = resize_weights(n, math.ceil(n * s), s, aa, np.float64)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
        assert idx.min() >= 0 and idx.max() < n


def test_imresize_torch_chw_and_uint8():
    torch = pytest.importorskip("torch")
    x = load_input("imresize_input_20x16_rgb_f64.npy")
    ref = imresize(x, 2)
    t = imresize(torch.from_numpy(x.transpose(2, 0, 1).copy()), 2)
    assert isinstance(t, torch.Tensor) and tuple(t.shape) == (3, 40, 32)
    np.testing.assert_array_equal(t.numpy().transpose(1, 2, 0), ref)
    u8 = load("imresize_input_20x16_rgb_u8")
    np.testing.assert_allclose(imresize(u8, 2, dtype=np.float64) / 255.0, imresize(x, 2, dtype=np.float64), atol=1e-12)


def test_to_uint8_like_tensor2img():
    x = np.array([-0.2, 0.0, 1 / 255, 0.5, 254 / 255, 1.0, 1.7], dtype=np.float64)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 1, 128, 254, 255, 255])
    k = np.arange(256) / 255.0
    np.testing.assert_array_equal(to_uint8(k), np.arange(256))


def test_rgb2ycbcr_y():
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.uint8)
    y = rgb2ycbcr_y(img)
    assert y.dtype == np.uint8
    np.testing.assert_array_equal(y, [[16, 235, round(16 + 65.481)]])
    yf = rgb2ycbcr_y(img / 255.0)
    assert yf.dtype == np.float32
    np.testing.assert_allclose(yf * 255, [[16, 235, 16 + 65.481]], atol=1e-4)
    np.testing.assert_array_equal(rgb2ycbcr_y(img[..., ::-1], channel_order="BGR"), y)
    y255 = to_y_channel(img)
    assert y255.shape == (1, 3, 1) and y255.dtype == np.float32
    with pytest.raises(ValueError):
        rgb2ycbcr_y(img, channel_order="YUV")


def test_bad_inputs_raise():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        calculate_psnr(a, np.zeros((8, 9, 3), np.uint8), 0)
    with pytest.raises(ValueError):
        calculate_ssim(a, a, 0)  # smaller than the 11x11 window
    with pytest.raises(ValueError):
        calculate_psnr(a, a, 4)  # crop leaves nothing
