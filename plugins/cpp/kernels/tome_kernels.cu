// ToMeMerge CUDA kernels. Device code only, plus the host launcher for nvcc: NVRTC compiles this file as it
// is (tests/test_plugins_cpp.py), skipping the part guarded by __CUDACC_RTC__.
#include "tome_rows.h"

namespace tc
{

constexpr int kToMeDecideThreads = 128;
constexpr int kToMeGatherThreads = 256;

// One block per batch row: the decisions (which A tokens merge where), phase by phase.
template <typename T>
__global__ void __launch_bounds__(kToMeDecideThreads) tome_decide_kernel(ToMeShape sh, T const* x,
    T const* metric, float const* size, float const* mask, T* x_out, float* size_out, float* mask_out, int* scratch)
{
    ToMeRow<T, T> row = tome_row_at(sh, blockIdx.x, x, metric, size, mask, x_out, size_out, mask_out, scratch);
    for (int phase = 0; phase < kToMeDecidePhases; ++phase)
    {
        tome_decide_phase(phase, sh, row, threadIdx.x, blockDim.x);
        __syncthreads();
    }
}

// Grid (output elements / threads, batch): the size-weighted merge, one output element per thread.
template <typename T>
__global__ void __launch_bounds__(kToMeGatherThreads) tome_gather_kernel(ToMeShape sh, T const* x,
    T const* metric, float const* size, float const* mask, T* x_out, float* size_out, float* mask_out, int* scratch)
{
    long long e = (long long) blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long) sh.n_out() * sh.c)
    {
        return;
    }
    ToMeRow<T, T> row = tome_row_at(sh, blockIdx.y, x, metric, size, mask, x_out, size_out, mask_out, scratch);
    tome_gather_element(sh, row, e);
}

#define TC_TOME_INSTANTIATE(T)                                                                                   \
    template __global__ void tome_decide_kernel<T>(ToMeShape, T const*, T const*, float const*, float const*, T*,   \
        float*, float*, int*);                                                                                   \
    template __global__ void tome_gather_kernel<T>(ToMeShape, T const*, T const*, float const*, float const*, T*,   \
        float*, float*, int*);

TC_TOME_INSTANTIATE(float)
TC_TOME_INSTANTIATE(f16)
TC_TOME_INSTANTIATE(bf16)

} // namespace tc

#if !defined(__CUDACC_RTC__)
#include "launch.h"

namespace tc
{

size_t tome_workspace_bytes(int batch, int n, int ck)
{
    return (size_t) batch * (size_t) tome_scratch_words(n, ck) * sizeof(int);
}

template <typename T>
static cudaError_t launch_tome_typed(ToMeLaunch const& a, cudaStream_t stream)
{
    ToMeShape sh{a.n, a.c, a.ck, a.r, a.protect};
    T const* x = static_cast<T const*>(a.x);
    T const* metric = static_cast<T const*>(a.metric);
    T* x_out = static_cast<T*>(a.x_out);
    int* scratch = static_cast<int*>(a.workspace);
    tome_decide_kernel<T><<<a.batch, kToMeDecideThreads, 0, stream>>>(
        sh, x, metric, a.size, a.mask, x_out, a.size_out, a.mask_out, scratch);
    long long elements = (long long) sh.n_out() * sh.c;
    dim3 grid((unsigned) ((elements + kToMeGatherThreads - 1) / kToMeGatherThreads), (unsigned) a.batch);
    tome_gather_kernel<T><<<grid, kToMeGatherThreads, 0, stream>>>(
        sh, x, metric, a.size, a.mask, x_out, a.size_out, a.mask_out, scratch);
    return cudaGetLastError();
}

cudaError_t launch_tome(ToMeLaunch const& a, cudaStream_t stream)
{
    if (a.batch == 0)
    {
        return cudaSuccess;
    }
    switch (a.element_type)
    {
    case kF32: return launch_tome_typed<float>(a, stream);
    case kF16: return launch_tome_typed<f16>(a, stream);
    case kBF16: return launch_tome_typed<bf16>(a, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace tc
#endif
