//! Training: the reference's `main.py` loop (PyTorch Lightning's `fit`) for both stages.
//!
//! - [`optim`]: Adam / AdamW with saved moments (exact resume);
//! - [`init`]: the reference's weight initialisation, seeded;
//! - [`run`]: the run directory, atomic safetensors checkpoints, `metrics.csv`;
//! - [`vqgan`]: a first-stage step (autoencoder + discriminator, two optimizers);
//! - [`gpt`]: a transformer step (cross-entropy over image tokens, `pkeep` corruption).
//!
//! [`fit`] drives a [`Trainer`] over batches from a [`BatchSource`]: it counts steps and epochs
//! as Lightning does, logs metrics at a fixed cadence, writes images at the reference's
//! `ImageLogger` cadence (powers of two, then every `batch_frequency` steps), saves `last` and
//! periodic checkpoints, runs validation at epoch ends, and stops cleanly (saving `last`) when
//! asked to. Everything random is derived from the run's seed and the step, so an interrupted and
//! resumed run computes exactly what an uninterrupted one does.

pub mod gpt;
pub mod init;
pub mod lr_scheduler;
pub mod optim;
pub mod run;
pub mod vqgan;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use image::RgbImage;

use crate::checkpoint::StateDict;
use crate::{Error, Result};
pub use run::{RunDir, TrainState};

/// One batch: tensors keyed as the reference's datasets key them (`image` (B, C, H, W) in [-1, 1],
/// `segmentation` one-hot (B, n_labels, H, W), `depth` (B, 1, H, W), `class_label` (B,) ...).
pub type Batch = BTreeMap<String, Tensor>;

/// Where batches come from.
pub trait BatchSource {
    /// Batches per epoch.
    fn batches_per_epoch(&self) -> usize;
    /// The batches of `epoch` from batch `start` on, in an order fixed by the seed and the epoch.
    fn epoch(&self, epoch: u64, start: usize) -> Box<dyn Iterator<Item = Result<Batch>> + '_>;
}

/// A model being trained.
pub trait Trainer {
    /// Names of the values [`Trainer::step`] returns, in column order.
    fn metric_names(&self) -> Vec<String>;
    /// One optimisation step on `batch` at `state.global_step` (before it is incremented).
    fn step(&mut self, batch: &Batch, state: &TrainState) -> Result<BTreeMap<String, f64>>;
    /// Names of the values [`Trainer::validate`] returns (averaged over the validation set).
    fn validation_names(&self) -> Vec<String>;
    /// Validation metrics of one batch (no update).
    fn validate(&self, batch: &Batch) -> Result<BTreeMap<String, f64>>;
    /// Model weights under the reference's state-dict keys plus optimizer states
    /// (under [`run::optimizer_prefix`]).
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>>;
    /// Restores what [`Trainer::state_tensors`] wrote.
    fn load_state(&mut self, sd: &StateDict) -> Result<()>;
    /// Pictures of the model's progress on `batch` (name, image), as the reference's `log_images`.
    fn log_images(&self, batch: &Batch, state: &TrainState) -> Result<Vec<(String, RgbImage)>>;
}

/// Cadences and limits of a run (from the config's `lightning:` section and the command line).
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Stop after this many optimizer steps (None: only `max_epochs` limits).
    pub max_steps: Option<u64>,
    /// Stop after this many epochs (None: only `max_steps` limits).
    pub max_epochs: Option<u64>,
    /// Write a metrics row every this many steps.
    pub log_every: u64,
    /// The reference's `ImageLogger.batch_frequency` (images at 1, 2, 4, ... then every N steps).
    pub image_every: u64,
    /// How many images of a batch to picture (`max_images`).
    pub max_images: usize,
    /// Save `last` and a numbered checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Run validation every this many epochs (0: never).
    pub validate_every_epochs: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            max_steps: None,
            max_epochs: None,
            log_every: 10,
            image_every: 750,
            max_images: 4,
            save_every: 1000,
            validate_every_epochs: 1,
        }
    }
}

/// Events reported to the caller besides steps.
#[derive(Debug, Clone)]
pub enum FitEvent {
    Step {
        step: u64,
        metrics: BTreeMap<String, f64>,
        images_per_s: f64,
        total_steps: Option<u64>,
        epoch: u64,
    },
    Validation {
        step: u64,
        metrics: BTreeMap<String, f64>,
    },
    Saved {
        step: u64,
        path: PathBuf,
    },
    Images {
        step: u64,
        paths: Vec<PathBuf>,
    },
}

