// Weight rows times an F32 vector in shared memory, on the GPU: one struct per weight type, each saying how a row is
// cut into groups of 16 values and how one lane dots one group (loads, dequantisation in registers, FMAs). The
// row loop (row_dot) is shared. Adding a weight type means one struct here plus its case in dispatch_type.
//
// A group is 16 values whose bytes are contiguous or nearly so in the block (low and high nibbles of the same bytes
// count as one group), so that the lanes of a warp read neighbouring bytes. Loads are as wide as the block layout's
// alignment allows (gpu_load checks row alignment against `align`).
//
// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K matrices are normally read in the planar layout instead (quants.h: planar_block; the
// w_*_planar structs below): gpu_load repacks them, and the GGUF-layout structs of those types remain for when it
// does not (no room for the copies, LLAMA_MEGAKERNEL_PLANAR=0, a float input).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mk {
namespace dev {

constexpr int k_planar = 256;  // segment.type of a matrix the GPU executor repacked: k_planar + its ggml type

__device__ __forceinline__ float h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float b2f(uint16_t h) { return __uint_as_float((uint32_t) h << 16); }
// Weight loads are generic: the rows may be in global memory or staged in shared memory.
template <typename T> __device__ __forceinline__ T ldw(const T * p) { return *p; }
// The planar copies are always in global memory: they are read with the streaming hint (ld.global.cs: evict first
// from L1 and L2), and gpu-executor.cu's L2 prefetch marks them first to evict too, so that the step's weight stream
// does not push the kernel's code, activations, counters and KV rows out of L2. Measured on the H200 (session 12):
// 1B Q4_0 step 941 -> 863 us, BF16 1,423 -> 1,357, SmolLM2 shape 1,106 -> 1,072. -DMK_WEIGHTS_NORMAL_CACHE turns
// both off, for A/B runs.
#ifndef MK_WEIGHTS_NORMAL_CACHE
#define MK_WEIGHTS_EVICT_FIRST
#endif
#ifdef MK_WEIGHTS_EVICT_FIRST
template <typename T> __device__ __forceinline__ T ldp(const T * p) { return __ldcs(p); }
#else
template <typename T> __device__ __forceinline__ T ldp(const T * p) { return *p; }
#endif
__device__ __forceinline__ uint16_t ld16(const uint8_t * p) { return ldw((const unsigned short *) p); }
__device__ __forceinline__ uint32_t ld32(const uint8_t * p) { return ldw((const unsigned int *) p); }
// 4 bytes from a 2-byte aligned address
__device__ __forceinline__ uint32_t ld32_a2(const uint8_t * p) { return (uint32_t) ld16(p) | ((uint32_t) ld16(p + 2) << 16); }

// Sixteen 4-bit values q[0..7] (low nibbles of bytes b0,b1) and q[8..15] (high nibbles), as floats, dotted with two
// runs of eight x values.
__device__ __forceinline__ float dot_nibbles(uint32_t b0, uint32_t b1, const float * xlo, const float * xhi, float off) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        s += ((float) ((b0 >> (8 * i)) & 0xf) + off) * xlo[i];
        s += ((float) ((b1 >> (8 * i)) & 0xf) + off) * xlo[4 + i];
        s += ((float) ((b0 >> (8 * i + 4)) & 0xf) + off) * xhi[i];
        s += ((float) ((b1 >> (8 * i + 4)) & 0xf) + off) * xhi[4 + i];
    }
    return s;
}

struct w_f32 {
    static constexpr int block = 16, bytes = 64, groups = 1, align = 16;
    __device__ static float elem(const uint8_t * row, int i) { return ldw((const float *) row + i); }
    __device__ static float dot(const uint8_t * b, int, const float * x) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float4 w = ldw((const float4 *) b + i);
            s += w.x * x[4 * i] + w.y * x[4 * i + 1] + w.z * x[4 * i + 2] + w.w * x[4 * i + 3];
        }
        return s;
    }
};

// F16 and BF16 rows are not repacked, but they too are only read from global memory (gpu_load keeps them out of
// the weight ring), so their 16-byte loads take the streaming hint as the planar copies do. Measured on the H200
// (session 13, same commit, -DMK_F16_GENERIC_LOADS as the other arm): 1B BF16 tg128 673 -> 745 tok/s, step 1,392 ->
// 1,252 us; the quantized models unchanged.
template <bool bf16> struct w_f16_like {
    static constexpr int block = 16, bytes = 32, groups = 1, align = 16;
    __device__ static float elem(const uint8_t * row, int i) {
        const uint16_t h = ldw((const unsigned short *) row + i);
        return bf16 ? b2f(h) : h2f(h);
    }
    __device__ static float dot(const uint8_t * b, int, const float * x) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 2; i++) {
#ifdef MK_F16_GENERIC_LOADS  // the loads as before session 13, for A/B runs
            const uint4 w = ldw((const uint4 *) b + i);
#else
            const uint4 w = ldp((const uint4 *) b + i);
#endif
            const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float lo = bf16 ? b2f(u[j] & 0xffff) : h2f(u[j] & 0xffff);
                const float hi = bf16 ? b2f(u[j] >> 16) : h2f(u[j] >> 16);
                s += lo * x[8 * i + 2 * j] + hi * x[8 * i + 2 * j + 1];
            }
        }
        return s;
    }
};
using w_f16  = w_f16_like<false>;
using w_bf16 = w_f16_like<true>;

// Q4_0: d (f16), 16 bytes: value j in the low nibble of byte j, value 16+j in the high nibble. Group g: bytes 8g..8g+7.
struct w_q4_0 {
    static constexpr int block = 32, bytes = 18, groups = 2, align = 2;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const float d = h2f(ld16(b));
        const uint8_t * q = b + 2 + 8 * g;
        return d * dot_nibbles(ld32_a2(q), ld32_a2(q + 4), x + 8 * g, x + 16 + 8 * g, -8.0f);
    }
};

// Integer paths (ggml-cuda's mmvq way): x as q8_1, i.e. int8 values xq with one scale xd per 32, and the weights'
// integers dotted four at a time with dp4a. Only for the types that have `idot`; the others use `dot` on x rounded
// the same way, which gives the same numbers with more arithmetic.
__device__ __forceinline__ int ld_i32(const int8_t * p) { return *(const int *) p; }
constexpr uint32_t k_lo4 = 0x0F0F0F0Fu;

