//! Vectorised f32 math for the CPU implementations of the fused ops: an `exp` that compilers can
//! vectorise, and the row reductions of softmax and cross-entropy built on it.
//!
//! The standard library's `f32::exp` is a scalar call, and a float sum or max is never vectorised
//! by the compiler (reordering it changes the rounding). Here every reduction keeps [`LANES`]
//! partial results side by side, so the compiler turns the loops into SIMD code, and each entry
//! point is compiled three times (AVX-512F, AVX2 + FMA, the baseline) and picks the widest the CPU
//! has at run time. The arithmetic is the same in all three (no fused multiply-adds are formed),
//! so results are bit for bit the same on every x86 CPU.

/// Partial sums (and maxima) kept side by side: 16 f32 are one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// e^x in f32 (Cephes' `expf` scheme: x = n·ln 2 + r, |r| ≤ ln 2 / 2, a degree-6 polynomial
/// for e^r, 2^n built in the exponent bits), branch-free so that loops over it vectorise.
/// Relative error under one ulp on the normal range (7.9e-8 at most in the test against f64,
/// whose bound is 1.5e-7);
/// e^x for x < −87.33655 is 0 (the subnormal results there are flushed; at −87.33655 itself, just
/// under the least normal f32, it is still computed), x > 88.72283 gives +∞, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_83;
    const LO: f32 = -87.336_55;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·C1 is exact: C1 + C2 = ln 2 to ~1e-11.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer (for |v| < 2^22), which then sits in the low
    // mantissa bits: t = 1.5·2^23 + n has the bits 0x4b40_0000 + n.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n from the low mantissa bits of t (`n as i32` would be a scalar, saturating cast).
    let ni = (t.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // n ∈ [−126, 128]: 2^n as exponent bits, in two factors so that n = 128 does not overflow.
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let y = e * s1 * s2;
    let y = if x < LO { 0.0 } else { y };
    let y = if x > HI { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// 1 / (1 + e^−x).
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Defines `pub(crate) fn $name(args) -> ret` from a body, compiled for AVX-512F, AVX2 + FMA and
/// the baseline, dispatching on what the CPU has (detected once, then a cached load).
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        pub(crate) fn $name($($a: $t),*) -> $r {
            #[inline(always)]
            fn body($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($a: $t),*) -> $r {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($a: $t),*) -> $r {
                    body($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked on the line above).
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked on the line above).
                    return unsafe { avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

/// The sum of `LANES` partial sums, pairwise (the same order everywhere).
#[inline(always)]
fn fold_sum(acc: [f32; LANES]) -> f32 {
    let mut w = acc;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for j in 0..n {
            w[j] += w[j + n];
        }
    }
    w[0]
}

multiversion! {
    /// The largest element (−∞ for an empty row). NaNs are passed over, as `f32::max` does.
    fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                acc[j] = acc[j].max(c[j]);
            }
        }
        let m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        acc.iter().fold(m, |m, &v| m.max(v))
    }
}

multiversion! {
    /// Σ_j e^(a·x_j − b).
    fn sum_exp(x: &[f32], a: f32, b: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                acc[j] += exp(a * c[j] - b);
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|&v| exp(a * v - b)).sum();
        fold_sum(acc) + rest
    }
}

multiversion! {
    /// out_j = c · e^(a·x_j − b) for the first `x.len()` elements of `out`; returns Σ_j out_j.
    fn exp_into(x: &[f32], a: f32, b: f32, c: f32, out: &mut [f32]) -> f32 {
        let out = &mut out[..x.len()];
        let mut acc = [0f32; LANES];
        let mut xs = x.chunks_exact(LANES);
        let mut os = out.chunks_exact_mut(LANES);
        for (xc, oc) in (&mut xs).zip(&mut os) {
            for j in 0..LANES {
                let e = c * exp(a * xc[j] - b);
                oc[j] = e;
                acc[j] += e;
            }
        }
        let mut rest = 0f32;
        for (o, &v) in os.into_remainder().iter_mut().zip(xs.remainder()) {
            *o = c * exp(a * v - b);
            rest += *o;
        }
        fold_sum(acc) + rest
    }
}

multiversion! {
    /// x_j ← c · e^(a·x_j − b), in place; returns Σ_j x_j.
    fn exp_in_place(x: &mut [f32], a: f32, b: f32, c: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut xs = x.chunks_exact_mut(LANES);
        for xc in &mut xs {
            for j in 0..LANES {
                let e = c * exp(a * xc[j] - b);
                xc[j] = e;
                acc[j] += e;
            }
        }
        let mut rest = 0f32;
        for v in xs.into_remainder() {
            *v = c * exp(a * *v - b);
            rest += *v;
        }
        fold_sum(acc) + rest
    }
}

