//! `taming train`: the reference's `main.py --train` (`-b config.yaml [-b more.yaml] [key=value
//! ...] [-n name] [-r logdir]`) for first stages (VQGAN, segmentation VQ, ...) and transformers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use taming::config::{ModelConfig, ProjectConfig};
use taming::train::{self, FitEnd, FitEvent, FitOptions, RunDir, TrainState};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base config YAML (repeatable; merged left to right).
    #[arg(short = 'b', long = "base")]
    pub base: Vec<PathBuf>,
    /// Config overrides `key.sub=value` (as the reference's trailing arguments).
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run name appended to the timestamp (default: the first config's file name).
    #[arg(short = 'n', long)]
    pub name: Option<String>,
    /// Resume a run: its directory `logs/<run>` (continues from checkpoints/last.safetensors).
    #[arg(short = 'r', long = "resume")]
    pub resume: Option<PathBuf>,
    /// Folder that holds the runs.
    #[arg(long, default_value = "logs")]
    pub logdir: PathBuf,
    /// Seed of initialisation, data order and noise (the reference's default is 23).
    #[arg(short = 's', long, default_value_t = 23)]
    pub seed: u64,
    /// Stop after this many optimizer steps (else `lightning.trainer.max_steps`).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Stop after this many epochs (else `lightning.trainer.max_epochs`).
    #[arg(long)]
    pub max_epochs: Option<u64>,
    /// Start from these weights (a checkpoint with the model's state-dict keys), not from scratch.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Metrics row every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Checkpoint every N steps (else `lightning.modelcheckpoint.params.every_n_train_steps`, 1000).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Image logging frequency (else `lightning.callbacks.image_logger.params.batch_frequency`, 750).
    #[arg(long)]
    pub image_every: Option<u64>,
    /// LPIPS weights for the perceptual loss (a file holding `loss.perceptual_loss.*` or the
    /// bare LPIPS keys, e.g. a reference VQGAN checkpoint or `taming convert --lpips-only`
    /// output); default: the `--init` checkpoint's. Set `perceptual_weight: 0` to train without.
    #[arg(long)]
    pub lpips: Option<PathBuf>,
    /// Device: cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn lookup<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn lookup_u64(v: &Value, path: &[&str]) -> anyhow::Result<Option<u64>> {
    match lookup(v, path) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .with_context(|| format!("config `{}` = {x} is not a whole number", path.join("."))),
    }
}

