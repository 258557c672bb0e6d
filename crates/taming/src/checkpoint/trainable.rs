//! Checkpoint tensors as trainable variables: a candle `VarMap` filled from a [`StateDict`], so
//! that a model built on it with `VarBuilder::from_varmap` starts from the checkpoint's weights and
//! can be optimised (torch's `load_state_dict` on a module whose parameters require grad).
//!
//! Loading stays strict: [`require_loaded`] fails, naming the key, when building the model had to
//! create a variable the checkpoint lacks; a variable of another shape is refused by the `VarMap`
//! itself with an error naming it.

use candle_core::{DType, Device, Var};
use candle_nn::VarMap;

use super::StateDict;
use crate::{Error, Result};

/// The float tensors of `sd` (those under `prefix`, with the prefix stripped) as variables of
/// `dtype` on `device`. Integer tensors (e.g. BatchNorm's `num_batches_tracked`) are left out.
pub fn varmap_from_state_dict(
    sd: &StateDict,
    prefix: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<VarMap> {
    let map = VarMap::new();
    {
        let mut data = map
            .data()
            .lock()
            .map_err(|_| Error::invalid("variable map lock poisoned"))?;
        for (k, t) in sd.tensors() {
            let local = match prefix {
                Some(p) => match k.strip_prefix(p) {
                    Some(l) => l,
                    None => continue,
                },
                None => k.as_str(),
            };
            if !t.dtype().is_float() {
                continue;
            }
            let v = Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?;
            data.insert(local.to_string(), v);
        }
    }
    Ok(map)
}

/// Checks, after a model was built on `map` (from [`varmap_from_state_dict`] of `sd`), that every
/// variable the model asked for came from the checkpoint.
pub fn require_loaded(map: &VarMap, sd: &StateDict, prefix: Option<&str>) -> Result<()> {
    let data = map
        .data()
        .lock()
        .map_err(|_| Error::invalid("variable map lock poisoned"))?;
    let mut missing: Vec<(&String, Vec<usize>)> = data
        .iter()
        .filter(|(k, _)| sd.get(&format!("{}{k}", prefix.unwrap_or(""))).is_none())
        .map(|(k, v)| (k, v.dims().to_vec()))
        .collect();
    missing.sort();
    match missing.first() {
        None => Ok(()),
        Some((k, dims)) => Err(Error::MissingTensor {
            source_name: sd.source().display().to_string(),
            key: format!("{}{k}", prefix.unwrap_or("")),
            expected: dims.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use candle_nn::VarBuilder;
    use std::collections::BTreeMap;

    #[test]
    fn loads_values_and_names_missing_keys() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut t = BTreeMap::new();
        t.insert("m.a".to_string(), Tensor::new(&[1f32, 2.0], &dev)?);
        t.insert("m.n".to_string(), Tensor::new(&[3i64], &dev)?);
        let sd = StateDict::from_tensors(t, "ck.safetensors");
        let map = varmap_from_state_dict(&sd, Some("m."), DType::F32, &dev)?;
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let a = vb.get(2, "a")?;
        assert_eq!(a.to_vec1::<f32>()?, [1.0, 2.0]);
        require_loaded(&map, &sd, Some("m."))?;
        let _ = vb.get(3, "b")?; // created fresh: the checkpoint lacks it
        let e = require_loaded(&map, &sd, Some("m."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.b") && e.contains("ck.safetensors"), "{e}");
        // a wrong shape is refused, naming the variable
        let e = vb.get(3, "a").unwrap_err().to_string();
        assert!(e.contains('a'), "{e}");
        Ok(())
    }
}
