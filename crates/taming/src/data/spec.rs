//! The `data:` section of a project config, typed: `main.DataModuleFromConfig` and the dataset
//! targets it instantiates.
//!
//! Mirrors `main.py` (`DataModuleFromConfig(batch_size, train, validation, test, wrap,
//! num_workers)`, `num_workers` defaulting to `batch_size * 2`) and the constructors of
//! `taming/data/custom.py` (`CustomTrain`, `CustomTest`), `taming/data/sflckr.py`
//! (`SegmentationBase`, `Examples`), `taming/data/ade20k.py` / `taming/data/coco.py` (`Examples`)
//! and `taming/data/imagenet.py` (`DRINExamples`), with their parameter names and defaults. Our
//! additions: `taming.data.folder.ImageFolder`, `taming.data.depth.DepthPairs`, optional `flip`
//! everywhere, optional path overrides for the fixed-path example sets, and a YAML list of dataset
//! configs for `train` / `validation` / `test` (concatenated).
//!
//! Unlike the model section, unknown parameters are errors here (the reference's constructors
//! reject unknown keyword arguments too); every message names the key path at fault.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// `main.DataModuleFromConfig`.
pub const DATA_MODULE: &str = "main.DataModuleFromConfig";
/// `taming.data.custom.CustomTrain`.
pub const CUSTOM_TRAIN: &str = "taming.data.custom.CustomTrain";
/// `taming.data.custom.CustomTest`.
pub const CUSTOM_TEST: &str = "taming.data.custom.CustomTest";
/// `taming.data.folder.ImageFolder` (ours).
pub const IMAGE_FOLDER: &str = "taming.data.folder.ImageFolder";
/// `taming.data.sflckr.SegmentationBase`.
pub const SEGMENTATION_BASE: &str = "taming.data.sflckr.SegmentationBase";
/// `taming.data.sflckr.Examples`.
pub const SFLCKR_EXAMPLES: &str = "taming.data.sflckr.Examples";
/// `taming.data.ade20k.Examples`.
pub const ADE20K_EXAMPLES: &str = "taming.data.ade20k.Examples";
/// `taming.data.coco.Examples`.
pub const COCO_EXAMPLES: &str = "taming.data.coco.Examples";
/// `taming.data.imagenet.DRINExamples`.
pub const DRIN_EXAMPLES: &str = "taming.data.imagenet.DRINExamples";
/// `taming.data.depth.DepthPairs` (ours).
pub const DEPTH_PAIRS: &str = "taming.data.depth.DepthPairs";

/// Every dataset target this module builds.
pub const DATASET_TARGETS: [&str; 9] = [
    CUSTOM_TRAIN,
    CUSTOM_TEST,
    IMAGE_FOLDER,
    SEGMENTATION_BASE,
    SFLCKR_EXAMPLES,
    ADE20K_EXAMPLES,
    COCO_EXAMPLES,
    DRIN_EXAMPLES,
    DEPTH_PAIRS,
];

/// Rescaling filter of an image (the reference's cv2 flags, approximated by the `image` crate's
/// filters: `area` by a triangle filter, whose support widens with the downscaling factor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Bilinear,
    Bicubic,
    Area,
    Lanczos,
}

impl Resample {
    /// Parses the reference's names (`nearest`, `bilinear`, `bicubic`, `area`, `lanczos`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "nearest" => Resample::Nearest,
            "bilinear" => Resample::Bilinear,
            "bicubic" => Resample::Bicubic,
            "area" => Resample::Area,
            "lanczos" => Resample::Lanczos,
            _ => return None,
        })
    }
}

/// Geometry of an example: `SmallestMaxSize(size)` then a `crop_size` x `crop_size` crop (default
/// `size`), then a flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transform {
    /// None (or `<= 0` in the config): images are used at their own size, uncropped.
    pub size: Option<u32>,
    /// Side of the crop after the rescale (the reference's ADE20k `crop_size`); None: `size`.
    pub crop_size: Option<u32>,
    /// Random instead of center crop (only with `size`).
    pub random_crop: bool,
    /// Horizontal flip with probability 0.5.
    pub flip: bool,
    /// Filter of the image rescale (label maps always use nearest, depth maps bilinear).
    pub interpolation: Resample,
}

/// How a depth file is named from an image's relative path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthNaming {
    /// `DRINExamples`: `.JPEG` replaced by `.png` (as a substring, like the reference).
    JpegToPng,
    /// `DepthPairs`: the file extension replaced by `.png`.
    ExtensionToPng,
}

