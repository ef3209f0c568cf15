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
