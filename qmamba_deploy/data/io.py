"""Image files <-> float arrays, with BasicSR's conventions.

Decoding uses OpenCV (as BasicSR does), so 8- and 16-bit PNG, JPEG, BMP,
TIFF and WebP read to the same pixels as the papers' evaluation code.
Arrays are float32 HWC in [0, 1], RGB channel order (or one gray channel).
Writing rounds like BasicSR's ``tensor2img`` (clip, scale, round).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image as PILImage

from ..artifacts import atomic_path
from ..errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Images larger than this are refused before they are decoded (``--max-megapixels`` raises it):
#: a 10-kilobyte PNG can claim 100000 x 100000 pixels.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass
class Image:
    """A decoded image: float32 HWC in [0, 1] (C = 1 or 3), plus what the file was."""

    pixels: np.ndarray
    bit_depth: int  # 8 or 16
    alpha: np.ndarray | None = None  # float32 HW in [0, 1] when the file had one
    path: str = ""

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])


def _cv2():
    return cv2


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as the file's header claims it, read without decoding the pixels (None: unknown)."""

    # PIL's own decompression-bomb guard would refuse to say the size of exactly the files this
    # check exists for; PIL is used here for headers only, and the limit below is ours.
    PILImage.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's own decompression-bomb warning: we decide below
            with PILImage.open(path) as im:
                return tuple(int(v) for v in im.size)  # type: ignore[return-value]
    except Exception:  # not a format PIL reads, or a damaged header: OpenCV decides
        return None


def check_pixels(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """One ImageError when the header claims more pixels than ``max_pixels``."""
    size = header_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(f"{path} is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} megapixels), above the "
                         f"limit of {max_pixels / 1e6:g} megapixels; pass --max-megapixels "
                         f"{-(-size[0] * size[1] // 1_000_000)} to allow it")


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """Decode an image file; one clear ImageError for anything unusable (sizes checked first)."""
    cv2 = _cv2()
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    check_pixels(path, max_pixels)
    data = np.fromfile(str(path), dtype=np.uint8)
    try:
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:  # OpenCV's own limits (e.g. its pixel cap) on a file PIL could not read
        arr = None
    if arr is None:
        raise ImageError(
            f"{path} is not an image OpenCV can decode; pass a PNG, JPEG, BMP, TIFF or WebP file")
    if arr.dtype == np.uint8:
        bit_depth, scale = 8, 255.0
    elif arr.dtype == np.uint16:
        bit_depth, scale = 16, 65535.0
    else:
        raise ImageError(f"{path} has {arr.dtype} pixels; only 8- and 16-bit integer images are supported")
    pixels = arr.astype(np.float32) / scale
    alpha = None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    elif pixels.shape[2] == 3:
        pixels = pixels[:, :, ::-1]  # BGR -> RGB
    elif pixels.shape[2] == 4:
        alpha = np.ascontiguousarray(pixels[:, :, 3])
        pixels = pixels[:, :, 2::-1]  # BGRA -> RGB
    else:
        raise ImageError(f"{path} has {pixels.shape[2]} channels; pass a grayscale, RGB or RGBA image")
    return Image(np.ascontiguousarray(pixels), bit_depth, alpha, str(path))


def to_integer(pixels: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float [0, 1] -> uint8/uint16 like BasicSR's tensor2img (clip, scale, round)."""
    if bit_depth not in (8, 16):
        raise ImageError(f"bit depth {bit_depth} is not supported; use 8 or 16")
    peak = 255.0 if bit_depth == 8 else 65535.0
    out = np.round(np.clip(pixels, 0.0, 1.0) * peak)
    return out.astype(np.uint8 if bit_depth == 8 else np.uint16)


def write_image(path: str | os.PathLike, pixels: np.ndarray, bit_depth: int = 8,
                alpha: np.ndarray | None = None) -> None:
    """Encode float [0, 1] HWC (RGB or gray) to ``path``; atomic (no partial file)."""
    cv2 = _cv2()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageError(f"output {path} has an unknown image suffix; use one of {', '.join(IMAGE_SUFFIXES)}")
    if bit_depth == 16 and suffix not in (".png", ".tif", ".tiff"):
        raise ImageError(f"output {path}: 16-bit images need .png or .tif; use --bit-depth 8 or a .png name")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    arr = to_integer(pixels, bit_depth)
    if arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    if alpha is not None:
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        arr = np.concatenate([arr, to_integer(alpha, bit_depth)[:, :, None]], axis=2)
    ok, encoded = cv2.imencode(suffix, np.ascontiguousarray(arr))
    if not ok:
        raise ImageError(f"OpenCV could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def list_images(path: str | os.PathLike) -> list[Path]:
    """The image files of a folder (sorted), or the file itself."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ImageError(f"folder {path} contains no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.exists():
        raise ImageError(f"input {path} does not exist; pass an image file or a folder of images")
    return [path]
