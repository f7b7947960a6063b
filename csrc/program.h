// The program: what the compiler (compiler.cpp) makes of one batch-1 decode graph, and what both executors run
// (cpu-executor.cpp here, the GPU persistent kernel). Plain data with fixed-size arrays, so the same structs can be
// copied to the GPU as they are.
//
// A program is a list of instructions. Each instruction is split into tiles (independent pieces of work, one per
// multiprocessor at a time); a tile may start once every instruction it depends on has finished the number of
// tiles it needs. Progress is counted per instruction with counters that only grow: at step e an instruction with
// T tiles has finished k tiles when its counter reads e*T + k, so counters are never reset between tokens.
//
// Values that change per token (position, KV row indices, mask) are read at run time from the graph's input
// tensors, whose addresses the program holds.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MK_PROGRAM_HD __host__ __device__
#else
#define MK_PROGRAM_HD
#endif

namespace mk {

// An address: either absolute (a ggml tensor's data: weights, KV cache, graph inputs and outputs) or an offset
// into the program's scratch arena (intermediate vectors the program owns, one slot per value, never reused
// within a step, so tiles of different instructions cannot overwrite each other's inputs).
struct addr {
    uint64_t off     = 0;
    uint8_t  scratch = 0;  // 1: `off` is a byte offset into the scratch arena
    MK_PROGRAM_HD bool null() const { return off == 0 && !scratch; }
};

// How an instruction forms its input vector x (n floats). Folding these into the consumer (each tile recomputes
// them; the vectors are a few KiB) removes a serial edge per norm and per attention.
enum class in_kind : uint8_t {
    plain,        // x = src (F32)
    rms_norm,     // x = src / sqrt(mean(src^2) + eps) [* w]
    attn_reduce,  // x = merge of an attention instruction's partial results (src), n = n_head * head_dim
    embed_row,    // x = row idx[0] of a weight matrix (src), dequantized
};

struct vec_in {
    in_kind  kind = in_kind::plain;
    int32_t  n    = 0;
    addr     src;
    addr     w;               // rms_norm: optional F32 weight of n
    float    eps = 0.0f;
    int32_t  n_head = 0;      // attn_reduce
    int32_t  head_dim = 0;    // attn_reduce
    int32_t  n_split = 0;     // attn_reduce
    int32_t  src_type = 0;    // embed_row: ggml_type of the table
    uint64_t src_row_bytes = 0;
    addr     idx;             // embed_row: row index (I32)
};

// Operations applied, in order, to an instruction's output values while they are still in registers. Row-wise
// operations need a tile to own whole rows of `row_len` values (the compiler aligns tiles to that).
enum class epi_kind : uint8_t {
    add,       // v += a (F32, same length as the output, or broadcast with period row_len)
    mul,       // v *= a (F32, broadcast with period row_len)
    scale,     // v = v * f0 + f1
    rms_norm,  // per row of row_len: v = v / sqrt(mean(v^2) + f0)
    rope,      // per row (head) of row_len: rotate
    store,     // write v (F32) to a, contiguous
    set_rows,  // write v into rows of a (KV cache): row r = element / row_len goes to a + idx[r] * nb1
};

struct rope_params {
    int32_t n_dims = 0, mode = 0, n_offs = 0;  // mode: 0 normal (adjacent pairs), 2 neox (halves)
    float   freq_scale = 1, ext_factor = 0, attn_factor = 1, theta_scale = 1;
    float   corr_dims[2] = {0, 0};
    addr    pos;           // I32, one per token
    addr    freq_factors;  // optional F32 [n_dims/2]
};

struct epi_op {
    epi_kind kind = epi_kind::store;
    int32_t  row_len = 0;
    addr     a;             // add/mul operand, store/set_rows destination
    float    f0 = 0, f1 = 0;
    int32_t  dst_type = 0;  // set_rows: ggml_type of the destination (F32, F16, BF16)
    uint64_t nb0 = 0, nb1 = 0;  // set_rows: destination element and row strides (bytes)
    addr     idx;           // set_rows: row indices
    int32_t  idx_type = 0;  // set_rows: GGML_TYPE_I32 or GGML_TYPE_I64
    int32_t  rope = -1;     // rope: index into program::ropes
};

constexpr int k_max_epi      = 8;
constexpr int k_max_segments = 4;
constexpr int k_max_deps     = 6;

// One weight matrix of a matvec instruction; a tile covers rows of one segment only.
struct segment {
    addr     w;
    int32_t  type = 0;          // ggml_type of the weights
    int32_t  rows = 0;
    uint64_t row_bytes = 0;     // stride between rows
    int32_t  rows_per_tile = 0;
    int32_t  tile_begin = 0;    // first tile of this segment within the instruction
    uint8_t  constant = 0;      // w is a model weight (nothing in the step writes it): it may be read ahead of the
                                // instruction's dependencies
    int32_t  n_epi = 0;
    epi_op   epi[k_max_epi];    // for glu instructions, segment 0's list applies to the glu result
};

struct attention {
    addr     q;                 // F32 [head_dim_k * n_head], after rope
    addr     k, v;              // cache views (first element of cell 0, head 0)
    int32_t  k_type = 0, v_type = 0;
    uint64_t k_nb_dim = 0, k_nb_cell = 0, k_nb_head = 0;
    uint64_t v_nb_dim = 0, v_nb_cell = 0, v_nb_head = 0;
    addr     mask;              // [n_kv] row for the token, F32 or F16; may be null
    int32_t  mask_type = 0;
    int32_t  n_kv = 0, n_head = 0, n_head_kv = 0, head_dim_k = 0, head_dim_v = 0;
    int32_t  n_split = 1, cells_per_split = 0;
    float    scale = 1, softcap = 0;
    addr     partials;          // scratch: [n_head][n_split] x (max, sum, acc[head_dim_v])
    // The cell this step appends (the KV append's row index, an I32 or I64 graph input), or null if the compiler
    // could not tie it to K. Every other cell is unchanged during the step, so an executor may read those before
    // its dependencies are met and read only this one after.
    addr     kv_row;
    int32_t  kv_row_type = 0;
};

// The gate activation of a glu instruction: y = act(gate) * up, numbered as ggml_glu_op. Both executors call
// glu_gate, so a new gated activation is one case here (and its number in glu_supported).
enum glu_op_t : int32_t { glu_reglu = 0, glu_geglu = 1, glu_swiglu = 2, glu_geglu_erf = 4, glu_geglu_quick = 5 };

MK_PROGRAM_HD inline bool glu_supported(int32_t op) {
    return op == glu_reglu || op == glu_geglu || op == glu_swiglu || op == glu_geglu_erf || op == glu_geglu_quick;
}

MK_PROGRAM_HD inline float glu_gate(int32_t op, float g) {
    switch (op) {
        case glu_reglu:
            return g > 0.0f ? g : 0.0f;
        case glu_geglu:  // the tanh approximation, as ggml_gelu_f32
            return 0.5f * g * (1.0f + tanhf(0.79788456080286535587989211986876f * g * (1.0f + 0.044715f * g * g)));
        case glu_geglu_erf:
            return 0.5f * g * (1.0f + erff(g * 0.70710678118654752440084436210484f));
        case glu_geglu_quick:
            return g / (1.0f + expf(-1.702f * g));
        default:  // glu_swiglu
            return g / (1.0f + expf(-g));
    }
}

enum class instr_kind : uint8_t {
    vec,     // x from `in`, epilogue of segment 0 (single segment, no weights): norms, embeddings, copies
    matvec,  // y = W x for each segment, then each segment's epilogue
    glu,     // g = W0 x, u = W1 x, y = act(g) * u, then segment 0's epilogue
    attn,    // partial attention over a slice of the context for one KV head (tiles: n_head_kv * n_split)
};

struct dep {
    int32_t instr = -1;   // producer instruction
    int32_t needed = 0;   // how many of its tiles must be done (this step)
};

struct instruction {
    instr_kind kind = instr_kind::vec;
    int32_t    n_tiles = 1;
    int32_t    layer = -1;       // model layer, from the graph's tensor names (-1: outside the layers)
    int32_t    glu_op = 0;       // ggml_glu_op
    bool       glu_swapped = false;
    vec_in     in;
    int32_t    n_segments = 0;
    segment    seg[k_max_segments];
    int32_t    attn = -1;        // index into program::attns
    int32_t    n_deps = 0;
    dep        deps[k_max_deps];
    char       name[64] = {0};   // the main ggml tensor it produces, for explain and error messages
};

// The segment and rows [r0, r1) of it that tile t of a vec/matvec/glu instruction covers (glu: the same rows of
// both segments).
struct tile_rows {
    int seg, r0, r1;
};

MK_PROGRAM_HD inline tile_rows rows_of(const instruction & in, int t) {
    int s = 0;
    if (in.kind == instr_kind::matvec) {
        while (s + 1 < in.n_segments && t >= in.seg[s + 1].tile_begin) {
            s++;
        }
    }
    const segment & sg = in.seg[s];
    const int r0 = (t - sg.tile_begin) * sg.rows_per_tile;
    const int r1 = r0 + sg.rows_per_tile < sg.rows ? r0 + sg.rows_per_tile : sg.rows;
    return {s, r0, r1};
}

}  // namespace mk
