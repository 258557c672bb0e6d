//! `VQLPIPSWithDiscriminator`: the VQGAN's training objective.
//!
//! Mirrors `taming/modules/losses/vqperceptual.py`. Generator side (`optimizer_idx == 0`):
//! `nll = mean(|x - xrec| + perceptual_weight * LPIPS(x, xrec))`, `g_loss = -mean(D(xrec))`, the
//! adaptive weight `d_weight = clamp(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4) *
//! disc_weight` with `W = decoder.conv_out.weight`, `disc_factor` 0 before `disc_start`, and
//! `loss = nll + d_weight * disc_factor * g_loss + codebook_weight * qloss`. Discriminator side
//! (`optimizer_idx == 1`): `disc_factor * hinge(D(x), D(xrec))` (or the vanilla softplus loss).
//!
//! The reference takes both gradients of `W` with `torch.autograd.grad` and then back-propagates
//! `loss` through the whole model. Here the two losses are differentiated with respect to the
//! reconstruction only (through LPIPS and the discriminator), the gradients of `W` follow from the
//! last layer's input in closed form ([`conv2d_weight_grad`]), and the model is back-propagated
//! once with the combined gradient of the reconstruction: the same numbers, one pass through the
//! encoder and decoder instead of autograd's re-traversals.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Conv2d, VarMap};

use super::discriminator::{NLayerDiscriminator, NormKind};
use super::lpips::Lpips;
use super::VqLpipsConfig;
use crate::checkpoint::StateDict;
use crate::kernels::{conv2d_weight_grad, Padding};
use crate::{Error, Result};

/// The decoder's last layer and its input, for the adaptive weight.
pub struct LastLayer<'a> {
    /// Input of `conv_out` (B, C, H, W).
    pub input: &'a Tensor,
    pub conv: &'a Conv2d,
}

/// One side's loss: `total` to back-propagate and the reference's log values (without the
/// `train/` prefix).
pub struct LossOut {
    pub total: Tensor,
    pub logs: Vec<(String, f32)>,
}

/// The loss module: frozen LPIPS, trainable discriminator.
pub struct VqLoss {
    cfg: VqLpipsConfig,
    lpips: Option<Lpips>,
    disc: NLayerDiscriminator,
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .mean(0)?
        .to_scalar::<f32>()?)
}

fn norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()?)
}

/// `adopt_weight`: `value` (0) before `threshold`, else `weight`.
pub fn adopt_weight(weight: f64, global_step: u64, threshold: u64) -> f64 {
    if global_step < threshold {
        0.0
    } else {
        weight
    }
}

/// `hinge_d_loss`.
pub fn hinge_d_loss(real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    let r = (1.0 - real)?.relu()?.mean_all()?;
    let f = (fake + 1.0)?.relu()?.mean_all()?;
    Ok(((r + f)? * 0.5)?)
}

/// `softplus(x) = log(1 + exp(x))`, computed stably.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((pos + tail)?)
}

/// `vanilla_d_loss`.
pub fn vanilla_d_loss(real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    let r = softplus(&real.neg()?)?.mean_all()?;
    let f = softplus(fake)?.mean_all()?;
    Ok(((r + f)? * 0.5)?)
}

impl VqLoss {
    /// Builds the loss. The discriminator comes from `sd`'s `{prefix}discriminator.*` when present,
    /// else fresh (seeded). LPIPS is `lpips` or `sd`'s `{prefix}perceptual_loss.*`; it is required
    /// when `perceptual_weight > 0`.
    pub fn from_state_dict(
        cfg: VqLpipsConfig,
        sd: &StateDict,
        prefix: &str,
        lpips: Option<Lpips>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if cfg.disc_conditional {
            return Err(Error::Config {
                origin: "model.params.lossconfig.params.disc_conditional".into(),
                msg: "a conditional discriminator is not supported (the reference's VQModel never passes a condition)".into(),
            });
        }
        let lpips = match lpips {
            Some(l) => Some(l),
            None if cfg.perceptual_weight > 0.0 => {
                let p = format!("{prefix}perceptual_loss.");
                if sd.keys().any(|k| k.starts_with(&p)) {
                    Some(Lpips::from_state_dict(sd, &p, device)?)
                } else {
                    return Err(Error::Config {
                        origin: "model.params.lossconfig.params.perceptual_weight".into(),
                        msg: format!(
                            "perceptual_weight is {} but no LPIPS weights are available: pass --lpips FILE (a reference \
                             VQGAN checkpoint holds them as loss.perceptual_loss.*), start from such a checkpoint, \
                             or set perceptual_weight: 0 to train without the perceptual loss",
                            cfg.perceptual_weight
                        ),
                    });
                }
            }
            None => None,
        };
        let dprefix = format!("{prefix}discriminator.");
        let dsd = if sd.keys().any(|k| k.starts_with(&dprefix)) {
            Some(sd.sub(&dprefix))
        } else {
            None
        };
        let norm = if cfg.use_actnorm {
            NormKind::ActNorm
        } else {
            NormKind::BatchNorm
        };
        let disc = NLayerDiscriminator::new(
            cfg.disc_in_channels,
            cfg.disc_ndf,
            cfg.disc_num_layers,
            norm,
            dsd.as_ref(),
            seed,
            device,
        )?;
        Ok(Self { cfg, lpips, disc })
    }

