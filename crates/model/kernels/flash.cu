// Causal flash attention kernels of patchlm-model (see src/ops.rs, `flash_attention`, for the
// math and the CPU twin they are tested against). Compiled to PTX by build.rs with the `cuda`
// feature; a module of its own so that processes that never use it do not JIT-compile it.

#include "common.cuh"

// FlashAttention-2's scheme on CUDA cores, f32 arithmetic.
// q (BH, t, HD), k and v (BH, s, HD), s >= t: query row i sees keys 0..=s-t+i. One thread per
// query row (forward, dq) or key row (dk, dv), 64 rows per block (blockIdx.y = head); the other
// side is streamed through shared memory in tiles of 4096 / HD rows, converted to f32. No (t, s)
// matrix exists anywhere: the forward keeps a running max and sum per row (online softmax), the
// backward recomputes p = exp(scale q.k - lse) from the saved log-sum-exp.

#define FLASH_ROWS 64

template <int HD>
__device__ __forceinline__ float dot_smem(const float* r, const float* row) {
    const float4* s4 = reinterpret_cast<const float4*>(row);
    float acc = 0.0f;
#pragma unroll
    for (int d = 0; d < HD / 4; d++) {
        float4 x = s4[d];
        acc += r[4 * d] * x.x + r[4 * d + 1] * x.y + r[4 * d + 2] * x.z + r[4 * d + 3] * x.w;
    }
    return acc;
}

template <int HD>
__device__ __forceinline__ void axpy_smem(float* acc, float a, const float* row) {
    const float4* s4 = reinterpret_cast<const float4*>(row);
#pragma unroll
    for (int d = 0; d < HD / 4; d++) {
        float4 x = s4[d];
        acc[4 * d] += a * x.x;
        acc[4 * d + 1] += a * x.y;
        acc[4 * d + 2] += a * x.z;
        acc[4 * d + 3] += a * x.w;
    }
}

// Copies rows [r0, r0 + n) of a (rows, HD) matrix into shared memory as f32.
template <typename T, int HD>
__device__ __forceinline__ void load_tile(float* dst, const T* src, int r0, int n) {
    const T* s = src + (size_t)r0 * HD;
    for (int e = threadIdx.x; e < n * HD; e += blockDim.x) dst[e] = to_f(s[e]);
}

