"""SelectiveScan op: reference vs chunked path, gradients, custom op, ONNX mapping."""

from __future__ import annotations

import os

import pytest
import torch

from qmamba_deploy.ops import contract
from qmamba_deploy.ops.selective_scan import (
    SCAN_OP,
    _step_size,
    chunked_linear_scan,
    selective_scan,
    selective_scan_chunked,
    selective_scan_portable,
    selective_scan_ref,
)


def make_inputs(bsz=2, k=4, dk=3, n=5, length=37, dtype=torch.float32, delta_shift=0.0,
                positive_delta=False, seed=0):
    """Realistic magnitudes: A = -exp(N(0, 0.5)), delta ~ N(0, 0.5) with a bias around -1."""
    g = torch.Generator().manual_seed(seed)
    dim = k * dk

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = rnd(bsz, dim, length)
    delta = rnd(bsz, dim, length) * 0.5 + delta_shift
    A = -torch.exp(rnd(dim, n) * 0.5)
    B = rnd(bsz, k, n, length)
    C = rnd(bsz, k, n, length)
    D = rnd(dim)
    bias = rnd(dim) * 0.5 - 1.0
    if positive_delta:                     # without softplus, dt = delta + bias must stay > 0
        delta = delta.abs() + 0.05 - bias[:, None]
    return [t.to(dtype) for t in (u, delta, A, B, C, D, bias)]


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("k,dk,n,length", [
    (1, 4, 5, 37),        # K = 1
    (4, 3, 8, 100),       # K = 4, L not a multiple of the chunk
    (2, 2, 3, 1),         # L = 1
    (4, 2, 16, 257),
])
@pytest.mark.parametrize("softplus", [True, False])
def test_chunked_matches_reference(k, dk, n, length, softplus):
    x = make_inputs(2, k, dk, n, length, positive_delta=not softplus)
    ref = selective_scan_ref(*x, delta_softplus=softplus)
    assert ref.shape == (2, k * dk, length)
    for chunk in (None, 1, 7, 64):
        out = selective_scan_chunked(*x, delta_softplus=softplus, chunk=chunk)
        assert rel_err(ref, out) <= 1e-5, chunk
    assert rel_err(ref, selective_scan(*x, delta_softplus=softplus)) <= 1e-5


@pytest.mark.parametrize("k,dk,n,length", [(1, 4, 5, 37), (4, 3, 8, 100), (2, 2, 3, 1), (1, 6, 16, 64)])
@pytest.mark.parametrize("softplus", [True, False])
def test_portable_matches_reference(k, dk, n, length, softplus):
    """The export path (two loops and a cumulative sum per chunk) run eagerly, chunk sizes that do
    and do not divide L, and decays of thousands (exp(A * cumsum) underflows to 0, never overflows)."""
    for shift in (0.0, 30.0):
        x = make_inputs(2, k, dk, n, length, positive_delta=not softplus, delta_shift=shift)
        ref = selective_scan_ref(*x, delta_softplus=softplus)
        for chunk in (1, 7, 16):
            out = selective_scan_portable(*x, delta_softplus=softplus, chunk=chunk)
            assert out.shape == ref.shape and torch.isfinite(out).all()
            assert rel_err(ref, out) <= 1e-5, (shift, chunk)


def test_large_decay_is_finite():
    """delta + 30: dt*|A| sums to thousands; a log-space cumsum would overflow."""
    x = make_inputs(1, 2, 4, 6, 300, delta_shift=30.0)
    ref = selective_scan_ref(*x)
    out = selective_scan_chunked(*x)
    assert torch.isfinite(out).all()
    assert rel_err(ref, out) <= 1e-5


def test_optional_d_and_bias():
    u, delta, A, B, C, _, _ = make_inputs(1, 2, 2, 3, 20)
    ref = selective_scan_ref(u, delta, A, B, C)
    assert rel_err(ref, selective_scan(u, delta, A, B, C)) <= 1e-5
    assert rel_err(ref, selective_scan_chunked(u, delta, A, B, C)) <= 1e-5


