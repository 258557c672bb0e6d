//! Sampling tasks end to end: condition in, images out.
//!
//! Mirrors what the reference's `scripts/sample_conditional.py`, `scripts/make_samples.py` and
//! `scripts/sample_fast.py` do around `Net2NetTransformer`: encode the condition, choose between
//! the cached sampler (images of the training size or smaller) and the sliding window (larger
//! images), optionally keep part of an image's tokens (image completion), and decode. Shared by
//! the CLI's `taming sample` and the web demo.

use candle_core::{DType, Tensor};

use crate::cond_stage::CondStage;
use crate::cond_transformer::Net2NetTransformer;
use crate::sampling::{
    sample_sequence, sample_sliding, Control, Progress, SamplingOptions, SlidingCond,
};
use crate::{Error, Result};

/// The condition of a sample.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Unconditional models.
    None,
    /// Class-conditional models (`Labelator`).
    Class(usize),
    /// A spatial condition (1, C, H, W) of the output's size: one-hot labels, a depth map, a
    /// low-resolution image resized to the output size, or a coordinate map.
    Spatial(Tensor),
}

/// Which latent positions of an image to keep when completing it.
#[derive(Debug, Clone, PartialEq)]
pub enum Keep {
    /// The upper half of the latent rows.
    TopHalf,
    /// The first `n` latent rows.
    Rows(usize),
    /// A per-position mask over the latent grid (true = keep), raster order.
    Mask(Vec<bool>),
}

impl Keep {
    /// The raster mask over an (h, w) grid.
    pub fn mask(&self, grid: (usize, usize)) -> Result<Vec<bool>> {
        let (h, w) = grid;
        Ok(match self {
            Keep::TopHalf => (0..h * w).map(|p| p / w < h / 2).collect(),
            Keep::Rows(n) => {
                if *n > h {
                    return Err(Error::invalid(format!(
                        "cannot keep {n} latent rows of a {h}-row grid"
                    )));
                }
                (0..h * w).map(|p| p / w < *n).collect()
            }
            Keep::Mask(m) => {
                if m.len() != h * w {
                    return Err(Error::invalid(format!(
                        "the keep mask covers {} positions, the latent grid {h}x{w} has {}",
                        m.len(),
                        h * w
                    )));
                }
                m.clone()
            }
        })
    }
}

/// What to sample.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub condition: Condition,
    /// Output size in pixels (H, W), divisible by the first stage's factor.
    pub size: (usize, usize),
    /// Image completion: an image (1, C, H, W) of the output size and the part to keep.
    pub complete: Option<(Tensor, Keep)>,
    /// Number of samples.
    pub batch: usize,
    pub options: SamplingOptions,
}

/// Sampled images and tokens.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    /// (B, C, H, W) in [-1, 1]; None when cancelled.
    pub images: Option<Tensor>,
    /// (B, h*w) u32 tokens in raster order.
    pub tokens: Tensor,
    pub grid: (usize, usize),
    pub cancelled: bool,
    /// Whether the sliding window was used.
    pub sliding: bool,
}

/// Progress as the pipeline reports it: the tokens so far in raster order (not yet sampled
/// positions hold 0 or the completed image's tokens), for partial decodes.
pub struct PipelineProgress<'a> {
    pub done: usize,
    pub total: usize,
    pub grid: (usize, usize),
    /// (B, h*w) rows in raster order.
    pub raster: &'a [Vec<u32>],
}

/// Checks a request against the model and returns the latent grid.
pub fn latent_grid(model: &Net2NetTransformer, size: (usize, usize)) -> Result<(usize, usize)> {
    let f = model.first_stage().downsample_factor();
    if size.0 == 0 || size.1 == 0 || !size.0.is_multiple_of(f) || !size.1.is_multiple_of(f) {
        return Err(Error::invalid(format!(
            "image size {}x{} (HxW) is not divisible by the first stage's downsampling factor {f}",
            size.0, size.1
        )));
    }
    Ok((size.0 / f, size.1 / f))
}

fn condition_tokens(
    model: &Net2NetTransformer,
    req: &SampleRequest,
) -> Result<crate::cond_stage::CondTokens> {
    let device = model.first_stage().quant_conv().weight().device().clone();
    let b = req.batch;
    let c = match (&req.condition, model.cond_stage()) {
        (Condition::None, CondStage::Sos { .. }) => Tensor::zeros((b, 1), DType::F32, &device)?,
        (Condition::Class(k), CondStage::Labelator { .. }) => {
            Tensor::from_vec(vec![*k as i64; b], b, &device)?
        }
        (Condition::Spatial(t), s) if s.is_spatial() => {
            let (_, _, h, w) = t.dims4()?;
            if (h, w) != req.size {
                return Err(Error::invalid(format!(
                    "the condition is {h}x{w}, the requested image {}x{}; resize it first",
                    req.size.0, req.size.1
                )));
            }
            t.repeat((b, 1, 1, 1))?
        }
        (given, stage) => {
            let what = match given {
                Condition::None => "no condition".to_string(),
                Condition::Class(k) => format!("class {k}"),
                Condition::Spatial(t) => format!("a {}-channel map", t.dim(1).unwrap_or(0)),
            };
            return Err(Error::invalid(format!(
                "this model's conditioning stage is {}, but {what} was given",
                stage.describe()
            )));
        }
    };
    model.encode_to_c(&c)
}

