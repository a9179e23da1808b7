// Runs one kernel of kernels/*.cu on the CPU stand-in of CUDA (cuda_emu.h), for the tests in
// crates/model/tests/emulated.rs:
//
//   harness [--reverse] [--greedy] KERNEL GX,GY,GZ BX,BY,BZ ARG...
//
// (the schedule of each block's threads, see cuda_emu.h: `--reverse` from the last thread to
// the first, and the blocks too; `--greedy` the first runnable thread always resumed first)
// with each ARG one of `p:FILE` (a device buffer: the file's bytes, written back to FILE after the
// launch), `o:N:FILE` (the same buffer seen from N bytes past its start, to test unaligned paths), `i:N` (int), `l:N` (long long), `u:N` (unsigned), `f:X` (float or double), `z:` (a null pointer). The argument list must
// match the kernel's parameters in number and kind, but for two kinds of buffer that the
// multi-tensor kernels need: `b:FILE`, a buffer that is not a parameter (only a table points to
// it), and `t:FILE`, a parameter holding 64-bit words of which those tagged RELOC | (argument
// index << 32) | byte offset are replaced by that argument's buffer address plus the offset.
// After a launch it prints `wide-accesses N` and `async-copies M`: how many wide accesses
// (EMU_ALIGNED) and cp.async copies the kernel made.
#include "cuda_emu.h"
#include "mma.h"

#include <map>
#include <string>
#include <utility>

// Under AddressSanitizer (PATCHLM_EMU_SANITIZE=1) the guard zones are poisoned too, so that a
// kernel's read past a buffer (which otherwise just reads NaN) is reported where it happens.
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include "../fused.cu"
#include "../flash.cu"
#include "../hopper.cu"
#include "probes.cu"