def test_float16_io():
    x = make_inputs(2, 2, 4, 8, 50)
    x16 = [t.half() if i in (0, 1, 3, 4) else t for i, t in enumerate(x)]
    y16 = selective_scan(*x16)
    assert y16.dtype == torch.float16
    ref = selective_scan_ref(*[t.float() for t in x16])
    assert rel_err(ref, y16.float()) <= 2e-3
    assert selective_scan_chunked(*x16).dtype == torch.float16


def test_chunked_linear_scan_matches_loop():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 29, 4, generator=g)
    b = torch.randn(2, 3, 29, 4, generator=g)
    h = torch.zeros(2, 3, 4)
    fwd = []
    for t in range(29):
        h = a[:, :, t] * h + b[:, :, t]
        fwd.append(h)
    h = torch.zeros(2, 3, 4)
    bwd = [None] * 29
    for t in reversed(range(29)):
        h = a[:, :, t] * h + b[:, :, t]
        bwd[t] = h
    for chunk in (1, 5, 8, 40):
        assert rel_err(torch.stack(fwd, 2), chunked_linear_scan(a, b, chunk)) <= 1e-6
        assert rel_err(torch.stack(bwd, 2), chunked_linear_scan(a, b, chunk, reverse=True)) <= 1e-6


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("softplus", [True, False])
def test_gradcheck_float64(softplus):
    x = [t.requires_grad_() for t in make_inputs(1, 2, 2, 3, 7, torch.float64, positive_delta=not softplus)]
    assert torch.autograd.gradcheck(lambda *a: SCAN_OP(*a, softplus), x)


@pytest.mark.parametrize("softplus,shift", [(True, 0.0), (True, 30.0), (False, 0.0)])
def test_backward_matches_autograd_reference(softplus, shift):
    x = [t.requires_grad_() for t in make_inputs(2, 4, 8, 6, 130, delta_shift=shift,
                                                  positive_delta=not softplus)]
    y_ref = selective_scan_ref(*x, delta_softplus=softplus)
    gy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, x, gy)
    g_op = torch.autograd.grad(selective_scan(*x, delta_softplus=softplus), x, gy)
    names = contract.INPUT_NAMES
    for name, a, b in zip(names, g_ref, g_op):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-5, name


def test_opcheck():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck not available")
    x = [t.requires_grad_() for t in make_inputs(1, 2, 2, 3, 20)]
    result = opcheck(SCAN_OP.default, (*x, True))
    assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("index,bad,name", [
    (0, torch.zeros(2, 8), "u"),
    (1, torch.zeros(2, 8, 9), "delta"),
    (2, torch.zeros(7, 5), "A"),
    (3, torch.zeros(2, 3, 5, 10), "B"),     # D = 8 not divisible by K = 3
    (4, torch.zeros(2, 4, 4, 10), "C"),     # wrong N
    (5, torch.zeros(7), "D_skip"),
    (6, torch.zeros(8, 1), "delta_bias"),
])
def test_bad_shapes_raise(index, bad, name):
    x = make_inputs(2, 4, 2, 5, 10)
    x[index] = bad
    with pytest.raises(ValueError, match=rf"selective_scan: {name} has shape"):
        selective_scan(*x)


# ---------------------------------------------------------------------------- ONNX


