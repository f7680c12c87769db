#include "token_plugin.h"

#include "element_type.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>

using namespace nvinfer1;

namespace tc
{

namespace
{
ILoggerFinder* gLoggerFinder{nullptr};
} // namespace

void set_logger_finder(ILoggerFinder* finder)
{
    gLoggerFinder = finder;
}

void log_error(std::string const& message)
{
    std::string const line = "tcexport plugin: " + message;
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, line.c_str());
    }
    else
    {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
}

int32_t element_type(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return kF32;
    case DataType::kHALF: return kF16;
#if TCEXPORT_HAS_BF16
    case DataType::kBF16: return kBF16;
#endif
    default: return -1;
    }
}

// ---------------------------------------------------------------------------------------------- IntFields

IntFields::IntFields(std::vector<std::string> names)
    : mNames(std::move(names))
    , mValues(mNames.size(), 0)
{
    link();
}

IntFields::IntFields(IntFields const& other)
    : mNames(other.mNames)
    , mValues(other.mValues)
{
    link(); // the copy's PluginFields must point at its own values
}

void IntFields::link()
{
    mFields.clear();
    for (size_t i = 0; i < mNames.size(); ++i)
    {
        mFields.emplace_back(mNames[i].c_str(), &mValues[i], PluginFieldType::kINT32, 1);
    }
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

int32_t& IntFields::operator[](std::string const& name)
{
    for (size_t i = 0; i < mNames.size(); ++i)
    {
        if (mNames[i] == name)
        {
            return mValues[i];
        }
    }
    throw std::out_of_range("no plugin field " + name);
}

int32_t IntFields::operator[](std::string const& name) const
{
    return const_cast<IntFields&>(*this)[name];
}

bool IntFields::read(PluginFieldCollection const* fc, std::vector<std::string> const& required, char const* plugin)
{
    std::vector<bool> seen(mNames.size(), false);
    for (int32_t f = 0; fc != nullptr && f < fc->nbFields; ++f)
    {
        PluginField const& field = fc->fields[f];
        size_t i = 0;
        while (i < mNames.size() && (field.name == nullptr || mNames[i] != field.name))
        {
            ++i;
        }
        if (i == mNames.size())
        {
            log_error(std::string(plugin) + ": unknown field " + (field.name ? field.name : "(null)"));
            return false;
        }
        if (field.type != PluginFieldType::kINT32 || field.length != 1 || field.data == nullptr)
        {
            log_error(std::string(plugin) + ": field " + mNames[i] + " must be one INT32 (an ONNX INT attribute)");
            return false;
        }
        std::memcpy(&mValues[i], field.data, sizeof(int32_t));
        seen[i] = true;
    }
    for (std::string const& name : required)
    {
        for (size_t i = 0; i < mNames.size(); ++i)
        {
            if (mNames[i] == name && !seen[i])
            {
                log_error(std::string(plugin) + ": missing field " + name);
                return false;
            }
        }
    }
    return true;
}

// -------------------------------------------------------------------------------------------- TokenPlugin

TokenPlugin::TokenPlugin(IntFields fields)
    : mFields(std::move(fields))
{
}

IPluginCapability* TokenPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

bool TokenPlugin::checkShapes(Dims const* dims, int32_t nbInputs) const
{
    std::string const name = getPluginName();
    if (nbInputs != 3 && nbInputs != 4)
    {
        log_error(name + ": takes 3 inputs (x, " + (decisionRank() == 3 ? "metric" : "cls_attention")
            + ", size) or 4 (and mask), got " + std::to_string(nbInputs));
        return false;
    }
    Dims const& x = dims[kInX];
    Dims const& decision = dims[kInDecision];
    Dims const& size = dims[kInSize];
    bool ok = x.nbDims == 3 && decision.nbDims == decisionRank() && size.nbDims == 3
        && (size.d[2] == 1 || size.d[2] == -1);
    for (int32_t i = 1; ok && i < nbInputs; ++i)
    {
        Dims const& d = dims[i];
        for (int32_t axis = 0; axis < 2; ++axis) // batch and token axes agree (unknown: -1)
        {
            ok = ok && (d.d[axis] == x.d[axis] || d.d[axis] == -1 || x.d[axis] == -1);
        }
    }
    if (nbInputs == 4)
    {
        ok = ok && dims[kInMask].nbDims == 2;
    }
    if (!ok)
    {
        log_error(name + ": inputs must be x [B,N,C], " + (decisionRank() == 3 ? "metric [B,N,Ck]" : "cls_attention [B,N]")
            + ", size [B,N,1] and optionally mask [B,N]");
        return false;
    }
    if (x.d[1] >= 0)
    {
        std::string const why = checkFits(x.d[1]);
        if (!why.empty())
        {
            log_error(name + ": " + why);
            return false;
        }
    }
    return true;
}

int32_t TokenPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    try
    {
        std::vector<Dims> dims;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims.push_back(in[i].desc.dims);
        }
        if (nbOutputs != kNbOutputs || !checkShapes(dims.data(), nbInputs))
        {
            return -1;
        }
        mHasMask = nbInputs == 4;
        return 0;
    }
    catch (std::exception const& e)
    {
        log_error(e.what());
        return -1;
    }
}

