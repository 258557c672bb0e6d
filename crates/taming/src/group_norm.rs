//! GroupNorm, optionally followed by swish, as one CPU kernel with a hand-written backward pass.
//! Mirrors `Normalize` and `nonlinearity` of `taming/modules/diffusionmodules/model.py`
//! (`torch.nn.GroupNorm(32, C, eps=1e-6, affine=True)`, then `x * sigmoid(x)`).
//!
//! candle composes GroupNorm from about ten tensor ops (and swish from two more), each a pass
//! over the activation with a fresh allocation, and autograd adds some twenty more for the
//! backward pass; in a VQGAN training step these passes cost more than the convolutions. Here the
//! forward pass reads the input twice and writes once, and the backward pass recomputes the
//! normalised values from the input instead of storing them. Work is split over (batch, group);
//! each slice's loops are written to vectorise (float64 sums in 8 partial sums, a branch-free
//! exp for the sigmoid) and compiled for AVX-512 where the CPU has it.
//!
//! [`group_norm_reference`] is the plain composition of candle ops (the reference version); the
//! tests check values and all three gradients of one against the other.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// `GroupNorm(groups, C, eps)` with affine `weight`/`bias`, then swish when `swish` is set.
#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    swish: bool,
}

/// Sum of `f(v)` over `xs` in float64, in 8 independent partial sums (so that the loop
/// vectorises; a single running sum would wait on each addition).
#[inline(always)]
pub(crate) fn sum8(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|v| f(*v)).sum();
    for ch in chunks {
        for l in 0..8 {
            lanes[l] += f(ch[l]);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Sum of `f(a, b)` over pairs, as [`sum8`].
#[inline(always)]
fn sum8_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| f(*x, *y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += f(x[l], y[l]);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Statistics of one (batch, group) slice: mean and 1/sqrt(var + eps), biased variance.
#[inline(always)]
fn stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = sum8(x, |v| v as f64) / n;
    let var = sum8(x, |v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// `1 / (1 + exp(-v))` with the vectorisable exp.
#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + crate::gelu::exp_approx(-v))
}

/// A float32 CPU tensor's contiguous values (None: another dtype, device or layout).
fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    data.get(a..b)
}

impl GroupNormOp {
    /// (B, C, spatial) geometry of an input shape: batch, channels, spatial size.
    fn geometry(&self, dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
        if dims.len() < 3 {
            candle_core::bail!("group_norm: input of rank {} (needs B, C, ...)", dims.len())
        }
        let (b, c) = (dims[0], dims[1]);
        if self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!(
                "group_norm: {c} channels are not divisible into {} groups",
                self.groups
            )
        }
        Ok((b, c, dims[2..].iter().product()))
    }

    fn forward(&self, x: &[f32], gamma: &[f32], beta: &[f32], c: usize, hw: usize) -> Vec<f32> {
        let cpg = c / self.groups;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cpg * hw)
            .zip(x.par_chunks(cpg * hw))
            .enumerate()
            .for_each(|(bg, (o, xs))| {
                let c0 = (bg % self.groups) * cpg;
                let (g, b) = (&gamma[c0..c0 + cpg], &beta[c0..c0 + cpg]);
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above); the body is safe code.
                    unsafe { forward_group_avx512(self, o, xs, g, b, hw) };
                    return;
                }
                forward_group(self, o, xs, g, b, hw)
            });
        out
    }

    /// Gradients with respect to x, gamma and beta given the gradient `g` of the output.
    fn backward(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        g: &[f32],
        (b, c, hw): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let cpg = c / self.groups;
        let mut dx = vec![0f32; x.len()];
        // per (batch, channel) partial sums, reduced over the batch at the end
        let mut dgamma_b = vec![0f32; b * c];
        let mut dbeta_b = vec![0f32; b * c];
        dx.par_chunks_mut(cpg * hw)
            .zip(x.par_chunks(cpg * hw))
            .zip(g.par_chunks(cpg * hw))
            .zip(dgamma_b.par_chunks_mut(cpg))
            .zip(dbeta_b.par_chunks_mut(cpg))
            .enumerate()
            .for_each(|(bg, ((((dxs, xs), gs), dgam), dbet))| {
                let c0 = (bg % self.groups) * cpg;
                let (g, b) = (&gamma[c0..c0 + cpg], &beta[c0..c0 + cpg]);
                let slices = GroupGrad {
                    dx: dxs,
                    x: xs,
                    g: gs,
                    dgamma: dgam,
                    dbeta: dbet,
                };
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above); the body is safe code.
                    unsafe { backward_group_avx512(self, slices, g, b, hw) };
                    return;
                }
                backward_group(self, slices, g, b, hw)
            });
        let mut dgamma = vec![0f32; c];
        let mut dbeta = vec![0f32; c];
        for (pg, pb) in dgamma_b.chunks(c).zip(dbeta_b.chunks(c)) {
            for (ci, (a, bb)) in pg.iter().zip(pb).enumerate() {
                dgamma[ci] += a;
                dbeta[ci] += bb;
            }
        }
        (dx, dgamma, dbeta)
    }
}

