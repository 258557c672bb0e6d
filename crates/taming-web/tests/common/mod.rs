//! Helpers of the web demo's tests: which model to serve (the built-in `models/scenes` when it
//! exists, else the `transformer_seg` fixture of `../shared`), skipping outside CI, and the
//! reference sampling through the library pipeline exactly as `taming sample --segmentation`
//! runs it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::RgbImage;
use taming::checkpoint::StateDict;
use taming::cond_transformer::Net2NetTransformer;
use taming::config::{ModelConfig, ProjectConfig};
use taming::image_io::{self, Interpolation, LabelShift};
use taming::pipeline::{self, Condition, SampleRequest};
use taming::sampling::{Control, SamplingOptions};
use taming_web::{ModelInfo, Server, ServerConfig};

/// Prints why a test is skipped and returns None; under CI (env `CI` set) fails instead.
pub fn skip<T>(reason: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("{reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

/// Config, checkpoint and label names of the model the tests serve.
pub struct ModelFiles {
    pub config: PathBuf,
    pub ckpt: PathBuf,
    pub names: Vec<(usize, String)>,
}

/// The built-in model when it exists, else the fixture (None, printed, when neither does).
pub fn model_files() -> Option<ModelFiles> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let builtin = root.join("models/scenes");
    let (config, ckpt) = (
        builtin.join("config.yaml"),
        builtin.join("model.safetensors"),
    );
    if config.is_file() && ckpt.is_file() {
        let names = taming_web::model_info::read_labels_txt(&builtin.join("labels.txt"))
            .expect("labels.txt of the built-in model")
            .unwrap_or_default();
        return Some(ModelFiles {
            config,
            ckpt,
            names,
        });
    }
    fixture_files("transformer_seg")
}

/// The fixture `<TAMING_SHARED>/fixtures/<name>` (TAMING_SHARED defaults to `../shared` beside
/// the workspace root); None, printed, when it is missing.
pub fn fixture_files(name: &str) -> Option<ModelFiles> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared = match std::env::var_os("TAMING_SHARED") {
        Some(p) => PathBuf::from(p),
        None => root.join("../shared"),
    };
    let dir = shared.join("fixtures").join(name);
    if !dir.join("model.ckpt").is_file() {
        return skip(&format!(
            "{} not found (set TAMING_SHARED)",
            dir.join("model.ckpt").display()
        ));
    }
    Some(ModelFiles {
        config: dir.join("config.yaml"),
        ckpt: dir.join("model.ckpt"),
        names: Vec::new(),
    })
}

/// Loads the transformer as `taming sample` does (float32, CPU).
pub fn load_model(files: &ModelFiles) -> Net2NetTransformer {
    let config = ProjectConfig::from_files(&[&files.config], &[]).expect("config");
    let ModelConfig::Transformer(cfg) = &config.model else {
        panic!("{} is not a transformer config", files.config.display());
    };
    let sd = StateDict::load(&files.ckpt).expect("checkpoint");
    Net2NetTransformer::load(cfg, &sd, DType::F32, &Device::Cpu)
        .expect("model")
        .0
}

/// A server for the test model with the given settings.
pub fn server(files: &ModelFiles, config: ServerConfig) -> (Server, ModelInfo) {
    let model = load_model(files);
    let info = ModelInfo::new(&model, &files.names);
    let server = Server::new(model, info.clone(), config).expect("server");
    (server, info)
}

/// What `taming sample --segmentation LABELS --size HxW --seed S [--top-k K]` computes: the
/// label PNG read with `load_labels`, fitted (nearest), one-hot, `pipeline::sample`, and the
/// first image as 8-bit RGB.
pub fn reference_sample(
    model: &Net2NetTransformer,
    labels_png: &Path,
    size: (usize, usize),
    options: SamplingOptions,
) -> RgbImage {
    let n_labels = model.cond_vq().expect("a VQ cond stage").in_channels();
    let labels = image_io::load_labels(labels_png).expect("labels");
    let labels = image_io::fit(
        &labels,
        size.0 as u32,
        size.1 as u32,
        Interpolation::Nearest,
    )
    .expect("fit");
    let (_, onehot) = image_io::labels_to_onehot(
        &labels,
        n_labels,
        LabelShift::None,
        labels_png,
        &Device::Cpu,
    )
    .expect("one-hot");
    let req = SampleRequest {
        condition: Condition::Spatial(onehot),
        size,
        complete: None,
        batch: 1,
        options,
    };
    let out = pipeline::sample(model, &req, &mut |_| Control::Continue).expect("sample");
    let images = out.images.expect("images");
    image_io::tensor_to_rgb(&images.get(0).expect("first image")).expect("rgb")
}

/// Number of pixels where two RGB images differ (all of them when the sizes differ).
pub fn differing_pixels(a: &RgbImage, b: &RgbImage) -> usize {
    if a.dimensions() != b.dimensions() {
        return (a.width() * a.height()).max(b.width() * b.height()) as usize;
    }
    a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count()
}
