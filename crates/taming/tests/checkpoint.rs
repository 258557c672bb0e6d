//! Tests of `taming::checkpoint` against the reference-made fixtures (`../shared/fixtures`, see
//! FIXTURES.md: the same `vqgan_f4_64` weights saved by `torch.save` as a zip checkpoint with pickle
//! protocols 2 and 4, in the legacy torch < 1.6 format and as float16; a Lightning checkpoint with
//! optimizer state and callbacks), plus a hand-assembled zip checkpoint for shared storages and
//! strided views, bad inputs, safetensors round trips and the strict `VarBuilder`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use taming::checkpoint::{CheckpointFormat, StateDict};

/// `<TAMING_SHARED>/fixtures`, or `None` (with the reason printed) when the folder is absent; with
/// `CI` set, an absent folder is a failure.
fn fixtures() -> Option<PathBuf> {
    let shared = std::env::var_os("TAMING_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let dir = shared.join("fixtures");
    if dir.is_dir() {
        return Some(dir);
    }
    let reason = format!(
        "fixtures folder {} not found (set TAMING_SHARED)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

macro_rules! fixtures_or_skip {
    () => {
        match fixtures() {
            Some(dir) => dir,
            None => return,
        }
    };
}

/// The raw bits of a tensor, for bit-exact comparisons.
fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| u64::from(x.to_bits()))
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .into_iter()
            .map(|x| u64::from(x.to_bits()))
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u64)
            .collect(),
        DType::U8 => t
            .to_vec1::<u8>()
            .unwrap()
            .into_iter()
            .map(u64::from)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn assert_same(a: &StateDict, b: &StateDict) {
    let ka: Vec<&str> = a.keys().collect();
    let kb: Vec<&str> = b.keys().collect();
    assert_eq!(
        ka,
        kb,
        "{} vs {}",
        a.source().display(),
        b.source().display()
    );
    for k in ka {
        let (ta, tb) = (a.get(k).unwrap(), b.get(k).unwrap());
        assert_eq!(ta.dims(), tb.dims(), "{k}");
        assert_eq!(ta.dtype(), tb.dtype(), "{k}");
        assert!(
            bits(ta) == bits(tb),
            "{k} differs between {} and {}",
            a.source().display(),
            b.source().display()
        );
    }
}

#[test]
fn vqgan_f4_64_forms_agree() {
    let dir = fixtures_or_skip!().join("vqgan_f4_64");
    let zip2 = StateDict::load(dir.join("model.ckpt")).unwrap();
    let legacy = StateDict::load(dir.join("model_legacy.ckpt")).unwrap();
    let zip4 = StateDict::load(dir.join("model_p4.ckpt")).unwrap();
    let fp16 = StateDict::load(dir.join("model_fp16.ckpt")).unwrap();

    assert_eq!(
        zip2.format(),
        Some(&CheckpointFormat::TorchZip { protocol: 2 })
    );
    assert_eq!(legacy.format(), Some(&CheckpointFormat::TorchLegacy));
    assert_eq!(
        zip4.format(),
        Some(&CheckpointFormat::TorchZip { protocol: 4 })
    );
    assert_eq!(
        fp16.format(),
        Some(&CheckpointFormat::TorchZip { protocol: 2 })
    );

    assert!(zip2.len() > 50, "{} tensors", zip2.len());
    assert!(zip2.keys().all(|k| !k.starts_with("loss.")));
    let w = zip2.get("encoder.conv_in.weight").unwrap();
    assert_eq!(w.dtype(), DType::F32);
    assert_eq!(w.dims()[1], 3);
    assert_same(&zip2, &legacy);
    assert_same(&zip2, &zip4);
    for sd in [&zip2, &legacy, &zip4] {
        assert_eq!(
            sd.metadata().get("global_step").map(String::as_str),
            Some("7")
        );
        assert_eq!(sd.metadata().get("epoch").map(String::as_str), Some("3"));
    }

    // float16: same keys, F16 floats, equal to the float32 weights rounded to float16.
    let k32: Vec<&str> = zip2.keys().collect();
    let k16: Vec<&str> = fp16.keys().collect();
    assert_eq!(k32, k16);
    assert!(fp16.metadata().is_empty(), "{:?}", fp16.metadata());
    for k in k32 {
        let (t32, t16) = (zip2.get(k).unwrap(), fp16.get(k).unwrap());
        assert_eq!(t32.dims(), t16.dims(), "{k}");
        if t32.dtype() == DType::F32 {
            assert_eq!(t16.dtype(), DType::F16, "{k}");
            assert!(
                bits(&t32.to_dtype(DType::F16).unwrap()) == bits(t16),
                "{k}: fp16 is not the rounded f32"
            );
        } else {
            assert!(bits(t32) == bits(t16), "{k}");
        }
    }

    // The codebook, across the four forms.
    let key = "quantize.embedding.weight";
    let cb = zip2.get(key).unwrap();
    assert_eq!(cb.rank(), 2);
    for sd in [&legacy, &zip4] {
        assert!(bits(sd.get(key).unwrap()) == bits(cb));
    }
    assert!(bits(fp16.get(key).unwrap()) == bits(&cb.to_dtype(DType::F16).unwrap()));
    let sum: f32 = cb.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(sum > 0.0);
}

#[test]
fn lightning_checkpoint_with_loss_callbacks_and_optimizer() {
    let path = fixtures_or_skip!().join("vqgan_f4/model.ckpt");
    let sd = StateDict::load(&path).unwrap();
    assert_eq!(sd.source(), path.as_path());
    let w = sd.get("encoder.conv_in.weight").unwrap();
    assert_eq!(w.dims(), &[32, 3, 3, 3]);
    assert!(sd.keys().any(|k| k.starts_with("loss.discriminator.")));
    assert!(sd.keys().any(|k| k.starts_with("loss.perceptual_loss.")));
    // BatchNorm's counter is int64.
    let counter = sd
        .keys()
        .find(|k| k.ends_with("num_batches_tracked"))
        .unwrap();
    assert_eq!(sd.get(counter).unwrap().dtype(), DType::I64);
    let meta = sd.metadata();
    println!("metadata: {meta:?}");
    assert_eq!(meta.get("global_step").map(String::as_str), Some("7"));
    assert_eq!(meta.get("epoch").map(String::as_str), Some("3"));
    assert_eq!(
        meta.get("pytorch-lightning_version").map(String::as_str),
        Some("1.0.8")
    );
    assert_eq!(
        meta.get("optimizer_states").map(String::as_str),
        Some("list of 2")
    );
    assert_eq!(meta.get("callbacks").map(String::as_str), Some("dict of 1"));
    assert!(!meta.contains_key("state_dict"));

    let first = sd.sub("encoder.");
    assert_eq!(first.get("conv_in.weight").unwrap().dims(), &[32, 3, 3, 3]);
    assert!(first
        .keys()
        .all(|k| sd.get(&format!("encoder.{k}")).is_some()));
    assert_eq!(
        first.len(),
        sd.keys().filter(|k| k.starts_with("encoder.")).count()
    );
}

#[test]
fn every_fixture_checkpoint_loads() {
    let dir = fixtures_or_skip!();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path().join("model.ckpt");
        if !path.is_file() {
            continue;
        }
        let sd = StateDict::load(&path).unwrap();
        println!(
            "{}: {} tensors, {}",
            path.display(),
            sd.len(),
            sd.format().unwrap()
        );
        assert!(!sd.is_empty(), "{}", path.display());
        assert_eq!(
            sd.metadata().get("global_step").map(String::as_str),
            Some("7"),
            "{}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} fixture checkpoints");
}

// ---- a hand-assembled checkpoint ----

/// A tiny writer of protocol-2 pickle opcodes.
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn int(&mut self, i: u8) -> &mut Self {
        self.op(&[b'K', i])
    }
    fn put(&mut self, i: u8) -> &mut Self {
        self.op(&[b'q', i])
    }
    fn get(&mut self, i: u8) -> &mut Self {
        self.op(&[b'h', i])
    }
    fn tuple(&mut self, items: &[u8]) -> &mut Self {
        self.op(b"(");
        for &i in items {
            self.int(i);
        }
        self.op(b"t")
    }
}

