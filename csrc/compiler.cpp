// ggml decode graph -> program. See compiler.h for the shape of the result.
//
// One pass over the graph's nodes in order. Every tensor the graph computes gets a `val` describing where its
// values are at that point of the program:
//   direct  stored as contiguous F32 (scratch, or the tensor's own memory for graph outputs)
//   norm    not stored: RMS norm (and weight) of a direct value, folded into whichever instruction reads it
//   attn    not stored: partial results of an attention instruction, merged by whichever instruction reads them
//   open    still in the registers of an instruction's output (a matvec segment or a vec instruction): the next
//           elementwise op is appended to that instruction's epilogue instead of becoming an instruction
// An open value is stored (a `store` tap in the epilogue) as soon as something needs it in memory: a second
// consumer, an instruction input, an attention query, or a graph output. Views, reshapes and permutes of a
// single token are aliases. Anything outside this scheme is a compile_error and the graph goes back to ggml.
#include "compiler.h"

#include "json.h"
#include "quants.h"

#include "ggml-backend.h"
#include "ggml-impl.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <unordered_map>

namespace mk {
namespace {

[[noreturn]] void fail(const std::string & reason, const std::string & detail) {
    throw compile_error(reason, detail);
}

std::string tname(const ggml_tensor * t) {
    return std::string(t->name) + " (" + ggml_op_desc(t) + ")";
}

bool is_view_op(const ggml_tensor * t) {
    return t->op == GGML_OP_VIEW || t->op == GGML_OP_RESHAPE || t->op == GGML_OP_PERMUTE ||
           t->op == GGML_OP_TRANSPOSE || t->op == GGML_OP_NONE;
}

const ggml_tensor * root_of(const ggml_tensor * t) {
    return t->view_src ? t->view_src : t;
}

bool is_weight(const ggml_tensor * t) {
    const ggml_tensor * r = root_of(t);
    return r->buffer && ggml_backend_buffer_get_usage(r->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS;
}

addr abs_addr(const void * p) {
    addr a;
    a.off = (uint64_t) (uintptr_t) p;
    return a;
}

addr offset(addr a, uint64_t bytes) {
    a.off += bytes;
    return a;
}

bool same(const addr & a, const addr & b) {
    return a.off == b.off && a.scratch == b.scratch;
}

// A tensor whose elements, in logical order, are consecutive in memory (dims of size 1 may have any stride).
bool dense(const ggml_tensor * t) {
    size_t expect = ggml_type_size(t->type);
    if (ggml_blck_size(t->type) != 1) {
        return ggml_is_contiguous(t);
    }
    for (int d = 0; d < GGML_MAX_DIMS; d++) {
        if (t->ne[d] == 1) {
            continue;
        }
        if (t->nb[d] != expect) {
            return false;
        }
        expect *= t->ne[d];
    }
    return true;
}

int layer_of(const ggml_tensor * t) {  // llama.cpp names per-layer tensors "<name>-<layer>"
    const char * dash = strrchr(t->name, '-');
    if (dash == nullptr || dash[1] == '\0') {
        return -1;
    }
    char * end = nullptr;
    long il = strtol(dash + 1, &end, 10);
    return (*end == '\0' && il >= 0) ? (int) il : -1;
}

struct val {
    // state_row: one row of a recurrent-state cache picked by a graph input (not copied anywhere); conv_window: that
    // row's conv inputs followed by an open value (the newest input of each channel), for an ssm_conv
    enum form_t { direct, norm, attn_out, open, state_row, conv_window } form = direct;
    int64_t n = 0;          // number of values (one token)
    addr    a;              // direct: where they are
    int     producer = -1;  // the instruction that writes them (-1: outside the program)
    // norm
    addr    norm_src;
    int     norm_src_producer = -1;
    addr    norm_w;
    float   eps = 0;
    bool    norm_weighted = false;
    int32_t norm_row = 0;    // per-group norm (0: the whole vector)
    // norm, attn_out: multiplied by this F32 vector (an output gate) once formed
    addr    gate;
    int     gate_producer = -1;
    // state_row / conv_window
    addr    state;           // the cache's row 0
    uint64_t state_nb = 0;   // its row stride
    addr    state_idx;       // I32: which row
    const ggml_tensor * state_idx_t = nullptr;
    addr    conv_out;        // conv_window: where the window's last inputs go (the next step's state), if anywhere
    int     conv_epi = -1;   // conv_window: the ssm_conv epilogue op, once emitted
    int     conv_len = 0;    // conv_window: the kernel's length
    // attn
    int     attn = -1;  // attn_out: index into program::attns
    // open
    int     instr = -1, seg = 0, version = 0;
    // direct copy made while open (a store tap), if any
    bool    stored = false;
    bool    split = false;   // open: a matvec result only read through strided views, each its own segment
    const ggml_tensor * ext = nullptr;  // a graph input read in place
};

struct compiler {
    const ggml_cgraph * g;
    target tgt;
    program p;
    std::unordered_map<const ggml_tensor *, val> vals;   // by root tensor
    std::unordered_map<const ggml_tensor *, val> ext_vals;  // inputs of the graph read as vectors
    std::unordered_map<const ggml_tensor *, int> uses;   // consumers of a root (through its views) + outputs
    std::map<const ggml_tensor *, std::set<int>> cache_writers;  // root of an external tensor -> instructions
    struct row_write {
        const void * data;  // the destination view's first element
        size_t nb1;         // its row stride
        addr idx;
        int32_t idx_type;
    };
    std::map<const ggml_tensor *, std::vector<row_write>> row_writes;  // one-row set_rows per cache root
    std::vector<int> chain_version;                      // per instruction (segment 0..3 packed as instr*4+seg)
    std::set<const ggml_tensor *> done;                  // nodes consumed by a pattern (attention, delta net)
    struct qk_norm {  // the rms_norm and scale a Gated DeltaNet's q or k went through (the L2 norm), if any
        const ggml_tensor * src = nullptr;
        float eps = -1, scale = 1;
    };
    std::map<const ggml_tensor *, qk_norm> delta_qk;    // q and k inputs of the delta nets -> their norms
    std::map<const ggml_tensor *, int> delta_of;         // delta net node -> index into program::deltas
    std::map<const ggml_tensor *, segment> split_bases;  // split matmul results -> their segment before the split
    std::map<std::pair<uint64_t, uint64_t>, std::set<int>> input_ranges;  // graph inputs' memory -> readers
    uint64_t scratch = 0;

    addr scratch_alloc(uint64_t bytes) {
        addr a;
        a.scratch = 1;
        a.off = scratch;
        scratch += (bytes + 255) / 256 * 256;
        return a;
    }

    bool computed(const ggml_tensor * t) const {
        return vals.count(root_of(t)) != 0;
    }

    int & version(int instr, int seg) {
        return chain_version[instr * k_max_segments + seg];
    }

    int new_instr(instr_kind kind, const char * name, int layer) {
        instruction in;
        in.kind = kind;
        in.layer = layer;
        snprintf(in.name, sizeof(in.name), "%s", name);
        p.instrs.push_back(in);
        chain_version.resize(p.instrs.size() * k_max_segments, 0);
        return (int) p.instrs.size() - 1;
    }

    int new_instr(instr_kind kind, const ggml_tensor * t) {
        int layer = layer_of(t);
        if (layer < 0 && t->op == GGML_OP_MUL_MAT && strncmp(t->src[0]->name, "blk.", 4) == 0) {
            layer = atoi(t->src[0]->name + 4);  // an unnamed matmul (qwen35's): its weight's "blk.<layer>."
        }
        if (layer < 0 && !p.instrs.empty() && strncmp(t->name, "node_", 5) == 0) {
            layer = p.instrs.back().layer;  // an unnamed node (gemma3's O projection) of the layer being built
        }
        return new_instr(kind, t->name, layer);
    }

    void add_dep(int instr, int producer) {
        if (producer < 0 || producer == instr) {
            return;
        }
        instruction & in = p.instrs[instr];
        for (int i = 0; i < in.n_deps; i++) {
            if (in.deps[i].instr == producer) {
                return;
            }
        }
        if (in.n_deps == k_max_deps) {
            fail("too-many-deps", std::string("instruction ") + in.name + " reads from too many others");
        }
        in.deps[in.n_deps++].instr = producer;
    }

    epi_op & push_epi(int instr, int seg, epi_kind kind) {
        segment & s = p.instrs[instr].seg[seg];
        if (s.n_epi == k_max_epi) {
            fail("epilogue-too-long", std::string("too many fused ops after ") + p.instrs[instr].name);
        }
        epi_op & e = s.epi[s.n_epi++];
        e = epi_op();
        e.kind = kind;
        return e;
    }

    // The val of a tensor computed in this graph, seen through views: must cover the whole root.
    val & whole(const ggml_tensor * t, const char * what) {
        const ggml_tensor * r = root_of(t);
        if (t != r) {
            auto vt = vals.find(t);  // a strided view that became a segment of its own
            if (vt != vals.end()) {
                return vt->second;
            }
        }
        auto it = vals.find(r);
        if (it == vals.end()) {
            // an input of the graph (the embedding row copied in from another split): in memory already
            if (t->type != GGML_TYPE_F32 || !dense(t) || is_weight(t)) {
                fail("unsupported-pattern", std::string(what) + ": input " + tname(t) + " is not dense F32");
            }
            val & e = ext_vals[t];
            e.form = val::direct;
            e.n = ggml_nelements(t);
            e.a = abs_addr(t->data);
            e.ext = t;
            return e;
        }
        if (t != r && it->second.form == val::open && !dense(t)) {
            return split_view(t, it->second, what);
        }
        // (a value may cover only the start of its tensor: a delta net's output before its state)
        if (it->second.split || (t != r && (t->view_offs != 0 || ggml_nelements(t) != it->second.n || !dense(t)))) {
            fail("unsupported-pattern", std::string(what) + ": partial or strided view " + tname(t));
        }
        return it->second;
    }

    // The tensor a value is kept under: a split view's own, otherwise its root's.
    const ggml_tensor * key_of(const ggml_tensor * t) const {
        return t != root_of(t) && vals.count(t) ? t : root_of(t);
    }

    // A strided view of a matvec result still in registers, taking groups of g values every S (Qwen3.5's Q and
    // output gate share one matmul, interleaved per head): a segment of the same instruction whose rows map to
    // every S-th group of weight rows. The first view reuses the matmul's segment, later ones add segments.
    val & split_view(const ggml_tensor * t, val & rv, const char * what) {
        const int64_t g = t->ne[0], H = t->ne[1];
        const int64_t S = (int64_t) (t->nb[1] / 4), first = (int64_t) (t->view_offs / 4);
        instruction & in = p.instrs[rv.instr];
        const bool ok = in.kind == instr_kind::matvec && !rv.stored && t->type == GGML_TYPE_F32 && t->nb[0] == 4 &&
                        t->nb[1] % 4 == 0 && t->view_offs % 4 == 0 && t->ne[2] == 1 && t->ne[3] == 1 &&
                        S * H == rv.n && first + g <= S && g < S;
        // the matmul's segment as it was before any view took it
        const segment base = rv.split ? split_bases[root_of(t)] : in.seg[rv.seg];
        if (!ok || base.n_epi != 0 || base.rows != rv.n || base.row_group != 0 ||
            (!rv.split && version(rv.instr, rv.seg) != rv.version)) {
            fail("unsupported-pattern", std::string(what) + ": strided view " + tname(t) + " of a value it cannot split");
        }
        int seg = rv.seg;
        if (rv.split) {  // the matmul's segment already serves another view: a new one
            if (in.n_segments == k_max_segments) {
                fail("unsupported-pattern", "too many views of " + tname(root_of(t)));
            }
            seg = in.n_segments++;
            in.seg[seg] = base;
        } else {
            split_bases[root_of(t)] = base;
        }
        segment & sg = in.seg[seg];
        sg.rows = (int32_t) (g * H);
        sg.row_group = (int32_t) g;
        sg.group_stride = (int32_t) S;
        sg.row_first = (int32_t) first;
        rv.split = true;
        val nv;
        nv.form = val::open;
        nv.n = g * H;
        nv.instr = rv.instr;
        nv.seg = seg;
        nv.version = ++version(rv.instr, seg);
        vals[t] = nv;
        return vals[t];
    }

    // Make a value exist in memory as contiguous F32; returns its address (and records the producer).
    addr ensure_direct(const ggml_tensor * r, val & v) {
        if (v.form == val::direct || (v.form == val::open && v.stored)) {
            return v.a;
        }
        const bool out = (r->flags & GGML_TENSOR_FLAG_OUTPUT) != 0;
        addr dst = out ? abs_addr(r->data) : scratch_alloc(v.n * 4);
        if (v.form == val::open) {
            if (version(v.instr, v.seg) != v.version) {
                fail("unsupported-pattern", "value " + tname(r) + " was changed in place before it was stored");
            }
            epi_op & e = push_epi(v.instr, v.seg, epi_kind::store);
            e.a = dst;
            v.a = dst;
            v.producer = v.instr;
            v.stored = true;
            return dst;
        }
        // norm or attn: an instruction of its own that forms the vector and stores it
        int i = new_vec(v, r);
        epi_op & e = push_epi(i, 0, epi_kind::store);
        e.a = dst;
        v = val();
        v.form = val::direct;
        v.n = ggml_nelements(r);
        v.a = dst;
        v.producer = i;
        return dst;
    }

    // The input description of an instruction reading v (norm and attn forms are folded in).
    vec_in describe(const val & v) const {
        vec_in x;
        x.n = (int32_t) v.n;
        switch (v.form) {
            case val::norm:
                x.kind = in_kind::rms_norm;
                x.src  = v.norm_src;
                x.w    = v.norm_w;
                x.eps  = v.eps;
                x.norm_row = v.norm_row;
                x.gate = v.gate;
                break;
            case val::attn_out: {
                const attention & at = p.attns[v.attn];
                x.gate = v.gate;
                if (!at.merged.null()) {  // merged by the attention itself
                    x.src = at.merged;
                    break;
                }
                x.kind = in_kind::attn_reduce;
                x.src = at.partials;
                x.n_head = at.n_head;
                x.head_dim = at.head_dim_v;
                x.n_split = at.n_split;
                break;
            }
            case val::state_row:
            case val::conv_window:
                fail("unsupported-pattern", "recurrent state read other than by ssm_conv or gated_delta_net");
            case val::open:
                if (!v.stored) {
                    fail("internal-error", "input read from registers of another instruction");
                }
                x.src = v.a;
                break;
            default:
                x.src = v.a;
                break;
        }
        return x;
    }

    vec_in input_of(const val & v, int instr) {
        vec_in x = describe(v);
        note_input(v.ext, instr);
        add_dep(instr, v.form == val::norm ? v.norm_src_producer : v.producer);
        add_dep(instr, v.gate_producer);
        return x;
    }

    // A vec instruction whose input is v (the start of a new chain), named after t.
    int new_vec(const val & v, const ggml_tensor * t) {
        return fill_vec(v, new_instr(instr_kind::vec, t));
    }

    // Vec instruction i reads v.
    int fill_vec(const val & v, int i) {
        p.instrs[i].in = describe(v);
        note_input(v.ext, i);
        add_dep(i, v.form == val::norm ? v.norm_src_producer : v.producer);
        add_dep(i, v.gate_producer);
        p.instrs[i].n_segments = 1;
        p.instrs[i].seg[0].rows = (int32_t) v.n;
        return i;
    }

    // The val of an operand that must be in memory (F32, whole).
    addr operand(const ggml_tensor * t, int64_t n_expect, int for_instr, const char * what) {
        if (t->type != GGML_TYPE_F32) {
            fail("unsupported-type", std::string(what) + " operand " + tname(t) + " is " + ggml_type_name(t->type));
        }
        if (!computed(t)) {  // weights and inputs
            if (!dense(t)) {
                fail("unsupported-pattern", std::string(what) + " operand " + tname(t) + " is strided");
            }
            if (n_expect > 0 && ggml_nelements(t) != n_expect) {
                fail("unsupported-pattern", std::string(what) + " operand " + tname(t) + " has a shape it cannot broadcast");
            }
            note_input(t, for_instr);
            return abs_addr(t->data);
        }
        val & v = whole(t, what);
        if (n_expect > 0 && v.n != n_expect) {
            fail("unsupported-pattern", std::string(what) + " operand " + tname(t) + " has a shape it cannot broadcast");
        }
        addr a = ensure_direct(root_of(t), v);
        add_dep(for_instr, v.producer);
        return a;
    }

    // Continue the chain of the open value `src` with a new op producing `dst`. Returns the val of dst, open,
    // in the same instruction. A direct/norm/attn source first becomes the input of a new vec instruction.
    val & extend(const ggml_tensor * src, const ggml_tensor * dst) {
        val & v = whole(src, ggml_op_desc(dst));
        const ggml_tensor * r = key_of(src);
        if (v.form == val::open && (uses[r] > 1 || version(v.instr, v.seg) != v.version)) {
            ensure_direct(r, v);  // other consumers still need the value as it is now
        }
        val nv;
        nv.form = val::open;
        nv.n = ggml_nelements(dst);
        if (v.form == val::open && version(v.instr, v.seg) == v.version) {
            nv.instr = v.instr;
            nv.seg = v.seg;
        } else {
            nv.instr = new_vec(v, dst);
            nv.seg = 0;
        }
        nv.version = ++version(nv.instr, nv.seg);
        if (dst->type != GGML_TYPE_F32 || !ggml_is_contiguous(dst)) {
            fail("unsupported-type", "result " + tname(dst) + " is not contiguous F32");
        }
        vals[dst] = nv;
        return vals[dst];
    }

    // --- ops -------------------------------------------------------------------------------------------------

    void op_matvec(const ggml_tensor * t) {
        const ggml_tensor * w = t->src[0];
        const ggml_tensor * x = t->src[1];
        if (info_of(w->type).block == 0 || w->type == GGML_TYPE_I32) {
            fail("unsupported-type", "weight type " + std::string(ggml_type_name(w->type)) + " (" + w->name + ")");
        }
        if (w->ne[2] != 1 || w->ne[3] != 1 || x->ne[0] != w->ne[0] || ggml_nelements(x) != x->ne[0]) {
            fail("unsupported-pattern", "matmul shape " + tname(t));
        }
        if (w->nb[0] != ggml_type_size(w->type)) {
            fail("unsupported-pattern", "transposed weight " + tname(w));
        }
        const ggml_tensor * xr = root_of(x);
        val & xv = whole(x, "matmul input");
        if (xv.form == val::open) {
            ensure_direct(xr, xv);
        }
        // Join a matvec over the same input (Q/K/V, gate/up; Gated DeltaNet's qkv, alpha, beta and z, which the
        // graph computes around the recurrence).
        int i = -1;
        const vec_in cand = describe(xv);
        for (int j = (int) p.instrs.size() - 1; j >= 0 && i < 0; j--) {
            const instruction & li = p.instrs[j];
            if (li.kind == instr_kind::matvec && li.n_segments < k_max_segments && li.in.kind == cand.kind &&
                same(li.in.src, cand.src) && same(li.in.w, cand.w) && li.in.n == cand.n && li.in.eps == cand.eps &&
                li.in.norm_row == cand.norm_row && same(li.in.gate, cand.gate)) {
                i = j;
            }
        }
        if (i < 0) {
            i = new_instr(instr_kind::matvec, t);
            p.instrs[i].in = input_of(xv, i);
        } else {
            input_of(xv, i);  // same input, same dependency
        }
        instruction & in = p.instrs[i];
        segment & s = in.seg[in.n_segments];
        s = segment();
        s.w = abs_addr(w->data);
        s.constant = is_weight(w) && root_of(w)->op == GGML_OP_NONE ? 1 : 0;
        s.type = w->type;
        s.rows = (int32_t) w->ne[1];
        s.row_bytes = w->nb[1];
        val nv;
        nv.form = val::open;
        nv.n = w->ne[1];
        nv.instr = i;
        nv.seg = in.n_segments;
        nv.version = ++version(i, in.n_segments);
        in.n_segments++;
        vals[t] = nv;
    }

    void op_rms_norm(const ggml_tensor * t) {
        const ggml_tensor * src = t->src[0];
        val & sv = whole(src, "rms_norm");
        float eps;
        memcpy(&eps, t->op_params, sizeof(float));
        // A norm over a reshape is per head (Q/K norms), even with a single KV head where the row is the whole vector:
        // it stays in the producer's epilogue instead of becoming an instruction of its own.
        const bool per_head = src->op == GGML_OP_RESHAPE && sv.form == val::open;
        if (!per_head && src->ne[0] == ggml_nelements(src) && sv.form != val::norm && sv.form != val::attn_out) {
            // whole vector: fold into the consumer
            addr a = ensure_direct(root_of(src), sv);
            val nv;
            nv.form = val::norm;
            nv.n = sv.n;
            nv.norm_src = a;
            nv.norm_src_producer = sv.producer;
            nv.ext = sv.ext;
            nv.eps = eps;
            vals[t] = nv;
            return;
        }
        const bool in_registers = sv.form == val::open && !sv.stored;
        if (!in_registers && sv.form != val::norm && sv.form != val::attn_out && dense(src) &&
            sv.n % src->ne[0] == 0 && (sv.form == val::direct || sv.stored)) {
            // per group of a value in memory (the delta net's output per head): fold into the consumer as well
            val nv;
            nv.form = val::norm;
            nv.n = sv.n;
            nv.norm_src = sv.a;
            nv.norm_src_producer = sv.producer;
            nv.ext = sv.ext;
            nv.eps = eps;
            nv.norm_row = (int32_t) src->ne[0];
            vals[t] = nv;
            return;
        }
        // per head (Q/K norms): a row-wise op in the producer's epilogue
        val & nv = extend(src, t);
        epi_op & e = push_epi(nv.instr, nv.seg, epi_kind::rms_norm);
        e.row_len = (int32_t) src->ne[0];
        e.f0 = eps;
    }

    void op_mul(const ggml_tensor * t) {
        const ggml_tensor * a = t->src[0];
        const ggml_tensor * b = t->src[1];
        if (computed(b) && !computed(a)) {
            std::swap(a, b);
        }
        if (computed(a) && computed(b) && op_gate(t, a, b)) {
            return;
        }
        if (computed(b) || !ggml_is_contiguous(b) || b->type != GGML_TYPE_F32 || ggml_nelements(b) != b->ne[0] ||
            a->ne[0] % b->ne[0] != 0 || !ggml_are_same_shape(a, t)) {
            fail("unsupported-pattern", "mul of two activations or with a broadcast it cannot fold: " + tname(t));
        }
        const ggml_tensor * ar = root_of(a);
        val & av = whole(a, "mul");
        if (av.form == val::norm && !av.norm_weighted && av.gate.null() && uses[ar] == 1 &&
            b->ne[0] == (av.norm_row ? av.norm_row : av.n)) {
            val nv = av;
            nv.norm_w = abs_addr(b->data);
            nv.norm_weighted = true;
            vals[t] = nv;
            return;
        }
        val & nv = extend(a, t);
        epi_op & e = push_epi(nv.instr, nv.seg, epi_kind::mul);
        e.a = abs_addr(b->data);
        e.row_len = (int32_t) b->ne[0];
    }

    // x * gate where x is a norm or an attention output not formed yet: the consumer multiplies as it forms x
    // (Gated DeltaNet's silu(z) gate, the gated attention's sigmoid gate).
    bool op_gate(const ggml_tensor * t, const ggml_tensor * a, const ggml_tensor * b) {
        auto foldable = [&](const ggml_tensor * x) {
            const val & v = whole(x, "mul");
            return (v.form == val::norm || v.form == val::attn_out) && v.gate.null() && uses[key_of(x)] == 1 &&
                   ggml_nelements(x) == v.n && ggml_are_same_shape(x, t);
        };
        if (!foldable(a)) {
            std::swap(a, b);
        }
        if (!foldable(a) || ggml_nelements(b) != ggml_nelements(a) || b->type != GGML_TYPE_F32) {
            return false;
        }
        val nv = whole(a, "mul");
        val & gv = whole(b, "mul gate");
        nv.gate = ensure_direct(key_of(b), gv);
        nv.gate_producer = gv.producer;
        vals[t] = nv;
        return true;
    }

    void op_unary(const ggml_tensor * t) {
        const int32_t op = ggml_get_unary_op(t);
        if (!unary_supported(op)) {
            fail("unsupported-op", std::string(ggml_op_desc(t)) + " (" + t->name + ")");
        }
        val & nv = extend(t->src[0], t);
        push_epi(nv.instr, nv.seg, epi_kind::unary).unary = op;
    }

    void op_add(const ggml_tensor * t) {
        const ggml_tensor * a = t->src[0];
        const ggml_tensor * b = t->src[1];
        // The chain continues through the operand that is still in registers and used only here.
        auto chainable = [&](const ggml_tensor * x) {
            if (!computed(x)) {
                return false;
            }
            const val & v = vals[root_of(x)];
            return v.form == val::open && !v.stored && uses[root_of(x)] == 1;
        };
        if (!chainable(a) && chainable(b)) {
            std::swap(a, b);
        }
        if (!ggml_are_same_shape(a, t)) {
            fail("unsupported-pattern", "add with broadcast of the first operand: " + tname(t));
        }
        const int64_t nb_ = ggml_nelements(b);
        if (nb_ != ggml_nelements(a) && nb_ != b->ne[0]) {
            fail("unsupported-pattern", "add with a broadcast it cannot fold: " + tname(t));
        }
        val & nv = extend(a, t);
        const int i = nv.instr, s = nv.seg;
        if (computed(b) && vals[root_of(b)].form == val::open && vals[root_of(b)].instr == i) {
            fail("unsupported-pattern", "add of two outputs of one instruction: " + tname(t));
        }
        addr ba = operand(b, 0, i, "add");
        epi_op & e = push_epi(i, s, epi_kind::add);
        e.a = ba;
        e.row_len = (int32_t) (nb_ == ggml_nelements(a) ? 0 : b->ne[0]);
    }

    void op_scale(const ggml_tensor * t) {
        float sc, bias;
        memcpy(&sc, (const float *) t->op_params + 0, sizeof(float));
        memcpy(&bias, (const float *) t->op_params + 1, sizeof(float));
        val & nv = extend(t->src[0], t);
        epi_op & e = push_epi(nv.instr, nv.seg, epi_kind::scale);
        e.f0 = sc;
        e.f1 = bias;
    }

    void op_rope(const ggml_tensor * t) {
        const ggml_tensor * src = t->src[0];
        const int32_t * ip = (const int32_t *) t->op_params;
        const int n_dims = ip[1], mode = ip[2], n_ctx_orig = ip[4], n_offs = ip[15];
        float freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow;
        memcpy(&freq_base, ip + 5, 4);
        memcpy(&freq_scale, ip + 6, 4);
        memcpy(&ext_factor, ip + 7, 4);
        memcpy(&attn_factor, ip + 8, 4);
        memcpy(&beta_fast, ip + 9, 4);
        memcpy(&beta_slow, ip + 10, 4);
        const bool multi = mode == GGML_ROPE_TYPE_MROPE || mode == GGML_ROPE_TYPE_IMROPE;
        if (mode != GGML_ROPE_TYPE_NORMAL && mode != GGML_ROPE_TYPE_NEOX && !multi) {
            fail("unsupported-op", "rope mode " + std::to_string(mode) + " (" + t->name + ")");
        }
        if (src->ne[2] != 1 || src->ne[3] != 1 || t->src[1]->type != GGML_TYPE_I32 ||
            ggml_nelements(t->src[1]) != (multi ? 4 : 1) ||
            (t->src[2] && t->src[2]->type != GGML_TYPE_F32)) {
            fail("unsupported-pattern", "rope shape " + tname(t));
        }
        rope_params rp;
        rp.n_dims = n_dims;
        rp.mode = mode;
        rp.n_offs = n_offs;
        if (multi) {  // one token: the 4 position streams are pos[0..3]
            memcpy(rp.sections, ip + 11, sizeof(rp.sections));
        }
        rp.freq_scale = freq_scale;
        rp.ext_factor = ext_factor;
        rp.attn_factor = attn_factor;
        rp.theta_scale = powf(freq_base, -2.0f / n_dims);
        ggml_rope_yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow, rp.corr_dims);
        rp.pos = abs_addr(t->src[1]->data);
        if (computed(t->src[1])) {
            fail("unsupported-pattern", "rope positions computed in the graph: " + tname(t));
        }
        if (t->src[2]) {
            rp.freq_factors = abs_addr(t->src[2]->data);
        }
        p.ropes.push_back(rp);
        val & nv = extend(src, t);
        note_input(t->src[1], nv.instr);
        epi_op & e = push_epi(nv.instr, nv.seg, epi_kind::rope);
        e.row_len = (int32_t) src->ne[0];
        e.rope = (int32_t) p.ropes.size() - 1;
    }

    void op_set_rows(const ggml_tensor * t) {
        // ggml_set_rows(a, b, c): the result is a view of a (the destination, with a's shape and strides),
        // src[0] = b the rows to write, src[1] = c their indices
        const ggml_tensor * dst = t;
        const ggml_tensor * src = t->src[0];
        const ggml_tensor * idx = t->src[1];
        if (computed(dst) || computed(idx)) {
            fail("unsupported-pattern", "set_rows into a tensor of the graph: " + tname(t));
        }
        if (dst->type != GGML_TYPE_F32 && dst->type != GGML_TYPE_F16 && dst->type != GGML_TYPE_BF16) {
            fail("unsupported-type", std::string("KV cache type ") + ggml_type_name(dst->type) + " (" + dst->name + ")");
        }
        if ((idx->type != GGML_TYPE_I32 && idx->type != GGML_TYPE_I64) || ggml_nelements(idx) != idx->ne[0] ||
            src->ne[2] != 1 || src->ne[3] != 1 || src->ne[1] != idx->ne[0] || src->ne[0] != dst->ne[0] ||
            dst->ne[2] != 1 || dst->ne[3] != 1 || !ggml_is_contiguous(idx)) {
            fail("unsupported-pattern", "set_rows shape " + tname(t));
        }
        const ggml_tensor * sr = root_of(src);
        val & sv = whole(src, "set_rows");
        int instr, seg;
        if (sv.form == val::open && version(sv.instr, sv.seg) == sv.version) {
            instr = sv.instr;  // writing does not change the values: the chain stays usable for other consumers
            seg = sv.seg;
        } else {
            if (sv.form == val::open) {
                ensure_direct(sr, sv);
            }
            instr = new_vec(sv, t);  // reads the stored value and writes it into the cache
            seg = 0;
        }
        note_input(idx, instr);
        epi_op & e = push_epi(instr, seg, epi_kind::set_rows);
        e.a = abs_addr(dst->data);
        e.dst_type = dst->type;
        e.nb0 = dst->nb[0];
        e.nb1 = dst->nb[1];
        e.idx = abs_addr(idx->data);
        e.idx_type = idx->type;
        e.row_len = (int32_t) src->ne[0];
        cache_writers[root_of(dst)].insert(instr);
        if (idx->ne[0] == 1) {
            row_writes[root_of(dst)].push_back({dst->data, dst->nb[1], e.idx, e.idx_type});
        }
    }

    // --- Gated DeltaNet (Qwen3.5) ---------------------------------------------------------------------------------

    // get_rows of one row of a recurrent-state cache (conv or delta state), by a graph input: the readers (ssm_conv,
    // gated_delta_net) read the row in place.
    void op_state_row(const ggml_tensor * t) {
        const ggml_tensor * src = t->src[0];
        const ggml_tensor * idx = t->src[1];
        if (src->type != GGML_TYPE_F32 || src->nb[0] != 4 || idx->type != GGML_TYPE_I32 || ggml_nelements(idx) != 1 ||
            t->ne[1] != 1 || ggml_nelements(t) != t->ne[0] || src->ne[0] != t->ne[0]) {
            fail("unsupported-pattern", "get_rows of a recurrent state: " + tname(t));
        }
        val v;
        v.form = val::state_row;
        v.n = t->ne[0];
        v.state = abs_addr(src->data);
        v.state_nb = src->nb[1];
        v.state_idx = abs_addr(idx->data);
        v.state_idx_t = idx;
        vals[t] = v;
    }

    const val & state_of(const ggml_tensor * t, int64_t n, const char * what) {
        auto it = vals.find(root_of(t));
        if (it == vals.end() || it->second.form != val::state_row || it->second.n != n || ggml_nelements(t) != n) {
            fail("unsupported-pattern", std::string(what) + " of something other than a recurrent state row: " + tname(t));
        }
        return it->second;
    }

    // concat(state [d-1, C], x^T [1, C]) along dim 0: the conv window of each channel; x is still in registers.
    void op_concat(const ggml_tensor * t) {
        const ggml_tensor * a = t->src[0];
        const ggml_tensor * b = t->src[1];
        const int64_t C = t->ne[1], d = t->ne[0];
        if (ggml_get_op_params_i32(t, 0) != 0 || b->ne[0] != 1 || a->ne[1] != C || b->ne[1] != C || d > k_max_conv ||
            t->ne[2] != 1 || t->ne[3] != 1 || !computed(b)) {
            fail("unsupported-op", "concat other than a conv window (" + std::string(t->name) + ")");
        }
        const val & st = state_of(a, (d - 1) * C, "conv window");
        const ggml_tensor * xr = root_of(b);
        val & xv = vals[xr];
        if (xv.form != val::open || xv.stored || version(xv.instr, xv.seg) != xv.version || xv.n != C || uses[xr] != 1) {
            fail("unsupported-pattern", "conv window over a value not in registers: " + tname(t));
        }
        val w = st;
        w.form = val::conv_window;
        w.n = d * C;
        w.instr = xv.instr;
        w.seg = xv.seg;
        w.version = xv.version;
        w.conv_len = (int) d;
        vals[t] = w;
    }

    void op_ssm_conv(const ggml_tensor * t) {
        const ggml_tensor * win = t->src[0];
        const ggml_tensor * k = t->src[1];
        auto it = vals.find(root_of(win));
        if (it == vals.end() || it->second.form != val::conv_window || win != root_of(win)) {
            fail("unsupported-pattern", "ssm_conv of something other than a conv window: " + tname(t));
        }
        val & w = it->second;
        if (k->type != GGML_TYPE_F32 || !ggml_is_contiguous(k) || k->ne[0] != w.conv_len ||
            k->ne[1] != win->ne[1] || ggml_nelements(t) != win->ne[1] || computed(k)) {
            fail("unsupported-pattern", "ssm_conv kernel " + tname(k));
        }
        if (version(w.instr, w.seg) != w.version) {
            fail("unsupported-pattern", "conv input changed before the conv: " + tname(t));
        }
        epi_op & e = push_epi(w.instr, w.seg, epi_kind::ssm_conv);
        e.a = abs_addr(k->data);
        e.b = w.state;
        e.nb1 = w.state_nb;
        e.idx = w.state_idx;
        e.idx_type = GGML_TYPE_I32;
        e.c = w.conv_out;
        e.row_len = w.conv_len;
        w.conv_epi = p.instrs[w.instr].seg[w.seg].n_epi - 1;
        note_input(w.state_idx_t, w.instr);
        val nv;
        nv.form = val::open;
        nv.n = ggml_nelements(t);
        nv.instr = w.instr;
        nv.seg = w.seg;
        nv.version = ++version(w.instr, w.seg);
        vals[t] = nv;
    }

    // cpy into a cache: the conv window's newest inputs (the next step's conv state) or a delta net's new state
    void op_cpy(const ggml_tensor * t) {
        const ggml_tensor * src = t->src[0];
        const ggml_tensor * dst = t->src[1];
        auto it = vals.find(root_of(src));
        if (it == vals.end() || computed(dst) || !ggml_is_contiguous(dst) || dst->type != GGML_TYPE_F32 ||
            ggml_nelements(dst) != ggml_nelements(src)) {
            fail("unsupported-op", "copy " + tname(t));
        }
        val & v = it->second;
        if (v.form == val::conv_window) {
            // the window without its oldest input: [d-1, C] at element 1 of each channel's row
            const int64_t d = v.conv_len, C = v.n / d;
            if (src->view_offs != 4 || src->ne[0] != d - 1 || src->ne[1] != C || src->nb[1] != (size_t) d * 4) {
                fail("unsupported-pattern", "conv state update " + tname(t));
            }
            v.conv_out = abs_addr(dst->data);
            if (v.conv_epi >= 0) {
                p.instrs[v.instr].seg[v.seg].epi[v.conv_epi].c = v.conv_out;
            }
            return;
        }
        auto dl = delta_of.find(root_of(src));
        if (dl != delta_of.end()) {
            delta_net & dn = p.deltas[dl->second];
            const int64_t n_state = (int64_t) dn.head_dim * dn.head_dim * dn.n_head;
            if (src->view_offs != (size_t) dn.head_dim * dn.n_head * 4 || ggml_nelements(src) != n_state ||
                !ggml_is_contiguous(src) || !dn.state_out.null()) {
                fail("unsupported-pattern", "delta net state update " + tname(t));
            }
            dn.state_out = abs_addr(dst->data);
            return;
        }
        fail("unsupported-op", "copy " + tname(t));
    }

    // q or k of a delta net: where its values are (a view of a value in memory) and the norm folded into it
    addr delta_input(const ggml_tensor * t, int instr, int64_t S, int64_t H, float * eps, float * scale) {
        auto dq = delta_qk.find(t);
        if (dq != delta_qk.end()) {
            *eps = dq->second.eps;
            *scale = dq->second.scale;
            t = dq->second.src;
        }
        if (t->type != GGML_TYPE_F32 || t->ne[0] != S || t->ne[1] != H || t->ne[2] != 1 || t->ne[3] != 1 ||
            t->nb[0] != 4 || t->nb[1] != (size_t) S * 4) {
            fail("unsupported-pattern", "delta net input " + tname(t));
        }
        const ggml_tensor * r = root_of(t);
        auto it = vals.find(r);
        if (it == vals.end()) {
            fail("unsupported-pattern", "delta net input from outside the graph: " + tname(t));
        }
        val & v = it->second;
        const uint64_t off = t != r ? t->view_offs : 0;
        if (off % 4 || off / 4 + S * H > (uint64_t) v.n) {
            fail("unsupported-pattern", "delta net input " + tname(t));
        }
        addr a = ensure_direct(r, v);
        add_dep(instr, v.producer);
        return offset(a, off);
    }

    void op_delta_net(const ggml_tensor * t) {
        const ggml_tensor * q = t->src[0], * k = t->src[1], * v = t->src[2], * g = t->src[3], * beta = t->src[4],
                          * state = t->src[5];
        const int64_t S = v->ne[0], H = v->ne[1];
        auto src_of = [&](const ggml_tensor * x) {
            auto dq = delta_qk.find(x);
            return dq != delta_qk.end() ? dq->second.src : x;
        };
        const int64_t Hqk = src_of(q)->ne[1];
        if (ggml_get_op_params_i32(t, 0) != 1 || v->ne[2] != 1 || v->ne[3] != 1 || g->ne[0] != 1 ||
            ggml_nelements(g) != H || ggml_nelements(beta) != H || Hqk <= 0 || H % Hqk != 0 ||
            src_of(k)->ne[1] != Hqk || state->ne[0] != S || state->ne[1] != S || state->ne[2] != H ||
            ggml_nelements(state) != S * S * H) {
            fail("unsupported-pattern", "gated_delta_net shape " + tname(t));
        }
        const val & st = state_of(state, S * S * H, "gated_delta_net state");
        delta_net dn;
        const int i = new_instr(instr_kind::delta, t);
        dn.q = delta_input(q, i, S, Hqk, &dn.q_eps, &dn.q_scale);
        dn.k = delta_input(k, i, S, Hqk, &dn.k_eps, &dn.k_scale);
        float v_eps = -1, v_scale = 1;
        dn.v = delta_input(v, i, S, H, &v_eps, &v_scale);
        if (v_eps >= 0 || v_scale != 1) {
            fail("unsupported-pattern", "gated_delta_net with a norm on v: " + tname(t));
        }
        dn.scale = 1.0f / sqrtf((float) S);
        dn.g = operand(g, H, i, "gated_delta_net gate");
        dn.beta = operand(beta, H, i, "gated_delta_net beta");
        dn.state_in = st.state;
        dn.state_nb = st.state_nb;
        dn.state_idx = st.state_idx;
        note_input(st.state_idx_t, i);
        dn.n_head = (int32_t) H;
        dn.n_head_qk = (int32_t) Hqk;
        dn.head_dim = (int32_t) S;
        dn.out = scratch_alloc((uint64_t) S * H * 4);
        // rows of a head per tile: as few tiles as still fill one wave of the multiprocessors
        int rpt = (int) S;
        while (rpt % 2 == 0 && H * S * 2 / rpt <= tgt.n_sm) {
            rpt /= 2;
        }
        dn.rows_per_tile = rpt;
        p.deltas.push_back(dn);
        p.instrs[i].attn = (int32_t) p.deltas.size() - 1;
        delta_of[t] = p.instrs[i].attn;
        val nv;
        nv.form = val::direct;
        nv.n = S * H;  // the output; the new state after it is only copied into the cache
        nv.a = dn.out;
        nv.producer = i;
        vals[t] = nv;
    }

    // Before the pass: a delta net's q and k are rms_norm (and scale) of views of the conv output, which the delta
    // instruction applies itself per head; those nodes are consumed here.
    void find_delta_norms() {
        for (int i = 0; i < g->n_nodes; i++) {
            const ggml_tensor * t = g->nodes[i];
            if (t->op != GGML_OP_GATED_DELTA_NET) {
                continue;
            }
            for (int s = 0; s < 2; s++) {
                qk_norm qn;
                const ggml_tensor * x = t->src[s];
                std::vector<const ggml_tensor *> chain;
                if (x->op == GGML_OP_SCALE && only_consumer(x) == t) {
                    float sc, bias;
                    memcpy(&sc, (const float *) x->op_params + 0, 4);
                    memcpy(&bias, (const float *) x->op_params + 1, 4);
                    if (bias != 0.0f) {
                        continue;
                    }
                    qn.scale = sc;
                    chain.push_back(x);
                    x = x->src[0];
                }
                if (x->op != GGML_OP_RMS_NORM || only_consumer(x) != (chain.empty() ? t : chain.back())) {
                    continue;
                }
                memcpy(&qn.eps, x->op_params, 4);
                chain.push_back(x);
                qn.src = x->src[0];
                delta_qk[t->src[s]] = qn;
                done.insert(chain.begin(), chain.end());
            }
        }
    }

    void op_glu(const ggml_tensor * t) {
        const ggml_glu_op op = ggml_get_glu_op(t);
        const bool swapped = ggml_get_op_params_i32(t, 1) != 0;
        const ggml_tensor * a = t->src[0];
        const ggml_tensor * b = t->src[1];
        if (!glu_supported(op) || b == nullptr) {
            fail("unsupported-op", std::string(ggml_op_desc(t)) + " (" + t->name + ")");
        }
        val & av = whole(a, "glu");
        val & bv = whole(b, "glu");
        if (av.form != val::open || bv.form != val::open || av.instr != bv.instr || av.seg == bv.seg ||
            av.stored || bv.stored || uses[root_of(a)] != 1 || uses[root_of(b)] != 1) {
            fail("unsupported-pattern", "glu whose halves are not two matvecs over one input: " + tname(t));
        }
        const int i = av.instr;
        instruction & in = p.instrs[i];
        if (in.kind != instr_kind::matvec || in.n_segments != 2 || in.seg[0].n_epi || in.seg[1].n_epi ||
            in.seg[0].rows != in.seg[1].rows) {
            fail("unsupported-pattern", "glu over an instruction with other outputs: " + tname(t));
        }
        // gate first: the activation applies to segment 0
        if (av.seg != 0) {
            std::swap(in.seg[0], in.seg[1]);
        }
        in.kind = instr_kind::glu;
        in.glu_op = op;
        in.glu_swapped = swapped;
        snprintf(in.name, sizeof(in.name), "%s", t->name);
        val nv;
        nv.form = val::open;
        nv.n = ggml_nelements(t);
        nv.instr = i;
        nv.seg = 0;
        nv.version = ++version(i, 0);
        vals[t] = nv;
    }

    // Attention: q (in memory), K and V cache views, mask -> partials; the output tensor gets form attn.
    void attention_common(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v_cell_dim,
                          bool v_cell_first, const ggml_tensor * mask, float scale, float softcap,
                          const ggml_tensor * out, const ggml_tensor * named) {
        if (computed(k) || computed(v_cell_dim)) {
            fail("unsupported-pattern", "attention over K/V computed in the graph: " + tname(named));
        }
        if (q->ne[1] != 1 || q->ne[3] != 1 || k->ne[3] != 1 || v_cell_dim->ne[3] != 1) {
            fail("unsupported-pattern", "attention shape " + tname(named));
        }
        for (const ggml_tensor * c : {k, v_cell_dim}) {
            if (c->type != GGML_TYPE_F16 && c->type != GGML_TYPE_F32 && c->type != GGML_TYPE_BF16) {
                fail("unsupported-type", std::string("KV cache type ") + ggml_type_name(c->type));
            }
        }
        const int32_t n_head = (int32_t) q->ne[2], n_head_kv = (int32_t) k->ne[2];
        if (n_head % n_head_kv != 0) {
            fail("unsupported-pattern", "heads not a multiple of KV heads: " + tname(named));
        }
        attention at;
        val & qv = whole(q, "attention query");
        at.q = ensure_direct(root_of(q), qv);
        at.k = abs_addr(k->data);
        at.k_type = k->type;
        at.k_nb_dim = k->nb[0];
        at.k_nb_cell = k->nb[1];
        at.k_nb_head = k->nb[2];
        at.head_dim_k = (int32_t) k->ne[0];
        at.n_kv = (int32_t) k->ne[1];
        at.n_head = n_head;
        at.n_head_kv = n_head_kv;
        at.v = abs_addr(v_cell_dim->data);
        at.v_type = v_cell_dim->type;
        if (v_cell_first) {  // [n_kv, head_dim, heads] (transposed V cache, flash attention off)
            at.v_nb_cell = v_cell_dim->nb[0];
            at.v_nb_dim = v_cell_dim->nb[1];
            at.head_dim_v = (int32_t) v_cell_dim->ne[1];
            if (v_cell_dim->ne[0] != at.n_kv) {
                fail("unsupported-pattern", "V cells differ from K cells: " + tname(named));
            }
        } else {
            at.v_nb_dim = v_cell_dim->nb[0];
            at.v_nb_cell = v_cell_dim->nb[1];
            at.head_dim_v = (int32_t) v_cell_dim->ne[0];
            if (v_cell_dim->ne[1] != at.n_kv) {
                fail("unsupported-pattern", "V cells differ from K cells: " + tname(named));
            }
        }
        at.v_nb_head = v_cell_dim->nb[2];
        if (q->ne[0] != at.head_dim_k || v_cell_dim->ne[2] != n_head_kv) {
            fail("unsupported-pattern", "attention head sizes: " + tname(named));
        }
        if (mask) {
            if (computed(mask) || (mask->type != GGML_TYPE_F32 && mask->type != GGML_TYPE_F16) ||
                mask->ne[0] < at.n_kv || mask->ne[2] != 1 || mask->ne[3] != 1 || mask->nb[0] != ggml_type_size(mask->type)) {
                fail("unsupported-pattern", "attention mask " + tname(mask));
            }
            at.mask = abs_addr(mask->data);
            at.mask_type = mask->type;
        }
        at.scale = scale;
        at.softcap = softcap;
        // K's cells are rows of a one-row set_rows into the same memory with the same stride: its index is the
        // cell this step writes (V's is the same cell: one token)
        auto rw = row_writes.find(root_of(k));
        if (rw != row_writes.end() && rw->second.size() == 1 && rw->second[0].data == k->data &&
            rw->second[0].nb1 == k->nb[1]) {
            at.kv_row = rw->second[0].idx;
            at.kv_row_type = rw->second[0].idx_type;
        }
        // Split the context so that all multiprocessors take part: about one tile per SM, at least attn_min_cells each.
        const int per_head = std::max(1, tgt.n_sm / n_head_kv);
        int cps = (at.n_kv + per_head - 1) / per_head;
        cps = std::max(std::max(32, (tgt.attn_min_cells + 31) / 32 * 32), (cps + 31) / 32 * 32);
        at.cells_per_split = cps;
        at.n_split = (at.n_kv + cps - 1) / cps;
        at.partials = scratch_alloc((uint64_t) n_head * at.n_split * (at.head_dim_v + 2) * 4);
        // Merged once, in each KV head's last split, instead of in every consumer tile: each of the 1B shape's 128
        // O-projection tiles spent 11.9 us merging all heads' 16 splits after 4,000 tokens, 3.8 us for 4 splits at
        // 256 cells. Merging in the attention costs it 2.5-3.4 us a layer and saves the O projection 5.5-13 us
        // (1B Q4_0 step -2.7% at 256 cells, -9.8% after 4,000 tokens; docs/gpu-executor-notes.md, session 19).
        if (at.head_dim_v % 4 == 0 && tgt.attn_merge) {
            at.merged = scratch_alloc((uint64_t) n_head * at.head_dim_v * 4);
            at.arrivals = scratch_alloc((uint64_t) n_head_kv * 8);
        }
        p.attns.push_back(at);

        int i = new_instr(instr_kind::attn, named);
        p.instrs[i].attn = (int32_t) p.attns.size() - 1;
        note_input(mask, i);
        add_dep(i, qv.producer);
        for (const ggml_tensor * c : {k, v_cell_dim}) {
            auto it = cache_writers.find(root_of(c));
            if (it != cache_writers.end()) {
                for (int w : it->second) {
                    add_dep(i, w);
                }
            }
        }
        val nv;
        nv.form = val::attn_out;
        nv.n = (int64_t) n_head * at.head_dim_v;
        nv.attn = p.instrs[i].attn;
        nv.producer = i;
        if (ggml_nelements(out) != nv.n) {
            fail("unsupported-pattern", "attention output shape " + tname(out));
        }
        vals[out] = nv;
    }

    const ggml_tensor * only_consumer(const ggml_tensor * t) {
        const ggml_tensor * found = nullptr;
        for (int i = 0; i < g->n_nodes; i++) {
            const ggml_tensor * n = g->nodes[i];
            for (int s = 0; s < GGML_MAX_SRC; s++) {
                if (n->src[s] == t) {
                    if (found && found != n) {
                        return nullptr;
                    }
                    found = n;
                }
            }
        }
        return found;
    }

    // kq = mul_mat(k, q); softmax(kq, mask); kqv = mul_mat(v, kq); permute; cont
    void op_attention_matmul(const ggml_tensor * kq) {
        const ggml_tensor * sm = only_consumer(kq);
        const ggml_tensor * kqv = sm ? only_consumer(sm) : nullptr;
        const ggml_tensor * perm = kqv ? only_consumer(kqv) : nullptr;
        const ggml_tensor * cont = perm ? only_consumer(perm) : nullptr;
        if (!sm || sm->op != GGML_OP_SOFT_MAX || sm->src[0] != kq || !kqv || kqv->op != GGML_OP_MUL_MAT ||
            kqv->src[1] != sm || !perm || perm->op != GGML_OP_PERMUTE || !cont || cont->op != GGML_OP_CONT) {
            fail("unsupported-pattern", "matmul of two activations outside the attention pattern: " + tname(kq));
        }
        float scale, max_bias;
        memcpy(&scale, (const float *) sm->op_params + 0, 4);
        memcpy(&max_bias, (const float *) sm->op_params + 1, 4);
        if (max_bias != 0.0f || sm->src[2] != nullptr) {
            fail("unsupported-op", "soft_max with ALiBi or sinks (" + std::string(sm->name) + ")");
        }
        attention_common(kq->src[1], kq->src[0], kqv->src[0], true, sm->src[1], scale, 0.0f, cont, kq);
        done.insert(sm);
        done.insert(kqv);
        done.insert(perm);
        done.insert(cont);
    }

    void op_flash_attn(const ggml_tensor * t) {
        float scale, max_bias, softcap;
        memcpy(&scale, (const float *) t->op_params + 0, 4);
        memcpy(&max_bias, (const float *) t->op_params + 1, 4);
        memcpy(&softcap, (const float *) t->op_params + 2, 4);
        if (max_bias != 0.0f || t->src[4] != nullptr) {
            fail("unsupported-op", "flash attention with ALiBi or sinks (" + std::string(t->name) + ")");
        }
        attention_common(t->src[0], t->src[1], t->src[2], false, t->src[3], scale, softcap, t, t);
    }

    void op_alias(const ggml_tensor * t) {
        // get_rows of the only row, cont/cpy of something already dense: the same values
        const ggml_tensor * src = t->src[0];
        val & v = whole(src, ggml_op_desc(t));
        const ggml_tensor * r = key_of(src);
        if (v.form == val::open && uses[r] > 1) {
            ensure_direct(r, v);
        }
        vals[t] = v;
    }

    void node(const ggml_tensor * t) {
        if (done.count(t) || ggml_nelements(t) == 0) {
            return;  // consumed by a pattern, or empty (the recurrent cache's copies of other sequences' states)
        }
        if (is_view_op(t)) {
            return;  // aliases are resolved through root_of() by their consumers
        }
        switch (t->op) {
            case GGML_OP_MUL_MAT:
                if (is_weight(t->src[0])) {
                    op_matvec(t);
                } else {
                    op_attention_matmul(t);
                }
                return;
            case GGML_OP_RMS_NORM: op_rms_norm(t); return;
            case GGML_OP_MUL:      op_mul(t); return;
            case GGML_OP_ADD:      op_add(t); return;
            case GGML_OP_SCALE:    op_scale(t); return;
            case GGML_OP_ROPE:     op_rope(t); return;
            case GGML_OP_SET_ROWS: op_set_rows(t); return;
            case GGML_OP_GLU:      op_glu(t); return;
            case GGML_OP_FLASH_ATTN_EXT: op_flash_attn(t); return;
            case GGML_OP_UNARY:    op_unary(t); return;
            case GGML_OP_CONCAT:   op_concat(t); return;
            case GGML_OP_SSM_CONV: op_ssm_conv(t); return;
            case GGML_OP_CPY:      op_cpy(t); return;
            case GGML_OP_GATED_DELTA_NET: op_delta_net(t); return;
            case GGML_OP_GET_ROWS: {
                const ggml_tensor * src = t->src[0];
                const ggml_tensor * idx = t->src[1];
                if (computed(idx) || idx->type != GGML_TYPE_I32 || ggml_nelements(idx) != 1 || t->ne[1] != 1 ||
                    ggml_nelements(t) != t->ne[0]) {
                    fail("unsupported-pattern", "get_rows of more than one row: " + tname(t));
                }
                if (!computed(src) && !is_weight(src)) {
                    op_state_row(t);
                    return;
                }
                if (!computed(src)) {  // token embedding: a vec instruction that dequantizes the row
                    if (info_of(src->type).block == 0 || src->nb[0] != ggml_type_size(src->type) ||
                        src->ne[0] != t->ne[0]) {
                        fail("unsupported-type", "embedding type " + std::string(ggml_type_name(src->type)));
                    }
                    int i = new_instr(instr_kind::vec, t);
                    instruction & in = p.instrs[i];
                    in.in.kind = in_kind::embed_row;
                    in.in.n = (int32_t) t->ne[0];
                    in.in.src = abs_addr(src->data);
                    in.in.src_type = src->type;
                    in.in.src_row_bytes = src->nb[1];
                    in.in.idx = abs_addr(idx->data);
                    note_input(idx, i);
                    in.n_segments = 1;
                    in.seg[0].rows = (int32_t) t->ne[0];
                    val nv;
                    nv.form = val::open;
                    nv.n = t->ne[0];
                    nv.instr = i;
                    nv.version = ++version(i, 0);
                    vals[t] = nv;
                    return;
                }
                if (src->ne[1] != 1) {
                    fail("unsupported-pattern", "get_rows from several rows: " + tname(t));
                }
                op_alias(t);
                return;
            }
            case GGML_OP_CONT:
                if (!dense(t->src[0]) && !(computed(t->src[0]) && vals[root_of(t->src[0])].form == val::open)) {
                    fail("unsupported-pattern", "copy with a layout change: " + tname(t));
                }
                op_alias(t);
                return;
            default:
                fail("unsupported-op", std::string("op ") + ggml_op_desc(t) + " (" + t->name + ")");
        }
    }

    // --- after the pass ----------------------------------------------------------------------------------------

    void outputs() {
        bool any = false;
        for (int i = 0; i < g->n_nodes; i++) {
            const ggml_tensor * t = g->nodes[i];
            if (!(t->flags & GGML_TENSOR_FLAG_OUTPUT)) {
                continue;
            }
            any = true;
            const ggml_tensor * r = root_of(t);
            if (r != t || !vals.count(t)) {
                fail("unsupported-pattern", "graph output is a view: " + tname(t));
            }
            val & v = vals[t];
            if (!(v.form == val::direct || (v.form == val::open && v.stored)) || !same(v.a, abs_addr(t->data))) {
                if (v.form == val::direct || v.stored) {
                    // the same values as another tensor's (an alias): copy them out
                    int c = new_vec(v, t);
                    epi_op & e = push_epi(c, 0, epi_kind::store);
                    e.a = abs_addr(t->data);
                } else {
                    ensure_direct(t, v);
                }
            }
        }
        if (!any) {
            fail("partial-graph", "no output tensor: not the split that ends the model");
        }
        // Nodes nobody reads must be outputs or writes into outside memory; otherwise another split needs them.
        for (int i = 0; i < g->n_nodes; i++) {
            const ggml_tensor * t = g->nodes[i];
            if (is_view_op(t) || uses.count(t) || (t->flags & GGML_TENSOR_FLAG_OUTPUT) ||
                t->op == GGML_OP_SET_ROWS || t->op == GGML_OP_CPY || done.count(t) || ggml_nelements(t) == 0) {
                continue;
            }
            fail("partial-graph", "result " + tname(t) + " is read outside this graph");
        }
    }

    // ggml's allocator frees a graph input after its last reader, so a graph output may occupy the same memory.
    // ggml computes in node order; our instructions overlap, so an instruction that writes an output must come
    // after every instruction that reads memory it overlaps.
    void order_output_writes() {
        struct range { uint64_t lo, hi; int instr; };
        std::vector<range> reads, writes;
        for (auto & kv : input_ranges) {
            for (int i : kv.second) {
                reads.push_back({kv.first.first, kv.first.second, i});
            }
        }
        const size_t n_before = p.instrs.size();
        for (size_t i = 0; i < n_before; i++) {
            const bool no_epi = p.instrs[i].kind == instr_kind::attn || p.instrs[i].kind == instr_kind::delta;
            for (int s = 0; s < (no_epi ? 0 : std::max<int>(1, p.instrs[i].n_segments)); s++) {
                for (int e = 0; e < p.instrs[i].seg[s].n_epi; e++) {
                    epi_op & op = p.instrs[i].seg[s].epi[e];
                    if (op.kind != epi_kind::store || op.a.scratch) {
                        continue;
                    }
                    const int32_t count = p.instrs[i].kind == instr_kind::vec ? p.instrs[i].in.n : p.instrs[i].seg[s].rows;
                    const uint64_t lo = op.a.off, hi = lo + (uint64_t) count * 4;
                    bool self = false;  // the output overlaps an input of the same instruction
                    for (const range & r : reads) {
                        self = self || (r.instr == (int) i && r.lo < hi && lo < r.hi);
                    }
                    if (self) {
                        // its tiles would overwrite what the others still read: store to scratch, then copy out
                        const addr out = op.a;
                        val v;
                        v.n = count;
                        v.a = op.a = scratch_alloc((uint64_t) count * 4);
                        v.producer = (int) i;
                        char name[64];
                        snprintf(name, sizeof(name), "%.56s (copy)", p.instrs[i].name);
                        // (op is not used past this point: new_instr may move the instructions)
                        const int c = fill_vec(v, new_instr(instr_kind::vec, name, p.instrs[i].layer));
                        push_epi(c, 0, epi_kind::store).a = out;
                        writes.push_back({lo, hi, c});
                    } else {
                        writes.push_back({lo, hi, (int) i});
                    }
                }
            }
        }
        if (writes.empty()) {
            return;
        }
        // ancestors of each instruction (dependencies point backwards, so one pass in order suffices)
        const size_t n = p.instrs.size();
        std::vector<std::vector<char>> anc(n, std::vector<char>(n, 0));
        for (size_t i = 0; i < n; i++) {
            for (int d = 0; d < p.instrs[i].n_deps; d++) {
                const int j = p.instrs[i].deps[d].instr;
                anc[i][j] = 1;
                for (size_t k = 0; k < n; k++) {
                    anc[i][k] |= anc[j][k];
                }
            }
        }
        for (const range & w : writes) {
            for (const range & r : reads) {
                if (r.lo < w.hi && w.lo < r.hi && r.instr != w.instr && !anc[w.instr][r.instr]) {
                    if (r.instr > w.instr) {
                        fail("unsupported-pattern", std::string("output of ") + p.instrs[w.instr].name +
                                                        " overlaps an input read later");
                    }
                    add_dep(w.instr, r.instr);
                }
            }
        }
    }

    // Every address an instruction refers to (its own, its attention's or recurrence's, its ropes').
    template <typename F> void each_addr(const instruction & in, F f) const {
        for (const addr * a : {&in.in.src, &in.in.w, &in.in.gate, &in.in.idx, &in.down_acc, &in.in.pre_src, &in.in.pre_w,
                               &in.in.pre_res}) f(*a);
        for (int s = 0; s < k_max_segments; s++) {
            const segment & sg = in.seg[s];
            f(sg.w);
            for (int e = 0; e < sg.n_epi; e++) {
                const epi_op & op = sg.epi[e];
                for (const addr * a : {&op.a, &op.b, &op.c, &op.idx}) f(*a);
                if (op.kind == epi_kind::rope) {
                    f(p.ropes[op.rope].pos);
                    f(p.ropes[op.rope].freq_factors);
                }
            }
        }
        if (in.kind == instr_kind::attn) {
            const attention & at = p.attns[in.attn];
            for (const addr * a : {&at.q, &at.k, &at.v, &at.mask, &at.partials, &at.kv_row, &at.merged, &at.arrivals, &at.k_new}) f(*a);
            for (const segment * sg : {&at.q_ops, &at.k_ops}) {
                for (int e = 0; e < sg->n_epi; e++) {
                    const epi_op & op = sg->epi[e];
                    for (const addr * a : {&op.a, &op.idx}) f(*a);
                    if (op.kind == epi_kind::rope) {
                        f(p.ropes[op.rope].pos);
                        f(p.ropes[op.rope].freq_factors);
                    }
                }
            }
        }
        if (in.kind == instr_kind::delta) {
            const delta_net & dn = p.deltas[in.attn];
            for (const addr * a : {&dn.q, &dn.k, &dn.v, &dn.g, &dn.beta, &dn.state_in, &dn.state_idx, &dn.state_out, &dn.out}) f(*a);
        }
    }

    // glu -> down matvec (+ epilogue) becomes one glu instruction with the down matrix as seg[2] (program.h,
    // fused_down), where the glu result is read by that matvec alone, as a whole, and nothing else refers to it, and
    // the down matrix's type has slices (quants.h: slice_span; the glu's tiles then align to the span).
    void fuse_down() {
        for (size_t gi = 0; gi + 1 < p.instrs.size(); gi++) {
            instruction & G = p.instrs[gi];
            if (G.kind != instr_kind::glu || G.fused_down || G.seg[0].n_epi != 1 || G.seg[0].epi[0].kind != epi_kind::store ||
                !G.seg[0].epi[0].a.scratch) {
                continue;
            }
            const addr S = G.seg[0].epi[0].a;
            const uint64_t s_lo = S.off, s_hi = S.off + (uint64_t) G.seg[0].rows * 4;
            int di = -1, readers = 0;
            for (size_t j = 0; j < p.instrs.size(); j++) {
                int refs = 0;
                each_addr(p.instrs[j], [&](const addr & a) {
                    refs += a.scratch && a.off < s_hi && a.off + 1 > s_lo;
                });
                if (j == gi) {
                    refs -= 1;  // its own store
                }
                if (refs > 0) {
                    readers++;
                    di = (int) j;
                }
            }
            if (readers != 1 || di <= (int) gi) {
                continue;
            }
            instruction & D = p.instrs[di];
            const segment & w = D.seg[0];
            if (D.kind != instr_kind::matvec || D.n_segments != 1 || D.in.kind != in_kind::plain || !same(D.in.src, S) ||
                D.in.n != G.seg[0].rows || slice_span(w.type) == 0 || !w.constant || w.row_group != 0 ||
                G.seg[0].rows % slice_span(w.type) != 0 || G.n_segments != 2) {
                continue;
            }
            // the epilogue the last tile runs: [a residual add of the whole vector,] a store (the GPU kernel's
            // down_slice does only these)
            const bool add0 = w.n_epi == 2 && w.epi[0].kind == epi_kind::add && w.epi[0].row_len == 0;
            if (!(w.n_epi == 1 || add0) || w.epi[w.n_epi - 1].kind != epi_kind::store) {
                continue;
            }
            // nothing between the two may depend on the glu (it would then wait for the whole fused instruction)
            bool between = false;
            for (int j = (int) gi + 1; j < di; j++) {
                for (int d = 0; d < p.instrs[j].n_deps; d++) {
                    between = between || p.instrs[j].deps[d].instr == (int) gi;
                }
            }
            for (int d = 0; d < D.n_deps; d++) {  // and the down matvec may wait on nothing after the glu
                between = between || D.deps[d].instr > (int) gi;
            }
            if (between) {
                continue;
            }
            G.fused_down = true;
            G.seg[0].n_epi = 0;
            G.seg[2] = w;
            G.down_acc = scratch_alloc((uint64_t) w.rows * 8 + 8 + (uint64_t) G.seg[0].rows * 4);
            for (int d = 0; d < D.n_deps; d++) {
                add_dep((int) gi, D.deps[d].instr);
            }
            char name[sizeof(G.name)];
            snprintf(name, sizeof(name), "%.40s+%.20s", G.name, D.name);
            memcpy(G.name, name, sizeof(name));
            // D goes; whatever waited on D waits on the glu
            erase_instr(di, (int) gi);
        }
    }

    // Instruction `gone` leaves the list: later ones move up one, and whatever waited on it waits on `heir` instead
    // (an index before the erase).
    void erase_instr(int gone, int heir) {
        p.instrs.erase(p.instrs.begin() + gone);
        heir = heir > gone ? heir - 1 : heir;
        for (size_t j = 0; j < p.instrs.size(); j++) {
            instruction & in = p.instrs[j];
            int n = 0;
            for (int d = 0; d < in.n_deps; d++) {
                int k = in.deps[d].instr;
                k = k == gone ? heir : k > gone ? k - 1 : k;
                bool dup = k == (int) j;
                for (int e = 0; e < n; e++) {
                    dup = dup || in.deps[e].instr == k;
                }
                if (!dup) {
                    in.deps[n++].instr = k;
                }
            }
            in.n_deps = n;
        }
    }

    // A one-tile vec instruction V that makes S = residual + rms_norm(y) * w (gemma3's post-attention and post-FFN
    // norms: two of its seven serial edges a layer) is folded into the next instruction C that reads S, when C's
    // input is an rms_norm of S as a whole: each tile of C forms S itself (vec_in::pre_src) and its tile 0 stores
    // it for the later readers (the next residual add), which now wait on C. One edge less per fold; each of C's
    // tiles reads y and the residual instead of S and adds one reduction.
    void fold_norms() {
        for (size_t vi = 0; vi + 1 < p.instrs.size(); vi++) {
            const instruction & V = p.instrs[vi];
            const segment & vs = V.seg[0];
            if (V.kind != instr_kind::vec || V.in.kind != in_kind::rms_norm || V.in.norm_row != 0 || !V.in.gate.null() ||
                !V.in.pre_src.null() || vs.n_epi != 2 || vs.epi[0].kind != epi_kind::add || vs.epi[0].row_len != 0 ||
                vs.epi[1].kind != epi_kind::store || !vs.epi[1].a.scratch) {
                continue;
            }
            const addr S = vs.epi[1].a;
            const uint64_t s_lo = S.off, s_hi = S.off + (uint64_t) V.in.n * 4;
            auto refs_to_s = [&](const instruction & in) {
                int refs = 0;
                each_addr(in, [&](const addr & a) { refs += a.scratch && a.off < s_hi && a.off + 1 > s_lo; });
                return refs;
            };
            int ci = -1;  // the first instruction that reads S
            for (size_t j = vi + 1; j < p.instrs.size() && ci < 0; j++) {
                ci = refs_to_s(p.instrs[j]) > 0 ? (int) j : -1;
            }
            if (ci < 0) {
                continue;
            }
            instruction & C = p.instrs[ci];
            // C reads S only as its normed input (its tiles run in any order, so none may read what tile 0 stores),
            // and nothing between V and C waits on V (it would then wait on C, after it)
            bool ok = (C.kind == instr_kind::matvec || C.kind == instr_kind::glu) && C.in.kind == in_kind::rms_norm &&
                      C.in.norm_row == 0 && C.in.gate.null() && C.in.pre_src.null() && same(C.in.src, S) &&
                      C.in.n == V.in.n && refs_to_s(C) == 1;
            for (int j = (int) vi + 1; j < ci && ok; j++) {
                for (int d = 0; d < p.instrs[j].n_deps; d++) {
                    ok = ok && p.instrs[j].deps[d].instr != (int) vi;
                }
            }
            // and every later reader of S already waits on C through its other inputs: gemma3's final norm (a graph
            // output that reads the last layer's result beside the LM head) would otherwise wait for the whole LM
            // head and add its own time to the end of the step
            std::vector<char> after_c(p.instrs.size(), 0);  // waits on C, directly or through others
            for (size_t j = ci + 1; j < p.instrs.size() && ok; j++) {
                for (int d = 0; d < p.instrs[j].n_deps; d++) {
                    const int k = p.instrs[j].deps[d].instr;
                    after_c[j] = after_c[j] || k == ci || after_c[k];
                }
                if (refs_to_s(p.instrs[j]) > 0 && !after_c[j]) {
                    ok = false;
                }
            }
            if (!ok) {
                continue;
            }
            C.in.pre_src = V.in.src;
            C.in.pre_w = V.in.w;
            C.in.pre_eps = V.in.eps;
            C.in.pre_res = vs.epi[0].a;
            for (int d = 0; d < V.n_deps; d++) {
                add_dep(ci, V.deps[d].instr);
            }
            erase_instr((int) vi, ci);
            vi--;  // the instruction now at vi is the one after V
        }
    }

    // The per-head Q and K norms (qwen3, gemma3, Qwen3.5's attention layers) and the ops after them in the QKV
    // epilogue (the norm's weight, rope, scale) move into the attention (attention::q_ops, k_ops): a norm needs a
    // whole head in one tile, so in the epilogue they kept QKV tiles to whole heads (Gemma-3-270M: 25 tiles, Q tiles
    // of 256 rows of 640 values, the slowest ~5 us where an even split of the same rows is ~2 us). An attention tile
    // reads its heads of Q whole anyway, and only the split holding the new cell needs this token's K. Taken where
    // Q's segment ends by storing the whole query the attention reads (and nothing else reads it) and K's ends with
    // the one-row set_rows of the cell the attention knows (attention::kv_row), both after at least one norm.
    void defer_qk() {
        for (instruction & A : p.instrs) {
            if (A.kind != instr_kind::attn) {
                continue;
            }
            attention & at = p.attns[A.attn];
            const int hd = at.head_dim_k;
            if (at.kv_row.null() || hd != at.head_dim_v) {
                continue;
            }
            // ops before the last: only these, and a norm among them
            auto movable = [&](const segment & sg) {
                bool norm = false;
                for (int e = 0; e + 1 < sg.n_epi; e++) {
                    const epi_op & op = sg.epi[e];
                    const bool per_head = op.row_len == hd && (op.kind == epi_kind::rms_norm || op.kind == epi_kind::mul ||
                                                               op.kind == epi_kind::rope);
                    if (!per_head && op.kind != epi_kind::scale) {
                        return false;
                    }
                    norm = norm || op.kind == epi_kind::rms_norm;
                }
                return norm;
            };
            instruction * P = nullptr, * PK = nullptr;  // Q's and K's producers: one instruction
            segment * sq = nullptr, * sk = nullptr;
            for (int d = 0; d < A.n_deps; d++) {
                instruction & in = p.instrs[A.deps[d].instr];
                if (in.kind != instr_kind::matvec) {
                    continue;
                }
                for (int s = 0; s < in.n_segments; s++) {
                    segment & sg = in.seg[s];
                    const epi_op * last = sg.n_epi ? &sg.epi[sg.n_epi - 1] : nullptr;
                    if (last && last->kind == epi_kind::store && same(last->a, at.q) && sg.rows == at.n_head * hd) {
                        P = &in;
                        sq = &sg;
                    }
                    if (last && last->kind == epi_kind::set_rows && same(last->a, at.k) && same(last->idx, at.kv_row) &&
                        last->row_len == at.n_head_kv * hd && last->nb1 == at.k_nb_cell && last->nb0 == at.k_nb_dim &&
                        sg.rows == at.n_head_kv * hd) {
                        PK = &in;
                        sk = &sg;
                    }
                }
            }
            if (!P || P != PK || !movable(*sq) || !movable(*sk)) {
                continue;
            }
            int q_refs = 0;  // the store, and the attention's own
            for (const instruction & in : p.instrs) {
                each_addr(in, [&](const addr & x) { q_refs += same(x, at.q); });
            }
            if (q_refs != 2) {
                continue;
            }
            at.q_ops = segment{};
            at.q_ops.rows = sq->rows;
            at.q_ops.n_epi = sq->n_epi - 1;
            std::copy(sq->epi, sq->epi + at.q_ops.n_epi, at.q_ops.epi);
            sq->epi[0] = sq->epi[sq->n_epi - 1];  // the store, of Q as the matvec makes it
            sq->n_epi = 1;
            at.k_ops = segment{};
            at.k_ops.rows = sk->rows;
            at.k_ops.n_epi = sk->n_epi;  // with the set_rows
            std::copy(sk->epi, sk->epi + sk->n_epi, at.k_ops.epi);
            at.k_new = scratch_alloc((uint64_t) sk->rows * 4);
            sk->epi[0] = epi_op{};
            sk->epi[0].kind = epi_kind::store;
            sk->epi[0].a = at.k_new;
            sk->n_epi = 1;
        }
    }

    // the memory of a graph input (not a weight, not the KV cache) that instruction `instr` reads
    void note_input(const ggml_tensor * t, int instr) {
        if (t == nullptr || is_weight(t) || t->buffer == nullptr ||
            ggml_backend_buffer_get_usage(t->buffer) != GGML_BACKEND_BUFFER_USAGE_COMPUTE) {
            return;
        }
        const uint64_t lo = (uint64_t) (uintptr_t) t->data;
        input_ranges[{lo, lo + ggml_nbytes(t)}].insert(instr);
    }

    // The rows a tile of segment sg must hold together for epilogue op `op`: a norm needs its whole row (a head),
    // the ropes that turn halves of a head the whole head, a rope of adjacent pairs (mode 0, llama's) only its pair.
    // Whole heads are kept there too unless a head's rows are more than 128 KiB of weights: smaller tiles pay only
    // when a tile is weight-streaming bound (1B shape, heads split over 97 instead of 57 tiles: BF16, 256 KiB a
    // head, +1.0% tok/s; Q4_0, 72 KiB, -1.3%; Q4_K_M, 72 KiB, +0.7%; the SmolLM2 shape, 20 KiB, -3.0%).
    int rows_needed(const segment & sg, const epi_op & op) const {
        if (op.kind == epi_kind::rms_norm) {
            return op.row_len;
        }
        if (op.kind == epi_kind::rope) {
            const rope_params & rp = p.ropes[op.rope];
            const bool pairs = rp.mode == 0 && rp.n_offs % 2 == 0 && op.row_len % 2 == 0;
            const bool big = (uint64_t) op.row_len * sg.row_bytes > 128 * 1024;
            return pairs && (tgt.rope_pairs == 2 || (tgt.rope_pairs == 1 && big)) ? 2 : op.row_len;
        }
        return 1;
    }

    // Rows per tile of each output segment of a matvec/glu instruction for a target of `base` rows, aligned to
    // the rows any epilogue op needs in one tile (rows_needed); returns the tiles.
    int tile_segments(instruction & in, int n_out, int64_t base) {
        int tiles = 0;
        for (int s = 0; s < n_out; s++) {
            segment & sg = in.seg[s];
            int align = in.fused_down ? slice_span(in.seg[2].type) : 1;  // whole spans of the down columns
            for (int e = 0; e < sg.n_epi; e++) {
                align = std::max(align, rows_needed(sg, sg.epi[e]));
            }
            for (int e = 0; e < sg.n_epi; e++) {
                if (align % rows_needed(sg, sg.epi[e]) != 0) {
                    fail("unsupported-pattern", std::string("row-wise ops of different lengths in ") + in.name);
                }
            }
            int64_t rpt = (base + align - 1) / align * align;
            rpt = std::min<int64_t>(rpt, (sg.rows + align - 1) / align * align);
            if (sg.row_group > 0) {  // a strided view: a tile's rows must be consecutive weight rows, within a group
                if (sg.row_group % align != 0) {
                    fail("unsupported-pattern", std::string("row-wise ops across the groups of a view in ") + in.name);
                }
                int64_t d = sg.row_group;  // the largest divisor of the group near the target, whole heads kept
                for (int64_t c = align; c <= sg.row_group; c += align) {
                    if (sg.row_group % c == 0 && c <= std::max<int64_t>(rpt, align)) {
                        d = c;
                    }
                }
                rpt = d;
            }
            sg.rows_per_tile = (int32_t) rpt;
            sg.tile_begin = tiles;
            tiles += (int) ((sg.rows + rpt - 1) / rpt);
        }
        return tiles;
    }

    void tile() {
        // Blocks kept free of an instruction whose next instruction is an attention that waits on it (the QKV
        // projection): tile t of the next instruction goes to the block after this one's last tile, so with fewer
        // tiles here the attention tiles find their blocks idle and stage their cells before the wait. Filling the
        // wave with QKV tiles instead measured 57-66 us a step slower in the attention (1B shape, 130 of 132 SMs).
        std::vector<int> reserve(p.instrs.size(), 0);
        for (size_t i = 0; i + 1 < p.instrs.size(); i++) {
            const instruction & nx = p.instrs[i + 1];
            if (p.instrs[i].kind == instr_kind::attn) {
                continue;
            }
            bool waits = false;  // nx waits on this instruction
            for (int d = 0; d < nx.n_deps; d++) {
                waits = waits || nx.deps[d].instr == (int) i;
            }
            if (nx.kind == instr_kind::attn) {
                const attention & at = p.attns[nx.attn];
                const int n = at.n_head_kv * at.n_split;
                reserve[i] = waits && 2 * n <= tgt.n_sm ? n : 0;
            }
            // A one-tile vec instruction after it that does not wait on it (the final norm stored as a graph output,
            // after the LM head) runs on a block of its own beside it instead of after one of its tiles: the LM
            // head's 132 tiles left result_norm 5.7 us at the end of the 1B step.
            if (nx.kind == instr_kind::vec && !waits) {
                reserve[i] = 1;
            }
        }
        for (instruction & in : p.instrs) {
            if (in.kind == instr_kind::attn) {
                const attention & at = p.attns[in.attn];
                in.n_tiles = at.n_head_kv * at.n_split;
                continue;
            }
            if (in.kind == instr_kind::delta) {
                const delta_net & dn = p.deltas[in.attn];
                in.n_tiles = dn.n_head * dn.head_dim / dn.rows_per_tile;
                continue;
            }
            if (in.kind == instr_kind::vec) {
                in.seg[0].rows_per_tile = in.seg[0].rows;
                in.n_tiles = 1;
                continue;
            }
            // matvec/glu: about one wave of tiles over the multiprocessors, aligned to whole rows of any
            // row-wise epilogue op (rope and norms need a whole head in one tile)
            const int n_out = in.kind == instr_kind::glu ? 1 : in.n_segments;
            int64_t total = 0;
            for (int s = 0; s < n_out; s++) {
                total += in.seg[s].rows;
            }
            // Every segment rounds up to whole tiles, so small segments (Gated DeltaNet's alpha and beta, 16 rows)
            // can push the count just past one wave, and one block then runs two tiles: grow the base until the
            // tiles fit in a wave again (or give up after a few steps: rope/norm alignment may not allow it).
            const int wave = tgt.n_sm - reserve[&in - p.instrs.data()];
            const int64_t base0 = std::max<int64_t>(8, (total + wave - 1) / wave);
            int tiles = 0;
            for (int64_t base = base0; base <= 2 * base0; base += std::max<int64_t>(1, base0 / 16)) {
                tiles = tile_segments(in, n_out, base);
                if (tiles <= wave) {
                    break;
                }
            }
            if (tiles > wave) {
                tiles = tile_segments(in, n_out, base0);
            }
            if (in.kind == instr_kind::glu) {
                in.seg[1].rows_per_tile = in.seg[0].rows_per_tile;
                in.seg[1].tile_begin = 0;
            }
            if (in.fused_down) {  // its epilogue runs once, over the whole vector
                in.seg[2].rows_per_tile = in.seg[2].rows;
                in.seg[2].tile_begin = 0;
            }
            in.n_tiles = tiles;
        }
        for (size_t i = 0; i < p.instrs.size(); i++) {
            instruction & in = p.instrs[i];
            for (int d = 0; d < in.n_deps; d++) {
                if (in.deps[d].instr >= (int) i) {  // executors run instructions in list order
                    fail("unsupported-pattern", std::string("instruction ") + in.name + " reads a later one");
                }
                in.deps[d].needed = p.instrs[in.deps[d].instr].n_tiles;
            }
        }
    }

    uint64_t bytes_of(const instruction & in) const {
        uint64_t b = 0;
        switch (in.in.kind) {
            case in_kind::embed_row: b += in.in.src_row_bytes; break;
            case in_kind::attn_reduce: b += (uint64_t) in.in.n_head * in.in.n_split * (in.in.head_dim + 2) * 4; break;
            default: b += (uint64_t) in.in.n * 4; break;
        }
        if (!in.in.pre_src.null()) {  // y and the residual instead of src, and the weight
            b += (uint64_t) in.in.n * 4 * (in.in.pre_w.null() ? 1 : 2);
        }
        if (in.kind == instr_kind::delta) {  // the state read and written, q, k, v
            const delta_net & dn = p.deltas[in.attn];
            return (uint64_t) dn.n_head * dn.head_dim * dn.head_dim * 4 * 2 +
                   (uint64_t) (2 * dn.n_head_qk + dn.n_head) * dn.head_dim * 4;
        }
        if (in.kind == instr_kind::attn) {
            const attention & at = p.attns[in.attn];
            const uint64_t kb = ggml_row_size((ggml_type) at.k_type, at.head_dim_k);
            const uint64_t vb = ggml_row_size((ggml_type) at.v_type, at.head_dim_v);
            return (uint64_t) at.n_kv * at.n_head_kv * (kb + vb) + (uint64_t) at.n_head * at.head_dim_k * 4;
        }
        const int n = in.kind == instr_kind::vec ? 0 : in.n_segments;
        for (int s = 0; s < n; s++) {
            b += (uint64_t) in.seg[s].rows * in.seg[s].row_bytes;
        }
        if (in.fused_down) {
            b += (uint64_t) in.seg[2].rows * in.seg[2].row_bytes;
        }
        return b;
    }

    void run() {
        for (int i = 0; i < g->n_nodes; i++) {
            const ggml_tensor * t = g->nodes[i];
            if (is_view_op(t)) {
                continue;
            }
            for (int s = 0; s < GGML_MAX_SRC; s++) {
                if (t->src[s]) {
                    uses[root_of(t->src[s])]++;
                    if (t->src[s] != root_of(t->src[s])) {
                        uses[t->src[s]]++;  // for views that become values of their own (split_view)
                    }
                }
            }
        }
        for (int i = 0; i < g->n_nodes; i++) {
            const ggml_tensor * t = g->nodes[i];
            if (t->flags & GGML_TENSOR_FLAG_OUTPUT) {
                uses[t]++;
            }
        }
        find_delta_norms();
        for (int i = 0; i < g->n_nodes; i++) {
            const ggml_tensor * t = g->nodes[i];
            if (!is_view_op(t) && t->type != GGML_TYPE_F32 && t->op != GGML_OP_SET_ROWS) {
                fail("unsupported-type", "activation " + tname(t) + " is " + ggml_type_name(t->type));
            }
            node(t);
        }
        outputs();
        order_output_writes();
        if (tgt.fuse_down) {
            fuse_down();
        }
        if (tgt.fold_norms) {
            fold_norms();
        }
        if (tgt.defer_qk) {
            defer_qk();
        }
        tile();
        p.scratch_bytes = scratch;
        p.tgt = tgt;
        int max_layer = -1;
        for (const instruction & in : p.instrs) {
            max_layer = std::max<int>(max_layer, in.layer);
            p.bytes_read.push_back(bytes_of(in));
        }
        p.n_layers = max_layer + 1;
    }
};

}  // namespace

program compile(const ggml_cgraph * graph, const target & tgt) {
    compiler c;
    c.g = graph;
    c.tgt = tgt;
    c.run();
    return std::move(c.p);
}

std::vector<int> depths(const program & p) {
    std::vector<int> d(p.instrs.size(), 0);
    for (size_t i = 0; i < p.instrs.size(); i++) {
        for (int k = 0; k < p.instrs[i].n_deps; k++) {
            d[i] = std::max(d[i], d[p.instrs[i].deps[k].instr] + 1);
        }
    }
    return d;
}

static const char * kind_name(instr_kind k) {
    switch (k) {
        case instr_kind::vec: return "vec";
        case instr_kind::matvec: return "matvec";
        case instr_kind::glu: return "glu";
        case instr_kind::attn: return "attn";
        case instr_kind::delta: return "delta";
    }
    return "?";
}

static const char * in_name(in_kind k) {
    switch (k) {
        case in_kind::plain: return "plain";
        case in_kind::rms_norm: return "rms_norm";
        case in_kind::attn_reduce: return "attn_reduce";
        case in_kind::embed_row: return "embed_row";
    }
    return "?";
}

static const char * epi_name(epi_kind k) {
    switch (k) {
        case epi_kind::add: return "add";
        case epi_kind::mul: return "mul";
        case epi_kind::scale: return "scale";
        case epi_kind::rms_norm: return "rms_norm";
        case epi_kind::rope: return "rope";
        case epi_kind::store: return "store";
        case epi_kind::set_rows: return "set_rows";
        case epi_kind::unary: return "unary";
        case epi_kind::ssm_conv: return "ssm_conv";
    }
    return "?";
}

std::string explain_json(const program & p) {
    const std::vector<int> d = depths(p);
    std::string o = "{\"n_sm\":" + std::to_string(p.tgt.n_sm) + ",\"n_layers\":" + std::to_string(p.n_layers) +
                    ",\"scratch_bytes\":" + std::to_string(p.scratch_bytes) + ",\"instructions\":[";
    uint64_t total = 0;
    for (size_t i = 0; i < p.instrs.size(); i++) {
        const instruction & in = p.instrs[i];
        total += p.bytes_read[i];
        std::string segs = "[";
        const int nseg = in.kind == instr_kind::vec ? 1 : in.fused_down ? 3 : in.n_segments;
        for (int s = 0; s < nseg; s++) {
            const segment & sg = in.seg[s];
            std::string epi = "[";
            for (int e = 0; e < sg.n_epi; e++) {
                epi += (e ? "," : "") + json_str(epi_name(sg.epi[e].kind));
            }
            epi += "]";
            segs += (s ? "," : "") + std::string("{\"rows\":") + std::to_string(sg.rows) +
                    ",\"type\":" + json_str(in.kind == instr_kind::vec ? "" : ggml_type_name((ggml_type) sg.type)) +
                    ",\"rows_per_tile\":" + std::to_string(sg.rows_per_tile) + ",\"epilogue\":" + epi + "}";
        }
        segs += "]";
        std::string deps = "[";
        for (int k = 0; k < in.n_deps; k++) {
            deps += (k ? "," : "") + std::to_string(in.deps[k].instr);
        }
        deps += "]";
        o += (i ? "," : "") + std::string("{\"kind\":") + json_str(kind_name(in.kind)) +
             ",\"name\":" + json_str(in.name) + ",\"layer\":" + std::to_string(in.layer) +
             ",\"input\":" + json_str(std::string(in.in.pre_src.null() ? "" : "norm+") + in_name(in.in.kind)) + ",\"tiles\":" + std::to_string(in.n_tiles) +
             ",\"bytes\":" + std::to_string(p.bytes_read[i]) + ",\"depth\":" + std::to_string(d[i]) +
             ",\"deps\":" + deps + ",\"segments\":" + segs + (in.fused_down ? ",\"fused_down\":true" : "");
        if (in.kind == instr_kind::attn) {
            const attention & at = p.attns[in.attn];
            o += ",\"n_kv\":" + std::to_string(at.n_kv) + ",\"n_split\":" + std::to_string(at.n_split) +
                 ",\"heads\":" + std::to_string(at.n_head) + ",\"kv_heads\":" + std::to_string(at.n_head_kv) +
                 ",\"kv_row_known\":" + (at.kv_row.null() ? "false" : "true") +
                 ",\"merged_in_last_split\":" + (at.merged.null() ? "false" : "true");
            for (const auto & qk : {std::make_pair("q_ops", &at.q_ops), std::make_pair("k_ops", &at.k_ops)}) {
                std::string ops = "[";
                for (int e = 0; e < qk.second->n_epi; e++) {
                    ops += (e ? "," : "") + json_str(epi_name(qk.second->epi[e].kind));
                }
                o += std::string(",\"") + qk.first + "\":" + ops + "]";
            }
        }
        o += "}";
    }
    o += "],\"bytes_per_token\":" + std::to_string(total);
    // serial edges of each layer: depth of its first instruction to the depth of the next layer's first
    std::vector<int> first(p.n_layers + 1, -1);
    for (size_t i = 0; i < p.instrs.size(); i++) {
        const int l = p.instrs[i].layer;
        if (l >= 0 && first[l] < 0) {
            first[l] = (int) i;
        }
    }
    int max_depth = 0;
    for (int x : d) {
        max_depth = std::max(max_depth, x);
    }
    o += ",\"critical_path_edges\":" + std::to_string(max_depth) + ",\"edges_per_layer\":[";
    for (int l = 0; l + 1 < p.n_layers; l++) {
        int e = (first[l] >= 0 && first[l + 1] >= 0) ? d[first[l + 1]] - d[first[l]] : -1;
        o += (l ? "," : "") + std::to_string(e);
    }
    o += "]}";
    return o;
}

}  // namespace mk
