//! Training a first stage: `VQModel`, `GumbelVQ` and `EMAVQ` with `VQLPIPSWithDiscriminator`
//! (two optimizers) and `VQSegmentationModel` with `BCELossWithQuant` (one).
//!
//! `GumbelVQ` anneals the Gumbel-softmax temperature by its `temperature_scheduler_config` at
//! every step and adds the KL term to the prior (its quantizer loss). `EMAVQ` keeps its codebook
//! out of the optimizer and moves it by exponential moving averages, once per forward pass in
//! training as the reference's `EMAVectorQuantizer.forward` does (so twice per batch: Lightning
//! runs `training_step` once per optimizer).
//!
//! Mirrors `taming/models/vqgan.py` (`training_step`, `validation_step`, `configure_optimizers`,
//! `log_images`) as PyTorch Lightning runs it with two optimizers: for each batch the autoencoder
//! step (forward, generator loss, Adam (0.5, 0.9) on encoder, decoder, quantizer, quant_conv,
//! post_quant_conv) and then the discriminator step, which runs the model forward again with the
//! updated weights, as the reference's second `training_step` call does. Weights are saved under
//! the reference's keys: the model's own plus `loss.discriminator.*` and `loss.perceptual_loss.*`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, TensorId, Var};
use candle_nn::{VarBuilder, VarMap};
use image::RgbImage;

use super::init::{reinit_vqgan, sorted_vars};
use super::lr_scheduler::WarmUpCosine;
use super::optim::{Adam, AdamConfig};
use super::run::{optimizer_prefix, TrainState};
use super::{codebook_usage, step_rng, Batch, Trainer};
use crate::checkpoint::trainable::{require_loaded, varmap_from_state_dict};
use crate::checkpoint::StateDict;
use crate::config::{VqKind, VqModelConfig};
use crate::first_stage::{VqModel, VqModelKind};
use crate::losses::lpips::Lpips;
use crate::losses::segmentation::BceWithQuant;
use crate::losses::vqperceptual::{LastLayer, VqLoss};
use crate::losses::LossConfig;
use crate::quantize::Quantizer;
use crate::{Error, Result};

/// The loss of the model being trained.
enum Objective {
    Gan {
        loss: Box<VqLoss>,
        opt: Adam,
        lpips: BTreeMap<String, Tensor>,
    },
    Bce(BceWithQuant),
}

/// First-stage training state.
pub struct VqganTrainer {
    model: VqModel,
    varmap: VarMap,
    opt: Adam,
    objective: Objective,
    image_key: String,
    n_embed: usize,
    max_images: usize,
    /// GumbelVQ's temperature schedule.
    temperature: Option<WarmUpCosine>,
    /// The run's seed (Gumbel noise, code restarts).
    seed: u64,
    /// Restart unused codes every this many steps (0: never; a taming-rs option).
    restart_every: u64,
}

/// A code counts as unused when its Adam second moment fell below this share of the largest
/// code's: gradients decay by beta2 = 0.9 per step, so about 90 steps without being chosen.
const UNUSED_CODE_MOMENT: f64 = 1e-4;

