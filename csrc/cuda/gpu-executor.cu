// The GPU executor: one persistent kernel launch runs a whole program (every layer, the LM head, KV writes, output
// copies). One block per multiprocessor; every block walks the instruction list in order and takes the tiles of
// each instruction that fall to it (tile t goes to block (t + offset_i) mod grid, the offsets spreading small
// instructions over different blocks). Before its first tile of an instruction a block prefetches that tile's
// weights into L2 (or, with the weight ring on, has them copied into shared memory ahead of time) and then waits on
// the producers' counters; after each tile it bumps the instruction's counter.
//
// Ordering: a tile's results are written by all threads, then __syncthreads, then one thread adds to the counter
// with release semantics; a consumer's thread 0 reads the counter with acquire loads, then __syncthreads. Data
// written inside the launch (scratch, the KV rows of this step) is read with ld.global.cg so that no stale L1 line
// is used; weights, which nothing writes, go through the read-only path.
//
// Never hanging the GPU: the grid is launched cooperatively (the launch fails rather than run blocks that are not
// co-resident); every wait is bounded by a deadline on the global timer, after which the block writes the error
// word and all blocks leave at their next wait. The host reads the word after the step and hands the step back.
#include "../gpu-executor.h"
#include "../quants.h"
#include "device-guard.cuh"
#include "dot.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace mk {

namespace {

static_assert(sizeof(instruction) % 4 == 0 && sizeof(attention) % 4 == 0, "copied to shared memory as words");

// One block of 512 threads per multiprocessor. Nsight Compute on the 1B Q4_0 step: 16 warps per SM, 37% of the
// stall cycles at barriers, 0.39 eligible warps per scheduler; two blocks of 256 per SM measured slower (0.62x stock
// against 0.71x), see docs/gpu-executor-notes.md.
#ifndef MK_THREADS  // -DMK_THREADS=256: a build for A/B runs (fewer warps, 255 registers each instead of 128)
#define MK_THREADS 512
#endif
constexpr int k_threads = MK_THREADS;
constexpr int k_warps   = k_threads / 32;

constexpr int k_err_kv_cell = -1;  // kernel_args::error: the appended KV cell lies outside its attention (attn_qk_ops)

struct kernel_args {
    const instruction * instrs;
    const attention *   attns;
    const delta_net *   deltas;
    const rope_params * ropes;
    const int32_t *     offsets;   // per instruction: tile rotation
    const int32_t *     tiles;       // per instruction: n_tiles
    const uint8_t *     q8_1_input;  // per instruction: round x to q8_1 first (quantized weights, as ggml-cuda)
    int32_t             n_instrs;
    uint8_t *           scratch;
    unsigned long long * counters;  // per instruction, monotonic
    int *               abort;      // device memory: non-zero once any block gave up (checked while waiting)
    int *               error;      // mapped host memory: 0, or 1 + the instruction whose wait timed out
    unsigned long long  epoch;      // steps run before this one
    unsigned long long  timeout_ns;
    unsigned long long * prof;      // LLAMA_MEGAKERNEL_PROFILE: per (block, instruction) k_prof times, see below
    // shared memory layout (floats): x | y | y2 | w, then xq (x_floats int8), xd and xs (each x_floats / 32 floats + 4);
    // attention tiles reuse the same space from the start. The weight ring lies beyond both, at ring_off bytes.
    int32_t x_floats, y_floats, w_floats;
    const uint8_t * ring_ok;  // per instruction: its tiles' weights go through the ring
    int32_t ring_slots;       // 0: no ring
    int32_t slot_bytes;
    int32_t ring_off;
    int32_t prefetch;         // bytes per segment of a tile's weights to L2-prefetch before its dependency wait
                              // (LLAMA_MEGAKERNEL_PREFETCH=KiB; 0: none)
    int32_t attn_prestage;    // attention tiles stage their first chunk before the wait (attn_prestage)
    int32_t attn_warps;       // attn_tile_warps where it applies (LLAMA_MEGAKERNEL_ATTN_WARPS=0: attn_tile always)
    int32_t attn_smem_bytes;  // shared memory an attention tile may use (from the start)
    int32_t preload_norm;     // before the wait: an RMS norm's weight into shared memory (preload_norm_weight) and
                              // the epilogue's graph inputs (preload_epi_inputs); LLAMA_MEGAKERNEL_PRELOAD_NORM=0: after
    int32_t fuse_round;       // form_round_q8_1 where it applies
};

// Profile entries per (block, instruction): arrival, dependencies met (first tile), summed input-forming and
// weight-compute times over the block's tiles, end of its last tile, then three sub-phases summed over the tiles
// (attention: staging, scores and softmax, accumulators; matvec: loading x, q8_1 rounding, epilogue).
constexpr int k_prof = 8;


// --- small device helpers --------------------------------------------------------------------------------------

__device__ __forceinline__ uint8_t * resolve(const kernel_args & a, const addr & p) {
    return p.scratch ? a.scratch + p.off : (uint8_t *) (uintptr_t) p.off;
}

__device__ __forceinline__ float ldcg_f(const float * p) { return __ldcg(p); }

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Thread 0's clock for the sub-phases of a tile (does nothing unless profiling). `acc` is in shared memory: a
// read-modify-write of global memory here put an L2 round trip on thread 0's path at every mark, which the whole
// block then waited for at its next barrier (each sub-phase of the earlier profiles includes one).
struct phase_clock {
    unsigned long long * acc;
    unsigned long long t;
    __device__ void mark_at(int k, unsigned long long n) {  // a mark taken earlier, at n
        if (acc && threadIdx.x == 0) {
            acc[k] += n - t;
            t = n;
        }
    }
    __device__ void mark(int k) {
        if (acc && threadIdx.x == 0) {
            const unsigned long long n = global_ns();
            acc[k] += n - t;
            t = n;
        }
    }
};

__device__ __forceinline__ unsigned long long ld_acquire(const unsigned long long * p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

// ggml-cuda is built with -use_fast_math: its divisions are div.approx.ftz and expf is ex2.approx.ftz of x * log2(e).
// Where the megakernel computes the same value, it uses the same instructions (rounding a one-ulp difference to
// q8_1 flips a value now and then, and on random weights that grows into quantization-sized differences).
__device__ __forceinline__ float div_approx(float a, float b) {
    float r;
    asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float expf_fast_math(float x) {
    float t, r;
    asm("mul.ftz.f32 %0, %1, 0f3FB8AA3B;" : "=f"(t) : "f"(x));
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
    return r;
}

// glu_gate (program.h) with SiLU as ggml-cuda's ggml_cuda_op_silu_single compiles: x / (1 + expf(-x)).
__device__ __forceinline__ float glu_gate_cuda(int32_t op, float g) {
    if (op != glu_swiglu) {
        return glu_gate(op, g);
    }
    float d;
    asm("add.ftz.f32 %0, %1, 0f3F800000;" : "=f"(d) : "f"(expf_fast_math(-g)));
    return div_approx(g, d);
}

// The sum of squares of x[0, n) (shared memory) in the order of ggml-cuda's rms_norm_f32: a block of B = 256
// threads below 1,024 values and 1,024 from there, thread v adding x[v + kB]^2 in turn with fused multiply-adds, a
// butterfly per warp, then one over the warps' sums. Every thread gets the sum. `red` is 32 floats. The mean is
// then div_approx(sum, n) as there, so that the norm's scale is stock's to the bit when x is.
__device__ float sum_sq_ggml_order(const float * x, int n, float * red) {
    const int B = n < 1024 ? 256 : 1024, nvw = B / 32, w = threadIdx.x / 32, l = threadIdx.x % 32;
    __syncthreads();  // x is complete
    for (int vw = w; vw < nvw; vw += k_warps) {
        float s = 0.0f;
        for (int c = vw * 32 + l; c < n; c += B) {
            s = fmaf(x[c], x[c], s);
        }
        s = warp_sum(s);
        if (l == 0) {
            red[vw] = s;
        }
    }
    __syncthreads();
    return warp_sum(l < nvw ? red[l] : 0.0f);
}

__device__ __forceinline__ void prefetch_l2(const void * p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

#if defined(MK_WEIGHTS_EVICT_FIRST) && __CUDA_ARCH__ >= 900
// [p, p + n) towards L2 by the copy engine, marked first to evict, as the weight loads (dot.cuh, ldp). Whole
// 16-byte pieces: the start is rounded down (buffers are aligned), the end down too (never past the allocation).
__device__ __forceinline__ void prefetch_l2_evict_first(const void * p, int64_t n) {
    const uint64_t lo = (uint64_t) p & ~(uint64_t) 15, hi = ((uint64_t) p + (uint64_t) n) & ~(uint64_t) 15;
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    for (uint64_t o = lo; o < hi; o += 65536) {
        const uint32_t sz = (uint32_t) min(hi - o, (uint64_t) 65536);
        asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(o), "r"(sz), "l"(pol) : "memory");
    }
}
#endif

// --- waiting ---------------------------------------------------------------------------------------------------

// True if the block may go on; false if the step is being abandoned (a wait timed out somewhere).
// The counters of all dependencies are read together, each turn re-reading only those not yet met, so the wait
// does not depend on the order of the list. (Against one at a time it measured within noise: the second
// dependency of attn_out and ffn_out is met long before; notes, session 16.)
__device__ bool wait_deps(const kernel_args & a, const instruction & in, int self, volatile int * s_flag) {
    if (threadIdx.x == 0) {
        int ok = 1;
        const unsigned long long deadline = global_ns() + a.timeout_ns;
        int spins = 0;
        const int nd = in.n_deps;
        unsigned long long target[k_max_deps];
        const unsigned long long * ctr[k_max_deps];
#pragma unroll
        for (int d = 0; d < k_max_deps; d++) {  // unrolled: the arrays stay in registers
            target[d] = d < nd ? a.epoch * (unsigned long long) a.tiles[in.deps[d].instr] + in.deps[d].needed : 0;
            ctr[d] = a.counters + (d < nd ? in.deps[d].instr : 0);
        }
        unsigned pending = (1u << nd) - 1;
        while (pending) {
            unsigned long long v[k_max_deps];
#pragma unroll
            for (int d = 0; d < k_max_deps; d++) {  // independent loads, in flight together
                v[d] = (pending >> d & 1) ? ld_acquire(ctr[d]) : 0;
            }
#pragma unroll
            for (int d = 0; d < k_max_deps; d++) {
                if ((pending >> d & 1) && v[d] >= target[d]) {
                    pending &= ~(1u << d);
                }
            }
            if (!pending) {
                break;
            }
            // the abort word and the clock every 16th turn, so that a met dependency is seen within one round trip
            if ((++spins & 15) == 0) {
                if (*(volatile int *) a.abort != 0) {
                    ok = 0;
                    break;
                }
                if (global_ns() > deadline) {
                    atomicExch(a.abort, 1);
                    *(volatile int *) a.error = 1 + self;
                    __threadfence_system();
                    ok = 0;
                    break;
                }
            }
            if (spins > 64) {  // plain spinning first: a dependency is usually met within a few microseconds
                __nanosleep(32);
            }
        }
        // no fence here: the acquire loads order thread 0's later reads, and the barrier below orders the
        // block's other threads after thread 0 (data written in the step is read from L2 with ld.global.cg)
        *s_flag = ok;
    }
    // One barrier: thread 0 writes the flag again only at the next wait, and every thread passes the barriers of a
    // tile in between. (__syncthreads_and would hand the flag over in the same barrier, but made ptxas spill
    // 130 more bytes.)
    __syncthreads();
    return *s_flag != 0;
}

// The barrier orders the block's writes before thread 0's; the release add publishes them at GPU scope.
__device__ void tile_done(const kernel_args & a, int i) {
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(a.counters + i) : "memory");
    }
}

// --- input prologue ----------------------------------------------------------------------------------------------

// Loads of one thread, issued together: with k_gather values in flight per thread a pass over up to
// k_gather * k_threads values costs one memory round trip instead of one per value.
constexpr int k_gather = 8;

// Before the dependency wait: an RMS norm's weight (a constant of the model) into w, where form_input then finds
// it. After the wait only x is still to load; the weight's load had been the forming's slowest, from HBM (the
// weight streaming of the step before evicts it from L2). True if it did.
__device__ bool preload_norm_weight(const kernel_args & a, const vec_in & in, float * w) {
    if (in.kind != in_kind::rms_norm || in.w.null() || in.norm_row != 0) {
        return false;
    }
    const float * nw = (const float *) resolve(a, in.w);
    const int n = in.n, nt = k_threads - 32;  // not warp 0: its thread 0 polls the dependencies meanwhile
    for (int i0 = (int) threadIdx.x - 32; i0 >= 0 && i0 < n; i0 += k_gather * nt) {
        float g[k_gather];
#pragma unroll
        for (int k = 0; k < k_gather; k++) {
            g[k] = __ldg(nw + min(i0 + k * nt, n - 1));
        }
#pragma unroll
        for (int k = 0; k < k_gather; k++) {
            if (i0 + k * nt < n) {
                w[i0 + k * nt] = g[k];
            }
        }
    }
    return true;
}

// Splits of an attention merged per round trip in form_input's attn_reduce. At depth 4,096 (16 splits) the merge
// takes 11.9 us of each O projection tile against 3.8 us for the 4 splits at 256 cells; 8 a round
// (-DMK_MERGE_SPLITS=8, with 128-cell chunks) took 10.8 us, so the rounds are not what costs.
#ifndef MK_MERGE_SPLITS
#define MK_MERGE_SPLITS 4
#endif
constexpr int k_merge = MK_MERGE_SPLITS;

// Heads [h0, h0 + nh) of an attention's partials (ns splits each, head sizes hd a multiple of 4) merged into out
// (nh * hd values, [* gate]). Four values of one head per thread; where the block has threads to spare, `lanes`
// neighbouring threads share four values, each over every lanes-th split, and are combined by shuffles. A thread's
// splits are loaded k_merge at a time, all in flight at once, and merged in registers: one memory round trip per
// k_merge splits and no barrier (a two-pass form took ~6 us of the O projection's tile on the 1B shape: two round
// trips and three barriers).
__device__ __forceinline__ void merge_splits(const float * part, int ns, int hd, int h0, int nh, const float * gate,
                                             float * out) {
    const int quads = nh * hd / 4, stride = hd + 2;
    int lanes = 1;
    while (lanes < 32 && 2 * lanes * quads <= k_threads && lanes < ns) {
        lanes *= 2;
    }
    const int sub = threadIdx.x & (lanes - 1), per_pass = k_threads / lanes;
    for (int base = 0; base < quads; base += per_pass) {  // block-uniform: the shuffles below need whole warps
        const int qd = base + threadIdx.x / lanes;
        const int e0 = 4 * min(qd, quads - 1), h = h0 + e0 / hd, d = e0 % hd;
        const float * ph = part + (size_t) h * ns * stride;
        float g4[4] = {1.0f, 1.0f, 1.0f, 1.0f};
        if (gate) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                g4[j] = ldcg_f(gate + e0 + j);
            }
        }
        float M = -INFINITY, den = 0.0f, v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int s0 = sub; s0 < ns; s0 += k_merge * lanes) {
            float m[k_merge], l[k_merge], r[k_merge][4];
#pragma unroll
            for (int k = 0; k < k_merge; k++) {
                const float * o = ph + (size_t) min(s0 + k * lanes, ns - 1) * stride;
                m[k] = ldcg_f(o);
                l[k] = ldcg_f(o + 1);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    r[k][j] = ldcg_f(o + 2 + d + j);
                }
            }
            float mb = M;
#pragma unroll
            for (int k = 0; k < k_merge; k++) {
                mb = s0 + k * lanes < ns ? fmaxf(mb, m[k]) : mb;
            }
            if (mb == -INFINITY) {
                continue;  // every split so far saw only masked cells
            }
            const float c = M == -INFINITY ? 0.0f : __expf(M - mb);
            den *= c;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[j] *= c;
            }
#pragma unroll
            for (int k = 0; k < k_merge; k++) {
                const float wk = s0 + k * lanes < ns && m[k] != -INFINITY ? __expf(m[k] - mb) : 0.0f;
                den += wk * l[k];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    v[j] += wk * r[k][j];
                }
            }
            M = mb;
        }
        for (int off = 1; off < lanes; off <<= 1) {
            const float Mo = __shfl_xor_sync(0xffffffffu, M, off), dn = __shfl_xor_sync(0xffffffffu, den, off);
            float vo[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                vo[j] = __shfl_xor_sync(0xffffffffu, v[j], off);
            }
            const float mb = fmaxf(M, Mo);
            const float c = M == -INFINITY ? 0.0f : __expf(M - mb), co = Mo == -INFINITY ? 0.0f : __expf(Mo - mb);
            den = den * c + dn * co;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[j] = v[j] * c + vo[j] * co;
            }
            M = mb;
        }
        if (qd < quads && sub == 0) {
            const float inv = den > 0.0f ? 1.0f / den : 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                out[e0 + j] = v[j] * inv * g4[j];
            }
        }
    }
}

// vec_in::pre_src (the compiler's fold_norms): x = pre_res + rms_norm(pre_src) * pre_w, in the arithmetic of the vec
// instruction it replaces (form_input's rms_norm, then the epilogue's add, never contracted into one fma); tile 0 also
// stores it at src. Uses w from n + 64 (C's norm keeps its weight in w[0, n) and its reduction at w + n).
__device__ void form_pre(const kernel_args & a, const vec_in & in, float * x, float * w, bool store) {
    const int n = in.n;
    const float * s = (const float *) resolve(a, in.pre_src);
    const float * r = (const float *) resolve(a, in.pre_res);
    const float * pw = in.pre_w.null() ? nullptr : (const float *) resolve(a, in.pre_w);
    float * pr = w + n + 64, * pws = w + 2 * n + 64;
    for (int i = threadIdx.x; i < n; i += k_threads) {  // the three loads of a value in flight together
        const float xs = ldcg_f(s + i), rs = ldcg_f(r + i), ws = pw ? __ldg(pw + i) : 1.0f;
        x[i] = xs;
        pr[i] = rs;
        pws[i] = ws;
    }
    const float scale = rsqrtf(div_approx(sum_sq_ggml_order(x, n, w + 3 * n + 64), (float) n) + in.pre_eps);
    float * out = store ? (float *) resolve(a, in.src) : nullptr;
    for (int i = threadIdx.x; i < n; i += k_threads) {
        const float v = __fadd_rn(__fmul_rn(__fmul_rn(x[i], scale), pws[i]), pr[i]);
        x[i] = v;
        if (out) {
            out[i] = v;
        }
    }
    // the caller's norm reads x after a barrier (sum_sq_ggml_order begins with one)
}

