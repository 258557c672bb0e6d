//! Safetensors files (the Hugging Face `safetensors` format: an 8-byte little-endian header length,
//! a JSON header of dtypes, shapes and offsets, then the raw little-endian data), read from a
//! memory map and written atomically. Dtypes follow the torch reader's conventions
//! ([`super::torch`]): int32/int16/int8 widen to I64 and bool becomes U8.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::{Error, Result};

/// Whether `bytes` looks like a safetensors file: a header length that fits the file, then `{`.
pub(crate) fn is_safetensors(bytes: &[u8]) -> bool {
    let Some(head) = bytes.get(..8) else {
        return false;
    };
    let mut a = [0u8; 8];
    a.copy_from_slice(head);
    let n = u64::from_le_bytes(a);
    n >= 2 && n <= (bytes.len() as u64).saturating_sub(8) && bytes.get(8) == Some(&b'{')
}

/// Reads every tensor (and the `__metadata__` strings) of a mapped safetensors file.
pub(crate) fn load(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| err(format!("safetensors: {e}")))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| err(format!("safetensors: {e}")))?;
    let metadata = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = view_to_tensor(view.dtype(), view.shape(), view.data())
            .map_err(|msg| err(format!("tensor `{name}`: {msg}")))?;
        tensors.insert(name, t);
    }
    Ok((tensors, metadata))
}

fn view_to_tensor(
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> std::result::Result<Tensor, String> {
    let dev = &Device::Cpu;
    let raw = |dt: DType| Tensor::from_raw_buffer(data, dt, shape, dev).map_err(|e| e.to_string());
    let widen = |v: Vec<i64>| Tensor::from_vec(v, shape, dev).map_err(|e| e.to_string());
    match dtype {
        Dtype::F32 => raw(DType::F32),
        Dtype::F16 => raw(DType::F16),
        Dtype::BF16 => raw(DType::BF16),
        Dtype::F64 => raw(DType::F64),
        Dtype::I64 => raw(DType::I64),
        Dtype::U32 => raw(DType::U32),
        Dtype::U8 => raw(DType::U8),
        Dtype::I32 => widen(
            data.chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        Dtype::I16 => widen(
            data.chunks_exact(2)
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        Dtype::I8 => widen(data.iter().map(|&b| i64::from(b as i8)).collect()),
        Dtype::BOOL => Tensor::from_vec(
            data.iter().map(|&b| u8::from(b != 0)).collect::<Vec<u8>>(),
            shape,
            dev,
        )
        .map_err(|e| e.to_string()),
        other => Err(format!("unsupported safetensors dtype {other:?}")),
    }
}

fn st_dtype(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::U8 => Dtype::U8,
        DType::U32 => Dtype::U32,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        _ => return None,
    })
}

/// The little-endian bytes of a tensor's elements, in row-major order.
fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    fn le<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        f: fn(T) -> [u8; N],
    ) -> candle_core::Result<Vec<u8>> {
        Ok(t.flatten_all()?
            .to_vec1::<T>()?
            .into_iter()
            .flat_map(f)
            .collect())
    }
    match t.dtype() {
        DType::U8 => le::<u8, 1>(t, |x| [x]),
        DType::U32 => le(t, u32::to_le_bytes),
        DType::I16 => le(t, i16::to_le_bytes),
        DType::I32 => le(t, i32::to_le_bytes),
        DType::I64 => le(t, i64::to_le_bytes),
        DType::BF16 => le(t, half::bf16::to_le_bytes),
        DType::F16 => le(t, half::f16::to_le_bytes),
        DType::F32 => le(t, f32::to_le_bytes),
        DType::F64 => le(t, f64::to_le_bytes),
        other => Err(candle_core::Error::Msg(format!(
            "dtype {other:?} cannot be saved"
        ))),
    }
}

/// A tensor whose bytes are produced only when the writer asks for them, so that saving needs
/// memory for one tensor's copy at a time. `View::data` cannot fail, so a failure is parked in
/// `error` (and an empty buffer returned); the caller checks it and discards the file.
struct LazyView<'a> {
    tensor: &'a Tensor,
    dtype: Dtype,
    error: &'a RefCell<Option<String>>,
    name: &'a str,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match tensor_bytes(self.tensor) {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                self.error
                    .borrow_mut()
                    .get_or_insert_with(|| format!("tensor `{}`: {e}", self.name));
                Cow::Owned(Vec::new())
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()
    }
}

/// Writes `tensors` (and `metadata` as `__metadata__`) to `path` atomically: the file is written
/// under a temporary name in the same directory and renamed into place once complete.
pub(crate) fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| err("not a file path".to_string()))?
        .to_string_lossy();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));

    let error = RefCell::new(None);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = st_dtype(t.dtype()).ok_or_else(|| {
            err(format!(
                "tensor `{name}`: dtype {:?} cannot be saved as safetensors",
                t.dtype()
            ))
        })?;
        views.push((
            name.as_str(),
            LazyView {
                tensor: t,
                dtype,
                error: &error,
                name,
            },
        ));
    }
    let info: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let info = (!info.is_empty()).then_some(info);
    let written = safetensors::tensor::serialize_to_file(views, info, &tmp);
    let failure = match written {
        Err(e) => Some(format!("writing {}: {e}", tmp.display())),
        Ok(()) => error.borrow_mut().take(),
    };
    if let Some(msg) = failure {
        // Best effort: the temporary file is useless now, and its absence is what matters.
        let _ = std::fs::remove_file(&tmp);
        return Err(err(msg));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
