// Microbenchmark of the megakernel's quantized matvec alone: the GGUF-layout dots (dot.cuh's w_*_int, 16 values
// per lane, 2-byte loads) against the planar ones (w_*_planar, one unit per lane, 16-byte loads) on the shapes of
// the 1B model (LM head, gate/up, down, QKV), with one block of 512 threads per SM taking tiles of rows as the
// megakernel does. Weights are random blocks, repacked on the GPU by the executor's own kernel code
// (quants.h: planar_block); every result is checked against a double-precision host reference.
// Prints per variant: rows per warp R, warps per row wpr, GB/s over the launch, the mean tile time inside the
// kernel, and the largest error relative to sum |w x|.
// Build: nvcc -std=c++17 -arch=sm_90 -O3 -Icsrc scripts/matvec-probe.cu -o matvec-probe
#include "quants.h"
#include "cuda/dot.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace mk;

constexpr int k_threads = 512, k_warps = 16;

__global__ void repack(int t, const uint8_t * src, uint64_t ss, uint8_t * dst, uint64_t ds, int64_t rows, int64_t nb) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * nb) return;
    const int64_t r = i / nb, blk = i % nb;
    const int bytes = info_of(t).bytes;
    uint8_t b[256];
    for (int j = 0; j < bytes; j++) b[j] = src[r * ss + blk * bytes + j];
    planar_block(t, b, dst + r * ds, nb, blk, true);
}

__device__ __forceinline__ float wsum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename W, int R>
__device__ __forceinline__ void dots(const uint8_t * row0, uint64_t stride, const int8_t * xq, const float * xd, int n,
                                     int start, int step, float (&s)[R]) {
    if constexpr (dev::is_planar<W>::value) {
        dev::dot_units<W, R>(row0, stride, xq, xd, n / W::block, start, step, s);
    } else {
        dev::dot_rows_q8<W, R>(row0, stride, xq, xd, nullptr, n, start, step, s);  // no x sums: no type here needs them
    }
}

template <typename W, int R>
__global__ void __launch_bounds__(k_threads, 1) mv(const uint8_t * w, uint64_t stride, int rows, int n, int tile_rows,
                                                  int wpr, const int8_t * gxq, const float * gxd, float * y,
                                                  unsigned long long * tns) {
    extern __shared__ __align__(16) uint8_t sm[];
    int8_t * xq = (int8_t *) sm;
    float * xd = (float *) (sm + (n + 15) / 16 * 16);
    float * part = xd + (n / 32 + 3) / 4 * 4;
    for (int i = threadIdx.x; i < n; i += k_threads) xq[i] = gxq[i];
    for (int i = threadIdx.x; i < n / 32; i += k_threads) xd[i] = gxd[i];
    __syncthreads();
    unsigned long long t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    const int wi = threadIdx.x / 32, l = threadIdx.x % 32;
    const int slot = wi % wpr, rw = wi / wpr, nrw = k_warps / wpr, start = l + 32 * slot, step = 32 * wpr;
    const int ntiles = (rows + tile_rows - 1) / tile_rows;
    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const int r0 = t * tile_rows, nr = min(rows, r0 + tile_rows) - r0, full = nr / R;
        const uint8_t * base = w + (uint64_t) r0 * stride;
        for (int ch = rw; ch < full; ch += nrw) {
            float s[R];
            for (int k = 0; k < R; k++) s[k] = 0.0f;
            dots<W, R>(base + (uint64_t) ch * R * stride, stride, xq, xd, n, start, step, s);
            for (int k = 0; k < R; k++) {
                const float v = wsum(s[k]);
                if (l == 0) part[(ch * R + k) * wpr + slot] = v;
            }
        }
        for (int i = full * R + rw; i < nr; i += nrw) {
            float s[1] = {0.0f};
            dots<W, 1>(base + (uint64_t) i * stride, stride, xq, xd, n, start, step, s);
            const float v = wsum(s[0]);
            if (l == 0) part[i * wpr + slot] = v;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < nr; i += k_threads) {
            float v = 0.0f;
            for (int k = 0; k < wpr; k++) v += part[i * wpr + k];
            y[r0 + i] = v;
        }
        __syncthreads();
    }
    unsigned long long t1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
    if (threadIdx.x == 0) atomicAdd(tns, t1 - t0);
}

// The megakernel's split (gpu-executor.cu balanced_split), over lane units.
void split(int rows, int n, int type, int & R_out, int & wpr_out) {
    const int ng = std::max(1, n / dev::lane_shape_of(type).values);
    double best = 1e30;
    R_out = 1; wpr_out = 1;
    for (int R = dev::lane_shape_of(type).max_rows; R >= 1; R /= 2) {
        const int sets = (rows + R - 1) / R;
        for (int wpr = 1; wpr <= k_warps && (wpr == 1 || (32 * wpr <= 2 * ng && rows * wpr <= 8 * k_warps)); wpr *= 2) {
            const int nrw = k_warps / wpr;
            const int work = (sets + nrw - 1) / nrw * R * ((ng + 32 * wpr - 1) / (32 * wpr));
            if (work < 0.875 * best) { best = work; R_out = R; wpr_out = wpr; }
        }
    }
}