// Group g of a Q4_0/Q4_1 block: its eight bytes b0, b1 (low nibbles: values 8g.., high: 16 + 8g..) dotted with the
// q8_1 values, and with `with_sx` the sum of those sixteen q8_1 values (Q4_0's offset of 8)
struct nib_q8 { int s, sx; };
template <bool with_sx>
__device__ __forceinline__ nib_q8 dot_nib_q8(uint32_t b0, uint32_t b1, const int8_t * xq, int g) {
    const int xl0 = ld_i32(xq + 8 * g), xl1 = ld_i32(xq + 8 * g + 4);
    const int xh0 = ld_i32(xq + 16 + 8 * g), xh1 = ld_i32(xq + 20 + 8 * g);
    nib_q8 r{0, 0};
    r.s = __dp4a((int) (b0 & k_lo4), xl0, 0);
    r.s = __dp4a((int) (b1 & k_lo4), xl1, r.s);
    r.s = __dp4a((int) ((b0 >> 4) & k_lo4), xh0, r.s);
    r.s = __dp4a((int) ((b1 >> 4) & k_lo4), xh1, r.s);
    if constexpr (with_sx) {
        r.sx = __dp4a(0x01010101, xl0, 0);
        r.sx = __dp4a(0x01010101, xl1, r.sx);
        r.sx = __dp4a(0x01010101, xh0, r.sx);
        r.sx = __dp4a(0x01010101, xh1, r.sx);
    }
    return r;
}

struct w_q4_0_int : w_q4_0 {
    static constexpr bool has_int = true;
    __device__ static float idot(const uint8_t * b, int g, const int8_t * xq, const float * xd) {
        const float d = h2f(ld16(b));
        const uint8_t * q = b + 2 + 8 * g;
        const nib_q8 r = dot_nib_q8<true>(ld32_a2(q), ld32_a2(q + 4), xq, g);
        return d * xd[0] * (float) (r.s - 8 * r.sx);
    }
};

// The sixteen x values of a group (two runs of eight), for the min term of Q4_1/Q5_1.
__device__ __forceinline__ float sum16(const float * xl, const float * xh) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        s += xl[i] + xh[i];
    }
    return s;
}

struct w_q4_1 {  // d, m (f16), 16 bytes of nibbles
    static constexpr int block = 32, bytes = 20, groups = 2, align = 4;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const uint32_t dm = ld32(b);
        const float d = h2f(dm & 0xffff), m = h2f(dm >> 16);
        const uint8_t * q = b + 4 + 8 * g;
        const float * xl = x + 8 * g;
        const float * xh = x + 16 + 8 * g;
        const float sx = sum16(xl, xh);
        return d * dot_nibbles(ld32(q), ld32(q + 4), xl, xh, 0.0f) + m * sx;
    }
};

// F16 product of two F16 values, as __hmul2 rounds it (their exact product fits a float's mantissa)
__device__ __forceinline__ float hmul_f(float a, float b) { return __half2float(__float2half_rn(a * b)); }

// On q8_1 as ggml-cuda's vec_dot_q4_1_q8_1: d*d8 and m*s8 are F16 products, s8 the block's sum before rounding
// (xs), half of m*s8 per group of sixteen. Through the float path on rounded x (before 8b527d2) the real
// SmolLM2-135M Q4_1 logits were 0.979 (cosine) from stock CUDA's, as far as stock ggml-cpu is from them; this path
// is at the stock spread on synthetic Q4_1 models, and the real weights are still to be re-run with it.
struct w_q4_1_int : w_q4_1 {
    static constexpr bool has_int = true, needs_sum = true;
    __device__ static float idot(const uint8_t * b, int g, const int8_t * xq, const float * xd, const float * xs) {
        const uint32_t dm = ld32(b);
        const float d = h2f(dm & 0xffff), m = h2f(dm >> 16);
        const uint8_t * q = b + 4 + 8 * g;
        const nib_q8 r = dot_nib_q8<false>(ld32(q), ld32(q + 4), xq, g);
        return (float) r.s * hmul_f(d, xd[0]) + 0.5f * hmul_f(m, xs[0]);
    }
};

// Q5_0/Q5_1: the fifth bit of value j is bit j of qh (values 0..31).
__device__ __forceinline__ float dot_q5(uint32_t b0, uint32_t b1, uint32_t qh, int g, const float * xl, const float * xh,
                                       float off) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int j0 = 8 * g + i, j1 = 8 * g + 4 + i;
        s += ((float) (((b0 >> (8 * i)) & 0xf) | (((qh >> j0) & 1) << 4)) + off) * xl[i];
        s += ((float) (((b1 >> (8 * i)) & 0xf) | (((qh >> j1) & 1) << 4)) + off) * xl[4 + i];
        s += ((float) (((b0 >> (8 * i + 4)) & 0xf) | (((qh >> (j0 + 16)) & 1) << 4)) + off) * xh[i];
        s += ((float) (((b1 >> (8 * i + 4)) & 0xf) | (((qh >> (j1 + 16)) & 1) << 4)) + off) * xh[4 + i];
    }
    return s;
}

struct w_q5_0 {  // d, qh (4 bytes), 16 bytes of nibbles
    static constexpr int block = 32, bytes = 22, groups = 2, align = 2;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const float d = h2f(ld16(b));
        const uint32_t qh = ld32_a2(b + 2);
        const uint8_t * q = b + 6 + 8 * g;
        return d * dot_q5(ld32_a2(q), ld32_a2(q + 4), qh, g, x + 8 * g, x + 16 + 8 * g, -16.0f);
    }
};

// Q5_0's fifth bits of four values (bits 0..3 of n) at bit 4 of each byte, for dp4a: one multiply puts copies of n at
// shifts 4, 11, 18 and 25, so bit k of the copy at 7k + 4 lands on 8k + 4; the copies' bit ranges do not overlap
// (no carries), and the mask keeps those four bits.
__device__ __forceinline__ uint32_t spread_bits4(uint32_t n) { return (n * 0x02040810u) & 0x10101010u; }

struct w_q5_1 {  // d, m, qh, 16 bytes of nibbles
    static constexpr int block = 32, bytes = 24, groups = 2, align = 8;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const uint32_t dm = ld32(b);
        const float d = h2f(dm & 0xffff), m = h2f(dm >> 16);
        const uint32_t qh = ld32(b + 4);
        const uint2 q = ldw((const uint2 *) (b + 8 + 8 * g));
        const float * xl = x + 8 * g;
        const float * xh = x + 16 + 8 * g;
        const float sx = sum16(xl, xh);
        return d * dot_q5(q.x, q.y, qh, g, xl, xh, 0.0f) + m * sx;
    }
};

struct w_q8_0 {  // d, 32 int8
    static constexpr int block = 32, bytes = 34, groups = 2, align = 2;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const float d = h2f(ld16(b));
        const uint8_t * q = b + 2 + 16 * g;
        const float * xg = x + 16 * g;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = ld16(q + 2 * i);
            s += (float) (int8_t) (v & 0xff) * xg[2 * i] + (float) (int8_t) (v >> 8) * xg[2 * i + 1];
        }
        return d * s;
    }
};