// x as the instruction's input defines it. With `w_ready` preload_norm_weight has put the norm's weight in w (the
// barrier of the wait lies between). With `x_ready` form_pre has put src in x (an rms_norm input).
__device__ void form_input(const kernel_args & a, const vec_in & in, float * x, float * w, bool w_ready, bool x_ready) {
    const int n = in.n, t = threadIdx.x;
    switch (in.kind) {
        case in_kind::plain: {
            const float * s = (const float *) resolve(a, in.src);
            const float * gate = in.gate.null() ? nullptr : (const float *) resolve(a, in.gate);
            for (int i0 = t; i0 < n; i0 += k_gather * k_threads) {
                float r[k_gather];
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int i = i0 + k * k_threads;
                    r[k] = ldcg_f(s + min(i, n - 1));  // clamped, not skipped: no branch between the loads
                }
                if (gate) {
#pragma unroll
                    for (int k = 0; k < k_gather; k++) {
                        r[k] *= ldcg_f(gate + min(i0 + k * k_threads, n - 1));
                    }
                }
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int i = i0 + k * k_threads;
                    if (i < n) {
                        x[i] = r[k];
                    }
                }
            }
            break;
        }
        case in_kind::rms_norm: {
            // x and the norm's weight in one round trip; the sum of squares needs the whole vector first
            const float * s = (const float *) resolve(a, in.src);
            const float * nw = in.w.null() ? nullptr : (const float *) resolve(a, in.w);
            const bool load_w = !w_ready && nw && in.norm_row == 0;
            const float * gw = load_w ? nw : s;
            for (int i0 = t; i0 < n; i0 += k_gather * k_threads) {
                float r[k_gather], g[k_gather];
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int i = i0 + k * k_threads;
                    r[k] = x_ready ? 0.0f : ldcg_f(s + min(i, n - 1));
                    g[k] = load_w ? __ldg(gw + min(i, n - 1)) : 1.0f;
                }
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int i = i0 + k * k_threads;
                    if (i < n) {
                        if (!x_ready) {
                            x[i] = r[k];
                        }
                        if (!w_ready) {
                            w[i] = g[k];
                        }
                    }
                }
            }
            const float * gate = in.gate.null() ? nullptr : (const float *) resolve(a, in.gate);
            if (in.norm_row == 0) {
                const float scale = rsqrtf(div_approx(sum_sq_ggml_order(x, n, w + n), (float) n) + in.eps);
                for (int i = t; i < n; i += k_threads) {
                    x[i] = x[i] * scale * w[i] * (gate ? ldcg_f(gate + i) : 1.0f);
                }
                break;
            }
            // per group (Gated DeltaNet's output per head): a warp per group, the scales after the weights
            const int row = in.norm_row, n_groups = n / row;
            float * scales = w + n;
            __syncthreads();
            for (int gi = t / 32; gi < n_groups; gi += k_warps) {
                float gs = 0.0f;
                for (int i = t % 32; i < row; i += 32) {
                    gs += x[gi * row + i] * x[gi * row + i];
                }
                gs = warp_sum(gs);
                if (t % 32 == 0) {
                    scales[gi] = rsqrtf(gs / row + in.eps);
                }
            }
            __syncthreads();
            for (int i = t; i < n; i += k_threads) {
                x[i] = x[i] * scales[i / row] * (nw ? __ldg(nw + i % row) : 1.0f) * (gate ? ldcg_f(gate + i) : 1.0f);
            }
            break;
        }
        case in_kind::attn_reduce: {
            const float * part = (const float *) resolve(a, in.src);
            const float * gate = in.gate.null() ? nullptr : (const float *) resolve(a, in.gate);
            if (in.head_dim % 4 == 0) {
                merge_splits(part, in.n_split, in.head_dim, 0, in.n_head, gate, x);
                break;
            }
            // Other head sizes: the weights of each split, exp(m_s - M) / sum_s(exp(m_s - M) l_s), then one pass
            // over the accumulators. w holds (max, sum) of every (head, split), then the weights.
            const int stride = in.head_dim + 2, ns = in.n_split, nhs = in.n_head * ns;
            for (int j0 = t; j0 < nhs; j0 += k_gather * k_threads) {
                float m[k_gather], l[k_gather];
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int j = j0 + k * k_threads;
                    const int jj = min(j, nhs - 1);
                    m[k] = ldcg_f(part + jj * stride);
                    l[k] = ldcg_f(part + jj * stride + 1);
                }
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int j = j0 + k * k_threads;
                    if (j < nhs) {
                        w[j] = m[k];
                        w[nhs + j] = l[k];
                    }
                }
            }
            __syncthreads();
            for (int h = t; h < in.n_head; h += k_threads) {
                const float * mh = w + h * ns;
                float mx = -INFINITY;
                for (int s = 0; s < ns; s++) {
                    mx = fmaxf(mx, mh[s]);
                }
                float den = 0.0f;
                for (int s = 0; s < ns; s++) {
                    den += (mh[s] == -INFINITY ? 0.0f : __expf(mh[s] - mx)) * w[nhs + h * ns + s];
                }
                const float inv = den > 0.0f ? 1.0f / den : 0.0f;
                for (int s = 0; s < ns; s++) {  // exp again rather than stored: storing it cost the kernel 8 bytes of spills
                    w[2 * nhs + h * ns + s] = (mh[s] == -INFINITY ? 0.0f : __expf(mh[s] - mx)) * inv;
                }
            }
            __syncthreads();
            const float * wt = w + 2 * nhs;
            for (int e0 = t; e0 < n; e0 += k_gather * k_threads) {
                float v[k_gather];
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    v[k] = 0.0f;
                }
                int h[k_gather], d[k_gather];
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int e = min(e0 + k * k_threads, n - 1);
                    h[k] = e / in.head_dim;
                    d[k] = e % in.head_dim;
                }
#pragma unroll 4
                for (int s = 0; s < ns; s++) {
                    float r[k_gather];
#pragma unroll
                    for (int k = 0; k < k_gather; k++) {
                        r[k] = ldcg_f(part + (h[k] * ns + s) * stride + 2 + d[k]);
                    }
#pragma unroll
                    for (int k = 0; k < k_gather; k++) {
                        v[k] += wt[h[k] * ns + s] * r[k];
                    }
                }
#pragma unroll
                for (int k = 0; k < k_gather; k++) {
                    const int e = e0 + k * k_threads;
                    if (e < n) {
                        x[e] = gate ? v[k] * ldcg_f(gate + e) : v[k];
                    }
                }
            }
            break;
        }
        case in_kind::embed_row: {
            const int32_t row = __ldcg((const int32_t *) resolve(a, in.idx));
            const uint8_t * src = resolve(a, in.src) + (uint64_t) row * in.src_row_bytes;
            const type_info ti = info_of(in.src_type);
            for (int b = threadIdx.x; b < n / ti.block; b += k_threads) {
                // straight into shared memory: a local array here cost every thread a 1 KB stack frame
                dequant_block(in.src_type, src + (uint64_t) b * ti.bytes, x + b * ti.block);
            }
            break;
        }
    }
    __syncthreads();
}

// --- epilogue ------------------------------------------------------------------------------------------------------

// ggml-cuda's rope: theta = pos * theta_scale^(i0/2), with YaRN ramp when ext_factor != 0.
__device__ void rope_pair(const rope_params & rp, float pos, const float * ff, int i0, float & cs, float & sn) {
    const float theta_extrap = pos * powf(rp.theta_scale, (float) (i0 / 2)) / (ff ? ff[i0 / 2] : 1.0f);
    const float theta_interp = rp.freq_scale * theta_extrap;
    float th = theta_interp, mscale = rp.attn_factor;
    if (rp.ext_factor != 0.0f) {
        const float yr = (i0 / 2 - rp.corr_dims[0]) / fmaxf(0.001f, rp.corr_dims[1] - rp.corr_dims[0]);
        const float ramp = (1.0f - fminf(1.0f, fmaxf(0.0f, yr))) * rp.ext_factor;
        th = theta_interp * (1.0f - ramp) + theta_extrap * ramp;
        mscale *= 1.0f + 0.1f * logf(1.0f / rp.freq_scale);
    }
    sincosf(th, &sn, &cs);
    cs *= mscale;
    sn *= mscale;
}

// y holds the tile's outputs [r0, r1) of its segment, in shared memory.
// The graph inputs an epilogue reads, loaded before the tile's dependency wait (they are written by the host
// before the launch and never in the step): per op, the rope's position streams or the KV row that a set_rows of
// whole rows writes. Each was a round trip of its own after the matvec (~0.5 us each in the QKV epilogue). The rope's
// frequency factors, a model constant, are pulled into L2. The barrier of the wait (or of form_input) orders the
// writes before epilogue's reads.
struct epi_inputs {
    long long v[k_max_epi][4];
};

__device__ void preload_epi_inputs(const kernel_args & a, const segment & sg, int r0, int r1, epi_inputs * pre) {
    const int k = (int) threadIdx.x - 32;  // not warp 0, as preload_norm_weight
    if (k < 0 || k >= sg.n_epi) {
        return;
    }
    const epi_op & op = sg.epi[k];
    if (op.kind == epi_kind::rope) {
        const rope_params & rp = a.ropes[op.rope];
        const int32_t * pos_all = (const int32_t *) resolve(a, rp.pos);
        const int streams = rp.mode == 8 || rp.mode == 40 ? 4 : 1;
        for (int j = 0; j < 4; j++) {
            pre->v[k][j] = j < streams ? __ldcg(pos_all + j) : 0;
        }
        if (!rp.freq_factors.null()) {
            const uint8_t * ff = resolve(a, rp.freq_factors);
            for (int o = 0; o < rp.n_dims / 2 * 4; o += 128) {
                prefetch_l2(ff + o);
            }
        }
    } else if (op.kind == epi_kind::set_rows && r0 / op.row_len == (r1 - 1) / op.row_len) {
        const uint8_t * idx = resolve(a, op.idx);
        const int r = r0 / op.row_len;
        pre->v[k][0] = op.idx_type == T_I64 ? (long long) __ldcg((const long long *) idx + r)
                                            : (long long) __ldcg((const int32_t *) idx + r);
    }
}

// `pre`: preload_epi_inputs ran for these rows (nullptr: the inputs are loaded here).
__device__ void epilogue(const kernel_args & a, const segment & sg, float * y, int r0, int r1, float * red,
                         const epi_inputs * pre) {
    const int nv = r1 - r0;
    for (int k = 0; k < sg.n_epi; k++) {
        const epi_op & op = sg.epi[k];
        switch (op.kind) {
            case epi_kind::add: {
                const float * src = (const float *) resolve(a, op.a);
                for (int j = threadIdx.x; j < nv; j += k_threads) {
                    const int g = r0 + j;
                    y[j] += ldcg_f(src + (op.row_len ? g % op.row_len : g));
                }
                break;
            }
            case epi_kind::mul: {
                const float * src = (const float *) resolve(a, op.a);
                for (int j = threadIdx.x; j < nv; j += k_threads) {
                    y[j] *= ldcg_f(src + (r0 + j) % op.row_len);
                }
                break;
            }
            case epi_kind::scale:
                for (int j = threadIdx.x; j < nv; j += k_threads) {
                    y[j] = y[j] * op.f0 + op.f1;
                }
                break;
            case epi_kind::rms_norm: {  // one warp per row
                const int w = threadIdx.x / 32, l = threadIdx.x % 32;
                for (int r = w; r * op.row_len < nv; r += k_warps) {
                    float * v = y + r * op.row_len;
                    float ss = 0.0f;
                    for (int i = l; i < op.row_len; i += 32) {
                        ss += v[i] * v[i];
                    }
                    const float scale = rsqrtf(warp_sum(ss) / op.row_len + op.f0);
                    __syncwarp();
                    for (int i = l; i < op.row_len; i += 32) {
                        v[i] *= scale;
                    }
                }
                break;
            }
            case epi_kind::rope: {
                const rope_params & rp = a.ropes[op.rope];
                const int32_t * pos_all = (const int32_t *) resolve(a, rp.pos);
                const float * ff = rp.freq_factors.null() ? nullptr : (const float *) resolve(a, rp.freq_factors);
                const int half = rp.n_dims / 2;
                if (rp.mode == 0) {  // adjacent pairs: the tile may start or end inside a head (compiler: rows_needed)
                    for (int e = threadIdx.x; 2 * e < nv; e += k_threads) {
                        const int i0 = (r0 + 2 * e) % op.row_len - rp.n_offs;
                        if (i0 < 0 || i0 >= rp.n_dims) {
                            continue;
                        }
                        float cs, sn;
                        rope_pair(rp, (float) (pre ? pre->v[k][0] : __ldcg(pos_all)), ff, i0, cs, sn);
                        const float x0 = y[2 * e], x1 = y[2 * e + 1];
                        y[2 * e] = x0 * cs - x1 * sn;
                        y[2 * e + 1] = x0 * sn + x1 * cs;
                    }
                    break;
                }
                const int rows = nv / op.row_len;  // halves of a head: whole heads
                for (int e = threadIdx.x; e < rows * half; e += k_threads) {
                    const int r = e / half, i0 = 2 * (e % half);
                    float * v = y + r * op.row_len + rp.n_offs;
                    float cs, sn;
                    const int stream = rope_stream(rp, i0 / 2);
                    rope_pair(rp, (float) (pre ? pre->v[k][stream] : __ldcg(pos_all + stream)), ff, i0, cs, sn);
                    const float x0 = v[i0 / 2], x1 = v[i0 / 2 + half];
                    v[i0 / 2] = x0 * cs - x1 * sn;
                    v[i0 / 2 + half] = x0 * sn + x1 * cs;
                }
                break;
            }
            case epi_kind::store: {
                float * o = (float *) resolve(a, op.a);
                for (int j = threadIdx.x; j < nv; j += k_threads) {
                    o[r0 + j] = y[j];
                }
                break;
            }
            case epi_kind::unary:
                for (int j = threadIdx.x; j < nv; j += k_threads) {
                    y[j] = unary_apply(op.unary, y[j]);
                }
                break;
            case epi_kind::ssm_conv: {  // row j is channel j; each thread reads its channels' state, then writes it
                const int d = op.row_len;
                const int32_t cell = __ldcg((const int32_t *) resolve(a, op.idx));
                const float * old = (const float *) (resolve(a, op.b) + (uint64_t) cell * op.nb1);
                const float * kern = (const float *) resolve(a, op.a);
                float * next = op.c.null() ? nullptr : (float *) resolve(a, op.c);
                for (int j = threadIdx.x; j < nv; j += k_threads) {
                    const int ch = r0 + j;
                    float o[k_max_conv], kk[k_max_conv];
                    for (int k = 0; k < d; k++) {
                        o[k] = k + 1 < d ? old[(size_t) ch * (d - 1) + k] : 0.0f;
                        kk[k] = __ldg(kern + (size_t) ch * d + k);
                    }
                    y[j] = conv_step(o, kk, d, y[j], next ? next + (size_t) ch * (d - 1) : nullptr);
                }
                break;
            }
            case epi_kind::set_rows: {
                uint8_t * dst = resolve(a, op.a);
                const uint8_t * idx = resolve(a, op.idx);
                const bool one_row = pre && r0 / op.row_len == (r1 - 1) / op.row_len;  // as preload_epi_inputs
                for (int j = threadIdx.x; j < nv; j += k_threads) {
                    const int g = r0 + j, r = g / op.row_len, col = g % op.row_len;
                    const int64_t row = one_row ? (int64_t) pre->v[k][0]
                                      : op.idx_type == T_I64 ? (int64_t) __ldcg((const long long *) idx + r)
                                                             : (int64_t) __ldcg((const int32_t *) idx + r);
                    store_scalar(op.dst_type, dst, (uint64_t) row * op.nb1 + (uint64_t) col * op.nb0, y[j]);
                }
                break;
            }
        }
        __syncthreads();
    }
    (void) red;
}

// --- tiles ---------------------------------------------------------------------------------------------------------

// How the warps of a block share the rows [r0, r1) of a tile: each warp takes chunks of R rows, so that every lane
// has R independent weight loads in flight and reads each x value once for R rows, and `wpr` warps split each row's
// groups (16 values) between them (partial sums added in shared memory). With one row per warp a tile of 16 rows of
// 8,192 values (the 1B shape's FFN down projection) had 10 loads in flight per lane (~12 GB/s per SM); the balanced
// split gives it 8 rows on 8 warps per row group.
constexpr int k_part = 8 * k_warps;  // partial sums per segment: rows * wpr <= k_part

// The balanced split of `rows` rows of n values: the fewest groups (or planar units) per lane on the busiest warp,
// where a smaller R or a larger wpr has to save an eighth of that work to be taken (R also buys x reuse and loads in
// flight: an LM-head tile of 972 rows went from R = 8 to 1 for 5% less work by this count, and took 50% longer). A
// lane may be left without a group of a row (32 * wpr up to twice the groups), as the earlier split did for short
// rows. R is at most the type's max_rows (planar units hold more registers per row).
// Host side: gpu_load stores it in each segment (gpu_rows, gpu_split) for its full tiles; a shorter last tile keeps it.
inline void balanced_split(int rows, int n, int type, int & R_out, int & wpr_out) {
    const int ng = std::max(1, n / dev::lane_shape_of(type).values);
    double best = 1e30;
    R_out = 1;
    wpr_out = 1;
    for (int R = dev::lane_shape_of(type).max_rows; R >= 1; R /= 2) {
        const int sets = (rows + R - 1) / R;
        for (int wpr = 1; wpr <= k_warps && (wpr == 1 || (32 * wpr <= 2 * ng && rows * wpr <= k_part)); wpr *= 2) {
            const int nrw = k_warps / wpr;
            const int work = (sets + nrw - 1) / nrw * R * ((ng + 32 * wpr - 1) / (32 * wpr));
            if (work < 0.875 * best) {
                best = work;
                R_out = R;
                wpr_out = wpr;
            }
        }
    }
}

struct mv_plan {
    int wpr, slot, rw, nrw, start, step, R;
};

// R and wpr from the segment (gpu_load's balanced split), or, where it has none (LLAMA_MEGAKERNEL_SPLIT_ROWS=0, ring
// chunks), split rows only when there are fewer rows than warps.
__device__ __forceinline__ mv_plan plan_rows(int rows, int R, int wpr) {
    mv_plan p;
    const int w = threadIdx.x / 32;
    if (R > 0) {
        p.R = R;
        p.wpr = wpr;
    } else {
        p.wpr = 1;
        while (p.wpr * 2 <= k_warps && rows * p.wpr * 2 <= k_warps) {
            p.wpr *= 2;
        }
        const int per = (rows + k_warps / p.wpr - 1) / (k_warps / p.wpr);
        p.R = per >= 8 ? 8 : per >= 4 ? 4 : per >= 2 ? 2 : 1;
    }
    p.slot = w % p.wpr;
    p.rw = w / p.wpr;
    p.nrw = k_warps / p.wpr;
    p.start = threadIdx.x % 32 + 32 * p.slot;
    p.step = 32 * p.wpr;
    return p;
}

// out[r - r0] = row r of W . x for rows [r0, r1). When p.wpr > 1 (then rows * wpr <= k_part) each warp writes
// its partial sum to out[i * wpr + slot] instead, and finish_rows adds them up in a fixed order.
struct mv_x {  // the input in its forms: float, and (q8 true) int8 values with a scale per 32
    const float * x;
    const int8_t * xq;
    const float * xd;
    const float * xs;  // per block of 32: the sum before rounding (round_group_q8_1)
    int n;
    bool q8;
};

template <typename W, int R>
__device__ __forceinline__ void dot_any(const mv_x in, const uint8_t * row0, uint64_t stride, const mv_plan p, float (&s)[R]) {
    if constexpr (dev::is_planar<W>::value) {  // gpu_load repacks only matrices whose input is q8_1
        dev::dot_units<W, R>(row0, stride, in.xq, in.xd, in.xs, in.n / W::block, p.start, p.step, s);
    } else {
        if constexpr (dev::has_int_path<W>::value) {
            if (in.q8) {
                dev::dot_rows_q8<W, R>(row0, stride, in.xq, in.xd, in.xs, in.n, p.start, p.step, s);
                return;
            }
        }
        dev::dot_rows<W, R>(row0, stride, in.x, in.n, p.start, p.step, s);
    }
}

// R warp sums at once (R a power of two up to 32): at the step over lane distance o, a lane keeps half of its values
// and hands the other half to lane l ^ o, which keeps the opposite half, so each step halves the values per lane;
// from one value on, plain butterfly steps. Lane l ends with the sum of s[l >> (5 - log2 R)], and every addition is
// the one warp_sum makes for that value on that lane (own value first), so the sums are warp_sum's to the bit.
// R - 1 + 5 - log2 R shuffles instead of 5 R (9 instead of 40 for eight rows).
template <int N, int O> __device__ __forceinline__ float warp_sum_rows_step(float * s, int l) {
    if constexpr (O == 0) {
        return s[0];
    } else if constexpr (N > 1) {
        const bool upper = (l & O) != 0;
#pragma unroll
        for (int j = 0; j < N / 2; j++) {
            const float keep = upper ? s[j + N / 2] : s[j], give = upper ? s[j] : s[j + N / 2];
            s[j] = keep + __shfl_xor_sync(0xffffffffu, give, O);
        }
        return warp_sum_rows_step<N / 2, O / 2>(s, l);
    } else {
        s[0] += __shfl_xor_sync(0xffffffffu, s[0], O);
        return warp_sum_rows_step<1, O / 2>(s, l);
    }
}
template <int R> __device__ __forceinline__ float warp_sum_rows(float (&s)[R]) {
    static_assert(R >= 1 && R <= 32 && (R & (R - 1)) == 0, "R rows: a power of two up to 32");
    return warp_sum_rows_step<R, 16>(s, (int) (threadIdx.x % 32));
}

