"""The selective-scan plugin's CUDA side, checked without a GPU.

* the host harness (tests/host_harness.cpp: scan_math.h replayed with the kernel's tiling,
  warp scans and carried state) matches the Python reference scan to 1e-5;
* nvcc compiles the kernel for Orin (sm_87) and Hopper (sm_90).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from qmamba_deploy.ops.selective_scan import selective_scan_ref
from qmamba_deploy.trt import plugin

# kTile in scan_math.h: lengths around it exercise the carried state.
TILE = 128 * 8


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if not shutil.which("g++"):
        pytest.skip("g++ is not installed: the host harness cannot be built")
    return plugin.compile_host_harness(tmp_path_factory.mktemp("harness"))


def _case(batch, dim, groups, length, state, seed, with_skip=True, with_bias=True, delta_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "u": r(batch, dim, length),
        "delta": r(batch, dim, length) * 0.5 - 1.0 + delta_shift,
        "A": -torch.rand(dim, state, generator=g) * 2.0 - 0.05,
        "B": r(batch, groups, state, length),
        "C": r(batch, groups, state, length),
        "D_skip": r(dim) if with_skip else None,
        "delta_bias": r(dim) * 0.3 if with_bias else None,
    }


def _reference(case, softplus):
    as64 = {k: (v.double() if v is not None else None) for k, v in case.items()}
    return selective_scan_ref(as64["u"], as64["delta"], as64["A"], as64["B"], as64["C"], as64["D_skip"],
                              as64["delta_bias"], delta_softplus=softplus).numpy()


CASES = [
    # batch, dim, groups, length, state, softplus, skip, bias, delta_shift
    (1, 4, 1, 1, 1, True, True, True, 0.0),
    (2, 8, 4, 37, 8, True, True, True, 0.0),
    (1, 6, 2, TILE - 1, 10, False, True, True, 0.0),
    (1, 4, 4, TILE + 1, 16, True, False, False, 0.0),
    (2, 4, 2, 2 * TILE + 300, 16, True, True, True, 0.0),
    (1, 3, 1, 700, 4, True, True, True, 25.0),   # dt past the softplus threshold
]


@pytest.mark.parametrize("batch,dim,groups,length,state,softplus,skip,bias,shift", CASES)
def test_host_harness_matches_reference(harness, batch, dim, groups, length, state, softplus, skip, bias, shift):
    case = _case(batch, dim, groups, length, state, seed=length + state, with_skip=skip, with_bias=bias,
                 delta_shift=shift)
    if not softplus:  # dt = delta + bias must stay positive for a decaying state
        case["delta"] = case["delta"].abs() * 0.1
        case["delta_bias"] = case["delta_bias"].abs()
    got = plugin.run_host_harness(harness, {k: (v.numpy() if v is not None else None) for k, v in case.items()},
                                  delta_softplus=softplus)
    want = _reference(case, softplus)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() / scale <= 1e-5


@pytest.mark.parametrize("segments", [1, 2, 3, 4])
def test_host_harness_segmented_scan_matches_reference(harness, segments):
    """The two-pass mode (a sequence cut into segments of whole tiles, one block each)."""
    case = _case(1, 4, 2, 2 * TILE + 300, 8, seed=11)
    case["A"] = case["A"] * 0.01  # slow decay: every segment depends on the ones before it
    inputs = {k: v.numpy() for k, v in case.items()}
    got = plugin.run_host_harness(harness, inputs, segments=segments)
    want = _reference(case, True)
    assert np.abs(got - want).max() / max(1.0, float(np.abs(want).max())) <= 1e-5


def test_host_harness_differs_when_the_carry_is_wrong(harness):
    """The comparison can fail: a case whose second tile depends on the first one's state."""
    case = _case(1, 2, 1, TILE + 50, 4, seed=3)
    case["A"] = torch.full_like(case["A"], -1e-4)  # slow decay: the carried state matters
    inputs = {k: v.numpy() for k, v in case.items()}
    want = _reference(case, True)
    got = plugin.run_host_harness(harness, inputs, segments=1)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    # zeroing the inputs of the first tile changes the second tile's outputs
    cut = {**inputs, "u": inputs["u"].copy()}
    cut["u"][..., :TILE] = 0.0
    changed = plugin.run_host_harness(harness, cut, segments=1)
    assert np.abs(changed[..., TILE:] - got[..., TILE:]).max() > 1e-3


def test_host_harness_rejects_bad_dims(harness, tmp_path):
    inputs = {k: (v.numpy() if v is not None else None) for k, v in _case(1, 6, 4, 5, 2, seed=0).items()}
    with pytest.raises(RuntimeError, match="multiple of the groups"):
        plugin.run_host_harness(harness, inputs)


@pytest.mark.slow
def test_nvcc_compiles_the_kernel_for_orin_and_hopper(tmp_path):
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is not installed: the CUDA kernel cannot be compiled here")
    exe = plugin.nvcc_compile(tmp_path, archs=(87, 90))
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:  # the kernels are in the binary for both architectures
        listing = subprocess.run([cuobjdump, "--list-elf", str(exe)], capture_output=True, text=True)
        assert "sm_87" in listing.stdout and "sm_90" in listing.stdout, listing.stdout
    if not torch.cuda.is_available():  # without a GPU the check program must stop with a CUDA message, not crash
        run = subprocess.run([str(exe), "1", "8", "1", "100", "4"], capture_output=True, text=True)
        assert run.returncode == 2 and "kernel_check:" in run.stderr, run.stderr


@pytest.mark.gpu
def test_kernel_matches_the_reference_on_the_gpu(tmp_path):
    if not torch.cuda.is_available() or not shutil.which("nvcc"):
        pytest.skip("needs an NVIDIA GPU and nvcc")
    exe = plugin.nvcc_compile(tmp_path, arch_flags=["-arch=native"])
    for args in (["2", "8", "4", "37", "8"], ["1", "6", "2", "2348", "16"], ["1", "4", "1", "5000", "10", "fp16"]):
        run = subprocess.run([str(exe), *args, "3"], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_plugin_checksum_covers_every_source(tmp_path):
    root = plugin.plugin_source_dir()
    files = {p.as_posix() for p in plugin.plugin_source_files(root)}
    assert {"include/qmamba/scan_math.h", "src/selective_scan_kernel.cu", "tests/host_harness.cpp",
            "CMakeLists.txt"} <= files
    copy = tmp_path / "src"
    shutil.copytree(root, copy)
    assert plugin.plugin_checksum(copy) == plugin.plugin_checksum(root)
    (copy / "include" / "qmamba" / "scan_math.h").write_text("// edited\n", encoding="utf-8")
    assert plugin.plugin_checksum(copy) != plugin.plugin_checksum(root)


def test_cmake_builds_the_libraries_the_python_side_names():
    """The library names live in CMakeLists.txt and in qmamba_deploy.trt.plugin: they must agree."""
    import re

    text = (plugin.plugin_source_dir() / "CMakeLists.txt").read_text()
    targets = re.findall(r"^\s*qmamba_plugin_library\((\w+) ", text, re.M)
    assert sorted(f"lib{t}.so" for t in targets) == sorted([plugin.PLUGIN_LIBRARY, plugin.PLUGIN_LIBRARY_DLOPEN])
