"""The real MambaIRv2-light weights beat bicubic by the published margin (example.png)."""

from __future__ import annotations

import pytest

from qmamba_deploy import load_model
from qmamba_deploy.data.datasets import load_pairs
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.evaluate import evaluate_model

from .conftest import CHECKPOINTS, IMAGES, need

# checkpoints/README.md: official MambaIRv2Light, deterministic routing, BasicSR metrics.
EXPECTED = {2: (33.0933, 0.9277, 29.9143, 0.8853), 4: (29.3833, 0.8275, 25.5842, 0.7433)}


@pytest.mark.parametrize("scale", [2, 4])
def test_real_weights_on_example_png(scale):
    model = load_model(need(CHECKPOINTS / f"mambairv2_light_x{scale}.safetensors"))
    deg = Degradation("sr", scale)
    (score,) = evaluate_model(model, load_pairs(str(need(IMAGES / "example.png")), deg), deg).scores
    psnr, ssim, psnr_bic, ssim_bic = EXPECTED[scale]
    assert score.psnr == pytest.approx(psnr, abs=5e-4)
    assert score.ssim == pytest.approx(ssim, abs=5e-4)
    assert score.psnr_baseline == pytest.approx(psnr_bic, abs=5e-4)
    assert score.ssim_baseline == pytest.approx(ssim_bic, abs=5e-4)
    assert score.gain_db > 3.0