namespace {

// The tag of a table word that stands for a buffer's address (see the header comment).
constexpr unsigned long long RELOC = 0xB0F7ull << 48;

// Bytes of guard zone on each side of every buffer.
constexpr size_t kGuard = 256;

struct Arg {
    char kind;
    bool table = false;
    std::string path;
    void* ptr = nullptr;
    size_t bytes = 0;
    size_t cap = 0;  // bytes rounded up to 256: the allocation between the guard zones
    size_t offset = 0;
    long long i = 0;
    double f = 0;
};

[[noreturn]] void fail(const std::string& msg) {
    fprintf(stderr, "harness: %s\n", msg.c_str());
    exit(2);
}

template <typename T>
T conv(const Arg& a, size_t idx) {
    if constexpr (std::is_pointer<T>::value) {
        if (a.kind == 'z') return nullptr;
        if (a.kind != 'p') fail("argument " + std::to_string(idx) + " must be a buffer (p:FILE)");
        return reinterpret_cast<T>(static_cast<char*>(a.ptr) + a.offset);
    } else if constexpr (std::is_floating_point<T>::value) {
        if (a.kind != 'f') fail("argument " + std::to_string(idx) + " must be a float (f:X)");
        return (T)a.f;
    } else {
        if (a.kind != 'i' && a.kind != 'l' && a.kind != 'u')
            fail("argument " + std::to_string(idx) + " must be an integer (i:, l: or u:)");
        return (T)a.i;
    }
}

template <typename... A, size_t... I>
void call(void (*f)(A...), const std::vector<Arg>& v, std::index_sequence<I...>) {
    f(conv<A>(v[I], I)...);
}

template <typename... A>
void invoke(void (*f)(A...), const std::vector<Arg>& v, dim3 g, dim3 b) {
    if (v.size() != sizeof...(A))
        fail("the kernel takes " + std::to_string(sizeof...(A)) + " arguments, got " + std::to_string(v.size()));
    // Check the kinds once before the launch (each fiber converts them again, cheaply).
    call(+[](A...) {}, v, std::index_sequence_for<A...>{});
    emu::launch(g, b, [&] { call(f, v, std::index_sequence_for<A...>{}); });
}

typedef void (*Runner)(const std::vector<Arg>&, dim3, dim3);
#define K(name) {#name, [](const std::vector<Arg>& v, dim3 g, dim3 b) { invoke(name, v, g, b); }},
#define K3(base) K(base##_f32) K(base##_bf16) K(base##_f16)
#define KMMA(S, HD) K(flash_mma_fwd_##S##_##HD) K(flash_mma_dq_##S##_##HD) K(flash_mma_dkv_##S##_##HD) \
    K(flash_mma_dkvq_##S##_##HD) K(flash_mma_fwdw_##S##_##HD) K(flash_mma_dqw_##S##_##HD)
#define KMMAL(S, HD) K(flash_mma_fwd_##S##_##HD) K(flash_mma_dq_##S##_##HD) K(flash_mma_dkv_##S##_##HD)
#define KMMAW(S) K(flash_mma_dkvw_##S##_64) K(flash_mma_dkvqw_##S##_64)
#define KFLASH(S, HD) K(flash_fwd_##S##_##HD) K(flash_lse_##S##_##HD) K(flash_dq_##S##_##HD) K(flash_dk_##S##_##HD) \
    K(flash_dv_##S##_##HD)

const std::map<std::string, Runner> kernels = {
    // clang-format off
    KMMA(bf16, 32) KMMA(bf16, 64) KMMA(f16, 32) KMMA(f16, 64) KMMAW(bf16) KMMAW(f16)
    K(flash_mma_dqo_bf16_64) K(flash_mma_dqo_f16_64)
    KMMAL(bf16, 80) KMMAL(bf16, 96) KMMAL(bf16, 128) KMMAL(f16, 80) KMMAL(f16, 96) KMMAL(f16, 128)
    K(flash_mma_dkvq_bf16_128) K(flash_mma_dkvq_f16_128) K(flash_dkvw_smem_bytes) K(probe_ldmatrix_x2)
    K3(flash_stats) K(flash_dq_cast_bf16) K(flash_dq_cast_f16)
    K(probe_mma_bf16) K(probe_mma_f16) K(probe_shared_shift) K(probe_wide_f32) K(probe_wide_bf16) K(probe_ldmatrix) K(probe_wgmma_bf16) K(probe_wgmma_rs_bf16) K(probe_wgmma_ss_t_bf16) K(flash_wg_fwd_bf16_64) K(flash_wg_fwdr_bf16_64) K(flash_wg_dq_bf16_64) K(flash_wg_dqr_bf16_64) K(flash_wg_fwdw_bf16_64) K(flash_wg_fwdwr_bf16_64) K(flash_wg_dqw_bf16_64) K(flash_wg_dqwr_bf16_64) K(flash_wg_dqw_smem_bytes) K(flash_wgs_fwd_bf16_64) K(flash_wgs_fwdr_bf16_64) K(flash_wgs_fwdw_bf16_64) K(flash_wgs_fwdwr_bf16_64) K(flash_wgs_dq_bf16_64) K(flash_wgs_dqr_bf16_64) K(flash_wgs_dqw_bf16_64) K(flash_wgs_dqwr_bf16_64) K(flash_wgs_dkv_bf16_64) K(flash_wgs_dkvw_bf16_64) K(flash_wgs_dkvq_bf16_64) K(flash_wg_dkv_bf16_64) K(flash_wg_dkvw_bf16_64) K(flash_wg_dkvq_bf16_64) K(flash_wg_dkvq_smem_bytes)
    KFLASH(f32, 64) KFLASH(bf16, 32) KFLASH(bf16, 64)
    K3(rms_fwd_w) K3(rms_dx_w) K3(rms_dx_res_w) K3(add_rms_fwd_w)
    K3(causal_softmax_fwd_w) K3(causal_softmax_bwd_w)
    K3(ce_fwd_lse) K3(ce_bwd_lse)
    K3(swiglu_packed_fwd) K3(swiglu_packed_bwd)
    K3(heads_from_rows) K3(rows_from_heads)
    K(multi_cast_f32) K(multi_adamw_f32) K(multi_sumsq_f32)
    K3(ce_fwd) K3(ce_bwd) K3(rms_fwd) K3(rms_dx) K3(rms_dw) K3(cast_from_f32)
    K3(causal_softmax_fwd) K3(causal_softmax_bwd) K3(rope) K3(embedding_fwd) K3(embedding_fwd4) K(embedding_count) K(embedding_scan) K(embedding_place) K3(embedding_sum) K3(embedding_sum4) K3(embedding_bwd) K3(embedding_bwd4)
    K3(swiglu_fwd) K3(swiglu_bwd) K(adamw_f32)
    // clang-format on
};

dim3 parse_dim(const char* s) {
    unsigned x = 1, y = 1, z = 1;
    if (sscanf(s, "%u,%u,%u", &x, &y, &z) != 3) fail(std::string("bad launch dimensions '") + s + "' (want X,Y,Z)");
    return dim3(x, y, z);
}

}  // namespace

int main(int argc, char** argv) {
    for (; argc > 1 && argv[1][0] == '-'; argv++, argc--) {
        std::string flag = argv[1];
        if (flag == "--reverse") emu::g_s.reverse = true;
        else if (flag == "--greedy") emu::g_s.greedy = true;
        else fail("unknown option " + flag);
    }
    if (argc < 4) fail("usage: harness [--reverse] [--greedy] KERNEL GX,GY,GZ BX,BY,BZ ARG...");
    auto it = kernels.find(argv[1]);
    if (it == kernels.end()) fail(std::string("unknown kernel '") + argv[1] + "' (add it to harness.cpp)");
    dim3 grid = parse_dim(argv[2]), block = parse_dim(argv[3]);
    std::vector<Arg> args;
    for (int a = 4; a < argc; a++) {
        std::string s = argv[a];
        if (s.size() < 2 || s[1] != ':') fail("bad argument '" + s + "'");
        Arg x;
        x.kind = s[0];
        std::string val = s.substr(2);
        if (x.kind == 'o') {
            size_t colon = val.find(':');
            if (colon == std::string::npos) fail("bad argument '" + s + "' (want o:N:FILE)");
            x.offset = (size_t)strtoull(val.substr(0, colon).c_str(), nullptr, 10);
            val = val.substr(colon + 1);
            x.kind = 'p';
        }
        if (x.kind == 't') {
            x.kind = 'p';
            x.table = true;
        }
        if (x.kind == 'p' || x.kind == 'b') {
            x.path = val;
            FILE* f = fopen(val.c_str(), "rb");
            if (!f) fail("cannot read " + val);
            fseek(f, 0, SEEK_END);
            x.bytes = (size_t)ftell(f);
            fseek(f, 0, SEEK_SET);
            // The buffer between two guard zones of kGuard bytes with every bit set: a kernel
            // that reads past either end reads NaN (under AddressSanitizer it is stopped there),
            // one that writes there is caught below.
            x.cap = (x.bytes + 255) / 256 * 256;
            char* base = static_cast<char*>(aligned_alloc(256, kGuard + x.cap + kGuard));
            memset(base, 0xFF, kGuard + x.cap + kGuard);
            x.ptr = base + kGuard;
            if (x.bytes && fread(x.ptr, 1, x.bytes, f) != x.bytes) fail("short read of " + val);
            fclose(f);
            EMU_POISON(base, kGuard);
            EMU_POISON(base + kGuard + x.bytes, x.cap - x.bytes + kGuard);
        } else if (x.kind == 'f') {
            x.f = strtod(val.c_str(), nullptr);
        } else if (x.kind == 'z') {
            // a null pointer
        } else if (x.kind == 'i' || x.kind == 'l' || x.kind == 'u') {
            x.i = strtoll(val.c_str(), nullptr, 10);
        } else {
            fail("bad argument kind in '" + s + "'");
        }
        args.push_back(x);
    }
    std::vector<Arg> params;
    for (Arg& x : args) {
        if (x.table) {
            unsigned long long* w = static_cast<unsigned long long*>(x.ptr);
            for (size_t k = 0; k < x.bytes / 8; k++) {
                if ((w[k] & (0xFFFFull << 48)) != RELOC) continue;
                size_t target = (size_t)((w[k] >> 32) & 0xFFFF), off = (size_t)(w[k] & 0xFFFFFFFFull);
                if (target >= args.size() || !args[target].ptr) fail("table word " + std::to_string(k) + ": no buffer argument " + std::to_string(target));
                w[k] = (unsigned long long)(static_cast<char*>(args[target].ptr) + off);
            }
        }
        if (x.kind != 'b') params.push_back(x);
    }
    it->second(params, grid, block);
    for (size_t a = 0; a < args.size(); a++) {
        const Arg& x = args[a];
        if (x.kind != 'p' && x.kind != 'b') continue;
        const unsigned char* base = static_cast<const unsigned char*>(x.ptr) - kGuard;
        size_t end = kGuard + x.cap + kGuard;
        EMU_UNPOISON(base, end);
        for (size_t i = 0; i < end; i++) {
            if (i >= kGuard && i < kGuard + x.bytes) continue;
            if (base[i] != 0xFF) {
                long long at = (long long)i - (long long)kGuard;
                fail("argument " + std::to_string(a) + ": the kernel wrote outside its buffer of " +
                     std::to_string(x.bytes) + " bytes (at byte " + std::to_string(at) + ")");
            }
        }
    }
    for (const Arg& x : args) {
        if (x.kind != 'p' && x.kind != 'b') continue;
        FILE* f = fopen(x.path.c_str(), "wb");
        if (!f || fwrite(x.ptr, 1, x.bytes, f) != x.bytes) fail("cannot write " + x.path);
        fclose(f);
    }
    printf("wide-accesses %llu\nasync-copies %llu\n", emu::g_wide_accesses, emu::g_async_copies);
    return 0;
}
