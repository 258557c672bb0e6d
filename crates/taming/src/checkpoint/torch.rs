//! Reading `torch.save` files: the zip format of torch >= 1.6 (`<archive>/data.pkl` plus one
//! `<archive>/data/<key>` entry per storage, as written by `torch/serialization.py::_save`) and the
//! legacy format of torch < 1.6 (`_legacy_save`: magic number, protocol version and sys-info pickles,
//! the main pickle, the list of storage keys, then each storage as an 8-byte element count and its
//! raw bytes). The pickle is decoded by [`super::pickle`]; this module interprets the tensor
//! rebuilds of `torch/_utils.py` (`_rebuild_tensor_v2`, `_rebuild_parameter`, ...), the persistent
//! ids `('storage', <Type>Storage, key, location, numel[, view_metadata])` and
//! `collections.OrderedDict`, and tolerates everything else (optimizer state, OmegaConf objects,
//! callbacks) as opaque values.
//!
//! Memory: the file is memory-mapped by the caller; stored (uncompressed) zip entries and legacy
//! storages are read as slices of the map, and only the storages that state-dict tensors use are
//! ever touched. Each tensor is copied once, into a contiguous candle tensor of its native dtype.

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pickle::{self, Object, Value};
use crate::{Error, Result};

/// What a torch file held, once its tensors are materialised.
pub(crate) struct Loaded {
    /// The state dict's tensors.
    pub tensors: BTreeMap<String, Tensor>,
    /// Printable summaries of the other top-level entries (Lightning's `epoch`, `global_step`, ...).
    pub metadata: BTreeMap<String, String>,
    /// The pickle protocol of the main pickle.
    pub protocol: u8,
}

/// The element types of torch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TorchDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDType {
    /// From a storage class name (`FloatStorage`, `HalfStorage`, ..., `UntypedStorage` = bytes).
    fn from_storage_name(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "DoubleStorage" => TorchDType::F64,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" | "UntypedStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TorchDType::F32 => "float32",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::F64 => "float64",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
        }
    }
}

/// A storage named by a persistent id.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    /// The key of the stored storage (`data/<key>` in a zip, the root key in a legacy file).
    key: String,
    /// The storage type's class name, e.g. `FloatStorage`.
    type_name: String,
    /// Element offset of a legacy storage view within its root storage.
    view_offset: usize,
}

/// A tensor as `_rebuild_tensor_v2` would build it.
#[derive(Debug, Clone, PartialEq)]
struct TensorSpec {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorSpec {
    fn dtype(&self) -> std::result::Result<TorchDType, String> {
        TorchDType::from_storage_name(&self.storage.type_name)
            .ok_or_else(|| format!("unsupported storage type `{}`", self.storage.type_name))
    }
}

// ---------------------------------------------------------------------------------------------
// Interpreting the pickle tree
// ---------------------------------------------------------------------------------------------

fn non_negative(v: &Value, what: &str) -> std::result::Result<usize, String> {
    v.as_int()
        .and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| format!("{what} is not a non-negative int: {}", summary(v)))
}

fn int_tuple(v: &Value, what: &str) -> std::result::Result<Vec<usize>, String> {
    let items = v
        .as_seq()
        .ok_or_else(|| format!("{what} is not a tuple: {}", summary(v)))?;
    items.iter().map(|i| non_negative(i, what)).collect()
}

/// The storage named by a persistent id `('storage', type, key, location, numel[, view_metadata])`.
fn storage_ref(v: &Value) -> std::result::Result<StorageRef, String> {
    let Value::PersistentId(id) = v else {
        return Err(format!(
            "tensor storage is not a persistent id: {}",
            summary(v)
        ));
    };
    let items = id.as_seq().unwrap_or_default();
    if items.len() < 5 || items[0].as_str() != Some("storage") {
        return Err(format!("unsupported persistent id {}", summary(id)));
    }
    let type_name = match &items[1] {
        Value::Global { name, .. } => name.clone(),
        // Some writers give the storage type as a string.
        Value::Str(s) => s.rsplit('.').next().unwrap_or(s).to_string(),
        other => return Err(format!("storage type is not a class: {}", summary(other))),
    };
    let key = match &items[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => return Err(format!("storage key is not a string: {}", summary(other))),
    };
    let view_offset = match items.get(5) {
        None | Some(Value::None) => 0,
        Some(view) => {
            let view = view.as_seq().unwrap_or_default();
            match view.get(1) {
                Some(offset) => non_negative(offset, "storage view offset")?,
                None => return Err("malformed storage view metadata".to_string()),
            }
        }
    };
    Ok(StorageRef {
        key,
        type_name,
        view_offset,
    })
}

