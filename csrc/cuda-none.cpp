// CPU-only build: no CUDA compiler was found (or LLAMA_MK_CUDA=OFF). The GPU executor refuses every program.
#include "gpu-executor.h"

#include <string>

namespace mk {

std::string cuda_devices_json() { return "null"; }

double copy_bandwidth_gbs(int) { return -1.0; }

struct gpu_program {};

bool gpu_target(int, target &, std::string & err) {
    err = "this build of the plugin has no CUDA executor";
    return false;
}

gpu_program * gpu_load(const program &, int, std::string & err) {
    err = "this build of the plugin has no CUDA executor (built without a CUDA compiler)";
    return nullptr;
}

bool gpu_run(gpu_program *, void *, std::string & err, float *) {
    err = "no CUDA executor";
    return false;
}

void gpu_free(gpu_program * g) { delete g; }

uint64_t gpu_planar_bytes(const gpu_program *) { return 0; }

}  // namespace mk
