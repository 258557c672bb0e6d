//! `taming bench train`: training-step throughput, printed as JSON lines.
//!
//! - a first-stage config: one full VQGAN step (autoencoder forward and backward with the
//!   generator loss and the adaptive weight, Adam, then the discriminator step) with the
//!   discriminator active (`global_step = disc_start`), fresh seeded weights, random images;
//!   reports images/s;
//! - a transformer config: one GPT step (forward over `block_size` tokens, cross-entropy,
//!   backward, AdamW) on random tokens, fresh weights; reports tokens/s. The frozen stages'
//!   encoding is not part of it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use taming::config::{ModelConfig, ProjectConfig};
use taming::train::{self, TrainState, Trainer};

#[derive(Args)]
pub struct TrainBench {
    /// Project config YAML (repeatable, merged).
    #[arg(short = 'c', long = "config", required = true)]
    pub config: Vec<PathBuf>,
    /// Config override `key.sub=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Batch size.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Image size (square) for first-stage configs.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// LPIPS weights (needed unless the config sets perceptual_weight: 0).
    #[arg(long)]
    pub lpips: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn train(b: TrainBench) -> anyhow::Result<ExitCode> {
    let dev = Device::Cpu;
    let config = ProjectConfig::from_files(&b.config, &b.overrides)?;
    let threads = candle_core::utils::get_num_threads();
    match &config.model {
        ModelConfig::Vq(cfg) => {
            let mut t = train::vqgan::VqganTrainer::new(cfg, None, b.lpips.as_deref(), 1e-4, 0, 1, &dev)
                .context("building the VQGAN trainer (pass --lpips FILE or --set model.params.lossconfig.params.perceptual_weight=0)")?;
            let disc_start = config
                .raw
                .pointer("/model/params/lossconfig/params/disc_start")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let c = cfg.ddconfig.in_channels;
            let mut times = Vec::new();
            let mut last = BTreeMap::new();
            for i in 0..b.warmup + b.steps.max(1) {
                let x = Tensor::rand(-1f32, 1f32, (b.batch, c, b.size, b.size), &dev)?;
                let mut batch = BTreeMap::new();
                batch.insert(cfg.image_key.clone(), x);
                let state = TrainState {
                    global_step: disc_start + i as u64,
                    ..Default::default()
                };
                let t0 = Instant::now();
                last = t.step(&batch, &state)?;
                if i >= b.warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            let s = median(times);
            let line = serde_json::json!({
                "bench": "train_vqgan",
                "batch": b.batch,
                "size": b.size,
                "threads": threads,
                "disc_active": last.get("train/disc_factor").copied().unwrap_or(0.0) > 0.0,
                "s_per_step": s,
                "images_per_s": b.batch as f64 / s,
            });
            println!("{line}");
        }
        ModelConfig::Transformer(cfg) => {
            let g = &cfg.transformer;
            let map = VarMap::new();
            let gpt =
                taming::transformer::Gpt::new(g, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
            train::init::reinit_gpt(&map, 0, "")?;
            let params = train::init::sorted_vars(&map)
                .into_iter()
                .map(|(k, v)| (k, v, 0.01))
                .collect();
            let mut opt =
                train::optim::Adam::new(params, train::optim::AdamConfig::adamw(1e-4, 0.9, 0.95))?;
            let t_len = g.block_size;
            let mut times = Vec::new();
            for i in 0..b.warmup + b.steps.max(1) {
                let idx = Tensor::rand(0f32, g.vocab_size as f32, (b.batch, t_len), &dev)?
                    .floor()?
                    .clamp(0f32, (g.vocab_size - 1) as f32)?
                    .to_dtype(DType::U32)?;
                let t0 = Instant::now();
                let input = idx.narrow(1, 0, t_len - 1)?;
                let target = idx.narrow(1, 1, t_len - 1)?;
                let logits = gpt.forward(&input, None)?;
                let loss =
                    taming::cond_transformer::Net2NetTransformer::cross_entropy(&logits, &target)?;
                opt.step(&loss.backward()?)?;
                if i >= b.warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            let s = median(times);
            let line = serde_json::json!({
                "bench": "train_transformer",
                "batch": b.batch,
                "tokens_per_sequence": t_len - 1,
                "threads": threads,
                "s_per_step": s,
                "tokens_per_s": (b.batch * (t_len - 1)) as f64 / s,
            });
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
