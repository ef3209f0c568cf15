"""The three degradations of the MambaIR papers, on uint8 images.

* ``sr``: MATLAB-bicubic downscale by ``scale`` (antialiased), rounded to
  uint8 like a saved LR PNG (BasicSR's benchmark LR_bicubic sets). The
  baseline is the MATLAB-bicubic upscale of that LR.
* ``denoise``: additive Gaussian noise of std ``sigma`` (on the 0..255
  scale), rounded and clipped like a saved noisy PNG. The baseline is the
  noisy image itself.
* ``jpeg``: JPEG at ``quality`` (libjpeg defaults, 4:2:0 chroma subsampling
  for colour, through OpenCV), decoded again. The baseline is the decoded
  JPEG.

Every function takes and returns uint8 HWC arrays (C = 1 or 3); the channel
order does not matter to them. ``../shared/fixtures/metrics`` holds noisy and
JPEG pictures made this way, and the tests reproduce them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import OptionError
from .imresize import imresize

TASKS = ("sr", "denoise", "jpeg")


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of ``scale``."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def _round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def bicubic_down(hr: np.ndarray, scale: int) -> np.ndarray:
    """uint8 HR (a multiple of ``scale``) -> uint8 LR, MATLAB bicubic with antialiasing."""
    return _round_u8(imresize(hr.astype(np.float32), 1.0 / scale))


def bicubic_up(lr: np.ndarray, scale: int) -> np.ndarray:
    return _round_u8(imresize(lr.astype(np.float32), scale))


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """clip(round(img + N(0, sigma))) with ``rng.normal`` drawn in array order."""
    return _round_u8(img.astype(np.float64) + rng.normal(0.0, sigma, img.shape))


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode at ``quality`` and decode again (OpenCV's libjpeg; 4:2:0 for colour)."""

    squeeze = img.ndim == 3 and img.shape[2] == 1
    arr = img[:, :, 0] if squeeze else img
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(arr), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 images
        raise RuntimeError("OpenCV could not JPEG-encode the image")
    out = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    return out[:, :, None] if squeeze else out


@dataclass(frozen=True)
class Degradation:
    """One of the papers' tasks with its level: ``sr`` x scale, ``denoise`` sigma, ``jpeg`` quality."""

    task: str = "sr"
    scale: int = 2
    sigma: float = 25.0
    quality: int = 40

    def __post_init__(self):
        if self.task not in TASKS:
            raise OptionError(f"task {self.task!r} is unknown; use --task {' / '.join(TASKS)}")
        if self.task == "sr" and self.scale not in (2, 3, 4, 8):
            raise OptionError(f"--scale {self.scale} is not supported for super-resolution; use 2, 3, 4 or 8")
        if self.task == "denoise" and not 0 < self.sigma <= 100:
            raise OptionError(f"--sigma {self.sigma} is out of range; use a noise level in (0, 100] (0..255 scale)")
        if self.task == "jpeg" and not 1 <= self.quality <= 100:
            raise OptionError(f"--quality {self.quality} is out of range; use a JPEG quality in 1..100")

    @property
    def out_scale(self) -> int:
        """Output size / input size of the restoration model."""
        return self.scale if self.task == "sr" else 1

    @property
    def crop_border(self) -> int:
        """Border excluded from PSNR/SSIM (BasicSR: the scale for SR, none otherwise)."""
        return self.scale if self.task == "sr" else 0

    @property
    def label(self) -> str:
        return {"sr": f"sr-x{self.scale}", "denoise": f"denoise-s{self.sigma:g}",
                "jpeg": f"jpeg-q{self.quality}"}[self.task]

    @property
    def baseline_name(self) -> str:
        return {"sr": "bicubic", "denoise": "noisy", "jpeg": "jpeg"}[self.task]

    def prepare(self, hr: np.ndarray) -> np.ndarray:
        """HR cropped so that the degradation is well defined (mod-crop for SR)."""
        return mod_crop(hr, self.scale) if self.task == "sr" else hr

    def apply(self, hr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """uint8 HR -> uint8 degraded input (``rng`` only used by ``denoise``)."""
        if self.task == "sr":
            return bicubic_down(hr, self.scale)
        if self.task == "denoise":
            return add_gaussian_noise(hr, self.sigma, rng if rng is not None else np.random.default_rng(0))
        return jpeg_compress(hr, self.quality)

    def baseline(self, lq: np.ndarray) -> np.ndarray:
        """The no-model answer at HR size (bicubic upscale, or the input itself)."""
        return bicubic_up(lq, self.scale) if self.task == "sr" else lq

    def as_dict(self) -> dict:
        out = {"task": self.task, "label": self.label}
        out.update({"sr": {"scale": self.scale}, "denoise": {"sigma": self.sigma},
                    "jpeg": {"quality": self.quality}}[self.task])
        return out


def model_degradation(model, task: str | None = None, scale: int | None = None, sigma: float | None = None,
                      quality: int | None = None) -> Degradation:
    """The degradation a model restores: the flags given, else its manifest's ``task``, else SR at its scale."""
    card = getattr(model, "card", None)  # a ModelCard (models sit beside data: read, not imported)
    return degradation_for(int(getattr(model, "upscale", 1)), getattr(card, "task", None),
                           task, scale, sigma, quality)


def degradation_for(upscale: int, saved: dict | None, task: str | None = None, scale: int | None = None,
                    sigma: float | None = None, quality: int | None = None) -> Degradation:
    """The degradation for a model of scale ``upscale`` whose manifest says ``saved`` (its ``task``
    entry, or None), with the flags given taking precedence."""
    saved = saved or {}
    up = int(upscale)
    task = task or saved.get("task") or ("sr" if up > 1 else None)
    if task is None:
        raise OptionError("the model does not say whether it denoises or removes JPEG artifacts; "
                          "pass --task denoise or --task jpeg")
    if task == "sr" and scale is not None and scale != up:
        raise OptionError(f"--scale {scale} does not match the model, which upscales x{up}; "
                          f"drop --scale or pass an x{scale} model")
    if task != "sr" and up != 1:
        raise OptionError(f"--task {task} needs a x1 model, but this one upscales x{up}; use --task sr")
    return Degradation(task, up if task == "sr" else 1,
                       sigma if sigma is not None else saved.get("sigma", 25.0),
                       quality if quality is not None else saved.get("quality", 40))
