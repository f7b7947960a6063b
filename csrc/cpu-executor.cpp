// Op math follows ggml-cpu's definitions (rms_norm with a double sum, rope's iterative theta, softmax with the
// mask added after scaling); weights are dequantized with quants.h. Accumulation is in double so that the
// executor is a reference for the GPU rather than a copy of either side's rounding.
#include "cpu-executor.h"

#include "quants.h"

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

namespace mk {
namespace {

struct tile_ctx {
    const program & p;
    uint8_t * scratch;
    const std::vector<std::vector<uint8_t>> * k_before = nullptr, * v_before = nullptr;
    uint64_t epoch = 0;  // steps run before this one (the attention arrival counters are monotonic)

    template <typename T = float> T * ptr(const addr & a) const {
        return (T *) (a.scratch ? scratch + a.off : (uint8_t *) (uintptr_t) a.off);
    }
};

// Head h of an attention's partials (n_split of them, head_dim values each) merged into out[0, head_dim).
void merge_head(const float * part, int h, int n_split, int head_dim, float * out) {
    const int stride = head_dim + 2;
    float m = -INFINITY;
    for (int s = 0; s < n_split; s++) {
        m = std::max(m, part[(h * n_split + s) * stride]);
    }
    double den = 0.0;
    std::vector<double> num(head_dim, 0.0);
    for (int s = 0; s < n_split; s++) {
        const float * ps = part + (h * n_split + s) * stride;
        if (ps[0] == -INFINITY) {
            continue;
        }
        const double f = exp((double) ps[0] - m);
        den += f * ps[1];
        for (int d = 0; d < head_dim; d++) {
            num[d] += f * ps[2 + d];
        }
    }
    for (int d = 0; d < head_dim; d++) {
        out[d] = den > 0 ? (float) (num[d] / den) : 0.0f;
    }
}

void form_input(const tile_ctx & c, const vec_in & in, std::vector<float> & x, bool tile0 = false);

// vec_in::pre_src: src = pre_res + rms_norm(pre_src) * pre_w, as the vec instruction it replaces computed it (its
// input as form_input's rms_norm, then the epilogue's add); tile 0 stores it for the later readers.
void form_pre(const tile_ctx & c, const vec_in & in, bool store, std::vector<float> & src) {
    vec_in v = in;
    v.src = in.pre_src;
    v.w = in.pre_w;
    v.eps = in.pre_eps;
    v.pre_src = addr{};
    form_input(c, v, src);
    const float * r = c.ptr(in.pre_res);
    for (int i = 0; i < in.n; i++) {
        src[i] = src[i] + r[i];
    }
    if (store) {
        std::copy(src.begin(), src.end(), c.ptr(in.src));
    }
}

void form_input(const tile_ctx & c, const vec_in & in, std::vector<float> & x, bool tile0) {
    x.resize(in.n);
    std::vector<float> pre;
    if (!in.pre_src.null()) {
        form_pre(c, in, tile0, pre);
    }
    switch (in.kind) {
        case in_kind::plain: {
            const float * s = c.ptr(in.src);
            const float * gate = in.gate.null() ? nullptr : c.ptr(in.gate);
            for (int i = 0; i < in.n; i++) {
                x[i] = s[i] * (gate ? gate[i] : 1.0f);
            }
            return;
        }
        case in_kind::rms_norm: {
            const float * s = in.pre_src.null() ? c.ptr(in.src) : pre.data();
            const int row = in.norm_row ? in.norm_row : in.n;
            const float * w = in.w.null() ? nullptr : c.ptr(in.w);
            const float * gate = in.gate.null() ? nullptr : c.ptr(in.gate);
            for (int r0 = 0; r0 < in.n; r0 += row) {
                double sum = 0.0;
                for (int i = r0; i < r0 + row; i++) {
                    sum += (double) (s[i] * s[i]);
                }
                const float mean = (float) (sum / row);
                const float scale = 1.0f / sqrtf(mean + in.eps);
                for (int i = r0; i < r0 + row; i++) {
                    x[i] = s[i] * scale * (w ? w[i - r0] : 1.0f) * (gate ? gate[i] : 1.0f);
                }
            }
            return;
        }
        case in_kind::attn_reduce: {
            const float * part = c.ptr(in.src);
            for (int h = 0; h < in.n_head; h++) {
                merge_head(part, h, in.n_split, in.head_dim, x.data() + (size_t) h * in.head_dim);
            }
            if (!in.gate.null()) {
                const float * gate = c.ptr(in.gate);
                for (int i = 0; i < in.n; i++) {
                    x[i] *= gate[i];
                }
            }
            return;
        }
        case in_kind::embed_row: {
            const int32_t row = *c.ptr<const int32_t>(in.idx);
            dequant_row(in.src_type, c.ptr<const uint8_t>(in.src) + (uint64_t) row * in.src_row_bytes, x.data(), in.n);
            return;
        }
    }
}

// pos: the position streams (one for the plain modes, four for the multi-section ones). y holds columns [c0, c1)
// of one head's row: the whole row, or with adjacent pairs (mode 0) any even-aligned part of it (a tile may end
// inside a head); theta is iterated from the row's first pair either way, as ggml-cpu does.
void rope_row(const rope_params & rp, const int32_t * pos, float * y, int c0, int c1) {
    const bool multi = rp.mode == 8 || rp.mode == 40;
    float thetas[4];  // iterated separately, as ggml does, for the same rounding
    for (int k = 0; k < 4; k++) {
        thetas[k] = (float) pos[multi ? k : 0];
    }
    const float * ff = rp.freq_factors.null() ? nullptr : (const float *) (uintptr_t) rp.freq_factors.off;
    float * v = y + rp.n_offs - c0;  // v[i] is column n_offs + i; only columns in [c0, c1) are touched
    for (int i0 = 0; i0 < rp.n_dims; i0 += 2) {
        const float theta = thetas[rope_stream(rp, i0 / 2)];
        const float theta_extrap = theta / (ff ? ff[i0 / 2] : 1.0f);
        const float theta_interp = rp.freq_scale * theta_extrap;
        float th = theta_interp, mscale = rp.attn_factor;
        if (rp.ext_factor != 0.0f) {
            const float yr = (i0 / 2 - rp.corr_dims[0]) / std::max(0.001f, rp.corr_dims[1] - rp.corr_dims[0]);
            const float ramp = (1 - std::min(1.0f, std::max(0.0f, yr))) * rp.ext_factor;
            th = theta_interp * (1 - ramp) + theta_extrap * ramp;
            mscale *= 1.0f + 0.1f * logf(1.0f / rp.freq_scale);
        }
        const float cs = cosf(th) * mscale, sn = sinf(th) * mscale;
        const int a = rp.mode == 0 ? i0 : i0 / 2;           // normal: adjacent pairs; others: first and second half
        const int b = rp.mode == 0 ? i0 + 1 : i0 / 2 + rp.n_dims / 2;
        if (rp.n_offs + a >= c0 && rp.n_offs + b < c1) {
            const float x0 = v[a], x1 = v[b];
            v[a] = x0 * cs - x1 * sn;
            v[b] = x0 * sn + x1 * cs;
        }
        for (float & t : thetas) {
            t *= rp.theta_scale;
        }
    }
}

// y holds outputs [r0, r1) of the instruction's segment (element index j is global within the segment).
void epilogue(const tile_ctx & c, const segment & sg, float * y, int r0, int r1) {
    for (int k = 0; k < sg.n_epi; k++) {
        const epi_op & op = sg.epi[k];
        switch (op.kind) {
            case epi_kind::add: {
                const float * a = c.ptr(op.a);
                for (int j = r0; j < r1; j++) {
                    y[j - r0] += a[op.row_len ? j % op.row_len : j];
                }
                break;
            }
            case epi_kind::mul: {
                const float * a = c.ptr(op.a);
                for (int j = r0; j < r1; j++) {
                    y[j - r0] *= a[j % op.row_len];
                }
                break;
            }
            case epi_kind::scale:
                for (int j = r0; j < r1; j++) {
                    y[j - r0] = y[j - r0] * op.f0 + op.f1;
                }
                break;
            case epi_kind::rms_norm:
                for (int j = r0; j < r1; j += op.row_len) {
                    double sum = 0.0;
                    for (int i = 0; i < op.row_len; i++) {
                        sum += (double) (y[j - r0 + i] * y[j - r0 + i]);
                    }
                    const float scale = 1.0f / sqrtf((float) (sum / op.row_len) + op.f0);
                    for (int i = 0; i < op.row_len; i++) {
                        y[j - r0 + i] *= scale;
                    }
                }
                break;
            case epi_kind::rope: {
                const rope_params & rp = c.p.ropes[op.rope];
                const int32_t * pos = c.ptr<const int32_t>(rp.pos);
                for (int j = r0; j < r1;) {  // head by head; the first and last may be partial (mode 0 only)
                    const int c0 = j % op.row_len, c1 = std::min(op.row_len, c0 + (r1 - j));
                    if ((c0 != 0 || c1 != op.row_len) && (rp.mode != 0 || c0 % 2 != 0 || c1 % 2 != 0)) {
                        throw std::runtime_error("rope over part of a head in a mode that pairs its halves");
                    }
                    rope_row(rp, pos, y + (j - r0), c0, c1);
                    j += c1 - c0;
                }
                break;
            }
            case epi_kind::store: {
                float * o = c.ptr(op.a);
                std::copy(y, y + (r1 - r0), o + r0);
                break;
            }
            case epi_kind::unary:
                for (int j = r0; j < r1; j++) {
                    y[j - r0] = unary_apply(op.unary, y[j - r0]);
                }
                break;
            case epi_kind::ssm_conv: {  // row j is channel j
                const int d = op.row_len;
                const int32_t cell = *c.ptr<const int32_t>(op.idx);
                const float * old = (const float *) (c.ptr<const uint8_t>(op.b) + (uint64_t) cell * op.nb1);
                const float * kern = c.ptr(op.a);
                float * next = op.c.null() ? nullptr : c.ptr(op.c);
                for (int j = r0; j < r1; j++) {
                    y[j - r0] = conv_step(old + (size_t) j * (d - 1), kern + (size_t) j * d, d, y[j - r0],
                                          next ? next + (size_t) j * (d - 1) : nullptr);
                }
                break;
            }
            case epi_kind::set_rows: {
                uint8_t * dst = c.ptr<uint8_t>(op.a);
                const void * idx = c.ptr<const void>(op.idx);
                for (int j = r0; j < r1; j++) {
                    const int r = j / op.row_len, col = j % op.row_len;
                    const int64_t row = op.idx_type == T_I64 ? ((const int64_t *) idx)[r] : ((const int32_t *) idx)[r];
                    store_scalar(op.dst_type, dst, (uint64_t) row * op.nb1 + (uint64_t) col * op.nb0, y[j - r0]);
                }
                break;
            }
        }
    }
}

// x as segment sg's weight type sees it (ggml's activation rounding), computed once per tile and segment;
// `corr` is the Q8_1 block-sum correction (see round_activations).
struct act_vec {
    std::vector<float> v, corr;
};

const std::vector<float> & act_for(const segment & sg, const std::vector<float> & x, act_vec & buf) {
    static const bool exact = getenv("MK_DEBUG_EXACT") != nullptr;
    const int32_t act = exact ? T_F32 : act_type_of(sg.type);
    if (act == T_F32) {
        return x;
    }
    buf.v.resize(x.size());
    buf.corr.assign(act == T_Q8_1 ? x.size() / 32 : 0, 0.0f);
    round_activations(act, x.data(), buf.v.data(), (int) x.size(), buf.corr.empty() ? nullptr : buf.corr.data());
    return buf.v;
}

double dot_row(const segment & sg, const tile_ctx & c, int row, const std::vector<float> & x, const act_vec & a,
               std::vector<float> & w) {
    w.resize(x.size());
    const uint8_t * wr = c.ptr<const uint8_t>(sg.w) + (uint64_t) weight_row(sg, row) * sg.row_bytes;
    dequant_row(sg.type, wr, w.data(), (int64_t) x.size());
    double acc = 0.0;
    for (size_t i = 0; i < x.size(); i++) {
        acc += (double) w[i] * x[i];
    }
    if (!a.corr.empty() && (sg.type == T_Q4_1 || sg.type == T_Q5_1)) {
        const int bytes = info_of(sg.type).bytes;
        for (size_t b = 0; b < a.corr.size(); b++) {
            acc += (double) half_to_float(rd16(wr + b * bytes + 2)) * a.corr[b];  // block min * correction
        }
    }
    return acc;
}

// Bytes from the first to one past the last element of a cache view (all heads, all cells).
uint64_t cache_extent(int32_t type, int n_heads, uint64_t nb_head, int n_cells, uint64_t nb_cell, int n_dims, uint64_t nb_dim) {
    return (uint64_t) (n_heads - 1) * nb_head + (uint64_t) (n_cells - 1) * nb_cell + (uint64_t) (n_dims - 1) * nb_dim +
           info_of(type).bytes;
}

// The cell this step appends, or -1 when the attention does not know it.
int64_t appended_cell(const tile_ctx & c, const attention & at) {
    if (at.kv_row.null()) {
        return -1;
    }
    return at.kv_row_type == T_I64 ? *c.ptr<const int64_t>(at.kv_row) : *c.ptr<const int32_t>(at.kv_row);
}

void run_attn_tile(const tile_ctx & c, const attention & at, int a_index, int tile) {
    const int kvh = tile / at.n_split, split = tile % at.n_split;
    const int c0 = split * at.cells_per_split, c1 = std::min(at.n_kv, c0 + at.cells_per_split);
    const int group = at.n_head / at.n_head_kv;
    const int64_t appended = appended_cell(c, at);
    const uint8_t * k_live = c.ptr<const uint8_t>(at.k);
    const uint8_t * v_live = c.ptr<const uint8_t>(at.v);
    const uint8_t * k_old = appended >= 0 ? (*c.k_before)[a_index].data() : k_live;
    const uint8_t * v_old = appended >= 0 ? (*c.v_before)[a_index].data() : v_live;
    const int hd = at.head_dim_k;
    std::vector<float> q_heads(c.ptr(at.q) + (size_t) kvh * group * hd, c.ptr(at.q) + (size_t) (kvh + 1) * group * hd);
    if (at.q_ops.n_epi > 0) {  // the query's per-head norm and rope (the compiler's defer_qk)
        epilogue(c, at.q_ops, q_heads.data(), kvh * group * hd, (kvh + 1) * group * hd);
    }
    if (at.k_ops.n_epi > 0) {  // this token's K row: normed, rotated and written into the cache by the split holding it
        if (appended < 0 || appended >= at.n_kv) {
            throw std::runtime_error("the appended KV cell " + std::to_string(appended) + " is outside the attention's " +
                                     std::to_string(at.n_kv) + " cells");
        }
        if (appended >= c0 && appended < c1) {
            std::vector<float> k(c.ptr(at.k_new) + (size_t) kvh * hd, c.ptr(at.k_new) + (size_t) (kvh + 1) * hd);
            epilogue(c, at.k_ops, k.data(), kvh * hd, (kvh + 1) * hd);
        }
    }
    float * part = c.ptr(at.partials);
    for (int g = 0; g < group; g++) {
        const int h = kvh * group + g;
        std::vector<float> q(at.head_dim_k);
        round_activations(act_type_of(at.k_type), q_heads.data() + (size_t) g * hd, q.data(), at.head_dim_k);
        float m = -INFINITY;
        double l = 0.0;
        std::vector<double> acc(at.head_dim_v, 0.0);
        for (int cell = c0; cell < c1; cell++) {
            float mk = 0.0f;
            if (!at.mask.null()) {
                mk = load_scalar(at.mask_type, c.ptr<const void>(at.mask), (uint64_t) cell * (at.mask_type == T_F16 ? 2 : 4));
                if (mk == -INFINITY) {
                    continue;
                }
            }
            const uint8_t * kb = cell == appended ? k_live : k_old;
            const uint8_t * vb = cell == appended ? v_live : v_old;
            double s = 0.0;
            for (int d = 0; d < at.head_dim_k; d++) {
                s += (double) q[d] * load_scalar(at.k_type, kb, (uint64_t) kvh * at.k_nb_head + (uint64_t) cell * at.k_nb_cell + (uint64_t) d * at.k_nb_dim);
            }
            float sc = (float) s * at.scale;
            if (at.softcap != 0.0f) {
                sc = at.softcap * tanhf(sc / at.softcap);
            }
            sc += mk;
            const float m_new = std::max(m, sc);
            const double corr = m == -INFINITY ? 0.0 : exp((double) m - m_new);
            const double pexp = exp((double) sc - m_new);
            l = l * corr + pexp;
            for (int d = 0; d < at.head_dim_v; d++) {
                acc[d] = acc[d] * corr + pexp * load_scalar(at.v_type, vb, (uint64_t) kvh * at.v_nb_head + (uint64_t) cell * at.v_nb_cell + (uint64_t) d * at.v_nb_dim);
            }
            m = m_new;
        }
        float * o = part + ((size_t) h * at.n_split + split) * (at.head_dim_v + 2);
        o[0] = m;
        o[1] = (float) l;
        for (int d = 0; d < at.head_dim_v; d++) {
            o[2 + d] = (float) acc[d];
        }
    }
    if (!at.merged.null()) {  // the head group's last split to finish merges it (tiles may run in any order)
        uint64_t & arrived = c.ptr<uint64_t>(at.arrivals)[kvh];
        if (++arrived == (c.epoch + 1) * (uint64_t) at.n_split) {
            for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                merge_head(part, h, at.n_split, at.head_dim_v, c.ptr(at.merged) + (size_t) h * at.head_dim_v);
            }
        }
    }
}

// q or k of one head, with its rms_norm and scale (the L2 norm) applied as ggml does.
std::vector<float> delta_head(const float * src, int S, float eps, float scale) {
    std::vector<float> x(src, src + S);
    if (eps >= 0) {
        double sum = 0.0;
        for (float v : x) {
            sum += (double) (v * v);
        }
        const float f = 1.0f / sqrtf((float) (sum / S) + eps);
        for (float & v : x) {
            v *= f;
        }
    }
    for (float & v : x) {
        v *= scale;
    }
    return x;
}

void run_delta_tile(const tile_ctx & c, const delta_net & dn, int tile) {
    const int S = dn.head_dim, per_head = S / dn.rows_per_tile;
    const int h = tile / per_head, j0 = (tile % per_head) * dn.rows_per_tile;
    const int hqk = h % dn.n_head_qk;  // ggml: q/k head iv1 % neq1
    const std::vector<float> q = delta_head(c.ptr(dn.q) + (size_t) hqk * S, S, dn.q_eps, dn.q_scale);
    const std::vector<float> k = delta_head(c.ptr(dn.k) + (size_t) hqk * S, S, dn.k_eps, dn.k_scale);
    const float decay = expf(c.ptr(dn.g)[h]), beta = c.ptr(dn.beta)[h];
    const float * v = c.ptr(dn.v) + (size_t) h * S;
    const int32_t cell = *c.ptr<const int32_t>(dn.state_idx);
    const float * in = (const float *) (c.ptr<const uint8_t>(dn.state_in) + (uint64_t) cell * dn.state_nb) + (size_t) h * S * S;
    float * out_state = dn.state_out.null() ? nullptr : c.ptr(dn.state_out) + (size_t) h * S * S;
    float * out = c.ptr(dn.out) + (size_t) h * S;
    std::vector<double> r(S);
    for (int j = j0; j < j0 + dn.rows_per_tile; j++) {
        double kr = 0.0;
        for (int i = 0; i < S; i++) {
            r[i] = (double) (in[(size_t) j * S + i] * decay);
            kr += r[i] * k[i];
        }
        const double d = ((double) v[j] - kr) * beta;
        double qr = 0.0;
        for (int i = 0; i < S; i++) {
            r[i] += d * k[i];
            qr += r[i] * q[i];
        }
        out[j] = (float) qr * dn.scale;
        if (out_state) {
            for (int i = 0; i < S; i++) {
                out_state[(size_t) j * S + i] = (float) r[i];
            }
        }
    }
}

// A fused down projection (program.h, fused_down): glu rows [r0, r1) times the same columns of seg[2], added into
// the fixed-point sums; the step's last tile turns them into the vector and runs seg[2]'s epilogue on it.
void down_partial(const tile_ctx & c, const instruction & in, const std::vector<float> & y, int r0, int r1, bool last) {
    const segment & dw = in.seg[2];
    if (info_of(dw.type).block > slice_span(dw.type)) {
        // K-quants: a tile holds a quarter of a block, and ggml-cpu rounds their input in blocks of 256 (Q8_K):
        // gather the glu values, and the last tile dots the whole vector (the GPU rounds to q8_1, 32 values, as
        // ggml-cuda does, and takes the tile's part)
        float * gathered = (float *) (c.ptr<uint8_t>(in.down_acc) + (uint64_t) dw.rows * 8 + 8);
        std::copy(y.begin(), y.end(), gathered + r0);
        if (last) {
            const std::vector<float> x(gathered, gathered + in.seg[0].rows);
            act_vec xa;
            const std::vector<float> & xr = act_for(dw, x, xa);
            std::vector<float> v(dw.rows), w;
            for (int o = 0; o < dw.rows; o++) {
                v[o] = (float) dot_row(dw, c, o, xr, xa, w);
            }
            epilogue(c, dw, v.data(), 0, dw.rows);
        }
        return;
    }
    act_vec buf;
    const std::vector<float> & ya = act_for(dw, y, buf);  // tiles hold whole 32-blocks: as rounding the whole vector
    long long * acc = c.ptr<long long>(in.down_acc);
    const int block = info_of(dw.type).block, bytes = info_of(dw.type).bytes;
    std::vector<float> w(r1 - r0);
    for (int o = 0; o < dw.rows; o++) {
        const uint8_t * wr = c.ptr<const uint8_t>(dw.w) + (uint64_t) o * dw.row_bytes + (uint64_t) (r0 / block) * bytes;
        dequant_row(dw.type, wr, w.data(), r1 - r0);
        double s = 0.0;
        for (int j = 0; j < r1 - r0; j++) {
            s += (double) w[j] * ya[j];
        }
        acc[o] += to_fixed((float) s);
    }
    if (last) {
        std::vector<float> v(dw.rows);
        for (int o = 0; o < dw.rows; o++) {
            v[o] = from_fixed(acc[o]);
            acc[o] = 0;
        }
        epilogue(c, dw, v.data(), 0, dw.rows);
    }
}

// last: no other tile of the instruction is still to run in this step
void run_tile(const tile_ctx & c, const instruction & in, int tile, bool last) {
    if (in.kind == instr_kind::attn) {
        run_attn_tile(c, c.p.attns[in.attn], in.attn, tile);
        return;
    }
    if (in.kind == instr_kind::delta) {
        run_delta_tile(c, c.p.deltas[in.attn], tile);
        return;
    }
    std::vector<float> x, w;
    form_input(c, in.in, x, tile == 0);
    if (in.kind == instr_kind::vec) {
        epilogue(c, in.seg[0], x.data(), 0, in.in.n);
        return;
    }
    const tile_rows tr = rows_of(in, tile);
    const int s = tr.seg, r0 = tr.r0, r1 = tr.r1;
    const segment & sg = in.seg[s];
    std::vector<float> y(r1 - r0);
    act_vec xa0, xa1;
    const std::vector<float> & x0 = act_for(in.seg[in.kind == instr_kind::glu ? 0 : s], x, xa0);
    const std::vector<float> & x1 = in.kind == instr_kind::glu ? act_for(in.seg[1], x, xa1) : x0;
    const act_vec & a1 = in.kind == instr_kind::glu ? xa1 : xa0;
    for (int r = r0; r < r1; r++) {
        if (in.kind == instr_kind::glu) {
            float g = (float) dot_row(in.seg[0], c, r, x0, xa0, w);
            float u = (float) dot_row(in.seg[1], c, r, x1, a1, w);
            if (in.glu_swapped) {
                std::swap(g, u);
            }
            y[r - r0] = glu_gate(in.glu_op, g) * u;
        } else {
            y[r - r0] = (float) dot_row(sg, c, r, x0, xa0, w);
        }
    }
    epilogue(c, sg, y.data(), r0, r1);
    if (in.fused_down) {
        down_partial(c, in, y, r0, r1, last);
    }
}

}  // namespace

