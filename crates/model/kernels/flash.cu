// Causal flash attention kernels of patchlm-model (see src/ops/flash.rs, `flash_attention`, for the
// math and the CPU twin they are tested against). Compiled to PTX by build.rs with the `cuda`
// feature; a module of its own so that processes that never use it do not JIT-compile it.

// (kernels/hopper.cu includes this file for its device functions, FLASH_DEVICE_ONLY.)
#ifndef PATCHLM_FLASH_CU
#define PATCHLM_FLASH_CU
#include "common.cuh"

// The kernels' entry points, or nothing where another module includes this file for its device
// functions alone (FLASH_DEVICE_ONLY).
#ifdef FLASH_DEVICE_ONLY
#define FLASH_ENTRIES(...)
#else
#define FLASH_ENTRIES(...) __VA_ARGS__
#endif

// FlashAttention-2's scheme on CUDA cores, f32 arithmetic.
// q (BH, t, HD), k and v (BH, s, HD), s >= t: query row i sees keys 0..=s-t+i. One thread per
// query row (forward, dq) or key row (dk, dv), 64 rows per block (blockIdx.y = head); the other
// side is streamed through shared memory in tiles of 4096 / HD rows, converted to f32. No (t, s)
// matrix exists anywhere: the forward keeps a running max and sum per row (online softmax), the
// backward recomputes p = exp(scale q.k - lse) from the saved log-sum-exp.

#define FLASH_ROWS 64

// Where a head's rows of o and dO (the attention's output and its gradient) are: oh == 0, the
// (BH, t, HD) layout of q; oh = H heads, the (B·t, H·HD) matrix the output projection reads,
// head bh = b·H + h at (b·t·H + h)·HD, its rows H·HD apart (no copy between the two layouts).
struct OutRows {
    size_t base;  // element offset of the head's first row
    int ld;       // elements from one row to the next
};
__device__ __forceinline__ OutRows out_rows(int bh, int t, int hd, int oh) {
    if (oh == 0) return {(size_t)bh * t * hd, hd};
    const int b = bh / oh, h = bh - b * oh;
    return {((size_t)b * t * oh + h) * hd, oh * hd};
}

template <int HD>
__device__ __forceinline__ float dot_smem(const float* r, const float* row) {
    EMU_ALIGNED(row, 16);
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
    EMU_ALIGNED(row, 16);
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

// Copies rows [r0, r0 + n) of a (rows, HD) matrix (rows `ld` elements apart) into shared memory
// as f32.
template <typename T, int HD>
__device__ __forceinline__ void load_tile(float* dst, const T* src, int r0, int n, int ld = HD) {
    const T* s = src + (size_t)r0 * ld;
    for (int e = threadIdx.x; e < n * HD; e += blockDim.x) dst[e] = to_f(s[(size_t)(e / HD) * ld + e % HD]);
}

// Forward (WRITE_O) or log-sum-exp only.
template <typename T, int HD, bool WRITE_O>
__device__ void flash_fwd(const T* q, const T* k, const T* v, T* o, float* lse, int t, int s, float scale, int oh) {
    constexpr int BC = 4096 / HD;
    __shared__ __align__(16) float ks[BC * HD];
    __shared__ __align__(16) float vs[WRITE_O ? BC * HD : 4];
    EMU_SHARED(ks, vs);
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
        const OutRows ro = out_rows(bh, t, HD, oh);
        T* orow = o + ro.base + (size_t)i * ro.ld;
#pragma unroll
        for (int d = 0; d < HD; d++) orow[d] = from_f<T>(acc[d] * inv);
    }
}

// dq for one query row per thread: dq = scale * sum_j p_ij (dO_i.v_j - delta_i) k_j.
// q and dO (BH, t, HD); k and v (BH, s, HD); st = (lse, delta) per query row.
template <typename T, int HD>
__device__ void flash_dq(const T* q, const T* dout, const T* k, const T* v, const float* st, T* dq, int t, int s,
                         float scale, int oh) {
    constexpr int BC = 4096 / HD;
    __shared__ __align__(16) float ks[BC * HD];
    __shared__ __align__(16) float vs[BC * HD];
    EMU_SHARED(ks, vs);
    const int bh = blockIdx.y, i = blockIdx.x * FLASH_ROWS + threadIdx.x, off = s - t;
    const bool active = i < t;
    const size_t row = (size_t)bh * t + i;
    const T* kb = k + (size_t)bh * s * HD;
    const T* vb = v + (size_t)bh * s * HD;
    const OutRows rd = out_rows(bh, t, HD, oh);
    const T* drow = dout + rd.base + (size_t)i * rd.ld;
    float qr[HD], dor[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) {
        qr[d] = active ? to_f(q[row * HD + d]) : 0.0f;
        dor[d] = active ? to_f(drow[d]) : 0.0f;
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
__device__ void flash_dkv(const T* q, const T* dout, const T* k, const T* v, const float* st, T* out, int t, int s,
                          float scale, int oh) {
    constexpr int BR = 4096 / HD;
    __shared__ __align__(16) float qs[BR * HD];
    __shared__ __align__(16) float dos[BR * HD];
    __shared__ float ls[BR], dl[BR];
    EMU_SHARED(qs, dos, ls, dl);
    const int bh = blockIdx.y, j = blockIdx.x * FLASH_ROWS + threadIdx.x, off = s - t;
    const bool active = j < s;
    const size_t row = (size_t)bh * s + j;
    const T* qb = q + (size_t)bh * t * HD;
    const OutRows rd = out_rows(bh, t, HD, oh);
    const T* db = dout + rd.base;
    float kr[HD], vr[DK ? HD : 1], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) {
        kr[d] = active ? to_f(k[row * HD + d]) : 0.0f;
        if (DK) vr[d] = active ? to_f(v[row * HD + d]) : 0.0f;
        acc[d] = 0.0f;
    }
    // Query i sees key j when i >= j - off; the block's first key decides where to start.
    const int istart = max(0, (int)(blockIdx.x * FLASH_ROWS) - off);
    for (int i0 = istart; i0 < t; i0 += BR) {
        const int ni = min(BR, t - i0);
        __syncthreads();
        load_tile<T, HD>(qs, qb, i0, ni);
        load_tile<T, HD>(dos, db, i0, ni, rd.ld);
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
                                                   int t, int s, float scale, int oh) {                 \
        flash_fwd<T, HD, true>(q, k, v, o, lse, t, s, scale, oh);                                        \
    }                                                                                                    \
    extern "C" __global__ void flash_lse_##S##_##HD(const T* q, const T* k, float* lse, int t, int s,     \
                                                   float scale) {                                       \
        flash_fwd<T, HD, false>(q, k, k, nullptr, lse, t, s, scale, 0);                                  \
    }                                                                                                    \
    extern "C" __global__ void flash_dq_##S##_##HD(const T* q, const T* dout, const T* k, const T* v,      \
                                                  const float* st, T* out, int t, int s, float scale,   \
                                                  int oh) {                                             \
        flash_dq<T, HD>(q, dout, k, v, st, out, t, s, scale, oh);                                        \
    }                                                                                                    \
    extern "C" __global__ void flash_dk_##S##_##HD(const T* q, const T* dout, const T* k, const T* v,      \
                                                  const float* st, T* out, int t, int s, float scale,   \
                                                  int oh) {                                             \
        flash_dkv<T, HD, true>(q, dout, k, v, st, out, t, s, scale, oh);                                 \
    }                                                                                                    \
    extern "C" __global__ void flash_dv_##S##_##HD(const T* q, const T* dout, const T* k, const T* v,      \
                                                  const float* st, T* out, int t, int s, float scale,   \
                                                  int oh) {                                             \
        flash_dkv<T, HD, false>(q, dout, k, v, st, out, t, s, scale, oh);                                \
    }

#define FLASH_ALL_HD(T, S) FLASH_OPS(T, S, 16) FLASH_OPS(T, S, 32) FLASH_OPS(T, S, 64) FLASH_OPS(T, S, 128)
FLASH_ENTRIES(FLASH_ALL_HD(float, f32))
FLASH_ENTRIES(FLASH_ALL_HD(__nv_bfloat16, bf16))
FLASH_ENTRIES(FLASH_ALL_HD(__half, f16))

