"""Distillation from the float model: block features and the QAT loop's --distill-features term."""

import json

import pytest
import torch

from qmamba_deploy.errors import OptionError
from qmamba_deploy.jobs.quantize import QuantizeConfig
from qmamba_deploy.models.mambairv2 import AttentiveLayer
from qmamba_deploy.quant.distill import BlockFeatures, block_modules, feature_alignment


def test_feature_alignment_is_each_blocks_relative_error_averaged():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 16, 8, generator=g), 100 * torch.randn(2, 16, 8, generator=g)]
    assert float(feature_alignment(teacher, teacher)) == 0.0
    # 10 % off in the small block, 1 % off in the large one: the large block does not dominate
    student = [teacher[0] * 1.1, teacher[1] * 1.01]
    assert float(feature_alignment(student, teacher)) == pytest.approx((0.01 + 0.0001) / 2, rel=1e-4)
    scaled = float(feature_alignment([5 * s for s in student], [5 * t for t in teacher]))
    assert scaled == pytest.approx(float(feature_alignment(student, teacher)), rel=1e-5)
    with pytest.raises(ValueError):
        feature_alignment(student[:1], teacher)
    with pytest.raises(ValueError, match="at least one block"):
        feature_alignment([], [])


def test_block_features_record_training_forwards_only_and_detach(tiny_v2):
    blocks = [m for m in tiny_v2.modules() if isinstance(m, AttentiveLayer)]
    assert len(block_modules(tiny_v2)) == len(blocks) > 0
    x = torch.rand(1, 3, 16, 16)
    feats = BlockFeatures(tiny_v2, training_only=True).attach()
    with torch.no_grad():
        tiny_v2.eval()(x)
        assert feats.values() == []  # a validation forward keeps nothing
        tiny_v2.train()(x)
        assert len(feats.values()) == len(blocks)
        feats.detach()
        tiny_v2(x)
    assert feats.values() == [] and not any(m._forward_hooks for m in blocks)
    tiny_v2.eval()
    with torch.no_grad(), BlockFeatures(tiny_v2) as every:  # the context form records eval forwards too
        tiny_v2(x)
    assert len(every.values()) == len(blocks) and not any(m._forward_hooks for m in blocks)


def test_feature_term_enters_the_qat_loss_and_the_run_config(tmp_path, tiny_ckpt):
    from click.testing import CliRunner

    from qmamba_deploy.cli import main

    def first_loss(out, *extra):
        res = CliRunner().invoke(main, ["quantize", "--checkpoint", str(tiny_ckpt), "--out", str(out), "--patch",
                                        "16", "--batch", "2", "--device", "cpu", "--quiet", "--iters", "1",
                                        "--val-data", "none", "--calib-batches", "1", *extra])
        assert res.exit_code == 0, res.output
        return json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]

    plain = first_loss(tmp_path / "plain")
    feat = first_loss(tmp_path / "feat", "--distill-features", "1.0")
    # the same seed, batch and start: the only difference is the (positive) feature term
    assert feat > plain + 1e-4
    cfg = json.loads((tmp_path / "feat" / "model.json").read_text())["provenance"]["config"]
    assert cfg["distill_features"] == 1.0
    res = CliRunner().invoke(main, ["quantize", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "neg"),
                                    "--distill-features", "-1"])
    assert res.exit_code == 2 and not (tmp_path / "neg").exists()


def test_negative_feature_weight_is_refused_by_the_config():
    with pytest.raises(OptionError, match="--distill-features"):
        QuantizeConfig(checkpoint="x", distill_features=-0.5)


def test_qat_with_feature_term_leaves_no_hooks_on_the_trained_model(tmp_path, tiny_ckpt):
    from qmamba_deploy import load_model
    from qmamba_deploy.jobs.quantize import quantize

    fp = load_model(tiny_ckpt)
    cfg = QuantizeConfig(arch=fp.card.arch, kwargs=dict(fp.card.kwargs), task="sr", scale=int(fp.upscale),
                         data="builtin", val_data=None, patch=16, batch=1, iters=2, device="cpu",
                         checkpoint=str(tiny_ckpt), calib_batches=1, distill_features=0.5)
    result = quantize(cfg, tmp_path / "run", progress=False)
    blocks = [m for _, m in block_modules(result.model)]
    assert blocks and not any(m._forward_hooks for m in blocks)
