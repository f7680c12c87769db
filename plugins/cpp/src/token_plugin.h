// What ToMeMerge and TokenPrune share as TensorRT IPluginV3 plugins: the three capability interfaces, the
// tensor contract (inputs x, decision tensor, size[, mask]; outputs x, size, mask), fields, logging.
//
// The contract (fixed for tcexport's C++ and Python plugins): namespace "tcexport", version "1", fields as INT32
// scalars (how TensorRT's ONNX parser passes ONNX INT attributes). Inputs: x [B,N,C] and the decision tensor
// (metric [B,N,Ck] or cls_attention [B,N]) in fp32, fp16 or bf16 (one type for both), size [B,N,1] and mask
// [B,N] in fp32 (tcexport/precision.py keeps a plugin node's I/O fp32 in converted graphs). Outputs: x [B,M,C]
// in x's type, size [B,M,1] and mask [B,M] in fp32, M static from the fields. LINEAR format throughout.
//
// Always three outputs: getNbOutputs() is asked before the inputs are known, so it cannot depend on whether a
// mask was given. Without a mask input the mask output is all ones; an ONNX node that lists two outputs simply
// leaves it unused (the parser accepts a layer with more outputs than the node names).
#pragma once

#include "NvInfer.h"

#include <cstdint>
#include <string>
#include <vector>

// The IPluginV3 members used here are identical in the 10.3, 10.13 and 11 headers; these are the differences.
#if NV_TENSORRT_MAJOR < 10
#error "tcexport's plugins are IPluginV3 plugins: they need TensorRT 10.0 or later (JetPack 6.1+ has 10.3)"
#endif
#if NV_TENSORRT_MAJOR >= 9
#define TCEXPORT_HAS_BF16 1 // DataType::kBF16 exists from TensorRT 9
#else
#define TCEXPORT_HAS_BF16 0
#endif

// TENSORRTAPI exports symbols in 10.x but is empty in 11 unless TensorRT itself is being built: use our own.
#if defined(_WIN32)
#define TCEXPORT_API __declspec(dllexport)
#else
#define TCEXPORT_API __attribute__((visibility("default")))
#endif

namespace tc
{

constexpr char kPluginNamespace[] = "tcexport";
constexpr char kPluginVersion[] = "1";

enum Tensor : int32_t // positions in supportsFormatCombination's inOut, for 3 or 4 inputs
{
    kInX = 0,
    kInDecision = 1, // metric (ToMeMerge) or cls_attention (TokenPrune)
    kInSize = 2,
    kInMask = 3, // optional
};
constexpr int32_t kNbOutputs = 3; // x, size, mask

// Logging through TensorRT's logger when the library was given one (setLoggerFinder), else stderr.
void set_logger_finder(nvinfer1::ILoggerFinder* finder);
void log_error(std::string const& message);

// The kernels' element type for a TensorRT type, or -1.
int32_t element_type(nvinfer1::DataType type);

// Named INT32 scalar fields: what a creator declares, what a plugin serializes.
class IntFields
{
public:
    explicit IntFields(std::vector<std::string> names);
    IntFields(IntFields const& other);
    IntFields& operator=(IntFields const&) = delete;

    int32_t& operator[](std::string const& name);
    int32_t operator[](std::string const& name) const;

    // Fill the values from a collection (fields of other names or types are an error). Missing fields keep
    // their current value; `required` names must be present.
    bool read(nvinfer1::PluginFieldCollection const* fc, std::vector<std::string> const& required,
        char const* plugin);

    nvinfer1::PluginFieldCollection const* collection() noexcept
    {
        return &mCollection;
    }

private:
    void link();

    std::vector<std::string> mNames;
    std::vector<int32_t> mValues;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

// The shared IPluginV3 implementation; subclasses give the name, the token count and the launch.
class TokenPlugin : public nvinfer1::IPluginV3,
                    public nvinfer1::IPluginV3OneCore,
                    public nvinfer1::IPluginV3OneBuild,
                    public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit TokenPlugin(IntFields fields);
    ~TokenPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

    // IPluginV3OneCore
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return kNbOutputs;
    }
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    // Tokens out for n in; "" when the fields fit a block of n tokens, else why not.
    virtual int64_t tokensOut(int64_t n) const = 0;
    virtual std::string checkFits(int64_t n) const = 0;
    // Rank of the decision tensor: 3 (metric [B,N,Ck]) or 2 (cls_attention [B,N]).
    virtual int32_t decisionRank() const = 0;
    virtual size_t workspaceBytes(int32_t batch, int32_t n, int32_t decision_channels) const = 0;
    // Enqueue the kernels for x [batch, n, c]; decision_channels is Ck (or 1).
    virtual cudaError_t launch(int32_t element, int32_t batch, int32_t n, int32_t c, int32_t decision_channels,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) const = 0;

    IntFields mFields;
    bool mHasMask{false};

private:
    bool checkShapes(nvinfer1::Dims const* dims, int32_t nbInputs) const;
};

} // namespace tc