// ---------------------------------------------------------------------------------------------
// Shared-memory staging for the tensor-core kernels (mma.sync below, wgmma in kernels/hopper.cu):
// tiles of bf16 / f16 rows, padded (+8 elements a row) to spread the banks, filled synchronously
// or by cp.async, and the pipelines that overlap the next tile's copy with this tile's products.

// Copies rows [r0, r0 + n) of a (rows, HD) matrix (rows `ld` elements apart) into shared memory
// (row stride LD elements) and zeroes rows n..R-1, 16 bytes per load where the source and its
// rows are aligned.
template <typename T, int HD, int LD, int R>
__device__ __forceinline__ void tc_tile_in(T* dst, const T* src, int r0, int n, int ld = HD) {
    constexpr int P = 16 / sizeof(T), PR = HD / P;
    const T* s = src + (size_t)r0 * ld;
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0 && ld % P == 0) {
        for (int e = threadIdx.x; e < R * PR; e += blockDim.x) {
            const int r = e / PR, c = (e % PR) * P;
            uint4 u = make_uint4(0u, 0u, 0u, 0u);
            EMU_ALIGNED(s + (size_t)r * ld + c, 16);
            EMU_ALIGNED(dst + r * LD + c, 16);
            if (r < n) u = *reinterpret_cast<const uint4*>(s + (size_t)r * ld + c);
            *reinterpret_cast<uint4*>(dst + r * LD + c) = u;
        }
    } else {
        for (int e = threadIdx.x; e < R * HD; e += blockDim.x) {
            const int r = e / HD, c = e % HD;
            dst[r * LD + c] = r < n ? s[(size_t)r * ld + c] : from_f<T>(0.0f);
        }
    }
}

// cp.async: N = 16 bytes (cp.async.cg) or 8 (cp.async.ca; N-byte aligned) from global to shared
// memory without a trip through registers (src_size 0: zeros). A copy lands once its thread's
// cp_async_wait<n> retires its commit group; the barrier after that makes it visible to the
// block. The emulator holds the destination poisoned until then (kernels/emu/cuda_emu.h).
template <int N>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
    static_assert(N == 16 || N == 8, "cp.async copies 16 or 8 bytes here");
#ifdef PATCHLM_EMU
    EMU_ALIGNED(dst, N);
    EMU_ALIGNED(src, N);
    emu::cp_async_n(dst, src, valid, N);
#else
    const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    if (N == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0)
                     : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 8 : 0)
                     : "memory");
    }
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef PATCHLM_EMU
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of the thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef PATCHLM_EMU
    emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// tc_tile_in by cp.async where src is 16-byte aligned (else synchronously, as tc_tile_in): the
// tile is in place after the caller's commit, wait and barrier.
template <typename T, int HD, int LD, int R>
__device__ __forceinline__ void tile_async(T* dst, const T* src, int r0, int n, int ld = HD) {
    constexpr int P = 16 / sizeof(T), PR = HD / P;
    if ((reinterpret_cast<uintptr_t>(src) & 15) != 0 || ld % P != 0) {
        tc_tile_in<T, HD, LD, R>(dst, src, r0, n, ld);
        return;
    }
    const T* s = src + (size_t)r0 * ld;
    for (int e = threadIdx.x; e < R * PR; e += blockDim.x) {
        const int r = e / PR, c = (e % PR) * P;
        cp_async<16>(dst + r * LD + c, s + (size_t)min(r, n - 1) * ld + c, r < n);
    }
}

// Rows [r0, r0 + R) of k and v (s rows each; the rest zero) into a buffer of two R-row tiles,
// as one cp.async group.
template <typename T, int HD, int LD, int R>
__device__ __forceinline__ void kv_async(T* buf, const T* k, const T* v, int r0, int s) {
    tile_async<T, HD, LD, R>(buf, k, r0, min(R, s - r0));
    tile_async<T, HD, LD, R>(buf + R * LD, v, r0, min(R, s - r0));
    cp_async_commit();
}

// One step of a two-buffer cp.async pipeline: once every warp is done with the other buffer
// (read in the last step), `fetch_next` starts the next step's tiles into it where `more`; then
// this step's tiles (one group older) land and are visible to the block on return; with
// ASYNC_PROXY also to Hopper's asynchronous proxy, which wgmma reads its operands through (each
// thread fences its own copies before the barrier; kernels/hopper.cu).
template <bool ASYNC_PROXY = false, typename F>
__device__ __forceinline__ void pipeline_step(bool more, F&& fetch_next) {
    __syncthreads();
    if (more) {
        fetch_next();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
#if !defined(PATCHLM_EMU) && __CUDA_ARCH__ >= 900
    if constexpr (ASYNC_PROXY) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
    __syncthreads();
}

// One step of a three-buffer cp.async pipeline (one commit group per step, the first two
// committed before the loop): this step's group (two older than the newest) lands and, after the
// barrier, is visible to the block; the barrier also means every warp is done with the previous
// step's buffer, into which `fetch_ahead` then starts the tiles of two steps ahead where `more`.
// A group is committed either way (an empty one at the end) so that the count stays regular.
// One barrier a step, and two steps' compute to hide each fetch's latency (pipeline_step: two
// barriers, one step).
template <typename F>
__device__ __forceinline__ void pipeline3_step(bool more, F&& fetch_ahead) {
    cp_async_wait<1>();
    __syncthreads();
    if (more) fetch_ahead();
    cp_async_commit();
}

// The dk/dv kernels' query side of one step, by cp.async: rows [q0, q0 + n) of q and dO (rows dld
// elements apart, see out_rows) into the shared tiles qs and dos (R rows of LD; the rest zero) as
// tile_async, and those rows' (lse, delta) pairs as they are in `st` (the head's statistics,
// natural-log lse) into lsd; past n, zeros (the caller masks those queries). All of it is in
// flight until the caller's commit, wait and barrier (a plain load of the statistics would hold
// its warp, and at the barrier after it the block, for a round trip to memory every step).
template <typename T, int HD, int LD, int R>
__device__ __forceinline__ void dkv_stage_async(T* qs, T* dos, float2* lsd, const T* q, const T* dout,
                                                const float* st, int q0, int n, int dld) {
    tile_async<T, HD, LD, R>(qs, q, q0, n);
    tile_async<T, HD, LD, R>(dos, dout, q0, n, dld);
    for (int e = threadIdx.x; e < R; e += blockDim.x)
        cp_async<8>(lsd + e, st + (size_t)(q0 + min(e, n - 1)) * 2, e < n);
}

// The backward's row statistics: st[row] = (lse[row], sum_d o[row, d] * dout[row, d]) in f32, one
// warp per row (8 rows a block of 256 threads); rows run over (BH, t), o and dO laid out as
// out_rows says.
template <typename T>
__device__ void flash_stats(const T* o, const T* dout, const float* lse, float* st, int rows, int hd, int t, int oh) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const OutRows r = out_rows((int)(row / t), t, hd, oh);
    const size_t at = r.base + (size_t)(row % t) * r.ld;
    float acc = 0.0f;
    for (int d = lane; d < hd; d += 32) acc += to_f(o[at + d]) * to_f(dout[at + d]);
    for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, m);
    if (lane == 0) {
        st[2 * row] = lse[row];
        st[2 * row + 1] = acc;
    }
}

#define FLASH_STATS(T, S)                                                                                   \
    extern "C" __global__ void flash_stats_##S(const T* o, const T* dout, const float* lse, float* st,     \
                                               int rows, int hd, int t, int oh) {                          \
        flash_stats<T>(o, dout, lse, st, rows, hd, t, oh);                                                  \
    }
FLASH_ENTRIES(FLASH_STATS(float, f32))
FLASH_ENTRIES(FLASH_STATS(__nv_bfloat16, bf16))
FLASH_ENTRIES(FLASH_STATS(__half, f16))

