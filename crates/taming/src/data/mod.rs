//! Training data: the reference's `data:` section, from config to batches.
//!
//! Mirrors `main.py`'s `DataModuleFromConfig` (a `train` / `validation` / `test` dataset each,
//! `batch_size`, `num_workers`), the datasets of `taming/data/` and its `custom_collate`:
//! - [`spec`]: the `data:` block typed ([`DataConfig`], [`DatasetSpec`]), strict about names;
//! - [`dataset`]: the examples of a split and how one is decoded and augmented;
//! - [`loader`]: seeded, prefetching batching ([`Loader`]) and the training loop's
//!   [`crate::train::BatchSource`] ([`LoaderSource`]).
//!
//! Batches are keyed as the reference's examples: `image` (B, 3, H, W) in [-1, 1],
//! `segmentation` one-hot (B, n_labels, H, W), `depth` (B, 1, H, W) in [-1, 1], `class_label`
//! (B,) u32: the reference's HWC arrays after `get_input`'s permute to NCHW.
//!
//! From the CLI:
//! ```no_run
//! # fn main() -> taming::Result<()> {
//! # let config = taming::config::ProjectConfig::from_files(&["run.yaml"], &[])?;
//! use taming::data::{DataConfig, DataModule, LoaderSource};
//! let data = DataModule::new(DataConfig::from_project(&config)?)?;
//! let train = LoaderSource::new(data.train_loader(23)?, candle_core::Device::Cpu);
//! let val = data.val_loader(23).ok().map(|l| LoaderSource::new(l, candle_core::Device::Cpu));
//! # Ok(()) }
//! ```

pub mod dataset;
pub mod loader;
pub mod spec;

use std::sync::Arc;

pub use dataset::{Dataset, Example, Kind};
pub use loader::{Batches, Loader, LoaderSource};
pub use spec::{DataConfig, DatasetSpec, DepthNaming, Resample, Source, Transform};

use crate::{Error, Result};

/// The datasets of a `data:` section, built (list files read, files checked).
#[derive(Debug, Clone)]
pub struct DataModule {
    cfg: DataConfig,
    train: Option<Arc<Dataset>>,
    validation: Option<Arc<Dataset>>,
    test: Option<Arc<Dataset>>,
}

fn build(specs: &Option<Vec<DatasetSpec>>) -> Result<Option<Arc<Dataset>>> {
    specs
        .as_deref()
        .map(|s| Dataset::build(s).map(Arc::new))
        .transpose()
}

impl DataModule {
    /// Builds every configured split; errors name the list file and line of a missing file.
    pub fn new(cfg: DataConfig) -> Result<Self> {
        Ok(Self {
            train: build(&cfg.train)?,
            validation: build(&cfg.validation)?,
            test: build(&cfg.test)?,
            cfg,
        })
    }

    pub fn config(&self) -> &DataConfig {
        &self.cfg
    }

    fn loader(
        &self,
        split: &Option<Arc<Dataset>>,
        name: &str,
        shuffle: bool,
        seed: u64,
    ) -> Result<Loader> {
        let ds = split.as_ref().ok_or_else(|| Error::Config {
            origin: format!("data.params.{name}"),
            msg: format!("the config has no `{name}` dataset"),
        })?;
        Loader::new(
            ds.clone(),
            self.cfg.batch_size,
            self.cfg.num_workers,
            shuffle,
            seed,
        )
    }

    /// Training batches: shuffled, random augmentations as configured, all seeded by `seed`.
    pub fn train_loader(&self, seed: u64) -> Result<Loader> {
        self.loader(&self.train, "train", true, seed)
    }

    /// Validation batches in list order; Err when the config has no `validation` section.
    pub fn val_loader(&self, seed: u64) -> Result<Loader> {
        self.loader(&self.validation, "validation", false, seed)
    }

    /// Test batches in list order; Err when the config has no `test` section.
    pub fn test_loader(&self, seed: u64) -> Result<Loader> {
        self.loader(&self.test, "test", false, seed)
    }

    /// Training examples (0 without a `train` section).
    pub fn train_len(&self) -> usize {
        self.train.as_ref().map_or(0, |d| d.len())
    }

    /// Validation examples (0 without a `validation` section).
    pub fn val_len(&self) -> usize {
        self.validation.as_ref().map_or(0, |d| d.len())
    }

    /// Test examples (0 without a `test` section).
    pub fn test_len(&self) -> usize {
        self.test.as_ref().map_or(0, |d| d.len())
    }

    pub fn train_dataset(&self) -> Option<&Dataset> {
        self.train.as_deref()
    }

    pub fn val_dataset(&self) -> Option<&Dataset> {
        self.validation.as_deref()
    }
}
