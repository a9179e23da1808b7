// Tensor-core instructions for the CPU stand-in of CUDA (see cuda_emu.h): mma.sync, ldmatrix and
// Hopper's wgmma, each lane holding its fragments in the PTX ISA's layouts.
#pragma once
#include "cuda_emu.h"
#include "emu_types.h"

namespace emu {

inline float emu_f(float v) { return v; }
inline float emu_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float emu_f(__half v) { return __half2float(v); }

// PTX mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d (16x8, f32) += a (16x16) . b (16x8),
// each lane holding the fragments of the PTX ISA's layout (groupID g = lane / 4, t = lane % 4):
// a: 4 registers of two elements, (row g, cols 2t..2t+1), (row g+8, same), (row g, cols 2t+8..),
// (row g+8, cols 2t+8..); b: 2 registers, (rows 2t..2t+1, col g), (rows 2t+8.., col g); d: (row g,
// cols 2t, 2t+1), (row g+8, same). The lower half of a register holds the lower index.
template <typename T>
inline void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
    uint32_t A[4][32], B[2][32];
    for (int i = 0; i < 4; i++) warp_all(a[i], A[i]);
    for (int i = 0; i < 2; i++) warp_all(b[i], B[i]);
    auto elem = [](uint32_t r, int hi) {
        uint16_t h = hi ? (uint16_t)(r >> 16) : (uint16_t)(r & 0xffff);
        T x;
        memcpy(&x, &h, 2);
        return emu_f(x);
    };
    auto a_at = [&](int row, int k) { return elem(A[(row >> 3) + 2 * (k >> 3)][4 * (row & 7) + ((k & 7) >> 1)], k & 1); };
    auto b_at = [&](int k, int n) { return elem(B[k >> 3][4 * n + ((k & 7) >> 1)], k & 1); };
    const int lane = lane_id(), g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; k++) acc += a_at(row, k) * b_at(k, col);
        d[i] = acc;
    }
}

// PTX ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16 (N = 4 or 2): N 8x8 matrices of 16-bit
// elements. Lane 8j + r (j < N) gives the address of row r of matrix j (16 bytes, 16-byte
// aligned; the other lanes' addresses are ignored); register j of lane l receives matrix j's row
// l / 4, elements 2(l % 4) and 2(l % 4) + 1 (the lower index in the lower half), or with .trans
// the same of the transposed matrix: rows 2(l % 4) and 2(l % 4) + 1 of column l / 4.
template <int N, bool TRANS>
inline void ldmatrix_n(uint32_t* r, const void* row) {
    static_assert(N == 4 || N == 2, "ldmatrix loads 4 or 2 matrices here");
    uint64_t rows[32];
    warp_all((uint64_t) reinterpret_cast<uintptr_t>(row), rows);
    const int lane = lane_id(), g = lane >> 2, t = lane & 3;
    if (lane < 8 * N && (reinterpret_cast<uintptr_t>(row) & 15) != 0) {
        fprintf(stderr, "emu: ldmatrix row address %p is not 16-byte aligned\n", row);
        exit(4);
    }
    auto at = [&](int m, int rr, int c) {
        uint16_t h;
        memcpy(&h, reinterpret_cast<const char*>(static_cast<uintptr_t>(rows[8 * m + rr])) + 2 * c, 2);
        return (uint32_t)h;
    };
    for (int j = 0; j < N; j++) {
        r[j] = TRANS ? at(j, 2 * t, g) | (at(j, 2 * t + 1, g) << 16) : at(j, g, 2 * t) | (at(j, g, 2 * t + 1) << 16);
    }
    __syncwarp();  // no lane's later store to the rows lands before every lane has read them
}

template <bool TRANS>
inline void ldmatrix_x4(uint32_t* r, const void* row) {
    ldmatrix_n<4, TRANS>(r, row);
}

template <bool TRANS>
inline void ldmatrix_x2(uint32_t* r, const void* row) {
    ldmatrix_n<2, TRANS>(r, row);
}

// A wgmma shared-memory matrix descriptor (kernels/hopper.cu): the GPU's 64-bit word without its
// address field (a host address does not fit its 14 bits), and the address beside it.
struct WgmmaDesc {
    const void* p;
    uint64_t bits;
};

// PTX wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 with both operands in shared memory
// through descriptors, without swizzling. K-major (trans_a / trans_b false): element (r, k) of an
// operand (r a row of M or N, k < 16) is the 16-bit value at p + (r / 8) SBO + (k / 8) LBO +
// (r % 8) 16 + (k % 8) 2 bytes (core matrices of 8 rows x 16 bytes; LBO = bits 16-29, SBO = bits
// 32-45, each in units of 16 bytes). MN-major (imm-trans-a / imm-trans-b = 1): element (r, k) at
// p + (k / 8) LBO + (r / 8) SBO + (k % 8) 16 + (r % 8) 2 (see wgmma_rs_bf16). Thread t of the warpgroup (warp w = t / 32, lane l) accumulates its N / 2 values of
// d = a . b^T (+ d where scale_d): value i is row 16w + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) +
// 2 (l % 4) + i % 2. Computed when issued (the GPU reads the operands at some point before the
// wait; a kernel that rewrites them in between is wrong on both).
// Whether this run reads unswizzled MN-major descriptors the other way round (LBO along M or N,
// SBO along K; EMU_WGMMA_MN_SWAP=1): a stand-in for a GPU that read them so, to test the kernels
// built for that reading (kernels/hopper.cu wg_desc_mn).
inline bool wgmma_mn_swapped() {
    static const bool swapped = [] {
        const char* v = getenv("EMU_WGMMA_MN_SWAP");
        return v != nullptr && v[0] == '1';
    }();
    return swapped;
}

