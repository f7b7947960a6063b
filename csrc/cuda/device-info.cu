// What the CUDA runtime reports about the GPUs (for doctor/info). The persistent kernel will size its grid
// from the same properties.
#include "../json.h"

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

}  // namespace mk
