//! A candle `VarBuilder` backend over a loaded [`super::StateDict`]: like candle's own
//! safetensors/pth backends (`candle_nn::var_builder`), but strict about shapes, with error messages
//! that name the checkpoint file, the key and both shapes, and recording which keys a model read so
//! that unused checkpoint entries can be reported (as Lightning's `load_state_dict(strict=True)` does).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor};

use super::StateDict;
use crate::Error;

/// Records the keys a model read from a [`StateDict`] through its [`StateDict::var_builder`].
/// Clones share the record.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl Usage {
    fn lock(&self) -> MutexGuard<'_, BTreeSet<String>> {
        // A panic elsewhere while holding the lock cannot leave a set of names inconsistent.
        self.used
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, key: &str) {
        self.lock().insert(key.to_string());
    }

    /// The keys read so far.
    pub fn used(&self) -> BTreeSet<String> {
        self.lock().clone()
    }

    /// Keys of `sd` that were not read, split into (skipped on purpose: keys starting with any of
    /// `ignored_prefixes`, e.g. `"loss."`; unexpected: the rest), each sorted.
    pub fn unused(&self, sd: &StateDict, ignored_prefixes: &[&str]) -> (Vec<String>, Vec<String>) {
        let used = self.lock();
        sd.keys()
            .filter(|k| !used.contains(*k))
            .map(str::to_string)
            .partition(|k| ignored_prefixes.iter().any(|p| k.starts_with(p)))
    }
}

/// The [`candle_nn::var_builder::SimpleBackend`] behind [`StateDict::var_builder`].
pub(crate) struct Backend {
    pub(crate) tensors: Arc<BTreeMap<String, Tensor>>,
    /// How error messages name the checkpoint (its path).
    pub(crate) source_name: String,
    pub(crate) usage: Usage,
}

fn msg(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl candle_nn::var_builder::SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            msg(Error::MissingTensor {
                source_name: self.source_name.clone(),
                key: name.to_string(),
                expected: s.dims().to_vec(),
            })
        })?;
        if t.dims() != s.dims() {
            return Err(msg(Error::ShapeMismatch {
                source_name: self.source_name.clone(),
                key: name.to_string(),
                found: t.dims().to_vec(),
                expected: s.dims().to_vec(),
            }));
        }
        self.usage.record(name);
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "checkpoint {}: missing tensor `{name}`",
                self.source_name
            ))
        })?;
        self.usage.record(name);
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
