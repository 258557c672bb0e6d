//! GELU with the exact (erf) form, `torch.nn.GELU()` in the reference's transformer MLP
//! (`taming/modules/transformer/mingpt.py`, `Block.mlp`), computed so that the compiler can
//! vectorise it: within 2.4e-7 x max(1, |x|) of candle's value (the test checks 5e-7).
//!
//! candle's `gelu_erf` calls a scalar `erff` per element; at batch 8 on the full-size GPT that
//! was about 5 % of a sampling step. Here erf is Abramowitz & Stegun 7.1.26 (absolute error
//! below 1.5e-7) with a branch-free `exp`, over the rayon pool. [`gelu_reference`] is the
//! plain version (candle's op); the tests compare the two. Used for inference only: a tensor
//! being trained keeps candle's op, which records the gradient.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Elements per rayon task.
const CHUNK: usize = 4096;

/// `0.5 x (1 + erf(x / sqrt 2))` by candle's `gelu_erf` (scalar `erff`).
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// Same value as [`gelu_reference`] (within float32 rounding): the fast form for a float32 CPU
/// tensor that records no gradient, candle's op otherwise.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.track_op() || !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        return gelu_reference(x);
    }
    let x = x.contiguous()?;
    let mut values = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            return gelu_reference(&x);
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            return gelu_reference(&x);
        };
        data[a..b].to_vec()
    };
    values.par_chunks_mut(CHUNK).for_each(gelu_slice);
    Ok(Tensor::from_vec(values, x.shape(), &Device::Cpu)?)
}

/// GELU in place over a slice, with AVX2 + FMA code when the CPU has them.
pub fn gelu_slice(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); the loop is plain safe code.
        unsafe { gelu_slice_avx2(xs) };
        return;
    }
    for x in xs.iter_mut() {
        *x = gelu1(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = gelu1(*x);
    }
}

/// GELU of one value: branch-free, so a loop over it vectorises.
#[inline(always)]
fn gelu1(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf by Abramowitz & Stegun 7.1.26: `1 - t (a1 + t (a2 + ...)) exp(-x^2)`, t = 1 / (1 + p|x|),
/// with the sign of x.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp_neg(ax * ax);
    y.copysign(x)
}

/// `exp(-v)` for v >= 0; below `exp(-87)` (smaller than any erf correction float32 can hold) it
/// returns `exp(-87)`.
#[inline(always)]
fn exp_neg(v: f32) -> f32 {
    exp_approx(-v)
}

/// `exp(x)` for x clamped to [-87, 88] (Cephes' expf polynomial after reducing by powers of two,
/// about 1 ulp), branch-free so that loops over it vectorise; also the swish of
/// [`crate::group_norm`].
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let y = x.clamp(-87.0, 88.0);
    // n = round(y / ln 2), in [-126, 127]: adding and removing 1.5 * 2^23 rounds to the
    // nearest integer in float arithmetic (no floor call, which baseline x86-64 lacks)
    const ROUND: f32 = 12_582_912.0;
    let nf = (y * LOG2E + ROUND) - ROUND;
    let r = y - nf * LN2_HI - nf * LN2_LO; // |r| <= ln 2 / 2
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = 1.0 + r + r * r * p;
    // 2^n with -126 <= n <= 127: the exponent field directly
    e * f32::from_bits(((nf as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_gelu_matches_candle() -> anyhow::Result<()> {
        // a dense grid over the range where GELU is not simply 0 or x, and far values
        let mut xs: Vec<f32> = (-120_000..=120_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([
            -1e30, -500.0, -88.0, -20.0, 20.0, 88.0, 500.0, 1e30, 0.0, -0.0,
        ]);
        let x = Tensor::new(xs.as_slice(), &Device::Cpu)?;
        let want = gelu_reference(&x)?.to_vec1::<f32>()?;
        let got = gelu(&x)?.to_vec1::<f32>()?;
        let mut worst = 0f32;
        for ((xv, w), g) in xs.iter().zip(&want).zip(&got) {
            let d = (w - g).abs() / xv.abs().max(1.0);
            assert!(d <= 5e-7, "gelu({xv}): candle {w}, fast {g}");
            worst = worst.max(d);
        }
        println!("largest difference relative to max(1, |x|): {worst:e}");
        Ok(())
    }

    #[test]
    fn gradients_and_other_dtypes_keep_candles_op() -> anyhow::Result<()> {
        let x = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
        let var = candle_core::Var::from_tensor(&x)?;
        let y = gelu(var.as_tensor())?;
        let g = y.sum_all()?.backward()?;
        assert!(g.get(&var).is_some(), "no gradient recorded");
        let h = gelu(&x.to_dtype(DType::F64)?)?;
        assert_eq!(h.dtype(), DType::F64);
        Ok(())
    }
}
