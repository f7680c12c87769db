// The kernels' host launchers (src/launch.h) re-implemented on the CPU, for tests only: the plugin's enqueue then
// runs the kernels' per-row code on host pointers, so tests drive the real IPluginV3 code end to end without a
// GPU (harness/plugin_probe.cpp). Same workspace layout as kernels/*_kernels.cu; the block size of the decide
// kernels is stood in for by a deliberately odd thread count.
#include "run_rows.h" // first: its __host__/__device__ shim must precede CUDA's headers

#include "launch.h"

namespace tc
{

namespace
{
constexpr int kThreads = 5;
}

size_t tome_workspace_bytes(int batch, int n, int ck)
{
    return (size_t) batch * (size_t) tome_scratch_words(n, ck) * sizeof(int);
}

size_t prune_workspace_bytes(int batch, int n)
{
    return (size_t) batch * (size_t) prune_scratch_words(n) * sizeof(int);
}

template <typename T>
static void tome_on_cpu(ToMeLaunch const& a)
{
    ToMeShape sh{a.n, a.c, a.ck, a.r, a.protect};
    run_tome_rows(sh, a.batch, kThreads, static_cast<T const*>(a.x), static_cast<T const*>(a.metric), a.size, a.mask,
        static_cast<T*>(a.x_out), a.size_out, a.mask_out, static_cast<int*>(a.workspace));
}

template <typename T>
static void prune_on_cpu(PruneLaunch const& a)
{
    PruneShape sh{a.n, a.c, a.k, a.protect, a.fuse, a.keep_order};
    run_prune_rows(sh, a.batch, kThreads, static_cast<T const*>(a.x), static_cast<T const*>(a.score), a.size, a.mask,
        static_cast<T*>(a.x_out), a.size_out, a.mask_out, static_cast<int*>(a.workspace));
}

cudaError_t launch_tome(ToMeLaunch const& a, cudaStream_t)
{
    switch (a.element_type)
    {
    case kF32: tome_on_cpu<float>(a); return cudaSuccess;
    case kF16: tome_on_cpu<f16>(a); return cudaSuccess;
    case kBF16: tome_on_cpu<bf16>(a); return cudaSuccess;
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t launch_prune(PruneLaunch const& a, cudaStream_t)
{
    switch (a.element_type)
    {
    case kF32: prune_on_cpu<float>(a); return cudaSuccess;
    case kF16: prune_on_cpu<f16>(a); return cudaSuccess;
    case kBF16: prune_on_cpu<bf16>(a); return cudaSuccess;
    default: return cudaErrorInvalidValue;
    }
}

} // namespace tc
