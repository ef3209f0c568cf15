"""Run a restoration model on images: whole, or in overlapping tiles.

Tiled inference keeps memory bounded on large images: the input is cut into
``tile`` x ``tile`` pieces overlapping by ``overlap`` pixels, each piece is
restored alone, and the outputs are blended with weights that ramp down
linearly across the overlap (no visible seams, every pixel weighted to 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

from .data.io import Image, read_image, write_image
from .errors import ImageError, OptionError


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, overlap: int, device) -> torch.Tensor:
    """1-D blend weights: linear ramp over the first/last ``overlap`` samples.

    Weights stay > 0, and the sum is divided out, so pixels that only one
    tile covers (image borders) come out with weight exactly 1.
    """
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        k = min(overlap, n // 2)
        w[:k] = r[:k]
        w[n - k:] = torch.minimum(w[n - k:], r[:k].flip(0))
    return w


@torch.no_grad()
def restore_tensor(model: nn.Module, x: torch.Tensor, tile: int | None = None, overlap: int = 16,
                   progress: bool = False) -> torch.Tensor:
    """model(x) for x (B, C, H, W), tiled when ``tile`` is set and the image is larger."""
    scale = int(getattr(model, "upscale", 1))
    b, c, h, w = x.shape
    if not tile or (h <= tile and w <= tile):
        return model(x)
    if overlap >= tile:
        raise OptionError(f"--overlap {overlap} must be smaller than --tile {tile}; lower --overlap or raise --tile")
    out = None
    weight = torch.zeros(1, 1, h * scale, w * scale, device=x.device)
    boxes = [(i, j) for i in _starts(h, tile, overlap) for j in _starts(w, tile, overlap)]
    it: Iterable = boxes
    if progress:
        from tqdm import tqdm

        it = tqdm(boxes, desc="tiles", leave=False, unit="tile")
    for i, j in it:
        th, tw = min(tile, h), min(tile, w)
        y = model(x[:, :, i:i + th, j:j + tw])
        if out is None:
            out = torch.zeros(b, y.shape[1], h * scale, w * scale, device=x.device, dtype=y.dtype)
        wt = _ramp(th * scale, overlap * scale, x.device)[:, None] * _ramp(tw * scale, overlap * scale, x.device)[None]
        ys, xs = slice(i * scale, (i + th) * scale), slice(j * scale, (j + tw) * scale)
        out[:, :, ys, xs] += y * wt
        weight[:, :, ys, xs] += wt
    return out / weight


@dataclass
class RestoreResult:
    source: str
    output: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def restore_image(model: nn.Module, image: Image, tile: int | None = None, overlap: int = 16,
                  device: str | torch.device = "cpu", progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """Restore one decoded image; returns (float HWC pixels, notes on conversions)."""
    notes: list[str] = []
    in_chans = int(getattr(model, "in_chans", 3))
    pixels = image.pixels
    gray_out = False
    if pixels.shape[2] == 1 and in_chans == 3:
        pixels = np.repeat(pixels, 3, axis=2)
        gray_out = True
        notes.append("grayscale input restored as RGB and saved as grayscale")
    elif pixels.shape[2] == 3 and in_chans == 1:
        raise ImageError(
            f"{image.path} is RGB but the model takes grayscale (in_chans 1); convert the image to grayscale first")
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].to(device)
    y = restore_tensor(model, x, tile=tile, overlap=overlap, progress=progress)[0].float().cpu().numpy()
    y = y.transpose(1, 2, 0)
    if gray_out:
        y = y.mean(axis=2, keepdims=True)
    return y, notes


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    import cv2

    if scale == 1:
        return alpha
    h, w = alpha.shape
    return np.clip(cv2.resize(alpha, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def restore_files(model: nn.Module, sources: list[Path | Image], output_dir: str | os.PathLike,
                  tile: int | None = None, overlap: int = 16, bit_depth: int | None = None, suffix: str = "",
                  device: str | torch.device = "cpu", progress: bool = True) -> list[RestoreResult]:
    """Restore each source (a file, read when its turn comes, or a decoded Image)
    into ``output_dir`` as PNG (same stem + suffix)."""
    output_dir = Path(output_dir)
    scale = int(getattr(model, "upscale", 1))
    results = []
    it: Iterable = sources
    if progress:
        from tqdm import tqdm

        it = tqdm(sources, desc="restore", unit="img")
    for source in it:
        image = source if isinstance(source, Image) else read_image(source)
        pixels, notes = restore_image(model, image, tile=tile, overlap=overlap, device=device, progress=progress)
        alpha = None
        if image.alpha is not None:
            alpha = upscale_alpha(image.alpha, scale)
            notes.append("alpha channel upscaled with bicubic and kept")
        stem = Path(image.path.split(":", 1)[-1]).stem
        out = output_dir / f"{stem}{suffix}.png"
        write_image(out, pixels, bit_depth or image.bit_depth, alpha)
        results.append(RestoreResult(image.path, str(out), image.pixels.shape[:2], pixels.shape[:2], notes))
    return results
