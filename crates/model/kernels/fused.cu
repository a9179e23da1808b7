// Fused CUDA kernels of patchlm-model (see src/ops/ for the math and the CPU twins they are
// tested against). Compiled to PTX by build.rs when the `cuda` feature is on.
//
// Conventions: one thread block per row for row-wise ops; statistics in f32 whatever the storage
// dtype; names end in the dtype (f32, bf16, f16).

#include "common.cuh"

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
    EMU_SHARED(sh);
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
    EMU_SHARED(sh);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

// One step of the online softmax statistics: running max m and sum s of exp(x - m).
__device__ __forceinline__ void online_add(float x, float& m, float& s) {
    if (x > m) {
        s = s * __expf(m - x) + 1.0f;
        m = x;
    } else {
        s += __expf(x - m);
    }
}

// Combines every thread's (m, s) over the block; every thread gets the row's max and sum.
__device__ __forceinline__ void block_stats(float m, float s, float* m_out, float* sum_out) {
    float bm = block_max(m);
    s = (m == -INFINITY) ? 0.0f : s * __expf(m - bm);
    *m_out = bm;
    *sum_out = block_sum(s);
}

// Online softmax statistics of the first n elements of a row, scaled: m = max(scale * x) and
// sum = sum(exp(scale * x - m)), in one pass; every thread of the block gets both.
template <typename T>
__device__ void row_stats(const T* xr, int n, float scale, float* m_out, float* sum_out) {
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) online_add(to_f(xr[j]) * scale, m, s);
    block_stats(m, s, m_out, sum_out);
}

// max and log-sum-exp of one row.
template <typename T>
__device__ void row_lse(const T* xr, int v, float* m_out, float* lse_out) {
    float sum;
    row_stats(xr, v, 1.0f, m_out, &sum);
    *lse_out = *m_out + logf(sum);
}

// For every lane of warp 0: the sum over a row's k targets of (lse - x[target]), added in target
// order as one thread would (the same bits), with the targets' logits loaded by one lane each, 32
// at a time, instead of one after another; lane 0's is the one to keep. A target id outside the
// row (the CPU path refuses it; here nothing checks it on the host) reads nothing and makes the
// sum NaN, so that a run stops at a non-finite loss instead of training on other memory.
template <typename T>
__device__ __forceinline__ float ce_target_sum(const T* xr, const uint32_t* tr, int k, int v, float lse) {
    const int lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (int q0 = 0; q0 < k; q0 += 32) {
        float x = 0.0f;
        if (q0 + lane < k) {
            const uint32_t id = tr[q0 + lane];
            x = id < (uint32_t)v ? to_f(xr[id]) : NAN;
        }
        const int n = min(32, k - q0);
        for (int i = 0; i < n; i++) acc += lse - __shfl_sync(0xffffffff, x, i);
    }
    return acc;
}

// Multi-target cross-entropy forward: out[row] = sum_k (lse - x[row, t[row, k]]).
template <typename T>
__device__ void ce_fwd(const T* x, const uint32_t* t, float* out, int v, int k) {
    const T* xr = x + (size_t)blockIdx.x * v;
    float m, lse;
    row_lse(xr, v, &m, &lse);
    if (threadIdx.x < 32) {
        const float acc = ce_target_sum(xr, t + (size_t)blockIdx.x * k, k, v, lse);
        if (threadIdx.x == 0) out[blockIdx.x] = acc;
    }
}

// Backward: dx[row, j] = g[row] * (k * softmax_j - #{i : t[row, i] = j}).
// The cross-entropy backward's target entries of a row, once the whole row holds
// scale · exp(x − lse): the thread of each distinct target's first mention (thread q for target
// q) computes its entry again and subtracts gi once per time it is named, in target order (as the
// CPU path does), so a row costs K entries instead of K comparisons per logit, the K at once.
// Every thread of the block calls it (a barrier first).
template <typename T>
__device__ __forceinline__ void ce_targets_fixup(const T* xr, T* dr, const uint32_t* tr, int k, int v, float scale,
                                                 float gi, float lse) {
    __syncthreads();
    for (int q = threadIdx.x; q < k; q += blockDim.x) {
        const uint32_t j = tr[q];
        bool seen = j >= (uint32_t)v;  // an id outside the row has no entry (the CPU path refuses it)
        for (int p = 0; p < q; p++) seen |= tr[p] == j;
        if (seen) continue;
        float d = scale * __expf(to_f(xr[j]) - lse);
        for (int p = q; p < k; p++) d -= tr[p] == j ? gi : 0.0f;
        dr[j] = from_f<T>(d);
    }
}

template <typename T>
__device__ void ce_bwd(const T* x, const uint32_t* t, const float* g, T* dx, int v, int k) {
    const T* xr = x + (size_t)blockIdx.x * v;
    T* dr = dx + (size_t)blockIdx.x * v;
    const uint32_t* tr = t + (size_t)blockIdx.x * k;
    float m, lse;
    row_lse(xr, v, &m, &lse);
    float gi = g[blockIdx.x], scale = gi * (float)k;
    for (int j = threadIdx.x; j < v; j += blockDim.x) dr[j] = from_f<T>(scale * __expf(to_f(xr[j]) - lse));
    ce_targets_fixup(xr, dr, tr, k, v, scale, gi, lse);
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

// Causal softmax of attention scores (rows of length s, the last t of s positions are queries):
// row r (query i = r % t) sees columns 0..=s-t+i; y = softmax(scale * x) there, 0 elsewhere.
template <typename T>
__device__ void causal_softmax_fwd(const T* x, T* y, int t, int s, float scale) {
    size_t off = (size_t)blockIdx.x * s;
    int lim = s - t + (int)(blockIdx.x % t);  // last visible column
    float bm, sum;
    row_stats(x + off, lim + 1, scale, &bm, &sum);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < s; j += blockDim.x)
        y[off + j] = from_f<T>(j <= lim ? __expf(to_f(x[off + j]) * scale - bm) * inv : 0.0f);
}

// Its backward: dx = scale * y * (dy - sum(y * dy)) on the visible columns, 0 elsewhere.
template <typename T>
__device__ void causal_softmax_bwd(const T* y, const T* dy, T* dx, int t, int s, float scale) {
    size_t off = (size_t)blockIdx.x * s;
    int lim = s - t + (int)(blockIdx.x % t);
    float dot = 0.0f;
    for (int j = threadIdx.x; j <= lim; j += blockDim.x) dot += to_f(y[off + j]) * to_f(dy[off + j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < s; j += blockDim.x)
        dx[off + j] = from_f<T>(j <= lim ? scale * to_f(y[off + j]) * (to_f(dy[off + j]) - dot) : 0.0f);
}

// RoPE in the rotate-half layout over x (.., t, hd): y = x * cos + sign * rotate_half(x) * sin, with
// f32 tables cos/sin (t, hd); sign -1 is the inverse rotation (the backward pass).
template <typename T>
__device__ void rope(const T* x, const float* c, const float* sn, T* y, int t, int hd, int n, float sign) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int j = i % hd, h = hd / 2;
    int p = ((i / hd) % t) * hd + j;
    float rot = j < h ? -to_f(x[i + h]) : to_f(x[i - h]);
    y[i] = from_f<T>(to_f(x[i]) * c[p] + sign * rot * sn[p]);
}