struct w_q8_0_int : w_q8_0 {
    static constexpr bool has_int = true;
    __device__ static float idot(const uint8_t * b, int g, const int8_t * xq, const float * xd) {
        const float d = h2f(ld16(b));
        const uint8_t * q = b + 2 + 16 * g;
        int s = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s = __dp4a((int) ld32_a2(q + 4 * i), ld_i32(xq + 16 * g + 4 * i), s);
        }
        return d * xd[0] * (float) s;
    }
};

// Q4_K/Q5_K scales: 6-bit scale and min of sub-block j from the 12 scale bytes (as 3 words). Bytes are taken with
// shifts: indexing the words through a byte pointer would put them in local memory.
__device__ __forceinline__ uint32_t k_byte(const uint32_t * sw, int i) {
    const uint32_t w = i < 4 ? sw[0] : i < 8 ? sw[1] : sw[2];  // selects, not an index: sw stays in registers
    return (w >> (8 * (i & 3))) & 0xffu;
}
__device__ __forceinline__ void k_sm(int j, const uint32_t * sw, float & sc, float & mn) {
    if (j < 4) {
        sc = (float) (k_byte(sw, j) & 63);
        mn = (float) (k_byte(sw, j + 4) & 63);
    } else {
        sc = (float) ((k_byte(sw, j + 4) & 0xf) | ((k_byte(sw, j - 4) >> 6) << 4));
        mn = (float) ((k_byte(sw, j + 4) >> 4) | ((k_byte(sw, j) >> 6) << 4));
    }
}

// Of a Q4_K/Q5_K super-block: d, dmin, and the scales and mins of sub-blocks 2c (low nibbles) and 2c+1 (high).
struct k_head {
    float d, dmin, s0, m0, s1, m1;
};

__device__ __forceinline__ k_head k_header(const uint8_t * b, int c) {
    const uint32_t dm = ld32(b);
    const uint32_t sw[3] = {ld32(b + 4), ld32(b + 8), ld32(b + 12)};
    k_head k;
    k.d = h2f(dm & 0xffff);
    k.dmin = h2f(dm >> 16);
    k_sm(2 * c, sw, k.s0, k.m0);
    k_sm(2 * c + 1, sw, k.s1, k.m1);
    return k;
}

// Q4_K: d, dmin, 12 scale bytes, 128 bytes: byte 32c+l holds value 64c+l (low) and 64c+32+l (high). Group g:
// c = g/4, bytes 32c+8(g%4) .. +7, i.e. 8 values of sub-block 2c and 8 of sub-block 2c+1.
struct w_q4_k {
    static constexpr int block = 256, bytes = 144, groups = 16, align = 16;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const int c = g >> 2, p = g & 3;
        const k_head k = k_header(b, c);
        const uint2 q = ldw((const uint2 *) (b + 16 + 32 * c + 8 * p));
        const float * xl = x + 64 * c + 8 * p;
        const float * xh = xl + 32;
        float sl = 0.0f, sh = 0.0f, xsl = 0.0f, xsh = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            sl += (float) ((q.x >> (8 * i)) & 0xf) * xl[i] + (float) ((q.y >> (8 * i)) & 0xf) * xl[4 + i];
            sh += (float) ((q.x >> (8 * i + 4)) & 0xf) * xh[i] + (float) ((q.y >> (8 * i + 4)) & 0xf) * xh[4 + i];
            xsl += xl[i] + xl[4 + i];
            xsh += xh[i] + xh[4 + i];
        }
        return k.d * (k.s0 * sl + k.s1 * sh) - k.dmin * (k.m0 * xsl + k.m1 * xsh);
    }
};

struct w_q4_k_int : w_q4_k {
    static constexpr bool has_int = true;
    __device__ static float idot(const uint8_t * b, int g, const int8_t * xq, const float * xd) {
        const int c = g >> 2, p = g & 3;
        const k_head k = k_header(b, c);
        const uint2 q = ldw((const uint2 *) (b + 16 + 32 * c + 8 * p));
        const int8_t * xl = xq + 64 * c + 8 * p;
        const int xl0 = ld_i32(xl), xl1 = ld_i32(xl + 4), xh0 = ld_i32(xl + 32), xh1 = ld_i32(xl + 36);
        const int sl = __dp4a((int) (q.y & k_lo4), xl1, __dp4a((int) (q.x & k_lo4), xl0, 0));
        const int sh = __dp4a((int) ((q.y >> 4) & k_lo4), xh1, __dp4a((int) ((q.x >> 4) & k_lo4), xh0, 0));
        const int sxl = __dp4a(0x01010101, xl1, __dp4a(0x01010101, xl0, 0));
        const int sxh = __dp4a(0x01010101, xh1, __dp4a(0x01010101, xh0, 0));
        const float dl = xd[2 * c], dh = xd[2 * c + 1];
        return k.d * (k.s0 * dl * (float) sl + k.s1 * dh * (float) sh) -
               k.dmin * (k.m0 * dl * (float) sxl + k.m1 * dh * (float) sxh);
    }
};

// Q5_K: as Q4_K, plus 32 bytes of high bits before the nibbles: bit 2c (low) and 2c+1 (high) of byte l.
struct w_q5_k {
    static constexpr int block = 256, bytes = 176, groups = 16, align = 16;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const int c = g >> 2, p = g & 3;
        const k_head k = k_header(b, c);
        const uint2 h = ldw((const uint2 *) (b + 16 + 8 * p));
        const uint2 q = ldw((const uint2 *) (b + 48 + 32 * c + 8 * p));
        const float * xl = x + 64 * c + 8 * p;
        const float * xh = xl + 32;
        float sl = 0.0f, sh = 0.0f, xsl = 0.0f, xsh = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t h0 = (h.x >> (8 * i)) >> (2 * c), h1 = (h.y >> (8 * i)) >> (2 * c);
            sl += (float) (((q.x >> (8 * i)) & 0xf) | ((h0 & 1) << 4)) * xl[i] +
                  (float) (((q.y >> (8 * i)) & 0xf) | ((h1 & 1) << 4)) * xl[4 + i];
            sh += (float) (((q.x >> (8 * i + 4)) & 0xf) | ((h0 & 2) << 3)) * xh[i] +
                  (float) (((q.y >> (8 * i + 4)) & 0xf) | ((h1 & 2) << 3)) * xh[4 + i];
            xsl += xl[i] + xl[4 + i];
            xsh += xh[i] + xh[4 + i];
        }
        return k.d * (k.s0 * sl + k.s1 * sh) - k.dmin * (k.m0 * xsl + k.m1 * xsh);
    }
};

// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d. Half h (128 values), index l (0..31):
// values l, l+32, l+64, l+96 of the half. Group g: h = g/8, l = 4(g%8) .. +3.
struct w_q6_k {
    static constexpr int block = 256, bytes = 210, groups = 16, align = 2;
    __device__ static float dot(const uint8_t * b, int g, const float * x) {
        const int h = g >> 3, l0 = 4 * (g & 7);
        const float d = h2f(ld16(b + 208));
        const uint32_t a  = ld32_a2(b + 64 * h + l0);        // values l (low nibble), l+64 (high)
        const uint32_t c  = ld32_a2(b + 64 * h + 32 + l0);   // values l+32, l+96
        const uint32_t hb = ld32_a2(b + 128 + 32 * h + l0);
        const int8_t * sc = (const int8_t *) (b + 192 + 8 * h);
        const int is = l0 / 16;
        const float * xb = x + 128 * h + l0;
        float s[4] = {0, 0, 0, 0};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t hh = (hb >> (8 * i)) & 0xff;
            s[0] += (float) ((int) (((a >> (8 * i)) & 0xf) | ((hh & 3) << 4)) - 32) * xb[i];
            s[1] += (float) ((int) (((c >> (8 * i)) & 0xf) | (((hh >> 2) & 3) << 4)) - 32) * xb[32 + i];
            s[2] += (float) ((int) (((a >> (8 * i + 4)) & 0xf) | (((hh >> 4) & 3) << 4)) - 32) * xb[64 + i];
            s[3] += (float) ((int) (((c >> (8 * i + 4)) & 0xf) | (((hh >> 6) & 3) << 4)) - 32) * xb[96 + i];
        }
        return d * ((float) sc[is] * s[0] + (float) sc[is + 2] * s[1] + (float) sc[is + 4] * s[2] + (float) sc[is + 6] * s[3]);
    }
};

struct w_q6_k_int : w_q6_k {
    static constexpr bool has_int = true;
    __device__ static float idot(const uint8_t * b, int g, const int8_t * xq, const float * xd) {
        const int h = g >> 3, l0 = 4 * (g & 7);
        const float d = h2f(ld16(b + 208));
        const uint32_t a  = ld32_a2(b + 64 * h + l0);
        const uint32_t c  = ld32_a2(b + 64 * h + 32 + l0);
        const uint32_t hb = ld32_a2(b + 128 + 32 * h + l0);
        const int8_t * sc = (const int8_t *) (b + 192 + 8 * h);
        const int is = l0 / 16;
        const int8_t * xb = xq + 128 * h + l0;
        const uint32_t m2 = 0x03030303u;
        const int v0 = __vsubss4((int) ((a & k_lo4) | ((hb & m2) << 4)), 0x20202020);
        const int v1 = __vsubss4((int) ((c & k_lo4) | (((hb >> 2) & m2) << 4)), 0x20202020);
        const int v2 = __vsubss4((int) (((a >> 4) & k_lo4) | (((hb >> 4) & m2) << 4)), 0x20202020);
        const int v3 = __vsubss4((int) (((c >> 4) & k_lo4) | (((hb >> 6) & m2) << 4)), 0x20202020);
        const float * xdh = xd + 4 * h;
        return d * ((float) sc[is] * xdh[0] * (float) __dp4a(v0, ld_i32(xb), 0) +
                    (float) sc[is + 2] * xdh[1] * (float) __dp4a(v1, ld_i32(xb + 32), 0) +
                    (float) sc[is + 4] * xdh[2] * (float) __dp4a(v2, ld_i32(xb + 64), 0) +
                    (float) sc[is + 6] * xdh[3] * (float) __dp4a(v3, ld_i32(xb + 96), 0));
    }
};

