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


DRIVER = r"""
// Runs the plugin glue on the CPU; the stubs below stand in for the CUDA kernel and runtime.
#include "selective_scan_plugin.h"

#include "qmamba/selective_scan.h"

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>

using namespace nvinfer1;
namespace ct = qmamba::contract;

static qmamba::ScanArgs gArgs{};
static int gDescribeCalls = 0;
cudaError_t qmamba::launch_selective_scan(qmamba::ScanArgs const& args, cudaStream_t)
{
    gArgs = args;
    return args.dims.state == 13 ? cudaErrorInvalidValue : cudaSuccess;  // 13: a failing launch
}
cudaError_t qmamba::describe_device(qmamba::DeviceInfo* info)
{
    ++gDescribeCalls;
    info->sm_count = 132;
    for (int io = 0; io < 2; ++io)
        for (int n = 0; n < qmamba::scan::kMaxState; ++n)
        {
            info->blocks_per_sm[io][n] = 4 + io * 16 + n;
            info->fused_blocks_per_sm[io][n] = 40 + io * 16 + n;
        }
    return cudaSuccess;
}
char const* cudaGetErrorName(cudaError_t) { return "cudaErrorInvalidValue"; }
char const* cudaGetErrorString(cudaError_t) { return "invalid argument"; }

struct Logger : ILogger
{
    std::string errors;
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR) errors += std::string(msg) + "\n";
    }
};
struct Finder : ILoggerFinder
{
    Logger logger;
    ILogger* findLogger() override { return &logger; }
};

#define CHECK(cond) do { if (!(cond)) { std::printf("FAILED line %d: %s\n", __LINE__, #cond); return 1; } } while (0)

static Dims dims(std::initializer_list<int64_t> values)
{
    Dims d{};
    for (int64_t v : values) d.d[d.nbDims++] = v;
    return d;
}

int main()
{
    static Finder finder;
    setLoggerFinder(&finder);
    std::string& errors = finder.logger.errors;

    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    CHECK(nb == 1 && creators[0] != nullptr);
    CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    CHECK(std::strcmp(creator->getPluginName(), ct::kPLUGIN_NAME) == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), ct::kPLUGIN_VERSION) == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), ct::kPLUGIN_NAMESPACE) == 0);
    PluginFieldCollection const* names = creator->getFieldNames();
    CHECK(names->nbFields == 1 && std::strcmp(names->fields[0].name, ct::kFIELD_DELTA_SOFTPLUS) == 0);
    CHECK(names->fields[0].type == PluginFieldType::kINT32 && names->fields[0].length == 1);

    // Build phase: the ONNX parser passes INT attributes as kINT32.
    int32_t zero = 0;
    PluginField field(ct::kFIELD_DELTA_SOFTPLUS, &zero, PluginFieldType::kINT32, 1);
    PluginFieldCollection fc{1, &field};
    std::unique_ptr<IPluginV3> built(creator->createPlugin("scan", &fc, TensorRTPhase::kBUILD));
    CHECK(built != nullptr);
    auto* core = static_cast<IPluginV3OneCore*>(built->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0);
    CHECK(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0);
    CHECK(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0);
    CHECK(std::strcmp(core->getPluginName(), ct::kPLUGIN_NAME) == 0 && build->getNbOutputs() == 1);

    // Runtime phase: the fields the plugin serialized come back; a clone serializes alike.
    std::unique_ptr<IPluginV3> clone(built->clone());
    built.reset();
    auto* cloneRuntime = static_cast<IPluginV3OneRuntime*>(clone->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* saved = cloneRuntime->getFieldsToSerialize();
    CHECK(saved->nbFields == 1 && saved->fields[0].type == PluginFieldType::kINT32);
    CHECK(*static_cast<int32_t const*>(saved->fields[0].data) == 0);
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("scan", saved, TensorRTPhase::kRUNTIME));
    CHECK(plugin != nullptr);
    build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));

    // Other integer widths are read; no field means the default; bad fields are refused.
    int64_t one64 = 1;
    PluginField wide(ct::kFIELD_DELTA_SOFTPLUS, &one64, PluginFieldType::kINT64, 1);
    PluginFieldCollection wideFc{1, &wide};
    std::unique_ptr<IPluginV3> p64(creator->createPlugin("scan", &wideFc, TensorRTPhase::kBUILD));
    CHECK(p64 != nullptr);
    auto* r64 = static_cast<IPluginV3OneRuntime*>(p64->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(*static_cast<int32_t const*>(r64->getFieldsToSerialize()->fields[0].data) == 1);
    PluginFieldCollection none{0, nullptr};
    std::unique_ptr<IPluginV3> pDefault(creator->createPlugin("scan", &none, TensorRTPhase::kBUILD));
    CHECK(pDefault != nullptr);
    auto* rDefault = static_cast<IPluginV3OneRuntime*>(pDefault->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(*static_cast<int32_t const*>(rDefault->getFieldsToSerialize()->fields[0].data) == ct::kDEFAULT_DELTA_SOFTPLUS);
    CHECK(errors.empty());
    PluginField unknown("delta_softplu", &zero, PluginFieldType::kINT32, 1);
    PluginFieldCollection unknownFc{1, &unknown};
    CHECK(creator->createPlugin("scan", &unknownFc, TensorRTPhase::kBUILD) == nullptr);
    CHECK(errors.find("unknown plugin field 'delta_softplu'") != std::string::npos);
    int32_t two = 2;
    PluginField bad(ct::kFIELD_DELTA_SOFTPLUS, &two, PluginFieldType::kINT32, 1);
    PluginFieldCollection badFc{1, &bad};
    CHECK(creator->createPlugin("scan", &badFc, TensorRTPhase::kBUILD) == nullptr);
    CHECK(errors.find(std::string("field '") + ct::kFIELD_DELTA_SOFTPLUS + "' must be one integer, 0 or 1")
        != std::string::npos);
    float half = 0.5f;
    PluginField floaty(ct::kFIELD_DELTA_SOFTPLUS, &half, PluginFieldType::kFLOAT32, 1);
    PluginFieldCollection floatFc{1, &floaty};
    CHECK(creator->createPlugin("scan", &floatFc, TensorRTPhase::kBUILD) == nullptr);

    // Types: y follows u; u, delta, B, C, y share float32 or float16; A, D_skip, delta_bias float32.
    DataType inTypes[7] = {DataType::kHALF, DataType::kHALF, DataType::kFLOAT, DataType::kHALF, DataType::kHALF,
        DataType::kFLOAT, DataType::kFLOAT};
    DataType outType = DataType::kFLOAT;
    CHECK(build->getOutputDataTypes(&outType, 1, inTypes, 7) == 0 && outType == DataType::kHALF);
    DynamicPluginTensorDesc io[8]{};
    for (int i = 0; i < 8; ++i)
    {
        io[i].desc.format = TensorFormat::kLINEAR;
        io[i].desc.type = (i < 7 ? inTypes[i] : DataType::kHALF);
    }
    for (int pos = 0; pos < 8; ++pos) CHECK(build->supportsFormatCombination(pos, io, 7, 1));
    io[ct::kINPUT_A].desc.type = DataType::kHALF;
    CHECK(!build->supportsFormatCombination(ct::kINPUT_A, io, 7, 1));
    io[7].desc.type = DataType::kFLOAT;
    CHECK(!build->supportsFormatCombination(7, io, 7, 1));
    io[ct::kINPUT_U].desc.type = DataType::kINT8;
    CHECK(!build->supportsFormatCombination(ct::kINPUT_U, io, 7, 1));
    io[ct::kINPUT_U].desc.type = DataType::kFLOAT;
    io[ct::kINPUT_U].desc.format = TensorFormat::kCHW32;
    CHECK(!build->supportsFormatCombination(ct::kINPUT_U, io, 7, 1));
    CHECK(!build->supportsFormatCombination(8, io, 7, 1));

    // Shapes: B=2, D=8, K=2, N=4, L=-1 (dynamic) at build time; rules checked on the known dims.
    int64_t const L = -1;
    Dims shapes[7] = {dims({2, 8, L}), dims({2, 8, L}), dims({8, 4}), dims({2, 2, 4, L}), dims({2, 2, 4, L}),
        dims({8}), dims({8})};
    for (int i = 0; i < 7; ++i) io[i].desc.dims = shapes[i];
    io[7].desc.dims = shapes[0];
    errors.clear();
    CHECK(build->configurePlugin(io, 7, io + 7, 1) == 0 && errors.empty());
    io[ct::kINPUT_A].desc.dims = dims({8, 5});  // N of A != N of B
    CHECK(build->configurePlugin(io, 7, io + 7, 1) != 0 && errors.find("'A'") != std::string::npos);
    io[ct::kINPUT_A].desc.dims = shapes[ct::kINPUT_A];
    io[ct::kINPUT_B].desc.dims = io[ct::kINPUT_C].desc.dims = dims({2, 3, 4, L});  // D = 8 not a multiple of K = 3
    CHECK(build->configurePlugin(io, 7, io + 7, 1) != 0 && errors.find("multiple") != std::string::npos);
    io[ct::kINPUT_B].desc.dims = io[ct::kINPUT_C].desc.dims = dims({2, 2, 17, L});
    io[ct::kINPUT_A].desc.dims = dims({8, 17});  // N = 17 > kMaxState
    CHECK(build->configurePlugin(io, 7, io + 7, 1) != 0 && errors.find("N = 17") != std::string::npos);
    io[ct::kINPUT_DELTA_BIAS].desc.dims = dims({8, 1});  // rank
    CHECK(build->configurePlugin(io, 7, io + 7, 1) != 0 && errors.find("'delta_bias' must have rank 1") != std::string::npos);
    CHECK(build->configurePlugin(io, 6, io + 6, 1) != 0);

    // Workspace: the segment maps of the two-pass scan at the profile's largest shapes.
    Dims most[7] = {dims({2, 8, 5000}), dims({2, 8, 5000}), dims({8, 4}), dims({2, 2, 4, 5000}),
        dims({2, 2, 4, 5000}), dims({8}), dims({8})};
    for (int i = 0; i < 7; ++i) io[i].max = most[i];
    qmamba::scan::Dims const mostScan{2, 8, 2, 5000, 4};
    CHECK(build->getWorkspaceSize(io, 7, io + 7, 1) == qmamba::scan::workspace_bytes(mostScan));
    // [B, D, N, S] maps, S at most the 20 tiles of 256 steps
    CHECK(qmamba::scan::workspace_bytes(mostScan) == 2u * 8 * 4 * 20 * sizeof(qmamba::scan::Affine));
    for (int i = 0; i < 7; ++i) io[i].desc.dims = shapes[i];  // the valid build-time shapes again
    errors.clear();
    CHECK(build->configurePlugin(io, 7, io + 7, 1) == 0 && errors.empty());

    // The kernel's grid limit at the profile's largest batch is refused at build time:
    // 2^30 batches x K = 2 groups x 1 block of 8 channels = 2^31 blocks.
    io[ct::kINPUT_U].max.d[0] = io[ct::kINPUT_DELTA].max.d[0] = int64_t{1} << 30;
    io[ct::kINPUT_B].max.d[0] = io[ct::kINPUT_C].max.d[0] = int64_t{1} << 30;
    CHECK(build->configurePlugin(io, 7, io + 7, 1) != 0 && errors.find("2^31 - 1") != std::string::npos);
    CHECK(errors.find("batch 1073741824") != std::string::npos);
    io[ct::kINPUT_U].max.d[0] = io[ct::kINPUT_DELTA].max.d[0] = (int64_t{1} << 30) - 1;
    io[ct::kINPUT_B].max.d[0] = io[ct::kINPUT_C].max.d[0] = (int64_t{1} << 30) - 1;
    errors.clear();
    CHECK(build->configurePlugin(io, 7, io + 7, 1) == 0 && errors.empty());

    // Concrete shapes at run time, then the kernel arguments.
    PluginTensorDesc desc[8]{};
    int64_t const length = 48;
    Dims concrete[8] = {dims({2, 8, length}), dims({2, 8, length}), dims({8, 4}), dims({2, 2, 4, length}),
        dims({2, 2, 4, length}), dims({8}), dims({8}), dims({2, 8, length})};
    for (int i = 0; i < 8; ++i)
    {
        desc[i].dims = concrete[i];
        desc[i].format = TensorFormat::kLINEAR;
        desc[i].type = (i == ct::kINPUT_A || i == ct::kINPUT_D_SKIP || i == ct::kINPUT_DELTA_BIAS) ? DataType::kFLOAT
                                                                                                 : DataType::kHALF;
    }
    errors.clear();
    CHECK(runtime->onShapeChange(desc, 7, desc + 7, 1) == 0 && errors.empty());
    desc[ct::kINPUT_DELTA].dims = dims({2, 8, length + 1});
    CHECK(runtime->onShapeChange(desc, 7, desc + 7, 1) != 0 && errors.find("'delta'") != std::string::npos);
    desc[ct::kINPUT_DELTA].dims = concrete[ct::kINPUT_DELTA];

    char buffers[8][1]{};
    void const* inputs[7];
    for (int i = 0; i < 7; ++i) inputs[i] = buffers[i];
    void* outputs[1] = {buffers[7]};
    char workspace[16]{};
    CHECK(runtime->enqueue(desc, desc + 7, inputs, outputs, workspace, nullptr) == 0);
    CHECK(gArgs.workspace == workspace);
    CHECK(gArgs.dims.batch == 2 && gArgs.dims.dim == 8 && gArgs.dims.groups == 2 && gArgs.dims.length == length);
    CHECK(gArgs.dims.state == 4 && gArgs.io == qmamba::IOType::kFLOAT16 && !gArgs.delta_softplus);
    CHECK(gArgs.u == buffers[ct::kINPUT_U] && gArgs.delta == inputs[ct::kINPUT_DELTA]);
    CHECK(gArgs.A == static_cast<void const*>(buffers[ct::kINPUT_A]) && gArgs.B == inputs[ct::kINPUT_B]);
    CHECK(gArgs.C == inputs[ct::kINPUT_C] && gArgs.y == outputs[0]);
    CHECK(gArgs.D_skip == static_cast<void const*>(buffers[ct::kINPUT_D_SKIP]));
    CHECK(gArgs.delta_bias == static_cast<void const*>(buffers[ct::kINPUT_DELTA_BIAS]));
    CHECK(gArgs.sm_count == 0 && gDescribeCalls == 0);  // not attached: the launcher asks the runtime
    desc[ct::kINPUT_B].dims.d[2] = 13;  // the stub fails this launch
    CHECK(runtime->enqueue(desc, desc + 7, inputs, outputs, nullptr, nullptr) != 0);
    CHECK(errors.find("cudaErrorInvalidValue") != std::string::npos);

    std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
    CHECK(attached != nullptr && attached.get() != plugin.get());
    CHECK(gDescribeCalls == 1);
    // An attached plugin passes the cached SM count and the occupancy of (fp16, N = 4): no query per enqueue.
    auto* attachedRuntime = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    desc[ct::kINPUT_B].dims.d[2] = 4;
    for (int i = 0; i < 3; ++i) CHECK(attachedRuntime->enqueue(desc, desc + 7, inputs, outputs, workspace, nullptr) == 0);
    CHECK(gDescribeCalls == 1 && gArgs.sm_count == 132 && gArgs.blocks_per_sm == 4 + 16 + 3);
    CHECK(gArgs.fused_blocks_per_sm == 40 + 16 + 3 && gArgs.strategy == qmamba::Strategy::kAuto);
    std::unique_ptr<IPluginV3> cloned(attached->clone());  // TensorRT may clone an attached plugin
    auto* clonedRuntime = static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(clonedRuntime->enqueue(desc, desc + 7, inputs, outputs, workspace, nullptr) == 0 && gArgs.sm_count == 132);
    std::printf("glue ok\n");
    return 0;
}
"""