template <int R> __host__ __device__ constexpr int log2_of() { return R <= 1 ? 0 : 1 + log2_of<R / 2>(); }

template <typename W, int R>
__device__ void mv_rows(const mv_plan p, const uint8_t * base, uint64_t stride, const mv_x x, int r0, int r1,
                        float * out) {
    const int l = threadIdx.x % 32, rows = r1 - r0, full = rows / R;
    auto emit = [&](int i, float v) {
        v = warp_sum(v);
        if (l == 0) {
            out[p.wpr > 1 ? i * p.wpr + p.slot : i] = v;
        }
    };
    for (int ch = p.rw; ch < full; ch += p.nrw) {
        float s[R];
#pragma unroll
        for (int k = 0; k < R; k++) s[k] = 0.0f;
        dot_any<W, R>(x, base + (uint64_t) (r0 + ch * R) * stride, stride, p, s);
#ifndef MK_ROW_BY_ROW_SUMS  // -DMK_ROW_BY_ROW_SUMS: one warp_sum per row, as before (A/B runs)
        constexpr int sh = 5 - log2_of<R>();
        const float v = warp_sum_rows<R>(s);
        if ((l & ((1 << sh) - 1)) == 0) {
            const int i = ch * R + (l >> sh);
            out[p.wpr > 1 ? i * p.wpr + p.slot : i] = v;
        }
#else
#pragma unroll
        for (int k = 0; k < R; k++) emit(ch * R + k, s[k]);
#endif
    }
    for (int i = full * R + p.rw; i < rows; i += p.nrw) {
        float s[1] = {0.0f};
        dot_any<W, 1>(x, base + (uint64_t) (r0 + i) * stride, stride, p, s);
        emit(i, s[0]);
    }
}

// The planar types' row loops are functions of their own: inlined, they changed the register allocation of the
// whole kernel (ptxas: stack frame 128 -> 240 bytes) and every other matvec got slower: 1B BF16 step 1,363 -> 1,451
// us, 1B Q4_0 917 -> 975 us (bench/results/2026-12-01-h200-gpu-executor-23d7a18-inline).
template <typename W, int R>
__device__ __noinline__ void mv_rows_planar(const mv_plan p, const uint8_t * base, uint64_t stride, const mv_x x, int rows,
                                            float * out) {
    mv_rows<W, R>(p, base, stride, x, 0, rows, out);
}

template <typename W, int R>
__device__ __forceinline__ void mv_rows_any(const mv_plan p, const uint8_t * base, uint64_t stride, const mv_x x, int rows,
                                            float * out) {
    if constexpr (dev::is_planar<W>::value) {
        mv_rows_planar<W, R>(p, base, stride, x, rows, out);
    } else {
        mv_rows<W, R>(p, base, stride, x, 0, rows, out);
    }
}

// Plans and inputs go by value, and the lambda captures by value: taken by reference, they ended up in local
// memory (a round trip to L2 for every row's result, as the L1 is mostly carved out for shared memory).
__device__ void mv_segment(const mv_plan p, int type, const uint8_t * base, uint64_t stride, const mv_x x, int rows,
                           float * out) {
    dev::dispatch_type(type, [=](auto Wt) {
        using W = decltype(Wt);
        constexpr int M = dev::max_rows_of<W>();  // the host's split keeps p.R <= M; R = 8 is not compiled above it
        switch (p.R) {
            case 8:  mv_rows_any<W, (M < 8 ? M : 8)>(p, base, stride, x, rows, out); break;
            case 4:  mv_rows_any<W, (M < 4 ? M : 4)>(p, base, stride, x, rows, out); break;
            case 2:  mv_rows_any<W, 2>(p, base, stride, x, rows, out); break;
            default: mv_rows_any<W, 1>(p, base, stride, x, rows, out); break;
        }
    });
}

__device__ void finish_rows(const mv_plan & p, int rows, float * part, float * out) {
    __syncthreads();
    if (p.wpr > 1 && threadIdx.x < rows) {
        float v = 0.0f;
        for (int k = 0; k < p.wpr; k++) {
            v += part[threadIdx.x * p.wpr + k];
        }
        out[threadIdx.x] = v;
    }
}

// `rows` rows of segment s starting at base0 (glu: and of segment 1 at base1; combined) into y; y2 is scratch of the
// same size and part 2 * k_part floats. The rows may be in global memory or staged in shared memory.
__device__ void matvec_rows(const instruction & in, int s, const mv_x & x, const uint8_t * base0, const uint8_t * base1,
                            int rows, float * y, float * y2, float * part, bool ring) {
    const segment & sg = in.seg[s];
    const mv_plan p = plan_rows(rows, ring ? 0 : sg.gpu_rows, sg.gpu_split);
    mv_segment(p, in.seg[s].type, base0, in.seg[s].row_bytes, x, rows, p.wpr > 1 ? part : y);
    if (in.kind == instr_kind::glu) {
        mv_segment(p, in.seg[1].type, base1, in.seg[1].row_bytes, x, rows, p.wpr > 1 ? part + k_part : y2);
    }
    finish_rows(p, rows, part, y);
    if (in.kind == instr_kind::glu) {
        if (p.wpr > 1 && threadIdx.x < rows) {
            float v = 0.0f;
            for (int k = 0; k < p.wpr; k++) {
                v += part[k_part + threadIdx.x * p.wpr + k];
            }
            y2[threadIdx.x] = v;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < rows; j += k_threads) {
            const float g = y[j], u = y2[j];
            y[j] = in.glu_swapped ? glu_gate_cuda(in.glu_op, u) * g : glu_gate_cuda(in.glu_op, g) * u;
        }
    }
    __syncthreads();
}

// --- the weight ring (sm_90) ----------------------------------------------------------------------------------
// Weights do not depend on anything a step computes, so a block can fetch them long before the instruction that
// uses them may start. Each block keeps a ring of `ring_slots` shared-memory slots. Thread 0 walks the block's own
// future tiles (the same order the block executes them) and fills every free slot with the next chunk of whole
// weight rows, using bulk copies (TMA) that complete on a per-slot mbarrier. The copies cost the issuing thread
// nothing, cross instruction boundaries and keep running while the block waits on its dependencies; when a tile's
// dependencies are met its first chunks are already on chip. A slot is refilled after the barrier that ends the
// matvec which read it. Off by default (LLAMA_MEGAKERNEL_RING=N turns it on) and without sm_90: weights are then read
// from global memory after an L2 prefetch.

constexpr int k_max_slots = 8;

// The chunks of tile t of instruction i: n_chunks of rows_per_chunk rows (the last may be shorter); for glu each
// chunk holds the rows of segment 0 then, at off1, the same rows of segment 1. n_chunks 0: the tile is not staged.
struct chunk_plan {
    int n_chunks, rows_per_chunk, rows, n_segs;
    const uint8_t * w[2];
    uint32_t rb[2];
    uint32_t off1;
};

// The ring needs sm_90 code: an sm_80 build running on a newer device must not use it even if the host set it up.
__device__ __forceinline__ bool ring_on(const kernel_args & a) {
#if __CUDA_ARCH__ >= 900
    return a.ring_slots > 0;
#else
    (void) a;
    return false;
#endif
}

__device__ chunk_plan plan_chunks(const kernel_args & a, const instruction & in, int i, int t) {
    chunk_plan c{};
    if (!ring_on(a) || !a.ring_ok[i]) {
        return c;
    }
    const tile_rows tr = rows_of(in, t);
    const bool glu = in.kind == instr_kind::glu;
    c.n_segs = glu ? 2 : 1;
    uint32_t per_row = 0;
#pragma unroll
    for (int k = 0; k < 2; k++) {  // fixed bounds: a runtime-indexed c.rb/c.w would live in local memory
        if (k < c.n_segs) {
            const segment & sg = in.seg[glu ? k : tr.seg];
            c.rb[k] = (uint32_t) sg.row_bytes;
            c.w[k] = resolve(a, sg.w) + (uint64_t) weight_row(sg, tr.r0) * sg.row_bytes;
            per_row += c.rb[k];
        }
    }
    c.rows = tr.r1 - tr.r0;
    const int fit = (int) ((uint32_t) a.slot_bytes / per_row);  // >= 1: gpu_load checked
    c.n_chunks = (c.rows + fit - 1) / fit;
    c.rows_per_chunk = (c.rows + c.n_chunks - 1) / c.n_chunks;
    c.off1 = (uint32_t) c.rows_per_chunk * c.rb[0];
    return c;
}

[[maybe_unused]] __device__ __forceinline__ uint32_t smem_addr(const void * p) {
    return (uint32_t) __cvta_generic_to_shared(p);
}

__device__ __forceinline__ bool slot_ready(uint64_t * bar, uint32_t parity) {
    uint32_t ok = 1;
#if __CUDA_ARCH__ >= 900
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(ok) : "r"(smem_addr(bar)), "r"(parity) : "memory");
#endif
    return ok != 0;
}

// Thread 0's cursor: the next chunk to request, in the block's execution order, and how many were requested.
struct ring_cursor {
    int instr, tile, chunk;
    unsigned issued;
    chunk_plan plan;  // of (instr, tile)
};

// Thread 0: put the cursor on the block's first tile of instruction i (tile 1 << 30: nothing to stage there).
__device__ void cursor_enter(const kernel_args & a, ring_cursor & rc, int i) {
    rc.instr = i;
    rc.chunk = 0;
    rc.plan.n_chunks = 0;
    if (i >= a.n_instrs) {
        return;
    }
    const int G = gridDim.x;
    rc.tile = ((int) blockIdx.x - a.offsets[i]) % G;
    rc.tile += rc.tile < 0 ? G : 0;
    if (rc.tile < a.tiles[i] && a.ring_ok[i]) {
        rc.plan = plan_chunks(a, a.instrs[i], i, rc.tile);
    } else {
        rc.tile = 1 << 30;
    }
}

// Thread 0: request chunks until the ring holds ring_slots chunks beyond `consumed`, or the program's end.
__device__ void ring_fill(const kernel_args & a, ring_cursor & rc, uint8_t * ring, uint64_t * bars, unsigned consumed) {
#if __CUDA_ARCH__ >= 900
    while (rc.issued < consumed + (unsigned) a.ring_slots && rc.instr < a.n_instrs) {
        if (rc.chunk >= rc.plan.n_chunks) {  // the block's next tile of this instruction, or the next instruction
            rc.tile += gridDim.x;
            if (rc.tile < a.tiles[rc.instr]) {
                rc.chunk = 0;
                rc.plan = plan_chunks(a, a.instrs[rc.instr], rc.instr, rc.tile);
            } else {
                cursor_enter(a, rc, rc.instr + 1);
            }
            continue;
        }
        const chunk_plan & c = rc.plan;
        const int ra = rc.chunk * c.rows_per_chunk, rows = min(c.rows - ra, c.rows_per_chunk);
        const int slot = (int) (rc.issued % (unsigned) a.ring_slots);
        uint8_t * dst = ring + (size_t) slot * a.slot_bytes;
        const uint32_t bar = smem_addr(bars + slot);
        uint32_t bytes = 0;
        for (int k = 0; k < c.n_segs; k++) {
            bytes += (uint32_t) rows * c.rb[k];
        }
        // No proxy fence here: the slot's previous contents were read into registers and used before the barrier
        // that precedes this call (a fence.proxy.async would also wait for the copies still in flight).
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
        for (int k = 0; k < c.n_segs; k++) {
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         ::"r"(smem_addr(dst + (k ? c.off1 : 0))), "l"(c.w[k] + (uint64_t) ra * c.rb[k]),
                           "r"((uint32_t) rows * c.rb[k]), "r"(bar)
                         : "memory");
        }
        rc.chunk++;
        rc.issued++;
    }
#else
    (void) a; (void) rc; (void) ring; (void) bars; (void) consumed;
#endif
}

// Thread 0, at the start of the kernel: the barriers and the first chunks.
__device__ void ring_start(const kernel_args & a, ring_cursor & rc, uint8_t * ring, uint64_t * bars) {
    rc.issued = 0;
    cursor_enter(a, rc, ring_on(a) ? 0 : a.n_instrs);
#if __CUDA_ARCH__ >= 900
    for (int k = 0; k < a.ring_slots; k++) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bars + k)) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    ring_fill(a, rc, ring, bars, 0);
#else
    (void) ring; (void) bars;
#endif
}

// All threads: wait until chunk number `n` of this block is in its slot. False on timeout (abort raised).
__device__ bool ring_wait(const kernel_args & a, uint64_t * bars, unsigned n, int self) {
    uint64_t * bar = bars + n % (unsigned) a.ring_slots;
    const uint32_t parity = (n / (unsigned) a.ring_slots) & 1;
    if (slot_ready(bar, parity)) {
        return true;
    }
    const unsigned long long deadline = global_ns() + a.timeout_ns;
    while (!slot_ready(bar, parity)) {
        if (global_ns() > deadline) {
            if (atomicExch(a.abort, 1) == 0) {
                *(volatile int *) a.error = 1 + self;
                __threadfence_system();
            }
            return false;
        }
    }
    return true;
}

// Thread 0, before the block leaves early: let every requested copy land (nothing may write into shared memory
// that the next block on this multiprocessor owns).
__device__ void ring_drain(const kernel_args & a, const ring_cursor & rc, uint64_t * bars, unsigned consumed) {
    for (unsigned n = consumed; n < rc.issued; n++) {
        uint64_t * bar = bars + n % (unsigned) a.ring_slots;
        const uint32_t parity = (n / (unsigned) a.ring_slots) & 1;
        for (int k = 0; k < (1 << 24) && !slot_ready(bar, parity); k++) {
        }
    }
}

// ggml-cuda's matvec for quantized weights (mmvq) first rounds x to q8_1: blocks of 32, d = amax/127 kept as F16,
// q = round(x / d). Doing the same keeps the megakernel's logits within float summation order of stock's.
// x keeps the rounded values (for the float paths); xq/xd get the int8 values and scales (for the integer paths).
// ggml-cuda is built with -use_fast_math, so its quantize_q8_1 divides with div.approx.ftz: the same instruction
// here rounds x to the same int8 values (IEEE division flipped some .5 cases, and cost 5% of the kernel's samples).

// One group of eight values v (of group g of x) rounded to q8_1 as ggml-cuda's quantize_q8_1 does it: the four lanes
// l..l+3 (l % 4 == 0) of a warp hold one block of 32, so two shuffles give its largest magnitude. Every lane of the
// warp must call it; only those with `live` write: the rounded values to x, the int8 values to xq, the block's scale
// (F16-rounded, as ggml keeps it) to xd, and the sum of the block's values before rounding (F16-rounded: ggml-cuda's
// ds.y, which its Q4_1 and Q5_1 dot products take for the min term) to xs.
__device__ __forceinline__ void round_group_q8_1(const float (&v)[8], int g, bool live, float * x, int8_t * xq,
                                                 float * xd, float * xs) {
    float amax = 0.0f, sum = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        amax = fmaxf(amax, fabsf(v[k]));
        sum += v[k];
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float d = div_approx(amax, 127.0f);
    const float dh = __half2float(__float2half_rn(d));
    float r[8];
    uint32_t packed[2] = {0, 0};
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const float q = amax == 0.0f ? 0.0f : roundf(div_approx(v[k], d));
        r[k] = q * dh;
        packed[k / 4] |= ((uint32_t) (int8_t) q & 0xffu) << (8 * (k % 4));
    }
    if (live) {
        float4 * p = (float4 *) (x + 8 * g);
        p[0] = make_float4(r[0], r[1], r[2], r[3]);
        p[1] = make_float4(r[4], r[5], r[6], r[7]);
        *(uint2 *) (xq + 8 * g) = make_uint2(packed[0], packed[1]);
        if (g % 4 == 0) {
            xd[g / 4] = dh;
            xs[g / 4] = __half2float(__float2half_rn(sum));
        }
    }
}

__device__ void round_q8_1(float * x, int8_t * xq, float * xd, float * xs, int n) {
    // eight values per thread, four threads per block of 32: two shuffles per block instead of a warp reduction
    // per block (a warp walking the blocks one after another took 4 us for the 8,192 values of an FFN input)
    const int l = threadIdx.x % 32, ng = n / 8;
    for (int g0 = threadIdx.x - l; g0 < ng; g0 += k_threads) {  // warp-uniform loop: the shuffles need every lane
        const int g = min(g0 + l, ng - 1);
        const float4 u = ((const float4 *) (x + 8 * g))[0], t = ((const float4 *) (x + 8 * g))[1];
        const float v[8] = {u.x, u.y, u.z, u.w, t.x, t.y, t.z, t.w};
        round_group_q8_1(v, g, g0 + l < ng, x, xq, xd, xs);
    }
    __syncthreads();
}

// form_input (plain, or an RMS norm over the whole vector) and round_q8_1 in fewer passes: each thread loads its
// groups of eight with two 16-byte loads (a quarter of form_input's load instructions) and, for a plain input,
// rounds them in registers; an RMS norm keeps one pass over shared memory after its sum of squares, which scales and
// rounds at once. Saves a pass and a barrier (form_input took 0.9-2.3 us and round_q8_1 0.7-1.9 us per tile on the
// 1B shape, profile of 92fea15). The arithmetic is the two functions', value for value (the sum of squares in
// ggml-cuda's order, sum_sq_ggml_order). False (nothing done) where it does not apply: a gate, per-group norms, an
// unaligned source.
__device__ __forceinline__ bool form_round_q8_1(const kernel_args & a, const vec_in & in, float * x, int8_t * xq,
                                                float * xd, float * xs, float * w, bool w_ready, bool x_ready) {
    const int n = in.n, ng = n / 8, l = threadIdx.x % 32;
    const bool rms = in.kind == in_kind::rms_norm;
    const float * s = (const float *) resolve(a, in.src);
    if ((in.kind != in_kind::plain && !(rms && in.norm_row == 0)) || !in.gate.null() || n % 32 != 0 ||
        ((uintptr_t) s & 15) != 0) {
        return false;
    }
    for (int g0 = threadIdx.x - l; g0 < ng && !x_ready; g0 += k_threads) {  // warp-uniform, as round_q8_1
        const int g = min(g0 + l, ng - 1);
        const float4 u = __ldcg((const float4 *) (s + 8 * g)), t = __ldcg((const float4 *) (s + 8 * g + 4));
        if (rms) {
            if (g0 + l < ng) {
                ((float4 *) (x + 8 * g))[0] = u;
                ((float4 *) (x + 8 * g))[1] = t;
            }
        } else {
            const float v[8] = {u.x, u.y, u.z, u.w, t.x, t.y, t.z, t.w};
            round_group_q8_1(v, g, g0 + l < ng, x, xq, xd, xs);
        }
    }
    if (rms) {
        const float * nw = in.w.null() ? nullptr : (const float *) resolve(a, in.w);
        // (its barriers order the stores to x)
        const float scale = rsqrtf(div_approx(sum_sq_ggml_order(x, n, w + n), (float) n) + in.eps);
        for (int g0 = threadIdx.x - l; g0 < ng; g0 += k_threads) {
            const int g = min(g0 + l, ng - 1);
            float v[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float wk = !nw ? 1.0f : w_ready ? w[8 * g + k] : __ldg(nw + 8 * g + k);
                v[k] = x[8 * g + k] * scale * wk;
            }
            round_group_q8_1(v, g, g0 + l < ng, x, xq, xd, xs);
        }
    }
    __syncthreads();
    return true;
}

