// Microbenchmark of what one attention tile's staging costs on an otherwise idle GPU, to compare with the same
// phase inside the megakernel (docs/gpu-executor-notes.md, runs 30-35):
//   chase: one thread, dependent ld.global.cg loads: the L2 round trip in cycles
//   stage: 512 threads, 16 two-byte ld.global.cg loads each, issued together, stored to shared memory, then a
//          barrier: the megakernel's stage_chunk for 64 cells of K and V at head size 64, in cycles per pass
// Build and run on the GPU machine: nvcc -arch=sm_90 -O3 -o /tmp/latency-probe scripts/latency-probe.cu && /tmp/latency-probe
// The out buffer is plain device memory (a managed one page-faulted on the first pass's write).
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>

__global__ void init(uint32_t * p, size_t n) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x) {
        p[i] = (uint32_t) ((i * 4 + 4096) % (n * 4));  // each word holds the byte offset of the next hop
    }
}

__global__ void chase(const uint32_t * p, int n, long long * out) {
    if (threadIdx.x) {
        return;
    }
    uint32_t o = blockIdx.x * 64 * 1024;
    const long long t0 = clock64();
    for (int i = 0; i < n; i++) {
        o = __ldcg(p + o / 4);
    }
    const long long t1 = clock64();
    out[blockIdx.x] = (t1 - t0) / n + (o == 12345 ? 1 : 0);  // o used so the chain is not removed
}

__global__ void stage(const unsigned short * p, long long * out, int passes) {
    __shared__ float s[8192];
    const unsigned short * b = p + (size_t) blockIdx.x * 65536;
    for (int r = 0; r < passes; r++) {
        __syncthreads();
        const long long t0 = clock64();
        float v[16];
#pragma unroll
        for (int k = 0; k < 16; k++) {
            v[k] = __half2float(__ushort_as_half(__ldcg(b + (threadIdx.x % 64) + (threadIdx.x / 64 + k * 8) * 64)));
        }
#pragma unroll
        for (int k = 0; k < 16; k++) {
            s[threadIdx.x + 512 * k] = v[k];
        }
        __syncthreads();
        const long long t1 = clock64();
        if (threadIdx.x == 0) {
            out[blockIdx.x * passes + r] = t1 - t0 + (s[r * 77] == 1234.5f ? 1 : 0);
        }
    }
}

int main() {
    const size_t n = 64 << 20;
    const int passes = 6;
    uint32_t * p;
    long long * o;
    cudaMalloc(&p, n * 4);
    cudaMalloc(&o, 132 * passes * sizeof(long long));
    init<<<1024, 256>>>(p, n);
    long long h[passes];
    for (int g : {1, 132}) {
        chase<<<g, 32>>>(p, 64, o);  // the first run warms L2 and the TLB
        chase<<<g, 32>>>(p, 64, o);
        cudaMemcpy(h, o, sizeof(long long), cudaMemcpyDeviceToHost);
        printf("grid %3d: %lld cycles per dependent ld.global.cg (block 0)\n", g, h[0]);
        stage<<<g, 512>>>((const unsigned short *) p, o, passes);
        cudaMemcpy(h, o, sizeof(h), cudaMemcpyDeviceToHost);
        printf("grid %3d: staging pass cycles (block 0):", g);
        for (long long c : h) {
            printf(" %lld", c);
        }
        printf("\n");
    }
    const cudaError_t e = cudaGetLastError();
    printf("%s\n", cudaGetErrorString(e));
    return e == cudaSuccess ? 0 : 1;
}
