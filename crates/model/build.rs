//! With the `cuda` feature, compiles kernels/fused.cu and kernels/flash.cu to PTX with nvcc (found through `NVCC`,
//! `CUDA_ROOT/bin` or `PATH`), for compute capability `CUDA_COMPUTE_CAP` (default 80: bf16 needs
//! Ampere or newer; the driver JIT-compiles the PTX for newer GPUs), and kernels/hopper.cu for
//! compute_90a where that capability is 90 or more (else an empty module in its place).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    for f in ["kernels/fused.cu", "kernels/flash.cu", "kernels/hopper.cu", "kernels/common.cuh"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").ok().map(PathBuf::from).unwrap_or_else(|| match std::env::var_os("CUDA_ROOT") {
        Some(root) if PathBuf::from(&root).join("bin/nvcc").is_file() => PathBuf::from(root).join("bin/nvcc"),
        _ => PathBuf::from("nvcc"),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    // PTX for the lower of the requested capability and 90 keeps it loadable by CUDA 13 drivers.
    let cap: u32 = cap.trim().parse().unwrap_or(80);
    let arch = format!("compute_{}", cap.clamp(80, 90));
    // Hopper's architecture-specific instructions (wgmma) need compute_90a, which only Hopper loads.
    let hopper = cap >= 90;
    if !hopper {
        let empty =
            "// kernels/hopper.cu needs CUDA_COMPUTE_CAP 90 or more\n.version 7.0\n.target sm_80\n.address_size 64\n";
        std::fs::write(out_dir.join("hopper.ptx"), empty).expect("OUT_DIR is writable");
    }
    let modules: &[(&str, String)] =
        &[("fused", arch.clone()), ("flash", arch.clone()), ("hopper", "compute_90a".to_string())];
    for (name, arch) in modules.iter().filter(|(n, _)| hopper || *n != "hopper") {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math", &format!("-arch={arch}"), "-o"])
            .arg(out_dir.join(format!("{name}.ptx")))
            .arg(format!("kernels/{name}.cu"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on kernels/{name}.cu ({s}); see the messages above"),
            Err(e) => panic!(
                "the cuda feature needs nvcc ({}: {e}); put it on PATH or set NVCC / CUDA_ROOT (see docs/gpu.md)",
                nvcc.display()
            ),
        }
    }
}
