//! `Net2NetTransformer`: first stage + conditioning stage + GPT over their shared vocabulary.
//!
//! Mirrors `taming/models/cond_transformer.py`: `encode_to_z` (first-stage indices, permuted),
//! `encode_to_c` (condition tokens, after the optional nearest-neighbour `downsample_cond_size`
//! resize), `forward` (logits for every image token given the condition and the previous image
//! tokens), and `decode_to_img` (un-permute, codebook lookup, decode). Sampling lives in
//! [`crate::sampling`]. The packaged `encode_to_c` leaves a VQ stage's indices flat; here they
//! always have the intended `(batch, tokens)` shape.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::StateDict;
use crate::cond_stage::{CondStage, CondTokens};
use crate::config::{CondStageConfig, Net2NetConfig};
use crate::first_stage::VqModel;
use crate::model::LoadReport;
use crate::permuter::Permuter;
use crate::transformer::Gpt;
use crate::{Error, Result};

/// Image tokens of a first-stage encoding.
#[derive(Debug, Clone)]
pub struct ImageTokens {
    /// (B, h*w) u32, in the transformer's (permuted) order.
    pub indices: Tensor,
    /// Latent grid (h, w).
    pub grid: (usize, usize),
}

/// The two-stage model.
#[derive(Debug, Clone)]
pub struct Net2NetTransformer {
    first_stage: VqModel,
    cond_stage: CondStage,
    permuter: Permuter,
    gpt: Gpt,
    cfg: Net2NetConfig,
}

/// Key suffixes that inference does not read: the reference registers the attention masks as buffers.
const RECOMPUTED_SUFFIXES: &[&str] = &[".attn.mask"];

impl Net2NetTransformer {
    /// Builds the model from its config and a checkpoint holding `first_stage_model.*`,
    /// `cond_stage_model.*` (for VQ cond stages) and `transformer.*`. The GPT's weights are read
    /// in `gpt_dtype` (float32, or float16/bfloat16 for faster, approximate sampling); the first
    /// and conditioning stages stay float32.
    pub fn load(
        cfg: &Net2NetConfig,
        sd: &StateDict,
        gpt_dtype: DType,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let (vb, usage) = sd.var_builder(DType::F32, device);
        let first_stage = VqModel::new(&cfg.first_stage, vb.pp("first_stage_model"))?;
        let mut ignored = vec![
            "first_stage_model.loss.",
            "cond_stage_model.loss.",
            "permuter.",
            "optimizer_states.",
        ];
        let cond_stage = match &cfg.cond_stage {
            CondStageConfig::FirstStage => {
                // the reference registers the same module twice: cond_stage_model.* duplicates first_stage_model.*
                ignored.push("cond_stage_model.");
                CondStage::FirstStage
            }
            CondStageConfig::Unconditional => CondStage::Sos {
                token: cfg.sos_token,
            },
            CondStageConfig::Sos { sos_token } => CondStage::Sos { token: *sos_token },
            CondStageConfig::Vq(c) => {
                CondStage::Vq(Box::new(VqModel::new(c, vb.pp("cond_stage_model"))?))
            }
            CondStageConfig::Labelator { n_classes } => CondStage::Labelator {
                n_classes: *n_classes,
            },
            CondStageConfig::Coord {
                n_embed,
                down_factor,
            } => CondStage::Coord {
                n_embed: *n_embed,
                down_factor: *down_factor,
            },
        };
        let cond_stage = if cfg.unconditional {
            CondStage::Sos {
                token: cfg.sos_token,
            }
        } else {
            cond_stage
        };
        let (gvb, gusage) = sd.var_builder(gpt_dtype, device);
        let gpt = Gpt::new(&cfg.transformer, gvb.pp("transformer"))?;
        let permuter = match (
            sd.get("permuter.forward_shuffle_idx"),
            sd.get("permuter.backward_shuffle_idx"),
        ) {
            (Some(f), Some(b)) => Permuter::from_indices(
                f.to_dtype(DType::I64)?
                    .to_vec1::<i64>()?
                    .into_iter()
                    .map(|v| v as u32)
                    .collect(),
                b.to_dtype(DType::I64)?
                    .to_vec1::<i64>()?
                    .into_iter()
                    .map(|v| v as u32)
                    .collect(),
            )?,
            _ => Permuter::from_config(&cfg.permuter)?,
        };
        // merge the two usage records: a key counts as read if either builder read it
        let mut report = crate::model::report(sd, &usage, &ignored);
        let gpt_used = gusage.used();
        report.used += gpt_used.len();
        report.unexpected.retain(|k| !gpt_used.contains(k));
        let (recomputed, unexpected): (Vec<String>, Vec<String>) = report
            .unexpected
            .into_iter()
            .partition(|k| RECOMPUTED_SUFFIXES.iter().any(|s| k.ends_with(s)));
        report.unexpected = unexpected;
        report.skipped.extend(recomputed);
        Ok((
            Self {
                first_stage,
                cond_stage,
                permuter,
                gpt,
                cfg: cfg.clone(),
            },
            report,
        ))
    }