/// The tensor a value rebuilds, `Ok(None)` if it is not a tensor at all.
fn tensor_spec(v: &Value) -> std::result::Result<Option<TensorSpec>, String> {
    match v {
        Value::Object(o) => call_spec(&o.callable, &o.args),
        Value::Build { obj, .. } => tensor_spec(obj),
        _ => Ok(None),
    }
}

/// The tensor made by calling `callable(*args)`, if it is one of torch's tensor rebuilds.
fn call_spec(callable: &Value, args: &Value) -> std::result::Result<Option<TensorSpec>, String> {
    let Some((module, name)) = callable.as_global() else {
        return Ok(None);
    };
    if !module.starts_with("torch") {
        return Ok(None);
    }
    let args = args.as_seq().unwrap_or_default();
    match name {
        // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        // _rebuild_tensor(storage, storage_offset, size, stride)
        "_rebuild_tensor_v2" | "_rebuild_tensor" => {
            if args.len() < 4 {
                return Err(format!("{name} with {} arguments", args.len()));
            }
            let storage = storage_ref(&args[0])?;
            let offset = non_negative(&args[1], "storage offset")?;
            let shape = int_tuple(&args[2], "size")?;
            let stride = int_tuple(&args[3], "stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "size {shape:?} and stride {stride:?} differ in length"
                ));
            }
            Ok(Some(TensorSpec {
                storage,
                offset,
                shape,
                stride,
            }))
        }
        // _rebuild_parameter(data, requires_grad, backward_hooks)
        // _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => match args.first() {
            Some(data) => tensor_spec(data),
            None => Err(format!("{name} without arguments")),
        },
        // _rebuild_from_type_v2(func, new_type, args, state)
        "_rebuild_from_type_v2" | "_rebuild_from_type" => match (args.first(), args.get(2)) {
            (Some(func), Some(inner)) => call_spec(func, inner),
            _ => Err(format!("{name} with {} arguments", args.len())),
        },
        _ => Ok(None),
    }
}

/// Dict entries, borrowed from the pickle tree.
type Entries<'a> = Vec<(&'a Value, &'a Value)>;

/// The entries of a dict-like value: a `dict`, or a `collections.OrderedDict` (built empty then
/// filled by `SETITEMS`, or from a list of pairs).
fn dict_entries(v: &Value) -> Option<Entries<'_>> {
    match v {
        Value::Dict(items) => Some(items.iter().map(|(k, v)| (k, v)).collect()),
        Value::Object(o) if is_dict_class(o) => {
            let mut out = Vec::new();
            if let Some(first) = o.args.as_seq().and_then(|a| a.first()) {
                match first {
                    Value::Dict(items) => out.extend(items.iter().map(|(k, v)| (k, v))),
                    other => {
                        for pair in other.as_seq().unwrap_or_default() {
                            if let Some([k, v]) = pair.as_seq() {
                                out.push((k, v));
                            }
                        }
                    }
                }
            }
            out.extend(o.dict_items.iter().map(|(k, v)| (k, v)));
            Some(out)
        }
        Value::Build { obj, .. } => dict_entries(obj),
        _ => None,
    }
}

fn is_dict_class(o: &Object) -> bool {
    matches!(
        o.callable.as_global(),
        Some(("collections", "OrderedDict")) | Some(("builtins" | "__builtin__", "dict"))
    )
}

/// A short printable description of a value, for [`super::StateDict::metadata`].
pub(crate) fn summary(v: &Value) -> String {
    fn clip(s: &str) -> String {
        const MAX: usize = 80;
        match s.char_indices().nth(MAX) {
            Some((i, _)) => format!("{}...", &s[..i]),
            None => s.to_string(),
        }
    }
    if let Ok(Some(t)) = tensor_spec(v) {
        let dtype = t.dtype().map(TorchDType::name).unwrap_or("unknown dtype");
        return format!("tensor {:?} {dtype}", t.shape);
    }
    if let Some(entries) = dict_entries(v) {
        return format!("dict of {}", entries.len());
    }
    match v {
        Value::None => "None".to_string(),
        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Value::Int(i) => i.to_string(),
        Value::BigInt(b) => format!("int of {} bytes", b.len()),
        Value::Float(f) => format!("{f:?}"),
        Value::Str(s) => clip(s),
        Value::Bytes(b) => format!("bytes of {}", b.len()),
        Value::Tuple(v) => format!("tuple of {}", v.len()),
        Value::List(v) => format!("list of {}", v.len()),
        Value::Dict(v) => format!("dict of {}", v.len()),
        Value::Set(v) | Value::FrozenSet(v) => format!("set of {}", v.len()),
        Value::Global { module, name } => format!("{module}.{name}"),
        Value::Object(o) => match o.callable.as_global() {
            Some((module, name)) => format!("{module}.{name} object"),
            None => "object".to_string(),
        },
        Value::Build { obj, .. } => summary(obj),
        Value::PersistentId(id) => format!("persistent id {}", summary(id)),
    }
}

