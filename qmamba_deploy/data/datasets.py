"""Datasets: HR images -> (degraded input, ground truth) pairs for evaluation and training.

Three sources, one shape of result:

* ``builtin`` — the fixed train/eval split of scikit-image photos
  (:mod:`qmamba_deploy.data.builtin`);
* a folder of HR images — the degraded input is made on the fly
  (:class:`~qmamba_deploy.data.degrade.Degradation`);
* BasicSR's benchmark layout — ``DIR/HR/*.png`` with
  ``DIR/LR_bicubic/X{s}/{stem}x{s}.png`` (or ``{stem}.png``) beside it; the
  given LR files are used as they are.

Everything is uint8 HWC in RGB order (or one gray channel) until
:func:`to_tensor`. Training patches come from :class:`PatchSampler`, whose
batches are a pure function of ``(seed, iteration, rank)``: a resumed run
sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import ImageError
from .builtin import builtin_split
from .degrade import Degradation
from .io import DEFAULT_MAX_PIXELS, list_images, read_image, to_integer


@dataclass
class Pair:
    """One evaluation/training image: ``lq`` is None where it is made on the fly."""

    name: str
    gt: np.ndarray
    lq: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def to_channels(img: np.ndarray, channels: int) -> tuple[np.ndarray, str | None]:
    """uint8 HWC -> ``channels`` channels; returns the array and a note when converted."""
    have = img.shape[2]
    if have == channels:
        return img, None
    if have == 1 and channels == 3:
        return np.repeat(img, 3, axis=2), "gray replicated to RGB"
    if have == 3 and channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], "RGB converted to gray"
    raise ImageError(f"cannot convert a {have}-channel image to {channels} channels")


def _to_uint8(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Read an image file as uint8 HWC RGB/gray; 16-bit and alpha are converted with a note."""
    image = read_image(path, max_pixels)
    notes = []
    if image.bit_depth == 16:
        notes.append("16-bit input reduced to 8 bits (metrics follow the 8-bit convention of the papers)")
    if image.alpha is not None:
        notes.append("alpha channel ignored")
    return to_integer(image.pixels, 8), notes


def _lr_file(lr_dir: Path, stem: str, scale: int) -> Path | None:
    for candidate in (f"{stem}x{scale}", stem):
        for path in lr_dir.glob(candidate + ".*"):
            if path.is_file():
                return path
    return None


def is_benchmark_layout(path: str | os.PathLike) -> bool:
    return (Path(path) / "HR").is_dir() and (Path(path) / "LR_bicubic").is_dir()


def load_pairs(source: str, degradation: Degradation, channels: int = 3, split: str = "eval",
               failures: list[tuple[str, str]] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Pair]:
    """The images of ``source`` ('builtin', a folder, an image, or a benchmark folder).

    For SR the LR of each pair is filled in (read from the benchmark layout
    or made by bicubic downscaling); for denoise/JPEG it is left None and made
    by :func:`degrade_pair` / the sampler. An image that cannot be used (unreadable, too
    large, too small to score) raises an ImageError, or, when ``failures`` is a list, is
    recorded there as (file, sentence) and skipped.
    """
    def attempt(path, make):
        try:
            pair = make(path)
            check_scorable(pair, degradation)
            if degradation.task == "sr" and pair.lq is None:
                pair.lq = degradation.apply(pair.gt)
            pairs.append(pair)
        except ImageError as exc:
            if failures is None:
                raise
            failures.append((str(path), str(exc)))

    pairs: list[Pair] = []
    if source == "builtin":
        for name, arr in builtin_split(split):
            arr, note = to_channels(arr, channels)
            pairs.append(Pair(name, arr, notes=[note] if note else []))
    elif is_benchmark_layout(source):
        if degradation.task != "sr":
            raise ImageError(f"{source} has BasicSR's benchmark layout (HR/ + LR_bicubic/), which is for "
                             f"super-resolution; pass --task sr or a plain folder of HR images")
        lr_dir = Path(source) / "LR_bicubic" / f"X{degradation.scale}"
        if not lr_dir.is_dir():
            raise ImageError(f"{lr_dir} does not exist; the benchmark folder has no x{degradation.scale} LR images")

        def benchmark_pair(path):
            lr_path = _lr_file(lr_dir, path.stem, degradation.scale)
            if lr_path is None:
                raise ImageError(f"{lr_dir} has no LR image for {path.name} "
                                 f"(expected {path.stem}x{degradation.scale}.png or {path.stem}.png)")
            gt, notes = _to_uint8(path, max_pixels)
            lq, lr_notes = _to_uint8(lr_path, max_pixels)
            gt, note = to_channels(degradation.prepare(gt), channels)
            lq, _ = to_channels(lq, channels)
            s = degradation.scale
            if lq.shape[0] * s != gt.shape[0] or lq.shape[1] * s != gt.shape[1]:
                raise ImageError(f"{lr_path} is {lq.shape[1]}x{lq.shape[0]} but {path} (mod-cropped) is "
                                 f"{gt.shape[1]}x{gt.shape[0]}; they are not an x{s} pair")
            return Pair(path.stem, gt, lq, notes + lr_notes + ([note] if note else []))

        for path in list_images(Path(source) / "HR"):
            attempt(path, benchmark_pair)
        _all_failed(pairs, failures, source)
        return pairs
    else:
        def plain_pair(path):
            gt, notes = _to_uint8(path, max_pixels)
            gt, note = to_channels(gt, channels)
            return Pair(path.stem, np.ascontiguousarray(degradation.prepare(gt)),
                        notes=notes + ([note] if note else []))

        for path in list_images(source):
            attempt(path, plain_pair)
        _all_failed(pairs, failures, source)
        return pairs
    for pair in pairs:
        pair.gt = np.ascontiguousarray(degradation.prepare(pair.gt))
        if degradation.task == "sr":
            pair.lq = degradation.apply(pair.gt)
    return pairs