// Embedding gather with bags of k: y[r, j] = (1/k) · sum over b < k of w[ids[r·k + b], j] for the
// n = rows · d output elements, summed in f32 (an id outside the vocabulary adds 0; the CPU path
// rejects those with an error). k = 1 is the plain lookup (exact: one row, times 1).
template <typename T>
__device__ void embedding_fwd(const T* w, const uint32_t* ids, T* y, int n, int d, int v, int k) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint32_t* bag = ids + (size_t)(i / d) * k;
    const int col = i % d;
    float sum = 0.0f;
    for (int b = 0; b < k; b++) {
        uint32_t id = bag[b];
        if (id < (uint32_t)v) sum += to_f(w[(size_t)id * d + col]);
    }
    y[i] = from_f<T>(sum * (1.0f / (float)k));
}

// Four consecutive elements as f32: 16 bytes of f32 or 8 of a 16-bit type (p aligned to that).
template <typename T>
__device__ __forceinline__ void load4(const T* p, float* f) {
    EMU_ALIGNED(p, 4 * sizeof(T));
    if constexpr (sizeof(T) == 4) {
        const float4 u = *reinterpret_cast<const float4*>(p);
        f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w;
    } else {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < 4; i++) f[i] = to_f(h[i]);
    }
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float* f) {
    EMU_ALIGNED(p, 4 * sizeof(T));
    if constexpr (sizeof(T) == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
    } else {
        uint2 u;
        T* h = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int i = 0; i < 4; i++) h[i] = from_f<T>(f[i]);
        *reinterpret_cast<uint2*>(p) = u;
    }
}

// load4 / store4 where `wide`, else element by element (the same values).
template <typename T>
__device__ __forceinline__ void load4_or(const T* p, float* f, bool wide) {
    if (wide) {
        load4(p, f);
    } else {
#pragma unroll
        for (int c = 0; c < 4; c++) f[c] = to_f(p[c]);
    }
}
template <typename T>
__device__ __forceinline__ void store4_or(T* p, const float* f, bool wide) {
    if (wide) {
        store4(p, f);
    } else {
#pragma unroll
        for (int c = 0; c < 4; c++) p[c] = from_f<T>(f[c]);
    }
}

// embedding_fwd four columns a thread (d a multiple of 4; the launcher's choice): the bag's rows
// loaded four at a time before they are added (in bag order, as embedding_fwd: the same bits), so
// that a thread has up to four loads in flight; where w or y is not aligned for the wide accesses,
// element by element. n = rows · d elements, a thread per four.
template <typename T>
__device__ void embedding_fwd4(const T* w, const uint32_t* ids, T* y, int n, int d, int v, int k) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    const uint32_t* bag = ids + (size_t)(i / d) * k;
    const int col = i % d;
    const bool wide = ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(y)) & (4 * sizeof(T) - 1)) == 0;
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int b0 = 0; b0 < k; b0 += 4) {
        float f[4][4];
        bool in[4];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const uint32_t id = b0 + b < k ? bag[b0 + b] : (uint32_t)v;
            const T* src = w + (size_t)id * d + col;
            in[b] = id < (uint32_t)v;  // (an id outside the vocabulary adds nothing, as in embedding_fwd)
            if (in[b]) {
                load4_or(src, f[b], wide);
            } else {
                f[b][0] = f[b][1] = f[b][2] = f[b][3] = 0.0f;
            }
        }
#pragma unroll
        for (int b = 0; b < 4; b++) {
            if (!in[b]) continue;
#pragma unroll
            for (int c = 0; c < 4; c++) sum[c] += f[b][c];
        }
    }
#pragma unroll
    for (int c = 0; c < 4; c++) sum[c] *= 1.0f / (float)k;
    store4_or(y + i, sum, wide);
}

// Its backward: acc[ids[r·k + b], j] += dy[r, j] / k for each b < k (f32 atomics, acc zeroed by
// the caller), W consecutive of the n = rows · d elements a thread (W = 4 where d is a multiple
// of 4, so a thread's elements share a row and its accumulator is 16-byte aligned); dy starts at
// element `off` of its buffer.
template <typename T, int W>
__device__ void embedding_bwd(const T* dy, int off, const uint32_t* ids, float* acc, int n, int d, int v, int k) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (i >= n) return;
    const uint32_t* bag = ids + (size_t)(i / d) * k;
    const int col = i % d;
    float g[W];
#pragma unroll
    for (int w = 0; w < W; w++) g[w] = to_f(dy[off + i + w]) * (1.0f / (float)k);
    for (int b = 0; b < k; b++) {
        uint32_t id = bag[b];
        if (id < (uint32_t)v) atomic_add_w<W>(acc + (size_t)id * d + col, g);
    }
}

// The embedding backward without float atomics (PATCHLM_EMBEDDING_SORTED): the m ids grouped by
// value (a counting sort: count, scan, place), then each id's gradient row summed from its own
// tokens' rows of dy and written once, zeros for ids no token names (no zeroed accumulator, no
// cast). Integer atomics only: 2m of them where the atomic backward makes m·d float ones.
//
// cnt (v + 1, zeroed): cnt[id + 1] = how many ids equal id (ids outside the vocabulary: none).
extern "C" __global__ void embedding_count(const uint32_t* ids, int m, int v, int* cnt) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < m && ids[i] < (uint32_t)v) atomicAdd(&cnt[ids[i] + 1], 1);
}

// cnt[0..n) replaced by its inclusive prefix sums, by one block of blockDim.x (a power of two up to
// 1024) threads: each thread's contiguous run summed, the run totals scanned in shared memory,
// then each run rewritten with its offset. After embedding_count (n = v + 1) cnt[id] is where id's
// tokens start and cnt[id + 1] where they end.
extern "C" __global__ void embedding_scan(int* cnt, int n) {
    __shared__ int tot[1024];
    EMU_SHARED(tot);
    const int t = threadIdx.x, per = (n + blockDim.x - 1) / blockDim.x;
    const int lo = min(n, t * per), hi = min(n, lo + per);
    int run = 0;
    for (int j = lo; j < hi; j++) run += cnt[j];
    tot[t] = run;
    __syncthreads();
    for (int step = 1; step < (int)blockDim.x; step *= 2) {  // Hillis-Steele: inclusive sums of the totals
        const int add = t >= step ? tot[t - step] : 0;
        __syncthreads();
        tot[t] += add;
        __syncthreads();
    }
    int acc = t > 0 ? tot[t - 1] : 0;
    for (int j = lo; j < hi; j++) {
        acc += cnt[j];
        cnt[j] = acc;
    }
}