template <int N>
inline void wgmma_ss_bf16(float* d, WgmmaDesc a, WgmmaDesc b, bool scale_d, bool trans_a = false,
                          bool trans_b = false) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma's N is a multiple of 8 up to 256");
    for (const WgmmaDesc* m : {&a, &b}) {
        if ((m->bits >> 62) != 0 || ((m->bits >> 49) & 7) != 0 || (m->bits & 0x3FFF) != 0 ||
            (reinterpret_cast<uintptr_t>(m->p) & 15) != 0) {
            fprintf(stderr, "emu: wgmma descriptor %llx at %p: only unswizzled, 16-byte aligned operands here\n",
                    (unsigned long long)m->bits, m->p);
            exit(4);
        }
    }
    if (g_bdim.x * g_bdim.y * g_bdim.z % 128 != 0) {
        fprintf(stderr, "emu: wgmma needs whole warpgroups (128 threads) in a block\n");
        exit(4);
    }
    auto at = [](const WgmmaDesc& m, int r, int k, bool mn_major) {
        size_t lbo = ((m.bits >> 16) & 0x3FFF) << 4, sbo = ((m.bits >> 32) & 0x3FFF) << 4;
        if (mn_major && wgmma_mn_swapped()) std::swap(lbo, sbo);
        const size_t off = mn_major ? (k / 8) * lbo + (r / 8) * sbo + (k % 8) * 16 + (r % 8) * 2
                                    : (r / 8) * sbo + (k / 8) * lbo + (r % 8) * 16 + (k % 8) * 2;
        __nv_bfloat16 x;
        memcpy(&x, static_cast<const char*>(m.p) + off, 2);
        return __bfloat162float(x);
    };
    const int t = lin() % 128, w = t / 32, l = t % 32;
    for (int i = 0; i < N / 2; i++) {
        const int row = 16 * w + l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
        float acc = scale_d ? d[i] : 0.0f;
        for (int k = 0; k < 16; k++) acc += at(a, row, k, trans_a) * at(b, col, k, trans_b);
        d[i] = acc;
    }
}

// The same with A from registers (each warp's 16 rows in mma.m16n8k16's A layout, 4 registers a
// thread: register j of lane l holds row l / 4 + 8 (j % 2), columns 2 (l % 4) + 8 (j / 2) and + 1)
// and B either K-major as above (trans_b false: d = a . b^T) or (16 x N) MN-major, transposed by
// the instruction (imm-trans-b = 1: d = a . b): element (k, n) at p + (k / 8) LBO + (n / 8) SBO +
// (k % 8) 16 + (n % 8) 2 bytes, LBO the distance between core matrices adjacent along K as for
// K-major operands (the reading that tests/cuda.rs's probe puts to a GPU beside the swapped one).
template <int N>
inline void wgmma_rs_bf16(float* d, const uint32_t* a, WgmmaDesc b, bool scale_d, bool trans_b) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma's N is a multiple of 8 up to 256");
    if ((b.bits >> 62) != 0 || ((b.bits >> 49) & 7) != 0 || (b.bits & 0x3FFF) != 0 ||
        (reinterpret_cast<uintptr_t>(b.p) & 15) != 0 || g_bdim.x * g_bdim.y * g_bdim.z % 128 != 0) {
        fprintf(stderr, "emu: wgmma (A in registers): only unswizzled, 16-byte aligned B and whole warpgroups here\n");
        exit(4);
    }
    uint32_t A[4][32];
    for (int j = 0; j < 4; j++) warp_all(a[j], A[j]);
    auto a_at = [&](int row, int k) {  // row < 16: the warp's own rows
        const uint32_t r = A[(row >> 3) + 2 * (k >> 3)][4 * (row & 7) + ((k & 7) >> 1)];
        __nv_bfloat16 x{(uint16_t)((k & 1) ? r >> 16 : r & 0xffff)};
        return __bfloat162float(x);
    };
    size_t lbo = ((b.bits >> 16) & 0x3FFF) << 4, sbo = ((b.bits >> 32) & 0x3FFF) << 4;
    if (trans_b && wgmma_mn_swapped()) std::swap(lbo, sbo);
    auto b_at = [&](int k, int n) {
        __nv_bfloat16 x;
        const size_t at = trans_b ? (k / 8) * lbo + (n / 8) * sbo + (k % 8) * 16 + (n % 8) * 2
                                  : (n / 8) * sbo + (k / 8) * lbo + (n % 8) * 16 + (k % 8) * 2;
        memcpy(&x, static_cast<const char*>(b.p) + at, 2);
        return __bfloat162float(x);
    };
    const int l = lane_id();
    for (int i = 0; i < N / 2; i++) {
        const int row = l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
        float acc = scale_d ? d[i] : 0.0f;
        for (int k = 0; k < 16; k++) acc += a_at(row, k) * b_at(k, col);
        d[i] = acc;
    }
}

}  // namespace emu
