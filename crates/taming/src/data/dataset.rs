//! Datasets: the examples a [`DatasetSpec`] names, and how one example is decoded and augmented.
//!
//! Mirrors `taming/data/base.py` (`ImagePaths.preprocess_image`: RGB, `SmallestMaxSize`, center
//! or random crop, `x / 127.5 - 1`; `ConcatDataset`), `taming/data/custom.py` (list files),
//! `taming/data/sflckr.py` (`SegmentationBase.__getitem__`: image rescaled with `interpolation`,
//! labels with nearest, the same crop for both, `+1` shift, `np.eye(n_labels)[labels]`) and
//! `taming/data/imagenet.py` (`DRINExamples`: depth min-max normalised to [-1, 1] before the
//! bilinear rescale, then the image's crop). `taming.data.folder.ImageFolder` and
//! `taming.data.depth.DepthPairs` are ours.
//!
//! Building a dataset reads its list file (or walks its folder) and checks that every file
//! exists; decoding happens later, on the loader's workers. Randomness comes from the `rng` the
//! loader passes in (a pure function of seed, epoch and example index).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, GrayImage, ImageBuffer, Luma, RgbImage};
use rand::Rng;

use super::spec::{DatasetSpec, DepthNaming, Resample, Source, Transform};
use crate::image_io::{self, Interpolation, LabelShift};
use crate::train::Batch;
use crate::{Error, Result};

/// Extensions [`Source::ImageFolder`] picks up (those the `image` crate is built to decode).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "gif"];

/// A float image (depth map, in [0, 1] until batching).
pub type DepthImage = ImageBuffer<Luma<f32>, Vec<f32>>;

/// The tensors an example contributes to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `image` (and `class_label` with [`Dataset::has_class_label`]).
    Image,
    /// `image` + `segmentation` with `n_labels` channels.
    Segmentation { n_labels: usize, shift: bool },
    /// `image` + `depth`.
    Depth,
}

/// One example's files.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub image: PathBuf,
    /// The label or depth PNG of a pair.
    pub aux: Option<PathBuf>,
    pub class_label: Option<u32>,
}

/// One dataset block with its examples.
#[derive(Debug, Clone)]
struct Part {
    spec: DatasetSpec,
    kind: Kind,
    examples: Vec<Example>,
    /// Sorted class folder names (image folders).
    classes: Vec<String>,
}

/// The examples of one split (`train`, `validation`, `test`): one or more dataset blocks
/// concatenated in config order.
#[derive(Debug, Clone)]
pub struct Dataset {
    parts: Vec<Part>,
    /// `starts[i]`: global index of part `i`'s first example.
    starts: Vec<usize>,
    len: usize,
}

/// A decoded, augmented example.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image_path: PathBuf,
    pub aux_path: Option<PathBuf>,
    pub image: RgbImage,
    pub labels: Option<GrayImage>,
    /// Min-max normalised to [0, 1] (batches carry `2 * depth - 1`).
    pub depth: Option<DepthImage>,
    pub class_label: Option<u32>,
}

/// Why an example could not be made.
#[derive(Debug)]
pub enum LoadError {
    /// A file is corrupt or unreadable: the loader reports it and leaves the example out.
    Unreadable { path: PathBuf, reason: String },
    /// The data is readable but wrong (mismatched pair sizes, ...): the loader stops.
    Fatal(Error),
}

fn list_error(list: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{}, line {line}: {msg}", list.display()))
}

fn config_error(key: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        origin: key.to_string(),
        msg: msg.into(),
    }
}

/// Reads a list file: (1-based line number, trimmed line) of its non-blank lines.
fn read_list(list: &Path, key: &str) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(list).map_err(|e| {
        config_error(
            key,
            format!("cannot read the list file {}: {e}", list.display()),
        )
    })?;
    let lines: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(config_error(
            key,
            format!("the list file {} names no image", list.display()),
        ));
    }
    Ok(lines)
}

