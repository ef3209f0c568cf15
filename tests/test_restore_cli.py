"""restore (tiling, image formats, bad input) and the CLI commands."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from qmamba_deploy import build_model, save_checkpoint
from qmamba_deploy.cli import main
from qmamba_deploy.errors import OptionError
from qmamba_deploy.jobs.restore import restore_tensor

from .conftest import CHECKPOINTS, TINY_V2, need


class LocalUpscaler(nn.Module):
    """A model with a 1-pixel receptive field: tiling must not change its output."""

    upscale = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def test_tiled_equals_whole_for_a_local_model():
    torch.manual_seed(0)
    model = LocalUpscaler().eval()
    x = torch.rand(1, 3, 45, 37)
    whole = restore_tensor(model, x)
    tiled = restore_tensor(model, x, tile=16, overlap=4)
    assert tiled.shape == whole.shape == (1, 3, 90, 74)
    assert torch.allclose(tiled, whole, atol=1e-6)


def test_tiled_mambair_is_close_to_whole(tiny_v2):
    x = torch.rand(1, 3, 40, 40)
    whole = restore_tensor(tiny_v2, x)
    tiled = restore_tensor(tiny_v2, x, tile=24, overlap=8)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.05  # tiles see less context, nothing more


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(OptionError, match="--overlap"):
        restore_tensor(LocalUpscaler(), torch.rand(1, 3, 40, 40), tile=8, overlap=8)


def _write(path, arr):
    assert cv2.imwrite(str(path), arr)
    return path


def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def test_restore_formats(tmp_path, tiny_ckpt):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "rgb8.png", rng.integers(0, 256, (20, 18, 3), dtype=np.uint8))
    _write(src / "rgb16.png", rng.integers(0, 65536, (20, 18, 3), dtype=np.uint16))
    _write(src / "gray.png", rng.integers(0, 256, (20, 18), dtype=np.uint8))
    _write(src / "photo.jpg", rng.integers(0, 256, (20, 18, 3), dtype=np.uint8))
    _write(src / "rgba.png", rng.integers(0, 256, (20, 18, 4), dtype=np.uint8))
    (src / "notes.txt").write_text("not an image, ignored in folders")
    out = tmp_path / "out"
    result = _run("restore", "--checkpoint", tiny_ckpt, "--input", src, "--output", out, "--tile", 16, "--overlap", 4)
    assert result.exit_code == 0, result.output
    read = {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in out.iterdir()}
    assert sorted(read) == ["gray", "photo", "rgb16", "rgb8", "rgba"]
    assert read["rgb8"].shape == (40, 36, 3) and read["rgb8"].dtype == np.uint8
    assert read["rgb16"].dtype == np.uint16
    assert read["gray"].shape == (40, 36)
    assert read["rgba"].shape == (40, 36, 4)
    assert "grayscale input restored as RGB" in result.output


def test_restore_bad_inputs(tmp_path, tiny_ckpt):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text, not a PNG")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["restore", "--checkpoint", str(tiny_ckpt), "--input", str(fake),
                                       "--output", str(out)])
    assert result.exit_code == 2
    assert "is not an image OpenCV can decode" in result.output
    assert not out.exists() or not any(out.iterdir())  # no partial output

    gray_model = build_model("MambaIRv2Light", **dict(TINY_V2, in_chans=1))
    save_checkpoint(gray_model, tmp_path / "gray.safetensors")
    rgb = _write(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    result = CliRunner().invoke(main, ["restore", "--checkpoint", str(tmp_path / "gray.safetensors"),
                                       "--input", str(rgb), "--output", str(out)])
    assert result.exit_code == 2 and "model takes grayscale" in result.output

    result = CliRunner().invoke(main, ["restore", "--checkpoint", str(rgb), "--output", str(out)])
    assert result.exit_code == 2 and "rgb.png is an image, not a model" in result.output
    bad_ckpt = tmp_path / "broken.pth"
    bad_ckpt.write_bytes(b"PK\x03\x04 truncated zip")
    result = CliRunner().invoke(main, ["restore", "--checkpoint", str(bad_ckpt), "--output", str(out)])
    assert result.exit_code == 2 and "could not be read as a torch checkpoint" in result.output


def test_info_on_real_weights(tmp_path):
    path = need(CHECKPOINTS / "mambairv2_light_x4.safetensors")
    result = _run("info", path, "--json", tmp_path / "info.json")
    assert result.exit_code == 0, result.output
    assert "MambaIRv2Light  (detected)" in result.output and "789,680" in result.output
    import json

    summary = json.loads((tmp_path / "info.json").read_text())
    assert summary["scale"] == 4 and summary["kwargs"]["window_size"] == 16


def test_presets_lists_counts():
    result = _run("presets")
    assert result.exit_code == 0
    assert "mambairv2-l-x4" in result.output and "34,238,235" in result.output


def test_restore_flag_errors(tmp_path, tiny_ckpt):
    result = CliRunner().invoke(main, ["restore", "--checkpoint", str(tiny_ckpt), "--tile", "8", "--overlap", "8",
                                       "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--overlap" in result.output


def test_restore_with_the_embedded_default(tmp_path):
    """restore with no checkpoint and no input: the embedded default on the built-in photos."""
    from qmamba_deploy.defaults import DEFAULT_MODELS, models_dir

    if not (models_dir() / DEFAULT_MODELS[2]).is_file():
        pytest.skip("the embedded default model is not in this checkout")
    res = CliRunner().invoke(main, ["restore", "--output", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "mambairv2_tiny_x2" in res.output
    outs = sorted(tmp_path.glob("*.png"))
    assert [p.stem for p in outs] == ["astronaut", "chelsea", "coffee"]
    assert all(cv2.imread(str(p)).shape == (192, 192, 3) for p in outs)