// The matvec's input in shared memory: x, and with q8 its q8_1 rounding (xq, xd). Returns the global time at which
// x was formed, before the rounding (0 without `timed`), for the profile's sub-phases. (As a call of its own instead
// of inlined, the kernel's stack frame grew from 224 to 544 bytes: the call site has much in registers.)
// -DMK_NO_FUSED_ROUND builds it without form_round_q8_1, for A/B runs of the kernel as it was compiled before.
__device__ __forceinline__ unsigned long long form_x(const kernel_args & a, const vec_in & in, float * x, int8_t * xq,
                                                     float * xd, float * xs, float * w, bool w_ready, bool q8, bool timed,
                                                     bool tile0) {
    const bool x_ready = !in.pre_src.null();  // (an rms_norm input: the compiler folds into no other kind)
    if (x_ready) {
        form_pre(a, in, x, w, tile0);
    }
#ifndef MK_NO_FUSED_ROUND
    const bool fused = q8 && a.fuse_round && form_round_q8_1(a, in, x, xq, xd, xs, w, w_ready, x_ready);
#else
    const bool fused = false;
#endif
    if (!fused) {
        form_input(a, in, x, w, w_ready, x_ready);
    }
    const unsigned long long t = timed ? global_ns() : 0;
    if (q8 && !fused) {
        round_q8_1(x, xq, xd, xs, in.n);
    }
    return t;
}

// KV cells staged in shared memory at a time: 128 for head sizes up to 64, else 64 (a 128-cell chunk of head size
// 256 would not fit). Each chunk costs four barriers, and staged after the wait a round trip too. At depth 4,096
// (288 cells a tile on the 1B shape) 128-cell chunks took the step from 1,202 to 1,131 us (run 86). (In session 18 they had
// cost every other phase, 1B Q4_0 834 -> 961 us at 256 cells, because their staging held 32 loads a thread in
// registers and the kernel's spills grew to 350/628 bytes; it now holds 8, in passes. docs/gpu-executor-notes.md.)
// -DMK_ATTN_CHUNK=N fixes the size for A/B builds.
__host__ __device__ inline int attn_chunk(const attention & at) {
#ifdef MK_ATTN_CHUNK
    return MK_ATTN_CHUNK;
#else
    return at.head_dim_k <= 64 && at.head_dim_v <= 64 ? 128 : 64;
#endif
}

template <int T> __device__ __forceinline__ float ld_kv_t(const uint8_t * p) {
    if constexpr (T == T_F16) {
        return __half2float(__ushort_as_half(__ldcg((const unsigned short *) p)));
    } else if constexpr (T == T_BF16) {
        return dev::b2f(__ldcg((const unsigned short *) p));
    } else {
        return __ldcg((const float *) p);
    }
}

__device__ __forceinline__ float ld_kv(int type, const uint8_t * p) {
    return type == T_F16 ? ld_kv_t<T_F16>(p) : type == T_BF16 ? ld_kv_t<T_BF16>(p) : ld_kv_t<T_F32>(p);
}

// Cells [cb, cb + nc) of one head's K (or V) rows into dst, hd + 1 floats apart, one element at a time. Only for
// head sizes that do not divide the block (stage_chunk below is the fast path).
__device__ void stage_rows(float * dst, int hd, const uint8_t * base, int type, uint64_t nb_dim, uint64_t nb_cell, int cb,
                           int nc) {
    for (int e = threadIdx.x; e < nc * hd; e += k_threads) {
        const int c = e / hd, d = e % hd;
        dst[c * (hd + 1) + d] = ld_kv(type, base + (uint64_t) (cb + c) * nb_cell + (uint64_t) d * nb_dim);
    }
}

// One thread's part of a staged K or V chunk: its k-th element is cell c + k * dc, dimension d + k * dd.
struct stage_walk {
    int c, dc, d, dd;
};

// The mask, K and V of cells [cb, cb + nc) into shared memory (rows hd + 1 floats apart), and with `q` the query
// rows too. All loads of a pass are issued before any value is used, and none sits behind a branch (out-of-range
// elements load a clamped address and are dropped at the store): a load whose value is converted or stored before
// the next load is issued costs a whole memory round trip, ~1 us here, and an attention tile made of such loads
// took 16 us. Needs k_threads to be a multiple of both head sizes.
template <int T>
__device__ void stage_chunk(const attention & at, const uint8_t * kb, const uint8_t * vb, const uint8_t * mb, float * ks,
                            float * vs, float * msk, int cb, int nc, bool v_by_cell, float * q, const float * qg, int nq) {
    constexpr int N = 8;  // a 64-cell chunk of head size 64 in one pass of loads (one round trip); 128 cells in two
    const int t = threadIdx.x, hk = at.head_dim_k, hv = at.head_dim_v;
    // K: a thread keeps one dimension and walks the cells; V the same, or, transposed (cells contiguous), it keeps
    // one cell and walks the dimensions, so that neighbouring threads read neighbouring addresses either way.
    const stage_walk wk{t / hk, k_threads / hk, t % hk, 0};
    const int chunk = attn_chunk(at);
    const stage_walk wv = v_by_cell ? stage_walk{t % chunk, 0, t / chunk, k_threads / chunk}
                                    : stage_walk{t / hv, k_threads / hv, t % hv, 0};
    const int per_thread = (chunk * max(hk, hv) + k_threads - 1) / k_threads;
    const uint8_t * kd = kb + (uint64_t) wk.d * at.k_nb_dim + (uint64_t) cb * at.k_nb_cell;
    const uint8_t * vc = vb + (uint64_t) cb * at.v_nb_cell;
    for (int k0 = 0; k0 < per_thread; k0 += N) {
        float rk[N], rv[N], rq0 = 0.0f, rq1 = 0.0f;
        uint32_t rm = 0;  // the mask's bits: converted at the store, not between loads
        if (k0 == 0) {
            const int cm = min(t, nc - 1);
            if (q) {
                rq0 = ldcg_f(qg + min(t, nq - 1));
                rq1 = ldcg_f(qg + min(t + k_threads, nq - 1));
            }
            if (mb) {
                rm = at.mask_type == T_F16 ? (uint32_t) __ldcg((const unsigned short *) mb + cb + cm)
                                           : __ldcg((const unsigned int *) mb + cb + cm);
            }
        }
#pragma unroll
        for (int k = 0; k < N; k++) {
            const int c = min(wk.c + (k0 + k) * wk.dc, nc - 1);
            rk[k] = ld_kv_t<T>(kd + (uint64_t) c * at.k_nb_cell);
        }
#pragma unroll
        for (int k = 0; k < N; k++) {
            const int c = min(wv.c + (k0 + k) * wv.dc, nc - 1), d = min(wv.d + (k0 + k) * wv.dd, hv - 1);
            rv[k] = ld_kv_t<T>(vc + (uint64_t) d * at.v_nb_dim + (uint64_t) c * at.v_nb_cell);
        }
        if (k0 == 0) {
            if (q && t < nq) {
                q[t] = rq0;
            }
            if (q && t + k_threads < nq) {
                q[t + k_threads] = rq1;
            }
            if (t < nc) {
                msk[t] = !mb ? 0.0f : at.mask_type == T_F16 ? __half2float(__ushort_as_half((unsigned short) rm)) : __uint_as_float(rm);
            }
        }
#pragma unroll
        for (int k = 0; k < N; k++) {
            const int c = wk.c + (k0 + k) * wk.dc;
            if (c < nc) {
                ks[c * (hk + 1) + wk.d] = rk[k];
            }
        }
#pragma unroll
        for (int k = 0; k < N; k++) {
            const int c = wv.c + (k0 + k) * wv.dc, d = wv.d + (k0 + k) * wv.dd;
            if (c < nc && d < hv) {
                vs[c * (hv + 1) + d] = rv[k];
            }
        }
    }
}

// Shared memory (floats) an attention tile needs.
__host__ __device__ inline size_t attn_smem_floats(const attention & at) {
    const int group = at.n_head / at.n_head_kv;
    const size_t chunk = attn_chunk(at);
    return (size_t) group * at.head_dim_k + chunk * (at.head_dim_k + 1) +
           chunk * (at.head_dim_v + 1) + (size_t) group * chunk + chunk +
           (size_t) group * at.head_dim_v + 4 * (size_t) group;
}

// Where an attention tile keeps its parts in shared memory (floats).
struct attn_layout {
    float * q;    // group x hk
    float * ks;   // chunk x (hk + 1)
    float * vs;   // chunk x (hv + 1)
    float * p;    // group x chunk: scores, then probabilities
    float * msk;  // chunk
    float * acc;  // group x hv
    float * mx;   // group: running max
    float * sm;   // group: running sum
    float * cr;   // group: rescale of this chunk
    __device__ attn_layout(const attention & at, float * smem) {
        const int group = at.n_head / at.n_head_kv, hk = at.head_dim_k, hv = at.head_dim_v;
        q = smem;
        ks = q + group * hk;
        const int chunk = attn_chunk(at);
        vs = ks + chunk * (hk + 1);
        p = vs + chunk * (hv + 1);
        msk = p + group * chunk;
        acc = msk + chunk;
        mx = acc + group * hv;
        sm = mx + group;
        cr = sm + group;
    }
};

// A tile's KV head, its cells and the cache bases of that head.
struct attn_span {
    int kvh, split, c0, c1;
    const uint8_t * kb;
    const uint8_t * vb;
    const uint8_t * mb;
    bool v_by_cell;  // transposed V (flash attention off): cells contiguous
    bool fast;       // stage_chunk applies
    __device__ attn_span(const kernel_args & a, const attention & at, int tile) {
        kvh = tile / at.n_split;
        split = tile % at.n_split;
        c0 = split * at.cells_per_split;
        c1 = min(at.n_kv, c0 + at.cells_per_split);
        kb = resolve(a, at.k) + (uint64_t) kvh * at.k_nb_head;
        vb = resolve(a, at.v) + (uint64_t) kvh * at.v_nb_head;
        mb = at.mask.null() ? nullptr : resolve(a, at.mask);
        v_by_cell = at.v_nb_cell < at.v_nb_dim;
        const int group = at.n_head / at.n_head_kv;
        fast = k_threads % at.head_dim_k == 0 && k_threads % at.head_dim_v == 0 && at.k_type == at.v_type &&
               group * at.head_dim_k <= 2 * k_threads;
    }
};

// The mask, K and V of cells [cb, cb + nc) into shared memory, and with `qd` the query rows too (fast path only).
__device__ void stage_kv(const attention & at, const attn_span & sp, const attn_layout & L, int cb, int nc, float * qd,
                         const float * qg) {
    const int group = at.n_head / at.n_head_kv, hk = at.head_dim_k, hv = at.head_dim_v;
    if (sp.fast) {
        switch (at.k_type) {
            case T_F16:  stage_chunk<T_F16>(at, sp.kb, sp.vb, sp.mb, L.ks, L.vs, L.msk, cb, nc, sp.v_by_cell, qd, qg, group * hk); break;
            case T_BF16: stage_chunk<T_BF16>(at, sp.kb, sp.vb, sp.mb, L.ks, L.vs, L.msk, cb, nc, sp.v_by_cell, qd, qg, group * hk); break;
            default:     stage_chunk<T_F32>(at, sp.kb, sp.vb, sp.mb, L.ks, L.vs, L.msk, cb, nc, sp.v_by_cell, qd, qg, group * hk); break;
        }
    } else {
        for (int c = threadIdx.x; c < nc; c += k_threads) {
            L.msk[c] = !sp.mb ? 0.0f : at.mask_type == T_F16 ? __half2float(__ushort_as_half(__ldcg((const unsigned short *) sp.mb + cb + c)))
                                                             : __ldcg((const float *) sp.mb + cb + c);
        }
        stage_rows(L.ks, hk, sp.kb, at.k_type, at.k_nb_dim, at.k_nb_cell, cb, nc);
        stage_rows(L.vs, hv, sp.vb, at.v_type, at.v_nb_dim, at.v_nb_cell, cb, nc);
    }
}

// Before the tile's dependencies are met: its first chunk of K, V and mask. Only the cell this step appends can
// still change (attention.kv_row); attn_tile reloads it after the wait. This takes the staging round trip off the
// critical path (it cost ~4-6 us of the attention tile's ~12, docs/gpu-executor-notes.md runs 33-34).
// The appended cell's index is a graph input, so it is read here too (into *kv_row): after the wait the tile's
// loads of Q and of that cell then go out together instead of behind the index's round trip.
__device__ __forceinline__ void attn_prestage_chunk(const kernel_args & a, const attention & at, int tile, float * smem,
                                           long long * kv_row) {
    const attn_span sp(a, at, tile);
    if (threadIdx.x == 0) {
        *kv_row = at.kv_row_type == T_I64 ? *(const long long *) resolve(a, at.kv_row)
                                          : *(const int32_t *) resolve(a, at.kv_row);
    }
    stage_kv(at, sp, attn_layout(at, smem), sp.c0, min(attn_chunk(at), sp.c1 - sp.c0), nullptr, nullptr);
}

// The merge of KV head kvh's query heads into attention::merged, in the split that finished last. A call of its own:
// inlined, it raised the kernel's spills from 246/316 to 286/416 bytes (stores/loads) though it runs once a head.
__device__ __noinline__ void merge_group(const kernel_args & a, const attention & at, int kvh) {
    const int group = at.n_head / at.n_head_kv, hv = at.head_dim_v;
    merge_splits((const float *) resolve(a, at.partials), at.n_split, hv, kvh * group, group, nullptr,
                 (float *) resolve(a, at.merged) + (size_t) kvh * group * hv);
}

// The head group's last split to finish merges it into attention::merged. After the block's partials are written.
__device__ __forceinline__ void attn_arrive(const kernel_args & a, const attention & at, int kvh) {
    if (!at.merged.null()) {
        __shared__ int s_last;
        __syncthreads();  // the block's partials before thread 0's release
        if (threadIdx.x == 0) {
            unsigned long long old;
            unsigned long long * arrivals = (unsigned long long *) resolve(a, at.arrivals) + kvh;
            asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], 1;" : "=l"(old) : "l"(arrivals) : "memory");
            s_last = old + 1 == (a.epoch + 1) * (unsigned long long) at.n_split;
        }
        __syncthreads();
        if (s_last) {  // the other splits' partials are visible (their release, this acquire, the barrier)
            merge_group(a, at, kvh);
        }
    }
}

// --- the attention tile with a warp per range of cells ----------------------------------------------------------
// attn_tile stages 64-128-cell chunks in shared memory and works through each in block-wide phases (staging,
// scores, softmax, accumulators: four barriers a chunk); at depth 4,096 that was 24-28 us a tile for 288 cells, at
// 256 cells 9.5 us for 64. Here the tile's K, V and mask are copied into shared memory with cp.async before the wait
// (attn_warps_prestage; the appended cell is re-read after it), and each warp then takes its own range of the cells,
// head size / 4 lanes per cell: the scores, an online softmax across the warp's cells and the accumulators stay in
// registers, and the 16 warps are merged once, through shared memory. F16/BF16 caches, K and V of one head size (64,
// 128, or 256 with 8 values a lane), up to k_warp_group query heads per KV head, and copies that fit beside the rest
// (attn_f); anything else takes attn_tile. Reading the cells straight from L2 a pass at a time instead (71b6b8a) was slower: each pass waited
// a round trip. The kernel spills 412/776 bytes with this tile, 226/324 without it (-DMK_NO_ATTN_WARPS); run 89
// compared the two builds in one call: with the tile tg128 is 3-8% faster at 256 cells and 26% at depth 4,096.
// (The barrier at the end of attn_tile_warps_t came after run 88: only a block with a second tile of the
// instruction needs it.)
constexpr int k_warp_group = 4;

__host__ __device__ inline bool attn_warps_ok(const attention & at) {
    if (at.n_head_kv <= 0 || at.n_head % at.n_head_kv != 0) {
        return false;
    }
    const int group = at.n_head / at.n_head_kv, hd = at.head_dim_k;
    const bool vt = at.v_nb_cell < at.v_nb_dim;  // transposed V (flash attention off): cells contiguous
    return (at.k_type == T_F16 || at.k_type == T_BF16) && at.v_type == at.k_type && at.head_dim_v == hd &&
           (hd == 64 || hd == 128 || hd == 256) && group <= k_warp_group && at.k_nb_dim == 2 &&
           at.k_nb_cell % 16 == 0 && at.k_nb_head % 16 == 0 &&
           (vt ? at.v_nb_cell == 2 : at.v_nb_dim == 2 && at.v_nb_cell % 16 == 0 && at.v_nb_head % 16 == 0);
}

// Shared memory (floats): the query rows, then per warp its (max, sum) and accumulators per query head.
__host__ __device__ inline size_t attn_warps_smem_floats(const attention & at) {
    const size_t group = at.n_head / at.n_head_kv;
    return group * at.head_dim_k + (size_t) k_warps * group * (2 + at.head_dim_v);
}

// Where attn_warps_prestage's copies of a tile's cells lie (bytes from the region's start): K rows of hk values; V
// rows of hv values, or, transposed, hv rows of the split's cells; then the mask's cells.
struct attn_raw {
    int esz, mesz;                 // bytes per K/V value, per mask value
    int k_pitch, v_pitch;          // bytes from one row to the next
    int k_off, v_off, m_off, bytes;
    __host__ __device__ attn_raw(const attention & at) {
        esz = at.k_type == T_F32 ? 4 : 2;
        mesz = at.mask_type == T_F16 ? 2 : 4;
        const bool vt = at.v_nb_cell < at.v_nb_dim;  // transposed V (flash attention off): cells contiguous
        const int cps = at.cells_per_split;
        auto up16 = [](int v) { return (v + 15) / 16 * 16; };
        k_pitch = at.head_dim_k * esz;
        // (transposed: 4 bytes over whole 16, so that the lanes' rows, one word-stride apart, hit different banks)
        v_pitch = vt ? up16(cps * esz) + 4 : at.head_dim_v * esz;
        k_off = 0;
        v_off = up16(cps * k_pitch);
        m_off = v_off + up16((vt ? at.head_dim_v : cps) * v_pitch);
        bytes = m_off + up16(cps * mesz);
    }
};


