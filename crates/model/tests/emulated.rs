//! The CUDA kernels' math without a GPU: kernels/*.cu compiled by the host C++ compiler against a
//! CPU stand-in for the CUDA features they use (kernels/emu: threads as fibers, barriers, warp
//! shuffles and votes, atomics, mma.sync, ldmatrix, cp.async, wgmma). Every kernel, the defaults and
//! the opt-in families alike, is launched here with the geometry its CUDA launcher uses (`patchlm_model::launch`) on random inputs and compared with an independent CPU
//! reference (candle ops in f32, candle's autograd for gradients). This checks indexing, masking,
//! tiling and synchronisation on every machine; `tests/cuda.rs` repeats the comparison on a GPU,
//! where timing, the memory model and the real tensor cores come in. The emulator's warp-matrix
//! instructions are themselves checked against the documented fragment layouts.
//!
//! Needs a C++17 compiler (`CXX`, else `c++`); the harness is built once per source version under
//! the target directory. With `PATCHLM_EMU_SANITIZE=1` (CI sets it) the harness is built with
//! AddressSanitizer and UndefinedBehaviorSanitizer, any report fatal: a kernel that reads or
//! writes past a `__shared__` array (a static here) or past a buffer's guard zones, or does
//! something C++ leaves undefined (an out-of-range shift, a misaligned access), then fails its test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::max_rel;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var, D};
use half::{bf16, f16};
use patchlm_model::launch::{self, Launch};
use patchlm_model::ops::WgmmaForm;

const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
const SOURCES: [&str; 11] = [
    "fused.cu",
    "flash.cu",
    "hopper.cu",
    "common.cuh",
    "emu/cuda_emu.h",
    "emu/emu_types.h",
    "emu/mma.h",
    "emu/harness.cpp",
    "emu/cuda_bf16.h",
    "emu/cuda_fp16.h",
    "emu/probes.cu",
];

/// Whether the harness runs under the sanitizers (`PATCHLM_EMU_SANITIZE=1`).
fn sanitized() -> bool {
    std::env::var("PATCHLM_EMU_SANITIZE").is_ok_and(|v| v == "1")
}

/// The compiler flags that build the harness under AddressSanitizer and
/// UndefinedBehaviorSanitizer, every report fatal.
const SANITIZE_FLAGS: [&str; 4] =
    ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"];

/// The harness executable, compiled on first use (and reused while the sources and flags are
/// unchanged).
fn harness() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let flags: &[&str] = if sanitized() { &SANITIZE_FLAGS } else { &[] };
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let named = SOURCES.iter().map(|f| (std::fs::read(Path::new(KERNELS).join(f)).unwrap(), f.as_bytes()));
        let flagged = flags.iter().map(|f| (Vec::new(), f.as_bytes()));
        for (bytes, name) in named.chain(flagged) {
            for b in bytes.iter().chain(name) {
                hash = (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu");
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(format!("harness-{hash:016x}"));
        if !exe.is_file() {
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
            let tmp = dir.join(format!("harness-{hash:016x}.{}", std::process::id()));
            let out = Command::new(&cxx)
                .args(["-std=c++17", "-O2", "-fno-strict-aliasing", "-w"])
                .args(flags)
                .arg("-I")
                .arg(Path::new(KERNELS).join("emu"))
                .arg("-o")
                .arg(&tmp)
                .arg(Path::new(KERNELS).join("emu/harness.cpp"))
                .output()
                .unwrap_or_else(|e| panic!("these tests need a C++17 compiler ({cxx}: {e}); set CXX"));
            assert!(
                out.status.success(),
                "{cxx} failed on the kernel harness:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::rename(&tmp, &exe).unwrap();
        }
        exe
    })
}

/// One kernel argument.
#[derive(Clone)]
enum A {
    /// A device buffer: in with its bytes, out with the bytes after the launch.
    Buf(Vec<u8>),
    /// The same, passed to the kernel this many bytes past its start.
    At(usize, Vec<u8>),
    I(i64),
    F(f32),
    /// A device buffer that is not a kernel parameter: only a table points to it.
    Extra(Vec<u8>),
    /// A parameter of 64-bit words, those made by [`reloc`] replaced by buffer addresses.
    Table(Vec<u64>),
    /// A null pointer.
    Null,
}

/// A table word that the harness replaces by the address of argument `arg`'s buffer plus `bytes`.
fn reloc(arg: usize, bytes: usize) -> u64 {
    (0xB0F7u64 << 48) | ((arg as u64) << 32) | bytes as u64
}

/// Kernels with one f32 argument (by index) that threads or blocks add into with atomics (repeated
/// ids, chunks of rows, key blocks), all else written once: that argument may differ between
/// schedules in its last bits only (compared with a tolerance, so a race on what feeds the sums
/// still shows), every other byte for byte.
const ATOMIC_SUM_ARG: [(&str, usize); 7] = [
    ("embedding_bwd_", 3),
    ("embedding_bwd4_", 3),
    ("rms_dw_", 3),
    ("flash_mma_dkvq_", 7),
    ("flash_mma_dkvqw_", 7),
    ("flash_wg_dkvq_", 7),
    ("flash_wgs_dkvq_", 7),
];

/// Kernels with one i32 argument (by index) into which threads place values at slots they take
/// with integer atomics (`embedding_place`: each id's tokens in its run): which slot a value lands
/// in may differ between schedules, so that argument is compared as a multiset of values (a value
/// lost or written twice still shows); every other argument byte for byte.
const PLACED_ARG: [(&str, usize); 1] = [("embedding_place", 5)];

/// How the emulator schedules the threads of a block (see kernels/emu/cuda_emu.h).
#[derive(Clone, Copy, Debug)]
enum Schedule {
    /// Every runnable thread once in thread order, then again: warps move in step.
    Sweep,
    /// Thread 0's warp runs ahead as far as the barriers let it (the first runnable thread
    /// always resumes first).
    FirstAhead,
    /// The same from the last thread down (the last warp runs ahead), and the blocks from the
    /// last to the first.
    LastAhead,
}

/// Launches `kernel` on the emulator with the geometry its CUDA launcher uses; buffers come back
/// with the kernel's writes. Every launch runs under each [`Schedule`], and all must write the
/// same bytes: a difference means some thread reads what another writes, or overwrites what
/// another still reads, with no barrier between them (a missing `__syncthreads`/`__syncwarp`),
/// which one schedule alone can hide. Returns the launch's [`Accesses`], which a test of a
/// kernel's wide or cp.async path asks.
fn emulate(kernel: &str, geometry: Launch, args: &mut [A]) -> Accesses {
    let (first, counts) = run_harness(kernel, geometry, args, Schedule::Sweep);
    let summed = ATOMIC_SUM_ARG.iter().find(|(k, _)| kernel.starts_with(k)).map(|&(_, n)| n);
    let placed = PLACED_ARG.iter().find(|(k, _)| kernel.starts_with(k)).map(|&(_, n)| n);
    for schedule in [Schedule::FirstAhead, Schedule::LastAhead] {
        let (other, other_counts) = run_harness(kernel, geometry, args, schedule);
        assert_eq!(other_counts, counts, "{kernel}: other accesses when the threads run as {schedule:?}");
        for (n, (f, r)) in first.iter().zip(&other).enumerate() {
            let (Some(f), Some(r)) = (f, r) else { continue };
            if placed == Some(n) {
                let (mut f, mut r) = (i32s(f), i32s(r));
                f.sort();
                r.sort();
                assert!(f == r, "{kernel}: argument {n} holds other values when the threads run as {schedule:?}");
            } else if summed == Some(n) {
                let (f, r) = (f32s(f), f32s(r));
                let scale = f.iter().fold(0f32, |m, x| m.max(x.abs()));
                // A NaN on one side only is as far off as it gets (f32::max would drop it).
                let gap = |(x, y): (&f32, &f32)| match (x - y).abs() {
                    d if d.is_nan() && x.to_bits() != y.to_bits() => f32::INFINITY,
                    d if d.is_nan() => 0.0,
                    d => d,
                };
                let worst = f.iter().zip(&r).map(gap).fold(0f32, f32::max);
                assert!(
                    worst <= 1e-5 * scale,
                    "{kernel}: argument {n}'s atomic sums differ by {worst} (of {scale}) when the threads run as \
                     {schedule:?} (more than summation order explains: a race on what they add)"
                );
            } else {
                let at = f.iter().zip(r).position(|(x, y)| x != y);
                assert!(
                    at.is_none(),
                    "{kernel}: argument {n} differs at byte {at:?} when the threads run as {schedule:?} \
                     (a read of another thread's write, or a write over its read, without a barrier)"
                );
            }
        }
    }
    write_back(args, first);
    counts
}

/// What a launch did that its output cannot show (the harness's counts, the same under every
/// schedule): a kernel's wide and element-by-element paths write the same bytes, as do its
/// cp.async and synchronous copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Accesses {
    /// Wide accesses: `EMU_ALIGNED` in the kernels (16-byte and four-element loads and stores,
    /// vector atomics, each end of a cp.async).
    wide: u64,
    /// cp.async copies.
    copies: u64,
}

/// Puts a run's buffer bytes (from [`run_harness`]) back into `args`.
fn write_back(args: &mut [A], after: Vec<Option<Vec<u8>>>) {
    for (a, after) in args.iter_mut().zip(after) {
        if let (A::Buf(b) | A::At(_, b) | A::Extra(b), Some(after)) = (a, after) {
            *b = after;
        }
    }
}

/// Little-endian f32s from bytes.
fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

thread_local! {
    /// The emulator of this test thread reads unswizzled MN-major wgmma descriptors the other way
    /// round (LBO along M or N: `EMU_WGMMA_MN_SWAP=1`), as a GPU that did would (see
    /// [`with_mn_swapped`]).
    static MN_SWAPPED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's emulator reading MN-major wgmma descriptors the other way round.
fn with_mn_swapped<R>(f: impl FnOnce() -> R) -> R {
    MN_SWAPPED.with(|c| c.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    MN_SWAPPED.with(|c| c.set(false));
    r.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// One run of the harness under `schedule`: every buffer argument's bytes after the launch.
fn run_harness(kernel: &str, geometry: Launch, args: &[A], schedule: Schedule) -> (Vec<Option<Vec<u8>>>, Accesses) {
    let (grid, block) = (geometry.grid, geometry.block);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(harness());
    if sanitized() {
        // The harness frees its buffers only at exit: leaks are not what is looked for here.
        cmd.env("ASAN_OPTIONS", "detect_leaks=0");
    }
    if MN_SWAPPED.with(|c| c.get()) {
        cmd.env("EMU_WGMMA_MN_SWAP", "1");
    }
    match schedule {
        Schedule::Sweep => {}
        Schedule::FirstAhead => {
            cmd.arg("--greedy");
        }
        Schedule::LastAhead => {
            cmd.args(["--greedy", "--reverse"]);
        }
    }
    cmd.arg(kernel)
        .arg(format!("{},{},{}", grid.0, grid.1, grid.2))
        .arg(format!("{},{},{}", block.0, block.1, block.2));
    for (n, a) in args.iter().enumerate() {
        let path = dir.path().join(format!("arg{n}"));
        match a {
            A::Buf(b) => {
                std::fs::write(&path, b).unwrap();
                cmd.arg(format!("p:{}", path.display()));
            }
            A::At(off, b) => {
                std::fs::write(&path, b).unwrap();
                cmd.arg(format!("o:{off}:{}", path.display()));
            }
            A::I(i) => {
                cmd.arg(format!("i:{i}"));
            }
            A::F(f) => {
                cmd.arg(format!("f:{f:e}"));
            }
            A::Extra(b) => {
                std::fs::write(&path, b).unwrap();
                cmd.arg(format!("b:{}", path.display()));
            }
            A::Table(w) => {
                std::fs::write(&path, w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
                cmd.arg(format!("t:{}", path.display()));
            }
            A::Null => {
                cmd.arg("z:");
            }
        }
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{kernel} failed on the emulator ({schedule:?}):\n{err}");
    let report = String::from_utf8_lossy(&out.stdout);
    let count = |name: &str| -> u64 {
        report
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{kernel}: the harness printed no `{name}` count: {report}"))
    };
    let counts = Accesses { wide: count("wide-accesses "), copies: count("async-copies ") };
    let bufs = args
        .iter()
        .enumerate()
        .map(|(n, a)| {
            matches!(a, A::Buf(_) | A::At(..) | A::Extra(_))
                .then(|| std::fs::read(dir.path().join(format!("arg{n}"))).unwrap())
        })
        .collect();
    (bufs, counts)
}

/// Elements of `dtype` in one 16-byte pack (the kernels' `Pack16<T>::N`).
fn pack_len(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// A tensor's elements as the kernels see them in memory.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<bf16>().unwrap().iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<f16>().unwrap().iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        DType::U32 => t.to_vec1::<u32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        dt => panic!("no byte view for {dt:?}"),
    }
}

/// Bytes back to an f32 tensor of `shape`, read as `dtype`.
fn from_bytes(b: &[u8], dtype: DType, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = match dtype {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
        DType::F16 => b.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
        dt => panic!("no byte view for {dt:?}"),
    };
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// An output buffer of `n` elements of `dtype` as the CUDA launchers' `dev.alloc` leaves it:
/// uninitialised, here every bit set (NaN in f32, bf16 and f16), so that an element the kernel
/// fails to write shows in any comparison.
fn out(n: usize, dtype: DType) -> A {
    A::Buf(vec![0xFF; n * dtype.size_in_bytes()])
}

/// [`out`], `misalign`ed by one element or not (as [`input`]).
fn out_at(n: usize, dtype: DType, misalign: bool) -> A {
    let esz = dtype.size_in_bytes();
    if misalign {
        A::At(esz, vec![0xFF; (n + 1) * esz])
    } else {
        out(n, dtype)
    }
}

/// An f32 accumulator of `n` elements, zeroed (the launchers' `alloc_zeros`).
fn zeroed(n: usize) -> A {
    A::Buf(vec![0u8; n * 4])
}

/// Which of two buffers sit one element off their alignment: neither, both, and each alone (so
/// that a wide-access check that misses one of the two addresses fails).
const SKEW_PAIRS: [(bool, bool); 4] = [(false, false), (true, true), (true, false), (false, true)];

/// A tensor's bytes for a multi-tensor table (an [`A::Extra`] buffer) and the byte offset its
/// table word adds ([`reloc`]): at the buffer's start, or `skew`ed one element in.
fn extra_at(t: &Tensor, skew: bool) -> (A, usize) {
    let at = if skew { t.dtype().size_in_bytes() } else { 0 };
    (A::Extra([vec![0x7F; at], bytes(t)].concat()), at)
}

/// A tensor's bytes as a kernel argument, `misalign`ed by one element (the kernels' unaligned
/// path) or not.
fn input(t: &Tensor, misalign: bool) -> A {
    if misalign {
        let esz = t.dtype().size_in_bytes();
        A::At(esz, [vec![0u8; esz], bytes(t)].concat())
    } else {
        A::Buf(bytes(t))
    }
}

/// A buffer argument's bytes (past a misalignment offset).
fn bytes_of(a: &A) -> &[u8] {
    match a {
        A::Buf(b) | A::Extra(b) => b,
        A::At(off, b) => &b[*off..],
        _ => panic!("not a buffer"),
    }
}

/// A buffer argument read back as an f32 tensor of `shape` (skipping a misalignment offset).
fn output(a: &A, dtype: DType, shape: &[usize]) -> Tensor {
    match a {
        A::Buf(b) => from_bytes(b, dtype, shape),
        A::At(off, b) => from_bytes(&b[*off..], dtype, shape),
        A::Extra(b) => from_bytes(b, dtype, shape),
        _ => panic!("not a buffer"),
    }
}

fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => panic!("no kernels for {dt:?}"),
    }
}

/// Causal attention in f32 with candle ops (the queries are the last `t` of `s` positions):
/// (o, lse per row) and, for `dout`, (dq, dk, dv) from candle's autograd.
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, dout: &Tensor, scale: f64) -> [Tensor; 5] {
    let (bh, t, _) = q.dims3().unwrap();
    let s = k.dim(1).unwrap();
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j <= s - t + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (1, t, s), &Device::Cpu).unwrap();
    let (q, k, v) = (Var::from_tensor(q).unwrap(), Var::from_tensor(k).unwrap(), Var::from_tensor(v).unwrap());
    let sc = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask).unwrap();
    let m = sc.max_keepdim(D::Minus1).unwrap();
    let lse =
        (sc.broadcast_sub(&m).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap() + &m).unwrap();
    let p = sc.broadcast_sub(&lse).unwrap().exp().unwrap();
    let o = p.matmul(&v).unwrap();
    let lse = lse.reshape((bh, t)).unwrap();
    let g = (&o * dout).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |x: &Var| g.get(x).unwrap().clone();
    [o.detach(), lse.detach(), grad(&q), grad(&k), grad(&v)]
}

