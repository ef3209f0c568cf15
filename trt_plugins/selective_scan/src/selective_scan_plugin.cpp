// The QMambaSelectiveScan TensorRT plugin: shape and type rules, the launch of the CUDA
// kernel, the creator, the plugin-library entry points and self-registration.
//
// Loading paths (shared/design/selective-scan-op.md, "Where it runs"):
//   * TensorRT loads the library itself (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary,
//     --setPluginsToSerialize): it calls setLoggerFinder() and getCreators() below;
//   * the application dlopens it (trtexec --staticPlugins, ctypes.CDLL): a static object
//     registers the creator with getPluginRegistry() while the library loads.
// The two paths need two builds of this file (CMakeLists.txt): libqmamba_scan_plugin.so
// (QMAMBA_SELF_REGISTER=0: entry points only, no libnvinfer) for TensorRT's own loading, and
// libqmamba_scan_plugin_static.so (self-registering) for dlopen. Loading one library both ways
// would register the creator twice, which TensorRT refuses; NVIDIA's own plugin libraries keep
// the two mechanisms apart the same way.
#include "selective_scan_plugin.h"

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <new>
#include <string>

#include "qmamba/selective_scan.h"

#ifndef QMAMBA_SELF_REGISTER
#define QMAMBA_SELF_REGISTER 0
#endif

