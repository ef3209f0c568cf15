"""Any image size on any artifact: tiles that fit what the runner accepts, blended back.

Tiled inference keeps memory bounded on large images and fits images to artifacts with
limits (an engine built for at most 256x256, an ONNX with fixed axes): the input is cut into
``tile`` x ``tile`` pieces overlapping by ``overlap`` pixels, each piece is restored alone,
and the outputs are blended with weights that ramp down linearly across the overlap (no
visible seams, every pixel weighted to 1). A side shorter than the smallest the artifact
accepts is padded with mirrored copies (as the models pad to their window) and the output
cropped back.

:func:`plan_tiles` decides the tiles from the image size, the requested tile and the
runner's :class:`~qmamba_deploy.runtime.base.ShapeLimits`; :func:`tiled_run` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..errors import OptionError
from .base import ShapeLimits

__all__ = ["TilePlan", "plan_tiles", "tiled_run", "mirror_pad"]


@dataclass(frozen=True)
class TilePlan:
    """Tiles over an image padded to ``padded`` (H, W): top-left corners and one tile size."""

    size: tuple[int, int]           # the image (H, W)
    padded: tuple[int, int]         # after mirror padding to the artifact's minimum
    tile: tuple[int, int]           # every tile's (H, W)
    overlap: tuple[int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...]]
    notes: tuple[str, ...] = field(default=())

    @property
    def boxes(self) -> list[tuple[int, int]]:
        return [(i, j) for i in self.starts[0] for j in self.starts[1]]

    @property
    def whole(self) -> bool:
        return len(self.starts[0]) == len(self.starts[1]) == 1


def _starts(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    if size <= tile:
        return (0,)
    stride = tile - overlap
    return tuple(range(0, size - tile, stride)) + (size - tile,)


def plan_tiles(height: int, width: int, tile: int | None = None, overlap: int = 16,
               limits: ShapeLimits | None = None) -> TilePlan:
    """The tiles for an image of ``height`` x ``width``.

    ``tile`` None or 0: the whole image when the artifact takes it, else the largest tile it
    takes. A tile outside the artifact's range is moved into it (with a note), and so is an
    overlap that no longer fits the tile; a requested overlap >= the requested tile is an error.
    """
    if tile is not None and tile < 0:
        raise OptionError(f"--tile {tile}: pass 0 (whole image) or a positive tile size")
    if overlap < 0:
        raise OptionError(f"--overlap {overlap}: pass 0 or more")
    if tile and overlap >= tile:
        raise OptionError(f"--overlap {overlap} must be smaller than --tile {tile}; lower --overlap or raise --tile")
    limits = limits or ShapeLimits(0)
    notes: list[str] = []
    sizes, tiles, overlaps, starts = [], [], [], []
    for name, size, lo, hi in (("height", height, limits.min_hw[0], limits.max_hw[0]),
                               ("width", width, limits.min_hw[1], limits.max_hw[1])):
        want = tile or size
        t = want
        if hi is not None and t > hi:
            t = hi
            if tile:
                notes.append(f"tile {name} {want} lowered to {hi}, the largest the artifact takes ({limits.source})")
        if t < lo:
            t = lo
            if tile:
                notes.append(f"tile {name} {want} raised to {lo}, the smallest the artifact takes ({limits.source})")
        padded = max(size, lo)
        if padded > size:
            notes.append(f"image {name} {size} mirror-padded to {padded}, the smallest the artifact takes "
                         f"({limits.source}); the output is cropped back")
        t = min(t, padded)
        o = overlap
        if padded > t and o >= t:
            o = t // 4
            notes.append(f"overlap {overlap} lowered to {o} to fit the {t}-pixel tile {name}")
        sizes.append(padded)
        tiles.append(t)
        overlaps.append(o)
        starts.append(_starts(padded, t, o))
    return TilePlan((height, width), tuple(sizes), tuple(tiles), tuple(overlaps), tuple(starts),  # type: ignore[arg-type]
                    tuple(notes))


def mirror_pad(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom/right to ``size`` with mirrored copies (edge included)."""
    for dim, target in ((2, size[0]), (3, size[1])):
        while x.shape[dim] < target:
            x = torch.cat([x, torch.flip(x, [dim])], dim)
        x = x.narrow(dim, 0, target)
    return x


def _ramp(n: int, overlap: int) -> torch.Tensor:
    """1-D blend weights: linear ramp over the first/last ``overlap`` samples.

    Weights stay > 0, and the sum is divided out, so pixels that only one
    tile covers (image borders) come out with weight exactly 1.
    """
    w = torch.ones(n)
    if overlap > 0:
        r = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        k = min(overlap, n // 2)
        w[:k] = r[:k]
        w[n - k:] = torch.minimum(w[n - k:], r[:k].flip(0))
    return w


def _batched(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, max_batch: int | None) -> torch.Tensor:
    if not max_batch or x.shape[0] <= max_batch:
        return run(x)
    return torch.cat([run(part) for part in torch.split(x, max_batch)])


@torch.no_grad()
def tiled_run(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int,
              plan: TilePlan | None = None, limits: ShapeLimits | None = None, tile: int | None = None,
              overlap: int = 16, progress: bool = False) -> torch.Tensor:
    """``run`` over ``x`` (B, C, H, W) in the tiles of ``plan`` (planned here when not given)."""
    b, c, h, w = x.shape
    plan = plan or plan_tiles(h, w, tile, overlap, limits)
    max_batch = limits.max_batch if limits is not None else None
    xp = mirror_pad(x, plan.padded) if plan.padded != (h, w) else x
    if plan.whole:
        y = _batched(run, xp, max_batch)
        return y[..., : h * scale, : w * scale]
    (th, tw), (oh, ow) = plan.tile, plan.overlap
    ph, pw = plan.padded
    out = None
    weight = torch.zeros(1, 1, ph * scale, pw * scale)
    blend = _ramp(th * scale, oh * scale)[:, None] * _ramp(tw * scale, ow * scale)[None]
    boxes: Iterable = plan.boxes
    if progress:
        boxes = tqdm(plan.boxes, desc="tiles", leave=False, unit="tile")
    for i, j in boxes:
        y = _batched(run, xp[:, :, i:i + th, j:j + tw], max_batch)
        if out is None:
            out = torch.zeros(b, y.shape[1], ph * scale, pw * scale, dtype=y.dtype, device=y.device)
        ys, xs = slice(i * scale, (i + th) * scale), slice(j * scale, (j + tw) * scale)
        out[:, :, ys, xs] += y * blend.to(y.device)
        weight[:, :, ys, xs] += blend
    out = out / weight.to(out.device)
    return out[..., : h * scale, : w * scale]
