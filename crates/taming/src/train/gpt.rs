//! Training the transformer of a `Net2NetTransformer`, first and conditioning stages frozen.
//!
//! Mirrors `taming/models/cond_transformer.py`: `forward` with `pkeep` token corruption (each
//! image token is kept with probability `pkeep`, else replaced by a random token of the vocabulary,
//! while the target stays the true token), `shared_step` (cross-entropy of the logits of every image
//! token), `configure_optimizers` (AdamW, betas (0.9, 0.95), weight decay 0.01 on Linear weights
//! only, none on biases, LayerNorm and embedding weights and `pos_emb`) and `log_images`
//! (inputs, reconstructions, conditioning, half / no-pixel / greedy samples).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use image::RgbImage;
use rand::Rng;

use super::init::{reinit_gpt, sorted_vars};
use super::optim::{Adam, AdamConfig};
use super::run::{optimizer_prefix, TrainState};
use super::{step_rng, Batch, Trainer};
use crate::checkpoint::StateDict;
use crate::cond_stage::CondStage;
use crate::cond_transformer::Net2NetTransformer;
use crate::config::{CondStageConfig, Net2NetConfig, VqModelConfig};
use crate::first_stage::VqModel;
use crate::permuter::Permuter;
use crate::sampling::{sample_sequence, Control, SamplingOptions};
use crate::transformer::Gpt;
use crate::{Error, Result};

/// A frozen VQ model and the state dict it came from (re-saved into the run's checkpoints so that
/// they are self-contained).
struct Frozen {
    model: VqModel,
    weights: StateDict,
}

fn load_frozen(cfg: &VqModelConfig, what: &str, device: &Device) -> Result<Frozen> {
    let path = cfg.ckpt_path.as_deref().ok_or_else(|| {
        Error::invalid(format!(
            "the {what} must be trained first: set model.params.{what}_config.params.ckpt_path to its \
             checkpoint (e.g. logs/<run>/checkpoints/last.safetensors)"
        ))
    })?;
    let sd = StateDict::load(Path::new(path))?;
    let strip = stage_prefix(&sd, what);
    if let Some(p) = &strip {
        tracing::info!("{what}: taking the {p}* tensors of {path}");
    }
    // a taming-rs training checkpoint holds optimizer states and the loss networks too
    let keep: BTreeMap<String, Tensor> = sd
        .tensors()
        .iter()
        .filter_map(|(k, t)| match &strip {
            Some(p) => k.strip_prefix(p.as_str()).map(|k| (k, t)),
            None => Some((k.as_str(), t)),
        })
        .filter(|(k, _)| {
            !k.starts_with("optimizer_states.")
                && !k.starts_with("loss.")
                && !cfg.ignore_keys.iter().any(|ik| k.starts_with(ik.as_str()))
        })
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    let weights = StateDict::from_tensors(keep, sd.source());
    let (model, report) = crate::model::load_vq(cfg, &weights, DType::F32, device)?;
    if !report.unexpected.is_empty() {
        tracing::warn!(
            "{what}: {} unused tensors in {path}",
            report.unexpected.len()
        );
    }
    Ok(Frozen { model, weights })
}

/// The prefix under which `sd` holds the `what` stage when `sd` is a whole Net2NetTransformer
/// (a transformer run's checkpoint, a converted model such as the built-in one) rather than a VQ
/// model's own checkpoint: `first_stage_model.` / `cond_stage_model.`. `None` when the VQ model's
/// tensors are at the top level (then the file is used as it is).
fn stage_prefix(sd: &StateDict, what: &str) -> Option<String> {
    let top_level = sd.tensors().keys().any(|k| k.starts_with("encoder."));
    let prefix = format!("{what}_model.");
    let nested = sd.tensors().keys().any(|k| k.starts_with(&prefix));
    (!top_level && nested).then_some(prefix)
}

/// Transformer training state.
pub struct GptTrainer {
    model: Net2NetTransformer,
    varmap: VarMap,
    opt: Adam,
    first: StateDict,
    cond: Option<StateDict>,
    seed: u64,
    max_images: usize,
}

