// Microbenchmark of the weight ring's mechanism alone: every block streams its share of a large buffer through
// shared-memory slots with bulk copies (cp.async.bulk + mbarrier), the way the megakernel's ring does, and reads each
// slot once. Prints GB/s for several slot counts and wait styles, next to a plain vectorised global read.
// Build: nvcc -std=c++17 -arch=sm_90 -O3 scripts/ring-probe.cu -o ring-probe
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>

__device__ __forceinline__ uint32_t sa(const void * p) { return (uint32_t) __cvta_generic_to_shared(p); }

template <int MODE>  // 0: all threads try_wait; 1: all threads test_wait spin; 2: thread 0 try_wait + __syncthreads
__global__ void __launch_bounds__(512, 1) ring(const uint8_t * src, size_t per_block, int slots, int slot_bytes, float * out) {
    extern __shared__ __align__(128) uint8_t sm[];
    __shared__ __align__(8) uint64_t bars[8];
    const uint8_t * base = src + per_block * blockIdx.x;
    const int n = (int) (per_block / slot_bytes);
    unsigned issued = 0;
    if (threadIdx.x == 0) {
        for (int k = 0; k < slots; k++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sa(bars + k)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (; issued < (unsigned) slots && (int) issued < n; issued++) {
            const uint32_t bar = sa(bars + issued % slots);
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(slot_bytes) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         ::"r"(sa(sm + (size_t) (issued % slots) * slot_bytes)), "l"(base + (size_t) issued * slot_bytes), "r"(slot_bytes), "r"(bar) : "memory");
        }
    }
    __syncthreads();
    float acc = 0.0f;
    for (int c = 0; c < n; c++) {
        const uint32_t bar = sa(bars + c % slots), par = (c / slots) & 1;
        uint32_t ok = 0;
        if (MODE == 0 || (MODE == 2 && threadIdx.x == 0)) {
            while (!ok) asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}" : "=r"(ok) : "r"(bar), "r"(par) : "memory");
        } else if (MODE == 1) {
            while (!ok) asm volatile("{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}" : "=r"(ok) : "r"(bar), "r"(par) : "memory");
        }
        if (MODE == 2) __syncthreads();
        const float4 * s = (const float4 *) (sm + (size_t) (c % slots) * slot_bytes);
        for (int i = threadIdx.x; i < slot_bytes / 16; i += blockDim.x) { float4 v = s[i]; acc += v.x + v.w; }
        __syncthreads();
        if (threadIdx.x == 0 && (int) issued < n) {
            const uint32_t b2 = sa(bars + issued % slots);
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b2), "r"(slot_bytes) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         ::"r"(sa(sm + (size_t) (issued % slots) * slot_bytes)), "l"(base + (size_t) issued * slot_bytes), "r"(slot_bytes), "r"(b2) : "memory");
            issued++;
        }
    }
    if (acc == 12345.0f) out[0] = acc;
}

__global__ void __launch_bounds__(512, 1) plain(const uint8_t * src, size_t per_block, float * out) {
    const uint4 * s = (const uint4 *) (src + per_block * blockIdx.x);
    float acc = 0.0f;
    for (size_t i = threadIdx.x; i < per_block / 16; i += blockDim.x) { uint4 v = __ldcs(s + i); acc += __uint_as_float(v.x ^ v.w); }
    if (acc == 12345.0f) out[0] = acc;
}

int main() {
    int sms = 0; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const size_t per_block = 4u << 20, total = per_block * sms;
    uint8_t * src; float * out;
    cudaMalloc(&src, total); cudaMemset(src, 1, total); cudaMalloc(&out, 4);
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    auto time = [&](auto launch) {
        launch(); cudaDeviceSynchronize();
        cudaEventRecord(e0); for (int r = 0; r < 10; r++) launch(); cudaEventRecord(e1); cudaEventSynchronize(e1);
        float ms = 0; cudaEventElapsedTime(&ms, e0, e1); return total * 10 / (ms * 1e-3) / 1e9;
    };
    printf("plain ldcs: %.0f GB/s\n", time([&] { plain<<<sms, 512>>>(src, per_block, out); }));
    for (int sb : {16384, 32768}) for (int slots : {2, 4, 6}) {
        const int smem = slots * sb;
        cudaFuncSetAttribute(ring<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        cudaFuncSetAttribute(ring<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        cudaFuncSetAttribute(ring<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        printf("slot %5d x %d: try_wait all %.0f  test_wait all %.0f  t0 try_wait+sync %.0f GB/s (%s)\n", sb, slots,
               time([&] { ring<0><<<sms, 512, smem>>>(src, per_block, slots, sb, out); }),
               time([&] { ring<1><<<sms, 512, smem>>>(src, per_block, slots, sb, out); }),
               time([&] { ring<2><<<sms, 512, smem>>>(src, per_block, slots, sb, out); }),
               cudaGetErrorString(cudaGetLastError()));
    }
    return 0;
}
