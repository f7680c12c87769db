#include "tome_plugin.h"

#include "launch.h"

using namespace nvinfer1;

namespace tc
{

namespace
{
constexpr char kName[] = "ToMeMerge";

IntFields tomeFields()
{
    return IntFields({"r", "protected"});
}
} // namespace

ToMeMergePlugin::ToMeMergePlugin(IntFields fields)
    : TokenPlugin(std::move(fields))
{
}

char const* ToMeMergePlugin::getPluginName() const noexcept
{
    return kName;
}

IPluginV3* ToMeMergePlugin::clone() noexcept
{
    try
    {
        auto* copy = new ToMeMergePlugin(mFields);
        copy->mHasMask = mHasMask;
        return copy;
    }
    catch (std::exception const& e)
    {
        log_error(e.what());
        return nullptr;
    }
}

int64_t ToMeMergePlugin::tokensOut(int64_t n) const
{
    return n - mFields["r"];
}

std::string ToMeMergePlugin::checkFits(int64_t n) const
{
    int64_t const r = mFields["r"], p = mFields["protected"];
    if (p < 0 || p > n)
    {
        return "protected=" + std::to_string(p) + " must be in [0, N=" + std::to_string(n) + "]";
    }
    if (r < 0 || r > (n - p) / 2)
    {
        return "r=" + std::to_string(r) + " must be in [0, (N - protected) // 2 = " + std::to_string((n - p) / 2)
            + "] (the graph side caps r per block)";
    }
    return "";
}

size_t ToMeMergePlugin::workspaceBytes(int32_t batch, int32_t n, int32_t decision_channels) const
{
    return tome_workspace_bytes(batch, n, decision_channels);
}

cudaError_t ToMeMergePlugin::launch(int32_t element, int32_t batch, int32_t n, int32_t c, int32_t decision_channels,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) const
{
    ToMeLaunch a{};
    a.element_type = element;
    a.batch = batch;
    a.n = n;
    a.c = c;
    a.ck = decision_channels;
    a.r = mFields["r"];
    a.protect = mFields["protected"];
    a.x = inputs[kInX];
    a.metric = inputs[kInDecision];
    a.size = static_cast<float const*>(inputs[kInSize]);
    a.mask = mHasMask ? static_cast<float const*>(inputs[kInMask]) : nullptr;
    a.x_out = outputs[0];
    a.size_out = static_cast<float*>(outputs[1]);
    a.mask_out = static_cast<float*>(outputs[2]);
    a.workspace = workspace;
    return launch_tome(a, stream);
}

ToMeMergeCreator::ToMeMergeCreator()
    : mDeclared(tomeFields())
{
}

char const* ToMeMergeCreator::getPluginName() const noexcept
{
    return kName;
}

PluginFieldCollection const* ToMeMergeCreator::getFieldNames() noexcept
{
    return mDeclared.collection();
}

IPluginV3* ToMeMergeCreator::createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    try
    {
        IntFields fields = tomeFields(); // protected defaults to 0
        if (!fields.read(fc, {"r"}, kName))
        {
            return nullptr;
        }
        if (fields["r"] < 0 || fields["protected"] < 0)
        {
            log_error(std::string(kName) + ": r and protected must be >= 0");
            return nullptr;
        }
        return new ToMeMergePlugin(fields);
    }
    catch (std::exception const& e)
    {
        log_error(e.what());
        return nullptr;
    }
}

} // namespace tc
