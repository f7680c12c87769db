// GPU twin of host_harness.cpp, for the day a GPU is lent (tests/test_plugins_cpp.py, marked gpu): the same C ABI,
// but the plugins' real launchers (kernels/*_kernels.cu) run the kernels on the device. Built with nvcc and the
// flags of CMakeLists.txt (IEEE, no FMA), its outputs must equal the host harness's bit for bit.
#include "element_type.h"
#include "launch.h"

#include <cuda_runtime.h>

namespace
{

size_t element_bytes(int element_type)
{
    return element_type == tc::kF32 ? 4 : 2;
}

struct Device
{
    void* ptr{nullptr};
    explicit Device(size_t bytes)
    {
        if (bytes > 0 && cudaMalloc(&ptr, bytes) != cudaSuccess)
        {
            ptr = nullptr;
        }
    }
    ~Device()
    {
        cudaFree(ptr);
    }
};

void* upload(Device& d, void const* host, size_t bytes)
{
    if (host == nullptr || d.ptr == nullptr)
    {
        return nullptr;
    }
    cudaMemcpy(d.ptr, host, bytes, cudaMemcpyHostToDevice);
    return d.ptr;
}

int finish(cudaError_t launched, Device const& x, void* x_out, size_t x_bytes, Device const& size, float* size_out,
    Device const& mask, float* mask_out, size_t token_bytes)
{
    if (launched != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess)
    {
        return -2;
    }
    cudaMemcpy(x_out, x.ptr, x_bytes, cudaMemcpyDeviceToHost);
    cudaMemcpy(size_out, size.ptr, token_bytes, cudaMemcpyDeviceToHost);
    if (mask_out != nullptr)
    {
        cudaMemcpy(mask_out, mask.ptr, token_bytes, cudaMemcpyDeviceToHost);
    }
    return cudaGetLastError() == cudaSuccess ? 0 : -2;
}

// Microseconds per call of `launch` on the default stream, over `iterations` calls after one warm-up call.
template <typename Launch>
float time_us(Launch const& launch, int iterations)
{
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    launch();
    cudaEventRecord(start);
    for (int i = 0; i < iterations; ++i)
    {
        launch();
    }
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return iterations > 0 ? ms * 1000.0f / iterations : 0.0f;
}

int tome_gpu(int element_type, int batch, int n, int c, int ck, int r, int protect, void const* x, void const* metric,
    float const* size, float const* mask, void* x_out, float* size_out, float* mask_out, int iterations, float* us)
{
    size_t e = element_bytes(element_type), n_out = n - r;
    Device dx(e * batch * n * c), dm(e * batch * n * ck), ds(4u * batch * n), dk(mask ? 4u * batch * n : 0);
    Device ox(e * batch * n_out * c), os(4u * batch * n_out), om(4u * batch * n_out);
    Device work(tc::tome_workspace_bytes(batch, n, ck));
    tc::ToMeLaunch a{};
    a.element_type = element_type;
    a.batch = batch;
    a.n = n;
    a.c = c;
    a.ck = ck;
    a.r = r;
    a.protect = protect;
    a.x = upload(dx, x, e * batch * n * c);
    a.metric = upload(dm, metric, e * batch * n * ck);
    a.size = static_cast<float const*>(upload(ds, size, 4u * batch * n));
    a.mask = static_cast<float const*>(upload(dk, mask, 4u * batch * n));
    a.x_out = ox.ptr;
    a.size_out = static_cast<float*>(os.ptr);
    a.mask_out = static_cast<float*>(om.ptr);
    a.workspace = work.ptr;
    cudaError_t launched = tc::launch_tome(a, nullptr);
    if (us != nullptr)
    {
        *us = time_us([&] { tc::launch_tome(a, nullptr); }, iterations);
    }
    return finish(launched, ox, x_out, e * batch * n_out * c, os, size_out, om, mask_out, 4u * batch * n_out);
}

int prune_gpu(int element_type, int batch, int n, int c, int k, int protect, int fuse, int keep_order,
    void const* x, void const* score, float const* size, float const* mask, void* x_out, float* size_out,
    float* mask_out, int iterations, float* us)
{
    size_t e = element_bytes(element_type), n_out = protect + k + (fuse ? 1 : 0);
    Device dx(e * batch * n * c), dsc(e * batch * n), ds(4u * batch * n), dk(mask ? 4u * batch * n : 0);
    Device ox(e * batch * n_out * c), os(4u * batch * n_out), om(4u * batch * n_out);
    Device work(tc::prune_workspace_bytes(batch, n));
    tc::PruneLaunch a{};
    a.element_type = element_type;
    a.batch = batch;
    a.n = n;
    a.c = c;
    a.k = k;
    a.protect = protect;
    a.fuse = fuse != 0;
    a.keep_order = keep_order != 0;
    a.x = upload(dx, x, e * batch * n * c);
    a.score = upload(dsc, score, e * batch * n);
    a.size = static_cast<float const*>(upload(ds, size, 4u * batch * n));
    a.mask = static_cast<float const*>(upload(dk, mask, 4u * batch * n));
    a.x_out = ox.ptr;
    a.size_out = static_cast<float*>(os.ptr);
    a.mask_out = static_cast<float*>(om.ptr);
    a.workspace = work.ptr;
    cudaError_t launched = tc::launch_prune(a, nullptr);
    if (us != nullptr)
    {
        *us = time_us([&] { tc::launch_prune(a, nullptr); }, iterations);
    }
    return finish(launched, ox, x_out, e * batch * n_out * c, os, size_out, om, mask_out, 4u * batch * n_out);
}

} // namespace

extern "C"
{

// CUDA devices visible (0 when there is no GPU or no driver).
int tc_gpu_devices()
{
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

// Same signatures as host_harness.cpp's; `threads` is accepted for that, the device uses the kernels' block sizes.
int tc_tome_gpu(int element_type, int batch, int n, int c, int ck, int r, int protect, int /*threads*/,
    void const* x, void const* metric, float const* size, float const* mask, void* x_out, float* size_out,
    float* mask_out)
{
    return tome_gpu(element_type, batch, n, c, ck, r, protect, x, metric, size, mask, x_out, size_out, mask_out, 0,
        nullptr);
}

int tc_prune_gpu(int element_type, int batch, int n, int c, int k, int protect, int fuse, int keep_order,
    int /*threads*/, void const* x, void const* score, float const* size, float const* mask, void* x_out,
    float* size_out, float* mask_out)
{
    return prune_gpu(element_type, batch, n, c, k, protect, fuse, keep_order, x, score, size, mask, x_out, size_out,
        mask_out, 0, nullptr);
}

// The same, also timing `iterations` further launches (both kernels of one plugin call): microseconds per call.
int tc_tome_gpu_timed(int element_type, int batch, int n, int c, int ck, int r, int protect, void const* x,
    void const* metric, float const* size, float const* mask, void* x_out, float* size_out, float* mask_out,
    int iterations, float* us)
{
    return tome_gpu(element_type, batch, n, c, ck, r, protect, x, metric, size, mask, x_out, size_out, mask_out,
        iterations, us);
}

int tc_prune_gpu_timed(int element_type, int batch, int n, int c, int k, int protect, int fuse, int keep_order,
    void const* x, void const* score, float const* size, float const* mask, void* x_out, float* size_out,
    float* mask_out, int iterations, float* us)
{
    return prune_gpu(element_type, batch, n, c, k, protect, fuse, keep_order, x, score, size, mask, x_out, size_out,
        mask_out, iterations, us);
}

} // extern "C"
