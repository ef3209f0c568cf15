"""Built-in sample photos that ship inside scikit-image (usable offline).

``--data builtin`` and ``--input builtin`` use them. The split is fixed:

* **train** — every other photo scikit-image ships without a download:
  the stereo motorcycle pair, Hubble deep field, immunohistochemistry,
  retina, and the gray photos/textures (camera, moon, coins, clock, page,
  text, brick, grass, gravel; replicated to RGB for colour models).
* **eval** — four natural colour photos (astronaut, chelsea, coffee,
  rocket), as centre crops of at most ``EVAL_CROP`` pixels so that a CPU
  evaluation takes seconds. 288 is a multiple of 2, 3, 4 and 8, so no
  mod-crop is needed.

Nothing here is random: the same names, the same crops, every time.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import skimage.data

from .io import Image, read_image, to_integer

TRAIN_PHOTOS = ("motorcycle_left", "motorcycle_right", "hubble_deep_field", "immunohistochemistry", "retina",
                "camera", "moon", "coins", "clock", "page", "text", "brick", "grass", "gravel")
EVAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
EVAL_CROP = 288
SPLITS = {"train": TRAIN_PHOTOS, "eval": EVAL_PHOTOS}

#: The photos used by `restore` with no input: (scikit-image name, crop size).
RESTORE_SAMPLES = (("astronaut", 96), ("chelsea", 96), ("coffee", 96))


def sample_photo(name: str) -> np.ndarray:
    """A scikit-image photo as uint8 HWC (RGB, or one channel for gray photos)."""

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        try:
            arr = getattr(skimage.data, name)()
        except AttributeError:
            raise ValueError(f"scikit-image has no sample photo {name!r}") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


def centre_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return arr[top:top + size, left:left + size]


def builtin_split(split: str) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 HWC) for every photo of ``split`` ('train' or 'eval')."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use 'train' or 'eval'")
    photos = [(name, sample_photo(name)) for name in SPLITS[split]]
    if split == "eval":
        photos = [(name, np.ascontiguousarray(centre_crop(arr, EVAL_CROP))) for name, arr in photos]
    return photos


@functools.lru_cache(maxsize=1)
def _eval_photos_whole_and_cropped() -> tuple[tuple[str, np.ndarray], ...]:
    """(label, uint8 HWC) of every eval photo, whole and as its eval crop — decoded once per process."""
    out = []
    for name in EVAL_PHOTOS:
        whole = sample_photo(name)
        out += [(name, whole), (f"{name} (eval crop)", centre_crop(whole, EVAL_CROP))]
    return tuple(out)


def eval_photo_of(pixels: np.ndarray) -> str | None:
    """The eval photo ``pixels`` (uint8 HWC) is, whole or as its eval crop (e.g. 'coffee (eval crop)'), or None:
    what keeps a training folder from holding the images the eval split scores."""
    return next((label for label, arr in _eval_photos_whole_and_cropped() if np.array_equal(arr, pixels)), None)


def eval_photo_in_file(path: str | os.PathLike) -> str | None:
    """:func:`eval_photo_of` for an image file (read as `eval` reads it; ImageError when unreadable)."""
    return eval_photo_of(to_integer(read_image(path).pixels))


def restore_samples() -> list[Image]:
    """The built-in inputs of `qmamba-deploy restore` (centre crops, 8-bit RGB)."""
    return [Image(centre_crop(sample_photo(name), size).astype(np.float32) / 255.0, 8, None, f"builtin:{name}")
            for name, size in RESTORE_SAMPLES]
