// Hopper-only kernels of patchlm-model (compute capability 9.0 with its architecture-specific
// features, sm_90a): warpgroup matrix multiply-accumulate (wgmma), the instruction that runs
// Hopper's tensor cores at full rate (mma.sync, which flash.cu uses, reaches a fraction of it).
// Compiled by build.rs to PTX for compute_90a in a module of its own (a GPU other than Hopper
// cannot load it); below compute capability 90 build.rs writes an empty module instead.
//
// It holds the building blocks, two probe kernels that check them on a GPU (tests/cuda.rs,
// `cuda_hopper_wgmma_probe_matches_cpu`) and on the CPU stand-in (tests/emulated.rs), and flash
// attention's forward, dq and dk/dv passes built on them (PATCHLM_FLASH_WGMMA, opt-in until the
// probes and the kernels' device tests have passed on a GPU). The building blocks: the
// shared-memory matrix descriptor, the fence / commit / wait protocol, and the m64n64k16 product
// with both operands in shared memory (q.k^T) or A in registers and B K-major or transposed from
// shared memory (p.v).
//
// The layout (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
// - Operands in shared memory are read through a 64-bit descriptor: start address, leading and
//   stride byte offsets (each >> 4, 14 bits) and a swizzle mode (here none). Without swizzling a
//   K-major operand (M or N rows of K elements) is laid out in core matrices of 8 rows x 16 bytes
//   (8 x 8 16-bit elements), each core matrix's rows contiguous (128 bytes); the leading byte
//   offset (LBO) is the distance between core matrices adjacent along K, the stride byte offset
//   (SBO) between core matrices adjacent along M (or N).
// - The accumulator of m64nNk16 (f32): thread t of the warpgroup (warp w = t / 32, lane l) holds
//   N / 2 values; value i is row 16w + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4) + i % 2
//   (each warp's 16 rows in mma.m16n8's C layout, one 8-column block after another).
// - wgmma runs asynchronously: wgmma.fence before the first one that touches the accumulator
//   registers, wgmma.commit_group after issuing, wgmma.wait_group before reading them; shared
//   memory written by ordinary stores must be made visible to the asynchronous proxy that wgmma
//   reads it through (fence.proxy.async) after the barrier that orders the stores.

#include "common.cuh"
// flash.cu's device functions (its entry points stay in its own module).
#define FLASH_DEVICE_ONLY
#include "flash.cu"

// A shared-memory matrix descriptor. On the GPU the 64-bit word itself; in the CPU stand-in the
// same word without the address (which does not fit its 14 bits there) and the address beside it.
#ifdef PATCHLM_EMU
typedef emu::WgmmaDesc WgDesc;
#else
typedef uint64_t WgDesc;
#endif

// The descriptor's offset and mode fields: leading and stride byte offsets (multiples of 16, below
// 256 KB), no swizzle, base offset 0.
__device__ __forceinline__ uint64_t wg_desc_bits(uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return ((uint64_t)((lbo_bytes >> 4) & 0x3FFF) << 16) | ((uint64_t)((sbo_bytes >> 4) & 0x3FFF) << 32);
}

// The descriptor of a K-major operand at `smem` (16-byte aligned) without swizzling.
__device__ __forceinline__ WgDesc wg_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
#ifdef PATCHLM_EMU
    return emu::WgmmaDesc{smem, wg_desc_bits(lbo_bytes, sbo_bytes)};
#else
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    return wg_desc_bits(lbo_bytes, sbo_bytes) | (uint64_t)((a & 0x3FFFF) >> 4);
#endif
}

// The descriptor of an MN-major (transposed) operand at `smem` whose core matrices lie `along_k`
// bytes apart along K and `along_mn` along M or N: LBO along K, as the PTX ISA and CUTLASS lay out
// unswizzled MN-major operands (and the emulator reads them), or with SWAP the two fields the
// other way round. The flash kernels come in both builds (flash_wg_*, flash_wgs_*), and the
// launcher takes the one whose reading the GPU's own probe agrees with, so that a GPU that read
// the fields the other way would still run them (patchlm_model::ops::cuda::wgmma_reading).
template <bool SWAP>
__device__ __forceinline__ WgDesc wg_desc_mn(const void* smem, uint32_t along_k, uint32_t along_mn) {
    return SWAP ? wg_desc(smem, along_mn, along_k) : wg_desc(smem, along_k, along_mn);
}

// Shared memory written by ordinary stores, visible to wgmma's operand reads (after the barrier
// that orders the stores).
__device__ __forceinline__ void wg_fence_smem() {
#ifndef PATCHLM_EMU
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_fence() {
#ifndef PATCHLM_EMU
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifndef PATCHLM_EMU
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N of the warpgroup's committed wgmma groups are still running.
template <int N>
__device__ __forceinline__ void wg_wait() {
#ifndef PATCHLM_EMU
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving accesses of an accumulator register across the asynchronous
// product (CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void wg_fence_reg(float& r) {
#ifndef PATCHLM_EMU
    asm volatile("" : "+f"(r)::"memory");
#else
    (void)r;
#endif
}

// The 32 accumulators of an m64n64 product as asm operands %0-%31 (read and written).
#define WG_D64_REGS                                                                                         \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define WG_D64_OUT                                                                                          \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// d (64 x 64, f32, the layout above) = a . b^T (+ d where scale_d), a (64 x 16) and b (64 x 16)
// bf16, both K-major in shared memory. With TRANS_A, a is given M-major instead, as (16 x 64) with
// its rows of 64 (M) contiguous (imm-trans-a = 1); with TRANS_B, b as (16 x 64), rows of N
// contiguous (imm-trans-b = 1: d = a . b): core matrices of 8 rows of K x 16 bytes (8 elements) of
// M or N, LBO their distance along K and SBO along M or N (see wgmma_m64n64k16_rs_bf16).
template <bool TRANS_A = false, bool TRANS_B = false>
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float* d, WgDesc a, WgDesc b, int scale_d) {
#ifdef PATCHLM_EMU
    emu::wgmma_ss_bf16<64>(d, a, b, scale_d != 0, TRANS_A, TRANS_B);
#else
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        WG_D64_REGS
        "%32, %33, p, 1, 1, %35, %36;\n"
        "}\n"
        : WG_D64_OUT
        : "l"(a), "l"(b), "r"(scale_d), "n"(TRANS_A ? 1 : 0), "n"(TRANS_B ? 1 : 0));
#endif
}

