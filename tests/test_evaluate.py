"""Evaluation: scores equal the metric functions, baselines, the eval command and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from qmamba_deploy import build_model, save_checkpoint
from qmamba_deploy.cli import main
from qmamba_deploy.data.datasets import Pair, load_pairs
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.defaults import DEFAULT_MODELS, models_dir
from qmamba_deploy.evaluate import evaluate_model, evaluate_pairs
from qmamba_deploy.metrics import calculate_psnr, calculate_ssim

from .conftest import CHECKPOINTS, TINY_V2, need


def _photo_pairs(deg, n=2, size=48):
    from qmamba_deploy.data.builtin import builtin_split

    return [Pair(name, np.ascontiguousarray(arr[:size, :size])) for name, arr in builtin_split("eval")[:n]]


def test_identity_on_denoise_scores_the_baseline():
    deg = Degradation("denoise", sigma=15)
    report = evaluate_pairs(lambda x: x, _photo_pairs(deg), deg)
    for s in report.scores:
        assert s.psnr == s.psnr_baseline and s.ssim == s.ssim_baseline and s.gain_db == 0
        assert 20 < s.psnr < 30  # sigma 15 noise is about 24.6 dB


def test_sr_scores_equal_the_metric_functions():
    """A model that returns the torch bicubic upscale: its score is the metric of exactly that output."""
    deg = Degradation("sr", 2)
    pairs = load_pairs("builtin", deg, split="eval")[:1]
    outputs = []

    def run(x):
        y = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        outputs.append(np.round(y[0].clamp(0, 1).numpy().transpose(1, 2, 0) * 255).astype(np.uint8))
        return y

    (s,) = evaluate_pairs(run, pairs, deg).scores
    kw = dict(crop_border=2, test_y_channel=True, channel_order="RGB")
    assert s.psnr == calculate_psnr(outputs[0], pairs[0].gt, **kw)
    assert s.ssim == calculate_ssim(outputs[0], pairs[0].gt, **kw)
    # torch's bicubic (no antialias, a = -0.75) is close to but not the MATLAB baseline
    assert abs(s.psnr - s.psnr_baseline) < 1.0 and s.psnr != s.psnr_baseline


def test_wrong_output_size_is_one_clear_error():
    deg = Degradation("sr", 4)
    with pytest.raises(ValueError, match="check --scale / --task"):
        evaluate_pairs(lambda x: F.interpolate(x, scale_factor=2), _photo_pairs(deg, 1), deg)


def test_report_json_and_table(tiny_v2):
    deg = Degradation("sr", 2)
    report = evaluate_model(tiny_v2, load_pairs("builtin", deg, split="eval")[:2], deg)
    d = report.as_dict()
    assert d["baseline"] == "bicubic" and d["crop_border"] == 2 and len(d["images"]) == 2
    assert d["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in d["images"]]))
    table = report.table()
    assert "astronaut" in table and "bicubic PSNR" in table and table.splitlines()[-1].startswith("mean")
    assert not tiny_v2.training


def test_eval_cli_errors(tiny_ckpt, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["eval", "--checkpoint", str(tiny_ckpt), "--scale", "4", "--quiet"])
    assert res.exit_code == 2 and "--scale 4 does not match the model, which upscales x2" in res.output
    res = runner.invoke(main, ["eval", "--checkpoint", str(tiny_ckpt), "--task", "denoise", "--quiet"])
    assert res.exit_code == 2 and "needs a x1 model" in res.output
    res = runner.invoke(main, ["eval", "--checkpoint", str(tiny_ckpt), "--data", str(tmp_path / "nope"), "--quiet"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(main, ["eval", "--scale", "3", "--quiet"])
    assert res.exit_code == 2 and "no embedded default model for x3" in res.output


def test_eval_cli_denoise_on_a_x1_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("MambaIRv2Light", **{**TINY_V2, "upscale": 1, "upsampler": ""})
    ckpt = tmp_path / "dn.safetensors"
    save_checkpoint(model, ckpt)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(ckpt), "--task", "denoise", "--sigma", "50",
                                    "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["degradation"] == {"task": "denoise", "label": "denoise-s50", "sigma": 50.0}
    assert data["crop_border"] == 0 and data["kind"] == "qmamba-deploy eval report"
    # Y noise std = 50 * |(65.481, 128.553, 24.966)| / 255 = 28.7 -> 19.0 dB (clipping raises it a little)
    assert all(18.5 < r["psnr_baseline"] < 21 for r in data["images"])


def test_eval_real_x4_weights_on_builtin(tmp_path):
    ckpt = need(CHECKPOINTS / "mambairv2_light_x4.safetensors")
    out = tmp_path / "x4.json"
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(ckpt), "--data", "builtin", "--scale", "4",
                                    "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "astronaut" in res.output and "mean" in res.output and "sr-x4" in res.output
    data = json.loads(out.read_text())
    assert [r["input_size"] for r in data["images"]] == [[72, 72]] * 4
    assert data["mean"]["gain_db"] > 1.0  # the released model is far better than bicubic


@pytest.mark.parametrize("scale,min_gain", [(2, 1.0), (4, 0.3)])
def test_embedded_defaults_beat_bicubic_on_the_builtin_eval_split(scale, min_gain):
    """The claim of the model cards, re-measured: eval with no --checkpoint uses the shipped model."""
    if not (models_dir() / DEFAULT_MODELS[scale]).is_file():
        pytest.skip(f"models/{DEFAULT_MODELS[scale]} is not in this checkout")
    res = CliRunner().invoke(main, ["eval", "--scale", str(scale), "--quiet"])
    assert res.exit_code == 0, res.output
    card = (models_dir() / DEFAULT_MODELS[scale].replace(".safetensors", ".md")).read_text()
    mean = [line for line in res.output.splitlines() if line.startswith("mean")][0].split()
    psnr, gain = float(mean[1]), float(mean[-1])
    assert gain >= min_gain
    row = [line for line in card.splitlines() if line.startswith("| **mean**")][0]
    card_psnr = float(row.split("|")[3].strip(" *"))
    assert psnr == pytest.approx(card_psnr, abs=1e-3)  # the card states the figure this checkout reproduces


def test_validate_tells_a_sensitive_candidate_from_one_that_loses_quality():
    """Agreement alone cannot tell chaos from a bug. Two outputs that carry different noise of the
    same strength are equally good and disagree (~41 dB): the candidate is 'sensitive' (it fails the
    50 dB rule only); a dimmed output loses quality ('quality lost') even where it agrees enough."""
    from qmamba_deploy.jobs.validate import Output, validate_outputs

    deg = Degradation("sr", 2)

    def noisy(seed):
        def run(x):
            y = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
            return (y + 0.006 * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
        return run

    reference = noisy(1)
    outputs = [Output("ref", reference), Output("same", reference, reference="ref"),
               Output("noisy", noisy(2), reference="ref"),
               Output("dim", lambda x: 0.97 * reference(x), reference="ref")]
    report = validate_outputs(outputs, _photo_pairs(deg), deg)
    by_name = {o.name: o for o in report.outputs}
    assert (by_name["same"].passed, by_name["same"].diagnosis) == (True, "agrees")
    assert by_name["same"].summary()["psnr_vs_reference"] == 0
    assert (by_name["noisy"].passed, by_name["noisy"].diagnosis) == (False, "sensitive")
    assert abs(by_name["noisy"].summary()["psnr_vs_reference"]) < 0.1
    # the dimmed output agrees at the lower threshold but loses quality
    report = validate_outputs(outputs, _photo_pairs(deg), deg, min_psnr_between=20)
    by_name = {o.name: o for o in report.outputs}
    assert by_name["noisy"].passed and by_name["noisy"].diagnosis == "agrees"
    assert (by_name["dim"].passed, by_name["dim"].diagnosis) == (False, "quality lost")
    assert by_name["dim"].summary()["psnr_vs_reference"] < -0.1
    assert "ΔY-PSNR" in report.table() and "quality lost" in report.table()
    assert report.as_dict()["outputs"][3]["diagnosis"] == "quality lost"
    # a candidate may be listed before its reference
    first = validate_outputs([Output("same", reference, reference="ref"), Output("ref", reference)],
                             _photo_pairs(deg), deg)
    assert first.outputs[0].passed and first.outputs[0].summary()["psnr_vs_reference"] == 0


def test_diagnose_counts_the_codes_a_float_difference_flips():
    """A toy deploy model whose float64 run sees its input 0.4 of a step higher: about 40 % of the
    codes flip (those whose fraction lies in [0.1, 0.5)), and the router sees no difference."""
    import torch.nn as nn

    from qmamba_deploy.data.datasets import load_pairs
    from qmamba_deploy.data.degrade import Degradation
    from qmamba_deploy.jobs.diagnose import diagnose
    from qmamba_deploy.quant.deploy import ActQuant

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = ActQuant(8, -128, 127, False).set(0.01)

        def forward(self, x):
            return self.q(x + (0.004 if x.dtype == torch.float64 else 0.0))

    deg = Degradation("denoise", 1, sigma=15.0)
    pairs = load_pairs("builtin", deg, 3, split="eval")[:2]
    report = diagnose(Toy(), pairs, deg)
    (site,) = report.sites
    assert site.site == "q" and site.kind == "act" and site.values == sum(p.gt.size for p in pairs)
    assert 0.3 < site.flips / site.values < 0.5
    assert len(report.psnr_between) == 2 and all(40 < p < 60 for p in report.psnr_between)
    assert "flipped at 1 of 1 quantizers" in report.table()
