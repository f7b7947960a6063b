// CPU-only build: no CUDA compiler was found (or LLAMA_MK_CUDA=OFF).
#include <string>

namespace mk {
std::string cuda_devices_json() { return "null"; }
}  // namespace mk
