//! The GPT over codebook indices.
//!
//! Mirrors `taming/modules/transformer/mingpt.py` (`GPT`, `Block`, `CausalSelfAttention`): token and
//! learned position embeddings, pre-LayerNorm blocks with a causal mask whose first `n_unmasked`
//! positions attend to each other bidirectionally, exact-erf GELU MLP, final LayerNorm and a
//! bias-free head; optional embeddings prepended to the token embeddings. State-dict paths are the
//! reference's (`tok_emb`, `pos_emb`, `blocks.3.attn.key`, `blocks.3.mlp.0`, `ln_f`, `head`); the
//! registered `attn.mask` buffers are recomputed, not read.
//!
//! Besides the full forward pass used for training and scoring, [`Gpt::forward_cached`] runs a
//! chunk of tokens against a preallocated [`KvCache`] for incremental decoding and computes the
//! head only for the positions asked for. It is tested against the full pass.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use crate::config::GptConfig;
use crate::{Error, Result};

/// `nn.LayerNorm`'s default epsilon.
pub const LAYER_NORM_EPS: f64 = 1e-5;

fn layer_norm(n: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(candle_nn::layer_norm(n, LAYER_NORM_EPS, vb)?)
}

/// A LayerNorm forward that records gradients in training mode (see [`crate::nn::layer_norm`]).
fn ln(norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    crate::nn::layer_norm(norm, LAYER_NORM_EPS, x)
}

/// A Linear layer over (B, T, C) input as one (B*T, C) matrix product.
///
/// candle's `Linear` runs a rank-3 input as a batched product against the weight broadcast per
/// batch entry, which reads the whole weight matrix once per sequence: at batch 8 a sampling
/// step read the 1.2 GB of a full-size model eight times. Flattening reads it once.
/// Products with few rows (a cached sampling step) go to [`crate::skinny`].
fn dense(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let lead = &x.dims()[..x.rank().saturating_sub(1)];
    let c = x.dims().last().copied().unwrap_or(1);
    let rows = lead.iter().product::<usize>();
    let x2 = x.reshape((rows, c))?; // (B*T, C)
    let y = match crate::skinny::try_linear(&x2, layer.weight(), layer.bias())? {
        Some(y) => y,
        None => layer.forward(&x2)?,
    }; // (B*T, N)
    let mut shape = lead.to_vec();
    shape.push(y.dim(1)?);
    Ok(y.reshape(shape)?) // (B, T, N)
}

/// Per-layer key/value storage, allocated once for the block size and filled in place.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values, each (B, n_head, capacity, head_dim).
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Number of positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets the stored positions (the storage is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Forgets positions from `len` on (keeps the first `len`).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// `CausalSelfAttention`.
#[derive(Debug, Clone)]
struct SelfAttention {
    key: Linear,
    query: Linear,
    value: Linear,
    proj: Linear,
    n_head: usize,
}

impl SelfAttention {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_embd;
        Ok(Self {
            key: candle_nn::linear(n, n, vb.pp("key"))?,
            query: candle_nn::linear(n, n, vb.pp("query"))?,
            value: candle_nn::linear(n, n, vb.pp("value"))?,
            proj: candle_nn::linear(n, n, vb.pp("proj"))?,
            n_head: cfg.n_head,
        })
    }

    /// (B, T, C) -> (B, n_head, T, head_dim)
    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        Ok(x.reshape((b, t, self.n_head, c / self.n_head))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// x: (B, T, C) at positions `start..start+T`; keys/values of earlier positions come from
    /// `cache` (when given) and the new ones are written there. `mask`: additive (T, start+T) or None.
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut (Tensor, Tensor), usize)>,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hs = c / self.n_head;
        let q = self.heads(&dense(&self.query, x)?)?; // (B, nh, T, hs)
        let k = self.heads(&dense(&self.key, x)?)?; // (B, nh, T, hs)
        let v = self.heads(&dense(&self.value, x)?)?; // (B, nh, T, hs)
        let (k, v) = match cache {
            Some(((kc, vc), start)) => {
                kc.slice_set(&k, 2, start)?;
                vc.slice_set(&v, 2, start)?;
                if mask.is_none() {
                    let scale = 1.0 / (hs as f32).sqrt();
                    if let Some(y) = crate::skinny::try_attend_one(&q, kc, vc, start + t, scale)? {
                        return dense(&self.proj, &y); // (B, 1, C)
                    }
                }
                let total = start + t;
                // strided views into the cache: each (S, hs) matrix is contiguous, which is all
                // the batched matmul needs, so nothing is copied per step
                (kc.narrow(2, 0, total)?, vc.narrow(2, 0, total)?) // (B, nh, S, hs)
            }
            None => (k, v),
        };
        let att = (q.matmul(&k.t()?)? * (1.0 / (hs as f64).sqrt()))?; // (B, nh, T, S)
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = crate::nn::softmax_last_dim(&att)?; // (B, nh, T, S)
        let y = att.matmul(&v)?; // (B, nh, T, hs)
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, t, c))?; // (B, T, C)
        dense(&self.proj, &y)
    }
}