/// Splits a checkpoint's top-level value into the state dict's entries and the other entries.
///
/// A Lightning checkpoint keeps its weights under `state_dict`; some checkpoints use `model`; a
/// plain state dict (`.pth`) is the top-level dict itself.
fn split_top(top: &Value) -> std::result::Result<(Entries<'_>, Entries<'_>), String> {
    let entries = dict_entries(top).ok_or_else(|| {
        format!(
            "the checkpoint holds {}, not a dict of tensors",
            summary(top)
        )
    })?;
    for wanted in ["state_dict", "model"] {
        let found = entries
            .iter()
            .find(|(k, v)| k.as_str() == Some(wanted) && dict_entries(v).is_some());
        if let Some((_, sd)) = found {
            let rest = entries
                .iter()
                .filter(|(k, _)| k.as_str() != Some(wanted))
                .copied()
                .collect();
            return Ok((dict_entries(sd).unwrap_or_default(), rest));
        }
    }
    Ok((entries, Vec::new()))
}

/// Every storage named anywhere in the tree: key -> storage type name.
fn collect_storages(v: &Value, out: &mut HashMap<String, String>) {
    if let Value::PersistentId(_) = v {
        if let Ok(s) = storage_ref(v) {
            out.entry(s.key).or_insert(s.type_name);
        }
        return;
    }
    for child in v.children() {
        collect_storages(child, out);
    }
}

// ---------------------------------------------------------------------------------------------
// Storages and tensors
// ---------------------------------------------------------------------------------------------

/// Where storage bytes come from.
trait Storages {
    /// The raw bytes of storage `key`.
    fn bytes(&mut self, key: &str) -> std::result::Result<&[u8], String>;
    /// Whether storages are big-endian.
    fn big_endian(&self) -> bool;
}

/// Materialises the state dict and summarises the rest.
fn extract(
    path: &Path,
    top: &Value,
    storages: &mut dyn Storages,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let (state, rest) = split_top(top).map_err(err)?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (k, v) in rest {
        let key = k.as_str().map(str::to_string).unwrap_or_else(|| summary(k));
        metadata.insert(key, summary(v));
    }
    for (k, v) in state {
        let Some(key) = k.as_str() else {
            tracing::debug!(
                "{}: skipping state-dict entry with key {}",
                path.display(),
                summary(k)
            );
            continue;
        };
        let spec = match tensor_spec(v) {
            Ok(Some(spec)) => spec,
            Ok(None) => {
                // A non-tensor entry of a state dict (or of a plain top-level dict): keep it as metadata.
                metadata.insert(key.to_string(), summary(v));
                continue;
            }
            Err(msg) => return Err(err(format!("tensor `{key}`: {msg}"))),
        };
        let tensor =
            materialise(&spec, storages).map_err(|msg| err(format!("tensor `{key}`: {msg}")))?;
        tensors.insert(key.to_string(), tensor);
    }
    Ok((tensors, metadata))
}