class _TinyScan(torch.nn.Module):
    def __init__(self, dim=8, n=4, softplus=False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A_log = torch.nn.Parameter(torch.randn(dim, n, generator=g) * 0.3)
        self.D = torch.nn.Parameter(torch.randn(dim, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(dim, generator=g) * 0.3 + 1.0)
        self.softplus = softplus

    def forward(self, u, delta, B, C):
        delta = delta.abs() if not self.softplus else delta
        y = selective_scan(u * 2.0, delta, -torch.exp(self.A_log), B, C, self.D, self.bias,
                           delta_softplus=self.softplus)
        return y + 1.0


def _export_op(model, args, dynamic_shapes=None, input_names=None):
    """The op's own ONNX mapping, on a module that only calls it: torch.onnx.export with the
    translation table ``export/onnx_export.py`` uses, then its finalize step."""
    from qmamba_deploy.export.scan_onnx import DEFAULT_OPSET, custom_translation_table, finalize_scan_model

    program = torch.onnx.export(model, args, dynamo=True, opset_version=DEFAULT_OPSET, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=custom_translation_table(), input_names=input_names,
                                verbose=False)
    return finalize_scan_model(program.model_proto)


def test_onnx_export_one_node_and_ort(tmp_path):
    onnx = pytest.importorskip("onnx")
    softplus = False
    pytest.importorskip("onnxruntime_extensions")
    from qmamba_deploy.runtime.ort import ort_session_with_scan

    model = _TinyScan(softplus=softplus).eval()
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(1, 8, 24, generator=g), torch.randn(1, 8, 24, generator=g),
            torch.randn(1, 2, 4, 24, generator=g), torch.randn(1, 2, 4, 24, generator=g))
    path = tmp_path / "scan.onnx"
    length = torch.export.Dim("L", min=2, max=4096)
    proto = _export_op(model, args, dynamic_shapes=({2: length}, {2: length}, {3: length}, {3: length}),
                       input_names=["u", "delta", "B", "C"])
    onnx.save_model(proto, str(path))

    m = onnx.load(str(path))
    nodes = [n for n in m.graph.node if n.op_type == contract.OP_TYPE]
    assert len(nodes) == 1
    node = nodes[0]
    assert node.domain == contract.DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    assert attrs == contract.node_attributes(softplus)
    assert (contract.DOMAIN, contract.DOMAIN_VERSION) in {(o.domain, o.version) for o in m.opset_import}
    assert contract.OP_TYPE not in {f.name for f in m.functions}
    assert m.ir_version <= 10
    onnx.checker.check_model(m)

    # ORT with the Python kernel, at another length than the export's (dynamic L)
    args = (torch.randn(1, 8, 37, generator=g), torch.randn(1, 8, 37, generator=g),
            torch.randn(1, 2, 4, 37, generator=g), torch.randn(1, 2, 4, 37, generator=g))
    with torch.no_grad():
        expected = model(*args)
    session = ort_session_with_scan(path)
    (got,) = session.run(None, {name: t.numpy() for name, t in zip(["u", "delta", "B", "C"], args)})
    assert rel_err(expected, torch.from_numpy(got)) <= 1e-5

    # the shipped file is untouched
    m2 = onnx.load(str(path))
    assert [n.domain for n in m2.graph.node if n.op_type == contract.OP_TYPE] == [contract.DOMAIN]


def test_onnx_softplus_attribute_and_proto_input():
    pytest.importorskip("onnxruntime_extensions")
    from qmamba_deploy.export.graph import scan_nodes
    from qmamba_deploy.runtime.ort import ort_session_with_scan

    model = _TinyScan(softplus=True).eval()
    args = (torch.randn(1, 8, 16), torch.randn(1, 8, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    proto = _export_op(model, args)
    (node,) = scan_nodes(proto)
    assert {a.name: a.i for a in node.attribute if a.name == "delta_softplus"} == {"delta_softplus": 1}
    session = ort_session_with_scan(proto)
    (got,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)})
    with torch.no_grad():
        assert rel_err(model(*args), torch.from_numpy(got)) <= 1e-5
    assert scan_nodes(proto)[0].domain == contract.DOMAIN      # caller's proto untouched


def test_onnx_float16_model_runs_in_ort():
    """float16 I/O: the ORT session wraps the float32 Python kernel in Casts."""
    pytest.importorskip("onnxruntime_extensions")
    from qmamba_deploy.runtime.ort import ort_session_with_scan

    model = _TinyScan(softplus=True).eval()
    g = torch.Generator().manual_seed(5)
    args = tuple(torch.randn(*s, generator=g).half() for s in ((1, 8, 16), (1, 8, 16), (1, 2, 4, 16), (1, 2, 4, 16)))
    session = ort_session_with_scan(_export_op(model, args))
    (got,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)})
    assert got.dtype.name == "float16"
    with torch.no_grad():
        assert rel_err(model(*args), torch.from_numpy(got)) <= 2e-3


