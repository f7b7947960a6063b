// The calling thread's current CUDA device, restored when the guard goes out of scope. Under a layer split,
// llama.cpp drives several GPUs from its threads; a plugin call must leave each thread on the device it found.
#pragma once

#include <cuda_runtime.h>

namespace mk {

struct device_guard {
    int prev = -1;
    device_guard() {
        if (cudaGetDevice(&prev) != cudaSuccess) {
            prev = -1;
            cudaGetLastError();
        }
    }
    ~device_guard() {
        if (prev >= 0) {
            cudaSetDevice(prev);
        }
    }
    device_guard(const device_guard &) = delete;
    device_guard & operator=(const device_guard &) = delete;
};

}  // namespace mk