/// A zip checkpoint as torch >= 1.6 writes it: an `OrderedDict` of three tensors, `a` and `b`
/// sharing float storage `0` (12 elements 0..12; `a` at offset 2, `b` a transposed view), and `c` a
/// 0-dim int64 tensor in storage `1`, stored deflated to exercise the inflating path. With
/// `big_endian`, the storages are written as a big-endian machine writes them.
fn synthetic_checkpoint(path: &Path, big_endian: bool) {
    let mut p = Pickle(Vec::new());
    p.op(&[0x80, 2])
        .global("collections", "OrderedDict")
        .put(0)
        .op(b")R")
        .put(1);
    p.op(b"(");
    // 'a': _rebuild_tensor_v2(pid, 2, (2, 3), (3, 1), False, OrderedDict())
    p.str("a")
        .global("torch._utils", "_rebuild_tensor_v2")
        .put(2);
    p.op(b"((")
        .str("storage")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(12)
        .op(b"t")
        .put(3);
    p.op(b"Q")
        .int(2)
        .tuple(&[2, 3])
        .tuple(&[3, 1])
        .op(&[0x89])
        .get(0)
        .op(b")R")
        .op(b"tR");
    // 'b': the same storage through the memo, offset 0, size (3, 2), stride (1, 3)
    p.str("b")
        .get(2)
        .op(b"(")
        .get(3)
        .op(b"Q")
        .int(0)
        .tuple(&[3, 2])
        .tuple(&[1, 3])
        .op(&[0x89])
        .op(b")tR");
    // 'c': a parameter wrapping a scalar int64 tensor (storage '1', size (), stride ())
    p.str("c")
        .global("torch._utils", "_rebuild_parameter")
        .op(b"(");
    p.global("torch._utils", "_rebuild_tensor_v2")
        .op(b"((")
        .str("storage")
        .global("torch", "LongStorage");
    p.str("1")
        .str("cpu")
        .int(1)
        .op(b"tQ")
        .int(0)
        .op(b"))")
        .op(&[0x89])
        .op(b")tR")
        .op(&[0x89])
        .op(b")tR");
    p.op(b"u");
    // BUILD with the `_metadata` attribute torch attaches to state dicts.
    p.op(b"}").str("_metadata").op(b"}s").op(b"b.");

    let storage0: Vec<u8> = (0..12)
        .flat_map(|i| match big_endian {
            false => (i as f32).to_le_bytes(),
            true => (i as f32).to_be_bytes(),
        })
        .collect();
    let storage1 = match big_endian {
        false => 7i64.to_le_bytes(),
        true => 7i64.to_be_bytes(),
    };
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&p.0).unwrap();
    zip.start_file("archive/byteorder", stored).unwrap();
    zip.write_all(if big_endian { b"big" } else { b"little" })
        .unwrap();
    zip.start_file("archive/data/0", stored).unwrap();
    zip.write_all(&storage0).unwrap();
    zip.start_file("archive/data/1", deflated).unwrap();
    zip.write_all(&storage1).unwrap();
    zip.start_file("archive/version", stored).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn shared_storage_offsets_and_strides() {
    let tmp = tempfile::tempdir().unwrap();
    for big_endian in [false, true] {
        let path = tmp.path().join(format!("synthetic_{big_endian}.pt"));
        synthetic_checkpoint(&path, big_endian);
        check_synthetic(&StateDict::load(&path).unwrap());
    }
}