#: BasicSR's SSIM uses an 11x11 window without padding.
SSIM_WINDOW = 11


def check_scorable(pair: Pair, degradation: Degradation) -> None:
    """One ImageError when an image is too small to score (the border crop plus the SSIM window)."""
    need = 2 * degradation.crop_border + SSIM_WINDOW
    h, w = pair.gt.shape[:2]
    if h < need or w < need:
        raise ImageError(f"{pair.name} is {w}x{h} pixels; scoring {degradation.label} needs at least {need}x{need} "
                         f"({degradation.crop_border}-pixel border crop, {SSIM_WINDOW}-pixel SSIM window): "
                         f"use larger images")


def _all_failed(pairs: list[Pair], failures: list | None, source: str) -> None:
    if not pairs and failures:
        raise ImageError(f"no image of {source} could be used ({len(failures)} failed; first: {failures[0][1]})")


def _seed_for(*parts: object) -> int:
    """A stable 32-bit seed from any parts (names, indices), same on every platform."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def degrade_pair(pair: Pair, degradation: Degradation, seed: int = 0) -> np.ndarray:
    """The degraded input of an evaluation pair (noise seeded by the image name)."""
    if pair.lq is not None:
        return pair.lq
    return degradation.apply(pair.gt, np.random.default_rng(_seed_for(seed, pair.name)))


def to_tensor(batch: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or one HWC) -> float32 NCHW in [0, 1]."""
    arr = np.stack(batch) if isinstance(batch, list) else (batch[None] if batch.ndim == 3 else batch)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).float().div_(255.0)


def augment(arrays: list[np.ndarray], hflip: bool, vflip: bool, transpose: bool) -> list[np.ndarray]:
    """BasicSR's augmentation (flips and a 90-degree rotation) applied alike to every array."""
    out = []
    for a in arrays:
        if hflip:
            a = a[:, ::-1]
        if vflip:
            a = a[::-1]
        if transpose:
            a = a.transpose(1, 0, 2)
        out.append(a)
    return out


class PatchSampler:
    """Random paired patches from training images; batch ``i`` depends only on (seed, i, rank).

    ``patch`` is the size of the model input (LR size for SR). Images are
    drawn with probability proportional to their area, so a few large photos
    are not under-sampled.
    """

    def __init__(self, pairs: list[Pair], degradation: Degradation, patch: int, batch: int,
                 seed: int = 0, augment: bool = True):
        s = degradation.out_scale
        self.pairs = [p for p in pairs if min(p.gt.shape[:2]) >= patch * s]
        if not self.pairs:
            raise ImageError(f"no training image is at least {patch * s}x{patch * s} pixels; "
                             f"lower --patch (now {patch})")
        self.skipped = [p.name for p in pairs if min(p.gt.shape[:2]) < patch * s]
        self.degradation, self.patch, self.batch_size = degradation, patch, batch
        self.seed, self.augment = seed, augment
        area = np.array([p.gt.shape[0] * p.gt.shape[1] for p in self.pairs], dtype=np.float64)
        self.weights = area / area.sum()

    def rng(self, iteration: int, rank: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, iteration, rank])

    def batch(self, iteration: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) float32 NCHW in [0, 1] for one training step of one rank."""
        rng = self.rng(iteration, rank)
        d, p = self.degradation, self.patch
        s = d.out_scale
        lqs, gts = [], []
        for _ in range(self.batch_size):
            pair = self.pairs[rng.choice(len(self.pairs), p=self.weights)]
            h, w = pair.gt.shape[0] // s, pair.gt.shape[1] // s
            top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            gt = pair.gt[top * s:(top + p) * s, left * s:(left + p) * s]
            if pair.lq is not None:
                lq = pair.lq[top:top + p, left:left + p]
            else:
                lq = d.apply(np.ascontiguousarray(gt), rng)
            if self.augment:
                flips = rng.random(3) < 0.5
                lq, gt = augment([lq, gt], *map(bool, flips))
            lqs.append(lq)
            gts.append(gt)
        return to_tensor(lqs), to_tensor(gts)


@dataclass(frozen=True)
class PatchStream:
    """Where a job's patches come from, declared once: the images of ``data`` (training split),
    the model-input patch size, patches per batch, the seed and whether to augment.

    A stream's batch ``i`` depends only on (seed, i): jobs keep their uses of one stream apart
    by index ranges, named in :data:`STREAM_STARTS` (training draws 0 .. iters-1; a QAT job
    calibrates after its last training index)."""

    data: str = "builtin"
    patch: int = 48
    batch: int = 1
    seed: int = 0
    augment: bool = True

    def sampler(self, degradation: Degradation, channels: int = 3) -> PatchSampler:
        pairs = load_pairs(self.data, degradation, channels, split="train")
        return PatchSampler(pairs, degradation, self.patch, self.batch, seed=self.seed, augment=self.augment)

    def take(self, degradation: Degradation, channels: int, count: int, start: int = 0) -> list[torch.Tensor]:
        """Inputs of batches ``start`` .. ``start + count - 1``."""
        sampler = self.sampler(degradation, channels)
        return [sampler.batch(start + i, 0)[0] for i in range(count)]


#: First batch index of the calibration uses of one stream (export: the PTQ observers, then the
#: static DLS scales from other patches than the observers saw).
STREAM_STARTS = {"ptq": 0, "static-dls": 1000}
