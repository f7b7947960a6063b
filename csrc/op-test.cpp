// Per-op checks against ggml-cpu: build a small ggml graph with random weights and inputs, compute it with the
// stock CPU backend, compile the same graph and run it on the CPU executor, and report how far apart the results
// are. tests/test_compiler.py calls this through the C API with fresh seeds and asserts the tolerances.
//
//   matvec: y = W x                       (one weight type, activation rounding as ggml defines it)
//   glu:    y = act(W_gate x) * (W_up x)  (the gated activation ggml_glu_op n_kv: REGLU, GEGLU, SWIGLU, ...)
//   layer:  one llama layer (norm, QKV, rope, KV append into F16 caches, attention with or without flash
//           attention, O + residual, norm, gate/up/SwiGLU, down + residual) and the LM head
//   layer-hd256: the same with one head of size 256 and one KV head (gemma3's attention shape)
#include "compiler.h"
#include "cpu-executor.h"
#include "json.h"
#include "llama-megakernel.h"
#include "path-choice.h"
#include "quants.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct rnd {
    std::mt19937 g;
    explicit rnd(int seed) : g((uint32_t) seed) {}
    std::vector<float> normal(size_t n, float std) {
        std::normal_distribution<float> d(0.0f, std);
        std::vector<float> v(n);
        for (float & x : v) x = d(g);
        return v;
    }
};

void set_weight(ggml_tensor * t, const std::vector<float> & v) {
    std::vector<uint8_t> q(ggml_nbytes(t));
    ggml_quantize_chunk(t->type, v.data(), q.data(), 0, t->ne[1], t->ne[0], nullptr);
    ggml_backend_tensor_set(t, q.data(), 0, q.size());
}

std::vector<float> get_f32(const ggml_tensor * t) {
    std::vector<float> v(ggml_nelements(t));
    ggml_backend_tensor_get(t, v.data(), 0, v.size() * 4);
    return v;
}

std::string compare(const std::vector<float> & ref, const std::vector<float> & got) {
    double max_abs = 0, ss_ref = 0, dot = 0, ss_got = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        max_abs = std::max(max_abs, (double) std::fabs(ref[i] - got[i]));
        ss_ref += (double) ref[i] * ref[i];
        ss_got += (double) got[i] * got[i];
        dot += (double) ref[i] * got[i];
    }
    const double rms = std::sqrt(ss_ref / std::max<size_t>(1, ref.size()));
    const double cos = dot / std::sqrt(std::max(1e-300, ss_ref * ss_got));
    char b[200];
    snprintf(b, sizeof b, "{\"max_abs\":%.6g,\"ref_rms\":%.6g,\"rel\":%.6g,\"cos\":%.9f}", max_abs, rms,
             max_abs / std::max(rms, 1e-30), cos);
    return b;
}

std::vector<uint8_t> get_bytes(const ggml_tensor * t) {
    std::vector<uint8_t> v(ggml_nbytes(t));
    ggml_backend_tensor_get(t, v.data(), 0, v.size());
    return v;
}

std::vector<float> f16_row(const std::vector<uint8_t> & bytes, size_t off_elems, size_t n, size_t stride_elems) {
    std::vector<float> v(n);
    const ggml_fp16_t * h = (const ggml_fp16_t *) bytes.data();
    for (size_t i = 0; i < n; i++) v[i] = ggml_fp16_to_fp32(h[off_elems + i * stride_elems]);
    return v;
}

