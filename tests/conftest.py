"""Shared test helpers: where the ../shared fixtures are, and tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs two workers on the two cores: one torch thread each, here and in the
    # processes the tests start (two torch processes of two threads each run many times slower)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "fixtures" / "parity"
CHECKPOINTS = SHARED / "checkpoints"
IMAGES = SHARED / "images"


def need(path: Path) -> Path:
    """Skip the test (with the reason) when a ../shared fixture is absent."""
    if not path.exists():
        pytest.skip(f"{path} is not available (CI has ../shared beside the clone)")
    return path


def parity_case(name: str):
    """(config, state_dict, input, output) of a parity fixture."""
    from safetensors.torch import load_file

    folder = need(PARITY / name)
    config = json.loads((folder / "config.json").read_text())
    sd_file = folder / "state_dict.safetensors"
    sd = load_file(str(sd_file)) if sd_file.exists() else None
    x = torch.from_numpy(np.load(folder / "input.npy"))
    y = np.load(folder / "output.npy")
    return config, sd, x, y


TINY_V1 = dict(upscale=2, in_chans=3, embed_dim=32, d_state=4, depths=[2], mlp_ratio=1.2,
               upsampler="pixelshuffledirect")
TINY_V2 = dict(upscale=2, in_chans=3, embed_dim=24, d_state=4, depths=[2], num_heads=[2], window_size=8,
               inner_rank=8, num_tokens=16, mlp_ratio=1.0, upsampler="pixelshuffledirect")


@pytest.fixture
def tiny_v2():
    from qmamba_deploy import build_model

    torch.manual_seed(0)
    return build_model("MambaIRv2Light", **TINY_V2).eval()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_v2):
    """tiny_v2 saved as a checkpoint with its manifest."""
    from qmamba_deploy import save_checkpoint

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_v2, path)
    return path