# ---------------------------------------------------------------------------- compiled CPU forward


def _compiled_or_skip():
    import shutil

    from qmamba_deploy.ops import scan_cpu
    if not scan_cpu.available():
        if shutil.which("cc") and not os.environ.get("QMAMBA_SCAN_CPU"):
            pytest.fail("a C compiler is installed but the compiled scan did not build")
        pytest.skip("no C compiler: the op's CPU forward runs the chunked torch path")
    return scan_cpu


@pytest.mark.parametrize("k,dk,n,length", [
    (1, 48, 8, 300),      # MambaIRv2-light's shape (D = 48, N = 8, K = 1): six full 8-channel blocks
    (4, 3, 5, 37),        # blocks cut short by the group boundary
    (2, 13, 16, 64),      # the largest state, a partial last block
    (1, 1, 1, 1),
])
@pytest.mark.parametrize("softplus", [True, False])
def test_compiled_forward_matches_reference(k, dk, n, length, softplus):
    scan_cpu = _compiled_or_skip()
    x = make_inputs(2, k, dk, n, length, positive_delta=not softplus)
    ref = selective_scan_ref(*[t.double() for t in x], delta_softplus=softplus)
    out = SCAN_OP(*x, softplus)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(ref, out) < 2e-6
    # what the op ran on the CPU in float32 is the kernel, given the step sizes the op glue forms
    u, delta, A, B, C, D, bias = x
    assert torch.equal(scan_cpu.scan_forward(u, _step_size(delta, bias, softplus, torch.float32), A, B, C, D), out)


@pytest.mark.parametrize("k,dk,n,length,softplus", [(1, 48, 8, 300, True), (4, 3, 5, 37, True),
                                                     (2, 13, 16, 64, False), (1, 1, 1, 1, True)])
def test_compiled_backward_matches_the_torch_gradient(k, dk, n, length, softplus):
    """The compiled gradient (the backward op, which runs it on the CPU in float32) against the
    hand-written torch one in float64 (itself gradchecked above), every input's gradient; and the op's
    autograd in float32 runs it."""
    from qmamba_deploy.ops.selective_scan import selective_scan_backward

    _compiled_or_skip()
    x = make_inputs(2, k, dk, n, length, positive_delta=not softplus, seed=3)
    gy = torch.randn(x[0].shape, generator=torch.Generator().manual_seed(1))
    ref = selective_scan_backward(gy.double(), *[t.double() for t in x], delta_softplus=softplus)
    got = torch.ops.qmamba.selective_scan_backward(gy, *x, softplus)
    for name, g, r in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), got, ref):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        assert rel_err(r, g) < 2e-6, name
    leaves = [t.clone().requires_grad_() for t in x]
    SCAN_OP(*leaves, softplus).backward(gy)
    for leaf, g in zip(leaves, got):
        assert torch.equal(leaf.grad, g)


