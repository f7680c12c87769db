#include "prune_plugin.h"

#include "launch.h"

using namespace nvinfer1;

namespace tc
{

namespace
{
constexpr char kName[] = "TokenPrune";

IntFields pruneFields()
{
    return IntFields({"k", "protected", "fuse", "keep_order"});
}
} // namespace

TokenPrunePlugin::TokenPrunePlugin(IntFields fields)
    : TokenPlugin(std::move(fields))
{
}

char const* TokenPrunePlugin::getPluginName() const noexcept
{
    return kName;
}

IPluginV3* TokenPrunePlugin::clone() noexcept
{
    try
    {
        auto* copy = new TokenPrunePlugin(mFields);
        copy->mHasMask = mHasMask;
        return copy;
    }
    catch (std::exception const& e)
    {
        log_error(e.what());
        return nullptr;
    }
}

int64_t TokenPrunePlugin::tokensOut(int64_t) const
{
    return mFields["protected"] + mFields["k"] + (mFields["fuse"] != 0 ? 1 : 0);
}

std::string TokenPrunePlugin::checkFits(int64_t n) const
{
    int64_t const k = mFields["k"], p = mFields["protected"];
    if (p < 0 || p >= n)
    {
        return "protected=" + std::to_string(p) + " must be in [0, N=" + std::to_string(n) + ")";
    }
    if (k < 1 || k >= n - p)
    {
        return "k=" + std::to_string(k) + " must be in [1, N - protected = " + std::to_string(n - p)
            + ") (a block that keeps every token is not a plugin node)";
    }
    return "";
}

size_t TokenPrunePlugin::workspaceBytes(int32_t batch, int32_t n, int32_t) const
{
    return prune_workspace_bytes(batch, n);
}

cudaError_t TokenPrunePlugin::launch(int32_t element, int32_t batch, int32_t n, int32_t c, int32_t,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) const
{
    PruneLaunch a{};
    a.element_type = element;
    a.batch = batch;
    a.n = n;
    a.c = c;
    a.k = mFields["k"];
    a.protect = mFields["protected"];
    a.fuse = mFields["fuse"] != 0;
    a.keep_order = mFields["keep_order"] != 0;
    a.x = inputs[kInX];
    a.score = inputs[kInDecision];
    a.size = static_cast<float const*>(inputs[kInSize]);
    a.mask = mHasMask ? static_cast<float const*>(inputs[kInMask]) : nullptr;
    a.x_out = outputs[0];
    a.size_out = static_cast<float*>(outputs[1]);
    a.mask_out = static_cast<float*>(outputs[2]);
    a.workspace = workspace;
    return launch_prune(a, stream);
}

TokenPruneCreator::TokenPruneCreator()
    : mDeclared(pruneFields())
{
}

char const* TokenPruneCreator::getPluginName() const noexcept
{
    return kName;
}

PluginFieldCollection const* TokenPruneCreator::getFieldNames() noexcept
{
    return mDeclared.collection();
}

IPluginV3* TokenPruneCreator::createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    try
    {
        IntFields fields = pruneFields(); // protected, fuse, keep_order default to 0
        if (!fields.read(fc, {"k"}, kName))
        {
            return nullptr;
        }
        for (char const* flag : {"fuse", "keep_order"})
        {
            if (fields[flag] != 0 && fields[flag] != 1)
            {
                log_error(std::string(kName) + ": " + flag + " must be 0 or 1");
                return nullptr;
            }
        }
        if (fields["k"] < 1 || fields["protected"] < 0)
        {
            log_error(std::string(kName) + ": k must be >= 1 and protected >= 0");
            return nullptr;
        }
        return new TokenPrunePlugin(fields);
    }
    catch (std::exception const& e)
    {
        log_error(e.what());
        return nullptr;
    }
}

} // namespace tc
