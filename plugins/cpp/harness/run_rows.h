// Host driver of the kernels' per-row code, as the CUDA kernels run it: per batch row, phase after phase, every
// thread index of a block of `threads` threads in turn (the kernel's __syncthreads() sits between phases), then
// the output elements in reverse order (the gather kernel's threads run in no particular order).
#pragma once

#include "prune_rows.h"
#include "tome_rows.h"

namespace tc
{

template <typename T>
void run_tome_rows(ToMeShape const& sh, int batch, int threads, T const* x, T const* metric, float const* size,
    float const* mask, T* x_out, float* size_out, float* mask_out, int* scratch)
{
    for (int b = 0; b < batch; ++b)
    {
        auto row = tome_row_at(sh, b, x, metric, size, mask, x_out, size_out, mask_out, scratch);
        for (int phase = 0; phase < kToMeDecidePhases; ++phase)
        {
            for (int t = 0; t < threads; ++t)
            {
                tome_decide_phase(phase, sh, row, t, threads);
            }
        }
        for (long long e = (long long) sh.n_out() * sh.c - 1; e >= 0; --e)
        {
            tome_gather_element(sh, row, e);
        }
    }
}

template <typename T>
void run_prune_rows(PruneShape const& sh, int batch, int threads, T const* x, T const* score, float const* size,
    float const* mask, T* x_out, float* size_out, float* mask_out, int* scratch)
{
    for (int b = 0; b < batch; ++b)
    {
        auto row = prune_row_at(sh, b, x, score, size, mask, x_out, size_out, mask_out, scratch);
        for (int phase = 0; phase < kPruneDecidePhases; ++phase)
        {
            for (int t = 0; t < threads; ++t)
            {
                prune_decide_phase(phase, sh, row, t, threads);
            }
        }
        for (long long e = (long long) sh.n_out() * sh.c - 1; e >= 0; --e)
        {
            prune_gather_element(sh, row, e);
        }
    }
}

} // namespace tc