/// Where a dataset's examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A text file with one image path per line (`CustomTrain` / `CustomTest`).
    ImageList { list_file: PathBuf },
    /// Every image under `root/<class>/...` (class = index of the sorted sub-folder names).
    ImageFolder { root: PathBuf },
    /// Image + 8-bit label PNG pairs (`SegmentationBase` and the `Examples` sets).
    Segmentation {
        data_csv: PathBuf,
        data_root: PathBuf,
        segmentation_root: PathBuf,
        n_labels: usize,
        shift_segmentation: bool,
    },
    /// Image + D-RIN depth PNG pairs (`DRINExamples`, `DepthPairs`).
    Depth {
        data_csv: PathBuf,
        data_root: PathBuf,
        depth_root: PathBuf,
        naming: DepthNaming,
    },
}

/// One `{target, params}` dataset block.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Where the block is in the config (`data.params.train`, `data.params.train.1`), for messages.
    pub key: String,
    pub target: String,
    pub source: Source,
    pub transform: Transform,
}

/// The `data:` section: `main.DataModuleFromConfig`'s parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    pub batch_size: usize,
    /// As configured, default `batch_size * 2` (the loaders cap it at the available cores; 0
    /// decodes on the consuming thread).
    pub num_workers: usize,
    /// The reference's `wrap` (ignored: it only wraps datasets into a torch `Dataset`).
    pub wrap: bool,
    /// Datasets concatenated in order (one entry unless the config gives a list).
    pub train: Option<Vec<DatasetSpec>>,
    pub validation: Option<Vec<DatasetSpec>>,
    pub test: Option<Vec<DatasetSpec>>,
}

fn err(key: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        origin: key.to_string(),
        msg: msg.into(),
    }
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// A mapping of keyword arguments, checked against the names a target accepts.
struct Params<'a> {
    map: Map<String, Value>,
    key: &'a str,
}

impl<'a> Params<'a> {
    /// `value` must be a mapping (or null / absent); every key must be in `known`.
    fn new(value: Option<&Value>, key: &'a str, owner: &str, known: &[&str]) -> Result<Self> {
        let map = match value {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => {
                return Err(err(
                    key,
                    format!("expected a mapping of parameters, got {}", type_name(other)),
                ))
            }
        };
        for k in map.keys() {
            if !known.contains(&k.as_str()) {
                return Err(err(
                    &format!("{key}.{k}"),
                    format!("unknown parameter of {owner} (known: {})", known.join(", ")),
                ));
            }
        }
        Ok(Self { map, key })
    }

    fn path(&self, name: &str) -> String {
        format!("{}.{name}", self.key)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn int(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i))
                } else {
                    match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => Ok(Some(f as i64)),
                        _ => Err(err(
                            &self.path(name),
                            format!("expected an integer, got {n}"),
                        )),
                    }
                }
            }
            Some(other) => Err(err(
                &self.path(name),
                format!("expected an integer, got {}", type_name(other)),
            )),
        }
    }

    fn usize(&self, name: &str) -> Result<Option<usize>> {
        match self.int(name)? {
            None => Ok(None),
            Some(i) if i >= 0 => Ok(Some(i as usize)),
            Some(i) => Err(err(
                &self.path(name),
                format!("must not be negative, got {i}"),
            )),
        }
    }

    /// The reference's `size`: absent, null or `<= 0` means "no rescale, no crop".
    fn size(&self, name: &str, default: Option<u32>) -> Result<Option<u32>> {
        match self.get(name) {
            None => Ok(default),
            Some(_) => match self.int(name)? {
                Some(i) if i > 0 => u32::try_from(i)
                    .map(Some)
                    .map_err(|_| err(&self.path(name), format!("{i} is too large"))),
                _ => Ok(None),
            },
        }
    }

    /// `size` (the side images are rescaled to) and `crop_size` (the square cut from them, at
    /// most `size`; only with `size`), as ADE20k's `SegmentationBase` takes them.
    fn size_and_crop(&self) -> Result<(Option<u32>, Option<u32>)> {
        let size = self.size("size", None)?;
        let crop_size = self.size("crop_size", None)?;
        match (crop_size, size) {
            (Some(c), Some(s)) if c > s => Err(err(
                &self.path("crop_size"),
                format!("{c} is larger than `size` ({s}), the side images are rescaled to"),
            )),
            (Some(_), None) => Err(err(
                &self.path("crop_size"),
                "needs `size` (the side images are rescaled to)",
            )),
            _ => Ok((size, crop_size)),
        }
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(err(
                &self.path(name),
                format!("expected true or false, got {}", type_name(other)),
            )),
        }
    }

    fn string(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(err(
                &self.path(name),
                format!("expected a string, got {}", type_name(other)),
            )),
        }
    }

    fn path_or(&self, name: &str, default: &str) -> Result<PathBuf> {
        Ok(PathBuf::from(
            self.string(name)?.unwrap_or_else(|| default.to_string()),
        ))
    }

    fn required_path(&self, name: &str, owner: &str) -> Result<PathBuf> {
        self.string(name)?.map(PathBuf::from).ok_or_else(|| {
            err(
                &self.path(name),
                format!("missing: a required parameter of {owner}"),
            )
        })
    }

    fn interpolation(&self, name: &str) -> Result<Resample> {
        match self.string(name)? {
            None => Ok(Resample::Bicubic),
            Some(s) => Resample::parse(&s).ok_or_else(|| {
                err(
                    &self.path(name),
                    format!("unknown interpolation {s:?} (known: nearest, bilinear, bicubic, area, lanczos)"),
                )
            }),
        }
    }
}