/// One (batch, group) slice of the forward pass: `o` from `xs` (cpg channels of hw values) with
/// the group's weights `gamma`, `beta` (cpg). Written so that the compiler vectorises it.
#[inline(always)]
fn forward_group(
    op: &GroupNormOp,
    o: &mut [f32],
    xs: &[f32],
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
) {
    let (mean, rstd) = stats(xs, op.eps);
    for (ci, (oc, xc)) in o.chunks_mut(hw).zip(xs.chunks(hw)).enumerate() {
        let scale = gamma[ci] * rstd;
        let shift = beta[ci] - mean * scale;
        if op.swish {
            for (ov, xv) in oc.iter_mut().zip(xc) {
                let y = xv * scale + shift;
                *ov = y * sigmoid(y);
            }
        } else {
            for (ov, xv) in oc.iter_mut().zip(xc) {
                *ov = xv * scale + shift;
            }
        }
    }
}

/// [`forward_group`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_group_avx512(
    op: &GroupNormOp,
    o: &mut [f32],
    xs: &[f32],
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
) {
    forward_group(op, o, xs, gamma, beta, hw)
}

/// The slices one (batch, group) task of the backward pass reads and writes.
struct GroupGrad<'a> {
    dx: &'a mut [f32],
    x: &'a [f32],
    g: &'a [f32],
    dgamma: &'a mut [f32],
    dbeta: &'a mut [f32],
}

/// One (batch, group) slice of the backward pass. Written so that the compiler vectorises it.
#[inline(always)]
fn backward_group(op: &GroupNormOp, s: GroupGrad<'_>, gamma: &[f32], beta: &[f32], hw: usize) {
    let GroupGrad {
        dx: dxs,
        x: xs,
        g: gs,
        dgamma: dgam,
        dbeta: dbet,
    } = s;
    let cpg = gamma.len();
    let (mean, rstd) = stats(xs, op.eps);
    // pass 1, per channel: the gradient at the affine output (into dx), and its sums for the
    // weight and bias; the group's sums of dxhat = dy * gamma and dxhat * xhat follow from them
    let (mut sum_d, mut sum_dx) = (0f64, 0f64);
    for ci in 0..cpg {
        let (gam, bet) = (gamma[ci], beta[ci]);
        let range = ci * hw..(ci + 1) * hw;
        let (ds, xc, gc) = (&mut dxs[range.clone()], &xs[range.clone()], &gs[range]);
        if op.swish {
            for ((d, xv), gv) in ds.iter_mut().zip(xc).zip(gc) {
                let y = (xv - mean) * rstd * gam + bet;
                let s = sigmoid(y);
                *d = gv * s * (1.0 + y * (1.0 - s));
            }
        } else {
            ds.copy_from_slice(gc);
        }
        let db = sum8(ds, |v| v as f64);
        let dg = sum8_pairs(ds, xc, |d, xv| (d * ((xv - mean) * rstd)) as f64);
        dgam[ci] = dg as f32;
        dbet[ci] = db as f32;
        sum_d += gam as f64 * db;
        sum_dx += gam as f64 * dg;
    }
    // pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    let n = (cpg * hw).max(1) as f64;
    let (mean_d, mean_dx) = ((sum_d / n) as f32, (sum_dx / n) as f32);
    for (ci, &gam) in gamma.iter().enumerate() {
        let range = ci * hw..(ci + 1) * hw;
        for (d, xv) in dxs[range.clone()].iter_mut().zip(&xs[range]) {
            let xhat = (xv - mean) * rstd;
            *d = rstd * (*d * gam - mean_d - xhat * mean_dx);
        }
    }
}