// d (64 x 64, f32) = a . b (+ d where scale_d): a (64 x 16, bf16) from registers, each warp's 16
// rows in mma.m16n8k16's A layout (4 registers a thread, as frag_a / acc_to_a in flash.cu leave
// them: a probability tile goes straight in); b (16 x 64) in shared memory MN-major (its rows of
// 64 contiguous, transposed by the instruction: imm-trans-b), core matrices of 8 rows of K x 16
// bytes (8 elements) of N.
// With TRANS_B false, b (64 x 16) K-major instead, as in wgmma_m64n64k16_bf16: d = a . b^T.
template <bool TRANS_B = true>
__device__ __forceinline__ void wgmma_m64n64k16_rs_bf16(float* d, const uint32_t* a, WgDesc b, int scale_d) {
#ifdef PATCHLM_EMU
    emu::wgmma_rs_bf16<64>(d, a, b, scale_d != 0, TRANS_B);
#else
#define WG_RS_ASM(TB)                                                                                      \
    asm volatile("{\n"                                                                                     \
                 ".reg .pred p;\n"                                                                         \
                 "setp.ne.b32 p, %37, 0;\n"                                                                \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D64_REGS                      \
                 "{%32, %33, %34, %35}, %36, p, 1, 1, " TB ";\n"                                          \
                 "}\n"                                                                                     \
                 : WG_D64_OUT                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d))
    if constexpr (TRANS_B) {
        WG_RS_ASM("1");
    } else {
        WG_RS_ASM("0");
    }
#undef WG_RS_ASM
#endif
}

// Writes a warpgroup's m64n64 accumulators (the layout above) times `mul` to d (64 x 64, row-major).
__device__ __forceinline__ void wg_store_d(float* d, const float* acc, float mul) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    for (int i = 0; i < 32; i++) {
        const int row = 16 * w + l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
        d[row * 64 + col] = acc[i] * mul;
    }
}

// Element (r, c) of a K-major operand (rows of 16 elements of K) in the core-matrix layout the
// probe uses: core matrix (r / 8, c / 8) at ((r / 8) * 2 + c / 8) * 64 elements, so LBO (along K)
// = 128 bytes and SBO (along the rows) = 256 bytes.
__device__ __forceinline__ int wg_probe_at(int r, int c) { return ((r / 8) * 2 + c / 8) * 64 + (r % 8) * 8 + c % 8; }

// Element (k, n) of a 16 x 64 operand MN-major in the probes' layout: core matrix (k / 8, n / 8)
// at (k / 8) * 1024 + (n / 8) * 128 bytes, row k % 8 of it 16 bytes (n % 8 the element).
__device__ __forceinline__ int wg_probe_mn_at(int k, int n) { return (k / 8) * 512 + (n / 8) * 64 + (k % 8) * 8 + n % 8; }

// The end of a probe: its products committed and waited for, d = acc times `mul` (row-major).
__device__ __forceinline__ void wg_probe_out(float* d, float* acc, float mul) {
    wg_commit();
    wg_wait<0>();
    for (int i = 0; i < 32; i++) wg_fence_reg(acc[i]);
    wg_store_d(d, acc, mul);
}

// The probe: one warpgroup computes d (64 x 64, row-major, f32) = a . b^T for a and b (64 x 16,
// row-major, bf16) with one wgmma, both operands staged in shared memory as above, the product
// issued twice (the second accumulating onto the first, scale_d on) and halved, so that both
// settings of scale_d are checked.
extern "C" __global__ void __launch_bounds__(128) probe_wgmma_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b,
                                                                   float* d) {
    __shared__ __align__(128) __nv_bfloat16 as[64 * 16];
    __shared__ __align__(128) __nv_bfloat16 bs[64 * 16];
    EMU_SHARED(as, bs);
    const int t = threadIdx.x;
    for (int e = t; e < 64 * 16; e += 128) {
        as[wg_probe_at(e / 16, e % 16)] = a[e];
        bs[wg_probe_at(e / 16, e % 16)] = b[e];
    }
    __syncthreads();
    wg_fence_smem();
    float acc[32];
    for (int i = 0; i < 32; i++) acc[i] = 0.0f;
    const WgDesc da = wg_desc(as, 128, 256), db = wg_desc(bs, 128, 256);
    wg_fence();
    wgmma_m64n64k16_bf16(acc, da, db, 0);
    wgmma_m64n64k16_bf16(acc, da, db, 1);
    wg_probe_out(d, acc, 0.5f);
}

