"""PSNR / SSIM exactly as BasicSR computes them (the numbers papers report).

Conventions (BasicSR ``basicsr/metrics/psnr_ssim.py``):

* images are arrays in the 0..255 range (uint8, or floats on that scale);
  ``input_order`` is ``'HWC'`` (2-D gray is accepted too) or ``'CHW'``;
* ``crop_border`` pixels are removed on each side before anything else;
* ``test_y_channel=True`` converts a 3-channel image to the BT.601 luma of
  MATLAB's ``rgb2ycbcr`` with BasicSR's float32 dtype flow (no rounding):
  ``x = float32(img) / 255``;
  ``Y = float32((float64 (65.481 R + 128.553 G + 24.966 B) + 16) / 255)``;
  ``Y255 = Y * 255`` (float32); 1-channel images only get
  ``float32(img) / 255 * 255``;
* PSNR = ``10 log10(255^2 / mse)`` in float64 (``inf`` when identical);
* SSIM: 11x11 Gaussian window, sigma 1.5 (``cv2.getGaussianKernel``),
  filtered with ``cv2.filter2D`` and only the valid region ``[5:-5, 5:-5]``
  kept, ``C1 = (0.01*255)^2``, ``C2 = (0.03*255)^2``, mean of the map; for
  several channels the mean over channels.

Channel order: **this package's images are RGB**. BasicSR's functions take
cv2's BGR order. Every function here has ``channel_order='RGB'`` by default;
pass ``channel_order='BGR'`` for arrays that come from ``cv2.imread`` (then
the results equal BasicSR's ``calculate_psnr`` / ``calculate_ssim`` called on
the same arrays). RGB input is reversed to BGR internally so both orders give
bit-identical numbers for the same picture. Channel order only matters for
the Y channel.

``psnr_y`` / ``ssim_y`` take the float [0, 1] RGB HWC arrays the pipeline
produces, round them to uint8 like BasicSR's ``tensor2img`` and evaluate on
the Y channel with ``crop_border = scale`` (the usual SR benchmark protocol).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "to_uint8",
    "rgb2ycbcr_y",
    "to_y_channel",
    "calculate_psnr",
    "calculate_ssim",
    "psnr_y",
    "ssim_y",
    "psnr_between",
]

_Y_WEIGHTS_BGR = np.array([24.966, 128.553, 65.481], dtype=np.float64)


def _check_order(channel_order: str) -> str:
    order = channel_order.upper()
    if order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    return order


def to_uint8(img, min_max: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float image -> uint8 exactly like BasicSR's ``tensor2img`` (no channel swap).

    float32 arithmetic: clip to ``min_max``, normalise to [0, 1],
    ``(x * 255).round()`` (half to even), cast to uint8. Layout is unchanged
    (pass HWC numpy arrays; a torch tensor is converted with ``.numpy()`` as is).
    """
    if type(img).__module__.startswith("torch"):
        img = img.detach().cpu().float().numpy()
    x = np.asarray(img).astype(np.float32)
    lo, hi = float(min_max[0]), float(min_max[1])
    x = np.clip(x, np.float32(lo), np.float32(hi))
    x = (x - np.float32(lo)) / np.float32(hi - lo)
    return (x * np.float32(255.0)).round().astype(np.uint8)


def rgb2ycbcr_y(img, channel_order: str = "RGB") -> np.ndarray:
    """BT.601 luma of MATLAB's ``rgb2ycbcr`` (BasicSR's ``bgr2ycbcr(y_only=True)``).

    ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1],
    returned with the input's type convention:

    * uint8 HWC (0..255) -> uint8 HW, rounded (16..235);
    * float32 / float64 HWC in [0, 1] -> float32 HW in [16/255, 235/255].
    """
    order = _check_order(channel_order)
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb2ycbcr_y expects an HxWx3 image, got shape {img.shape}")
    in_type = img.dtype
    if in_type == np.uint8:
        x = img.astype(np.float32) / 255.0
    elif in_type in (np.float32, np.float64):
        x = img.astype(np.float32)
    else:
        raise TypeError(f"rgb2ycbcr_y expects uint8, float32 or float64, got {in_type}")
    if order == "RGB":
        x = x[..., ::-1]
    y = np.dot(x, _Y_WEIGHTS_BGR) + 16.0  # float64
    if in_type == np.uint8:
        return y.round().astype(np.uint8)
    return (y / 255.0).astype(np.float32)