/// [`backward_group`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn backward_group_avx512(
    op: &GroupNormOp,
    s: GroupGrad<'_>,
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
) {
    backward_group(op, s, gamma, beta, hw)
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-swish"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, hw) = self.geometry(l1.dims())?;
        let (Some(x), Some(gamma), Some(beta)) =
            (cpu_slice(s1, l1), cpu_slice(s2, l2), cpu_slice(s3, l3))
        else {
            candle_core::bail!("group_norm: the fused kernel takes contiguous float32 tensors")
        };
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "group_norm: {c} channels but {} weights and {} biases",
                gamma.len(),
                beta.len()
            )
        }
        let out = self.forward(x, gamma, beta, c, hw);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geometry = self.geometry(x.dims())?;
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let (bs, bl) = beta.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs), Storage::Cpu(bs), Storage::Cpu(ds)) =
            (&*xs, &*gs, &*bs, &*ds)
        else {
            candle_core::bail!("group_norm: the fused kernel runs on the CPU")
        };
        let (Some(xv), Some(gv), Some(bv), Some(dv)) = (
            cpu_slice(xs, xl),
            cpu_slice(gs, gl),
            cpu_slice(bs, bl),
            cpu_slice(ds, dl),
        ) else {
            candle_core::bail!("group_norm: the fused kernel takes contiguous float32 tensors")
        };
        let (dx, dgamma, dbeta) = self.backward(xv, gv, bv, dv, geometry);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, gamma.shape(), dev)?),
            Some(Tensor::from_vec(dbeta, beta.shape(), dev)?),
        ))
    }
}

/// The plain version: GroupNorm composed of candle ops (as `candle_nn::GroupNorm` does), then swish.
pub fn group_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    swish: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let xg = x.reshape((b, groups, ()))?; // (B, G, C/G * spatial)
    let mean = xg.mean_keepdim(2)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut wshape = vec![1; dims.len()];
    wshape[1] = c;
    let y = normed
        .broadcast_mul(&weight.reshape(wshape.as_slice())?)?
        .broadcast_add(&bias.reshape(wshape.as_slice())?)?;
    Ok(if swish {
        (&y * candle_nn::ops::sigmoid(&y)?)?
    } else {
        y
    })
}

/// GroupNorm (+ swish): the fused kernel for float32 CPU tensors, the reference version elsewhere.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    swish: bool,
) -> Result<Tensor> {
    let fused = x.device().is_cpu() && [x, weight, bias].iter().all(|t| t.dtype() == DType::F32);
    if !fused {
        return group_norm_reference(x, weight, bias, groups, eps, swish);
    }
    let op = GroupNormOp { groups, eps, swish };
    Ok(x.contiguous()?.apply_op3(weight, bias, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::transformer::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn fused_equals_reference_values_and_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(swish, c, groups, hw) in &[
            (true, 64, 32, (5, 7)),
            (false, 32, 32, (4, 4)),
            (true, 6, 3, (3, 2)),
        ] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, c, hw.0, hw.1), &dev)?.affine(3.0, 0.5)?,
            )?;
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, c, &dev)?)?;
            // a loss that weights every output differently, so every gradient term matters
            let probe = Tensor::randn(0f32, 1.0, (2, c, hw.0, hw.1), &dev)?;
            let fused = group_norm(
                x.as_tensor(),
                w.as_tensor(),
                b.as_tensor(),
                groups,
                1e-6,
                swish,
            )?;
            let reference = group_norm_reference(
                x.as_tensor(),
                w.as_tensor(),
                b.as_tensor(),
                groups,
                1e-6,
                swish,
            )?;
            assert!(max_diff(&fused, &reference) < 1e-5, "values, swish {swish}");
            let gf = (&fused * &probe)?.sum_all()?.backward()?;
            let gr = (&reference * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, r) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gr.get(v.as_tensor()).unwrap(),
                );
                let d = max_diff(a, r);
                assert!(d < 1e-4, "gradient of {name}, swish {swish}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn bad_group_count_is_an_error() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 6, 2, 2), DType::F32, &dev)?;
        let w = Tensor::ones(6, DType::F32, &dev)?;
        let e = group_norm(&x, &w, &w, 4, 1e-6, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("6 channels") && e.contains("4 groups"), "{e}");
        Ok(())
    }
}
