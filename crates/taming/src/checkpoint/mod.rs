//! Checkpoints: what the reference loads with `torch.load(path, map_location="cpu")["state_dict"]`
//! (`taming/models/vqgan.py::init_from_ckpt`, `scripts/sample_*.py`), read without Python.
//!
//! [`StateDict::load`] sniffs the format from the file's bytes: the zip format of `torch.save`
//! (torch >= 1.6, any pickle protocol), the legacy non-zip format (torch < 1.6), or safetensors.
//! candle's own `candle_core::pickle` reader only handles zip files with protocol-2 pickles: on
//! the fixtures' protocol-4 checkpoint it fails with "unknown op-code 149" (`FRAME`) and on the
//! legacy one with "invalid Zip archive" (test `candle_pickle_limitations`). Our reader ([`pickle`]
//! and the private `torch` module) handles protocols 0-5 and the legacy format, and tolerates what
//! Lightning adds around the weights (optimizer state, callbacks keyed by classes, hyper-parameters).
//! Files are memory-mapped and only state-dict tensors are materialised.
//!
//! [`StateDict::var_builder`] hands the tensors to candle models with strict shape checks and
//! records which keys were read ([`Usage`]), so unused checkpoint entries can be reported.

pub mod pickle;
mod st;
mod torch;
pub mod trainable;
mod var_builder;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use var_builder::Usage;

use crate::{Error, Result};

/// The on-disk format a [`StateDict`] was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// `torch.save` zip archive (torch >= 1.6), with the protocol of its `data.pkl`.
    TorchZip { protocol: u8 },
    /// `torch.save` legacy format (torch < 1.6, `_use_new_zipfile_serialization=False`).
    TorchLegacy,
    /// A safetensors file.
    Safetensors,
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointFormat::TorchZip { protocol } => {
                write!(f, "torch zip (pickle protocol {protocol})")
            }
            CheckpointFormat::TorchLegacy => write!(f, "torch legacy (torch < 1.6)"),
            CheckpointFormat::Safetensors => write!(f, "safetensors"),
        }
    }
}

/// Named tensors of a checkpoint (CPU, in their stored dtype), with where they came from.
#[derive(Clone)]
pub struct StateDict {
    tensors: Arc<BTreeMap<String, Tensor>>,
    source: PathBuf,
    format: Option<CheckpointFormat>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for StateDict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDict")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl StateDict {
    /// Loads a checkpoint, sniffing the format from the file's bytes (zip magic `PK\x03\x04`, the
    /// legacy pickle magic number, a safetensors header), not from the extension.
    ///
    /// Lightning checkpoints: the top-level dict's `state_dict` entry holds the tensors and the other
    /// entries become [`StateDict::metadata`]; a plain state dict (e.g. `.pth`) is used as is; a
    /// top-level `model` dict is used like `state_dict`.
    pub fn load(path: impl AsRef<Path>) -> Result<StateDict> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                msg: "unknown checkpoint format: the file is empty".to_string(),
            });
        }
        // SAFETY: the map is only read, and only while `file` is open within this function. As with
        // every memory map, a concurrent truncation of the file by another process would fault;
        // checkpoints are not rewritten while being read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bytes: &[u8] = &map;

        let (format, tensors, metadata) = if bytes.starts_with(b"PK\x03\x04") {
            let loaded = torch::load_zip(path, bytes)?;
            let format = CheckpointFormat::TorchZip {
                protocol: loaded.protocol,
            };
            (format, loaded.tensors, loaded.metadata)
        } else if st::is_safetensors(bytes) {
            let (tensors, metadata) = st::load(path, bytes)?;
            (CheckpointFormat::Safetensors, tensors, metadata)
        } else if torch::is_legacy(bytes) {
            let loaded = torch::load_legacy(path, bytes)?;
            (
                CheckpointFormat::TorchLegacy,
                loaded.tensors,
                loaded.metadata,
            )
        } else {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!(
                    "unknown checkpoint format: not a torch zip archive, a legacy torch file or a safetensors file (first bytes: {})",
                    head.join(" ")
                ),
            });
        };
        tracing::debug!(
            "loaded {} tensors from {} ({format})",
            tensors.len(),
            path.display()
        );
        Ok(StateDict {
            tensors: Arc::new(tensors),
            source: path.to_path_buf(),
            format: Some(format),
            metadata,
        })
    }

    /// A state dict made in memory (e.g. by a conversion); it has no format and no metadata.
    pub fn from_tensors(
        tensors: BTreeMap<String, Tensor>,
        source: impl Into<PathBuf>,
    ) -> StateDict {
        StateDict {
            tensors: Arc::new(tensors),
            source: source.into(),
            format: None,
            metadata: BTreeMap::new(),
        }
    }

    /// The same tensors with `metadata` (written as safetensors `__metadata__` on save).
    pub fn with_metadata(mut self, metadata: BTreeMap<String, String>) -> StateDict {
        self.metadata = metadata;
        self
    }

    /// The file the tensors came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The format of that file (`None` for [`StateDict::from_tensors`]).
    pub fn format(&self) -> Option<&CheckpointFormat> {
        self.format.as_ref()
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor called `key`.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    /// All tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// Top-level entries of a Lightning checkpoint other than `state_dict`, as short printable
    /// strings (`"global_step"` -> `"7"`, `"optimizer_states"` -> `"list of 1"`), plus non-tensor
    /// entries of the state dict itself; for safetensors files, their `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The tensors whose names start with `prefix`, with the prefix removed (e.g. `"first_stage_model."`).
    pub fn sub(&self, prefix: &str) -> StateDict {
        let tensors = self
            .tensors
            .iter()
            .filter_map(|(k, t)| {
                k.strip_prefix(prefix)
                    .map(|rest| (rest.to_string(), t.clone()))
            })
            .collect();
        StateDict {
            tensors: Arc::new(tensors),
            source: self.source.clone(),
            format: self.format.clone(),
            metadata: self.metadata.clone(),
        }
    }

    /// Writes all tensors (and the metadata, as safetensors `__metadata__`) to a safetensors file,
    /// atomically: a temporary file in the same directory is renamed into place once complete.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        st::save(path.as_ref(), &self.tensors, &self.metadata)
    }

    /// A candle `VarBuilder` reading from this state dict: a missing key or a tensor of another shape
    /// than the model asks for is an error naming the checkpoint, the key and the shapes; tensors
    /// are converted to `dtype` on `device`. The returned [`Usage`] records the keys read.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> (candle_nn::VarBuilder<'static>, Usage) {
        let usage = Usage::default();
        let backend = var_builder::Backend {
            tensors: Arc::clone(&self.tensors),
            source_name: self.source.display().to_string(),
            usage: usage.clone(),
        };
        let vb = candle_nn::VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        (vb, usage)
    }
}
