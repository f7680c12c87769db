// Host test harness: runs the kernels' per-row code (kernels/*_rows.h) on the CPU behind a C ABI, for
// tests/test_plugins_cpp.py (ctypes). Built with g++ only: kernels/hd.h defines __host__/__device__ away.
//
// It drives the phases as the CUDA kernels do (run_rows.h). Scratch starts filled with garbage, so a slot a
// phase forgot to write shows up in the outputs.
#include "run_rows.h"

#include <cstring>
#include <vector>

namespace
{

std::vector<int> garbage_scratch(long long words)
{
    std::vector<int> scratch(static_cast<size_t>(words));
    std::memset(scratch.data(), 0x7f, scratch.size() * sizeof(int));
    return scratch;
}

template <typename T>
void tome_typed(tc::ToMeShape const& sh, int batch, int threads, void const* x, void const* metric, float const* size,
    float const* mask, void* x_out, float* size_out, float* mask_out)
{
    std::vector<int> scratch = garbage_scratch(batch * tc::tome_scratch_words(sh.n, sh.ck));
    tc::run_tome_rows(sh, batch, threads, static_cast<T const*>(x), static_cast<T const*>(metric), size, mask,
        static_cast<T*>(x_out), size_out, mask_out, scratch.data());
}

template <typename T>
void prune_typed(tc::PruneShape const& sh, int batch, int threads, void const* x, void const* score,
    float const* size, float const* mask, void* x_out, float* size_out, float* mask_out)
{
    std::vector<int> scratch = garbage_scratch(batch * tc::prune_scratch_words(sh.n));
    tc::run_prune_rows(sh, batch, threads, static_cast<T const*>(x), static_cast<T const*>(score), size, mask,
        static_cast<T*>(x_out), size_out, mask_out, scratch.data());
}

} // namespace

extern "C"
{

// Returns 0, or -1 for an element type the kernels do not have. x/metric/score hold element_type values
// (fp16/bf16 as raw uint16); size/mask/outputs as float32. mask and mask_out may be null.
int tc_tome_host(int element_type, int batch, int n, int c, int ck, int r, int protect, int threads, void const* x,
    void const* metric, float const* size, float const* mask, void* x_out, float* size_out, float* mask_out)
{
    tc::ToMeShape sh{n, c, ck, r, protect};
    switch (element_type)
    {
    case tc::kF32: tome_typed<float>(sh, batch, threads, x, metric, size, mask, x_out, size_out, mask_out); return 0;
    case tc::kF16: tome_typed<tc::f16>(sh, batch, threads, x, metric, size, mask, x_out, size_out, mask_out); return 0;
    case tc::kBF16: tome_typed<tc::bf16>(sh, batch, threads, x, metric, size, mask, x_out, size_out, mask_out); return 0;
    default: return -1;
    }
}

int tc_prune_host(int element_type, int batch, int n, int c, int k, int protect, int fuse, int keep_order,
    int threads, void const* x, void const* score, float const* size, float const* mask, void* x_out,
    float* size_out, float* mask_out)
{
    tc::PruneShape sh{n, c, k, protect, fuse != 0, keep_order != 0};
    switch (element_type)
    {
    case tc::kF32: prune_typed<float>(sh, batch, threads, x, score, size, mask, x_out, size_out, mask_out); return 0;
    case tc::kF16: prune_typed<tc::f16>(sh, batch, threads, x, score, size, mask, x_out, size_out, mask_out); return 0;
    case tc::kBF16: prune_typed<tc::bf16>(sh, batch, threads, x, score, size, mask, x_out, size_out, mask_out); return 0;
    default: return -1;
    }
}

// The kernels' own conversions, element by element (checked against NumPy / ml_dtypes).
void tc_float_to_f16(float const* in, unsigned short* out, long long count)
{
    for (long long i = 0; i < count; ++i)
    {
        out[i] = tc::float_to_f16(in[i]);
    }
}

void tc_f16_to_float(unsigned short const* in, float* out, long long count)
{
    for (long long i = 0; i < count; ++i)
    {
        out[i] = tc::f16_to_float(in[i]);
    }
}

void tc_float_to_bf16(float const* in, unsigned short* out, long long count)
{
    for (long long i = 0; i < count; ++i)
    {
        out[i] = tc::float_to_bf16(in[i]);
    }
}

} // extern "C"