// The second probe, the shape of a flash forward's p.v: d (64 x 64, row-major, f32) = a . b for a
// (64 x 16, row-major, bf16) loaded straight into registers in mma's A layout and b (16 x 64,
// row-major, bf16) staged in shared memory MN-major (wg_probe_mn_at). Which of the descriptor's two
// offsets is the distance along K and which along N for this layout is what the probe asks of the
// GPU: the descriptor carries `lbo` and `sbo` as given (the test tries both assignments).
extern "C" __global__ void __launch_bounds__(128) probe_wgmma_rs_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b,
                                                                      float* d, int lbo, int sbo) {
    __shared__ __align__(128) __nv_bfloat16 bs[16 * 64];
    EMU_SHARED(bs);
    const int t = threadIdx.x, w = t / 32, l = t % 32, g = l / 4, tq = l % 4;
    for (int e = t; e < 16 * 64; e += 128) bs[wg_probe_mn_at(e / 64, e % 64)] = b[e];
    // mma's A layout: register j holds rows g + 8 (j % 2), columns 2 tq + 8 (j / 2) and + 1.
    uint32_t ar[4];
    for (int j = 0; j < 4; j++) {
        const int row = 16 * w + g + 8 * (j % 2), col = 2 * tq + 8 * (j / 2);
        uint16_t lo, hi;
        memcpy(&lo, a + row * 16 + col, 2);
        memcpy(&hi, a + row * 16 + col + 1, 2);
        ar[j] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    __syncthreads();
    wg_fence_smem();
    float acc[32];
    for (int i = 0; i < 32; i++) acc[i] = 0.0f;
    wg_fence();
    wgmma_m64n64k16_rs_bf16(acc, ar, wg_desc(bs, lbo, sbo), 0);
    wg_probe_out(d, acc, 1.0f);
}

// The third probe, the shape of the one-pass backward's dq = dS . k: d (64 x 64, row-major, f32) =
// a^T . b for a (16 x 64: K x M) and b (16 x 64: K x N), row-major bf16, both staged in shared
// memory MN-major as b is in the second probe and read through descriptors with imm-trans-a and
// imm-trans-b; `lbo` and `sbo` go into both descriptors as given.
extern "C" __global__ void __launch_bounds__(128) probe_wgmma_ss_t_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b,
                                                                        float* d, int lbo, int sbo) {
    __shared__ __align__(128) __nv_bfloat16 as[16 * 64];
    __shared__ __align__(128) __nv_bfloat16 bs[16 * 64];
    EMU_SHARED(as, bs);
    for (int e = threadIdx.x; e < 16 * 64; e += 128) {
        as[wg_probe_mn_at(e / 64, e % 64)] = a[e];
        bs[wg_probe_mn_at(e / 64, e % 64)] = b[e];
    }
    __syncthreads();
    wg_fence_smem();
    float acc[32];
    for (int i = 0; i < 32; i++) acc[i] = 0.0f;
    wg_fence();
    wgmma_m64n64k16_bf16<true, true>(acc, wg_desc(as, lbo, sbo), wg_desc(bs, lbo, sbo), 0);
    wg_probe_out(d, acc, 1.0f);
}

// ---------------------------------------------------------------------------------------------
// Flash attention's forward on wgmma (PATCHLM_FLASH_WGMMA; bf16, head size 64): flash_mma_fwd's
// math and launch (64 query rows a block of one warpgroup, 64-key tiles double-buffered with
// cp.async, the last query blocks first), its two tile products as warpgroup MMAs: s = q . k^T
// with both operands in shared memory, o += p . v with p straight from the softmax's registers
// (mma's A layout, which wgmma's register operand shares) and v transposed from shared memory.
// Every tile is laid out in core matrices (WgTile); each warp's share of the accumulators is
// mma's C layout, so the softmax and the epilogue are flash.cu's (softmax_tile, fwd_rows_out).
// The whole warpgroup issues every product, so each warp takes every key tile of its block (the
// rows' masks zero what they do not see) where flash_mma_fwd skips the tiles past its own rows.
// With QREG (PATCHLM_FLASH_WGMMA_QREG) q goes from its tile into registers once (16 a thread), and
// s = q . k^T takes it from there: a step's products then read 16 KB of shared memory instead of
// 24 (the cp.async copies write 16 more), which by the shared-memory bandwidth (128 bytes a cycle
// an SM) is the difference between 320 cycles of reads and writes against 256 of tensor-core work
// a step (m64n64k16 at the dense bf16 rate) and 256 against 256.
// With WG = 2 (flash_wg_fwdw, PATCHLM_FLASH_WIDE with PATCHLM_FLASH_WGMMA) a block is two
// warpgroups, 128 query rows, sharing each (k, v) tile: half the tile copies from L2 and half the
// shared-memory writes a query row. (Each tile of a 64-row block is 16 KB for 256 tensor-core
// cycles, 64 bytes a cycle an SM, where published H100 figures of 5.5 to 12 TB/s from L2 make 25
// to 50 an SM on average; at 128 rows 32.)
// Each warpgroup takes the tiles its own rows see (the first skips the second's diagonal tile), so
// every row's arithmetic, and its output, is the 64-row kernel's.

// A tile of R rows x HD (16-bit) in core matrices: core matrix (r / 8, c / 8) at
// ((r / 8) (HD / 8) + c / 8) 64 elements, its rows 16 bytes apart. Along the rows core matrices
// lie HD * 16 bytes apart, along the columns 128: a K-major operand with LBO 128 and SBO HD * 16,
// or (the rows as K, v in p . v) an MN-major one with the distance along K, HD * 16, as LBO (the
// reading of emu::wgmma_rs_bf16 that the probe checks on a GPU; it is also the one CUTLASS's
// canonical unswizzled MN-major GMMA layout documents, ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) in
// cute's mma_sm90_desc notes, while its swizzled MN-major layouts put LBO along MN instead).
template <int HD>
struct WgTile {
    static constexpr uint32_t ALONG_ROWS = HD * 16, ALONG_COLS = 128;
    __device__ static __forceinline__ int at(int r, int c) { return ((r / 8) * (HD / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8; }
};

// Where word j of this lane's A fragment for k-step kk (mma.m16n8k16's A layout, the register
// operand of wgmma) lies in a WgTile<HD> of the warpgroup's 64 rows: row 16 w + lane / 4 + 8 (j % 2)
// of warp w, columns 16 kk + 8 (j / 2) + 2 (lane % 4) and the next (adjacent in a core-matrix row).
template <int HD>
__device__ __forceinline__ int wg_frag_at(int kk, int j) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    return WgTile<HD>::at(w * 16 + (lane >> 2) + 8 * (j % 2), kk * 16 + 8 * (j / 2) + 2 * (lane & 3));
}

// This warp's 16 rows of a WgTile<HD> as A fragments, HD / 16 k-steps (one 4-byte load a word;
// a warp's loads of one word cover 128 contiguous bytes: no bank conflicts).
template <int HD>
__device__ __forceinline__ void wg_frags_a(uint32_t (*fa)[4], const __nv_bfloat16* tile) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
        for (int j = 0; j < 4; j++) fa[kk][j] = *reinterpret_cast<const uint32_t*>(tile + wg_frag_at<HD>(kk, j));
    }
}