// The dk/dv kernels' blocks per SM at head sizes up to 64: three (168 registers a thread at most),
// as they fit before o and dO could be laid out as rows (out_rows), which the compiler would
// otherwise pay for with a few registers more and one block an SM fewer.
#define DKV_MIN_BLOCKS(HD) ((HD) <= 64 ? 3 : 1)

// The entry points of the mma.sync kernels (FAM mma) for dtype T (suffix S) and head size HD, all
// with the same arguments as the CUDA-core kernels above.
#define FLASH_TC_FAMILY(FAM, T, S, HD)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) flash_##FAM##_fwd_##S##_##HD(                        \
        const T* q, const T* k, const T* v, T* o, float* lse, int t, int s, float scale, int oh) {         \
        flash_##FAM##_fwd<T, HD>(q, k, v, o, lse, t, s, scale, oh);                                        \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) flash_##FAM##_dq_##S##_##HD(                         \
        const T* q, const T* dout, const T* k, const T* v, const float* st, T* out, int t, int s,          \
        float scale, int oh) {                                                                             \
        flash_##FAM##_dq<T, HD>(q, dout, k, v, st, out, t, s, scale, oh);                                  \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128, DKV_MIN_BLOCKS(HD)) flash_##FAM##_dkv_##S##_##HD(                        \
        const T* q, const T* dout, const T* k, const T* v, const float* st, T* dk, T* dv, int t, int s,    \
        float scale, int oh) {                                                                             \
        flash_##FAM##_dkv<T, HD>(q, dout, k, v, st, dk, dv, t, s, scale, oh);                              \
    }
#define FLASH_TC_ALL(FAM)                                                                                  \
    FLASH_TC_FAMILY(FAM, __nv_bfloat16, bf16, 32)                                                          \
    FLASH_TC_FAMILY(FAM, __nv_bfloat16, bf16, 64)                                                          \
    FLASH_TC_FAMILY(FAM, __half, f16, 32)                                                                  \
    FLASH_TC_FAMILY(FAM, __half, f16, 64)

// M(T, S, HD) for both 16-bit dtypes (T, suffix S) at head size HD.
#define FLASH_16BIT(M, HD) M(__nv_bfloat16, bf16, HD) M(__half, f16, HD)

// ---------------------------------------------------------------------------------------------
// Flash attention on mma.sync (m16n8k16, bf16 / f16 in, f32 accumulate; head sizes 32 and 64):
// the same math and inputs as the CUDA-core kernels above, 128 threads (4 warps) a block, each
// warp owning 16 rows (queries in the forward and dq passes, keys in dk/dv), with
// FlashAttention-2's register dataflow. mma's fragment layout is specified (PTX ISA, "Matrix fragments for mma.m16n8k16"), so
// score tiles stay in registers: each lane holds rows g = lane / 4 and g + 8 of its warp's 16 and
// two adjacent columns per 8-column block, the softmax reduces over the 4 lanes of a quad, and the
// probabilities (or dS) are already the A operand of the next product (the C layout of two
// adjacent n-blocks is the A layout of one k-step). Operands come from row-major shared tiles
// through ldmatrix (four fragment registers per instruction), transposing where the reduction runs
// down a tile's columns (p.v); the tiles' padded rows (HD + 8 elements: 80 or 144 bytes) put the
// 8 rows of each 8x8 matrix in distinct banks.

// d (16x8 f32) += a (16x16) . b (16x8); see kernels/emu/mma.h for the CPU twin and the layout.
template <typename T>
struct Mma;
#ifdef PATCHLM_EMU
template <typename T>
struct Mma {
    static void run(float* d, const uint32_t* a, const uint32_t* b) { emu::mma16816<T>(d, a, b); }
};
#else
template <>
struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <>
struct Mma<__half> {
    static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
#endif

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    T l = from_f<T>(lo), h = from_f<T>(hi);
    uint16_t a, b;
    memcpy(&a, &l, 2);
    memcpy(&b, &h, 2);
    return (uint32_t)a | ((uint32_t)b << 16);
}

// ldmatrix.x4: four 8x8 matrices of 16-bit elements from shared memory, lane 8j + r giving the
// address of row r of matrix j (16-byte aligned). Register j receives matrix j's row lane / 4,
// elements 2(lane % 4) and + 1; with TRANS the same of the transposed matrix (rows 2(lane % 4) and
// + 1 of column lane / 4): an mma A or B fragment register in one instruction per four.
template <bool TRANS>
__device__ __forceinline__ void ldm_x4(uint32_t* r, const void* row) {
#ifdef PATCHLM_EMU
    emu::ldmatrix_x4<TRANS>(r, row);
#else
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    }
#endif
}

// ldmatrix.x2: matrices 0 and 1 of ldm_x4 (lanes 0-15 give the addresses): the B fragment of one
// k-step, where a tile's k-steps are odd in number.
__device__ __forceinline__ void ldm_x2(uint32_t* r, const void* row) {
#ifdef PATCHLM_EMU
    emu::ldmatrix_x2<false>(r, row);
#else
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#endif
}

// The A fragments of k-step kk for the 16 rows of a row-major shared tile `m` (row stride ld, a
// multiple of 8 elements): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
template <typename T>
__device__ __forceinline__ void frag_a(uint32_t* a, const T* m, int ld, int kk) {
    const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
    ldm_x4<false>(a, m + ((j & 1) * 8 + r) * ld + kk * 16 + (j >> 1) * 8);
}

// acc[i][n] (R row blocks i of 16 rows, N column blocks of 8) += a[i] (K k-steps, registers) . B,
// B read from the shared tile `b` (row stride ld, a multiple of 8 elements) with ldmatrix: with
// COLS the tile is B itself, B[k][c] = b[k][c] (transposed loads; one covers the k-step of two
// column blocks); without, B's column c is the tile's row c, B[k][c] = b[c][k] (one load covers
// two k-steps of a block). Each B fragment loaded serves all R row blocks: a warp of R row blocks
// reads the shared tile once per 16R rows (R = 1: one ldmatrix.x4 a 2 mma, R = 2: a 4).
// (Without COLS, an odd K takes its last k-step with ldmatrix.x2: head size 80.)
template <typename T, bool COLS, int K, int N, int R>
__device__ __forceinline__ void mma_tile_rows(float (*acc)[N][4], const uint32_t (*a)[K][4], const T* b, int ld) {
    static_assert(!COLS || N % 2 == 0, "ldmatrix.x4 loads two column blocks at once");
    const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
    if (COLS) {
#pragma unroll
        for (int n = 0; n < N; n += 2) {
#pragma unroll
            for (int kk = 0; kk < K; kk++) {
                uint32_t bf[4];  // (k-step kk, block n): bf[0..1]; block n + 1: bf[2..3]
                ldm_x4<true>(bf, b + (kk * 16 + (j & 1) * 8 + r) * ld + (n + (j >> 1)) * 8);
#pragma unroll
                for (int i = 0; i < R; i++) {
                    Mma<T>::run(acc[i][n], a[i][kk], bf);
                    Mma<T>::run(acc[i][n + 1], a[i][kk], bf + 2);
                }
            }
        }
    } else {
#pragma unroll
        for (int n = 0; n < N; n++) {
#pragma unroll
            for (int kk = 0; kk + 1 < K; kk += 2) {
                uint32_t bf[4];  // k-step kk: bf[0..1]; kk + 1: bf[2..3]
                ldm_x4<false>(bf, b + (n * 8 + r) * ld + kk * 16 + j * 8);
#pragma unroll
                for (int i = 0; i < R; i++) {
                    Mma<T>::run(acc[i][n], a[i][kk], bf);
                    Mma<T>::run(acc[i][n], a[i][kk + 1], bf + 2);
                }
            }
            if constexpr (K % 2 == 1) {
                uint32_t bf[2];  // the last k-step (lanes 16-31 repeat lanes 0-15's addresses)
                ldm_x2(bf, b + (n * 8 + r) * ld + (K - 1) * 16 + (j & 1) * 8);
#pragma unroll
                for (int i = 0; i < R; i++) Mma<T>::run(acc[i][n], a[i][K - 1], bf);
            }
        }
    }
}

