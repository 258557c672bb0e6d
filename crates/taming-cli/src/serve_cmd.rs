//! `taming serve`: the interactive web demo (see the `taming-web` crate) for any model that
//! `taming sample` loads.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use taming_web::{ModelInfo, ServerConfig};

use crate::common::ModelArgs;
use crate::sample_cmd::{load_transformer, parse_dtype};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the demo to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sampling threads (jobs that run at once).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Jobs that may wait for a worker; further requests get HTTP 503 "busy".
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub queue: u16,
    /// Largest upload in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_upload_bytes: usize,
    /// Largest upload width and height in pixels.
    #[arg(long, default_value_t = 2048)]
    pub max_upload_side: u32,
    /// Largest output height and width in pixels.
    #[arg(long, default_value_t = 512)]
    pub max_size: usize,
    /// Least milliseconds between two partial decodes of a running job.
    #[arg(long, default_value_t = 300)]
    pub preview_ms: u64,
    /// Label names, lines `ID NAME` (default: labels.txt beside the checkpoint or the config).
    #[arg(long, value_name = "TXT")]
    pub labels: Option<PathBuf>,
    /// Transformer weight precision: f32, f16 or bf16 (the first stage stays f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let dtype = parse_dtype(&a.dtype)?;
    let (configs, ckpt) = a.model.paths()?;
    let labels_path = match &a.labels {
        Some(p) => Some(p.clone()),
        None => std::iter::once(ckpt.as_path())
            .chain(configs.iter().rev().map(|c| c.as_path()))
            .filter_map(|p| p.parent())
            .map(|d| d.join("labels.txt"))
            .find(|p| p.is_file()),
    };
    let names = match &labels_path {
        Some(p) => {
            let names = taming_web::model_info::read_labels_txt(p)?
                .with_context(|| format!("{}: no such file", p.display()))?;
            tracing::info!("label names from {}", p.display());
            names
        }
        None => Vec::new(),
    };
    let (model, _device) = load_transformer(&a.model, dtype)?;
    let info = ModelInfo::new(&model, &names);
    tracing::info!("serving a model conditioned on {}", info.description);
    let config = ServerConfig {
        host: a.host,
        port: a.port,
        workers: a.workers as usize,
        queue: a.queue as usize,
        max_upload_bytes: a.max_upload_bytes,
        max_upload_side: a.max_upload_side,
        max_output_side: a.max_size,
        preview_interval: Duration::from_millis(a.preview_ms),
        ..ServerConfig::default()
    };
    taming_web::run(model, info, config)?;
    Ok(ExitCode::SUCCESS)
}
