//! `taming inspect`, `taming convert` and `taming verify`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use taming::checkpoint::StateDict;
use taming::config::{CondStageConfig, ModelConfig, ProjectConfig, VqModelConfig};
use taming::model::LoadReport;

use crate::common::{ModelArgs, DTYPE};

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// List every unread key, not only the first few.
    #[arg(long)]
    pub all_keys: bool,
}

#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory: receives model.safetensors and config.yaml.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Leave out training-only tensors (`loss.*`: LPIPS and discriminator weights;
    /// `optimizer_states.*`: the optimizer moments of `taming train` checkpoints).
    #[arg(long)]
    pub inference_only: bool,
    /// Store floating-point weights as f16 or bf16 (half the file; models load them as float32),
    /// or f32. Default: as they are.
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Fixture folders, each with config.yaml, model.ckpt and io.safetensors.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Device: cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn describe_vq(cfg: &VqModelConfig) -> String {
    let dd = &cfg.ddconfig;
    let f = 1usize << (dd.ch_mult.len().saturating_sub(1));
    format!(
        "{:?}: {} codes of dim {}, f={f} ({}x{} input -> {}x{} codes), ch {} x {:?}, {} res blocks, attention at {:?}, {} in / {} out channels",
        cfg.kind,
        cfg.n_embed,
        cfg.embed_dim,
        dd.resolution,
        dd.resolution,
        dd.resolution / f,
        dd.resolution / f,
        dd.ch,
        dd.ch_mult,
        dd.num_res_blocks,
        dd.attn_resolutions,
        dd.in_channels,
        dd.out_ch
    )
}

/// Loads every part of the model this build knows, returning one report per part.
fn load_parts(config: &ProjectConfig, sd: &StateDict) -> anyhow::Result<Vec<(String, LoadReport)>> {
    let dev = candle_core::Device::Cpu;
    let mut parts = Vec::new();
    match &config.model {
        ModelConfig::Vq(cfg) => {
            let (_, r) = taming::model::load_vq(cfg, sd, DTYPE, &dev)?;
            parts.push(("first stage".to_string(), r));
        }
        ModelConfig::Transformer(t) => {
            let (_, r) =
                taming::model::load_vq(&t.first_stage, &sd.sub("first_stage_model."), DTYPE, &dev)
                    .context("first_stage_model")?;
            parts.push(("first_stage_model".to_string(), r));
            if let CondStageConfig::Vq(c) = &t.cond_stage {
                let (_, r) = taming::model::load_vq(c, &sd.sub("cond_stage_model."), DTYPE, &dev)
                    .context("cond_stage_model")?;
                parts.push(("cond_stage_model".to_string(), r));
            }
        }
    }
    Ok(parts)
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let (config, sd) = a.model.load()?;
    println!("checkpoint: {}", sd.source().display());
    if let Some(f) = sd.format() {
        println!("  format: {f:?}");
    }
    for (k, v) in sd.metadata() {
        println!("  {k}: {v}");
    }
    // parameters per top-level module
    let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (k, t) in sd.tensors() {
        let top = k.split('.').next().unwrap_or(k).to_string();
        let e = groups.entry(top).or_default();
        e.0 += 1;
        e.1 += t.elem_count();
    }
    println!(
        "  {} tensors, {} values:",
        sd.len(),
        groups.values().map(|g| g.1).sum::<usize>()
    );
    for (g, (n, p)) in &groups {
        println!("    {g:<20} {n:>5} tensors {p:>12} values");
    }
    println!("model:");
    match &config.model {
        ModelConfig::Vq(cfg) => println!("  {}", describe_vq(cfg)),
        ModelConfig::Transformer(t) => {
            println!("  Net2NetTransformer: GPT {:?}", t.transformer);
            println!("  first stage: {}", describe_vq(&t.first_stage));
            match &t.cond_stage {
                CondStageConfig::Vq(c) => println!("  cond stage: {}", describe_vq(c)),
                other => println!("  cond stage: {other:?}"),
            }
            println!(
                "  permuter: {:?}, cond_stage_key: {}",
                t.permuter, t.cond_stage_key
            );
        }
    }
    for w in &config.warnings {
        println!("  config warning: {w}");
    }
    for (name, r) in load_parts(&config, &sd)? {
        println!(
            "{name}: loads ({} tensors read, {} training-only skipped, {} unread)",
            r.used,
            r.skipped.len(),
            r.unexpected.len()
        );
        let shown = if a.all_keys { r.unexpected.len() } else { 10 };
        for k in r.unexpected.iter().take(shown) {
            println!("    unread: {k}");
        }
        if r.unexpected.len() > shown {
            println!("    ... {} more (--all-keys)", r.unexpected.len() - shown);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn convert(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    let (config, sd) = a.model.load()?;
    // refuse to convert something that does not load
    load_parts(&config, &sd)?;
    let sd = if a.inference_only {
        let keep = sd
            .tensors()
            .iter()
            .filter(|(k, _)| {
                !k.contains(".loss.")
                    && !taming::model::TRAINING_ONLY_PREFIXES
                        .iter()
                        .any(|p| k.starts_with(p))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        StateDict::from_tensors(keep, sd.source())
    } else {
        sd
    };
    let sd = match &a.dtype {
        None => sd,
        Some(name) => {
            let dtype = crate::sample_cmd::parse_dtype(name)?;
            let mut cast = std::collections::BTreeMap::new();
            for (k, v) in sd.tensors() {
                let v = if v.dtype().is_float() {
                    v.to_dtype(dtype)
                        .with_context(|| format!("cannot store {k} as {name}"))?
                } else {
                    v.clone()
                };
                cast.insert(k.clone(), v);
            }
            StateDict::from_tensors(cast, sd.source())
        }
    };
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("cannot create {}", a.output.display()))?;
    let weights = a.output.join("model.safetensors");
    sd.save_safetensors(&weights)?;
    let cfg_path = a.output.join("config.yaml");
    taming::image_io::write_atomic(&cfg_path, config.to_yaml().as_bytes())?;
    // read back what was written
    let back = StateDict::load(&weights)?;
    let back_cfg = ProjectConfig::from_files(&[&cfg_path], &[])?;
    load_parts(&back_cfg, &back).context("the converted files do not load")?;
    println!(
        "wrote {} ({} tensors) and {}",
        weights.display(),
        back.len(),
        cfg_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let device = crate::common::device(&a.device)?;
    let (mut passed, mut failed, mut broken) = (0, 0, 0);
    for dir in &a.dirs {
        match taming::verify::verify_dir(dir, &device) {
            Ok(report) => {
                print!("{}", report.render());
                passed += report.passed();
                failed += report.failed();
                if report.checks.is_empty() {
                    println!("  (nothing this build can check)");
                }
            }
            Err(e) => {
                println!("{}: cannot load the fixture: {e}", dir.display());
                broken += 1;
            }
        }
    }
    if a.dirs.len() > 1 || broken > 0 {
        println!("{passed} passed, {}", format_failed(failed, broken));
    }
    Ok(if failed == 0 && broken == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn format_failed(failed: usize, broken: usize) -> String {
    if broken > 0 {
        format!(
            "{} failed ({broken} fixtures could not be loaded)",
            failed + broken
        )
    } else {
        format!("{failed} failed")
    }
}
