//! Bad input gives clear errors that name the file, key, shape or value at fault, never a panic.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use taming::checkpoint::StateDict;
use taming::config::{ModelConfig, ProjectConfig, VqModelConfig};

fn vq64() -> Option<(VqModelConfig, StateDict)> {
    let dir = common::fixture("vqgan_f4_64")?;
    let config = ProjectConfig::from_files(&[dir.join("config.yaml")], &[]).expect("config");
    let ModelConfig::Vq(cfg) = config.model else {
        panic!("not a VQ config")
    };
    Some((
        cfg,
        StateDict::load(dir.join("model.ckpt")).expect("checkpoint"),
    ))
}

fn edited(sd: &StateDict, f: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> StateDict {
    let mut t = sd.tensors().clone();
    f(&mut t);
    StateDict::from_tensors(t, "edited.ckpt")
}

#[test]
fn truncated_checkpoint_names_the_file() {
    let Some(dir) = common::fixture("vqgan_f4_64") else {
        return;
    };
    let bytes = std::fs::read(dir.join("model.ckpt")).expect("read");
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("half.ckpt");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    let msg = StateDict::load(&path).unwrap_err().to_string();
    assert!(msg.contains("half.ckpt"), "{msg}");
}

#[test]
fn unknown_target_is_named() {
    let yaml = "model:\n  target: taming.models.vqgan.VQModelPlusPlus\n  params: {}\n";
    let msg = ProjectConfig::from_yaml_str(yaml, "bad.yaml")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("taming.models.vqgan.VQModelPlusPlus"), "{msg}");
    assert!(msg.contains("bad.yaml"), "{msg}");
    assert!(
        msg.contains("taming.models.vqgan.VQModel"),
        "lists the supported targets: {msg}"
    );
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let Some((cfg, sd)) = vq64() else { return };
    let sd = edited(&sd, |t| {
        t.remove("decoder.up.1.block.0.conv1.weight");
    });
    let msg = taming::model::load_vq(&cfg, &sd, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("decoder.up.1.block.0.conv1.weight"), "{msg}");
    assert!(msg.contains("[64, 64, 3, 3]"), "expected shape in: {msg}");
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let Some((cfg, sd)) = vq64() else { return };
    let sd = edited(&sd, |t| {
        t.insert(
            "quantize.embedding.weight".into(),
            Tensor::zeros((39, 10), DType::F32, &Device::Cpu).expect("zeros"),
        );
    });
    let msg = taming::model::load_vq(&cfg, &sd, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("quantize.embedding.weight"), "{msg}");
    assert!(
        msg.contains("[39, 10]") && msg.contains("[40, 10]"),
        "{msg}"
    );
}

#[test]
fn unknown_keys_are_listed_and_loss_keys_skipped() {
    let Some(dir) = common::fixture("vqgan_f4") else {
        return;
    };
    let config = ProjectConfig::from_files(&[dir.join("config.yaml")], &[]).expect("config");
    let ModelConfig::Vq(cfg) = config.model else {
        panic!()
    };
    let sd = StateDict::load(dir.join("model.ckpt")).expect("checkpoint");
    let sd = edited(&sd, |t| {
        t.insert(
            "encoder.extra.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).expect("zeros"),
        );
    });
    let (_, report) = taming::model::load_vq(&cfg, &sd, DType::F32, &Device::Cpu).expect("load");
    assert_eq!(report.unexpected, vec!["encoder.extra.weight".to_string()]);
    assert!(report.skipped.iter().all(|k| k.starts_with("loss.")));
    assert!(report
        .skipped
        .iter()
        .any(|k| k.starts_with("loss.discriminator.")));
    assert!(report
        .skipped
        .iter()
        .any(|k| k.starts_with("loss.perceptual_loss.")));
}

#[test]
fn image_size_not_divisible_by_the_factor() {
    let Some((cfg, sd)) = vq64() else { return };
    let (model, _) = taming::model::load_vq(&cfg, &sd, DType::F32, &Device::Cpu).expect("load");
    let x = Tensor::zeros((1, 3, 30, 64), DType::F32, &Device::Cpu).expect("zeros");
    let msg = model.encode(&x).unwrap_err().to_string();
    assert!(msg.contains("30x64") && msg.contains("factor 4"), "{msg}");
    let x = Tensor::zeros((1, 5, 32, 32), DType::F32, &Device::Cpu).expect("zeros");
    let msg = model.encode(&x).unwrap_err().to_string();
    assert!(msg.contains("3 input channels, got 5"), "{msg}");
}

#[test]
fn segmentation_label_beyond_n_labels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("labels.png");
    let img = image::GrayImage::from_fn(8, 8, |x, _| image::Luma([if x == 5 { 9 } else { 1 }]));
    img.save(&path).expect("save");
    let msg = taming::image_io::load_segmentation(
        &path,
        8,
        taming::image_io::LabelShift::None,
        None,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("labels.png") && msg.contains("label 9") && msg.contains("n_labels = 8"),
        "{msg}"
    );
}

#[test]
fn unreadable_image_names_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("photo.png");
    std::fs::write(&path, b"not a png").expect("write");
    let msg = taming::image_io::load_rgb(&path).unwrap_err().to_string();
    assert!(msg.contains("photo.png"), "{msg}");
    let msg = taming::image_io::load_rgb(&tmp.path().join("absent.jpg"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.jpg"), "{msg}");
}