// Rows [r0, r0 + n) of a matrix of rows of HD (`ld` elements apart) into a WgTile of R rows (the
// rest zero) by cp.async, 16 bytes (one core-matrix row) per copy, where src and its rows are
// 16-byte aligned (else element by element, synchronously); the caller commits, waits and fences.
template <int HD, int R>
__device__ __forceinline__ void wg_rows_async(__nv_bfloat16* dst, const __nv_bfloat16* src, int ld, int r0, int n) {
    const bool aligned = (reinterpret_cast<uintptr_t>(src) & 15) == 0 && ld % 8 == 0;
    for (int e = threadIdx.x; e < R * (HD / 8); e += blockDim.x) {
        const int r = e / (HD / 8), c = (e % (HD / 8)) * 8;
        const __nv_bfloat16* from = src + (size_t)(r0 + min(r, n - 1)) * ld + c;
        if (aligned) {
            cp_async<16>(dst + WgTile<HD>::at(r, c), from, r < n);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) dst[WgTile<HD>::at(r, c) + i] = r < n ? from[i] : from_f<__nv_bfloat16>(0.0f);
        }
    }
}

// wg_rows_async of a (rows, HD) matrix.
template <int HD, int R>
__device__ __forceinline__ void wg_tile_async(__nv_bfloat16* dst, const __nv_bfloat16* src, int r0, int n) {
    wg_rows_async<HD, R>(dst, src, HD, r0, n);
}

// Keys [k0, k0 + BC) of k and v (s rows each; the rest zero) into a buffer of two WgTiles, as
// one cp.async group.
template <int HD, int BC>
__device__ __forceinline__ void wg_kv_async(__nv_bfloat16* buf, const __nv_bfloat16* k, const __nv_bfloat16* v, int k0,
                                            int s) {
    wg_tile_async<HD, BC>(buf, k, k0, min(BC, s - k0));
    wg_tile_async<HD, BC>(buf + BC * HD, v, k0, min(BC, s - k0));
    cp_async_commit();
}

// Keeps the compiler from moving accesses of the accumulators (N blocks of 4) of products that a
// wg_settle has already waited for above this point (without committing an empty group, which
// costs a product of its own).
template <int N>
__device__ __forceinline__ void wg_settled(float (*acc)[4]) {
#pragma unroll
    for (int n = 0; n < N; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) wg_fence_reg(acc[n][e]);
    }
}

// Waits for the warpgroup's products issued since the last commit and keeps the compiler from
// moving accesses of their accumulators (N blocks of 4) across them.
template <int N>
__device__ __forceinline__ void wg_settle(float (*acc)[4]) {
    wg_commit();
    wg_wait<0>();
    wg_settled<N>(acc);
}

// This thread's warpgroup in a block of WG warpgroups (each takes 64 of the block's rows or keys).
template <int WG>
__device__ __forceinline__ int wg_group() {
    return WG > 1 ? threadIdx.x >> 7 : 0;
}

// The query-side wgmma kernels' block (64 query rows of head bh a warpgroup, WG warpgroups, the
// last rows first): the head, its first row, the key offset, this lane's quad position, the keys
// the block needs, the first key its warp's first row sees, this lane's first row, the last key
// its warpgroup's rows see, and the head's k and v.
template <int HD, int WG = 1>
struct WgRows {
    int bh, i0, off, tq, kend, wfirst, row, glast;
    const __nv_bfloat16 *kb, *vb;
    __device__ WgRows(const __nv_bfloat16* k, const __nv_bfloat16* v, int t, int s) {
        bh = blockIdx.y;
        i0 = (gridDim.x - 1 - blockIdx.x) * 64 * WG;
        off = s - t;
        tq = threadIdx.x & 3;
        kend = min(s, off + i0 + 64 * WG);
        wfirst = off + i0 + (threadIdx.x >> 5) * 16;
        row = i0 + (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 2);
        glast = off + i0 + wg_group<WG>() * 64 + 63;
        kb = k + (size_t)bh * s * HD;
        vb = v + (size_t)bh * s * HD;
    }
};