pub fn train(a: TrainArgs) -> anyhow::Result<std::process::ExitCode> {
    let device = crate::common::device(&a.device)?;
    // configs and run directory
    let (run, config, resume_from) = match &a.resume {
        Some(dir) => {
            let run = RunDir::open(dir)?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(run.configs_dir())
                .with_context(|| format!("cannot read {}", run.configs_dir().display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .collect();
            files.sort();
            files.extend(a.base.iter().cloned());
            let config = ProjectConfig::from_files(&files, &a.overrides)?;
            let last = run.last_checkpoint();
            if !last.is_file() {
                bail!(
                    "cannot resume {}: {} is missing",
                    dir.display(),
                    last.display()
                );
            }
            (run, config, Some(last))
        }
        None => {
            if a.base.is_empty() {
                bail!("no config: pass -b CONFIG.yaml (or -r LOGDIR to resume a run)");
            }
            let config = ProjectConfig::from_files(&a.base, &a.overrides)?;
            let name = a.name.clone().unwrap_or_else(|| {
                a.base[0]
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let run = RunDir::create(&a.logdir, &name, &config.to_yaml())?;
            (run, config, None)
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let raw = &config.raw;
    // data
    let data_cfg = taming::data::DataConfig::from_project(&config)?;
    let batch_size = data_cfg.batch_size;
    let data = taming::data::DataModule::new(data_cfg)?;
    let seed = a.seed;
    let train_loader = data.train_loader(seed)?;
    let val_loader = data.val_loader(seed).ok();
    let train_src = taming::data::LoaderSource::new(train_loader, device.clone());
    let val_src = val_loader.map(|l| taming::data::LoaderSource::new(l, device.clone()));
    // schedule, as the reference reads it from the lightning section
    let accumulate =
        lookup_u64(raw, &["lightning", "trainer", "accumulate_grad_batches"])?.unwrap_or(1);
    if accumulate != 1 {
        bail!("lightning.trainer.accumulate_grad_batches = {accumulate}: only 1 is supported; raise the batch size instead");
    }
    let base_lr = config
        .base_learning_rate
        .context("the config has no model.base_learning_rate")?;
    let lr = base_lr * batch_size as f64 * accumulate as f64;
    println!(
        "Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * 1 (num_gpus) * {batch_size} (batchsize) * {base_lr:.2e} (base_lr)"
    );
    let opts = FitOptions {
        max_steps: a
            .max_steps
            .or(lookup_u64(raw, &["lightning", "trainer", "max_steps"])?),
        max_epochs: a
            .max_epochs
            .or(lookup_u64(raw, &["lightning", "trainer", "max_epochs"])?),
        log_every: a.log_every.max(1),
        image_every: a
            .image_every
            .or(lookup_u64(
                raw,
                &[
                    "lightning",
                    "callbacks",
                    "image_logger",
                    "params",
                    "batch_frequency",
                ],
            )?)
            .unwrap_or(750),
        max_images: lookup_u64(
            raw,
            &[
                "lightning",
                "callbacks",
                "image_logger",
                "params",
                "max_images",
            ],
        )?
        .unwrap_or(4) as usize,
        save_every: a
            .save_every
            .or(lookup_u64(
                raw,
                &[
                    "lightning",
                    "modelcheckpoint",
                    "params",
                    "every_n_train_steps",
                ],
            )?)
            .unwrap_or(1000),
        validate_every_epochs: 1,
    };
    if opts.max_steps.is_none() && opts.max_epochs.is_none() {
        bail!("no limit: pass --max-steps or --max-epochs (or set lightning.trainer.max_steps / max_epochs)");
    }
    let init = a
        .init
        .as_ref()
        .map(taming::checkpoint::StateDict::load)
        .transpose()?;
    // a taming-rs option (not Lightning's): restart codes no latent has chosen for a while
    let restart = lookup_u64(raw, &["lightning", "trainer", "restart_unused_codes"])?.unwrap_or(0);
    if restart > 0 && !matches!(config.model, ModelConfig::Vq(_)) {
        bail!("lightning.trainer.restart_unused_codes applies to first-stage (VQ) training only");
    }
    let mut trainer: Box<dyn train::Trainer> = match &config.model {
        ModelConfig::Vq(cfg) => {
            let mut t = train::vqgan::VqganTrainer::new(
                cfg,
                init.as_ref(),
                a.lpips.as_deref(),
                lr,
                seed,
                opts.max_images,
                &device,
            )?;
            t.set_restart_unused_codes(restart)?;
            Box::new(t)
        }
        ModelConfig::Transformer(cfg) => Box::new(train::gpt::GptTrainer::new(
            cfg,
            init.as_ref(),
            lr,
            seed,
            opts.max_images,
            &device,
        )?),
    };
    let mut state = TrainState {
        seed,
        ..Default::default()
    };
    if let Some(ck) = &resume_from {
        let (sd, st) = train::run::load_checkpoint(ck)?;
        if st.seed != seed {
            tracing::info!("resuming with the run's seed {} (not {seed})", st.seed);
        }
        trainer.load_state(&sd)?;
        state = st;
        println!(
            "resumed {} at step {} (epoch {}, batch {})",
            run.root.display(),
            state.global_step,
            state.epoch,
            state.batch_in_epoch
        );
    }
    println!("run directory: {}", run.root.display());
    // Ctrl-C: stop after the current step and save `last`; a second Ctrl-C quits at once
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: saving checkpoints/last.safetensors (Ctrl-C again to quit without saving)");
        });
    }
    let per_epoch = train::BatchSource::batches_per_epoch(&train_src) as u64;
    let total = match (opts.max_steps, opts.max_epochs) {
        (Some(s), Some(e)) => s.min(e * per_epoch),
        (Some(s), None) => s,
        (None, Some(e)) => e * per_epoch,
        (None, None) => 0,
    };
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:25}] {msg} [{elapsed_precise}, ETA {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(state.global_step);
    let mut on_event = |e: FitEvent| match e {
        FitEvent::Step {
            step,
            metrics,
            images_per_s,
            epoch,
            ..
        } => {
            bar.set_position(step);
            let shown: Vec<String> = metrics
                .iter()
                .filter(|(k, _)| k.ends_with("loss") || k.contains("perplexity"))
                .take(4)
                .map(|(k, v)| format!("{}={v:.4}", k.rsplit('/').next().unwrap_or(k)))
                .collect();
            bar.set_message(format!(
                "ep {epoch} {} {images_per_s:.1} img/s",
                shown.join(" ")
            ));
        }
        FitEvent::Validation { step, metrics } => {
            let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
            bar.println(format!("step {step}: {}", shown.join(" ")));
        }
        FitEvent::Saved { step, path } => tracing::debug!("step {step}: saved {}", path.display()),
        FitEvent::Images { step, paths } => tracing::debug!("step {step}: {} images", paths.len()),
    };
    let val_ref = val_src.as_ref().map(|v| v as &dyn train::BatchSource);
    let end = train::fit(
        trainer.as_mut(),
        &train_src,
        val_ref,
        &run,
        &opts,
        &mut state,
        &stop,
        &mut on_event,
    )?;
    bar.finish_and_clear();
    let skipped = train_src.skipped();
    if skipped > 0 {
        println!("{skipped} unreadable images were skipped (see the warnings above)");
    }
    println!(
        "{} at step {}: {}",
        if end == FitEnd::Interrupted {
            "interrupted"
        } else {
            "finished"
        },
        state.global_step,
        run.last_checkpoint().display()
    );
    Ok(if end == FitEnd::Interrupted {
        std::process::ExitCode::from(130)
    } else {
        std::process::ExitCode::SUCCESS
    })
}
