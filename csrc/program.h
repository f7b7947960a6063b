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
    plain,        // x = src (F32) [* gate]
    rms_norm,     // x = src / sqrt(mean(src^2) + eps) [* w], per group of norm_row values (0: the whole vector)
    attn_reduce,  // x = merge of an attention instruction's partial results (src), n = n_head * head_dim
    embed_row,    // x = row idx[0] of a weight matrix (src), dequantized
};

struct vec_in {
    in_kind  kind = in_kind::plain;
    int32_t  n    = 0;
    addr     src;
    addr     w;               // rms_norm: optional F32 weight, of norm_row values (or n when norm_row is 0)
    float    eps = 0.0f;
    int32_t  norm_row = 0;    // rms_norm: length of the groups normalised separately (Gated DeltaNet's per head)
    addr     gate;            // plain, rms_norm, attn_reduce: optional F32 [n] the result is multiplied by (an output gate)
    int32_t  n_head = 0;      // attn_reduce
    int32_t  head_dim = 0;    // attn_reduce
    int32_t  n_split = 0;     // attn_reduce
    int32_t  src_type = 0;    // embed_row: ggml_type of the table
    uint64_t src_row_bytes = 0;
    addr     idx;             // embed_row: row index (I32)
    // A vector formed first, in place of reading src (the compiler's fold_norms: the one-tile vec instruction that
    // made src, folded into its consumer): src = pre_res + rms_norm(pre_src) * pre_w over the whole vector, in the
    // vec instruction's arithmetic; the instruction's tile 0 also stores it at src for later readers. Then the
    // instruction's own input (an rms_norm of src) as usual. pre_src null: none.
    addr     pre_src, pre_w, pre_res;
    float    pre_eps = 0.0f;
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
    unary,     // v = unary_apply(unary, v)
    ssm_conv,  // causal depthwise conv over the channel's last row_len inputs; v is the newest (see conv_step)
};

// Elementwise activations an epilogue applies, numbered as ggml_unary_op.
enum unary_op_t : int32_t { unary_relu = 6, unary_sigmoid = 7, unary_silu = 10, unary_softplus = 15 };

MK_PROGRAM_HD inline bool unary_supported(int32_t op) {
    return op == unary_relu || op == unary_sigmoid || op == unary_silu || op == unary_softplus;
}

MK_PROGRAM_HD inline float unary_apply(int32_t op, float x) {  // as ggml-cpu's unary-ops.cpp
    switch (op) {
        case unary_relu:
            return x > 0.0f ? x : 0.0f;
        case unary_sigmoid:
            return 1.0f / (1.0f + expf(-x));
        case unary_softplus:
            return x > 20.0f ? x : logf(1.0f + expf(x));
        default:  // unary_silu
            return x / (1.0f + expf(-x));
    }
}

struct rope_params {
    int32_t n_dims = 0, mode = 0, n_offs = 0;  // mode: 0 normal (adjacent pairs), 2 neox (halves), 8/40 multi (halves)
    float   freq_scale = 1, ext_factor = 0, attn_factor = 1, theta_scale = 1;
    float   corr_dims[2] = {0, 0};
    addr    pos;           // I32, one per token
    addr    freq_factors;  // optional F32 [n_dims/2]
    int32_t sections[4] = {0, 0, 0, 0};  // multi-section modes: pairs per position stream (pos holds 4 streams)
};

// Multi-section rope (ggml_rope_multi, Qwen3.5's rope): which of the 4 position streams pair i0/2 turns by.
MK_PROGRAM_HD inline int rope_stream(const rope_params & rp, int pair) {
    const int32_t * s = rp.sections;
    if (rp.mode != 8 && rp.mode != 40) {
        return 0;
    }
    const int n = s[0] + s[1] + s[2] + s[3];
    const int sector = n > 0 ? pair % n : 0;
    if (rp.mode == 40) {  // interleaved
        if (sector % 3 == 1 && sector < 3 * s[1]) return 1;
        if (sector % 3 == 2 && sector < 3 * s[2]) return 2;
        if (sector % 3 == 0 && sector < 3 * s[0]) return 0;
        return 3;
    }
    if (sector < s[0]) return 0;
    if (sector < s[0] + s[1]) return 1;
    if (sector < s[0] + s[1] + s[2]) return 2;
    return 3;
}

