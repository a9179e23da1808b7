// A CPU stand-in for the part of CUDA that patchlm's kernels use, so that the kernel sources in
// kernels/*.cu can be compiled with a host C++ compiler and their math tested on machines without
// a GPU (crates/model/tests/emulated.rs). Not a simulator of timing or of the memory model.
//
// Execution: a launch runs its blocks one after another; the threads of a block are fibers
// (ucontext) switched cooperatively on one OS thread, so `__shared__` can be a function-local
// `static` (one block lives at a time) and every run is deterministic. Each fiber runs until it
// waits at a barrier. The scheduler visits the fibers in thread order or (`g_s.reverse`, which
// also runs the blocks from the last to the first) in reverse order, in sweeps (every runnable
// fiber once, then again: warps move in step) or (`g_s.greedy`) always resuming the first
// runnable one (one warp runs ahead as far as the barriers let it). A kernel whose result differs between schedules reads what another thread
// writes, or writes what another still reads, without a barrier between them
// (tests/emulated.rs runs every launch under three schedules). Barriers follow the
// hardware rules: `__syncthreads` waits for every thread of the block that has not exited, warp
// operations (shuffles, votes, `__syncwarp`, ldmatrix, mma.sync) for every live lane of the warp.
// A thread that waits forever (a barrier in divergent code) aborts the run with a message.
//
// cp.async: a copy's destination holds a poison pattern from the issue until the issuing thread's
// cp.async.wait_group retires the copy's group (not at a barrier: a barrier does not wait for
// copies), so both a read before the wait and a copy into a buffer still being read show.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <map>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3() = default;
    dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace emu {

// The position of the running fiber; `threadIdx` and friends read these.
inline dim3 g_thread, g_block, g_bdim, g_gdim;

struct Barrier {
    int live = 0, arrived = 0;
    unsigned gen = 0;
};

// One 16-byte cp.async: the bytes it brings (read at issue: its sources never change during a
// launch) and where they land.
struct AsyncCopy {
    void* dst;
    unsigned char bytes[16];
    int n;  // 16, or 8 (cp.async.ca's smaller copies)
};

struct Fiber {
    ucontext_t ctx;
    std::vector<AsyncCopy> open;                  // cp.async issued since the last commit
    std::vector<std::vector<AsyncCopy>> groups;   // committed groups, oldest first
    char* stack = nullptr;
    dim3 tid;
    bool done = false;
    const Barrier* waiting = nullptr;  // the barrier this fiber waits at, if any
    unsigned gen = 0;                  // its generation when the fiber arrived
};

struct Sched {
    std::vector<Fiber> fibers;
    std::vector<Barrier> warps;
    Barrier block;
    ucontext_t main;
    int cur = 0;
    std::function<void()> body;
    std::vector<uint64_t> xchg;  // one 8-byte slot per thread: shuffle exchange
    bool reverse = false;        // run the blocks, and visit the fibers, from the last to the first
    bool greedy = false;         // after each switch, resume the first runnable fiber again
    unsigned epoch = 0;          // counts blocks: which __shared__ arrays this block has poisoned
    std::map<void*, unsigned> poisoned;
};

inline Sched g_s;
constexpr size_t kStack = 256 * 1024;

inline int lin() { return g_s.cur; }
inline int lane_id() { return lin() & 31; }
inline int warp_id() { return lin() >> 5; }

inline void yield() { swapcontext(&g_s.fibers[g_s.cur].ctx, &g_s.main); }

// What a launch did that its output cannot show, printed by the harness: wide accesses
// (EMU_ALIGNED: 16-byte loads and stores, vector atomics, each end of a cp.async) and cp.async
// copies. A kernel's wide and element-by-element paths, or its cp.async and synchronous copies,
// write the same bytes, so only these counts tell a test which one ran.
inline unsigned long long g_wide_accesses = 0, g_async_copies = 0;

// cp.async of n = 16 or 8 bytes (src_size 0 fills zeros), modelled as the header says; the
// poison is 0x7f bytes (a huge bf16, a NaN f16, a huge f32).
inline void cp_async_n(void* dst, const void* src, bool valid, int n) {
    g_async_copies++;
    AsyncCopy c;
    c.dst = dst;
    c.n = n;
    if (valid) memcpy(c.bytes, src, n);
    else memset(c.bytes, 0, n);
    memset(dst, 0x7f, n);
    g_s.fibers[g_s.cur].open.push_back(c);
}
inline void cp_async_commit() {
    Fiber& f = g_s.fibers[g_s.cur];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
// cp.async.wait_group n: every committed group but the newest n has landed.
inline void cp_async_wait(int n) {
    Fiber& f = g_s.fibers[g_s.cur];
    while ((int)f.groups.size() > n) {
        for (const AsyncCopy& c : f.groups.front()) memcpy(c.dst, c.bytes, c.n);
        f.groups.erase(f.groups.begin());
    }
}

inline void wait_at(Barrier& b) {
    b.arrived++;
    if (b.arrived == b.live) {
        b.arrived = 0;
        b.gen++;
        return;
    }
    Fiber& f = g_s.fibers[g_s.cur];
    f.waiting = &b;
    f.gen = b.gen;
    yield();
}

// A thread leaving the kernel counts as arrived at every barrier it belongs to, as on the GPU.
inline void leave(Barrier& b) {
    b.live--;
    if (b.live > 0 && b.arrived == b.live) {
        b.arrived = 0;
        b.gen++;
    }
}

inline void entry() {
    g_s.body();
    leave(g_s.block);
    leave(g_s.warps[warp_id()]);
    g_s.fibers[g_s.cur].done = true;
    // uc_link returns to the scheduler.
}

inline void run_block(int nthreads) {
    Sched& s = g_s;
    if ((int)s.fibers.size() < nthreads) s.fibers.resize(nthreads);
    int nwarps = (nthreads + 31) / 32;
    s.warps.assign(nwarps, Barrier{});
    for (int w = 0; w < nwarps; w++) s.warps[w].live = std::min(32, nthreads - 32 * w);
    s.block = Barrier{};
    s.block.live = nthreads;
    s.xchg.assign(nthreads, 0);
    for (int i = 0; i < nthreads; i++) {
        Fiber& f = s.fibers[i];
        if (!f.stack) f.stack = static_cast<char*>(malloc(kStack));
        f.done = false;
        f.waiting = nullptr;
        f.open.clear();
        f.groups.clear();
        unsigned bx = g_bdim.x, by = g_bdim.y;
        f.tid = dim3(i % bx, (i / bx) % by, i / (bx * by));
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &s.main;
        makecontext(&f.ctx, entry, 0);
    }
    s.epoch++;
    int left = nthreads;
    while (left > 0) {
        bool progress = false;
        for (int k = 0; k < nthreads; k++) {
            int i = s.reverse ? nthreads - 1 - k : k;
            Fiber& f = s.fibers[i];
            if (f.done) continue;
            if (f.waiting && f.waiting->gen == f.gen) continue;
            f.waiting = nullptr;
            s.cur = i;
            g_thread = f.tid;
            swapcontext(&s.main, &f.ctx);
            progress = true;
            if (f.done) left--;
            if (s.greedy) break;
        }
        if (!progress) {
            fprintf(stderr, "emu: deadlock in block (%u, %u, %u): threads wait at barriers that cannot complete\n",
                    g_block.x, g_block.y, g_block.z);
            exit(3);
        }
    }
}

// Runs `body` as a kernel launch of `grid` blocks of `block` threads.
inline void launch(dim3 grid, dim3 block, std::function<void()> body) {
    int nthreads = (int)(block.x * block.y * block.z);
    if (nthreads <= 0 || nthreads > 1024) {
        fprintf(stderr, "emu: %d threads per block (CUDA allows 1..1024)\n", nthreads);
        exit(2);
    }
    g_s.body = std::move(body);
    g_bdim = block;
    g_gdim = grid;
    // Blocks in order, or from the last to the first with `reverse`: a block that reads what
    // another block writes, or two blocks writing one place, shows as a difference.
    const bool rev = g_s.reverse;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                g_block = rev ? dim3(grid.x - 1 - x, grid.y - 1 - y, grid.z - 1 - z) : dim3(x, y, z);
                run_block(nthreads);
            }
}

template <typename T>
T shfl(T v, int src, bool valid) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    g_s.xchg[lin()] = bits;
    wait_at(g_s.warps[warp_id()]);
    T r = v;
    if (valid) memcpy(&r, &g_s.xchg[warp_id() * 32 + src], sizeof(T));
    wait_at(g_s.warps[warp_id()]);
    return r;
}

