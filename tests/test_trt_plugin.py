"""The selective-scan plugin's CUDA side, checked without a GPU.

* the host harness (tests/host_harness.cpp: scan_math.h replayed with the kernel's layout: 8
  channels x 16 lanes per block, 16 steps per lane, the vector or scalar path of each row, B and
  C staged through a shared-memory image, the 16-lane scans in shuffle order, decaying tiles
  (composed maps) and the others (lanes one after another), carried states, the two passes with
  pass 1 by reduction and pass 2's catch-up after invalid maps) matches the float64 reference
  scan to 1e-5;
* the staging and lane index functions are conflict-free bijections (--check-layout);
* the launcher's segment plan follows the GPU's occupancy (--plan);
* nvcc compiles the kernel for Orin (sm_87) and Hopper (sm_90).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from qmamba_deploy.ops.selective_scan import selective_scan_ref
from qmamba_deploy.trt import plugin

# kTile in scan_math.h (16 lanes x 16 steps): lengths around it exercise the carried state.
TILE = 16 * 16
# The tile of the previous kernel (128 threads x 8 steps): its cases are kept.
OLD_TILE = 128 * 8


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


def _numpy(case):
    return {k: (v.numpy() if v is not None else None) for k, v in case.items()}


def _rel_error(got, want):
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))


CASES = [
    # batch, dim, groups, length, state, softplus, skip, bias, delta_shift
    (1, 4, 1, 1, 1, True, True, True, 0.0),
    (2, 8, 4, 37, 8, True, True, True, 0.0),
    (1, 6, 2, OLD_TILE - 1, 10, False, True, True, 0.0),
    (1, 4, 4, OLD_TILE + 1, 16, True, False, False, 0.0),
    (2, 4, 2, 2 * OLD_TILE + 300, 16, True, True, True, 0.0),
    (1, 3, 1, 700, 4, True, True, True, 25.0),   # dt past the softplus threshold
    # the new tile: one step short of it, one past it; several blocks of 8 channels per group,
    # a last block of a group with fewer channels (Dk = 10), an odd L
    (1, 24, 1, TILE - 1, 8, True, True, True, 0.0),
    (1, 20, 2, TILE + 1, 8, True, True, True, 0.0),
    (2, 16, 1, 3 * TILE + 77, 10, True, True, True, -3.0),  # small dt: slow decay over tiles
]


@pytest.mark.parametrize("batch,dim,groups,length,state,softplus,skip,bias,shift", CASES)
def test_host_harness_matches_reference(harness, batch, dim, groups, length, state, softplus, skip, bias, shift):
    case = _case(batch, dim, groups, length, state, seed=length + state, with_skip=skip, with_bias=bias,
                 delta_shift=shift)
    if not softplus:  # dt = delta + bias stays positive: decaying states (growing ones: below)
        case["delta"] = case["delta"].abs() * 0.1
        case["delta_bias"] = case["delta_bias"].abs()
    stats = {}
    got = plugin.run_host_harness(harness, _numpy(case), delta_softplus=softplus, stats=stats)
    assert _rel_error(got, _reference(case, softplus)) <= 1e-5
    # A < 0 and dt >= 0 (softplus, or delta + bias >= 0): every tile takes the composed-map loop
    assert stats["decaying_tiles"] > 0 and stats["serial_tiles"] == 0 and stats["catch_ups"] == 0


@pytest.mark.parametrize("state", range(1, 17))
def test_host_harness_every_state_size(harness, state):
    """Every instantiated N, in one pass, in two (pass 1's maps of N states) and, up to
    kMaxFusedState = 12, in the fused mode (one tile per block: 3 here)."""
    case = _case(1, 12, 2, 2 * TILE + 40, state, seed=100 + state)
    case["A"] = case["A"] * 0.05  # slow decay: the carried states and segment maps matter
    want = _reference(case, True)
    for segments in (1, 3, -1) if state <= 12 else (1, 3):
        stats = {}
        got = plugin.run_host_harness(harness, _numpy(case), segments=segments, stats=stats)
        assert stats["segments"] == 3 if segments == -1 else segments
        assert stats["fused"] == (segments == -1)
        assert _rel_error(got, want) <= 1e-5, segments


@pytest.mark.parametrize("elem_bytes", [4, 2])
def test_host_harness_misaligned_and_odd_lengths(harness, elem_bytes):
    """Base pointers off a 16-byte boundary and an L that is no multiple of the vector width:
    rows take the scalar path where the kernel's vector loads would be misaligned."""
    case = _case(2, 16, 2, 2 * TILE + 13, 8, seed=7)
    want = _reference(case, True)
    aligned, shifted = {}, {}
    got = plugin.run_host_harness(harness, _numpy(case), elem_bytes=elem_bytes, stats=aligned)
    assert _rel_error(got, want) <= 1e-5
    offsets = {"u": 1, "delta": 3, "B": 2, "C": 1, "y": 5}
    got = plugin.run_host_harness(harness, _numpy(case), elem_bytes=elem_bytes, offsets=offsets, stats=shifted)
    assert _rel_error(got, want) <= 1e-5
    # odd L: every 16 / elem_bytes-th row is aligned, the others take the scalar path (the
    # offsets move which ones); the last, partial tile is scalar
    for stats in (aligned, shifted):
        assert stats["vector"] > 0 and stats["scalar"] > 0


def test_host_harness_vector_path_when_aligned(harness):
    """L a multiple of the tile, aligned tensors: every lane access and staging chunk is a 16-byte one."""
    case = _case(1, 8, 1, 2 * TILE, 4, seed=9)
    stats = {}
    got = plugin.run_host_harness(harness, _numpy(case), stats=stats, segments=1)
    assert _rel_error(got, _reference(case, True)) <= 1e-5
    assert stats["scalar"] == 0 and stats["vector"] > 0
    misaligned = {}
    plugin.run_host_harness(harness, _numpy(case), stats=misaligned, segments=1, offsets={"u": 2})
    assert misaligned["scalar"] > 0


@pytest.mark.parametrize("segments", [1, 2, 3, 4])
def test_host_harness_segmented_scan_matches_reference(harness, segments):
    """The two-pass mode (a sequence cut into segments of whole tiles, one block each)."""
    case = _case(1, 4, 2, 2 * OLD_TILE + 300, 8, seed=11)
    case["A"] = case["A"] * 0.01  # slow decay: every segment depends on the ones before it
    stats = {}
    got = plugin.run_host_harness(harness, _numpy(case), segments=segments, stats=stats)
    assert stats["segments"] == segments
    assert _rel_error(got, _reference(case, True)) <= 1e-5


def test_host_harness_many_segments(harness):
    """More segments than lanes: each lane composes a run of maps before the tree."""
    case = _case(1, 8, 1, 40 * TILE, 4, seed=12)
    case["A"] = case["A"] * 0.001
    stats = {}
    got = plugin.run_host_harness(harness, _numpy(case), segments=40, stats=stats)
    assert stats["segments"] == 40
    assert _rel_error(got, _reference(case, True)) <= 1e-5


def _growing_case(length, state=4, dim=8):
    """delta_softplus = 0 with dt = -0.8 and A = -1: every decay is e^0.8 > 1. u is 0 but for the
    last 60 steps (h stays 0 until then), where the state grows to ~e^48: finite, but the
    composed decay of 8 lanes (e^(0.8 * 128)) or of a segment overflows, and inf * 0 is NaN."""
    case = _case(1, dim, 1, length, state, seed=21)
    case["u"][..., :length - 60] = 0.0
    case["delta"] = torch.full_like(case["delta"], -0.8)
    case["delta_bias"] = torch.zeros_like(case["delta_bias"])
    case["A"] = -torch.ones_like(case["A"]) - 0.01 * torch.arange(state)
    return case


@pytest.mark.parametrize("segments", [1, 2, 3])
def test_host_harness_growing_decays(harness, segments):
    """Tiles with growing steps run lanes one after another (and invalidate pass 1's maps, so pass
    2 reruns the earlier segments): the result stays finite and matches the reference where
    composing maps would overflow."""
    case = _growing_case(4 * TILE - 300)
    want = _reference(case, False)
    assert np.isfinite(want).all() and np.abs(want).max() > 1e10
    stats = {}
    got = plugin.run_host_harness(harness, _numpy(case), delta_softplus=False, segments=segments, stats=stats)
    assert np.isfinite(got).all()
    assert _rel_error(got, want) <= 1e-5
    assert stats["decaying_tiles"] == 0 and stats["serial_tiles"] > 0
    assert stats["catch_ups"] == (segments - 1)  # every later segment's block reruns the earlier ones


@pytest.mark.parametrize("elem_bytes", [4, 2])
def test_host_harness_fused_mode(harness, elem_bytes):
    """The fused mode (phase 1 of every block, the grid-wide barrier, phase 2): several blocks per
    group and groups, an odd L (the last tile partial), misaligned rows; a group with A > 0 is
    scanned lane after lane by its segment-0 block while the other group fuses."""
    case = _case(2, 20, 2, 6 * TILE + 13, 8, seed=31)
    case["A"] = case["A"] * 0.05
    want = _reference(case, True)
    for offsets in ({}, {"u": 1, "B": 2, "y": 3}):
        stats = {}
        got = plugin.run_host_harness(harness, _numpy(case), segments=-1, elem_bytes=elem_bytes, offsets=offsets,
                                      stats=stats)
        assert stats["fused"] and stats["segments"] == 7 and stats["serial_tiles"] == 0
        assert _rel_error(got, want) <= 1e-5, offsets
    case["A"][12] = 0.01  # group 1 (channels 10..19) does not decay
    stats = {}
    got = plugin.run_host_harness(harness, _numpy(case), segments=-1, elem_bytes=elem_bytes, stats=stats)
    assert _rel_error(got, _reference(case, True)) <= 1e-5
    assert stats["serial_tiles"] == 2 * 7 * 1  # per batch item: channel 12's block, its 7 tiles, once


def test_host_harness_growing_in_some_tiles_only(harness):
    """Mixed signs: dt < 0 only in the second tile (composed maps before and after it; with three
    segments only the third segment's block reruns the earlier ones)."""
    case = _case(1, 8, 1, 3 * TILE, 8, seed=22)
    case["delta"] = case["delta"].abs() * 0.2
    case["delta"][..., TILE:2 * TILE] *= -0.1
    case["delta_bias"] = torch.zeros_like(case["delta_bias"])
    want = _reference(case, False)
    for segments, serial, catch_ups in ((1, 1, 0), (3, 3, 1)):
        stats = {}
        got = plugin.run_host_harness(harness, _numpy(case), delta_softplus=False, segments=segments, stats=stats)
        assert _rel_error(got, want) <= 1e-5, segments
        # one pass: only tile 2 is serial; three segments: tile 2 in pass 1 (its map invalid), in
        # pass 2, and again in segment 3's catch-up
        assert (stats["serial_tiles"], stats["catch_ups"]) == (serial, catch_ups), stats


def test_host_harness_positive_A_grows_with_softplus(harness):
    """A > 0 (outside the models' A = -exp(A_log)) with softplus on: dt > 0 grows too. Only
    channels 0 and 5 grow: their block runs lanes one after another, the other block composes."""
    case = _case(1, 16, 1, 3 * TILE + 100, 4, seed=23)
    case["A"][[0, 5]] = 0.01
    want = _reference(case, True)
    for segments in (1, 3):
        stats = {}
        got = plugin.run_host_harness(harness, _numpy(case), segments=segments, stats=stats)
        assert _rel_error(got, want) <= 1e-5, segments
        # the block of channels 0..7 walks its lanes one after another, the block of 8..15 not
        assert stats["serial_tiles"] > 0 and stats["decaying_tiles"] > 0, stats


def test_host_harness_differs_when_the_carry_is_wrong(harness):
    """The comparison can fail: a case whose second tile depends on the first one's state."""
    case = _case(1, 2, 1, TILE + 50, 4, seed=3)
    case["A"] = torch.full_like(case["A"], -1e-4)  # slow decay: the carried state matters
    inputs = _numpy(case)
    want = _reference(case, True)
    got = plugin.run_host_harness(harness, inputs, segments=1)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    # zeroing the inputs of the first tile changes the second tile's outputs
    cut = {**inputs, "u": inputs["u"].copy()}
    cut["u"][..., :TILE] = 0.0
    changed = plugin.run_host_harness(harness, cut, segments=1)
    assert np.abs(changed[..., TILE:] - got[..., TILE:]).max() > 1e-3


def test_host_harness_rejects_bad_dims(harness, tmp_path):
    inputs = _numpy(_case(1, 6, 4, 5, 2, seed=0))
    with pytest.raises(RuntimeError, match="multiple of the groups"):
        plugin.run_host_harness(harness, inputs)
    with pytest.raises(RuntimeError, match="at most 1 segments"):
        plugin.run_host_harness(harness, _numpy(_case(1, 4, 1, 100, 2, seed=0)), segments=2)
    with pytest.raises(RuntimeError, match="the fused mode needs softplus"):
        plugin.run_host_harness(harness, _numpy(_case(1, 4, 1, 600, 2, seed=0)), segments=-1, delta_softplus=False)


def test_layout_is_conflict_free(harness):
    run = subprocess.run([str(harness), "--check-layout"], capture_output=True, text=True)
    assert run.returncode == 0 and "layout ok" in run.stdout, run.stdout


def _plan(harness, batch, dim, groups, length, state, sms, blocks_per_sm, fused_blocks_per_sm=0):
    run = subprocess.run([str(harness), "--plan", *map(str, (batch, dim, groups, length, state, sms, blocks_per_sm,
                                                             fused_blocks_per_sm))],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def test_launcher_fuses_batch_1_when_every_block_fits(harness):
    """MambaIRv2-light at batch 1: the fused mode (one launch, 64 one-tile blocks per channel
    group) when the fused kernel's blocks all fit the GPU (132 SMs x 4), two passes otherwise
    (no cooperative launch: 0; an Orin's 16 SMs; batch 2's 768 blocks); never without softplus or
    when the caller asks for two passes."""
    light = (48, 1, 16384, 8)
    fused = _plan(harness, 1, *light, 132, 4, 4)
    assert fused["fused"] and fused["segments"] == 64 and fused["segment_length"] == TILE
    assert not _plan(harness, 1, *light, 132, 4, 0)["fused"]
    assert not _plan(harness, 1, *light, 16, 4, 4)["fused"]
    assert not _plan(harness, 2, *light, 132, 4, 4)["fused"]
    assert not _plan(harness, 1, 48, 1, 16384, 16, 132, 4, 4)["fused"]  # N > kMaxFusedState
    case = _numpy(_case(1, 8, 1, 4 * TILE, 4, seed=41))
    for softplus, two_passes, want in ((True, False, True), (False, False, False), (True, True, False)):
        stats = {}
        plugin.run_host_harness(harness, case, delta_softplus=softplus, fused_blocks_per_sm=4, two_passes=two_passes,
                                stats=stats)
        assert stats["fused"] == want, (softplus, two_passes)


def test_segments_follow_occupancy_and_fill_the_gpu(harness):
    """MambaIRv2-light (D = 48, K = 1, N = 8, 128x128: L = 16384): at batch 1 its 6 blocks per
    segment cannot fill an H100, so the sequence is cut; at batch 64 (384 blocks, one partial
    wave of 528 slots) a second pass costs more than it fills."""
    light = (48, 1, 16384, 8)
    one = _plan(harness, 1, *light, 132, 4)
    assert one["blocks_per_segment"] == 6 and one["segments"] > 32
    assert one["segments"] <= one["max_segments"]
    assert _plan(harness, 64, *light, 132, 4)["segments"] == 1
    # fewer resident blocks per SM (real occupancy) or fewer SMs: no more segments (Orin's 16 SMs
    # are filled by batch 8 alone)
    for batch in (1, 2, 8):
        assert _plan(harness, batch, *light, 132, 2)["segments"] <= _plan(harness, batch, *light, 132, 4)["segments"]
    assert _plan(harness, 1, *light, 132, 1)["segments"] < _plan(harness, 1, *light, 132, 4)["segments"]
    assert _plan(harness, 8, *light, 16, 4)["segments"] == 1 < _plan(harness, 8, *light, 132, 4)["segments"]
    # the tail wave: 96 blocks per segment on 528 slots -> 11 segments = 2 full waves
    assert _plan(harness, 16, *light, 132, 4)["segments"] * 96 % 528 == 0


def test_workspace_fits_every_plan_of_smaller_shapes(harness):
    """getWorkspaceSize sizes for the profile's largest shapes; every smaller batch and length the
    launcher may then cut into more segments, or fuse into one-tile segments, must fit (maps
    [B, D, N, S - 1])."""
    dim, groups, state = 48, 1, 8
    most = _plan(harness, 8, dim, groups, 65536, state, 132, 4)
    fused = 0
    for batch in (1, 2, 3, 8):
        for length in (256, 5000, 16384, 65536):
            for sms, per_sm in ((132, 4), (16, 4), (512, 16)):
                for fused_per_sm in (0, per_sm):
                    p = _plan(harness, batch, dim, groups, length, state, sms, per_sm, fused_per_sm)
                    fused += p["fused"]
                    assert p["segments"] <= p["max_segments"]
                    assert batch * dim * state * (p["segments"] - 1) * 8 <= most["workspace_bytes"]
    assert fused > 0


@pytest.mark.slow
def test_nvcc_compiles_the_kernel_for_orin_and_hopper(tmp_path):
    """One compile (~2 min on 2 cores) for sm_87 and sm_90, every N and both I/O types, checked
    with ptxas's report and the SASS (tools/ptxas_report.py prints the same as a table):
    <= 128 registers and no spill or stack for every kernel, 128-bit global loads (LDG.E.128) in
    both passes and 128-bit stores (STG.E.128) of y, no local memory."""
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is not installed: the CUDA kernel cannot be compiled here")
    log: list = []
    exe = plugin.nvcc_compile(tmp_path, archs=(87, 90), ptxas_log=log)
    with_sass = plugin.cuda_binary("cuobjdump") is not None and plugin.cuda_binary("nvdisasm") is not None
    rows = plugin.kernel_report(log[0], exe if with_sass else None)
    expected = {(arch, io, n, kernel) for arch in ("sm_87", "sm_90") for io in ("fp32", "fp16")
                for n in range(1, 17) for kernel in ("scan", "maps", "fused") if kernel != "fused" or n <= 12}
    assert {(r.arch, r.io, r.state, r.kernel) for r in rows} == expected
    problems = [f"{r.arch} {r.io} N={r.state} {r.kernel}: {p}" for r in rows for p in r.problems()]
    assert not problems, "\n".join(problems)
    if with_sass:
        assert all(r.sass["MUFU.EX2"] > 0 and r.sass["LDS.128"] > 0 and r.sass["STS.128"] > 0 for r in rows)
    else:
        pytest.skip("ptxas figures checked; no cuobjdump/nvdisasm for the SASS (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm)")
    if not torch.cuda.is_available():  # without a GPU the check program must stop with a CUDA message, not crash
        run = subprocess.run([str(exe), "1", "8", "1", "100", "4"], capture_output=True, text=True)
        assert run.returncode == 2 and "kernel_check:" in run.stderr, run.stderr


def test_kernel_report_reads_ptxas_and_flags_problems():
    """The parser behind the register check: it reads ptxas's lines and its verdict can fail."""
    text = """ptxas info    : Compiling entry function '_ZN6qmamba21selective_scan_kernelIfLi8ELi0EEEvNS_8ScanArgsENS_4scan4PlanE' for 'sm_90'
ptxas info    : Function properties for _ZN6qmamba21selective_scan_kernelIfLi8ELi0EEEvNS_8ScanArgsENS_4scan4PlanE
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 17472 bytes smem
ptxas info    : Compiling entry function '_ZN6qmamba21selective_scan_kernelI6__halfLi16ELi1EEEvNS_8ScanArgsENS_4scan4PlanE' for 'sm_87'
ptxas info    : Function properties for _ZN6qmamba21selective_scan_kernelI6__halfLi16ELi1EEEvNS_8ScanArgsENS_4scan4PlanE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 33856 bytes smem
"""
    a, b = plugin.parse_ptxas(text)
    assert (a.arch, a.io, a.state, a.kernel, a.registers, a.spill_stores, a.stack, a.smem) == (
        "sm_90", "fp32", 8, "scan", 128, 4, 8, 17472)
    assert (b.arch, b.io, b.state, b.kernel, b.registers) == ("sm_87", "fp16", 16, "maps", 168)
    assert a.problems() == ["spills 4/4 bytes, stack 8 bytes"]
    assert b.problems() == ["168 registers > 128"]
    b.registers, b.sass = 100, {"LDG.E.128": 0, "STG.E.128": 0, "LDL": 0, "STL": 0}
    assert b.problems() == ["no 128-bit global load (LDG.E.128) in the SASS"]


def _sass(lines):
    """cuobjdump-style SASS of one kernel from (address, instruction) pairs."""
    body = "\n".join(f"        /*{a:04x}*/                   {i} ;" for a, i in lines)
    return "        Function : _ZN6qmamba21selective_scan_kernelIfLi2ELi0EEEvNS_8ScanArgsENS_4scan4PlanE\n" + body


def test_sass_main_path_counts():
    """The counter behind the roofline model (qmamba_deploy/trt/sass_paths.py) on a made-up
    kernel: setup, a tile loop whose vector side (LDG.E.128) beats its longer scalar side, a
    state loop with 16 MUFU.EX2 and a BRA.DIV into a divergent fallback that is not counted."""
    from qmamba_deploy.trt import sass_paths

    lines = [(0x000, "MOV R1, c[0x0][0x28]"), (0x010, "BRA.DIV UR4, 0x1c0"),    # setup
             (0x020, "@P0 BRA 0x50"),                                           # tile loop: branch
             (0x030, "LDG.E R4, desc[UR4][R2.64]"), (0x040, "BRA 0x60"),         # scalar side
             (0x050, "LDG.E.128 R4, desc[UR4][R2.64]"),                          # vector side
             (0x060, "FMUL R2, R2, R3")]                                         # state loop
    lines += [(0x070 + 16 * i, "MUFU.EX2 R2, R2") for i in range(16)]           # 0x070 .. 0x160
    lines += [(0x170, "@P1 BRA 0x60"),                                          # state loop back edge
              (0x180, "@P2 BRA 0x20"),                                          # tile loop back edge
              (0x190, "EXIT")]
    lines += [(0x1c0 + 16 * i, "SHFL.IDX PT, R3, R3, RZ, 0x1f") for i in range(3)] + [(0x1f0, "BRA 0x20")]
    instrs = next(iter(sass_paths.parse_functions(_sass(lines)).values()))
    counts = sass_paths.decaying_counts(instrs, states=2)
    assert counts.state == 18                     # FMUL, 16 MUFU.EX2, the back edge
    assert counts.tile == 3                       # the branch, the LDG.E.128, the back edge
    assert counts.setup == 2 and counts.mufu_state == 16  # MOV, BRA.DIV: its fallback not taken
    assert counts.per_step == (3 + 2 * 18) / 16
    assert counts.tile_ops["LDG.E.128"] == 1 and "LDG.E" not in counts.tile_ops


@pytest.mark.gpu
def test_kernel_matches_the_reference_on_the_gpu(tmp_path):
    if not torch.cuda.is_available() or not shutil.which("nvcc"):
        pytest.skip("needs an NVIDIA GPU and nvcc")
    exe = plugin.nvcc_compile(tmp_path, arch_flags=["-arch=native"])
    for args in ("2 8 4 37 8 fp32 3", "1 6 2 2348 16 fp32 3", "1 4 1 5000 10 fp16 3",
                 "1 48 1 4096 8 fp32 3 0 --offset 1", "1 16 1 3000 4 fp32 3 0 --grow"):
        run = subprocess.run([str(exe), *args.split()], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_plugin_checksum_covers_every_source(tmp_path):
    root = plugin.plugin_source_dir()
    files = {p.as_posix() for p in plugin.plugin_source_files(root)}
    assert {"include/qmamba/scan_math.h", "src/selective_scan_kernel.cu", "tests/host_harness.cpp",
            "CMakeLists.txt", "src/exports.map"} <= files
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


GPU_CHECK = plugin.plugin_source_dir().parents[1] / "tools" / "gpu_kernel_check.sh"

FAKE_KERNEL_CHECK = """#!/usr/bin/env bash
# stands in for kernel_check: prints its JSON line; "fails" for the --grow case when asked to
if [[ "${FAIL_GROW:-0}" == 1 && " $* " == *" --grow "* ]]; then echo bad; exit 1; fi
echo '{"gpu": "fake", "cc": "9.0", "sms": 132, "blocks_per_sm": 4, "fused_blocks_per_sm": 4, "B": '$1', "D": '$2', "K": '$3', "L": '$4', "N": '$5', "io": "fp32", "softplus": true, "grow": false, "positive_a": false, "offset": 0, "segments": 3, "fused": true, "max_rel_error": 1e-7, "max_rel_error_two_passes": 2e-7, "max_rel_error_one_pass": 1e-7, "max_rel_error_graph": 1e-7, "tolerance": 1e-5, "ms": 0.01, "ms_two_passes": 0.015, "ms_one_pass": 0.02, "bytes": 1000, "GBps": 100.0, "GBps_two_passes": 66.7, "GBps_one_pass": 50.0, "peak_GBps": 3350.0, "fraction_of_peak": 0.03, "fraction_of_peak_two_passes": 0.02, "fraction_of_peak_one_pass": 0.015}'
"""


def _fake_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake H200'\n")
    (bin_dir / "compute-sanitizer").write_text("#!/bin/sh\n# drop the sanitizer options, run the program\n"
                                               "while [ \"${1#--}\" != \"$1\" ]; do case $1 in --tool|--error-exitcode"
                                               "|--racecheck-report) shift 2;; *) shift;; esac; done\nexec \"$@\"\n")
    exe = tmp_path / "kernel_check"
    exe.write_text(FAKE_KERNEL_CHECK)
    for f in (*bin_dir.iterdir(), exe):
        f.chmod(0o755)
    return bin_dir, exe


def test_gpu_kernel_check_script_fails_clearly_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is installed here")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "no NVIDIA GPU" in run.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "error"


@pytest.mark.parametrize("fail", [False, True])
def test_gpu_kernel_check_script_runs_and_summarises(tmp_path, fail):
    """The script's plumbing with a fake GPU, kernel_check and compute-sanitizer: every run is in
    summary.json/summary.md, and one failing run makes the exit status 1."""
    bin_dir, exe = _fake_tools(tmp_path)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "KERNEL_CHECK": str(exe),
           "FAIL_GROW": "1" if fail else "0", "ITERATIONS": "2"}
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(GPU_CHECK), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == (1 if fail else 0), run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    names = {r["name"] for r in summary["runs"]}
    assert {"v2light_128_fp32", "v2light_128_fp16", "edge_grow_fp32", "sanitize_racecheck_grow",
            "sanitize_memcheck_fp16_offset", "sanitize_synccheck_fp32"} <= names
    assert summary["status"] == ("failed" if fail else "passed")
    assert {r["name"] for r in summary["runs"] if r["rc"] != 0} == (
        {"edge_grow_fp32", "edge_grow_fp16", "sanitize_memcheck_grow", "sanitize_racecheck_grow",
         "sanitize_synccheck_grow"} if fail else set())
    md = (out / "summary.md").read_text()
    assert ("| v2light_128_fp32 | 0 | 1 | 48 | 1 | 16384 | 8 | fp32 | fused, 3 tiles | "
            "1.00e-07 / 2.00e-07 / 1.00e-07 / 1.00e-07 |") in md
    assert "sanitize_racecheck_positive_a" in names
