//! `taming bench`: timings printed as JSON lines.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use taming::config::{ModelConfig, ProjectConfig};
use taming::first_stage::VqModel;

use crate::common::{ModelArgs, DTYPE};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Encode and decode one image with a first-stage model.
    FirstStage(FirstStageBench),
    /// Autoregressive sampling with the KV cache (the transformer only).
    Sample(SampleBench),
    /// Training steps: images/s for a VQGAN step with the discriminator active, tokens/s for a
    /// transformer step.
    Train(crate::bench_train::TrainBench),
}

#[derive(Args)]
pub struct SampleBench {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Random transformer weights (only the config is read).
    #[arg(long)]
    pub random_weights: bool,
    /// Condition tokens before the image tokens.
    #[arg(long, default_value_t = 256)]
    pub cond_tokens: usize,
    /// Image tokens to sample.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Sequences sampled together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Transformer weight precision: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Args)]
pub struct FirstStageBench {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image size (square).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Random weights instead of a checkpoint (only the config is read).
    #[arg(long)]
    pub random_weights: bool,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::FirstStage(b) => first_stage(b),
        BenchCmd::Sample(b) => sample(b),
        BenchCmd::Train(b) => crate::bench_train::train(b),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<T>(
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::new();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn first_stage(b: FirstStageBench) -> anyhow::Result<ExitCode> {
    let device = b.model.device()?;
    let (model, cfg_path): (VqModel, PathBuf) = if b.random_weights {
        if b.model.config.is_empty() {
            bail!("--random-weights needs --config FILE.yaml");
        }
        let config = ProjectConfig::from_files(&b.model.config, &b.model.overrides)?;
        let ModelConfig::Vq(cfg) = &config.model else {
            bail!("`bench first-stage` needs a first-stage (VQ model) config");
        };
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DTYPE, &device);
        (VqModel::new(cfg, vb)?, b.model.config[0].clone())
    } else {
        let (m, _, _) = crate::first_stage_cmds::load_first_stage(&b.model)?;
        (m, b.model.paths()?.0[0].clone())
    };
    let c = model.in_channels();
    let x = Tensor::randn(0f32, 1f32, (b.batch, c, b.size, b.size), &device)?.clamp(-1f32, 1f32)?;
    let sync = || -> anyhow::Result<()> { Ok(device.synchronize()?) };
    let q = model.encode(&x)?;
    let enc = time(b.warmup, b.iters, || {
        let q = model.encode(&x)?;
        sync()?;
        Ok(q)
    })?;
    let dec = time(b.warmup, b.iters, || {
        let y = model.decode(&q.quant)?;
        sync()?;
        Ok(y)
    })?;
    let threads = candle_core::utils::get_num_threads();
    for (op, secs) in [("encode", enc), ("decode", dec)] {
        println!(
            "{}",
            serde_json::json!({
                "bench": "first-stage", "op": op, "config": cfg_path.display().to_string(),
                "size": b.size, "batch": b.batch, "seconds": secs,
                "images_per_second": b.batch as f64 / secs, "device": format!("{device:?}"),
                "threads": threads, "dtype": format!("{:?}", DType::F32),
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Copy rate of this machine in bytes copied per second (a 512 MiB buffer copied a few times,
/// one thread), the figure the transformer issue quotes ("the machine copies about 12 GB/s").
fn copy_rate() -> f64 {
    let n = 1usize << 27; // 128 Mi f32 = 512 MiB
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best
}

/// Read bandwidth in bytes per second with `threads` threads each summing its share of a 1 GiB
/// buffer: the bound for batch-1 sampling, which reads every weight once per token.
fn read_bandwidth(threads: usize) -> f64 {
    let n = 1usize << 27; // 128 Mi u64 = 1 GiB
    let buf: Vec<u64> = (0..n as u64).collect();
    let chunk = n.div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &v| a.wrapping_add(v))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best
}

fn sample(b: SampleBench) -> anyhow::Result<ExitCode> {
    use taming::sampling::{sample_sequence, SamplingOptions};
    let device = b.model.device()?;
    let dtype = crate::sample_cmd::parse_dtype(&b.dtype)?;
    let gpt = if b.random_weights {
        if b.model.config.is_empty() {
            bail!("--random-weights needs --config FILE.yaml");
        }
        let config = ProjectConfig::from_files(&b.model.config, &b.model.overrides)?;
        let ModelConfig::Transformer(cfg) = &config.model else {
            bail!("`bench sample` needs a Net2NetTransformer config");
        };
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &device);
        taming::transformer::Gpt::new(&cfg.transformer, vb.pp("transformer"))?;
        // plain tensors, as a loaded checkpoint gives, not trainable variables
        let weights: std::collections::HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("random weights: poisoned lock"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(weights, dtype, &device);
        taming::transformer::Gpt::new(&cfg.transformer, vb.pp("transformer"))?
    } else {
        let (m, _) = crate::sample_cmd::load_transformer(&b.model, dtype)?;
        m.gpt().clone()
    };
    let cfg = gpt.config().clone();
    let params: usize = {
        let n = cfg.n_embd;
        cfg.n_layer * (12 * n * n + 13 * n) + cfg.vocab_size * n * 2 + cfg.block_size * n + 2 * n
    };
    let bytes_per_token = params as f64 * dtype.size_in_bytes() as f64;
    let c = Tensor::from_vec(
        (0..b.batch * b.cond_tokens)
            .map(|i| (i % cfg.vocab_size) as u32)
            .collect::<Vec<_>>(),
        (b.batch, b.cond_tokens),
        &device,
    )?;
    let empty = Tensor::zeros((b.batch, 0), DType::U32, &device)?;
    let opts = SamplingOptions {
        top_k: Some(100),
        seed: 0,
        ..Default::default()
    };
    // warm-up: a few tokens
    sample_sequence(&gpt, &c, &empty, 4, &opts, None, &mut |_| {
        taming::sampling::Control::Continue
    })?;
    let t = Instant::now();
    let mut first = None;
    sample_sequence(&gpt, &c, &empty, b.tokens, &opts, None, &mut |p| {
        if p.done == 1 {
            first = Some(t.elapsed().as_secs_f64());
        }
        taming::sampling::Control::Continue
    })?;
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let prefill = first.unwrap_or(0.0);
    let per_token = (secs - prefill) / (b.tokens.max(2) - 1) as f64;
    let copy = copy_rate();
    let read = read_bandwidth(candle_core::utils::get_num_threads());
    let bound = bytes_per_token / read;
    println!(
        "{}",
        serde_json::json!({
            "bench": "sample", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "vocab_size": cfg.vocab_size, "params": params, "dtype": format!("{dtype:?}"),
            "cond_tokens": b.cond_tokens, "tokens": b.tokens, "batch": b.batch,
            "seconds": secs, "seconds_per_image": secs / b.batch as f64,
            "prefill_seconds": prefill, "seconds_per_step": per_token,
            "tokens_per_second": (b.tokens * b.batch) as f64 / secs,
            "weight_bytes": bytes_per_token,
            "copy_gb_s": copy / 1e9, "read_bandwidth_gb_s": read / 1e9,
            "bound_seconds_per_step": bound, "step_vs_bound": per_token / bound,
            "step_vs_copy_bound": per_token / (bytes_per_token / copy),
            "threads": candle_core::utils::get_num_threads(), "device": format!("{device:?}"),
        })
    );
    Ok(ExitCode::SUCCESS)
}