// Every lane's value of `v` (a warp-collective exchange, as a shuffle from each lane in turn).
template <typename T>
void warp_all(T v, T* out) {
    static_assert(sizeof(T) <= 8, "exchanges move at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    g_s.xchg[lin()] = bits;
    wait_at(g_s.warps[warp_id()]);
    for (int i = 0; i < 32; i++) memcpy(&out[i], &g_s.xchg[warp_id() * 32 + i], sizeof(T));
    wait_at(g_s.warps[warp_id()]);
}

// Shared memory holds whatever it held before a block starts; here the first thread of a block
// to reach `EMU_SHARED(a, b, …)` (kernels/common.cuh) fills those arrays with a poison, so a read
// of an element the block has not written shows. The poison differs between schedules, and a
// test compares the schedules' results: all bits set (NaN in every float dtype) in sweeps, 0x7f
// bytes (a huge positive f32 and bf16) with `greedy`, 0xf7 bytes (a huge negative f32 and bf16,
// -32480 in f16) with `reverse`. So a read that NaN alone would hide (fmaxf and fminf drop a NaN,
// a comparison with one is false) still changes the result in some schedule.
inline unsigned char poison_byte() { return g_s.reverse ? 0xF7 : g_s.greedy ? 0x7F : 0xFF; }
inline void poison_once(void* p, size_t bytes) {
    unsigned& e = g_s.poisoned[p];
    if (e != g_s.epoch) {
        memset(p, poison_byte(), bytes);
        e = g_s.epoch;
    }
}
template <typename... T>
void poison_shared(T&... a) {
    (poison_once(&a, sizeof(a)), ...);
}

// A wide access (16-byte loads, vector atomics, …) at an address not aligned to its size faults
// on the GPU; here it ends the run with the kernel source's line (EMU_ALIGNED, kernels/common.cuh).
inline void check_aligned(const void* p, size_t bytes, const char* file, int line) {
    g_wide_accesses++;
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
        fprintf(stderr, "emu: a %zu-byte access at %p is not %zu-byte aligned (%s:%d)\n", bytes, p, bytes, file, line);
        exit(4);
    }
}

}  // namespace emu

