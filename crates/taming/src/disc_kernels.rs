//! Fused CPU ops for the PatchGAN discriminator's training passes, each with its backward:
//! `BatchNorm2d` on batch statistics ([`batch_norm_train`]) and `LeakyReLU` ([`leaky_relu`]).
//! Mirrors `torch.nn.BatchNorm2d` (training mode) and `torch.nn.LeakyReLU` as used by
//! `taming/modules/discriminator/model.py`.
//!
//! Composed from candle ops, a training-mode BatchNorm is a dozen ops with strided reductions
//! over the batch and spatial dims, and `candle_nn::ops::leaky_relu` is a maximum, a minimum and
//! their comparisons in the backward; the discriminator passes of a VQGAN step spent most of their
//! time there rather than in the convolutions. [`batch_norm_train_reference`] and
//! `candle_nn::ops::leaky_relu` are the plain versions the tests compare with.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Whether the fused ops run on `x`: float32 on the CPU.
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn tensor_f32(t: &Tensor, what: &str) -> candle_core::Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("{what} must be float32, not {:?}", t.dtype())
    }
    t.flatten_all()?.to_vec1::<f32>()
}

/// Per-channel mean and biased variance of `x` (B, C, H, W) given as a flat slice.
fn channel_stats(x: &[f32], b: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let n = (b * hw).max(1) as f64;
            let planes = || (0..b).map(move |bi| &x[(bi * c + ci) * hw..(bi * c + ci + 1) * hw]);
            let mean = planes().flatten().map(|v| *v as f64).sum::<f64>() / n;
            let var = planes()
                .flatten()
                .map(|v| (*v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            (mean, var)
        })
        .collect()
}

/// `BatchNorm2d` in training mode: `(x - mean) / sqrt(var + eps) * weight + bias` with the
/// batch's per-channel mean and biased variance, for `x` (B, C, H, W) and `weight`, `bias` (C).
/// Differentiable in all three (the statistics are functions of `x`, as in torch). Also returns
/// the statistics, per channel (mean, biased variance), computed once for the output, the
/// backward pass and the caller's running averages.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Vec<(f64, f64)>)> {
    let x = x.contiguous()?;
    let (b, c, h, w) = x.dims4()?;
    let stats = {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            return Err(crate::Error::invalid(
                "batch norm: the fused op runs on the CPU",
            ));
        };
        channel_stats(
            crate::kernels::cpu_f32(s, layout, "batch norm input")?,
            b,
            c,
            h * w,
        )
    };
    let op = BatchNormTrain {
        eps,
        stats: stats.clone(),
    };
    let y = x.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    Ok((y, stats))
}

/// The plain version of [`batch_norm_train`], composed from candle ops.
pub fn batch_norm_train_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?; // (1, C, 1, 1)
    let xc = x.broadcast_sub(&mean)?; // (B, C, H, W)
    let var = xc
        .sqr()?
        .mean_keepdim(0)?
        .mean_keepdim(2)?
        .mean_keepdim(3)?; // (1, C, 1, 1)
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?; // (B, C, H, W)
    Ok(y.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?)
}

