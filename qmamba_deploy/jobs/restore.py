"""Restore image files with any runner (checkpoint, bundle, ONNX, engine): whole, or in tiles.

Tiles are planned from what the runner accepts (``runtime/tiling.py``): large images are cut
into overlapping tiles blended back without seams, images smaller than the artifact's minimum
are mirror-padded and cropped back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..artifacts import check_outputs
from ..data.io import DEFAULT_MAX_PIXELS, Image, read_image, write_image
from ..errors import ImageError, OptionError
from ..runtime import Runner
from ..runtime.tiling import plan_tiles, tiled_run


@torch.no_grad()
def restore_tensor(model: nn.Module | Runner, x: torch.Tensor, tile: int | None = None, overlap: int = 16,
                   progress: bool = False) -> torch.Tensor:
    """model(x) for x (B, C, H, W), tiled when ``tile`` is set and the image is larger.

    ``model``: an nn.Module (any size, on the device of ``x``) or an open Runner (its limits)."""
    if isinstance(model, Runner):
        return tiled_run(model, x, model.scale, limits=model.limits, tile=tile, overlap=overlap, progress=progress)
    return tiled_run(model, x, int(getattr(model, "upscale", 1)), tile=tile, overlap=overlap, progress=progress)


@dataclass
class RestoreResult:
    source: str
    output: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def restore_image(runner: Runner, image: Image, tile: int | None = None, overlap: int = 16,
                  progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """Restore one decoded image with an open runner; returns (float HWC pixels, notes)."""
    notes: list[str] = []
    in_chans = runner.info.in_chans
    pixels = image.pixels
    gray_out = False
    if pixels.shape[2] == 1 and in_chans == 3:
        pixels = np.repeat(pixels, 3, axis=2)
        gray_out = True
        notes.append("grayscale input restored as RGB and saved as grayscale")
    elif pixels.shape[2] == 3 and in_chans == 1:
        raise ImageError(
            f"{image.path} is RGB but the model takes grayscale (in_chans 1); convert the image to grayscale first")
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    h, w = x.shape[-2:]
    plan = plan_tiles(h, w, tile, overlap, runner.limits)
    notes.extend(plan.notes)
    y = tiled_run(runner, x, runner.scale, plan=plan, limits=runner.limits, progress=progress)[0].numpy()
    y = y.transpose(1, 2, 0)
    if gray_out:
        y = y.mean(axis=2, keepdims=True)
    return y, notes


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return alpha
    h, w = alpha.shape
    return np.clip(cv2.resize(alpha, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def _stem(source: Path | Image) -> str:
    return Path(source.path.split(":", 1)[-1]).stem if isinstance(source, Image) else Path(source).stem


def output_paths(sources: list[Path | Image], output_dir: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Where each source is written; one sentence when two sources would be written to the same
    file (``a.png`` and ``a.jpg``) or an output would replace one of the input files."""
    outs = [Path(output_dir) / f"{_stem(s)}{suffix}.png" for s in sources]
    seen: dict[Path, Path | Image] = {}
    for source, out in zip(sources, outs):
        if out in seen:
            first = seen[out]
            names = [getattr(x, "path", x) for x in (first, source)]
            raise OptionError(f"{names[0]} and {names[1]} would both be written to {out}; restore them into "
                              f"separate --output folders, or rename one")
        seen[out] = source
    check_outputs({"--input": [s for s in sources if not isinstance(s, Image)]}, files={"--output": outs})
    return outs


def restore_files(runner: Runner, sources: list[Path | Image], output_dir: str | os.PathLike,
                  tile: int | None = None, overlap: int = 16, bit_depth: int | None = None, suffix: str = "",
                  progress: bool = True, failures: list[tuple[str, str]] | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> list[RestoreResult]:
    """Restore each source (a file, read when its turn comes, or a decoded Image) with an open
    runner into ``output_dir`` as PNG (same stem + suffix).

    Output names are checked before any work (:func:`output_paths`). A source that cannot be read
    or restored raises an ImageError, or, when ``failures`` is a list, is recorded there as
    (source, sentence) and the others still run."""
    outs = output_paths(sources, output_dir, suffix)
    scale = runner.scale
    results = []
    it: Iterable = list(zip(sources, outs))
    if progress:
        it = tqdm(it, desc="restore", unit="img")
    for source, out in it:
        try:
            image = source if isinstance(source, Image) else read_image(source, max_pixels)
            pixels, notes = restore_image(runner, image, tile=tile, overlap=overlap, progress=progress)
            alpha = None
            if image.alpha is not None:
                alpha = upscale_alpha(image.alpha, scale)
                notes.append("alpha channel upscaled with bicubic and kept")
            write_image(out, pixels, bit_depth or image.bit_depth, alpha)
        except ImageError as exc:
            if failures is None:
                raise
            failures.append((str(getattr(source, "path", source)), str(exc)))
            continue
        results.append(RestoreResult(image.path, str(out), image.pixels.shape[:2], pixels.shape[:2], notes))
    return results
