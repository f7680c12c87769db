// Host side of the CUDA kernels: what the plugins call. Defined in kernels/*.cu (compiled by nvcc).
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

namespace tc
{

struct ToMeLaunch
{
    int element_type; // tc::ElementType of x and metric
    int batch, n, c, ck, r, protect;
    void const* x;
    void const* metric;
    float const* size;
    float const* mask; // null without the mask input
    void* x_out;
    float* size_out;
    float* mask_out; // null without the mask input
    void* workspace; // tome_workspace_bytes(batch, n, ck)
};

struct PruneLaunch
{
    int element_type; // tc::ElementType of x and cls_attention
    int batch, n, c, k, protect;
    bool fuse, keep_order;
    void const* x;
    void const* score;
    float const* size;
    float const* mask;
    void* x_out;
    float* size_out;
    float* mask_out;
    void* workspace; // prune_workspace_bytes(batch, n)
};

size_t tome_workspace_bytes(int batch, int n, int ck);
size_t prune_workspace_bytes(int batch, int n);

// Enqueue the kernels on `stream`: no allocation, no synchronisation (safe inside CUDA graph capture).
cudaError_t launch_tome(ToMeLaunch const& args, cudaStream_t stream);
cudaError_t launch_prune(PruneLaunch const& args, cudaStream_t stream);

} // namespace tc
