// tcexport's token ops as ONNX Runtime custom ops (CPU): the --impl plugin nodes ToMeMerge, TokenPrune and
// TokenPruneMerge (domain "tcexport", the attributes graph/functions.py writes), computed by the same per-row
// code the TensorRT plugins run (plugins/cpp/kernels/*_rows.h).
//
// Built against ONNX Runtime's C API headers only (no C++ wrapper, no ONNX Runtime library to link: every call
// goes through the OrtApi table the runtime hands to RegisterCustomOps). The library asks for API version
// kApiVersion, so it runs on any runtime from that version on. Load it with
// SessionOptions.register_custom_ops_library(path); tcexport/plugins/ort_library.py finds and registers it.
//
// Threads: the decide phases run as the CUDA kernels run them (thread index t of nt, phase after phase), with
// the (row, t) pairs spread over the session's intra-op thread pool (KernelContext_ParallelFor); a barrier
// between phases is the end of one ParallelFor. With many rows each row runs all its phases alone. The gather
// writes whole output rows (contiguous channels, vectorisable). Results do not depend on the thread count.
//
// Types: x and the decision tensor (metric / cls_attention) float32 or float16 (one registered op per type);
// size and mask float32. Scores, norms, weights and sizes are float32 inside, as in the TensorRT plugins.
#include "onnxruntime_c_api.h"

#include "prune_merge_rows.h"
#include "prune_rows.h"
#include "tome_rows.h"

#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// One build runs everywhere: the hot loops get AVX-512 and AVX2 clones picked at load time, the baseline otherwise.
#define TC_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TC_HOT
#endif

#define TC_EXPORT extern "C" __attribute__((visibility("default")))