// Value i of a planar row (quants.h: planar_block), read from the layout as its comment documents it; written apart
// from planar_block, so the check below compares the code with the documented layout.
float planar_value(int t, const uint8_t * row, int64_t nb, int64_t i) {
    const int64_t blk = i / mk::info_of(t).block, j = i % mk::info_of(t).block;
    switch (t) {
        case mk::T_Q4_0: {
            const uint8_t q = row[16 * blk + j % 16];
            return mk::half_to_float(mk::rd16(row + 16 * nb + 2 * blk)) * ((j < 16 ? q & 0xf : q >> 4) - 8);
        }
        case mk::T_Q4_1: {
            const uint8_t q = row[16 * blk + j % 16];
            const uint8_t * dm = row + 16 * nb + 4 * blk;
            return mk::half_to_float(mk::rd16(dm)) * (j < 16 ? q & 0xf : q >> 4) + mk::half_to_float(mk::rd16(dm + 2));
        }
        case mk::T_Q5_1: {
            const uint8_t q = row[16 * blk + j % 16];
            const uint32_t qh = row[16 * nb + 4 * blk + j / 8] >> (j % 8) & 1;
            const int v = (j < 16 ? q & 0xf : q >> 4) | (int) (qh << 4);
            const uint8_t * dm = row + 20 * nb + 4 * blk;
            return mk::half_to_float(mk::rd16(dm)) * v + mk::half_to_float(mk::rd16(dm + 2));
        }
        case mk::T_Q5_0: {
            const uint8_t q = row[16 * blk + j % 16];
            const uint32_t qh = row[16 * nb + 4 * blk + j / 8] >> (j % 8) & 1;  // bit j of the block's qh
            const int v = (j < 16 ? q & 0xf : q >> 4) | (int) (qh << 4);
            return mk::half_to_float(mk::rd16(row + 20 * nb + 2 * blk)) * (v - 16);
        }
        case mk::T_Q8_0:
            return mk::half_to_float(mk::rd16(row + 32 * nb + 2 * blk)) * (float) (int8_t) row[16 * ((j / 16) * nb + blk) + j % 16];
        case mk::T_Q4_K: {
            const int c = (int) j / 64, hi = (int) (j % 64) / 32, l = (int) j % 32;  // byte 32c + l of the quants
            const int64_t U = 4 * blk + c;
            const uint8_t q = row[16 * ((l / 16) * 4 * nb + U) + l % 16];
            const uint8_t * hd = row + 128 * nb + 16 * blk;
            int sc, m;
            mk::k_scale_min(2 * c + hi, hd + 4, sc, m);
            return mk::half_to_float(mk::rd16(hd)) * sc * (hi ? q >> 4 : q & 0xf) - mk::half_to_float(mk::rd16(hd + 2)) * m;
        }
        case mk::T_Q5_K: {
            const int c = (int) j / 64, hi = (int) (j % 64) / 32, l = (int) j % 32;
            const int64_t U = 4 * blk + c;
            const uint8_t q = row[16 * ((l / 16) * 4 * nb + U) + l % 16];
            const uint8_t * hd = row + 128 * nb + 16 * blk;
            const int h = (row[144 * nb + 32 * blk + l] >> (2 * c + hi)) & 1;
            int sc, m;
            mk::k_scale_min(2 * c + hi, hd + 4, sc, m);
            return mk::half_to_float(mk::rd16(hd)) * sc * ((hi ? q >> 4 : q & 0xf) | (h << 4)) -
                   mk::half_to_float(mk::rd16(hd + 2)) * m;
        }
        case mk::T_Q6_K: {
            const int h = (int) j / 128, qq = (int) (j % 128) / 32, l = (int) j % 32;  // quarter qq, index l of half h
            const int64_t U = 4 * blk + 2 * h + l / 16;
            const uint8_t lo = row[16 * ((qq % 2) * 4 * nb + U) + l % 16];
            const uint8_t hb = row[16 * (8 * nb + U) + l % 16];
            const int v = ((qq < 2 ? lo & 0xf : lo >> 4) | (((hb >> (2 * qq)) & 3) << 4)) - 32;
            const int8_t sc = (int8_t) row[192 * nb + 4 * U + qq];
            return mk::half_to_float(mk::rd16(row + 208 * nb + 2 * blk)) * sc * v;
        }
        default:
            return NAN;
    }
}