template <int HD, bool QREG, int WG, bool SWAP>
__device__ void flash_wg_fwd(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                             __nv_bfloat16* o, float* lse, int t, int s, float scale, int oh) {
    static_assert(HD == 64, "the wgmma forward has head size 64 (its products are m64n64)");
    typedef __nv_bfloat16 T;
    constexpr int BC = 64, ROWS = 64 * WG;
    __shared__ __align__(128) T qs[ROWS * HD];
    __shared__ __align__(128) T kv[2][2 * BC * HD];  // two buffers of a (k, v) tile pair
    EMU_SHARED(qs, kv);
    const WgRows<HD, WG> b(k, v, t, s);
    const T* qg = qs + wg_group<WG>() * 64 * HD;  // this warpgroup's rows of the q tile
    const int bh = b.bh, i0 = b.i0, off = b.off, tq = b.tq, kend = b.kend, wfirst = b.wfirst;
    const T *kb = b.kb, *vb = b.vb;
    wg_tile_async<HD, ROWS>(qs, q + (size_t)bh * t * HD, i0, min(ROWS, t - i0));
    wg_kv_async<HD, BC>(kv[0], kb, vb, 0, s);  // one group with q
    const int row = b.row;  // this lane's rows: row and row + 8
    const float sl2 = scale * LOG2E_F;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    typedef WgTile<HD> L;
    uint32_t qa[QREG ? HD / 16 : 1][4];
    if constexpr (QREG) {
        cp_async_wait<0>();  // q's group (with the first key tile), then every thread's copies
        __syncthreads();
        wg_frags_a<HD>(qa, qs);
    }
    for (int k0 = 0, buf = 0; k0 < kend; k0 += BC, buf ^= 1) {
        // (The barrier at the step's start also means every warp's products from the other
        // buffer are done: each waited for them.)
        pipeline_step<true>(k0 + BC < kend, [&] { wg_kv_async<HD, BC>(kv[buf ^ 1], kb, vb, k0 + BC, s); });
        if (WG > 1 && k0 > b.glast) continue;  // no row of this warpgroup sees the tile
        const T* ks = kv[buf];
        const T* vs = kv[buf] + BC * HD;
        float sc[BC / 8][4];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {  // s = q . k^T, 16 columns of the head a product
            const WgDesc kd = wg_desc(ks + kk * 128, L::ALONG_COLS, L::ALONG_ROWS);
            if constexpr (QREG) {
                wgmma_m64n64k16_rs_bf16<false>(&sc[0][0], qa[kk], kd, kk > 0);
            } else {
                wgmma_m64n64k16_bf16(&sc[0][0], wg_desc(qg + kk * 128, L::ALONG_COLS, L::ALONG_ROWS), kd, kk > 0);
            }
        }
        wg_settle<BC / 8>(sc);
        uint32_t pa[BC / 16][4];
        softmax_tile<T, BC / 8, HD>(sc, m, l, acc, pa, k0 + BC - 1 > wfirst, sl2, k0, off + row, tq);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {  // o += p . v, 16 keys a product
            wgmma_m64n64k16_rs_bf16(&acc[0][0], pa[kk], wg_desc_mn<SWAP>(vs + kk * 2 * (HD / 8) * 64, L::ALONG_ROWS, L::ALONG_COLS), 1);
        }
        wg_settle<HD / 8>(acc);
    }
    fwd_rows_out<T, HD>(acc, m, l, o, lse, bh, row, t, tq, oh);
}

// dq on wgmma (PATCHLM_FLASH_WGMMA; bf16, head size 64): flash_mma_dq's math and launch (64 query
// rows a block of one warpgroup, the last first), its products as warpgroup MMAs: s = q . k^T and
// dP = dO . v^T with both operands in shared memory (q and dO staged once, as core matrices), then
// dq += dS . k with dS from registers and k transposed from shared memory. As in the forward, every
// warp takes every key tile of its block. With QREG (PATCHLM_FLASH_WGMMA_QREG) q goes from its
// tile into registers once (16 a thread) and s = q . k^T takes it from there: a step's products
// read 32 KB of shared memory instead of 40 (the copies write 16 more), 384 cycles of
// shared-memory traffic against 384 of tensor-core work instead of 448 (as in the forward; dO
// too would make it 320, for 178 registers a thread and two blocks an SM instead of three).
// With WG = 2 (flash_wg_dqw, PATCHLM_FLASH_WIDE with PATCHLM_FLASH_WGMMA) two warpgroups, 128
// query rows, share each (k, v) tile, as in the forward (the tiles then take 64 KB of dynamic
// shared memory: WgDqSmem).
template <int HD, int WG>
struct WgDqSmem {
    static constexpr int ROWS = 64 * WG, BC = 64, QD = ROWS * HD, KV = 2 * BC * HD;
    static constexpr int BYTES = (2 * QD + 2 * KV) * 2;
};