// rows x len bytes from src (rows `stride` apart) to dst (rows `pitch` apart) with cp.async, in the widest unit
// that every address and length allows (the caller checked 4-byte alignment). All threads of the block.
__device__ void copy_rows_async(uint8_t * dst, int pitch, const uint8_t * src, uint64_t stride, int rows, int len) {
    const uint64_t al = (uint64_t) (uintptr_t) src | stride | (uint64_t) len | (uint64_t) (uintptr_t) dst | (uint64_t) pitch;
    const int shift = (al & 15) == 0 ? 4 : (al & 7) == 0 ? 3 : 2;
    const int per_row = len >> shift, n = rows * per_row;
    for (int e = threadIdx.x; e < n; e += k_threads) {
        const int r = e / per_row, o = (e - r * per_row) << shift;
        const unsigned d = (unsigned) __cvta_generic_to_shared(dst + (size_t) r * pitch + o);
        const uint8_t * s = src + (uint64_t) r * stride + o;
        if (shift == 4) {
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(s) : "memory");
        } else if (shift == 3) {
            asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(d), "l"(s) : "memory");
        } else {
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(s) : "memory");
        }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Bytes from the start of shared memory to the copies (after the query rows and the warps' results), and their end.
__host__ __device__ inline size_t attn_warps_raw_off(const attention & at) {
    return (attn_warps_smem_floats(at) * 4 + 15) / 16 * 16;
}
__host__ __device__ inline size_t attn_warps_bytes(const attention & at) {
    return attn_warps_raw_off(at) + attn_raw(at).bytes;
}

// Before the wait: the tile's cells, all of them, into shared memory with cp.async (no registers held while they
// are in flight), and the appended cell's index. False (in every thread) if the addresses do not allow it; the tile
// then takes attn_tile.
__device__ __forceinline__ bool attn_warps_prestage(const kernel_args & a, const attention & at, int tile, float * smem,
                                                 long long * kv_row) {
    const attn_span sp(a, at, tile);
    const attn_raw R(at);
    uint8_t * raw = (uint8_t *) smem + attn_warps_raw_off(at);
    const int n = sp.c1 - sp.c0;
    const uint8_t * k0 = sp.kb + (uint64_t) sp.c0 * at.k_nb_cell;
    // sp.v_by_cell: V transposed, each dimension's cells contiguous
    const uint8_t * v0 = sp.vb + (uint64_t) sp.c0 * (sp.v_by_cell ? (uint64_t) R.esz : at.v_nb_cell);
    const uint8_t * m0 = sp.mb ? sp.mb + (uint64_t) sp.c0 * R.mesz : nullptr;
    const uint64_t al = (uint64_t) (uintptr_t) k0 | at.k_nb_cell | (uint64_t) (uintptr_t) v0 |
                        (sp.v_by_cell ? (at.v_nb_dim | (uint64_t) (n * R.esz)) : at.v_nb_cell) |
                        (m0 ? ((uint64_t) (uintptr_t) m0 | (uint64_t) (n * R.mesz)) : 0);
    if (n <= 0 || n > at.cells_per_split || (al & 3) != 0) {
        return false;
    }
    if (threadIdx.x == 0) {
        *kv_row = at.kv_row_type == T_I64 ? *(const long long *) resolve(a, at.kv_row)
                                          : *(const int32_t *) resolve(a, at.kv_row);
    }
    copy_rows_async(raw + R.k_off, R.k_pitch, k0, at.k_nb_cell, n, R.k_pitch);
    if (sp.v_by_cell) {
        copy_rows_async(raw + R.v_off, R.v_pitch, v0, at.v_nb_dim, at.head_dim_v, n * R.esz);
    } else {
        copy_rows_async(raw + R.v_off, R.v_pitch, v0, at.v_nb_cell, n, at.head_dim_v * R.esz);
    }
    if (m0) {
        copy_rows_async(raw + R.m_off, 0, m0, 0, 1, n * R.mesz);
    }
    return true;
}

// Before the wait, the one call for both attention tiles (a second call site in the main loop raised the kernel's
// spills from 226/324 to 404/772 bytes): 2 if attn_warps_prestage copied all the tile's cells (attn_tile_warps), 1
// if attn_prestage_chunk staged its only chunk (attn_tile), 0 if nothing was staged.
__device__ __noinline__ int attn_prestage(const kernel_args & a, const attention & at, int tile, float * smem,
                                          long long * kv_row) {
#ifndef MK_NO_ATTN_WARPS  // a build without attn_tile_warps, for A/B runs
    if (a.attn_warps && attn_warps_ok(at) && attn_warps_bytes(at) <= (size_t) a.attn_smem_bytes &&
        attn_warps_prestage(a, at, tile, smem, kv_row)) {
        return 2;
    }
#endif
    if (at.cells_per_split <= attn_chunk(at)) {
        attn_prestage_chunk(a, at, tile, smem, kv_row);
        return 1;
    }
    return 0;
}

template <int T> __device__ __forceinline__ float raw_val(const uint8_t * p) {
    if constexpr (T == T_F16) {
        return __half2float(*(const __half *) p);
    } else {
        return dev::b2f(*(const unsigned short *) p);
    }
}

// Four neighbouring values, 8-byte aligned, in one shared-memory load.
template <int T> __device__ __forceinline__ void raw_val4(const uint8_t * p, float f[4]) {
    const uint2 u = *(const uint2 *) p;
    if constexpr (T == T_F16) {
        const float2 lo = __half22float2(*(const __half2 *) &u.x), hi = __half22float2(*(const __half2 *) &u.y);
        f[0] = lo.x, f[1] = lo.y, f[2] = hi.x, f[3] = hi.y;
    } else {
        f[0] = __uint_as_float(u.x << 16), f[1] = __uint_as_float(u.x & 0xffff0000u);
        f[2] = __uint_as_float(u.y << 16), f[3] = __uint_as_float(u.y & 0xffff0000u);
    }
}

// Each lane holds DPL dimensions of a cell, so LANES = head size / DPL lanes share a cell and a warp takes
// 32 / LANES cells a pass. Both are constants so that the shuffle reductions unroll and the query heads' chains
// interleave (run 88's loop had a runtime lane count and a head loop that broke at the group size: each pass, 2 cells
// a warp, took ~1.6 us, its heads one after another; run 89, constant: ~0.6 us). Every pass computes k_warp_group
// heads; with a smaller group the surplus ones repeat the last head and are not kept. DPL 8 (4 cells a pass at head
// size 64, half the passes) was slower in run 90, on every row (1B Q4_0 tg128 -5.4%; the kernel's spill loads 816 ->
// 896 bytes, and even its passes took longer): -DMK_ATTN_DPL=8 builds it, for A/B runs.
#ifndef MK_ATTN_DPL
#define MK_ATTN_DPL 4
#endif
// The compiler's defer_qk (attention::q_ops, k_ops): the per-head norm and rope of Q and of this token's K, run with
// the epilogue code the QKV tiles ran them with, before either attention tile starts. Inlined at one place in the main
// loop (ptxas: 336/808 bytes of spills against 368/844 without it); as a call, from there or from inside the tiles, it
// raised them to 620-628/1,560-1,588. The tile's query heads go to the start of shared memory, where both tiles keep
// them (they then do not load them); in the split that holds the appended cell, that cell's K row goes through k_ops,
// whose set_rows writes it into the cache, which the tile then reads as before. Scratch for the K row: the tile's accumulators, not yet in use. A cell outside the attention would leave
// the cache unwritten, so every split checks it and the step is given up instead (the host recomputes it on stock).
// `kv_row`: the appended cell's index where attn_prestage read it (else it is read here).
__device__ __forceinline__ void attn_qk_ops(const kernel_args & a, const attention & at, int tile, float * smem, bool warped,
                                            const long long * kv_row) {
    const attn_span sp(a, at, tile);
    const int group = at.n_head / at.n_head_kv, hd = at.head_dim_k;
    float * k_row = warped ? smem + group * hd + k_warps * group * 2 : attn_layout(at, smem).acc;
    bool owner = false;
    if (at.k_ops.n_epi > 0) {
        const long long row = kv_row ? *kv_row
                            : at.kv_row_type == T_I64 ? (long long) __ldcg((const long long *) resolve(a, at.kv_row))
                                                      : (long long) __ldcg((const int32_t *) resolve(a, at.kv_row));
        if (row < 0 || row >= at.n_kv) {
            if (threadIdx.x == 0 && atomicExch(a.abort, 1) == 0) {
                *(volatile int *) a.error = k_err_kv_cell;
                __threadfence_system();
            }
        }
        owner = row >= sp.c0 && row < sp.c1;
        const float * kn = (const float *) resolve(a, at.k_new) + (size_t) sp.kvh * hd;
        for (int t = threadIdx.x; owner && t < hd; t += k_threads) {
            k_row[t] = ldcg_f(kn + t);
        }
    }
    if (at.q_ops.n_epi > 0) {
        const float * qg = (const float *) resolve(a, at.q) + (size_t) sp.kvh * group * hd;
        for (int t = threadIdx.x; t < group * hd; t += k_threads) {
            smem[t] = ldcg_f(qg + t);
        }
    }
    __syncthreads();
    if (owner) {
        epilogue(a, at.k_ops, k_row, sp.kvh * hd, (sp.kvh + 1) * hd, nullptr, nullptr);  // ends with a barrier
    }
    if (at.q_ops.n_epi > 0) {
        epilogue(a, at.q_ops, smem, sp.kvh * group * hd, (sp.kvh + 1) * group * hd, nullptr, nullptr);
    }
}

template <int T, int LANES, int DPL>
__device__ void attn_tile_warps_t(const kernel_args & a, const attention & at, int tile, float * smem, phase_clock & pc,
                                  long long row) {
    constexpr int hd = DPL * LANES, per_pass = 32 / LANES, G = k_warp_group;
    const attn_span sp(a, at, tile);
    const attn_raw R(at);
    uint8_t * raw = (uint8_t *) smem + attn_warps_raw_off(at);
    const int group = at.n_head / at.n_head_kv;
    const int w = threadIdx.x / 32, l = threadIdx.x % 32, slot = l / LANES, r = l % LANES;
    const int n = sp.c1 - sp.c0, per_warp = (n + k_warps - 1) / k_warps;
    const int cw0 = min(n, w * per_warp), cw1 = min(n, (w + 1) * per_warp);  // the warp's cells, from the tile's first
    float * q = smem;
    float * wml = q + group * hd;                  // [warp][g]: max, sum
    float * wacc = wml + k_warps * group * 2;      // [warp][g][hd]
    {
        // after the wait: the query rows and the appended cell's K and V (if it is one of the tile's cells) in one
        // round trip; that cell's copy is then overwritten with them
        const float * qg = (const float *) resolve(a, at.q) + (size_t) sp.kvh * group * hd;
        const int t = threadIdx.x;
        const bool mine = row >= sp.c0 && row < sp.c1 && t < hd;
        const bool load_q = at.q_ops.n_epi == 0;  // else attn_qk_ops put them there
        const float rq0 = load_q ? ldcg_f(qg + min(t, group * hd - 1)) : 0.0f;
        const float rq1 = load_q ? ldcg_f(qg + min(t + k_threads, group * hd - 1)) : 0.0f;
        unsigned short rk = 0, rv = 0;
        if (mine) {
            rk = __ldcg((const unsigned short *) (sp.kb + (uint64_t) row * at.k_nb_cell) + t);
            rv = __ldcg((const unsigned short *) (sp.vb + (uint64_t) row * at.v_nb_cell + (uint64_t) t * at.v_nb_dim));
        }
        cp_async_wait_all();
        if (load_q && t < group * hd) {
            q[t] = rq0;
        }
        if (load_q && t + k_threads < group * hd) {
            q[t + k_threads] = rq1;
        }
        __syncthreads();  // every thread's copies have landed
        if (mine) {
            const int c = (int) (row - sp.c0);
            *(unsigned short *) (raw + R.k_off + (size_t) c * R.k_pitch + t * 2) = rk;
            *(unsigned short *) (raw + R.v_off + (sp.v_by_cell ? (size_t) t * R.v_pitch + c * 2 : (size_t) c * R.v_pitch + t * 2)) = rv;
        }
    }
    __syncthreads();
    pc.mark(0);
    // V element (cell c, dimension d) at vrow + c * vc + d * vd
    const uint8_t * vrow = raw + R.v_off;
    const int vc = sp.v_by_cell ? 2 : R.v_pitch, vd = sp.v_by_cell ? R.v_pitch : 2;
    const bool capped = at.softcap != 0.0f;
    float mx[G], sm[G], acc[G][DPL];
#pragma unroll
    for (int g = 0; g < G; g++) {
        mx[g] = -INFINITY;
        sm[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            acc[g][i] = 0.0f;
        }
    }
    for (int cb = cw0; cb < cw1; cb += per_pass) {
        const bool live = cb + slot < cw1;
        const int c = live ? cb + slot : cw0;  // a cell of the tile, as an index from its first
        // K: the lane's DPL neighbouring dimensions (against its DPL query values), 8-byte loads. V by cell: the
        // same dimensions; transposed: dimensions r + LANES * i, so that the lanes read neighbouring rows (a lane's
        // own dimensions, DPL rows apart, would share banks across lanes)
        float kf[DPL], vf[DPL];
#pragma unroll
        for (int j = 0; j < DPL; j += 4) {
            raw_val4<T>(raw + R.k_off + (size_t) c * R.k_pitch + (r * DPL + j) * 2, kf + j);
        }
        if (!sp.v_by_cell) {
#pragma unroll
            for (int j = 0; j < DPL; j += 4) {
                raw_val4<T>(vrow + (size_t) c * vc + (r * DPL + j) * 2, vf + j);
            }
        } else {
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                vf[i] = raw_val<T>(vrow + (size_t) c * vc + (size_t) (r + LANES * i) * vd);
            }
        }
        const float mc = !sp.mb ? 0.0f : at.mask_type == T_F16 ? __half2float(*(const __half *) (raw + R.m_off + (size_t) c * 2))
                                                              : *(const float *) (raw + R.m_off + (size_t) c * 4);
        const bool on = live && mc != -INFINITY;
        float s[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            s[g] = 0.0f;
#pragma unroll
            for (int j = 0; j < DPL; j += 4) {
                const float4 q0 = *(const float4 *) (q + min(g, group - 1) * hd + r * DPL + j);
                s[g] += q0.x * kf[j] + q0.y * kf[j + 1] + q0.z * kf[j + 2] + q0.w * kf[j + 3];
            }
        }
#pragma unroll
        for (int o = LANES / 2; o >= 1; o >>= 1) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
            }
        }
        float m[G];  // the pass's max over its cells (lanes of a cell hold the same score)
#pragma unroll
        for (int g = 0; g < G; g++) {
            float v = s[g] * at.scale;
            if (capped) {
                v = at.softcap * tanhf(v / at.softcap);
            }
            s[g] = on ? v + mc : -INFINITY;
            m[g] = s[g];
        }
#pragma unroll
        for (int o = LANES; o < 32; o <<= 1) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                m[g] = fmaxf(m[g], __shfl_xor_sync(0xffffffffu, m[g], o));
            }
        }
        float p[G], cr[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float m_new = fmaxf(mx[g], m[g]);
            p[g] = s[g] == -INFINITY ? 0.0f : expf_fast_math(s[g] - m_new);
            cr[g] = mx[g] == -INFINITY ? 0.0f : expf_fast_math(mx[g] - m_new);
            mx[g] = m_new;
            m[g] = p[g];  // the pass's sum of p over its cells, below
        }
#pragma unroll
        for (int o = LANES; o < 32; o <<= 1) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                m[g] += __shfl_xor_sync(0xffffffffu, m[g], o);
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            sm[g] = sm[g] * cr[g] + m[g];
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                acc[g][i] = acc[g][i] * cr[g] + p[g] * vf[i];
            }
        }
    }
    pc.mark(1);
    // the warp's accumulators summed over its cell slots; lanes of slot 0 write them
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int i = 0; i < DPL; i++) {
#pragma unroll
            for (int o = LANES; o < 32; o <<= 1) {
                acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
            }
        }
        if (g < group) {
            if (slot == 0) {
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    wacc[(w * group + g) * hd + (sp.v_by_cell ? r + LANES * i : r * DPL + i)] = acc[g][i];
                }
            }
            if (l == 0) {
                wml[(w * group + g) * 2] = mx[g];
                wml[(w * group + g) * 2 + 1] = sm[g];
            }
        }
    }
    __syncthreads();
    // the warps merged: each warp's weight exp(m_w - max) once per (warp, head), in the query rows' space (no longer
    // read), then the tile's partials, as attn_tile writes them
    float * wf = q;  // [warp][g], then the heads' maxima
    if (threadIdx.x < k_warps * group) {
        const int g = threadIdx.x % group;
        float mg = -INFINITY;
        for (int k = 0; k < k_warps; k++) {
            mg = fmaxf(mg, wml[(k * group + g) * 2]);
        }
        const float mk = wml[threadIdx.x * 2];
        wf[threadIdx.x] = mk == -INFINITY ? 0.0f : expf_fast_math(mk - mg);
        if (threadIdx.x < group) {
            wf[k_warps * group + g] = mg;
        }
    }
    __syncthreads();
    float * part = (float *) resolve(a, at.partials);
    for (int e = threadIdx.x; e < group * hd; e += k_threads) {
        const int g = e / hd, d = e % hd;
        float s = 0.0f, v = 0.0f;
#pragma unroll 4
        for (int k = 0; k < k_warps; k++) {
            const float f = wf[k * group + g];
            s += wml[(k * group + g) * 2 + 1] * f;
            v += wacc[(k * group + g) * hd + d] * f;
        }
        float * o = part + ((size_t) (sp.kvh * group + g) * at.n_split + sp.split) * (hd + 2);
        o[2 + d] = v;
        if (d == 0) {
            o[0] = wf[k_warps * group + g];
            o[1] = s;
        }
    }
    attn_arrive(a, at, sp.kvh);
    __syncthreads();  // the warps' results are read before a later tile of this block (attn_tile) reuses the space
    pc.mark(2);
}

// After attn_warps_prestage and the wait; `row` is the appended cell.
__device__ void attn_tile_warps(const kernel_args & a, const attention & at, int tile, float * smem, phase_clock & pc,
                                long long row) {
    const bool bf = at.k_type == T_BF16, wide = at.head_dim_k == 128;  // attn_warps_ok: head size 64, 128 or 256
    constexpr int D = MK_ATTN_DPL, L64 = 64 / D, L128 = 128 / D;
    if (at.head_dim_k == 256) {  // (gemma3) 8 values a lane, a warp per cell: 256 / 4 lanes would not fit a warp
        bf ? attn_tile_warps_t<T_BF16, 32, 8>(a, at, tile, smem, pc, row) : attn_tile_warps_t<T_F16, 32, 8>(a, at, tile, smem, pc, row);
    } else if (bf) {
        wide ? attn_tile_warps_t<T_BF16, L128, D>(a, at, tile, smem, pc, row) : attn_tile_warps_t<T_BF16, L64, D>(a, at, tile, smem, pc, row);
    } else {
        wide ? attn_tile_warps_t<T_F16, L128, D>(a, at, tile, smem, pc, row) : attn_tile_warps_t<T_F16, L64, D>(a, at, tile, smem, pc, row);
    }
}

