"""Built-in sample photos that ship inside scikit-image (usable offline).

``--input builtin`` / ``--data builtin`` use them. For restore, small centre
crops keep the embedded-default run fast on a CPU.
"""

from __future__ import annotations

import numpy as np

from .io import Image

#: The photos used by `restore` with no input: (scikit-image name, crop size).
RESTORE_SAMPLES = (("astronaut", 96), ("chelsea", 96), ("coffee", 96))


def sample_photo(name: str) -> np.ndarray:
    """A scikit-image photo as uint8 HWC RGB (gray photos get one channel)."""
    import skimage.data

    try:
        arr = getattr(skimage.data, name)()
    except AttributeError:
        raise ValueError(f"scikit-image has no sample photo {name!r}") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


def centre_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return arr[top:top + size, left:left + size]


def restore_samples() -> list[Image]:
    """The built-in inputs of `qmamba-deploy restore` (centre crops, 8-bit RGB)."""
    return [Image(centre_crop(sample_photo(name), size).astype(np.float32) / 255.0, 8, None, f"builtin:{name}")
            for name, size in RESTORE_SAMPLES]