/// Tensors of `sd` that are model weights (not loss networks, not optimizer state).
fn model_weights(sd: &StateDict) -> StateDict {
    let keep = sd
        .tensors()
        .iter()
        .filter(|(k, _)| !k.starts_with("loss.") && !k.starts_with("optimizer_states."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    StateDict::from_tensors(keep, sd.source())
}

/// (name, var) pairs of `map` restricted to `vars` (matched by identity), sorted by name.
fn named_subset(map: &VarMap, vars: &[Var]) -> Vec<(String, Var)> {
    let ids: std::collections::HashSet<TensorId> =
        vars.iter().map(|v| v.as_tensor().id()).collect();
    sorted_vars(map)
        .into_iter()
        .filter(|(_, v)| ids.contains(&v.as_tensor().id()))
        .collect()
}

impl VqganTrainer {
    /// Builds the model fresh (seeded, the reference's init) or from `init` (a checkpoint with
    /// the model's keys; its `loss.*` weights are used when present). LPIPS weights come from
    /// `lpips` (a file), else from `init`'s `loss.perceptual_loss.*`; without either the loss
    /// config must set `perceptual_weight: 0`. `lr`: base x batch x accumulation.
    pub fn new(
        cfg: &VqModelConfig,
        init: Option<&StateDict>,
        lpips: Option<&Path>,
        lr: f64,
        seed: u64,
        max_images: usize,
        device: &Device,
    ) -> Result<Self> {
        let temperature = match &cfg.kind {
            VqKind::Gumbel {
                temperature_scheduler,
                ..
            } => {
                let origin = "model.params.temperature_scheduler_config";
                let t = temperature_scheduler.as_ref().ok_or_else(|| Error::Config {
                    origin: origin.into(),
                    msg: "training a GumbelVQ needs a temperature schedule (e.g. taming.lr_scheduler.LambdaWarmUpCosineScheduler)".into(),
                })?;
                Some(WarmUpCosine::from_target(t, origin)?)
            }
            _ => None,
        };
        let ema = cfg.kind == VqKind::Ema;
        let weights = init.map(model_weights);
        let varmap = match &weights {
            Some(w) => varmap_from_state_dict(w, None, DType::F32, device)?,
            None => VarMap::new(),
        };
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = VqModel::new(cfg, vb)?;
        match &weights {
            Some(w) => require_loaded(&varmap, w, None)?,
            None => {
                reinit_vqgan(&varmap, seed, cfg.n_embed, &[])?;
                // VQSegmentationModel's fixed `colorize` buffer is torch.randn
                if let Some(c) = varmap
                    .data()
                    .lock()
                    .map_err(|_| Error::invalid("variable map poisoned"))?
                    .get("colorize")
                {
                    c.set(&Tensor::randn(0f32, 1f32, c.shape(), device)?)?;
                }
            }
        }
        // every variable but the colorize buffer (and an EMA codebook) is trained by the
        // autoencoder's optimizer
        let params: Vec<(String, Var, f64)> = sorted_vars(&varmap)
            .into_iter()
            .filter(|(k, _)| k != "colorize" && !(ema && k.starts_with("quantize.")))
            .map(|(k, v)| (k, v, 0.0))
            .collect();
        let opt = Adam::new(params, AdamConfig::adam(lr, 0.5, 0.9))?;
        let lossconfig = cfg.lossconfig.as_ref().ok_or_else(|| Error::Config {
            origin: "model.params.lossconfig".into(),
            msg: "training needs a loss: set lossconfig (e.g. taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator)".into(),
        })?;
        let (loss_cfg, warnings) = LossConfig::from_target(lossconfig)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let objective = match loss_cfg {
            LossConfig::VqLpips(lc) => {
                let empty = StateDict::from_tensors(BTreeMap::new(), "<fresh>");
                let src = init.unwrap_or(&empty);
                // keep the LPIPS tensors to write them into our checkpoints, as the reference does
                let (lp, lpips_tensors) = match lpips {
                    Some(p) => {
                        let sd = StateDict::load(p)?;
                        let prefix = if sd.keys().any(|k| k.starts_with("loss.perceptual_loss.")) { "loss.perceptual_loss." } else { "" };
                        (Some(Lpips::from_file(p, device)?), sd.sub(prefix).tensors().clone())
                    }
                    None => (None, src.sub("loss.perceptual_loss.").tensors().clone()),
                };
                let loss = VqLoss::from_state_dict(lc, src, "loss.", lp, seed ^ 0x5eed, device)?;
                let dparams = named_subset(loss.discriminator_varmap(), &loss.discriminator_params()?)
                    .into_iter()
                    .map(|(k, v)| (k, v, 0.0))
                    .collect();
                let dopt = Adam::new(dparams, AdamConfig::adam(lr, 0.5, 0.9))?;
                Objective::Gan { loss: Box::new(loss), opt: dopt, lpips: lpips_tensors }
            }
            LossConfig::BceWithQuant(bc) => Objective::Bce(BceWithQuant::new(&bc)),
            LossConfig::Dummy => {
                return Err(Error::Config {
                    origin: "model.params.lossconfig.target".into(),
                    msg: "a DummyLoss model cannot be trained: use VQLPIPSWithDiscriminator or BCELossWithQuant".into(),
                })
            }
        };
        Ok(Self {
            model,
            varmap,
            opt,
            objective,
            image_key: cfg.image_key.clone(),
            n_embed: cfg.n_embed,
            max_images,
            temperature,
            seed,
            restart_every: 0,
        })
    }

    /// Restarts unused codes every `every` steps (0: never): each code that no latent has chosen
    /// for about 90 steps (its Adam second moment decayed below 1e-4 of the largest) is moved onto
    /// a latent of the current batch drawn at random, and its optimizer moments are zeroed. Not in
    /// the reference, whose codebooks often end up mostly unused; only for `VQModel` and
    /// `VQSegmentationModel` (VectorQuantizer2). Decided from the saved optimizer state alone, so
    /// a resumed run restarts the same codes.
    pub fn set_restart_unused_codes(&mut self, every: u64) -> Result<()> {
        if every > 0 && !matches!(self.model.quantizer(), Quantizer::Vq(_)) {
            return Err(Error::invalid(
                "restart_unused_codes applies to VectorQuantizer2 codebooks (VQModel, VQSegmentationModel) only",
            ));
        }
        self.restart_every = every;
        Ok(())
    }

    /// See [`VqganTrainer::set_restart_unused_codes`]; returns how many codes moved.
    fn restart_unused_codes(&mut self, prequant: &Tensor, step: u64) -> Result<usize> {
        use rand::Rng;
        const NAME: &str = "quantize.embedding.weight";
        let Some(v) = self.opt.second_moment(NAME) else {
            return Ok(0);
        };
        let usage = v.max(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?; // (K)
        let top = usage.iter().copied().fold(0f32, f32::max) as f64;
        if top <= 0.0 {
            return Ok(0);
        }
        let dead: Vec<usize> = (0..usage.len())
            .filter(|&i| (usage[i] as f64) < UNUSED_CODE_MOMENT * top)
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let d = prequant.dim(1)?;
        let latents = prequant
            .detach()
            .permute((0, 2, 3, 1))?
            .reshape(((), d))?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?; // (N, D)
        let var = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::invalid("variable map poisoned"))?
            .get(NAME)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("no {NAME} to restart")))?;
        let mut codes = var.as_tensor().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut rng = step_rng(self.seed, step, 0x7265_7374);
        for &i in &dead {
            codes[i] = latents[rng.random_range(0..latents.len())].clone();
        }
        let k = codes.len();
        let flat: Vec<f32> = codes.into_iter().flatten().collect();
        var.set(&Tensor::from_vec(flat, (k, d), var.device())?.to_dtype(var.dtype())?)?;
        self.opt.reset_rows(NAME, &dead)?;
        Ok(dead.len())
    }

    /// The training forward pass at `step`; `draw` tells the Gumbel noise of this pass apart from
    /// the other pass of the same step. An EMA codebook is moved by the latents it saw.
    /// (An associated function over the fields it reads, so that it can run while the loss is
    /// borrowed mutably.)
    fn forward_train(
        model: &VqModel,
        varmap: &VarMap,
        temperature: Option<WarmUpCosine>,
        seed: u64,
        x: &Tensor,
        step: u64,
        draw: u64,
    ) -> Result<crate::first_stage::TrainForward> {
        let gumbel = temperature.map(|t| {
            use rand::Rng;
            (
                t.at(step),
                step_rng(seed, step, 0x6e6f_6973 + draw).random::<u64>(),
            )
        });
        let out = model.forward_train_with(x, gumbel)?;
        if let Quantizer::Ema(q) = model.quantizer() {
            // nothing in the graph reads the codebook's values, so it can move before backward
            let u = q.ema_update(&out.prequant)?;
            let data = varmap
                .data()
                .lock()
                .map_err(|_| Error::invalid("variable map poisoned"))?;
            for (name, value) in [
                ("quantize.embedding.weight", &u.weight),
                ("quantize.embedding.cluster_size", &u.cluster_size),
                ("quantize.embedding.embed_avg", &u.embed_avg),
            ] {
                let var = data
                    .get(name)
                    .ok_or_else(|| Error::invalid(format!("EMAVQ without `{name}`")))?;
                var.set(value)?;
            }
        }
        Ok(out)
    }

    pub fn model(&self) -> &VqModel {
        &self.model
    }

    fn input(&self, batch: &Batch) -> Result<Tensor> {
        batch.get(&self.image_key).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "the batch has no `{}` (it has {:?}); set model.params.image_key to match the dataset",
                self.image_key,
                batch.keys().collect::<Vec<_>>()
            ))
        })
    }

    /// Shows a batch as RGB: segmentation one-hots through the model's colorize projection.
    fn shown(&self, x: &Tensor) -> Result<Tensor> {
        if self.model.kind() == VqModelKind::Segmentation {
            self.model.to_rgb(x)
        } else {
            Ok(x.clone())
        }
    }
}