fn check_synthetic(sd: &StateDict) {
    assert_eq!(
        sd.format(),
        Some(&CheckpointFormat::TorchZip { protocol: 2 })
    );
    assert_eq!(sd.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    let a = sd.get("a").unwrap();
    assert_eq!(
        a.to_vec2::<f32>().unwrap(),
        [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]
    );
    let b = sd.get("b").unwrap();
    assert!(b.is_contiguous());
    assert_eq!(
        b.to_vec2::<f32>().unwrap(),
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    );
    let c = sd.get("c").unwrap();
    assert_eq!(c.dtype(), DType::I64);
    assert_eq!(c.rank(), 0);
    assert_eq!(c.to_scalar::<i64>().unwrap(), 7);
    assert!(sd.metadata().is_empty(), "{:?}", sd.metadata());
}

// ---- bad input ----

#[test]
fn bad_inputs_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();

    // A missing file: an Io error naming the path.
    let missing = tmp.path().join("nope.ckpt");
    let e = StateDict::load(&missing).unwrap_err();
    assert!(matches!(e, taming::Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("nope.ckpt"), "{e}");

    // Random bytes: an unknown-format error naming the file.
    let random = tmp.path().join("random.ckpt");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&random, &bytes).unwrap();
    let e = StateDict::load(&random).unwrap_err();
    assert!(e.to_string().contains("unknown checkpoint format"), "{e}");
    assert!(e.to_string().contains("random.ckpt"), "{e}");

    // An empty file.
    let empty = tmp.path().join("empty.ckpt");
    std::fs::write(&empty, b"").unwrap();
    let e = StateDict::load(&empty).unwrap_err();
    assert!(e.to_string().contains("empty.ckpt"), "{e}");

    // A zip checkpoint whose pickle is cut short, and one whose storage is missing.
    let synthetic = tmp.path().join("synthetic.pt");
    synthetic_checkpoint(&synthetic, false);
    let full = std::fs::read(&synthetic).unwrap();
    for n in [10, full.len() / 3, full.len() / 2, full.len() - 30] {
        let cut = tmp.path().join(format!("cut{n}.pt"));
        std::fs::write(&cut, &full[..n]).unwrap();
        let e = StateDict::load(&cut).unwrap_err();
        assert!(e.to_string().contains(&format!("cut{n}.pt")), "{e}");
    }

    let Some(dir) = fixtures() else { return };
    // Truncated copies of real checkpoints, in both torch formats.
    for name in [
        "vqgan_f4_64/model.ckpt",
        "vqgan_f4_64/model_legacy.ckpt",
        "vqgan_f4_64/model_p4.ckpt",
    ] {
        let full = std::fs::read(dir.join(name)).unwrap();
        for (i, n) in [full.len() / 2, 100, full.len() - 1]
            .into_iter()
            .enumerate()
        {
            let cut = tmp
                .path()
                .join(format!("truncated{i}_{}", name.replace('/', "_")));
            std::fs::write(&cut, &full[..n]).unwrap();
            let e = StateDict::load(&cut).unwrap_err();
            println!("{name} cut to {n} bytes: {e}");
            assert!(matches!(e, taming::Error::Checkpoint { .. }), "{e:?}");
            assert!(
                e.to_string()
                    .contains(cut.file_name().unwrap().to_str().unwrap()),
                "{e}"
            );
        }
    }
}

