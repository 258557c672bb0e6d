//! The PatchGAN discriminator.
//!
//! Mirrors `NLayerDiscriminator` and `weights_init` of `taming/modules/discriminator/model.py`
//! (pix2pix's PatchGAN) and `ActNorm` of `taming/modules/util.py`. `main` is the reference's
//! `nn.Sequential`: a 4x4 stride-2 conv and LeakyReLU(0.2); `n_layers - 1` blocks of 4x4 stride-2
//! conv (no bias) + norm + LeakyReLU doubling the width up to 8x `ndf`; one 4x4 stride-1 block; a
//! 4x4 stride-1 conv to one channel. State-dict keys are the Sequential's indices
//! (`main.0.weight`, `main.3.running_mean`, ...).
//!
//! BatchNorm is torch's `BatchNorm2d` (eps 1e-5, momentum 0.1): in train mode it normalises with
//! the batch's statistics (biased variance) and updates the running ones (unbiased variance); in
//! eval mode it uses the running statistics. The weights live in a candle `VarMap` so they can be
//! optimised; running statistics are variables too but are not given to the optimizer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::StateDict;
use crate::disc_kernels;
use crate::kernels::{conv2d_im2col, im2col_supported, Padding};
use crate::{Error, Result};

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Which normalisation the discriminator uses (`use_actnorm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    BatchNorm,
    ActNorm,
}

#[derive(Debug)]
enum Layer {
    Conv {
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
    },
    BatchNorm {
        weight: Tensor,
        bias: Tensor,
        running_mean: Var,
        running_var: Var,
    },
    ActNorm {
        loc: Var,
        scale: Var,
        initialized: AtomicBool,
    },
    LeakyRelu,
}

/// `NLayerDiscriminator`.
pub struct NLayerDiscriminator {
    /// (Sequential index, layer)
    layers: Vec<(usize, Layer)>,
    varmap: VarMap,
    /// Names (in the VarMap) of the optimised parameters.
    params: Vec<String>,
    training: AtomicBool,
    num_batches_tracked: AtomicU64,
}

/// Parameter names and shapes of the discriminator, in Sequential order.
fn layout(input_nc: usize, ndf: usize, n_layers: usize, norm: NormKind) -> Vec<(usize, LayerSpec)> {
    let mut v = vec![
        (
            0,
            LayerSpec::Conv {
                cin: input_nc,
                cout: ndf,
                stride: 2,
                bias: true,
            },
        ),
        (1, LayerSpec::LeakyRelu),
    ];
    let mut idx = 2;
    let mut mult = 1;
    // BatchNorm has affine parameters, so the reference drops the conv bias; ActNorm keeps it
    let bias = norm == NormKind::ActNorm;
    for n in 1..=n_layers {
        let prev = mult;
        mult = (1 << n).min(8);
        let stride = if n < n_layers { 2 } else { 1 };
        v.push((
            idx,
            LayerSpec::Conv {
                cin: ndf * prev,
                cout: ndf * mult,
                stride,
                bias,
            },
        ));
        v.push((idx + 1, LayerSpec::Norm { c: ndf * mult }));
        v.push((idx + 2, LayerSpec::LeakyRelu));
        idx += 3;
    }
    v.push((
        idx,
        LayerSpec::Conv {
            cin: ndf * mult,
            cout: 1,
            stride: 1,
            bias: true,
        },
    ));
    v
}

#[derive(Debug, Clone, Copy)]
enum LayerSpec {
    Conv {
        cin: usize,
        cout: usize,
        stride: usize,
        bias: bool,
    },
    Norm {
        c: usize,
    },
    LeakyRelu,
}

fn lock_err() -> Error {
    Error::invalid("variable map lock poisoned")
}

impl NLayerDiscriminator {
    /// Builds the discriminator: weights from `sd` (rooted at the discriminator, e.g. the
    /// `loss.discriminator.` sub-dict) when given, else fresh by the reference's `weights_init`
    /// (conv weights N(0, 0.02), conv biases torch's default U(+-1/sqrt(fan_in)), BatchNorm
    /// weights N(1, 0.02) and biases 0), seeded.
    pub fn new(
        input_nc: usize,
        ndf: usize,
        n_layers: usize,
        norm: NormKind,
        sd: Option<&StateDict>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = match sd {
            Some(sd) => {
                crate::checkpoint::trainable::varmap_from_state_dict(sd, None, DType::F32, device)?
            }
            None => VarMap::new(),
        };
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut fresh: Vec<(Var, Vec<f32>)> = Vec::new();
        let mut layers = Vec::new();
        let mut params = Vec::new();
        let mut initialized_from_sd = true;
        for (i, spec) in layout(input_nc, ndf, n_layers, norm) {
            let p = format!("main.{i}");
            let v = vb.pp(&p);
            let layer = match spec {
                LayerSpec::Conv {
                    cin,
                    cout,
                    stride,
                    bias,
                } => {
                    let weight = v.get_with_hints((cout, cin, 4, 4), "weight", Init::Const(0.0))?;
                    params.push(format!("{p}.weight"));
                    let b = if bias {
                        params.push(format!("{p}.bias"));
                        Some(v.get_with_hints(cout, "bias", Init::Const(0.0))?)
                    } else {
                        None
                    };
                    Layer::Conv {
                        weight,
                        bias: b,
                        stride,
                    }
                }
                LayerSpec::Norm { c } => match norm {
                    NormKind::BatchNorm => {
                        let weight = v.get_with_hints(c, "weight", Init::Const(1.0))?;
                        let bias = v.get_with_hints(c, "bias", Init::Const(0.0))?;
                        params.push(format!("{p}.weight"));
                        params.push(format!("{p}.bias"));
                        v.get_with_hints(c, "running_mean", Init::Const(0.0))?;
                        v.get_with_hints(c, "running_var", Init::Const(1.0))?;
                        let data = varmap.data().lock().map_err(|_| lock_err())?;
                        let get = |k: &str| {
                            data.get(&format!("{p}.{k}")).cloned().ok_or_else(|| {
                                Error::invalid(format!("discriminator buffer {p}.{k} missing"))
                            })
                        };
                        Layer::BatchNorm {
                            weight,
                            bias,
                            running_mean: get("running_mean")?,
                            running_var: get("running_var")?,
                        }
                    }
                    NormKind::ActNorm => {
                        v.get_with_hints((1, c, 1, 1), "loc", Init::Const(0.0))?;
                        v.get_with_hints((1, c, 1, 1), "scale", Init::Const(1.0))?;
                        params.push(format!("{p}.loc"));
                        params.push(format!("{p}.scale"));
                        let done = sd
                            .and_then(|s| s.get(&format!("{p}.initialized")))
                            .and_then(|t| {
                                t.to_dtype(DType::F32)
                                    .ok()?
                                    .flatten_all()
                                    .ok()?
                                    .to_vec1::<f32>()
                                    .ok()
                            })
                            .is_some_and(|v| v.first().is_some_and(|x| *x != 0.0));
                        let data = varmap.data().lock().map_err(|_| lock_err())?;
                        let get = |k: &str| {
                            data.get(&format!("{p}.{k}")).cloned().ok_or_else(|| {
                                Error::invalid(format!("discriminator parameter {p}.{k} missing"))
                            })
                        };
                        Layer::ActNorm {
                            loc: get("loc")?,
                            scale: get("scale")?,
                            initialized: AtomicBool::new(done),
                        }
                    }
                },
                LayerSpec::LeakyRelu => Layer::LeakyRelu,
            };
            layers.push((i, layer));
        }
        if let Some(sd) = sd {
            crate::checkpoint::trainable::require_loaded(&varmap, sd, None)?;
        } else {
            initialized_from_sd = false;
        }
        if !initialized_from_sd {
            let data = varmap.data().lock().map_err(|_| lock_err())?;
            for (i, spec) in layout(input_nc, ndf, n_layers, norm) {
                let p = format!("main.{i}");
                match spec {
                    LayerSpec::Conv {
                        cin, cout, bias, ..
                    } => {
                        let n = cout * cin * 16;
                        if let Some(w) = data.get(&format!("{p}.weight")) {
                            fresh.push((w.clone(), normal(&mut rng, n, 0.0, 0.02)));
                        }
                        if bias {
                            if let Some(b) = data.get(&format!("{p}.bias")) {
                                let bound = 1.0 / ((cin * 16) as f64).sqrt();
                                fresh.push((b.clone(), uniform(&mut rng, cout, bound)));
                            }
                        }
                    }
                    LayerSpec::Norm { c } if norm == NormKind::BatchNorm => {
                        if let Some(w) = data.get(&format!("{p}.weight")) {
                            fresh.push((w.clone(), normal(&mut rng, c, 1.0, 0.02)));
                        }
                    }
                    _ => {}
                }
            }
        }
        for (var, values) in fresh {
            var.set(&Tensor::from_vec(values, var.shape(), device)?)?;
        }
        let tracked = sd
            .and_then(|s| {
                s.tensors()
                    .iter()
                    .find(|(k, _)| k.ends_with("num_batches_tracked"))
                    .map(|(_, t)| t.clone())
            })
            .and_then(|t| {
                t.to_dtype(DType::F64)
                    .ok()?
                    .flatten_all()
                    .ok()?
                    .to_vec1::<f64>()
                    .ok()
            })
            .and_then(|v| v.first().copied())
            .unwrap_or(0.0);
        Ok(Self {
            layers,
            varmap,
            params,
            training: AtomicBool::new(true),
            num_batches_tracked: AtomicU64::new(tracked.max(0.0) as u64),
        })
    }

    /// The variables (weights and running statistics), keyed as in the reference's state dict
    /// relative to the discriminator.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The optimised parameters (what `discriminator.parameters()` yields).
    pub fn params(&self) -> Result<Vec<Var>> {
        let data = self.varmap.data().lock().map_err(|_| lock_err())?;
        self.params
            .iter()
            .map(|k| {
                data.get(k)
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("discriminator parameter {k} missing")))
            })
            .collect()
    }

    /// Train mode (batch statistics, running statistics updated) or eval mode (running statistics).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::SeqCst);
    }

    /// Buffers that are not variables: BatchNorm's `num_batches_tracked` (int64) and ActNorm's
    /// `initialized` (uint8, stored as int64), under their state-dict keys.
    pub fn extra_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let mut out = Vec::new();
        for (i, l) in &self.layers {
            match l {
                Layer::BatchNorm { .. } => {
                    let n = self.num_batches_tracked.load(Ordering::SeqCst) as i64;
                    out.push((
                        format!("main.{i}.num_batches_tracked"),
                        Tensor::new(n, &dev)?,
                    ));
                }
                Layer::ActNorm { initialized, .. } => {
                    let v = i64::from(initialized.load(Ordering::SeqCst));
                    out.push((format!("main.{i}.initialized"), Tensor::new(v, &dev)?));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Restores BatchNorm's step counter (after a resume).
    pub fn set_num_batches_tracked(&self, n: u64) {
        self.num_batches_tracked.store(n, Ordering::SeqCst);
    }

    /// Restores ActNorm's `initialized` flags from a state dict (after a resume).
    pub fn load_extra_buffers(&self, sd: &StateDict, prefix: &str) {
        for (i, l) in &self.layers {
            if let Layer::ActNorm { initialized, .. } = l {
                let on = sd
                    .get(&format!("{prefix}main.{i}.initialized"))
                    .and_then(|t| {
                        t.to_dtype(DType::F32)
                            .ok()?
                            .flatten_all()
                            .ok()?
                            .to_vec1::<f32>()
                            .ok()
                    })
                    .is_some_and(|v| v.first().is_some_and(|x| *x != 0.0));
                initialized.store(on, Ordering::SeqCst);
            }
        }
    }

    /// Patch logits (B, 1, h, w) of images (B, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// [`NLayerDiscriminator::forward`] with the weights held fixed: a backward pass from these
    /// logits reaches the input only. The generator's loss needs no gradient of the
    /// discriminator's weights (the reference computes them there and throws them away).
    /// BatchNorm still runs on batch statistics and updates its running ones in training mode.
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, frozen: bool) -> Result<Tensor> {
        let fix = |t: &Tensor| if frozen { t.detach() } else { t.clone() };
        let training = self.training.load(Ordering::SeqCst);
        let mut h = x.clone();
        let mut any_bn = false;
        for (_, layer) in &self.layers {
            h = match layer {
                Layer::Conv {
                    weight,
                    bias,
                    stride,
                } => {
                    let (weight, bias) = (&fix(weight), &bias.as_ref().map(fix));
                    if im2col_supported(&h) {
                        conv2d_im2col(&h, weight, bias.as_ref(), *stride, Padding::same(1))?
                    // (B, C', H', W')
                    } else {
                        let y = h.conv2d(weight, 1, *stride, 1, 1)?;
                        match bias {
                            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
                            None => y,
                        }
                    }
                }
                Layer::BatchNorm {
                    weight,
                    bias,
                    running_mean,
                    running_var,
                } => {
                    any_bn = true;
                    let (weight, bias) = (&fix(weight), &fix(bias));
                    batch_norm(&h, weight, bias, running_mean, running_var, training)?
                }
                Layer::ActNorm {
                    loc,
                    scale,
                    initialized,
                } => {
                    if training && !initialized.load(Ordering::SeqCst) {
                        actnorm_init(&h, loc, scale)?;
                        initialized.store(true, Ordering::SeqCst);
                    }
                    h.broadcast_add(&fix(loc.as_tensor()))?
                        .broadcast_mul(&fix(scale.as_tensor()))?
                }
                Layer::LeakyRelu if disc_kernels::supported(&h) => {
                    disc_kernels::leaky_relu(&h, 0.2)?
                }
                Layer::LeakyRelu => candle_nn::ops::leaky_relu(&h, 0.2)?,
            };
        }
        if training && any_bn {
            self.num_batches_tracked.fetch_add(1, Ordering::SeqCst);
        }
        Ok(h)
    }
}

/// `BatchNorm2d` forward on (B, C, H, W).
fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    rm: &Var,
    rv: &Var,
    training: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let shape = (1, c, 1, 1);
    if training && disc_kernels::supported(x) {
        // the fused op (same formulas, statistics accumulated in float64)
        let n = (b * h * w) as f64;
        let (y, stats) =
            disc_kernels::batch_norm_train(x, &weight.reshape(c)?, &bias.reshape(c)?, BN_EPS)?;
        let m: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
        let unbiased: Vec<f32> = stats
            .iter()
            .map(|s| (s.1 * n / (n - 1.0).max(1.0)) as f32)
            .collect();
        let (m, unbiased) = (
            Tensor::from_vec(m, c, x.device())?,
            Tensor::from_vec(unbiased, c, x.device())?,
        );
        rm.set(&((rm.as_tensor() * (1.0 - BN_MOMENTUM))? + (m * BN_MOMENTUM)?)?)?;
        rv.set(&((rv.as_tensor() * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?)?;
        return Ok(y);
    }
    let (mean, var) = if training {
        let n = (b * h * w) as f64;
        let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?; // (1, C, 1, 1)
        let xc = x.broadcast_sub(&mean)?;
        let var = xc
            .sqr()?
            .mean_keepdim(0)?
            .mean_keepdim(2)?
            .mean_keepdim(3)?; // biased, (1, C, 1, 1)
                               // running statistics: momentum 0.1, unbiased variance
        let m = mean.detach().reshape(c)?;
        let unbiased = (var.detach().reshape(c)? * (n / (n - 1.0).max(1.0)))?;
        rm.set(&((rm.as_tensor() * (1.0 - BN_MOMENTUM))? + (m * BN_MOMENTUM)?)?)?;
        rv.set(&((rv.as_tensor() * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?)?;
        (mean, var)
    } else {
        (
            rm.as_tensor().reshape(shape)?,
            rv.as_tensor().reshape(shape)?,
        )
    };
    let y = x
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + BN_EPS)?.sqrt()?)?; // (B, C, H, W)
    Ok(y.broadcast_mul(&weight.reshape(shape)?)?
        .broadcast_add(&bias.reshape(shape)?)?)
}

/// ActNorm's data-dependent initialisation: `loc = -mean`, `scale = 1 / (std + 1e-6)` per
/// channel (unbiased std, torch's default).
fn actnorm_init(x: &Tensor, loc: &Var, scale: &Var) -> Result<()> {
    let (b, c, h, w) = x.dims4()?;
    let n = (b * h * w) as f64;
    let flat = x
        .detach()
        .transpose(0, 1)?
        .contiguous()?
        .reshape((c, b * h * w))?; // (C, N)
    let mean = flat.mean_keepdim(1)?; // (C, 1)
    let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n - 1.0).max(1.0))?;
    let std = var.sqrt()?;
    loc.set(&mean.neg()?.reshape((1, c, 1, 1))?)?;
    scale.set(&(std + 1e-6)?.recip()?.reshape((1, c, 1, 1))?)?;
    Ok(())
}

fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            (mean + (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f64) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_reference_sequential() {
        // n_layers 3, ndf 64: convs at 0, 2, 5, 8, 11; norms at 3, 6, 9
        let l = layout(3, 64, 3, NormKind::BatchNorm);
        let convs: Vec<(usize, usize, usize)> = l
            .iter()
            .filter_map(|(i, s)| match s {
                LayerSpec::Conv { cin, cout, .. } => Some((*i, *cin, *cout)),
                _ => None,
            })
            .collect();
        assert_eq!(
            convs,
            [
                (0, 3, 64),
                (2, 64, 128),
                (5, 128, 256),
                (8, 256, 512),
                (11, 512, 1)
            ]
        );
    }

    #[test]
    fn batchnorm_train_updates_running_stats_and_eval_uses_them() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let d = NLayerDiscriminator::new(3, 8, 2, NormKind::BatchNorm, None, 1, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
        let y1 = d.forward(&x)?;
        assert_eq!(y1.dims(), [2, 1, 6, 6]);
        let rm = d.varmap().data().lock().unwrap()["main.3.running_mean"]
            .as_tensor()
            .to_vec1::<f32>()?;
        assert!(rm.iter().any(|v| *v != 0.0));
        assert_eq!(d.extra_buffers()?[0].1.to_scalar::<i64>()?, 1);
        d.set_training(false);
        let e1 = d.forward(&x)?;
        let e2 = d.forward(&x)?;
        assert_eq!(
            e1.flatten_all()?.to_vec1::<f32>()?,
            e2.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