void cpu_executor::run(const program & p, long long shuffle_seed) {
    if (prog != &p) {  // a new program: fresh counters
        prog = &p;
        counters.assign(p.instrs.size(), 0);
        epoch = 0;
    }
    if (epoch == 0) {  // a new program: zeroed scratch (the fused down projections' sums start at 0)
        scratch.assign(std::max<size_t>(scratch.size(), p.scratch_bytes), 0);
    }
    if (scratch.size() < p.scratch_bytes) {
        scratch.resize(p.scratch_bytes);
    }
    tile_ctx c{p, scratch.data(), &k_before, &v_before, epoch};
    k_before.resize(p.attns.size());
    v_before.resize(p.attns.size());
    for (size_t a = 0; a < p.attns.size(); a++) {
        const attention & at = p.attns[a];
        if (appended_cell(c, at) < 0) {
            continue;
        }
        const uint64_t kn = cache_extent(at.k_type, at.n_head_kv, at.k_nb_head, at.n_kv, at.k_nb_cell, at.head_dim_k, at.k_nb_dim);
        const uint64_t vn = cache_extent(at.v_type, at.n_head_kv, at.v_nb_head, at.n_kv, at.v_nb_cell, at.head_dim_v, at.v_nb_dim);
        const uint8_t * k = c.ptr<const uint8_t>(at.k);
        const uint8_t * v = c.ptr<const uint8_t>(at.v);
        k_before[a].assign(k, k + kn);
        v_before[a].assign(v, v + vn);
    }
    const int n = (int) p.instrs.size();
    auto ready = [&](int i) {
        const instruction & in = p.instrs[i];
        for (int d = 0; d < in.n_deps; d++) {
            const dep & dp = in.deps[d];
            if (counters[dp.instr] < epoch * (uint64_t) p.instrs[dp.instr].n_tiles + (uint64_t) dp.needed) {
                return false;
            }
        }
        return true;
    };
    if (shuffle_seed < 0) {
        for (int i = 0; i < n; i++) {
            if (!ready(i)) {
                throw std::runtime_error(std::string("dependencies of ") + p.instrs[i].name + " not met in order");
            }
            for (int t = 0; t < p.instrs[i].n_tiles; t++) {
                run_tile(c, p.instrs[i], t, t + 1 == p.instrs[i].n_tiles);
                counters[i]++;
            }
        }
    } else {
        std::mt19937_64 rng((uint64_t) shuffle_seed + epoch);
        std::vector<std::pair<int, int>> pool;  // runnable tiles
        std::vector<int> waiting;
        for (int i = 0; i < n; i++) {
            waiting.push_back(i);
        }
        auto admit = [&]() {
            std::vector<int> still;
            for (int i : waiting) {
                if (ready(i)) {
                    for (int t = 0; t < p.instrs[i].n_tiles; t++) {
                        pool.emplace_back(i, t);
                    }
                } else {
                    still.push_back(i);
                }
            }
            waiting.swap(still);
        };
        admit();
        while (!pool.empty()) {
            size_t k = rng() % pool.size();
            std::pair<int, int> job = pool[k];
            pool[k] = pool.back();
            pool.pop_back();
            const uint64_t T = (uint64_t) p.instrs[job.first].n_tiles;
            run_tile(c, p.instrs[job.first], job.second, counters[job.first] + 1 == (epoch + 1) * T);
            counters[job.first]++;
            admit();
        }
        if (!waiting.empty()) {
            throw std::runtime_error(std::string("instruction ") + p.instrs[waiting[0]].name + " never became ready");
        }
    }
    epoch++;
}

}  // namespace mk