// ---- safetensors ----

#[test]
fn safetensors_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = match fixtures() {
        Some(dir) => StateDict::load(dir.join("vqgan_f4/model.ckpt")).unwrap(),
        None => {
            let path = tmp.path().join("synthetic.pt");
            synthetic_checkpoint(&path, false);
            StateDict::load(&path).unwrap()
        }
    };
    let out = tmp.path().join("converted.safetensors");
    sd.save_safetensors(&out).unwrap();
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "synthetic.pt")
        .collect();
    assert_eq!(
        names,
        ["converted.safetensors"],
        "a temporary file was left behind"
    );
    let back = StateDict::load(&out).unwrap();
    assert_eq!(back.format(), Some(&CheckpointFormat::Safetensors));
    assert_same(&sd, &back);
    assert_eq!(back.metadata(), sd.metadata());

    // In-memory tensors of several dtypes, and overwriting an existing file.
    let dev = Device::Cpu;
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "f16".to_string(),
        Tensor::new(&[1.5f32, -2.0], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
    );
    tensors.insert(
        "i64".to_string(),
        Tensor::new(&[[1i64, 2], [3, 4]], &dev)
            .unwrap()
            .t()
            .unwrap(),
    );
    tensors.insert("u8".to_string(), Tensor::new(&[255u8], &dev).unwrap());
    let small = StateDict::from_tensors(tensors, "memory");
    assert_eq!(small.format(), None);
    small.save_safetensors(&out).unwrap();
    let back = StateDict::load(&out).unwrap();
    assert_same(&small, &back);
    assert_eq!(
        back.get("i64").unwrap().to_vec2::<i64>().unwrap(),
        [[1, 3], [2, 4]]
    );
}