impl DatasetSpec {
    /// Parses one `{target, params}` block found at `key`.
    pub fn from_value(value: &Value, key: &str) -> Result<Self> {
        let Value::Object(block) = value else {
            return Err(err(
                key,
                format!(
                    "expected a dataset config {{target, params}}, got {}",
                    type_name(value)
                ),
            ));
        };
        for k in block.keys() {
            if k != "target" && k != "params" {
                return Err(err(
                    &format!("{key}.{k}"),
                    "unknown key of a dataset config (known: target, params)",
                ));
            }
        }
        let target = match block.get("target") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(err(
                    &format!("{key}.target"),
                    format!("expected a string, got {}", type_name(other)),
                ))
            }
            None => {
                return Err(err(
                    &format!("{key}.target"),
                    format!("missing (one of: {})", DATASET_TARGETS.join(", ")),
                ))
            }
        };
        let pkey = format!("{key}.params");
        let params = block.get("params");
        let t = target.as_str();
        let (source, transform) = match t {
            CUSTOM_TRAIN | CUSTOM_TEST => {
                let list_key = if t == CUSTOM_TRAIN {
                    "training_images_list_file"
                } else {
                    "test_images_list_file"
                };
                let p = Params::new(params, &pkey, t, &[list_key, "size", "random_crop", "flip"])?;
                let list_file = p.required_path(list_key, t)?;
                // The reference's `size` is a required positional argument; null means no rescale.
                if !p.map.contains_key("size") {
                    return Err(err(
                        &p.path("size"),
                        format!("missing: a required parameter of {t} (null for none)"),
                    ));
                }
                (
                    Source::ImageList { list_file },
                    Transform {
                        size: p.size("size", None)?,
                        crop_size: None,
                        random_crop: p.bool("random_crop", false)?,
                        flip: p.bool("flip", false)?,
                        interpolation: Resample::Bilinear,
                    },
                )
            }
            IMAGE_FOLDER => {
                let p = Params::new(params, &pkey, t, &["root", "size", "random_crop", "flip"])?;
                (
                    Source::ImageFolder {
                        root: p.required_path("root", t)?,
                    },
                    Transform {
                        size: p.size("size", None)?,
                        crop_size: None,
                        random_crop: p.bool("random_crop", false)?,
                        flip: p.bool("flip", false)?,
                        interpolation: Resample::Bilinear,
                    },
                )
            }
            SEGMENTATION_BASE => {
                let p = Params::new(
                    params,
                    &pkey,
                    t,
                    &[
                        "data_csv",
                        "data_root",
                        "segmentation_root",
                        "size",
                        "random_crop",
                        "interpolation",
                        "n_labels",
                        "shift_segmentation",
                        "flip",
                        "crop_size",
                    ],
                )?;
                let (size, crop_size) = p.size_and_crop()?;
                let n_labels = p.usize("n_labels")?.unwrap_or(182);
                if n_labels == 0 {
                    return Err(err(&p.path("n_labels"), "must be at least 1"));
                }
                (
                    Source::Segmentation {
                        data_csv: p.required_path("data_csv", t)?,
                        data_root: p.required_path("data_root", t)?,
                        segmentation_root: p.required_path("segmentation_root", t)?,
                        n_labels,
                        shift_segmentation: p.bool("shift_segmentation", false)?,
                    },
                    Transform {
                        size,
                        crop_size,
                        random_crop: p.bool("random_crop", false)?,
                        flip: p.bool("flip", false)?,
                        interpolation: p.interpolation("interpolation")?,
                    },
                )
            }
            SFLCKR_EXAMPLES | ADE20K_EXAMPLES | COCO_EXAMPLES => {
                let (name, n_labels, shift, default_size) = match t {
                    SFLCKR_EXAMPLES => ("sflckr", 182, false, None),
                    ADE20K_EXAMPLES => ("ade20k", 151, false, Some(256)),
                    _ => ("coco", 183, true, Some(256)),
                };
                let p = Params::new(
                    params,
                    &pkey,
                    t,
                    &[
                        "size",
                        "random_crop",
                        "interpolation",
                        "data_csv",
                        "data_root",
                        "segmentation_root",
                        "flip",
                    ],
                )?;
                (
                    Source::Segmentation {
                        data_csv: p.path_or("data_csv", &format!("data/{name}_examples.txt"))?,
                        data_root: p.path_or("data_root", &format!("data/{name}_images"))?,
                        segmentation_root: p
                            .path_or("segmentation_root", &format!("data/{name}_segmentations"))?,
                        n_labels,
                        shift_segmentation: shift,
                    },
                    Transform {
                        size: p.size("size", default_size)?,
                        crop_size: None,
                        random_crop: p.bool("random_crop", false)?,
                        flip: p.bool("flip", false)?,
                        interpolation: p.interpolation("interpolation")?,
                    },
                )
            }
            DRIN_EXAMPLES => {
                let p = Params::new(
                    params,
                    &pkey,
                    t,
                    &[
                        "data_csv",
                        "data_root",
                        "depth_root",
                        "size",
                        "random_crop",
                        "flip",
                    ],
                )?;
                (
                    Source::Depth {
                        data_csv: p.path_or("data_csv", "data/drin_examples.txt")?,
                        data_root: p.path_or("data_root", "data/drin_images")?,
                        depth_root: p.path_or("depth_root", "data/drin_depth")?,
                        naming: DepthNaming::JpegToPng,
                    },
                    Transform {
                        size: p.size("size", Some(256))?,
                        crop_size: None,
                        random_crop: p.bool("random_crop", false)?,
                        flip: p.bool("flip", false)?,
                        interpolation: Resample::Bilinear,
                    },
                )
            }
            DEPTH_PAIRS => {
                let p = Params::new(
                    params,
                    &pkey,
                    t,
                    &[
                        "data_csv",
                        "data_root",
                        "depth_root",
                        "size",
                        "crop_size",
                        "random_crop",
                        "flip",
                    ],
                )?;
                let (size, crop_size) = p.size_and_crop()?;
                let random_crop = p.bool("random_crop", false)?;
                (
                    Source::Depth {
                        data_csv: p.required_path("data_csv", t)?,
                        data_root: p.required_path("data_root", t)?,
                        depth_root: p.required_path("depth_root", t)?,
                        naming: DepthNaming::ExtensionToPng,
                    },
                    Transform {
                        size,
                        crop_size,
                        random_crop,
                        // `get_preprocessor` flips whenever it crops at random.
                        flip: p.bool("flip", random_crop)?,
                        interpolation: Resample::Bilinear,
                    },
                )
            }
            other => {
                return Err(err(
                    &format!("{key}.target"),
                    format!(
                        "unsupported dataset target `{other}`; supported: {}",
                        DATASET_TARGETS.join(", ")
                    ),
                ))
            }
        };
        Ok(Self {
            key: key.to_string(),
            target,
            source,
            transform,
        })
    }

    /// Parses a dataset block or a list of them (concatenated) found at `key`.
    pub fn list_from_value(value: &Value, key: &str) -> Result<Vec<Self>> {
        match value {
            Value::Array(items) => {
                if items.is_empty() {
                    return Err(err(key, "an empty list of datasets"));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Self::from_value(v, &format!("{key}.{i}")))
                    .collect()
            }
            other => Ok(vec![Self::from_value(other, key)?]),
        }
    }
}

