"""quantize --margin-noise / --qdrop: training-time perturbation of the activation quantizers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from qmamba_deploy.cli import main
from qmamba_deploy.errors import OptionError
from qmamba_deploy.fold import fold
from qmamba_deploy.jobs.quantize import QuantizeConfig
from qmamba_deploy.quant.deploy import ActQuant
from qmamba_deploy.quant.layers import QuantLinear
from qmamba_deploy.quant.noise import ActivationDrop, MarginNoise
from qmamba_deploy.quant.qconfig import activation_quantizers
from qmamba_deploy.quant.quantizers import LSQ

from .test_fold import _quantized, _x


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_activation_quantizers_are_the_sites_fold_deploys_as_activation_quantizers(arch):
    q = _quantized(arch, "qmambair", 4, 4)
    sites = activation_quantizers(q)
    assert sites and not any("weight" in name or name.rsplit(".", 1)[1] in ("As_q", "Ds_q", "dt_projs_bias_q")
                             for name, _ in sites)
    deploy = fold(q)
    assert len(sites) == sum(isinstance(m, ActQuant) for m in deploy.modules())


def _identity_layer(alpha: float = 0.1) -> QuantLinear:
    """y = x̂: a 1 -> 1 Linear of weight 1 whose input an LSQ quantizer of step ``alpha`` quantizes."""
    act = LSQ(4, signed=True)
    with torch.no_grad():
        act.alpha.fill_(alpha)
    act.init_state.fill_(1.0)
    layer = QuantLinear(1, 1, bias=False, act_quant=act)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    return layer.train()


def test_noise_is_at_most_half_its_width_in_steps_and_only_in_training_forwards():
    centres = torch.arange(-7, 7).float().repeat(200)[:, None] * 0.1  # every value on a code: noise < ½ step keeps it
    q = _identity_layer()
    with MarginNoise(q, 0.99):
        assert torch.equal(q(centres.clone().requires_grad_()).detach(), centres)
    edges = centres + 0.05                                        # every value on a boundary: noise moves half
    plain = q(edges).detach()
    with MarginNoise(q, 0.5):
        noisy = q(edges.clone().requires_grad_()).detach()
        moved = (noisy != plain).float().mean()
        assert 0.4 < float(moved) < 0.6 and float((noisy - plain).abs().max()) == pytest.approx(0.1)
        with torch.no_grad():                                     # calibration: no gradient, no noise
            assert torch.equal(q(edges), plain)
        q.eval()                                                  # validation / export: no noise
        assert torch.equal(q(edges.clone().requires_grad_()).detach(), plain)
    q.train()
    assert torch.equal(q(edges.clone().requires_grad_()).detach(), plain)
    assert not q.linear_act_quant._forward_pre_hooks


def test_noise_reaches_every_activation_quantizer_of_a_model_and_detaches():
    q = _quantized("v2", "qmambair", 4, 4).train()
    x = _x(3, 16, 16)
    torch.manual_seed(0)
    clean = q(x).detach()
    noise = MarginNoise(q, 0.5).attach()
    assert all(len(m._forward_pre_hooks) == 1 for _, m in activation_quantizers(q))
    torch.manual_seed(0)
    assert not torch.equal(q(x).detach(), clean)
    noise.detach()
    torch.manual_seed(0)
    assert torch.equal(q(x).detach(), clean)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        MarginNoise(q, 1.5)


@pytest.mark.parametrize("setting, out_of_range, cli_value", [("margin_noise", 1.5, "-0.1"), ("qdrop", 1.0, "1")])
def test_a_perturbation_is_refused_out_of_range_or_for_a_method_without_qat_loop(tmp_path, tiny_ckpt, setting,
                                                                                  out_of_range, cli_value):
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(OptionError, match=flag):
        QuantizeConfig(checkpoint="x", **{setting: out_of_range})
    with pytest.raises(OptionError, match=flag):
        QuantizeConfig(checkpoint="x", method="minmax", **{setting: 0.5})
    res = CliRunner().invoke(main, ["quantize", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "bad"),
                                    flag, cli_value])
    assert res.exit_code == 2 and flag in res.output and not (tmp_path / "bad").exists()


def _one_qat_step(ckpt, out, **kw):
    """One QAT iteration of the tiny model into ``out``: the trained model and the first logged loss."""
    from qmamba_deploy import load_model
    from qmamba_deploy.jobs.quantize import quantize

    fp = load_model(ckpt)
    cfg = QuantizeConfig(arch=fp.card.arch, kwargs=dict(fp.card.kwargs), task="sr", scale=int(fp.upscale),
                         data="builtin", val_data=None, patch=16, batch=2, iters=1, device="cpu",
                         checkpoint=str(ckpt), calib_batches=1, **kw)
    model = quantize(cfg, out, progress=False).model
    return model, json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.parametrize("setting, value, hooks", [("margin_noise", 1.0, "_forward_pre_hooks"),
                                                   ("qdrop", 0.5, "_forward_hooks")])
def test_qat_with_a_perturbation_records_it_changes_the_loss_and_leaves_no_hooks(tmp_path, tiny_ckpt, setting,
                                                                                  value, hooks):
    model, loss = _one_qat_step(tiny_ckpt, tmp_path / "on", **{setting: value})
    assert loss != _one_qat_step(tiny_ckpt, tmp_path / "off")[1]  # the same seed, batch and start: only it differs
    manifest = json.loads((tmp_path / "on" / "model.json").read_text())
    assert manifest["provenance"]["config"][setting] == value
    assert not any(getattr(m, hooks) for _, m in activation_quantizers(model))


def test_qdrop_leaves_a_fraction_in_float_only_in_training_forwards_and_gradients_reach_the_step():
    x = (torch.arange(-700, 700).float() * 0.1 / 100 + 0.033)[:, None]  # no value on a code: dropped ones differ
    q = _identity_layer()
    plain = q(x).detach()
    with ActivationDrop(q, 0.3):
        xr = x.clone().requires_grad_()
        out = q(xr)
        kept_float = (out.detach() == x).float().mean()
        assert 0.25 < float(kept_float) < 0.35                     # p of the elements see their float value
        assert torch.equal(out.detach()[out.detach() != x], plain[out.detach() != x])  # the rest: quantized
        out.sum().backward()
        assert q.linear_act_quant.alpha.grad is not None and float(q.linear_act_quant.alpha.grad) != 0.0
        with torch.no_grad():                                      # calibration: no gradient, no drop
            assert torch.equal(q(x), plain)
        q.eval()                                                   # validation / export
        assert torch.equal(q(x.clone().requires_grad_()).detach(), plain)
    q.train()
    assert torch.equal(q(x.clone().requires_grad_()).detach(), plain)
    assert not q.linear_act_quant._forward_hooks
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            ActivationDrop(q, bad)


def test_qdrop_reaches_every_activation_quantizer_and_detaches():
    q = _quantized("v2", "qmambair", 4, 4).train()
    drop = ActivationDrop(q, 0.5).attach()
    assert all(len(m._forward_hooks) == 1 for _, m in activation_quantizers(q))
    drop.detach()
    assert not any(m._forward_hooks for _, m in activation_quantizers(q))