// Planar rows (quants.h: planar_block): one lane dots one unit (a Q4_0/Q8_0 block, a quarter of a K-quant block)
// with 16-byte quant loads; `udot` takes the row, its block count and the unit index. x is q8_1 (int8 values xq,
// a scale per 32 in xd; xd 16-byte aligned). Lanes of a warp take consecutive units, so each 16-byte load
// instruction of a warp reads 512 contiguous bytes.
// The row loops that use these are functions of their own (gpu-executor.cu, mv_rows_planar), where the compiler
// no longer sees that x lives in shared memory or the rows in global memory: plain loads became generic ones
// (LD.E in the SASS of 3353c1a, the hottest loop of the kernel). Here the state spaces are explicit: x, its scales
// from shared memory (ld.shared), a planar row's scales from global memory with the rows' streaming hint.
// -DMK_GENERIC_X_LOADS restores the generic loads (A/B runs). Not volatile: the compiler may merge or move them;
// nothing writes x or the weights inside a row loop.
#ifndef MK_GENERIC_X_LOADS
__device__ __forceinline__ uint32_t sh_addr(const void * p) { return (uint32_t) __cvta_generic_to_shared(p); }
__device__ __forceinline__ int4 ld_x16(const int8_t * p) {
    int4 v;
    asm("ld.shared.v4.s32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(sh_addr(p)));
    return v;
}
__device__ __forceinline__ float ld_xd(const float * p) {
    float v;
    asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(sh_addr(p)));
    return v;
}
__device__ __forceinline__ float2 ld_xd2(const float * p) {
    float2 v;
    asm("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(sh_addr(p)));
    return v;
}
__device__ __forceinline__ float4 ld_xd4(const float * p) {
    float4 v;
    asm("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(sh_addr(p)));
    return v;
}
__device__ __forceinline__ uint16_t ldp16(const uint8_t * p) { return __ldcs((const unsigned short *) p); }
__device__ __forceinline__ uint32_t ldp32(const uint8_t * p) { return __ldcs((const unsigned int *) p); }
#else
__device__ __forceinline__ int4 ld_x16(const int8_t * p) { return *(const int4 *) p; }
__device__ __forceinline__ float ld_xd(const float * p) { return *p; }
__device__ __forceinline__ float2 ld_xd2(const float * p) { return *(const float2 *) p; }
__device__ __forceinline__ float4 ld_xd4(const float * p) { return *(const float4 *) p; }
__device__ __forceinline__ uint16_t ldp16(const uint8_t * p) { return ld16(p); }
__device__ __forceinline__ uint32_t ldp32(const uint8_t * p) { return ld32(p); }
#endif
constexpr int k_ones = 0x01010101;

// dp4a of the low (hi = false) or high nibbles of four words with 16 x values
__device__ __forceinline__ int dot_nib4(uint4 q, int4 x, bool hi) {
    const int sh = hi ? 4 : 0;
    int s = __dp4a((int) ((q.x >> sh) & k_lo4), x.x, 0);
    s = __dp4a((int) ((q.y >> sh) & k_lo4), x.y, s);
    s = __dp4a((int) ((q.z >> sh) & k_lo4), x.z, s);
    return __dp4a((int) ((q.w >> sh) & k_lo4), x.w, s);
}

// dp4a of a Q5_0/Q5_1 block's 32 five-bit values (nibbles q, fifth bits qh) with its 32 x values: word w holds
// values 4w.. (low nibbles, qh bits 4w..) and 16 + 4w.. (high)
__device__ __forceinline__ int dot_nib5(uint4 q, uint32_t qh, int4 l, int4 h) {
    const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
    const int xl[4] = {l.x, l.y, l.z, l.w}, xh[4] = {h.x, h.y, h.z, h.w};
    int s = 0;
#pragma unroll
    for (int w = 0; w < 4; w++) {
        s = __dp4a((int) ((qw[w] & k_lo4) | spread_bits4((qh >> (4 * w)) & 0xf)), xl[w], s);
        s = __dp4a((int) (((qw[w] >> 4) & k_lo4) | spread_bits4((qh >> (16 + 4 * w)) & 0xf)), xh[w], s);
    }
    return s;
}

// the sum of 16 int8 x values
__device__ __forceinline__ int sum_i8x16(int4 x) {
    return __dp4a(k_ones, x.w, __dp4a(k_ones, x.z, __dp4a(k_ones, x.y, __dp4a(k_ones, x.x, 0))));
}

__device__ __forceinline__ int dot_i8x16(uint4 q, int4 x, int s) {
    s = __dp4a((int) q.x, x.x, s);
    s = __dp4a((int) q.y, x.y, s);
    s = __dp4a((int) q.z, x.z, s);
    return __dp4a((int) q.w, x.w, s);
}

// Each planar type in two parts: `xload` reads what a unit needs of x (its q8_1 values, scales, and the sums that
// only depend on x) and `udot` dots one row's unit with it. The row loop calls xload once per unit for its R rows:
// with the x loads inside udot the compiler kept them per row (16 shared loads and 128 dp4a per unit of eight Q4_0
// rows in the PTX of bb46b84, half of the dp4a summing x). The arithmetic is unchanged, value for value; the speed
// too (bench/results/2026-12-03-h200-matvec-probe-2fb1684: the loop waits on its weight loads).
// The x side of a unit of 32 values whose weights are stored with an offset (Q4_0: 8, Q5_0: 16): the q8_1 values,
// their scale, and OFF times their sum.
template <int OFF> struct x_offset_unit {
    int4 l, h;
    float d;
    int s;
    __device__ static x_offset_unit load(const int8_t * xq, const float * xd, int U) {
        x_offset_unit x;
        x.l = ld_x16(xq + 32 * U);
        x.h = ld_x16(xq + 32 * U + 16);
        x.d = ld_xd(xd + U);
        x.s = OFF * (sum_i8x16(x.l) + sum_i8x16(x.h));
        return x;
    }
};

struct w_q4_0_planar {
    static constexpr bool planar = true;
    static constexpr int block = 32, units = 1, unit_values = 32, max_rows = 8;
    using xunit = x_offset_unit<8>;
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float *, int U) {
        return xunit::load(xq, xd, U);
    }
    __device__ static float udot(const uint8_t * row, int nb, int U, const xunit & x) {
        const uint4 q = ldp((const uint4 *) row + U);
        const float d = h2f(ldp16(row + 16 * nb + 2 * U));
        const int s = dot_nib4(q, x.l, false) + dot_nib4(q, x.h, true);
        return d * x.d * (float) (s - x.s);
    }
};

// Q4_1/Q5_1 as their GGUF-layout int paths (ggml-cuda's vec_dot_q4_1_q8_1 / q5_1): F16 products d*d8 and m*s8, s8
// the block's F16 sum before rounding (xs).
template <bool five> struct w_q41_51_planar {
    static constexpr bool planar = true;
    static constexpr int block = 32, units = 1, unit_values = 32, max_rows = 8;
    struct xunit {
        int4 l, h;
        float d, s;
    };
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float * xs, int U) {
        return {ld_x16(xq + 32 * U), ld_x16(xq + 32 * U + 16), ld_xd(xd + U), ld_xd(xs + U)};
    }
    __device__ static float udot(const uint8_t * row, int nb, int U, const xunit & x) {
        const uint4 q = ldp((const uint4 *) row + U);
        const uint32_t dm = ldp32(row + (five ? 20 : 16) * nb + 4 * U);
        int s;
        if constexpr (five) {
            s = dot_nib5(q, ldp32(row + 16 * nb + 4 * U), x.l, x.h);
        } else {
            s = dot_nib4(q, x.l, false) + dot_nib4(q, x.h, true);
        }
        return (float) s * hmul_f(h2f(dm & 0xffff), x.d) + hmul_f(h2f(dm >> 16), x.s);
    }
};
using w_q4_1_planar = w_q41_51_planar<false>;
using w_q5_1_planar = w_q41_51_planar<true>;

struct w_q5_0_planar {
    static constexpr bool planar = true;
    static constexpr int block = 32, units = 1, unit_values = 32, max_rows = 8;
    using xunit = x_offset_unit<16>;
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float *, int U) {
        return xunit::load(xq, xd, U);
    }
    __device__ static float udot(const uint8_t * row, int nb, int U, const xunit & x) {
        const uint4 q = ldp((const uint4 *) row + U);
        const uint32_t qh = ldp32(row + 16 * nb + 4 * U);
        const float d = h2f(ldp16(row + 20 * nb + 2 * U));
        return d * x.d * (float) (dot_nib5(q, qh, x.l, x.h) - x.s);
    }
};

struct w_q8_0_planar {
    static constexpr bool planar = true;
    static constexpr int block = 32, units = 1, unit_values = 32, max_rows = 4;
    struct xunit {
        int4 a, b;
        float d;
    };
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float *, int U) {
        return {ld_x16(xq + 32 * U), ld_x16(xq + 32 * U + 16), ld_xd(xd + U)};
    }
    __device__ static float udot(const uint8_t * row, int nb, int U, const xunit & x) {
        const uint4 q0 = ldp((const uint4 *) row + U), q1 = ldp((const uint4 *) row + nb + U);
        const float d = h2f(ldp16(row + 32 * nb + 2 * U));
        const int s = dot_i8x16(q1, x.b, dot_i8x16(q0, x.a, 0));
        return d * x.d * (float) s;
    }
};

struct w_q4_k_planar {
    static constexpr bool planar = true;
    static constexpr int block = 256, units = 4, unit_values = 64, max_rows = 4;
    struct xunit {
        int4 x[4];
        int a, b;  // the sums of the first and the second 32 values (the min terms)
        float2 dd;
    };
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float *, int U) {
        xunit x;
        const int8_t * p = xq + 64 * U;
#pragma unroll
        for (int k = 0; k < 4; k++) x.x[k] = ld_x16(p + 16 * k);
        x.a = sum_i8x16(x.x[0]) + sum_i8x16(x.x[1]);
        x.b = sum_i8x16(x.x[2]) + sum_i8x16(x.x[3]);
        x.dd = ld_xd2(xd + 2 * U);
        return x;
    }
    __device__ static float udot(const uint8_t * row, int nb, int U, const xunit & x) {
        const int blk = U >> 2, c = U & 3;
        const uint4 hd = ldp((const uint4 *) (row + 128 * nb) + blk);
        const uint4 q0 = ldp((const uint4 *) row + U), q1 = ldp((const uint4 *) row + 4 * nb + U);
        const int sl = dot_nib4(q0, x.x[0], false) + dot_nib4(q1, x.x[1], false);
        const int sh = dot_nib4(q0, x.x[2], true) + dot_nib4(q1, x.x[3], true);
        const uint32_t sw[3] = {hd.y, hd.z, hd.w};
        float s0, m0, s1, m1;
        k_sm(2 * c, sw, s0, m0);
        k_sm(2 * c + 1, sw, s1, m1);
        return h2f(hd.x & 0xffff) * (s0 * x.dd.x * (float) sl + s1 * x.dd.y * (float) sh) -
               h2f(hd.x >> 16) * (m0 * x.dd.x * (float) x.a + m1 * x.dd.y * (float) x.b);
    }
};

