//! The CUDA kernels' math without a GPU: kernels/*.cu compiled by the host C++ compiler against a
//! CPU stand-in for the CUDA features they use (kernels/emu: threads as fibers, barriers, warp
//! shuffles, wmma tiles), each launch run on random inputs and compared with an independent CPU
//! reference (candle ops in f32, candle's autograd for gradients). This checks indexing, masking,
//! tiling and synchronisation on every machine; `tests/cuda.rs` repeats the comparison on a GPU,
//! where timing, the memory model and the real tensor cores come in.
//!
//! Needs a C++17 compiler (`CXX`, else `c++`); the harness is built once per source version under
//! the target directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::max_rel;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var, D};
use half::{bf16, f16};

const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
const SOURCES: [&str; 8] = [
    "fused.cu",
    "flash.cu",
    "common.cuh",
    "emu/cuda_emu.h",
    "emu/emu_types.h",
    "emu/mma.h",
    "emu/harness.cpp",
    "emu/cuda_bf16.h",
];

/// The harness executable, compiled on first use (and reused while the sources are unchanged).
fn harness() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for f in SOURCES {
            let bytes = std::fs::read(Path::new(KERNELS).join(f)).unwrap();
            for b in bytes.iter().chain(f.as_bytes()) {
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
                .args(["-std=c++17", "-O2", "-fno-strict-aliasing", "-w", "-I"])
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
enum A {
    /// A device buffer: in with its bytes, out with the bytes after the launch.
    Buf(Vec<u8>),
    /// The same, passed to the kernel this many bytes past its start.
    At(usize, Vec<u8>),
    I(i64),
    F(f32),
}

/// Launches `kernel` on the emulator; buffers come back with the kernel's writes.
fn launch(kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &mut [A]) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(harness());
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
        }
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{kernel} failed on the emulator:\n{}", String::from_utf8_lossy(&out.stderr));
    for (n, a) in args.iter_mut().enumerate() {
        if let A::Buf(b) | A::At(_, b) = a {
            *b = std::fs::read(dir.path().join(format!("arg{n}"))).unwrap();
        }
    }
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

fn buf(b: &A) -> &[u8] {
    match b {
        A::Buf(b) | A::At(_, b) => b,
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

/// The tensor-core flash attention kernels (forward, dq, dk+dv) against attention in f32, on
/// shapes with partial tiles, more keys than queries (a cache), both head sizes and both 16-bit
/// dtypes, and once with inputs that are not 16-byte aligned (the kernels' element-wise loads).
#[test]
fn emulated_tensor_core_flash_attention_matches_reference() {
    for (bh, t, s, hd, dtype, misalign) in [
        (2usize, 70usize, 70usize, 64usize, DType::BF16, false),
        (1, 33, 80, 32, DType::BF16, false),
        (1, 130, 130, 64, DType::F16, false),
        (2, 20, 20, 32, DType::F16, true),
    ] {
        let what = format!("bh={bh} t={t} s={s} hd={hd} {dtype:?} misaligned={misalign}");
        let scale = 1.0 / (hd as f64).sqrt();
        let rnd = |n: usize, sd: f64| {
            Tensor::randn(0f32, sd as f32, (bh, n, hd), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
        };
        let (q, k, v, dout) = (rnd(t, 1.5), rnd(s, 1.5), rnd(s, 1.0), rnd(t, 1.0));
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let [o, lse, dq, dk, dv] = attention_reference(&f(&q), &f(&k), &f(&v), &f(&dout), scale);
        let sfx = suffix(dtype);
        let esz = dtype.size_in_bytes();
        // A buffer as the kernel gets it: aligned, or one element past an aligned start.
        let arg = |x: &Tensor| {
            let b = bytes(x);
            if misalign {
                A::At(esz, [vec![0u8; esz], b].concat())
            } else {
                A::Buf(b)
            }
        };
        let out_len = |x: &A| buf(x).len() - if misalign { esz } else { 0 };
        let read = |x: &A, dt: DType, shape: &[usize]| {
            let b = buf(x);
            from_bytes(&b[if misalign { esz } else { 0 }..], dt, shape)
        };
        let blocks = |rows: usize| rows.div_ceil(64) as u32;
        let (tol, tol_grad) = if dtype == DType::BF16 { (1e-2, 1.2e-2) } else { (2e-3, 2.5e-3) };

        // Forward: o and the log-sum-exp.
        let zeros = |n: usize, sz: usize| vec![0u8; n * sz];
        let mut args = [
            arg(&q),
            arg(&k),
            arg(&v),
            arg(&Tensor::zeros((bh, t, hd), dtype, &Device::Cpu).unwrap()),
            A::Buf(zeros(bh * t, 4)),
            A::I(t as i64),
            A::I(s as i64),
            A::F(scale as f32),
        ];
        launch(&format!("flash_tc_fwd_{sfx}_{hd}"), (blocks(t), bh as u32, 1), (128, 1, 1), &mut args);
        assert_eq!(out_len(&args[3]), bh * t * hd * esz);
        let e = max_rel(&read(&args[3], dtype, &[bh, t, hd]), &o);
        assert!(e < tol, "{what}: forward output rel err {e}");
        let e = max_rel(&from_bytes(buf(&args[4]), DType::F32, &[bh, t]), &lse);
        assert!(e < 2e-3, "{what}: log-sum-exp rel err {e}");

        // Backward inputs: (q, dO) and (k, v) stacked, (lse, delta) per row.
        let delta = (o.clone() * f(&dout)).unwrap().sum_keepdim(D::Minus1).unwrap();
        let st = Tensor::cat(&[lse.unsqueeze(2).unwrap(), delta], 2).unwrap();
        let qdo = Tensor::stack(&[&q, &dout], 0).unwrap();
        let kv = Tensor::stack(&[&k, &v], 0).unwrap();
        let mut args = [
            arg(&qdo),
            arg(&kv),
            A::Buf(bytes(&st)),
            arg(&Tensor::zeros((bh, t, hd), dtype, &Device::Cpu).unwrap()),
            A::I(bh as i64),
            A::I(t as i64),
            A::I(s as i64),
            A::F(scale as f32),
        ];
        launch(&format!("flash_tc_dq_{sfx}_{hd}"), (blocks(t), bh as u32, 1), (128, 1, 1), &mut args);
        let e = max_rel(&read(&args[3], dtype, &[bh, t, hd]), &dq);
        assert!(e < tol_grad, "{what}: dq rel err {e}");

        let mut args = [
            arg(&qdo),
            arg(&kv),
            A::Buf(bytes(&st)),
            arg(&Tensor::zeros((bh, s, hd), dtype, &Device::Cpu).unwrap()),
            arg(&Tensor::zeros((bh, s, hd), dtype, &Device::Cpu).unwrap()),
            A::I(bh as i64),
            A::I(t as i64),
            A::I(s as i64),
            A::F(scale as f32),
        ];
        launch(&format!("flash_tc_dkv_{sfx}_{hd}"), (blocks(s), bh as u32, 1), (128, 1, 1), &mut args);
        let e = max_rel(&read(&args[3], dtype, &[bh, s, hd]), &dk);
        assert!(e < tol_grad, "{what}: dk rel err {e}");
        let e = max_rel(&read(&args[4], dtype, &[bh, s, hd]), &dv);
        assert!(e < tol_grad, "{what}: dv rel err {e}");
    }
}

/// The emulator itself, on the CUDA-core flash forward kernel that has passed on a GPU
/// (tests/cuda.rs): the same reference, the same tolerance.
#[test]
fn emulated_cuda_core_flash_forward_matches_reference() {
    let (bh, t, s, hd) = (2usize, 50usize, 70usize, 64usize);
    let scale = 0.125f64;
    let rnd = |n: usize| Tensor::randn(0f32, 1.5, (bh, n, hd), &Device::Cpu).unwrap();
    let (q, k, v) = (rnd(t), rnd(s), rnd(s));
    let [o, lse, ..] =
        attention_reference(&q, &k, &v, &Tensor::zeros((bh, t, hd), DType::F32, &Device::Cpu).unwrap(), scale);
    let mut args = [
        A::Buf(bytes(&q)),
        A::Buf(bytes(&k)),
        A::Buf(bytes(&v)),
        A::Buf(vec![0u8; bh * t * hd * 4]),
        A::Buf(vec![0u8; bh * t * 4]),
        A::I(t as i64),
        A::I(s as i64),
        A::F(scale as f32),
    ];
    launch("flash_fwd_f32_64", (t.div_ceil(64) as u32, bh as u32, 1), (64, 1, 1), &mut args);
    let e = max_rel(&from_bytes(buf(&args[3]), DType::F32, &[bh, t, hd]), &o);
    assert!(e < 1e-4, "output rel err {e}");
    let e = max_rel(&from_bytes(buf(&args[4]), DType::F32, &[bh, t]), &lse);
    assert!(e < 1e-5, "lse rel err {e}");
}
