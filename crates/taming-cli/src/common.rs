//! Options shared by the subcommands: which model (config + checkpoint, or a reference log
//! directory) and which device.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use taming::checkpoint::StateDict;
use taming::config::ProjectConfig;

/// Which model to load.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Project config YAML (repeat to merge several, left to right, as the reference's `-b`).
    #[arg(short = 'c', long = "config")]
    pub config: Vec<PathBuf>,
    /// Checkpoint: Lightning .ckpt, torch .pth/.pt, or .safetensors.
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// A reference log directory `logs/<run>/` (its configs/*-project.yaml and checkpoints/last.ckpt).
    #[arg(short = 'r', long = "resume")]
    pub resume: Option<PathBuf>,
    /// Config override `key.sub=value` (repeatable), as the reference's `main.py model.params.x=1`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Device: cpu, cuda or metal (cuda/metal need the build feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The built-in model used when no model is named (set by the command, not a flag here).
    #[arg(skip)]
    pub builtin: Builtin,
}

/// The built-in models (trained by taming-rs on its procedural scenes, shipped in `models/`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Builtin {
    /// Label map to picture (`models/scenes`).
    #[default]
    Labels,
    /// Depth map to picture (`models/scenes-depth`).
    Depth,
}

impl Builtin {
    /// Its folder: the environment variable when set (`TAMING_BUILTIN_MODEL`,
    /// `TAMING_BUILTIN_DEPTH_MODEL`), else under `models/` of the repository this binary was
    /// built from (config.yaml, model.safetensors, labels.txt).
    pub fn dir(self) -> PathBuf {
        let (var, name) = match self {
            Builtin::Labels => ("TAMING_BUILTIN_MODEL", "scenes"),
            Builtin::Depth => ("TAMING_BUILTIN_DEPTH_MODEL", "scenes-depth"),
        };
        match std::env::var_os(var) {
            Some(dir) => PathBuf::from(dir),
            None => {
                let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
                // crates/taming-cli -> the workspace root
                let root = crate_dir
                    .parent()
                    .and_then(|p| p.parent())
                    .unwrap_or(crate_dir);
                root.join("models").join(name)
            }
        }
    }
}

impl ModelArgs {
    /// True when no model was named: commands then use the built-in model.
    pub fn is_unset(&self) -> bool {
        self.config.is_empty() && self.ckpt.is_none() && self.resume.is_none()
    }

    /// Resolves the config files and the checkpoint path; with no model named, the built-in one.
    pub fn paths(&self) -> anyhow::Result<(Vec<PathBuf>, PathBuf)> {
        if self.is_unset() {
            let dir = self.builtin.dir();
            let (cfg, ckpt) = (dir.join("config.yaml"), dir.join("model.safetensors"));
            if !cfg.is_file() || !ckpt.is_file() {
                bail!(
                    "no model given (--config/--ckpt or -r LOGDIR) and the built-in model is missing: \
                     expected {} and {}",
                    cfg.display(),
                    ckpt.display()
                );
            }
            return Ok((vec![cfg], ckpt));
        }
        let (mut configs, mut ckpt) = (self.config.clone(), self.ckpt.clone());
        if let Some(dir) = &self.resume {
            let (cfgs, ck) = taming::config::find_configs(dir)?;
            if configs.is_empty() {
                configs = cfgs;
            }
            if ckpt.is_none() {
                ckpt = Some(ck);
            }
        }
        if configs.is_empty() {
            bail!("no model config: pass --config FILE.yaml or -r LOGDIR");
        }
        let ckpt = ckpt.context("no checkpoint: pass --ckpt FILE or -r LOGDIR")?;
        Ok((configs, ckpt))
    }

    /// Loads config and checkpoint, printing config warnings.
    pub fn load(&self) -> anyhow::Result<(ProjectConfig, StateDict)> {
        let (configs, ckpt) = self.paths()?;
        let config = ProjectConfig::from_files(&configs, &self.overrides)?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let sd = StateDict::load(&ckpt)?;
        Ok((config, sd))
    }

    pub fn device(&self) -> anyhow::Result<Device> {
        device(&self.device)
    }
}

/// Parses a device name.
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            Device::new_cuda(0).context("cannot open CUDA device 0 (is the `cuda` feature built?)")
        }
        "metal" => Device::new_metal(0)
            .context("cannot open Metal device 0 (is the `metal` feature built?)"),
        other => bail!("unknown device `{other}`: use cpu, cuda or metal"),
    }
}

/// Model weights are float32 unless asked otherwise.
pub const DTYPE: DType = DType::F32;
