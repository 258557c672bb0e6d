//! Fresh weights as the reference initialises them, seeded so that a seed gives one model.
//!
//! candle's `VarBuilder::from_varmap` initialises with its own defaults (and zeros where a module
//! asks with `get` and no hint, such as the VQ codebook). After building a model on a `VarMap`,
//! [`reinit_vqgan`] / [`reinit_gpt`] overwrite every variable by the reference's rule:
//! - torch's default for `Conv2d`/`Linear` (`kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(fan_in),
//!   1/sqrt(fan_in)) for weights and biases), GroupNorm weight 1 and bias 0, and
//!   `VectorQuantizer2`'s codebook U(-1/n_e, 1/n_e) (`taming/modules/vqvae/quantize.py`);
//! - `GPT._init_weights` (`taming/modules/transformer/mingpt.py`): Linear and Embedding weights
//!   N(0, 0.02), biases 0, LayerNorm weight 1 and bias 0, `pos_emb` 0.

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// A seeded stream of values for initialisation (Box-Muller normals).
struct InitRng(ChaCha8Rng);

impl InitRng {
    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (self.0.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32)
            .collect()
    }
    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = 1.0 - self.0.random::<f64>();
                let u2: f64 = self.0.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    }
}

/// Sorted (name, var) pairs of a VarMap (sorted so the order, and hence the values drawn, is stable).
pub fn sorted_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = map.all_vars_named();
    let mut v: Vec<(String, Var)> = data.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Named variables of a VarMap (helper trait so the sorting lives in one place).
pub trait NamedVars {
    fn all_vars_named(&self) -> Vec<(String, Var)>;
}

impl NamedVars for VarMap {
    fn all_vars_named(&self) -> Vec<(String, Var)> {
        match self.data().lock() {
            Ok(d) => d.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

fn set(var: &Var, values: Vec<f32>) -> Result<()> {
    let t = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
    var.set(&t)?;
    Ok(())
}

/// Fan-in of a weight (out, in, kh, kw) or (out, in).
fn fan_in(dims: &[usize]) -> usize {
    dims.iter().skip(1).product::<usize>().max(1)
}

/// Re-initialises a VQGAN-style model (encoder/decoder convs, GroupNorms, codebook) built on `map`
/// as the reference's constructors do (the codebook by quantizer: `VectorQuantizer2` uniform,
/// `GumbelQuantize` and `EMAVectorQuantizer` standard normal, the EMA statistics from it).
/// `n_embed` is the codebook size. Variables under `skip_prefixes` are left alone.
pub fn reinit_vqgan(map: &VarMap, seed: u64, n_embed: usize, skip_prefixes: &[&str]) -> Result<()> {
    let mut rng = InitRng(ChaCha8Rng::seed_from_u64(seed));
    let vars = sorted_vars(map);
    let ema = vars.iter().any(|(k, _)| k.ends_with("embedding.embed_avg"));
    for (name, var) in &vars {
        if skip_prefixes.iter().any(|p| name.starts_with(p)) || !var.dtype().is_float() {
            continue;
        }
        let n = var.elem_count();
        let dims = var.dims().to_vec();
        let is_norm = name.contains("norm");
        if name.ends_with("embedding.cluster_size") {
            // EMAVectorQuantizer: no code has been seen yet
            set(var, vec![0.0; n])?;
        } else if name.ends_with("embedding.embed_avg") {
            // set together with the codebook it starts equal to (below)
        } else if name.ends_with("embedding.weight") && ema {
            // EmbeddingEMA: weight = torch.randn(K, D), embed_avg = weight.clone()
            let values = rng.normal(n, 1.0);
            if let Some((_, avg)) = vars
                .iter()
                .find(|(k, _)| k.ends_with("embedding.embed_avg"))
            {
                set(avg, values.clone())?;
            }
            set(var, values)?;
        } else if name.ends_with("embed.weight") {
            // GumbelQuantize's codebook is a plain nn.Embedding: N(0, 1)
            set(var, rng.normal(n, 1.0))?;
        } else if name.ends_with("embedding.weight") {
            // VectorQuantizer2: uniform(-1/K, 1/K)
            set(var, rng.uniform(n, 1.0 / n_embed as f64))?;
        } else if is_norm && name.ends_with(".weight") {
            set(var, vec![1.0; n])?;
        } else if is_norm && name.ends_with(".bias") {
            set(var, vec![0.0; n])?;
        } else if name.ends_with(".weight") {
            set(var, rng.uniform(n, 1.0 / (fan_in(&dims) as f64).sqrt()))?;
        } else if name.ends_with(".bias") {
            // the bias bound uses the fan-in of the matching weight
            let wname = format!("{}.weight", name.trim_end_matches(".bias"));
            let fi = vars
                .iter()
                .find(|(k, _)| *k == wname)
                .map(|(_, w)| fan_in(w.dims()))
                .unwrap_or(1);
            set(var, rng.uniform(n, 1.0 / (fi as f64).sqrt()))?;
        }
    }
    Ok(())
}

/// Re-initialises a GPT built on `map` by `GPT._init_weights`; `prefix` is its path in the map
/// (e.g. `""` or `"transformer."`).
pub fn reinit_gpt(map: &VarMap, seed: u64, prefix: &str) -> Result<()> {
    let mut rng = InitRng(ChaCha8Rng::seed_from_u64(seed));
    for (name, var) in sorted_vars(map) {
        let Some(local) = name.strip_prefix(prefix) else {
            continue;
        };
        let n = var.elem_count();
        let is_ln = local.starts_with("ln_f") || local.contains(".ln1.") || local.contains(".ln2.");
        let values = if local == "pos_emb" || local.ends_with(".bias") {
            vec![0.0; n]
        } else if is_ln {
            vec![1.0; n]
        } else {
            rng.normal(n, 0.02)
        };
        set(&var, values)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    #[test]
    fn gpt_init_follows_reference_rule_and_seed() -> anyhow::Result<()> {
        let cfg = crate::config::GptConfig {
            vocab_size: 16,
            block_size: 8,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            n_unmasked: 0,
            embd_pdrop: 0.0,
            resid_pdrop: 0.0,
            attn_pdrop: 0.0,
        };
        let make = |seed| -> anyhow::Result<VarMap> {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            crate::transformer::Gpt::new(&cfg, vb)?;
            reinit_gpt(&map, seed, "")?;
            Ok(map)
        };
        let (a, b, c) = (make(1)?, make(1)?, make(2)?);
        let get = |m: &VarMap, k: &str| {
            m.data().lock().unwrap()[k]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(get(&a, "head.weight"), get(&b, "head.weight"));
        assert_ne!(get(&a, "head.weight"), get(&c, "head.weight"));
        assert!(get(&a, "pos_emb").iter().all(|v| *v == 0.0));
        assert!(get(&a, "blocks.0.ln1.weight").iter().all(|v| *v == 1.0));
        assert!(get(&a, "blocks.0.attn.key.bias").iter().all(|v| *v == 0.0));
        let w = get(&a, "tok_emb.weight");
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.006, "std {std}");
        Ok(())
    }
}