impl GptTrainer {
    /// Builds the model: frozen stages from their `ckpt_path`, the GPT fresh (seeded, the
    /// reference's init) or from `init` (a checkpoint holding `transformer.*`). `lr` is the
    /// effective learning rate (base x batch x accumulation).
    pub fn new(
        cfg: &Net2NetConfig,
        init: Option<&StateDict>,
        lr: f64,
        seed: u64,
        max_images: usize,
        device: &Device,
    ) -> Result<Self> {
        if cfg.transformer.embd_pdrop > 0.0
            || cfg.transformer.resid_pdrop > 0.0
            || cfg.transformer.attn_pdrop > 0.0
        {
            tracing::warn!(
                "dropout in transformer_config is not implemented in training; it is treated as 0"
            );
        }
        let first = load_frozen(&cfg.first_stage, "first_stage", device)?;
        let (cond_stage, cond_weights) = match &cfg.cond_stage {
            _ if cfg.unconditional => (
                CondStage::Sos {
                    token: cfg.sos_token,
                },
                None,
            ),
            CondStageConfig::FirstStage => (CondStage::FirstStage, None),
            CondStageConfig::Unconditional => (
                CondStage::Sos {
                    token: cfg.sos_token,
                },
                None,
            ),
            CondStageConfig::Sos { sos_token } => (CondStage::Sos { token: *sos_token }, None),
            CondStageConfig::Vq(c) => {
                let f = load_frozen(c, "cond_stage", device)?;
                (CondStage::Vq(Box::new(f.model)), Some(f.weights))
            }
            CondStageConfig::Labelator { n_classes } => (
                CondStage::Labelator {
                    n_classes: *n_classes,
                },
                None,
            ),
            CondStageConfig::Coord {
                n_embed,
                down_factor,
            } => (
                CondStage::Coord {
                    n_embed: *n_embed,
                    down_factor: *down_factor,
                },
                None,
            ),
        };
        let varmap = VarMap::new();
        if let Some(sd) = init {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::invalid("variable map poisoned"))?;
            for (k, t) in sd.tensors() {
                if let Some(local) = k.strip_prefix("transformer.") {
                    if local.ends_with(".attn.mask") {
                        continue;
                    }
                    let t = t.to_dtype(DType::F32)?.to_device(device)?;
                    data.insert(local.to_string(), candle_core::Var::from_tensor(&t)?);
                }
            }
        }
        let had_init = init.is_some();
        let n_before = varmap.all_vars().len();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let gpt = Gpt::new(&cfg.transformer, vb)?;
        if had_init {
            if varmap.all_vars().len() != n_before {
                return Err(Error::invalid(
                    "the initial checkpoint lacks some transformer.* tensors the config's GPT needs",
                ));
            }
        } else {
            reinit_gpt(&varmap, seed, "")?;
        }
        let permuter = Permuter::from_config(&cfg.permuter)?;
        let model = Net2NetTransformer::from_parts(cfg, first.model, cond_stage, permuter, gpt);
        // weight decay on Linear weights only (mingpt's configure_optimizers)
        let params = sorted_vars(&varmap)
            .into_iter()
            .map(|(name, var)| {
                let linear_weight = name.ends_with(".weight")
                    && (name.contains(".attn.") || name.contains(".mlp.") || name == "head.weight");
                let wd = if linear_weight { 0.01 } else { 0.0 };
                (name, var, wd)
            })
            .collect();
        let opt = Adam::new(params, AdamConfig::adamw(lr, 0.9, 0.95))?;
        Ok(Self {
            model,
            varmap,
            opt,
            first: first.weights,
            cond: cond_weights,
            seed,
            max_images,
        })
    }

    pub fn model(&self) -> &Net2NetTransformer {
        &self.model
    }

    fn inputs(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let cfg = self.model.config();
        let get = |k: &str| {
            batch.get(k).cloned().ok_or_else(|| {
                Error::invalid(format!(
                    "the batch has no `{k}` (it has {:?}); set first_stage_key / cond_stage_key to match the dataset",
                    batch.keys().collect::<Vec<_>>()
                ))
            })
        };
        let x = get(&cfg.first_stage_key)?;
        let c = match self.model.cond_stage() {
            CondStage::Sos { .. } => x.clone(),
            _ => get(&cfg.cond_stage_key)?,
        };
        Ok((x, c))
    }

    /// Condition tokens and true image tokens of a batch.
    fn tokens(&self, batch: &Batch) -> Result<(Tensor, Tensor, (usize, usize))> {
        let (x, c) = self.inputs(batch)?;
        let z = self.model.encode_to_z(&x)?;
        let ct = self.model.encode_to_c(&c)?;
        Ok((ct.indices, z.indices, z.grid))
    }

    /// `pkeep` corruption: keep each token with probability `pkeep`, else a random token.
    fn corrupt(&self, z: &Tensor, step: u64) -> Result<Tensor> {
        let pkeep = self.model.config().pkeep;
        if pkeep >= 1.0 {
            return Ok(z.clone());
        }
        let mut rng = step_rng(self.seed, step, 1);
        let vocab = self.model.gpt().vocab_size() as u32;
        let (b, n) = z.dims2()?;
        let v = z.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        let out: Vec<u32> = v
            .into_iter()
            .map(|t| {
                let keep = rng.random::<f64>() < pkeep;
                let r = rng.random_range(0..vocab);
                if keep {
                    t
                } else {
                    r
                }
            })
            .collect();
        Ok(Tensor::from_vec(out, (b, n), z.device())?)
    }

    fn loss(&self, c: &Tensor, a: &Tensor, target: &Tensor) -> Result<Tensor> {
        let logits = self.model.logits(c, a)?; // (B, n, V)
        Net2NetTransformer::cross_entropy(&logits, target)
    }
}

