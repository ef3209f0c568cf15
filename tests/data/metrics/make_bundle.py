"""Rebuild bundle.npz / expected.json here from ../shared/fixtures/metrics.

Run from the repository root: ``python3 tests/data/metrics/make_bundle.py``.
The bundle keeps a subset (< 200 KB) so tests/test_metrics.py runs without
../shared; the full set is tested when ../shared is present.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[3] / "shared" / "fixtures" / "metrics"

ARRAYS = [
    # imresize inputs (the float64 inputs are exactly these / 255)
    "imresize_input_20x16_rgb_u8",
    "imresize_input_60x48_rgb_u8",
    # official BasicSR imresize outputs: float32 values saved as float64 -> stored as float32 (lossless)
    "imresize_60x48_down2",
    "imresize_60x48_down3",
    "imresize_60x48_down4",
    "imresize_60x48_down2_noaa",
    "imresize_60x48_down3_noaa",
    "imresize_20x16_up2",
    "imresize_20x16_up3",
    # PSNR / SSIM inputs (uint8, BGR for colour)
    "baboon_crop",
    "baboon_crop_noisy_s10",
    "baboon_crop_gray",
    "baboon_crop_gray_noisy",
    "baboon_hr_90x108",
    "baboon_bicubic_x3_90x108",
]


def main() -> None:
    out = {}
    for name in ARRAYS:
        a = np.load(SRC / f"{name}.npy")
        if a.dtype == np.float64:
            f = a.astype(np.float32)
            assert np.array_equal(f.astype(np.float64), a), name
            a = f
        out[name] = a
    np.savez_compressed(HERE / "bundle.npz", **out)
    shutil.copyfile(SRC / "expected.json", HERE / "expected.json")


if __name__ == "__main__":
    main()
