"""Quality of a model on a set of images, measured like the papers (BasicSR conventions).

For each pair the degraded input is a uint8 image (bicubic LR as a saved
PNG, noisy or JPEG-decoded picture); the model output is rounded to uint8
like BasicSR's ``tensor2img``; Y-PSNR / SSIM use ``crop_border`` = scale for
SR and 0 otherwise. Beside every score stands the no-model baseline
(bicubic upscale, the noisy input or the JPEG), measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .data.datasets import Pair, degrade_pair, to_tensor
from .data.degrade import Degradation
from .metrics import calculate_psnr, calculate_ssim, to_uint8


@dataclass
class ImageScore:
    image: str
    input_size: tuple[int, int]
    psnr: float
    ssim: float
    psnr_baseline: float
    ssim_baseline: float

    @property
    def gain_db(self) -> float:
        return self.psnr - self.psnr_baseline

    def as_dict(self) -> dict:
        return {**asdict(self), "gain_db": self.gain_db}


@dataclass
class EvalReport:
    """Per-image scores and their means; ``as_dict`` is the ``--json`` format."""

    degradation: Degradation
    scores: list[ImageScore]
    metric: str = "Y-PSNR/SSIM (BT.601), BasicSR conventions"

    def mean(self, key: str) -> float:
        return float(np.mean([getattr(s, key) for s in self.scores]))

    @property
    def summary(self) -> dict[str, float]:
        return {k: self.mean(k) for k in ("psnr", "ssim", "psnr_baseline", "ssim_baseline", "gain_db")}

    def as_dict(self) -> dict:
        return {"degradation": self.degradation.as_dict(), "metric": self.metric,
                "baseline": self.degradation.baseline_name, "crop_border": self.degradation.crop_border,
                "mean": self.summary, "images": [s.as_dict() for s in self.scores]}

    def table(self) -> str:
        base = self.degradation.baseline_name
        head = (f"{'image':<22} {'input':>9} {'PSNR':>8} {'SSIM':>7} {base + ' PSNR':>13} {base + ' SSIM':>13} "
                f"{'gain':>7}")
        rows = [head, "-" * len(head)]
        for s in self.scores:
            size = f"{s.input_size[1]}x{s.input_size[0]}"
            rows.append(f"{s.image[:22]:<22} {size:>9} {s.psnr:8.4f} {s.ssim:7.4f} {s.psnr_baseline:13.4f} "
                        f"{s.ssim_baseline:13.4f} {s.gain_db:+7.2f}")
        m = self.summary
        rows.append("-" * len(head))
        rows.append(f"{'mean':<22} {'':>9} {m['psnr']:8.4f} {m['ssim']:7.4f} {m['psnr_baseline']:13.4f} "
                    f"{m['ssim_baseline']:13.4f} {m['gain_db']:+7.2f}")
        return "\n".join(rows)


def _y(img: np.ndarray) -> bool:
    return img.shape[2] == 3


def score_image(output: np.ndarray, gt: np.ndarray, baseline: np.ndarray, name: str, input_size,
                crop_border: int) -> ImageScore:
    """uint8 HWC RGB (or gray) arrays -> one ImageScore (Y channel for colour)."""
    y = _y(gt)
    kw = dict(crop_border=crop_border, test_y_channel=y, channel_order="RGB")
    return ImageScore(name, tuple(input_size), calculate_psnr(output, gt, **kw), calculate_ssim(output, gt, **kw),
                      calculate_psnr(baseline, gt, **kw), calculate_ssim(baseline, gt, **kw))


def image_psnr(output: torch.Tensor, gt: np.ndarray, crop_border: int) -> float:
    """A model output's (1, C, H, W) Y-PSNR (gray: PSNR) against a uint8 ground truth, rounded and scored as
    ``evaluate_pairs`` scores it."""
    return calculate_psnr(to_uint8_image(output.float()), gt, crop_border=crop_border, test_y_channel=_y(gt),
                          channel_order="RGB")


def to_uint8_image(t: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) float in [0, 1] -> uint8 HWC, BasicSR's tensor2img rounding (``metrics.to_uint8``)."""
    return to_uint8(t[0].permute(1, 2, 0))


def evaluate_pairs(run: Callable[[torch.Tensor], torch.Tensor], pairs: Iterable[Pair], degradation: Degradation,
                   seed: int = 0, progress: bool = False) -> EvalReport:
    """Score ``run`` (a float NCHW -> float NCHW function, e.g. a model) on every pair."""
    pairs = list(pairs)
    if progress:
        pairs = tqdm(pairs, desc="eval", unit="img", leave=False)
    scores = []
    for pair in pairs:
        lq = degrade_pair(pair, degradation, seed)
        out = to_uint8_image(run(to_tensor(lq)))
        if out.shape != pair.gt.shape:
            raise ValueError(f"{pair.name}: the model returned {out.shape[1]}x{out.shape[0]}x{out.shape[2]} "
                             f"for a {pair.gt.shape[1]}x{pair.gt.shape[0]}x{pair.gt.shape[2]} ground truth; "
                             f"check --scale / --task against the checkpoint")
        scores.append(score_image(out, pair.gt, degradation.baseline(lq), pair.name, lq.shape[:2],
                                  degradation.crop_border))
    return EvalReport(degradation, scores)


def evaluate_model(model: nn.Module, pairs: Iterable[Pair], degradation: Degradation, device="cpu",
                   seed: int = 0, progress: bool = False) -> EvalReport:
    """Score an nn.Module on whole images (in eval mode for the run; training mode restored).

    Runners and tiles: ``jobs.evaluate.evaluate_runner``."""
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).cpu()

    try:
        return evaluate_pairs(run, pairs, degradation, seed, progress)
    finally:
        model.train(was_training)