namespace qmamba {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;
using nvinfer1::TensorFormat;
using Severity = nvinfer1::ILogger::Severity;
using namespace contract;

static_assert(kNB_INPUTS == 7 && kNB_OUTPUTS == 1 && kNB_FIELDS == 1,
    "the op contract changed (plugin_contract.h): update SelectiveScanPlugin and bump the plugin version");
static_assert(kSOFTPLUS_THRESHOLD == scan::kSoftplusThreshold,
    "the kernel's softplus threshold (scan_math.h) differs from the op contract");

namespace {

// ---------------------------------------------------------------------------------------------
// Logging: through the logger of the TensorRT object that called us when TensorRT gave the
// library a logger finder; otherwise (a library loaded with dlopen gets none) warnings and
// errors go to stderr.

std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder{nullptr};

//! Logs "QMambaSelectiveScan: <makeMessage()>". The message is built here, inside the
//! try block, because the plugin methods that report errors must not throw.
template <typename MakeMessage>
void report(Severity severity, MakeMessage&& makeMessage) noexcept
{
    try
    {
        std::string const line = std::string(kPLUGIN_NAME) + ": " + makeMessage();
        nvinfer1::ILogger* logger{nullptr};
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            if (gLoggerFinder != nullptr)
            {
                logger = gLoggerFinder->findLogger();
            }
        }
        if (logger != nullptr)
        {
            logger->log(severity, line.c_str());
        }
        else if (severity <= Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
        std::fprintf(stderr, "%s: out of memory while reporting a problem\n", kPLUGIN_NAME);
    }
}

//! The message of the plugin methods that get a wrong number of inputs or outputs.
std::string ioCountError()
{
    return "expects " + std::to_string(kNB_INPUTS) + " inputs and " + std::to_string(kNB_OUTPUTS) + " output";
}

// ---------------------------------------------------------------------------------------------
// Shapes. At build time a dimension may be -1 (not known until a profile is chosen); an unknown
// dimension satisfies every rule, and the rules are checked again on concrete shapes.

//! Ranks of u, delta, A, B, C, D_skip, delta_bias.
int32_t expectedRank(int32_t input)
{
    switch (input)
    {
    case kINPUT_U:
    case kINPUT_DELTA: return 3;
    case kINPUT_A: return 2;
    case kINPUT_B:
    case kINPUT_C: return 4;
    default: return 1; // D_skip, delta_bias
    }
}

bool agree(int64_t a, int64_t b)
{
    return a < 0 || b < 0 || a == b;
}

std::string toString(Dims const& dims)
{
    std::string text = "[";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        text += (i > 0 ? ", " : "") + std::to_string(dims.d[i]);
    }
    return text + "]";
}

std::string inputName(int32_t input)
{
    return std::string("'") + kINPUT_NAMES[input] + "'";
}

//! Why the shapes of the inputs and of the output y break the contract, or "".
//! `at(i)` returns the Dims of input i.
template <typename DimsOfInput>
std::string shapeError(DimsOfInput const& at, Dims const& y)
{
    for (int32_t i = 0; i < kNB_INPUTS; ++i)
    {
        if (at(i).nbDims != expectedRank(i))
        {
            return "input " + inputName(i) + " must have rank " + std::to_string(expectedRank(i)) + ", got "
                + toString(at(i));
        }
        for (int32_t j = 0; j < at(i).nbDims; ++j)
        {
            if (at(i).d[j] > std::numeric_limits<int32_t>::max())
            {
                return "input " + inputName(i) + " " + toString(at(i)) + " has a dimension beyond int32";
            }
        }
    }
    Dims const& u = at(kINPUT_U);
    Dims const& b = at(kINPUT_B);
    int64_t const channels = u.d[1];
    int64_t const groups = b.d[1];
    int64_t const state = b.d[2];
    auto const sameAs = [](Dims const& x, Dims const& ref) {
        for (int32_t j = 0; j < ref.nbDims; ++j)
        {
            if (!agree(x.d[j], ref.d[j]))
            {
                return false;
            }
        }
        return true;
    };

    if (!sameAs(at(kINPUT_DELTA), u))
    {
        return "input " + inputName(kINPUT_DELTA) + " " + toString(at(kINPUT_DELTA)) + " must have the shape of "
            + inputName(kINPUT_U) + " " + toString(u);
    }
    if (!agree(b.d[0], u.d[0]) || !agree(b.d[3], u.d[2]))
    {
        return "input " + inputName(kINPUT_B) + " " + toString(b) + " must be [B, K, N, L] with B and L of "
            + inputName(kINPUT_U) + " " + toString(u);
    }
    if (!sameAs(at(kINPUT_C), b))
    {
        return "input " + inputName(kINPUT_C) + " " + toString(at(kINPUT_C)) + " must have the shape of "
            + inputName(kINPUT_B) + " " + toString(b);
    }
    if (!agree(at(kINPUT_A).d[0], channels) || !agree(at(kINPUT_A).d[1], state))
    {
        return "input " + inputName(kINPUT_A) + " " + toString(at(kINPUT_A)) + " must be [D, N] with D of "
            + inputName(kINPUT_U) + " and N of " + inputName(kINPUT_B);
    }
    for (int32_t const i : {kINPUT_D_SKIP, kINPUT_DELTA_BIAS})
    {
        if (!agree(at(i).d[0], channels))
        {
            return "input " + inputName(i) + " " + toString(at(i)) + " must be [D] with D = "
                + std::to_string(channels);
        }
    }
    if (groups == 0 || (groups > 0 && channels >= 0 && channels % groups != 0))
    {
        return "the channels of " + inputName(kINPUT_U) + " (D = " + std::to_string(channels)
            + ") must be a multiple of the groups of " + inputName(kINPUT_B) + " (K = " + std::to_string(groups) + ")";
    }
    if (state >= 0 && (state < 1 || state > scan::kMaxState))
    {
        return "state size N = " + std::to_string(state) + " is outside 1.." + std::to_string(scan::kMaxState)
            + " (the kernel is compiled for N <= " + std::to_string(scan::kMaxState) + ")";
    }
    if (y.nbDims != expectedRank(kINPUT_U) || !sameAs(y, u))
    {
        return "output " + toString(y) + " must have the shape of " + inputName(kINPUT_U) + " " + toString(u);
    }
    return {};
}

//! 0 when the shapes fit the contract; otherwise reports why and returns 1.
template <typename DimsOfInput>
int32_t checkShapes(DimsOfInput const& at, Dims const& y) noexcept
{
    try
    {
        std::string const error = shapeError(at, y);
        if (error.empty())
        {
            return 0;
        }
        report(Severity::kERROR, [&error] { return error; });
    }
    catch (...)
    {
        report(Severity::kERROR, [] { return std::string("out of memory while checking shapes"); });
    }
    return 1;
}

bool isIoType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

//! An integer plugin field of length 1, whatever its integer width.
bool readInteger(PluginField const& field, int64_t& value)
{
    if (field.data == nullptr || field.length != 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(field.data); return true;
    default: return false;
    }
}

//! The one creator of this library: the object getCreators() hands out and the one that
//! self-registration registers.
SelectiveScanPluginCreator& theCreator()
{
    static SelectiveScanPluginCreator creator;
    return creator;
}

} // namespace

