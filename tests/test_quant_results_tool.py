"""tools/quant_results.py: one run per seed averaged, and finished run folders reused only when they match."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qmamba_deploy import load_model
from qmamba_deploy.jobs.quantize import QuantizeConfig, quantize

_spec = importlib.util.spec_from_file_location("quant_results", Path(__file__).parents[1] / "tools/quant_results.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_mean_of_seeds_averages_the_numbers_and_drops_the_seed():
    rows = [{"seed": 0, "psnr": 30.0, "ssim": 0.8, "seconds": 10, "ok": True},
            {"seed": 1, "psnr": 31.0, "ssim": 0.9, "seconds": 20, "ok": True}]
    assert tool.mean_of(rows) == pytest.approx({"psnr": 30.5, "ssim": 0.85, "seconds": 15})


def test_a_finished_run_is_reused_only_with_the_settings_it_was_trained_with(tmp_path, tiny_ckpt):
    fp = load_model(tiny_ckpt)

    def cfg(**kw):
        return QuantizeConfig(arch=fp.card.arch, kwargs=dict(fp.card.kwargs), task="sr", scale=int(fp.upscale),
                              data="builtin", val_data=None, patch=16, batch=2, iters=1, device="cpu",
                              checkpoint=str(tiny_ckpt), calib_batches=1, **kw)

    run = tmp_path / "run"
    quantize(cfg(), run, progress=False)
    tool.check_reuse(run, cfg(save_every=7))  # how often it saved does not change the result
    for changed, name in ((dict(seed=1), "seed=0"), (dict(qdrop=0.5), "qdrop=0.0"), (dict(lr=1e-3), "lr=")):
        with pytest.raises(SystemExit, match=f"trained with other settings \\({name}"):
            tool.check_reuse(run, cfg(**changed))
    manifest = json.loads((run / "model.json").read_text())
    del manifest["provenance"]["config"]["qdrop"]  # a run from before the setting existed: its default
    (run / "model.json").write_text(json.dumps(manifest))
    tool.check_reuse(run, cfg())
    with pytest.raises(SystemExit, match="qdrop=None"):
        tool.check_reuse(run, cfg(qdrop=0.5))
    (run / "model.json").write_text("{")
    with pytest.raises(SystemExit, match="without a readable model.json"):
        tool.check_reuse(run, cfg())