int32_t TokenPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != kNbOutputs || nbInputs < 3)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kInX];
    outputTypes[1] = DataType::kFLOAT;
    outputTypes[2] = DataType::kFLOAT;
    return 0;
}

int32_t TokenPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    try
    {
        bool const ranks = nbInputs >= 3 && nbInputs <= 4 && inputs[kInX].nbDims == 3
            && inputs[kInDecision].nbDims == decisionRank() && inputs[kInSize].nbDims == 3
            && (nbInputs == 3 || inputs[kInMask].nbDims == 2);
        if (nbOutputs != kNbOutputs || !ranks)
        {
            log_error(std::string(getPluginName()) + ": inputs must be x [B,N,C], "
                + (decisionRank() == 3 ? "metric [B,N,Ck]" : "cls_attention [B,N]")
                + ", size [B,N,1] and optionally mask [B,N]");
            return -1;
        }
        DimsExprs const& x = inputs[kInX];
        if (!x.d[1]->isConstant())
        {
            log_error(std::string(getPluginName()) + ": the token count N must be static (build-time constant)");
            return -1;
        }
        int64_t const n = x.d[1]->getConstantValue();
        std::string const why = checkFits(n);
        if (!why.empty())
        {
            log_error(std::string(getPluginName()) + ": " + why);
            return -1;
        }
        IDimensionExpr const* tokens = exprBuilder.constant(tokensOut(n));
        outputs[0].nbDims = 3; // x [B, M, C]
        outputs[0].d[0] = x.d[0];
        outputs[0].d[1] = tokens;
        outputs[0].d[2] = x.d[2];
        outputs[1].nbDims = 3; // size [B, M, 1]
        outputs[1].d[0] = x.d[0];
        outputs[1].d[1] = tokens;
        outputs[1].d[2] = exprBuilder.constant(1);
        outputs[2].nbDims = 2; // mask [B, M]
        outputs[2].d[0] = x.d[0];
        outputs[2].d[1] = tokens;
        return 0;
    }
    catch (std::exception const& e)
    {
        log_error(e.what());
        return -1;
    }
}

bool TokenPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (pos < 0 || pos >= nbInputs + nbOutputs || inOut[pos].desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    DataType const type = inOut[pos].desc.type;
    if (pos == kInX)
    {
        return element_type(type) >= 0;
    }
    if (pos == kInDecision || pos == nbInputs) // metric / cls_attention and the x output: x's type
    {
        return type == inOut[kInX].desc.type;
    }
    return type == DataType::kFLOAT; // size, mask, size output, mask output
}

size_t TokenPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    Dims const& most = inputs[kInX].max;
    int32_t const channels = decisionRank() == 3 ? static_cast<int32_t>(inputs[kInDecision].max.d[2]) : 1;
    return workspaceBytes(static_cast<int32_t>(most.d[0]), static_cast<int32_t>(most.d[1]), channels);
}

int32_t TokenPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    try
    {
        std::vector<Dims> dims;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims.push_back(in[i].dims);
        }
        if (nbOutputs != kNbOutputs || !checkShapes(dims.data(), nbInputs))
        {
            return -1;
        }
        mHasMask = nbInputs == 4;
        return 0;
    }
    catch (std::exception const& e)
    {
        log_error(e.what());
        return -1;
    }
}

int32_t TokenPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
    void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    // Only kernel launches on `stream`: no allocation, no synchronisation (CUDA graph capture works).
    Dims const& x = inputDesc[kInX].dims;
    Dims const& decision = inputDesc[kInDecision].dims;
    int32_t const element = element_type(inputDesc[kInX].type);
    int32_t const channels = decisionRank() == 3 ? static_cast<int32_t>(decision.d[2]) : 1;
    cudaError_t const status = launch(element, static_cast<int32_t>(x.d[0]), static_cast<int32_t>(x.d[1]),
        static_cast<int32_t>(x.d[2]), channels, inputs, outputs, workspace, stream);
    if (status != cudaSuccess)
    {
        log_error(std::string(getPluginName()) + ": kernel launch failed: " + cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

IPluginV3* TokenPlugin::attachToContext(IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* TokenPlugin::getFieldsToSerialize() noexcept
{
    return mFields.collection();
}

} // namespace tc