// =============================================================================================
// SelectiveScanPlugin

SelectiveScanPlugin::SelectiveScanPlugin(bool deltaSoftplus)
    : mDeltaSoftplus(deltaSoftplus ? 1 : 0)
    , mDevice()
    , mSerializedField()
    , mSerializedFields()
{
}

// The serialized field is not copied: it points at its own object's member and
// getFieldsToSerialize() rebuilds it.
SelectiveScanPlugin::SelectiveScanPlugin(SelectiveScanPlugin const& other)
    : SelectiveScanPlugin(other.mDeltaSoftplus != 0)
{
    mDevice = other.mDevice;
}

nvinfer1::IPluginCapability* SelectiveScanPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* SelectiveScanPlugin::clone() noexcept
{
    return new (std::nothrow) SelectiveScanPlugin(*this);
}

char const* SelectiveScanPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* SelectiveScanPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* SelectiveScanPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t SelectiveScanPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t SelectiveScanPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        report(Severity::kERROR, ioCountError);
        return 1;
    }
    outputTypes[kOUTPUT_Y] = inputTypes[kINPUT_U]; // y has the dtype of u
    return 0;
}

int32_t SelectiveScanPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        report(Severity::kERROR, ioCountError);
        return 1;
    }
    if (inputs[kINPUT_U].nbDims != expectedRank(kINPUT_U))
    {
        report(Severity::kERROR, [] { return "input " + inputName(kINPUT_U) + " must be [B, D, L]"; });
        return 1;
    }
    outputs[kOUTPUT_Y] = inputs[kINPUT_U]; // y: [B, D, L], the shape of u
    return 0;
}

bool SelectiveScanPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kINPUT_U: return isIoType(desc.type);
    case kINPUT_A:
    case kINPUT_D_SKIP:
    case kINPUT_DELTA_BIAS: return desc.type == DataType::kFLOAT; // parameters stay float32
    default: return desc.type == inOut[kINPUT_U].desc.type;       // delta, B, C and y follow u
    }
}

namespace {

//! The dims of the kernel call at the profile's largest shapes, or false when one is unknown.
bool largestScan(nvinfer1::DynamicPluginTensorDesc const* in, scan::Dims& most)
{
    Dims const& u = in[kINPUT_U].max;
    Dims const& b = in[kINPUT_B].max;
    if (u.nbDims != 3 || b.nbDims != 4)
    {
        return false;
    }
    for (int64_t const v : {u.d[0], u.d[1], u.d[2], b.d[1], b.d[2]})
    {
        if (v < 0 || v > std::numeric_limits<int32_t>::max())
        {
            return false;
        }
    }
    most = scan::Dims{static_cast<int32_t>(u.d[0]), static_cast<int32_t>(u.d[1]), static_cast<int32_t>(b.d[1]),
        static_cast<int32_t>(u.d[2]), static_cast<int32_t>(b.d[2])};
    return true;
}

} // namespace