/// One family of flash attention kernels: tensor cores through mma.sync (`flash_mma_*`: 128
/// threads, dk and dv from one kernel) or CUDA cores (`flash_*`: 64 threads, one row each).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Flash {
    Mma,
    CudaCore,
}

/// Flash attention's forward (o, log-sum-exp; the CUDA-core family also the log-sum-exp alone)
/// and gradients (dq, dk, dv) from one kernel family on the emulator, against attention in f32 (candle ops and autograd). The queries are the last `t`
/// of `s` positions; `misalign` passes every tensor one element past an aligned start; `q_sd` is
/// the queries' standard deviation (0: every score 0, each query's probabilities uniform over
/// the keys it sees, so one key too many or too few is a large error, not a chance small one).
fn check_flash(family: Flash, (bh, t, s, hd): AttnShape, dtype: DType, misalign: bool, q_sd: f64) {
    let what = format!("{family:?} bh={bh} t={t} s={s} hd={hd} {dtype:?} misaligned={misalign} q_sd={q_sd}");
    let scale = 1.0 / (hd as f64).sqrt();
    let rnd =
        |n: usize, sd: f64| Tensor::randn(0f32, sd as f32, (bh, n, hd), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    let q = if q_sd == 0.0 { Tensor::zeros((bh, t, hd), dtype, &Device::Cpu).unwrap() } else { rnd(t, q_sd) };
    let (k, v, dout) = (rnd(s, 1.5), rnd(s, 1.0), rnd(t, 1.0));
    let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let [o, lse, dq, dk, dv] = attention_reference(&f(&q), &f(&k), &f(&v), &f(&dout), scale);
    let prefix = match family {
        Flash::Mma => "flash_mma",
        Flash::CudaCore => "flash",
    };
    let name = |which: &str| format!("{prefix}_{which}_{}_{hd}", suffix(dtype));
    // Each launch; the tensor-core kernels' copies checked too: from aligned tensors their
    // (k, v) or (q, dO) tiles go by cp.async and the tile each block keeps by synchronous 16-byte
    // copies (wide accesses besides each cp.async's two ends); from skewed ones the forward and
    // dq copy element by element.
    let go = |which: &str, rows: usize, args: &mut [A]| {
        let c = emulate(&name(which), launch::flash(rows, bh, family != Flash::CudaCore), args);
        if family == Flash::Mma && !misalign {
            assert!(c.copies > 0 && c.wide > 2 * c.copies, "{what}: {which} copied its tiles so: {c:?}");
        } else if family == Flash::Mma && matches!(which, "fwd" | "dq" | "dqo") {
            assert_eq!(c, Accesses { wide: 0, copies: 0 }, "{what}: {which} on skewed tensors");
        }
    };
    let arg = |x: &Tensor| input(x, misalign);
    let uninit = |n: usize| out_at(bh * n * hd, dtype, misalign);
    let (tol, tol_grad, tol_lse) = match dtype {
        DType::BF16 => (1e-2, 1.2e-2, 2e-3),
        DType::F16 => (2e-3, 2.5e-3, 2e-3),
        _ => (1e-4, 2e-4, 1e-5),
    };
    let check = |a: &A, n: usize, want: &Tensor, tol: f32, part: &str| {
        let e = max_rel(&output(a, dtype, &[bh, n, hd]), want);
        assert!(e < tol, "{what}: {part} rel err {e}");
    };
    // A variant's output against the default kernel's, byte for byte.
    let same = |got: &A, default: &[u8], part: &str| {
        assert!(bytes_of(got) == default, "{what}: {part} differs from the default kernel's");
    };
    // o and dO as rows of the output projection's (B·t, H·hd) matrix (the kernels' `oh` = H): with
    // an even number of heads, H = 2 (B = bh / 2), against the same kernels on the (bh, t, hd)
    // layout; each row's arithmetic is the same, so the bytes are.
    let oh = if bh % 2 == 0 { 2 } else { 0 };
    let to_rows = |x: &Tensor| x.reshape((bh / 2, 2, t, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    // (`output` reads f32; back to `dtype` exactly.)
    let rows_bytes = |a: &A| bytes(&to_rows(&output(a, dtype, &[bh, t, hd]).to_dtype(dtype).unwrap()));

    // Forward: o and the log-sum-exp.
    let mut args = [
        arg(&q),
        arg(&k),
        arg(&v),
        uninit(t),
        out(bh * t, DType::F32),
        A::I(t as i64),
        A::I(s as i64),
        A::F(scale as f32),
        A::I(0),
    ];
    go("fwd", t, &mut args);
    check(&args[3], t, &o, tol, "forward output");
    let e = max_rel(&output(&args[4], DType::F32, &[bh, t]), &lse);
    assert!(e < tol_lse, "{what}: log-sum-exp rel err {e}");
    // The forward with `which` (fwd, fwdw) writing o as rows.
    let fwd_rows = |which: &str, geometry: Launch| {
        let mut rows = args.clone();
        (rows[3], rows[4], rows[8]) = (uninit(t), out(bh * t, DType::F32), A::I(oh as i64));
        emulate(&name(which), geometry, &mut rows);
        same(&rows[3], &rows_bytes(&args[3]), &format!("{which} output as rows"));
        same(&rows[4], bytes_of(&args[4]), &format!("{which} lse with rows"));
    };
    if oh > 0 {
        fwd_rows("fwd", launch::flash(t, bh, family != Flash::CudaCore));
    }
    if family == Flash::Mma && hd <= 64 {
        // The wide forward (PATCHLM_FLASH_WIDE: 128 rows a block, two row blocks a warp): each
        // row's arithmetic as the default kernel's, in the same order, so the same bytes.
        let mut wide = args.clone();
        wide[3] = uninit(t);
        wide[4] = out(bh * t, DType::F32);
        emulate(&name("fwdw"), launch::flash_wide(t, bh), &mut wide);
        check(&wide[3], t, &o, tol, "wide forward output");
        same(&wide[3], bytes_of(&args[3]), "wide forward output");
        same(&wide[4], bytes_of(&args[4]), "wide forward lse");
        if oh > 0 {
            fwd_rows("fwdw", launch::flash_wide(t, bh));
        }
        // The Hopper forward on warpgroup MMAs (PATCHLM_FLASH_WGMMA, kernels/hopper.cu; bf16 at
        // head size 64): against the reference; with q in registers (fwdr,
        // PATCHLM_FLASH_WGMMA_QREG) the same products, so the same bytes; either with o as rows
        // the same bytes as without.
        if hd == 64 && dtype == DType::BF16 {
            let mut wg = args.clone();
            (wg[3], wg[4]) = (uninit(t), out(bh * t, DType::F32));
            emulate("flash_wg_fwd_bf16_64", launch::flash(t, bh, true), &mut wg);
            check(&wg[3], t, &o, tol, "wgmma forward output");
            let e = max_rel(&output(&wg[4], DType::F32, &[bh, t]), &lse);
            assert!(e < tol_lse, "{what}: wgmma forward log-sum-exp rel err {e}");
            // q in registers (fwdr), two warpgroups of 64 rows a block (fwdw, PATCHLM_FLASH_WIDE),
            // both (fwdwr): each row's arithmetic is the one-warpgroup kernel's.
            let wide = launch::flash_wg_wide(t, bh);
            for (kernel, geometry) in [
                ("flash_wg_fwdr_bf16_64", launch::flash(t, bh, true)),
                ("flash_wg_fwdw_bf16_64", wide),
                ("flash_wg_fwdwr_bf16_64", wide),
            ] {
                let mut v = wg.clone();
                (v[3], v[4]) = (uninit(t), out(bh * t, DType::F32));
                emulate(kernel, geometry, &mut v);
                same(&v[3], bytes_of(&wg[3]), &format!("{kernel} output"));
                same(&v[4], bytes_of(&wg[4]), &format!("{kernel} lse"));
            }
            for (kernel, geometry) in
                [("flash_wg_fwd_bf16_64", launch::flash(t, bh, true)), ("flash_wg_fwdwr_bf16_64", wide)]
            {
                if oh == 0 {
                    break;
                }
                let mut rows = wg.clone();
                (rows[3], rows[4], rows[8]) = (uninit(t), out(bh * t, DType::F32), A::I(oh as i64));
                emulate(kernel, geometry, &mut rows);
                same(&rows[3], &rows_bytes(&wg[3]), &format!("{kernel} output as rows"));
            }
            // Built for the other reading of MN-major descriptors (flash_wgs_*: LBO along M or
            // N), on an emulator that reads them so: the same bytes; the documented build there
            // does not give them (so the reading matters to these kernels).
            for (kernel, geometry, same_bytes) in [
                ("flash_wgs_fwd_bf16_64", launch::flash(t, bh, true), true),
                ("flash_wgs_fwdwr_bf16_64", wide, true),
                ("flash_wg_fwd_bf16_64", launch::flash(t, bh, true), false),
            ] {
                let mut v = wg.clone();
                (v[3], v[4]) = (uninit(t), out(bh * t, DType::F32));
                if same_bytes {
                    with_mn_swapped(|| emulate(kernel, geometry, &mut v));
                } else {
                    // The wrong reading takes elements the block never wrote, whose poison
                    // differs between schedules: one schedule's result is enough.
                    let got = with_mn_swapped(|| run_harness(kernel, geometry, &v, Schedule::Sweep));
                    write_back(&mut v, got.0);
                }
                let agrees = bytes_of(&v[3]) == bytes_of(&wg[3]);
                assert_eq!(agrees, same_bytes, "{what}: {kernel} on the other reading: same output {agrees}");
            }
        }
    }
    if family == Flash::CudaCore {
        // The log-sum-exp alone (no output).
        let mut args = [arg(&q), arg(&k), out(bh * t, DType::F32), A::I(t as i64), A::I(s as i64), A::F(scale as f32)];
        go("lse", t, &mut args);
        let e = max_rel(&output(&args[2], DType::F32, &[bh, t]), &lse);
        assert!(e < tol_lse, "{what}: log-sum-exp alone rel err {e}");
    }

    // Gradients from (q, dO, k, v, (lse, delta) per row).
    let delta = (o.clone() * f(&dout)).unwrap().sum_keepdim(D::Minus1).unwrap();
    let st = A::Buf(bytes(&Tensor::cat(&[lse.unsqueeze(2).unwrap(), delta], 2).unwrap()));
    let dout_rows = if oh > 0 { to_rows(&dout) } else { dout.clone() };
    // The arguments of a gradient kernel with outputs `outs`, dO as rows where `rows`.
    let with_dout = |outs: Vec<A>, rows: bool| -> Vec<A> {
        let ins = [arg(&q), arg(if rows { &dout_rows } else { &dout }), arg(&k), arg(&v), st.clone()];
        let tail = [A::I(t as i64), A::I(s as i64), A::F(scale as f32), A::I(if rows { oh as i64 } else { 0 })];
        ins.into_iter().chain(outs).chain(tail).collect()
    };
    let with = |outs: Vec<A>| with_dout(outs, false);
    // Kernel `which` on `geometry` with dO as rows, against its outputs `want` (index, bytes) with
    // the (bh, t, hd) dO.
    let grad_rows = |which: &str, geometry: Launch, outs: Vec<A>, want: &[(usize, &[u8])]| {
        if oh == 0 {
            return;
        }
        let mut rows = with_dout(outs, true);
        emulate(&name(which), geometry, &mut rows);
        for &(i, bytes) in want {
            same(&rows[i], bytes, &format!("{which} output {i} with dO as rows"));
        }
    };
    let mut args = with(vec![uninit(t)]);
    go("dq", t, &mut args);
    check(&args[5], t, &dq, tol_grad, "dq");
    grad_rows("dq", launch::flash(t, bh, family != Flash::CudaCore), vec![uninit(t)], &[(5, bytes_of(&args[5]))]);
    if family == Flash::Mma && hd <= 64 {
        // The wide dq (PATCHLM_FLASH_WIDE): the same 16-key chunks in the same order, so the
        // same bytes as the default kernel's.
        let mut wide = with(vec![uninit(t)]);
        emulate(&name("dqw"), launch::flash_wide(t, bh), &mut wide);
        check(&wide[5], t, &dq, tol_grad, "dq (wide)");
        same(&wide[5], bytes_of(&args[5]), "wide dq");
        grad_rows("dqw", launch::flash_wide(t, bh), vec![uninit(t)], &[(5, bytes_of(&args[5]))]);
        // dq on Hopper's warpgroup MMAs (PATCHLM_FLASH_WGMMA; bf16 at head size 64): against the
        // reference; with q in registers (dqr, PATCHLM_FLASH_WGMMA_QREG) the same bytes;
        // either with dO as rows the same bytes as without.
        if hd == 64 && dtype == DType::BF16 {
            let mut wg = with(vec![uninit(t)]);
            emulate("flash_wg_dq_bf16_64", launch::flash(t, bh, true), &mut wg);
            check(&wg[5], t, &dq, tol_grad, "dq (wgmma)");
            // q in registers (dqr), two warpgroups (dqw, its tiles in dynamic shared memory), both.
            let wide = launch::flash_wg_wide(t, bh);
            for (kernel, geometry) in [
                ("flash_wg_dqr_bf16_64", launch::flash(t, bh, true)),
                ("flash_wg_dqw_bf16_64", wide),
                ("flash_wg_dqwr_bf16_64", wide),
            ] {
                let mut v = with(vec![uninit(t)]);
                emulate(kernel, geometry, &mut v);
                same(&v[5], bytes_of(&wg[5]), kernel);
            }
            for (kernel, geometry) in
                [("flash_wgs_dq_bf16_64", launch::flash(t, bh, true)), ("flash_wgs_dqwr_bf16_64", wide)]
            {
                let mut v = with(vec![uninit(t)]);
                with_mn_swapped(|| emulate(kernel, geometry, &mut v));
                same(&v[5], bytes_of(&wg[5]), &format!("{kernel} on the other reading"));
            }
            for (kernel, geometry) in
                [("flash_wg_dq_bf16_64", launch::flash(t, bh, true)), ("flash_wg_dqwr_bf16_64", wide)]
            {
                if oh == 0 {
                    break;
                }
                let mut rows = with_dout(vec![uninit(t)], true);
                emulate(kernel, geometry, &mut rows);
                same(&rows[5], bytes_of(&wg[5]), &format!("{kernel} with dO as rows"));
            }
        }
        // dq at four blocks an SM (PATCHLM_FLASH_OCC4, head size 64): each key tile in two
        // halves, the same products in the same order, so the same bytes.
        if hd == 64 {
            let mut occ = with(vec![uninit(t)]);
            go("dqo", t, &mut occ);
            same(&occ[5], bytes_of(&args[5]), "dqo");
        }
    }
    let parts: &[(&str, &Tensor)] = match family {
        Flash::Mma => &[("dkv", &dk)],
        Flash::CudaCore => &[("dk", &dk), ("dv", &dv)],
    };
    for &(which, want) in parts {
        let mut args = with(if which == "dkv" { vec![uninit(s), uninit(s)] } else { vec![uninit(s)] });
        go(which, s, &mut args);
        check(&args[5], s, want, tol_grad, if which == "dv" { "dv" } else { "dk" });
        if which == "dkv" {
            check(&args[6], s, &dv, tol_grad, "dv");
        }
        let geometry = launch::flash(s, bh, family != Flash::CudaCore);
        let outs = if which == "dkv" { vec![uninit(s), uninit(s)] } else { vec![uninit(s)] };
        let want: Vec<(usize, &[u8])> = (5..args.len() - 4).map(|i| (i, bytes_of(&args[i]))).collect();
        grad_rows(which, geometry, outs, &want);
    }
    if family == Flash::Mma && hd == 64 && dtype == DType::BF16 {
        // dk and dv on Hopper's warpgroup MMAs (PATCHLM_FLASH_WGMMA): against the reference, and
        // with dO as rows the same bytes as without.
        let geometry = launch::flash(s, bh, true);
        let mut wg = with(vec![uninit(s), uninit(s)]);
        emulate("flash_wg_dkv_bf16_64", geometry, &mut wg);
        check(&wg[5], s, &dk, tol_grad, "dk (wgmma)");
        check(&wg[6], s, &dv, tol_grad, "dv (wgmma)");
        if oh > 0 {
            let mut rows = with_dout(vec![uninit(s), uninit(s)], true);
            emulate("flash_wg_dkv_bf16_64", geometry, &mut rows);
            same(&rows[5], bytes_of(&wg[5]), "wgmma dk with dO as rows");
            same(&rows[6], bytes_of(&wg[6]), "wgmma dv with dO as rows");
        }
        // Built for the other reading, on an emulator that reads so: the same bytes.
        for (kernel, geometry) in
            [("flash_wgs_dkv_bf16_64", geometry), ("flash_wgs_dkvw_bf16_64", launch::flash_wide_bwd(s, bh))]
        {
            if kernel.contains("dkvw") && s != t {
                continue;
            }
            let mut v = with(vec![uninit(s), uninit(s)]);
            with_mn_swapped(|| emulate(kernel, geometry, &mut v));
            same(&v[5], bytes_of(&wg[5]), &format!("{kernel} dk on the other reading"));
            same(&v[6], bytes_of(&wg[6]), &format!("{kernel} dv on the other reading"));
        }
        // Two warpgroups of 64 keys a block (flash_wg_dkvw, PATCHLM_FLASH_WIDE_BWD): against the
        // reference, and where S = T (the query tiles start where the one-warpgroup blocks'
        // do) the same bytes; with dO as rows too.
        let wide = launch::flash_wide_bwd(s, bh);
        for rows in [false, true] {
            if rows && oh == 0 {
                continue;
            }
            let mut w2 = with_dout(vec![uninit(s), uninit(s)], rows);
            emulate("flash_wg_dkvw_bf16_64", wide, &mut w2);
            check(&w2[5], s, &dk, tol_grad, "dk (wgmma, two warpgroups)");
            check(&w2[6], s, &dv, tol_grad, "dv (wgmma, two warpgroups)");
            if s == t {
                same(&w2[5], bytes_of(&wg[5]), &format!("wgmma dk, two warpgroups, dO as rows {rows}"));
                same(&w2[6], bytes_of(&wg[6]), &format!("wgmma dv, two warpgroups, dO as rows {rows}"));
            }
        }
    }
    if family == Flash::Mma && !matches!(hd, 80 | 96) {
        // dq, dk and dv in one pass (PATCHLM_FLASH_DQ_ATOMIC; not at head sizes 80 and 96): dq summed over key blocks in a
        // zeroed f32 buffer with atomics, then scaled and rounded by flash_dq_cast.
        let nq = bh * t * hd;
        // The one pass's dq: its f32 sums scaled and rounded, against the reference.
        let check_dq = |acc: &A, part: &str| {
            let mut cast = [acc.clone(), uninit(t), A::I(nq as i64), A::F(scale as f32)];
            emulate(&format!("flash_dq_cast_{}", suffix(dtype)), launch::elems(nq), &mut cast);
            check(&cast[1], t, &dq, tol_grad, part);
        };
        let mut args = with(vec![uninit(s), uninit(s), zeroed(nq)]);
        go("dkvq", s, &mut args);
        check(&args[5], s, &dk, tol_grad, "dk (one pass)");
        check(&args[6], s, &dv, tol_grad, "dv (one pass)");
        check_dq(&args[7], "dq (one pass)");
        let want: Vec<(usize, &[u8])> = (5..8).map(|i| (i, bytes_of(&args[i]))).collect();
        grad_rows("dkvq", launch::flash(s, bh, true), vec![uninit(s), uninit(s), zeroed(nq)], &want);

        if hd == 64 {
            // The wide backward (PATCHLM_FLASH_WIDE_BWD: 128 keys a block of 8 warps): dk and dv
            // byte for byte the default kernel's (each key's arithmetic is the same, in the same
            // order), alone and in the one pass; the one pass's dq within the reference's bound
            // (its atomics add in another order).
            let (dk_bytes, dv_bytes) = (bytes_of(&args[5]).to_vec(), bytes_of(&args[6]).to_vec());
            let mut wide = with(vec![uninit(s), uninit(s)]);
            emulate(&name("dkvw"), launch::flash_wide_bwd(s, bh), &mut wide);
            check(&wide[5], s, &dk, tol_grad, "dk (wide)");
            same(&wide[5], &dk_bytes, "wide dk");
            same(&wide[6], &dv_bytes, "wide dv");
            grad_rows(
                "dkvw",
                launch::flash_wide_bwd(s, bh),
                vec![uninit(s), uninit(s)],
                &[(5, &dk_bytes), (6, &dv_bytes)],
            );
            let mut wide = with(vec![uninit(s), uninit(s), zeroed(nq)]);
            emulate(&name("dkvqw"), launch::flash_wide_bwd(s, bh), &mut wide);
            same(&wide[5], &dk_bytes, "wide one-pass dk");
            same(&wide[6], &dv_bytes, "wide one-pass dv");
            check_dq(&wide[7], "dq (wide one pass)");
            let want: Vec<(usize, &[u8])> = (5..8).map(|i| (i, bytes_of(&wide[i]))).collect();
            grad_rows("dkvqw", launch::flash_wide_bwd(s, bh), vec![uninit(s), uninit(s), zeroed(nq)], &want);
        }
        if hd == 64 && dtype == DType::BF16 {
            // The one pass on Hopper's warpgroup MMAs (PATCHLM_FLASH_WGMMA with
            // PATCHLM_FLASH_DQ_ATOMIC): dk and dv byte for byte the wgmma dk/dv pass's (the same
            // products in the same order), dq within the reference's bound; with dO as rows the
            // same bytes as without.
            let geometry = launch::flash(s, bh, true);
            let mut wg = with(vec![uninit(s), uninit(s), zeroed(nq)]);
            emulate("flash_wg_dkvq_bf16_64", geometry, &mut wg);
            let mut two = with(vec![uninit(s), uninit(s)]);
            emulate("flash_wg_dkv_bf16_64", launch::flash(s, bh, true), &mut two);
            check(&wg[5], s, &dk, tol_grad, "dk (wgmma one pass)");
            same(&wg[5], bytes_of(&two[5]), "wgmma one-pass dk");
            same(&wg[6], bytes_of(&two[6]), "wgmma one-pass dv");
            check_dq(&wg[7], "dq (wgmma one pass)");
            // Built for the other reading (both of its dq product's operands MN-major), on an
            // emulator that reads so: the same dk and dv, dq within the bound.
            let mut sw = with(vec![uninit(s), uninit(s), zeroed(nq)]);
            with_mn_swapped(|| emulate("flash_wgs_dkvq_bf16_64", geometry, &mut sw));
            same(&sw[5], bytes_of(&wg[5]), "flash_wgs_dkvq dk on the other reading");
            same(&sw[6], bytes_of(&wg[6]), "flash_wgs_dkvq dv on the other reading");
            check_dq(&sw[7], "dq (flash_wgs_dkvq on the other reading)");
            if oh > 0 {
                let mut rows = with_dout(vec![uninit(s), uninit(s), zeroed(nq)], true);
                emulate("flash_wg_dkvq_bf16_64", geometry, &mut rows);
                same(&rows[5], bytes_of(&wg[5]), "wgmma one-pass dk with dO as rows");
                same(&rows[6], bytes_of(&wg[6]), "wgmma one-pass dv with dO as rows");
                check_dq(&rows[7], "wgmma one-pass dq with dO as rows");
            }
        }
    }
}

/// An attention shape: (heads, queries, keys, head size).
type AttnShape = (usize, usize, usize, usize);

/// The tensor-core kernels' cases: shape, dtype, misaligned inputs, the queries' standard
/// deviation. 14 more keys than queries puts the last key some warp's first row sees one short of
/// a tile's end (forward, dq) and a tile of queries one short of seeing all of a warp's keys (dk,
/// dv): where an off-by-one in the kernels' test for a tile without masked scores shows (with
/// uniform probabilities, q = 0, whatever the random draw).
const TENSOR_CORE_CASES: [(AttnShape, DType, bool, f64); 7] = [
    ((2, 70, 70, 64), DType::BF16, false, 1.5),
    ((1, 40, 52, 64), DType::BF16, true, 1.5),
    ((1, 33, 80, 32), DType::BF16, false, 1.5),
    ((1, 130, 130, 64), DType::F16, false, 1.5),
    ((4, 20, 20, 32), DType::F16, true, 1.5),
    ((1, 130, 144, 64), DType::BF16, false, 1.5),
    ((1, 130, 144, 64), DType::F16, false, 0.0),
];

/// The mma.sync flash attention kernels (forward, dq, dk+dv, and dq+dk+dv in one pass; mma's
/// fragment layout emulated as the PTX ISA specifies it), on shapes with partial tiles, more keys
/// than queries (a cache), both head sizes and both 16-bit dtypes, and once with inputs that are
/// not 16-byte aligned (the kernels' element-wise loads).
#[test]
fn emulated_mma_flash_attention_matches_reference() {
    for (shape, dtype, misalign, q_sd) in TENSOR_CORE_CASES {
        check_flash(Flash::Mma, shape, dtype, misalign, q_sd);
    }
}

/// The forward's online softmax skips a warp's rescale of its accumulators where no row of the
/// warp has a new maximum: scores built so that in the last key tile only the second row of each
/// lane (rows 8–15 of every warp's 16) finds a larger score (a key that only those queries point
/// at), while every first row keeps the maximum of a key all queries point at (key 0). A kernel
/// that asked only the first rows before skipping would leave the second rows' accumulators at
/// the old scale; the mma.sync and wgmma forwards match the reference.
#[test]
fn emulated_flash_forward_rescales_rows_whose_maximum_moved() {
    let (t, hd) = (192usize, 64usize);
    let scale = 1.0 / (hd as f64).sqrt();
    let dev = Device::Cpu;
    let noise = |n: usize| Tensor::randn(0f32, 0.3, (1, n, hd), &dev).unwrap();
    let onehot = |n: usize, col: usize, at: &dyn Fn(usize) -> f32| {
        let mut x = vec![0f32; n * hd];
        for r in 0..n {
            x[r * hd + col] = at(r);
        }
        Tensor::from_vec(x, (1, n, hd), &dev).unwrap()
    };
    // Scores (times scale): key 0 gives every query 4; key 150 (the third tile) gives the queries
    // of rows 8–15 of each 16 that see it 6; the rest are small.
    let q = ((noise(t) + onehot(t, 0, &|_| 4.0)).unwrap() + onehot(t, 1, &|r| if r % 16 >= 8 { 6.0 } else { 0.0 }))
        .unwrap();
    let k = ((noise(t) + onehot(t, 0, &|r| if r == 0 { 8.0 } else { 0.0 })).unwrap()
        + onehot(t, 1, &|r| if r == 150 { 8.0 } else { 0.0 }))
    .unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, t, hd), &dev).unwrap();
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let (q, k, v) = (bf(&q), bf(&k), bf(&v));
    let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let [o, lse, ..] = attention_reference(&f(&q), &f(&k), &f(&v), &f(&v), scale);
    for (kernel, geometry) in [
        ("flash_mma_fwd_bf16_64", launch::flash(t, 1, true)),
        ("flash_wg_fwd_bf16_64", launch::flash(t, 1, true)),
        ("flash_wg_fwdw_bf16_64", launch::flash_wg_wide(t, 1)),
    ] {
        let mut args = [
            input(&q, false),
            input(&k, false),
            input(&v, false),
            out(t * hd, DType::BF16),
            out(t, DType::F32),
            A::I(t as i64),
            A::I(t as i64),
            A::F(scale as f32),
            A::I(0),
        ];
        emulate(kernel, geometry, &mut args);
        let e = max_rel(&output(&args[3], DType::BF16, &[1, t, hd]), &o);
        assert!(e < 1e-2, "{kernel}: output rel err {e}");
        let e = max_rel(&output(&args[4], DType::F32, &[1, t]), &lse);
        assert!(e < 2e-3, "{kernel}: lse rel err {e}");
    }
}

/// The wide backward kernels' dynamic shared memory: the launcher's size
/// (`launch::flash_wide_bwd_smem`) is what the kernels lay out (`DkvSmem` in kernels/flash.cu);
/// and the wgmma one pass's (`launch::flash_wg_dkvq_smem`, `WgDkvSmem` in kernels/hopper.cu) and
/// two-warpgroup dq's (`launch::flash_wg_dqw_smem`, `WgDqSmem`).
#[test]
fn emulated_wide_flash_backward_shared_memory_agrees() {
    let mut args = [out(2, DType::U32)];
    emulate("flash_dkvw_smem_bytes", launch::elems(1), &mut args);
    let b = bytes_of(&args[0]);
    let got = [0, 4].map(|i| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()));
    assert_eq!(got, [launch::flash_wide_bwd_smem(false), launch::flash_wide_bwd_smem(true)]);
    // Only the one pass needs the 48 KB limit raised.
    assert!(got[0] <= 48 * 1024 && got[1] > 48 * 1024, "{got:?}");
    // The same for the wgmma one pass (`WgDkvSmem` in kernels/hopper.cu).
    let mut args = [out(1, DType::U32)];
    emulate("flash_wg_dkvq_smem_bytes", launch::elems(1), &mut args);
    let got = u32::from_le_bytes(bytes_of(&args[0])[..4].try_into().unwrap());
    assert_eq!(got, launch::flash_wg_dkvq_smem());
    assert!(got > 48 * 1024, "{got}");
    // And the two-warpgroup wgmma dq's (`WgDqSmem`).
    let mut args = [out(1, DType::U32)];
    emulate("flash_wg_dqw_smem_bytes", launch::elems(1), &mut args);
    let got = u32::from_le_bytes(bytes_of(&args[0])[..4].try_into().unwrap());
    assert_eq!(got, launch::flash_wg_dqw_smem());
    assert!(got > 48 * 1024, "{got}");
}