fn replace_extension_png(rel: &str) -> String {
    let p = Path::new(rel);
    match p.extension() {
        Some(_) => p.with_extension("png").to_string_lossy().into_owned(),
        None => format!("{rel}.png"),
    }
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn is_image_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if !is_hidden(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Every image file under `dir`, sorted, recursively (depth-limited against link cycles).
fn walk_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > 32 {
        return Err(Error::invalid(format!(
            "{}: folders nested too deeply (a link cycle?)",
            dir.display()
        )));
    }
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            walk_images(&p, depth + 1, out)?;
        } else if is_image_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl Part {
    fn build(spec: &DatasetSpec) -> Result<Self> {
        let key = spec.key.as_str();
        let mut classes = Vec::new();
        let (kind, examples) = match &spec.source {
            Source::ImageList { list_file } => {
                let dir = list_file.parent().unwrap_or(Path::new(""));
                let mut examples = Vec::new();
                for (n, line) in read_list(list_file, key)? {
                    let direct = PathBuf::from(&line);
                    let image = if direct.exists() {
                        direct
                    } else {
                        let beside = dir.join(&line);
                        if !direct.is_relative() || !beside.exists() {
                            return Err(list_error(
                                list_file,
                                n,
                                format!(
                                    "image {line} does not exist (looked in the current directory{})",
                                    if direct.is_relative() {
                                        format!(" and in {}", dir.display())
                                    } else {
                                        String::new()
                                    }
                                ),
                            ));
                        }
                        beside
                    };
                    examples.push(Example {
                        image,
                        aux: None,
                        class_label: None,
                    });
                }
                (Kind::Image, examples)
            }
            Source::ImageFolder { root } => {
                if !root.is_dir() {
                    return Err(config_error(
                        &format!("{key}.params.root"),
                        format!("{} is not a folder", root.display()),
                    ));
                }
                let entries = sorted_entries(root)?;
                let dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
                let mut examples = Vec::new();
                if dirs.is_empty() {
                    for p in entries.iter().filter(|p| is_image_file(p)) {
                        examples.push(Example {
                            image: p.clone(),
                            aux: None,
                            class_label: Some(0),
                        });
                    }
                } else {
                    let loose = entries.iter().filter(|p| is_image_file(p)).count();
                    if loose > 0 {
                        tracing::warn!(
                            "{}: {loose} images directly in the root are ignored (it has class sub-folders)",
                            root.display()
                        );
                    }
                    for (class, d) in dirs.iter().enumerate() {
                        classes.push(
                            d.file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                        );
                        let mut files = Vec::new();
                        walk_images(d, 0, &mut files)?;
                        for image in files {
                            examples.push(Example {
                                image,
                                aux: None,
                                class_label: Some(class as u32),
                            });
                        }
                    }
                }
                if examples.is_empty() {
                    return Err(config_error(
                        &format!("{key}.params.root"),
                        format!(
                            "no image ({}) under {}",
                            IMAGE_EXTENSIONS.join(", "),
                            root.display()
                        ),
                    ));
                }
                (Kind::Image, examples)
            }
            Source::Segmentation {
                data_csv,
                data_root,
                segmentation_root,
                n_labels,
                shift_segmentation,
            } => {
                let mut examples = Vec::new();
                for (n, line) in read_list(data_csv, key)? {
                    let image = data_root.join(&line);
                    let seg = segmentation_root.join(line.replace(".jpg", ".png"));
                    for (what, p) in [("image", &image), ("segmentation", &seg)] {
                        if !p.is_file() {
                            return Err(list_error(
                                data_csv,
                                n,
                                format!("{what} {} does not exist", p.display()),
                            ));
                        }
                    }
                    examples.push(Example {
                        image,
                        aux: Some(seg),
                        class_label: None,
                    });
                }
                (
                    Kind::Segmentation {
                        n_labels: *n_labels,
                        shift: *shift_segmentation,
                    },
                    examples,
                )
            }
            Source::Depth {
                data_csv,
                data_root,
                depth_root,
                naming,
            } => {
                let mut examples = Vec::new();
                for (n, line) in read_list(data_csv, key)? {
                    let image = data_root.join(&line);
                    let rel = match naming {
                        DepthNaming::JpegToPng => line.replace(".JPEG", ".png"),
                        DepthNaming::ExtensionToPng => replace_extension_png(&line),
                    };
                    let depth = depth_root.join(rel);
                    for (what, p) in [("image", &image), ("depth map", &depth)] {
                        if !p.is_file() {
                            return Err(list_error(
                                data_csv,
                                n,
                                format!("{what} {} does not exist", p.display()),
                            ));
                        }
                    }
                    examples.push(Example {
                        image,
                        aux: Some(depth),
                        class_label: None,
                    });
                }
                (Kind::Depth, examples)
            }
        };
        Ok(Self {
            spec: spec.clone(),
            kind,
            examples,
            classes,
        })
    }

    fn has_class_label(&self) -> bool {
        matches!(self.spec.source, Source::ImageFolder { .. })
    }
}

fn filter(r: Resample) -> FilterType {
    match r {
        Resample::Nearest => FilterType::Nearest,
        Resample::Bilinear | Resample::Area => FilterType::Triangle,
        Resample::Bicubic => FilterType::CatmullRom,
        Resample::Lanczos => FilterType::Lanczos3,
    }
}

/// `SmallestMaxSize(size)` with `resample` (through [`image_io::resize_smallest_side`] for the
/// filters it knows).
fn rescale<P>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    size: u32,
    resample: Resample,
) -> ImageBuffer<P, Vec<P::Subpixel>>
where
    P: image::Pixel + 'static,
    P::Subpixel: 'static,
{
    let interp = match resample {
        Resample::Nearest => Interpolation::Nearest,
        Resample::Bilinear => Interpolation::Bilinear,
        Resample::Bicubic => Interpolation::Bicubic,
        Resample::Area | Resample::Lanczos => {
            let (w, h) = img.dimensions();
            let (nw, nh) = image_io::smallest_side_size(w, h, size);
            if (nw, nh) == (w, h) {
                return img.clone();
            }
            return image::imageops::resize(img, nw, nh, filter(resample));
        }
    };
    image_io::resize_smallest_side(img, size, interp)
}