// order[start[id] + (the id's count so far)] = i for each id of the vocabulary (fill zeroed, v):
// each id's token positions, in no particular order.
extern "C" __global__ void embedding_place(const uint32_t* ids, int m, int v, const int* start, int* fill,
                                           int* order) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m) return;
    const uint32_t id = ids[i];
    if (id < (uint32_t)v) order[start[id] + atomicAdd(&fill[id], 1)] = i;
}

// out[id, j..j+W) = sum over id's tokens p (order[start[id]..start[id + 1])) of dy[p / k, j..] / k,
// summed in f32 and rounded once to T; W columns a thread (W = 4 where d is a multiple of 4 and
// dy, out allow the wide accesses; the launcher's choice), n = v · d elements; dy starts at
// element `off` of its buffer.
template <typename T, int W>
__device__ void embedding_sum(const T* dy, int off, const int* start, const int* order, T* out, int n, int d, int k) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (i >= n) return;
    const int id = i / d, col = i % d;
    const float inv = 1.0f / (float)k;
    float sum[W];
#pragma unroll
    for (int w = 0; w < W; w++) sum[w] = 0.0f;
    const T* src = dy + off;
    const bool wide = W == 4 && ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out)) & (4 * sizeof(T) - 1)) == 0;
    for (int j = start[id]; j < start[id + 1]; j++) {
        const T* row = src + (size_t)(order[j] / k) * d + col;
        float g[W];
        if constexpr (W == 4) {
            load4_or(row, g, wide);
        } else {
            g[0] = to_f(row[0]);
        }
#pragma unroll
        for (int w = 0; w < W; w++) sum[w] += g[w] * inv;
    }
    if constexpr (W == 4) {
        store4_or(out + i, sum, wide);
    } else {
        out[i] = from_f<T>(sum[0]);
    }
}

// SwiGLU gate y = silu(g) * u, and its backward into out = (dg, du) as two rows of n:
// dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g), du = dy * g * s.
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(g[i]);
    y[i] = from_f<T>(x / (1.0f + __expf(-x)) * to_f(u[i]));
}
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(g[i]), d = to_f(dy[i]);
    float s = 1.0f / (1.0f + __expf(-x));
    out[i] = from_f<T>(d * to_f(u[i]) * s * (1.0f + x * (1.0f - s)));
    out[n + i] = from_f<T>(d * x * s);
}

// Cross-entropy that keeps each row's log-sum-exp (suffix _lse): the forward writes out = (loss
// rows, lse rows) as 2 x n floats; the backward reads gl = (g rows, lse rows) and makes one pass
// over the logits instead of two. Rows are read 16 bytes at a time where the row is 16-byte
// aligned (the tail and unaligned rows element by element); same math as ce_fwd / ce_bwd.
template <typename T> struct Pack16 { static const int N = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float* f) {
    EMU_ALIGNED(p, 16);
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < Pack16<T>::N; i++) f[i] = to_f(e[i]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float* f) {
    EMU_ALIGNED(p, 16);
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < Pack16<T>::N; i++) e[i] = from_f<T>(f[i]);
    *reinterpret_cast<uint4*>(p) = u;
}

// Online max and sum of exp(x - max) of one row, every thread of the block gets both.
template <typename T>
__device__ void row_stats_packed(const T* xr, int n, float* m_out, float* sum_out) {
    const int P = Pack16<T>::N;
    float m = -INFINITY, s = 0.0f;
    int packs = ((reinterpret_cast<uintptr_t>(xr) & 15) == 0) ? n / P : 0;
    for (int c = threadIdx.x; c < packs; c += blockDim.x) {
        float f[Pack16<T>::N];
        load_pack(xr + (size_t)c * P, f);
        float lm = f[0];
#pragma unroll
        for (int i = 1; i < P; i++) lm = fmaxf(lm, f[i]);
        if (lm > m) {
            s *= __expf(m - lm);
            m = lm;
        }
#pragma unroll
        for (int i = 0; i < P; i++) s += __expf(f[i] - m);
    }
    for (int j = packs * P + threadIdx.x; j < n; j += blockDim.x) online_add(to_f(xr[j]), m, s);
    block_stats(m, s, m_out, sum_out);
}

template <typename T>
__device__ void ce_fwd_lse(const T* x, const uint32_t* t, float* out, int v, int k, int n) {
    const T* xr = x + (size_t)blockIdx.x * v;
    float m, sum;
    row_stats_packed(xr, v, &m, &sum);
    float lse = m + logf(sum);
    if (threadIdx.x < 32) {
        const float acc = ce_target_sum(xr, t + (size_t)blockIdx.x * k, k, v, lse);
        if (threadIdx.x == 0) {
            out[blockIdx.x] = acc;
            out[n + blockIdx.x] = lse;
        }
    }
}

template <typename T>
__device__ void ce_bwd_lse(const T* x, const uint32_t* t, const float* gl, T* dx, int v, int k, int n) {
    const int P = Pack16<T>::N;
    const T* xr = x + (size_t)blockIdx.x * v;
    T* dr = dx + (size_t)blockIdx.x * v;
    const uint32_t* tr = t + (size_t)blockIdx.x * k;
    float gi = gl[blockIdx.x], lse = gl[n + blockIdx.x], scale = gi * (float)k;
    bool aligned = ((reinterpret_cast<uintptr_t>(xr) | reinterpret_cast<uintptr_t>(dr)) & 15) == 0;
    int packs = aligned ? v / P : 0;
    for (int c = threadIdx.x; c < packs; c += blockDim.x) {
        float f[Pack16<T>::N];
        load_pack(xr + (size_t)c * P, f);
#pragma unroll
        for (int i = 0; i < P; i++) f[i] = scale * __expf(f[i] - lse);
        store_pack(dr + (size_t)c * P, f);
    }
    for (int j = packs * P + threadIdx.x; j < v; j += blockDim.x) dr[j] = from_f<T>(scale * __expf(to_f(xr[j]) - lse));
    ce_targets_fixup(xr, dr, tr, k, v, scale, gi, lse);
}

