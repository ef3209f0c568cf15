"""The quantizers' training kernels (quant/fused.py) against their reference compositions.

Forward: bit-for-bit the same values. Backward: the same gradients for the input and every
quantizer parameter, to float rounding (the kernels sum in another order than autograd's chain).
Both implementations of the kernels are checked: the compiled passes (quant/fake_quant_cpu.py,
where a C compiler is present) and the torch passes that stand in for them without one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qmamba_deploy.errors import EnvironmentMissing, OptionError
from qmamba_deploy.ops import native
from qmamba_deploy.quant import fake_quant_cpu, fused
from qmamba_deploy.quant.quantizers import DLS, LSQ, RFA


def _dls_uncapped(bits: int) -> DLS:
    """DLS with weights that keep α below its cap, so every statistic carries a gradient."""
    q = DLS(bits)
    with torch.no_grad():
        for name, value in {"weight1": 0.01, "weight2": 0.02, "weight3": -0.001, "weight4": 0.003,
                            "weight21": -0.7, "weight22": 0.1, "weight23": 0.05, "weight24": -0.02}.items():
            getattr(q, name).fill_(value)
    return q


def _rfa_crossed() -> RFA:
    """RFA whose anchors crossed during training (the literal rule instead of bucketize)."""
    q = RFA(3)
    q.train()
    with torch.no_grad():
        q(torch.randn(8, 8))
        q.a[3], q.a[4] = q.a[4].item() + 0.3, q.a[3].item()
    return q


CASES = {
    "lsq": (lambda: LSQ(4), (2, 40, 6)),
    "lsq+": (lambda: LSQ(4, offset=True), (2, 40, 6)),
    "lsq+ 2-bit": (lambda: LSQ(2, offset=True), (3, 50)),
    "lsq per channel": (lambda: LSQ(4, channels=5, axis=0), (5, 12)),
    "lsq+ per channel, middle axis": (lambda: LSQ(3, offset=True, channels=5, axis=1), (3, 5, 7)),
    "lsq 8-bit, not contiguous": (lambda: LSQ(8, offset=True), (40, 9), "transposed"),
    "rfa": (lambda: RFA(4), (16, 24)),
    "rfa per channel": (lambda: RFA(2, channels=16), (16, 8, 3, 3)),
    "rfa crossed anchors": (_rfa_crossed, (12, 10)),
    "rfa 8-bit, per channel, long rows": (lambda: RFA(8, channels=6), (6, 700)),
    "dls": (lambda: DLS(4), (2, 30, 11)),
    "dls uncapped": (lambda: _dls_uncapped(4), (2, 30, 11)),
    "dls uncapped 2-bit": (lambda: _dls_uncapped(2), (3, 64)),
    "dls uncapped, not contiguous": (lambda: _dls_uncapped(4), (64, 33), "transposed"),
}

BACKENDS = ["compiled", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the kernels on the compiled passes (skipped without a C compiler) or on their torch passes."""
    if request.param == "compiled":
        if not fake_quant_cpu.available():
            pytest.skip("no C compiler: the compiled passes are not built (the torch passes are tested)")
        yield request.param
    else:
        with fused.torch_passes():
            yield request.param