/// How a fit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitEnd {
    /// `max_steps` / `max_epochs` reached.
    Finished,
    /// Stopped by the flag (Ctrl-C); `last` was saved.
    Interrupted,
}

/// Whether the reference's `ImageLogger` logs at `step` (powers of two up to the frequency, then
/// multiples of it).
pub fn image_log_due(step: u64, every: u64) -> bool {
    if every == 0 {
        return false;
    }
    step.is_multiple_of(every) || (step.is_power_of_two() && step <= every)
}

/// Runs the training loop from `state` until the limits are reached or `stop` is set.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    trainer: &mut dyn Trainer,
    train: &dyn BatchSource,
    validation: Option<&dyn BatchSource>,
    run: &RunDir,
    opts: &FitOptions,
    state: &mut TrainState,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(FitEvent),
) -> Result<FitEnd> {
    if opts.max_steps.is_none() && opts.max_epochs.is_none() {
        return Err(Error::invalid(
            "training needs a limit: max_steps or max_epochs",
        ));
    }
    let per_epoch = train.batches_per_epoch() as u64;
    if per_epoch == 0 {
        return Err(Error::invalid(
            "the training set yields no batch (fewer images than the batch size?)",
        ));
    }
    let total_steps = match (opts.max_steps, opts.max_epochs) {
        (Some(s), Some(e)) => Some(s.min(e * per_epoch)),
        (Some(s), None) => Some(s),
        (None, Some(e)) => Some(e * per_epoch),
        (None, None) => None,
    };
    let mut columns: Vec<String> = vec!["epoch".into(), "images_per_s".into()];
    columns.extend(trainer.metric_names());
    columns.extend(trainer.validation_names());
    let col_refs: Vec<&str> = columns.iter().map(String::as_str).collect();
    let mut csv = run::MetricsCsv::open(&run.metrics_csv(), &col_refs, Some(state.global_step))?;
    let save = |trainer: &dyn Trainer,
                state: &TrainState,
                numbered: bool,
                on_event: &mut dyn FnMut(FitEvent)|
     -> Result<()> {
        let tensors = trainer.state_tensors()?;
        if numbered {
            let p = run.step_checkpoint(state.global_step);
            run::save_checkpoint(&p, tensors.clone(), *state)?;
        }
        let p = run.last_checkpoint();
        run::save_checkpoint(&p, tensors, *state)?;
        on_event(FitEvent::Saved {
            step: state.global_step,
            path: p,
        });
        Ok(())
    };
    let done = |s: &TrainState| {
        opts.max_steps.is_some_and(|m| s.global_step >= m)
            || opts.max_epochs.is_some_and(|m| s.epoch >= m)
    };
    while !done(state) {
        let start = state.batch_in_epoch as usize;
        let mut batches = train.epoch(state.epoch, start);
        loop {
            if stop.load(Ordering::SeqCst) {
                drop(batches);
                save(trainer, state, false, on_event)?;
                return Ok(FitEnd::Interrupted);
            }
            if done(state) {
                break;
            }
            let Some(batch) = batches.next() else {
                // the epoch may yield fewer batches than planned (a batch whose every image was
                // unreadable is dropped): its end is the end of the epoch
                state.batch_in_epoch = per_epoch;
                break;
            };
            let batch = batch?;
            let n_images = batch
                .values()
                .next()
                .map(|t| t.dim(0))
                .transpose()?
                .unwrap_or(0);
            let t0 = Instant::now();
            let metrics = trainer.step(&batch, state)?;
            let dt = t0.elapsed().as_secs_f64();
            state.global_step += 1;
            state.batch_in_epoch += 1;
            let images_per_s = n_images as f64 / dt.max(1e-9);
            if state.global_step.is_multiple_of(opts.log_every.max(1)) || state.global_step == 1 {
                let mut row = metrics.clone();
                row.insert("epoch".into(), state.epoch as f64);
                row.insert("images_per_s".into(), images_per_s);
                csv.append(state.global_step, &row)?;
            }
            if image_log_due(state.global_step, opts.image_every) {
                let dir = run.images_dir().join("train");
                let mut paths = Vec::new();
                for (name, img) in trainer.log_images(&batch, state)? {
                    let p = dir.join(format!(
                        "{name}_gs-{:06}_e-{:06}_b-{:06}.png",
                        state.global_step, state.epoch, state.batch_in_epoch
                    ));
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    crate::image_io::save_png(&img, &p)?;
                    paths.push(p);
                }
                on_event(FitEvent::Images {
                    step: state.global_step,
                    paths,
                });
            }
            on_event(FitEvent::Step {
                step: state.global_step,
                metrics,
                images_per_s,
                total_steps,
                epoch: state.epoch,
            });
            if opts.save_every > 0 && state.global_step.is_multiple_of(opts.save_every) {
                save(trainer, state, true, on_event)?;
            }
        }
        drop(batches);
        if state.batch_in_epoch >= per_epoch {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            if let Some(val) = validation {
                if opts.validate_every_epochs > 0
                    && state.epoch.is_multiple_of(opts.validate_every_epochs)
                {
                    let metrics = match validate(trainer, val) {
                        Ok(m) => m,
                        Err(e) => {
                            // the weights are sound: keep them before reporting
                            save(trainer, state, false, on_event)?;
                            return Err(Error::invalid(format!(
                                "validation after epoch {} failed (the weights of step {} are \
                                 saved as last; fix the validation data and resume with -r): {e}",
                                state.epoch, state.global_step
                            )));
                        }
                    };
                    csv.append(state.global_step, &metrics)?;
                    on_event(FitEvent::Validation {
                        step: state.global_step,
                        metrics,
                    });
                }
            }
        }
    }
    save(trainer, state, false, on_event)?;
    Ok(FitEnd::Finished)
}