fn put(m: &mut BTreeMap<String, f64>, prefix: &str, logs: &[(String, f32)]) {
    for (k, v) in logs {
        m.insert(format!("{prefix}{k}"), *v as f64);
    }
}

impl Trainer for VqganTrainer {
    fn metric_names(&self) -> Vec<String> {
        let mut v: Vec<&str> = match &self.objective {
            Objective::Gan { .. } => vec![
                "train/aeloss",
                "train/rec_loss",
                "train/p_loss",
                "train/nll_loss",
                "train/quant_loss",
                "train/g_loss",
                "train/d_weight",
                "train/disc_factor",
                "train/discloss",
                "train/logits_real",
                "train/logits_fake",
            ],
            Objective::Bce(_) => vec!["train/total_loss", "train/bce_loss", "train/quant_loss"],
        };
        v.extend(["train/perplexity", "train/codes_used", "lr"]);
        if self.temperature.is_some() {
            v.push("temperature");
        }
        if self.restart_every > 0 {
            v.push("train/codes_restarted");
        }
        v.into_iter().map(String::from).collect()
    }

    fn step(&mut self, batch: &Batch, state: &TrainState) -> Result<BTreeMap<String, f64>> {
        let x = self.input(batch)?;
        let step = state.global_step;
        let mut m = BTreeMap::new();
        let mode = crate::nn::training_mode();
        let out = Self::forward_train(
            &self.model,
            &self.varmap,
            self.temperature,
            self.seed,
            &x,
            step,
            0,
        )?;
        let (ppl, used) = codebook_usage(&out.indices, self.n_embed)?;
        match &mut self.objective {
            Objective::Gan { loss, opt, .. } => {
                let last = LastLayer {
                    input: &out.last_layer_input,
                    conv: self.model.decoder().conv_out(),
                };
                let gen = loss.generator_step(
                    &x,
                    &out.reconstruction,
                    &out.qloss,
                    step,
                    Some(last),
                    None,
                )?;
                let grads = gen.total.backward()?;
                self.opt.step(&grads)?;
                for (k, v) in gen
                    .logs
                    .iter()
                    .filter(|(k, _)| k != "total_loss_terms_magnitude")
                {
                    let name = if k == "total_loss" {
                        "aeloss".to_string()
                    } else {
                        k.clone()
                    };
                    m.insert(format!("train/{name}"), *v as f64);
                }
                // optimizer_idx 1: the reference runs the model again with the updated weights
                // (in training mode: a new Gumbel draw, another EMA update)
                let xrec = match (&self.temperature, self.model.quantizer()) {
                    (None, Quantizer::Vq(_)) => {
                        drop(mode);
                        self.model.forward(&x)?.0.detach()
                    }
                    _ => Self::forward_train(
                        &self.model,
                        &self.varmap,
                        self.temperature,
                        self.seed,
                        &x,
                        step,
                        1,
                    )?
                    .reconstruction
                    .detach(),
                };
                let _mode = crate::nn::training_mode();
                let disc = loss.discriminator_step(&x, &xrec, step, None)?;
                let grads = disc.total.backward()?;
                opt.step(&grads)?;
                m.insert(
                    "train/discloss".into(),
                    disc.total.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
                );
                put(&mut m, "train/", &disc.logs);
                m.remove("train/disc_loss");
            }
            Objective::Bce(bce) => {
                let (l, logs) = bce.forward(&out.qloss, &x, &out.reconstruction)?;
                let grads = l.backward()?;
                self.opt.step(&grads)?;
                put(&mut m, "train/", &logs);
            }
        }
        if self.restart_every > 0 && (step + 1).is_multiple_of(self.restart_every) {
            let n = self.restart_unused_codes(&out.prequant, step)?;
            m.insert("train/codes_restarted".into(), n as f64);
        }
        m.insert("train/perplexity".into(), ppl);
        m.insert("train/codes_used".into(), used);
        m.insert("lr".into(), self.opt.learning_rate());
        if let Some(t) = &self.temperature {
            m.insert("temperature".into(), t.at(step));
        }
        Ok(m)
    }

