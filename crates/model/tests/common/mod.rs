//! Helpers shared by the kernel tests (tests/cuda.rs on a GPU, tests/emulated.rs on the CPU).

use candle_core::{DType, Device, Tensor};

/// max |a - b| / max |b|, infinite where `a` has a NaN or an infinity (a max over the tensor
/// would skip NaN).
pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let flat = |t: &Tensor| -> Vec<f32> {
        t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len(), "max_rel: {} vs {} elements", a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, y| m.max(y.abs())).max(1e-6);
    a.iter().zip(&b).map(|(x, y)| if x.is_finite() { (x - y).abs() } else { f32::INFINITY }).fold(0f32, f32::max)
        / scale
}
