// Drives the plugins through TensorRT's own interfaces, the way the builder and runtime call them, with no
// TensorRT library and no GPU (tests/test_plugins_cpp.py builds it with harness/cpu_launch.cpp):
//
//   plugin_probe api                       creators, fields, shapes, types, formats, serialization: "key value" lines
//   plugin_probe tome DIR B N C CK R P MASK    enqueue on DIR/{x,decision,size[,mask]}.bin, writes DIR/out_*.bin
//   plugin_probe prune DIR B N C K P FUSE ORDER MASK
//
// Only what TensorRT's headers define is used; the expression builder is a small fake of TensorRT's (constant
// folding for the operations the plugins use).
#include "NvInfer.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

using namespace nvinfer1;

namespace
{

class FakeDimImpl : public apiv::VDimensionExpr
{
public:
    FakeDimImpl(bool constant, int64_t value)
        : mConstant(constant)
        , mValue(value)
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : -1;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    bool mConstant;
    int64_t mValue;
};

class FakeDim : public IDimensionExpr
{
public:
    FakeDim(bool constant, int64_t value)
        : mFake(constant, value)
    {
        mImpl = &mFake;
    }

private:
    FakeDimImpl mFake;
};

class FakeBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* make(bool constant, int64_t value)
    {
        mDims.push_back(std::make_unique<FakeDim>(constant, value));
        return mDims.back().get();
    }
    IDimensionExpr const* constant(int64_t value) override
    {
        return make(true, value);
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        if (!a.isConstant() || !b.isConstant())
        {
            return make(false, 0);
        }
        int64_t x = a.getConstantValue(), y = b.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return make(true, x + y);
        case DimensionOperation::kSUB: return make(true, x - y);
        case DimensionOperation::kPROD: return make(true, x * y);
        default: return make(false, 0);
        }
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }

private:
    std::vector<std::unique_ptr<FakeDim>> mDims;
};

class FakeBuilder : public IExprBuilder
{
public:
    FakeBuilder()
    {
        mImpl = &mFake;
    }
    FakeBuilderImpl& fake()
    {
        return mFake;
    }

private:
    FakeBuilderImpl mFake;
};

IPluginCreatorV3One* creator(char const* name)
{
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    for (int32_t i = 0; i < count; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), name) == 0)
        {
            return c;
        }
    }
    return nullptr;
}

struct Fields
{
    std::vector<std::string> names;
    std::vector<int32_t> values;
    std::vector<int64_t> wide;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};

    // "r=3,protected=1"; a name ending in ":i64" is passed as INT64 (which the plugins must refuse).
    explicit Fields(std::string const& spec)
    {
        size_t start = 0;
        while (start < spec.size())
        {
            size_t comma = spec.find(',', start);
            std::string item = spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
            size_t eq = item.find('=');
            names.push_back(item.substr(0, eq));
            values.push_back(std::atoi(item.substr(eq + 1).c_str()));
            wide.push_back(values.back());
            start = comma == std::string::npos ? spec.size() : comma + 1;
        }
        for (size_t i = 0; i < names.size(); ++i)
        {
            bool is_wide = names[i].size() > 4 && names[i].substr(names[i].size() - 4) == ":i64";
            if (is_wide)
            {
                names[i] = names[i].substr(0, names[i].size() - 4);
            }
        }
        for (size_t i = 0; i < names.size(); ++i)
        {
            bool is_wide = spec.find(names[i] + ":i64") != std::string::npos;
            fields.emplace_back(names[i].c_str(), is_wide ? static_cast<void const*>(&wide[i]) : &values[i],
                is_wide ? PluginFieldType::kINT64 : PluginFieldType::kINT32, 1);
        }
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
    }
};

IPluginV3* create(char const* name, std::string const& spec, TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    Fields f(spec);
    return creator(name)->createPlugin("probe", &f.fc, phase);
}