impl Trainer for GptTrainer {
    fn metric_names(&self) -> Vec<String> {
        ["train/loss", "lr", "grad_norm"].map(String::from).to_vec()
    }

    fn step(&mut self, batch: &Batch, state: &TrainState) -> Result<BTreeMap<String, f64>> {
        let (c, z, _) = self.tokens(batch)?;
        let a = self.corrupt(&z, state.global_step)?;
        let _mode = crate::nn::training_mode();
        let loss = self.loss(&c, &a, &z)?;
        let grads = loss.backward()?;
        let gn = self.opt.grad_norm(&grads)?;
        self.opt.step(&grads)?;
        let mut m = BTreeMap::new();
        m.insert("train/loss".into(), loss.to_scalar::<f32>()? as f64);
        m.insert("lr".into(), self.opt.learning_rate());
        m.insert("grad_norm".into(), gn);
        Ok(m)
    }

    fn validation_names(&self) -> Vec<String> {
        vec!["val/loss".into()]
    }

    fn validate(&self, batch: &Batch) -> Result<BTreeMap<String, f64>> {
        let (c, z, _) = self.tokens(batch)?;
        let loss = self.loss(&c, &z, &z)?.detach();
        let mut m = BTreeMap::new();
        m.insert("val/loss".into(), loss.to_scalar::<f32>()? as f64);
        Ok(m)
    }

    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, t) in self.first.tensors() {
            out.insert(format!("first_stage_model.{k}"), t.clone());
        }
        if let Some(cond) = &self.cond {
            for (k, t) in cond.tensors() {
                out.insert(format!("cond_stage_model.{k}"), t.clone());
            }
        }
        for (k, v) in sorted_vars(&self.varmap) {
            out.insert(format!("transformer.{k}"), v.as_tensor().detach());
        }
        out.extend(self.opt.state_tensors(&optimizer_prefix(0))?);
        Ok(out)
    }

    fn load_state(&mut self, sd: &StateDict) -> Result<()> {
        for (k, v) in sorted_vars(&self.varmap) {
            let key = format!("transformer.{k}");
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
        self.opt.load_state(sd.tensors(), &optimizer_prefix(0))
    }

    fn log_images(&self, batch: &Batch, state: &TrainState) -> Result<Vec<(String, RgbImage)>> {
        let (x, c) = self.inputs(batch)?;
        let n = x.dim(0)?.min(self.max_images.max(1));
        let x = x.narrow(0, 0, n)?;
        let c = c.narrow(0, 0, n)?;
        let z = self.model.encode_to_z(&x)?;
        let ct = self.model.encode_to_c(&c)?;
        let grid = z.grid;
        let total = grid.0 * grid.1;
        let mut out = vec![
            ("inputs".to_string(), crate::image_io::grid(&x, n)?),
            (
                "reconstructions".to_string(),
                crate::image_io::grid(&self.model.decode_to_img(&z.indices, grid)?, n)?,
            ),
        ];
        if let Some(vq) = self.model.cond_vq() {
            let shown = if vq.kind() == crate::first_stage::VqModelKind::Segmentation {
                vq.to_rgb(&c)?
            } else {
                c.clone()
            };
            out.push((
                "conditioning".to_string(),
                crate::image_io::grid(&shown, n)?,
            ));
        }
        let gpt = self.model.gpt();
        let mut go_on = |_: &crate::sampling::Progress| Control::Continue;
        let top_k = SamplingOptions {
            top_k: Some(100),
            seed: self.seed ^ state.global_step,
            ..Default::default()
        };
        let greedy = SamplingOptions {
            greedy: true,
            ..Default::default()
        };
        let half = total / 2;
        let prefix = z.indices.narrow(1, 0, half)?;
        let empty = z.indices.narrow(1, 0, 0)?;
        for (name, prefix, steps, opts) in [
            ("samples_half", &prefix, total - half, &top_k),
            ("samples_nopix", &empty, total, &top_k),
            ("samples_det", &empty, total, &greedy),
        ] {
            let s = sample_sequence(gpt, &ct.indices, prefix, steps, opts, None, &mut go_on)?;
            let img = self.model.decode_to_img(&s.indices.detach(), grid)?;
            out.push((name.to_string(), crate::image_io::grid(&img, n)?));
        }
        Ok(out)
    }
}
