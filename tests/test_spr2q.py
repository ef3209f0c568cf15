"""SPR²Q: the learnable-bounds quantizer, rectifier groups, static routing, lossless fusion."""

from __future__ import annotations

import copy

import pytest
import torch

from qmamba_deploy import build_model, load_model, save_checkpoint
from qmamba_deploy.quant import QConfig, QuantConv2d, QuantLinear, calibrating, quantize_model
from qmamba_deploy.quant.spr2q import (
    BoundedQuant,
    RectifierGroup,
    SPR2QConv2d,
    SPR2QLinear,
    attach_rectifiers,
    fuse_rectifiers,
    hybrid_loss,
    mse_bounds,
    rectified_layers,
    route_statically,
    set_bounds_init,
)

from .conftest import TINY_V2


def test_bounded_quant_grid_and_bounds():
    q = BoundedQuant(3, init="minmax")
    x = torch.linspace(-1.0, 2.0, 301)
    q.train()
    q(x)
    assert float(q.lo.detach()) == pytest.approx(-1.0) and float(q.hi.detach()) == pytest.approx(2.0)
    with torch.no_grad():
        q.lo.fill_(-0.5)
        q.hi.fill_(1.25)
    y = q(x)
    k = ((y - q.lo) / q.step()).detach()
    torch.testing.assert_close(k, torch.round(k), atol=1e-5, rtol=0)
    assert float(y.min()) == pytest.approx(-0.5) and float(y.max()) == pytest.approx(1.25)
    y.sum().backward()
    assert q.lo.grad is not None and q.hi.grad is not None


