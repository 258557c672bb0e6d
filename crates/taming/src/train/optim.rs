//! Adam and AdamW with their moments in the open, so that a run can be saved and resumed exactly.
//!
//! Mirrors `torch.optim.Adam` (the VQGAN's two optimizers, betas (0.5, 0.9)) and `torch.optim.AdamW`
//! (the transformer's, betas (0.9, 0.95), weight decay on Linear weights only), as configured in
//! `taming/models/vqgan.py` and `taming/models/cond_transformer.py` (`configure_optimizers`).
//! candle's own AdamW keeps its moments private; this one stores them as `exp_avg` / `exp_avg_sq`
//! per parameter, torch's names, and writes them into checkpoints.
//!
//! The update is torch's, step `t` counted from 1:
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`;
//! Adam's `weight_decay` adds `wd * p` to the gradient (L2), AdamW's multiplies `p` by `1 - lr wd`
//! before the update (decoupled). A parameter without a gradient is left alone, state included.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// How weight decay is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// `torch.optim.Adam`: L2 penalty added to the gradient.
    L2,
    /// `torch.optim.AdamW`: decoupled decay of the weights.
    Decoupled,
}

/// Hyper-parameters shared by all parameters of one optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub decay: Decay,
}

impl AdamConfig {
    /// `torch.optim.Adam(params, lr, betas=(b1, b2))` (eps 1e-8).
    pub fn adam(lr: f64, beta1: f64, beta2: f64) -> Self {
        Self {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            decay: Decay::L2,
        }
    }
    /// `torch.optim.AdamW(groups, lr, betas=(b1, b2))` (eps 1e-8); decay per parameter.
    pub fn adamw(lr: f64, beta1: f64, beta2: f64) -> Self {
        Self {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            decay: Decay::Decoupled,
        }
    }
}

/// One parameter and its state.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    weight_decay: f64,
    /// First and second moments; `None` until the parameter's first gradient (torch's lazy state).
    state: Option<(Tensor, Tensor)>,
    /// Steps this parameter was updated (torch keeps `step` per parameter).
    step: u64,
}

/// Adam / AdamW over named variables.
#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
}

impl Adam {
    /// `params`: (name, variable, weight decay) in a fixed order; names must be unique.
    pub fn new(params: Vec<(String, Var, f64)>, cfg: AdamConfig) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for (name, var, weight_decay) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(format!(
                    "parameter {name} given twice to the optimizer"
                )));
            }
            if !matches!(var.dtype(), DType::F32 | DType::F64) {
                return Err(Error::invalid(format!(
                    "parameter {name} is {:?}: training needs float32 weights",
                    var.dtype()
                )));
            }
            slots.push(Slot {
                name,
                var,
                weight_decay,
                state: None,
                step: 0,
            });
        }
        Ok(Self { cfg, slots })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }
    pub fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// The parameters, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// The second moment (`exp_avg_sq`) of parameter `name`, once it has had a gradient.
    pub fn second_moment(&self, name: &str) -> Option<&Tensor> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.state.as_ref().map(|(_, v)| v))
    }

    /// Zeroes both moments of rows `rows` (along dim 0) of parameter `name`, for rows whose
    /// values were just replaced.
    pub fn reset_rows(&mut self, name: &str, rows: &[usize]) -> Result<()> {
        let Some(slot) = self.slots.iter_mut().find(|s| s.name == name) else {
            return Err(Error::invalid(format!(
                "no parameter {name} in the optimizer"
            )));
        };
        if let Some((m, v)) = &mut slot.state {
            let n = m.dim(0)?;
            let mut keep = vec![1f32; n];
            for &r in rows.iter().filter(|r| **r < n) {
                keep[r] = 0.0;
            }
            let mut shape = vec![1; m.rank()];
            shape[0] = n;
            let keep = Tensor::from_vec(keep, shape, m.device())?.to_dtype(m.dtype())?;
            *m = m.broadcast_mul(&keep)?;
            *v = v.broadcast_mul(&keep)?;
        }
        Ok(())
    }

    /// Euclidean norm of all gradients present in `grads` (for logging).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                sum += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// One optimizer step with the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            decay,
        } = self.cfg;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let p = s.var.as_tensor().detach();
            let g = g.to_dtype(p.dtype())?;
            let g = if decay == Decay::L2 && s.weight_decay != 0.0 {
                (g + (&p * s.weight_decay)?)?
            } else {
                g
            };
            let (m, v) = match s.state.take() {
                Some(st) => st,
                None => (p.zeros_like()?, p.zeros_like()?),
            };
            s.step += 1;
            let m = ((m * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let t = s.step as i32;
            let bc1 = 1.0 - beta1.powi(t);
            let bc2 = 1.0 - beta2.powi(t);
            let p = if decay == Decay::Decoupled && s.weight_decay != 0.0 {
                (&p * (1.0 - lr * s.weight_decay))?
            } else {
                p
            };
            let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
            let update = ((&m / &denom)? * (lr / bc1))?;
            s.var.set(&(p - update)?)?;
            s.state = Some((m, v));
        }
        Ok(())
    }

    /// The optimizer state as named tensors: `{prefix}exp_avg.{name}`, `{prefix}exp_avg_sq.{name}`
    /// (parameters that never had a gradient have none) and `{prefix}step.{name}` (a one-element
    /// float64 tensor, exact up to 2^53 steps).
    pub fn state_tensors(&self, prefix: &str) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            if let Some((m, v)) = &s.state {
                out.insert(format!("{prefix}exp_avg.{}", s.name), m.clone());
                out.insert(format!("{prefix}exp_avg_sq.{}", s.name), v.clone());
                let step = Tensor::new(&[s.step as f64], m.device())?;
                out.insert(format!("{prefix}step.{}", s.name), step);
            }
        }
        Ok(out)
    }

    /// Restores what [`Adam::state_tensors`] wrote. A parameter with no saved state starts fresh;
    /// a saved moment of another shape is an error naming it.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, prefix: &str) -> Result<()> {
        for s in &mut self.slots {
            let m = tensors.get(&format!("{prefix}exp_avg.{}", s.name));
            let v = tensors.get(&format!("{prefix}exp_avg_sq.{}", s.name));
            let step = tensors.get(&format!("{prefix}step.{}", s.name));
            match (m, v, step) {
                (Some(m), Some(v), Some(step)) => {
                    for (what, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        if t.dims() != s.var.dims() {
                            return Err(Error::ShapeMismatch {
                                source_name: "optimizer state".into(),
                                key: format!("{prefix}{what}.{}", s.name),
                                expected: s.var.dims().to_vec(),
                                found: t.dims().to_vec(),
                            });
                        }
                    }
                    let dev = s.var.device();
                    let dt = s.var.dtype();
                    s.state = Some((m.to_device(dev)?.to_dtype(dt)?, v.to_device(dev)?.to_dtype(dt)?));
                    let st = step.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    s.step = st.first().copied().unwrap_or(0.0) as u64;
                }
                (None, None, None) => {
                    s.state = None;
                    s.step = 0;
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "optimizer state of {} is incomplete (needs {prefix}exp_avg, exp_avg_sq and step)",
                        s.name
                    )))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads_for(loss: &Tensor) -> GradStore {
        loss.backward().unwrap()
    }

    /// Two steps of textbook Adam on f(p) = sum(c * p^2), computed by hand.
    #[test]
    fn adam_matches_textbook_update() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let p0 = [1.0f64, -2.0, 0.5];
        let c = [1.0f64, 3.0, -2.0];
        let var = Var::new(&p0.map(|x| x as f32), &dev)?;
        let ct = Tensor::new(&c.map(|x| x as f32), &dev)?;
        let (lr, b1, b2, eps) = (0.1, 0.5, 0.9, 1e-8);
        let mut opt = Adam::new(
            vec![("p".into(), var.clone(), 0.0)],
            AdamConfig::adam(lr, b1, b2),
        )?;
        let mut p = p0;
        let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
        for t in 1..=2 {
            let loss = (var.as_tensor().sqr()? * &ct)?.sum_all()?;
            opt.step(&grads_for(&loss))?;
            for i in 0..3 {
                let g = 2.0 * c[i] * p[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>()?;
        for i in 0..3 {
            assert!(
                (got[i] as f64 - p[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                got[i],
                p[i]
            );
        }
        Ok(())
    }

    #[test]
    fn adamw_decays_weights_decoupled_and_adam_l2() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // zero gradient direction apart from decay: loss = 0 * p still yields a gradient of zeros
        for decay in [Decay::Decoupled, Decay::L2] {
            let var = Var::new(&[2.0f32], &dev)?;
            let cfg = AdamConfig {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                decay,
            };
            let mut opt = Adam::new(vec![("w".into(), var.clone(), 0.5)], cfg)?;
            // a zero gradient that is still a gradient (`p * 0.0` would be pruned from the graph)
            let zeros = Tensor::zeros(1, DType::F32, &dev)?;
            let loss = (var.as_tensor() * &zeros)?.sum_all()?;
            opt.step(&grads_for(&loss))?;
            let got = var.as_tensor().to_vec1::<f32>()?[0] as f64;
            let want = match decay {
                // p (1 - lr wd), then a zero Adam update
                Decay::Decoupled => 2.0 * (1.0 - 0.1 * 0.5),
                // g = wd p = 1; first Adam step moves by lr * sign(g)
                Decay::L2 => 2.0 - 0.1 * 1.0 / (1.0 + 1e-8),
            };
            assert!((got - want).abs() < 1e-6, "{decay:?}: {got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn state_round_trips_and_resume_is_exact() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let run = |steps_before_save: usize, total: usize| -> anyhow::Result<Vec<f32>> {
            let var = Var::new(&[1.0f32, 2.0, -1.0], &dev)?;
            let cfg = AdamConfig::adamw(0.05, 0.9, 0.95);
            let mut opt = Adam::new(vec![("w".into(), var.clone(), 0.01)], cfg)?;
            let mut state = None;
            for i in 0..total {
                if i == steps_before_save {
                    // save, rebuild from scratch, restore
                    let saved = opt.state_tensors("opt.")?;
                    let w = var.as_tensor().copy()?;
                    state = Some((saved, w));
                    let (saved, w) = state.as_ref().unwrap();
                    var.set(w)?;
                    opt = Adam::new(vec![("w".into(), var.clone(), 0.01)], cfg)?;
                    opt.load_state(saved, "opt.")?;
                }
                let loss = (var.as_tensor().sqr()? * (i as f64 + 1.0))?.sum_all()?;
                opt.step(&loss.backward()?)?;
            }
            let _ = state;
            Ok(var.as_tensor().to_vec1::<f32>()?)
        };
        assert_eq!(run(usize::MAX, 5)?, run(3, 5)?);
        Ok(())
    }

    #[test]
    fn bad_state_is_named() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32, 2.0], &dev)?;
        let mut opt = Adam::new(
            vec![("enc.w".into(), var, 0.0)],
            AdamConfig::adam(0.1, 0.5, 0.9),
        )?;
        let mut st = BTreeMap::new();
        st.insert(
            "o.exp_avg.enc.w".to_string(),
            Tensor::zeros(3, DType::F32, &dev)?,
        );
        st.insert(
            "o.exp_avg_sq.enc.w".to_string(),
            Tensor::zeros(3, DType::F32, &dev)?,
        );
        st.insert("o.step.enc.w".to_string(), Tensor::new(&[1f64], &dev)?);
        let e = opt.load_state(&st, "o.").unwrap_err().to_string();
        assert!(e.contains("o.exp_avg.enc.w"), "{e}");
        st.remove("o.step.enc.w");
        let e = opt.load_state(&st, "o.").unwrap_err().to_string();
        assert!(e.contains("incomplete"), "{e}");
        Ok(())
    }
}