// Forward (WRITE_O) or log-sum-exp only.
template <typename T, int HD, bool WRITE_O>
__device__ void flash_fwd(const T* q, const T* k, const T* v, T* o, float* lse, int t, int s, float scale) {
    constexpr int BC = 4096 / HD;
    __shared__ __align__(16) float ks[BC * HD];
    __shared__ __align__(16) float vs[WRITE_O ? BC * HD : 4];
    const int bh = blockIdx.y, i = blockIdx.x * FLASH_ROWS + threadIdx.x, off = s - t;
    const bool active = i < t;
    const T* kb = k + (size_t)bh * s * HD;
    const T* vb = v + (size_t)bh * s * HD;
    float qr[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) {
        qr[d] = active ? to_f(q[((size_t)bh * t + i) * HD + d]) * scale : 0.0f;
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int kend = off + min(t, (blockIdx.x + 1) * FLASH_ROWS);  // keys this block needs
    const int lim = off + i;                                        // last key row i sees
    for (int k0 = 0; k0 < kend; k0 += BC) {
        const int nk = min(BC, kend - k0);
        __syncthreads();
        load_tile<T, HD>(ks, kb, k0, nk);
        if (WRITE_O) load_tile<T, HD>(vs, vb, k0, nk);
        __syncthreads();
        if (!active) continue;
        const int nvis = min(nk, lim - k0 + 1);
        for (int c = 0; c < nvis; c += 32) {
            const int cn = min(32, nvis - c);
            float sc[32];
            float cmax = -INFINITY;
#pragma unroll
            for (int jj = 0; jj < 32; jj++) {
                sc[jj] = jj < cn ? dot_smem<HD>(qr, ks + (c + jj) * HD) : -INFINITY;
                cmax = fmaxf(cmax, sc[jj]);
            }
            const float mnew = fmaxf(m, cmax);
            const float alpha = __expf(m - mnew);
            l *= alpha;
            if (WRITE_O) {
#pragma unroll
                for (int d = 0; d < HD; d++) acc[d] *= alpha;
            }
#pragma unroll
            for (int jj = 0; jj < 32; jj++) {
                if (jj < cn) {
                    const float p = __expf(sc[jj] - mnew);
                    l += p;
                    if (WRITE_O) axpy_smem<HD>(acc, p, vs + (c + jj) * HD);
                }
            }
            m = mnew;
        }
    }
    if (!active) return;
    lse[(size_t)bh * t + i] = m + logf(l);
    if (WRITE_O) {
        const float inv = 1.0f / l;
#pragma unroll
        for (int d = 0; d < HD; d++) o[((size_t)bh * t + i) * HD + d] = from_f<T>(acc[d] * inv);
    }
}

// dq for one query row per thread: dq = scale * sum_j p_ij (dO_i.v_j - delta_i) k_j.
// qdo = (q, dO) stacked as (2, nbh, t, HD); kv = (k, v) as (2, nbh, s, HD); st = (lse, delta) per row.
template <typename T, int HD>
__device__ void flash_dq(const T* qdo, const T* kv, const float* st, T* dq, int nbh, int t, int s, float scale) {
    constexpr int BC = 4096 / HD;
    __shared__ __align__(16) float ks[BC * HD];
    __shared__ __align__(16) float vs[BC * HD];
    const int bh = blockIdx.y, i = blockIdx.x * FLASH_ROWS + threadIdx.x, off = s - t;
    const bool active = i < t;
    const size_t row = (size_t)bh * t + i;
    const T* kb = kv + (size_t)bh * s * HD;
    const T* vb = kv + ((size_t)nbh + bh) * s * HD;
    float qr[HD], dor[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) {
        qr[d] = active ? to_f(qdo[row * HD + d]) : 0.0f;
        dor[d] = active ? to_f(qdo[((size_t)nbh * t) * HD + row * HD + d]) : 0.0f;
        acc[d] = 0.0f;
    }
    const float lse = active ? st[row * 2] : 0.0f, delta = active ? st[row * 2 + 1] : 0.0f;
    const int kend = off + min(t, (blockIdx.x + 1) * FLASH_ROWS);
    const int lim = off + i;
    for (int k0 = 0; k0 < kend; k0 += BC) {
        const int nk = min(BC, kend - k0);
        __syncthreads();
        load_tile<T, HD>(ks, kb, k0, nk);
        load_tile<T, HD>(vs, vb, k0, nk);
        __syncthreads();
        if (!active) continue;
        const int nvis = min(nk, lim - k0 + 1);
        for (int j = 0; j < nvis; j++) {
            const float p = __expf(scale * dot_smem<HD>(qr, ks + j * HD) - lse);
            const float ds = p * (dot_smem<HD>(dor, vs + j * HD) - delta);
            axpy_smem<HD>(acc, ds, ks + j * HD);
        }
    }
    if (!active) return;
#pragma unroll
    for (int d = 0; d < HD; d++) dq[row * HD + d] = from_f<T>(acc[d] * scale);
}

// dk (DK) or dv for one key row per thread, streaming the query rows that see it:
// dv_j = sum_i p_ij dO_i; dk_j = scale * sum_i p_ij (dO_i.v_j - delta_i) q_i.
template <typename T, int HD, bool DK>
__device__ void flash_dkv(const T* qdo, const T* kv, const float* st, T* out, int nbh, int t, int s, float scale) {
    constexpr int BR = 4096 / HD;
    __shared__ __align__(16) float qs[BR * HD];
    __shared__ __align__(16) float dos[BR * HD];
    __shared__ float ls[BR], dl[BR];
    const int bh = blockIdx.y, j = blockIdx.x * FLASH_ROWS + threadIdx.x, off = s - t;
    const bool active = j < s;
    const size_t row = (size_t)bh * s + j;
    const T* qb = qdo + (size_t)bh * t * HD;
    const T* db = qdo + ((size_t)nbh + bh) * t * HD;
    float kr[HD], vr[DK ? HD : 1], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) {
        kr[d] = active ? to_f(kv[row * HD + d]) : 0.0f;
        if (DK) vr[d] = active ? to_f(kv[((size_t)nbh * s) * HD + row * HD + d]) : 0.0f;
        acc[d] = 0.0f;
    }
    // Query i sees key j when i >= j - off; the block's first key decides where to start.
    const int istart = max(0, (int)(blockIdx.x * FLASH_ROWS) - off);
    for (int i0 = istart; i0 < t; i0 += BR) {
        const int ni = min(BR, t - i0);
        __syncthreads();
        load_tile<T, HD>(qs, qb, i0, ni);
        load_tile<T, HD>(dos, db, i0, ni);
        for (int e = threadIdx.x; e < ni; e += blockDim.x) {
            ls[e] = st[((size_t)bh * t + i0 + e) * 2];
            dl[e] = st[((size_t)bh * t + i0 + e) * 2 + 1];
        }
        __syncthreads();
        if (!active) continue;
        for (int ii = max(0, j - off - i0); ii < ni; ii++) {
            const float p = __expf(scale * dot_smem<HD>(kr, qs + ii * HD) - ls[ii]);
            if (DK) {
                const float ds = p * (dot_smem<HD>(vr, dos + ii * HD) - dl[ii]);
                axpy_smem<HD>(acc, ds, qs + ii * HD);
            } else {
                axpy_smem<HD>(acc, p, dos + ii * HD);
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int d = 0; d < HD; d++) out[row * HD + d] = from_f<T>(DK ? acc[d] * scale : acc[d]);
}

#define FLASH_OPS(T, S, HD)                                                                              \
    extern "C" __global__ void flash_fwd_##S##_##HD(const T* q, const T* k, const T* v, T* o, float* lse, \
                                                   int t, int s, float scale) {                         \
        flash_fwd<T, HD, true>(q, k, v, o, lse, t, s, scale);                                            \
    }                                                                                                    \
    extern "C" __global__ void flash_lse_##S##_##HD(const T* q, const T* k, float* lse, int t, int s,     \
                                                   float scale) {                                       \
        flash_fwd<T, HD, false>(q, k, k, nullptr, lse, t, s, scale);                                     \
    }                                                                                                    \
    extern "C" __global__ void flash_dq_##S##_##HD(const T* qdo, const T* kv, const float* st, T* out,    \
                                                  int nbh, int t, int s, float scale) {                 \
        flash_dq<T, HD>(qdo, kv, st, out, nbh, t, s, scale);                                             \
    }                                                                                                    \
    extern "C" __global__ void flash_dk_##S##_##HD(const T* qdo, const T* kv, const float* st, T* out,    \
                                                  int nbh, int t, int s, float scale) {                 \
        flash_dkv<T, HD, true>(qdo, kv, st, out, nbh, t, s, scale);                                      \
    }                                                                                                    \
    extern "C" __global__ void flash_dv_##S##_##HD(const T* qdo, const T* kv, const float* st, T* out,    \
                                                  int nbh, int t, int s, float scale) {                 \
        flash_dkv<T, HD, false>(qdo, kv, st, out, nbh, t, s, scale);                                     \
    }

#define FLASH_ALL_HD(T, S) FLASH_OPS(T, S, 16) FLASH_OPS(T, S, 32) FLASH_OPS(T, S, 64) FLASH_OPS(T, S, 128)
FLASH_ALL_HD(float, f32)
FLASH_ALL_HD(__nv_bfloat16, bf16)
FLASH_ALL_HD(__half, f16)