/// The mma.sync kernels at head sizes 80, 96 and 128 (PATCHLM_FLASH_MMA_LARGE_HEADS: 32-key
/// forward and dq tiles, 16-query dk/dv tiles; at 80 an odd number of k-steps, the last through
/// ldmatrix.x2), on shapes with partial tiles of each size, more keys than queries, both 16-bit
/// dtypes, misaligned inputs and uniform probabilities.
#[test]
fn emulated_mma_flash_attention_large_heads_match_reference() {
    for (shape, dtype, misalign, q_sd) in [
        ((1, 70, 70, 96), DType::BF16, false, 1.5),
        ((2, 37, 50, 128), DType::F16, false, 1.5),
        ((1, 20, 20, 96), DType::F16, true, 1.5),
        ((1, 130, 144, 128), DType::BF16, false, 1.5),
        ((1, 66, 80, 128), DType::BF16, false, 0.0),
        ((2, 45, 61, 80), DType::BF16, false, 1.5),
        ((1, 33, 33, 80), DType::F16, true, 1.5),
        ((1, 40, 70, 80), DType::BF16, false, 0.0),
    ] {
        check_flash(Flash::Mma, shape, dtype, misalign, q_sd);
    }
}

/// The CUDA-core flash attention kernels (forward, dq, dk, dv; the forward has passed on a GPU,
/// tests/cuda.rs, which makes it a check of the emulator too): f32 and a 16-bit dtype, partial
/// blocks, more keys than queries, and more queries than dk/dv stage at once (4096 / head size).
#[test]
fn emulated_cuda_core_flash_attention_matches_reference() {
    check_flash(Flash::CudaCore, (2, 50, 70, 64), DType::F32, false, 1.5);
    check_flash(Flash::CudaCore, (1, 70, 70, 32), DType::BF16, true, 1.5);
    check_flash(Flash::CudaCore, (1, 100, 110, 64), DType::F32, false, 1.5);
}