// Warp-per-row variants of the row-wise kernels (suffix _w): one warp per row, blockDim.x / 32 rows
// per block, reductions by warp shuffles only (no shared memory, no block barriers). For short rows
// (RMSNorm over d ~ 1e3, attention rows of T ~ 1e3) the block-per-row kernels above spend most of
// their time in barriers with one or two elements per thread. Same math, same roundings.
__device__ __forceinline__ long long warp_row() {
    return (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
}

// 16-byte aligned pointers (the RMSNorm rows and weights of a width that is a multiple of 8 bf16
// or 4 f32 elements) take the packed loops below; others, and the tails, go element by element.
__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c, const void* d) {
    return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(c) |
             reinterpret_cast<uintptr_t>(d)) & 15) == 0;
}

template <typename T>
__device__ void rms_fwd_w(const T* x, const T* w, T* y, int d, float eps, int n) {
    const int P = Pack16<T>::N;
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x & 31;
    const T* xr = x + row * d;
    T* yr = y + row * d;
    int packs = aligned16(xr, yr, w, w) ? d / P : 0;
    float ss = 0.0f;
    for (int c = lane; c < packs; c += 32) {
        float f[Pack16<T>::N];
        load_pack(xr + c * P, f);
#pragma unroll
        for (int i = 0; i < P; i++) ss += f[i] * f[i];
    }
    for (int j = packs * P + lane; j < d; j += 32) {
        float a = to_f(xr[j]);
        ss += a * a;
    }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    for (int c = lane; c < packs; c += 32) {
        float f[Pack16<T>::N], g[Pack16<T>::N];
        load_pack(xr + c * P, f);
        load_pack(w + c * P, g);
#pragma unroll
        for (int i = 0; i < P; i++) f[i] = to_f(from_f<T>(f[i] * r)) * g[i];
        store_pack(yr + c * P, f);
    }
    for (int j = packs * P + lane; j < d; j += 32) yr[j] = from_f<T>(to_f(from_f<T>(to_f(xr[j]) * r)) * to_f(w[j]));
}

// Residual add fused with the RMSNorm that follows it: s = a + b (rounded to T), y = rms_norm(s).
template <typename T>
__device__ void add_rms_fwd_w(const T* a, const T* b, const T* w, T* s, T* y, int d, float eps, int n) {
    const int P = Pack16<T>::N;
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x & 31;
    long long off = row * d;
    int packs = (aligned16(a + off, b + off, s + off, y + off) && aligned16(w, w, w, w)) ? d / P : 0;
    float ss = 0.0f;
    for (int c = lane; c < packs; c += 32) {
        float f[Pack16<T>::N], g[Pack16<T>::N];
        load_pack(a + off + c * P, f);
        load_pack(b + off + c * P, g);
#pragma unroll
        for (int i = 0; i < P; i++) {
            f[i] = to_f(from_f<T>(f[i] + g[i]));
            ss += f[i] * f[i];
        }
        store_pack(s + off + c * P, f);
    }
    for (int j = packs * P + lane; j < d; j += 32) {
        T v = from_f<T>(to_f(a[off + j]) + to_f(b[off + j]));
        s[off + j] = v;
        ss += to_f(v) * to_f(v);
    }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    for (int c = lane; c < packs; c += 32) {
        float f[Pack16<T>::N], g[Pack16<T>::N];
        load_pack(s + off + c * P, f);
        load_pack(w + c * P, g);
#pragma unroll
        for (int i = 0; i < P; i++) f[i] = to_f(from_f<T>(f[i] * r)) * g[i];
        store_pack(y + off + c * P, f);
    }
    for (int j = packs * P + lane; j < d; j += 32) y[off + j] = from_f<T>(to_f(from_f<T>(to_f(s[off + j]) * r)) * to_f(w[j]));
}

// RMSNorm input gradient plus a residual gradient (res may be null): dx = r w dy - c x + res.
template <typename T>
__device__ void rms_dx_w(const T* x, const T* w, const T* dy, const T* res, T* dx, float* rs, int d, float eps,
                         int n) {
    const int P = Pack16<T>::N;
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x & 31;
    long long off = row * d;
    bool ok = aligned16(x + off, dy + off, dx + off, w) && (res == nullptr || aligned16(res + off, w, w, w));
    int packs = ok ? d / P : 0;
    float ss = 0.0f, dot = 0.0f;
    for (int c = lane; c < packs; c += 32) {
        float f[Pack16<T>::N], g[Pack16<T>::N], q[Pack16<T>::N];
        load_pack(x + off + c * P, f);
        load_pack(w + c * P, g);
        load_pack(dy + off + c * P, q);
#pragma unroll
        for (int i = 0; i < P; i++) {
            ss += f[i] * f[i];
            dot += f[i] * g[i] * q[i];
        }
    }
    for (int j = packs * P + lane; j < d; j += 32) {
        float a = to_f(x[off + j]);
        ss += a * a;
        dot += a * to_f(w[j]) * to_f(dy[off + j]);
    }
    float r = rsqrtf(warp_sum(ss) / d + eps);
    dot = warp_sum(dot);
    float c0 = dot * r * r * r / d;
    for (int c = lane; c < packs; c += 32) {
        float f[Pack16<T>::N], g[Pack16<T>::N], q[Pack16<T>::N], e[Pack16<T>::N];
        load_pack(x + off + c * P, f);
        load_pack(w + c * P, g);
        load_pack(dy + off + c * P, q);
        if (res) load_pack(res + off + c * P, e);
#pragma unroll
        for (int i = 0; i < P; i++) {
            float v = r * g[i] * q[i] - c0 * f[i];
            f[i] = res ? v + e[i] : v;
        }
        store_pack(dx + off + c * P, f);
    }
    for (int j = packs * P + lane; j < d; j += 32) {
        float g = r * to_f(w[j]) * to_f(dy[off + j]) - c0 * to_f(x[off + j]);
        dx[off + j] = from_f<T>(res ? g + to_f(res[off + j]) : g);
    }
    if (lane == 0) rs[row] = r;
}

