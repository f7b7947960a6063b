// What the CUDA runtime reports about the GPUs (for doctor/info). The persistent kernel will size its grid
// from the same properties.
#include "../json.h"
#include "device-guard.cuh"

#include <cuda_runtime.h>

#include <string>

namespace mk {

std::string cuda_devices_json() {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver"/"no device" state
        return "{\"error\":" + json_str(cudaGetErrorString(err)) + "}";
    }
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    std::string o = "{\"driver_api\":" + std::to_string(driver) + ",\"runtime_api\":" + std::to_string(runtime) +
                    ",\"devices\":[";
    for (int i = 0; i < n; i++) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
            continue;
        }
        o += (i ? "," : "") + std::string("{\"name\":") + json_str(p.name) +
             ",\"cc\":\"" + std::to_string(p.major) + "." + std::to_string(p.minor) + "\"" +
             ",\"sms\":" + std::to_string(p.multiProcessorCount) +
             ",\"smem_per_block_optin\":" + std::to_string(p.sharedMemPerBlockOptin) +
             ",\"l2_bytes\":" + std::to_string(p.l2CacheSize) +
             ",\"global_mem\":" + std::to_string(p.totalGlobalMem) + "}";
    }
    return o + "]}";
}

// 512 MiB copied device to device 10 times after 2 warm-up copies; bytes read + written per second.
double copy_bandwidth_gbs(int device) {
    const size_t bytes = size_t(512) << 20;
    void * a = nullptr;
    void * b = nullptr;
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    float ms = 0.0f;
    const device_guard guard;
    bool ok = cudaSetDevice(device) == cudaSuccess && cudaMalloc(&a, bytes) == cudaSuccess &&
              cudaMalloc(&b, bytes) == cudaSuccess && cudaEventCreate(&e0) == cudaSuccess &&
              cudaEventCreate(&e1) == cudaSuccess;
    for (int i = 0; ok && i < 2; i++) {
        ok = cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess;
    }
    ok = ok && cudaEventRecord(e0) == cudaSuccess;
    for (int i = 0; ok && i < 10; i++) {
        ok = cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess;
    }
    ok = ok && cudaEventRecord(e1) == cudaSuccess && cudaEventSynchronize(e1) == cudaSuccess &&
         cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && ms > 0.0f;
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (a) cudaFree(a);
    if (b) cudaFree(b);
    cudaGetLastError();
    return ok ? 2.0 * 10 * (double) bytes / (ms * 1e-3) / 1e9 : -1.0;
}

}  // namespace mk