/// Averages [`Trainer::validate`] over a whole epoch of `source` (weighted by batch size).
pub fn validate(trainer: &dyn Trainer, source: &dyn BatchSource) -> Result<BTreeMap<String, f64>> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut n = 0f64;
    for batch in source.epoch(0, 0) {
        let batch = batch?;
        let b = batch
            .values()
            .next()
            .map(|t| t.dim(0))
            .transpose()?
            .unwrap_or(0) as f64;
        for (k, v) in trainer.validate(&batch)? {
            *sums.entry(k).or_default() += v * b;
        }
        n += b;
    }
    Ok(sums.into_iter().map(|(k, v)| (k, v / n.max(1.0))).collect())
}

/// A per-step random generator: the same (seed, step, stream) always gives the same numbers, so
/// noise does not depend on how many steps ran in this process.
pub fn step_rng(seed: u64, step: u64, stream: u64) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&step.to_le_bytes());
    key[16..24].copy_from_slice(&stream.to_le_bytes());
    rand_chacha::ChaCha8Rng::from_seed(key)
}

/// Codebook usage of a batch of indices: (perplexity, share of codes used).
pub fn codebook_usage(indices: &Tensor, n_embed: usize) -> Result<(f64, f64)> {
    let idx = indices
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    let mut counts = vec![0usize; n_embed.max(1)];
    for i in &idx {
        if let Some(c) = counts.get_mut(*i as usize) {
            *c += 1;
        }
    }
    let total = idx.len().max(1) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = *c as f64 / total;
            -p * p.ln()
        })
        .sum();
    let used = counts.iter().filter(|c| **c > 0).count() as f64 / n_embed.max(1) as f64;
    Ok((entropy.exp(), used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_cadence_matches_reference_logger() {
        let due: Vec<u64> = (1..=20).filter(|s| image_log_due(*s, 8)).collect();
        assert_eq!(due, [1, 2, 4, 8, 16]);
    }

    #[test]
    fn usage_of_uniform_codes() -> anyhow::Result<()> {
        let t = Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2, 3], &candle_core::Device::Cpu)?;
        let (ppl, used) = codebook_usage(&t, 8)?;
        assert!((ppl - 4.0).abs() < 1e-9 && (used - 0.5).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn step_rng_depends_on_step_only() {
        use rand::Rng;
        let a: u64 = step_rng(1, 5, 0).random();
        let b: u64 = step_rng(1, 5, 0).random();
        let c: u64 = step_rng(1, 6, 0).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