// As Q4_K's, with the fifth bit of value l of the unit's sub-blocks 2c and 2c + 1 in bits 2c and 2c + 1 of qh[l]: the
// four lanes of a block load the same 32 bytes of qh (one transaction for all four).
struct w_q5_k_planar {
    static constexpr bool planar = true;
    static constexpr int block = 256, units = 4, unit_values = 64, max_rows = 4;
    using xunit = w_q4_k_planar::xunit;
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float * xs, int U) {
        return w_q4_k_planar::xload(xq, xd, xs, U);
    }
    __device__ static float udot(const uint8_t * row, int nb, int U, const xunit & x) {
        const int blk = U >> 2, c = U & 3;
        const uint4 hd = ldp((const uint4 *) (row + 128 * nb) + blk);
        const uint4 q0 = ldp((const uint4 *) row + U), q1 = ldp((const uint4 *) row + 4 * nb + U);
        const uint4 h0 = ldp((const uint4 *) (row + 144 * nb) + 2 * blk), h1 = ldp((const uint4 *) (row + 144 * nb) + 2 * blk + 1);
        const uint32_t qa[4] = {q0.x, q0.y, q0.z, q0.w}, qb[4] = {q1.x, q1.y, q1.z, q1.w};
        const uint32_t ha[4] = {h0.x, h0.y, h0.z, h0.w}, hb[4] = {h1.x, h1.y, h1.z, h1.w};
        const int xa[4] = {x.x[0].x, x.x[0].y, x.x[0].z, x.x[0].w}, xb[4] = {x.x[1].x, x.x[1].y, x.x[1].z, x.x[1].w};
        const int xc[4] = {x.x[2].x, x.x[2].y, x.x[2].z, x.x[2].w}, xe[4] = {x.x[3].x, x.x[3].y, x.x[3].z, x.x[3].w};
        const uint32_t b1 = 0x01010101u;
        int sl = 0, sh = 0;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            sl = __dp4a((int) ((qa[w] & k_lo4) | (((ha[w] >> (2 * c)) & b1) << 4)), xa[w], sl);
            sl = __dp4a((int) ((qb[w] & k_lo4) | (((hb[w] >> (2 * c)) & b1) << 4)), xb[w], sl);
            sh = __dp4a((int) (((qa[w] >> 4) & k_lo4) | (((ha[w] >> (2 * c + 1)) & b1) << 4)), xc[w], sh);
            sh = __dp4a((int) (((qb[w] >> 4) & k_lo4) | (((hb[w] >> (2 * c + 1)) & b1) << 4)), xe[w], sh);
        }
        const uint32_t sw[3] = {hd.y, hd.z, hd.w};
        float s0, m0, s1, m1;
        k_sm(2 * c, sw, s0, m0);
        k_sm(2 * c + 1, sw, s1, m1);
        return h2f(hd.x & 0xffff) * (s0 * x.dd.x * (float) sl + s1 * x.dd.y * (float) sh) -
               h2f(hd.x >> 16) * (m0 * x.dd.x * (float) x.a + m1 * x.dd.y * (float) x.b);
    }
};

struct w_q6_k_planar {
    static constexpr bool planar = true;
    static constexpr int block = 256, units = 4, unit_values = 64, max_rows = 4;
    struct xunit {
        int xw[4][4];  // values l, l + 32, l + 64, l + 96 of the unit's half (16 each)
        int s32[4];    // 32 * their sums: the offset of Q6_K's values
        float dv[4];
    };
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float *, int U) {
        xunit x;
        const int blk = U >> 2, h = (U >> 1) & 1;
        const int8_t * p = xq + 256 * blk + 128 * h + 16 * (U & 1);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int4 v = ld_x16(p + 32 * q);
            x.xw[q][0] = v.x;
            x.xw[q][1] = v.y;
            x.xw[q][2] = v.z;
            x.xw[q][3] = v.w;
            int sx = 0;
#pragma unroll
            for (int w = 0; w < 4; w++) sx = __dp4a(k_ones, x.xw[q][w], sx);
            x.s32[q] = 32 * sx;
        }
        const float4 dq = ld_xd4(xd + 8 * blk + 4 * h);
        x.dv[0] = dq.x;
        x.dv[1] = dq.y;
        x.dv[2] = dq.z;
        x.dv[3] = dq.w;
        return x;
    }
    __device__ static float udot(const uint8_t * row, int nb, int U, const xunit & x) {
        const int blk = U >> 2;
        const uint4 a = ldp((const uint4 *) row + U);               // values l (low nibble), l + 64 (high)
        const uint4 c = ldp((const uint4 *) row + 4 * nb + U);      // values l + 32, l + 96
        const uint4 hb = ldp((const uint4 *) row + 8 * nb + U);     // their two high bits
        const uint32_t sc = ldp32(row + 192 * nb + 4 * U);
        const float d = h2f(ldp16(row + 208 * nb + 2 * blk));
        const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, cw[4] = {c.x, c.y, c.z, c.w}, hw[4] = {hb.x, hb.y, hb.z, hb.w};
        const uint32_t m2 = 0x03030303u;
        int s[4] = {0, 0, 0, 0};
#pragma unroll
        for (int w = 0; w < 4; w++) {
            s[0] = __dp4a((int) ((aw[w] & k_lo4) | ((hw[w] & m2) << 4)), x.xw[0][w], s[0]);
            s[1] = __dp4a((int) ((cw[w] & k_lo4) | (((hw[w] >> 2) & m2) << 4)), x.xw[1][w], s[1]);
            s[2] = __dp4a((int) (((aw[w] >> 4) & k_lo4) | (((hw[w] >> 4) & m2) << 4)), x.xw[2][w], s[2]);
            s[3] = __dp4a((int) (((cw[w] >> 4) & k_lo4) | (((hw[w] >> 6) & m2) << 4)), x.xw[3][w], s[3]);
        }
        float r = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            r += (float) (int8_t) (sc >> (8 * q)) * x.dv[q] * (float) (s[q] - x.s32[q]);
        }
        return d * r;
    }
};

