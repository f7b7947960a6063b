// The compiler: one ggml batch-1 decode graph (a whole split, as the scheduler hands it to a backend) to a program
// (program.h). It fuses the llama layer into five instructions with one serial edge each:
//   norm + QKV matvec + rope + KV append  ->  attention partials  ->  attention merge + O matvec + residual
//   ->  norm + gate/up matvec + GLU  ->  down matvec + residual
// (the attention merge is done once, in the attention's last split per KV head: attention::merged)
// and, where the down projection's weight type allows it (fuse_down), the last two as one instruction.
// A graph it cannot express is refused with a reason (compile_error), and the plugin hands it back unchanged.
#pragma once

#include "program.h"

#include <stdexcept>
#include <string>
#include <vector>

struct ggml_cgraph;

namespace mk {

// What the tiling is sized for: the GPU the program will run on (or, for the CPU executor and `explain` without a
// GPU, a stand-in with the same numbers).
struct target {
    int n_sm = 132;               // multiprocessors (one persistent block each)
    int smem_bytes = 227 * 1024;  // shared memory per block
    bool fuse_down = true;        // fold the FFN down projection into the glu instruction (LLAMA_MEGAKERNEL_FUSE_DOWN=0: off)
    int rope_pairs = 1;           // where a head's rope turns adjacent pairs, tiles may split it: 1 large heads only,
                                  // 2 any, 0 none (LLAMA_MEGAKERNEL_ROPE_PAIRS)
    bool fold_norms = true;       // fold a vec instruction's residual + norm into its consumer's input (fold_norms;
                                  // LLAMA_MEGAKERNEL_FOLD_NORMS=0: off)
    bool attn_merge = true;       // an attention's last split per KV head merges its partials (attention::merged);
                                  // LLAMA_MEGAKERNEL_ATTN_MERGE=0: every consumer tile merges them
    bool defer_qk = false;        // per-head Q/K norms and rope in the attention instead of the QKV epilogue
                                  // (defer_qk; LLAMA_MEGAKERNEL_DEFER_QK=1: on)
    int attn_min_cells = 32;      // fewest KV cells per attention split (LLAMA_MEGAKERNEL_ATTN_MIN_CELLS; the GPU checks
                                  // raise it to give short contexts the long splits of deep ones). 32 gives the 1B
                                  // shape 8 splits a KV head at 256 cells (run 92: step -2.0% against 64)
};

struct program {
    std::vector<instruction> instrs;
    std::vector<attention>   attns;
    std::vector<rope_params> ropes;
    std::vector<delta_net>   deltas;
    uint64_t scratch_bytes = 0;
    int      n_layers = 0;
    target   tgt;

    // Accounting for explain: bytes each instruction reads from memory (weights, KV rows, inputs).
    std::vector<uint64_t> bytes_read;
};

struct compile_error : std::runtime_error {
    std::string reason;  // stable key, as in graph_scan
    compile_error(const std::string & reason_, const std::string & detail)
        : std::runtime_error(detail), reason(reason_) {}
};

program compile(const ggml_cgraph * graph, const target & tgt);

// Longest chain of dependencies (edges) from the start of the program to each instruction.
std::vector<int> depths(const program & p);

// JSON for explain: instructions with kind, layer, tiles, bytes read, depth; per-layer summary; totals.
std::string explain_json(const program & p);

}  // namespace mk
