//! Vector quantizers of the first stage.
//!
//! Mirrors `taming/modules/vqvae/quantize.py`: `VectorQuantizer2` (nearest codebook entry, with the
//! legacy or the fixed placement of beta in the codebook loss, `remap` of indices to a subset of
//! used codes with `unknown_index` random/extra/int, and `sane_index_shape`), `GumbelQuantize`
//! (logits from a 1x1 conv; deterministic argmax by default, seeded Gumbel noise as an option) and
//! `EMAVectorQuantizer` (codebook as exponential moving averages; state-dict keys
//! `embedding.{weight,cluster_size,embed_avg}`).
//!
//! Indices are returned as `(B, H*W)` u32 tensors, row-major over the latent grid, the shape the
//! transformer consumes. `sane_index_shape` only matters to callers that want `(B, H, W)`:
//! [`Quantized::indices_bhw`] gives that view.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, VarBuilder};
use rand::{Rng, SeedableRng};

use crate::config::UnknownIndex;
use crate::{Error, Result};

/// The output of a quantizer.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// z_q with straight-through gradients: (B, C, H, W).
    pub quant: Tensor,
    /// The quantizer's loss term (scalar): codebook + commitment loss, or the Gumbel KL term.
    pub loss: Tensor,
    /// Code indices after remapping: (B, H*W), u32.
    pub indices: Tensor,
    /// Latent grid (H, W).
    pub grid: (usize, usize),
}

impl Quantized {
    /// Indices as (B, H, W), the reference's `sane_index_shape`.
    pub fn indices_bhw(&self) -> Result<Tensor> {
        let b = self.indices.dim(0)?;
        Ok(self.indices.reshape((b, self.grid.0, self.grid.1))?)
    }
}

/// Where beta goes in `VectorQuantizer2`'s loss (a named reference quirk). The reference's
/// `VQModel` always builds the quantizer with `legacy=True`: beta weights the codebook term instead
/// of the commitment term. Both give the same loss *value*, `(1 + beta) * mse`; they differ in which
/// parameters receive which gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaPlacement {
    /// `mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)` (the reference's default, `legacy=True`).
    Legacy,
    /// `beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)` (`legacy=False`).
    Fixed,
}

/// Index remapping to a subset of used codes (`remap=...npy`).
#[derive(Debug, Clone)]
pub struct Remap {
    used: Vec<i64>,
    /// Size of the remapped index space (`re_embed`).
    re_embed: usize,
    unknown: UnknownIndex,
    seed: u64,
}

impl Remap {
    /// Load the `.npy` array of used code ids.
    pub fn from_npy(path: &Path, unknown: UnknownIndex) -> Result<Self> {
        let t = Tensor::read_npy(path).map_err(|e| Error::Config {
            origin: path.display().to_string(),
            msg: format!("cannot read remap array: {e}"),
        })?;
        let used = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        Ok(Self::new(used, unknown))
    }

    pub fn new(used: Vec<i64>, unknown: UnknownIndex) -> Self {
        let mut re_embed = used.len();
        if unknown == UnknownIndex::Extra {
            re_embed += 1;
        }
        Self {
            used,
            re_embed,
            unknown,
            seed: 0,
        }
    }

    /// Number of distinct remapped indices (the transformer's vocabulary for this stage).
    pub fn re_embed(&self) -> usize {
        self.re_embed
    }

