// TokenPrune (method topk): EViT top-k pruning. Fields k, protected, fuse, keep_order.
#pragma once

#include "token_plugin.h"

namespace tc
{

class TokenPrunePlugin : public TokenPlugin
{
public:
    explicit TokenPrunePlugin(IntFields fields);

    char const* getPluginName() const noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

protected:
    int64_t tokensOut(int64_t n) const override;
    std::string checkFits(int64_t n) const override;
    int32_t decisionRank() const override
    {
        return 2; // cls_attention [B, N]
    }
    size_t workspaceBytes(int32_t batch, int32_t n, int32_t decision_channels) const override;
    cudaError_t launch(int32_t element, int32_t batch, int32_t n, int32_t c, int32_t decision_channels,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) const override;
};

class TokenPruneCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    TokenPruneCreator();

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    IntFields mDeclared;
};

} // namespace tc