#[derive(Debug, Clone)]
struct BatchNormTrain {
    eps: f64,
    /// Per channel (mean, biased variance) of the input this op is applied to.
    stats: Vec<(f64, f64)>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
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
        let x = crate::kernels::cpu_f32(s1, l1, "batch norm input")?;
        let w = crate::kernels::cpu_f32(s2, l2, "batch norm weight")?;
        let bias = crate::kernels::cpu_f32(s3, l3, "batch norm bias")?;
        let (b, c, h, wd) = l1.shape().dims4()?;
        if w.len() != c || bias.len() != c {
            candle_core::bail!(
                "batch norm: {} weights and {} biases for {c} channels",
                w.len(),
                bias.len()
            )
        }
        let hw = h * wd;
        if self.stats.len() != c || x.len() != b * c * hw {
            candle_core::bail!("batch norm: statistics for another input")
        }
        let stats = &self.stats;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw.max(1))
            .zip(x.par_chunks(hw.max(1)))
            .enumerate()
            .for_each(|(i, (yp, xp))| {
                let ci = i % c;
                let (mean, var) = stats[ci];
                let scale = w[ci] as f64 / (var + self.eps).sqrt();
                let shift = bias[ci] as f64 - mean * scale;
                let (scale, shift) = (scale as f32, shift as f32);
                for (o, v) in yp.iter_mut().zip(xp) {
                    *o = v * scale + shift;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, wd) = x.dims4()?;
        let hw = h * wd;
        let n = (b * hw).max(1) as f64;
        let xs = tensor_f32(x, "batch norm input")?;
        let gs = tensor_f32(grad, "batch norm gradient")?;
        let w = tensor_f32(weight, "batch norm weight")?;
        let stats = &self.stats;
        let plane = |bi: usize, ci: usize| (bi * c + ci) * hw..(bi * c + ci + 1) * hw;
        // per channel: sum(g) and sum(g * xhat)
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ci| {
                let (mean, var) = stats[ci];
                let inv = 1.0 / (var + self.eps).sqrt();
                let (mut sg, mut sgx) = (0f64, 0f64);
                for bi in 0..b {
                    let r = plane(bi, ci);
                    for (g, v) in gs[r.clone()].iter().zip(&xs[r]) {
                        sg += *g as f64;
                        sgx += *g as f64 * (*v as f64 - mean) * inv;
                    }
                }
                (sg, sgx)
            })
            .collect();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(i, dp)| {
                let (bi, ci) = (i / c, i % c);
                let (mean, var) = stats[ci];
                let inv = 1.0 / (var + self.eps).sqrt();
                let (sg, sgx) = sums[ci];
                let k = w[ci] as f64 * inv;
                let r = plane(bi, ci);
                for ((d, g), v) in dp.iter_mut().zip(&gs[r.clone()]).zip(&xs[r]) {
                    let xhat = (*v as f64 - mean) * inv;
                    *d = (k * (*g as f64 - sg / n - xhat * sgx / n)) as f32;
                }
            });
        let dev = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
        let dw: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        let db: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        Ok((
            Some(dx),
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
            Some(Tensor::from_vec(db, bias.shape(), dev)?),
        ))
    }
}

/// `LeakyReLU(slope)`: `x` where positive, `slope * x` elsewhere; the gradient is `slope` at 0,
/// as in torch.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(LeakyRelu {
        slope: slope as f32,
    })?)
}

#[derive(Debug, Clone, Copy)]
struct LeakyRelu {
    slope: f32,
}

impl CustomOp1 for LeakyRelu {
    fn name(&self) -> &'static str {
        "leaky-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::kernels::cpu_f32(s, l, "leaky relu input")?;
        let k = self.slope;
        let y: Vec<f32> = x
            .iter()
            .map(|v| if *v > 0.0 { *v } else { v * k })
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let xs = tensor_f32(x, "leaky relu input")?;
        let gs = tensor_f32(grad, "leaky relu gradient")?;
        let k = self.slope;
        let d: Vec<f32> = xs
            .iter()
            .zip(&gs)
            .map(|(v, g)| if *v > 0.0 { *g } else { g * k })
            .collect();
        Ok(Some(Tensor::from_vec(d, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::transformer::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn batch_norm_matches_composed_forward_and_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 4, 6), &dev)? + 0.7)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 5, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 5, &dev)?)?;
        let (got, stats) = batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
        let mean = x
            .as_tensor()
            .mean_keepdim(0)?
            .mean_keepdim(2)?
            .mean_keepdim(3)?;
        let mean = mean.flatten_all()?.to_vec1::<f32>()?;
        for (s, m) in stats.iter().zip(&mean) {
            assert!((s.0 as f32 - m).abs() < 1e-5);
        }
        let want = batch_norm_train_reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
        assert!(max_diff(&got, &want) < 1e-4);
        let probe = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
        let gg = (got * &probe)?.sum_all()?.backward()?;
        let gw = (want * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let d = max_diff(
                gg.get(v.as_tensor()).unwrap(),
                gw.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradient of {name}: {d}");
        }
        Ok(())
    }

    #[test]
    fn leaky_relu_matches_candle_forward_and_gradient() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut v: Vec<f32> = Tensor::randn(0f32, 1.0, 40, &dev)?.to_vec1()?;
        v[3] = 0.0;
        let x = Var::from_tensor(&Tensor::from_vec(v, (2, 4, 5), &dev)?)?;
        let got = leaky_relu(x.as_tensor(), 0.2)?;
        let want = candle_nn::ops::leaky_relu(x.as_tensor(), 0.2)?;
        assert!(max_diff(&got, &want) < 1e-7);
        let probe = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev)?;
        let g = (got * &probe)?.sum_all()?.backward()?;
        let dx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (xs, ps) = (
            x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            probe.flatten_all()?.to_vec1::<f32>()?,
        );
        for ((d, xv), p) in dx.iter().zip(&xs).zip(&ps) {
            // torch: grad where x > 0, slope * grad elsewhere (x = 0 included)
            let want = if *xv > 0.0 { *p } else { 0.2 * p };
            assert!((d - want).abs() < 1e-7);
        }
        Ok(())
    }
}