    /// `remap_to_used`: codebook id -> position in `used`; ids not in `used` get `unknown_index`.
    pub fn to_used(&self, inds: &[u32]) -> Result<Vec<u32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        inds.iter()
            .map(|&i| match self.used.iter().position(|&u| u == i as i64) {
                Some(p) => Ok(p as u32),
                None => match self.unknown {
                    UnknownIndex::Random => Ok(rng.random_range(0..self.re_embed as u32)),
                    UnknownIndex::Extra => Ok(self.used.len() as u32),
                    UnknownIndex::Index(v) => u32::try_from(v).map_err(|_| {
                        Error::invalid(format!("remap unknown_index {v} is negative"))
                    }),
                },
            })
            .collect()
    }

    /// `unmap_to_all`: position in `used` -> codebook id (the extra token maps to `used[0]`).
    pub fn to_all(&self, inds: &[u32]) -> Result<Vec<u32>> {
        inds.iter()
            .map(|&i| {
                let i = if i as usize >= self.used.len() && self.re_embed > self.used.len() {
                    0
                } else {
                    i as usize
                };
                self.used.get(i).map(|&u| u as u32).ok_or_else(|| {
                    Error::invalid(format!(
                        "remapped index {i} out of range for {} used codes",
                        self.used.len()
                    ))
                })
            })
            .collect()
    }
}

fn apply_remap(remap: &Option<Remap>, idx: &Tensor, to_used: bool) -> Result<Tensor> {
    match remap {
        None => Ok(idx.clone()),
        Some(r) => {
            let shape = idx.dims().to_vec();
            let v = idx.flatten_all()?.to_vec1::<u32>()?;
            let v = if to_used {
                r.to_used(&v)?
            } else {
                r.to_all(&v)?
            };
            Ok(Tensor::from_vec(v, shape, idx.device())?)
        }
    }
}

/// Squared distances `|z|^2 + |e|^2 - 2 z.e` between rows of `z` (N, D) and the codebook `e` (K, D),
/// summed in the reference's order.
fn squared_distances(z: &Tensor, e: &Tensor) -> Result<Tensor> {
    let z2 = z.sqr()?.sum_keepdim(1)?; // (N, 1)
    let e2 = e.sqr()?.sum(1)?.unsqueeze(0)?; // (1, K)
    let ze = z.matmul(&e.t()?)?; // (N, K)
    Ok(z2.broadcast_add(&e2)?.broadcast_sub(&(ze * 2.0)?)?) // (N, K)
}

/// Nearest codebook entries of a (B, C, H, W) latent: (flat z (N, C), indices (N) u32).
fn nearest_codes(z: &Tensor, codebook: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, c, _, _) = z.dims4()?;
    let zf = z.permute((0, 2, 3, 1))?.contiguous()?.reshape(((), c))?; // (N, C)
    let d = squared_distances(&zf, codebook)?; // (N, K)
    let idx = d.argmin(1)?; // (N)
    Ok((zf, idx))
}

/// Look up codebook rows for (B, N) indices on an (h, w) grid: (B, D, h, w).
fn lookup(codebook: &Tensor, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
    let (b, n) = indices.dims2()?;
    if n != grid.0 * grid.1 {
        return Err(Error::invalid(format!(
            "{n} indices per sample do not fill a {}x{} latent grid",
            grid.0, grid.1
        )));
    }
    let k = codebook.dim(0)?;
    let flat = indices.flatten_all()?.to_dtype(DType::U32)?;
    let max = flat.max(0)?.to_scalar::<u32>()?;
    if max as usize >= k {
        return Err(Error::invalid(format!(
            "code index {max} is out of range for a codebook of {k} entries"
        )));
    }
    let d = codebook.dim(1)?;
    let zq = codebook.index_select(&flat, 0)?; // (B*N, D)
    Ok(zq
        .reshape((b, grid.0, grid.1, d))?
        .permute((0, 3, 1, 2))?
        .contiguous()?) // (B, D, h, w)
}

/// `VectorQuantizer2`.
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    embedding: Tensor,
    beta: f64,
    placement: BetaPlacement,
    remap: Option<Remap>,
}

impl VectorQuantizer {
    /// Reads `embedding.weight` (n_e, e_dim).
    pub fn new(
        n_e: usize,
        e_dim: usize,
        beta: f64,
        placement: BetaPlacement,
        remap: Option<Remap>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let embedding = vb.pp("embedding").get((n_e, e_dim), "weight")?;
        Ok(Self {
            embedding,
            beta,
            placement,
            remap,
        })
    }