/// Copies the elements a tensor spec selects from its storage into a contiguous candle tensor.
fn materialise(
    spec: &TensorSpec,
    storages: &mut dyn Storages,
) -> std::result::Result<Tensor, String> {
    let dtype = spec.dtype()?;
    let es = dtype.size();
    let big_endian = storages.big_endian();
    let bytes = storages.bytes(&spec.storage.key)?;
    let storage_len = bytes.len() / es;
    let numel = spec
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("element count overflows")?;
    let start = spec
        .offset
        .checked_add(spec.storage.view_offset)
        .ok_or("storage offset overflows")?;
    if numel == 0 {
        return to_candle(&[], dtype, &spec.shape).map_err(|e| e.to_string());
    }
    // The last element the view reaches must lie within the storage.
    let mut last = start;
    for (&d, &s) in spec.shape.iter().zip(&spec.stride) {
        last = (d - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or("strides overflow")?;
    }
    if last >= storage_len {
        return Err(format!(
            "storage `{}` has {storage_len} {} elements, the tensor (offset {}, size {:?}, stride {:?}) reaches element {last}",
            spec.storage.key,
            dtype.name(),
            spec.offset,
            spec.shape,
            spec.stride
        ));
    }
    let mut gathered;
    let mut data: &[u8] = if is_contiguous(&spec.shape, &spec.stride) {
        // Straight from the mapped file into the tensor: one copy.
        &bytes[start * es..(start + numel) * es]
    } else {
        gathered = Vec::with_capacity(numel * es);
        gather_strided(bytes, es, start, &spec.shape, &spec.stride, &mut gathered);
        &gathered
    };
    let swapped;
    if big_endian && es > 1 {
        let mut v = data.to_vec();
        for chunk in v.chunks_exact_mut(es) {
            chunk.reverse();
        }
        swapped = v;
        data = &swapped;
    }
    to_candle(data, dtype, &spec.shape).map_err(|e| e.to_string())
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// Row-major walk over `shape`, copying the element at `start + sum(index * stride)` each step.
fn gather_strided(
    bytes: &[u8],
    es: usize,
    start: usize,
    shape: &[usize],
    stride: &[usize],
    out: &mut Vec<u8>,
) {
    let mut index = vec![0usize; shape.len()];
    let mut at = start;
    loop {
        out.extend_from_slice(&bytes[at * es..(at + 1) * es]);
        // Increment the odometer from the last dimension.
        let mut dim = shape.len();
        loop {
            if dim == 0 {
                return;
            }
            dim -= 1;
            index[dim] += 1;
            at += stride[dim];
            if index[dim] < shape[dim] {
                break;
            }
            at -= stride[dim] * shape[dim];
            index[dim] = 0;
        }
    }
}

/// A candle tensor from little-endian element bytes: float and 64-bit/8-bit unsigned types keep their
/// dtype; int32, int16 and int8 widen to I64; bool becomes U8 (0 or 1).
fn to_candle(bytes: &[u8], dtype: TorchDType, shape: &[usize]) -> candle_core::Result<Tensor> {
    let dev = &Device::Cpu;
    match dtype {
        TorchDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, shape, dev),
        TorchDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, shape, dev),
        TorchDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, shape, dev),
        TorchDType::F64 => Tensor::from_raw_buffer(bytes, DType::F64, shape, dev),
        TorchDType::I64 => Tensor::from_raw_buffer(bytes, DType::I64, shape, dev),
        TorchDType::U8 => Tensor::from_raw_buffer(bytes, DType::U8, shape, dev),
        TorchDType::I32 => {
            let v: Vec<i64> = bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        TorchDType::I16 => {
            let v: Vec<i64> = bytes
                .chunks_exact(2)
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_vec(v, shape, dev)
        }
        TorchDType::I8 => {
            let v: Vec<i64> = bytes.iter().map(|&b| i64::from(b as i8)).collect();
            Tensor::from_vec(v, shape, dev)
        }
        TorchDType::Bool => {
            let v: Vec<u8> = bytes.iter().map(|&b| u8::from(b != 0)).collect();
            Tensor::from_vec(v, shape, dev)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The zip format
// ---------------------------------------------------------------------------------------------

struct ZipStorages<'a> {
    bytes: &'a [u8],
    archive: zip::ZipArchive<Cursor<&'a [u8]>>,
    /// Storage key -> index of its zip entry.
    entries: HashMap<String, usize>,
    /// Decompressed storages (only for archives whose entries are not stored uncompressed).
    inflated: HashMap<String, Vec<u8>>,
    big_endian: bool,
}

impl Storages for ZipStorages<'_> {
    fn bytes(&mut self, key: &str) -> std::result::Result<&[u8], String> {
        let index = *self
            .entries
            .get(key)
            .ok_or_else(|| format!("storage `{key}` is not in the archive"))?;
        if !self.inflated.contains_key(key) {
            let (data, inflate) = entry_data(&mut self.archive, self.bytes, index)?;
            match data {
                Some(slice) => return Ok(slice),
                None => {
                    self.inflated.insert(key.to_string(), inflate);
                }
            }
        }
        self.inflated
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("storage `{key}` could not be read"))
    }

    fn big_endian(&self) -> bool {
        self.big_endian
    }
}