// Planar copies of `rows` random rows of nb blocks (ggml's quantization of random values): every byte of the GGUF
// blocks is moved exactly once (the planar rows hold a permutation of them), back again unchanged, and the values
// read from the documented layout are the GGUF blocks' values.
std::string planar_test(int t, int64_t nb, int seed) {
    const mk::type_info ti = mk::info_of(t);
    if (!mk::planar_type(t)) throw std::runtime_error("not a planar type");
    const int rows = 3;
    rnd r(seed);
    const std::vector<float> v = r.normal((size_t) rows * nb * ti.block, 1.0f);
    std::vector<uint8_t> q((size_t) rows * nb * ti.bytes);
    ggml_quantize_chunk((ggml_type) t, v.data(), q.data(), 0, rows, nb * ti.block, nullptr);
    const uint64_t stride = mk::planar_row_bytes(t, nb);
    std::vector<uint8_t> planar((size_t) rows * stride, 0), back(q.size(), 0);
    std::vector<int> writes((size_t) rows * stride, 0);
    long long misplaced = 0, changed = 0, value_mismatch = 0;
    for (int row = 0; row < rows; row++) {
        for (int64_t b = 0; b < nb; b++) {
            std::vector<uint8_t> blk(q.begin() + (row * nb + b) * ti.bytes, q.begin() + (row * nb + b + 1) * ti.bytes);
            std::vector<uint8_t> mark(ti.bytes, 0xA5), probe((size_t) stride, 0);
            mk::planar_block(t, mark.data(), probe.data(), nb, b, true);  // which planar bytes this block owns
            for (uint64_t i = 0; i < stride; i++) writes[row * stride + i] += probe[i] == 0xA5;
            mk::planar_block(t, blk.data(), planar.data() + row * stride, nb, b, true);
        }
        for (int64_t b = 0; b < nb; b++) {
            mk::planar_block(t, back.data() + (row * nb + b) * ti.bytes, planar.data() + row * stride, nb, b, false);
        }
        std::vector<float> ref((size_t) nb * ti.block);
        mk::dequant_row(t, q.data() + row * nb * ti.bytes, ref.data(), nb * ti.block);
        for (int64_t i = 0; i < nb * ti.block; i++) {
            value_mismatch += planar_value(t, planar.data() + row * stride, nb, i) != ref[i];
        }
    }
    for (uint64_t i = 0; i < writes.size(); i++) {
        const bool data = i % stride < (uint64_t) nb * ti.bytes;  // bytes past nb * bytes are the row's padding
        misplaced += data ? writes[i] != 1 : writes[i] != 0;
    }
    for (size_t i = 0; i < q.size(); i++) changed += back[i] != q[i];
    return "{\"row_bytes\":" + std::to_string(stride) + ",\"bytes_not_written_once\":" + std::to_string(misplaced) +
           ",\"roundtrip_changed\":" + std::to_string(changed) + ",\"value_mismatch\":" + std::to_string(value_mismatch) + "}";
}

// Value v of unit P of a fused down projection's slice of np units (quants.h: slice_put), read from the layout as
// its comment documents it.
float slice_value(int t, const uint8_t * s, int64_t np, int64_t P, int v) {
    switch (t) {
        case mk::T_Q4_K: case mk::T_Q5_K: {
            const int hi = v / 32, l = v % 32;
            const uint8_t q = s[16 * ((l / 16) * np + P) + l % 16];
            const uint8_t * sd = s + 32 * np + 8 * P;
            int n = hi ? q >> 4 : q & 0xf;
            if (t == mk::T_Q5_K) n |= ((s[40 * np + 8 * P + 4 * hi + l / 8] >> (l % 8)) & 1) << 4;
            return mk::half_to_float(mk::rd16(sd)) * sd[4 + 2 * hi] * n - mk::half_to_float(mk::rd16(sd + 2)) * sd[5 + 2 * hi];
        }
        case mk::T_Q6_K: {
            const int G = v / 16, b = v % 16;
            const uint8_t q = s[16 * ((G % 2) * np + P) + b];
            const int h2 = (s[16 * (2 * np + P) + b] >> (2 * G)) & 3;
            const uint8_t * sd = s + 48 * np + 8 * P;
            return mk::half_to_float(mk::rd16(sd + 4)) * (int8_t) sd[G] * (((G < 2 ? q & 0xf : q >> 4) | (h2 << 4)) - 32);
        }
        default:
            return planar_value(t, s, np, P * 32 + v);
    }
}

