"""The selective-scan plugin's sources and the builds that need no GPU.

The sources live in ``trt_plugins/selective_scan/`` at the top of the repository:

* ``include/qmamba/scan_math.h`` -- the recurrence and the kernel's tiling, written once
  for the CUDA kernel and for plain C++;
* ``src/selective_scan_kernel.cu`` -- the CUDA kernel (chunked parallel scan, carried state);
* ``src/selective_scan_plugin.{h,cpp}`` -- the TensorRT IPluginV3 glue;
* ``tests/host_harness.cpp`` -- the kernel's arithmetic replayed on the CPU;
* ``tests/kernel_check.cu`` -- the kernel on a GPU against a float64 reference, timed.

This module finds them, checksums them (the engine and package manifests record the
checksum), and compiles what a machine without a GPU can compile: the host harness with
a C++ compiler, and the kernel with its GPU check program with ``nvcc``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EnvironmentMissing
from ..ops.contract import PLUGIN_LIBRARY, PLUGIN_LIBRARY_DLOPEN

__all__ = [
    "PLUGIN_LIBRARY",
    "PLUGIN_LIBRARY_DLOPEN",
    "plugin_source_dir",
    "plugin_source_files",
    "plugin_checksum",
    "compile_host_harness",
    "run_host_harness",
    "nvcc_compile",
    "KernelResources",
    "parse_ptxas",
    "cuda_binary",
    "sass_counts",
    "kernel_report",
]

_SOURCE_SUFFIXES = {".h", ".cu", ".cpp", ".txt", ".md", ".map"}  # .map: the linker version script


def plugin_source_dir() -> Path:
    """``trt_plugins/selective_scan`` ($QMAMBA_PLUGIN_SOURCE overrides)."""
    override = os.environ.get("QMAMBA_PLUGIN_SOURCE")
    root = Path(override) if override else Path(__file__).resolve().parents[2] / "trt_plugins" / "selective_scan"
    if not (root / "include" / "qmamba" / "scan_math.h").is_file():
        raise EnvironmentMissing(
            f"the selective-scan plugin sources are not at {root}: run from a clone of the repository "
            "(pip install -e .) or set QMAMBA_PLUGIN_SOURCE to its trt_plugins/selective_scan folder.")
    return root


def plugin_source_files(root: Path | None = None) -> list[Path]:
    """Every source file of the plugin, relative to its folder, sorted."""
    root = root or plugin_source_dir()
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.suffix in _SOURCE_SUFFIXES and "build" not in p.relative_to(root).parts)


def plugin_checksum(root: Path | None = None) -> str:
    """sha256 over the plugin's source files (names and contents)."""
    root = root or plugin_source_dir()
    digest = hashlib.sha256()
    for rel in plugin_source_files(root):
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update((root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


def _tool(name: str, env_var: str) -> str:
    path = os.environ.get(env_var) or shutil.which(name)
    if not path:
        raise EnvironmentMissing(f"`{name}` is not on PATH: install it or point {env_var} at it.")
    return path


def _run(cmd: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def compile_host_harness(out: Path, root: Path | None = None) -> Path:
    """g++ (or $CXX) builds ``tests/host_harness.cpp`` into ``out``; returns the executable."""
    root = root or plugin_source_dir()
    exe = Path(out) / "host_harness"
    cxx = _tool(os.environ.get("CXX", "g++"), "CXX")
    _run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{root / 'include'}",
          str(root / "tests" / "host_harness.cpp"), "-o", str(exe)], "compiling the host harness")
    return exe


#: The harness's default GPU for choosing segments as the launcher would: an H100 (132 SMs) at
#: the kernel's 4 resident blocks per SM (its __launch_bounds__ minimum).
HARNESS_SM_COUNT = 132
HARNESS_BLOCKS_PER_SM = 4
_TENSOR_OFFSETS = ("u", "delta", "B", "C", "y")


def run_host_harness(exe: Path, inputs: Mapping[str, np.ndarray], delta_softplus: bool = True,
                     segments: int = 0, elem_bytes: int = 4, offsets: Mapping[str, int] | None = None,
                     sm_count: int = HARNESS_SM_COUNT, blocks_per_sm: int = HARNESS_BLOCKS_PER_SM,
                     fused_blocks_per_sm: int = 0, two_passes: bool = False,
                     stats: dict | None = None) -> np.ndarray:
    """Runs the harness on the op's inputs (contract names; D_skip/delta_bias may be None).

    ``segments``: blocks per (batch, channel) sequence, as the kernel's two-pass mode cuts it; -1:
    the fused mode (one tile per block); 0 lets the harness choose as the launcher would on
    ``sm_count`` SMs with ``blocks_per_sm`` resident blocks (and ``fused_blocks_per_sm`` of the
    fused kernel, 0: none; ``two_passes``: the launcher's Strategy::kTwoPasses). ``elem_bytes``
    (4: fp32 I/O, 2: fp16 I/O) and ``offsets`` (elements between a
    16-byte boundary and the base pointer of u, delta, B, C or y) decide which rows the kernel
    reads with 16-byte vector loads; the values stay float32. ``stats`` receives the plan and the
    counts of vector and scalar accesses."""
    u = np.ascontiguousarray(inputs["u"], dtype=np.float32)
    batch, dim, length = u.shape
    _, groups, state, _ = np.shape(inputs["B"])
    optional = [inputs.get("D_skip"), inputs.get("delta_bias")]
    offsets = dict(offsets or {})
    unknown = set(offsets) - set(_TENSOR_OFFSETS)
    if unknown:
        raise ValueError(f"offsets for unknown tensors {sorted(unknown)}; known: {_TENSOR_OFFSETS}")
    header = np.array([batch, dim, groups, length, state, int(delta_softplus)]
                      + [int(x is not None) for x in optional] + [segments, elem_bytes]
                      + [offsets.get(name, 0) for name in _TENSOR_OFFSETS]
                      + [sm_count, blocks_per_sm, fused_blocks_per_sm, int(two_passes)],
                      dtype=np.int32)
    arrays = [inputs[k] for k in ("u", "delta", "A", "B", "C")] + [x for x in optional if x is not None]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        with open(src, "wb") as f:
            f.write(header.tobytes())
            for a in arrays:
                f.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        out = _run([str(exe), str(src), str(dst)], "the host harness")
        if stats is not None:
            stats.update(json.loads(out.strip().splitlines()[-1]))
        return np.fromfile(dst, dtype=np.float32).reshape(batch, dim, length)


def nvcc_compile(out: Path, archs: Sequence[int] = (87, 90), root: Path | None = None,
                 arch_flags: Sequence[str] | None = None, ptxas_log: list | None = None) -> Path:
    """nvcc builds ``kernel_check`` (the CUDA kernel + tests/kernel_check.cu) for the given SM
    architectures; compiling and linking need no GPU, running it does. With ``ptxas_log`` (a
    list), ptxas runs verbose and its report is appended to it (see :func:`parse_ptxas`)."""
    root = root or plugin_source_dir()
    nvcc = _tool("nvcc", "NVCC")
    exe = Path(out) / "kernel_check"
    gencode = list(arch_flags) if arch_flags else [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    verbose = ["-Xptxas", "-v"] if ptxas_log is not None else []
    cmd = [nvcc, "-std=c++17", "-O3", "-Xcompiler=-Wall,-Wextra,-Werror", f"-I{root / 'include'}", *gencode, *verbose,
           str(root / "src" / "selective_scan_kernel.cu"), str(root / "tests" / "kernel_check.cu"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
    if ptxas_log is not None:
        ptxas_log.append(proc.stdout + proc.stderr)
    return exe


# ---------------------------------------------------------------------------------------------
# What ptxas and the SASS say about the kernels (tools/ptxas_report.py, tests/test_trt_plugin.py).

#: selective_scan_kernel<T, N, kMaps> in a mangled name: T = f (float) or 6__half, N, kMaps.
_KERNEL_NAME = re.compile(r"selective_scan_kernelI(f|6__half)Li(\d+)ELi([012])E")
#: The kernel's passes (kScanPass, kMapsPass, kFusedPass in the kernel source).
_PASSES = ("scan", "maps", "fused")
#: The opcodes the report counts per kernel.
SASS_OPCODES = ("LDG.E.128", "STG.E.128", "LDS.128", "STS.128", "LDGSTS.E.BYPASS.128", "MUFU.EX2", "SHFL", "LDL",
                "STL")
#: __launch_bounds__(128, 4): 65536 registers / (4 x 128 threads).
MAX_REGISTERS = 128


@dataclass
class KernelResources:
    arch: str              #: "sm_90"
    io: str                #: "fp32" or "fp16"
    state: int             #: N
    kernel: str            #: "scan" (one pass / pass 2), "maps" (pass 1) or "fused"
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int
    sass: dict = field(default_factory=dict)  #: opcode -> static count (from cuobjdump -sass)

    def problems(self) -> list[str]:
        """Why this kernel breaks the register budget or the main path's 128-bit loads."""
        out = []
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.spill_stores or self.spill_loads or self.stack:
            out.append(f"spills {self.spill_stores}/{self.spill_loads} bytes, stack {self.stack} bytes")
        if self.sass:
            if not self.sass.get("LDG.E.128"):
                out.append("no 128-bit global load (LDG.E.128) in the SASS")
            if self.kernel == "scan" and not self.sass.get("STG.E.128"):
                out.append("no 128-bit global store (STG.E.128) in the SASS")
            if self.sass.get("LDL") or self.sass.get("STL"):
                out.append("local-memory loads/stores in the SASS")
        return out


def _kernel_key(mangled: str):
    m = _KERNEL_NAME.search(mangled)
    if not m:
        return None
    return ("fp32" if m.group(1) == "f" else "fp16", int(m.group(2)), _PASSES[int(m.group(3))])


def parse_ptxas(text: str) -> list[KernelResources]:
    """The scan kernels of a ``-Xptxas -v`` report: registers, spills, stack, shared memory."""
    rows: list[KernelResources] = []
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            key = _kernel_key(m.group(1))
            current = KernelResources(m.group(2), *key, 0, 0, 0, 0, 0) if key else None
            if current:
                rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            current.smem = int(m.group(1)) if m else 0
    return rows


def cuda_binary(name: str) -> str | None:
    """A CUDA tool (cuobjdump, nvdisasm): on PATH, beside nvcc, or from NVIDIA's pip wheels
    (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm: nvidia/cu13/bin)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent / name)
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / name)
    try:  # optional: the namespace package of NVIDIA's CUDA wheels (the [dev] extra)
        import nvidia
    except ImportError:
        nvidia = None
    if nvidia is not None:
        candidates += [Path(p) / sub / "bin" / name for p in nvidia.__path__ for sub in ("cu13", "cu12")]
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def sass_counts(binary: Path) -> dict[tuple, dict]:
    """(arch, io, N, kernel) -> static opcode counts of :data:`SASS_OPCODES` (cuobjdump -sass)."""
    cuobjdump, nvdisasm = cuda_binary("cuobjdump"), cuda_binary("nvdisasm")
    if not cuobjdump or not nvdisasm:
        raise EnvironmentMissing("cuobjdump and nvdisasm are needed for the SASS: install the CUDA toolkit's "
                                 "or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`")
    env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([cuobjdump, "-sass", str(binary)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed:\n{proc.stderr}")
    counts: dict[tuple, dict] = {}
    arch, current = None, None
    for line in proc.stdout.splitlines():
        m = re.search(r"code for (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            key = _kernel_key(m.group(1))
            current = counts.setdefault((arch, *key), dict.fromkeys(SASS_OPCODES, 0)) if key else None
            continue
        if current is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            opcode = m.group(1)
            for op in SASS_OPCODES:
                if opcode == op or opcode.startswith(op + "."):
                    current[op] += 1
    return counts


def kernel_report(ptxas_text: str, binary: Path | None = None) -> list[KernelResources]:
    """ptxas figures per kernel, with their SASS opcode counts when ``binary`` is given."""
    rows = parse_ptxas(ptxas_text)
    if binary is not None:
        counts = sass_counts(binary)
        for r in rows:
            r.sass = counts.get((r.arch, r.io, r.state, r.kernel), {})
    return sorted(rows, key=lambda r: (r.arch, r.io, r.kernel, r.state))