    pub fn codebook(&self) -> &Tensor {
        &self.embedding
    }

    /// z: (B, C, H, W) -> quantized latent, loss, indices.
    pub fn forward(&self, z: &Tensor) -> Result<Quantized> {
        let (b, c, h, w) = z.dims4()?;
        let (zf, idx) = nearest_codes(z, &self.embedding)?; // (N, C), (N)
        let zq = self.embedding.index_select(&idx, 0)?; // (N, C)
        let commit = (zq.detach() - &zf)?.sqr()?.mean_all()?; // moves the encoder
        let codebook = (&zq - zf.detach())?.sqr()?.mean_all()?; // moves the codebook
        let loss = match self.placement {
            BetaPlacement::Legacy => (commit + (codebook * self.beta)?)?,
            BetaPlacement::Fixed => ((commit * self.beta)? + codebook)?,
        };
        let zq = (&zf + (zq - &zf)?.detach())?; // straight-through, (N, C)
        let quant = zq
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?; // (B, C, H, W)
        let indices = apply_remap(&self.remap, &idx.reshape((b, h * w))?, true)?; // (B, HW)
        Ok(Quantized {
            quant,
            loss,
            indices,
            grid: (h, w),
        })
    }

    /// `get_codebook_entry`: (B, h*w) indices -> (B, D, h, w).
    pub fn lookup(&self, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let idx = apply_remap(&self.remap, &indices.to_dtype(DType::U32)?, false)?;
        lookup(&self.embedding, &idx, grid)
    }
}

/// How `GumbelQuantize` picks codes at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GumbelMode {
    /// Argmax of the logits (the expectation of the reference's noisy draw; reproducible).
    Argmax,
    /// Argmax of logits plus Gumbel noise from a seeded generator (the reference adds unseeded
    /// noise even in eval mode).
    Noisy { seed: u64 },
}

/// `GumbelQuantize`: `proj` (1x1 conv to n_embed logits) and `embed` (n_embed, D).
#[derive(Debug, Clone)]
pub struct GumbelQuantizer {
    proj: Conv2d,
    embed: Tensor,
    n_embed: usize,
    kl_weight: f64,
    remap: Option<Remap>,
    mode: GumbelMode,
}

impl GumbelQuantizer {
    pub fn new(
        num_hiddens: usize,
        embedding_dim: usize,
        n_embed: usize,
        kl_weight: f64,
        remap: Option<Remap>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let proj = crate::nn::conv2d(num_hiddens, n_embed, 1, 1, 0, vb.pp("proj"))?;
        let embed = vb.pp("embed").get((n_embed, embedding_dim), "weight")?;
        Ok(Self {
            proj,
            embed,
            n_embed,
            kl_weight,
            remap,
            mode: GumbelMode::Argmax,
        })
    }

    pub fn set_mode(&mut self, mode: GumbelMode) {
        self.mode = mode;
    }

    pub fn codebook(&self) -> &Tensor {
        &self.embed
    }