// The K-quant slices of fused down projections (quants.h: slice_put): a unit is 64 values, P its index among the
// slice's np units, x's unit j the tile's values 64j.. (the Q4_K planar unit's x side). Q4_0/Q8_0 slices are planar
// rows (w_q4_0_planar, w_q8_0_planar).
struct k_slice_x {
    using xunit = w_q4_k_planar::xunit;
    __device__ static xunit xload(const int8_t * xq, const float * xd, const float * xs, int j) {
        return w_q4_k_planar::xload(xq, xd, xs, j);
    }
};

__device__ __forceinline__ float k_slice_dot(uint2 sd, int sl, int sh, const w_q4_k_planar::xunit & x) {
    const float s0 = (float) (sd.y & 0xff), m0 = (float) ((sd.y >> 8) & 0xff);
    const float s1 = (float) ((sd.y >> 16) & 0xff), m1 = (float) (sd.y >> 24);
    return h2f(sd.x & 0xffff) * (s0 * x.dd.x * (float) sl + s1 * x.dd.y * (float) sh) -
           h2f(sd.x >> 16) * (m0 * x.dd.x * (float) x.a + m1 * x.dd.y * (float) x.b);
}

struct w_q4_k_slice : k_slice_x {
    __device__ static float udot(const uint8_t * s, int np, int P, const xunit & x) {
        const uint4 q0 = ldp((const uint4 *) s + P), q1 = ldp((const uint4 *) s + np + P);
        const uint2 sd = ldp((const uint2 *) (s + 32 * (size_t) np) + P);
        const int sl = dot_nib4(q0, x.x[0], false) + dot_nib4(q1, x.x[1], false);
        const int sh = dot_nib4(q0, x.x[2], true) + dot_nib4(q1, x.x[3], true);
        return k_slice_dot(sd, sl, sh, x);
    }
};

struct w_q5_k_slice : k_slice_x {
    __device__ static float udot(const uint8_t * s, int np, int P, const xunit & x) {
        const uint4 q0 = ldp((const uint4 *) s + P), q1 = ldp((const uint4 *) s + np + P);
        const uint2 sd = ldp((const uint2 *) (s + 32 * (size_t) np) + P);
        const uint2 qh = ldp((const uint2 *) (s + 40 * (size_t) np) + P);
        const uint32_t qa[4] = {q0.x, q0.y, q0.z, q0.w}, qb[4] = {q1.x, q1.y, q1.z, q1.w};
        const int xa[4] = {x.x[0].x, x.x[0].y, x.x[0].z, x.x[0].w}, xb[4] = {x.x[1].x, x.x[1].y, x.x[1].z, x.x[1].w};
        const int xc[4] = {x.x[2].x, x.x[2].y, x.x[2].z, x.x[2].w}, xe[4] = {x.x[3].x, x.x[3].y, x.x[3].z, x.x[3].w};
        int sl = 0, sh = 0;
#pragma unroll
        for (int w = 0; w < 4; w++) {  // word w of piece 0: values 4w.. and 32 + 4w..; of piece 1: 16 + 4w.., 48 + 4w..
            sl = __dp4a((int) ((qa[w] & k_lo4) | spread_bits4((qh.x >> (4 * w)) & 0xf)), xa[w], sl);
            sl = __dp4a((int) ((qb[w] & k_lo4) | spread_bits4((qh.x >> (16 + 4 * w)) & 0xf)), xb[w], sl);
            sh = __dp4a((int) (((qa[w] >> 4) & k_lo4) | spread_bits4((qh.y >> (4 * w)) & 0xf)), xc[w], sh);
            sh = __dp4a((int) (((qb[w] >> 4) & k_lo4) | spread_bits4((qh.y >> (16 + 4 * w)) & 0xf)), xe[w], sh);
        }
        return k_slice_dot(sd, sl, sh, x);
    }
};

struct w_q6_k_slice : k_slice_x {  // (the x sums a, b are not used)
    __device__ static float udot(const uint8_t * s, int np, int P, const xunit & x) {
        const uint4 q0 = ldp((const uint4 *) s + P), q1 = ldp((const uint4 *) s + np + P);
        const uint4 hb = ldp((const uint4 *) s + 2 * np + P);
        const uint2 sd = ldp((const uint2 *) (s + 48 * (size_t) np) + P);
        const uint32_t qa[4] = {q0.x, q0.y, q0.z, q0.w}, qb[4] = {q1.x, q1.y, q1.z, q1.w}, hw[4] = {hb.x, hb.y, hb.z, hb.w};
        const int xw[4][4] = {{x.x[0].x, x.x[0].y, x.x[0].z, x.x[0].w}, {x.x[1].x, x.x[1].y, x.x[1].z, x.x[1].w},
                              {x.x[2].x, x.x[2].y, x.x[2].z, x.x[2].w}, {x.x[3].x, x.x[3].y, x.x[3].z, x.x[3].w}};
        const uint32_t m2 = 0x03030303u;
        int g[4] = {0, 0, 0, 0}, sx[4] = {0, 0, 0, 0};  // group G: values 16G..16G+15
#pragma unroll
        for (int w = 0; w < 4; w++) {
            g[0] = __dp4a((int) ((qa[w] & k_lo4) | ((hw[w] & m2) << 4)), xw[0][w], g[0]);
            g[1] = __dp4a((int) ((qb[w] & k_lo4) | (((hw[w] >> 2) & m2) << 4)), xw[1][w], g[1]);
            g[2] = __dp4a((int) (((qa[w] >> 4) & k_lo4) | (((hw[w] >> 4) & m2) << 4)), xw[2][w], g[2]);
            g[3] = __dp4a((int) (((qb[w] >> 4) & k_lo4) | (((hw[w] >> 6) & m2) << 4)), xw[3][w], g[3]);
#pragma unroll
            for (int G = 0; G < 4; G++) sx[G] = __dp4a(k_ones, xw[G][w], sx[G]);
        }
        float r0 = 0.0f, r1 = 0.0f;  // values 0..31 and 32..63 (one x scale each)
#pragma unroll
        for (int G = 0; G < 4; G++) {
            const float v = (float) (int8_t) (sd.x >> (8 * G)) * (float) (g[G] - 32 * sx[G]);
            if (G < 2) r0 += v; else r1 += v;
        }
        return h2f(sd.y & 0xffff) * (x.dd.x * r0 + x.dd.y * r1);
    }
};

// As dot_rows_q8, over the units of planar rows of nb blocks: x's part of a unit once, then the R rows.
template <typename W, int R>
__device__ __forceinline__ void dot_units(const uint8_t * row0, uint64_t stride, const int8_t * xq, const float * xd,
                                          const float * xs, int nb, int start, int step, float (&s)[R]) {
    const int nu = nb * W::units;
#pragma unroll 2
    for (int u = start; u < nu; u += step) {
        const typename W::xunit xu = W::xload(xq, xd, xs, u);
#pragma unroll
        for (int k = 0; k < R; k++) {
            s[k] += W::udot(row0 + k * stride, nb, u, xu);
        }
    }
}