std::vector<uint8_t> random_blocks(int t, int64_t rows, int n, std::mt19937 & g) {
    const type_info ti = info_of(t);
    const int64_t nb = n / ti.block;
    std::vector<uint8_t> v((size_t) (rows * nb * ti.bytes));
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> sc(0.5f, 1.5f);
    for (auto & b : v) b = (uint8_t) byte(g);
    for (int64_t i = 0; i < rows * nb; i++) {  // sane scales: random bits could be inf or nan
        uint8_t * b = v.data() + i * ti.bytes;
        auto put = [&](int off, float f) { const uint16_t h = float_to_half(f); b[off] = h & 0xff; b[off + 1] = h >> 8; };
        if (t == T_Q4_0 || t == T_Q8_0) put(0, 0.01f * sc(g));
        if (t == T_Q4_K) { put(0, 0.01f * sc(g)); put(2, 0.01f * sc(g)); }
        if (t == T_Q6_K) put(208, 0.01f * sc(g));
    }
    return v;
}

template <typename W, int R>
void launch(const uint8_t * w, uint64_t stride, int rows, int n, int tile, int wpr, const int8_t * xq, const float * xd,
            float * y, unsigned long long * tns, int grid, size_t smem) {
    mv<W, R><<<grid, k_threads, smem>>>(w, stride, rows, n, tile, wpr, xq, xd, y, tns);
}