// mma_tile_rows for one row block: acc[n] += a . B.
template <typename T, bool COLS, int K, int N>
__device__ __forceinline__ void mma_tile(float (*acc)[4], const uint32_t (*a)[4], const T* b, int ld) {
    mma_tile_rows<T, COLS, K, N, 1>(reinterpret_cast<float(*)[N][4]>(acc),
                                    reinterpret_cast<const uint32_t(*)[K][4]>(a), b, ld);
}

// The score-shaped accumulators s (16 x 8N) as A fragments (N / 2 k-steps), rounded to T.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (*a)[4], const float (*s)[4]) {
#pragma unroll
    for (int kk = 0; kk < N / 2; kk++) {
        a[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        a[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        a[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

// Max or sum over the 4 lanes of a quad (the lanes sharing a row).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Writes a lane's share of a warp's 16 x HD accumulators times `mul`: rows `row` and `row + 8` of
// `out` (rows `ld` elements apart) where below `rows`.
template <typename T, int HD>
__device__ __forceinline__ void mma_rows_out(const float (*acc)[4], T* out, int row, int rows, int tq, float mul,
                                             int ld = HD) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = row + 8 * half;
        if (r >= rows) continue;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            T* p = out + (size_t)r * ld + n * 8 + 2 * tq;
            p[0] = from_f<T>(acc[n][2 * half] * mul);
            p[1] = from_f<T>(acc[n][2 * half + 1] * mul);
        }
    }
}

#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// A warp's 16 x 8N score tile (mma C layout), unscaled, with MASK -inf where the key (column
// k0 + c) is past the last key this lane's rows see (`last` for the first, last + 8 for the
// second); mx gets each row's maximum over this lane's columns. The scale goes in later, once per
// row for the maximum and folded into each score's exponent (exp2(s · sl2 − m): one fma and one
// ex2 a score, FlashAttention-2's form); rounding is monotonic, so the maximum of the unscaled
// scores times sl2 (> 0) is the maximum of the scaled ones.
template <bool MASK, int N>
__device__ __forceinline__ void scores_mask(float (*sc)[4], float* mx, int k0, int last, int tq) {
#pragma unroll
    for (int n = 0; n < N; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (MASK && k0 + n * 8 + 2 * tq + (e & 1) > last + 8 * (e >> 1)) sc[n][e] = -INFINITY;
            mx[e >> 1] = fmaxf(mx[e >> 1], sc[n][e]);
        }
    }
}

// One key tile of the forward's online softmax for a lane's two rows of a warp's 16: the scores
// sc (C layout, N column blocks; unscaled, sl2 = scale · log2 e > 0 taking them to base 2),
// masked past each row's last key where `mask` (the tile crosses the diagonal; `last` is the first
// row's last key); the running maxima m (base 2) and
// this lane's share of the sums l updated; the output accumulators acc (HD / 8 blocks) rescaled;
// the probabilities, rounded to T, as A fragments in pa (N / 2 k-steps).
template <typename T, int N, int HD>
__device__ __forceinline__ void softmax_tile(float (*sc)[4], float* m, float* l, float (*acc)[4], uint32_t (*pa)[4],
                                             bool mask, float sl2, int k0, int last, int tq) {
    float mx[2] = {-INFINITY, -INFINITY};
    if (mask) {
        scores_mask<true, N>(sc, mx, k0, last, tq);
    } else {
        scores_mask<false, N>(sc, mx, k0, last, tq);
    }
    float alpha[2], sum[2] = {0.0f, 0.0f}, msub[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const float mnew = fmaxf(m[h], quad_max(mx[h]) * sl2);
        alpha[h] = mnew == -INFINITY ? 1.0f : exp2f(m[h] - mnew);
        m[h] = mnew;
        // A row that has seen no key yet has only -inf scores: exp2(-inf - 0) = 0 without a
        // test per score.
        msub[h] = mnew == -INFINITY ? 0.0f : mnew;
    }
#pragma unroll
    for (int n = 0; n < N; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int h = e >> 1;
            sc[n][e] = exp2f(fmaf(sc[n][e], sl2, -msub[h]));
            sum[h] += sc[n][e];
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) l[h] = l[h] * alpha[h] + sum[h];
    // A row whose maximum did not move has alpha 1 and keeps its accumulators as they are: where
    // no row of the warp's moved (most tiles once the maxima settle), the warp skips the rescale,
    // HD / 2 multiplies a lane, for a vote. The same bits either way.
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            acc[n][0] *= alpha[0];
            acc[n][1] *= alpha[0];
            acc[n][2] *= alpha[1];
            acc[n][3] *= alpha[1];
        }
    }
    acc_to_a<T, N>(pa, sc);
}

// The forward's end for a lane's two rows `row`, `row + 8` of a warp's 16 (head bh): the sums
// over the quad, each row's log-sum-exp (natural log; m is base 2) into lse, the output divided
// by its sum into o (laid out as out_rows says).
template <typename T, int HD>
__device__ __forceinline__ void fwd_rows_out(float (*acc)[4], const float* m, float* l, T* o, float* lse, int bh,
                                             int row, int t, int tq, int oh) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] = quad_sum(l[h]);
        const int rr = row + 8 * h;
        if (rr < t && tq == 0) lse[(size_t)bh * t + rr] = m[h] * LN2_F + logf(l[h]);
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            acc[n][2 * h] /= l[h];
            acc[n][2 * h + 1] /= l[h];
        }
    }
    const OutRows ro = out_rows(bh, t, HD, oh);
    mma_rows_out<T, HD>(acc, o + ro.base, row, t, tq, 1.0f, ro.ld);
}

// A lane's two rows `row`, `row + 8` of head bh's statistics st (lse, delta): lse in base 2 (the
// scores' domain), delta as it is; past t, +inf and 0 (probabilities 0).
__device__ __forceinline__ void dq_row_stats(const float* st, int bh, int row, int t, float* lse, float* delta) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int rr = row + 8 * h;
        lse[h] = rr < t ? st[((size_t)bh * t + rr) * 2] * LOG2E_F : INFINITY;
        delta[h] = rr < t ? st[((size_t)bh * t + rr) * 2 + 1] : 0.0f;
    }
}

// dS = P ⊙ (dP − delta) for a lane's share of a warp's 16 x 8N tile (C layout): P recomputed from
// the scores sc (times sl2, base 2) and the rows' lse, zero past each row's last key unless `full`
// (`last` the first row's last key: keys k0 + column); the result, rounded to T, as A fragments
// in dsa (N / 2 k-steps).
template <typename T, int N>
__device__ __forceinline__ void ds_tile(uint32_t (*dsa)[4], float (*sc)[4], const float (*dp)[4], const float* lse,
                                        const float* delta, bool full, float sl2, int k0, int last, int tq) {
#pragma unroll
    for (int n = 0; n < N; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = k0 + n * 8 + 2 * tq + (e & 1), h = e >> 1;
            const float p = full || key <= last + 8 * h ? exp2f(fmaf(sc[n][e], sl2, -lse[h])) : 0.0f;
            sc[n][e] = p * (dp[n][e] - delta[h]);
        }
    }
    acc_to_a<T, N>(dsa, sc);
}

#define MMA_WARPS 4
#define MMA_ROWS (16 * MMA_WARPS)
// The head sizes of the mma kernels, and their key tiles: 64 keys, 32 above head size 64 (two
// buffers of a (k, v) tile pair within 48 KB of static shared memory).
#define MMA_HEAD(HD) ((HD) == 32 || (HD) == 64 || (HD) == 80 || (HD) == 96 || (HD) == 128)
#define MMA_KEYS(HD) ((HD) <= 64 ? 64 : 32)