// The causal softmax rows read and write 16 bytes per load where the row is 16-byte aligned (an
// attention row of a multiple of 8 bf16 positions), element by element otherwise and for tails.
template <typename T>
__device__ void causal_softmax_fwd_w(const T* x, T* y, int t, int s, float scale, int n) {
    const int P = Pack16<T>::N;
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x & 31;
    const T* xr = x + row * s;
    T* yr = y + row * s;
    int lim = s - t + (int)(row % t);
    bool vec = ((reinterpret_cast<uintptr_t>(xr) | reinterpret_cast<uintptr_t>(yr)) & 15) == 0;
    float m = -INFINITY, sum = 0.0f;
    int packs = vec ? (lim + 1) / P : 0;
    for (int c = lane; c < packs; c += 32) {
        float f[Pack16<T>::N];
        load_pack(xr + c * P, f);
        float lm = f[0] * scale;
#pragma unroll
        for (int i = 1; i < P; i++) lm = fmaxf(lm, f[i] * scale);
        if (lm > m) {
            sum *= __expf(m - lm);
            m = lm;
        }
#pragma unroll
        for (int i = 0; i < P; i++) sum += __expf(f[i] * scale - m);
    }
    for (int j = packs * P + lane; j <= lim; j += 32) online_add(to_f(xr[j]) * scale, m, sum);
    float bm = warp_max(m);
    sum = (m == -INFINITY) ? 0.0f : sum * __expf(m - bm);
    float inv = 1.0f / warp_sum(sum);
    int wpacks = vec ? s / P : 0;
    for (int c = lane; c < wpacks; c += 32) {
        int j0 = c * P;
        float f[Pack16<T>::N];
        if (j0 <= lim) {
            load_pack(xr + j0, f);
#pragma unroll
            for (int i = 0; i < P; i++) f[i] = (j0 + i <= lim) ? __expf(f[i] * scale - bm) * inv : 0.0f;
        } else {
#pragma unroll
            for (int i = 0; i < P; i++) f[i] = 0.0f;
        }
        store_pack(yr + j0, f);
    }
    for (int j = wpacks * P + lane; j < s; j += 32)
        yr[j] = from_f<T>(j <= lim ? __expf(to_f(xr[j]) * scale - bm) * inv : 0.0f);
}

template <typename T>
__device__ void causal_softmax_bwd_w(const T* y, const T* dy, T* dx, int t, int s, float scale, int n) {
    const int P = Pack16<T>::N;
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x & 31;
    const T* yr = y + row * s;
    const T* gr = dy + row * s;
    T* dr = dx + row * s;
    int lim = s - t + (int)(row % t);
    bool vec = ((reinterpret_cast<uintptr_t>(yr) | reinterpret_cast<uintptr_t>(gr) | reinterpret_cast<uintptr_t>(dr)) & 15) == 0;
    float dot = 0.0f;
    int packs = vec ? (lim + 1) / P : 0;
    for (int c = lane; c < packs; c += 32) {
        float a[Pack16<T>::N], g[Pack16<T>::N];
        load_pack(yr + c * P, a);
        load_pack(gr + c * P, g);
#pragma unroll
        for (int i = 0; i < P; i++) dot += a[i] * g[i];
    }
    for (int j = packs * P + lane; j <= lim; j += 32) dot += to_f(yr[j]) * to_f(gr[j]);
    dot = warp_sum(dot);
    int wpacks = vec ? s / P : 0;
    for (int c = lane; c < wpacks; c += 32) {
        int j0 = c * P;
        float a[Pack16<T>::N], g[Pack16<T>::N];
        if (j0 <= lim) {
            load_pack(yr + j0, a);
            load_pack(gr + j0, g);
#pragma unroll
            for (int i = 0; i < P; i++) a[i] = (j0 + i <= lim) ? scale * a[i] * (g[i] - dot) : 0.0f;
        } else {
#pragma unroll
            for (int i = 0; i < P; i++) a[i] = 0.0f;
        }
        store_pack(dr + j0, a);
    }
    for (int j = wpacks * P + lane; j < s; j += 32)
        dr[j] = from_f<T>(j <= lim ? scale * to_f(yr[j]) * (to_f(gr[j]) - dot) : 0.0f);
}

// Attention heads and the row layout of the projections, with RoPE fused in. Rows: (B*T, C) with
// C = (h + 2*kv) * hd (the stacked q/k/v projection; kv = 0 for a plain (B*T, h*hd) matrix).
// Heads: q (B, h, T, hd), then k and v (B, kv, T, hd), back to back in one buffer. `rope` 1 rotates
// q and k by the angles of the f32 tables c/sn (T, hd) in the rotate-half layout, 0 copies only.
// heads_from_rows: rows -> heads, rotation +angle; rows_from_heads: heads (q, k, v given apart)
// -> rows, rotation -angle (the backward pass of heads_from_rows). A block per row (b, position);
// its threads walk the row's columns a 16-byte pack at a time where every buffer is aligned and a
// pack never straddles half a head (hd a multiple of two packs: the rotation pairs pack j with
// pack j +- hd/2), else an element at a time. Both sides are contiguous along hd.
template <typename T>
__device__ __forceinline__ float rope_at(const T* head, int j, int hd, const float* c, const float* sn, int tt,
                                         float sign) {
    int h2 = hd / 2;
    float rot = j < h2 ? -to_f(head[j + h2]) : to_f(head[j - h2]);
    int p = tt * hd + j;
    return to_f(head[j]) * c[p] + sign * rot * sn[p];
}

// Pack j.. of one head row (as rope_at, element for element) into `out`, rotated or copied.
template <typename T>
__device__ __forceinline__ void head_pack(const T* head, int j, int hd, const float* c, const float* sn, int tt,
                                          int rot, float sign, T* out) {
    if (!rot) {
        EMU_ALIGNED(out, 16);
        EMU_ALIGNED(head + j, 16);
        *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(head + j);
        return;
    }
    const int P = Pack16<T>::N, h2 = hd / 2;
    float x[Pack16<T>::N], y[Pack16<T>::N];
    load_pack(head + j, x);
    load_pack(head + (j < h2 ? j + h2 : j - h2), y);
    const float* cp = c + tt * hd + j;
    const float* sp = sn + tt * hd + j;
#pragma unroll
    for (int i = 0; i < P; i++) {
        const float rotv = j < h2 ? -y[i] : y[i];
        x[i] = x[i] * cp[i] + sign * rotv * sp[i];
    }
    store_pack(out, x);
}

// Where head `head` of row (bb, tt) lives on the heads side, and whether RoPE applies to it.
__device__ __forceinline__ long long head_offset(int head, long long bb, int tt, int t, int h, int kv, int hd,
                                                 int* part) {
    if (head < h) {
        *part = 0;
        return ((bb * h + head) * t + tt) * hd;
    }
    if (head < h + kv) {
        *part = 1;
        return ((bb * kv + head - h) * t + tt) * hd;
    }
    *part = 2;
    return ((bb * kv + head - h - kv) * t + tt) * hd;
}

