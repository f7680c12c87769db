// TokenPrune CUDA kernels. Device code only, plus the host launcher for nvcc: NVRTC compiles this file as it
// is (tests/test_plugins_cpp.py), skipping the part guarded by __CUDACC_RTC__.
#include "prune_rows.h"

namespace tc
{

constexpr int kPruneDecideThreads = 128;
constexpr int kPruneGatherThreads = 256;

// One block per batch row: the decisions (ranking and which token goes where), phase by phase.
template <typename T>
__global__ void __launch_bounds__(kPruneDecideThreads) prune_decide_kernel(PruneShape sh, T const* x,
    T const* score, float const* size, float const* mask, T* x_out, float* size_out, float* mask_out, int* scratch)
{
    PruneRow<T, T> row = prune_row_at(sh, blockIdx.x, x, score, size, mask, x_out, size_out, mask_out, scratch);
    for (int phase = 0; phase < kPruneDecidePhases; ++phase)
    {
        prune_decide_phase(phase, sh, row, threadIdx.x, blockDim.x);
        __syncthreads();
    }
}

// Grid (output elements / threads, batch): copies and the fused token, one output element per thread.
template <typename T>
__global__ void __launch_bounds__(kPruneGatherThreads) prune_gather_kernel(PruneShape sh, T const* x,
    T const* score, float const* size, float const* mask, T* x_out, float* size_out, float* mask_out, int* scratch)
{
    long long e = (long long) blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long) sh.n_out() * sh.c)
    {
        return;
    }
    PruneRow<T, T> row = prune_row_at(sh, blockIdx.y, x, score, size, mask, x_out, size_out, mask_out, scratch);
    prune_gather_element(sh, row, e);
}

#define TC_PRUNE_INSTANTIATE(T)                                                                                   \
    template __global__ void prune_decide_kernel<T>(PruneShape, T const*, T const*, float const*, float const*, T*,   \
        float*, float*, int*);                                                                                   \
    template __global__ void prune_gather_kernel<T>(PruneShape, T const*, T const*, float const*, float const*, T*,   \
        float*, float*, int*);

TC_PRUNE_INSTANTIATE(float)
TC_PRUNE_INSTANTIATE(f16)
TC_PRUNE_INSTANTIATE(bf16)

} // namespace tc

#if !defined(__CUDACC_RTC__)
#include "launch.h"

namespace tc
{

size_t prune_workspace_bytes(int batch, int n)
{
    return (size_t) batch * (size_t) prune_scratch_words(n) * sizeof(int);
}

template <typename T>
static cudaError_t launch_prune_typed(PruneLaunch const& a, cudaStream_t stream)
{
    PruneShape sh{a.n, a.c, a.k, a.protect, a.fuse, a.keep_order};
    T const* x = static_cast<T const*>(a.x);
    T const* score = static_cast<T const*>(a.score);
    T* x_out = static_cast<T*>(a.x_out);
    int* scratch = static_cast<int*>(a.workspace);
    prune_decide_kernel<T><<<a.batch, kPruneDecideThreads, 0, stream>>>(
        sh, x, score, a.size, a.mask, x_out, a.size_out, a.mask_out, scratch);
    long long elements = (long long) sh.n_out() * sh.c;
    dim3 grid((unsigned) ((elements + kPruneGatherThreads - 1) / kPruneGatherThreads), (unsigned) a.batch);
    prune_gather_kernel<T><<<grid, kPruneGatherThreads, 0, stream>>>(
        sh, x, score, a.size, a.mask, x_out, a.size_out, a.mask_out, scratch);
    return cudaGetLastError();
}

cudaError_t launch_prune(PruneLaunch const& a, cudaStream_t stream)
{
    if (a.batch == 0)
    {
        return cudaSuccess;
    }
    switch (a.element_type)
    {
    case kF32: return launch_prune_typed<float>(a, stream);
    case kF16: return launch_prune_typed<f16>(a, stream);
    case kBF16: return launch_prune_typed<bf16>(a, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace tc
#endif
