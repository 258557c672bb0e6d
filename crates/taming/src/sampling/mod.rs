//! Sampling image tokens from a [`Net2NetTransformer`](crate::cond_transformer::Net2NetTransformer).
//!
//! Mirrors `Net2NetTransformer.sample` of `taming/models/cond_transformer.py` (autoregressive
//! sampling with temperature and top-k; greedy with `sample=False`) and the sliding-window sampler
//! of `scripts/sample_conditional.py`, with these differences, each on purpose:
//! - the reference recomputes the whole sequence for every token; [`sample_sequence`] keeps a
//!   preallocated KV cache and computes one position per step (tested against the full pass);
//! - top-p (nucleus) filtering works with or without top-k (the reference only applies it with top-k);
//! - draws come from a seeded ChaCha generator, so the same seed gives the same image;
//! - [`sample_sliding`] only computes the logits that are read, and also serves unconditional and
//!   class-conditional models (the condition is then a prefix shared by every window).
//!
//! Progress is reported through a callback that can cancel; a cancelled run returns what it has
//! and says so, so callers never write a half-sampled image by mistake.

pub mod filter;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::transformer::Gpt;
use crate::{Error, Result};

/// How each token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    /// Logits are divided by this (> 0).
    pub temperature: f32,
    /// Keep only the k most likely tokens (ties with the k-th kept).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    pub top_p: Option<f32>,
    /// Take the most likely token instead of drawing (the reference's `sample=False`).
    pub greedy: bool,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            greedy: false,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(format!(
                "temperature must be a positive number, got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(format!("top-p must lie in (0, 1], got {p}")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top-k must be at least 1"));
        }
        Ok(())
    }
}

/// Picks tokens from logits rows according to [`SamplingOptions`], with its own seeded generator.
#[derive(Debug, Clone)]
pub struct TokenSampler {
    opts: SamplingOptions,
    rng: ChaCha8Rng,
}

impl TokenSampler {
    pub fn new(opts: &SamplingOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            opts: opts.clone(),
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
        })
    }

    /// One token per row of logits (B, V).
    pub fn pick(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        rows.into_iter().map(|r| Ok(self.pick_row(r))).collect()
    }

    /// One token from one row of logits.
    pub fn pick_row(&mut self, mut row: Vec<f32>) -> u32 {
        if self.opts.greedy {
            return filter::argmax(&row) as u32;
        }
        let t = self.opts.temperature;
        if t != 1.0 {
            row.iter_mut().for_each(|v| *v /= t);
        }
        if let Some(k) = self.opts.top_k {
            filter::top_k(&mut row, k);
        }
        if let Some(p) = self.opts.top_p {
            filter::top_p(&mut row, p);
        }
        filter::softmax_in_place(&mut row);
        let u: f32 = self.rng.random();
        filter::draw(&row, u) as u32
    }
}

/// What a progress callback sees after each sampled token.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Tokens sampled so far (not counting kept ones given in advance).
    pub done: usize,
    /// Tokens to sample in all.
    pub total: usize,
    /// The image tokens so far, (B, n_so_far) in the transformer's order (sliding: (B, H*W) raster,
    /// with not-yet-sampled positions holding 0).
    pub tokens: &'a [Vec<u32>],
}

/// Whether to go on after a progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// The result of sampling.
#[derive(Debug, Clone)]
pub struct Sampled {
    /// (B, n) u32 image tokens; when cancelled, positions not reached hold 0.
    pub indices: Tensor,
    /// Whether the callback cancelled the run.
    pub cancelled: bool,
}

fn tokens_tensor(rows: &[Vec<u32>], n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let b = rows.len();
    let mut flat = Vec::with_capacity(b * n);
    for r in rows {
        flat.extend(r.iter().copied().chain(std::iter::repeat(0)).take(n));
    }
    Ok(Tensor::from_vec(flat, (b, n), device)?)
}