    /// Logits over codes: (B, n_embed, H, W).
    pub fn logits(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.proj.forward(z)?)
    }

    /// z: (B, C, H, W) -> quantized latent (hard one-hot of the chosen codes), KL loss, indices.
    pub fn forward(&self, z: &Tensor) -> Result<Quantized> {
        let logits = self.logits(z)?; // (B, K, H, W)
        let (b, k, h, w) = logits.dims4()?;
        let scores = match self.mode {
            GumbelMode::Argmax => logits.clone(),
            GumbelMode::Noisy { seed } => {
                let n = b * k * h * w;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let g: Vec<f32> = (0..n)
                    .map(|_| {
                        let u: f32 = rng.random_range(f32::MIN_POSITIVE..1.0);
                        -(-u.ln()).ln()
                    })
                    .collect();
                let g = Tensor::from_vec(g, (b, k, h, w), logits.device())?;
                (&logits + g.to_dtype(logits.dtype())?)?
            }
        };
        let idx = scores.argmax(1)?.reshape((b, h * w))?; // (B, HW)
        let quant = lookup(&self.embed, &idx, (h, w))?; // (B, D, H, W)
                                                        // KL to the uniform prior: kl_weight * mean over positions of sum_k qy log(qy K + 1e-10).
        let qy = candle_nn::ops::softmax(&logits, 1)?; // (B, K, H, W)
        let kl = (&qy * ((&qy * self.n_embed as f64)? + 1e-10)?.log()?)?
            .sum(1)?
            .mean_all()?;
        let loss = (kl * self.kl_weight)?;
        let indices = apply_remap(&self.remap, &idx, true)?;
        Ok(Quantized {
            quant,
            loss,
            indices,
            grid: (h, w),
        })
    }

    /// `get_codebook_entry`: (B, h*w) indices -> (B, D, h, w).
    pub fn lookup(&self, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let idx = apply_remap(&self.remap, &indices.to_dtype(DType::U32)?, false)?;
        lookup(&self.embed, &idx, grid)
    }

    /// The training forward pass (`self.training`, `straight_through=True`):
    /// `F.gumbel_softmax(logits, tau=temperature, dim=1, hard=True)` with Gumbel noise drawn from
    /// `seed`, so the codes are the hard one-hot argmax and the gradient is the soft sample's;
    /// `z_q = one_hot @ embed`; the KL term as in [`GumbelQuantizer::forward`].
    pub fn forward_train(&self, z: &Tensor, temperature: f64, seed: u64) -> Result<Quantized> {
        if self.remap.is_some() {
            return Err(Error::invalid(
                "training a GumbelVQ with `remap` is not supported; train without remap and remap afterwards",
            ));
        }
        let logits = crate::nn::conv(&self.proj, z)?; // (B, K, H, W)
        let (b, k, h, w) = logits.dims4()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let g: Vec<f32> = (0..b * k * h * w)
            .map(|_| {
                let u: f32 = rng.random_range(f32::MIN_POSITIVE..1.0);
                -(-u.ln()).ln()
            })
            .collect();
        let g = Tensor::from_vec(g, (b, k, h, w), logits.device())?;
        let y_soft = candle_nn::ops::softmax(&((&logits + g)? / temperature)?, 1)?; // (B, K, H, W)
        let idx = y_soft.argmax_keepdim(1)?; // (B, 1, H, W)
        let ar = Tensor::arange(0u32, k as u32, z.device())?.reshape((1, k, 1, 1))?;
        let y_hard = idx.broadcast_eq(&ar)?.to_dtype(y_soft.dtype())?; // (B, K, H, W)
        let one_hot = ((y_hard - y_soft.detach())? + &y_soft)?; // straight-through
        let oh = one_hot.permute((0, 2, 3, 1))?.reshape((b * h * w, k))?; // (N, K)
        let zq = oh.matmul(&self.embed)?; // (N, D)
        let d = self.embed.dim(1)?;
        let quant = zq
            .reshape((b, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?; // (B, D, H, W)
        let qy = candle_nn::ops::softmax(&logits, 1)?; // (B, K, H, W)
        let kl = (&qy * ((&qy * self.n_embed as f64)? + 1e-10)?.log()?)?
            .sum(1)?
            .mean_all()?;
        let loss = (kl * self.kl_weight)?;
        let indices = idx.reshape((b, h * w))?;
        Ok(Quantized {
            quant,
            loss,
            indices,
            grid: (h, w),
        })
    }
}

/// `EmbeddingEMA`'s decay.
pub const EMA_DECAY: f64 = 0.99;
/// `EmbeddingEMA`'s smoothing epsilon.
pub const EMA_EPS: f64 = 1e-5;

/// The new EMA state after one training batch (the reference updates it inside `forward` when
/// training): `(weight, cluster_size, embed_avg)`.
#[derive(Debug, Clone)]
pub struct EmaUpdate {
    pub weight: Tensor,
    pub cluster_size: Tensor,
    pub embed_avg: Tensor,
}

/// `EMAVectorQuantizer`: the codebook `embedding.weight` is updated by exponential moving averages
/// (`embedding.cluster_size`, `embedding.embed_avg`) during training; inference is nearest-code.
#[derive(Debug, Clone)]
pub struct EmaVectorQuantizer {
    weight: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    beta: f64,
    remap: Option<Remap>,
}

impl EmaVectorQuantizer {
    pub fn new(
        n_embed: usize,
        dim: usize,
        beta: f64,
        remap: Option<Remap>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("embedding");
        Ok(Self {
            weight: vb.get((n_embed, dim), "weight")?,
            cluster_size: vb.get(n_embed, "cluster_size")?,
            embed_avg: vb.get((n_embed, dim), "embed_avg")?,
            beta,
            remap,
        })
    }

    pub fn codebook(&self) -> &Tensor {
        &self.weight
    }

    /// The EMA statistics (cluster sizes (K), embedding sums (K, D)).
    pub fn ema_state(&self) -> (&Tensor, &Tensor) {
        (&self.cluster_size, &self.embed_avg)
    }

    /// z: (B, C, H, W) -> quantized latent, `beta * mse(sg[z_q], z)`, indices.
    pub fn forward(&self, z: &Tensor) -> Result<Quantized> {
        let (b, c, h, w) = z.dims4()?;
        let (zf, idx) = nearest_codes(z, &self.weight)?;
        let zq = self.weight.index_select(&idx, 0)?; // (N, C)
        let loss = ((zq.detach() - &zf)?.sqr()?.mean_all()? * self.beta)?;
        let zq = (&zf + (zq - &zf)?.detach())?;
        let quant = zq
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?; // (B, C, H, W)
        let indices = apply_remap(&self.remap, &idx.reshape((b, h * w))?, true)?;
        Ok(Quantized {
            quant,
            loss,
            indices,
            grid: (h, w),
        })
    }

    pub fn lookup(&self, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let idx = apply_remap(&self.remap, &indices.to_dtype(DType::U32)?, false)?;
        lookup(&self.weight, &idx, grid)
    }

    /// The EMA update for latents `z` (B, C, H, W) as `EMAVectorQuantizer.forward` does it in
    /// training: `cluster_size = d cs + (1 - d) counts`, `embed_avg = d ea + (1 - d) onehot^T z`,
    /// `weight = embed_avg / ((cs + eps) / (n + K eps) * n)` with `n = sum(cs)`.
    pub fn ema_update(&self, z: &Tensor) -> Result<EmaUpdate> {
        let (zf, idx) = nearest_codes(&z.detach(), &self.weight)?; // (N, C), (N)
        let k = self.weight.dim(0)?;
        let ar = Tensor::arange(0u32, k as u32, z.device())?.unsqueeze(0)?; // (1, K)
        let onehot = idx.unsqueeze(1)?.broadcast_eq(&ar)?.to_dtype(zf.dtype())?; // (N, K)
        let counts = onehot.sum(0)?; // (K)
        let sums = onehot.t()?.matmul(&zf)?; // (K, C)
        let cluster_size = ((&self.cluster_size * EMA_DECAY)? + (counts * (1.0 - EMA_DECAY))?)?;
        let embed_avg = ((&self.embed_avg * EMA_DECAY)? + (sums * (1.0 - EMA_DECAY))?)?;
        let n = cluster_size
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let smoothed = ((&cluster_size + EMA_EPS)? * (n / (n + k as f64 * EMA_EPS)))?; // (K)
        let weight = embed_avg.broadcast_div(&smoothed.unsqueeze(1)?)?; // (K, C)
        Ok(EmaUpdate {
            weight,
            cluster_size,
            embed_avg,
        })
    }
}

/// Any of the reference's first-stage quantizers.
#[derive(Debug, Clone)]
pub enum Quantizer {
    Vq(VectorQuantizer),
    Gumbel(GumbelQuantizer),
    Ema(EmaVectorQuantizer),
}

impl Quantizer {
    pub fn forward(&self, z: &Tensor) -> Result<Quantized> {
        match self {
            Quantizer::Vq(q) => q.forward(z),
            Quantizer::Gumbel(q) => q.forward(z),
            Quantizer::Ema(q) => q.forward(z),
        }
    }

    /// Codebook entries for (B, h*w) indices: (B, D, h, w).
    pub fn lookup(&self, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        match self {
            Quantizer::Vq(q) => q.lookup(indices, grid),
            Quantizer::Gumbel(q) => q.lookup(indices, grid),
            Quantizer::Ema(q) => q.lookup(indices, grid),
        }
    }

    /// The codebook (n_embed, D).
    pub fn codebook(&self) -> &Tensor {
        match self {
            Quantizer::Vq(q) => q.codebook(),
            Quantizer::Gumbel(q) => q.codebook(),
            Quantizer::Ema(q) => q.codebook(),
        }
    }
}

/// Gap between the nearest and second-nearest squared code distance per latent position, (B, H*W):
/// positions with a gap below ~1e-4 may legitimately flip in float32.
pub fn index_margin(z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    let (b, _, h, w) = z.dims4()?;
    let (zf, _) = nearest_codes(z, codebook)?;
    let d = squared_distances(&zf, codebook)?; // (N, K)
    let sorted = d.sort_last_dim(true)?.0; // (N, K) ascending
    let gap = (sorted.narrow(D::Minus1, 1, 1)? - sorted.narrow(D::Minus1, 0, 1)?)?; // (N, 1)
    Ok(gap.reshape((b, h * w))?)
}

/// A device helper for tests and callers that build tensors from index lists.
pub fn indices_tensor(v: Vec<u32>, b: usize, n: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, (b, n), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `EMAVectorQuantizer`'s update worked by hand: codes 0 and 10 (D = 1), cluster sizes 1 and
    /// 1, latents 1, 2 and 9 (nearest: 0, 0, 1).
    #[test]
    fn ema_update_is_the_textbook_formula() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut map = std::collections::HashMap::new();
        map.insert(
            "embedding.weight".to_string(),
            Tensor::new(&[[0f32], [10.0]], &dev)?,
        );
        map.insert(
            "embedding.cluster_size".to_string(),
            Tensor::new(&[1f32, 1.0], &dev)?,
        );
        map.insert(
            "embedding.embed_avg".to_string(),
            Tensor::new(&[[0f32], [10.0]], &dev)?,
        );
        let q = EmaVectorQuantizer::new(
            2,
            1,
            0.25,
            None,
            VarBuilder::from_tensors(map, DType::F32, &dev),
        )?;
        let z = Tensor::new(&[1f32, 2.0, 9.0], &dev)?.reshape((1, 1, 1, 3))?;
        let u = q.ema_update(&z)?;
        let cs = [0.99 + 0.01 * 2.0, 0.99 + 0.01 * 1.0];
        let ea = [0.01 * 3.0, 0.99 * 10.0 + 0.01 * 9.0];
        let n = cs[0] + cs[1];
        let w: Vec<f64> = (0..2)
            .map(|i| ea[i] / ((cs[i] + 1e-5) / (n + 2.0 * 1e-5) * n))
            .collect();
        let got_cs = u.cluster_size.to_vec1::<f32>()?;
        let got_w = u.weight.flatten_all()?.to_vec1::<f32>()?;
        let got_ea = u.embed_avg.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..2 {
            assert!((got_cs[i] as f64 - cs[i]).abs() < 1e-6);
            assert!((got_ea[i] as f64 - ea[i]).abs() < 1e-5);
            assert!((got_w[i] as f64 - w[i]).abs() < 1e-5, "{got_w:?} vs {w:?}");
        }
        Ok(())
    }

    #[test]
    fn remap_roundtrip_and_unknown_indices() -> anyhow::Result<()> {
        let extra = Remap::new(vec![3, 7, 9], UnknownIndex::Extra);
        assert_eq!(extra.re_embed(), 4);
        assert_eq!(extra.to_used(&[7, 3, 5, 9])?, vec![1, 0, 3, 2]);
        // the extra token maps back to used[0]
        assert_eq!(extra.to_all(&[1, 0, 3, 2])?, vec![7, 3, 3, 9]);
        let fixed = Remap::new(vec![3, 7, 9], UnknownIndex::Index(2));
        assert_eq!(fixed.to_used(&[5, 7])?, vec![2, 1]);
        let random = Remap::new(vec![3, 7, 9], UnknownIndex::Random);
        let r = random.to_used(&[1, 2, 4, 5, 6, 8])?;
        assert!(r.iter().all(|&i| i < 3));
        assert_eq!(
            r,
            random.to_used(&[1, 2, 4, 5, 6, 8])?,
            "seeded, hence reproducible"
        );
        Ok(())
    }

    fn vq(placement: BetaPlacement) -> anyhow::Result<VectorQuantizer> {
        let dev = Device::Cpu;
        let cb = Tensor::new(&[[0f32, 0.], [1., 1.], [-1., 2.]], &dev)?;
        let mut map = std::collections::HashMap::new();
        map.insert("embedding.weight".to_string(), cb);
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        Ok(VectorQuantizer::new(3, 2, 0.25, placement, None, vb)?)
    }

    #[test]
    fn nearest_code_and_loss_value() -> anyhow::Result<()> {
        let q = vq(BetaPlacement::Legacy)?;
        // two positions: (0.9, 1.2) -> code 1, (-0.8, 1.7) -> code 2
        let z = Tensor::new(&[[[[0.9f32, -0.8]], [[1.2, 1.7]]]], &Device::Cpu)?; // (1, 2, 1, 2)
        let out = q.forward(&z)?;
        assert_eq!(out.indices.to_vec2::<u32>()?, vec![vec![1, 2]]);
        let mse = ((0.1f32 * 0.1 + 0.2 * 0.2) + (0.2 * 0.2 + 0.3 * 0.3)) / 4.0;
        let loss = out.loss.to_scalar::<f32>()?;
        assert!((loss - 1.25 * mse).abs() < 1e-6, "{loss} vs {}", 1.25 * mse);
        let back = q.lookup(&out.indices, (1, 2))?;
        let diff = (back - &out.quant)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }

    /// The legacy placement puts beta on the codebook term: the codebook gradient is scaled by beta
    /// and the encoder's by 1; the fixed placement swaps them.
    #[test]
    fn beta_placement_changes_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (placement, z_scale, e_scale) in [
            (BetaPlacement::Legacy, 1.0f32, 0.25f32),
            (BetaPlacement::Fixed, 0.25, 1.0),
        ] {
            let var_cb = candle_core::Var::new(&[[0f32, 0.], [1., 1.]], &dev)?;
            let var_z = candle_core::Var::new(&[[[[0.5f32]], [[0.75]]]], &dev)?; // (1,2,1,1) -> code 1
            let q = VectorQuantizer {
                embedding: var_cb.as_tensor().clone(),
                beta: 0.25,
                placement,
                remap: None,
            };
            let out = q.forward(var_z.as_tensor())?;
            let grads = out.loss.backward()?;
            let gz = grads
                .get(&var_z)
                .ok_or_else(|| anyhow::anyhow!("no z grad"))?;
            let ge = grads
                .get(&var_cb)
                .ok_or_else(|| anyhow::anyhow!("no codebook grad"))?;
            // d/dz mean((e - z)^2) over 2 elements = (z - e); here z - e = (-0.5, -0.25)
            let gz = gz.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                (gz[0] - z_scale * -0.5).abs() < 1e-6,
                "{placement:?} {gz:?}"
            );
            let ge = ge.to_vec2::<f32>()?;
            assert!(
                (ge[1][0] - e_scale * 0.5).abs() < 1e-6,
                "{placement:?} {ge:?}"
            );
        }
        Ok(())
    }
}