// One KV head over cells [c0, c1): chunks of K and V are staged in shared memory by all threads (coalesced,
// independent loads), then scores, an online softmax per query head of the group, and the accumulators. With
// `prestaged` the first chunk was staged by attn_prestage before the wait.
__device__ void attn_tile(const kernel_args & a, const attention & at, int tile, float * smem, phase_clock & pc,
                          bool prestaged, const long long * kv_row) {
    const attn_span sp(a, at, tile);
    const attn_layout L(at, smem);
    const int c0 = sp.c0, c1 = sp.c1, kvh = sp.kvh, split = sp.split;
    const int group = at.n_head / at.n_head_kv, hk = at.head_dim_k, hv = at.head_dim_v;
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    float * q = L.q, * ks = L.ks, * vs = L.vs, * p = L.p, * msk = L.msk, * acc = L.acc, * mx = L.mx, * sm = L.sm,
          * cr = L.cr;
    const float * qg = (const float *) resolve(a, at.q) + (size_t) kvh * group * hk;
    for (int i = threadIdx.x; i < group * hv; i += k_threads) {
        acc[i] = 0.0f;
    }
    if (threadIdx.x < group) {
        mx[threadIdx.x] = -INFINITY;
        sm[threadIdx.x] = 0.0f;
    }
    const bool fast = sp.fast;
    const bool q_done = at.q_ops.n_epi > 0;  // attn_qk_ops put the query rows there
    const bool q_first = fast && !q_done;    // they come with the first chunk
    if (!fast && !q_done) {
        for (int i = threadIdx.x; i < group * hk; i += k_threads) {
            q[i] = ldcg_f(qg + i);
        }
    }
    const int chunk = attn_chunk(at);
    for (int cb = c0; cb < c1; cb += chunk) {
        const int nc = min(chunk, c1 - cb);
        __syncthreads();
        if (cb == c0 && prestaged) {
            // the query rows, and the appended cell's K and V rows if they fall in this chunk (one round trip)
            const int64_t row = *kv_row;  // read by attn_prestage, before the wait's barrier
            const bool mine = row >= cb && row < cb + nc;
            const int ci = mine ? (int) (row - cb) : 0;
            float rq0 = 0.0f, rq1 = 0.0f, rk = 0.0f, rv = 0.0f;
            const int t = threadIdx.x;
            if (q_first) {
                rq0 = ldcg_f(qg + min(t, group * hk - 1));
                rq1 = ldcg_f(qg + min(t + k_threads, group * hk - 1));
            }
            if (mine) {
                rk = ld_kv(at.k_type, sp.kb + (uint64_t) row * at.k_nb_cell + (uint64_t) min(t, hk - 1) * at.k_nb_dim);
                rv = ld_kv(at.v_type, sp.vb + (uint64_t) row * at.v_nb_cell + (uint64_t) min(t, hv - 1) * at.v_nb_dim);
            }
            if (q_first && t < group * hk) {
                q[t] = rq0;
            }
            if (q_first && t + k_threads < group * hk) {
                q[t + k_threads] = rq1;
            }
            if (mine && t < hk) {
                ks[ci * (hk + 1) + t] = rk;
            }
            if (mine && t < hv) {
                vs[ci * (hv + 1) + t] = rv;
            }
            if (mine) {  // head sizes above the block: the rest of the row
                for (int d = t + k_threads; d < hk; d += k_threads) {
                    ks[ci * (hk + 1) + d] = ld_kv(at.k_type, sp.kb + (uint64_t) row * at.k_nb_cell + (uint64_t) d * at.k_nb_dim);
                }
                for (int d = t + k_threads; d < hv; d += k_threads) {
                    vs[ci * (hv + 1) + d] = ld_kv(at.v_type, sp.vb + (uint64_t) row * at.v_nb_cell + (uint64_t) d * at.v_nb_dim);
                }
            }
        } else {
            stage_kv(at, sp, L, cb, nc, cb == c0 && q_first ? q : nullptr, qg);
        }
        __syncthreads();
        pc.mark(0);
        // Scores: two neighbouring threads per (query head, cell), each over half of the dimensions with four
        // independent sums, combined with one shuffle. Items are laid out g * ncr + c so that whole warps
        // share the loop bounds (the shuffle needs every lane).
        const int ncr = (nc + 15) & ~15;  // the chunk's cells, rounded up to a whole warp's 16 items
        for (int e = threadIdx.x; e < 2 * group * ncr; e += k_threads) {
            const int item = e >> 1, half = e & 1;
            const int g = item / ncr, c = item % ncr;
            const int cc = c < nc ? c : 0;
            const float * qq = q + g * hk;
            const float * kk = ks + cc * (hk + 1);
            const int d0 = half * (hk / 2), d1 = half ? hk : hk / 2;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            int d = d0;
            for (; d + 4 <= d1; d += 4) {
                s0 += qq[d] * kk[d];
                s1 += qq[d + 1] * kk[d + 1];
                s2 += qq[d + 2] * kk[d + 2];
                s3 += qq[d + 3] * kk[d + 3];
            }
            for (; d < d1; d++) {
                s0 += qq[d] * kk[d];
            }
            float sc = (s0 + s1) + (s2 + s3);
            sc += __shfl_xor_sync(0xffffffffu, sc, 1);
            if (half == 0 && c < nc) {
                float v = -INFINITY;
                if (msk[c] != -INFINITY) {
                    v = sc * at.scale;
                    if (at.softcap != 0.0f) {
                        v = at.softcap * tanhf(v / at.softcap);
                    }
                    v += msk[c];
                }
                p[g * chunk + c] = v;
            }
        }
        __syncthreads();
        for (int g = w; g < group; g += k_warps) {  // online softmax, a warp per query head
            float m = -INFINITY;
            for (int c = l; c < nc; c += 32) {
                m = fmaxf(m, p[g * chunk + c]);
            }
            m = warp_max(m);
            const float m_new = fmaxf(mx[g], m);
            float sum = 0.0f;
            for (int c = l; c < nc; c += 32) {
                const float v = p[g * chunk + c];
                const float e = v == -INFINITY ? 0.0f : expf(v - m_new);
                p[g * chunk + c] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            if (l == 0) {
                const float r = mx[g] == -INFINITY ? 0.0f : expf(mx[g] - m_new);
                cr[g] = r;
                sm[g] = sm[g] * r + sum;
                mx[g] = m_new;
            }
        }
        __syncthreads();
        pc.mark(1);
        // Accumulators: two neighbouring threads per (query head, dimension), each over half of the cells.
        for (int e = threadIdx.x; e < 2 * group * hv + (k_threads - (2 * group * hv) % k_threads) % k_threads;
             e += k_threads) {
            const int item = e >> 1, half = e & 1;
            const bool live = item < group * hv;
            const int g = live ? item / hv : 0, d = live ? item % hv : 0;
            const float * pg = p + g * chunk;
            const int ca = half ? nc / 2 : 0, cz = half ? nc : nc / 2;
            float v0 = 0.0f, v1 = 0.0f;
            int c = ca;
            for (; c + 2 <= cz; c += 2) {
                v0 += pg[c] * vs[c * (hv + 1) + d];
                v1 += pg[c + 1] * vs[(c + 1) * (hv + 1) + d];
            }
            if (c < cz) {
                v0 += pg[c] * vs[c * (hv + 1) + d];
            }
            float v = v0 + v1;
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            if (live && half == 0) {
                acc[item] = acc[item] * cr[g] + v;
            }
        }
    }
    __syncthreads();
    float * part = (float *) resolve(a, at.partials);
    for (int e = threadIdx.x; e < group * hv; e += k_threads) {
        const int g = e / hv, d = e % hv;
        float * o = part + ((size_t) (kvh * group + g) * at.n_split + split) * (hv + 2);
        o[2 + d] = acc[e];
        if (d == 0) {
            o[0] = mx[g];
            o[1] = sm[g];
        }
    }
    attn_arrive(a, at, kvh);
    pc.mark(2);
}

// --- Gated DeltaNet --------------------------------------------------------------------------------------------

constexpr int k_delta_regs = 8;  // state values per lane of a row: head sizes up to 256

// Rows [j0, j0 + rows_per_tile) of head h's state: a warp per row, the row in registers (read, decayed, updated,
// written back), q and k of the head normalised once per tile in shared memory (smem: 2 * S floats + 2).
__device__ void delta_tile(const kernel_args & a, const delta_net & dn, int tile, float * smem) {
    const int S = dn.head_dim, per_head = S / dn.rows_per_tile;
    const int h = tile / per_head, j0 = (tile % per_head) * dn.rows_per_tile, hqk = h % dn.n_head_qk;
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    float * q = smem, * k = smem + S, * f = smem + 2 * S;
    const float * qs = (const float *) resolve(a, dn.q) + (size_t) hqk * S;
    const float * ks = (const float *) resolve(a, dn.k) + (size_t) hqk * S;
    for (int i = threadIdx.x; i < S; i += k_threads) {
        q[i] = ldcg_f(qs + i);
        k[i] = ldcg_f(ks + i);
    }
    __syncthreads();
    if (w < 2) {  // the L2 norms: rms_norm then scale, as the graph had them
        const float * x = w == 0 ? q : k;
        const float eps = w == 0 ? dn.q_eps : dn.k_eps, sc = w == 0 ? dn.q_scale : dn.k_scale;
        float ss = 0.0f;
        for (int i = l; i < S; i += 32) {
            ss += x[i] * x[i];
        }
        ss = warp_sum(ss);
        if (l == 0) {
            f[w] = (eps >= 0.0f ? rsqrtf(ss / S + eps) : 1.0f) * sc;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < S; i += k_threads) {
        q[i] *= f[0];
        k[i] *= f[1];
    }
    __syncthreads();
    const float decay = __expf(ldcg_f((const float *) resolve(a, dn.g) + h));
    const float beta = ldcg_f((const float *) resolve(a, dn.beta) + h);
    const float * v = (const float *) resolve(a, dn.v) + (size_t) h * S;
    const int32_t cell = __ldcg((const int32_t *) resolve(a, dn.state_idx));
    const float * st_in = (const float *) (resolve(a, dn.state_in) + (uint64_t) cell * dn.state_nb) + (size_t) h * S * S;
    float * st_out = dn.state_out.null() ? nullptr : (float *) resolve(a, dn.state_out) + (size_t) h * S * S;
    float * out = (float *) resolve(a, dn.out) + (size_t) h * S;
    for (int j = j0 + w; j < j0 + dn.rows_per_tile; j += k_warps) {
        const float * row = st_in + (size_t) j * S;
        float r[k_delta_regs];
        float kr = 0.0f;
#pragma unroll
        for (int e = 0; e < k_delta_regs; e++) {
            const int i = l + 32 * e;
            r[e] = i < S ? row[i] * decay : 0.0f;
            kr += i < S ? r[e] * k[i] : 0.0f;
        }
        kr = warp_sum(kr);
        const float d = (ldcg_f(v + j) - kr) * beta;
        float qr = 0.0f;
#pragma unroll
        for (int e = 0; e < k_delta_regs; e++) {
            const int i = l + 32 * e;
            if (i < S) {
                r[e] += d * k[i];
                qr += r[e] * q[i];
            }
        }
        qr = warp_sum(qr);
        if (st_out) {
#pragma unroll
            for (int e = 0; e < k_delta_regs; e++) {
                const int i = l + 32 * e;
                if (i < S) {
                    st_out[(size_t) j * S + i] = r[e];
                }
            }
        }
        if (l == 0) {
            out[j] = qr * dn.scale;
        }
    }
    __syncthreads();
}

// --- the fused down projection (program.h: fused_down) ---------------------------------------------------------
// gpu_load copies the down matrix into slices, one per tile of the glu (quants.h: slice_put): the tile's columns of
// every row, as np = nbs * D units in which unit j * D + o is span j of row o. Thread k then takes rows k, k + 512, ...:
// a warp's 16-byte quant loads read 512 contiguous bytes, and x (the tile's glu values, rounded to q8_1 as
// ggml-cuda rounds the down projection's input) is the same for every thread (shared-memory broadcasts).
template <typename W>
__device__ void slice_rows(const uint8_t * base, int np, int nbs, int D, const int8_t * xq, const float * xd,
                           unsigned long long * acc) {
    constexpr int k_rows = 4;  // rows per thread in flight
    for (int o0 = threadIdx.x; o0 < D; o0 += k_rows * k_threads) {
        float s[k_rows];
#pragma unroll
        for (int k = 0; k < k_rows; k++) s[k] = 0.0f;
        for (int j = 0; j < nbs; j++) {
            const typename W::xunit xu = W::xload(xq, xd, nullptr, j);  // (Q4_0/Q8_0: no sums)
#pragma unroll
            for (int k = 0; k < k_rows; k++) {
                const int o = o0 + k * k_threads;
                if (o < D) s[k] += W::udot(base, np, j * D + o, xu);
            }
        }
#pragma unroll
        for (int k = 0; k < k_rows; k++) {
            const int o = o0 + k * k_threads;
            if (o < D) {
                asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(acc + o), "l"(to_fixed(s[k])) : "memory");
            }
        }
    }
}

// After a fused glu tile's glu rows [r0, r1) are in y: their partial down projection into the sums, then, in the
// step's last tile to arrive, the vector and seg[2]'s epilogue ([residual add,] store). Inlined: as a call (__noinline__) ptxas saved so
// much around it that the kernel's frame grew from 224 to 704 bytes (inlined: 272).
__device__ __forceinline__ void down_slice(const kernel_args & a, const instruction & in, float * y, int r0, int r1, int t,
                                           int8_t * xq, float * xd, float * xs, volatile int * s_last) {
    const segment & dw = in.seg[2];
    const int D = dw.rows, span = slice_span(dw.type - dev::k_planar), np = in.seg[0].rows_per_tile / span * D;
    round_q8_1(y, xq, xd, xs, r1 - r0);  // (ends with a barrier)
    unsigned long long * acc = (unsigned long long *) resolve(a, in.down_acc);
    const uint8_t * base = resolve(a, dw.w) + (uint64_t) t * dw.row_bytes;  // gpu_load: row_bytes is the slice size
    const int nbs = (r1 - r0) / span;
    switch (dw.type - dev::k_planar) {
        case T_Q8_0: slice_rows<dev::w_q8_0_planar>(base, np, nbs, D, xq, xd, acc); break;
        case T_Q4_K: slice_rows<dev::w_q4_k_slice>(base, np, nbs, D, xq, xd, acc); break;
        case T_Q5_K: slice_rows<dev::w_q5_k_slice>(base, np, nbs, D, xq, xd, acc); break;
        case T_Q6_K: slice_rows<dev::w_q6_k_slice>(base, np, nbs, D, xq, xd, acc); break;
        default:     slice_rows<dev::w_q4_0_planar>(base, np, nbs, D, xq, xd, acc); break;
    }
    __syncthreads();  // the block's adds before thread 0's release
    if (threadIdx.x == 0) {
        unsigned long long old;
        asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], 1;" : "=l"(old) : "l"(acc + D) : "memory");
        *s_last = old + 1 == (a.epoch + 1) * (unsigned long long) in.n_tiles;
    }
    __syncthreads();
    if (*s_last) {  // every other tile's adds are visible (their release, this acquire, the barrier)
        // the epilogue is [residual add,] store (the compiler fuses no other): the residual is loaded with the
        // sums, one round trip, and no second copy of epilogue() in the kernel
        const bool add0 = dw.epi[0].kind == epi_kind::add;
        const float * res = add0 ? (const float *) resolve(a, dw.epi[0].a) : nullptr;
        float * out = (float *) resolve(a, dw.epi[add0 ? 1 : 0].a);
        for (int o = threadIdx.x; o < D; o += k_threads) {
            const float v = from_fixed((long long) __ldcg(acc + o));
            out[o] = res ? v + ldcg_f(res + o) : v;
            acc[o] = 0;  // for the next step (a later launch)
        }
    }
}

__global__ void __launch_bounds__(k_threads, 1) megakernel(kernel_args a) {
    extern __shared__ __align__(128) float smem[];
    __shared__ float s_red[k_warps];
    __shared__ float s_part[2 * k_part];
    __shared__ __align__(8) uint64_t s_bars[k_max_slots];
    __shared__ ring_cursor s_rc;  // thread 0's
    float * x = smem;
    float * y = smem + a.x_floats;
    float * y2 = y + a.y_floats;
    float * w = y2 + a.y_floats;
    int8_t * xq = (int8_t *) (w + a.w_floats);
    float * xd = (float *) (xq + a.x_floats);
    float * xs = xd + a.x_floats / 32 + 4;
    uint8_t * ring = (uint8_t *) smem + a.ring_off;
    const int G = gridDim.x, b = blockIdx.x;
    unsigned consumed = 0;  // ring chunks this block has used
    if (threadIdx.x == 0) {
        ring_start(a, s_rc, ring, s_bars);
    }
    __shared__ instruction in;  // the current instruction, copied once: its fields are read all through a tile
    __shared__ int s_flag;
    __shared__ attention s_at;
    __shared__ long long s_kv_row;  // the appended KV cell of the current attention tile (attn_prestage)
    __shared__ epi_inputs s_epi;  // the current tile's (preload_epi_inputs)
    __shared__ unsigned long long s_sub[3];  // thread 0's sub-phase sums over the instruction's tiles (profiling)
    unsigned long long * prof = a.prof ? a.prof + (size_t) b * a.n_instrs * k_prof : nullptr;
    // the SM clock against the global timer, from block 0: cycles and ns at the start and the end of the step
    unsigned long long * clk = a.prof && b == 0 && threadIdx.x == 0 ? a.prof + (size_t) G * a.n_instrs * k_prof : nullptr;
    if (clk) {
        clk[0] = clock64();
        clk[1] = global_ns();
    }
    for (int i = 0; i < a.n_instrs; i++) {
        const int first = ((b - a.offsets[i]) % G + G) % G;
        if (first >= a.tiles[i]) {
            continue;
        }
        __syncthreads();  // everyone is done with the previous instruction
        for (int k = threadIdx.x; k < (int) (sizeof(instruction) / 4); k += k_threads) {
            ((uint32_t *) &in)[k] = ((const uint32_t *) (a.instrs + i))[k];
        }
        __syncthreads();
        if (in.kind == instr_kind::attn) {
            for (int k = threadIdx.x; k < (int) (sizeof(attention) / 4); k += k_threads) {
                ((uint32_t *) &s_at)[k] = ((const uint32_t *) (a.attns + in.attn))[k];
            }
            __syncthreads();  // attn_prestage reads it before the wait's barriers
        }
        const bool mv = in.kind == instr_kind::matvec || in.kind == instr_kind::glu;
        bool waited = false, prestaged = false, warped = false, w_ready = false;
        if (prof && threadIdx.x == 0) {
            s_sub[0] = s_sub[1] = s_sub[2] = 0;
        }
        unsigned long long t_in = 0, t_mv = 0;
        for (int t = first; t < in.n_tiles; t += G) {
            const tile_rows tr = rows_of(in, t);
            const int s = tr.seg, r0 = tr.r0, r1 = tr.r1;
            const segment & sg = in.seg[s];
            const chunk_plan cp = mv ? plan_chunks(a, in, i, t) : chunk_plan{};
            if (mv && a.preload_norm) {  // the first tile's before the wait; a later tile's before its form_input
                preload_epi_inputs(a, sg, r0, r1, &s_epi);
            }
            if (!waited) {
                if (prof && threadIdx.x == 0) {
                    prof[i * k_prof] = global_ns();
                }
                if (mv && a.prefetch) {
                    // pull what the ring does not already hold of this tile's weights towards L2 while the producers
                    // finish
                    const int skip = cp.n_chunks ? min(r1 - r0, a.ring_slots * cp.rows_per_chunk) : 0;
                    for (int k = 0; k < (in.kind == instr_kind::glu ? 2 : 1); k++) {
                        const segment & ps = in.seg[in.kind == instr_kind::glu ? k : s];
                        const uint8_t * p0 = resolve(a, ps.w) + (uint64_t) (weight_row(ps, r0) + skip) * ps.row_bytes;
                        // capped (96 KiB by default): L2 holds ~380 KiB per SM, and prefetching a whole LM-head
                        // tile (4 MB per SM in BF16) only evicted itself (BF16 step 2,610 -> 2,398 us without it)
                        const int64_t nbytes = min((int64_t) (r1 - r0 - skip) * (int64_t) ps.row_bytes, (int64_t) a.prefetch);
#if defined(MK_WEIGHTS_EVICT_FIRST) && __CUDA_ARCH__ >= 900
                        if (threadIdx.x == 32 + k) {  // one bulk prefetch per segment, by warp 1 (thread 0 polls)
                            prefetch_l2_evict_first(p0, nbytes);
                        }
#else
                        for (int64_t o = (int64_t) threadIdx.x * 128; o < nbytes; o += (int64_t) k_threads * 128) {
                            prefetch_l2(p0 + o);
                        }
#endif
                    }
                    if (in.fused_down) {  // the tile's down slice (contiguous)
                        const uint8_t * p0 = resolve(a, in.seg[2].w) + (uint64_t) t * in.seg[2].row_bytes;
                        const int64_t nbytes = min((int64_t) in.seg[2].row_bytes, (int64_t) a.prefetch);
                        for (int64_t o = (int64_t) threadIdx.x * 128; o < nbytes; o += (int64_t) k_threads * 128) {
                            prefetch_l2(p0 + o);
                        }
                    }
                }
                // attn_tile stages only single-chunk tiles before the wait: at depth 4096 (5 chunks a tile) staging
                // the first chunk measured 3.5% slower (546 against 566 tok/s), at 256 cells it gained 1.5-8%
                if (in.kind == instr_kind::attn && !s_at.kv_row.null() && a.attn_prestage) {
                    const int ps = attn_prestage(a, s_at, t, smem, &s_kv_row);
                    prestaged = ps == 1;
                    warped = ps == 2;
                }
                if (in.kind != instr_kind::attn && in.kind != instr_kind::delta && a.preload_norm) {
                    w_ready = preload_norm_weight(a, in.in, w);  // w stays untouched through the instruction's tiles
                }
                if (!wait_deps(a, in, i, &s_flag)) {
                    cp_async_wait_all();  // no copy into shared memory outlives the block
                    if (threadIdx.x == 0) {
                        ring_drain(a, s_rc, s_bars, consumed);
                    }
                    return;
                }
                waited = true;
                if (prof && threadIdx.x == 0) {
                    prof[i * k_prof + 1] = global_ns();
                }
            }
            const unsigned long long t0 = prof ? global_ns() : 0;
            unsigned long long t1 = t0;
            phase_clock pc{prof ? s_sub : nullptr, t0};
            if (in.kind == instr_kind::attn) {
                if (s_at.q_ops.n_epi > 0 || s_at.k_ops.n_epi > 0) {
                    attn_qk_ops(a, s_at, t, smem, warped, warped || prestaged ? &s_kv_row : nullptr);
                }
#ifndef MK_NO_ATTN_WARPS
                if (warped) {
                    attn_tile_warps(a, s_at, t, smem, pc, s_kv_row);
                } else
#endif
                {
                    attn_tile(a, s_at, t, smem, pc, prestaged, &s_kv_row);
                }
                prestaged = warped = false;  // a block's later tiles of the instruction stage after the wait
                t1 = prof ? global_ns() : 0;
            } else if (in.kind == instr_kind::delta) {
                delta_tile(a, a.deltas[in.attn], t, smem);
                t1 = prof ? global_ns() : 0;
            } else {
                const bool q8 = in.kind != instr_kind::vec && a.q8_1_input[i] != 0;
                const unsigned long long t_x = form_x(a, in.in, x, xq, xd, xs, w, w_ready, q8, pc.acc != nullptr, t == 0);
                pc.mark_at(0, t_x);
                pc.mark(1);
                if (in.kind == instr_kind::vec) {
                    t1 = prof ? global_ns() : 0;
                    epilogue(a, in.seg[0], x, 0, in.in.n, s_red, nullptr);
                } else {
                    t1 = prof ? global_ns() : 0;
                    const mv_x xin{x, xq, xd, xs, in.in.n, q8};
                    if (cp.n_chunks) {
                        for (int c = 0; c < cp.n_chunks; c++, consumed++) {
                            if (!ring_wait(a, s_bars, consumed, i)) {
                                return;  // a copy never landed: the step is handed back
                            }
                            const int ra = c * cp.rows_per_chunk, rb = min(cp.rows, ra + cp.rows_per_chunk);
                            const uint8_t * buf = ring + (size_t) (consumed % (unsigned) a.ring_slots) * a.slot_bytes;
                            // ends with __syncthreads: after it the slot may be refilled
                            matvec_rows(in, s, xin, buf, buf + cp.off1, rb - ra, y + ra, y2 + ra, s_part, true);
                            if (threadIdx.x == 0) {
                                ring_fill(a, s_rc, ring, s_bars, consumed + 1);
                            }
                        }
                    } else {
                        // (a tile's rows are consecutive weight rows, also in a strided view's segment)
                        const uint8_t * b0 = resolve(a, in.seg[s].w) + (uint64_t) weight_row(in.seg[s], r0) * in.seg[s].row_bytes;
                        const uint8_t * b1 = in.kind == instr_kind::glu ? resolve(a, in.seg[1].w) + (uint64_t) r0 * in.seg[1].row_bytes : nullptr;
                        matvec_rows(in, s, xin, b0, b1, r1 - r0, y, y2, s_part, false);
                    }
                    if (prof) {
                        const unsigned long long t2 = global_ns();
                        t_mv += t2 - t1;
                    }
                    pc.t = prof ? global_ns() : 0;
                    epilogue(a, sg, y, r0, r1, s_red, a.preload_norm ? &s_epi : nullptr);
                    if (in.fused_down) {
                        down_slice(a, in, y, r0, r1, t, xq, xd, xs, &s_flag);
                    }
                    pc.mark(2);
                }
            }
            t_in += t1 - t0;
            tile_done(a, i);
            if (prof && threadIdx.x == 0) {
                prof[i * k_prof + 2] = t_in;
                prof[i * k_prof + 3] = t_mv;
                prof[i * k_prof + 4] = global_ns();
            }
        }
        if (prof && threadIdx.x == 0 && waited) {
            for (int k = 0; k < 3; k++) {
                prof[i * k_prof + 5 + k] = s_sub[k];
            }
        }
    }
    if (clk) {
        clk[2] = clock64();
        clk[3] = global_ns();
    }
}