template <typename T>
__device__ void heads_from_rows(const T* x, const float* c, const float* sn, T* out, int b, int t, int h, int kv,
                                int hd, int rope) {
    const int cols = (h + 2 * kv) * hd;
    const long long nq = (long long)b * h * t * hd, nqk = (long long)b * (h + kv) * t * hd;
    const int step = (hd % (2 * Pack16<T>::N) == 0 && aligned16(x, out, x, out)) ? Pack16<T>::N : 1;
    for (long long r = blockIdx.x; r < (long long)b * t; r += gridDim.x) {
        const long long bb = r / t;
        const int tt = (int)(r % t);
        const T* row = x + r * cols;
        for (int col = threadIdx.x * step; col < cols; col += blockDim.x * step) {
            const int head = col / hd, j = col - head * hd;
            int part;
            T* dst = out + head_offset(head, bb, tt, t, h, kv, hd, &part);
            dst += (part == 0 ? 0 : part == 1 ? nq : nqk) + j;
            const int rot = rope && part < 2;
            if (step > 1) {
                head_pack(row + head * hd, j, hd, c, sn, tt, rot, 1.0f, dst);
            } else {
                *dst = rot ? from_f<T>(rope_at(row + head * hd, j, hd, c, sn, tt, 1.0f)) : row[head * hd + j];
            }
        }
    }
}

template <typename T>
__device__ void rows_from_heads(const T* q, const T* k, const T* v, const float* c, const float* sn, T* out, int b,
                                int t, int h, int kv, int hd, int rope) {
    const int cols = (h + 2 * kv) * hd;
    const int step = (hd % (2 * Pack16<T>::N) == 0 && aligned16(q, k, v, out)) ? Pack16<T>::N : 1;
    for (long long r = blockIdx.x; r < (long long)b * t; r += gridDim.x) {
        const long long bb = r / t;
        const int tt = (int)(r % t);
        T* row = out + r * cols;
        for (int col = threadIdx.x * step; col < cols; col += blockDim.x * step) {
            const int head = col / hd, j = col - head * hd;
            int part;
            const long long off = head_offset(head, bb, tt, t, h, kv, hd, &part);
            const T* hs = (part == 0 ? q : part == 1 ? k : v) + off;
            const int rot = rope && part < 2;
            if (step > 1) {
                head_pack(hs, j, hd, c, sn, tt, rot, -1.0f, row + col);
            } else {
                row[col] = rot ? from_f<T>(rope_at(hs, j, hd, c, sn, tt, -1.0f)) : hs[j];
            }
        }
    }
}

// SwiGLU on the stacked gate/up projection gu (rows, 2f) = [gate | up] per row: y (rows, f), and
// its backward into the same stacked layout, out = [dg | du] per row. n = rows * f. With f a
// multiple of the 16-byte pack and aligned buffers, each thread handles one pack.
__device__ __forceinline__ float silu_grad(float x, float u, float d, float* du) {
    float s = 1.0f / (1.0f + __expf(-x));
    *du = d * x * s;
    return d * u * s * (1.0f + x * (1.0f - s));
}