template <typename T>
T* capability(IPluginV3* plugin, PluginCapabilityType type)
{
    return static_cast<T*>(plugin->getCapabilityInterface(type));
}

IPluginV3OneBuild* build(IPluginV3* plugin)
{
    return capability<IPluginV3OneBuild>(plugin, PluginCapabilityType::kBUILD);
}

IPluginV3OneRuntime* runtime(IPluginV3* plugin)
{
    return capability<IPluginV3OneRuntime>(plugin, PluginCapabilityType::kRUNTIME);
}

// "plugin" or "null": whether the creator accepts the fields.
char const* accepted(char const* name, std::string const& spec)
{
    std::unique_ptr<IPluginV3> plugin(create(name, spec));
    return plugin ? "plugin" : "null";
}

DimsExprs exprs(FakeBuilder& b, std::vector<int64_t> const& dims)
{
    DimsExprs e{};
    e.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        e.d[i] = dims[i] < 0 ? b.fake().make(false, 0) : b.constant(dims[i]);
    }
    return e;
}

// "status dims;dims;dims" of getOutputShapes for x [B?, n, c] and the given decision dims.
std::string output_shapes(IPluginV3* plugin, int64_t n, int64_t c, std::vector<int64_t> const& decision, bool mask)
{
    FakeBuilder b;
    std::vector<DimsExprs> in{exprs(b, {-1, n, c}), exprs(b, decision), exprs(b, {-1, n, 1})};
    if (mask)
    {
        in.push_back(exprs(b, {-1, n}));
    }
    DimsExprs out[3]{};
    int32_t status = build(plugin)->getOutputShapes(in.data(), static_cast<int32_t>(in.size()), nullptr, 0, out, 3, b);
    std::string text = std::to_string(status);
    if (status != 0)
    {
        return text;
    }
    for (auto const& o : out)
    {
        text += " ";
        for (int32_t i = 0; i < o.nbDims; ++i)
        {
            text += (i ? "x" : "") + (o.d[i]->isConstant() ? std::to_string(o.d[i]->getConstantValue()) : "B");
        }
    }
    return text;
}

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> const& dims, TensorFormat format = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = format;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    d.min.nbDims = d.max.nbDims = d.opt.nbDims = d.desc.dims.nbDims;
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
        d.min.d[i] = dims[i] < 0 ? 1 : dims[i];
        d.opt.d[i] = dims[i] < 0 ? 4 : dims[i];
        d.max.d[i] = dims[i] < 0 ? 8 : dims[i];
    }
    return d;
}

// Which positions supportsFormatCombination accepts for one combination of types (x, decision, size, mask,
// out x, out size, out mask), as a 0/1 string.
std::string formats(IPluginV3* plugin, std::vector<DataType> const& types, TensorFormat format = TensorFormat::kLINEAR)
{
    std::vector<DynamicPluginTensorDesc> io;
    for (DataType t : types)
    {
        io.push_back(desc(t, {-1, 13, 6}, format));
    }
    std::string bits;
    for (int32_t pos = 0; pos < static_cast<int32_t>(io.size()); ++pos)
    {
        bits += build(plugin)->supportsFormatCombination(pos, io.data(), static_cast<int32_t>(io.size()) - 3, 3)
            ? "1"
            : "0";
    }
    return bits;
}

std::string fields_of(IPluginV3* plugin)
{
    PluginFieldCollection const* fc = runtime(plugin)->getFieldsToSerialize();
    std::string text;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        text += std::string(i ? "," : "") + f.name + "=" + std::to_string(*static_cast<int32_t const*>(f.data))
            + (f.type == PluginFieldType::kINT32 && f.length == 1 ? "" : "?");
    }
    return text;
}

