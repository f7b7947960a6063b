// Recognises the graphs the megakernel can take: whole batch-1 decode splits of llama-family models.
// Everything else is handed back to the stock backend with a reason (a stable key for the counters and a
// detail for humans).
#pragma once

#include <cstdint>
#include <map>
#include <string>

struct ggml_cgraph;

namespace mk {

struct graph_scan {
    uint64_t    uid       = 0;
    int         n_nodes   = 0;
    int         n_tokens  = 0;  // tokens per step, from the weight matmuls' activations
    int         n_weight_matmuls = 0;
    bool        decode    = false;  // a whole batch-1 decode split (one token through weight matmuls)
    bool        supported = false;  // ... and every op and weight type is one the compiler knows
    bool        weights_on_host = true;  // every weight buffer is plain host memory (not repacked, not a GPU's)
    std::string reason;             // stable key: graph-view, no-weight-matmul, batch>1, unsupported-op, ...
    std::string detail;             // what exactly, for people
    std::map<std::string, int> ops;           // op (unary/glu ops by their own name) -> count
    std::map<std::string, int> weight_types;  // type of the weights the matmuls read -> count
    std::map<std::string, int> weight_bufts;  // buffer types holding those weights -> count
};

graph_scan scan_graph(const ggml_cgraph * graph);

// One line per node (op, name, type, shape, strides, view offset, sources, op params): what a new op's compiler
// pattern has to match. The plugin writes it for each new decode graph when LLAMA_MEGAKERNEL_DUMP_GRAPH names a file.
std::string dump_graph(const ggml_cgraph * graph);

// JSON object of a scan (for status() and `llama-megakernel doctor`).
std::string to_json(const graph_scan & s);

// What the plugin takes, for `llama-megakernel doctor`: {"architectures", "ops", "glu_ops", "weight_types"}.
// The compiler works on ops, not on model names; the architectures are those whose decode graphs are verified
// end to end against stock (tests/test_compiler.py; bench/results/ for the GPU).
std::string supported_json();

// True if `arch` (a GGUF general.architecture) is one of those.
bool architecture_supported(const std::string & arch);

}  // namespace mk