def _run(q: torch.nn.Module, x0: torch.Tensor, reference: bool):
    q.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    with fused.reference_autograd() if reference else torch.enable_grad():
        y = q(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in q.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("relu", [False, True], ids=["signed", "ties"])
def test_kernel_matches_reference(name, relu, backend):
    make, shape, *layout = CASES[name]
    torch.manual_seed(0)
    q = make()
    q.train()
    x0 = torch.randn(shape) * 2 + 0.3
    if layout:  # a transposed view, as the model hands some activations over
        x0 = torch.randn(shape[::-1]).mul(2).add(0.3).t()
        assert not x0.is_contiguous()
    if relu:  # many equal values: ties at min(x) for DLS's statistics and at the clamps
        x0 = x0.clamp(min=0)
    with torch.no_grad():
        if not q.initialized:
            q(x0)
        for p in q.parameters():  # away from the initial values, so every parameter has a gradient
            if not (isinstance(q, RFA) and p is q.a):
                p.add_(torch.randn(p.shape) * 0.01)
    y_ref, gx_ref, gp_ref = _run(q, x0, reference=True)
    y, gx, gp = _run(q, x0, reference=False)
    assert torch.equal(y, y_ref), "the kernel's forward must be bit-identical to the reference"
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    assert gp.keys() == gp_ref.keys()
    for key in gp:
        assert (gp[key] is None) == (gp_ref[key] is None), key
        if gp[key] is not None:
            scale = max(1.0, float(gp_ref[key].abs().max()))
            torch.testing.assert_close(gp[key], gp_ref[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


def test_kernels_only_where_a_gradient_is_recorded():
    x = torch.randn(4, requires_grad=True)
    assert fused.use_fused(x)
    with torch.no_grad():
        assert not fused.use_fused(x)
    assert not fused.use_fused(torch.randn(4), None)
    with fused.reference_autograd():
        assert not fused.use_fused(x)
    assert fused.use_fused(x)  # restored on leaving the block
    assert not fused.use_fused(torch.randn(4, device="meta", requires_grad=True))  # CPU only


def test_dls_constant_tensor_passes_unchanged(backend):
    """A constant tensor (cap 0) passes through DLS with zero, finite gradients to its weights."""
    q = DLS(4)
    q.train()
    x = torch.full((2, 8), 0.5, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.equal(y.detach(), x.detach())
    for p in q.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_compiled_passes_run_in_training():
    """Where the library builds, a quantizer's training call records the compiled node (so the speed
    the benchmarks report is the compiled passes'), and float64 inputs stay on the torch passes."""
    if not fake_quant_cpu.available():
        pytest.skip("no C compiler: the compiled passes are not built")
    q = LSQ(4, offset=True)
    q.train()
    x = torch.randn(4, 8, requires_grad=True)
    assert type(q(x).grad_fn).__name__ == "_LSQCompiledBackward"
    with fused.torch_passes():
        assert type(q(x).grad_fn).__name__ == "_LSQBackward"
    assert type(q(x).grad_fn).__name__ == "_LSQCompiledBackward"  # restored on leaving the block
    assert type(q.double()(x.double()).grad_fn).__name__ == "_LSQBackward"
    # float64 parameters with a float32 input promote in torch: the torch passes take them, for every kind
    for kind, shape in ((LSQ(4, offset=True), (4, 8)), (DLS(4), (4, 8)), (RFA(4), (8, 8))):
        kind.train()
        with torch.no_grad():
            kind(torch.randn(shape))
        assert "Compiled" not in type(kind.double()(torch.randn(shape, requires_grad=True)).grad_fn).__name__


def test_compiled_passes_refuse_mismatched_step_sizes():
    """The C loops index the step sizes by channel: a count that does not match the tensor is refused
    before it reaches them (the torch passes would fail to broadcast)."""
    if not fake_quant_cpu.available():
        pytest.skip("no C compiler: the compiled passes are not built")
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="3 step sizes for 4 channels"):
        fake_quant_cpu.lsq_forward(x, torch.ones(3), None, -8.0, 7.0, 0)
    with pytest.raises(ValueError, match="2 step sizes for 1 channels"):
        fake_quant_cpu.rfa_forward(x, torch.ones(2), 0.0, torch.arange(15.0) - 7.5, 8, -8.0, 7.0, None)


@pytest.mark.parametrize("env", [{"QMAMBA_FAKE_QUANT_CPU": "torch"}, {"CC": "/nonexistent/cc"}],
                         ids=["switched off", "no compiler"])
def test_torch_passes_without_the_library(env, tmp_path):
    """Switched off, or with no compiler to build it, the quantizers train on their torch passes."""
    code = ("import torch; from qmamba_deploy.quant import fake_quant_cpu; from qmamba_deploy.quant.quantizers "
            "import LSQ; q = LSQ(4).train(); x = torch.randn(4, 8, requires_grad=True); "
            "print(fake_quant_cpu.backend(), type(q(x).grad_fn).__name__)")
    full = {**os.environ, "QMAMBA_CACHE_DIR": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "_LSQBackward"]


def test_library_switch_values(monkeypatch, tmp_path):
    """The libraries' environment switches: unset/auto builds where it can and falls back quietly, torch
    never builds, compiled insists (one sentence naming the switch and the reason), anything else is refused."""
    source = tmp_path / "lib.c"
    source.write_text("int f(void) { return 1; }\n")
    calls = []

    def loader(cc):
        calls.append(cc)
        raise OSError("cannot build here")

    monkeypatch.setenv("CC", sys.executable)  # found on PATH or not, never a C compiler
    for value in ("", "auto", "AUTO "):
        monkeypatch.setenv("QMAMBA_TEST_SWITCH", value)
        assert native.load_optional(source, "QMAMBA_TEST_SWITCH", loader) is None
    assert len(calls) == 3
    monkeypatch.setenv("QMAMBA_TEST_SWITCH", "torch")
    assert native.load_optional(source, "QMAMBA_TEST_SWITCH", loader) is None
    assert len(calls) == 3  # torch never tries to build
    monkeypatch.setenv("QMAMBA_TEST_SWITCH", "compiled")
    with pytest.raises(EnvironmentMissing, match="QMAMBA_TEST_SWITCH=compiled .* building lib.c .* failed"):
        native.load_optional(source, "QMAMBA_TEST_SWITCH", loader)
    monkeypatch.setenv("QMAMBA_TEST_SWITCH", "off")
    with pytest.raises(OptionError, match="QMAMBA_TEST_SWITCH='off' is not understood"):
        native.load_optional(source, "QMAMBA_TEST_SWITCH", loader)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("QMAMBA_TEST_SWITCH", "compiled")
    with pytest.raises(EnvironmentMissing, match="no C compiler"):
        native.load_optional(source, "QMAMBA_TEST_SWITCH", loader)


def test_compiled_rounding_is_torch_round_bit_for_bit():
    """Half to even at every tie of an 8-bit grid, and the sign of a zero kept (-0.3 -> -0.0), as
    torch.round: compared as bit patterns, not values."""
    if not fake_quant_cpu.available():
        pytest.skip("no C compiler: the compiled passes are not built")
    x = torch.cat([torch.arange(-129.0, 129.0, 0.5), torch.tensor([-0.3, -0.0, 0.0, 0.3, -1e-30, float("nan")])])
    out = fake_quant_cpu.lsq_forward(x, torch.ones(1), None, -128.0, 127.0, None)
    ref = torch.round(x.clamp(-128.0, 127.0)) * 1.0
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
