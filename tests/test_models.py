"""Models: official parity, parameter counts of every preset, routing, heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmamba_deploy import build_model, load_model
from qmamba_deploy.models import PRESETS, count_parameters
from qmamba_deploy.models.mambairv2 import shifted_window_mask, window_partition
from qmamba_deploy.models.routing import semantic_order, stable_positions

from .conftest import CHECKPOINTS, TINY_V1, TINY_V2, need, parity_case

# Parameter counts of the released configurations (design/mambair-reference.md).
REFERENCE_PARAMS = {
    "mambair-x2": 20_421_863, "mambair-x3": 20_606_503, "mambair-x4": 20_569_575,
    "mambair-light-x2": 905_016, "mambair-light-x3": 913_131, "mambair-light-x4": 924_492,
    "mambair-dn-color": 15_777_507, "mambair-car": 15_771_025,
    "mambairv2-light-x2": 774_092, "mambairv2-light-x3": 780_587, "mambairv2-light-x4": 789_680,
    "mambairv2-s-x2": 9_621_935, "mambairv2-s-x3": 9_806_575, "mambairv2-s-x4": 9_769_647,
    "mambairv2-b-x2": 22_903_001, "mambairv2-b-x3": 23_087_641, "mambairv2-b-x4": 23_050_713,
    "mambairv2-l-x2": 34_090_523, "mambairv2-l-x3": 34_275_163, "mambairv2-l-x4": 34_238_235,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = build_model(name)
    assert count_parameters(model) == REFERENCE_PARAMS[name]


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        with torch.device("meta"):
            assert count_parameters(build_model(name)) > 0


@pytest.mark.parametrize("case", ["mambair_light_x2_tiny", "mambairv2_light_x2_tiny"])
def test_official_parity_tiny(case):
    config, sd, x, expected = parity_case(case)
    model = load_model(sd, arch=config["class"], **config["kwargs"])
    with torch.no_grad():
        y = model(x).numpy()
    assert y.shape == expected.shape
    assert np.abs(y - expected).max() <= 1e-4


def test_official_parity_real_x4_weights():
    config, _, x, expected = parity_case("mambairv2_light_x4_real")
    model = load_model(need(CHECKPOINTS / "mambairv2_light_x4.safetensors"), arch=config["class"],
                       **config["kwargs"])
    with torch.no_grad():
        y = model(x).numpy()
    err = np.abs(y - expected)
    assert err.max() <= 5e-3 and err.mean() <= 1e-4


def test_prompt_order_quirk_matters():
    """The corrected prompt order is a real option: it changes the output, the default reproduces upstream."""
    config, sd, x, expected = parity_case("mambairv2_light_x2_tiny")
    fixed = load_model(sd, arch=config["class"], prompt_order="sorted", **config["kwargs"])
    with torch.no_grad():
        y = fixed(x).numpy()
    assert np.abs(y - expected).max() > 1e-2


def test_stable_counting_sort_equals_stable_sort():
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 5, (3, 257), generator=g)  # many ties
    sort_idx, pos = semantic_order(cls, 5, "deterministic")
    ref = torch.sort(cls, dim=-1, stable=True).indices
    assert torch.equal(sort_idx, ref)
    x = torch.randn(3, 257, 4, generator=g)
    sorted_x = torch.gather(x, 1, sort_idx[..., None].expand(-1, -1, 4))
    assert torch.equal(torch.gather(sorted_x, 1, pos[..., None].expand(-1, -1, 4)), x)
    assert torch.equal(stable_positions(cls, 5), pos)


def test_gumbel_routing_trains_the_router(tiny_v2):
    tiny_v2.train().set_routing("gumbel")
    x = torch.rand(1, 3, 16, 16)
    tiny_v2(x).mean().backward()
    router = tiny_v2.layers[0].residual_group.layers[0].assm.route[0].weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_gumbel_sample_is_one_hot_with_the_soft_gradient_and_the_right_distribution():
    """Our hard gumbel-softmax: one-hot values, the straight-through gradient of the soft sample, and
    class frequencies that follow softmax(logits) (chi-square over 40k samples, 5 classes)."""
    from qmamba_deploy.models.routing import gumbel_softmax_hard

    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    logits = probs.log().expand(40000, 5).clone().requires_grad_()
    y = gumbel_softmax_hard(logits)
    assert torch.equal(y.detach().sum(-1), torch.ones(40000)) and set(y.detach().unique().tolist()) == {0.0, 1.0}
    counts = y.detach().sum(0)
    chi2 = float((((counts - 40000 * probs) ** 2) / (40000 * probs)).sum())
    assert chi2 < 18.5  # the 0.999 quantile of chi-square with 4 degrees of freedom
    # the gradient is the soft sample's: for loss = sum(w * y), d/dlogits = J_softmax^T w at the soft sample
    w = torch.randn(5)
    torch.manual_seed(1)
    (gumbel_softmax_hard(logits[:3]) * w).sum().backward()
    torch.manual_seed(1)
    soft_logits = logits[:3].detach().clone().requires_grad_()
    uniform = torch.rand_like(soft_logits).clamp_(min=torch.finfo(torch.float32).tiny)
    soft = (soft_logits - (-uniform.log()).log()).softmax(-1)
    (soft * w).sum().backward()
    assert torch.allclose(logits.grad[:3], soft_logits.grad, atol=1e-6)


def test_bias_gather_gradient_matches_autograd():
    """The relative-position bias gather's bincount gradient equals autograd's index gradient."""
    from qmamba_deploy.models.mambairv2 import gather_rows

    g = torch.Generator().manual_seed(0)
    table = torch.randn(49, 3, generator=g, requires_grad=True)
    index = torch.randint(0, 49, (500,), generator=g)
    grad = torch.randn(500, 3, generator=g)
    out = gather_rows(table, index)
    assert torch.equal(out, table[index])
    (ours,) = torch.autograd.grad(out, table, grad)
    (ref,) = torch.autograd.grad(table[index], table, grad)
    assert ours.dtype == ref.dtype and torch.allclose(ours, ref, atol=1e-5)
    with torch.no_grad():                             # eval / export: a plain index_select
        assert torch.equal(gather_rows(table, index), table[index])


def test_deterministic_routing_is_deterministic(tiny_v2):
    x = torch.rand(1, 3, 20, 12)
    with torch.no_grad():
        assert torch.equal(tiny_v2(x), tiny_v2(x))


def test_unknown_routing_mode_is_refused(tiny_v2):
    with pytest.raises(ValueError, match="routing"):
        tiny_v2.set_routing("random")


def _official_mask(h, w, ws):
    """The slice-assignment construction of the shift mask, for comparison."""
    shift = ws // 2
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("hw", [(16, 16), (16, 32), (48, 32)])
def test_shift_mask_matches_slicing_construction(hw):
    assert torch.equal(shifted_window_mask(*hw, 16), _official_mask(*hw, 16))


@pytest.mark.parametrize("hw", [(16, 16), (48, 32), (64, 64)])
def test_grouped_window_attention_equals_the_dense_mask(hw):
    """PyTorch attends the shifted windows group by group (one mask per group); outputs and gradients
    equal the dense-mask path the exported graph keeps, for several images at once."""
    from qmamba_deploy.models.mambairv2 import WindowAttention, WindowGroups, relative_position_index

    ws, heads, dim = 16, 2, 8
    torch.manual_seed(0)
    attn = WindowAttention(dim, ws, heads)
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.0)
    groups = WindowGroups(*hw, ws)
    assert sorted(torch.cat([i for i, _ in groups.groups]).tolist()) == list(range(groups.count))
    rpi = relative_position_index(ws)
    qkv = torch.randn(3 * groups.count, ws * ws, 3 * dim, requires_grad=True)
    dense = attn(qkv, rpi, shifted_window_mask(*hw, ws))
    (g_dense,) = torch.autograd.grad(dense.square().sum(), qkv)
    grouped = attn(qkv, rpi, groups)
    (g_grouped,) = torch.autograd.grad(grouped.square().sum(), qkv)
    assert torch.allclose(grouped, dense, atol=1e-5) and torch.allclose(g_grouped, g_dense, atol=1e-4)


def test_flip_padding_and_crop(tiny_v2):
    x = torch.rand(1, 3, 9, 13)
    padded = tiny_v2.pad(x)
    assert padded.shape[-2:] == (16, 16)
    assert torch.equal(padded[..., 9:, :13], torch.flip(x, [2])[..., :7, :])
    tiny = torch.rand(1, 3, 3, 5)  # smaller than half a window
    assert tiny_v2.pad(tiny).shape[-2:] == (8, 8)
    with torch.no_grad():
        assert tiny_v2(tiny).shape == (1, 3, 6, 10)


@pytest.mark.parametrize("kwargs,out_hw", [
    (dict(TINY_V1, upsampler="pixelshuffle", upscale=4), (48, 40)),
    (dict(TINY_V1, upsampler="pixelshuffle", upscale=3), (36, 30)),
    (dict(TINY_V1, upsampler="", upscale=1, in_chans=1, resi_connection="3conv"), (12, 10)),
])
def test_mambair_heads(kwargs, out_hw):
    model = build_model("MambaIR", **kwargs).eval()
    x = torch.rand(1, kwargs["in_chans"], 12, 10)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, kwargs["in_chans"], *out_hw)


def test_mambairv2_convffn_denoise_head():
    kwargs = dict(TINY_V2, upsampler="", upscale=1, in_chans=1)
    model = build_model("MambaIRv2", **kwargs).eval()
    assert hasattr(model.layers[0].residual_group.layers[0].convffn1, "dwconv")
    with torch.no_grad():
        assert model(torch.rand(2, 1, 10, 9)).shape == (2, 1, 10, 9)


def test_unknown_arch_suggests_names():
    with pytest.raises(ValueError, match="Did you mean mambairv2-light-x4"):
        build_model("mambairv2-lite-x4")


def test_bad_constructor_arguments_are_explained():
    with pytest.raises(ValueError, match="upsampler"):
        build_model("MambaIR", **dict(TINY_V1, upsampler="bilinear"))
    with pytest.raises(ValueError, match="squeeze"):
        build_model("MambaIR", **dict(TINY_V1, embed_dim=24))