// Slices of a matrix of D random rows of nb blocks, nbs spans to a slice (the last one shorter when they do not
// divide): every byte of every slice is written (two fills give the same slices), and each value read from the
// documented layout is the GGUF blocks' value.
std::string slice_test(int t, int64_t nb, int nbs, int seed) {
    const mk::type_info ti = mk::info_of(t);
    const int span = mk::slice_span(t), D = 5;
    if (span == 0) throw std::runtime_error("no slices for this type");
    rnd r(seed);
    const std::vector<float> v = r.normal((size_t) D * nb * ti.block, 1.0f);
    std::vector<uint8_t> q((size_t) D * nb * ti.bytes);
    ggml_quantize_chunk((ggml_type) t, v.data(), q.data(), 0, D, nb * ti.block, nullptr);
    const int64_t nu = nb * ti.block / span, n_slices = (nu + nbs - 1) / nbs, np = (int64_t) nbs * D;
    const uint64_t bytes = mk::slice_bytes(t, np);
    std::vector<uint8_t> a((size_t) n_slices * bytes, 0x00), b((size_t) n_slices * bytes, 0xff);
    for (int o = 0; o < D; o++) {
        for (int64_t u = 0; u < nu; u++) {
            const uint8_t * blk = q.data() + ((size_t) o * nb + u / (ti.block / span)) * ti.bytes;
            for (auto * dst : {&a, &b}) {
                mk::slice_put(t, blk, (int) (u % (ti.block / span)), dst->data() + (u / nbs) * bytes, np, (u % nbs) * D + o);
            }
        }
    }
    long long unwritten = 0, value_mismatch = 0;
    // the padding of Q4_0/Q8_0's planar rows (to 16 bytes) and the units of a last, shorter slice stay unwritten
    const uint64_t data = span == ti.block ? (uint64_t) ti.bytes * np : bytes;
    for (int64_t u = 0; u < n_slices; u++) {
        const int64_t used = std::min<int64_t>(nbs, nu - u * nbs) * D;
        for (uint64_t i = 0; i < data; i++) {
            unwritten += used == np && a[u * bytes + i] != b[u * bytes + i];
        }
    }
    std::vector<float> ref((size_t) nb * ti.block);
    for (int o = 0; o < D; o++) {
        mk::dequant_row(t, q.data() + (size_t) o * nb * ti.bytes, ref.data(), nb * ti.block);
        for (int64_t u = 0; u < nu; u++) {
            for (int k = 0; k < span; k++) {
                const float got = slice_value(t, a.data() + (u / nbs) * bytes, np, (u % nbs) * D + o, k);
                value_mismatch += got != ref[u * span + k];
            }
        }
    }
    return "{\"slice_bytes\":" + std::to_string(bytes) + ",\"bytes_unwritten\":" + std::to_string(unwritten) +
           ",\"value_mismatch\":" + std::to_string(value_mismatch) + "}";
}