// --- host ----------------------------------------------------------------------------------------------------------

std::string cuda_err(const char * what, cudaError_t e) {
    return std::string(what) + ": " + cudaGetErrorString(e);
}

}  // namespace

struct gpu_program {
    int device = 0;
    uint8_t * d_planar = nullptr;  // the repacked (planar) copies of this program's quantized matrices
    uint8_t * d_slices = nullptr;  // the fused down projections' slices (slice_repack)
    uint64_t planar_bytes = 0;
    int grid = 0;
    size_t smem = 0;
    kernel_args args{};
    void * d_mem = nullptr;     // instructions, attentions, ropes, offsets, counters (one allocation)
    uint8_t * d_scratch = nullptr;
    int * h_error = nullptr;    // mapped pinned memory: the kernel's error word
    cudaStream_t own = nullptr;
    cudaEvent_t ev[2] = {nullptr, nullptr};  // around the launch, when the caller asks for the kernel's time
    std::vector<std::string> names;
    // profiling (LLAMA_MEGAKERNEL_PROFILE=file): sums over steps of each instruction's first start and last end
    // (relative to the step's first block) and of the per-block means of wait, input and weight-compute times
    std::string prof_path;
    unsigned long long * d_prof = nullptr;
    std::vector<unsigned long long> h_prof;
    std::vector<double> p_begin, p_end, p_wait, p_input, p_compute, p_sub[3];
    double p_mhz = 0;
    double p_total = 0;
    long p_steps = 0;
    std::vector<int> tiles;
};

namespace {

void profile_step(gpu_program * g) {
    const int n = g->args.n_instrs;
    g->h_prof.assign((size_t) g->grid * n * k_prof + 4, 0);
    cudaMemcpy(g->h_prof.data(), g->d_prof, g->h_prof.size() * 8, cudaMemcpyDeviceToHost);
    cudaMemset(g->d_prof, 0, g->h_prof.size() * 8);
    unsigned long long t0 = ~0ull, t1 = 0;
    const unsigned long long * clk = &g->h_prof[(size_t) g->grid * n * k_prof];
    if (clk[3] > clk[1]) {
        g->p_mhz += 1e3 * (double) (clk[2] - clk[0]) / (double) (clk[3] - clk[1]);
    }
    for (size_t k = 0; k + k_prof <= (size_t) g->grid * n * k_prof; k += k_prof) {
        if (g->h_prof[k]) {
            t0 = std::min(t0, g->h_prof[k]);
            t1 = std::max(t1, g->h_prof[k + 4]);
        }
    }
    if (t0 == ~0ull) {
        return;
    }
    for (auto * v : {&g->p_begin, &g->p_end, &g->p_wait, &g->p_input, &g->p_compute, &g->p_sub[0], &g->p_sub[1], &g->p_sub[2]}) {
        v->resize(n, 0);
    }
    for (int i = 0; i < n; i++) {
        unsigned long long b = ~0ull, e = 0;
        double w = 0, in = 0, mv = 0, sub[3] = {0, 0, 0};
        int nb = 0;
        for (int blk = 0; blk < g->grid; blk++) {
            const unsigned long long * r = &g->h_prof[((size_t) blk * n + i) * k_prof];
            if (r[0] == 0) continue;
            b = std::min(b, r[1]);
            e = std::max(e, r[4]);
            w += (double) (r[1] - r[0]);
            in += (double) r[2];
            mv += (double) r[3];
            for (int k = 0; k < 3; k++) {
                sub[k] += (double) r[5 + k];
            }
            nb++;
        }
        if (nb == 0) continue;
        g->p_begin[i] += (double) (b - t0);
        g->p_end[i] += (double) (e - t0);
        g->p_wait[i] += w / nb;
        g->p_input[i] += in / nb;
        g->p_compute[i] += mv / nb;
        for (int k = 0; k < 3; k++) {
            g->p_sub[k][i] += sub[k] / nb;
        }
    }
    g->p_total += (double) (t1 - t0);
    g->p_steps++;
    if (g->p_steps % 32 == 0) {
        if (FILE * f = fopen(g->prof_path.c_str(), "w")) {
            const double k = 1e-3 / g->p_steps;  // ns sums -> mean microseconds
            fprintf(f, "{\"steps\":%ld,\"grid\":%d,\"ring_slots\":%d,\"slot_bytes\":%d,\"step_us\":%.2f,\"sm_clock_mhz\":%.0f,"
                    "\"instructions\":[", g->p_steps, g->grid, g->args.ring_slots, g->args.slot_bytes, g->p_total * k,
                    g->p_mhz / g->p_steps);
            for (int i = 0; i < n; i++) {
                fprintf(f, "%s{\"name\":\"%s\",\"tiles\":%d,\"begin_us\":%.2f,\"end_us\":%.2f,\"wait_us\":%.2f,"
                        "\"input_us\":%.2f,\"compute_us\":%.2f,\"sub_us\":[%.2f,%.2f,%.2f]}", i ? "," : "",
                        g->names[i].c_str(), g->tiles[i], g->p_begin[i] * k, g->p_end[i] * k, g->p_wait[i] * k,
                        g->p_input[i] * k, g->p_compute[i] * k, g->p_sub[0][i] * k, g->p_sub[1][i] * k,
                        g->p_sub[2][i] * k);
            }
            fprintf(f, "]}\n");
            fclose(f);
        }
    }
}

// One thread per block of a matrix: its GGUF bytes into the planar row (quants.h, planar_block).
__global__ void planar_repack(int t, const uint8_t * src, uint64_t src_stride, uint8_t * dst, uint64_t dst_stride,
                              int64_t rows, int64_t nb) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * nb) {
        return;
    }
    const int64_t r = i / nb, blk = i % nb;
    const int bytes = info_of(t).bytes;
    uint8_t b[256];
    const uint8_t * sb = src + (uint64_t) r * src_stride + (uint64_t) blk * bytes;
    for (int j = 0; j < bytes; j++) {
        b[j] = sb[j];
    }
    planar_block(t, b, dst + (uint64_t) r * dst_stride, nb, blk, true);
}

// The down matrix of a fused glu (program.h: fused_down) into its slices (see slice_rows): one thread per span of a
// row (nu of them, nbs to a slice).
__global__ void slice_repack(int t, const uint8_t * src, uint64_t src_stride, uint8_t * dst, uint64_t slice_bytes,
                             int D, int nu, int nbs) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t) D * nu) {
        return;
    }
    const int o = (int) (i / nu), u = (int) (i % nu), per_block = info_of(t).block / slice_span(t);
    const int bytes = info_of(t).bytes;
    uint8_t b[256];
    const uint8_t * sb = src + (uint64_t) o * src_stride + (uint64_t) (u / per_block) * bytes;
    for (int j = 0; j < bytes; j++) {
        b[j] = sb[j];
    }
    slice_put(t, b, u % per_block, dst + (uint64_t) (u / nbs) * slice_bytes, (int64_t) nbs * D, (int64_t) (u % nbs) * D + o);
}

// The matrices of a program that get planar copies: constant matvec weights of a planar_type whose instruction
// rounds its input to q8_1 (the planar dots have no float path) and whose rows are plain (no strided row groups).
struct planar_job {
    size_t instr;
    int seg;
    uint64_t dst_off, dst_stride;
    int64_t nb;
};

std::vector<planar_job> plan_planar(const program & p, uint64_t & total, uint64_t & largest_f16) {
    std::vector<planar_job> jobs;
    total = 0;
    largest_f16 = 0;
    for (size_t i = 0; i < p.instrs.size(); i++) {
        const instruction & in = p.instrs[i];
        if (in.kind != instr_kind::matvec && in.kind != instr_kind::glu) {
            continue;
        }
        bool q8 = in.in.n % 32 == 0;
        for (int sg = 0; sg < in.n_segments; sg++) {
            q8 = q8 && dev::uses_q8_1(in.seg[sg].type);
        }
        for (int sg = 0; sg < in.n_segments && q8; sg++) {
            const segment & g = in.seg[sg];
            const int block = info_of(g.type).block;
            if (!planar_type(g.type) || !g.constant || g.row_group != 0 || block == 0 || in.in.n % block != 0) {
                continue;
            }
            const int64_t nb = in.in.n / block;
            const uint64_t stride = planar_row_bytes(g.type, nb);
            jobs.push_back({i, sg, total, stride, nb});
            total += ((uint64_t) g.rows * stride + 255) / 256 * 256;
            largest_f16 = std::max<uint64_t>(largest_f16, (uint64_t) g.rows * in.in.n * 2);
        }
    }
    return jobs;
}

}  // namespace

bool gpu_target(int device, target & t, std::string & err) {
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) {
        cudaGetLastError();
        err = cuda_err("cudaGetDeviceProperties", e);
        return false;
    }
    if (p.major < 8) {
        err = "compute capability " + std::to_string(p.major) + "." + std::to_string(p.minor) + " (sm_80 or newer needed)";
        return false;
    }
    t.n_sm = p.multiProcessorCount;
    t.smem_bytes = (int) p.sharedMemPerBlockOptin - 1024;  // static shared memory and reserve
    return true;
}