@header_dir
def test_plugin_glue_runs_on_the_cpu(trt_include, tmp_path):
    cxx, cuda = _toolchain(trt_include)
    plugin_obj = tmp_path / "plugin.o"
    _compile(cxx, trt_include, cuda, PLUGIN_CPP, plugin_obj, "-O0", "-DQMAMBA_SELF_REGISTER=0")
    driver = tmp_path / "driver.cpp"
    driver.write_text(DRIVER)
    driver_obj = tmp_path / "driver.o"
    _compile(cxx, trt_include, cuda, driver, driver_obj, "-O0")
    exe = tmp_path / "glue"
    link = subprocess.run([cxx, str(driver_obj), str(plugin_obj), "-o", str(exe)], capture_output=True, text=True,
                          check=False)
    assert link.returncode == 0, link.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0 and "glue ok" in run.stdout, run.stdout + run.stderr


STUB_KERNEL = r"""
// Stands in for the CUDA kernel and runtime so that the glue links into a loadable library.
#include "qmamba/selective_scan.h"
cudaError_t qmamba::launch_selective_scan(qmamba::ScanArgs const&, cudaStream_t) { return cudaSuccess; }
cudaError_t qmamba::describe_device(qmamba::DeviceInfo*) { return cudaErrorNoDevice; }
extern "C" char const* cudaGetErrorName(cudaError_t) { return "stub"; }
extern "C" char const* cudaGetErrorString(cudaError_t) { return "stub"; }
"""

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
    (tmp_path / "stub.cpp").write_text(STUB_KERNEL)
    _compile(cxx, trt_include, cuda, tmp_path / "stub.cpp", stub_obj, "-O2")
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
    (tmp_path / "stub.cpp").write_text(STUB_KERNEL)
    libs = {}
    for flagged in (False, True):
        flags = ["-O2", "-DQMAMBA_SELF_REGISTER=0"] + (["-fno-gnu-unique"] if flagged else [])
        plugin_obj, stub_obj = tmp_path / f"plugin{flagged}.o", tmp_path / f"stub{flagged}.o"
        _compile(cxx, trt_include, cuda, PLUGIN_CPP, plugin_obj, *flags)
        _compile(cxx, trt_include, cuda, tmp_path / "stub.cpp", stub_obj, *flags)
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
