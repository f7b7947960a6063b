// Weight formats: the GGUF block layouts the executors read, dequantized by our own code (checked against the
// `gguf` package's dequantization in tests/test_quants.py). Host and device code share these functions; adding a
// weight type means a block decoder here plus its entry in `type_info` and `dequant_block`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace mk {

// ggml_type values (ggml.h); repeated here so device code needs no ggml header.
enum wtype : int32_t {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q8_1 = 9, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_Q8_K = 15, T_I32 = 26, T_I64 = 27, T_BF16 = 30,
};

MK_HD float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    uint32_t exp  = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest even, as the F16C instructions ggml-cpu uses.
MK_HD uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) {  // inf or nan
        return (uint16_t) (sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    }
    if (absx >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
        return (uint16_t) (sign | 0x7c00);
    }
    if (absx < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        if (absx < 0x33000000u) {
            return (uint16_t) sign;
        }
        const uint32_t e     = absx >> 23;
        const uint32_t mant  = (absx & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e;  // 14 + (113 - e) - ... chosen so the result has 10 fractional bits
        uint32_t q = mant >> shift;
        const uint32_t rem  = mant & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) {
            q++;
        }
        return (uint16_t) (sign | q);
    }
    uint32_t q = ((absx >> 13) - ((127 - 15) << 10));
    const uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) {
        q++;
    }
    return (uint16_t) (sign | q);
}

MK_HD float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t) h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