multiversion! {
    /// x_j ← x_j · s.
    fn scale(x: &mut [f32], s: f32) -> () {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

multiversion! {
    /// out_j = g_j · σ(g_j) · u_j (SwiGLU's gate).
    fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) -> () {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    /// SwiGLU's backward: with σ = σ(g_j), dg_j = dy_j · u_j · σ(1 + g_j(1 − σ)) and
    /// du_j = dy_j · g_j · σ.
    fn swiglu_grad(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) -> () {
        for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = sigmoid(g);
            *dg = d * u * s * (1.0 + g * (1.0 - s));
            *du = d * g * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of f32 values over [lo, hi].
    fn samples(lo: f64, hi: f64, n: usize) -> Vec<f32> {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (lo + (hi - lo) * (s >> 11) as f64 / (1u64 << 53) as f64) as f32
            })
            .collect()
    }

    #[test]
    fn exp_matches_f64_over_the_normal_range() {
        let mut worst = 0f64;
        let mut xs = samples(-87.3, 88.7, 200_000);
        // The edges of the range reduction, integers (r = 0) and half-integers of ln 2.
        xs.extend((-125..=127).flat_map(|n| {
            let v = n as f32 * std::f32::consts::LN_2;
            [v, v + 0.346_573_6, v - 0.346_573_6, v.next_up(), v.next_down()]
        }));
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 88.72, -87.33]);
        for &x in &xs {
            let want = (x as f64).exp();
            if !(f32::MIN_POSITIVE as f64..f32::MAX as f64).contains(&want) {
                continue;
            }
            let got = exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1.5e-7, "max relative error {worst:e}");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(-88.0), 0.0, "denormal results are flushed to 0");
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.72).is_finite() && exp(88.72) > 3.3e38);
        // The ends of the clamped range are still computed: e^88.72283 = 3.4027985e38 (just under
        // f32::MAX) and e^−87.33655 = 1.1754907e-38 (just under the least normal f32), from f64.
        let (hi, lo) = (exp(88.722_83), exp(-87.336_55));
        assert!((hi as f64 / 3.402_798_537_411_848_7e38 - 1.0).abs() < 2e-7, "{hi}");
        assert!((lo as f64 / 1.175_490_705_608_918_4e-38 - 1.0).abs() < 2e-6, "{lo}");
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    /// The vectorised reductions against plain f64 loops, at lengths around the lane count (the
    /// remainder paths) and long rows.
    #[test]
    fn reductions_match_f64_loops() {
        for n in [0usize, 1, 7, 15, 16, 17, 31, 33, 100, 8192, 8197] {
            let x = samples(-9.0, 6.0, n);
            let m = max(&x);
            let want_m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(m, want_m, "max, n = {n}");
            let (a, b) = (0.7f32, 1.3f32);
            // The reference takes the same f32 argument a·x − b (its rounding is not exp's error).
            let arg = |v: f32| ((a * v - b) as f64).exp();
            let want: f64 = x.iter().map(|&v| arg(v)).sum();
            let got = sum_exp(&x, a, b) as f64;
            assert!((got - want).abs() <= 1e-6 * want.max(1e-30), "sum_exp n = {n}: {got} vs {want}");
            let mut out = vec![f32::NAN; n + 3];
            let s = exp_into(&x, a, b, 2.0, &mut out) as f64;
            assert!((s - 2.0 * want).abs() <= 2e-6 * want.max(1e-30), "exp_into sum n = {n}");
            for (j, &v) in x.iter().enumerate() {
                let w = 2.0 * arg(v);
                assert!((out[j] as f64 - w).abs() <= 4e-7 * w, "exp_into[{j}] n = {n}");
            }
            assert!(out[n..].iter().all(|v| v.is_nan()), "exp_into wrote past x.len()");
            let mut y = x.clone();
            let s2 = exp_in_place(&mut y, a, b, 2.0);
            assert_eq!(s2.to_bits(), (s as f32).to_bits(), "exp_in_place sum n = {n}");
            assert!(y.iter().zip(&out).all(|(y, o)| y.to_bits() == o.to_bits()), "exp_in_place n = {n}");
            let mut y = x.clone();
            scale(&mut y, 0.5);
            assert!(y.iter().zip(&x).all(|(&y, &x)| y == x * 0.5));
        }
        assert!(sum_exp(&[1.0, f32::NAN], 1.0, 0.0).is_nan(), "a NaN reaches the sum");
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn swiglu_matches_f64() {
        let g = samples(-30.0, 30.0, 1000);
        let u = samples(-2.0, 2.0, 1000);
        let dy = samples(-1.0, 1.0, 1000);
        let mut out = vec![0f32; 1000];
        swiglu(&g, &u, &mut out);
        let (mut dg, mut du) = (vec![0f32; 1000], vec![0f32; 1000]);
        swiglu_grad(&g, &u, &dy, &mut dg, &mut du);
        for j in 0..1000 {
            let (g, u, d) = (g[j] as f64, u[j] as f64, dy[j] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-6 * want.abs() + 1e-7;
            assert!(close(out[j], g * s * u), "swiglu[{j}]");
            assert!(close(dg[j], d * u * s * (1.0 + g * (1.0 - s))), "dg[{j}]");
            assert!(close(du[j], d * g * s), "du[{j}]");
        }
    }
}