def _qerr(x: torch.Tensor, q: BoundedQuant) -> float:
    return float(((q(x) - x) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_bounds_beat_min_max_where_outliers_stretch_the_range(bits):
    """Gaussian values plus a few outliers: min/max spends the 2-bit grid on the outliers."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50000, generator=g) * 0.1, torch.full((8,), 3.0), torch.full((8,), -1.0)])
    errs = {}
    for init in ("minmax", "mse"):
        q = BoundedQuant(bits, init=init).train()
        q(x)
        errs[init] = _qerr(x, q.eval())
    lo, hi = mse_bounds(x, bits)
    assert -1.0 <= lo < hi <= 3.0
    assert errs["mse"] <= errs["minmax"] * 1.01
    if bits == 2:
        assert errs["mse"] < errs["minmax"] / 10 and hi - lo < 1.0
    # constant input: the bounds stay min = max instead of failing
    assert mse_bounds(torch.full((10,), 0.5), bits) == (0.5, 0.5)


def test_set_bounds_init_reaches_every_uninitialised_bounded_quantizer():
    model = quantize_model(build_model("MambaIRv2Light", **TINY_V2), QConfig("spr2q", 2, 2))
    qs = [m for m in model.modules() if isinstance(m, BoundedQuant)]
    assert qs and all(q.init == "mse" for q in qs)
    assert set_bounds_init(model, "minmax") == len(qs) and all(q.init == "minmax" for q in qs)
    with pytest.raises(ValueError, match="bounds init"):
        set_bounds_init(model, "percentile")


def test_rectifier_group_starts_as_identity_and_routes_statically():
    g = RectifierGroup(torch.Size([6, 4, 3, 3]), in_features=4, n=3, rank=2)
    w = torch.randn(6, 4, 3, 3)
    gates = g.gates(torch.randn(2, 4, 5, 5), channel_dim=1)
    torch.testing.assert_close(gates, torch.full((2, 3), 1 / 3))  # zero-initialised gate: uniform
    torch.testing.assert_close(g.rectified(w, gates), w.expand(2, -1, -1, -1, -1))  # B = 0: no increment
    with torch.no_grad():
        g.B.normal_()
    g.route_statically(torch.tensor([0.5, 0.3, 0.2]))
    assert g.is_static
    fused = w + g.fused_increment()
    torch.testing.assert_close(g.rectified(w, g.gates(torch.randn(3, 4, 5, 5), 1))[1], fused)


def _quantized_tiny(bits: int = 4):
    torch.manual_seed(0)
    fp = build_model("MambaIRv2Light", **TINY_V2).eval()
    q = quantize_model(copy.deepcopy(fp), QConfig("spr2q", bits, bits))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), calibrating(q):
        q(x)
    return fp, q.eval()


def test_fused_model_equals_the_statically_routed_one(tmp_path):
    fp, q = _quantized_tiny()
    names = attach_rectifiers(q, n=4, rank=4)
    assert names and all(isinstance(m, (SPR2QLinear, SPR2QConv2d)) for _, m in rectified_layers(q))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in rectified_layers(q):
            m.rectifier.B.normal_(0, 0.02)
    route_statically(q, {n: torch.softmax(torch.randn(4), 0) for n in names})
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        routed = q(x)
    table = fuse_rectifiers(q)
    assert set(table) == set(names) and all(v["increment_norm"] > 0 for v in table.values())
    assert not list(rectified_layers(q)) and all(
        type(q.get_submodule(n)) in (QuantLinear, QuantConv2d) for n in names)
    with torch.no_grad():
        fused = q(x)
    assert float((fused - routed).abs().max()) <= 1e-5
    # the fused model is an ordinary quantized checkpoint
    path = tmp_path / "fused.safetensors"
    save_checkpoint(q, path)
    assert not any("rectifier" in k for k in q.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(x), fused, rtol=0, atol=0)


def test_training_rectifiers_lowers_the_hybrid_loss_versus_plain_ptq():
    # W2A2: with MSE-initialised bounds a random tiny model at W4A4 leaves the rectifiers little to fix
    fp, q = _quantized_tiny(bits=2)
    torch.manual_seed(2)
    train_x, held_out = torch.rand(4, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        plain = float(hybrid_loss(q, fp, held_out))
    attach_rectifiers(q, n=4, rank=4)
    params = [p for n, p in q.named_parameters() if ".rectifier." in n]
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in q.named_parameters() if n.endswith(".weight") and ".rectifier." not in n
                   and "quant" not in n)
    opt = torch.optim.Adam(params, lr=1e-2)
    q.train()
    for _ in range(15):
        loss = hybrid_loss(q, fp, train_x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    route_statically(q)  # uniform ĝ
    with torch.no_grad():
        rectified = float(hybrid_loss(q, fp, held_out))
    assert rectified < plain


@pytest.mark.parametrize("variant,routing_file", [("group", True), ("single", True), ("plain", False),
                                                  ("bounds", False)])
def test_quantize_cli_spr2q(tmp_path, tiny_ckpt, variant, routing_file):
    import json

    from click.testing import CliRunner

    from qmamba_deploy.cli import main
    from qmamba_deploy.quant import quantizers

    out = tmp_path / variant
    res = CliRunner().invoke(main, ["quantize", "--checkpoint", str(tiny_ckpt), "--method", "spr2q", "--out", str(out),
                                    "--spr2q-variant", variant, "--iters", "3", "--route-iters", "2", "--rank", "2",
                                    "--patch", "16", "--batch", "2", "--val-data", "none", "--device", "cpu",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["qconfig"]["method"] == "spr2q" and manifest["spr2q"]["variant"] == variant
    assert (out / "routing.json").exists() == routing_file
    if routing_file:
        layers = json.loads((out / "routing.json").read_text())["layers"]
        n = 1 if variant == "single" else 4
        assert all(len(v["g"]) == n for v in layers.values())
    model = load_model(out / "model.safetensors")
    assert {q.kind for _, q in quantizers(model)} == {"bounded"}
    assert not any("rectifier" in k for k in model.state_dict())


def test_quantize_cli_spr2q_bounds_init_is_recorded_and_changes_the_bounds(tmp_path, tiny_ckpt):
    import json

    from click.testing import CliRunner

    from qmamba_deploy.cli import main

    bounds = {}
    for init in ("mse", "minmax"):
        out = tmp_path / init
        res = CliRunner().invoke(main, ["quantize", "--checkpoint", str(tiny_ckpt), "--method", "spr2q", "--out",
                                        str(out), "--spr2q-variant", "plain", "--bounds-init", init, "--w-bits", "2",
                                        "--a-bits", "2", "--patch", "16", "--batch", "2", "--val-data", "none",
                                        "--device", "cpu", "--quiet"])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "model.json").read_text())["spr2q"]["bounds_init"] == init
        model = load_model(out / "model.safetensors")
        bounds[init] = {n: (float(q.lo), float(q.hi)) for n, q in model.named_modules() if isinstance(q, BoundedQuant)}
    assert bounds["mse"].keys() == bounds["minmax"].keys()
    # MSE bounds lie inside the min/max ones (equal for constant tensors, e.g. D), and at 2 bits most are narrower
    inside = [mm[0] - 1e-6 <= m[0] <= m[1] <= mm[1] + 1e-6
              for m, mm in ((bounds["mse"][k], bounds["minmax"][k]) for k in bounds["mse"])]
    narrower = [bounds["mse"][k][1] - bounds["mse"][k][0] < 0.9 * (bounds["minmax"][k][1] - bounds["minmax"][k][0])
                for k in bounds["mse"]]
    assert all(inside), [(k, bounds["mse"][k], bounds["minmax"][k]) for k, ok in zip(bounds["mse"], inside) if not ok]
    assert sum(narrower) > len(narrower) / 2
    res = CliRunner().invoke(main, ["quantize", "--method", "spr2q", "--bounds-init", "percentile"])
    assert res.exit_code == 2 and "--bounds-init" in res.output