def to_y_channel(img, channel_order: str = "RGB") -> np.ndarray:
    """BasicSR's ``to_y_channel``: HWC (0..255) -> float32 HW1 Y on the 0..255 scale.

    3-channel: BT.601 Y with the float32 flow above; 1-channel: only
    ``float32(img) / 255 * 255``.
    """
    order = _check_order(channel_order)
    img = np.asarray(img).astype(np.float32) / 255.0
    if img.ndim == 3 and img.shape[2] == 3:
        if order == "RGB":
            img = img[..., ::-1]
        y = np.dot(img, _Y_WEIGHTS_BGR) + 16.0
        img = (y / 255.0).astype(np.float32)[..., None]
    return img * 255.0


def _prepare(img, img2, crop_border: int, input_order: str, test_y_channel: bool, channel_order: str):
    img = np.asarray(img)
    img2 = np.asarray(img2)
    if img.shape != img2.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {img2.shape}")
    if input_order not in ("HWC", "CHW"):
        raise ValueError(f"input_order must be 'HWC' or 'CHW', got {input_order!r}")

    def reorder(a):
        if a.ndim == 2:
            return a[..., None]
        if a.ndim != 3:
            raise ValueError(f"expected a 2-D or 3-D image, got shape {a.shape}")
        return a.transpose(1, 2, 0) if input_order == "CHW" else a

    img, img2 = reorder(img), reorder(img2)
    crop_border = int(crop_border)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if min(img.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {img.shape[:2]} image")
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        img = to_y_channel(img, channel_order)
        img2 = to_y_channel(img2, channel_order)
    else:
        _check_order(channel_order)
    return img.astype(np.float64), img2.astype(np.float64)


def calculate_psnr(
    img,
    img2,
    crop_border: int,
    test_y_channel: bool = True,
    input_order: str = "HWC",
    channel_order: str = "RGB",
) -> float:
    """PSNR (dB) of two 0..255 images, BasicSR's ``calculate_psnr``.

    Note the default ``test_y_channel=True`` (BasicSR's default is False) and
    ``channel_order='RGB'`` (BasicSR expects BGR): with ``channel_order='BGR'``
    and an explicit ``test_y_channel`` the arguments mean the same as BasicSR's.
    Returns ``inf`` for identical images.
    """
    a, b = _prepare(img, img2, crop_border, input_order, test_y_channel, channel_order)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _gaussian_window() -> np.ndarray:
    k = cv2.getGaussianKernel(11, 1.5)
    return np.outer(k, k.transpose())


def _filter_valid(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """BasicSR's 'valid' 11x11 filtering (OpenCV, as BasicSR computes it)."""
    return cv2.filter2D(img, -1, window)[5:-5, 5:-5]


def _ssim_channel(img: np.ndarray, img2: np.ndarray) -> float:
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    window = _gaussian_window()
    mu1 = _filter_valid(img, window)
    mu2 = _filter_valid(img2, window)
    mu1_sq = mu1**2
    mu2_sq = mu2**2
    mu1_mu2 = mu1 * mu2
    sigma1_sq = _filter_valid(img**2, window) - mu1_sq
    sigma2_sq = _filter_valid(img2**2, window) - mu2_sq
    sigma12 = _filter_valid(img * img2, window) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def calculate_ssim(
    img,
    img2,
    crop_border: int,
    test_y_channel: bool = True,
    input_order: str = "HWC",
    channel_order: str = "RGB",
) -> float:
    """SSIM of two 0..255 images, BasicSR's ``calculate_ssim`` (same argument
    notes as :func:`calculate_psnr`). Mean over channels when not on Y.
    The cropped image must be larger than 10x10 (valid 11x11 window)."""
    a, b = _prepare(img, img2, crop_border, input_order, test_y_channel, channel_order)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {a.shape[:2]}")
    ssims = [_ssim_channel(a[..., i], b[..., i]) for i in range(a.shape[2])]
    return float(np.array(ssims).mean())


def psnr_y(sr, hr, scale: int, channel_order: str = "RGB") -> float:
    """Benchmark PSNR of float [0, 1] HWC images: ``to_uint8`` both, crop
    ``scale`` pixels, Y channel (RGB input by default)."""
    return calculate_psnr(to_uint8(sr), to_uint8(hr), int(scale), True, "HWC", channel_order)


def ssim_y(sr, hr, scale: int, channel_order: str = "RGB") -> float:
    """Benchmark SSIM of float [0, 1] HWC images (see :func:`psnr_y`)."""
    return calculate_ssim(to_uint8(sr), to_uint8(hr), int(scale), True, "HWC", channel_order)


def psnr_between(a, b) -> float:
    """PSNR (dB, peak 1) between two float images (torch tensors) clipped to [0, 1]; inf when identical:
    how well two runs of one model agree, not a quality metric."""
    mse = float(((a.clamp(0, 1).double() - b.clamp(0, 1).double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
