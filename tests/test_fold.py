"""Fold: deploy modules, bit-exactness against the fake-quant model, bundles on disk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from qmamba_deploy import build_model
from qmamba_deploy.errors import CheckpointError, OptionError
from qmamba_deploy.fold import calibrate_dls, fold, load_bundle, pack_bits, save_bundle, unpack_bits, with_dls_mode
from qmamba_deploy.jobs.quantize import calibrate
from qmamba_deploy.quant import QConfig, quantize_model
from qmamba_deploy.quant.deploy import ActQuant, DeployConv2d, DLSAct, FoldedWeight, act_grid
from qmamba_deploy.quant.quantizers import LSQ

from .conftest import TINY_V1, TINY_V2

ARCHS = {"v1": ("MambaIR", TINY_V1), "v2": ("MambaIRv2Light", TINY_V2)}


def _quantized(arch: str, method: str, w: int, a: int, beta: float | None = None, seed: int = 0):
    name, kw = ARCHS[arch]
    torch.manual_seed(seed)
    model = build_model(name, **kw).eval()
    q = quantize_model(copy.deepcopy(model), QConfig(method, w, a))
    g = torch.Generator().manual_seed(seed)
    calibrate(q, [torch.rand(1, 3, 24, 24, generator=g) for _ in range(2)])
    if beta is not None:  # give every learnable offset a value, as training would
        with torch.no_grad():
            for n, p in q.named_parameters():
                if n.endswith(".beta"):
                    p.fill_(beta)
    q.card = q.card.replace(task={"task": "sr", "scale": 2})
    return q.eval()


def _x(seed=1, h=20, w=28):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 64, 101])
def test_pack_unpack_round_trip(bits, n):
    half = 2 ** (bits - 1)
    q = torch.randint(-half, half, (n,), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, (n,)), q)


def test_pack_rejects_codes_out_of_range_and_odd_widths():
    with pytest.raises(ValueError, match="out of the signed 4-bit range"):
        pack_bits(torch.tensor([8], dtype=torch.int8), 4)
    with pytest.raises(OptionError, match="2, 4 or 8"):
        pack_bits(torch.tensor([1], dtype=torch.int8), 3)


# --------------------------------------------------------------------------- deploy modules


def test_unsigned_8bit_activation_moves_to_the_int8_grid_exactly():
    lsq = LSQ(8, offset=False, signed=False)
    with torch.no_grad():
        lsq.alpha.fill_(0.01)
    lsq.init_state.fill_(1.0)
    lsq.eval()
    qmin, qmax, shift = act_grid(8, signed=False)
    assert (qmin, qmax, shift) == (-128, 127, 128)
    act = ActQuant(8, qmin, qmax, has_offset=True).set(0.01, -shift * 0.01)
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 3.5 - 0.5
    with torch.no_grad():
        diff = (act(x) - lsq(x)).abs()
    # x − 128·s rounds once more than x/s − 128: a value within an ulp of a rounding
    # boundary may land one step away, nothing else changes
    assert diff.max() <= 0.01 + 1e-6 and (diff > 1e-6).float().mean() < 1e-3
    assert act(x).min() >= 0 and act(x).max() <= 2.55 + 1e-6


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_weight_offset_is_an_exact_box_sum(groups):
    g = torch.Generator().manual_seed(groups)
    cin, cout = 8, 8
    weight = FoldedWeight((cout, cin // groups, 3, 3), 4, axis=0, has_offset=True)
    weight.q.copy_(torch.randint(-8, 8, weight.shape, generator=g, dtype=torch.int8))
    weight.scale.fill_(0.05)
    weight.offset.fill_(-0.013)
    conv = DeployConv2d(cin, cout, (3, 3), (1, 1), (1, 1), (1, 1), groups, True, torch.nn.Identity(), weight)
    conv.bias.data.normal_(generator=g)
    x = torch.randn(2, cin, 9, 11, generator=g)
    expected = F.conv2d(x, weight.value(), conv.bias, padding=1, groups=groups)
    assert (conv(x) - expected).abs().max() <= 1e-5


# --------------------------------------------------------------------------- fold == fake-quant


@pytest.mark.parametrize("arch", ["v1", "v2"])
@pytest.mark.parametrize("method,w,a", [("minmax", 8, 8), ("percentile", 4, 4), ("lsq", 2, 2), ("mse", 8, 8)])
def test_fold_without_offsets_is_bit_exact(arch, method, w, a):
    q = _quantized(arch, method, w, a)
    deploy = fold(q)
    x = _x()
    with torch.no_grad():
        assert torch.equal(deploy(x), q(x))


@pytest.mark.parametrize("arch", ["v1", "v2"])
@pytest.mark.parametrize("method,w,a", [("qmambair", 4, 4), ("rfa", 4, 4), ("lsq+", 8, 8), ("spr2q", 4, 4)])
def test_fold_with_offsets_matches_within_float_rounding(arch, method, w, a):
    """RFA / LSQ+ / SPR²Q offsets become explicit terms (c·Σx), so the sums round differently.
    DLS runs dynamically, as trained."""
    q = _quantized(arch, method, w, a, beta=0.01)
    deploy = fold(q)
    assert deploy.card.qconfig == q.card.qconfig
    x = _x()
    with torch.no_grad():
        assert (deploy(x) - q(x)).abs().max() <= 1e-6
    has_offsets = [m for m in deploy.modules() if isinstance(m, FoldedWeight) and m.has_offset]
    assert has_offsets or method == "lsq+"  # lsq+ puts its offsets on activations only


def test_fold_precomputes_A_and_drops_the_folded_parameters():
    q = _quantized("v1", "qmambair", 4, 4)
    deploy = fold(q)
    scan = deploy.layers[0].residual_group.blocks[0].self_attention
    assert "A" in dict(scan.named_buffers()) and not hasattr(scan, "A_logs")
    assert not hasattr(scan, "x_proj_weight") and isinstance(scan.x_proj_weight_q, FoldedWeight)
    src = q.layers[0].residual_group.blocks[0].self_attention
    with torch.no_grad():
        assert torch.equal(scan.A, src.As_q(-torch.exp(src.A_logs)))
    assert "As_q" not in scan._modules and "Ds_q" not in scan._modules


def test_fold_refuses_uninitialised_quantizers():
    name, kw = ARCHS["v1"]
    q = quantize_model(build_model(name, **kw).eval(), QConfig("lsq", 4, 4))
    with pytest.raises(CheckpointError, match="never initialised"):
        fold(q)


# --------------------------------------------------------------------------- static DLS


def test_static_dls_freezes_the_mean_of_the_live_scales():
    q = _quantized("v1", "qmambair", 4, 4)
    deploy = fold(q)
    batches = [_x(s, 24, 24) for s in range(3)]
    record = calibrate_dls(deploy, batches, source="test")
    assert record["batches"] == 3 and record["statistic"] == "mean" and record["sites"] > 0
    site = next(m for m in deploy.modules() if isinstance(m, DLSAct))
    seen = []
    site.recording = seen
    with torch.no_grad():
        for x in batches:
            deploy(x)
    site.recording = None
    assert abs(float(site.static.scale) - sum(a for a, _ in seen) / len(seen)) <= 1e-6
    assert abs(float(site.static.offset) - sum(b for _, b in seen) / len(seen)) <= 1e-6
    static, dynamic = with_dls_mode(deploy, "static"), with_dls_mode(deploy, "dynamic")
    x = _x()
    with torch.no_grad():
        ys, yd = static(x), dynamic(x)
    assert not torch.equal(ys, yd)  # a real change of numerics ...
    assert (ys - yd).abs().mean() < 0.1  # ... of the same network


def test_static_dls_needs_calibration():
    deploy = fold(_quantized("v1", "qmambair", 4, 4))
    with pytest.raises(OptionError, match="needs DLS calibration"):
        with_dls_mode(deploy, "static")


# --------------------------------------------------------------------------- bundles


@pytest.mark.parametrize("method,w,a", [("qmambair", 4, 4), ("lsq", 2, 2), ("minmax", 8, 8)])
def test_bundle_round_trip_is_bit_exact_and_packed(tmp_path, method, w, a):
    q = _quantized("v2", method, w, a, beta=0.01)
    deploy = fold(q)
    calibrate_dls(deploy, [_x(5, 24, 24)])
    manifest = save_bundle(deploy, tmp_path)
    loaded = load_bundle(tmp_path)
    x = _x()
    for mode in ("dynamic", "static") if method == "qmambair" else ("dynamic",):
        with torch.no_grad():
            assert torch.equal(with_dls_mode(loaded, mode)(x), with_dls_mode(deploy, mode)(x))
    # integer weights stored at their bit width: the packed tensors are w/8 of an int8 copy
    folded = {n: m for n, m in deploy.named_modules() if isinstance(m, FoldedWeight)}
    assert set(manifest["packed"]) == {f"{n}.q" for n in folded}
    for name, _m in folded.items():
        assert manifest["packed"][f"{name}.q"]["storage_bits"] == w
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bundle.safetensors"), "pt") as f:
        packed = f.get_tensor(f"{next(iter(folded))}.q_packed")
    assert packed.numel() == -(-next(iter(folded.values())).q.numel() * w // 8)
    on_disk = json.loads((tmp_path / "bundle.json").read_text())
    assert on_disk["sha256"] == manifest["sha256"] and on_disk["kind"] == "qmamba-deploy bundle"
    assert on_disk["size"]["change_vs_fp32"] < (0 if w < 8 else 0.5)
    assert any("scale" in v for v in on_disk["values"].values())


def test_load_bundle_errors_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="is not a bundle file"):
        load_bundle(tmp_path / "missing.safetensors")
    bad = tmp_path / "bundle.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable deploy bundle"):
        load_bundle(bad)


# --------------------------------------------------------------------------- per-channel weights


def _per_channel(arch: str, method: str, w: int = 4, a: int = 8, granularity: str = "channel"):
    name, kw = ARCHS[arch]
    torch.manual_seed(0)
    q = quantize_model(build_model(name, **kw).eval(), QConfig(method, w, a, w_granularity=granularity))
    g = torch.Generator().manual_seed(0)
    calibrate(q, [torch.rand(1, 3, 24, 24, generator=g) for _ in range(2)])
    q.card = q.card.replace(task={"task": "sr", "scale": 2})
    return q.eval()


@pytest.mark.parametrize("arch,method", [("v2", "minmax"), ("v2", "mse"), ("v1", "lsq"), ("v2", "qmambair")])
def test_per_channel_weights_fold_exactly_and_beat_per_tensor_error(arch, method, tmp_path):
    """--w-granularity channel: one step size per output channel (LSQ, RFA, observers), folded into
    per-channel FoldedWeights on the output axis of the stored layout; the bundle reproduces the
    fake-quant model, and the weights' quantization error is below per-tensor's."""
    q = _per_channel(arch, method)
    sites = [(n, m) for n, m in q.named_modules() if hasattr(m, "channels") and m.channels > 1]
    assert sites, "no per-channel weight quantizer"
    for n, m in sites:
        assert m.alpha.shape == (m.channels,) and m.initialized, n
        assert len(set(m.alpha.detach().tolist())) > 1, f"{n}: every channel got the same step"
    deploy = fold(q)
    folded = {n: m for n, m in deploy.named_modules() if isinstance(m, FoldedWeight)}
    layers = [m for n, m in folded.items() if n.endswith(".weight")]              # Linear / Conv2d
    assert layers and all(m.per_channel and m.scale.shape == (m.shape[m.axis],) for m in layers)
    # the scan's projection weights stay per tensor (see quantize_model)
    assert not any(m.per_channel for n, m in folded.items() if not n.endswith(".weight"))
    x = _x()
    with torch.no_grad():
        assert (deploy(x) - q(x)).abs().max() <= 1e-4
    save_bundle(deploy, tmp_path / "b.safetensors")
    with torch.no_grad():
        assert torch.equal(load_bundle(tmp_path / "b.safetensors")(x), deploy(x))
    if method in ("minmax", "mse"):  # PTQ: the same weights quantized per tensor lose more
        t = _per_channel(arch, method, granularity="tensor")
        layer = next(n for n, _ in sites if n.endswith("weight_quant"))
        parent = layer.rsplit(".", 1)[0]
        w = q.get_submodule(parent).weight
        err_c = (q.get_submodule(layer).eval()(w) - w).pow(2).mean()
        assert torch.equal(t.get_submodule(parent).weight, w)
        err_t = (t.get_submodule(layer)(w) - w).pow(2).mean()
        assert err_c < err_t


def test_per_channel_checkpoints_round_trip_and_refuse_what_cannot_be_per_channel(tmp_path):
    from qmamba_deploy import load_model, save_checkpoint

    q = _per_channel("v2", "lsq")
    save_checkpoint(q, tmp_path / "q.safetensors")
    back = load_model(tmp_path / "q.safetensors").eval()
    assert back.card.qconfig.w_granularity == "channel" and "per-channel" in back.card.qconfig.label
    x = _x()
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    # the papers' default stays out of manifests (old manifests read as per tensor)
    assert "w_granularity" not in QConfig("lsq", 4, 4).as_dict()
    assert QConfig.from_dict(QConfig("lsq", 4, 4).as_dict()).w_granularity == "tensor"
    with pytest.raises(OptionError, match="w-granularity channel does not apply"):
        QConfig("spr2q", 4, 4, w_granularity="channel")
    with pytest.raises(OptionError, match="w-granularity"):
        QConfig("lsq", 4, 4, w_granularity="row")


def test_per_channel_lsq_trains_each_channel_step():
    """The per-channel α gets a gradient per channel (LSQ's step-size gradient, scaled per channel)."""
    lsq = LSQ(4, signed=True, channels=3, axis=0).train()
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.1], [1.0], [10.0]])
    lsq(w).sum().backward()   # the first call initialises α per channel
    assert lsq.alpha.shape == (3,) and lsq.alpha[0] < lsq.alpha[1] < lsq.alpha[2]
    lsq.alpha.grad = None
    (lsq(w) - w).pow(2).sum().backward()
    assert lsq.alpha.grad is not None and lsq.alpha.grad.shape == (3,) and (lsq.alpha.grad != 0).all()
    with pytest.raises(ValueError, match="per-channel lsq quantizer of 3 channels"):
        lsq(torch.randn(4, 5))
