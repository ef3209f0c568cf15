"""The TensorRT plugin's C++ glue, checked without a GPU or a TensorRT runtime.

* the generated include/qmamba/plugin_contract.h matches qmamba_deploy.ops.contract;
* selective_scan_plugin.cpp compiles warning-free (-Wall -Wextra -Werror) against every
  TensorRT header set available: those listed in $QMAMBA_TRT_HEADER_DIRS (os.pathsep
  separated; e.g. the include/ folders of TensorRT 10.3 and 11.1), else the install that
  qmamba_deploy.trt.headers finds. TensorRT's and CUDA's headers are passed with -isystem:
  TensorRT's own headers are not warning-free under -Wextra;
* the object exports setLoggerFinder / getCreators as extern "C" symbols;
* a small C++ driver (below), linked with the plugin and a stub in place of the CUDA kernel,
  runs the creator and plugin methods on the CPU: fields, serialization, types, formats,
  shape checks, logging and the kernel arguments enqueue() builds;
* no C++ source but the generated header spells the op's names.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmamba_deploy.ops import contract
from qmamba_deploy.trt import contract_header, headers

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "trt_plugins" / "selective_scan"
PLUGIN_CPP = PLUGIN / "src" / "selective_scan_plugin.cpp"
CXXFLAGS = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-fPIC", "-fvisibility=hidden"]


def _header_dirs() -> list[Path]:
    listed = os.environ.get("QMAMBA_TRT_HEADER_DIRS", "")
    if listed:
        return [Path(d) for d in listed.split(os.pathsep) if d]
    found = headers.find_tensorrt_include()
    return [found] if found else []


HEADER_DIRS = _header_dirs()
# One parameter per header set; a single None (skipped with the reason) when there is none.
header_dir = pytest.mark.parametrize(
    "trt_include", HEADER_DIRS or [None], ids=[str(d) for d in HEADER_DIRS] or ["no-tensorrt-headers"]
)


def _toolchain(trt_include: Path | None) -> tuple[str, Path]:
    """(g++, CUDA include folder), or skip saying what is missing."""
    if trt_include is None:
        pytest.skip("no TensorRT headers: set QMAMBA_TRT_HEADER_DIRS, TENSORRT_INCLUDE_DIR or TENSORRT_ROOT")
    assert (trt_include / "NvInfer.h").is_file(), f"{trt_include} (from QMAMBA_TRT_HEADER_DIRS) has no NvInfer.h"
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ on PATH")
    cuda = headers.find_cuda_include()
    if cuda is None:
        pytest.skip("no CUDA headers (cuda_runtime_api.h): set CUDA_HOME or put nvcc on PATH")
    return cxx, cuda


def _compile(cxx: str, trt_include: Path, cuda: Path, source: Path, out: Path, *flags: str) -> None:
    cmd = [cxx, *CXXFLAGS, *flags, f"-I{PLUGIN / 'include'}", f"-I{PLUGIN / 'src'}",
           "-isystem", str(trt_include), "-isystem", str(cuda), "-c", str(source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"


def _symbols(obj: Path, *flags: str) -> set[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm on PATH")
    lines = subprocess.run([nm, *flags, str(obj)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in lines.splitlines() if line.strip()}


# ---------------------------------------------------------------------------------------------
# the generated header and the header finders


def test_contract_header_is_current():
    assert contract_header.HEADER_PATH.read_text() == contract_header.render_contract_header(), (
        "plugin_contract.h is stale: run python3 -m qmamba_deploy.trt.contract_header")
    assert contract_header.main(["--check"]) == 0


def test_contract_header_carries_the_contract(tmp_path):
    out = tmp_path / "plugin_contract.h"
    assert contract_header.main(["--output", str(out)]) == 0
    text = out.read_text()
    assert f'kPLUGIN_NAME = "{contract.PLUGIN_NAME}"' in text
    assert f'kPLUGIN_VERSION = "{contract.PLUGIN_VERSION}"' in text
    assert f'kPLUGIN_NAMESPACE = "{contract.PLUGIN_NAMESPACE}"' in text
    for index, name in enumerate(contract.INPUT_NAMES):
        assert f"kINPUT_{name.upper()} = {index};" in text
    for name in contract.PLUGIN_FIELD_NAMES:
        assert f'kFIELD_{name.upper()} = "{name}"' in text
    out.write_text(text + "// edited\n")
    assert contract_header.main(["--check", "--output", str(out)]) == 1


def test_tensorrt_header_version(tmp_path):
    # 10.x defines the numbers directly, 11.x through TRT_*_ENTERPRISE.
    v10 = tmp_path / "v10"
    v10.mkdir()
    (v10 / "NvInferVersion.h").write_text(
        "#define NV_TENSORRT_MAJOR 10 //!< TensorRT major version.\n#define NV_TENSORRT_MINOR 3\n")
    v11 = tmp_path / "v11"
    v11.mkdir()
    (v11 / "NvInferVersion.h").write_text(
        "#define TRT_MAJOR_ENTERPRISE 11\n#define TRT_MINOR_ENTERPRISE 1\n"
        "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE //!< TensorRT major version.\n"
        "#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE\n")
    assert headers.tensorrt_header_version(v10) == (10, 3)
    assert headers.tensorrt_header_version(v11) == (11, 1)
    for folder in HEADER_DIRS:
        major, _ = headers.tensorrt_header_version(folder)
        assert major >= 10


def test_find_tensorrt_include_prefers_the_environment(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "NvInfer.h").write_text("")
    monkeypatch.delenv("TENSORRT_INCLUDE_DIR", raising=False)
    monkeypatch.setenv("TENSORRT_ROOT", str(tmp_path))
    assert headers.find_tensorrt_include() == tmp_path / "include"
    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(tmp_path / "include"))
    assert headers.find_tensorrt_include() == tmp_path / "include"


# ---------------------------------------------------------------------------------------------
# the C++ sources


def _strip_comments(source: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.DOTALL)


def test_sources_do_not_hard_code_the_names():
    literals = {f'"{contract.PLUGIN_NAME}"', f'"{contract.PLUGIN_NAMESPACE}"',
                *(f'"{name}"' for name in contract.PLUGIN_FIELD_NAMES)}
    sources = [p for p in PLUGIN.rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"}]
    assert PLUGIN_CPP in sources
    for path in sources:
        if path == contract_header.HEADER_PATH:
            continue
        code = _strip_comments(path.read_text())
        found = sorted(lit for lit in literals if lit in code)
        assert not found, f"{path.relative_to(REPO)} spells {found}: use the constants of qmamba/plugin_contract.h"


@header_dir
def test_plugin_compiles_and_exports_entry_points(trt_include, tmp_path):
    cxx, cuda = _toolchain(trt_include)
    registering = tmp_path / "plugin.o"
    _compile(cxx, trt_include, cuda, PLUGIN_CPP, registering, "-O2", "-DQMAMBA_SELF_REGISTER=1")
    exported = _symbols(registering, "-g", "--defined-only")
    # Unmangled names: extern "C", as TensorRT's library loader looks them up.
    assert {"getCreators", "setLoggerFinder"} <= exported
    assert "getPluginRegistry" in _symbols(registering, "-u")  # self-registration

    plain = tmp_path / "plugin_no_self_register.o"
    _compile(cxx, trt_include, cuda, PLUGIN_CPP, plain, "-O2", "-DQMAMBA_SELF_REGISTER=0")
    assert {"getCreators", "setLoggerFinder"} <= _symbols(plain, "-g", "--defined-only")
    assert "getPluginRegistry" not in _symbols(plain, "-u")  # needs no libnvinfer


@header_dir
def test_plugin_glue_runs_on_the_cpu(trt_include, tmp_path):
    """tests/glue_driver.cpp (the creator and plugin methods against stubs of the kernel and CUDA),
    built by the plugin's own CMake project and run by ctest."""
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if not cmake or not ctest:
        pytest.skip("cmake/ctest are not on PATH")
    _toolchain(trt_include)
    build = tmp_path / "build"
    configure = subprocess.run([cmake, "-S", str(PLUGIN), "-B", str(build), "-DQMAMBA_BUILD_TESTS=ON",
                                f"-DTENSORRT_ROOT={trt_include.parent}", "-DCMAKE_CUDA_ARCHITECTURES=90"],
                               capture_output=True, text=True, check=False)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = subprocess.run([cmake, "--build", str(build), "--target", "glue_driver"], capture_output=True, text=True,
                          check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    run = subprocess.run([ctest, "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0 and "100% tests passed" in run.stdout, run.stdout + run.stderr


STUB_KERNEL = PLUGIN / "tests" / "stub_kernel.cpp"

LOAD_IN_TENSORRT_RTX = """
import sys, tensorrt_rtx as trt
class Quiet(trt.ILogger):
    def __init__(self):
        trt.ILogger.__init__(self)
    def log(self, severity, msg):
        pass
builder = trt.Builder(Quiet())
registry = builder.get_plugin_registry()
assert registry.load_library(sys.argv[1]) is not None, "load_library failed"
found = [(c.name, c.plugin_version, c.plugin_namespace) for c in registry.all_creators if c.name == sys.argv[2]]
print(found)
"""


@header_dir
def test_tensorrt_rtx_loads_the_library_and_finds_the_creator(trt_include, tmp_path):
    """TensorRT's own loader (IPluginRegistry::loadLibrary -> getCreators) on the real library
    layout, with TensorRT-RTX (the one TensorRT that runs here). RTX's ONNX parser then finds
    the node's creator and calls createPlugin, but aborts inside its own code afterwards
    (also with a Python IPluginV3), so the parse is not part of this test."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    cxx, cuda = _toolchain(trt_include)
    plugin_obj, stub_obj = tmp_path / "plugin.o", tmp_path / "stub.o"
    _compile(cxx, trt_include, cuda, PLUGIN_CPP, plugin_obj, "-O2", "-DQMAMBA_SELF_REGISTER=0")
    _compile(cxx, trt_include, cuda, STUB_KERNEL, stub_obj, "-O2")
    lib = tmp_path / "libqmamba_scan_plugin.so"
    link = subprocess.run([cxx, "-shared", str(plugin_obj), str(stub_obj), "-o", str(lib)], capture_output=True,
                          text=True, check=False)
    assert link.returncode == 0, link.stderr
    run = subprocess.run([sys.executable, "-c", LOAD_IN_TENSORRT_RTX, str(lib), contract.PLUGIN_NAME],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == str([(contract.PLUGIN_NAME, contract.PLUGIN_VERSION, contract.PLUGIN_NAMESPACE)])


def _dynamic_symbols(lib: Path) -> list[tuple[str, str, str]]:
    """(binding, section index, name) of each dynamic symbol (readelf --dyn-syms)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf on PATH")
    out = subprocess.run([readelf, "--dyn-syms", "-W", str(lib)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0].rstrip(":").isdigit():
            rows.append((parts[4], parts[6], parts[7]))
    return rows


@header_dir
def test_plugin_library_is_unloadable(trt_include, tmp_path):
    """The library built with CMakeLists.txt's flags (-fno-gnu-unique, src/exports.map) has no
    STB_GNU_UNIQUE symbol, which would keep dlclose from ever unloading it, and exports only the
    two entry points; without those flags GCC's libstdc++ makes UNIQUE symbols (the control)."""
    cmake = (PLUGIN / "CMakeLists.txt").read_text()
    assert "check_cxx_compiler_flag(-fno-gnu-unique" in cmake and "--version-script=${QMAMBA_EXPORTS_MAP}" in cmake
    assert 'QMAMBA_EXPORTS_MAP "${CMAKE_CURRENT_SOURCE_DIR}/src/exports.map"' in cmake
    cxx, cuda = _toolchain(trt_include)
    libs = {}
    for flagged in (False, True):
        flags = ["-O2", "-DQMAMBA_SELF_REGISTER=0"] + (["-fno-gnu-unique"] if flagged else [])
        plugin_obj, stub_obj = tmp_path / f"plugin{flagged}.o", tmp_path / f"stub{flagged}.o"
        _compile(cxx, trt_include, cuda, PLUGIN_CPP, plugin_obj, *flags)
        _compile(cxx, trt_include, cuda, STUB_KERNEL, stub_obj, *flags)
        lib = tmp_path / f"lib{flagged}.so"
        link = [cxx, "-shared", str(plugin_obj), str(stub_obj), "-o", str(lib)]
        if flagged:
            link.append(f"-Wl,--version-script={PLUGIN / 'src' / 'exports.map'}")
        result = subprocess.run(link, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        libs[flagged] = _dynamic_symbols(lib)
    assert any(binding == "UNIQUE" for binding, _, _ in libs[False]), libs[False]
    assert not any(binding == "UNIQUE" for binding, _, _ in libs[True]), libs[True]
    defined = sorted(name for _, ndx, name in libs[True] if ndx != "UND")
    assert defined == ["getCreators", "setLoggerFinder"], defined