@pytest.mark.parametrize("k,dk,n,length", [(1, 48, 8, 300), (4, 3, 5, 37), (2, 13, 16, 70)])
def test_the_8_lane_build_an_avx2_cpu_gets_matches_the_references(k, dk, n, length, monkeypatch, tmp_path):
    """This CPU builds 16-channel blocks (AVX-512); a CPU without AVX-512 builds 8-channel ones from the
    same source. That build (-mno-avx512f), forward and every gradient, against the float64 references."""
    import platform
    import shutil

    from qmamba_deploy.ops.selective_scan import selective_scan_backward

    scan_cpu = _compiled_or_skip()
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("-mno-avx512f is an x86 flag")
    monkeypatch.setenv("QMAMBA_CACHE_DIR", str(tmp_path))
    lib = scan_cpu.load_library(shutil.which(os.environ.get("CC") or "cc"), extra_flags=("-mno-avx512f",))
    assert lib.qmamba_scan_lanes() == 8
    monkeypatch.setattr(scan_cpu, "_library", lambda: lib)
    x = make_inputs(2, k, dk, n, length, seed=5)
    u, delta, A, B, C, D, bias = x
    dt = _step_size(delta, bias, True, torch.float32)
    ref = selective_scan_ref(*[t.double() for t in x], delta_softplus=True)
    assert rel_err(ref, scan_cpu.scan_forward(u, dt, A, B, C, D)) < 2e-6
    gy = torch.randn(u.shape, generator=torch.Generator().manual_seed(2))
    grads = selective_scan_backward(gy.double(), *[t.double() for t in x], delta_softplus=True)
    du, d_dt, dA, dB, dC, dD = scan_cpu.scan_backward(gy, u, dt, A, B, C, D)
    for name, g, r in (("u", du, grads[0]), ("A", dA, grads[2]), ("B", dB, grads[3]), ("C", dC, grads[4]),
                       ("D", dD, grads[5])):
        assert rel_err(r, g) < 2e-6, name
    # d dt through softplus is the delta gradient
    z = delta + bias[:, None]
    assert rel_err(grads[1], d_dt * torch.sigmoid(z)) < 2e-6


def test_compiled_forward_at_extreme_steps_and_nan():
    """Decays of exp(-1e4) (clamped at exp(-87), the state is gone either way), dt near 0, and a NaN
    that must stay a NaN in its own channel and nowhere else."""
    _compiled_or_skip()
    x = make_inputs(1, 1, 9, 8, 50)
    x[1][0, 0, 10] = 1e4                     # dt ~ 1e4: a decay far below float32's range
    x[1][0, 1] = -40.0                       # dt = softplus(-41) ~ 1e-18 in a whole channel
    ref = selective_scan_ref(*[t.double() for t in x])
    assert rel_err(ref, SCAN_OP(*x, True)) < 2e-6
    x[0][0, 2, 20] = float("nan")
    out = SCAN_OP(*x, True)
    assert out[0, 2, 20:].isnan().all() and not out[0, 2, :20].isnan().any()
    assert not out[0, [c for c in range(9) if c != 2]].isnan().any()


def test_compiled_scan_can_be_switched_off_and_falls_back_without_a_compiler(tmp_path):
    """QMAMBA_SCAN_CPU=torch, or a compiler that fails: the op runs the chunked path, same results."""
    import shutil
    import subprocess
    import sys

    code = ("import torch; from qmamba_deploy.ops import scan_cpu; from qmamba_deploy.ops.selective_scan import "
            "SCAN_OP, selective_scan_chunked; x = [torch.randn(1, 4, 30), torch.randn(1, 4, 30), -torch.rand(4, 3), "
            "torch.randn(1, 1, 3, 30), torch.randn(1, 1, 3, 30), torch.randn(4), torch.randn(4)]; "
            "y = SCAN_OP(*x, True); "
            "assert scan_cpu.backend() == 'compiled' or torch.equal(y, selective_scan_chunked(*x)); "
            "print(scan_cpu.backend())")
    env = {**os.environ, "QMAMBA_CACHE_DIR": str(tmp_path)}
    for extra in ({"QMAMBA_SCAN_CPU": "torch"}, {"CC": "false"}):
        run = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0 and run.stdout.strip() == "torch", run.stderr
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in the cache
    if shutil.which("cc"):
        # an unwritable cache (a file where the folder should be): built in a private temporary folder instead
        (tmp_path / "blocked").write_text("")
        blocked = {**os.environ, "QMAMBA_CACHE_DIR": str(tmp_path / "blocked")}
        run = subprocess.run([sys.executable, "-c", code], env=blocked, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.strip() == "compiled", run.stderr