#define EMU_SHARED(...) emu::poison_shared(__VA_ARGS__)
#define EMU_ALIGNED(p, bytes) emu::check_aligned(p, bytes, __FILE__, __LINE__)

// Tells the kernel sources they are built for this stand-in (where inline PTX cannot run).
#define PATCHLM_EMU 1

#define threadIdx (emu::g_thread)
#define blockIdx (emu::g_block)
#define blockDim (emu::g_bdim)
#define gridDim (emu::g_gdim)

inline void __syncthreads() { emu::wait_at(emu::g_s.block); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait_at(emu::g_s.warps[emu::warp_id()]); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = emu::lane_id(), src = lane ^ mask;
    return emu::shfl(v, src, (src / width) == (lane / width));
}
template <typename T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = emu::lane_id();
    return emu::shfl(v, (lane / width) * width + (src % width), true);
}
// Whether any lane of the warp has `pred` set (a warp-collective vote).
inline int __any_sync(unsigned, int pred) {
    int all[32];
    emu::warp_all(pred != 0 ? 1 : 0, all);
    for (int i = 0; i < 32; i++) {
        if (all[i]) return 1;
    }
    return 0;
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = emu::lane_id(), src = lane + (int)delta;
    return emu::shfl(v, src, (src / width) == (lane / width) && src < 32);
}

// One OS thread runs every fiber and a fiber is never switched out inside an atomic.
template <typename T>
T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
T atomicMax(T* p, T v) {
    T old = *p;
    *p = std::max(old, v);
    return old;
}

// Mixed-type min/max as CUDA's overloads resolve them (the usual arithmetic conversions).
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a > (C)b ? (C)a : (C)b;
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

struct float4 {
    float x, y, z, w;
};
struct float2 {
    float x, y;
};
struct __align__(16) uint4 {
    unsigned x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct int4 {
    int x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
