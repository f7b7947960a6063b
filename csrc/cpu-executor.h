// The CPU executor: runs a program's tiles on the host, one at a time, in an order the dependency counters allow.
// It exists to prove the compiler right in CI (no GPU there) and to debug without a GPU; it is not fast.
#pragma once

#include "compiler.h"

#include <cstdint>
#include <vector>

namespace mk {

struct cpu_executor {
    const program * prog = nullptr;
    std::vector<uint8_t>  scratch;
    std::vector<uint64_t> counters;  // per instruction, monotonic across steps
    uint64_t epoch = 0;              // steps run so far
    // Per attention with a known appended cell: its K and V cache bytes as they were when the step began. Tiles
    // read every other cell from here, as the GPU executor reads them before its dependencies are met, so a wrong
    // appended cell shows up as wrong results.
    std::vector<std::vector<uint8_t>> k_before, v_before;

    // shuffle_seed < 0: canonical order (instruction by instruction). Otherwise a random valid order: at every
    // point any tile whose dependencies are met may run next, so a missing dependency shows up as wrong results.
    void run(const program & p, long long shuffle_seed);
};

}  // namespace mk