int api()
{
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    std::printf("creators %d\n", count);
    for (int32_t i = 0; i < count; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::printf("creator %s %s %s %s", c->getPluginName(), c->getPluginNamespace(), c->getPluginVersion(),
            creators[i]->getInterfaceInfo().kind);
        PluginFieldCollection const* fc = c->getFieldNames();
        for (int32_t f = 0; f < fc->nbFields; ++f)
        {
            std::printf(" %s:%s", fc->fields[f].name, fc->fields[f].type == PluginFieldType::kINT32 ? "i32" : "other");
        }
        std::printf("\n");
    }
    std::unique_ptr<IPluginV3> tome(create("ToMeMerge", "r=3,protected=1"));
    std::unique_ptr<IPluginV3> prune(create("TokenPrune", "k=4,protected=1,fuse=1,keep_order=1"));
    auto* tome_core = capability<IPluginV3OneCore>(tome.get(), PluginCapabilityType::kCORE);
    std::printf("tome.kinds %s %s %s\n", tome_core->getInterfaceInfo().kind, build(tome.get())->getInterfaceInfo().kind,
        runtime(tome.get())->getInterfaceInfo().kind);
    auto* core = capability<IPluginV3OneCore>(prune.get(), PluginCapabilityType::kCORE);
    std::printf("prune.core %s %s %s\n", core->getPluginName(), core->getPluginNamespace(), core->getPluginVersion());
    std::printf("tome.outputs %d\n", build(tome.get())->getNbOutputs());

    std::printf("tome.shapes %s\n", output_shapes(tome.get(), 13, 6, {-1, 13, 4}, true).c_str());
    std::printf("tome.shapes_nomask %s\n", output_shapes(tome.get(), 13, 6, {-1, 13, 4}, false).c_str());
    std::printf("prune.shapes %s\n", output_shapes(prune.get(), 11, 5, {-1, 11}, true).c_str());
    std::unique_ptr<IPluginV3> cap_r(create("ToMeMerge", "r=6,protected=1"));
    std::unique_ptr<IPluginV3> over_r(create("ToMeMerge", "r=7,protected=1"));
    std::printf("tome.shapes_cap %s\n", output_shapes(cap_r.get(), 13, 6, {-1, 13, 4}, false).c_str());
    std::printf("tome.shapes_over %s\n", output_shapes(over_r.get(), 13, 6, {-1, 13, 4}, false).c_str());
    std::printf("tome.shapes_dynamic_n %s\n", output_shapes(tome.get(), -1, 6, {-1, -1, 4}, false).c_str());
    std::printf("tome.shapes_bad_rank %s\n", output_shapes(tome.get(), 13, 6, {-1, 13}, false).c_str());
    std::unique_ptr<IPluginV3> keep_all(create("TokenPrune", "k=10,protected=1"));
    std::printf("prune.shapes_keep_all %s\n", output_shapes(keep_all.get(), 11, 5, {-1, 11}, false).c_str());

    DataType types[3];
    DataType in_types[4] = {DataType::kHALF, DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT};
    int32_t status = build(tome.get())->getOutputDataTypes(types, 3, in_types, 4);
    std::printf("tome.types %d %d %d %d\n", status, static_cast<int>(types[0]), static_cast<int>(types[1]),
        static_cast<int>(types[2]));

    using D = DataType;
    D const f = D::kFLOAT, h = D::kHALF, b = D::kBF16, i = D::kINT32;
    // (x, decision, size, mask, out x, out size, out mask); TokenPrune without mask: 3 inputs.
    std::printf("formats.f32 %s\n", formats(tome.get(), {f, f, f, f, f, f, f}).c_str());
    std::printf("formats.f16 %s\n", formats(tome.get(), {h, h, f, f, h, f, f}).c_str());
    std::printf("formats.bf16 %s\n", formats(tome.get(), {b, b, f, f, b, f, f}).c_str());
    std::printf("formats.mixed %s\n", formats(tome.get(), {h, f, h, f, f, h, f}).c_str());
    std::printf("formats.int %s\n", formats(prune.get(), {i, i, f, i, f, f}).c_str());
    std::printf("formats.chw4 %s\n", formats(prune.get(), {f, f, f, f, f, f}, TensorFormat::kCHW4).c_str());

    std::printf("fields.tome %s\n", fields_of(tome.get()).c_str());
    std::printf("fields.prune %s\n", fields_of(prune.get()).c_str());
    std::unique_ptr<IPluginV3> copy(prune->clone());
    prune.reset(); // the copy must not point into the original
    std::printf("fields.prune_clone %s\n", fields_of(copy.get()).c_str());
    std::printf("fields.prune_clone_shapes %s\n", output_shapes(copy.get(), 11, 5, {-1, 11}, false).c_str());
    // Deserialization: the runtime phase recreates the plugin from the serialized fields.
    PluginFieldCollection const* saved = runtime(tome.get())->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> restored(creator("ToMeMerge")->createPlugin("probe", saved, TensorRTPhase::kRUNTIME));
    std::printf("fields.tome_restored %s\n", restored ? fields_of(restored.get()).c_str() : "null");

    std::unique_ptr<IPluginV3> defaults(create("ToMeMerge", "r=2"));
    std::printf("create.tome_default_protected %s\n", fields_of(defaults.get()).c_str());
    std::printf("create.tome_missing_r %s\n", accepted("ToMeMerge", "protected=1"));
    std::printf("create.tome_int64_r %s\n", accepted("ToMeMerge", "r:i64=2,protected=1"));
    std::printf("create.tome_unknown %s\n", accepted("ToMeMerge", "r=2,keep=1"));
    std::printf("create.prune_missing_k %s\n", accepted("TokenPrune", "protected=1"));
    std::printf("create.prune_fuse_2 %s\n", accepted("TokenPrune", "k=3,fuse=2"));

    auto workspace = [&](IPluginV3* plugin, int64_t batch) {
        std::vector<DynamicPluginTensorDesc> in{desc(D::kFLOAT, {-1, 13, 6}), desc(D::kFLOAT, {-1, 13, 4}),
            desc(D::kFLOAT, {-1, 13, 1})};
        in[0].max.d[0] = batch;
        return build(plugin)->getWorkspaceSize(in.data(), 3, nullptr, 3);
    };
    std::printf("workspace.tome %zu %zu\n", workspace(tome.get(), 1), workspace(tome.get(), 8));
    std::vector<DynamicPluginTensorDesc> in{desc(D::kFLOAT, {-1, 13, 6}), desc(D::kFLOAT, {-1, 13, 4}),
        desc(D::kFLOAT, {-1, 13, 1}), desc(D::kFLOAT, {-1, 13})};
    std::printf("configure.tome %d %d\n", build(tome.get())->configurePlugin(in.data(), 4, nullptr, 3),
        build(over_r.get())->configurePlugin(in.data(), 4, nullptr, 3));
    return 0;
}

