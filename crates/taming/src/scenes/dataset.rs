//! Writing a train/validation split of procedural scenes to disk.

use std::path::{Path, PathBuf};

use image::ImageFormat;

use super::noise::mix64;
use super::{render, Scene, LABELS, NUM_LABELS};
use crate::image_io::{save_png, write_atomic};
use crate::{Error, Result};

/// Which part of a dataset a scene belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training scenes.
    Train,
    /// Validation scenes.
    Val,
}

/// Seed of scene `index` of `split` in the dataset of `seed`. Train and validation seeds never
/// coincide: the map from (split, index) to seed is injective.
pub fn scene_seed(seed: u64, split: Split, index: usize) -> u64 {
    let tag = match split {
        Split::Train => 0,
        Split::Val => 1,
    };
    // mix64 is a bijection, so distinct (index, split) give distinct seeds.
    mix64(mix64(seed).wrapping_add((index as u64).wrapping_mul(2).wrapping_add(tag)))
}

/// What [`write_dataset`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSummary {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Number of training scenes (files `00000.png` ...).
    pub n_train: usize,
    /// Number of validation scenes (numbered after the training ones).
    pub n_val: usize,
    /// Side of the square scenes.
    pub size: u32,
    /// Seeds of the training scenes, in file order.
    pub train_seeds: Vec<u64>,
    /// Seeds of the validation scenes, in file order.
    pub val_seeds: Vec<u64>,
    /// Pixel count of every label over all scenes.
    pub label_pixels: [u64; NUM_LABELS],
}

fn encode(
    img: impl FnOnce(&mut std::io::Cursor<&mut Vec<u8>>) -> image::ImageResult<()>,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    img(&mut std::io::Cursor::new(&mut buf)).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: format!("cannot encode PNG: {e}"),
    })?;
    Ok(buf)
}

fn write_scene(dir: &Path, name: &str, scene: &Scene) -> Result<()> {
    save_png(&scene.image, &dir.join("images").join(name))?;
    let seg = dir.join("segmentations").join(name);
    let bytes = encode(|c| scene.labels.write_to(c, ImageFormat::Png), &seg)?;
    write_atomic(&seg, &bytes)?;
    let depth = dir.join("depth").join(name);
    let rgba = scene.depth_rgba();
    let bytes = encode(|c| rgba.write_to(c, ImageFormat::Png), &depth)?;
    write_atomic(&depth, &bytes)
}

fn list(names: impl Iterator<Item = String>) -> String {
    let mut s = String::new();
    for n in names {
        s.push_str(&n);
        s.push('\n');
    }
    s
}

/// Renders `n_train + n_val` scenes of `size` x `size` and writes, under `dir`:
/// `images/NNNNN.png` (RGB), `segmentations/NNNNN.png` (8-bit grey label ids),
/// `depth/NNNNN.png` (D-RIN: RGBA8, one little-endian float32 of inverse depth per pixel),
/// `train.txt` and `val.txt` (one file name per line, e.g. `00000.png`) and `labels.txt`
/// (`id name` per line). Training scenes are numbered first, validation scenes after them;
/// their seeds come from [`scene_seed`] and are disjoint. Every file is written atomically.
/// `progress(done, total)` is called after each scene.
pub fn write_dataset(
    dir: &Path,
    n_train: usize,
    n_val: usize,
    size: u32,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<DatasetSummary> {
    if size == 0 {
        return Err(Error::invalid(
            "write_dataset: size must be at least 1 pixel",
        ));
    }
    for sub in ["images", "segmentations", "depth"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let total = n_train + n_val;
    let name = |i: usize| format!("{i:05}.png");
    let train_seeds: Vec<u64> = (0..n_train)
        .map(|i| scene_seed(seed, Split::Train, i))
        .collect();
    let val_seeds: Vec<u64> = (0..n_val)
        .map(|i| scene_seed(seed, Split::Val, i))
        .collect();
    let mut label_pixels = [0u64; NUM_LABELS];
    for (i, &s) in train_seeds.iter().chain(val_seeds.iter()).enumerate() {
        let scene = render(s, size, size);
        for (acc, c) in label_pixels.iter_mut().zip(scene.label_histogram()) {
            *acc += c;
        }
        write_scene(dir, &name(i), &scene)?;
        progress(i + 1, total);
    }
    write_atomic(
        &dir.join("train.txt"),
        list((0..n_train).map(name)).as_bytes(),
    )?;
    write_atomic(
        &dir.join("val.txt"),
        list((n_train..total).map(name)).as_bytes(),
    )?;
    let labels = list(LABELS.iter().map(|l| format!("{} {}", l.id, l.name)));
    write_atomic(&dir.join("labels.txt"), labels.as_bytes())?;
    Ok(DatasetSummary {
        dir: dir.to_path_buf(),
        n_train,
        n_val,
        size,
        train_seeds,
        val_seeds,
        label_pixels,
    })
}