// ---- the VarBuilder ----

#[test]
fn var_builder_checks_shapes_and_records_usage() {
    let dev = Device::Cpu;
    let sd = match fixtures() {
        Some(dir) => StateDict::load(dir.join("vqgan_f4/model.ckpt")).unwrap(),
        None => {
            // Without fixtures, a stand-in with the same names and shapes.
            let mut t = BTreeMap::new();
            t.insert(
                "encoder.conv_in.weight".into(),
                Tensor::zeros((32, 3, 3, 3), DType::F32, &dev).unwrap(),
            );
            t.insert(
                "encoder.conv_in.bias".into(),
                Tensor::zeros(32, DType::F32, &dev).unwrap(),
            );
            t.insert(
                "loss.discriminator.main.0.weight".into(),
                Tensor::zeros(1, DType::F32, &dev).unwrap(),
            );
            StateDict::from_tensors(t, "model.ckpt")
        }
    };
    let (vb, usage) = sd.var_builder(DType::F64, &dev);
    let w = vb
        .pp("encoder")
        .pp("conv_in")
        .get((32, 3, 3, 3), "weight")
        .unwrap();
    assert_eq!(w.dtype(), DType::F64);
    assert!(usage.used().contains("encoder.conv_in.weight"));
    assert!(vb.contains_tensor("encoder.conv_in.bias"));
    assert!(!vb.contains_tensor("encoder.nope"));

    let e = vb
        .get((32, 3, 5, 5), "encoder.conv_in.weight")
        .unwrap_err()
        .to_string();
    assert!(e.contains("encoder.conv_in.weight"), "{e}");
    assert!(e.contains("[32, 3, 3, 3]"), "{e}");
    assert!(e.contains("[32, 3, 5, 5]"), "{e}");
    assert!(e.contains("model.ckpt"), "{e}");

    let e = vb
        .get((7, 2), "encoder.missing.weight")
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing tensor `encoder.missing.weight`"), "{e}");
    assert!(e.contains("[7, 2]"), "{e}");
    let e = vb
        .get_unchecked("encoder.missing.bias")
        .unwrap_err()
        .to_string();
    assert!(e.contains("encoder.missing.bias"), "{e}");

    let b = vb.get_unchecked("encoder.conv_in.bias").unwrap();
    assert_eq!(b.dims(), &[32]);
    let (skipped, unexpected) = usage.unused(&sd, &["loss."]);
    assert!(!skipped.is_empty());
    assert!(skipped.iter().all(|k| k.starts_with("loss.")));
    assert!(unexpected.iter().all(|k| !k.starts_with("loss.")));
    assert!(!unexpected.contains(&"encoder.conv_in.weight".to_string()));
    assert!(!unexpected.contains(&"encoder.conv_in.bias".to_string()));
    assert_eq!(
        skipped.len() + unexpected.len() + usage.used().len(),
        sd.len()
    );
}

// ---- why we have our own reader ----

/// Records what candle's own `.pth` reader does with the checkpoint forms we must read; printed as
/// evidence, never failing (candle may improve).
#[test]
fn candle_pickle_limitations() {
    let dir = fixtures_or_skip!().join("vqgan_f4_64");
    for name in ["model.ckpt", "model_p4.ckpt", "model_legacy.ckpt"] {
        let path = dir.join(name);
        for key in [None, Some("state_dict")] {
            let outcome =
                std::panic::catch_unwind(|| candle_core::pickle::read_all_with_key(&path, key));
            let report = match outcome {
                Ok(Ok(tensors)) => format!("ok, {} tensors", tensors.len()),
                // candle appends a backtrace to some errors: its first line is the message.
                Ok(Err(e)) => format!(
                    "error: {}",
                    e.to_string().lines().next().unwrap_or_default()
                ),
                Err(_) => "panicked".to_string(),
            };
            println!("candle_core::pickle::read_all_with_key({name}, {key:?}): {report}");
        }
    }
}