int32_t SelectiveScanPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        report(Severity::kERROR, ioCountError);
        return 1;
    }
    if (checkShapes([in](int32_t i) -> Dims const& { return in[i].desc.dims; }, out[kOUTPUT_Y].desc.dims) != 0)
    {
        return 1;
    }
    // The kernel's limits (the number of blocks of one launch, which grows with the batch) at the
    // profile's largest shapes: refused when the engine is built, not at the first enqueue.
    scan::Dims most{};
    if (largestScan(in, most) && most.batch > 0 && most.dim > 0 && most.groups > 0 && most.dim % most.groups == 0)
    {
        if (char const* why = scan::check_dims(most))
        {
            report(Severity::kERROR, [why, &most] {
                return std::string(why) + " (profile's largest shapes: batch " + std::to_string(most.batch) + ", D "
                    + std::to_string(most.dim) + ", K " + std::to_string(most.groups) + ")";
            });
            return 1;
        }
    }
    return 0;
}

size_t SelectiveScanPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNB_INPUTS)
    {
        return 0;
    }
    // The segment maps of the two-pass mode (scan_math.h), at the profile's largest shapes.
    scan::Dims most{};
    return largestScan(inputs, most) && scan::check_dims(most) == nullptr ? scan::workspace_bytes(most) : 0;
}

int32_t SelectiveScanPlugin::onShapeChange(
    nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        report(Severity::kERROR, ioCountError);
        return 1;
    }
    return checkShapes([in](int32_t i) -> Dims const& { return in[i].dims; }, out[kOUTPUT_Y].dims);
}

int32_t SelectiveScanPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* workspace, cudaStream_t stream) noexcept
{
    Dims const& u = inputDesc[kINPUT_U].dims; // [B, D, L]
    Dims const& b = inputDesc[kINPUT_B].dims; // [B, K, N, L]
    if (u.d[0] == 0 || u.d[1] == 0 || u.d[2] == 0)
    {
        return 0; // empty y: nothing to compute
    }

    ScanArgs args{};
    args.dims.batch = static_cast<int32_t>(u.d[0]);
    args.dims.dim = static_cast<int32_t>(u.d[1]);
    args.dims.groups = static_cast<int32_t>(b.d[1]);
    args.dims.length = static_cast<int32_t>(u.d[2]);
    args.dims.state = static_cast<int32_t>(b.d[2]);
    args.delta_softplus = mDeltaSoftplus != 0;
    args.io = inputDesc[kINPUT_U].type == DataType::kHALF ? IOType::kFLOAT16 : IOType::kFLOAT32;
    args.u = inputs[kINPUT_U];
    args.delta = inputs[kINPUT_DELTA];
    args.A = static_cast<float const*>(inputs[kINPUT_A]);
    args.B = inputs[kINPUT_B];
    args.C = inputs[kINPUT_C];
    args.D_skip = static_cast<float const*>(inputs[kINPUT_D_SKIP]);
    args.delta_bias = static_cast<float const*>(inputs[kINPUT_DELTA_BIAS]);
    args.y = outputs[kOUTPUT_Y];
    args.workspace = workspace; // sized by getWorkspaceSize for the profile's largest shapes
    args.sm_count = mDevice.sm_count; // from attachToContext; 0: the launcher asks the runtime
    bool const known = args.dims.state >= 1 && args.dims.state <= scan::kMaxState;
    args.blocks_per_sm = known ? mDevice.blocks_per_sm[static_cast<int>(args.io)][args.dims.state - 1] : 0;
    args.fused_blocks_per_sm = known ? mDevice.fused_blocks_per_sm[static_cast<int>(args.io)][args.dims.state - 1] : 0;

    cudaError_t const status = launch_selective_scan(args, stream);
    if (status != cudaSuccess)
    {
        report(Severity::kERROR, [status] {
            return std::string("kernel launch failed: ") + cudaGetErrorName(status) + " (" + cudaGetErrorString(status)
                + ")";
        });
        return 1;
    }
    return 0;
}

nvinfer1::IPluginV3* SelectiveScanPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    // The context runs on the current device: its SM count and the kernel's occupancy are
    // queried once here, so that enqueue() makes no device-attribute or occupancy query.
    SelectiveScanPlugin* attached = new (std::nothrow) SelectiveScanPlugin(*this);
    if (attached != nullptr && describe_device(&attached->mDevice) != cudaSuccess)
    {
        attached->mDevice = DeviceInfo{}; // the launcher will ask the runtime itself
        report(Severity::kWARNING,
            [] { return std::string("could not query the GPU's SM count and occupancy; enqueue will ask each time"); });
    }
    return attached;
}