// Forward: o and the log-sum-exp per query row. Each warp owns RW blocks of 16 rows, a block
// 64·RW rows; grid (ceil(t / (64·RW)), BH), the last rows first. RW = 1 (flash_mma_fwd): the
// default. RW = 2 (flash_mma_fwdw, PATCHLM_FLASH_WIDE; FlashAttention-2's 128-row forward tile
// for these head sizes): each (k, v) tile fetched and each B fragment read from shared memory
// serves twice the rows, for more registers (sm_90, head size 64: 242 against 128) and half the
// blocks. The q tile is staged in
// the second (k, v) buffer, whose first refill waits for the first pipeline barrier.
template <typename T, int HD, int RW>
__device__ void flash_mma_fwd_rows(const T* q, const T* k, const T* v, T* o, float* lse, int t, int s, float scale,
                                   int oh) {
    static_assert(MMA_HEAD(HD), "mma flash attention has head sizes 32, 64, 80, 96 and 128");
    constexpr int BC = MMA_KEYS(HD), LD = HD + 8, WR = 16 * RW, ROWS = MMA_WARPS * WR;
    static_assert(ROWS <= 2 * BC, "the q tile is staged in the second (k, v) buffer");
    __shared__ __align__(16) T kv[2][2 * BC * LD];  // two buffers of a (k, v) tile pair
    EMU_SHARED(kv);
    const int bh = blockIdx.y, i0 = (gridDim.x - 1 - blockIdx.x) * ROWS, off = s - t;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    // The warp's rows see keys up to wfirst (its first) and wlast (its last).
    const int kend = min(s, off + i0 + ROWS), wfirst = off + i0 + w * WR, wlast = wfirst + WR - 1;
    const T* kb = k + (size_t)bh * s * HD;
    const T* vb = v + (size_t)bh * s * HD;
    kv_async<T, HD, LD, BC>(kv[0], kb, vb, 0, s);  // in flight while q is staged
    tc_tile_in<T, HD, LD, ROWS>(kv[1], q + (size_t)bh * t * HD, i0, min(ROWS, t - i0));
    __syncthreads();
    uint32_t qa[RW][HD / 16][4];
#pragma unroll
    for (int r = 0; r < RW; r++) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) frag_a(qa[r][kk], kv[1] + (w * WR + 16 * r) * LD, LD, kk);
    }
    const int row = i0 + w * WR + g;  // this lane's rows: row + 16r and row + 16r + 8
    const float sl2 = scale * LOG2E_F;
    float m[RW][2], l[RW][2], acc[RW][HD / 8][4];  // m: base 2
#pragma unroll
    for (int r = 0; r < RW; r++) {
        m[r][0] = m[r][1] = -INFINITY;
        l[r][0] = l[r][1] = 0.0f;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0.0f;
    }
    for (int k0 = 0, buf = 0; k0 < kend; k0 += BC, buf ^= 1) {
        // (The first step's barrier also orders the q fragment loads before kv[1]'s refill.)
        pipeline_step(k0 + BC < kend, [&] { kv_async<T, HD, LD, BC>(kv[buf ^ 1], kb, vb, k0 + BC, s); });
        if (k0 > wlast) continue;
        const T* ks = kv[buf];
        const T* vs = kv[buf] + BC * LD;
        float sc[RW][BC / 8][4];
#pragma unroll
        for (int r = 0; r < RW; r++) {
#pragma unroll
            for (int n = 0; n < BC / 8; n++) sc[r][n][0] = sc[r][n][1] = sc[r][n][2] = sc[r][n][3] = 0.0f;
        }
        mma_tile_rows<T, false, HD / 16, BC / 8, RW>(sc, qa, ks, LD);
        uint32_t pa[RW][BC / 16][4];
#pragma unroll
        for (int r = 0; r < RW; r++) {
            // Tiles wholly left of the diagonal (for the warp's first row, so for all) need no mask.
            softmax_tile<T, BC / 8, HD>(sc[r], m[r], l[r], acc[r], pa[r], k0 + BC - 1 > wfirst, sl2, k0,
                                        off + row + 16 * r, tq);
        }
        mma_tile_rows<T, true, BC / 16, HD / 8, RW>(acc, pa, vs, LD);
    }
#pragma unroll
    for (int r = 0; r < RW; r++) fwd_rows_out<T, HD>(acc[r], m[r], l[r], o, lse, bh, row + 16 * r, t, tq, oh);
}

// The default forward: a warp a block of 16 rows, 64 rows a thread block.
template <typename T, int HD>
__device__ void flash_mma_fwd(const T* q, const T* k, const T* v, T* o, float* lse, int t, int s, float scale,
                              int oh) {
    flash_mma_fwd_rows<T, HD, 1>(q, k, v, o, lse, t, s, scale, oh);
}

// The A fragments of each warp's 16 rows of two (rows, HD) matrices a and b, from the block's 64
// rows [r0, r0 + n) (n <= 64; the rest zero) staged through the shared buffer `un` (2 x 64 rows
// of HD + 8). `un` is free again after the caller's next barrier.
template <typename T, int HD>
__device__ __forceinline__ void mma_frags2(uint32_t (*fa)[4], uint32_t (*fb)[4], T* un, const T* a, const T* b, int r0,
                                           int n, int bld) {
    constexpr int LD = HD + 8;
    const int w = threadIdx.x >> 5;
    tc_tile_in<T, HD, LD, MMA_ROWS>(un, a, r0, n);
    tc_tile_in<T, HD, LD, MMA_ROWS>(un + MMA_ROWS * LD, b, r0, n, bld);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        frag_a(fa[kk], un + w * 16 * LD, LD, kk);
        frag_a(fb[kk], un + (MMA_ROWS + w * 16) * LD, LD, kk);
    }
}

// dq: the layout and arguments of flash_dq above. Each warp owns RW blocks of 16 query rows (64·RW
// a block) and takes the keys in tiles of BB = MMA_KEYS / RW; grid (ceil(t / (64·RW)), BH), the
// last rows first. RW = 1 (flash_mma_dq): the default. RW = 2 (flash_mma_dqw, PATCHLM_FLASH_WIDE,
// as the wide forward): each B fragment read from shared memory serves twice the rows; the key
// tiles halve to keep the scores, dP and both rows' q and dO fragments in registers. KS > 1
// (flash_mma_dqo, PATCHLM_FLASH_OCC4): each key tile is taken in KS parts of BB / KS keys, one
// after the other (scores, dP, dS, dq product), so that a part's scores and dP, not a whole tile's,
// are live at once: the same shared tiles, copies and barriers, fewer registers. The accumulation
// runs over the same 16-key chunks in the same order in every case, so every variant writes the
// same bytes.
template <typename T, int HD, int RW, int KS = 1>
__device__ void flash_mma_dq_rows(const T* q, const T* dout, const T* k, const T* v, const float* st, T* dq, int t,
                                  int s, float scale, int oh) {
    static_assert(MMA_HEAD(HD), "mma flash attention has head sizes 32, 64, 80, 96 and 128");
    constexpr int BB = MMA_KEYS(HD) / RW, LD = HD + 8, WR = 16 * RW, ROWS = MMA_WARPS * WR;
    // Two buffers of a (k, v) tile pair; before the loop they stage the q and dO tiles.
    __shared__ __align__(16) T kv[2][2 * BB * LD];
    EMU_SHARED(kv);
    static_assert(2 * 2 * BB >= ROWS, "a q tile fits where the (k, v) buffers go");
    const int bh = blockIdx.y, i0 = (gridDim.x - 1 - blockIdx.x) * ROWS, off = s - t;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int kend = min(s, off + i0 + ROWS), wfirst = off + i0 + w * WR, wlast = wfirst + WR - 1;
    const T* kb = k + (size_t)bh * s * HD;
    const T* vb = v + (size_t)bh * s * HD;
    const T* qb = q + (size_t)bh * t * HD;
    const OutRows rd = out_rows(bh, t, HD, oh);
    const T* db = dout + rd.base;
    uint32_t qa[RW][HD / 16][4], da[RW][HD / 16][4];
    if constexpr (BB >= ROWS) {
        kv_async<T, HD, LD, BB>(kv[0], kb, vb, 0, s);  // in flight while q and dO are staged
        mma_frags2<T, HD>(qa[0], da[0], kv[1], qb, db, i0, min(MMA_ROWS, t - i0), rd.ld);
    } else {
        // q, then dO, through the whole of kv; then the first (k, v) tile.
        T* un = kv[0];
#pragma unroll
        for (int m = 0; m < 2; m++) {
            tc_tile_in<T, HD, LD, ROWS>(un, m == 0 ? qb : db, i0, min(ROWS, t - i0), m == 0 ? HD : rd.ld);
            __syncthreads();
#pragma unroll
            for (int r = 0; r < RW; r++) {
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++)
                    frag_a(m == 0 ? qa[r][kk] : da[r][kk], un + (w * WR + 16 * r) * LD, LD, kk);
            }
            __syncthreads();
        }
        kv_async<T, HD, LD, BB>(kv[0], kb, vb, 0, s);
    }
    const int row = i0 + w * WR + g;  // this lane's rows: row + 16r and row + 16r + 8
    float lse[RW][2], delta[RW][2], acc[RW][HD / 8][4];
