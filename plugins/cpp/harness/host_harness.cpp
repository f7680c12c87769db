// Host test harness: runs the kernels' per-row code (kernels/*_rows.h) on the CPU behind a C ABI, for
// tests/test_plugins_cpp.py (ctypes). Built with g++ only: kernels/hd.h defines __host__/__device__ away.
//
// It drives the phases exactly as the CUDA kernels do: per batch row, phase after phase, every thread index of
// a block of `threads` threads in turn (the kernel's __syncthreads() sits between phases), then the output
// elements in reverse order (the gather kernel's threads run in no particular order). Scratch starts filled
// with garbage, so a slot a phase forgot to write shows up in the outputs.
#include "prune_rows.h"
#include "tome_rows.h"

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
    std::vector<int> scratch = garbage_scratch(batch * tc::tome_scratch_words(sh.n));
    for (int b = 0; b < batch; ++b)
    {
        auto row = tc::tome_row_at(sh, b, static_cast<T const*>(x), static_cast<T const*>(metric), size, mask,
            static_cast<T*>(x_out), size_out, mask_out, scratch.data());
        for (int phase = 0; phase < tc::kToMeDecidePhases; ++phase)
        {
            for (int t = 0; t < threads; ++t)
            {
                tc::tome_decide_phase(phase, sh, row, t, threads);
            }
        }
        for (long long e = (long long) sh.n_out() * sh.c - 1; e >= 0; --e)
        {
            tc::tome_gather_element(sh, row, e);
        }
    }
}

template <typename T>
void prune_typed(tc::PruneShape const& sh, int batch, int threads, void const* x, void const* score,
    float const* size, float const* mask, void* x_out, float* size_out, float* mask_out)
{
    std::vector<int> scratch = garbage_scratch(batch * tc::prune_scratch_words(sh.n));
    for (int b = 0; b < batch; ++b)
    {
        auto row = tc::prune_row_at(sh, b, static_cast<T const*>(x), static_cast<T const*>(score), size, mask,
            static_cast<T*>(x_out), size_out, mask_out, scratch.data());
        for (int phase = 0; phase < tc::kPruneDecidePhases; ++phase)
        {
            for (int t = 0; t < threads; ++t)
            {
                tc::prune_decide_phase(phase, sh, row, t, threads);
            }
        }
        for (long long e = (long long) sh.n_out() * sh.c - 1; e >= 0; --e)
        {
            tc::prune_gather_element(sh, row, e);
        }
    }
}

} // namespace

extern "C"
{

// Returns 0, or -1 for an element type the kernels do not have. x/metric/score hold element_type values
// (fp16/bf16 as raw uint16); size/mask/outputs as float32. mask and mask_out may be null.
int tc_tome_host(int element_type, int batch, int n, int c, int ck, int r, int protect, int threads, void const* x,
    void const* metric, float const* size, float const* mask, void* x_out, float* size_out, float* mask_out)
{
    tc::ToMeShape sh{n, c, ck, r, protect, mask != nullptr};
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
    tc::PruneShape sh{n, c, k, protect, fuse != 0, keep_order != 0, mask != nullptr};
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