/// The first half of `preprocess_depth`: `(d - min) / max(1e-8, max - min)`, in [0, 1].
fn unit_depth(mut vals: Vec<f32>) -> Vec<f32> {
    let min = vals.iter().copied().fold(f32::INFINITY, f32::min);
    let max = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = (max - min).max(1e-8);
    for v in &mut vals {
        *v = (*v - min) / range;
    }
    vals
}

fn unreadable(path: &Path, e: Error) -> LoadError {
    let reason = match e {
        Error::Image { msg, .. } => msg,
        Error::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    LoadError::Unreadable {
        path: path.to_path_buf(),
        reason,
    }
}

fn mismatch(image: &Path, iw: (u32, u32), aux: &Path, aw: (u32, u32), when: &str) -> LoadError {
    LoadError::Fatal(Error::Image {
        path: image.to_path_buf(),
        msg: format!(
            "is {}x{}{when} but its pair {} is {}x{}: an image and its map must have the same size",
            iw.0,
            iw.1,
            aux.display(),
            aw.0,
            aw.1
        ),
    })
}

/// Decodes and augments one example (the pair's maps get the image's crop and flip).
fn load_example<R: Rng>(
    ex: &Example,
    kind: Kind,
    t: &Transform,
    rng: &mut R,
) -> std::result::Result<Sample, LoadError> {
    let mut image = image_io::load_rgb(&ex.image).map_err(|e| unreadable(&ex.image, e))?;
    let original = image.dimensions();
    let mut labels = None;
    let mut depth = None;
    match (kind, &ex.aux) {
        (Kind::Segmentation { .. }, Some(p)) => {
            let l = image_io::load_labels(p).map_err(|e| unreadable(p, e))?;
            if l.dimensions() != original {
                return Err(mismatch(&ex.image, original, p, l.dimensions(), ""));
            }
            labels = Some(l);
        }
        (Kind::Depth, Some(p)) => {
            let (raw, h, w) = image_io::load_depth_raw(p).map_err(|e| unreadable(p, e))?;
            if (w as u32, h as u32) != original {
                return Err(mismatch(&ex.image, original, p, (w as u32, h as u32), ""));
            }
            // `preprocess_depth` normalises before any rescale; the map is kept in [0, 1] until
            // batching (2x - 1 there), as the `image` crate clamps float images to [0, 1] when
            // resizing.
            let d = DepthImage::from_raw(w as u32, h as u32, unit_depth(raw))
                .ok_or_else(|| unreadable(p, Error::invalid("depth map size mismatch")))?;
            depth = Some(d);
        }
        _ => {}
    }
    if let Some(size) = t.size {
        image = rescale(&image, size, t.interpolation);
        labels = labels.map(|l| rescale(&l, size, Resample::Nearest));
        depth = depth.map(|d| rescale(&d, size, Resample::Bilinear));
        let (w, h) = image.dimensions();
        let side = t.crop_size.unwrap_or(size); // the crop after the rescale
        let origin = if t.random_crop {
            image_io::random_crop_origin(w, h, side, side, rng)
        } else {
            image_io::center_crop_origin(w, h, side, side)
        };
        let fatal = LoadError::Fatal;
        image = image_io::crop(&image, origin, side, side).map_err(fatal)?;
        if let (Some(l), Some(p)) = (&labels, &ex.aux) {
            if l.dimensions() != (w, h) {
                return Err(mismatch(
                    &ex.image,
                    (w, h),
                    p,
                    l.dimensions(),
                    " after rescaling",
                ));
            }
            labels = Some(image_io::crop(l, origin, side, side).map_err(fatal)?);
        }
        if let (Some(d), Some(p)) = (&depth, &ex.aux) {
            if d.dimensions() != (w, h) {
                return Err(mismatch(
                    &ex.image,
                    (w, h),
                    p,
                    d.dimensions(),
                    " after rescaling",
                ));
            }
            depth = Some(image_io::crop(d, origin, side, side).map_err(fatal)?);
        }
    }
    if t.flip && rng.random_bool(0.5) {
        image = image::imageops::flip_horizontal(&image);
        labels = labels.map(|l| image::imageops::flip_horizontal(&l));
        depth = depth.map(|d| image::imageops::flip_horizontal(&d));
    }
    Ok(Sample {
        image_path: ex.image.clone(),
        aux_path: ex.aux.clone(),
        image,
        labels,
        depth,
        class_label: ex.class_label,
    })
}

impl Dataset {
    /// Builds the examples of `specs` (concatenated), checking that every listed file exists and
    /// that the blocks yield the same tensors.
    pub fn build(specs: &[DatasetSpec]) -> Result<Self> {
        let mut parts: Vec<Part> = Vec::new();
        for spec in specs {
            let part = Part::build(spec)?;
            if let Some(first) = parts.first() {
                if first.kind != part.kind || first.has_class_label() != part.has_class_label() {
                    return Err(config_error(
                        &spec.key,
                        format!(
                            "{} yields different tensors ({}) than {} ({}): concatenated datasets must match",
                            spec.target,
                            describe(part.kind, part.has_class_label()),
                            first.spec.key,
                            describe(first.kind, first.has_class_label())
                        ),
                    ));
                }
            }
            parts.push(part);
        }
        if parts.is_empty() {
            return Err(Error::invalid(
                "a dataset needs at least one dataset config",
            ));
        }
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0;
        for p in &parts {
            starts.push(len);
            len += p.examples.len();
        }
        Ok(Self { parts, starts, len })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no examples (never true for a built dataset).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the examples yield.
    pub fn kind(&self) -> Kind {
        self.parts.first().map(|p| p.kind).unwrap_or(Kind::Image)
    }

    /// Whether batches carry `class_label` (image folders).
    pub fn has_class_label(&self) -> bool {
        self.parts.first().is_some_and(Part::has_class_label)
    }

    /// Batch keys, sorted.
    pub fn keys(&self) -> Vec<&'static str> {
        let mut k = vec!["image"];
        match self.kind() {
            Kind::Image => {}
            Kind::Segmentation { .. } => k.push("segmentation"),
            Kind::Depth => k.push("depth"),
        }
        if self.has_class_label() {
            k.push("class_label");
        }
        k.sort();
        k
    }

    /// The class folder names of every image-folder block, in label order (empty otherwise).
    pub fn class_names(&self) -> Vec<String> {
        self.parts
            .iter()
            .flat_map(|p| p.classes.iter().cloned())
            .collect()
    }

    fn locate(&self, index: usize) -> Option<(&Part, &Example)> {
        let i = self
            .starts
            .partition_point(|&s| s <= index)
            .checked_sub(1)?;
        let part = self.parts.get(i)?;
        Some((part, part.examples.get(index - self.starts[i])?))
    }

    /// The files of example `index`.
    pub fn example(&self, index: usize) -> Option<&Example> {
        self.locate(index).map(|(_, e)| e)
    }

    /// Decodes and augments example `index` with randomness from `rng`.
    pub fn load<R: Rng>(
        &self,
        index: usize,
        rng: &mut R,
    ) -> std::result::Result<Sample, LoadError> {
        let (part, ex) = self.locate(index).ok_or_else(|| {
            LoadError::Fatal(Error::invalid(format!(
                "example {index} out of range (the dataset has {})",
                self.len
            )))
        })?;
        load_example(ex, part.kind, &part.spec.transform, rng)
    }
}

fn describe(kind: Kind, class_label: bool) -> String {
    let mut s = match kind {
        Kind::Image => "image".to_string(),
        Kind::Segmentation { n_labels, .. } => {
            format!("image + segmentation with {n_labels} labels")
        }
        Kind::Depth => "image + depth".to_string(),
    };
    if class_label {
        s.push_str(" + class_label");
    }
    s
}

/// Stacks samples (at least one) into a batch on the CPU: `image` (B, 3, H, W) in [-1, 1],
/// `segmentation` one-hot (B, n_labels, H, W), `depth` (B, 1, H, W), `class_label` (B,) u32.
pub fn collate(samples: &[Sample], kind: Kind) -> Result<Batch> {
    let first = samples
        .first()
        .ok_or_else(|| Error::invalid("cannot make a batch of no example"))?;
    let dims = first.image.dimensions();
    for s in &samples[1..] {
        if s.image.dimensions() != dims {
            let (a, b) = (dims, s.image.dimensions());
            return Err(Error::Image {
                path: s.image_path.clone(),
                msg: format!(
                    "is {}x{} but {} in the same batch is {}x{}: set `size` in the dataset config so that \
                     all images are rescaled and cropped to one size",
                    b.0,
                    b.1,
                    first.image_path.display(),
                    a.0,
                    a.1
                ),
            });
        }
    }
    let cpu = Device::Cpu;
    let mut batch = BTreeMap::new();
    let images = samples
        .iter()
        .map(|s| image_io::rgb_to_tensor(&s.image, &cpu)) // (1, 3, H, W)
        .collect::<Result<Vec<_>>>()?;
    batch.insert("image".to_string(), Tensor::cat(&images, 0)?); // (B, 3, H, W)
    match kind {
        Kind::Image => {}
        Kind::Segmentation { n_labels, shift } => {
            let shift = if shift {
                LabelShift::CocoPlusOne
            } else {
                LabelShift::None
            };
            let mut onehots = Vec::with_capacity(samples.len());
            for s in samples {
                let labels = s.labels.as_ref().ok_or_else(|| {
                    Error::invalid(format!(
                        "{}: no segmentation decoded",
                        s.image_path.display()
                    ))
                })?;
                let origin = s.aux_path.as_deref().unwrap_or(&s.image_path);
                let (_, onehot) =
                    image_io::labels_to_onehot(labels, n_labels, shift, origin, &cpu)?; // (1, n_labels, H, W)
                onehots.push(onehot);
            }
            batch.insert("segmentation".to_string(), Tensor::cat(&onehots, 0)?);
            // (B, n_labels, H, W)
        }
        Kind::Depth => {
            let mut maps = Vec::with_capacity(samples.len());
            for s in samples {
                let d = s.depth.as_ref().ok_or_else(|| {
                    Error::invalid(format!("{}: no depth map decoded", s.image_path.display()))
                })?;
                let (w, h) = d.dimensions();
                // the second half of `preprocess_depth`: [0, 1] to [-1, 1]
                let vals: Vec<f32> = d.as_raw().iter().map(|&u| 2.0 * u - 1.0).collect();
                maps.push(Tensor::from_vec(
                    vals,
                    (1, 1, h as usize, w as usize),
                    &cpu,
                )?);
                // (1, 1, H, W)
            }
            batch.insert("depth".to_string(), Tensor::cat(&maps, 0)?); // (B, 1, H, W)
        }
    }
    if samples.iter().all(|s| s.class_label.is_some()) {
        let labels: Vec<u32> = samples.iter().filter_map(|s| s.class_label).collect();
        let n = labels.len();
        batch.insert(
            "class_label".to_string(),
            Tensor::from_vec(labels, n, &cpu)?,
        );
        // (B,)
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_names() {
        assert_eq!(replace_extension_png("a/b.JPEG"), "a/b.png");
        assert_eq!(replace_extension_png("a/b.c.jpg"), "a/b.c.png");
        assert_eq!(replace_extension_png("a/b"), "a/b.png");
    }

    #[test]
    fn collate_rejects_mixed_sizes() {
        let s = |name: &str, w: u32| Sample {
            image_path: name.into(),
            aux_path: None,
            image: RgbImage::new(w, 4),
            labels: None,
            depth: None,
            class_label: None,
        };
        let e = collate(&[s("a.png", 4), s("b.png", 5)], Kind::Image)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.png") && e.contains("b.png") && e.contains("size"),
            "{e}"
        );
    }

    /// A 12x8 image + label pair in `dir` whose label is the column and whose red is 10x it.
    fn column_coded_pair(dir: &Path) -> anyhow::Result<Example> {
        let img = RgbImage::from_fn(12, 8, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        let lab = GrayImage::from_fn(12, 8, |x, _| Luma([x as u8]));
        let (ip, lp) = (dir.join("i.png"), dir.join("l.png"));
        img.save(&ip)?;
        lab.save(&lp)?;
        Ok(Example {
            image: ip,
            aux: Some(lp),
            class_label: None,
        })
    }

    #[test]
    fn crop_size_crops_without_rescaling_further() -> anyhow::Result<()> {
        // 12x8 at size 8 is not rescaled; a 4x4 crop keeps the pixel scale (column x -> red 10x).
        let dir = tempfile::tempdir()?;
        let ex = column_coded_pair(dir.path())?;
        let t = Transform {
            size: Some(8),
            crop_size: Some(4),
            random_crop: true,
            flip: false,
            interpolation: Resample::Bicubic,
        };
        let kind = Kind::Segmentation {
            n_labels: 12,
            shift: false,
        };
        use rand::SeedableRng;
        let mut origins = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let s = load_example(&ex, kind, &t, &mut rng).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let l = s.labels.ok_or_else(|| anyhow::anyhow!("labels"))?;
            assert_eq!(s.image.dimensions(), (4, 4));
            let x0 = l.get_pixel(0, 0).0[0];
            for (x, y, p) in s.image.enumerate_pixels() {
                assert_eq!(l.get_pixel(x, y).0[0], x0 + x as u8);
                assert_eq!(p.0[0], l.get_pixel(x, y).0[0] * 10);
            }
            origins.insert(x0);
        }
        assert!(origins.len() > 3, "random crops vary: {origins:?}");
        Ok(())
    }

    #[test]
    fn crop_and_flip_shared_by_the_pair() -> anyhow::Result<()> {
        // Labels encode the column: after any crop/flip, image red == label * 10.
        let dir = tempfile::tempdir()?;
        let ex = column_coded_pair(dir.path())?;
        let t = Transform {
            size: Some(8),
            crop_size: None,
            random_crop: true,
            flip: true,
            interpolation: Resample::Nearest,
        };
        let kind = Kind::Segmentation {
            n_labels: 12,
            shift: false,
        };
        use rand::SeedableRng;
        let mut seen_flip = false;
        for seed in 0..16 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let s = load_example(&ex, kind, &t, &mut rng).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let l = s.labels.ok_or_else(|| anyhow::anyhow!("labels"))?;
            assert_eq!(s.image.dimensions(), (8, 8));
            for (x, y, p) in s.image.enumerate_pixels() {
                assert_eq!(p.0[0], l.get_pixel(x, y).0[0] * 10);
            }
            seen_flip |= s.image.get_pixel(0, 0).0[0] > s.image.get_pixel(7, 0).0[0];
        }
        assert!(seen_flip);
        Ok(())
    }
}
