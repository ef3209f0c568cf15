"""Quality of a model on one HR image, measured like the papers (BasicSR conventions).

LR = MATLAB-bicubic downscale of HR (antialiased), rounded to uint8 as a saved
PNG; SR = model(LR); bicubic baseline = MATLAB-bicubic upscale of the LR;
Y-PSNR / SSIM with crop_border = scale after tensor2img-style rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from .data.imresize import imresize
from .metrics import psnr_y, ssim_y, to_uint8
from .restore import restore_tensor


@dataclass
class SRScore:
    image: str
    scale: int
    lr_size: tuple[int, int]
    psnr_y: float
    ssim_y: float
    psnr_y_bicubic: float
    ssim_y_bicubic: float

    @property
    def gain_db(self) -> float:
        return self.psnr_y - self.psnr_y_bicubic

    def as_dict(self) -> dict:
        return {**asdict(self), "gain_db": self.gain_db}


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


@torch.no_grad()
def score_sr(model: nn.Module, hr: np.ndarray, name: str = "", tile: int | None = None) -> SRScore:
    """hr: float32 RGB HWC in [0, 1] (8-bit values)."""
    scale = int(model.upscale)
    hr = mod_crop(hr, scale)
    lr = to_uint8(imresize(hr, 1.0 / scale)).astype(np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None]
    sr = restore_tensor(model, x, tile=tile)[0].numpy().transpose(1, 2, 0)
    bic = imresize(lr, scale)
    return SRScore(name, scale, lr.shape[:2], psnr_y(sr, hr, scale), ssim_y(sr, hr, scale),
                   psnr_y(bic, hr, scale), ssim_y(bic, hr, scale))