namespace
{

constexpr uint32_t kApiVersion = 17; // ONNX Runtime 1.17: KernelContext_ParallelFor, shape inference
constexpr const char* kDomain = "tcexport";

OrtApi const* g_api = nullptr;

enum class Kind
{
    kToMe,
    kPrune,
    kPruneMerge,
};

// ---------------------------------------------------------------- errors

struct Failure
{
    std::string message;
};

void check(OrtStatus* status)
{
    if (status != nullptr)
    {
        std::string message = g_api->GetErrorMessage(status);
        g_api->ReleaseStatus(status);
        throw Failure{message};
    }
}

// ---------------------------------------------------------------- tensors

struct Tensor
{
    OrtValue const* value = nullptr;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> dims;
    void const* data = nullptr;
};

Tensor input(OrtKernelContext* context, size_t index, size_t count)
{
    Tensor t;
    if (index >= count)
    {
        return t;
    }
    check(g_api->KernelContext_GetInput(context, index, &t.value));
    if (t.value == nullptr)
    {
        return t;
    }
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(g_api->GetTensorTypeAndShape(t.value, &info));
    size_t rank = 0;
    OrtStatus* status = g_api->GetTensorElementType(info, &t.type);
    if (status == nullptr)
    {
        status = g_api->GetDimensionsCount(info, &rank);
    }
    if (status == nullptr)
    {
        t.dims.resize(rank);
        status = g_api->GetDimensions(info, t.dims.data(), rank);
    }
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    check(status);
    check(g_api->GetTensorData(t.value, &t.data));
    return t;
}

void* output(OrtKernelContext* context, size_t index, std::vector<int64_t> const& dims)
{
    OrtValue* value = nullptr;
    check(g_api->KernelContext_GetOutput(context, index, dims.data(), dims.size(), &value));
    void* data = nullptr;
    check(g_api->GetTensorMutableData(value, &data));
    return data;
}

std::string shape_text(std::vector<int64_t> const& dims)
{
    std::string text = "[";
    for (size_t i = 0; i < dims.size(); ++i)
    {
        text += (i ? ", " : "") + std::to_string(dims[i]);
    }
    return text + "]";
}

void expect_shape(char const* op, char const* name, Tensor const& t, std::vector<int64_t> const& want)
{
    if (t.dims != want)
    {
        throw Failure{std::string(op) + ": input " + name + " has shape " + shape_text(t.dims) + ", expected "
            + shape_text(want)};
    }
}

void expect_type(char const* op, char const* name, Tensor const& t, ONNXTensorElementDataType want)
{
    if (t.type != want)
    {
        throw Failure{std::string(op) + ": input " + name + " has element type " + std::to_string(t.type)
            + ", expected " + std::to_string(want)};
    }
}

// ---------------------------------------------------------------- parallel loops

template <typename F>
void trampoline(void* data, size_t index)
{
    (*static_cast<F*>(data))(index);
}

// fn(i) for i in [0, total) on the session's intra-op threads; returns when every call has.
template <typename F>
void parallel(OrtKernelContext const* context, size_t total, F fn)
{
    if (total == 1)
    {
        fn(0);
        return;
    }
    check(g_api->KernelContext_ParallelFor(context, &trampoline<F>, total, 0, &fn));
}

// Thread indices per row for the decide phases: enough (row, t) pairs for a few threads, one per row when the
// batch alone fills them (then each row runs all its phases in one task).
constexpr int kLanes = 4;

int lanes_per_row(int batch)
{
    return batch >= kLanes ? 1 : (kLanes + batch - 1) / batch;
}

// Output rows per gather task: large enough that a task is worth a thread hand-off.
long long rows_per_task(long long channels)
{
    long long rows = 8192 / (channels > 0 ? channels : 1);
    return rows > 1 ? rows : 1;
}

// ---------------------------------------------------------------- host fast paths

// x_out[0:c] = x[0:c]
template <typename TX>
void copy_row(TX* out, TX const* in, int c)
{
    std::memcpy(out, in, sizeof(TX) * (size_t) c);
}

// The size-weighted sum over an output token's inputs, channel by channel in the order tome_gather_element sums
// (first token, then the members), so every element rounds as there; float32 accumulators, one rounding at the
// output.
template <typename TX>
TC_HOT void weighted_row(TX* out, TX const* x, int c, int first, float w_first, int const* members, int count,
    float const* weights_by_token, float total, float* acc)
{
    TX const* row = x + (long long) first * c;
    if (count == 0 && w_first == 1.0f && total == 1.0f) // (x * 1) / 1 == x exactly: a copy
    {
        copy_row(out, row, c);
        return;
    }
    for (int q = 0; q < c; ++q)
    {
        acc[q] = w_first * tc::to_float(row[q]);
    }
    for (int k = 0; k < count; ++k)
    {
        int token = members[k];
        float w = weights_by_token[token];
        TX const* src = x + (long long) token * c;
        for (int q = 0; q < c; ++q)
        {
            acc[q] += w * tc::to_float(src[q]);
        }
    }
    for (int q = 0; q < c; ++q)
    {
        out[q] = tc::from_float<TX>(acc[q] / total);
    }
}

// ToMe's decide phases on the host: tome_rows.h's, with the match (step 6) laid out for vector units. After the
// norms, the B tokens' unit rows are transposed to [ck, n_b]; the scores of one A token against every B token are
// then sums over k of contiguous rows (vectorised over j), each summed over k in order as tome_score sums it, so
// the scores are tome_score's bit for bit (no contraction into FMA: -ffp-contract=off).
constexpr int kToMePhases = tc::kToMeDecidePhases + 1; // norms, transpose, match, rank, destinations, groups

template <typename TX, typename TM>
void tome_phase_transpose(tc::ToMeShape const& sh, tc::ToMeRow<TX, TM> const& row, int t, int nt, float* unit_bt)
{
    int n_b = sh.n_b();
    for (int j = t; j < n_b; j += nt)
    {
        float const* unit = row.s.unit + (long long) (2 * j + 1) * sh.ck;
        for (int k = 0; k < sh.ck; ++k)
        {
            unit_bt[(long long) k * n_b + j] = unit[k];
        }
    }
}

TC_HOT void tome_scores(float const* ua, float const* unit_bt, int ck, int n_b, float* scores)
{
    for (int j = 0; j < n_b; ++j)
    {
        scores[j] = 0.0f;
    }
    for (int k = 0; k < ck; ++k)
    {
        float a = ua[k];
        float const* column = unit_bt + (long long) k * n_b;
        for (int j = 0; j < n_b; ++j)
        {
            scores[j] += a * column[j];
        }
    }
}

template <typename TX, typename TM>
void tome_phase_match_fast(tc::ToMeShape const& sh, tc::ToMeRow<TX, TM> const& row, int t, int nt,
    float const* unit_bt)
{
    int n_b = sh.n_b();
    std::vector<float> scores((size_t) n_b);
    for (int i = t; i < sh.n_a(); i += nt)
    {
        int ta = 2 * i;
        if (ta < sh.protect) // a protected A token scores PROTECTED_SCORE against every B token
        {
            row.s.node_max[i] = tc::kToMeProtectedScore;
            row.s.node_idx[i] = 0;
            continue;
        }
        tome_scores(row.s.unit + (long long) ta * sh.ck, unit_bt, sh.ck, n_b, scores.data());
        bool pad_a = tc::tome_is_padding(row, ta);
        float best = 0.0f;
        int best_j = 0;
        for (int j = 0; j < n_b; ++j)
        {
            int tb = 2 * j + 1;
            float score = scores[j];
            if (ta < sh.protect || tb < sh.protect)
            {
                score = tc::kToMeProtectedScore;
            }
            else if (row.mask != nullptr)
            {
                bool pad_b = tc::tome_is_padding(row, tb);
                if (pad_a && pad_b)
                {
                    score = score + tc::kToMePadBonus;
                }
                else if (pad_a != pad_b)
                {
                    score = score - tc::kToMePadBonus;
                }
            }
            if (j == 0 || score > best)
            {
                best = score;
                best_j = j;
            }
        }
        row.s.node_max[i] = best;
        row.s.node_idx[i] = best_j;
    }
}

// tome_phase_groups by a counting sort on one thread: the same member / start arrays (merged A tokens ordered by
// destination, then A index) in O(n) instead of O(n^2) comparisons.
template <typename TX, typename TM>
void tome_phase_groups_serial(tc::ToMeShape const& sh, tc::ToMeRow<TX, TM> const& row)
{
    tc::ToMeScratch const& s = row.s;
    int n_out = sh.n_out();
    for (int o = 0; o <= n_out; ++o)
    {
        s.start[o] = 0;
    }
    for (int i = 0; i < sh.n_a(); ++i)
    {
        if (tc::tome_merged(sh, s, i))
        {
            ++s.start[s.dest[2 * i] + 1];
        }
    }
    for (int o = 0; o < n_out; ++o)
    {
        s.start[o + 1] += s.start[o];
    }
    std::vector<int> filled((size_t) n_out, 0);
    for (int i = 0; i < sh.n_a(); ++i)
    {
        if (tc::tome_merged(sh, s, i))
        {
            int d = s.dest[2 * i];
            s.member[s.start[d] + filled[(size_t) d]++] = 2 * i;
        }
    }
}

template <typename TX, typename TM>
void tome_phase(int phase, tc::ToMeShape const& sh, tc::ToMeRow<TX, TM> const& row, int t, int nt, float* unit_bt)
{
    switch (phase)
    {
    case 0: tc::tome_phase_norms(sh, row, t, nt); break;
    case 1: tome_phase_transpose(sh, row, t, nt, unit_bt); break;
    case 2: tome_phase_match_fast(sh, row, t, nt, unit_bt); break;
    case 5:
        if (t == 0)
        {
            tome_phase_groups_serial(sh, row);
        }
        break;
    default: tc::tome_decide_phase(phase - 1, sh, row, t, nt); break; // rank, destinations
    }
}

// Output row o of one batch row (tome_gather_element for every channel of o).
template <typename TX, typename TM>
void tome_gather_row(tc::ToMeShape const& sh, tc::ToMeRow<TX, TM> const& row, int o, float* acc)
{
    tc::ToMeScratch const& s = row.s;
    int c = sh.c, first = s.primary[o];
    if (sh.r == 0 || o < sh.protect)
    {
        copy_row(row.x_out + (long long) o * c, row.x + (long long) first * c, c);
        row.size_out[o] = row.size[first];
        if (row.mask_out != nullptr)
        {
            row.mask_out[o] = row.mask != nullptr ? row.mask[first] : 1.0f;
        }
        return;
    }
    float total = row.size[first];
    float any = row.mask != nullptr ? row.mask[first] : 1.0f;
    for (int k = s.start[o]; k < s.start[o + 1]; ++k)
    {
        int token = s.member[k];
        total += row.size[token];
        if (row.mask != nullptr && row.mask[token] > any)
        {
            any = row.mask[token];
        }
    }
    weighted_row(row.x_out + (long long) o * c, row.x, c, first, row.size[first], s.member + s.start[o],
        s.start[o + 1] - s.start[o], row.size, total, acc);
    row.size_out[o] = total;
    if (row.mask_out != nullptr)
    {
        row.mask_out[o] = any;
    }
}

// Generic gather of one output row through the rows' own per-element function.
template <typename Row, typename Shape, typename Gather>
void gather_row_elements(Shape const& sh, Row const& row, int o, Gather gather)
{
    long long begin = (long long) o * sh.c;
    for (long long e = begin; e < begin + sh.c; ++e)
    {
        gather(sh, row, e);
    }
}

// ---------------------------------------------------------------- the kernels

struct Kernel
{
    Kind kind;
    int64_t r = 0, k = 0, protect = 0, fuse = 0, keep_order = 0, dominant = 0, contextual = 0;
};

char const* op_name(Kind kind)
{
    switch (kind)
    {
    case Kind::kToMe: return "ToMeMerge";
    case Kind::kPrune: return "TokenPrune";
    default: return "TokenPruneMerge";
    }
}

// Input positions of each op: x, the decision tensors, size, mask (optional).
size_t mask_index(Kind kind)
{
    return kind == Kind::kPruneMerge ? 4 : 3;
}

template <typename Row, typename Phase, typename GatherRow>
void run_rows(OrtKernelContext* context, int batch, int phases, int n_out, int c, Row (*row_at)(int, void*),
    void* row_data, Phase phase, GatherRow gather_row)
{
    int lanes = lanes_per_row(batch);
    if (lanes == 1)
    {
        parallel(context, (size_t) batch, [&](size_t b) {
            Row row = row_at((int) b, row_data);
            for (int p = 0; p < phases; ++p)
            {
                phase(p, (int) b, row, 0, 1);
            }
            std::vector<float> acc((size_t) c);
            for (int o = 0; o < n_out; ++o)
            {
                gather_row(row, o, acc.data());
            }
        });
        return;
    }
    for (int p = 0; p < phases; ++p)
    {
        parallel(context, (size_t) batch * lanes, [&](size_t task) {
            Row row = row_at((int) (task / lanes), row_data);
            phase(p, (int) (task / lanes), row, (int) (task % lanes), lanes);
        });
    }
    long long per_task = rows_per_task(c);
    long long tasks_per_row = (n_out + per_task - 1) / per_task;
    parallel(context, (size_t) (batch * tasks_per_row), [&](size_t task) {
        int b = (int) (task / tasks_per_row);
        long long begin = (long long) (task % tasks_per_row) * per_task;
        long long end = begin + per_task < n_out ? begin + per_task : n_out;
        Row row = row_at(b, row_data);
        std::vector<float> acc((size_t) c);
        for (long long o = begin; o < end; ++o)
        {
            gather_row(row, (int) o, acc.data());
        }
    });
}

template <typename T>
struct ToMeArgs
{
    tc::ToMeShape sh;
    T const *x, *metric;
    float const *size, *mask;
    T* x_out;
    float *size_out, *mask_out;
    int* scratch;
    float* unit_bt = nullptr; // per row [ck, n_b]: the B tokens' unit rows, transposed (tome_phase_transpose)
};

template <typename T>
tc::ToMeRow<T, T> tome_row(int b, void* data)
{
    auto* a = static_cast<ToMeArgs<T>*>(data);
    return tc::tome_row_at(a->sh, b, a->x, a->metric, a->size, a->mask, a->x_out, a->size_out, a->mask_out,
        a->scratch);
}

template <typename T>
struct PruneArgs
{
    tc::PruneShape sh;
    T const *x, *score;
    float const *size, *mask;
    T* x_out;
    float *size_out, *mask_out;
    int* scratch;
};

template <typename T>
tc::PruneRow<T, T> prune_row(int b, void* data)
{
    auto* a = static_cast<PruneArgs<T>*>(data);
    return tc::prune_row_at(a->sh, b, a->x, a->score, a->size, a->mask, a->x_out, a->size_out, a->mask_out,
        a->scratch);
}

template <typename T>
struct PruneMergeArgs
{
    tc::PruneMergeShape sh;
    T const *x, *metric, *score;
    float const *size, *mask;
    T* x_out;
    float *size_out, *mask_out;
    int* scratch;
};

template <typename T>
tc::PruneMergeRow<T, T, T> prune_merge_row(int b, void* data)
{
    auto* a = static_cast<PruneMergeArgs<T>*>(data);
    return tc::prune_merge_row_at(a->sh, b, a->x, a->metric, a->score, a->size, a->mask, a->x_out, a->size_out,
        a->mask_out, a->scratch);
}

void compute(Kernel const& kernel, OrtKernelContext* context, ONNXTensorElementDataType type);

template <typename T>
void compute_typed(Kernel const& kernel, OrtKernelContext* context, ONNXTensorElementDataType type)
{
    char const* op = op_name(kernel.kind);
    size_t n_inputs = 0, n_outputs = 0;
    check(g_api->KernelContext_GetInputCount(context, &n_inputs));
    check(g_api->KernelContext_GetOutputCount(context, &n_outputs));
    Tensor x = input(context, 0, n_inputs);
    if (x.dims.size() != 3)
    {
        throw Failure{std::string(op) + ": x must be [batch, tokens, channels], got " + shape_text(x.dims)};
    }
    int64_t batch = x.dims[0], n = x.dims[1], c = x.dims[2];
    bool with_metric = kernel.kind != Kind::kPrune, with_score = kernel.kind != Kind::kToMe;
    size_t next = 1;
    Tensor metric, score;
    int64_t ck = 0;
    if (with_metric)
    {
        metric = input(context, next++, n_inputs);
        if (metric.dims.size() != 3)
        {
            throw Failure{std::string(op) + ": metric must be [batch, tokens, channels], got "
                + shape_text(metric.dims)};
        }
        ck = metric.dims[2];
        expect_shape(op, "metric", metric, {batch, n, ck});
        expect_type(op, "metric", metric, type);
    }
    if (with_score)
    {
        score = input(context, next++, n_inputs);
        expect_shape(op, "cls_attention", score, {batch, n});
        expect_type(op, "cls_attention", score, type);
    }
    Tensor size = input(context, next, n_inputs);
    expect_shape(op, "size", size, {batch, n, 1});
    expect_type(op, "size", size, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    Tensor mask = input(context, mask_index(kernel.kind), n_inputs);
    if (mask.value != nullptr)
    {
        expect_shape(op, "mask", mask, {batch, n});
        expect_type(op, "mask", mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    }
    if (n > INT_MAX / 2 || c > INT_MAX || ck > INT_MAX || batch > INT_MAX)
    {
        throw Failure{std::string(op) + ": tensors too large"};
    }
    int64_t p = kernel.protect;
    int64_t n_out = 0;
    switch (kernel.kind)
    {
    case Kind::kToMe:
        if (p < 0 || p > n || kernel.r < 0 || kernel.r > (n - p) / 2)
        {
            throw Failure{std::string(op) + ": r=" + std::to_string(kernel.r) + " protected=" + std::to_string(p)
                + " do not fit " + std::to_string(n) + " tokens (0 <= r <= (N - protected) // 2)"};
        }
        n_out = n - kernel.r;
        break;
    case Kind::kPrune:
        if (p < 0 || kernel.k < 1 || kernel.k >= n - p)
        {
            throw Failure{std::string(op) + ": k=" + std::to_string(kernel.k) + " protected=" + std::to_string(p)
                + " do not fit " + std::to_string(n) + " tokens (1 <= k < N - protected)"};
        }
        n_out = p + kernel.k + (kernel.fuse ? 1 : 0);
        break;
    default:
    {
        if (p < 0 || p > n || kernel.dominant < 1 || kernel.contextual < 1)
        {
            throw Failure{std::string(op) + ": dominant=" + std::to_string(kernel.dominant) + " contextual="
                + std::to_string(kernel.contextual) + " protected=" + std::to_string(p) + " do not fit "
                + std::to_string(n) + " tokens"};
        }
        tc::PruneMergeShape sh{(int) n, (int) c, (int) ck, (int) kernel.dominant, (int) kernel.contextual, (int) p};
        n_out = sh.n_out();
        break;
    }
    }
    T* x_out = static_cast<T*>(output(context, 0, {batch, n_out, c}));
    float* size_out = n_outputs > 1 ? static_cast<float*>(output(context, 1, {batch, n_out, 1})) : nullptr;
    float* mask_out = n_outputs > 2 ? static_cast<float*>(output(context, 2, {batch, n_out})) : nullptr;
    std::vector<float> size_spare;
    if (size_out == nullptr) // the size output is not wanted, but the kernels write it
    {
        size_spare.resize((size_t) (batch * n_out));
        size_out = size_spare.data();
    }
    if (batch == 0)
    {
        return;
    }
    auto const* xd = static_cast<T const*>(x.data);
    auto const* sized = static_cast<float const*>(size.data);
    auto const* maskd = mask.value != nullptr ? static_cast<float const*>(mask.data) : nullptr;
    std::vector<int> scratch;
    switch (kernel.kind)
    {
    case Kind::kToMe:
    {
        ToMeArgs<T> a{{(int) n, (int) c, (int) ck, (int) kernel.r, (int) p}, xd,
            static_cast<T const*>(metric.data), sized, maskd, x_out, size_out, mask_out, nullptr};
        scratch.resize((size_t) (batch * tc::tome_scratch_words(a.sh.n, a.sh.ck)));
        a.scratch = scratch.data();
        std::vector<float> unit_bt((size_t) (batch * a.sh.ck * a.sh.n_b()));
        a.unit_bt = unit_bt.data();
        run_rows(
            context, (int) batch, kToMePhases, (int) n_out, (int) c, &tome_row<T>, &a,
            [&](int phase, int b, tc::ToMeRow<T, T> const& row, int t, int nt) {
                tome_phase(phase, a.sh, row, t, nt, a.unit_bt + (size_t) b * a.sh.ck * a.sh.n_b());
            },
            [&](tc::ToMeRow<T, T> const& row, int o, float* acc) { tome_gather_row(a.sh, row, o, acc); });
        break;
    }
    case Kind::kPrune:
    {
        PruneArgs<T> a{{(int) n, (int) c, (int) kernel.k, (int) p, kernel.fuse != 0, kernel.keep_order != 0}, xd,
            static_cast<T const*>(score.data), sized, maskd, x_out, size_out, mask_out, nullptr};
        scratch.resize((size_t) (batch * tc::prune_scratch_words(a.sh.n)));
        a.scratch = scratch.data();
        run_rows(
            context, (int) batch, tc::kPruneDecidePhases, (int) n_out, (int) c, &prune_row<T>, &a,
            [&](int phase, int, tc::PruneRow<T, T> const& row, int t, int nt) {
                tc::prune_decide_phase(phase, a.sh, row, t, nt);
            },
            [&](tc::PruneRow<T, T> const& row, int o, float*) {
                if (o < a.sh.protect + a.sh.k)
                {
                    int token = row.s.source[o];
                    copy_row(row.x_out + (long long) o * a.sh.c, row.x + (long long) token * a.sh.c, a.sh.c);
                    row.size_out[o] = row.size[token];
                    if (row.mask_out != nullptr)
                    {
                        row.mask_out[o] = row.mask != nullptr ? row.mask[token] : 1.0f;
                    }
                    return;
                }
                gather_row_elements(a.sh, row, o, [](tc::PruneShape const& s, tc::PruneRow<T, T> const& r,
                                                       long long e) { tc::prune_gather_element(s, r, e); });
            });
        break;
    }
    default:
    {
        PruneMergeArgs<T> a{{(int) n, (int) c, (int) ck, (int) kernel.dominant, (int) kernel.contextual, (int) p},
            xd, static_cast<T const*>(metric.data), static_cast<T const*>(score.data), sized, maskd, x_out,
            size_out, mask_out, nullptr};
        scratch.resize((size_t) (batch * tc::prune_merge_scratch_words(a.sh.n, a.sh.ck)));
        a.scratch = scratch.data();
        int phases = a.sh.active() ? tc::kPruneMergeDecidePhases : 0;
        run_rows(
            context, (int) batch, phases, (int) n_out, (int) c, &prune_merge_row<T>, &a,
            [&](int phase, int, tc::PruneMergeRow<T, T, T> const& row, int t, int nt) {
                tc::prune_merge_decide_phase(phase, a.sh, row, t, nt);
            },
            [&](tc::PruneMergeRow<T, T, T> const& row, int o, float*) {
                if (!a.sh.active() || o < a.sh.protect + a.sh.k)
                {
                    int token = (!a.sh.active() || o < a.sh.protect) ? o : row.s.dom[o - a.sh.protect];
                    copy_row(row.x_out + (long long) o * a.sh.c, row.x + (long long) token * a.sh.c, a.sh.c);
                    row.size_out[o] = row.size[token];
                    if (row.mask_out != nullptr)
                    {
                        row.mask_out[o] = row.mask != nullptr ? row.mask[token] : 1.0f;
                    }
                    return;
                }
                gather_row_elements(a.sh, row, o,
                    [](tc::PruneMergeShape const& s, tc::PruneMergeRow<T, T, T> const& r, long long e) {
                        tc::prune_merge_gather_element(s, r, e);
                    });
            });
        break;
    }
    }
}

void compute(Kernel const& kernel, OrtKernelContext* context, ONNXTensorElementDataType type)
{
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    {
        compute_typed<tc::f16>(kernel, context, type);
    }
    else
    {
        compute_typed<float>(kernel, context, type);
    }
}

// ---------------------------------------------------------------- OrtCustomOp

struct Op
{
    OrtCustomOp base; // first member: ORT hands back this pointer
    Kind kind;
    ONNXTensorElementDataType type; // of x and the decision tensors
};

Op const* self(OrtCustomOp const* op)
{
    return reinterpret_cast<Op const*>(op);
}

size_t n_inputs(Kind kind)
{
    return mask_index(kind) + 1;
}

int64_t attribute(OrtKernelInfo const* info, char const* name, int64_t fallback)
{
    int64_t value = fallback;
    OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, &value);
    if (status != nullptr)
    {
        g_api->ReleaseStatus(status);
        return fallback;
    }
    return value;
}

struct KernelState
{
    Kernel kernel;
    ONNXTensorElementDataType type;
};

OrtStatusPtr ORT_API_CALL create_kernel_v2(OrtCustomOp const* op, OrtApi const*, OrtKernelInfo const* info,
    void** out)
{
    auto* state = new KernelState{{self(op)->kind}, self(op)->type};
    Kernel& k = state->kernel;
    k.protect = attribute(info, "protected", 0);
    k.r = attribute(info, "r", 0);
    k.k = attribute(info, "k", 0);
    k.fuse = attribute(info, "fuse", 0);
    k.keep_order = attribute(info, "keep_order", 0);
    k.dominant = attribute(info, "dominant", 0);
    k.contextual = attribute(info, "contextual", 0);
    *out = state;
    return nullptr;
}

void* ORT_API_CALL create_kernel(OrtCustomOp const* op, OrtApi const* api, OrtKernelInfo const* info)
{
    void* kernel = nullptr;
    create_kernel_v2(op, api, info, &kernel);
    return kernel;
}

OrtStatusPtr ORT_API_CALL compute_v2(void* kernel, OrtKernelContext* context)
{
    auto* state = static_cast<KernelState*>(kernel);
    try
    {
        compute(state->kernel, context, state->type);
    }
    catch (Failure const& failure)
    {
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT, failure.message.c_str());
    }
    catch (std::exception const& error)
    {
        return g_api->CreateStatus(ORT_FAIL, error.what());
    }
    return nullptr;
}

void ORT_API_CALL compute_v1(void* kernel, OrtKernelContext* context)
{
    OrtStatus* status = compute_v2(kernel, context);
    if (status != nullptr)
    {
        g_api->ReleaseStatus(status);
    }
}

void ORT_API_CALL destroy_kernel(void* kernel)
{
    delete static_cast<KernelState*>(kernel);
}

char const* ORT_API_CALL get_name(OrtCustomOp const* op)
{
    return op_name(self(op)->kind);
}

char const* ORT_API_CALL get_provider(OrtCustomOp const*)
{
    return "CPUExecutionProvider";
}

ONNXTensorElementDataType ORT_API_CALL input_type(OrtCustomOp const* op, size_t index)
{
    Op const* o = self(op);
    bool decision = index == 0 || (o->kind == Kind::kPruneMerge ? index <= 2 : index == 1);
    return decision ? o->type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

size_t ORT_API_CALL input_count(OrtCustomOp const* op)
{
    return n_inputs(self(op)->kind);
}

ONNXTensorElementDataType ORT_API_CALL output_type(OrtCustomOp const* op, size_t index)
{
    return index == 0 ? self(op)->type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

size_t ORT_API_CALL output_count(OrtCustomOp const*)
{
    return 3;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(OrtCustomOp const* op, size_t index)
{
    return index == mask_index(self(op)->kind) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(OrtCustomOp const*, size_t index)
{
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtMemType ORT_API_CALL input_memory_type(OrtCustomOp const*, size_t)
{
    return OrtMemTypeDefault;
}

int ORT_API_CALL variadic_min_arity(OrtCustomOp const*)
{
    return 1;
}

int ORT_API_CALL variadic_homogeneity(OrtCustomOp const*)
{
    return 0;
}

// Output shapes from the input shapes and the attributes: x [B, N_out, C], size [B, N_out, 1], mask [B, N_out],
// the batch kept as it comes in (a symbol stays a symbol).
int64_t op_attribute(OrtShapeInferContext* context, char const* name, int64_t fallback)
{
    OrtOpAttr const* attr = nullptr;
    OrtStatus* status = g_api->ShapeInferContext_GetAttribute(context, name, &attr);
    if (status != nullptr || attr == nullptr)
    {
        if (status != nullptr)
        {
            g_api->ReleaseStatus(status);
        }
        return fallback;
    }
    int64_t value = fallback;
    size_t written = 0;
    status = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &value, sizeof value, &written);
    if (status != nullptr)
    {
        g_api->ReleaseStatus(status);
        return fallback;
    }
    return value;
}

OrtStatusPtr ORT_API_CALL infer_shapes(OrtCustomOp const* op, OrtShapeInferContext* context)
{
    Op const* o = self(op);
    OrtTensorTypeAndShapeInfo* x_info = nullptr; // owned by the context: not released here
    OrtStatus* status = g_api->ShapeInferContext_GetInputTypeShape(context, 0, &x_info);
    if (status != nullptr)
    {
        return status;
    }
    size_t rank = 0;
    status = g_api->GetDimensionsCount(x_info, &rank);
    if (status != nullptr || rank != 3)
    {
        return status; // null for another rank: nothing to say, compute() reports the shape
    }
    int64_t dims[3];
    char const* symbols[3] = {"", "", ""};
    status = g_api->GetDimensions(x_info, dims, 3);
    if (status == nullptr)
    {
        status = g_api->GetSymbolicDimensions(x_info, symbols, 3);
    }
    std::string batch_symbol = symbols[0] != nullptr ? symbols[0] : "";
    // x's type from the input: ORT keeps one schema per op name, with the shape function of the first op
    // registered under it (the float one), for every type.
    ONNXTensorElementDataType x_type = o->type;
    if (status == nullptr)
    {
        status = g_api->GetTensorElementType(x_info, &x_type);
    }
    if (status != nullptr)
    {
        return status;
    }
    int64_t n = dims[1], p = op_attribute(context, "protected", 0), n_out = -1;
    if (n >= 0)
    {
        switch (o->kind)
        {
        case Kind::kToMe: n_out = n - op_attribute(context, "r", 0); break;
        case Kind::kPrune:
            n_out = p + op_attribute(context, "k", 0) + (op_attribute(context, "fuse", 0) ? 1 : 0);
            break;
        default:
        {
            int64_t k = op_attribute(context, "dominant", 0), m = op_attribute(context, "contextual", 0);
            n_out = n - p > k + m ? p + k + m : n;
            break;
        }
        }
    }
    size_t outputs = 3;
    // The context does not say how many outputs the node has (x, size[, mask]): all three are set, and ORT
    // refuses an index beyond the node's outputs with an error status, released below, which ends the loop.
    for (size_t index = 0; index < outputs; ++index)
    {
        OrtTensorTypeAndShapeInfo* info = nullptr;
        status = g_api->CreateTensorTypeAndShapeInfo(&info);
        if (status != nullptr)
        {
            return status;
        }
        int64_t shape[3] = {dims[0], n_out, index == 0 ? dims[2] : 1};
        size_t out_rank = index == 2 ? 2 : 3;
        char const* out_symbols[3] = {batch_symbol.c_str(), "", ""};
        status = g_api->SetTensorElementType(info, index == 0 ? x_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
        if (status == nullptr)
        {
            status = g_api->SetDimensions(info, shape, out_rank);
        }
        if (status == nullptr)
        {
            status = g_api->SetSymbolicDimensions(info, out_symbols, out_rank);
        }
        if (status == nullptr)
        {
            status = g_api->ShapeInferContext_SetOutputTypeShape(context, index, info);
        }
        g_api->ReleaseTensorTypeAndShapeInfo(info);
        if (status != nullptr)
        {
            g_api->ReleaseStatus(status); // an output the node does not have
            break;
        }
    }
    return nullptr;
}

int ORT_API_CALL start_version(OrtCustomOp const*)
{
    return 1;
}

int ORT_API_CALL end_version(OrtCustomOp const*)
{
    return INT_MAX;
}

size_t ORT_API_CALL no_index_map(int** input_index, int** output_index)
{
    *input_index = nullptr;
    *output_index = nullptr;
    return 0;
}

void ORT_API_CALL release_index_map(int*, int*)
{
}

Op make_op(Kind kind, ONNXTensorElementDataType type)
{
    Op op;
    std::memset(&op.base, 0, sizeof op.base);
    OrtCustomOp& b = op.base;
    b.version = kApiVersion;
    b.CreateKernel = &create_kernel;
    b.GetName = &get_name;
    b.GetExecutionProviderType = &get_provider;
    b.GetInputType = &input_type;
    b.GetInputTypeCount = &input_count;
    b.GetOutputType = &output_type;
    b.GetOutputTypeCount = &output_count;
    b.KernelCompute = &compute_v1;
    b.KernelDestroy = &destroy_kernel;
    b.GetInputCharacteristic = &input_characteristic;
    b.GetOutputCharacteristic = &output_characteristic;
    b.GetInputMemoryType = &input_memory_type;
    b.GetVariadicInputMinArity = &variadic_min_arity;
    b.GetVariadicInputHomogeneity = &variadic_homogeneity;
    b.GetVariadicOutputMinArity = &variadic_min_arity;
    b.GetVariadicOutputHomogeneity = &variadic_homogeneity;
    b.CreateKernelV2 = &create_kernel_v2;
    b.KernelComputeV2 = &compute_v2;
    b.InferOutputShapeFn = &infer_shapes;
    b.GetStartVersion = &start_version;
    b.GetEndVersion = &end_version;
    b.GetMayInplace = &no_index_map;
    b.ReleaseMayInplace = &release_index_map;
    b.GetAliasMap = &no_index_map;
    b.ReleaseAliasMap = &release_index_map;
    op.kind = kind;
    op.type = type;
    return op;
}

std::vector<Op>& ops()
{
    static std::vector<Op> all = [] {
        std::vector<Op> list;
        for (Kind kind : {Kind::kToMe, Kind::kPrune, Kind::kPruneMerge})
        {
            for (ONNXTensorElementDataType type : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16})
            {
                list.push_back(make_op(kind, type));
            }
        }
        return list;
    }();
    return all;
}

} // namespace

// The entry point ONNX Runtime looks up (SessionOptions.register_custom_ops_library).
TC_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, OrtApiBase const* api_base)
{
    OrtApi const* api = api_base->GetApi(kApiVersion);
    if (api == nullptr)
    {
        OrtApi const* oldest = api_base->GetApi(1);
        return oldest == nullptr ? nullptr
                                 : oldest->CreateStatus(ORT_FAIL, "tcexport's custom ops need ONNX Runtime >= 1.17");
    }
    g_api = api;
    OrtCustomOpDomain* domain = nullptr;
    OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain);
    if (status != nullptr)
    {
        return status;
    }
    for (Op& op : ops())
    {
        status = api->CustomOpDomain_Add(domain, &op.base);
        if (status != nullptr)
        {
            return status;
        }
    }
    // The domain must outlive every session using it; it is never released (one per registration, a few bytes).
    return api->AddCustomOpDomain(options, domain);
}

// What the library implements, for tcexport's own checks: "ToMeMerge,TokenPrune,TokenPruneMerge".
TC_EXPORT char const* tcexport_ort_ops_names()
{
    return "ToMeMerge,TokenPrune,TokenPruneMerge";
}