impl DataConfig {
    /// Reads `cfg.raw["data"]`.
    pub fn from_project(cfg: &crate::config::ProjectConfig) -> Result<Self> {
        match cfg.raw.get("data") {
            None | Some(Value::Null) => Err(err(
                "data",
                format!(
                    "the config has no `data:` section; training needs one, e.g. `data: {{target: {DATA_MODULE}, \
                     params: {{batch_size: 4, train: {{target: {CUSTOM_TRAIN}, params: \
                     {{training_images_list_file: train.txt, size: 256}}}}}}}}`"
                ),
            )),
            Some(v) => Self::from_value(v),
        }
    }

    /// Reads the `data:` section of a whole project YAML text (`origin` names it in errors).
    pub fn from_yaml_str(yaml: &str, origin: &str) -> Result<Self> {
        let mut tree = crate::config::ConfigTree::new();
        tree.merge_yaml_str(yaml, origin)?;
        let raw = tree.resolve()?;
        match raw.get("data") {
            None | Some(Value::Null) => {
                Err(err("data", format!("{origin} has no `data:` section")))
            }
            Some(v) => Self::from_value(v),
        }
    }

    /// Parses the value of the `data:` key.
    pub fn from_value(data: &Value) -> Result<Self> {
        let Value::Object(block) = data else {
            return Err(err(
                "data",
                format!(
                    "expected a mapping {{target, params}}, got {}",
                    type_name(data)
                ),
            ));
        };
        for k in block.keys() {
            if k != "target" && k != "params" {
                return Err(err(
                    &format!("data.{k}"),
                    "unknown key (known: target, params)",
                ));
            }
        }
        match block.get("target") {
            Some(Value::String(s)) if s == DATA_MODULE => {}
            Some(other) => {
                return Err(err(
                    "data.target",
                    format!(
                        "unsupported data module {}; supported: {DATA_MODULE}",
                        type_name(other)
                    ),
                ))
            }
            None => {
                return Err(err(
                    "data.target",
                    format!("missing (expected {DATA_MODULE})"),
                ))
            }
        }
        let p = Params::new(
            block.get("params"),
            "data.params",
            DATA_MODULE,
            &[
                "batch_size",
                "train",
                "validation",
                "test",
                "wrap",
                "num_workers",
            ],
        )?;
        let batch_size = p.usize("batch_size")?.ok_or_else(|| {
            err(
                "data.params.batch_size",
                format!("missing: a required parameter of {DATA_MODULE}"),
            )
        })?;
        if batch_size == 0 {
            return Err(err("data.params.batch_size", "must be at least 1"));
        }
        let num_workers = p.usize("num_workers")?.unwrap_or(batch_size * 2);
        let wrap = p.bool("wrap", false)?;
        let section = |name: &str| -> Result<Option<Vec<DatasetSpec>>> {
            match p.get(name) {
                None => Ok(None),
                Some(v) => {
                    DatasetSpec::list_from_value(v, &format!("data.params.{name}")).map(Some)
                }
            }
        };
        Ok(Self {
            batch_size,
            num_workers,
            wrap,
            train: section("train")?,
            validation: section("validation")?,
            test: section("test")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(train: Value) -> Value {
        json!({"target": DATA_MODULE, "params": {"batch_size": 5, "train": train}})
    }

    #[test]
    fn reference_block_with_defaults() -> anyhow::Result<()> {
        let cfg = DataConfig::from_value(&json!({
            "target": DATA_MODULE,
            "params": {
                "batch_size": 5, "wrap": true,
                "train": {"target": CUSTOM_TRAIN, "params": {"training_images_list_file": "t.txt", "size": 256}},
                "validation": {"target": CUSTOM_TEST, "params": {"test_images_list_file": "v.txt", "size": 256}},
            }
        }))?;
        assert_eq!(cfg.batch_size, 5);
        assert_eq!(cfg.num_workers, 10);
        assert!(cfg.wrap);
        let train = cfg.train.ok_or_else(|| anyhow::anyhow!("train"))?;
        assert_eq!(train.len(), 1);
        assert_eq!(
            train[0].source,
            Source::ImageList {
                list_file: "t.txt".into()
            }
        );
        assert_eq!(
            train[0].transform,
            Transform {
                size: Some(256),
                crop_size: None,
                random_crop: false,
                flip: false,
                interpolation: Resample::Bilinear
            }
        );
        assert!(cfg.validation.is_some() && cfg.test.is_none());
        Ok(())
    }

    #[test]
    fn example_sets_defaults_and_overrides() -> anyhow::Result<()> {
        let s = DatasetSpec::from_value(&json!({"target": COCO_EXAMPLES}), "k")?;
        match &s.source {
            Source::Segmentation {
                data_csv,
                n_labels,
                shift_segmentation,
                ..
            } => {
                assert_eq!(data_csv, &PathBuf::from("data/coco_examples.txt"));
                assert_eq!((*n_labels, *shift_segmentation), (183, true));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.transform.size, Some(256));
        assert_eq!(s.transform.interpolation, Resample::Bicubic);
        let s = DatasetSpec::from_value(
            &json!({"target": SFLCKR_EXAMPLES, "params": {"data_root": "x/imgs", "interpolation": "lanczos", "size": 0}}),
            "k",
        )?;
        assert_eq!(s.transform.size, None);
        assert_eq!(s.transform.interpolation, Resample::Lanczos);
        match &s.source {
            Source::Segmentation {
                data_root,
                n_labels,
                ..
            } => {
                assert_eq!(data_root, &PathBuf::from("x/imgs"));
                assert_eq!(*n_labels, 182);
            }
            other => panic!("{other:?}"),
        }
        let s = DatasetSpec::from_value(
            &json!({"target": DEPTH_PAIRS, "params": {"data_csv": "a", "data_root": "b", "depth_root": "c", "random_crop": true}}),
            "k",
        )?;
        assert!(s.transform.flip);
        Ok(())
    }

    #[test]
    fn crop_size_no_larger_than_size() -> anyhow::Result<()> {
        let block = |crop: u32| {
            serde_json::json!({"target": SEGMENTATION_BASE, "params": {
                "data_csv": "a.txt", "data_root": "i", "segmentation_root": "s",
                "n_labels": 10, "size": 128, "crop_size": crop}})
        };
        let spec = DatasetSpec::from_value(&block(64), "data.params.train")?;
        assert_eq!(spec.transform.size, Some(128));
        assert_eq!(spec.transform.crop_size, Some(64));
        let e = DatasetSpec::from_value(&block(256), "data.params.train")
            .map(|_| ())
            .map_err(|e| e.to_string());
        let e = e.err().unwrap_or_default();
        assert!(e.contains("crop_size") && e.contains("256"), "{e}");
        Ok(())
    }

    #[test]
    fn errors_name_the_key() {
        let msg = |v: Value| {
            DataConfig::from_value(&v)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let m = msg(data(
            json!({"target": CUSTOM_TRAIN, "params": {"training_images_list_file": "t", "sizee": 2}}),
        ));
        assert!(
            m.contains("data.params.train.params.sizee: unknown parameter of taming.data.custom.CustomTrain"),
            "{m}"
        );
        let m = msg(data(json!({"target": "taming.data.nope.Nope"})));
        assert!(
            m.contains("data.params.train.target") && m.contains("taming.data.nope.Nope"),
            "{m}"
        );
        let m = msg(data(
            json!([{"target": CUSTOM_TRAIN, "params": {"size": 1}}]),
        ));
        assert!(
            m.contains("data.params.train.0.params.training_images_list_file: missing"),
            "{m}"
        );
        let m = msg(json!({"target": DATA_MODULE, "params": {"train": null}}));
        assert!(m.contains("data.params.batch_size"), "{m}");
        let m = msg(json!({"target": DATA_MODULE, "params": {"batch_size": "4"}}));
        assert!(
            m.contains("data.params.batch_size") && m.contains("\"4\""),
            "{m}"
        );
        let m = msg(json!({"target": DATA_MODULE, "params": {"batch_size": 4, "shuffle": true}}));
        assert!(
            m.contains("data.params.shuffle: unknown parameter of main.DataModuleFromConfig"),
            "{m}"
        );
        let m = msg(data(
            json!({"target": SEGMENTATION_BASE, "params": {"data_csv": "a", "data_root": "b", "segmentation_root": "c", "interpolation": "cubic"}}),
        ));
        assert!(
            m.contains("data.params.train.params.interpolation") && m.contains("cubic"),
            "{m}"
        );
    }

    #[test]
    fn lists_concatenate() -> anyhow::Result<()> {
        let cfg = DataConfig::from_value(&data(json!([
            {"target": CUSTOM_TRAIN, "params": {"training_images_list_file": "a.txt", "size": 64}},
            {"target": IMAGE_FOLDER, "params": {"root": "imgs", "size": 64, "flip": true}},
        ])))?;
        let train = cfg.train.ok_or_else(|| anyhow::anyhow!("train"))?;
        assert_eq!(train.len(), 2);
        assert_eq!(train[1].key, "data.params.train.1");
        assert!(train[1].transform.flip);
        Ok(())
    }
}