#pragma unroll
    for (int r = 0; r < RW; r++) {
        dq_row_stats(st, bh, row + 16 * r, t, lse[r], delta[r]);
#pragma unroll
        for (int n = 0; n < HD / 8; n++) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0.0f;
    }
    const float sl2 = scale * LOG2E_F;
    for (int k0 = 0, buf = 0; k0 < kend; k0 += BB, buf ^= 1) {
        // (The first step's barrier also orders the fragment loads from kv[1] before its refill.)
        pipeline_step(k0 + BB < kend, [&] { kv_async<T, HD, LD, BB>(kv[buf ^ 1], kb, vb, k0 + BB, s); });
        if (k0 > wlast) continue;
#pragma unroll
        for (int part = 0; part < KS; part++) {
            constexpr int PB = BB / KS;  // keys a part
            const int kp = k0 + part * PB;
            const T* ks = kv[buf] + part * PB * LD;
            const T* vs = kv[buf] + (BB + part * PB) * LD;
            float sc[RW][PB / 8][4], dp[RW][PB / 8][4];
#pragma unroll
            for (int r = 0; r < RW; r++) {
#pragma unroll
                for (int n = 0; n < PB / 8; n++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) sc[r][n][e] = dp[r][n][e] = 0.0f;
                }
            }
            mma_tile_rows<T, false, HD / 16, PB / 8, RW>(sc, qa, ks, LD);
            mma_tile_rows<T, false, HD / 16, PB / 8, RW>(dp, da, vs, LD);
            const bool full = kp + PB - 1 <= wfirst;  // no key of the part is masked
            uint32_t dsa[RW][PB / 16][4];
#pragma unroll
            for (int r = 0; r < RW; r++) {
                ds_tile<T, PB / 8>(dsa[r], sc[r], dp[r], lse[r], delta[r], full, sl2, kp, off + row + 16 * r, tq);
            }
            mma_tile_rows<T, true, PB / 16, HD / 8, RW>(acc, dsa, ks, LD);
        }
    }
#pragma unroll
    for (int r = 0; r < RW; r++) mma_rows_out<T, HD>(acc[r], dq + (size_t)bh * t * HD, row + 16 * r, t, tq, scale);
}

// The default dq: a warp a block of 16 rows, 64 rows a thread block.
template <typename T, int HD>
__device__ void flash_mma_dq(const T* q, const T* dout, const T* k, const T* v, const float* st, T* dq, int t, int s,
                             float scale, int oh) {
    flash_mma_dq_rows<T, HD, 1>(q, dout, k, v, st, dq, t, s, scale, oh);
}

// The query side of the mma dk/dv kernels' loop over query tiles of BQ: three buffers in `un`,
// each a q tile and a dO tile of BQ rows of LD, with the rows' (lse, delta) pairs in lsd,
// filled two steps ahead (pipeline3_step).
template <typename T, int HD, int LD, int BQ>
struct DkvFeed {
    T* un;
    float2 (*lsd)[BQ];
    const T* q;      // the head's queries
    const T* dout;   // and their output gradients
    const float* st; // and (lse, delta) pairs
    int t;
    int dld;         // elements from one row of dout to the next (out_rows)

    // Queries [q0, q0 + BQ) into buffer b (not yet committed).
    __device__ __forceinline__ void fetch(int q0, int b) const {
        T* qs = un + 2 * b * BQ * LD;
        dkv_stage_async<T, HD, LD, BQ>(qs, qs + BQ * LD, lsd[b], q, dout, st, q0, min(BQ, t - q0), dld);
    }
    // The first two steps' tiles (queries from qfirst < t), once the caller is done with un.
    __device__ __forceinline__ void start(int qfirst) const {
        fetch(qfirst, 0);
        cp_async_commit();
        if (qfirst + BQ < t) fetch(qfirst + BQ, 1);
        cp_async_commit();
    }
    // The start of the step on queries q0 in buffer buf: its tiles in place, two steps ahead in flight.
    __device__ __forceinline__ void step(int q0, int buf) const {
        pipeline3_step(q0 + 2 * BQ < t, [&] { fetch(q0 + 2 * BQ, buf == 0 ? 2 : buf - 1); });
    }
    __device__ __forceinline__ const T* qs(int buf) const { return un + 2 * buf * BQ * LD; }
    __device__ __forceinline__ const T* dos(int buf) const { return un + (2 * buf + 1) * BQ * LD; }
};

// The dk/dv pass's probabilities for a lane's keys `key`, `key + 8` and the 8N queries from q0
// (columns; their (lse, delta) pairs in lsd, natural-log lse): from the scores s^T (sc) and dP^T
// (dp), P^T (zero where a query does not see the key or is past t, unless `full`) and
// dS^T = P^T ⊙ (dP^T − delta), left in sc and dp and, rounded to T, as A fragments in pa and dsa.
template <typename T, int N>
__device__ __forceinline__ void dkv_probs(uint32_t (*pa)[4], uint32_t (*dsa)[4], float (*sc)[4], float (*dp)[4],
                                          const float2* lsd, bool full, int key, int q0, int t, int off, float sl2,
                                          int tq) {
#pragma unroll
    for (int n = 0; n < N; n++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {  // this lane's two queries (columns) of the block
            const int c = n * 8 + 2 * tq + j, qi = q0 + c;
            const float2 ld = lsd[c];
            const float lse2 = ld.x * LOG2E_F;  // base 2, as the scores
#pragma unroll
            for (int h = 0; h < 2; h++) {  // its keys: key and key + 8
                const int e = 2 * h + j;
                const float p = full || (key + 8 * h <= off + qi && qi < t) ? exp2f(fmaf(sc[n][e], sl2, -lse2)) : 0.0f;
                sc[n][e] = p;
                dp[n][e] = p * (dp[n][e] - ld.y);
            }
        }
    }
    acc_to_a<T, N>(pa, sc);
    acc_to_a<T, N>(dsa, dp);
}

// One step of the mma dk/dv kernels for a warp of 16 keys from wfirst (this lane's: wfirst +
// lane / 4 and 8 more) and the BQ queries from q0 in the shared tiles qs and dos, with their
// base-2 lse in ls and delta in dl (queries see keys up to their own position + off): the scores
// s^T = k . q^T and dP^T = v . dO^T, the probabilities P^T and dS^T = P^T ⊙ (dP^T − delta) (left in
// dp; all 0 where no query of the step sees the warp's keys), then dv += P^T . dO, dk += dS^T . q.
template <typename T, int HD, int BQ, int LD>
__device__ __forceinline__ void dkv_step(float (*dp)[4], float (*dka)[4], float (*dva)[4], const uint32_t (*ka)[4],
                                         const uint32_t (*va)[4], const T* qs, const T* dos, const float2* lsd,
                                         int q0, int t, int off, int wfirst, float sl2) {
    const int lane = threadIdx.x & 31, tq = lane & 3, key = wfirst + (lane >> 2);
    float sc[BQ / 8][4];
#pragma unroll
    for (int n = 0; n < BQ / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) sc[n][e] = dp[n][e] = 0.0f;
    }
    if (q0 + BQ - 1 < wfirst - off) return;  // queries before wfirst - off see none of the warp's keys
    mma_tile<T, false, HD / 16, BQ / 8>(sc, ka, qs, LD);   // s^T = k . q^T
    mma_tile<T, false, HD / 16, BQ / 8>(dp, va, dos, LD);  // dP^T = v . dO^T
    // No query of the tile is past t or sees fewer than all the warp's keys: no mask.
    const bool full = wfirst + 15 <= off + q0 && q0 + BQ <= t;
    uint32_t pa[BQ / 16][4], dsa[BQ / 16][4];
    dkv_probs<T, BQ / 8>(pa, dsa, sc, dp, lsd, full, key, q0, t, off, sl2, tq);
    mma_tile<T, true, BQ / 16, HD / 8>(dva, pa, dos, LD);
    mma_tile<T, true, BQ / 16, HD / 8>(dka, dsa, qs, LD);
}