MK_HD uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet (as ggml)
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t) ((x >> 16) | 64);
    }
    return (uint16_t) ((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}

MK_HD uint16_t rd16(const uint8_t * p) {
    return (uint16_t) (p[0] | (p[1] << 8));
}

// Elements per block and bytes per block.
struct type_info {
    int32_t block;
    int32_t bytes;
};

MK_HD type_info info_of(int32_t t) {
    switch (t) {
        case T_F32:  return {1, 4};
        case T_F16:  return {1, 2};
        case T_BF16: return {1, 2};
        case T_Q4_0: return {32, 18};
        case T_Q4_1: return {32, 20};
        case T_Q5_0: return {32, 22};
        case T_Q5_1: return {32, 24};
        case T_Q8_0: return {32, 34};
        case T_Q4_K: return {256, 144};
        case T_Q5_K: return {256, 176};
        case T_Q6_K: return {256, 210};
        default:     return {0, 0};
    }
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block.
MK_HD void k_scale_min(int j, const uint8_t * s, int & sc, int & m) {
    if (j < 4) {
        sc = s[j] & 63;
        m  = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        m  = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Dequantize one block (info_of(t).block values) starting at `b` into `y`.
MK_HD void dequant_block(int32_t t, const uint8_t * b, float * y) {
    switch (t) {
        case T_F32: {
            memcpy(y, b, 4);
            return;
        }
        case T_F16:  y[0] = half_to_float(rd16(b)); return;
        case T_BF16: y[0] = bf16_to_float(rd16(b)); return;
        case T_Q4_0: {  // d, 16 bytes of nibbles: low nibbles are values 0..15, high nibbles 16..31
            const float d = half_to_float(rd16(b));
            for (int j = 0; j < 16; j++) {
                y[j]      = (float) ((b[2 + j] & 0xf) - 8) * d;
                y[j + 16] = (float) ((b[2 + j] >> 4) - 8) * d;
            }
            return;
        }
        case T_Q4_1: {
            const float d = half_to_float(rd16(b)), m = half_to_float(rd16(b + 2));
            for (int j = 0; j < 16; j++) {
                y[j]      = (float) (b[4 + j] & 0xf) * d + m;
                y[j + 16] = (float) (b[4 + j] >> 4) * d + m;
            }
            return;
        }
        case T_Q5_0: {  // d, 32 high bits, 16 bytes of low nibbles
            const float d = half_to_float(rd16(b));
            uint32_t qh;
            memcpy(&qh, b + 2, 4);
            for (int j = 0; j < 16; j++) {
                const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
                y[j]      = (float) (((b[6 + j] & 0xf) | (h0 << 4)) - 16) * d;
                y[j + 16] = (float) (((b[6 + j] >> 4) | (h1 << 4)) - 16) * d;
            }
            return;
        }
        case T_Q5_1: {
            const float d = half_to_float(rd16(b)), m = half_to_float(rd16(b + 2));
            uint32_t qh;
            memcpy(&qh, b + 4, 4);
            for (int j = 0; j < 16; j++) {
                const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
                y[j]      = (float) ((b[8 + j] & 0xf) | (h0 << 4)) * d + m;
                y[j + 16] = (float) ((b[8 + j] >> 4) | (h1 << 4)) * d + m;
            }
            return;
        }
        case T_Q8_0: {
            const float d = half_to_float(rd16(b));
            for (int j = 0; j < 32; j++) {
                y[j] = (float) (int8_t) b[2 + j] * d;
            }
            return;
        }
        case T_Q4_K: {  // d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of nibbles
            const float d = half_to_float(rd16(b)), dmin = half_to_float(rd16(b + 2));
            const uint8_t * sc = b + 4;
            const uint8_t * q  = b + 16;
            for (int g = 0; g < 4; g++) {  // 64 values per group: low nibbles, then high nibbles, of 32 bytes
                int s0, m0, s1, m1;
                k_scale_min(2 * g, sc, s0, m0);
                k_scale_min(2 * g + 1, sc, s1, m1);
                for (int l = 0; l < 32; l++) {
                    y[64 * g + l]      = d * s0 * (q[32 * g + l] & 0xf) - dmin * m0;
                    y[64 * g + 32 + l] = d * s1 * (q[32 * g + l] >> 4) - dmin * m1;
                }
            }
            return;
        }
        case T_Q5_K: {  // as Q4_K plus 32 bytes of high bits (bit 2g and 2g+1 for group g)
            const float d = half_to_float(rd16(b)), dmin = half_to_float(rd16(b + 2));
            const uint8_t * sc = b + 4;
            const uint8_t * qh = b + 16;
            const uint8_t * q  = b + 48;
            for (int g = 0; g < 4; g++) {
                int s0, m0, s1, m1;
                k_scale_min(2 * g, sc, s0, m0);
                k_scale_min(2 * g + 1, sc, s1, m1);
                for (int l = 0; l < 32; l++) {
                    const int h0 = (qh[l] >> (2 * g)) & 1, h1 = (qh[l] >> (2 * g + 1)) & 1;
                    y[64 * g + l]      = d * s0 * ((q[32 * g + l] & 0xf) | (h0 << 4)) - dmin * m0;
                    y[64 * g + 32 + l] = d * s1 * ((q[32 * g + l] >> 4) | (h1 << 4)) - dmin * m1;
                }
            }
            return;
        }
        case T_Q6_K: {  // 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d
            const uint8_t * ql = b;
            const uint8_t * qh = b + 128;
            const int8_t  * sc = (const int8_t *) (b + 192);
            const float d = half_to_float(rd16(b + 208));
            for (int h = 0; h < 2; h++) {  // two halves of 128 values
                const uint8_t * l4 = ql + 64 * h;
                const uint8_t * h2 = qh + 32 * h;
                const int8_t  * s  = sc + 8 * h;
                float * o = y + 128 * h;
                for (int l = 0; l < 32; l++) {
                    const int is = l / 16;
                    const int q0 = ((l4[l] & 0xf) | (((h2[l] >> 0) & 3) << 4)) - 32;
                    const int q1 = ((l4[l + 32] & 0xf) | (((h2[l] >> 2) & 3) << 4)) - 32;
                    const int q2 = ((l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4)) - 32;
                    const int q3 = ((l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4)) - 32;
                    o[l]      = d * s[is + 0] * q0;
                    o[l + 32] = d * s[is + 2] * q1;
                    o[l + 64] = d * s[is + 4] * q2;
                    o[l + 96] = d * s[is + 6] * q3;
                }
            }
            return;
        }
        default:
            return;
    }
}

// Planar rows: the GPU executor's copy of a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K matrix, repacked when it loads a program so that
// every quant load is 16 bytes wide and a warp's loads are contiguous. The GGUF blocks (18, 34, 210 bytes) leave
// their fields 2-byte aligned, and 2-byte loads held the quantized matvec to about half the bandwidth of the BF16
// one (docs/gpu-executor-notes.md, session 9). A planar row of nb blocks has the same bytes, reordered, in
// planes: the quant bytes in 16-byte pieces, piece k of lane-unit U at 16 * (k * units + U), then the scales.
// A unit is what one lane reads: a Q4_0/Q8_0 block (32 values), a quarter of a K-quant block (64 values).
//   Q4_0: pieces qs of block U; then d of block U at 16nb + 2U.
//   Q4_1: pieces qs of block U; then d and m (4 bytes) at 16nb + 4U.
//   Q5_0: pieces qs of block U; then its 4 bytes qh at 16nb + 4U; then d at 20nb + 2U.
//   Q5_1: pieces qs of block U; then its qh at 16nb + 4U; then d and m at 20nb + 4U.
//   Q8_0: pieces qs[16k..16k+15] of block U (k = 0, 1); then d at 32nb + 2U.
//   Q4_K: unit U = 4 blk + c: pieces qs[32c + 16k ..] (k = 0, 1); then the block's 16 header bytes (d, dmin, 12
//         scale bytes) at 128nb + 16 blk.
//   Q5_K: as Q4_K (pieces qs[32c + 16k ..], the 16 header bytes at 128nb + 16 blk), then the block's 32 bytes qh
//         at 144nb + 32 blk: every unit of the block reads them all (two bits of each byte are its values' fifth).
//   Q6_K: unit U = 4 blk + u, half h = u / 2, l0 = 16 (u % 2) (values 128h + 32q + l0 + 0..15, q = 0..3): pieces
//         ql[64h + l0 ..], ql[64h + 32 + l0 ..], qh[32h + l0 ..]; then the unit's four scales sc[8h + u % 2 + 2q]
//         at 192nb + 4U; then d at 208nb + 2 blk.
// Rows are padded to 16 bytes.
MK_HD bool planar_type(int32_t t) {
    return t == T_Q4_0 || t == T_Q4_1 || t == T_Q5_0 || t == T_Q5_1 || t == T_Q8_0 || t == T_Q4_K || t == T_Q5_K ||
           t == T_Q6_K;
}

MK_HD uint64_t planar_row_bytes(int32_t t, int64_t nb) {
    return ((uint64_t) info_of(t).bytes * nb + 15) / 16 * 16;
}

// Block blk of a row of nb blocks, at b in GGUF layout, into (put) or out of (!put) the planar row `row`.
MK_HD void planar_block(int32_t t, uint8_t * b, uint8_t * row, int64_t nb, int64_t blk, bool put) {
    auto mv = [put](uint8_t * planar, uint8_t * gguf, int n) {
        for (int i = 0; i < n; i++) {
            if (put) planar[i] = gguf[i]; else gguf[i] = planar[i];
        }
    };
    switch (t) {
        case T_Q4_0:
            mv(row + 16 * blk, b + 2, 16);
            mv(row + 16 * nb + 2 * blk, b, 2);
            return;
        case T_Q4_1:
            mv(row + 16 * blk, b + 4, 16);
            mv(row + 16 * nb + 4 * blk, b, 4);
            return;
        case T_Q5_1:
            mv(row + 16 * blk, b + 8, 16);
            mv(row + 16 * nb + 4 * blk, b + 4, 4);
            mv(row + 20 * nb + 4 * blk, b, 4);
            return;
        case T_Q5_0:
            mv(row + 16 * blk, b + 6, 16);
            mv(row + 16 * nb + 4 * blk, b + 2, 4);
            mv(row + 20 * nb + 2 * blk, b, 2);
            return;
        case T_Q8_0:
            for (int k = 0; k < 2; k++) mv(row + 16 * (k * nb + blk), b + 2 + 16 * k, 16);
            mv(row + 32 * nb + 2 * blk, b, 2);
            return;
        case T_Q4_K:
            for (int c = 0; c < 4; c++) {
                for (int k = 0; k < 2; k++) mv(row + 16 * (k * 4 * nb + 4 * blk + c), b + 16 + 32 * c + 16 * k, 16);
            }
            mv(row + 128 * nb + 16 * blk, b, 16);
            return;
        case T_Q5_K:
            for (int c = 0; c < 4; c++) {
                for (int k = 0; k < 2; k++) mv(row + 16 * (k * 4 * nb + 4 * blk + c), b + 48 + 32 * c + 16 * k, 16);
            }
            mv(row + 128 * nb + 16 * blk, b, 16);
            mv(row + 144 * nb + 32 * blk, b + 16, 32);
            return;
        case T_Q6_K:
            for (int u = 0; u < 4; u++) {
                const int64_t U = 4 * blk + u;
                const int h = u / 2, l0 = 16 * (u % 2);
                mv(row + 16 * U, b + 64 * h + l0, 16);
                mv(row + 16 * (4 * nb + U), b + 64 * h + 32 + l0, 16);
                mv(row + 16 * (8 * nb + U), b + 128 + 32 * h + l0, 16);
                for (int q = 0; q < 4; q++) mv(row + 192 * nb + 4 * U + q, b + 192 + 8 * h + u % 2 + 2 * q, 1);
            }
            mv(row + 208 * nb + 2 * blk, b + 208, 2);
            return;
        default:
            return;
    }
}

// Slices: the GPU executor's copy of a fused down projection's matrix (program.h: fused_down), one per tile of the
// glu: columns [r0, r1) of every one of the D rows, as np = (r1 - r0) / span * D units in which unit P = j * D + o
// holds values r0 + span * j .. + span of row o, so that the threads of a block, one row each, read contiguous units.
// A tile's columns start at a multiple of the span: 32 (a Q4_0/Q8_0 block), 64 (a quarter c of a K-quant block,
// whose 16 header bytes would otherwise be read, or copied, four times).
//   Q4_0, Q8_0: a planar row of np blocks (planar_block, nb = np, blk = P).
//   Q4_K, Q5_K: pieces k = 0, 1 at 16 (k np + P): the block's qs[32c + 16k ..] (byte b: low nibble value 16k + b of
//         the unit, high nibble value 32 + 16k + b); at 32np + 8P: d, dmin (as in the block), then the 6-bit scale
//         and min of sub-blocks 2c and 2c + 1 as bytes s0, m0, s1, m1. Q5_K: at 40np + 8P two words: bit l of the
//         first is the fifth bit of value l (qh[l] bit 2c), bit l of the second that of value 32 + l (bit 2c + 1).
//   Q6_K: quarter c = 2h + e holds values 128h + 64e + v (v = 0..63): the low nibbles (e = 0) or the high ones
//         (e = 1) of ql[64h + v]. Pieces k = 0, 1 at 16 (k np + P), byte b: low nibble the four low bits of value
//         16k + b, high nibble those of value 32 + 16k + b; piece 2 at 16 (2np + P): byte 4w + i holds the two high
//         bits of value 16G + 4w + i in bits 2G, 2G + 1 (G = 0..3); at 48np + 8P: the int8 scales of the unit's four
//         groups of 16 (sc[8h + 4e + G]), d, two zero bytes.
MK_HD int slice_span(int32_t t) {
    switch (t) {
        case T_Q4_0: case T_Q8_0: return 32;
        case T_Q4_K: case T_Q5_K: case T_Q6_K: return 64;
        default: return 0;
    }
}

MK_HD uint64_t slice_bytes(int32_t t, int64_t np) {
    switch (t) {
        case T_Q4_K: return 40 * (uint64_t) np;
        case T_Q5_K: return 48 * (uint64_t) np;
        case T_Q6_K: return 56 * (uint64_t) np;
        default: return planar_row_bytes(t, np);
    }
}

// Span c of the GGUF block b (c = 0 for Q4_0/Q8_0) into unit P of a slice of np units.
MK_HD void slice_put(int32_t t, const uint8_t * b, int c, uint8_t * slice, int64_t np, int64_t P) {
    auto cp = [](uint8_t * d, const uint8_t * s, int n) {
        for (int i = 0; i < n; i++) d[i] = s[i];
    };
    switch (t) {
        case T_Q4_K: case T_Q5_K: {
            const uint8_t * qs = b + (t == T_Q4_K ? 16 : 48) + 32 * c;
            for (int k = 0; k < 2; k++) cp(slice + 16 * (k * np + P), qs + 16 * k, 16);
            uint8_t * sd = slice + 32 * np + 8 * P;
            cp(sd, b, 4);
            int s0, m0, s1, m1;
            k_scale_min(2 * c, b + 4, s0, m0);
            k_scale_min(2 * c + 1, b + 4, s1, m1);
            sd[4] = (uint8_t) s0, sd[5] = (uint8_t) m0, sd[6] = (uint8_t) s1, sd[7] = (uint8_t) m1;
            if (t == T_Q5_K) {
                uint32_t w[2] = {0, 0};
                for (int l = 0; l < 32; l++) {
                    w[0] |= (uint32_t) ((b[16 + l] >> (2 * c)) & 1) << l;
                    w[1] |= (uint32_t) ((b[16 + l] >> (2 * c + 1)) & 1) << l;
                }
                uint8_t * qh = slice + 40 * np + 8 * P;
                for (int i = 0; i < 8; i++) qh[i] = (uint8_t) (w[i / 4] >> (8 * (i % 4)));
            }
            return;
        }
        case T_Q6_K: {
            const int h = c / 2, e = c % 2;
            uint8_t lo[64], hi[64];  // the unit's values: four low bits, two high bits
            for (int v = 0; v < 64; v++) {
                const int l = v % 32, q = 2 * e + v / 32;
                lo[v] = (uint8_t) ((b[64 * h + v] >> (4 * e)) & 0xf);
                hi[v] = (uint8_t) ((b[128 + 32 * h + l] >> (2 * q)) & 3);
            }
            for (int k = 0; k < 2; k++) {
                for (int i = 0; i < 16; i++) {
                    slice[16 * (k * np + P) + i] = (uint8_t) (lo[16 * k + i] | (lo[32 + 16 * k + i] << 4));
                }
            }
            for (int i = 0; i < 16; i++) {
                uint8_t v = 0;
                for (int G = 0; G < 4; G++) v |= (uint8_t) (hi[16 * G + i] << (2 * G));
                slice[16 * (2 * np + P) + i] = v;
            }
            uint8_t * sd = slice + 48 * np + 8 * P;
            cp(sd, b + 192 + 8 * h + 4 * e, 4);
            cp(sd + 4, b + 208, 2);
            sd[6] = sd[7] = 0;
            return;
        }
        default:
            planar_block(t, (uint8_t *) b, slice, np, P, true);
            return;
    }
}

// Dequantize n values (a multiple of the block size) of type t.
MK_HD void dequant_row(int32_t t, const void * src, float * y, int64_t n) {
    const type_info ti = info_of(t);
    const uint8_t * b = (const uint8_t *) src;
    for (int64_t i = 0; i < n; i += ti.block) {
        dequant_block(t, b, y + i);
        b += ti.bytes;
    }
}

MK_HD float load_scalar(int32_t t, const void * base, uint64_t byte_off) {
    const uint8_t * p = (const uint8_t *) base + byte_off;
    switch (t) {
        case T_F16:  return half_to_float(rd16(p));
        case T_BF16: return bf16_to_float(rd16(p));
        default: {
            float f;
            memcpy(&f, p, 4);
            return f;
        }
    }
}

MK_HD void store_scalar(int32_t t, void * base, uint64_t byte_off, float v) {
    uint8_t * p = (uint8_t *) base + byte_off;
    switch (t) {
        case T_F16: {
            const uint16_t h = float_to_half(v);
            memcpy(p, &h, 2);
            return;
        }
        case T_BF16: {
            const uint16_t h = float_to_bf16(v);
            memcpy(p, &h, 2);
            return;
        }
        default:
            memcpy(p, &v, 4);
    }
}

// The activation format a weight type's dot product uses in ggml (ggml-cpu's vec_dot_type): the matvec input is
// rounded to it first. Both stock backends do this (ggml-cuda quantizes to q8_1 blocks of 32), so a reference
// that skips it disagrees with them by more than it disagrees with itself.
MK_HD int32_t act_type_of(int32_t w) {
    switch (w) {
        case T_F16:  return T_F16;
        case T_BF16: return T_BF16;
        case T_Q4_0: case T_Q5_0: case T_Q8_0: return T_Q8_0;
        case T_Q4_1: case T_Q5_1: return T_Q8_1;
        case T_Q4_K: case T_Q5_K: case T_Q6_K: return T_Q8_K;
        default:     return T_F32;
    }
}

// y = x as the dot product sees it after rounding to activation format `act` (values, not blocks). Q8_0/Q8_1:
// blocks of 32, d = amax/127 kept as F16, q = round-to-even(x * 127/amax). Q8_K: blocks of 256,
// d = -max/127 (F32, max the value of largest magnitude), q = min(127, round-to-even(x * -127/max)).
// For Q8_1, ggml also keeps each block's sum as F16(d * sum(q)) and multiplies the weights' block minimum
// (Q4_1/Q5_1) by it; if `corr` is given it receives, per block of 32, that sum minus the sum of the values in y.
MK_HD void round_activations(int32_t act, const float * x, float * y, int n, float * corr = nullptr) {
    switch (act) {
        case T_F16:
            for (int i = 0; i < n; i++) y[i] = half_to_float(float_to_half(x[i]));
            return;
        case T_BF16:
            for (int i = 0; i < n; i++) y[i] = bf16_to_float(float_to_bf16(x[i]));
            return;
        case T_Q8_0:
        case T_Q8_1:
            for (int b = 0; b + 32 <= n; b += 32) {
                float amax = 0.0f;
                for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b + j]));
                const float d  = half_to_float(float_to_half(amax / 127.f));
                const float id = amax != 0.0f ? 127.f / amax : 0.0f;
                float sum_q = 0.0f, sum_y = 0.0f;
                for (int j = 0; j < 32; j++) {
                    const float q = nearbyintf(x[b + j] * id);
                    y[b + j] = q * d;
                    sum_q += q;
                    sum_y += y[b + j];
                }
                if (corr && act == T_Q8_1) {
                    corr[b / 32] = half_to_float(float_to_half(amax / 127.f * sum_q)) - sum_y;
                }
            }
            return;
        case T_Q8_K:
            for (int b = 0; b + 256 <= n; b += 256) {
                float amax = 0.0f, mx = 0.0f;
                for (int j = 0; j < 256; j++) {
                    if (fabsf(x[b + j]) > amax) { amax = fabsf(x[b + j]); mx = x[b + j]; }
                }
                if (amax == 0.0f) {
                    for (int j = 0; j < 256; j++) y[b + j] = 0.0f;
                    continue;
                }
                const float iscale = -127.f / mx;
                const float d = 1 / iscale;
                for (int j = 0; j < 256; j++) y[b + j] = fminf(127.f, nearbyintf(iscale * x[b + j])) * d;
            }
            return;
        default:
            for (int i = 0; i < n; i++) y[i] = x[i];
    }
}

}  // namespace mk