std::vector<float> load(std::string const& path, size_t count)
{
    std::vector<float> data(count);
    std::ifstream file(path, std::ios::binary);
    file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(float)));
    if (!file)
    {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(3);
    }
    return data;
}

void save(std::string const& path, std::vector<float> const& data)
{
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<char const*>(data.data()),
        static_cast<std::streamsize>(data.size() * sizeof(float)));
}

PluginTensorDesc runtime_desc(std::vector<int64_t> const& dims)
{
    PluginTensorDesc d{};
    d.type = DataType::kFLOAT;
    d.format = TensorFormat::kLINEAR;
    d.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.dims.d[i] = dims[i];
    }
    return d;
}

// Runtime path of an engine: create (runtime phase), attach, onShapeChange, enqueue; fp32 host buffers.
int run(IPluginV3* plugin, std::string const& dir, int64_t b, int64_t n, int64_t c, std::vector<int64_t> decision,
    int64_t n_out, bool mask)
{
    std::unique_ptr<IPluginV3> attached(runtime(plugin)->attachToContext(nullptr));
    auto* context = runtime(attached.get());
    size_t decision_count = 1;
    for (int64_t d : decision)
    {
        decision_count *= static_cast<size_t>(d);
    }
    std::vector<float> x = load(dir + "/x.bin", b * n * c), dec = load(dir + "/decision.bin", decision_count),
                       size = load(dir + "/size.bin", b * n), m = mask ? load(dir + "/mask.bin", b * n) : std::vector<float>{};
    std::vector<PluginTensorDesc> in{runtime_desc({b, n, c}), runtime_desc(decision), runtime_desc({b, n, 1})};
    if (mask)
    {
        in.push_back(runtime_desc({b, n}));
    }
    PluginTensorDesc out[3] = {runtime_desc({b, n_out, c}), runtime_desc({b, n_out, 1}), runtime_desc({b, n_out})};
    if (context->onShapeChange(in.data(), static_cast<int32_t>(in.size()), out, 3) != 0)
    {
        std::printf("onShapeChange failed\n");
        return 1;
    }
    std::vector<float> x_out(b * n_out * c, -7.0f), size_out(b * n_out, -7.0f), mask_out(b * n_out, -7.0f);
    void const* inputs[4] = {x.data(), dec.data(), size.data(), mask ? m.data() : nullptr};
    void* outputs[3] = {x_out.data(), size_out.data(), mask_out.data()};
    // The workspace TensorRT would hand over: getWorkspaceSize for this batch, filled with garbage.
    std::vector<DynamicPluginTensorDesc> dyn(in.size());
    for (size_t i = 0; i < in.size(); ++i)
    {
        dyn[i].desc = in[i];
        dyn[i].min = dyn[i].max = dyn[i].opt = in[i].dims;
    }
    size_t bytes = build(attached.get())->getWorkspaceSize(dyn.data(), static_cast<int32_t>(dyn.size()), nullptr, 3);
    std::vector<unsigned char> workspace(bytes, 0x7f);
    int32_t status = context->enqueue(in.data(), out, inputs, outputs, workspace.data(), nullptr);
    std::printf("enqueue %d workspace %zu\n", status, bytes);
    save(dir + "/out_x.bin", x_out);
    save(dir + "/out_size.bin", size_out);
    save(dir + "/out_mask.bin", mask_out);
    return status == 0 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv)
{
    std::string const mode = argc > 1 ? argv[1] : "";
    auto arg = [&](int i) { return static_cast<int64_t>(std::atoll(argv[i])); };
    if (mode == "api")
    {
        return api();
    }
    if (mode == "tome" && argc == 10)
    {
        int64_t b = arg(3), n = arg(4), c = arg(5), ck = arg(6), r = arg(7), p = arg(8);
        std::unique_ptr<IPluginV3> plugin(create("ToMeMerge",
            "r=" + std::to_string(r) + ",protected=" + std::to_string(p), TensorRTPhase::kRUNTIME));
        return run(plugin.get(), argv[2], b, n, c, {b, n, ck}, n - r, arg(9) != 0);
    }
    if (mode == "prune" && argc == 11)
    {
        int64_t b = arg(3), n = arg(4), c = arg(5), k = arg(6), p = arg(7), fuse = arg(8), order = arg(9);
        std::unique_ptr<IPluginV3> plugin(create("TokenPrune",
            "k=" + std::to_string(k) + ",protected=" + std::to_string(p) + ",fuse=" + std::to_string(fuse)
                + ",keep_order=" + std::to_string(order),
            TensorRTPhase::kRUNTIME));
        return run(plugin.get(), argv[2], b, n, c, {b, n}, p + k + fuse, arg(10) != 0);
    }
    std::fprintf(stderr, "usage: plugin_probe api | tome DIR B N C CK R P MASK | prune DIR B N C K P FUSE ORDER MASK\n");
    return 2;
}