/// Samples `steps` image tokens after the condition tokens `c` (B, nc) and the given image-token
/// prefix `prefix` (B, n0), with a KV cache: one prefill of `nc + n0` tokens, then one position per
/// step. `forced` optionally fixes tokens at some of the sampled positions (image completion with
/// a mask): `forced[k] = Some(tokens per sample)` keeps those instead of sampling at step k.
pub fn sample_sequence(
    gpt: &Gpt,
    c: &Tensor,
    prefix: &Tensor,
    steps: usize,
    opts: &SamplingOptions,
    forced: Option<&[Option<Vec<u32>>]>,
    callback: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Sampled> {
    let (b, nc) = c.dims2()?;
    let n0 = prefix.dim(1)?;
    let needed = nc + n0 + steps - usize::from(steps > 0);
    if needed > gpt.block_size() {
        return Err(Error::invalid(format!(
            "the transformer's block size {} is too small for {nc} condition tokens and {} image tokens \
             (needs {needed}); sample larger images with the sliding window",
            gpt.block_size(),
            n0 + steps
        )));
    }
    if nc + n0 == 0 {
        return Err(Error::invalid(
            "sampling needs at least one condition or prefix token",
        ));
    }
    let mut sampler = TokenSampler::new(opts)?;
    let mut rows: Vec<Vec<u32>> = if n0 == 0 {
        vec![Vec::with_capacity(steps); b]
    } else {
        prefix.to_dtype(DType::U32)?.to_vec2::<u32>()?
    };
    if steps == 0 {
        return Ok(Sampled {
            indices: tokens_tensor(&rows, n0, c.device())?,
            cancelled: false,
        });
    }
    let mut cache = gpt.new_cache_for(b, needed)?;
    let start = match (nc, n0) {
        (_, 0) => c.to_dtype(DType::U32)?,
        (0, _) => prefix.to_dtype(DType::U32)?,
        _ => Tensor::cat(
            &[&c.to_dtype(DType::U32)?, &prefix.to_dtype(DType::U32)?],
            1,
        )?,
    }; // (B, nc+n0)
    let mut logits = gpt.forward_cached(&start, &mut cache)?; // (B, V)
    for k in 0..steps {
        let next = match forced.and_then(|f| f.get(k)).and_then(|t| t.as_ref()) {
            Some(t) if t.len() == b => t.clone(),
            Some(t) => {
                return Err(Error::invalid(format!(
                    "forced tokens for step {k} cover {} samples, the batch has {b}",
                    t.len()
                )))
            }
            None => sampler.pick(&logits)?,
        };
        for (r, t) in rows.iter_mut().zip(&next) {
            r.push(*t);
        }
        let control = callback(&Progress {
            done: k + 1,
            total: steps,
            tokens: &rows,
        });
        if control == Control::Cancel {
            return Ok(Sampled {
                indices: tokens_tensor(&rows, n0 + steps, c.device())?,
                cancelled: true,
            });
        }
        if k + 1 < steps {
            let t = Tensor::from_vec(next, (b, 1), c.device())?;
            logits = gpt.forward_cached(&t, &mut cache)?;
        }
    }
    Ok(Sampled {
        indices: tokens_tensor(&rows, n0 + steps, c.device())?,
        cancelled: false,
    })
}

/// The condition of a sliding-window run.
#[derive(Debug, Clone)]
pub enum SlidingCond {
    /// Condition tokens on the same grid as the image tokens (B, H*W): each window reads the
    /// window's part of them (segmentation, depth, image-conditioned models).
    Spatial(Tensor),
    /// A condition shared by every window (B, nc): the SOS token or the class.
    Prefix(Tensor),
}

/// Offset of the window along one axis for position `i` of `n`, window side `w` (the reference's
/// rule for w = 16: `i` if i <= 8, `16 - (n - i)` if n - i < 8, else 8).
pub fn window_offset(i: usize, n: usize, w: usize) -> usize {
    let half = w / 2;
    if i <= half {
        i
    } else if n - i < half {
        w - (n - i)
    } else {
        half
    }
}

/// Samples an (H, W) latent grid larger than the training grid in raster order with the
/// reference's sliding attention window of `window` = (wh, ww) positions. `keep` optionally holds
/// (B, H*W) tokens and, per raster position, whether to keep that token instead of sampling it
/// (image completion).
pub fn sample_sliding(
    gpt: &Gpt,
    cond: &SlidingCond,
    grid: (usize, usize),
    window: (usize, usize),
    opts: &SamplingOptions,
    keep: Option<(&Tensor, &[bool])>,
    callback: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Sampled> {
    let (h, w) = grid;
    let (wh, ww) = window;
    if h < wh || w < ww {
        return Err(Error::invalid(format!(
            "the sliding window ({wh}x{ww} tokens) needs a latent grid at least that large, got {h}x{w}"
        )));
    }
    let (b, cond_rows, nc) = match cond {
        SlidingCond::Spatial(t) => {
            let (b, n) = t.dims2()?;
            if n != h * w {
                return Err(Error::invalid(format!(
                    "the condition has {n} tokens per sample; the sliding window needs one per image position ({h}x{w} = {})",
                    h * w
                )));
            }
            (b, t.to_dtype(DType::U32)?.to_vec2::<u32>()?, wh * ww)
        }
        SlidingCond::Prefix(t) => {
            let (b, n) = t.dims2()?;
            (b, t.to_dtype(DType::U32)?.to_vec2::<u32>()?, n)
        }
    };
    if nc + wh * ww - 1 > gpt.block_size() {
        return Err(Error::invalid(format!(
            "a {wh}x{ww} window with {nc} condition tokens needs a block size of {}, the transformer has {}",
            nc + wh * ww - 1,
            gpt.block_size()
        )));
    }
    let mut sampler = TokenSampler::new(opts)?;
    let (mut rows, kept) = match keep {
        Some((t, mask)) => {
            if mask.len() != h * w || t.dims2()? != (b, h * w) {
                return Err(Error::invalid(format!(
                    "tokens to keep must cover the {h}x{w} grid for {b} samples, got {:?} and a mask of {}",
                    t.dims(),
                    mask.len()
                )));
            }
            (t.to_dtype(DType::U32)?.to_vec2::<u32>()?, mask.to_vec())
        }
        None => (vec![vec![0u32; h * w]; b], vec![false; h * w]),
    };
    let device = gpt.device().clone();
    let total = kept.iter().filter(|k| !**k).count();
    let mut done = 0;
    for pos in 0..h * w {
        if kept[pos] {
            continue;
        }
        let (i, j) = (pos / w, pos % w);
        let (li, lj) = (window_offset(i, h, wh), window_offset(j, w, ww));
        let (i0, j0) = (i - li, j - lj);
        let p = li * ww + lj; // position of (i, j) inside the window
                              // condition tokens of the window, then the window's image tokens before p
        let mut seq = Vec::with_capacity(b * (nc + p));
        for s in 0..b {
            match cond {
                SlidingCond::Spatial(_) => {
                    for a in 0..wh {
                        seq.extend_from_slice(
                            &cond_rows[s][(i0 + a) * w + j0..(i0 + a) * w + j0 + ww],
                        );
                    }
                }
                SlidingCond::Prefix(_) => seq.extend_from_slice(&cond_rows[s]),
            }
            for q in 0..p {
                let (a, c) = (q / ww, q % ww);
                seq.push(rows[s][(i0 + a) * w + j0 + c]);
            }
        }
        let seq = Tensor::from_vec(seq, (b, nc + p), &device)?;
        let logits = gpt.logits_at(&seq, nc + p - 1)?; // (B, V)
        let next = sampler.pick(&logits)?;
        for (r, t) in rows.iter_mut().zip(next) {
            r[pos] = t;
        }
        done += 1;
        let control = callback(&Progress {
            done,
            total,
            tokens: &rows,
        });
        if control == Control::Cancel {
            return Ok(Sampled {
                indices: tokens_tensor(&rows, h * w, &device)?,
                cancelled: true,
            });
        }
    }
    Ok(Sampled {
        indices: tokens_tensor(&rows, h * w, &device)?,
        cancelled: false,
    })
}

/// A callback that never cancels.
pub fn no_progress(_: &Progress) -> Control {
    Control::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_offsets_follow_the_reference() {
        // H = 20: rows 0..=8 offset i; rows 13..19 (20 - i < 8) offset 16 - (20 - i); else 8
        let got: Vec<usize> = (0..20).map(|i| window_offset(i, 20, 16)).collect();
        assert_eq!(
            got,
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        // exactly the window size: the window never moves
        let got: Vec<usize> = (0..16).map(|i| window_offset(i, 16, 16)).collect();
        assert_eq!(got, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn seeded_sampler_is_reproducible_and_respects_top_k() -> anyhow::Result<()> {
        let opts = SamplingOptions {
            top_k: Some(2),
            seed: 7,
            ..Default::default()
        };
        let row = vec![0.1f32, 2.0, 1.9, -1.0, 0.5];
        let mut a = TokenSampler::new(&opts)?;
        let mut b = TokenSampler::new(&opts)?;
        let da: Vec<u32> = (0..50).map(|_| a.pick_row(row.clone())).collect();
        let db: Vec<u32> = (0..50).map(|_| b.pick_row(row.clone())).collect();
        assert_eq!(da, db);
        assert!(da.iter().all(|&t| t == 1 || t == 2));
        assert!(da.contains(&1) && da.contains(&2));
        let mut c = TokenSampler::new(&SamplingOptions { seed: 8, ..opts })?;
        let dc: Vec<u32> = (0..50).map(|_| c.pick_row(row.clone())).collect();
        assert_ne!(da, dc, "another seed gives other draws");
        Ok(())
    }

    #[test]
    fn bad_options_are_rejected() {
        let bad = SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        };
        assert!(TokenSampler::new(&bad)
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let bad = SamplingOptions {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(TokenSampler::new(&bad)
            .unwrap_err()
            .to_string()
            .contains("top-p"));
    }
}
