"""MATLAB-compatible bicubic ``imresize`` with BasicSR's conventions.

This is the resize that BasicSR (``basicsr.utils.matlab_functions.imresize``)
uses to make LR test inputs and bicubic baselines, re-implemented in numpy:

* Keys cubic kernel with a = -0.5, support 4 (``|x| < 2``);
* when downscaling with ``antialiasing=True`` the kernel is stretched by
  ``1/scale`` (support ``4/scale``) and scaled by ``scale``;
* output size ``ceil(in * scale)``; sample centres
  ``u = x / scale + 0.5 * (1 - 1/scale)`` for ``x = 1..out`` (1-based);
* each output row of weights is normalised to sum to one; leading/trailing
  weight columns are dropped exactly as BasicSR drops them;
* borders use symmetric (edge-including, "half-sample") reflection;
* separable: the dimension with the smaller scale factor is processed first
  (MATLAB's order; for one scalar scale that is rows, then columns, as in
  BasicSR).

Precision: BasicSR turns numpy input into a float32 torch tensor, so its
official results carry float32 rounding. ``dtype=np.float32`` (default)
evaluates weights and sums in float32 and reproduces the official outputs to
~1e-7; ``dtype=np.float64`` evaluates the same algorithm in float64 (the
``*_f64compute`` reference, within ~3e-7 of the official result).

Input value range is not changed: a uint8 image is resized as float numbers
0..255 and a float image is returned (BasicSR does the same: it never rounds
or converts back to uint8; use :func:`qmamba_deploy.metrics.to_uint8` on a
[0, 1] result for that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["imresize", "cubic", "resize_weights"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel (a = -0.5), evaluated in ``x``'s dtype."""
    absx = np.abs(x)
    absx2 = absx * absx
    absx3 = absx2 * absx
    one = (absx <= 1).astype(x.dtype)
    two = ((absx > 1) & (absx <= 2)).astype(x.dtype)
    return (x.dtype.type(1.5) * absx3 - x.dtype.type(2.5) * absx2 + x.dtype.type(1)) * one + (
        x.dtype.type(-0.5) * absx3 + x.dtype.type(2.5) * absx2 - x.dtype.type(4) * absx + x.dtype.type(2)
    ) * two


def _row_sum(w: np.ndarray) -> np.ndarray:
    # torch's row reduction (two interleaved partial sums) -> same float32 rounding
    even = np.zeros(w.shape[0], dtype=w.dtype)
    odd = np.zeros(w.shape[0], dtype=w.dtype)
    for t in range(w.shape[1]):
        if t % 2 == 0:
            even += w[:, t]
        else:
            odd += w[:, t]
    return (even + odd)[:, None]


def resize_weights(
    in_length: int, out_length: int, scale: float, antialiasing: bool = True, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(out_length, taps)`` and 0-based source indices (already mirrored
    into ``[0, in_length)``) for resizing one dimension, BasicSR/MATLAB style."""
    dt = np.dtype(dtype)
    f = dt.type
    kernel_width = 4.0
    aa = scale < 1 and antialiasing
    if aa:
        kernel_width = kernel_width / scale
    x = np.arange(1, out_length + 1, dtype=dt)
    u = x / f(scale) + f(0.5 * (1 - 1 / scale))
    left = np.floor(u - f(kernel_width / 2))
    p = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(p, dtype=dt)[None, :]
    distance = u[:, None] - indices
    if aa:
        weights = f(scale) * cubic(distance * f(scale))
    else:
        weights = cubic(distance)
    weights = weights / _row_sum(weights)
    # Drop columns the way BasicSR does (MATLAB drops all-zero columns; BasicSR
    # narrows by the zero counts of the first / last column, computed once).
    zeros = np.sum(weights == 0, axis=0)
    if zeros[0] != 0:
        indices = indices[:, 1 : p - 1]
        weights = weights[:, 1 : p - 1]
    if zeros[-1] != 0:
        indices = indices[:, : p - 2]
        weights = weights[:, : p - 2]
    # 1-based MATLAB indices -> 0-based, symmetric reflection at both borders.
    idx = indices.astype(np.int64) - 1
    n = in_length
    period = 2 * n
    idx = np.mod(idx, period)
    idx = np.where(idx >= n, period - 1 - idx, idx)
    return np.ascontiguousarray(weights, dtype=dt), idx


def _resize_axis(img: np.ndarray, axis: int, out_length: int, scale: float, antialiasing: bool, dt) -> np.ndarray:
    weights, idx = resize_weights(img.shape[axis], out_length, scale, antialiasing, dt)
    moved = np.moveaxis(img, axis, 0)  # (L, ...)
    gathered = moved[idx]  # (out, taps, ...)
    out = np.zeros((out_length,) + moved.shape[1:], dtype=dt)
    for t in range(weights.shape[1]):  # sequential sum over taps, like torch's mv
        w = weights[:, t].reshape((out_length,) + (1,) * (moved.ndim - 1))
        out += gathered[:, t] * w
    return np.moveaxis(out, 0, axis)


def imresize(img, scale: float | Sequence[float], antialiasing: bool = True, dtype: Any = np.float32):
    """Resize ``img`` by ``scale`` with MATLAB's bicubic (BasicSR's ``imresize``).

    Args:
        img: numpy array HWC or HW (float, or uint8 treated as 0..255 floats),
            or a torch tensor CHW / HW (returned as a tensor, CHW / HW).
        scale: one factor, or ``(scale_h, scale_w)``. Output size is
            ``ceil(in * scale)`` per dimension.
        antialiasing: stretch the kernel when downscaling (MATLAB default).
        dtype: computation and output precision; ``np.float32`` reproduces
            BasicSR's official (float32) results, ``np.float64`` the same
            algorithm in double precision.

    Returns:
        The resized array, ``dtype``-typed, same layout as the input.
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    is_torch = type(img).__module__.startswith("torch")
    if is_torch:
        arr = img.detach().cpu().numpy()
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(img)
    if arr.ndim not in (2, 3):
        raise ValueError(f"imresize expects HW or HWC (CHW for tensors), got shape {arr.shape}")
    arr = arr.astype(dt)
    if isinstance(scale, (tuple, list)):
        scale_h, scale_w = float(scale[0]), float(scale[1])
    else:
        scale_h = scale_w = float(scale)
    if scale_h <= 0 or scale_w <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    in_h, in_w = arr.shape[:2]
    out_h, out_w = math.ceil(in_h * scale_h), math.ceil(in_w * scale_w)
    steps = [(0, out_h, scale_h), (1, out_w, scale_w)]
    if scale_w < scale_h:  # MATLAB: smaller scale first (stable: rows first on ties)
        steps.reverse()
    out = arr
    for axis, length, s in steps:
        out = _resize_axis(out, axis, length, s, antialiasing, dt)
    out = np.ascontiguousarray(out)
    if is_torch:
        if out.ndim == 3:
            out = np.ascontiguousarray(out.transpose(2, 0, 1))
        return torch.from_numpy(out)
    return out