// One step of a causal depthwise conv1d (ggml_ssm_conv) for one channel: the window is the channel's d - 1 stored
// inputs then x; returns sum(window * kernel) and, when `next` is given, stores the window's last d - 1 values (the
// state of the next step). `old` and `next` may be the same memory.
constexpr int k_max_conv = 8;

MK_PROGRAM_HD inline float conv_step(const float * old, const float * kern, int d, float x, float * next) {
    float win[k_max_conv];
    for (int k = 0; k + 1 < d; k++) {
        win[k] = old[k];
    }
    win[d - 1] = x;
    float acc = 0.0f;
    for (int k = 0; k < d; k++) {
        acc += win[k] * kern[k];
    }
    if (next) {
        for (int k = 0; k + 1 < d; k++) {
            next[k] = win[k + 1];
        }
    }
    return acc;
}

struct epi_op {
    epi_kind kind = epi_kind::store;
    int32_t  row_len = 0;
    addr     a;             // add/mul operand, store/set_rows destination; ssm_conv: the F32 kernel [row_len, rows]
    addr     b, c;          // ssm_conv: the state row read (b + idx[0] * nb1) and the one written (c, may be null)
    float    f0 = 0, f1 = 0;
    int32_t  dst_type = 0;  // set_rows: ggml_type of the destination (F32, F16, BF16)
    uint64_t nb0 = 0, nb1 = 0;  // set_rows: destination element and row strides (bytes)
    addr     idx;           // set_rows: row indices
    int32_t  idx_type = 0;  // set_rows: GGML_TYPE_I32 or GGML_TYPE_I64
    int32_t  rope = -1;     // rope: index into program::ropes
    int32_t  unary = 0;     // unary: the ggml_unary_op
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
    // Output row r is weight row r, or, with row_group > 0, row (r / row_group) * group_stride + row_first +
    // r % row_group: a strided view of the matmul's result (Qwen3.5's Q and output gate interleave per head). Tiles
    // then cover one group each, so a tile's rows are consecutive in memory.
    int32_t  row_group = 0, group_stride = 0, row_first = 0;
    uint8_t  constant = 0;      // w is a model weight (nothing in the step writes it): it may be read ahead of the
                                // instruction's dependencies
    uint8_t  gpu_rows = 0, gpu_split = 0;  // set by the GPU executor when it loads the program: rows per warp and
                                           // warps per row of its matvec (0: its default); the compiler leaves them
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
    // Non-null: the split of each KV head that finishes last merges the head group's partials into `merged`
    // (F32 [n_head * head_dim_v], the attention's output), counted on `arrivals` (scratch: n_head_kv uint64,
    // monotonic: at step e all splits of head h have arrived when arrivals[h] reads (e + 1) * n_split). The
    // consumer then reads a plain vector instead of merging every head itself (in_kind::attn_reduce).
    addr     merged, arrivals;
    // The cell this step appends (the KV append's row index, an I32 or I64 graph input), or null if the compiler
    // could not tie it to K. Every other cell is unchanged during the step, so an executor may read those before
    // its dependencies are met and read only this one after.
    addr     kv_row;
    int32_t  kv_row_type = 0;
    // Q's and K's per-head operations (rms_norm, mul, rope, scale), moved here from the QKV instruction's
    // epilogue by the compiler's defer_qk pass, so that QKV tiles need not hold whole heads: QKV then stores Q as
    // it comes out of the matvec (at q) and this token's K row (all KV heads, at k_new). Each attention tile runs
    // q_ops over the heads of q it reads (rows h * head_dim_k of the Q vector), and the split holding the appended
    // cell runs k_ops over its KV head's part of k_new; k_ops ends with the set_rows into the K cache that the QKV
    // epilogue made before. n_epi 0: none (q as read, K already in the cache).
    segment  q_ops, k_ops;
    addr     k_new;
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

// The Gated DeltaNet recurrence (ggml_gated_delta_net) for one token, with the L2 norms of q and k folded in.
// The state of head h is S_v rows of S_v floats; row j (column j of the math's S) evolves on its own:
//   r = r * exp(g[h]);  d = (v[h][j] - r . k) * beta[h];  r += d * k;  out[h][j] = (r . q) * scale
// so tiles split heads and rows. Each tile normalises q and k of its head itself (two vectors of S_v).
struct delta_net {
    addr     q, k, v;         // F32 [S_v * n_head_qk] (q, k) and [S_v * n_head] (v), before q/k's norms
    addr     g, beta;         // F32 [n_head]: the decay's log and the update's weight
    addr     state_in;        // F32 state rows [n_head][S_v][S_v] at state_in + idx[0] * state_nb
    addr     state_idx;       // I32: the recurrent cell this step reads
    uint64_t state_nb = 0;
    addr     state_out;       // where the new state goes (may equal the cell read); null: not kept
    addr     out;             // F32 [S_v * n_head]
    int32_t  n_head = 0, n_head_qk = 0, head_dim = 0, rows_per_tile = 0;
    float    q_eps = -1, k_eps = -1;   // rms_norm of each head of q/k before the recurrence (< 0: none) ...
    float    q_scale = 1, k_scale = 1; // ... then this factor (rms_norm * 1/sqrt(S_v) is the L2 norm)
    float    scale = 1;                // of the output
};

enum class instr_kind : uint8_t {
    vec,     // x from `in`, epilogue of segment 0 (single segment, no weights): norms, embeddings, copies
    matvec,  // y = W x for each segment, then each segment's epilogue
    glu,     // g = W0 x, u = W1 x, y = act(g) * u, then segment 0's epilogue
    attn,    // partial attention over a slice of the context for one KV head (tiles: n_head_kv * n_split)
    delta,   // the Gated DeltaNet recurrence (tiles: n_head * S_v / rows_per_tile)
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
    // glu with the down projection fused in (compiler: fuse_down): seg[2] is the down matrix. A tile that made glu
    // rows [r0, r1) multiplies them with those columns of seg[2] and adds the partial sums into down_acc (int64
    // fixed point, see to_fixed); the tile that arrives last turns the sums into floats and runs seg[2]'s epilogue
    // on the whole vector. One serial edge per layer less than a separate down instruction.
    bool       fused_down = false;
    // fused_down: int64 [seg[2].rows] sums, a uint64 arrival counter (monotonic), then float [seg[0].rows] where the
    // CPU executor gathers the glu values when ggml-cpu rounds the down input in blocks longer than a tile's span
    // (K-quants: Q8_K, 256 values)
    addr       down_acc;
    vec_in     in;
    int32_t    n_segments = 0;
    segment    seg[k_max_segments];
    int32_t    attn = -1;        // index into program::attns, or program::deltas for a delta instruction
    int32_t    n_deps = 0;
    dep        deps[k_max_deps];
    char       name[64] = {0};   // the main ggml tensor it produces, for explain and error messages
};

// The partial sums of a fused down projection are added as fixed-point integers (value * 2^32 in an int64), so the
// total does not depend on the order in which tiles arrive: both executors add exactly, and each partial is rounded
// once to a step of 2^-32 (finer than a float's for |values| above 2^-9). Values are clamped to +-2^31.
constexpr float k_fix_one = 4294967296.0f;  // 2^32
MK_PROGRAM_HD inline long long to_fixed(float v) {
    v = fminf(fmaxf(v, -2147483520.0f), 2147483520.0f) * k_fix_one;
#if defined(__CUDA_ARCH__)
    return __float2ll_rn(v);
#else
    return llrintf(v);
#endif
}
MK_PROGRAM_HD inline float from_fixed(long long q) {
    return (float) q * (1.0f / k_fix_one);
}

// The segment and rows [r0, r1) of it that tile t of a vec/matvec/glu instruction covers (glu: the same rows of
// both segments).
struct tile_rows {
    int seg, r0, r1;
};

// The weight row behind output row r of a segment.
MK_PROGRAM_HD inline int64_t weight_row(const segment & sg, int r) {
    return sg.row_group > 0 ? (int64_t) (r / sg.row_group) * sg.group_stride + sg.row_first + r % sg.row_group : r;
}

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
