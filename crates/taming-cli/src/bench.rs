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
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<T>(warmup: usize, iters: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
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