// Call f.template operator()<W>() with the struct of weight type t; false if the type has none.
template <typename F> __device__ __forceinline__ bool dispatch_type(int t, F f) {
    switch (t) {
        case 0:  f(w_f32{});  return true;
        case 1:  f(w_f16{});  return true;
        case 30: f(w_bf16{}); return true;
        case 2:  f(w_q4_0_int{}); return true;
        case 3:  f(w_q4_1_int{}); return true;
        case 6:  f(w_q5_0{}); return true;  // int paths in GGUF layout: +172 bytes of the kernel's spills (ptxas)
        case 7:  f(w_q5_1{}); return true;
        case 8:  f(w_q8_0_int{}); return true;
        case 12: f(w_q4_k_int{}); return true;
        case 13: f(w_q5_k{}); return true;
        case 14: f(w_q6_k_int{}); return true;
        case k_planar + 2:  f(w_q4_0_planar{}); return true;
        case k_planar + 3:  f(w_q4_1_planar{}); return true;
        case k_planar + 6:  f(w_q5_0_planar{}); return true;
        case k_planar + 7:  f(w_q5_1_planar{}); return true;
        case k_planar + 8:  f(w_q8_0_planar{}); return true;
        case k_planar + 12: f(w_q4_k_planar{}); return true;
        case k_planar + 13: f(w_q5_k_planar{}); return true;
        case k_planar + 14: f(w_q6_k_planar{}); return true;
        default: return false;
    }
}

template <typename W, typename = void> struct is_planar { static constexpr bool value = false; };
template <typename W> struct is_planar<W, decltype((void) W::planar)> { static constexpr bool value = W::planar; };

template <typename W, typename = void> struct needs_sum { static constexpr bool value = false; };
template <typename W> struct needs_sum<W, decltype((void) W::needs_sum)> { static constexpr bool value = W::needs_sum; };

template <typename W, typename = void> struct has_int_path { static constexpr bool value = false; };
template <typename W> struct has_int_path<W, decltype((void) W::has_int)> { static constexpr bool value = W::has_int; };

// Host side of the same table: the row alignment each type's loads need (0: not supported on the GPU).
inline int weight_align(int t) {
    switch (t) {
        case 0: return w_f32::align;
        case 1: case 30: return w_f16::align;
        case 2: return w_q4_0::align;
        case 3: return w_q4_1::align;
        case 6: return w_q5_0::align;
        case 7: return w_q5_1::align;
        case 8: return w_q8_0::align;
        case 12: return w_q4_k::align;
        case 13: return w_q5_k::align;
        case 14: return w_q6_k::align;
        case k_planar + 2: case k_planar + 3: case k_planar + 6: case k_planar + 7: case k_planar + 8: case k_planar + 12:
        case k_planar + 13:
        case k_planar + 14: return 16;
        default: return 0;
    }
}

template <typename W> __host__ __device__ constexpr int max_rows_of() {
    if constexpr (is_planar<W>::value) return W::max_rows; else return 8;
}

// Host side: the values one lane dots at a time (a group of 16, or a planar unit), and the most rows a warp takes
// at once (planar units hold 5-14 registers of loads per row).
struct lane_shape {
    int values, max_rows;
};
template <typename W> constexpr lane_shape lane_shape_of() { return {W::unit_values, W::max_rows}; }
inline lane_shape lane_shape_of(int t) {
    switch (t) {
        case k_planar + 2: return lane_shape_of<w_q4_0_planar>();
        case k_planar + 3: return lane_shape_of<w_q4_1_planar>();
        case k_planar + 6: return lane_shape_of<w_q5_0_planar>();
        case k_planar + 7: return lane_shape_of<w_q5_1_planar>();
        case k_planar + 8: return lane_shape_of<w_q8_0_planar>();
        case k_planar + 12: return lane_shape_of<w_q4_k_planar>();
        case k_planar + 13: return lane_shape_of<w_q5_k_planar>();
        case k_planar + 14: return lane_shape_of<w_q6_k_planar>();
        default: return {16, 8};
    }
}

// R rows at once (row k at row0 + k * stride), so that a lane has R independent loads in flight: groups start,
// start + step, ... of each row. The caller reduces each s[k] over the lanes (and warps) that shared the row.
// n: values per row (a multiple of W::block for the quantized types; float types may end in a partial group).
template <typename W, int R>
__device__ __forceinline__ void dot_rows(const uint8_t * row0, uint64_t stride, const float * x, int n, int start, int step,
                                         float (&s)[R]) {
    const int nb = n / W::block;
    const int ng = nb * W::groups;
#pragma unroll 2
    for (int gi = start; gi < ng; gi += step) {
        const int blk = gi / W::groups, g = gi % W::groups;
        const float * xb = x + blk * W::block;
#pragma unroll
        for (int k = 0; k < R; k++) {
            s[k] += W::dot(row0 + k * stride + (size_t) blk * W::bytes, g, xb);
        }
    }
    if constexpr (W::block == 16) {  // float types: the values after the last whole group
        for (int i = nb * 16 + start; i < n; i += step) {
#pragma unroll
            for (int k = 0; k < R; k++) {
                s[k] += W::elem(row0 + k * stride, i) * x[i];
            }
        }
    }
}

// As dot_rows, with x as q8_1 (int8 values xq, scales xd per 32) and the weight type's integer dot.
template <typename W, int R>
__device__ __forceinline__ void dot_rows_q8(const uint8_t * row0, uint64_t stride, const int8_t * xq, const float * xd,
                                            const float * xs, int n, int start, int step, float (&s)[R]) {
    const int ng = (n / W::block) * W::groups;
#pragma unroll 2
    for (int gi = start; gi < ng; gi += step) {
        const int blk = gi / W::groups, g = gi % W::groups;
        const int8_t * xb = xq + blk * W::block;
        const float * db = xd + blk * (W::block / 32);
#pragma unroll
        for (int k = 0; k < R; k++) {
            if constexpr (needs_sum<W>::value) {
                s[k] += W::idot(row0 + k * stride + (size_t) blk * W::bytes, g, xb, db, xs + blk * (W::block / 32));
            } else {
                s[k] += W::idot(row0 + k * stride + (size_t) blk * W::bytes, g, xb, db);
            }
        }
    }
}

// Whether ggml-cuda rounds the activations of this weight type to q8_1 blocks (its mmvq path: every quantized type).
__host__ __device__ inline bool uses_q8_1(int t) {
    return t != 0 && t != 1 && t != 30;
}

}  // namespace dev
}  // namespace mk