// The auto mode's choice on a synthetic clock: a token costs exec_us on the executor and stock_us on stock, each
// +-10% at random; pause > 0: every pause-th call is followed by a 1 s pause (a user reading); pause < 0: every call
// brings a new program (no interval can be measured). Runs until the choice is made.
std::string path_choice_test(int exec_us, int stock_us, int pause, int seed) {
    using clock = mk::path_choice::clock;
    std::mt19937 g((uint32_t) seed);
    std::uniform_real_distribution<double> jitter(0.9, 1.1);
    mk::path_choice pc;
    clock::time_point t{};
    int n[2] = {0, 0}, calls = 0;
    for (; calls < 1000; calls++) {
        if (pause < 0) {
            pc.new_program();
        }
        const int p = pc.pick(t);
        if (pc.decided >= 0) {
            break;
        }
        pc.ran(p, t);
        n[p]++;
        double us = (p == mk::path_choice::executor ? exec_us : stock_us) * jitter(g);
        if (pause > 0 && calls % pause == pause - 1) {
            us += 1e6;
        }
        t += std::chrono::microseconds((long long) us);
    }
    char b[256];
    snprintf(b, sizeof b,
             "{\"choice\":\"%s\",\"calls\":%d,\"executor_calls\":%d,\"stock_calls\":%d,\"samples\":[%zu,%zu],"
             "\"executor_us\":%.1f,\"stock_us\":%.1f}",
             pc.state(), calls, n[mk::path_choice::executor], n[mk::path_choice::stock],
             pc.us[mk::path_choice::executor].size(), pc.us[mk::path_choice::stock].size(),
             pc.median_us[mk::path_choice::executor], pc.median_us[mk::path_choice::stock]);
    return b;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) size_t llama_mk_op_test(const char * what, int wtype, int flash_attn, int n_kv, int seed, char * out,
                                   size_t size) {
    std::string result;
    ggml_backend_t cpu = nullptr;
    ggml_context * cw = nullptr;
    ggml_context * ckv = nullptr;
    ggml_context * cg = nullptr;
    ggml_backend_buffer_t wbuf = nullptr, kvbuf = nullptr;
    ggml_gallocr_t galloc = nullptr;
    try {
        const ggml_type wt = (ggml_type) wtype;
        // layer-hd256: one head of size 256 and one KV head (gemma3's attention shape)
        const bool wide = std::string(what) == "layer-hd256";
        const bool layer = wide || std::string(what) == "layer";
        const bool glu = std::string(what) == "glu";
        if (std::string(what) == "planar") {  // n_kv: blocks per row
            return mk::copy_out(planar_test(wtype, n_kv, seed), out, size);
        }
        if (std::string(what) == "path-choice") {  // wtype: executor us a token, n_kv: stock's, flash_attn: pauses
            return mk::copy_out(path_choice_test(wtype, n_kv, flash_attn, seed), out, size);
        }
        if (std::string(what) == "slice") {  // n_kv: blocks per row, flash_attn: spans per slice
            return mk::copy_out(slice_test(wtype, n_kv, flash_attn, seed), out, size);
        }
        if (!layer && !glu && std::string(what) != "matvec") {
            throw std::runtime_error(std::string("unknown op test ") + what);
        }
        const int n_embd = 256, n_head = wide ? 1 : 4, n_head_kv = wide ? 1 : 2, hd = wide ? 256 : 64, n_ff = 512,
                  n_vocab = 1024, R = 384;
        const int n_gqa = hd * n_head_kv;
        const int cell = std::max(1, n_kv) - 1;  // this token's cache cell; cells before it hold a context
        rnd r(seed);
        cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
        if (!cpu) throw std::runtime_error("no CPU backend");

        ggml_init_params wp = {64 * ggml_tensor_overhead(), nullptr, true};
        cw = ggml_init(wp);
        ckv = ggml_init(wp);
        ggml_init_params gp = {512 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true};
        cg = ggml_init(gp);

        auto W = [&](const char * name, int k, int rows) {
            ggml_tensor * t = ggml_new_tensor_2d(cw, wt, k, rows);
            ggml_set_name(t, name);
            return t;
        };
        auto V = [&](const char * name, int n) {
            ggml_tensor * t = ggml_new_tensor_1d(cw, GGML_TYPE_F32, n);
            ggml_set_name(t, name);
            return t;
        };
        ggml_cgraph * gf = ggml_new_graph_custom(cg, 512, false);
        std::vector<std::pair<ggml_tensor *, std::vector<float>>> weights, vectors;
        std::vector<ggml_tensor *> outputs;
        ggml_tensor * x = ggml_new_tensor_2d(cg, GGML_TYPE_F32, layer ? n_embd : n_ff, 1);
        ggml_set_name(x, "x");
        ggml_set_input(x);
        ggml_tensor *k_cache = nullptr, *v_cache = nullptr, *pos = nullptr, *kidx = nullptr, *vidx = nullptr,
                    *mask = nullptr;
        if (glu) {
            auto mm = [&](const char * name) {
                ggml_tensor * w = W(name, n_ff, R);
                weights.push_back({w, r.normal((size_t) n_ff * R, 1.5f / std::sqrt((float) n_ff))});
                return ggml_mul_mat(cg, w, x);
            };
            ggml_tensor * gate = mm("w_gate");
            ggml_tensor * up = mm("w_up");
            ggml_tensor * y = ggml_glu_split(cg, gate, up, (ggml_glu_op) n_kv);
            ggml_set_name(y, "y");
            ggml_set_output(y);
            outputs.push_back(y);
            ggml_build_forward_expand(gf, y);
        } else if (!layer) {
            ggml_tensor * w = W("w", n_ff, R);
            weights.push_back({w, r.normal((size_t) n_ff * R, 1.0f / std::sqrt((float) n_ff))});
            ggml_tensor * y = ggml_mul_mat(cg, w, x);
            ggml_set_name(y, "y");
            ggml_set_output(y);
            outputs.push_back(y);
            ggml_build_forward_expand(gf, y);
        } else {
            const float eps = 1e-5f;
            auto mm = [&](const char * name, int k, int rows, ggml_tensor * in, const char * out_name) {
                ggml_tensor * w = W(name, k, rows);
                weights.push_back({w, r.normal((size_t) k * rows, 1.0f / std::sqrt((float) k))});
                ggml_tensor * y = ggml_mul_mat(cg, w, in);
                ggml_set_name(y, out_name);
                return y;
            };
            auto norm = [&](ggml_tensor * in, const char * wname, const char * out_name) {
                ggml_tensor * w = V(wname, n_embd);
                vectors.push_back({w, r.normal(n_embd, 0.2f)});
                for (float & f : vectors.back().second) f += 1.0f;
                ggml_tensor * y = ggml_mul(cg, ggml_rms_norm(cg, in, eps), w);
                ggml_set_name(y, out_name);
                return y;
            };
            k_cache = ggml_new_tensor_2d(ckv, GGML_TYPE_F16, n_gqa, n_kv);
            ggml_set_name(k_cache, "cache_k_l0");
            v_cache = ggml_new_tensor_2d(ckv, GGML_TYPE_F16, n_gqa, n_kv);
            ggml_set_name(v_cache, "cache_v_l0");
            pos = ggml_new_tensor_1d(cg, GGML_TYPE_I32, 1);
            ggml_set_input(pos);
            kidx = ggml_new_tensor_1d(cg, GGML_TYPE_I64, 1);
            ggml_set_input(kidx);
            vidx = ggml_new_tensor_1d(cg, GGML_TYPE_I64, flash_attn ? 1 : n_gqa);
            ggml_set_input(vidx);
            mask = ggml_new_tensor_2d(cg, flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32, n_kv, 1);
            ggml_set_input(mask);

            ggml_tensor * cur = norm(x, "attn_norm", "attn_norm-0");
            ggml_tensor * q = mm("wq", n_embd, n_embd, cur, "Qcur-0");
            ggml_tensor * k = mm("wk", n_embd, n_gqa, cur, "Kcur-0");
            ggml_tensor * v = mm("wv", n_embd, n_gqa, cur, "Vcur-0");
            q = ggml_rope_ext(cg, ggml_reshape_3d(cg, q, hd, n_head, 1), pos, nullptr, hd, 0, 8192, 500000.0f,
                              1.0f, 0.0f, 1.0f, 32.0f, 1.0f);
            k = ggml_rope_ext(cg, ggml_reshape_3d(cg, k, hd, n_head_kv, 1), pos, nullptr, hd, 0, 8192,
                              500000.0f, 1.0f, 0.0f, 1.0f, 32.0f, 1.0f);
            v = ggml_reshape_3d(cg, v, hd, n_head_kv, 1);
            ggml_build_forward_expand(gf, ggml_set_rows(cg, k_cache, ggml_view_2d(cg, k, n_gqa, 1, k->nb[2], 0), kidx));
            if (flash_attn) {
                ggml_build_forward_expand(gf, ggml_set_rows(cg, v_cache, ggml_view_2d(cg, v, n_gqa, 1, v->nb[2], 0), vidx));
            } else {
                ggml_tensor * vv = ggml_reshape_2d(cg, v_cache, 1, ggml_nelements(v_cache));
                ggml_build_forward_expand(gf, ggml_set_rows(cg, vv, ggml_reshape_2d(cg, v, 1, n_gqa), vidx));
            }
            const size_t e = ggml_element_size(k_cache);
            ggml_tensor * kv = ggml_permute(cg, ggml_view_3d(cg, k_cache, hd, n_head_kv, n_kv, e * hd, e * n_gqa, 0), 0, 2, 1, 3);
            ggml_tensor * qp = ggml_permute(cg, q, 0, 2, 1, 3);
            const float scale = 1.0f / std::sqrt((float) hd);
            ggml_tensor * o;
            if (flash_attn) {
                ggml_tensor * vv = ggml_permute(cg, ggml_view_3d(cg, v_cache, hd, n_head_kv, n_kv, e * hd, e * n_gqa, 0), 0, 2, 1, 3);
                o = ggml_flash_attn_ext(cg, qp, kv, vv, mask, scale, 0.0f, 0.0f);
                ggml_prec_set_acc(o, GGML_PREC_F32);
                o = ggml_reshape_2d(cg, o, n_embd, 1);
            } else {
                // V cache read transposed: element (cell, dim j) at j * n_kv + cell
                ggml_tensor * vv = ggml_permute(cg, ggml_view_3d(cg, v_cache, n_kv, n_head_kv, hd, e * n_kv * hd, e * n_kv, 0), 0, 2, 1, 3);
                ggml_tensor * kq = ggml_mul_mat(cg, kv, qp);
                ggml_set_name(kq, "kq-0");
                kq = ggml_soft_max_ext(cg, kq, mask, scale, 0.0f);
                ggml_tensor * kqv = ggml_mul_mat(cg, vv, kq);
                o = ggml_cont_2d(cg, ggml_permute(cg, kqv, 0, 2, 1, 3), n_embd, 1);
            }
            ggml_tensor * attn = mm("wo", n_embd, n_embd, o, "attn_out-0");
            ggml_tensor * ffn_inp = ggml_add(cg, attn, x);
            ggml_set_name(ffn_inp, "ffn_inp-0");
            cur = norm(ffn_inp, "ffn_norm", "ffn_norm-0");
            ggml_tensor * up = mm("w_up", n_embd, n_ff, cur, "ffn_up-0");
            ggml_tensor * gate = mm("w_gate", n_embd, n_ff, cur, "ffn_gate-0");
            ggml_tensor * act = ggml_swiglu_split(cg, gate, up);
            ggml_set_name(act, "ffn_swiglu-0");
            ggml_tensor * down = mm("w_down", n_ff, n_embd, act, "ffn_down-0");
            ggml_tensor * l_out = ggml_add(cg, down, ffn_inp);
            ggml_set_name(l_out, "l_out-0");
            ggml_set_output(l_out);
            cur = norm(l_out, "output_norm", "result_norm");
            ggml_tensor * logits = mm("output", n_embd, n_vocab, cur, "result_output");
            ggml_set_output(logits);
            outputs.push_back(l_out);
            outputs.push_back(logits);
            ggml_build_forward_expand(gf, logits);
        }

        wbuf = ggml_backend_alloc_ctx_tensors_from_buft(cw, ggml_backend_cpu_buffer_type());
        ggml_backend_buffer_set_usage(wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        if (k_cache) {  // the caches are not weights: a buffer of their own, as llama.cpp does
            kvbuf = ggml_backend_alloc_ctx_tensors_from_buft(ckv, ggml_backend_cpu_buffer_type());
        }
        for (auto & w : weights) set_weight(w.first, w.second);
        for (auto & v : vectors) ggml_backend_tensor_set(v.first, v.second.data(), 0, v.second.size() * 4);

        galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
        if (!ggml_gallocr_alloc_graph(galloc, gf)) throw std::runtime_error("cannot allocate the graph");
        auto xv = r.normal(ggml_nelements(x), 1.0f);
        ggml_backend_tensor_set(x, xv.data(), 0, xv.size() * 4);
        std::vector<uint8_t> k0, v0;
        if (layer) {
            int32_t p = cell + 7;
            ggml_backend_tensor_set(pos, &p, 0, 4);
            int64_t ki = cell;
            ggml_backend_tensor_set(kidx, &ki, 0, 8);
            std::vector<int64_t> vi(ggml_nelements(vidx));
            for (size_t j = 0; j < vi.size(); j++) vi[j] = flash_attn ? cell : (int64_t) j * n_kv + cell;
            ggml_backend_tensor_set(vidx, vi.data(), 0, vi.size() * 8);
            std::vector<float> m(n_kv, 0.0f);
            if (n_kv > 4) m[n_kv / 3] = -INFINITY;  // one masked cell inside the context
            if (flash_attn) {
                std::vector<ggml_fp16_t> mh(n_kv);
                for (int i = 0; i < n_kv; i++) mh[i] = ggml_fp32_to_fp16(m[i]);
                ggml_backend_tensor_set(mask, mh.data(), 0, mh.size() * 2);
            } else {
                ggml_backend_tensor_set(mask, m.data(), 0, m.size() * 4);
            }
            for (ggml_tensor * c : {k_cache, v_cache}) {
                auto f = r.normal(ggml_nelements(c), 1.0f);
                std::vector<ggml_fp16_t> h(f.size());
                for (size_t i = 0; i < f.size(); i++) h[i] = ggml_fp32_to_fp16(f[i]);
                ggml_backend_tensor_set(c, h.data(), 0, h.size() * 2);
            }
            k0 = get_bytes(k_cache);
            v0 = get_bytes(v_cache);
        }

        // inputs as set: ggml's allocator may reuse their memory once read, so they are set again for our run
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> inputs;
        for (ggml_tensor * t : {x, pos, kidx, vidx, mask}) {
            if (t) inputs.push_back({t, get_bytes(t)});
        }
        if (ggml_backend_graph_compute(cpu, gf) != GGML_STATUS_SUCCESS) throw std::runtime_error("ggml-cpu failed");
        std::vector<std::vector<float>> ref;
        for (ggml_tensor * o : outputs) ref.push_back(get_f32(o));
        std::vector<uint8_t> k1, v1;
        if (layer) {
            k1 = get_bytes(k_cache);
            v1 = get_bytes(v_cache);
            ggml_backend_tensor_set(k_cache, k0.data(), 0, k0.size());
            ggml_backend_tensor_set(v_cache, v0.data(), 0, v0.size());
        }
        for (ggml_tensor * o : outputs) {  // our results must not be the leftovers of ggml's
            std::vector<float> nan(ggml_nelements(o), NAN);
            ggml_backend_tensor_set(o, nan.data(), 0, nan.size() * 4);
        }
        for (auto & in : inputs) ggml_backend_tensor_set(in.first, in.second.data(), 0, in.second.size());

        mk::target tgt;
        tgt.n_sm = 16;
        mk::program prog = mk::compile(gf, tgt);
        mk::cpu_executor ex;
        ex.run(prog, seed % 2 ? (long long) seed : -1);

        result = "{\"program\":" + mk::explain_json(prog);
        for (size_t i = 0; i < outputs.size(); i++) {
            result += ",\"" + std::string(outputs[i]->name) + "\":" + compare(ref[i], get_f32(outputs[i]));
        }
        if (layer) {
            auto k2 = get_bytes(k_cache);
            auto v2 = get_bytes(v_cache);
            const size_t vstride = flash_attn ? 1 : n_kv;
            const size_t voff = flash_attn ? (size_t) cell * n_gqa : cell;
            result += ",\"k_row\":" + compare(f16_row(k1, (size_t) cell * n_gqa, n_gqa, 1), f16_row(k2, (size_t) cell * n_gqa, n_gqa, 1));
            result += ",\"v_row\":" + compare(f16_row(v1, voff, n_gqa, vstride), f16_row(v2, voff, n_gqa, vstride));
            size_t other = 0;  // cache bytes outside this token's cell must be untouched
            for (size_t i = 0; i < k2.size(); i += 2) {
                const size_t elem = i / 2;
                const bool k_this = elem / n_gqa == (size_t) cell;
                const bool v_this = flash_attn ? k_this : elem % n_kv == (size_t) cell;
                other += (!k_this && memcmp(&k2[i], &k0[i], 2) != 0) + (!v_this && memcmp(&v2[i], &v0[i], 2) != 0);
            }
            result += ",\"cache_cells_changed_elsewhere\":" + std::to_string(other);
        }
        result += "}";
    } catch (const mk::compile_error & e) {
        result = "{\"error\":" + mk::json_str(e.reason + ": " + e.what()) + "}";
    } catch (const std::exception & e) {
        result = "{\"error\":" + mk::json_str(e.what()) + "}";
    }
    if (galloc) ggml_gallocr_free(galloc);
    if (wbuf) ggml_backend_buffer_free(wbuf);
    if (kvbuf) ggml_backend_buffer_free(kvbuf);
    if (cg) ggml_free(cg);
    if (cw) ggml_free(cw);
    if (ckv) ggml_free(ckv);
    if (cpu) ggml_backend_free(cpu);
    return mk::copy_out(result, out, size);
}
