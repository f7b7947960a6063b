// The GPU executor: runs a program (program.h) as one persistent kernel launch per decode step. Plain C++ interface,
// so plugin.cpp needs no CUDA headers; cuda/gpu-executor.cu implements it, cuda-none.cpp stubs it out.
#pragma once

#include "compiler.h"

#include <string>

namespace mk {

struct gpu_program;  // a program copied to one GPU, with its scratch, counters and error word

// What the tiling of a program for `device` should be sized for. False (and err) when there is no usable GPU.
bool gpu_target(int device, target & t, std::string & err);

// Copy `p` to `device` and check the persistent grid can be co-resident. nullptr (and err) when it cannot run
// there; the caller hands the graph back with that reason.
gpu_program * gpu_load(const program & p, int device, std::string & err);

// One decode step, ordered on `stream` (a cudaStream_t; nullptr: the device is synchronised first and the step
// runs on the executor's own stream). Waits for the step to end and checks its error word: false (and err) if a
// dependency wait timed out or the launch failed; the caller then recomputes the step on the stock path and must
// not run this program again. With `kernel_ms` the launch is timed with events and its time stored there.
bool gpu_run(gpu_program * g, void * stream, std::string & err, float * kernel_ms = nullptr);

void gpu_free(gpu_program * g);

// Bytes of GPU memory the program's planar weight copies take (0: it reads the GGUF layout).
uint64_t gpu_planar_bytes(const gpu_program * g);

}  // namespace mk