    pub fn config(&self) -> &VqLpipsConfig {
        &self.cfg
    }
    pub fn discriminator(&self) -> &NLayerDiscriminator {
        &self.disc
    }
    pub fn discriminator_varmap(&self) -> &VarMap {
        self.disc.varmap()
    }
    pub fn discriminator_params(&self) -> Result<Vec<Var>> {
        self.disc.params()
    }

    /// `nll_loss` and the per-sample perceptual term: (nll scalar, p_loss (B, 1, 1, 1) or None).
    fn nll(&self, x: &Tensor, xrec: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let rec = (x - xrec)?.abs()?; // (B, C, H, W)
        let mut nll = rec.mean_all()?;
        let mut p = None;
        if self.cfg.perceptual_weight > 0.0 {
            let lp = self
                .lpips
                .as_ref()
                .ok_or_else(|| Error::invalid("LPIPS weights are missing"))?;
            let pl = lp.forward(x, xrec)?; // (B, 1, 1, 1)
                                           // mean(rec + w * p) over (B, C, H, W) = mean(rec) + w * mean(p)
            nll = (nll + (pl.mean_all()? * self.cfg.perceptual_weight)?)?;
            p = Some(pl);
        }
        if self.cfg.pixelloss_weight != 1.0 {
            tracing::debug!(
                "pixelloss_weight is stored but unused by the reference's loss, as here"
            );
        }
        Ok((nll, p))
    }

    /// The generator side at `global_step`. `qloss` is the quantizer's loss, attached to the
    /// model's graph; `xrec` too. `total.backward()` gives the model's gradients. Without
    /// `last` the adaptive weight is 0 (the reference's fallback outside training).
    pub fn generator_step(
        &self,
        x: &Tensor,
        xrec: &Tensor,
        qloss: &Tensor,
        global_step: u64,
        last: Option<LastLayer>,
        cond: Option<&Tensor>,
    ) -> Result<LossOut> {
        if cond.is_some() {
            return Err(Error::invalid(
                "a conditional discriminator is not supported",
            ));
        }
        let x = x.detach();
        // differentiate the losses with respect to the reconstruction only
        let xr = Var::from_tensor(&xrec.detach())?;
        let (nll, p) = self.nll(&x, xr.as_tensor())?;
        let g_nll = nll
            .backward()?
            .remove(xr.as_tensor())
            .unwrap_or(xr.as_tensor().zeros_like()?); // (B, C, H, W)
        let logits_fake = self.disc.forward_frozen(xr.as_tensor())?; // (B, 1, h, w)
        let g_loss = logits_fake.mean_all()?.neg()?;
        let g_g = g_loss
            .backward()?
            .remove(xr.as_tensor())
            .unwrap_or(xr.as_tensor().zeros_like()?); // (B, C, H, W)
        let d_weight = match last {
            Some(l) => {
                let cfg = l.conv.config();
                let wd = l.conv.weight().dims4()?;
                let pad = Padding::same(cfg.padding);
                // both gradients in one pass over the layer's input: the two output gradients
                // side by side as 2 * O output channels
                let (o, c, kh, kw) = wd;
                let both = Tensor::cat(&[&g_nll, &g_g], 1)?; // (B, 2 * O, H, W)
                let gw = conv2d_weight_grad(l.input, &both, (2 * o, c, kh, kw), cfg.stride, pad)?;
                let gw_nll = gw.narrow(0, 0, o)?; // (O, C, kh, kw)
                let gw_g = gw.narrow(0, o, o)?;
                (norm(&gw_nll)? / (norm(&gw_g)? + 1e-4)).clamp(0.0, 1e4) * self.cfg.disc_weight
            }
            None => 0.0,
        };
        let disc_factor = adopt_weight(self.cfg.disc_factor, global_step, self.cfg.disc_start);
        let qmean = qloss.mean_all()?;
        // gradient of the loss with respect to xrec, applied through the model in one pass
        let g_rec = (g_nll + (g_g * (d_weight * disc_factor))?)?.detach();
        let surrogate = ((xrec * &g_rec)?.sum_all()? + (&qmean * self.cfg.codebook_weight)?)?;
        let total = scalar(&nll)? as f64
            + d_weight * disc_factor * scalar(&g_loss)? as f64
            + self.cfg.codebook_weight * scalar(&qmean)? as f64;
        let p_loss = match &p {
            Some(p) => scalar(p)?,
            None => 0.0,
        };
        let magnitude = scalar(&nll)?.abs() as f64
            + (d_weight * disc_factor * scalar(&g_loss)? as f64).abs()
            + (self.cfg.codebook_weight * scalar(&qmean)? as f64).abs();
        let logs = vec![
            ("total_loss".to_string(), total as f32),
            ("total_loss_terms_magnitude".to_string(), magnitude as f32),
            ("quant_loss".to_string(), scalar(&qmean)?),
            ("nll_loss".to_string(), scalar(&nll)?),
            ("rec_loss".to_string(), scalar(&nll)?),
            ("p_loss".to_string(), p_loss),
            ("d_weight".to_string(), d_weight as f32),
            ("disc_factor".to_string(), disc_factor as f32),
            ("g_loss".to_string(), scalar(&g_loss)?),
        ];
        Ok(LossOut {
            total: surrogate,
            logs,
        })
    }