    fn validation_names(&self) -> Vec<String> {
        [
            "val/rec_loss",
            "val/psnr",
            "val/perplexity",
            "val/codes_used",
        ]
        .map(String::from)
        .to_vec()
    }

    fn validate(&self, batch: &Batch) -> Result<BTreeMap<String, f64>> {
        let x = self.input(batch)?;
        let q = self.model.encode(&x)?;
        let xrec = self.model.decode(&q.quant)?.detach();
        let (ppl, used) = codebook_usage(&q.indices, self.n_embed)?;
        let mut m = BTreeMap::new();
        let rec = (&x - &xrec)?.abs()?.mean_all()?.to_scalar::<f32>()? as f64;
        m.insert("val/rec_loss".into(), rec);
        if self.model.kind() != VqModelKind::Segmentation {
            m.insert(
                "val/psnr".into(),
                crate::image_io::psnr(&x, &xrec.clamp(-1f32, 1f32)?)?,
            );
        }
        m.insert("val/perplexity".into(), ppl);
        m.insert("val/codes_used".into(), used);
        Ok(m)
    }

    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, v) in sorted_vars(&self.varmap) {
            out.insert(k, v.as_tensor().detach());
        }
        out.extend(self.opt.state_tensors(&optimizer_prefix(0))?);
        if let Objective::Gan { loss, opt, lpips } = &self.objective {
            for (k, v) in sorted_vars(loss.discriminator_varmap()) {
                out.insert(format!("loss.discriminator.{k}"), v.as_tensor().detach());
            }
            for (k, t) in loss.discriminator().extra_buffers()? {
                out.insert(format!("loss.discriminator.{k}"), t);
            }
            for (k, t) in lpips {
                out.insert(format!("loss.perceptual_loss.{k}"), t.clone());
            }
            out.extend(opt.state_tensors(&optimizer_prefix(1))?);
        }
        Ok(out)
    }

    fn load_state(&mut self, sd: &StateDict) -> Result<()> {
        let set_all = |map: &VarMap, prefix: &str| -> Result<()> {
            for (k, v) in sorted_vars(map) {
                let key = format!("{prefix}{k}");
                let t = sd.get(&key).ok_or_else(|| Error::MissingTensor {
                    source_name: sd.source().display().to_string(),
                    key: key.clone(),
                    expected: v.dims().to_vec(),
                })?;
                if t.dims() != v.dims() {
                    return Err(Error::ShapeMismatch {
                        source_name: sd.source().display().to_string(),
                        key,
                        found: t.dims().to_vec(),
                        expected: v.dims().to_vec(),
                    });
                }
                v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
            }
            Ok(())
        };
        set_all(&self.varmap, "")?;
        self.opt.load_state(sd.tensors(), &optimizer_prefix(0))?;
        if let Objective::Gan { loss, opt, .. } = &mut self.objective {
            set_all(loss.discriminator_varmap(), "loss.discriminator.")?;
            let tracked = sd
                .tensors()
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("loss.discriminator.") && k.ends_with(".num_batches_tracked")
                })
                .filter_map(|(_, t)| {
                    t.to_dtype(DType::I64)
                        .ok()?
                        .flatten_all()
                        .ok()?
                        .max(0)
                        .ok()?
                        .to_scalar::<i64>()
                        .ok()
                })
                .max()
                .unwrap_or(0);
            loss.discriminator()
                .set_num_batches_tracked(tracked.max(0) as u64);
            opt.load_state(sd.tensors(), &optimizer_prefix(1))?;
        }
        Ok(())
    }

    fn log_images(&self, batch: &Batch, _state: &TrainState) -> Result<Vec<(String, RgbImage)>> {
        let x = self.input(batch)?;
        let n = x.dim(0)?.min(self.max_images.max(1));
        let x = x.narrow(0, 0, n)?;
        let (xrec, _) = self.model.forward(&x)?;
        let xrec = xrec.detach();
        let xrec = if self.model.kind() == VqModelKind::Segmentation {
            // the reference shows the argmax labels, one-hot again
            let c = xrec.dim(1)?;
            let idx = xrec.argmax_keepdim(1)?; // (B, 1, H, W)
            let ar = Tensor::arange(0u32, c as u32, xrec.device())?.reshape((1, c, 1, 1))?;
            idx.broadcast_eq(&ar)?.to_dtype(DType::F32)?
        } else {
            xrec
        };
        // one projection for both so their colours agree
        let both = self.shown(&Tensor::cat(&[&x, &xrec], 0)?)?;
        Ok(vec![
            (
                "inputs".into(),
                crate::image_io::grid(&both.narrow(0, 0, n)?, n)?,
            ),
            (
                "reconstructions".into(),
                crate::image_io::grid(&both.narrow(0, n, n)?, n)?,
            ),
        ])
    }
}
