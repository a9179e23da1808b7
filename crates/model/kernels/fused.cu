// Fused CUDA kernels of patchlm-model (see src/ops.rs for the math and the CPU twins they are
// tested against). Compiled to PTX by build.rs when the `cuda` feature is on.
//
// Conventions: one thread block per row for row-wise ops; statistics in f32 whatever the storage
// dtype; names end in the dtype (f32, bf16, f16).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Block-wide reductions for blockDim.x a multiple of 32 (at most 1024); every thread gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
__device__ float block_sum(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
__device__ float block_max(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

// max and log-sum-exp of one row, online (one pass over the row).
template <typename T>
__device__ void row_lse(const T* xr, int v, float* m_out, float* lse_out) {
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float x = to_f(xr[j]);
        if (x > m) {
            s = s * __expf(m - x) + 1.0f;
            m = x;
        } else {
            s += __expf(x - m);
        }
    }
    float bm = block_max(m);
    s = (m == -INFINITY) ? 0.0f : s * __expf(m - bm);
    float bs = block_sum(s);
    *m_out = bm;
    *lse_out = bm + logf(bs);
}

// Multi-target cross-entropy forward: out[row] = sum_k (lse - x[row, t[row, k]]).
template <typename T>
__device__ void ce_fwd(const T* x, const uint32_t* t, float* out, int v, int k) {
    const T* xr = x + (size_t)blockIdx.x * v;
    float m, lse;
    row_lse(xr, v, &m, &lse);
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int i = 0; i < k; i++) acc += lse - to_f(xr[t[(size_t)blockIdx.x * k + i]]);
        out[blockIdx.x] = acc;
    }
}

// Backward: dx[row, j] = g[row] * (k * softmax_j - #{i : t[row, i] = j}).
template <typename T>
__device__ void ce_bwd(const T* x, const uint32_t* t, const float* g, T* dx, int v, int k) {
    const T* xr = x + (size_t)blockIdx.x * v;
    T* dr = dx + (size_t)blockIdx.x * v;
    const uint32_t* tr = t + (size_t)blockIdx.x * k;
    float m, lse;
    row_lse(xr, v, &m, &lse);
    float gi = g[blockIdx.x], scale = gi * (float)k;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float d = scale * __expf(to_f(xr[j]) - lse);
        for (int i = 0; i < k; i++) d -= (tr[i] == (uint32_t)j) ? gi : 0.0f;
        dr[j] = from_f<T>(d);
    }
}

// RMSNorm forward: y = round_T(x * r) * w with r = rsqrt(mean(x^2) + eps).
template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, int d, float eps) {
    const T* xr = x + (size_t)blockIdx.x * d;
    T* yr = y + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float a = to_f(xr[j]);
        ss += a * a;
    }
    float r = rsqrtf(block_sum(ss) / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = from_f<T>(to_f(from_f<T>(to_f(xr[j]) * r)) * to_f(w[j]));
}

// RMSNorm input gradient: dx = r * w * dy - x * r^3 / d * sum(x * w * dy). Also writes r per row
// (for the weight gradient).
template <typename T>
__device__ void rms_dx(const T* x, const T* w, const T* dy, T* dx, float* rs, int d, float eps) {
    size_t off = (size_t)blockIdx.x * d;
    float ss = 0.0f, dot = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float a = to_f(x[off + j]);
        ss += a * a;
        dot += a * to_f(w[j]) * to_f(dy[off + j]);
    }
    float r = rsqrtf(block_sum(ss) / d + eps);
    dot = block_sum(dot);
    float c = dot * r * r * r / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        dx[off + j] = from_f<T>(r * to_f(w[j]) * to_f(dy[off + j]) - c * to_f(x[off + j]));
    if (threadIdx.x == 0) rs[blockIdx.x] = r;
}

// RMSNorm weight gradient, partial sums: grid (ceil(d / blockDim.x), chunks); block y sums rows
// [y * rows_per_chunk, ...) of column j into acc[j] (f32, zeroed by the caller) with atomics.
template <typename T>
__device__ void rms_dw(const T* x, const T* dy, const float* rs, float* acc, int n, int d, int rows_per_chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float s = 0.0f;
    for (int i = r0; i < r1; i++) {
        size_t o = (size_t)i * d + j;
        s += to_f(from_f<T>(to_f(x[o]) * rs[i])) * to_f(dy[o]);
    }
    atomicAdd(acc + j, s);
}

template <typename T>
__device__ void cast_from_f32(const float* a, T* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_f<T>(a[i]);
}

#define FUSED_OPS(T, S)                                                                                  \
    extern "C" __global__ void ce_fwd_##S(const T* x, const uint32_t* t, float* out, int v, int k) {     \
        ce_fwd<T>(x, t, out, v, k);                                                                      \
    }                                                                                                    \
    extern "C" __global__ void ce_bwd_##S(const T* x, const uint32_t* t, const float* g, T* dx, int v,    \
                                          int k) {                                                       \
        ce_bwd<T>(x, t, g, dx, v, k);                                                                    \
    }                                                                                                    \
    extern "C" __global__ void rms_fwd_##S(const T* x, const T* w, T* y, int d, float eps) {             \
        rms_fwd<T>(x, w, y, d, eps);                                                                     \
    }                                                                                                    \
    extern "C" __global__ void rms_dx_##S(const T* x, const T* w, const T* dy, T* dx, float* rs, int d,  \
                                          float eps) {                                                   \
        rms_dx<T>(x, w, dy, dx, rs, d, eps);                                                             \
    }                                                                                                    \
    extern "C" __global__ void rms_dw_##S(const T* x, const T* dy, const float* rs, float* acc, int n,    \
                                          int d, int rows_per_chunk) {                                   \
        rms_dw<T>(x, dy, rs, acc, n, d, rows_per_chunk);                                                 \
    }                                                                                                    \
    extern "C" __global__ void cast_from_f32_##S(const float* a, T* out, int n) { cast_from_f32<T>(a, out, n); }

FUSED_OPS(float, f32)
FUSED_OPS(__nv_bfloat16, bf16)
FUSED_OPS(__half, f16)