gpu_program * gpu_load(const program & p, int device, std::string & err) {
    // shared memory: x (longest input), y (most rows per tile), w (norm weight and reduction, split weights)
    size_t x_f = 32, y_f = 32, w_f = k_warps, attn_f = 0;
    for (const instruction & in : p.instrs) {
        if (in.kind == instr_kind::attn) {
            const attention & at = p.attns[in.attn];
            for (int t : {at.k_type, at.v_type}) {
                if (t != T_F32 && t != T_F16 && t != T_BF16) {
                    err = "KV cache type " + std::to_string(t) + " has no GPU attention kernel";
                    return nullptr;
                }
            }
            attn_f = std::max(attn_f, attn_smem_floats(at));
            // attn_tile_warps with its copies of a tile's cells, where they leave room (~100 KiB) for the L1 cache
#ifndef MK_NO_ATTN_WARPS
            if (attn_warps_ok(at) && !at.kv_row.null() && attn_warps_bytes(at) <= 128 * 1024) {
                attn_f = std::max(attn_f, (attn_warps_bytes(at) + 3) / 4);
            }
#endif
            continue;
        }
        if (in.kind == instr_kind::delta) {
            const delta_net & dn = p.deltas[in.attn];
            if (dn.head_dim > 32 * k_delta_regs) {
                err = "delta net head size " + std::to_string(dn.head_dim) + " (the GPU kernel takes up to " +
                      std::to_string(32 * k_delta_regs) + ")";
                return nullptr;
            }
            attn_f = std::max(attn_f, (size_t) 2 * dn.head_dim + 4);
            continue;
        }
        x_f = std::max(x_f, (size_t) in.in.n);
        if (in.fused_down) {  // the last tile forms the whole output vector in x; xq holds a tile's glu values
            if (slice_span(in.seg[2].type) == 0 || in.seg[0].rows_per_tile % slice_span(in.seg[2].type) != 0) {
                err = std::string("fused down projection of type ") + std::to_string(in.seg[2].type) + " in " + in.name;
                return nullptr;
            }
            x_f = std::max({x_f, (size_t) in.seg[2].rows, (size_t) in.seg[0].rows_per_tile});
        }
        if (in.in.kind == in_kind::attn_reduce) {  // (max, sum) and the weight of every (head, split)
            w_f = std::max(w_f, 3 * (size_t) in.in.n_head * in.in.n_split);
        }
        if (in.in.kind == in_kind::rms_norm) {  // the norm's weight, then the block reduction or the group scales
            const size_t groups = in.in.norm_row ? (size_t) in.in.n / in.in.norm_row : 0;
            w_f = std::max(w_f, (size_t) in.in.n + std::max<size_t>({32, (size_t) k_warps, groups}));
        }
        if (!in.in.pre_src.null()) {  // form_pre: the residual and the weight after w + n + 64, then its reduction
            w_f = std::max(w_f, 3 * (size_t) in.in.n + 64 + 32);
        }
        for (int sg = 0; sg < in.n_segments; sg++) {
            for (int k = 0; k < in.seg[sg].n_epi; k++) {
                if (in.seg[sg].epi[k].kind == epi_kind::ssm_conv && in.seg[sg].epi[k].row_len > k_max_conv) {
                    err = "conv kernel longer than " + std::to_string(k_max_conv);
                    return nullptr;
                }
            }
        }
        for (int s = 0; s < in.n_segments; s++) {
            y_f = std::max(y_f, (size_t) in.seg[s].rows_per_tile);
            if (in.kind != instr_kind::vec) {
                const int al = dev::weight_align(in.seg[s].type);
                if (al == 0) {
                    err = std::string("weight type ") + std::to_string(in.seg[s].type) + " of " + in.name + " has no GPU kernel";
                    return nullptr;
                }
                if ((in.seg[s].w.off % al) != 0 || (in.seg[s].row_bytes % al) != 0) {
                    err = std::string("weights of ") + in.name + " are not aligned for the GPU kernel";
                    return nullptr;
                }
            }
        }
        if (in.kind == instr_kind::vec && in.in.kind == in_kind::embed_row && info_of(in.in.src_type).block > 256) {
            err = "embedding type";
            return nullptr;
        }
    }
    x_f = (x_f + 15) / 16 * 16;  // xd (after x_f bytes of xq) 16-byte aligned: planar units read it as float4
    y_f = (y_f + 3) / 4 * 4;
    w_f = (w_f + 3) / 4 * 4;
    const size_t base_f = x_f + 2 * y_f + w_f + x_f / 4 + 2 * (x_f / 32 + 4);
    const size_t ring_off = (std::max(attn_f, base_f) * sizeof(float) + 127) / 128 * 128;

    // The weight ring: slots of 32 KiB in what is left of the shared memory (sm_90: bulk copies need it).
    // LLAMA_MEGAKERNEL_RING=N turns it on with at most N slots. Off by default: on the H100 the copies themselves
    // stream at 3.05 TB/s (scripts/ring-probe.cu), but the matvec that consumes a slot is too slow and the step got
    // slower (1B Q4_0: 1,912 us against 1,384 us; docs/gpu-executor-notes.md).
    int ring_slots = 0, slot_bytes = 32 * 1024;
    std::vector<uint8_t> ring_ok(p.instrs.size(), 0);
    {
        cudaDeviceProp pr;
        const char * env = getenv("LLAMA_MEGAKERNEL_RING");
        const int want = env ? std::max(0, atoi(env)) : 0;
        if (cudaGetDeviceProperties(&pr, device) == cudaSuccess && pr.major >= 9 && want > 0) {
            const size_t avail = pr.sharedMemPerBlockOptin - 4096 - ring_off;  // static shared memory reserve
            ring_slots = (int) std::min<size_t>(std::min(want, k_max_slots), avail / slot_bytes);
        }
        cudaGetLastError();
        if (ring_slots < 2) {
            ring_slots = 0;
        }
        for (size_t i = 0; i < p.instrs.size() && ring_slots; i++) {
            const instruction & in = p.instrs[i];
            if (in.kind != instr_kind::matvec && in.kind != instr_kind::glu) {
                continue;
            }
            bool ok = true;
            uint64_t per_row_max = 0;
            for (int sg = 0; sg < in.n_segments; sg++) {
                const segment & g = in.seg[sg];
                // F16/BF16 rows are read with global-only streaming loads (dot.cuh, w_f16_like)
                ok = ok && g.constant && g.w.off % 16 == 0 && g.row_bytes % 16 == 0 && g.type != T_F16 && g.type != T_BF16;
                per_row_max = std::max<uint64_t>(per_row_max, g.row_bytes);
            }
            ok = ok && per_row_max * (in.kind == instr_kind::glu ? 2 : 1) <= (uint64_t) slot_bytes;
            ring_ok[i] = ok ? 1 : 0;
        }
    }
    const size_t smem = ring_off + (size_t) ring_slots * slot_bytes;

    const device_guard guard;
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        cudaGetLastError();
        err = cuda_err("cudaSetDevice", e);
        return nullptr;
    }
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, device);
    if (!prop.cooperativeLaunch) {
        err = "the device does not support cooperative launches (needed to guarantee co-residency)";
        return nullptr;
    }
    if (smem > prop.sharedMemPerBlockOptin - 1024) {
        err = "program needs " + std::to_string(smem) + " bytes of shared memory per block; the device has " +
              std::to_string(prop.sharedMemPerBlockOptin);
        return nullptr;
    }
    // The limit belongs to the kernel function (per device), not to this program: only ever raise it, so that a
    // smaller program loaded later (a second model on the same GPU) does not make this one's launches fail.
    cudaFuncAttributes fa{};
    e = cudaFuncGetAttributes(&fa, megakernel);
    if (e == cudaSuccess && (size_t) fa.maxDynamicSharedSizeBytes < smem) {
        e = cudaFuncSetAttribute(megakernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        err = cuda_err("cudaFuncSetAttribute", e);
        return nullptr;
    }
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, megakernel, k_threads, smem);
    if (e != cudaSuccess || per_sm < 1) {
        cudaGetLastError();
        err = "the persistent block does not fit on a multiprocessor (occupancy " + std::to_string(per_sm) + ")";
        return nullptr;
    }

    // every absolute address must be this device's memory (a partly offloaded model has weights on the host)
    {
        std::vector<std::pair<uint64_t, std::string>> ptrs;
        auto add = [&](const addr & x, const char * what, const instruction * in) {
            if (!x.null() && !x.scratch) ptrs.emplace_back(x.off, std::string(what) + (in ? std::string(" of ") + in->name : ""));
        };
        for (const instruction & in : p.instrs) {
            add(in.in.src, "input", &in);
            add(in.in.w, "norm weight", &in);
            add(in.in.idx, "row index", &in);
            add(in.in.gate, "gate", &in);
            for (int sg = 0; sg < in.n_segments; sg++) {
                add(in.seg[sg].w, "weights", &in);
                for (int k = 0; k < in.seg[sg].n_epi; k++) {
                    add(in.seg[sg].epi[k].a, "epilogue operand", &in);
                    add(in.seg[sg].epi[k].b, "recurrent state", &in);
                    add(in.seg[sg].epi[k].c, "recurrent state", &in);
                    add(in.seg[sg].epi[k].idx, "row indices", &in);
                }
            }
        }
        for (const rope_params & r : p.ropes) {
            add(r.pos, "positions", nullptr);
            add(r.freq_factors, "rope frequency factors", nullptr);
        }
        for (const delta_net & dn : p.deltas) {
            add(dn.state_in, "delta net state", nullptr);
            add(dn.state_out, "delta net state", nullptr);
            add(dn.state_idx, "recurrent cell index", nullptr);
            add(dn.g, "delta net gate", nullptr);
            add(dn.beta, "delta net beta", nullptr);
        }
        for (const attention & at : p.attns) {
            add(at.q, "attention q", nullptr);
            add(at.k, "K cache", nullptr);
            add(at.v, "V cache", nullptr);
            add(at.mask, "attention mask", nullptr);
            for (const segment * sg : {&at.q_ops, &at.k_ops}) {
                for (int k = 0; k < sg->n_epi; k++) {
                    add(sg->epi[k].a, "attention's Q/K operand", nullptr);
                    add(sg->epi[k].idx, "attention's K row index", nullptr);
                }
            }
        }
        for (auto & pr : ptrs) {
            cudaPointerAttributes pa;
            cudaError_t pe = cudaPointerGetAttributes(&pa, (const void *) (uintptr_t) pr.first);
            if (pe != cudaSuccess || !((pa.type == cudaMemoryTypeDevice && pa.device == device) || pa.type == cudaMemoryTypeManaged)) {
                cudaGetLastError();
                err = "the " + pr.second + " is not in this GPU's memory (partly offloaded model?)";
                return nullptr;
            }
        }
    }

    auto * g = new gpu_program();
    g->device = device;
    g->grid = prop.multiProcessorCount;  // one block per SM: co-resident by the occupancy check
    g->smem = smem;
    std::vector<int32_t> offsets(p.instrs.size());
    long long acc = 0;
    for (size_t i = 0; i < p.instrs.size(); i++) {
        offsets[i] = (int32_t) (acc % g->grid);
        acc += p.instrs[i].n_tiles;
    }
    auto align_up = [](size_t v) { return (v + 255) / 256 * 256; };
    const size_t o_instr = 0;
    const size_t o_attn  = align_up(o_instr + p.instrs.size() * sizeof(instruction));
    const size_t o_delta = align_up(o_attn + p.attns.size() * sizeof(attention));
    const size_t o_rope  = align_up(o_delta + p.deltas.size() * sizeof(delta_net));
    const size_t o_off   = align_up(o_rope + p.ropes.size() * sizeof(rope_params));
    const size_t o_q81   = align_up(o_off + offsets.size() * sizeof(int32_t));
    const size_t o_ring  = align_up(o_q81 + p.instrs.size());
    const size_t o_tiles = align_up(o_ring + p.instrs.size());
    const size_t o_ctr   = align_up(o_tiles + p.instrs.size() * sizeof(int32_t));
    const size_t o_abort = align_up(o_ctr + p.instrs.size() * sizeof(unsigned long long));
    const size_t total   = align_up(o_abort + sizeof(int));
    std::vector<uint8_t> host(total, 0);
    memcpy(host.data() + o_instr, p.instrs.data(), p.instrs.size() * sizeof(instruction));
    // Planar copies of the quantized matrices (quants.h: planar_block), made here from the weights as they are now
    // and freed with the program, so they can never be older than it. They need as much GPU memory again as those
    // weights. Without room for that and a margin for llama.cpp's own later allocations, the program reads the GGUF
    // layout: a twentieth of the GPU, and at least an F16 copy of the largest of these matrices, which ggml-cuda's
    // pool may need for a prefill matmul (256 MiB at the least). LLAMA_MEGAKERNEL_PLANAR=0 turns them off (A/B runs).
    {
        uint64_t total = 0, largest_f16 = 0;
        std::vector<planar_job> jobs = plan_planar(p, total, largest_f16);
        size_t free_b = 0, total_b = 0;
        const char * pe = getenv("LLAMA_MEGAKERNEL_PLANAR");
        const bool want = (!pe || atoi(pe) != 0) && !jobs.empty();
        if (want && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess &&
            total + std::max<uint64_t>({total_b / 20, largest_f16, 256ull << 20}) < free_b &&
            cudaMalloc(&g->d_planar, total) == cudaSuccess) {  // not cleared: the rows' padding is never read
            g->planar_bytes = total;
            cudaStream_t rs = nullptr;
            e = cudaDeviceSynchronize();  // the weights were uploaded before any decode graph; this orders them anyway
            if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&rs, cudaStreamNonBlocking);
            instruction * hi = (instruction *) (host.data() + o_instr);
            for (size_t j = 0; j < jobs.size() && e == cudaSuccess; j++) {
                segment & sg = hi[jobs[j].instr].seg[jobs[j].seg];
                const int64_t n = (int64_t) sg.rows * jobs[j].nb;
                planar_repack<<<(unsigned) ((n + 255) / 256), 256, 0, rs>>>(sg.type, (const uint8_t *) (uintptr_t) sg.w.off,
                    sg.row_bytes, g->d_planar + jobs[j].dst_off, jobs[j].dst_stride, sg.rows, jobs[j].nb);
                e = cudaGetLastError();
                sg.w.off = (uint64_t) (uintptr_t) (g->d_planar + jobs[j].dst_off);
                sg.type = dev::k_planar + sg.type;
                sg.row_bytes = jobs[j].dst_stride;
                ring_ok[jobs[j].instr] = 0;
            }
            if (e == cudaSuccess) e = cudaStreamSynchronize(rs);
            if (rs) cudaStreamDestroy(rs);
            if (e != cudaSuccess) {
                cudaGetLastError();
                err = cuda_err("repacking the weights", e);
                gpu_free(g);
                return nullptr;
            }
        }
        cudaGetLastError();
    }
    // The slices of fused down projections (slice_rows): the kernel has no other way to read them, so without the
    // memory for them the program is refused (and the graph stays on the stock path).
    {
        instruction * hi = (instruction *) (host.data() + o_instr);
        std::vector<uint64_t> off(p.instrs.size(), 0);
        uint64_t total = 0;
        for (size_t i = 0; i < p.instrs.size(); i++) {
            if (hi[i].fused_down) {
                const segment & dw = hi[i].seg[2];
                const int nbs = hi[i].seg[0].rows_per_tile / slice_span(dw.type);
                off[i] = total;
                total += (uint64_t) hi[i].n_tiles * align_up(slice_bytes(dw.type, (int64_t) nbs * dw.rows));
            }
        }
        if (total > 0) {
            e = cudaMalloc(&g->d_slices, total);
            cudaStream_t rs = nullptr;
            if (e == cudaSuccess) e = cudaDeviceSynchronize();
            if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&rs, cudaStreamNonBlocking);
            for (size_t i = 0; i < p.instrs.size() && e == cudaSuccess; i++) {
                if (!hi[i].fused_down) {
                    continue;
                }
                segment & dw = hi[i].seg[2];
                const int span = slice_span(dw.type), nbs = hi[i].seg[0].rows_per_tile / span, nu = hi[i].seg[0].rows / span;
                const uint64_t slice = align_up(slice_bytes(dw.type, (int64_t) nbs * dw.rows));
                const int64_t n = (int64_t) dw.rows * nu;
                slice_repack<<<(unsigned) ((n + 255) / 256), 256, 0, rs>>>(dw.type, (const uint8_t *) (uintptr_t) dw.w.off,
                    dw.row_bytes, g->d_slices + off[i], slice, dw.rows, nu, nbs);
                e = cudaGetLastError();
                dw.w.off = (uint64_t) (uintptr_t) (g->d_slices + off[i]);
                dw.w.scratch = 0;
                dw.type = dev::k_planar + dw.type;
                dw.row_bytes = slice;
            }
            if (e == cudaSuccess) e = cudaStreamSynchronize(rs);
            if (rs) cudaStreamDestroy(rs);
            if (e != cudaSuccess) {
                cudaGetLastError();
                err = cuda_err("copying the fused down projections' slices", e);
                gpu_free(g);
                return nullptr;
            }
            g->planar_bytes += total;
        }
    }
    // the matvec split per segment (plan_rows); LLAMA_MEGAKERNEL_SPLIT_ROWS=0: the earlier one (for A/B runs)
    if (const char * sr = getenv("LLAMA_MEGAKERNEL_SPLIT_ROWS"); !sr || atoi(sr) != 0) {
        instruction * hi = (instruction *) (host.data() + o_instr);
        for (size_t i = 0; i < p.instrs.size(); i++) {
            if (hi[i].kind != instr_kind::matvec && hi[i].kind != instr_kind::glu) {
                continue;
            }
            for (int sg = 0; sg < hi[i].n_segments; sg++) {
                int R = 1, wpr = 1;
                balanced_split(hi[i].seg[sg].rows_per_tile, hi[i].in.n, hi[i].seg[sg].type, R, wpr);
                hi[i].seg[sg].gpu_rows = (uint8_t) R;
                hi[i].seg[sg].gpu_split = (uint8_t) wpr;
            }
        }
    }
    if (!p.attns.empty()) memcpy(host.data() + o_attn, p.attns.data(), p.attns.size() * sizeof(attention));
    if (!p.deltas.empty()) memcpy(host.data() + o_delta, p.deltas.data(), p.deltas.size() * sizeof(delta_net));
    if (!p.ropes.empty()) memcpy(host.data() + o_rope, p.ropes.data(), p.ropes.size() * sizeof(rope_params));
    memcpy(host.data() + o_off, offsets.data(), offsets.size() * sizeof(int32_t));
    for (size_t i = 0; i < p.instrs.size(); i++) {
        const instruction & in = p.instrs[i];
        bool all_q = (in.kind == instr_kind::matvec || in.kind == instr_kind::glu) && in.in.n % 32 == 0;
        for (int sg = 0; sg < in.n_segments && all_q; sg++) {
            all_q = dev::uses_q8_1(in.seg[sg].type);
        }
        host[o_q81 + i] = all_q ? 1 : 0;
        host[o_ring + i] = ring_ok[i];
        memcpy(host.data() + o_tiles + i * sizeof(int32_t), &in.n_tiles, sizeof(int32_t));
    }
    if ((e = cudaMalloc(&g->d_mem, total)) != cudaSuccess ||
        (e = cudaMemcpy(g->d_mem, host.data(), total, cudaMemcpyHostToDevice)) != cudaSuccess ||
        (e = cudaMalloc(&g->d_scratch, std::max<uint64_t>(p.scratch_bytes, 256))) != cudaSuccess ||
        (e = cudaMemset(g->d_scratch, 0, std::max<uint64_t>(p.scratch_bytes, 256))) != cudaSuccess ||
        (e = cudaHostAlloc(&g->h_error, sizeof(int), cudaHostAllocMapped)) != cudaSuccess) {
        cudaGetLastError();
        err = cuda_err("allocating the program on the GPU", e);
        gpu_free(g);
        return nullptr;
    }
    *g->h_error = 0;
    int * d_error = nullptr;
    cudaHostGetDevicePointer((void **) &d_error, g->h_error, 0);
    uint8_t * base = (uint8_t *) g->d_mem;
    kernel_args & a = g->args;
    a.instrs   = (const instruction *) (base + o_instr);
    a.attns    = (const attention *) (base + o_attn);
    a.deltas   = (const delta_net *) (base + o_delta);
    a.ropes    = (const rope_params *) (base + o_rope);
    a.offsets  = (const int32_t *) (base + o_off);
    a.q8_1_input = base + o_q81;
    a.ring_ok  = base + o_ring;
    a.tiles    = (const int32_t *) (base + o_tiles);
    a.n_instrs = (int32_t) p.instrs.size();
    a.scratch  = g->d_scratch;
    a.counters = (unsigned long long *) (base + o_ctr);
    a.abort    = (int *) (base + o_abort);
    a.error    = d_error;
    a.epoch    = 0;
    a.timeout_ns = 1000ull * 1000 * 1000;  // 1 s: a step takes well under a millisecond
    if (const char * t = getenv("LLAMA_MEGAKERNEL_WAIT_TIMEOUT_MS")) {
        a.timeout_ns = (unsigned long long) std::max(1LL, atoll(t)) * 1000ull * 1000;
    }
    a.x_floats = (int32_t) x_f;
    a.y_floats = (int32_t) y_f;
    a.w_floats = (int32_t) w_f;
    a.attn_prestage = 1;
    a.attn_warps = 1;
    if (const char * aw = getenv("LLAMA_MEGAKERNEL_ATTN_WARPS")) {  // 0: attn_tile's block-wide chunks (A/B runs)
        a.attn_warps = atoi(aw) != 0;
    }
    if (const char * ps = getenv("LLAMA_MEGAKERNEL_ATTN_PRESTAGE")) {  // 0: stage after the wait (for A/B runs)
        a.attn_prestage = atoi(ps) != 0;
    }
    a.preload_norm = 1;
    if (const char * pn = getenv("LLAMA_MEGAKERNEL_PRELOAD_NORM")) {  // 0: both load after the wait (A/B)
        a.preload_norm = atoi(pn) != 0;
    }
    a.fuse_round = 1;
    if (const char * fr = getenv("LLAMA_MEGAKERNEL_FUSE_ROUND")) {  // 0: form_input then round_q8_1 (A/B)
        a.fuse_round = atoi(fr) != 0;
    }
    a.prefetch = 96 * 1024;
    if (const char * pf = getenv("LLAMA_MEGAKERNEL_PREFETCH")) {
        a.prefetch = std::max(0, atoi(pf)) * 1024;
    }
    a.ring_slots = ring_slots;
    a.slot_bytes = slot_bytes;
    a.ring_off = (int32_t) ring_off;
    a.attn_smem_bytes = (int32_t) ring_off;
    for (const instruction & in : p.instrs) {
        g->names.push_back(in.name);
        g->tiles.push_back(in.n_tiles);
    }
    a.prof = nullptr;
    if (const char * pp = getenv("LLAMA_MEGAKERNEL_PROFILE")) {
        g->prof_path = pp;
        const size_t bytes = ((size_t) g->grid * p.instrs.size() * k_prof + 4) * 8;
        if (cudaMalloc(&g->d_prof, bytes) == cudaSuccess && cudaMemset(g->d_prof, 0, bytes) == cudaSuccess) {
            a.prof = g->d_prof;
        }
        cudaGetLastError();
    }
    return g;
}

bool gpu_run(gpu_program * g, void * stream_, std::string & err, float * kernel_ms) {
    const device_guard guard;
    cudaError_t e = cudaSetDevice(g->device);
    cudaStream_t stream = (cudaStream_t) stream_;
    if (e == cudaSuccess && stream == nullptr) {
        // no stream from llama.cpp (interception route without the stream getter): order by waiting for the device
        e = cudaDeviceSynchronize();
        if (e == cudaSuccess && g->own == nullptr) {
            e = cudaStreamCreateWithFlags(&g->own, cudaStreamNonBlocking);
        }
        stream = g->own;
    }
    const bool timed = kernel_ms != nullptr && e == cudaSuccess;
    if (timed && g->ev[0] == nullptr) {
        for (auto & ev : g->ev) {
            if (e == cudaSuccess) {
                e = cudaEventCreate(&ev);
            }
        }
    }
    if (timed && e == cudaSuccess) {
        e = cudaEventRecord(g->ev[0], stream);
    }
    if (e == cudaSuccess) {
        void * params[] = {&g->args};
        e = cudaLaunchCooperativeKernel((const void *) megakernel, dim3(g->grid), dim3(k_threads), params, g->smem, stream);
    }
    if (timed && e == cudaSuccess) {
        e = cudaEventRecord(g->ev[1], stream);
    }
    if (e == cudaSuccess) {
        e = cudaStreamSynchronize(stream);
    }
    if (timed && e == cudaSuccess) {
        e = cudaEventElapsedTime(kernel_ms, g->ev[0], g->ev[1]);
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        err = cuda_err("megakernel launch", e);
        return false;
    }
    const int code = *(volatile int *) g->h_error;
    if (code == k_err_kv_cell) {
        err = "the KV cell this step appends is outside its attention's cells (the K row was not written)";
        return false;
    }
    if (code != 0) {
        err = "a dependency wait timed out in instruction " + std::to_string(code - 1) + " (" +
              (code - 1 < (int) g->names.size() ? g->names[code - 1] : std::string("?")) + ")";
        return false;
    }
    g->args.epoch++;
    if (g->d_prof) {
        profile_step(g);
    }
    return true;
}

uint64_t gpu_planar_bytes(const gpu_program * g) {
    return g ? g->planar_bytes : 0;
}

void gpu_free(gpu_program * g) {
    if (g == nullptr) {
        return;
    }
    const device_guard guard;
    cudaSetDevice(g->device);
    if (g->own) cudaStreamDestroy(g->own);
    for (auto ev : g->ev) {
        if (ev) cudaEventDestroy(ev);
    }
    if (g->d_mem) cudaFree(g->d_mem);
    if (g->d_scratch) cudaFree(g->d_scratch);
    if (g->h_error) cudaFreeHost(g->h_error);
    if (g->d_prof) cudaFree(g->d_prof);
    if (g->d_planar) cudaFree(g->d_planar);
    if (g->d_slices) cudaFree(g->d_slices);
    cudaGetLastError();
    delete g;
}

}  // namespace mk