template <typename W>
void launch_r(int R, const uint8_t * w, uint64_t stride, int rows, int n, int tile, int wpr, const int8_t * xq,
              const float * xd, float * y, unsigned long long * tns, int grid, size_t smem) {
    constexpr int M = dev::max_rows_of<W>();
    switch (R) {
        case 8: launch<W, (M < 8 ? M : 8)>(w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case 4: launch<W, (M < 4 ? M : 4)>(w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case 2: launch<W, 2>(w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        default: launch<W, 1>(w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
    }
}

void run_type(int dtype, int R, const uint8_t * w, uint64_t stride, int rows, int n, int tile, int wpr, const int8_t * xq,
              const float * xd, float * y, unsigned long long * tns, int grid, size_t smem) {
    switch (dtype) {
        case T_Q4_0: launch_r<dev::w_q4_0_int>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case T_Q8_0: launch_r<dev::w_q8_0_int>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case T_Q4_K: launch_r<dev::w_q4_k_int>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case T_Q6_K: launch_r<dev::w_q6_k_int>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case dev::k_planar + T_Q4_0: launch_r<dev::w_q4_0_planar>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case dev::k_planar + T_Q8_0: launch_r<dev::w_q8_0_planar>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case dev::k_planar + T_Q4_K: launch_r<dev::w_q4_k_planar>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
        case dev::k_planar + T_Q6_K: launch_r<dev::w_q6_k_planar>(R, w, stride, rows, n, tile, wpr, xq, xd, y, tns, grid, smem); break;
    }
}

struct shape { const char * name; int rows, n, tile; };

int main(int argc, char ** argv) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    std::mt19937 g(argc > 1 ? atoi(argv[1]) : 1234);
    const shape shapes[] = {{"lm_head", 128256, 2048, 972}, {"gate_up", 16384, 2048, 126},
                            {"down", 2048, 8192, 16}, {"qkv", 3072, 2048, 50}};
    const int types[] = {T_Q4_0, T_Q6_K, T_Q4_K, T_Q8_0};
    int failures = 0;
    printf("%-8s %-5s %-7s %2s %3s %9s %9s %10s %s\n", "shape", "type", "layout", "R", "wpr", "GB/s", "tile_us", "max_err", "");
    for (const shape & sh : shapes) {
        for (int t : types) {
            const type_info ti = info_of(t);
            const int64_t nb = sh.n / ti.block;
            std::vector<uint8_t> hw = random_blocks(t, sh.rows, sh.n, g);
            const uint64_t gstride = nb * ti.bytes, pstride = planar_row_bytes(t, nb);
            const uint64_t mbytes = gstride * sh.rows;
            const int copies = (int) std::max<uint64_t>(1, (160ull << 20) / mbytes);  // rotate past the 60 MB L2
            // x as q8_1 and the reference in double
            std::uniform_int_distribution<int> qd(-127, 127);
            std::uniform_real_distribution<float> dd(0.5f, 1.5f);
            std::vector<int8_t> hxq(sh.n);
            std::vector<float> hxd(sh.n / 32);
            for (auto & q : hxq) q = (int8_t) qd(g);
            for (auto & d : hxd) d = 0.01f * dd(g);
            std::vector<double> ref(sh.rows), mag(sh.rows);
            std::vector<float> row(sh.n);
            for (int r = 0; r < sh.rows; r++) {
                dequant_row(t, hw.data() + r * gstride, row.data(), sh.n);
                double s = 0, m = 0;
                for (int i = 0; i < sh.n; i++) {
                    const double xv = (double) hxq[i] * hxd[i / 32];
                    s += (double) row[i] * xv;
                    m += fabs((double) row[i] * xv);
                }
                ref[r] = s; mag[r] = m;
            }
            uint8_t *dg, *dp; int8_t * dxq; float *dxd, *dy; unsigned long long * dt;
            cudaMalloc(&dg, mbytes * copies); cudaMalloc(&dp, pstride * sh.rows * copies);
            cudaMalloc(&dxq, sh.n); cudaMalloc(&dxd, sh.n / 32 * 4); cudaMalloc(&dy, sh.rows * 4); cudaMalloc(&dt, 8);
            for (int c = 0; c < copies; c++) cudaMemcpy(dg + c * mbytes, hw.data(), mbytes, cudaMemcpyHostToDevice);
            cudaMemset(dp, 0, pstride * sh.rows * copies);
            for (int c = 0; c < copies; c++) {
                const int64_t nblk = sh.rows * nb;
                repack<<<(unsigned) ((nblk + 255) / 256), 256>>>(t, dg + c * mbytes, gstride, dp + c * pstride * sh.rows, pstride, sh.rows, nb);
            }
            cudaMemcpy(dxq, hxq.data(), sh.n, cudaMemcpyHostToDevice);
            cudaMemcpy(dxd, hxd.data(), sh.n / 32 * 4, cudaMemcpyHostToDevice);
            for (int planar = 0; planar < 2; planar++) {
                const int dtype = planar ? dev::k_planar + t : t;
                const uint64_t stride = planar ? pstride : gstride;
                const uint8_t * base = planar ? dp : dg;
                int Rb, wb;
                split(sh.tile, sh.n, dtype, Rb, wb);
                std::vector<std::pair<int, int>> cfgs = {{Rb, wb}};
                for (int R : {1, 2, 4, 8}) if (R <= dev::lane_shape_of(dtype).max_rows && R != Rb) cfgs.push_back({R, wb});
                for (auto [R, wpr] : cfgs) {
                    const size_t smem = (sh.n + 15) / 16 * 16 + ((sh.n / 32 + 3) / 4 * 4) * 4 + (size_t) sh.tile * wpr * 4;
                    cudaMemset(dy, 0, sh.rows * 4);
                    run_type(dtype, R, base, stride, sh.rows, sh.n, sh.tile, wpr, dxq, dxd, dy, dt, sms, smem);
                    cudaError_t e = cudaDeviceSynchronize();
                    std::vector<float> hy(sh.rows);
                    cudaMemcpy(hy.data(), dy, sh.rows * 4, cudaMemcpyDeviceToHost);
                    double err = 0;
                    for (int r = 0; r < sh.rows; r++) err = std::max(err, fabs(hy[r] - ref[r]) / (mag[r] + 1e-30));
                    const int iters = 40;
                    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
                    cudaMemset(dt, 0, 8);
                    cudaEventRecord(e0);
                    for (int it = 0; it < iters; it++) {
                        const int c = it % copies;
                        run_type(dtype, R, base + c * stride * sh.rows, stride, sh.rows, sh.n, sh.tile, wpr, dxq, dxd, dy, dt, sms, smem);
                    }
                    cudaEventRecord(e1); cudaEventSynchronize(e1);
                    float ms = 0; cudaEventElapsedTime(&ms, e0, e1);
                    unsigned long long tsum = 0; cudaMemcpy(&tsum, dt, 8, cudaMemcpyDeviceToHost);
                    const int ntiles = (sh.rows + sh.tile - 1) / sh.tile;
                    const double tile_us = tsum / 1e3 / iters / std::min(sms, ntiles) / ((ntiles + sms - 1) / sms);
                    const bool ok = e == cudaSuccess && err < 1e-4;
                    failures += !ok;
                    printf("%-8s %-5s %-7s %2d %3d %9.0f %9.2f %10.2e %s%s\n", sh.name,
                           t == T_Q4_0 ? "Q4_0" : t == T_Q8_0 ? "Q8_0" : t == T_Q4_K ? "Q4_K" : "Q6_K",
                           planar ? "planar" : "gguf", R, wpr, mbytes * iters / (ms * 1e-3) / 1e9, tile_us, err,
                           ok ? "ok" : "FAIL ", e == cudaSuccess ? "" : cudaGetErrorString(e));
                    fflush(stdout);
                    cudaEventDestroy(e0); cudaEventDestroy(e1);
                }
            }
            cudaFree(dg); cudaFree(dp); cudaFree(dxq); cudaFree(dxd); cudaFree(dy); cudaFree(dt);
        }
    }
    printf("%s: %d failures\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