// The A fragments of k-step kk for rows [r0, r0 + 16) of A = M^T, M a row-major shared tile (row
// stride ld, a multiple of 8 elements) whose rows are A's columns: ldmatrix's transposed loads of
// M's 8x8 blocks, in frag_a's order (matrix j: A's rows r0 + 8(j & 1), columns kk·16 + 8(j >> 1)).
template <typename T>
__device__ __forceinline__ void frag_a_t(uint32_t* a, const T* m, int ld, int kk, int r0) {
    const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
    ldm_x4<true>(a, m + (kk * 16 + (j >> 1) * 8 + r) * ld + r0 + (j & 1) * 8);
}

// The shared memory of the mma dk/dv pass with NW warps (keys 16·NW a block): three buffers of a
// (q, dO) tile pair of BQ rows (un, which also stages the v tile), the k tile apart where it must
// outlive the staging (with DQ, for the dq product; with more than 4 warps, where un cannot hold
// both k and v), with DQ the dS^T tile (keys as rows), and the three buffers' (lse, delta) pairs.
template <typename T, int HD, bool DQ, int NW>
struct DkvSmem {
    // Query tiles of 32 rows, 16 above head size 64 (within 48 KB of static shared memory).
    static constexpr int BQ = HD <= 64 ? 32 : 16, LD = HD + 8, LDS = BQ + 8, ROWS = 16 * NW;
    static constexpr int UN = 6 * BQ * LD;
    static constexpr bool KSEP = DQ || 2 * ROWS * LD > UN;
    static constexpr int KQ = KSEP ? ROWS * LD : 0, DST = DQ ? ROWS * LDS : 0;
    static constexpr int BYTES = (UN + KQ + DST) * (int)sizeof(T) + 3 * BQ * (int)sizeof(float2);
    static_assert(ROWS * LD <= UN, "the v tile is staged where the (q, dO) buffers go");
    static_assert(KSEP || 2 * ROWS * LD <= UN, "the k and v tiles are staged where the (q, dO) buffers go");
    static_assert((UN + KQ + DST) * sizeof(T) % 16 == 0, "the statistics are 16-byte aligned");
};

// The mma dk/dv pass. Grid (ceil(s / (16·NW)), BH), the first keys (the most queries) first; each
// of the NW warps owns 16 keys, scores are computed transposed (keys as rows), the query tiles
// stream through DkvFeed.
// - DQ false (flash_mma_dkv): dk and dv (BH, s, HD), inputs as flash_dkv above.
// - DQ true (flash_mma_dkvq; PATCHLM_FLASH_DQ_ATOMIC): dq too, in one pass (FlashAttention-2's
//   backward). Each step's dS^T tile also goes through shared memory so that the block adds its
//   share of dq = dS . k (f32, not yet scaled) into dq_acc (zeroed by the caller) with atomics;
//   flash_dq_cast scales and rounds it. This saves flash_mma_dq's second computation of the
//   scores and dP (5 tile products per step instead of 7).
// - NW 4: 64 keys a block in static shared memory (the defaults). NW 8 (flash_mma_dkvw,
//   flash_mma_dkvqw; PATCHLM_FLASH_WIDE_BWD; head size 64): 128 keys a block, FlashAttention-2's
//   backward tile for this head size, in dynamic shared memory: each query tile fetched, and with
//   DQ each dq atomic, serves twice the keys, for one block of 8 warps an SM instead of three of 4.
template <typename T, int HD, bool DQ, int NW>
__device__ void flash_mma_dkv_pass(const T* q, const T* dout, const T* k, const T* v, const float* st, T* dk,
                                   T* dv, float* dq_acc, int t, int s, float scale, int oh) {
    static_assert(MMA_HEAD(HD), "mma flash attention has head sizes 32, 64, 80, 96 and 128");
    static_assert(NW == 4 || (NW == 8 && HD == 64), "the dk/dv pass has 4 warps, or 8 at head size 64");
    using M = DkvSmem<T, HD, DQ, NW>;
    constexpr int BQ = M::BQ, LD = M::LD, LDS = M::LDS, ROWS = M::ROWS;
    // With DQ, this warp's share of a step's dq tile (BQ x HD): rows qr + [0, 16), columns
    // qc + [0, QC), the tile's RG row blocks by its NW / RG column blocks.
    constexpr int RG = BQ / 16, QC = HD / (NW / RG);
    static_assert(!DQ || QC % 16 == 0, "ldmatrix.x4 loads two column blocks of the dq product at once");
    T *un, *kq, *dst;
    float2(*lsd)[BQ];
    if constexpr (NW == 4) {
        __shared__ __align__(16) T un_s[M::UN];
        __shared__ __align__(16) T kq_s[M::KSEP ? M::KQ : 8];
        __shared__ __align__(16) T dst_s[DQ ? M::DST : 8];
        __shared__ float2 lsd_s[3][BQ];
        EMU_SHARED(un_s, kq_s, dst_s, lsd_s);
        un = un_s;
        kq = kq_s;
        dst = dst_s;
        lsd = lsd_s;
    } else {
        DYN_SHARED(dyn, M::BYTES);
        EMU_SHARED(dyn);
        un = reinterpret_cast<T*>(dyn);
        kq = un + M::UN;
        dst = kq + M::KQ;
        lsd = reinterpret_cast<float2(*)[BQ]>(dst + M::DST);
    }
    const int bh = blockIdx.y, j0 = blockIdx.x * ROWS, off = s - t;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    T* kt = M::KSEP ? kq : un + ROWS * LD;
    const int nk = min(ROWS, s - j0);
    tc_tile_in<T, HD, LD, ROWS>(kt, k + (size_t)bh * s * HD, j0, nk);
    tc_tile_in<T, HD, LD, ROWS>(un, v + (size_t)bh * s * HD, j0, nk);
    __syncthreads();
    uint32_t ka[HD / 16][4], va[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        frag_a(ka[kk], kt + w * 16 * LD, LD, kk);
        frag_a(va[kk], un + w * 16 * LD, LD, kk);
    }
    const int key = j0 + w * 16 + g;  // this lane's keys: key and key + 8
    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.0f;
    }
    const int wfirst = j0 + w * 16;  // queries before wfirst - off see none of the warp's keys
    const float sl2 = scale * LOG2E_F;  // base 2: dkv_step scales the lse alike
    const OutRows rd = out_rows(bh, t, HD, oh);
    const DkvFeed<T, HD, LD, BQ> feed{un, lsd, q + (size_t)bh * t * HD, dout + rd.base, st + (size_t)bh * t * 2, t,
                                      rd.ld};
    const int qr = (w % RG) * 16, qc = (w / RG) * QC;
    const int qfirst = max(0, j0 - off);  // < t: the grid has no block past the last key
    __syncthreads();                      // every warp has its fragments: un may be overwritten
    feed.start(qfirst);
    for (int q0 = qfirst, buf = 0; q0 < t; q0 += BQ, buf = buf == 2 ? 0 : buf + 1) {
        feed.step(q0, buf);
        // A warp none of whose keys these queries see adds nothing to dk and dv (with DQ zeros to
        // dq: it still joins the block's barrier below).
        if (!DQ && q0 + BQ - 1 < wfirst - off) continue;
        float dp[BQ / 8][4];
        dkv_step<T, HD, BQ, LD>(dp, dka, dva, ka, va, feed.qs(buf), feed.dos(buf), lsd[buf], q0, t, off, wfirst, sl2);
        if constexpr (DQ) {
            // dS^T (rounded to T, as dk's product took it) into dst: this warp's 16 keys as rows.
#pragma unroll
            for (int n = 0; n < BQ / 8; n++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    T* p = dst + (w * 16 + g + 8 * h) * LDS + n * 8 + 2 * tq;
                    *reinterpret_cast<uint32_t*>(p) = pack2<T>(dp[n][2 * h], dp[n][2 * h + 1]);
                }
            }
            __syncthreads();  // the whole dS^T tile is in dst (the next step's barrier frees it)
            float dqa[QC / 8][4];
#pragma unroll
            for (int n = 0; n < QC / 8; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.0f;
            uint32_t da[ROWS / 16][4];
#pragma unroll
            for (int kk = 0; kk < ROWS / 16; kk++) frag_a_t(da[kk], dst, LDS, kk, qr);
            mma_tile<T, true, ROWS / 16, QC / 8>(dqa, da, kt + qc, LD);  // dS . k over the block's keys
            float* dqb = dq_acc + (size_t)bh * t * HD;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int qi = q0 + qr + g + 8 * h;
                if (qi >= t) continue;
#pragma unroll
                for (int n = 0; n < QC / 8; n++) {  // two adjacent columns: one 8-byte atomic on sm_90
                    atomic_add_w<2>(dqb + (size_t)qi * HD + qc + n * 8 + 2 * tq, &dqa[n][2 * h]);
                }
            }
        }
    }
    mma_rows_out<T, HD>(dka, dk + (size_t)bh * s * HD, key, s, tq, scale);
    mma_rows_out<T, HD>(dva, dv + (size_t)bh * s * HD, key, s, tq, 1.0f);
}