/// Samples `req.batch` images. `callback` sees progress and may cancel.
pub fn sample(
    model: &Net2NetTransformer,
    req: &SampleRequest,
    callback: &mut dyn FnMut(&PipelineProgress) -> Control,
) -> Result<SampleOutput> {
    if req.batch == 0 {
        return Err(Error::invalid("batch must be at least 1"));
    }
    let grid = latent_grid(model, req.size)?;
    let (h, w) = grid;
    let ct = condition_tokens(model, req)?;
    let b = req.batch;
    let device = ct.indices.device().clone();
    // tokens of the image to complete, raster order, and the keep mask
    let (source, keep) = match &req.complete {
        Some((img, keep)) => {
            let q = model.first_stage().encode(img)?;
            if q.grid != grid {
                return Err(Error::invalid(format!(
                    "the image to complete encodes to {}x{} tokens, the request needs {h}x{w}",
                    q.grid.0, q.grid.1
                )));
            }
            (Some(q.indices.repeat((b, 1))?), Some(keep.mask(grid)?))
        }
        None => (None, None),
    };
    let (th, tw) = model.training_grid();
    let gpt = model.gpt();
    let fits = ct.indices.dim(1)? + h * w - 1 <= gpt.block_size();
    let sliding = h > th || w > tw || !fits;
    if !sliding {
        let perm = model.permuter();
        // kept tokens in the transformer's order; a kept prefix becomes the prefill
        let (src_perm, keep_perm) = match (&source, &keep) {
            (Some(s), Some(k)) => {
                let sp = perm.apply(s)?;
                let order: Vec<usize> = match perm.forward_indices() {
                    Some(f) => f.iter().map(|&i| i as usize).collect(),
                    None => (0..h * w).collect(),
                };
                (Some(sp), order.iter().map(|&i| k[i]).collect::<Vec<_>>())
            }
            _ => (None, vec![false; h * w]),
        };
        let n_prefix = keep_perm.iter().take_while(|k| **k).count();
        let prefix = match &src_perm {
            Some(sp) if n_prefix > 0 => sp.narrow(1, 0, n_prefix)?,
            _ => Tensor::zeros((b, 0), DType::U32, &device)?,
        };
        let forced: Option<Vec<Option<Vec<u32>>>> = match &src_perm {
            Some(sp) => {
                let rows = sp.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                Some(
                    (n_prefix..h * w)
                        .map(|p| keep_perm[p].then(|| rows.iter().map(|r| r[p]).collect()))
                        .collect(),
                )
            }
            None => None,
        };
        let src_rows = source
            .as_ref()
            .map(|s| s.to_dtype(DType::U32)?.to_vec2::<u32>())
            .transpose()?;
        let mut raster = src_rows.unwrap_or_else(|| vec![vec![0u32; h * w]; b]);
        let order: Vec<usize> = match perm.forward_indices() {
            Some(f) => f.iter().map(|&i| i as usize).collect(),
            None => (0..h * w).collect(),
        };
        let total = h * w - n_prefix;
        let mut cb = |p: &Progress| {
            for (r, seq) in raster.iter_mut().zip(p.tokens) {
                for (k, &t) in seq.iter().enumerate() {
                    r[order[k]] = t;
                }
            }
            callback(&PipelineProgress {
                done: p.done,
                total,
                grid,
                raster: &raster,
            })
        };
        let s = sample_sequence(
            gpt,
            &ct.indices,
            &prefix,
            total,
            &req.options,
            forced.as_deref(),
            &mut cb,
        )?;
        let tokens = perm.reverse(&s.indices)?;
        let images = if s.cancelled {
            None
        } else {
            Some(model.first_stage().decode_indices(&tokens, grid)?)
        };
        return Ok(SampleOutput {
            images,
            tokens,
            grid,
            cancelled: s.cancelled,
            sliding: false,
        });
    }
    // sliding window
    if !model.permuter().is_identity() {
        return Err(Error::invalid(
            "images larger than the training size need the sliding window, which needs a model \
             trained with the identity permuter",
        ));
    }
    if h < th || w < tw {
        return Err(Error::invalid(format!(
            "the sliding window ({th}x{tw} tokens) needs a latent grid at least that large in both \
             directions, the request has {h}x{w}"
        )));
    }
    let cond = match ct.grid {
        Some(g) if g == grid => SlidingCond::Spatial(ct.indices.clone()),
        Some(g) => {
            return Err(Error::invalid(format!(
                "the condition encodes to a {}x{} grid, the image to {h}x{w}: the sliding window needs them equal",
                g.0, g.1
            )))
        }
        None => SlidingCond::Prefix(ct.indices.clone()),
    };
    let keep_arg = match (&source, &keep) {
        (Some(s), Some(k)) => Some((s, k.as_slice())),
        _ => None,
    };
    let mut cb = |p: &Progress| {
        callback(&PipelineProgress {
            done: p.done,
            total: p.total,
            grid,
            raster: p.tokens,
        })
    };
    let s = sample_sliding(gpt, &cond, grid, (th, tw), &req.options, keep_arg, &mut cb)?;
    let images = if s.cancelled {
        None
    } else {
        Some(model.first_stage().decode_indices(&s.indices, grid)?)
    };
    Ok(SampleOutput {
        images,
        tokens: s.indices,
        grid,
        cancelled: s.cancelled,
        sliding: true,
    })
}