    /// The discriminator side at `global_step`: `total` is the discriminator loss (its gradients
    /// reach the discriminator only).
    pub fn discriminator_step(
        &self,
        x: &Tensor,
        xrec: &Tensor,
        global_step: u64,
        cond: Option<&Tensor>,
    ) -> Result<LossOut> {
        if cond.is_some() {
            return Err(Error::invalid(
                "a conditional discriminator is not supported",
            ));
        }
        let logits_real = self.disc.forward(&x.detach())?; // (B, 1, h, w)
        let logits_fake = self.disc.forward(&xrec.detach())?;
        let disc_factor = adopt_weight(self.cfg.disc_factor, global_step, self.cfg.disc_start);
        let d = if self.cfg.disc_loss == "vanilla" {
            vanilla_d_loss(&logits_real, &logits_fake)?
        } else {
            hinge_d_loss(&logits_real, &logits_fake)?
        };
        let d_loss = (d * disc_factor)?;
        let logs = vec![
            ("disc_loss".to_string(), scalar(&d_loss)?),
            ("logits_real".to_string(), scalar(&logits_real)?),
            ("logits_fake".to_string(), scalar(&logits_fake)?),
        ];
        Ok(LossOut {
            total: d_loss,
            logs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn d_losses_match_formulas() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let r = Tensor::new(&[0.5f32, 2.0, -1.0], &dev)?;
        let f = Tensor::new(&[-2.0f32, 0.0, 0.5], &dev)?;
        let h = hinge_d_loss(&r, &f)?.to_scalar::<f32>()?;
        // relu(1-r) = [0.5, 0, 2] mean 0.8333; relu(1+f) = [0, 1, 1.5] mean 0.8333
        assert!((h - 0.5 * (2.5 / 3.0 + 2.5 / 3.0)).abs() < 1e-6);
        let v = vanilla_d_loss(&r, &f)?.to_scalar::<f32>()?;
        let sp = |x: f32| (1.0 + x.exp()).ln();
        let want =
            0.5 * ((sp(-0.5) + sp(-2.0) + sp(1.0)) / 3.0 + (sp(-2.0) + sp(0.0) + sp(0.5)) / 3.0);
        assert!((v - want).abs() < 1e-6, "{v} {want}");
        assert_eq!(adopt_weight(1.0, 4, 5), 0.0);
        assert_eq!(adopt_weight(1.0, 5, 5), 1.0);
        Ok(())
    }
}