/// `Block`: x + attn(ln1(x)), then x + mlp(ln2(x)).
#[derive(Debug, Clone)]
struct Block {
    ln1: LayerNorm,
    ln2: LayerNorm,
    attn: SelfAttention,
    fc: Linear,
    fc_out: Linear,
}

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_embd;
        Ok(Self {
            ln1: layer_norm(n, vb.pp("ln1"))?,
            ln2: layer_norm(n, vb.pp("ln2"))?,
            attn: SelfAttention::new(cfg, vb.pp("attn"))?,
            fc: candle_nn::linear(n, 4 * n, vb.pp("mlp").pp(0))?,
            fc_out: candle_nn::linear(4 * n, n, vb.pp("mlp").pp(2))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut (Tensor, Tensor), usize)>,
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&ln(&self.ln1, x)?, mask, cache)?)?; // (B, T, C)
        let h = crate::gelu::gelu(&dense(&self.fc, &ln(&self.ln2, &x)?)?)?; // (B, T, 4C)
        Ok((x + dense(&self.fc_out, &h)?)?)
    }
}

/// `GPT`.
#[derive(Debug, Clone)]
pub struct Gpt {
    tok_emb: Embedding,
    pos_emb: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Linear,
    cfg: GptConfig,
}

impl Gpt {
    pub fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(Error::Config {
                origin: "transformer_config".into(),
                msg: format!(
                    "n_embd {} is not divisible by n_head {}",
                    cfg.n_embd, cfg.n_head
                ),
            });
        }
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tok_emb: candle_nn::embedding(cfg.vocab_size, cfg.n_embd, vb.pp("tok_emb"))?,
            pos_emb: vb.get((1, cfg.block_size, cfg.n_embd), "pos_emb")?,
            blocks,
            ln_f: layer_norm(cfg.n_embd, vb.pp("ln_f"))?,
            head: candle_nn::linear_no_bias(cfg.n_embd, cfg.vocab_size, vb.pp("head"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    pub fn dtype(&self) -> DType {
        self.pos_emb.dtype()
    }
    pub fn device(&self) -> &Device {
        self.pos_emb.device()
    }

    fn check_tokens(&self, idx: &Tensor) -> Result<()> {
        if idx.elem_count() == 0 {
            return Ok(());
        }
        let max = idx
            .to_dtype(DType::I64)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<i64>()?;
        let min = idx
            .to_dtype(DType::I64)?
            .flatten_all()?
            .min(0)?
            .to_scalar::<i64>()?;
        if min < 0 || max as usize >= self.cfg.vocab_size {
            return Err(Error::invalid(format!(
                "token {} is outside the transformer's vocabulary of {} (condition and image tokens share one vocabulary)",
                if min < 0 { min } else { max },
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Embeddings of tokens at positions `start..start+T`, with `prefix` embeddings (B, P, C)
    /// prepended when given: (B, P+T, C).
    fn embed(&self, idx: &Tensor, prefix: Option<&Tensor>, start: usize) -> Result<Tensor> {
        self.check_tokens(idx)?;
        let tok = self.tok_emb.forward(&idx.to_dtype(DType::U32)?)?; // (B, T, C)
        let x = match prefix {
            Some(p) => Tensor::cat(&[&p.to_dtype(tok.dtype())?, &tok], 1)?,
            None => tok,
        };
        let t = x.dim(1)?;
        if start + t > self.cfg.block_size {
            return Err(Error::invalid(format!(
                "sequence of {} tokens exceeds the transformer's block size {}",
                start + t,
                self.cfg.block_size
            )));
        }
        let pos = self.pos_emb.narrow(1, start, t)?; // (1, T, C)
        Ok(x.broadcast_add(&pos)?)
    }

    /// Additive attention mask for queries `start..start+t` over keys `0..start+t`, or None when
    /// every query may see every key.
    fn mask(&self, start: usize, t: usize) -> Result<Option<Tensor>> {
        let total = start + t;
        let nu = self.cfg.n_unmasked;
        let allowed = |q: usize, k: usize| k <= q || (q < nu && k < nu);
        let mut any_blocked = false;
        let mut m = vec![0f32; t * total];
        for qi in 0..t {
            for k in 0..total {
                if !allowed(start + qi, k) {
                    m[qi * total + k] = f32::NEG_INFINITY;
                    any_blocked = true;
                }
            }
        }
        if !any_blocked {
            return Ok(None);
        }
        Ok(Some(
            Tensor::from_vec(m, (t, total), self.device())?.to_dtype(self.dtype())?,
        ))
    }

    /// Hidden states after `ln_f`: (B, T, C).
    fn hidden(&self, x: Tensor, start: usize, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let t = x.dim(1)?;
        let mask = self.mask(start, t)?;
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = match cache.as_deref_mut() {
                Some(c) => Some((&mut c.layers[i], start)),
                None => None,
            };
            x = block.forward(&x, mask.as_ref(), layer_cache)?;
        }
        ln(&self.ln_f, &x)
    }

    /// `forward(idx, embeddings)`: logits (B, P+T, vocab) in float32 for every position.
    pub fn forward(&self, idx: &Tensor, embeddings: Option<&Tensor>) -> Result<Tensor> {
        let x = self.embed(idx, embeddings, 0)?; // (B, T, C)
        let h = self.hidden(x, 0, None)?;
        Ok(dense(&self.head, &h)?.to_dtype(DType::F32)?) // (B, T, vocab)
    }

    /// A preallocated cache for `batch` sequences of up to the block size.
    pub fn new_cache(&self, batch: usize) -> Result<KvCache> {
        self.new_cache_for(batch, self.cfg.block_size)
    }

    /// A preallocated cache for `batch` sequences of up to `capacity` tokens (at most the block
    /// size): a sampler that knows its length allocates (and zeroes) only that much; for the
    /// full-size GPT at batch 8 the whole block is 805 MB.
    pub fn new_cache_for(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        if capacity > self.cfg.block_size {
            return Err(Error::invalid(format!(
                "a KV cache of {capacity} tokens exceeds the transformer's block size {}",
                self.cfg.block_size
            )));
        }
        let hs = self.cfg.n_embd / self.cfg.n_head;
        let shape = (batch, self.cfg.n_head, capacity, hs);
        let layers = (0..self.cfg.n_layer)
            .map(|_| -> Result<_> {
                Ok((
                    Tensor::zeros(shape, self.dtype(), self.device())?,
                    Tensor::zeros(shape, self.dtype(), self.device())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Runs tokens (B, T) at positions `cache.len()..` (writing their keys and values into the
    /// cache) and returns float32 logits (B, vocab) of the last position only.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let start = cache.len;
        let (b, t) = idx.dims2()?;
        if cache
            .layers
            .first()
            .map(|l| l.0.dim(0))
            .transpose()?
            .unwrap_or(b)
            != b
        {
            return Err(Error::invalid("KV cache was made for another batch size"));
        }
        if start + t > cache.capacity {
            return Err(Error::invalid(format!(
                "{} tokens do not fit a KV cache of {}",
                start + t,
                cache.capacity
            )));
        }
        let x = self.embed(idx, None, start)?; // (B, T, C)
        let h = self.hidden(x, start, Some(cache))?; // (B, T, C)
        cache.len = start + t;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?; // (B, C)
        Ok(dense(&self.head, &last)?.to_dtype(DType::F32)?) // (B, vocab)
    }

    /// Logits (B, vocab) at one position `pos` of a full (uncached) pass over `idx` (B, T):
    /// only the positions up to `pos` are run and only one head row is computed.
    pub fn logits_at(&self, idx: &Tensor, pos: usize) -> Result<Tensor> {
        let x = self.embed(&idx.narrow(1, 0, pos + 1)?, None, 0)?; // (B, pos+1, C)
        let h = self.hidden(x, 0, None)?;
        let last = h.narrow(1, pos, 1)?.squeeze(1)?; // (B, C)
        Ok(dense(&self.head, &last)?.to_dtype(DType::F32)?)
    }
}

/// Largest absolute difference of two tensors (test helper shared by callers).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n_unmasked: usize) -> anyhow::Result<Gpt> {
        let cfg = GptConfig {
            vocab_size: 11,
            block_size: 12,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            embd_pdrop: 0.0,
            resid_pdrop: 0.0,
            attn_pdrop: 0.0,
            n_unmasked,
        };
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let gpt = Gpt::new(&cfg, vb)?;
        // pos_emb and LayerNorms start at constants: perturb every variable so the test is sensitive
        for var in varmap.all_vars() {
            let r = Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu)?;
            var.set(&(var.as_tensor() + r)?)?;
        }
        drop(gpt);
        // plain tensors (as loaded from a checkpoint), so cached steps take the skinny kernels
        let weights: std::collections::HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect();
        Ok(Gpt::new(
            &cfg,
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        )?)
    }

    fn gpt_cache_too_large() -> anyhow::Result<String> {
        Ok(tiny(0)?
            .new_cache_for(1, 13)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default())
    }

    /// A KV-cached prefill plus single steps equals the full forward pass.
    #[test]
    fn cached_steps_equal_full_forward() -> anyhow::Result<()> {
        // a cache of the whole block (12) and one of exactly the 9 tokens used
        for (n_unmasked, capacity) in [(0, 12), (3, 12), (0, 9), (3, 9)] {
            let gpt = tiny(n_unmasked)?;
            let idx = Tensor::new(
                &[[1u32, 4, 7, 2, 9, 10, 0, 5, 3], [3, 3, 1, 8, 6, 2, 7, 7, 1]],
                &Device::Cpu,
            )?;
            let full = gpt.forward(&idx, None)?; // (2, 9, 11)
            let mut cache = gpt.new_cache_for(2, capacity)?;
            // prefill 4 tokens (covering the unmasked prefix), then one token at a time
            let l = gpt.forward_cached(&idx.narrow(1, 0, 4)?, &mut cache)?;
            assert!(max_abs_diff(&l, &full.narrow(1, 3, 1)?.squeeze(1)?)? < 1e-5);
            for p in 4..9 {
                let l = gpt.forward_cached(&idx.narrow(1, p, 1)?, &mut cache)?;
                let d = max_abs_diff(&l, &full.narrow(1, p, 1)?.squeeze(1)?)?;
                assert!(d < 1e-5, "n_unmasked {n_unmasked} position {p}: {d}");
                let single = gpt.logits_at(&idx, p)?;
                assert!(max_abs_diff(&single, &l)? < 1e-5);
            }
            if capacity == 9 {
                let e = gpt
                    .forward_cached(&idx.narrow(1, 0, 1)?, &mut cache)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("do not fit a KV cache of 9"), "{e}");
            }
        }
        assert!(gpt_cache_too_large()?.contains("exceeds the transformer's block size 12"));
        Ok(())
    }

    /// The causal mask: changing a later token never changes earlier logits; with n_unmasked the
    /// prefix sees itself bidirectionally.
    #[test]
    fn causal_and_unmasked_prefix() -> anyhow::Result<()> {
        let gpt = tiny(3)?;
        let a = Tensor::new(&[[1u32, 4, 7, 2, 9]], &Device::Cpu)?;
        let b = Tensor::new(&[[1u32, 4, 8, 2, 6]], &Device::Cpu)?;
        let la = gpt.forward(&a, None)?;
        let lb = gpt.forward(&b, None)?;
        // position 1 is inside the unmasked prefix: it sees token 2, which differs
        assert!(max_abs_diff(&la.narrow(1, 1, 1)?, &lb.narrow(1, 1, 1)?)? > 1e-4);
        let c = Tensor::new(&[[1u32, 4, 7, 2, 6]], &Device::Cpu)?;
        let lc = gpt.forward(&c, None)?;
        // only the last token differs: every earlier position is unchanged
        assert!(max_abs_diff(&la.narrow(1, 0, 4)?, &lc.narrow(1, 0, 4)?)? < 1e-6);
        Ok(())
    }

    #[test]
    fn out_of_vocabulary_and_block_size_errors() -> anyhow::Result<()> {
        let gpt = tiny(0)?;
        let e = gpt
            .forward(&Tensor::new(&[[1u32, 11]], &Device::Cpu)?, None)
            .unwrap_err();
        assert!(e.to_string().contains("token 11"), "{e}");
        let long = Tensor::zeros((1, 13), DType::U32, &Device::Cpu)?;
        let e = gpt.forward(&long, None).unwrap_err();
        assert!(e.to_string().contains("block size 12"), "{e}");
        Ok(())
    }
}