template <int HD, bool QREG, int WG, bool SWAP>
__device__ void flash_wg_dq(const __nv_bfloat16* q, const __nv_bfloat16* dout, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, const float* st, __nv_bfloat16* dq, int t, int s, float scale,
                            int oh) {
    static_assert(HD == 64, "the wgmma dq has head size 64 (its products are m64n64)");
    typedef __nv_bfloat16 T;
    using M = WgDqSmem<HD, WG>;
    constexpr int BC = M::BC, ROWS = M::ROWS;
    T *qd[2], *kv[2];  // the q and dO tiles; two buffers of a (k, v) tile pair
    if constexpr (WG == 1) {
        __shared__ __align__(128) T qd_s[2][M::QD];
        __shared__ __align__(128) T kv_s[2][M::KV];
        EMU_SHARED(qd_s, kv_s);
        qd[0] = qd_s[0], qd[1] = qd_s[1], kv[0] = kv_s[0], kv[1] = kv_s[1];
    } else {
        DYN_SHARED(dyn, M::BYTES);
        EMU_SHARED(dyn);
        qd[0] = reinterpret_cast<T*>(dyn);
        qd[1] = qd[0] + M::QD;
        kv[0] = qd[1] + M::QD;
        kv[1] = kv[0] + M::KV;
    }
    const WgRows<HD, WG> b(k, v, t, s);
    const int bh = b.bh, i0 = b.i0, off = b.off, tq = b.tq, kend = b.kend, wfirst = b.wfirst;
    const T *kb = b.kb, *vb = b.vb;
    const OutRows rd = out_rows(bh, t, HD, oh);
    wg_tile_async<HD, ROWS>(qd[0], q + (size_t)bh * t * HD, i0, min(ROWS, t - i0));
    wg_rows_async<HD, ROWS>(qd[1], dout + rd.base, rd.ld, i0, min(ROWS, t - i0));
    wg_kv_async<HD, BC>(kv[0], kb, vb, 0, s);  // one group with q and dO
    const int gq = wg_group<WG>() * 64 * HD;  // this warpgroup's rows of the q and dO tiles
    const int row = b.row;  // this lane's rows: row and row + 8
    float lse[2], delta[2], acc[HD / 8][4];
    dq_row_stats(st, bh, row, t, lse, delta);
#pragma unroll
    for (int n = 0; n < HD / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const float sl2 = scale * LOG2E_F;
    typedef WgTile<HD> L;
    uint32_t qa[QREG ? HD / 16 : 1][4];
    if constexpr (QREG) {
        cp_async_wait<0>();  // q's group (with dO and the first key tile), then every thread's
        __syncthreads();
        wg_frags_a<HD>(qa, qd[0]);
    }
    for (int k0 = 0, buf = 0; k0 < kend; k0 += BC, buf ^= 1) {
        pipeline_step<true>(k0 + BC < kend, [&] { wg_kv_async<HD, BC>(kv[buf ^ 1], kb, vb, k0 + BC, s); });
        if (WG > 1 && k0 > b.glast) continue;  // no row of this warpgroup sees the tile
        const T* ks = kv[buf];
        const T* vs = kv[buf] + BC * HD;
        float sc[BC / 8][4], dp[BC / 8][4];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {  // s = q . k^T and dP = dO . v^T
            const WgDesc kd = wg_desc(ks + kk * 128, L::ALONG_COLS, L::ALONG_ROWS);
            const WgDesc vd = wg_desc(vs + kk * 128, L::ALONG_COLS, L::ALONG_ROWS);
            if constexpr (QREG) {
                wgmma_m64n64k16_rs_bf16<false>(&sc[0][0], qa[kk], kd, kk > 0);
            } else {
                wgmma_m64n64k16_bf16(&sc[0][0], wg_desc(qd[0] + gq + kk * 128, L::ALONG_COLS, L::ALONG_ROWS), kd, kk > 0);
            }
            wgmma_m64n64k16_bf16(&dp[0][0], wg_desc(qd[1] + gq + kk * 128, L::ALONG_COLS, L::ALONG_ROWS), vd, kk > 0);
        }
        wg_settle<BC / 8>(sc);
        wg_settled<BC / 8>(dp);
        uint32_t dsa[BC / 16][4];
        ds_tile<T, BC / 8>(dsa, sc, dp, lse, delta, k0 + BC - 1 <= wfirst, sl2, k0, off + row, tq);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {  // dq += dS . k, 16 keys a product
            wgmma_m64n64k16_rs_bf16(&acc[0][0], dsa[kk], wg_desc_mn<SWAP>(ks + kk * 2 * (HD / 8) * 64, L::ALONG_ROWS, L::ALONG_COLS), 1);
        }
        wg_settle<HD / 8>(acc);
    }
    mma_rows_out<T, HD>(acc, dq + (size_t)bh * t * HD, row, t, tq, scale);
}

// The shared memory of the wgmma dk/dv pass: two buffers of a (q, dO) tile pair of BQ rows (as
// WgTiles) and their rows' (lse, delta); with DQ (the one-pass backward) also the block's k tile
// and a step's dS^T tile (WgTiles, keys as rows), past the 48 KB of static shared memory: dynamic.
template <int HD, bool DQ>
struct WgDkvSmem {
    static constexpr int BQ = 64, KEYS = 64;
    static constexpr int QD = 2 * 2 * BQ * HD, KT = DQ ? KEYS * HD : 0, DST = DQ ? KEYS * BQ : 0;
    static constexpr int BYTES = (QD + KT + DST) * 2 + 2 * BQ * (int)sizeof(float2);
};

// dk and dv on wgmma (PATCHLM_FLASH_WGMMA; bf16, head size 64): flash_mma_dkv's math and launch
// (64 keys a block of one warpgroup, each warp's 16 keys with their k and v fragments in
// registers, the first keys first), the queries streamed in tiles of 64 (q, dO and their (lse,
// delta) pairs), double-buffered: s^T = k . q^T and dP^T = v . dO^T with k and v from registers
// and q, dO K-major from shared memory; dv += P^T . dO and dk += dS^T . q with P^T and dS^T from
// registers and dO, q transposed from shared memory.
// With DQ (flash_wg_dkvq; PATCHLM_FLASH_WGMMA with PATCHLM_FLASH_DQ_ATOMIC): dq in the same pass,
// as flash_mma_dkvq does it: each step's dS^T (rounded to bf16, as dk's product takes it) goes to
// shared memory, and the block's share of dq = dS . k (f32, not yet scaled) is one more warpgroup
// product, dS read M-major from the dS^T tile and k transposed from a k tile kept in shared
// memory, issued with dv's and dk's; it is added into dq_acc (zeroed by the caller) with atomics,
// and flash_dq_cast scales and rounds it. 5 tile products a step instead of the two passes' 7.
// With WG = 2 (flash_wg_dkvw, PATCHLM_FLASH_WIDE_BWD with PATCHLM_FLASH_WGMMA; not with DQ) a
// block is two warpgroups, 128 keys, sharing each (q, dO) tile: half the tile copies from L2 a
// key. Each warpgroup skips the tiles of queries that see none of its keys, so where the queries'
// tiles start where the one-warpgroup blocks' do (S = T) each key's arithmetic is theirs.
template <int HD, bool DQ, int WG, bool SWAP>
__device__ void flash_wg_dkv(const __nv_bfloat16* q, const __nv_bfloat16* dout, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const float* st, __nv_bfloat16* dk, __nv_bfloat16* dv,
                             float* dq_acc, int t, int s, float scale, int oh) {
    static_assert(HD == 64, "the wgmma dk/dv pass has head size 64 (its products are m64n64)");
    static_assert(WG == 1 || !DQ, "the one-pass backward has one warpgroup a block");
    typedef __nv_bfloat16 T;
    using M = WgDkvSmem<HD, DQ>;
    constexpr int BQ = M::BQ, KEYS = M::KEYS, LD = HD + 8;
    static_assert(KEYS * WG * LD <= M::QD, "the k or v tile is staged where the query tiles go");
    T *qd, *kt, *dst;
    float2(*lsd)[BQ];
    if constexpr (!DQ) {
        __shared__ __align__(128) T qd_s[M::QD];      // two buffers of a (q, dO) tile pair
        __shared__ __align__(16) float2 lsd_s[2][BQ];  // and their rows' (lse, delta)
        EMU_SHARED(qd_s, lsd_s);
        qd = qd_s;
        kt = dst = nullptr;
        lsd = lsd_s;
    } else {
        DYN_SHARED(dyn, M::BYTES);
        EMU_SHARED(dyn);
        qd = reinterpret_cast<T*>(dyn);
        kt = qd + M::QD;
        dst = kt + M::KT;
        lsd = reinterpret_cast<float2(*)[BQ]>(dst + M::DST);
    }
    const int bh = blockIdx.y, j0 = blockIdx.x * KEYS * WG, off = s - t;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
    // The block's k and v rows as A fragments, each staged row-major through the query buffers.
    const int nk = min(KEYS * WG, s - j0);
    const T* kh = k + (size_t)bh * s * HD;
    uint32_t ka[HD / 16][4], va[HD / 16][4];
    auto stage_frags = [&](uint32_t(*fa)[4], const T* src) {
        tc_tile_in<T, HD, LD, KEYS * WG>(qd, src, j0, nk);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) frag_a(fa[kk], qd + w * 16 * LD, LD, kk);
        __syncthreads();  // the staging area is free again
    };
    stage_frags(ka, kh);
    stage_frags(va, v + (size_t)bh * s * HD);
    const OutRows rd = out_rows(bh, t, HD, oh);
    const T* qb = q + (size_t)bh * t * HD;
    const T* db = dout + rd.base;
    const float* sb = st + (size_t)bh * t * 2;
    auto fetch = [&](int buf, int q0) {
        const int n = min(BQ, t - q0);
        T* qt = qd + buf * 2 * BQ * HD;
        wg_tile_async<HD, BQ>(qt, qb, q0, n);
        wg_rows_async<HD, BQ>(qt + BQ * HD, db, rd.ld, q0, n);
        for (int e = threadIdx.x; e < BQ; e += blockDim.x) cp_async<8>(lsd[buf] + e, sb + (size_t)(q0 + min(e, n - 1)) * 2, e < n);
        cp_async_commit();
    };
    const int qfirst = max(0, j0 - off);  // < t: the grid has no block past the last key
    const int gfirst = j0 + wg_group<WG>() * KEYS;  // this warpgroup's first key
    if constexpr (DQ) wg_tile_async<HD, KEYS>(kt, kh, j0, nk);  // (in the first fetch's group)
    fetch(0, qfirst);
    const int wfirst = j0 + w * 16, key = wfirst + (lane >> 2);  // this lane's keys: key and key + 8
    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.0f;
    }
    const float sl2 = scale * LOG2E_F;
    typedef WgTile<HD> L;
    for (int q0 = qfirst, buf = 0; q0 < t; q0 += BQ, buf ^= 1) {
        // (With DQ the barrier also means every warp's dq product from the last step, which read
        // the dS^T tile, is done: each waited for it.)
        pipeline_step<true>(q0 + BQ < t, [&] { fetch(buf ^ 1, q0 + BQ); });
        if (WG > 1 && q0 + BQ - 1 + off < gfirst) continue;  // no query of the tile sees its keys
        const T* qs = qd + buf * 2 * BQ * HD;
        const T* dos = qs + BQ * HD;
        float sc[BQ / 8][4], dp[BQ / 8][4];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {  // s^T = k . q^T and dP^T = v . dO^T
            wgmma_m64n64k16_rs_bf16<false>(&sc[0][0], ka[kk], wg_desc(qs + kk * 128, L::ALONG_COLS, L::ALONG_ROWS), kk > 0);
            wgmma_m64n64k16_rs_bf16<false>(&dp[0][0], va[kk], wg_desc(dos + kk * 128, L::ALONG_COLS, L::ALONG_ROWS), kk > 0);
        }
        wg_settle<BQ / 8>(sc);
        wg_settled<BQ / 8>(dp);
        // No query of the tile is past t or sees fewer than all the warp's keys: no mask.
        const bool full = wfirst + 15 <= off + q0 && q0 + BQ <= t;
        uint32_t pa[BQ / 16][4], dsa[BQ / 16][4];
        dkv_probs<T, BQ / 8>(pa, dsa, sc, dp, lsd[buf], full, key, q0, t, off, sl2, tq);
        if constexpr (DQ) {
            // dS^T into its tile (keys as rows, queries as columns), each fragment word where it
            // came from (wg_frag_at).
#pragma unroll
            for (int kk = 0; kk < BQ / 16; kk++) {
#pragma unroll
                for (int j = 0; j < 4; j++) *reinterpret_cast<uint32_t*>(dst + wg_frag_at<BQ>(kk, j)) = dsa[kk][j];
            }
            wg_fence_smem();  // each thread's stores, then the barrier: the tile for wgmma
            __syncthreads();
        }
        float dqa[HD / 8][4];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {  // dv += P^T . dO and dk += dS^T . q, 16 queries a product
            const int at = kk * 2 * (HD / 8) * 64;
            wgmma_m64n64k16_rs_bf16(&dva[0][0], pa[kk], wg_desc_mn<SWAP>(dos + at, L::ALONG_ROWS, L::ALONG_COLS), 1);
            wgmma_m64n64k16_rs_bf16(&dka[0][0], dsa[kk], wg_desc_mn<SWAP>(qs + at, L::ALONG_ROWS, L::ALONG_COLS), 1);
        }
        if constexpr (DQ) {
            // dq (queries x head) = dS . k over the block's keys, 16 keys a product: dS M-major from
            // the dS^T tile (keys as rows: K), k transposed from its tile (keys as rows: K).
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; kk++) {
                const int at = kk * 2 * (HD / 8) * 64;
                wgmma_m64n64k16_bf16<true, true>(&dqa[0][0],
                                                 wg_desc_mn<SWAP>(dst + at, WgTile<BQ>::ALONG_ROWS, WgTile<BQ>::ALONG_COLS),
                                                 wg_desc_mn<SWAP>(kt + at, L::ALONG_ROWS, L::ALONG_COLS), kk > 0);
            }
        }
        wg_settle<HD / 8>(dva);
        wg_settled<HD / 8>(dka);
        if constexpr (DQ) {
            wg_settled<HD / 8>(dqa);
            float* dqb = dq_acc + (size_t)bh * t * HD;
#pragma unroll
            for (int h = 0; h < 2; h++) {  // this lane's queries: its warp's 16 rows' g and g + 8
                const int qi = q0 + w * 16 + (lane >> 2) + 8 * h;
                if (qi >= t) continue;
#pragma unroll
                for (int n = 0; n < HD / 8; n++) {  // two adjacent columns: one 8-byte atomic
                    atomic_add_w<2>(dqb + (size_t)qi * HD + n * 8 + 2 * tq, &dqa[n][2 * h]);
                }
            }
        }
    }
    mma_rows_out<T, HD>(dka, dk + (size_t)bh * s * HD, key, s, tq, scale);
    mma_rows_out<T, HD>(dva, dv + (size_t)bh * s * HD, key, s, tq, 1.0f);
}