template <typename T>
__device__ void swiglu_packed_fwd(const T* gu, T* y, long long n, int f) {
    const int P = Pack16<T>::N;
    long long stride = (long long)gridDim.x * blockDim.x, first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (f % P == 0 && aligned16(gu, y, gu, y)) {
        for (long long c = first; c < n / P; c += stride) {
            long long i = c * P;
            const T* r = gu + (i / f) * 2 * f + i % f;
            float g[Pack16<T>::N], u[Pack16<T>::N];
            load_pack(r, g);
            load_pack(r + f, u);
#pragma unroll
            for (int k = 0; k < P; k++) g[k] = g[k] / (1.0f + __expf(-g[k])) * u[k];
            store_pack(y + i, g);
        }
        return;
    }
    for (long long i = first; i < n; i += stride) {
        const T* r = gu + (i / f) * 2 * f;
        int c = (int)(i % f);
        float x = to_f(r[c]);
        y[i] = from_f<T>(x / (1.0f + __expf(-x)) * to_f(r[f + c]));
    }
}
template <typename T>
__device__ void swiglu_packed_bwd(const T* gu, const T* dy, T* out, long long n, int f) {
    const int P = Pack16<T>::N;
    long long stride = (long long)gridDim.x * blockDim.x, first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (f % P == 0 && aligned16(gu, dy, out, out)) {
        for (long long c = first; c < n / P; c += stride) {
            long long i = c * P, o = (i / f) * 2 * f + i % f;
            float g[Pack16<T>::N], u[Pack16<T>::N], d[Pack16<T>::N];
            load_pack(gu + o, g);
            load_pack(gu + o + f, u);
            load_pack(dy + i, d);
#pragma unroll
            for (int k = 0; k < P; k++) {
                float du;
                g[k] = silu_grad(g[k], u[k], d[k], &du);
                u[k] = du;
            }
            store_pack(out + o, g);
            store_pack(out + o + f, u);
        }
        return;
    }
    for (long long i = first; i < n; i += stride) {
        long long o = (i / f) * 2 * f + i % f;
        float du;
        out[o] = from_f<T>(silu_grad(to_f(gu[o]), to_f(gu[o + f]), to_f(dy[i]), &du));
        out[o + f] = from_f<T>(du);
    }
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
    extern "C" __global__ void cast_from_f32_##S(const float* a, T* out, int n) { cast_from_f32<T>(a, out, n); } \
    extern "C" __global__ void causal_softmax_fwd_##S(const T* x, T* y, int t, int s, float scale) {      \
        causal_softmax_fwd<T>(x, y, t, s, scale);                                                        \
    }                                                                                                    \
    extern "C" __global__ void causal_softmax_bwd_##S(const T* y, const T* dy, T* dx, int t, int s,       \
                                                      float scale) {                                     \
        causal_softmax_bwd<T>(y, dy, dx, t, s, scale);                                                   \
    }                                                                                                    \
    extern "C" __global__ void rope_##S(const T* x, const float* c, const float* sn, T* y, int t, int hd, \
                                        int n, float sign) {                                             \
        rope<T>(x, c, sn, y, t, hd, n, sign);                                                            \
    }                                                                                                    \
    extern "C" __global__ void embedding_fwd_##S(const T* w, const uint32_t* ids, T* y, int n, int d,     \
                                                 int v, int k) {                                         \
        embedding_fwd<T>(w, ids, y, n, d, v, k);                                                         \
    }                                                                                                    \
    extern "C" __global__ void embedding_fwd4_##S(const T* w, const uint32_t* ids, T* y, int n, int d,    \
                                                  int v, int k) {                                        \
        embedding_fwd4<T>(w, ids, y, n, d, v, k);                                                        \
    }                                                                                                    \
    extern "C" __global__ void embedding_bwd_##S(const T* dy, int off, const uint32_t* ids, float* acc,   \
                                                 int n, int d, int v, int k) {                           \
        embedding_bwd<T, 1>(dy, off, ids, acc, n, d, v, k);                                              \
    }                                                                                                    \
    extern "C" __global__ void embedding_bwd4_##S(const T* dy, int off, const uint32_t* ids, float* acc,  \
                                                  int n, int d, int v, int k) {                          \
        embedding_bwd<T, 4>(dy, off, ids, acc, n, d, v, k);                                              \
    }                                                                                                    \
    extern "C" __global__ void embedding_sum_##S(const T* dy, int off, const int* start, const int* order,  \
                                                 T* out, int n, int d, int k) {                          \
        embedding_sum<T, 1>(dy, off, start, order, out, n, d, k);                                        \
    }                                                                                                    \
    extern "C" __global__ void embedding_sum4_##S(const T* dy, int off, const int* start, const int* order, \
                                                  T* out, int n, int d, int k) {                         \
        embedding_sum<T, 4>(dy, off, start, order, out, n, d, k);                                        \
    }                                                                                                    \
    extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, int n) {                     \
        swiglu_fwd<T>(g, u, y, n);                                                                       \
    }                                                                                                    \
    extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* out, int n) {      \
        swiglu_bwd<T>(g, u, dy, out, n);                                                                 \
    }                                                                                                    \
    extern "C" __global__ void ce_fwd_lse_##S(const T* x, const uint32_t* t, float* out, int v, int k,     \
                                              int n) {                                                   \
        ce_fwd_lse<T>(x, t, out, v, k, n);                                                               \
    }                                                                                                    \
    extern "C" __global__ void ce_bwd_lse_##S(const T* x, const uint32_t* t, const float* gl, T* dx,      \
                                              int v, int k, int n) {                                     \
        ce_bwd_lse<T>(x, t, gl, dx, v, k, n);                                                            \
    }                                                                                                    \
    extern "C" __global__ void rms_fwd_w_##S(const T* x, const T* w, T* y, int d, float eps, int n) {     \
        rms_fwd_w<T>(x, w, y, d, eps, n);                                                                \
    }                                                                                                    \
    extern "C" __global__ void rms_dx_w_##S(const T* x, const T* w, const T* dy, T* dx, float* rs, int d, \
                                            float eps, int n) {                                          \
        rms_dx_w<T>(x, w, dy, nullptr, dx, rs, d, eps, n);                                               \
    }                                                                                                    \
    extern "C" __global__ void rms_dx_res_w_##S(const T* x, const T* w, const T* dy, const T* res, T* dx,  \
                                                float* rs, int d, float eps, int n) {                    \
        rms_dx_w<T>(x, w, dy, res, dx, rs, d, eps, n);                                                   \
    }                                                                                                    \
    extern "C" __global__ void add_rms_fwd_w_##S(const T* a, const T* b, const T* w, T* s, T* y, int d,    \
                                                 float eps, int n) {                                     \
        add_rms_fwd_w<T>(a, b, w, s, y, d, eps, n);                                                      \
    }                                                                                                    \
    extern "C" __global__ void causal_softmax_fwd_w_##S(const T* x, T* y, int t, int s, float scale,      \
                                                        int n) {                                         \
        causal_softmax_fwd_w<T>(x, y, t, s, scale, n);                                                   \
    }                                                                                                    \
    extern "C" __global__ void causal_softmax_bwd_w_##S(const T* y, const T* dy, T* dx, int t, int s,     \
                                                        float scale, int n) {                            \
        causal_softmax_bwd_w<T>(y, dy, dx, t, s, scale, n);                                              \
    }                                                                                                    \
    extern "C" __global__ void swiglu_packed_fwd_##S(const T* gu, T* y, long long n, int f) {            \
        swiglu_packed_fwd<T>(gu, y, n, f);                                                               \
    }                                                                                                    \
    extern "C" __global__ void swiglu_packed_bwd_##S(const T* gu, const T* dy, T* out, long long n,      \
                                                     int f) {                                            \
        swiglu_packed_bwd<T>(gu, dy, out, n, f);                                                         \
    }                                                                                                    \
    extern "C" __global__ void heads_from_rows_##S(const T* x, const float* c, const float* sn, T* out,   \
                                                   int b, int t, int h, int kv, int hd, int rope) {     \
        heads_from_rows<T>(x, c, sn, out, b, t, h, kv, hd, rope);                                        \
    }                                                                                                    \
    extern "C" __global__ void rows_from_heads_##S(const T* q, const T* k, const T* v, const float* c,    \
                                                   const float* sn, T* out, int b, int t, int h, int kv, \
                                                   int hd, int rope) {                                   \
        rows_from_heads<T>(q, k, v, c, sn, out, b, t, h, kv, hd, rope);                                  \
    }

FUSED_OPS(float, f32)
FUSED_OPS(__nv_bfloat16, bf16)
FUSED_OPS(__half, f16)

// Fused AdamW over one f32 parameter: out = (p', m', v') as three rows of n; mv = (m, v).
// One element of AdamW: updates m and v in place and returns the new parameter. Correctly rounded
// sqrt and division (the file is built with --use_fast_math), as on the CPU.
__device__ __forceinline__ float adamw_elem(float p, float g, float* m, float* v, float b1, float b2, float ob1,
                                            float ob2, float eps, float decay, float step, float sbc2) {
    float mi = *m * b1 + g * ob1;
    float vi = *v * b2 + g * g * ob2;
    *m = mi;
    *v = vi;
    return p * decay - __fdiv_rn(mi, __fdiv_rn(__fsqrt_rn(vi), sbc2) + eps) * step;
}

extern "C" __global__ void adamw_f32(const float* p, const float* g, const float* mv, float* out, int n, float b1,
                                     float b2, float ob1, float ob2, float eps, float decay, float step,
                                     float sbc2) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float m = mv[i], v = mv[n + i];
    out[i] = adamw_elem(p[i], g[i], &m, &v, b1, b2, ob1, ob2, eps, decay, step, sbc2);
    out[n + i] = m;
    out[2 * n + i] = v;
}

// Multi-tensor kernels: one launch over many f32 tensors, one block per chunk of `chunk`
// elements. `tab` is the table built by launch.rs (multi_table): `first` (nt + 1 entries: the first
// block of each tensor, then the total), then per tensor five words: parameter (or the tensor
// itself), gradient and moments pointers, element count, and flags: bit 0 weight decay, bit 1 the
// gradient (for the sum of squares: the tensor) is bf16 rather than f32 (multi_cast_f32 reads
// words 0, 1, 3 and 4 its own way, see there).