    /// Assembles a model from parts built elsewhere (training builds the GPT on trainable
    /// variables and the frozen stages from their own checkpoints).
    pub fn from_parts(
        cfg: &Net2NetConfig,
        first_stage: VqModel,
        cond_stage: CondStage,
        permuter: Permuter,
        gpt: Gpt,
    ) -> Self {
        Self {
            first_stage,
            cond_stage,
            permuter,
            gpt,
            cfg: cfg.clone(),
        }
    }

    pub fn first_stage(&self) -> &VqModel {
        &self.first_stage
    }
    pub fn cond_stage(&self) -> &CondStage {
        &self.cond_stage
    }
    pub fn gpt(&self) -> &Gpt {
        &self.gpt
    }
    pub fn permuter(&self) -> &Permuter {
        &self.permuter
    }
    pub fn config(&self) -> &Net2NetConfig {
        &self.cfg
    }

    /// The VQ model of the conditioning stage (its own, or the first stage), if it has one.
    pub fn cond_vq(&self) -> Option<&VqModel> {
        match &self.cond_stage {
            CondStage::Vq(m) => Some(m),
            CondStage::FirstStage => Some(&self.first_stage),
            _ => None,
        }
    }

    /// The latent grid the model was trained on (the first stage's `resolution` / f), the window
    /// of the sliding sampler.
    pub fn training_grid(&self) -> (usize, usize) {
        let dd = &self.cfg.first_stage.ddconfig;
        let side = dd.resolution / self.first_stage.downsample_factor();
        (side, side)
    }

    /// `encode_to_z`: image (B, C, H, W) -> permuted indices.
    pub fn encode_to_z(&self, x: &Tensor) -> Result<ImageTokens> {
        let q = self.first_stage.encode(x)?;
        Ok(ImageTokens {
            indices: self.permuter.apply(&q.indices)?,
            grid: q.grid,
        })
    }

    /// `encode_to_c`: condition -> tokens (resized first when `downsample_cond_size` > -1).
    pub fn encode_to_c(&self, c: &Tensor) -> Result<CondTokens> {
        let c = if self.cfg.downsample_cond_size > -1 && c.rank() == 4 {
            let s = self.cfg.downsample_cond_size as usize;
            c.upsample_nearest2d(s, s)? // F.interpolate(size=(s, s)), mode "nearest"
        } else {
            c.clone()
        };
        self.cond_stage.encode(&c, &self.first_stage)
    }

    /// Logits over image tokens given condition tokens (B, nc) and image tokens (B, n) (teacher
    /// forcing): (B, n, vocab); row i predicts image token i.
    pub fn logits(&self, c_indices: &Tensor, z_indices: &Tensor) -> Result<Tensor> {
        let nc = c_indices.dim(1)?;
        let n = z_indices.dim(1)?;
        let cz = Tensor::cat(
            &[
                &c_indices.to_dtype(DType::U32)?,
                &z_indices.to_dtype(DType::U32)?,
            ],
            1,
        )?; // (B, nc+n)
        let input = cz.narrow(1, 0, nc + n - 1)?; // (B, nc+n-1)
        let logits = self.gpt.forward(&input, None)?; // (B, nc+n-1, V)
        Ok(logits.narrow(1, nc - 1, n)?) // (B, n, V)
    }

    /// `forward(x, c)` in eval mode: (logits (B, n, vocab), target z indices (B, n)).
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = self.encode_to_z(x)?;
        let ct = self.encode_to_c(c)?;
        Ok((self.logits(&ct.indices, &z.indices)?, z.indices))
    }

    /// Mean cross-entropy of logits (B, n, V) against targets (B, n).
    pub fn cross_entropy(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
        let (b, n, v) = logits.dims3()?;
        let l = logits.reshape((b * n, v))?;
        let t = target.reshape(b * n)?.to_dtype(DType::U32)?;
        Ok(candle_nn::loss::cross_entropy(&l, &t)?)
    }

    /// `decode_to_img`: permuted indices (B, h*w) -> image (B, C, h*f, w*f).
    pub fn decode_to_img(&self, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        if indices.dim(1)? != grid.0 * grid.1 {
            return Err(Error::invalid(format!(
                "{} tokens do not fill a {}x{} latent grid",
                indices.dim(1)?,
                grid.0,
                grid.1
            )));
        }
        let raster = self.permuter.reverse(indices)?;
        self.first_stage.decode_indices(&raster, grid)
    }
}
