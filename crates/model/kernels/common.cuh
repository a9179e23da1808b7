// Shared by the kernel files of patchlm-model: dtype conversions (f32 arithmetic on f32, bf16
// and f16 storage) and vector atomics.
#pragma once
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

// A wide access of `bytes` bytes at p must be aligned to them (the GPU faults otherwise): the CPU
// stand-in of tests/emulated.rs checks it at every such access, so that a kernel taking its vector
// path on an unaligned buffer fails there too (x86 would read it); nothing on the GPU.
#ifndef PATCHLM_EMU
#define EMU_ALIGNED(p, bytes) ((void)0)
#endif

// acc[0..W) += g[0..W) atomically, element by element; W = 2 or 4 (acc aligned to W floats) as
// one vector atomic where the GPU has them (sm_90: a half or a quarter of the operations).
template <int W>
__device__ __forceinline__ void atomic_add_w(float* acc, const float* g) {
    EMU_ALIGNED(acc, 4 * W);
#if !defined(PATCHLM_EMU) && __CUDA_ARCH__ >= 900
    if constexpr (W == 4) {
        atomicAdd(reinterpret_cast<float4*>(acc), make_float4(g[0], g[1], g[2], g[3]));
    } else if constexpr (W == 2) {
        atomicAdd(reinterpret_cast<float2*>(acc), make_float2(g[0], g[1]));
    } else
#endif
    {
#pragma unroll
        for (int w = 0; w < W; w++) atomicAdd(acc + w, g[w]);
    }
}

// Names a block's __shared__ arrays for the CPU stand-in of tests/emulated.rs (kernels/emu), which
// fills them with NaN when a block first reaches this line, so that a read of shared memory the
// block has not written shows there; nothing on the GPU.
#ifndef PATCHLM_EMU
#define EMU_SHARED(...)
#endif

// A block's dynamic shared memory as `name`, BYTES bytes, 16-byte aligned (the launcher passes the
// size, and above 48 KB raises the kernel's limit to it); in the CPU stand-in, a static array.
#ifdef PATCHLM_EMU
#define DYN_SHARED(name, BYTES) static __align__(16) unsigned char name[BYTES]
#else
#define DYN_SHARED(name, BYTES) extern __shared__ __align__(16) unsigned char name[]
#endif