/// The RMSNorm kernels against the CPU ops: one block per row (the default: forward, backward
/// with the per-row 1/rms it saves, the weight gradient's f32 partial sums and their cast) and a
/// warp per row (PATCHLM_ROWS_CUDA; 8 rows a block of 256 threads: forward, forward with the
/// residual add, backward with and without the residual branch). Rows of 200 (16-byte packs) and
/// 37 (element tails), a row count that leaves a block part-empty, unaligned inputs once, 300
/// rows, more than the weight gradient's 256 chunks, and rows of 600 (the weight gradient's
/// columns in three blocks). The last row (of x, and of the residual added to it) is 1000 times
/// smaller than the rest, so that its mean square is below eps and eps's sign shows.
#[test]
fn emulated_rmsnorm_matches_cpu() {
    let eps = 1e-5f64;
    for (n, d, dtype, misalign) in [
        (13usize, 200usize, DType::BF16, false),
        (9, 37, DType::F32, false),
        (11, 64, DType::F16, true),
        (300, 40, DType::F32, false),
        (5, 600, DType::BF16, false),
    ] {
        let what = format!("{n}x{d} {dtype:?} misaligned={misalign}");
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let r =
            |sd: f32, shape: &[usize]| Tensor::randn(0f32, sd, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let (x, b, w, dy, res) = (r(2.0, &[n, d]), r(1.0, &[n, d]), r(1.0, &[d]), r(1.0, &[n, d]), r(1.0, &[n, d]));
        let small: Vec<f32> = (0..n).map(|i| if i + 1 == n { 1e-3 } else { 1.0 }).collect();
        let small = Tensor::from_vec(small, (n, 1), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let (x, b) = (x.broadcast_mul(&small).unwrap(), b.broadcast_mul(&small).unwrap());
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        // One kernel: `ins`, then output buffers (elements, dtype), then (d, eps) and, for the
        // warp-per-row kernels (`*_w`), the row count; returns the outputs, flat. `skew` names
        // one buffer (ins, then outs) to start one element off its alignment, the rest aligned.
        let run_skewed = |kernel: &str, ins: &[&Tensor], outs: &[(usize, DType)], skew: Option<usize>| {
            let warp = kernel.ends_with("_w");
            let mut a: Vec<A> = ins
                .iter()
                .enumerate()
                .map(|(i, t)| input(t, misalign || skew == Some(i)))
                .chain(outs.iter().enumerate().map(|(i, &(len, dt))| out_at(len, dt, skew == Some(ins.len() + i))))
                .chain([A::I(d as i64), A::F(eps as f32)])
                .chain(warp.then_some(A::I(n as i64)))
                .collect();
            let geometry = if warp { launch::warp_rows(n) } else { launch::rms_rows(n, d) };
            let wide = emulate(&format!("{kernel}_{}", suffix(dtype)), geometry, &mut a).wide;
            // The warp-per-row kernels take rows of whole 16-byte packs from aligned buffers in
            // wide accesses, and such rows with a buffer one element off element by element (the
            // block-per-row kernels have no wide path; a row's 1/rms is one f32 written alone).
            let whole = d % pack_len(dtype) == 0;
            let row_wise = skew.is_some_and(|i| i < ins.len() || outs[i - ins.len()] != (n, DType::F32));
            if misalign || !warp || (whole && row_wise) {
                assert_eq!(wide, 0, "{what}: {kernel} made {wide} wide accesses where it has none to make ({skew:?})");
            } else if whole {
                assert!(wide > 0, "{what}: {kernel} took its element-by-element path on aligned rows of whole packs");
            }
            outs.iter().enumerate().map(|(i, &(len, dt))| output(&a[ins.len() + i], dt, &[len])).collect::<Vec<_>>()
        };
        let run = |kernel: &str, ins: &[&Tensor], outs: &[(usize, DType)]| run_skewed(kernel, ins, outs, None);
        let check = |got: &Tensor, want: &Tensor, tol: f32, part: &str| {
            let e = max_rel(got, &f(want));
            assert!(e < tol, "{what}: {part} rel err {e}");
        };
        // The backward leaves 1/rms per row, in f32 from the rounded inputs.
        let xf = x.to_dtype(DType::F32).unwrap();
        let rs = (xf.sqr().unwrap().mean_keepdim(1).unwrap() + eps).unwrap().sqrt().unwrap().recip().unwrap();
        let (dx, dw) = patchlm_model::ops::grad::rms_norm(&x, &w, &dy, eps).unwrap();

        for kernel in ["rms_fwd", "rms_fwd_w"] {
            let y = run(kernel, &[&x, &w], &[(n * d, dtype)]);
            check(&y[0], &patchlm_model::ops::rms_norm(&x, &w, eps).unwrap(), tol, kernel);
        }
        for kernel in ["rms_dx", "rms_dx_w"] {
            let dxr = run(kernel, &[&x, &w, &dy], &[(n * d, dtype), (n, DType::F32)]);
            check(&dxr[0], &dx, tol * 2.0, kernel);
            check(&dxr[1], &rs, 1e-5, &format!("{kernel} 1/rms"));
        }

        // The weight gradient: f32 partial sums over chunks of rows (atomics), then the cast.
        let (geometry, rows_per_chunk) = launch::rms_dw(n, d);
        let mut a = [
            input(&x, misalign),
            input(&dy, misalign),
            A::Buf(bytes(&rs.flatten_all().unwrap())),
            zeroed(d),
            A::I(n as i64),
            A::I(d as i64),
            A::I(rows_per_chunk as i64),
        ];
        emulate(&format!("rms_dw_{}", suffix(dtype)), geometry, &mut a);
        let acc = output(&a[3], DType::F32, &[d]);
        check(&acc, &dw, tol * 2.0, "rms_dw");
        let mut a = [A::Buf(bytes(&acc)), out(d, dtype), A::I(d as i64)];
        emulate(&format!("cast_from_f32_{}", suffix(dtype)), launch::elems(d), &mut a);
        let A::Buf(cast) = &a[1] else { unreachable!() };
        assert_eq!(cast, &bytes(&acc.to_dtype(dtype).unwrap()), "{what}: cast_from_f32");

        let sy = run("add_rms_fwd_w", &[&x, &b, &w], &[(n * d, dtype), (n * d, dtype)]);
        let (sum, norm) = patchlm_model::ops::add_rms_norm(&x, &b, &w, eps).unwrap();
        check(&sy[0], &sum, tol, "add_rms_fwd_w sum");
        check(&sy[1], &norm, tol, "add_rms_fwd_w norm");

        let dxr = run("rms_dx_res_w", &[&x, &w, &dy, &res], &[(n * d, dtype), (n, DType::F32)]);
        let want = patchlm_model::ops::grad::rms_norm_residual(&x, &w, &dy, &res, eps).unwrap().0;
        check(&dxr[0], &want, tol * 2.0, "rms_dx_res_w");

        // Each buffer of the warp-per-row kernels skewed alone, the others aligned: a check that
        // misses that buffer, or asks about it at another row (where the rows are not whole
        // packs, row r's start can be aligned while the row the check computes is not), takes a
        // wide access off its alignment, which fails the emulator; the outputs stay the aligned
        // run's, within the reference's bound.
        if !misalign {
            let nd = (n * d, dtype);
            let cases = [
                ("rms_fwd_w", &[&x, &w][..], &[nd][..]),
                ("rms_dx_w", &[&x, &w, &dy], &[nd, (n, DType::F32)]),
                ("add_rms_fwd_w", &[&x, &b, &w], &[nd, nd]),
                ("rms_dx_res_w", &[&x, &w, &dy, &res], &[nd, (n, DType::F32)]),
            ];
            for (kernel, ins, outs) in cases {
                let aligned = run(kernel, ins, outs);
                for skew in 0..ins.len() + outs.len() {
                    for (i, (got, want)) in run_skewed(kernel, ins, outs, Some(skew)).iter().zip(&aligned).enumerate() {
                        let e = max_rel(got, want);
                        assert!(
                            e < tol * 2.0,
                            "{what}: {kernel} output {i} with buffer {skew} skewed alone, rel err {e}"
                        );
                    }
                }
            }
        }
    }
    // The cast alone over more than one block of 1024 threads, bit for bit as candle rounds.
    let acc = Tensor::randn(0f32, 3.0, 2500, &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let mut a = [A::Buf(bytes(&acc)), out(2500, dtype), A::I(2500)];
        emulate(&format!("cast_from_f32_{}", suffix(dtype)), launch::elems(2500), &mut a);
        assert!(bytes_of(&a[1]) == bytes(&acc.to_dtype(dtype).unwrap()), "cast_from_f32 of 2500 to {dtype:?}");
    }
}

/// The causal softmax kernels (forward and backward), one block per row (the default) and a warp
/// per row (PATCHLM_ROWS_CUDA), against the CPU op: queries the last `t` of `s` positions, rows
/// of 40 (16-byte packs for bf16) and 21 (tails), and rows of 700 (a block's threads loop), the
/// rows at levels far apart.
#[test]
fn emulated_causal_softmax_matches_cpu() {
    for (bh, t, s, dtype) in [
        (3usize, 7usize, 40usize, DType::BF16),
        (2, 21, 21, DType::F32),
        (1, 9, 16, DType::F16),
        (1, 5, 700, DType::F32),
    ] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let scale = 0.3f64;
        let n = bh * t;
        // Rows 400 apart in level (120 after the scale): a row shifted by anything but its own
        // maximum overflows or underflows f32. Every third row (from row 1) has a first logit 100
        // above the rest after the scale: a row shifted by less than its maximum (a pack's
        // smallest, say) overflows there.
        let levels = row_levels(n, 400.0).reshape((1, bh, t, 1)).unwrap();
        let x = Tensor::randn(0f32, 3.0, (1, bh, t, s), &Device::Cpu).unwrap();
        let x = (x.broadcast_add(&levels).unwrap()
            + row_spikes(n, s, |_| 0, 100.0 / scale as f32).reshape((1, bh, t, s)))
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
        let dy = Tensor::randn(0f32, 1.0, (1, bh, t, s), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let y = patchlm_model::ops::causal_softmax(&x, scale).unwrap();
        let dx = patchlm_model::ops::grad::causal_softmax(&y, &dy, scale).unwrap();
        // With `skew`, one input (x forward, dy backward) sits one element off its alignment
        // and every other buffer on it: a kernel that takes wide accesses where only some of its
        // pointers allow them (a check that combines the addresses with `&` instead of `|`)
        // then fails as the GPU would.
        for (warp, skew) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("{bh}x{t}x{s} {dtype:?} warp per row: {warp}, one input skewed: {skew}");
            let (w, geometry) = if warp { ("_w", launch::warp_rows(n)) } else { ("", launch::softmax_rows(n, s)) };
            // (t, s, scale) and, warp per row, the row count.
            let tail = || {
                [A::I(t as i64), A::I(s as i64), A::F(scale as f32)].into_iter().chain(warp.then_some(A::I(n as i64)))
            };
            // The warp-per-row kernels take aligned rows of whole 16-byte packs in wide accesses
            // and a skewed row element by element (the block-per-row kernels have no wide path).
            let wide_as_expected = |wide: u64, part: &str| {
                if !warp || skew {
                    assert_eq!(wide, 0, "{what}: {part} made {wide} wide accesses");
                } else if s % pack_len(dtype) == 0 {
                    assert!(wide > 0, "{what}: {part} took its element-by-element path on rows of whole packs");
                }
            };
            let mut a: Vec<A> = [input(&x, skew), out(n * s, dtype)].into_iter().chain(tail()).collect();
            let wide = emulate(&format!("causal_softmax_fwd{w}_{}", suffix(dtype)), geometry, &mut a).wide;
            wide_as_expected(wide, "forward");
            let e = max_rel(&output(&a[1], dtype, &[1, bh, t, s]), &f(&y));
            assert!(e < tol, "{what}: forward rel err {e}");
            let mut a: Vec<A> =
                [input(&y, false), input(&dy, skew), out(n * s, dtype)].into_iter().chain(tail()).collect();
            let wide = emulate(&format!("causal_softmax_bwd{w}_{}", suffix(dtype)), geometry, &mut a).wide;
            wide_as_expected(wide, "backward");
            let e = max_rel(&output(&a[2], dtype, &[1, bh, t, s]), &f(&dx));
            assert!(e < tol * 2.0, "{what}: backward rel err {e}");
        }
    }
}

/// The cross-entropy kernels (one block per row; K targets per row, repeats allowed): the default
/// pair (`ce_fwd`: per-row losses; `ce_bwd`: the logits' gradient, recomputing each row's
/// log-sum-exp) and the pair that keeps the log-sum-exp (PATCHLM_ROWS_CUDA: `ce_fwd_lse` also
/// writes it, `ce_bwd_lse` reads it back), against cross-entropy in f32 with candle ops and its
/// gradient from candle's autograd, each row's loss weighted by its own scale. The rows lie
/// 120 apart in level (−120, 0, +120 in turn), so that a log-sum-exp shifted by anything but its
/// own row's maximum (another row's, a stale one, none) overflows or underflows f32, and every
/// third row has one logit 100 above the rest (so does one shifted by less than its maximum).
#[test]
fn emulated_cross_entropy_matches_reference() {
    for (n, v, k, dtype, misalign) in [
        (5usize, 1001usize, 3usize, DType::BF16, false),
        (4, 96, 1, DType::F32, true),
        (3, 700, 4, DType::F16, false),
        // More targets than a warp has lanes (the forward's second round of loads), repeats.
        (2, 300, 40, DType::F32, false),
    ] {
        let what = format!("{n}x{v} k={k} {dtype:?}");
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let x = Tensor::randn(0f32, 3.0, (n, v), &Device::Cpu).unwrap();
        let x = (x.broadcast_add(&row_levels(n, 120.0)).unwrap() + row_spikes(n, v, |r| (r * 37 + 1) % v, 100.0))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        // Row 0 names one id twice (where K > 1): its gradient counts it twice. Row 1 starts
        // with row 0's first id: a row that also counted the next row's targets shows.
        let mut ids: Vec<u32> = (0..n * k).map(|i| ((i * 7919 + 3) % v) as u32).collect();
        if k > 1 {
            ids[1] = ids[0];
        }
        ids[k] = ids[0];
        let tg = Tensor::from_vec(ids, (n, k), &Device::Cpu).unwrap();
        let g = Tensor::rand(0.5f32, 1.5, n, &Device::Cpu).unwrap();
        // Reference: per-row Σ_k (lse − x[t_k]) and the gradient of Σ_rows g · loss.
        let xv = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let m = xv.max_keepdim(1).unwrap().detach();
        let lse = (xv.broadcast_sub(&m).unwrap().exp().unwrap().sum_keepdim(1).unwrap().log().unwrap() + &m).unwrap();
        let picked = xv.gather(&tg, 1).unwrap();
        let loss = lse.broadcast_sub(&picked).unwrap().sum(1).unwrap();
        let dx = (&loss * &g).unwrap().sum_all().unwrap().backward().unwrap().get(&xv).unwrap().clone();
        let lse = lse.flatten_all().unwrap().detach();

        for keep in [false, true] {
            let what = format!("{what} keeping the log-sum-exp: {keep}");
            let sfx = if keep { format!("lse_{}", suffix(dtype)) } else { suffix(dtype).to_string() };
            let geometry = launch::cross_entropy(n, v);
            let tail = [A::I(v as i64), A::I(k as i64)].into_iter().chain(keep.then_some(A::I(n as i64)));
            let mut a: Vec<A> =
                [input(&x, misalign), A::Buf(bytes(&tg)), out(if keep { 2 * n } else { n }, DType::F32)]
                    .into_iter()
                    .chain(tail.clone())
                    .collect();
            // The kernels that keep the log-sum-exp read a row that starts 16-byte aligned in
            // wide accesses (row 0 of an aligned buffer at least; no row of the skewed one, whose
            // rows are whole packs apart); the others have no wide path.
            let wide_as_expected = |wide: u64, part: &str| {
                assert_eq!(wide > 0, keep && !misalign, "{what}: {part} made {wide} wide accesses");
            };
            let wide = emulate(&format!("ce_fwd_{sfx}"), geometry, &mut a).wide;
            wide_as_expected(wide, "forward");
            let got = output(&a[2], DType::F32, &[if keep { 2 } else { 1 }, n]);
            let e = max_rel(&got.get(0).unwrap(), &loss);
            assert!(e < 1e-5, "{what}: per-row loss rel err {e}");
            if keep {
                let e = max_rel(&got.get(1).unwrap(), &lse);
                assert!(e < 1e-5, "{what}: log-sum-exp rel err {e}");
            }
            let scales = if keep { Tensor::stack(&[&g, &lse], 0).unwrap() } else { g.clone() };
            let mut a: Vec<A> = [input(&x, misalign), A::Buf(bytes(&tg)), A::Buf(bytes(&scales)), out(n * v, dtype)]
                .into_iter()
                .chain(tail)
                .collect();
            let wide = emulate(&format!("ce_bwd_{sfx}"), geometry, &mut a).wide;
            wide_as_expected(wide, "backward");
            let e = max_rel(&output(&a[3], dtype, &[n, v]), &dx);
            assert!(e < tol, "{what}: gradient rel err {e}");
        }
    }
}

/// (n, 1) f32 levels to add to n rows: −`step`, 0, +`step`, −`step`, … (row r at `step · (r mod 3 − 1)`).
fn row_levels(n: usize, step: f32) -> Tensor {
    Tensor::from_vec((0..n).map(|r| step * ((r % 3) as f32 - 1.0)).collect::<Vec<f32>>(), (n, 1), &Device::Cpu).unwrap()
}

/// (n, cols) f32 zeros but for `height` at column `col(r)` of every third row from row 1 (a
/// logit far above the rest of its row; the other rows keep probabilities that are not all
/// near 0, so that the tests still see errors there).
fn row_spikes(n: usize, cols: usize, col: impl Fn(usize) -> usize, height: f32) -> Tensor {
    let mut z = vec![0f32; n * cols];
    for r in (1..n).step_by(3) {
        z[r * cols + col(r)] = height;
    }
    Tensor::from_vec(z, (n, cols), &Device::Cpu).unwrap()
}

/// A target id outside the vocabulary, which only the CPU path refuses: on CUDA its row's loss is
/// NaN (no logit is read for it, the next row's first one included), so that a run stops at a
/// non-finite loss, and the gradient has no entry for it (nothing is written past the row). Every
/// other row, and the row's valid target, is as with valid ids. The bad id is V itself (the first
/// one out) in the last row (whose next element is past the buffer) and in a middle row.
#[test]
fn emulated_cross_entropy_target_outside_the_vocabulary() {
    let (n, v, k) = (3usize, 50usize, 2usize);
    let x = Tensor::randn(0f32, 2.0, (n, v), &Device::Cpu).unwrap();
    let g = Tensor::new(&[0.5f32, 1.25, 2.0], &Device::Cpu).unwrap();
    for bad_row in [1, n - 1] {
        let mut ids: Vec<u32> = vec![3, 7, 11, 5, 40, 9];
        ids[bad_row * k] = v as u32;
        let tg = Tensor::from_vec(ids.clone(), (n, k), &Device::Cpu).unwrap();
        // Reference, row by row: lse − x[t] per valid target; the gradient g · (k · softmax − Σ
        // of the valid targets' one-hots).
        let xs = x.to_vec2::<f32>().unwrap();
        let gs = g.to_vec1::<f32>().unwrap();
        let mut want_loss = vec![0f32; n];
        let mut want_dx = vec![0f32; n * v];
        for r in 0..n {
            let m = xs[r].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + xs[r].iter().map(|&e| (e - m).exp()).sum::<f32>().ln();
            for j in 0..v {
                want_dx[r * v + j] = gs[r] * k as f32 * (xs[r][j] - lse).exp();
            }
            for &t in &ids[r * k..(r + 1) * k] {
                if (t as usize) < v {
                    want_loss[r] += lse - xs[r][t as usize];
                    want_dx[r * v + t as usize] -= gs[r];
                }
            }
        }
        let want_dx = Tensor::from_vec(want_dx, (n, v), &Device::Cpu).unwrap();
        for keep in [false, true] {
            let what = format!("bad id in row {bad_row}, keeping the log-sum-exp: {keep}");
            let sfx = if keep { "lse_f32" } else { "f32" };
            let geometry = launch::cross_entropy(n, v);
            let tail = [A::I(v as i64), A::I(k as i64)].into_iter().chain(keep.then_some(A::I(n as i64)));
            let mut a: Vec<A> = [input(&x, false), A::Buf(bytes(&tg)), out(if keep { 2 * n } else { n }, DType::F32)]
                .into_iter()
                .chain(tail.clone())
                .collect();
            emulate(&format!("ce_fwd_{sfx}"), geometry, &mut a);
            let got = f32s(bytes_of(&a[2]));
            for r in 0..n {
                if r == bad_row {
                    assert!(got[r].is_nan(), "{what}: the row's loss is {}, not NaN", got[r]);
                } else {
                    let e = (got[r] - want_loss[r]).abs() / want_loss[r].abs();
                    assert!(e < 1e-5, "{what}: row {r}'s loss {} against {}", got[r], want_loss[r]);
                }
            }
            let scales = if keep {
                let lse = output(&a[2], DType::F32, &[2, n]).get(1).unwrap();
                Tensor::stack(&[&g, &lse], 0).unwrap()
            } else {
                g.clone()
            };
            let mut a: Vec<A> = [input(&x, false), A::Buf(bytes(&tg)), A::Buf(bytes(&scales)), out(n * v, DType::F32)]
                .into_iter()
                .chain(tail)
                .collect();
            emulate(&format!("ce_bwd_{sfx}"), geometry, &mut a);
            let e = max_rel(&output(&a[3], DType::F32, &[n, v]), &want_dx);
            assert!(e < 1e-5, "{what}: gradient rel err {e}");
        }
    }
}

/// The layout kernels (PATCHLM_LAYOUT_CUDA) against the CPU ops: q/k/v rows → heads with RoPE
/// and back, and without RoPE; 16-byte packs (bf16 and f32, with and without key/value heads) and
/// element by element (a head too small for two packs, unaligned buffers).
#[test]
fn emulated_layout_kernels_match_cpu() {
    use patchlm_model::ops::{heads_from_rows, rows_from_heads, HeadsLayout};
    for (b, t, h, kv, hd, dtype, misalign) in [
        (2usize, 5usize, 3usize, 1usize, 8usize, DType::BF16, false),
        (2, 5, 3, 1, 16, DType::BF16, false),
        (2, 3, 2, 0, 16, DType::BF16, false),
        (2, 5, 3, 1, 8, DType::F32, false),
        (1, 3, 2, 2, 64, DType::F16, true),
        // Grouped-query heads in more than one batch row: a key/value head's offset scales the
        // batch index by kv, which kv = 1 or b = 1 cannot tell from a division.
        (3, 4, 4, 2, 8, DType::BF16, false),
    ] {
        let what = format!("b={b} t={t} h={h} kv={kv} hd={hd} {dtype:?} misaligned={misalign}");
        let layout = HeadsLayout { batch: b, seq: t, heads: h, kv_heads: kv, head_dim: hd };
        let (cols, total) = ((h + 2 * kv) * hd, b * t * (h + 2 * kv) * hd);
        let angles = Tensor::randn(0f32, 2.0, (t, hd), &Device::Cpu).unwrap();
        let (c, sn) = (angles.cos().unwrap(), angles.sin().unwrap());
        // The kernels' trailing (b, t, h, kv, hd, rope) arguments.
        let dims = |rope: bool| [b, t, h, kv, hd, usize::from(rope)].map(|d| A::I(d as i64));
        let geometry = launch::heads(b * t, cols);
        let sfx = suffix(dtype);
        let x = Tensor::randn(0f32, 1.0, (b * t, cols), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        for rope in [true, false] {
            let what = format!("{what} rope={rope}");
            let tables = rope.then_some((&c, &sn));
            let (q, kvp) = heads_from_rows(&x, layout, tables).unwrap();
            let mut parts = vec![q.flatten_all().unwrap()];
            if let Some((k, v)) = &kvp {
                parts.extend([k.flatten_all().unwrap(), v.flatten_all().unwrap()]);
            }
            let want = Tensor::cat(&parts, 0).unwrap().to_dtype(DType::F32).unwrap();
            let mut a = vec![input(&x, misalign), A::Buf(bytes(&c)), A::Buf(bytes(&sn)), out(total, dtype)];
            a.extend(dims(rope));
            // Heads of at least two 16-byte packs from aligned buffers go a pack at a time, the
            // rest element by element.
            let packs = !misalign && hd % (2 * pack_len(dtype)) == 0;
            let wide = emulate(&format!("heads_from_rows_{sfx}"), geometry, &mut a).wide;
            assert_eq!(wide > 0, packs, "{what}: heads_from_rows made {wide} wide accesses");
            let e = max_rel(&output(&a[3], dtype, &[total]), &want);
            assert!(e < 1e-6, "{what}: heads_from_rows rel err {e}");

            // Back: the inverse rotation, onto the row layout (without key/value heads, q stands
            // in for them, unread).
            let kv_pair = kvp.as_ref().map(|(k, v)| (k, v));
            let back = rows_from_heads(&q, kv_pair, layout, tables).unwrap().to_dtype(DType::F32).unwrap();
            let (k, v) = kv_pair.unwrap_or((&q, &q));
            let mut a = vec![input(&q, misalign), input(k, misalign), input(v, misalign)];
            a.extend([A::Buf(bytes(&c)), A::Buf(bytes(&sn)), out(total, dtype)]);
            a.extend(dims(rope));
            let wide = emulate(&format!("rows_from_heads_{sfx}"), geometry, &mut a).wide;
            assert_eq!(wide > 0, packs, "{what}: rows_from_heads made {wide} wide accesses");
            let e = max_rel(&output(&a[5], dtype, &[b * t, cols]), &back);
            assert!(e < 1e-6, "{what}: rows_from_heads rel err {e}");
        }
    }
}

/// SwiGLU on the stacked gate/up projection (PATCHLM_LAYOUT_CUDA), forward and backward, against
/// the CPU op: rows of 16-byte packs and rows with element tails, 7 rows (one block) and 350 (more
/// packs than a block has threads, so that the grid-stride loop's later blocks have work).
#[test]
fn emulated_swiglu_packed_matches_cpu() {
    for dtype in [DType::BF16, DType::F32] {
        let sfx = suffix(dtype);
        for (rows, f) in [(7usize, 24usize), (7, 13), (350, 24), (350, 13)] {
            let what = format!("swiglu_packed {dtype:?} {rows} rows, f={f}");
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            let gu = Tensor::randn(0f32, 2.0, (rows, 2 * f), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let dy = Tensor::randn(0f32, 1.0, (rows, f), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let n = rows * f;
            let y = patchlm_model::ops::swiglu_packed(&gu).unwrap().to_dtype(DType::F32).unwrap();
            let mut a = [A::Buf(bytes(&gu)), out(n, dtype), A::I(n as i64), A::I(f as i64)];
            // Rows of whole 16-byte packs go a pack a thread: the forward reads a gate and an up
            // pack and writes one, the backward reads those and dy's and writes two.
            let packs = if f % pack_len(dtype) == 0 { n / pack_len(dtype) } else { 0 };
            let wide = emulate(&format!("swiglu_packed_fwd_{sfx}"), launch::elems(n), &mut a).wide;
            assert_eq!(wide as usize, 3 * packs, "{what}: the forward's wide accesses");
            let e = max_rel(&output(&a[1], dtype, &[rows, f]), &y);
            assert!(e < tol, "{what}: forward rel err {e}");
            let d = patchlm_model::ops::grad::swiglu_packed(&gu, &dy).unwrap().to_dtype(DType::F32).unwrap();
            let mut a = [A::Buf(bytes(&gu)), A::Buf(bytes(&dy)), out(2 * n, dtype), A::I(n as i64), A::I(f as i64)];
            let wide = emulate(&format!("swiglu_packed_bwd_{sfx}"), launch::elems(n), &mut a).wide;
            assert_eq!(wide as usize, 5 * packs, "{what}: the backward's wide accesses");
            let e = max_rel(&output(&a[2], dtype, &[rows, 2 * f]), &d);
            assert!(e < tol, "{what}: backward rel err {e}");
        }
    }
}

/// RoPE in the rotate-half layout (`sign` 1) and its inverse (−1, the backward pass) against
/// `x · cos + sign · rotate_half(x) · sin` with candle ops in f32, tables of another position per
/// row (B, H, T, hd); several blocks of 1024 threads, unaligned inputs once.
#[test]
fn emulated_rope_matches_reference() {
    for (b, h, t, hd, dtype, misalign) in [
        (2usize, 3usize, 5usize, 64usize, DType::BF16, false),
        (1, 2, 7, 8, DType::F32, true),
        (3, 4, 33, 32, DType::F16, false),
    ] {
        let x = Tensor::randn(0f32, 1.0, (b, h, t, hd), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let angles = Tensor::randn(0f32, 2.0, (t, hd), &Device::Cpu).unwrap();
        let (c, sn) = (angles.cos().unwrap(), angles.sin().unwrap());
        let xf = x.to_dtype(DType::F32).unwrap();
        let half = hd / 2;
        let rot = Tensor::cat(&[xf.narrow(3, half, half).unwrap().neg().unwrap(), xf.narrow(3, 0, half).unwrap()], 3)
            .unwrap();
        let n = b * h * t * hd;
        for sign in [1f32, -1.0] {
            let what = format!("{b}x{h}x{t}x{hd} {dtype:?} sign {sign} misaligned={misalign}");
            let want =
                (xf.broadcast_mul(&c).unwrap() + (rot.broadcast_mul(&sn).unwrap() * sign as f64).unwrap()).unwrap();
            let mut a = [
                input(&x, misalign),
                A::Buf(bytes(&c)),
                A::Buf(bytes(&sn)),
                out(n, dtype),
                A::I(t as i64),
                A::I(hd as i64),
                A::I(n as i64),
                A::F(sign),
            ];
            emulate(&format!("rope_{}", suffix(dtype)), launch::elems(n), &mut a);
            let e = max_rel(&output(&a[3], dtype, &[b, h, t, hd]), &want);
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(e < tol, "{what}: rel err {e}");
        }
    }
}

/// The embedding gather and its backward (rows of the output gradient summed into the ids' rows
/// with f32 atomics, the gradient read from an offset into its buffer) against index_select and
/// index_add in f32, as the plain lookup (bags of 1) and as the mean over bags of 3 (the patch
/// embedding: lookup, reshape and mean, and 1/3 of each bag's gradient row to each of its ids);
/// the backward also four columns a thread where the width allows (`embedding_bwd4`); ids
/// repeat, and one id outside the vocabulary gathers zeros and adds nothing; 1100 ids once (more than
/// a block of the kernels that take one id a thread).
#[test]
fn emulated_embedding_matches_reference() {
    // (vocab, width, dtype, bag size, ids): 1100 ids take two blocks of the kernels that take one
    // id a thread, and 13 rows of 320 two blocks of the sorted backward's four-column sum.
    for (v, d, dtype, k, m) in [
        (11usize, 24usize, DType::BF16, 1usize, 42u32),
        (7, 100, DType::F32, 1, 42),
        (5, 3, DType::F16, 1, 42),
        (11, 24, DType::BF16, 3, 42),
        (7, 100, DType::F32, 3, 42),
        (13, 320, DType::F32, 2, 1100),
    ] {
        let what = format!("vocab {v} x {d} {dtype:?}, bags of {k}, {m} ids");
        let mut ids: Vec<u32> = (0..m).map(|i| (i * 5 + 1) % v as u32).collect();
        ids[3] = v as u32;
        let rows = ids.len() / k;
        let kept = ids.iter().filter(|&&id| (id as usize) < v).count();
        let w = Tensor::randn(0f32, 1.0, (v, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let total = rows * d;
        let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let mut a = [
            A::Buf(bytes(&w)),
            A::Buf(bytes(&ids_t)),
            out(total, dtype),
            A::I(total as i64),
            A::I(d as i64),
            A::I(v as i64),
            A::I(k as i64),
        ];
        emulate(&format!("embedding_fwd_{}", suffix(dtype)), launch::elems(total), &mut a);
        let got = output(&a[2], dtype, &[rows, d]);
        // The reference: each id's row (zeros outside the vocabulary) in f32, bags averaged.
        let wf = w.to_dtype(DType::F32).unwrap();
        let zero = Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
        let each: Vec<Tensor> =
            ids.iter().map(|&id| if (id as usize) < v { wf.get(id as usize).unwrap() } else { zero.clone() }).collect();
        let want = Tensor::stack(&each, 0).unwrap().reshape((rows, k, d)).unwrap().mean(1).unwrap();
        let want = want.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        // Bags of 1 are copies (exact); a mean may round the other way than candle's in the
        // last place of the storage dtype.
        let tol = match (k, dtype) {
            (1, _) => 0.0,
            (_, DType::F32) => 1e-6,
            _ => 1e-2,
        };
        let e = max_rel(&got, &want);
        assert!(e <= tol, "{what}: gathered rows off by {e}");
        if d % 4 == 0 {
            // Four columns a thread (the launcher's choice at such widths): the same bytes, from
            // aligned buffers and, where the weights or the output or both start one element in,
            // element by element (one skewed alone catches a check that misses it).
            for (skew_w, skew_y) in SKEW_PAIRS {
                let mut a4 = a.clone();
                a4[0] = input(&w, skew_w);
                a4[2] = out_at(total, dtype, skew_y);
                let wide =
                    emulate(&format!("embedding_fwd4_{}", suffix(dtype)), launch::elems(total / 4), &mut a4).wide;
                let case = format!("weights skewed {skew_w}, output skewed {skew_y}");
                assert!(bytes_of(&a4[2]) == bytes_of(&a[2]), "{what}: four columns a thread ({case})");
                // Aligned, every load of a row's four columns and every store is one wide access
                // (the same bytes either way: only the count tells the paths apart).
                let want = if skew_w || skew_y { 0 } else { d / 4 * (rows + kept) };
                assert_eq!(wide, want as u64, "{what}: wide accesses of four columns a thread ({case})");
            }
        }

        let dy = Tensor::randn(0f32, 1.0, (rows, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let off = 5usize;
        let junk = Tensor::full(7f32, off, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let args = || {
            [
                A::Buf([bytes(&junk), bytes(&dy)].concat()),
                A::I(off as i64),
                A::Buf(bytes(&ids_t)),
                zeroed(v * d),
                A::I(total as i64),
                A::I(d as i64),
                A::I(v as i64),
                A::I(k as i64),
            ]
        };
        let mut a = args();
        emulate(&format!("embedding_bwd_{}", suffix(dtype)), launch::elems(total), &mut a);
        // Where rows are whole groups of four columns, the launcher takes four a thread instead.
        let by_four = (d % 4 == 0).then(|| {
            let mut a4 = args();
            emulate(&format!("embedding_bwd4_{}", suffix(dtype)), launch::elems(total / 4), &mut a4);
            a4
        });
        // Each id's gradient row: its bag's row of dy over k.
        let dy_ids = (dy.to_dtype(DType::F32).unwrap() / k as f64)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .broadcast_as((rows, k, d))
            .unwrap()
            .reshape((rows * k, d))
            .unwrap();
        let keep: Vec<u32> = (0..ids.len() as u32).filter(|&i| (ids[i as usize] as usize) < v).collect();
        let keep = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
        let kept_ids = ids_t.index_select(&keep, 0).unwrap();
        let kept_dy = dy_ids.index_select(&keep, 0).unwrap();
        let want = Tensor::zeros((v, d), DType::F32, &Device::Cpu).unwrap().index_add(&kept_ids, &kept_dy, 0).unwrap();
        let e = max_rel(&output(&a[3], DType::F32, &[v, d]), &want);
        assert!(e < 1e-6, "{what}: gradient rel err {e}");
        if let Some(a4) = by_four {
            let e = max_rel(&output(&a4[3], DType::F32, &[v, d]), &want);
            assert!(e < 1e-6, "{what}: gradient by four columns a thread, rel err {e}");
        }

        // Without float atomics (PATCHLM_EMBEDDING_SORTED): the ids counted, their counts summed
        // into where each id's tokens start, each token placed in its id's run, then each
        // vocabulary row summed from its run and written once (into uninitialised memory).
        let m = ids.len();
        let mut cnt = [A::Buf(bytes(&ids_t)), A::I(m as i64), A::I(v as i64), A::Buf(vec![0u8; 4 * (v + 1)])];
        emulate("embedding_count", launch::elems(m), &mut cnt);
        let mut scan = [cnt[3].clone(), A::I(v as i64 + 1)];
        emulate("embedding_scan", launch::scan(), &mut scan);
        let start = i32s(bytes_of(&scan[0]));
        let mut place = [
            A::Buf(bytes(&ids_t)),
            A::I(m as i64),
            A::I(v as i64),
            scan[0].clone(),
            A::Buf(vec![0u8; 4 * v]),
            A::Buf(vec![0xFF; 4 * m]),
        ];
        emulate("embedding_place", launch::elems(m), &mut place);
        let order = i32s(bytes_of(&place[5]));
        for id in 0..v {
            let mut run: Vec<i32> = order[start[id] as usize..start[id + 1] as usize].to_vec();
            run.sort();
            let want: Vec<i32> = (0..m as i32).filter(|&i| ids[i as usize] as usize == id).collect();
            assert_eq!(run, want, "{what}: the tokens of id {id}");
        }
        assert_eq!(start[v] as usize, m - 1, "{what}: every id inside the vocabulary placed once (one is not)");
        for (sum, wide) in [("embedding_sum", false), ("embedding_sum4", true)] {
            if wide && d % 4 != 0 {
                continue;
            }
            // dy 4 elements into its buffer (the wide path where the width allows), or 5 (not
            // aligned for it: element by element), and the output aligned or one element in; each
            // skewed alone too, so that a check missing either buffer fails.
            for (skew_dy, skew_out) in SKEW_PAIRS {
                let off = if skew_dy { 5usize } else { 4 };
                let junk = Tensor::full(7f32, off, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let mut a = [
                    A::Buf([bytes(&junk), bytes(&dy)].concat()),
                    A::I(off as i64),
                    scan[0].clone(),
                    place[5].clone(),
                    out_at(v * d, dtype, skew_out),
                    A::I((v * d) as i64),
                    A::I(d as i64),
                    A::I(k as i64),
                ];
                let n = if wide { v * d / 4 } else { v * d };
                let accesses = emulate(&format!("{sum}_{}", suffix(dtype)), launch::elems(n), &mut a).wide;
                // Four columns a thread from aligned buffers: each token's row read and each
                // vocabulary row written in wide accesses; otherwise none.
                let want_wide = if wide && !skew_dy && !skew_out { d / 4 * (v + kept) } else { 0 };
                assert_eq!(
                    accesses as usize, want_wide,
                    "{what}: {sum}'s wide accesses (dy skewed {skew_dy}, output skewed {skew_out})"
                );
                let got = output(&a[4], dtype, &[v, d]);
                // Rounded once to the gradient's dtype (the atomic path accumulates in f32).
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                let e = max_rel(&got, &want.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap());
                assert!(e < tol, "{what}: {sum} (dy skewed {skew_dy}, output skewed {skew_out}) rel err {e}");
            }
        }
    }
}

/// `embedding_scan` alone (one block of 1024 threads) on lengths below, at and above one element a
/// thread, against a running sum.
#[test]
fn emulated_embedding_scan_matches_running_sum() {
    for n in [1usize, 5, 1024, 1025, 5000] {
        let xs: Vec<i32> = (0..n as i32).map(|i| (i * 7 + 3) % 11).collect();
        let mut a = [A::Buf(xs.iter().flat_map(|x| x.to_le_bytes()).collect()), A::I(n as i64)];
        emulate("embedding_scan", launch::scan(), &mut a);
        let want: Vec<i32> = xs
            .iter()
            .scan(0, |acc, &x| {
                *acc += x;
                Some(*acc)
            })
            .collect();
        assert_eq!(i32s(bytes_of(&a[0])), want, "scan of {n}");
    }
}

/// Little-endian i32s from bytes.
fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// SwiGLU on separate gate and up tensors (the default MLP), forward and backward ((dg, du) as
/// two rows), against silu(g) · u with candle ops in f32 and its gradient from candle's autograd.
#[test]
fn emulated_swiglu_matches_reference() {
    for (n, dtype) in [(3000usize, DType::BF16), (37, DType::F32), (1025, DType::F16)] {
        let what = format!("swiglu {n} {dtype:?}");
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        let r = |sd: f32| Tensor::randn(0f32, sd, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let (g, u, dy) = (r(2.0), r(1.0), r(1.0));
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let (gv, uv) = (Var::from_tensor(&f(&g)).unwrap(), Var::from_tensor(&f(&u)).unwrap());
        let y = (gv.silu().unwrap() * uv.as_tensor()).unwrap();
        let grads = (&y * f(&dy)).unwrap().sum_all().unwrap().backward().unwrap();
        let dgu = Tensor::cat(&[grads.get(&gv).unwrap(), grads.get(&uv).unwrap()], 0).unwrap();
        let mut a = [A::Buf(bytes(&g)), A::Buf(bytes(&u)), out(n, dtype), A::I(n as i64)];
        emulate(&format!("swiglu_fwd_{}", suffix(dtype)), launch::elems(n), &mut a);
        let e = max_rel(&output(&a[2], dtype, &[n]), &y);
        assert!(e < tol, "{what}: forward rel err {e}");
        let mut a = [A::Buf(bytes(&g)), A::Buf(bytes(&u)), A::Buf(bytes(&dy)), out(2 * n, dtype), A::I(n as i64)];
        emulate(&format!("swiglu_bwd_{}", suffix(dtype)), launch::elems(n), &mut a);
        let e = max_rel(&output(&a[3], dtype, &[2 * n]), &dgu);
        assert!(e < tol * 2.0, "{what}: backward rel err {e}");
    }
}

/// The single-tensor AdamW kernel (`adamw_f32`: (p, g, (m, v)) → (p', m', v') as three rows)
/// against its CPU twin, `ops::adamw_update`, over three blocks with a partial last one.
#[test]
fn emulated_adamw_matches_cpu() {
    use patchlm_model::ops::{adamw_update, AdamWStep};
    let n = 2500usize;
    let step =
        AdamWStep { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, decay: 1.0 - 3e-4, bias1: 0.19, bias2: 0.0975 };
    let r = |sd: f32| Tensor::randn(0f32, sd, n, &Device::Cpu).unwrap();
    let (p, g) = (r(1.0), r(0.1));
    let mv = Tensor::stack(&[r(0.01), r(0.001).abs().unwrap()], 0).unwrap();
    let mut a = vec![A::Buf(bytes(&p)), A::Buf(bytes(&g)), A::Buf(bytes(&mv)), out(3 * n, DType::F32), A::I(n as i64)];
    a.extend(step.kernel_args().iter().map(|&x| A::F(x)));
    emulate("adamw_f32", launch::elems(n), &mut a);
    let got = output(&a[3], DType::F32, &[3, n]);
    let (p2, mv2) = adamw_update(&p, &g, &mv, &step).unwrap();
    assert!(max_rel(&got.get(0).unwrap(), &p2) < 1e-6, "parameter");
    assert!(max_rel(&got.narrow(0, 1, 2).unwrap(), &mv2) < 1e-6, "moments");
    assert!(max_rel(&got.get(0).unwrap(), &p) > 1e-6, "the parameter did not move");
}

/// The flash backward's row statistics kernel (lse, Σ o·dO per row; a warp per row) against
/// candle ops in f32, with o and dO in the (BH, t, hd) layout and as rows of the (B·t, H·hd)
/// matrix (`oh` = H).
#[test]
fn emulated_flash_stats_matches_reference() {
    for (bh, t, hd, dtype, oh) in [
        (1usize, 37usize, 64usize, DType::BF16, 0usize),
        (3, 3, 32, DType::F32, 0),
        (1, 5, 100, DType::F16, 0),
        (6, 7, 64, DType::BF16, 3),
        (4, 5, 32, DType::F32, 2),
    ] {
        let rows = bh * t;
        let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let (o, d) = (r(&[bh, t, hd]), r(&[bh, t, hd]));
        let lse = Tensor::randn(0f32, 1.0, rows, &Device::Cpu).unwrap();
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap().reshape((rows, hd)).unwrap();
        let delta = (f(&o) * f(&d)).unwrap().sum_keepdim(1).unwrap();
        let want = Tensor::cat(&[lse.unsqueeze(1).unwrap(), delta], 1).unwrap();
        // As rows: (B, H, t, hd) → (B, t, H, hd).
        let laid = |x: &Tensor| match oh {
            0 => x.clone(),
            _ => x.reshape((bh / oh, oh, t, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap(),
        };
        let mut a = [
            A::Buf(bytes(&laid(&o))),
            A::Buf(bytes(&laid(&d))),
            A::Buf(bytes(&lse)),
            out(2 * rows, DType::F32),
            A::I(rows as i64),
            A::I(hd as i64),
            A::I(t as i64),
            A::I(oh as i64),
        ];
        emulate(&format!("flash_stats_{}", suffix(dtype)), launch::warp_rows(rows), &mut a);
        let e = max_rel(&output(&a[3], DType::F32, &[rows, 2]), &want);
        assert!(e < 1e-5, "{bh}x{t}x{hd} {dtype:?} oh={oh}: rel err {e}");
    }
}

/// Words as the harness's buffers hold them (little-endian).
fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn words_back(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Hopper's warpgroup MMA as kernels/hopper.cu uses it (the probes: m64n64k16, both operands in
/// shared memory through unswizzled K-major descriptors, issued once and once more accumulating;
/// then A from registers and B transposed from shared memory, and both transposed from shared
/// memory) against an exact product: the emulator's reading of the PTX ISA's layouts, which
/// `cuda_hopper_wgmma_probe_matches_cpu` in tests/cuda.rs checks on a GPU. Values k/16, so every
/// sum is exact in f32.
#[test]
fn emulated_wgmma_probe_matches_the_documented_layout() {
    let val = |i: usize, m: usize| ((i * m + 11) % 29) as f32 / 16.0 - 0.875;
    let a: Vec<f32> = (0..64 * 16).map(|i| val(i, 37)).collect();
    let b: Vec<f32> = (0..64 * 16).map(|i| val(i, 53)).collect();
    let bf = |x: &[f32]| Tensor::from_vec(x.to_vec(), (64, 16), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let mut args = [A::Buf(bytes(&bf(&a))), A::Buf(bytes(&bf(&b))), out(64 * 64, DType::F32)];
    emulate("probe_wgmma_bf16", launch::warpgroup(), &mut args);
    let d = output(&args[2], DType::F32, &[64 * 64]).to_vec1::<f32>().unwrap();
    for r in 0..64 {
        for c in 0..64 {
            let want: f64 = (0..16).map(|k| a[r * 16 + k] as f64 * b[c * 16 + k] as f64).sum();
            assert_eq!(d[r * 64 + c] as f64, want, "wgmma probe: D[{r}][{c}]");
        }
    }
    // The public op on the CPU: the same product.
    let probe = patchlm_model::ops::wgmma_probe;
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(probe(WgmmaForm::SharedKMajor, &bf(&a), &bf(&b)).unwrap()), d);

    // A from registers, B (16 x 64) MN-major (p·v's form); then both from shared memory MN-major,
    // both transposed by the instruction (the one-pass dq product): a (16 x 64) read as aᵀ. With
    // the offsets the emulator reads (LBO along K: 1024 bytes in the probe's layout, SBO along
    // M/N: 128) the exact product; swapped, not.
    let bt = |x: &[f32]| Tensor::from_vec(x.to_vec(), (16, 64), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    for transposed_a in [false, true] {
        let (kernel, a_in) =
            if transposed_a { ("probe_wgmma_ss_t_bf16", bt(&a)) } else { ("probe_wgmma_rs_bf16", bf(&a)) };
        // Element (r, k) of the product's A.
        let a_at = |r: usize, k: usize| if transposed_a { a[k * 64 + r] } else { a[r * 16 + k] } as f64;
        for (lbo, sbo, right) in [(1024u32, 128u32, true), (128, 1024, false)] {
            let mut args = [
                A::Buf(bytes(&a_in)),
                A::Buf(bytes(&bt(&b))),
                out(64 * 64, DType::F32),
                A::I(lbo as i64),
                A::I(sbo as i64),
            ];
            emulate(kernel, launch::warpgroup(), &mut args);
            let d = output(&args[2], DType::F32, &[64 * 64]).to_vec1::<f32>().unwrap();
            let exact = (0..64 * 64).all(|i| {
                let (r, c) = (i / 64, i % 64);
                d[i] as f64 == (0..16).map(|k| a_at(r, k) * b[k * 64 + c] as f64).sum::<f64>()
            });
            assert_eq!(exact, right, "{kernel}, lbo {lbo} sbo {sbo}");
            if right {
                let form = if transposed_a {
                    WgmmaForm::SharedTransposed { lbo, sbo }
                } else {
                    WgmmaForm::RegisterTransposed { lbo, sbo }
                };
                assert_eq!(flat(probe(form, &a_in, &bt(&b)).unwrap()), d);
            }
        }
    }
}

/// The sanitizers see into the kernels: under `PATCHLM_EMU_SANITIZE=1` a read one past a
/// `__shared__` array fails the launch with a sanitizer's report. In bounds, the probe
/// copies its input (with or without the sanitizers).
#[test]
fn emulated_reads_past_shared_memory_fail_under_the_sanitizers() {
    let input: Vec<f32> = (0..32).map(|i| i as f32 * 0.5 - 3.0).collect();
    let buf = A::Buf(input.iter().flat_map(|x| x.to_le_bytes()).collect());
    let warp = Launch { grid: (1, 1, 1), block: (32, 1, 1) };
    let mut args = [buf.clone(), out(32, DType::F32), A::I(0)];
    emulate("probe_shared_shift", warp, &mut args);
    let A::Buf(got) = &args[1] else { unreachable!() };
    assert_eq!(f32s(got), input);
    if !sanitized() {
        return;
    }
    let args = [buf, out(32, DType::F32), A::I(1)];
    let run = std::panic::catch_unwind(|| run_harness("probe_shared_shift", warp, &args, Schedule::Sweep));
    let msg = run.expect_err("a read past shared memory went unreported").downcast::<String>().unwrap();
    // UndefinedBehaviorSanitizer's object-size check or AddressSanitizer, whichever sees it first.
    assert!(msg.contains("runtime error: load of address") || msg.contains("global-buffer-overflow"), "{msg}");
}

/// The emulator's alignment check, which the tests of every kernel's wide path rely on: fused.cu's
/// four-element and 16-byte accesses (`load4` / `store4`, `load_pack` / `store_pack`) copy where
/// aligned, and one element off (the source or the destination) end the run with the check's
/// report of the size they need: 4 elements' bytes for the first pair, 16 for the packs.
#[test]
fn emulated_wide_accesses_off_their_alignment_fail() {
    let one = Launch { grid: (1, 1, 1), block: (1, 1, 1) };
    for dtype in [DType::F32, DType::BF16] {
        let esz = dtype.size_in_bytes();
        let src = Tensor::arange(1f32, 10.0, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        for (pack, need) in [(0, 4 * esz), (1, 16)] {
            let n = need / esz;
            let kernel = format!("probe_wide_{}", suffix(dtype));
            let args =
                |in_at: i64, out_at: i64| [A::Buf(bytes(&src)), out(9, dtype), A::I(in_at), A::I(out_at), A::I(pack)];
            let mut a = args(0, 0);
            // One wide load and one wide store, counted as such (the tests of the kernels' wide
            // paths ask the count).
            assert_eq!(emulate(&kernel, one, &mut a), Accesses { wide: 2, copies: 0 }, "{kernel} pack {pack}");
            assert_eq!(&bytes_of(&a[1])[..n * esz], &bytes(&src)[..n * esz], "{kernel} pack {pack}: aligned copy");
            for (in_at, out_at) in [(1, 0), (0, 1)] {
                let a = args(in_at, out_at);
                let run = std::panic::catch_unwind(|| run_harness(&kernel, one, &a, Schedule::Sweep));
                let msg = run.expect_err("a misaligned wide access went unreported").downcast::<String>().unwrap();
                assert!(
                    msg.contains("-byte access at") && msg.contains(&format!("is not {need}-byte aligned")),
                    "{kernel} pack {pack}, source {in_at} and destination {out_at} elements off: {msg}"
                );
            }
        }
    }
}

/// The emulator's mma.sync m16n8k16 and ldmatrix.x4 (the wrappers flash.cu's kernels call), one
/// instruction at a time, against the fragment layouts as documented rather than as the emulator
/// or the kernels compute them: per lane l and register r, A holds row l/4 + 8(r mod 2), columns
/// 2(l mod 4 + 4⌊r/2⌋) and +1; B column l/4, rows 2(l mod 4 + 4r) and +1; C and D row
/// l/4 + 8⌊r/2⌋, column 2(l mod 4) + (r mod 2) (PTX ISA, "Matrix fragments for mma.m16n8k16").
/// ldmatrix: lane 8j + r names row r of matrix j, and register j of lane l holds that matrix's
/// row l/4, elements 2(l mod 4) and +1 (with .trans: column l/4, rows 2(l mod 4) and +1). The
/// lower element sits in the lower half of a register.
#[test]
fn emulated_warp_matrix_instructions_match_the_documented_layouts() {
    let pack = |lo: u16, hi: u16| u32::from(lo) | (u32::from(hi) << 16);
    for (dtype, bits) in [
        (DType::BF16, (|x: f32| bf16::from_f32(x).to_bits()) as fn(f32) -> u16),
        (DType::F16, |x: f32| f16::from_f32(x).to_bits()),
    ] {
        // Values exact in both formats (k/16 for small k), so the f64 reference is exact too.
        let a: Vec<f32> = (0..256).map(|i| ((i * 37 + 11) % 29) as f32 / 16.0 - 0.875).collect();
        let b: Vec<f32> = (0..128).map(|i| ((i * 53 + 7) % 31) as f32 / 16.0 - 0.9375).collect();
        let c: Vec<f32> = (0..128).map(|i| ((i * 17 + 3) % 13) as f32 - 6.0).collect();
        let (at, bt) = (|r: usize, k: usize| a[r * 16 + k], |k: usize, n: usize| b[k * 8 + n]);
        let mut aw = vec![0u32; 128];
        let mut bw = vec![0u32; 64];
        let mut cw = vec![0f32; 128];
        let d_at = |l: usize, r: usize| (l / 4 + 8 * (r / 2), 2 * (l % 4) + r % 2);
        for l in 0..32 {
            for r in 0..4 {
                let (row, col) = (l / 4 + 8 * (r % 2), 2 * (l % 4 + 4 * (r / 2)));
                aw[4 * l + r] = pack(bits(at(row, col)), bits(at(row, col + 1)));
                let (dr, dc) = d_at(l, r);
                cw[4 * l + r] = c[dr * 8 + dc];
            }
            for r in 0..2 {
                let (k, n) = (2 * (l % 4 + 4 * r), l / 4);
                bw[2 * l + r] = pack(bits(bt(k, n)), bits(bt(k + 1, n)));
            }
        }
        let cb: Vec<u8> = cw.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut args = [A::Buf(words(&aw)), A::Buf(words(&bw)), A::Buf(cb)];
        let one_warp = Launch { grid: (1, 1, 1), block: (32, 1, 1) };
        emulate(&format!("probe_mma_{}", suffix(dtype)), one_warp, &mut args);
        let A::Buf(d) = &args[2] else { unreachable!() };
        let d: Vec<f32> = d.chunks_exact(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect();
        for l in 0..32 {
            for r in 0..4 {
                let (row, col) = d_at(l, r);
                let want =
                    c[row * 8 + col] as f64 + (0..16).map(|k| at(row, k) as f64 * bt(k, col) as f64).sum::<f64>();
                assert_eq!(d[4 * l + r] as f64, want, "{dtype:?} mma: lane {l} register {r} (D[{row}][{col}])");
            }
        }
    }
    // ldmatrix: every element a distinct value, so a misplaced one shows.
    let m: Vec<u16> = (0..256u16).map(|i| i * 3 + 1).collect();
    let at = |j: usize, row: usize, col: usize| m[(8 * j + row) * 8 + col];
    for trans in [false, true] {
        let mut args =
            [A::Buf(m.iter().flat_map(|x| x.to_le_bytes()).collect()), out(128, DType::F32), A::I(trans as i64)];
        emulate("probe_ldmatrix", Launch { grid: (1, 1, 1), block: (32, 1, 1) }, &mut args);
        let A::Buf(got) = &args[1] else { unreachable!() };
        let got = words_back(got);
        for l in 0..32 {
            for j in 0..4 {
                let (g, t) = (l / 4, l % 4);
                let want = if trans {
                    pack(at(j, 2 * t, g), at(j, 2 * t + 1, g))
                } else {
                    pack(at(j, g, 2 * t), at(j, g, 2 * t + 1))
                };
                assert_eq!(got[4 * l + j], want, "ldmatrix trans {trans}: lane {l} register {j}");
            }
        }
    }
    // ldmatrix.x2: matrices 0 and 1 only, from lanes 0-15's addresses.
    let mut args = [A::Buf(m.iter().flat_map(|x| x.to_le_bytes()).collect()), out(64, DType::F32)];
    emulate("probe_ldmatrix_x2", Launch { grid: (1, 1, 1), block: (32, 1, 1) }, &mut args);
    let A::Buf(got) = &args[1] else { unreachable!() };
    let got = words_back(got);
    for l in 0..32 {
        for j in 0..2 {
            let (g, t) = (l / 4, l % 4);
            assert_eq!(
                got[2 * l + j],
                pack(at(j, g, 2 * t), at(j, g, 2 * t + 1)),
                "ldmatrix.x2: lane {l} register {j}"
            );
        }
    }
}

/// The multi-tensor kernels' block table (`launch::multi_table`, as their launchers build it) on
/// tensors of one, several and no chunks: `multi_cast_f32` against candle's `to_dtype` bit for bit
/// (f32 → bf16 and f16, round to nearest even, with values halfway between two bf16 / f16
/// numbers), `multi_sumsq_f32`'s partial sums against an f64 sum of squares (f32 and bf16 inputs,
/// each at the start of its buffer and one element in).
#[test]
fn emulated_multi_tensor_kernels_match_cpu() {
    let chunk = launch::MULTI_CHUNK;
    let sizes = [5usize, 0, chunk + 7, 33, 1, chunk];
    let mut xs: Vec<Tensor> = sizes.iter().map(|&n| Tensor::randn(0f32, 3.0, n, &Device::Cpu).unwrap()).collect();
    // Ties: 1 + 2^-8 lies halfway between two bf16 numbers, 1 + 2^-11 between two f16 ones.
    let ties = [1.0 + 2f32.powi(-8), -(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)];
    xs[0] = Tensor::cat(&[Tensor::new(&ties, &Device::Cpu).unwrap(), xs[0].narrow(0, 0, 1).unwrap()], 0).unwrap();
    let nt = sizes.len();
    for (dtype, flag) in [(DType::BF16, 0u64), (DType::F16, 4)] {
        // Arguments: the table, nt, chunk; then the sources; then one destination buffer.
        let dst = 3 + nt;
        let mut offsets = Vec::new();
        let mut total = 0;
        let entries: Vec<[u64; 5]> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                offsets.push(total);
                total += n + 3; // gaps between the destinations stay untouched
                [reloc(3 + i, 0), reloc(dst, offsets[i] * 2), 0, n as u64, flag]
            })
            .collect();
        let (table, blocks) = launch::multi_table(&entries);
        let mut args = vec![A::Table(table), A::I(nt as i64), A::I(chunk as i64)];
        args.extend(xs.iter().map(|x| A::Extra(bytes(x))));
        args.push(A::Extra(vec![0xAB; total * 2]));
        // Chunks whose source and destination start aligned go four elements at a time.
        let wide = emulate("multi_cast_f32", launch::multi(blocks), &mut args).wide;
        assert!(wide > 0, "multi_cast_f32 to {dtype:?} cast every chunk element by element");
        let A::Extra(out) = &args[dst] else { unreachable!() };
        for (i, x) in xs.iter().enumerate() {
            let got = &out[offsets[i] * 2..(offsets[i] + sizes[i]) * 2];
            assert_eq!(got, bytes(&x.to_dtype(dtype).unwrap()), "tensor {i} ({} elements) to {dtype:?}", sizes[i]);
            assert_eq!(&out[(offsets[i] + sizes[i]) * 2..(offsets[i] + sizes[i] + 3) * 2], [0xAB; 6], "gap after {i}");
        }
    }
    // The sum of squares reads each tensor as f32, or as bf16 where bit 1 of the flags is set.
    let ts: Vec<Tensor> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| if i % 2 == 1 { x.to_dtype(DType::BF16).unwrap() } else { x.clone() })
        .collect();
    // Each tensor at the start of its buffer (16-byte loads where a chunk starts aligned), then one
    // element in (element by element: a wide load there fails the emulator's alignment check).
    for skew in [false, true] {
        let entries: Vec<[u64; 5]> = ts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let at = extra_at(t, skew).1;
                [reloc(4 + i, at), 0, 0, t.elem_count() as u64, if t.dtype() == DType::BF16 { 2 } else { 0 }]
            })
            .collect();
        let (table, blocks) = launch::multi_table(&entries);
        let mut args = vec![A::Table(table), A::I(nt as i64), A::I(chunk as i64), out(blocks, DType::F32)];
        args.extend(ts.iter().map(|t| extra_at(t, skew).0));
        let wide = emulate("multi_sumsq_f32", launch::multi(blocks), &mut args).wide;
        assert_eq!(wide > 0, !skew, "multi_sumsq_f32 made {wide} wide accesses (skewed {skew})");
        let got: f64 =
            output(&args[3], DType::F32, &[blocks]).to_vec1::<f32>().unwrap().iter().map(|&x| x as f64).sum();
        let want: f64 = ts
            .iter()
            .map(|t| t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap())
            .sum();
        assert!((got - want).abs() <= 1e-5 * want, "sum of squares {got} vs {want} (skewed {skew})");
    }
}

/// `multi_adamw_f32` (the optimizer step of every CUDA training run) against the CPU twin of the
/// single-tensor update, `ops::adamw_update`: tensors of one and several chunks, with and
/// without weight decay, f32 and bf16 gradients, scaled by a clipping factor given by the host or
/// computed by the kernel from the gradients' sum of squares (`ops::clip_factor`'s formula), and a
/// non-finite sum of squares leaving everything as it was.
#[test]
fn emulated_multi_tensor_adamw_matches_cpu() {
    use patchlm_model::ops::{adamw_update, clip_factor, AdamWStep};
    let chunk = launch::MULTI_CHUNK;
    // (Whole quads with 16-byte aligned moments, 300 and 2·chunk + 12, take the kernel's vector
    // path, with bf16 and f32 gradients; the others its element-wise one, the last because its
    // gradient starts one element into its buffer while the rest is aligned.)
    let sizes = [chunk + 9, 7, 0, 300, 2 * chunk + 12, 64];
    let skewed = |i: usize| i == 5;
    let step =
        AdamWStep { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, decay: 1.0 - 3e-4, bias1: 0.19, bias2: 0.0975 };
    let r = |n: usize, sd: f32| Tensor::randn(0f32, sd, n, &Device::Cpu).unwrap();
    let params: Vec<Tensor> = sizes.iter().map(|&n| r(n, 1.0)).collect();
    let grads: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| if i % 2 == 1 { r(n, 0.1).to_dtype(DType::BF16).unwrap() } else { r(n, 0.1) })
        .collect();
    // The first eight elements of each tensor (below) have no gradient and moments of 1e-9 and
    // 1e-18 (a weight that batches have stopped touching): there √v̂ is about a third of eps, so
    // eps's sign in the denominator decides the update's.
    let quiet = |n: usize, x: Tensor, at: f32| {
        let mut v = x.to_vec1::<f32>().unwrap();
        v.iter_mut().take(8).for_each(|e| *e = at);
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    };
    let grads: Vec<Tensor> = grads
        .iter()
        .map(|g| quiet(g.elem_count(), g.to_dtype(DType::F32).unwrap(), 0.0).to_dtype(g.dtype()).unwrap())
        .collect();
    let moments: Vec<Tensor> = sizes
        .iter()
        .map(|&n| Tensor::stack(&[quiet(n, r(n, 0.01), 1e-9), quiet(n, r(n, 0.001).abs().unwrap(), 1e-18)], 0).unwrap())
        .collect();
    let decays = [true, false, true, true, false, true];
    // Arguments: the table, nt, chunk, the eight step constants, the gradient scale, the sum of
    // squares (or null) and the largest norm; then per tensor its parameter, gradient and moments.
    let first = 14;
    let entries: Vec<[u64; 5]> = (0..sizes.len())
        .map(|i| {
            let b = first + 3 * i;
            let flags = decays[i] as u64 | if grads[i].dtype() == DType::BF16 { 2 } else { 0 };
            [reloc(b, 0), reloc(b + 1, extra_at(&grads[i], skewed(i)).1), reloc(b + 2, 0), sizes[i] as u64, flags]
        })
        .collect();
    let (table, blocks) = launch::multi_table(&entries);
    // (host factor, sum of squares given to the kernel, largest norm): the factor the update
    // should use, None for no update at all.
    let sumsq = 2.25f64; // norm 1.5
    let cases = [
        (0.37f32, None, 0.0f32, Some(0.37f64)),
        (9.0, Some(sumsq), 0.5, Some(clip_factor(1.5, 0.5))),
        (9.0, Some(sumsq), 2.0, Some(1.0)),
        (9.0, Some(sumsq), 0.0, Some(1.0)),
        (9.0, Some(f64::NAN), 0.5, None),
    ];
    for (gscale, given, max_norm, factor) in cases {
        let what = format!("scale {gscale}, sum of squares {given:?}, max norm {max_norm}");
        let mut args = vec![A::Table(table.clone()), A::I(sizes.len() as i64), A::I(chunk as i64)];
        args.extend(step.kernel_args().iter().chain([&gscale]).map(|&x| A::F(x)));
        args.push(given.map_or(A::Null, |s| A::Buf(s.to_le_bytes().to_vec())));
        args.push(A::F(max_norm));
        for i in 0..sizes.len() {
            args.extend([A::Extra(bytes(&params[i])), extra_at(&grads[i], skewed(i)).0, A::Extra(bytes(&moments[i]))]);
        }
        let wide = emulate("multi_adamw_f32", launch::multi(blocks), &mut args).wide;
        // Tensors 3 (bf16 gradient) and 4 (f32) go four elements at a time, each chunk's whole
        // quads as seven wide accesses (the parameter, both moments and the gradient in, the
        // parameter and both moments out); a non-finite sum of squares touches nothing.
        let quads = |n: usize| (0..n).step_by(chunk).map(|lo| (n.min(lo + chunk) - lo) / 4).sum::<usize>();
        let want = if factor.is_some() { 7 * (quads(sizes[3]) + quads(sizes[4])) } else { 0 };
        assert_eq!(wide as usize, want, "{what}: multi_adamw_f32's wide accesses");
        for i in (0..sizes.len()).filter(|&i| sizes[i] > 0) {
            let b = first + 3 * i;
            let got_p = output(&args[b], DType::F32, &[sizes[i]]);
            let got_m = output(&args[b + 2], DType::F32, &[2 * sizes[i]]);
            let Some(f) = factor else {
                assert_eq!(max_rel(&got_p, &params[i]), 0.0, "{what}: tensor {i} moved");
                assert_eq!(max_rel(&got_m, &moments[i].flatten_all().unwrap()), 0.0, "{what}: moments {i} moved");
                continue;
            };
            let s = AdamWStep { decay: if decays[i] { step.decay } else { 1.0 }, ..step };
            let g = (grads[i].to_dtype(DType::F32).unwrap() * (f as f32) as f64).unwrap();
            let (p, m) = adamw_update(&params[i], &g, &moments[i], &s).unwrap();
            assert!(max_rel(&got_p, &p) < 1e-5, "{what}: tensor {i}: parameter");
            assert!(max_rel(&got_m, &m.flatten_all().unwrap()) < 1e-5, "{what}: tensor {i}: moments");
            assert!(max_rel(&got_p, &params[i]) > 1e-6, "{what}: tensor {i} did not move");
        }
    }
}
