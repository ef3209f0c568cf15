// The QMambaSelectiveScan TensorRT plugin (IPluginV3) and its creator (IPluginCreatorV3One).
//
// Contract: shared/design/selective-scan-op.md. The name, version, namespace, input order
// and field names come from the generated qmamba/plugin_contract.h; the math is in
// qmamba/scan_math.h and src/selective_scan_kernel.cu.
//
// Written against the IPluginV3 API, which is source-identical in TensorRT 10.x (10.3 =
// JetPack 6) and 11.x; it does not exist before TensorRT 10.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>

#include "qmamba/plugin_contract.h"
#include "qmamba/selective_scan.h"

#if NV_TENSORRT_MAJOR < 10
#error "the QMambaSelectiveScan plugin needs TensorRT 10 or newer (IPluginV3)"
#endif

//! Symbols the library exports (everything else is hidden: -fvisibility=hidden).
#define QMAMBA_PLUGIN_EXPORT __attribute__((visibility("default")))

namespace qmamba {

//! One QMambaSelectiveScan layer. The only serialized state is the delta_softplus field; a
//! plugin attached to an execution context also holds the GPU's description (SM count, the
//! kernel's occupancy), queried once in attachToContext instead of on every enqueue.
class SelectiveScanPlugin : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit SelectiveScanPlugin(bool deltaSoftplus);
    SelectiveScanPlugin(SelectiveScanPlugin const& other);
    SelectiveScanPlugin& operator=(SelectiveScanPlugin const&) = delete;
    ~SelectiveScanPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    int32_t mDeltaSoftplus; //!< 0 or 1; int32 because it is serialized as a kINT32 field
    DeviceInfo mDevice;     //!< sm_count 0 until attachToContext (the launcher then asks the runtime)
    nvinfer1::PluginField mSerializedField;
    nvinfer1::PluginFieldCollection mSerializedFields;
};

//! Creates SelectiveScanPlugin from the ONNX node's fields (build) or from the fields the
//! plugin serialized into the engine (runtime); both carry the same delta_softplus field.
class SelectiveScanPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    SelectiveScanPluginCreator();

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    nvinfer1::PluginField mFieldNames[contract::kNB_FIELDS];
    nvinfer1::PluginFieldCollection mFieldCollection;
};

} // namespace qmamba

//! Plugin-library entry points, looked up by TensorRT when it loads the library itself
//! (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary, a library serialized into a
//! version-compatible engine with --setPluginsToSerialize).
extern "C" QMAMBA_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
extern "C" QMAMBA_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