// dk and dv: flash_mma_dkv_pass without dq, four warps a block.
template <typename T, int HD>
__device__ void flash_mma_dkv(const T* q, const T* dout, const T* k, const T* v, const float* st, T* dk, T* dv,
                              int t, int s, float scale, int oh) {
    flash_mma_dkv_pass<T, HD, false, 4>(q, dout, k, v, st, dk, dv, nullptr, t, s, scale, oh);
}
FLASH_ENTRIES(FLASH_TC_ALL(mma))
// The larger head sizes (mma.sync only; PATCHLM_FLASH_MMA_LARGE_HEADS): 80 (the 2.7B preset), 96
// (780M) and 128 (1.3B), with the smaller tiles of MMA_KEYS and DkvSmem.
#define FLASH_MMA_FAMILY(T, S, HD) FLASH_TC_FAMILY(mma, T, S, HD)
FLASH_ENTRIES(FLASH_16BIT(FLASH_MMA_FAMILY, 80))
FLASH_ENTRIES(FLASH_16BIT(FLASH_MMA_FAMILY, 96))
FLASH_ENTRIES(FLASH_16BIT(FLASH_MMA_FAMILY, 128))

// flash_mma_dkvq's dq: dq[i] = acc[i] · scale, rounded to T; a grid-stride loop over n elements.
template <typename T>
__device__ void flash_dq_cast(const float* acc, T* dq, int n, float scale) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dq[i] = from_f<T>(acc[i] * scale);
}

#define FLASH_DKVQ(T, S, HD)                                                                               \
    extern "C" __global__ void __launch_bounds__(128, DKV_MIN_BLOCKS(HD)) flash_mma_dkvq_##S##_##HD(                           \
        const T* q, const T* dout, const T* k, const T* v, const float* st, T* dk, T* dv, float* dq_acc,  \
        int t, int s, float scale, int oh) {                                                               \
        flash_mma_dkv_pass<T, HD, true, 4>(q, dout, k, v, st, dk, dv, dq_acc, t, s, scale, oh);            \
    }
FLASH_ENTRIES(FLASH_16BIT(FLASH_DKVQ, 32))
FLASH_ENTRIES(FLASH_16BIT(FLASH_DKVQ, 64))
// (At head sizes 80 and 96 the one-pass dq tile does not split into even column blocks: two passes.)
FLASH_ENTRIES(FLASH_16BIT(FLASH_DKVQ, 128))

// The wide forward and dq (flash_mma_fwd_rows, flash_mma_dq_rows with RW = 2: 128 rows a block
// of 128 threads).
#define FLASH_MMA_WIDE(T, S, HD)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) flash_mma_fwdw_##S##_##HD(                           \
        const T* q, const T* k, const T* v, T* o, float* lse, int t, int s, float scale, int oh) {         \
        flash_mma_fwd_rows<T, HD, 2>(q, k, v, o, lse, t, s, scale, oh);                                    \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) flash_mma_dqw_##S##_##HD(                            \
        const T* q, const T* dout, const T* k, const T* v, const float* st, T* out, int t, int s,          \
        float scale, int oh) {                                                                             \
        flash_mma_dq_rows<T, HD, 2>(q, dout, k, v, st, out, t, s, scale, oh);                              \
    }
FLASH_ENTRIES(FLASH_16BIT(FLASH_MMA_WIDE, 32))
FLASH_ENTRIES(FLASH_16BIT(FLASH_MMA_WIDE, 64))

// The default dq with four blocks an SM (PATCHLM_FLASH_OCC4, head size 64: at most 128 registers
// a thread, 16 warps an SM instead of 12), each key tile taken in two halves so that the scores
// and dP of 32 keys, not 64, are live at once; the same bytes as flash_mma_dq. (The default
// forward fits 128 registers, so four blocks an SM, by itself.)
#define FLASH_MMA_OCC4(T, S, HD)                                                                           \
    extern "C" __global__ void __launch_bounds__(128, 4) flash_mma_dqo_##S##_##HD(                         \
        const T* q, const T* dout, const T* k, const T* v, const float* st, T* out, int t, int s,          \
        float scale, int oh) {                                                                             \
        flash_mma_dq_rows<T, HD, 1, 2>(q, dout, k, v, st, out, t, s, scale, oh);                           \
    }
FLASH_ENTRIES(FLASH_16BIT(FLASH_MMA_OCC4, 64))

// The wide backward (flash_mma_dkv_pass with 8 warps: 128 keys a block of 256 threads), dk and
// dv, and dq, dk and dv; head size 64.
#define FLASH_DKVW(T, S)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) flash_mma_dkvw_##S##_64(                             \
        const T* q, const T* dout, const T* k, const T* v, const float* st, T* dk, T* dv, int t, int s,    \
        float scale, int oh) {                                                                             \
        flash_mma_dkv_pass<T, 64, false, 8>(q, dout, k, v, st, dk, dv, nullptr, t, s, scale, oh);          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) flash_mma_dkvqw_##S##_64(                            \
        const T* q, const T* dout, const T* k, const T* v, const float* st, T* dk, T* dv, float* dq_acc,  \
        int t, int s, float scale, int oh) {                                                               \
        flash_mma_dkv_pass<T, 64, true, 8>(q, dout, k, v, st, dk, dv, dq_acc, t, s, scale, oh);            \
    }
FLASH_ENTRIES(FLASH_DKVW(__nv_bfloat16, bf16))
FLASH_ENTRIES(FLASH_DKVW(__half, f16))

// The wide backward kernels' dynamic shared memory in bytes (without, with dq) into out[0..2): the
// launcher computes the same sizes (patchlm_model::launch::flash_wide_bwd_smem), tests/emulated.rs
// checks that the two agree.
#ifndef FLASH_DEVICE_ONLY
extern "C" __global__ void flash_dkvw_smem_bytes(int* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        out[0] = DkvSmem<__nv_bfloat16, 64, false, 8>::BYTES;
        out[1] = DkvSmem<__nv_bfloat16, 64, true, 8>::BYTES;
    }
}
#endif

#define FLASH_DQ_CAST(T, S)                                                                                \
    extern "C" __global__ void flash_dq_cast_##S(const float* acc, T* dq, int n, float scale) {            \
        flash_dq_cast<T>(acc, dq, n, scale);                                                               \
    }
FLASH_ENTRIES(FLASH_DQ_CAST(__nv_bfloat16, bf16))
FLASH_ENTRIES(FLASH_DQ_CAST(__half, f16))

#endif  // PATCHLM_FLASH_CU