// The flash entry points (bf16, head size 64) of one reading of MN-major descriptors (see
// wg_desc_mn): the forward (fwd; q in registers fwdr; two warpgroups fwdw, fwdwr), dq (dq, dqr,
// dqw, dqwr), dk/dv (dkv; two warpgroups dkvw) and the one pass (dkvq).
#define WG_Q_ARGS const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, __nv_bfloat16 *o, float *lse
#define WG_G_ARGS const __nv_bfloat16 *q, const __nv_bfloat16 *dout, const __nv_bfloat16 *k, const __nv_bfloat16 *v, \
                  const float *st
#define FLASH_WG_ENTRIES(P, SWAP)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) P##_fwd_bf16_64(WG_Q_ARGS, int t, int s, float scale, int oh) { \
        flash_wg_fwd<64, false, 1, SWAP>(q, k, v, o, lse, t, s, scale, oh);                                \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) P##_fwdr_bf16_64(WG_Q_ARGS, int t, int s, float scale, int oh) { \
        flash_wg_fwd<64, true, 1, SWAP>(q, k, v, o, lse, t, s, scale, oh);                                 \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) P##_fwdw_bf16_64(WG_Q_ARGS, int t, int s, float scale, int oh) { \
        flash_wg_fwd<64, false, 2, SWAP>(q, k, v, o, lse, t, s, scale, oh);                                \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) P##_fwdwr_bf16_64(WG_Q_ARGS, int t, int s, float scale, int oh) { \
        flash_wg_fwd<64, true, 2, SWAP>(q, k, v, o, lse, t, s, scale, oh);                                 \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) P##_dq_bf16_64(WG_G_ARGS, __nv_bfloat16 *out, int t, int s, \
                                                                     float scale, int oh) {                \
        flash_wg_dq<64, false, 1, SWAP>(q, dout, k, v, st, out, t, s, scale, oh);                          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) P##_dqr_bf16_64(WG_G_ARGS, __nv_bfloat16 *out, int t, int s, \
                                                                      float scale, int oh) {               \
        flash_wg_dq<64, true, 1, SWAP>(q, dout, k, v, st, out, t, s, scale, oh);                           \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) P##_dqw_bf16_64(WG_G_ARGS, __nv_bfloat16 *out, int t, int s, \
                                                                      float scale, int oh) {               \
        flash_wg_dq<64, false, 2, SWAP>(q, dout, k, v, st, out, t, s, scale, oh);                          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) P##_dqwr_bf16_64(WG_G_ARGS, __nv_bfloat16 *out, int t, int s, \
                                                                       float scale, int oh) {              \
        flash_wg_dq<64, true, 2, SWAP>(q, dout, k, v, st, out, t, s, scale, oh);                           \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) P##_dkv_bf16_64(WG_G_ARGS, __nv_bfloat16 *dk, __nv_bfloat16 *dv, \
                                                                      int t, int s, float scale, int oh) { \
        flash_wg_dkv<64, false, 1, SWAP>(q, dout, k, v, st, dk, dv, nullptr, t, s, scale, oh);             \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) P##_dkvw_bf16_64(WG_G_ARGS, __nv_bfloat16 *dk, __nv_bfloat16 *dv, \
                                                                       int t, int s, float scale, int oh) { \
        flash_wg_dkv<64, false, 2, SWAP>(q, dout, k, v, st, dk, dv, nullptr, t, s, scale, oh);             \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) P##_dkvq_bf16_64(WG_G_ARGS, __nv_bfloat16 *dk, __nv_bfloat16 *dv, \
                                                                       float *dq_acc, int t, int s, float scale, int oh) { \
        flash_wg_dkv<64, true, 1, SWAP>(q, dout, k, v, st, dk, dv, dq_acc, t, s, scale, oh);               \
    }
FLASH_WG_ENTRIES(flash_wg, false)
FLASH_WG_ENTRIES(flash_wgs, true)

// The two-warpgroup dq's dynamic shared memory (WgDqSmem) for tests/emulated.rs to hold against
// the launcher's size (patchlm_model::launch::flash_wg_dqw_smem).
extern "C" __global__ void flash_wg_dqw_smem_bytes(int* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = WgDqSmem<64, 2>::BYTES;
}

// The wgmma one pass's dynamic shared memory (WgDkvSmem) for tests/emulated.rs to hold against the
// launcher's size (patchlm_model::launch::flash_wg_dkvq_smem).
extern "C" __global__ void flash_wg_dkvq_smem_bytes(int* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = WgDkvSmem<64, true>::BYTES;
}
