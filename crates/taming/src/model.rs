//! Building a whole model from a typed config and a checkpoint, with a report of what was read.
//!
//! The reference's `instantiate_from_config` + `load_state_dict`: here loading is strict (every
//! tensor the config's model needs must be present with its shape), and keys that inference does
//! not need (the training loss's `loss.*`: LPIPS and discriminator weights) are skipped on purpose
//! and counted; any other unread key is listed as unexpected.

use std::path::PathBuf;

use candle_core::{DType, Device};

use crate::checkpoint::StateDict;
use crate::config::VqModelConfig;
use crate::first_stage::VqModel;
use crate::Result;

/// What loading read, skipped and did not recognise.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub checkpoint: PathBuf,
    /// Number of tensors the model read.
    pub used: usize,
    /// Keys skipped on purpose (training-only weights such as `loss.*`).
    pub skipped: Vec<String>,
    /// Keys the model did not read and that are not known training-only weights.
    pub unexpected: Vec<String>,
}

impl LoadReport {
    /// One-line summary for logs.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} tensors loaded, {} not needed for inference skipped (training losses, attention masks)",
            self.checkpoint.display(),
            self.used,
            self.skipped.len()
        );
        if !self.unexpected.is_empty() {
            s.push_str(&format!(
                ", {} unexpected keys ignored: {}",
                self.unexpected.len(),
                preview(&self.unexpected)
            ));
        }
        s
    }
}

fn preview(keys: &[String]) -> String {
    let mut s = keys.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > 5 {
        s.push_str(&format!(", ... ({} more)", keys.len() - 5));
    }
    s
}

/// Prefixes of keys that only training reads, relative to a first-stage model.
/// (`optimizer_states.`: the optimizer moments in checkpoints written by `taming train`.)
pub const TRAINING_ONLY_PREFIXES: &[&str] = &["loss.", "optimizer_states."];

/// Builds the report after a model has been built from `sd` through a tracked var builder.
pub fn report(sd: &StateDict, usage: &crate::checkpoint::Usage, ignored: &[&str]) -> LoadReport {
    let (skipped, unexpected) = usage.unused(sd, ignored);
    LoadReport {
        checkpoint: sd.source().to_path_buf(),
        used: usage.used().len(),
        skipped,
        unexpected,
    }
}

/// Loads a first-stage model (any VQ kind) from a state dict whose keys are the model's own
/// (`encoder.*`, `quantize.*`, ...).
pub fn load_vq(
    cfg: &VqModelConfig,
    sd: &StateDict,
    dtype: DType,
    device: &Device,
) -> Result<(VqModel, LoadReport)> {
    let (vb, usage) = sd.var_builder(dtype, device);
    let model = VqModel::new(cfg, vb)?;
    Ok((model, report(sd, &usage, TRAINING_ONLY_PREFIXES)))
}