/// The data of zip entry `index`: a slice of the mapped file when the entry is stored
/// uncompressed, else the inflated bytes.
fn entry_data<'a>(
    archive: &mut zip::ZipArchive<Cursor<&'a [u8]>>,
    bytes: &'a [u8],
    index: usize,
) -> std::result::Result<(Option<&'a [u8]>, Vec<u8>), String> {
    let file = archive
        .by_index_raw(index)
        .map_err(|e| format!("zip entry {index}: {e}"))?;
    let name = file.name().map(|n| n.into_owned()).unwrap_or_default();
    if file.compression() == zip::CompressionMethod::Stored && !file.encrypted() {
        let start = file
            .data_start()
            .ok_or_else(|| format!("zip entry `{name}`: unknown data offset"))?;
        let len = file.compressed_size();
        let end = start.saturating_add(len);
        if end > bytes.len() as u64 || len != file.size() {
            return Err(format!(
                "zip entry `{name}` ({len} bytes at offset {start}) lies beyond the end of the file ({} bytes): truncated file?",
                bytes.len()
            ));
        }
        return Ok((Some(&bytes[start as usize..end as usize]), Vec::new()));
    }
    drop(file);
    let mut file = archive
        .by_index(index)
        .map_err(|e| format!("zip entry `{name}`: {e}"))?;
    let mut out = Vec::with_capacity(usize::try_from(file.size()).unwrap_or(0).min(1 << 30));
    file.read_to_end(&mut out)
        .map_err(|e| format!("zip entry `{name}`: {e}"))?;
    Ok((None, out))
}

/// Loads a zip-format torch checkpoint from its mapped bytes.
pub(crate) fn load_zip(path: &Path, bytes: &[u8]) -> Result<Loaded> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        err(format!(
            "cannot read the zip archive (truncated or corrupt file?): {e}"
        ))
    })?;
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let pkl = names
        .iter()
        .filter(|n| n.as_str() == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .ok_or_else(|| {
            err("the zip archive has no `<archive>/data.pkl`; not a torch checkpoint".to_string())
        })?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let data_prefix = format!("{prefix}data/");
    let mut entries = HashMap::new();
    let mut big_endian = false;
    let mut pkl_index = None;
    for (i, name) in names.iter().enumerate() {
        if let Some(key) = name.strip_prefix(&data_prefix) {
            entries.insert(key.to_string(), i);
        } else if *name == pkl {
            pkl_index = Some(i);
        } else if name.strip_prefix(prefix) == Some("byteorder") {
            let (slice, owned) = entry_data(&mut archive, bytes, i).map_err(err)?;
            let order = slice.unwrap_or(&owned);
            big_endian = order.trim_ascii() == b"big";
        }
    }
    // `names` comes from the archive's central directory, so the index exists.
    let pkl_index = pkl_index.ok_or_else(|| err(format!("zip entry `{pkl}` vanished")))?;
    let (slice, owned) = entry_data(&mut archive, bytes, pkl_index).map_err(err)?;
    let pickle_bytes = slice.unwrap_or(&owned);
    let unpickled = pickle::load(pickle_bytes).map_err(|e| err(format!("`{pkl}`: {e}")))?;
    let mut storages = ZipStorages {
        bytes,
        archive,
        entries,
        inflated: HashMap::new(),
        big_endian,
    };
    let (tensors, metadata) = extract(path, &unpickled.value, &mut storages)?;
    Ok(Loaded {
        tensors,
        metadata,
        protocol: unpickled.protocol,
    })
}

// ---------------------------------------------------------------------------------------------
// The legacy format
// ---------------------------------------------------------------------------------------------

/// The magic number `torch.save` pickles first in a legacy file: 0x1950a86a20f9469cfc6c, as the
/// little-endian bytes a `LONG1` carries.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Whether `bytes` starts with a pickle of torch's legacy magic number.
pub(crate) fn is_legacy(bytes: &[u8]) -> bool {
    // The magic pickle is tiny; never scan a large prefix of an arbitrary file.
    let head = &bytes[..bytes.len().min(64)];
    matches!(pickle::load(head), Ok(p) if p.value == Value::BigInt(LEGACY_MAGIC.to_vec()))
}

struct LegacyStorages<'a> {
    /// Storage key -> its raw bytes.
    data: HashMap<String, &'a [u8]>,
    big_endian: bool,
}

impl Storages for LegacyStorages<'_> {
    fn bytes(&mut self, key: &str) -> std::result::Result<&[u8], String> {
        self.data
            .get(key)
            .copied()
            .ok_or_else(|| format!("storage `{key}` is not in the file's storage list"))
    }

    fn big_endian(&self) -> bool {
        self.big_endian
    }
}