// The tensor that owns block b: the largest i with first[i] <= b (tensors without elements own no
// block, so the largest such i is the one whose range holds b). Mirrored on the CPU by
// launch::multi_owner and tested there.
__device__ __forceinline__ int multi_owner(const unsigned long long* first, int nt, unsigned long long b) {
    int lo = 0, hi = nt - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (first[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// Element j of a gradient that is f32, or bf16 when bit 1 of the flags is set.
__device__ __forceinline__ float multi_grad(unsigned long long ptr, unsigned long long flags, long long j) {
    return (flags & 2) ? __bfloat162float(((const __nv_bfloat16*)ptr)[j]) : ((const float*)ptr)[j];
}

// Sum of squares of each chunk: partial[b] for block b (the host sums the partials in f64).
extern "C" __global__ void multi_sumsq_f32(const unsigned long long* tab, int nt, int chunk, float* partial) {
    unsigned long long b = blockIdx.x;
    int i = multi_owner(tab, nt, b);
    const unsigned long long* e = tab + (nt + 1) + 5 * i;
    long long n = (long long)e[3];
    long long lo = (long long)(b - tab[i]) * chunk;
    long long hi = min(lo + (long long)chunk, n);
    float s = 0.0f;
    // 16 bytes a load where the chunk starts 16-byte aligned (4 f32 or 8 bf16), the rest one by one.
    const bool bf = (e[4] & 2) != 0;
    const int P = bf ? 8 : 4;
    const void* start = bf ? (const void*)((const __nv_bfloat16*)e[0] + lo) : (const void*)((const float*)e[0] + lo);
    long long packs = (reinterpret_cast<uintptr_t>(start) & 15) == 0 ? (hi - lo) / P : 0;
    for (long long c = threadIdx.x; c < packs; c += blockDim.x) {
        float f[8];
        if (bf) {
            load_pack((const __nv_bfloat16*)start + c * 8, f);
        } else {
            load_pack((const float*)start + c * 4, f);
        }
#pragma unroll
        for (int i = 0; i < 8; i++) s += i < P ? f[i] * f[i] : 0.0f;
    }
    for (long long j = lo + packs * P + threadIdx.x; j < hi; j += blockDim.x) {
        float x = multi_grad(e[0], e[4], j);
        s += x * x;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[b] = s;
}

// AdamW over every tensor of the table in place: p (n), g (n), mv (2n: m then v). Gradients are
// multiplied by gscale first (the clipping coefficient); decay applies where the flag is set.
// With `sumsq` (the gradients' global sum of squares, on the device) the coefficient is computed
// here instead, as the host's clip factor: max_norm / (norm + 1e-6) capped at 1 (1 for max_norm
// <= 0), and a non-finite norm leaves everything unchanged; so the host need not read the norm
// before it enqueues the update.
extern "C" __global__ void multi_adamw_f32(const unsigned long long* tab, int nt, int chunk, float b1, float b2,
                                           float ob1, float ob2, float eps, float decay, float step, float sbc2,
                                           float gscale, const double* sumsq, double max_norm) {
    if (sumsq) {
        double norm = sqrt(*sumsq);
        if (!isfinite(norm)) return;
        gscale = max_norm > 0.0 ? (float)fmin(1.0, max_norm / (norm + 1e-6)) : 1.0f;
    }
    unsigned long long b = blockIdx.x;
    int i = multi_owner(tab, nt, b);
    const unsigned long long* e = tab + (nt + 1) + 5 * i;
    float* p = (float*)e[0];
    float* mv = (float*)e[2];
    long long n = (long long)e[3];
    float d = (e[4] & 1) ? decay : 1.0f;
    long long lo = (long long)(b - tab[i]) * chunk;
    long long hi = min(lo + (long long)chunk, n);
    // Four elements a thread at a time (16-byte loads and stores of p, m and v, 16 or 8 bytes of
    // the gradient) where all four start aligned, the rest one by one; the same arithmetic.
    const bool bf = (e[4] & 2) != 0;
    float* m = mv + lo;
    float* v = mv + n + lo;
    const uintptr_t ga = bf ? reinterpret_cast<uintptr_t>((const __nv_bfloat16*)e[1] + lo) & 7
                            : reinterpret_cast<uintptr_t>((const float*)e[1] + lo) & 15;
    const long long quads = aligned16(p + lo, m, v, p + lo) && ga == 0 ? (hi - lo) / 4 : 0;
    for (long long c = threadIdx.x; c < quads; c += blockDim.x) {
        float pf[4], mf[4], vf[4], g[4];
        load4(p + lo + 4 * c, pf);
        load4(m + 4 * c, mf);
        load4(v + 4 * c, vf);
        if (bf) {
            load4((const __nv_bfloat16*)e[1] + lo + 4 * c, g);
        } else {
            load4((const float*)e[1] + lo + 4 * c, g);
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            pf[k] = adamw_elem(pf[k], g[k] * gscale, &mf[k], &vf[k], b1, b2, ob1, ob2, eps, d, step, sbc2);
        }
        store4(p + lo + 4 * c, pf);
        store4(m + 4 * c, mf);
        store4(v + 4 * c, vf);
    }
    for (long long j = lo + quads * 4 + threadIdx.x; j < hi; j += blockDim.x) {
        p[j] = adamw_elem(p[j], multi_grad(e[1], e[4], j) * gscale, &mv[j], &mv[n + j], b1, b2, ob1, ob2, eps, d,
                          step, sbc2);
    }
}

// Casts every f32 tensor of the table (word 0 the source, word 1 the destination, word 3 the
// element count) to bf16, or to f16 where bit 2 of the flags is set: the per-layer weight casts of
// a forward pass in one launch, into one buffer (ops::cast_groups).
// Four elements a thread at a time (a 16-byte load, an 8-byte store) where both ends start aligned.
template <typename T>
__device__ __forceinline__ void cast_range(const float* src, T* dst, long long lo, long long hi) {
    const bool vec = ((reinterpret_cast<uintptr_t>(src + lo) & 15) | (reinterpret_cast<uintptr_t>(dst + lo) & 7)) == 0;
    const long long quads = vec ? (hi - lo) / 4 : 0;
    for (long long c = threadIdx.x; c < quads; c += blockDim.x) {
        float f[4];
        load4(src + lo + 4 * c, f);
        store4(dst + lo + 4 * c, f);
    }
    for (long long j = lo + quads * 4 + threadIdx.x; j < hi; j += blockDim.x) dst[j] = from_f<T>(src[j]);
}

extern "C" __global__ void multi_cast_f32(const unsigned long long* tab, int nt, int chunk) {
    unsigned long long b = blockIdx.x;
    int i = multi_owner(tab, nt, b);
    const unsigned long long* e = tab + (nt + 1) + 5 * i;
    const float* src = (const float*)e[0];
    long long lo = (long long)(b - tab[i]) * chunk;
    long long hi = min(lo + (long long)chunk, (long long)e[3]);
    if (e[4] & 4) cast_range(src, (__half*)e[1], lo, hi);
    else cast_range(src, (__nv_bfloat16*)e[1], lo, hi);
}
