//! `taming scenes`: writes a train/validation split of the procedural outdoor scenes
//! (`taming::scenes`: picture, label map and depth map from one seed) to a folder, the dataset of
//! the built-in model.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct ScenesArgs {
    /// Output folder (images/, segmentations/, depth/, train.txt, val.txt, labels.txt).
    pub out: PathBuf,
    /// Number of training scenes.
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    /// Number of validation scenes.
    #[arg(long, default_value_t = 100)]
    pub val: usize,
    /// Side of the square scenes in pixels.
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Seed of the whole dataset.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn scenes(a: ScenesArgs) -> anyhow::Result<ExitCode> {
    let bar = ProgressBar::new((a.train + a.val) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} scenes, ETA {eta}")?
            .progress_chars("=> "),
    );
    bar.set_message("rendering");
    let summary = taming::scenes::write_dataset(&a.out, a.train, a.val, a.size, a.seed, |d, _| {
        bar.set_position(d as u64)
    })?;
    bar.finish_and_clear();
    let total: u64 = summary.label_pixels.iter().sum::<u64>().max(1);
    println!(
        "wrote {} training and {} validation scenes of {}x{} to {}",
        summary.n_train,
        summary.n_val,
        summary.size,
        summary.size,
        summary.dir.display()
    );
    for (l, n) in taming::scenes::LABELS.iter().zip(summary.label_pixels) {
        println!(
            "  {:>2} {:<9} {:5.1}%",
            l.id,
            l.name,
            100.0 * n as f64 / total as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}