/// Loads a legacy (torch < 1.6) checkpoint from its mapped bytes.
pub(crate) fn load_legacy(path: &Path, bytes: &[u8]) -> Result<Loaded> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut pos = 0usize;
    let next = |what: &str, pos: &mut usize| -> Result<pickle::Unpickled> {
        let p = pickle::load(&bytes[*pos..]).map_err(|e| {
            err(format!(
                "legacy format: {what} pickle at byte {}: {e}",
                *pos
            ))
        })?;
        *pos += p.end;
        Ok(p)
    };
    let magic = next("magic number", &mut pos)?;
    if magic.value != Value::BigInt(LEGACY_MAGIC.to_vec()) {
        return Err(err("legacy format: wrong magic number".to_string()));
    }
    let version = next("protocol version", &mut pos)?;
    if version.value.as_int() != Some(1001) {
        return Err(err(format!(
            "legacy format: unsupported protocol version {}",
            summary(&version.value)
        )));
    }
    let sys_info = next("sys info", &mut pos)?;
    let big_endian = dict_entries(&sys_info.value)
        .and_then(|e| {
            e.into_iter()
                .find(|(k, _)| k.as_str() == Some("little_endian"))
        })
        .map(|(_, v)| *v == Value::Bool(false))
        .unwrap_or(false);
    let main = next("main", &mut pos)?;
    let keys = next("storage keys", &mut pos)?;
    let keys = keys
        .value
        .as_seq()
        .ok_or_else(|| err("legacy format: the storage key list is not a list".to_string()))?;

    let mut types = HashMap::new();
    collect_storages(&main.value, &mut types);
    let mut data = HashMap::new();
    for key in keys {
        let key = match key {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            other => {
                return Err(err(format!(
                    "legacy format: storage key {}",
                    summary(other)
                )))
            }
        };
        let es = types
            .get(&key)
            .and_then(|t| TorchDType::from_storage_name(t))
            .map(TorchDType::size);
        let count = bytes
            .get(pos..pos + 8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                if big_endian {
                    u64::from_be_bytes(a)
                } else {
                    u64::from_le_bytes(a)
                }
            })
            .ok_or_else(|| {
                err(format!(
                    "legacy format: truncated file: storage `{key}` has no size at byte {pos}"
                ))
            })?;
        pos += 8;
        let Some(es) = es else {
            let t = types
                .get(&key)
                .map(String::as_str)
                .unwrap_or("unreferenced");
            return Err(err(format!(
                "legacy format: storage `{key}` has an unknown element size (type `{t}`), the rest of the file cannot be located"
            )));
        };
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(es))
            .filter(|&len| len <= bytes.len() - pos)
            .ok_or_else(|| {
                err(format!(
                    "legacy format: truncated file: storage `{key}` needs {count} elements of {es} bytes at byte {pos}, the file has {} bytes",
                    bytes.len()
                ))
            })?;
        data.insert(key, &bytes[pos..pos + len]);
        pos += len;
    }
    let mut storages = LegacyStorages { data, big_endian };
    let (tensors, metadata) = extract(path, &main.value, &mut storages)?;
    Ok(Loaded {
        tensors,
        metadata,
        protocol: main.protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_gather_walks_row_major() {
        // storage 0..12 (one byte each), view offset 1, shape (2, 3), stride (1, 4): [[1, 5, 9], [2, 6, 10]]
        let bytes: Vec<u8> = (0..12).collect();
        let mut out = Vec::new();
        gather_strided(&bytes, 1, 1, &[2, 3], &[1, 4], &mut out);
        assert_eq!(out, vec![1, 5, 9, 2, 6, 10]);
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[2, 1, 3], &[3, 7, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[], &[]));
    }

    #[test]
    fn widening_of_small_ints_and_bools() {
        let t = to_candle(&[0xff, 0x00, 0x02, 0x00], TorchDType::I16, &[2]).unwrap();
        assert_eq!(t.to_vec1::<i64>().unwrap(), vec![255, 2]);
        let t = to_candle(&[0xff, 0x02], TorchDType::I8, &[2]).unwrap();
        assert_eq!(t.to_vec1::<i64>().unwrap(), vec![-1, 2]);
        let t = to_candle(&[0, 7], TorchDType::Bool, &[2]).unwrap();
        assert_eq!(t.to_vec1::<u8>().unwrap(), vec![0, 1]);
    }
}