nvinfer1::PluginFieldCollection const* SelectiveScanPlugin::getFieldsToSerialize() noexcept
{
    // Rebuilt on every call so that the field always points at this object's own member.
    mSerializedField = PluginField(kFIELD_DELTA_SOFTPLUS, &mDeltaSoftplus, PluginFieldType::kINT32, 1);
    mSerializedFields.nbFields = 1;
    mSerializedFields.fields = &mSerializedField;
    return &mSerializedFields;
}

// =============================================================================================
// SelectiveScanPluginCreator

SelectiveScanPluginCreator::SelectiveScanPluginCreator()
    : mFieldNames{PluginField(kFIELD_DELTA_SOFTPLUS, nullptr, PluginFieldType::kINT32, 1)}
    , mFieldCollection()
{
    mFieldCollection.nbFields = kNB_FIELDS;
    mFieldCollection.fields = mFieldNames;
}

char const* SelectiveScanPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* SelectiveScanPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* SelectiveScanPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

nvinfer1::PluginFieldCollection const* SelectiveScanPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* SelectiveScanPluginCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    // The build phase gets the ONNX node's attributes listed by getFieldNames(); the runtime
    // phase gets what getFieldsToSerialize() wrote. Both are the same one field.
    int32_t deltaSoftplus = kDEFAULT_DELTA_SOFTPLUS;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr || std::strcmp(field.name, kFIELD_DELTA_SOFTPLUS) != 0)
        {
            report(Severity::kERROR, [&field] {
                return std::string("unknown plugin field '") + (field.name != nullptr ? field.name : "") + "'";
            });
            return nullptr;
        }
        int64_t value{};
        if (!readInteger(field, value) || (value != 0 && value != 1))
        {
            report(Severity::kERROR,
                [] { return std::string("field '") + kFIELD_DELTA_SOFTPLUS + "' must be one integer, 0 or 1"; });
            return nullptr;
        }
        deltaSoftplus = static_cast<int32_t>(value);
    }
    return new (std::nothrow) SelectiveScanPlugin(deltaSoftplus != 0);
}

#if QMAMBA_SELF_REGISTER
namespace {

//! Registers the creator while the library loads (dlopen, trtexec --staticPlugins) and
//! deregisters it when the library unloads. It passes the creator's own namespace: the
//! REGISTER_TENSORRT_PLUGIN macro would register a second creator object under namespace "".
class SelfRegistration
{
public:
    SelfRegistration() noexcept
    {
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        mRegistered = registry != nullptr && registry->registerCreator(theCreator(), kPLUGIN_NAMESPACE);
        if (!mRegistered)
        {
            report(Severity::kWARNING, [] {
                return std::string("not registered at load (is a creator of this name, version and namespace "
                                   "already registered?)");
            });
        }
    }

    ~SelfRegistration()
    {
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        if (mRegistered && registry != nullptr)
        {
            registry->deregisterCreator(theCreator());
        }
    }

    SelfRegistration(SelfRegistration const&) = delete;
    SelfRegistration& operator=(SelfRegistration const&) = delete;

private:
    bool mRegistered{false};
};

SelfRegistration const gSelfRegistration;

} // namespace
#endif // QMAMBA_SELF_REGISTER

} // namespace qmamba

// =============================================================================================
// Plugin-library entry points

//! Keeps the first finder TensorRT gives: each loadLibrary (builder, runtime, the lean runtime
//! of a version-compatible engine) calls this again, and a later caller may be unloaded first.
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(qmamba::gLoggerMutex);
    if (qmamba::gLoggerFinder == nullptr && finder != nullptr)
    {
        qmamba::gLoggerFinder = finder;
    }
}

//! TensorRT registers what this returns (in the registry that loaded the library); no side effects.
extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&qmamba::theCreator()};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
