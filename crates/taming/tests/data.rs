//! The training data pipeline (`taming::data`, the reference's `data:` section): config parsing,
//! seeded and resumable batching, crop alignment of pairs, skipping corrupt files, depth maps, and
//! the example sets of `shared/data` (skipped when absent, except under CI).

mod common;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use image::{GrayImage, Luma, Rgb, RgbImage, RgbaImage};
use taming::data::{DataConfig, DataModule, Loader, LoaderSource};
use taming::image_io;
use taming::train::{Batch, BatchSource};

fn write_list(path: &Path, lines: &[String]) -> Result<()> {
    std::fs::write(path, lines.join("\n") + "\n")?;
    Ok(())
}

/// `n` distinct RGB images of `w` x `h` in `dir`, listed in `dir/list.txt`.
fn image_set(dir: &Path, n: usize, w: u32, h: u32) -> Result<PathBuf> {
    let mut lines = Vec::new();
    for i in 0..n {
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7 + i as u32 * 13) as u8, (y * 5) as u8, (x ^ y) as u8])
        });
        let p = dir.join(format!("img{i:02}.png"));
        img.save(&p)?;
        lines.push(p.display().to_string());
    }
    let list = dir.join("list.txt");
    write_list(&list, &lines)?;
    Ok(list)
}

fn yaml_data(params: &str) -> String {
    format!("model: {{target: x}}\ndata:\n  target: main.DataModuleFromConfig\n  params:\n{params}")
}

fn module(yaml: &str) -> Result<DataModule> {
    Ok(DataModule::new(DataConfig::from_yaml_str(
        yaml,
        "test.yaml",
    )?)?)
}

fn collect(loader: &Loader, epoch: u64, start: usize) -> Result<Vec<Batch>> {
    Ok(loader
        .epoch(epoch, start)
        .collect::<taming::Result<Vec<_>>>()?)
}

fn same(a: &Batch, b: &Batch) -> Result<bool> {
    if a.keys().ne(b.keys()) {
        return Ok(false);
    }
    for (k, ta) in a {
        let tb = &b[k];
        if ta.dims() != tb.dims() || ta.dtype() != tb.dtype() {
            return Ok(false);
        }
        let (fa, fb) = (
            ta.to_dtype(candle_core::DType::F32)?,
            tb.to_dtype(candle_core::DType::F32)?,
        );
        if fa.flatten_all()?.to_vec1::<f32>()? != fb.flatten_all()?.to_vec1::<f32>()? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn all_same(a: &[Batch], b: &[Batch]) -> Result<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for (x, y) in a.iter().zip(b) {
        if !same(x, y)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Channel argmax of a (B, C, H, W) one-hot as (B, H, W) labels, checking it is one-hot.
fn argmax_onehot(t: &Tensor) -> Result<Vec<u32>> {
    let sums = t.sum(1)?.flatten_all()?.to_vec1::<f32>()?; // (B*H*W)
    assert!(sums.iter().all(|&s| s == 1.0), "not one-hot");
    Ok(t.argmax(1)?.flatten_all()?.to_vec1::<u32>()?) // (B*H*W)
}

#[test]
fn config_errors_name_the_key_path() {
    let yaml = yaml_data(
        "    batch_size: 2\n    train:\n      target: taming.data.custom.CustomTrain\n      params: {training_images_list_file: t.txt, sizee: 256}\n",
    );
    let msg = DataConfig::from_yaml_str(&yaml, "test.yaml")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(
            "data.params.train.params.sizee: unknown parameter of taming.data.custom.CustomTrain"
        ),
        "{msg}"
    );
    let msg = DataConfig::from_yaml_str("model: {target: x}\n", "test.yaml")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("data") && msg.contains("no `data:` section"),
        "{msg}"
    );
    let yaml = yaml_data("    batch_size: 2\n    train: {target: taming.data.faces.CelebA}\n");
    let msg = DataConfig::from_yaml_str(&yaml, "test.yaml")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("data.params.train.target") && msg.contains("unsupported dataset target"),
        "{msg}"
    );
}

#[test]
fn missing_file_names_list_and_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let list = image_set(dir.path(), 2, 8, 8)?;
    let mut text = std::fs::read_to_string(&list)?;
    text.push_str("\nnot_there.png\n");
    std::fs::write(&list, text)?;
    let yaml = yaml_data(&format!(
        "    batch_size: 2\n    train: {{target: taming.data.custom.CustomTrain, params: {{training_images_list_file: {}, size: 8}}}}\n",
        list.display()
    ));
    let msg = module(&yaml).map(|_| ()).unwrap_err().to_string();
    assert!(
        msg.contains("list.txt, line 4") && msg.contains("not_there.png"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn relative_paths_resolve_beside_the_list_and_sizes_must_match() -> Result<()> {
    let dir = tempfile::tempdir()?;
    RgbImage::new(10, 8).save(dir.path().join("a.png"))?;
    RgbImage::new(12, 8).save(dir.path().join("b.png"))?;
    let list = dir.path().join("list.txt");
    write_list(&list, &["a.png".into(), "".into(), "b.png".into()])?;
    let yaml = yaml_data(&format!(
        "    batch_size: 2\n    num_workers: 0\n    validation: {{target: taming.data.custom.CustomTest, params: {{test_images_list_file: {}, size: null}}}}\n",
        list.display()
    ));
    let data = module(&yaml)?;
    assert_eq!(data.val_len(), 2);
    assert!(data.train_loader(0).is_err());
    let err = collect(&data.val_loader(0)?, 0, 0)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.png") && err.contains("b.png") && err.contains("size"),
        "{err}"
    );
    Ok(())
}

#[test]
fn batches_are_seeded_resumable_and_ceil_counted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let list = image_set(dir.path(), 10, 24, 20)?;
    let yaml = yaml_data(&format!(
        "    batch_size: 3\n    num_workers: 2\n    train: {{target: taming.data.custom.CustomTrain, params: {{training_images_list_file: {}, size: 16, random_crop: true, flip: true}}}}\n    validation: {{target: taming.data.custom.CustomTest, params: {{test_images_list_file: {}, size: 16}}}}\n",
        list.display(),
        list.display()
    ));
    let data = module(&yaml)?;
    assert_eq!((data.train_len(), data.val_len()), (10, 10));
    let a = data.train_loader(7)?;
    let b = data.train_loader(7)?;
    assert_eq!(a.batches_per_epoch(), 4); // ceil(10 / 3)
    let ea = collect(&a, 1, 0)?;
    assert_eq!(ea.len(), 4);
    let sizes: Vec<usize> = ea
        .iter()
        .map(|b| b["image"].dim(0))
        .collect::<candle_core::Result<_>>()?;
    assert_eq!(sizes, vec![3, 3, 3, 1]);
    assert_eq!(ea[0]["image"].dims(), &[3, 3, 16, 16]);
    let (min, max) = (
        ea[0]["image"].min_all()?.to_scalar::<f32>()?,
        ea[0]["image"].max_all()?.to_scalar::<f32>()?,
    );
    assert!((-1.0..=1.0).contains(&min) && (-1.0..=1.0).contains(&max));
    // same seed: same batches, whatever the worker count
    assert!(all_same(&ea, &collect(&b, 1, 0)?)?);
    assert!(all_same(&ea, &collect(&b.clone().with_workers(0), 1, 0)?)?);
    assert!(all_same(&ea, &collect(&b.clone().with_workers(5), 1, 0)?)?);
    // resuming at batch 2 gives the rest of the epoch
    assert!(all_same(&ea[2..], &collect(&b, 1, 2)?)?);
    assert!(collect(&b, 1, 4)?.is_empty());
    // other seeds and other epochs differ
    assert!(!all_same(&ea, &collect(&data.train_loader(8)?, 1, 0)?)?);
    assert!(!all_same(&ea, &collect(&a, 2, 0)?)?);
    // validation is in list order (center crop, no flip): batch 0 = the first three images
    let val = collect(&data.val_loader(1)?, 0, 0)?;
    let first = image_io::rgb_to_tensor(
        &image_io::rescale_center_crop(&image_io::load_rgb(&dir.path().join("img00.png"))?, 16)?,
        &Device::Cpu,
    )?;
    let diff = (val[0]["image"].narrow(0, 0, 1)? - first)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    assert!(all_same(&val, &collect(&data.val_loader(2)?, 0, 0)?)?);
    // the BatchSource view
    let src = LoaderSource::new(data.train_loader(7)?, Device::Cpu);
    assert_eq!(src.batches_per_epoch(), 4);
    let from_src: Vec<Batch> = src.epoch(1, 1).collect::<taming::Result<_>>()?;
    assert!(all_same(&ea[1..], &from_src)?);
    // dropping an iterator mid-epoch stops its workers
    let mut it = a.epoch(3, 0);
    assert!(it.next().is_some());
    drop(it);
    Ok(())
}

#[test]
fn corrupt_images_are_skipped_and_counted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let list = image_set(dir.path(), 3, 16, 16)?;
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"this is not a jpeg at all")?;
    let mut text = std::fs::read_to_string(&list)?;
    text.push_str(&format!("{}\n", bad.display()));
    std::fs::write(&list, text)?;
    let yaml = yaml_data(&format!(
        "    batch_size: 4\n    train: {{target: taming.data.custom.CustomTrain, params: {{training_images_list_file: {}, size: 8}}}}\n",
        list.display()
    ));
    let data = module(&yaml)?;
    let src = LoaderSource::new(data.train_loader(0)?, Device::Cpu);
    let batches: Vec<Batch> = src.epoch(0, 0).collect::<taming::Result<_>>()?;
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0]["image"].dims(), &[3, 3, 8, 8]);
    assert_eq!(src.skipped(), 1);
    assert_eq!(src.loader().skipped_files(), vec![bad.clone()]);
    // resuming after the bad image's batch does not decode it (validation keeps list order)
    let yaml_val = yaml
        .replace(
            "train: {target: taming.data.custom.CustomTrain, params: {training_images_list_file",
            "validation: {target: taming.data.custom.CustomTest, params: {test_images_list_file",
        )
        .replace("batch_size: 4", "batch_size: 3");
    let val = module(&yaml_val)?.val_loader(0)?;
    assert_eq!(val.batches_per_epoch(), 2);
    assert!(collect(&val, 0, 1)?.is_empty()); // batch 1 = the bad image alone: left out
    assert_eq!(val.skipped(), 1);
    let val = module(&yaml_val)?.val_loader(0)?;
    assert_eq!(collect(&val, 0, 0)?.len(), 1);
    let fresh = module(&yaml_val)?.val_loader(0)?;
    assert_eq!(fresh.batch(0, 0)?.map(|b| b.len()), Some(1));
    assert_eq!(fresh.skipped(), 0);
    // a batch of only the bad image is left out
    write_list(&list, &[bad.display().to_string()])?;
    let data = module(&yaml)?;
    let loader = data.train_loader(0)?;
    assert!(collect(&loader, 0, 0)?.is_empty());
    assert_eq!(loader.skipped(), 1);
    Ok(())
}

/// A synthetic segmentation pair whose image colour encodes the label (red = 20 * label): the
/// image `imgs/<name>.jpg` (PNG bytes, so that colours are exact) and the labels `segs/<name>.png`.
fn synthetic_pair(dir: &Path, name: &str, w: u32, h: u32) -> Result<()> {
    let label = |x: u32, y: u32| ((x / 3 + 2 * (y / 5)) % 12) as u8;
    GrayImage::from_fn(w, h, |x, y| Luma([label(x, y)]))
        .save(dir.join("segs").join(format!("{name}.png")))?;
    RgbImage::from_fn(w, h, |x, y| Rgb([label(x, y) * 20, 0, 0])).save_with_format(
        dir.join("imgs").join(format!("{name}.jpg")),
        image::ImageFormat::Png,
    )?;
    Ok(())
}

#[test]
fn segmentation_crop_and_flip_stay_aligned() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("segs"))?;
    std::fs::create_dir_all(dir.path().join("imgs"))?;
    let mut lines = Vec::new();
    for (i, (w, h)) in [(40u32, 30u32), (30, 44), (50, 32), (33, 33)]
        .into_iter()
        .enumerate()
    {
        synthetic_pair(dir.path(), &format!("p{i}"), w, h)?;
        lines.push(format!("p{i}.jpg"));
    }
    let csv = dir.path().join("pairs.txt");
    write_list(&csv, &lines)?;
    let yaml = yaml_data(&format!(
        "    batch_size: 2\n    train:\n      target: taming.data.sflckr.SegmentationBase\n      params: {{data_csv: {}, data_root: {}, segmentation_root: {}, size: 24, random_crop: true, flip: true, interpolation: nearest, n_labels: 12}}\n",
        csv.display(),
        dir.path().join("imgs").display(),
        dir.path().join("segs").display()
    ));
    let data = module(&yaml)?;
    for seed in 0..3 {
        for batch in collect(&data.train_loader(seed)?, 0, 0)? {
            let seg = &batch["segmentation"];
            assert_eq!(seg.dims()[1..], [12, 24, 24]);
            let labels = argmax_onehot(seg)?;
            let red = ((batch["image"].narrow(1, 0, 1)? + 1.0)? * 127.5)?
                .round()?
                .flatten_all()?
                .to_vec1::<f32>()?; // (B*H*W)
            for (l, r) in labels.iter().zip(&red) {
                assert_eq!(*l as f32 * 20.0, *r);
            }
        }
    }
    // n_labels too small: an error naming the file, value and pixel
    let yaml = yaml.replace("n_labels: 12", "n_labels: 5");
    let err = collect(&module(&yaml)?.train_loader(0)?, 0, 0)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("segs")
            && err.contains("label")
            && err.contains("pixel")
            && err.contains("n_labels = 5"),
        "{err}"
    );
    Ok(())
}

/// The first `n` lines of a shared example list, written to a temporary list file.
fn head_list(src: &Path, n: usize, dst: &Path) -> Result<Vec<String>> {
    let lines: Vec<String> = std::fs::read_to_string(src)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(str::to_string)
        .collect();
    write_list(dst, &lines)?;
    Ok(lines)
}

#[test]
fn shared_segmentation_examples_match_their_label_maps() -> Result<()> {
    let Some(shared) = common::shared("data") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    for (target, name, shift) in [
        ("taming.data.sflckr.Examples", "sflckr", false),
        ("taming.data.coco.Examples", "coco", true),
    ] {
        let csv = dir.path().join(format!("{name}.txt"));
        let lines = head_list(&shared.join(format!("{name}_examples.txt")), 3, &csv)?;
        let yaml = yaml_data(&format!(
            "    batch_size: 3\n    validation:\n      target: {target}\n      params: {{data_csv: {}, data_root: {}, segmentation_root: {}, size: 64}}\n",
            csv.display(),
            shared.join(format!("{name}_images")).display(),
            shared.join(format!("{name}_segmentations")).display()
        ));
        let batches = collect(&module(&yaml)?.val_loader(0)?, 0, 0)?;
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        let n_labels = if shift { 183 } else { 182 };
        assert_eq!(b["image"].dims(), &[3, 3, 64, 64]);
        assert_eq!(b["segmentation"].dims(), &[3, n_labels, 64, 64]);
        let got = argmax_onehot(&b["segmentation"])?;
        for (i, line) in lines.iter().enumerate() {
            let labels = image_io::load_labels(
                &shared
                    .join(format!("{name}_segmentations"))
                    .join(line.replace(".jpg", ".png")),
            )?;
            let r = image_io::resize_smallest_side(&labels, 64, image_io::Interpolation::Nearest);
            let (w, h) = r.dimensions();
            let c = image_io::crop(&r, image_io::center_crop_origin(w, h, 64, 64), 64, 64)?;
            let want: Vec<u32> = c
                .as_raw()
                .iter()
                .map(|&v| if shift { v.wrapping_add(1) } else { v } as u32)
                .collect();
            assert_eq!(
                &got[i * 64 * 64..(i + 1) * 64 * 64],
                &want[..],
                "{name} {line}"
            );
        }
    }
    Ok(())
}

fn write_depth(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> f32) -> Result<()> {
    let mut bytes = Vec::with_capacity((w * h * 4) as usize);
    for y in 0..h {
        for x in 0..w {
            bytes.extend_from_slice(&f(x, y).to_le_bytes());
        }
    }
    RgbaImage::from_raw(w, h, bytes)
        .ok_or_else(|| anyhow!("depth"))?
        .save(path)?;
    Ok(())
}

fn per_map_min_max(depth: &Tensor) -> Result<Vec<(f32, f32)>> {
    let b = depth.dim(0)?;
    let flat = depth.flatten_from(1)?; // (B, H*W)
    let mins = flat.min(1)?.to_vec1::<f32>()?;
    let maxs = flat.max(1)?.to_vec1::<f32>()?;
    Ok((0..b).map(|i| (mins[i], maxs[i])).collect())
}

#[test]
fn depth_pairs_are_normalised_per_map() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for sub in ["imgs/a", "depth/a"] {
        std::fs::create_dir_all(dir.path().join(sub))?;
    }
    let mut lines = Vec::new();
    for i in 0..3u32 {
        RgbImage::from_fn(32, 32, |x, y| Rgb([x as u8, y as u8, i as u8])).save_with_format(
            dir.path().join(format!("imgs/a/{i}.jpg")),
            image::ImageFormat::Png,
        )?;
        write_depth(
            &dir.path().join(format!("depth/a/{i}.png")),
            32,
            32,
            |x, y| 10.0 + (i + 1) as f32 * (x * 32 + y) as f32,
        )?;
        lines.push(format!("a/{i}.jpg"));
    }
    // DepthPairs replaces the extension: `a/0.jpg` -> `a/0.png`.
    let csv = dir.path().join("pairs.txt");
    write_list(&csv, &lines)?;
    let yaml = yaml_data(&format!(
        "    batch_size: 2\n    train: {{target: taming.data.depth.DepthPairs, params: {{data_csv: {}, data_root: {}, depth_root: {}, size: 32, flip: true}}}}\n",
        csv.display(),
        dir.path().join("imgs").display(),
        dir.path().join("depth").display()
    ));
    let data = module(&yaml)?;
    let batches = collect(&data.train_loader(3)?, 0, 0)?;
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0]["depth"].dims(), &[2, 1, 32, 32]);
    for b in &batches {
        for (min, max) in per_map_min_max(&b["depth"])? {
            assert!(
                (min + 1.0).abs() < 1e-6 && (max - 1.0).abs() < 1e-6,
                "{min} {max}"
            );
        }
    }
    // rescaled (64x48 -> 43x32) and randomly cropped and flipped: the depth map follows the
    // image (near in the top half, far in the bottom half; the image is black / white alike)
    for i in 0..2u32 {
        let (w, h) = (64, 48);
        RgbImage::from_fn(w, h, |_, y| {
            if y < h / 2 {
                Rgb([0, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        })
        .save_with_format(
            dir.path().join(format!("imgs/a/big{i}.jpg")),
            image::ImageFormat::Png,
        )?;
        write_depth(
            &dir.path().join(format!("depth/a/big{i}.png")),
            w,
            h,
            |x, y| {
                if y < h / 2 {
                    5.0
                } else {
                    50.0 + i as f32 * x as f32
                }
            },
        )?;
    }
    write_list(&csv, &["a/big0.jpg".into(), "a/big1.jpg".into()])?;
    let yaml = yaml.replace("size: 32, flip: true", "size: 32, random_crop: true");
    let batches = collect(&module(&yaml)?.train_loader(5)?, 0, 0)?;
    let depth = &batches[0]["depth"];
    assert_eq!(depth.dims(), &[2, 1, 32, 32]);
    for (min, max) in per_map_min_max(depth)? {
        assert!(
            (min + 1.0).abs() < 1e-5 && max <= 1.0 && max > 0.5,
            "{min} {max}"
        );
        // map 1 has its far end cropped off
    }
    let d = depth.flatten_all()?.to_vec1::<f32>()?;
    let img = batches[0]["image"]
        .narrow(1, 0, 1)?
        .flatten_all()?
        .to_vec1::<f32>()?; // red (B*H*W)
    for (dv, iv) in d.iter().zip(&img) {
        if *dv < -0.99 {
            assert_eq!(*iv, -1.0);
        } else if *dv > 0.0 {
            assert!(*iv > 0.0);
        }
    }
    Ok(())
}

/// DepthPairs with `crop_size`: rescaled to `size`, then a `crop_size` square cut from the image
/// and its depth map at the same place (the built-in depth model trains on such crops).
#[test]
fn depth_pairs_crop_size_keeps_the_pair_aligned() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for sub in ["imgs", "depth"] {
        std::fs::create_dir_all(dir.path().join(sub))?;
    }
    // 64x64, rescaled to 32: the left half is dark and near, the right half bright and far
    RgbImage::from_fn(64, 64, |x, _| Rgb(if x < 32 { [0; 3] } else { [255; 3] }))
        .save_with_format(dir.path().join("imgs/0.jpg"), image::ImageFormat::Png)?;
    write_depth(&dir.path().join("depth/0.png"), 64, 64, |x, _| {
        if x < 32 {
            1.0
        } else {
            9.0
        }
    })?;
    let csv = dir.path().join("pairs.txt");
    write_list(&csv, &["0.jpg".into()])?;
    let yaml = |extra: &str| {
        yaml_data(&format!(
            "    batch_size: 1\n    train: {{target: taming.data.depth.DepthPairs, params: {{data_csv: {}, data_root: {}, depth_root: {}, size: 32, random_crop: true{extra}}}}}\n",
            csv.display(),
            dir.path().join("imgs").display(),
            dir.path().join("depth").display()
        ))
    };
    let data = module(&yaml(", crop_size: 16"))?;
    let mut saw_both_halves = false;
    for epoch in 0..6 {
        let b = &collect(&data.train_loader(epoch)?, 0, 0)?[0];
        assert_eq!(b["image"].dims(), &[1, 3, 16, 16]);
        assert_eq!(b["depth"].dims(), &[1, 1, 16, 16]);
        let d = b["depth"].flatten_all()?.to_vec1::<f32>()?;
        let red = b["image"]
            .narrow(1, 0, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (dv, iv) in d.iter().zip(&red) {
            // near (-1) where dark, far (+1) where bright; the rescale blurs the seam
            if *dv < -0.9 {
                assert!(*iv < 0.0, "near but bright: {dv} {iv}");
            } else if *dv > 0.9 {
                assert!(*iv > 0.0, "far but dark: {dv} {iv}");
            }
        }
        saw_both_halves |= d.iter().any(|v| *v < -0.9) && d.iter().any(|v| *v > 0.9);
    }
    assert!(saw_both_halves, "no crop covered the seam in 6 epochs");
    // a crop larger than the rescaled side, or a crop without `size`, is refused by name
    let e = module(&yaml(", crop_size: 40"))
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("crop_size")),
        "{e:?}"
    );
    let no_size = yaml(", crop_size: 16").replace("size: 32, ", "");
    let e = module(&no_size).err().map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("needs `size`")),
        "{e:?}"
    );
    Ok(())
}

#[test]
fn shared_drin_examples() -> Result<()> {
    let Some(shared) = common::shared("data") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("drin.txt");
    head_list(&shared.join("drin_examples.txt"), 3, &csv)?;
    let yaml = yaml_data(&format!(
        "    batch_size: 2\n    validation: {{target: taming.data.imagenet.DRINExamples, params: {{data_csv: {}, data_root: {}, depth_root: {}}}}}\n",
        csv.display(),
        shared.join("drin_images").display(),
        shared.join("drin_depth").display()
    ));
    let batches = collect(&module(&yaml)?.val_loader(0)?, 0, 0)?;
    assert_eq!(batches.len(), 2); // ceil(3 / 2)
    assert_eq!(batches[0]["image"].dims(), &[2, 3, 256, 256]);
    assert_eq!(batches[0]["depth"].dims(), &[2, 1, 256, 256]);
    assert_eq!(batches[1]["depth"].dims(), &[1, 1, 256, 256]);
    for b in &batches {
        // normalised before the rescale and the crop (as the reference): within [-1, 1] (the
        // crop may cut off the extremes), spanning most of it
        for (min, max) in per_map_min_max(&b["depth"])? {
            assert!(min >= -1.0 && max <= 1.0 && max - min > 1.0, "{min} {max}");
            // (the `image` crate clamps float images to [0, 1] when resizing: not below 0 here)
            assert!(min < -0.5, "{min}");
        }
    }
    Ok(())
}

#[test]
fn image_folder_labels_are_sorted_subfolders() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (class, n) in [("zebra", 2), ("ant", 1), ("moth/deep", 2)] {
        let d = dir.path().join(class);
        std::fs::create_dir_all(&d)?;
        for i in 0..n {
            RgbImage::new(12, 10).save(d.join(format!("{i}.png")))?;
        }
    }
    std::fs::write(dir.path().join("ant/readme.txt"), "not an image")?;
    let yaml = yaml_data(&format!(
        "    batch_size: 8\n    validation: {{target: taming.data.folder.ImageFolder, params: {{root: {}, size: 8}}}}\n",
        dir.path().display()
    ));
    let data = module(&yaml)?;
    assert_eq!(data.val_len(), 5);
    assert_eq!(
        data.val_dataset().map(|d| d.class_names()),
        Some(vec!["ant".into(), "moth".into(), "zebra".into()])
    );
    let batches = collect(&data.val_loader(0)?, 0, 0)?;
    assert_eq!(
        batches[0]["class_label"].to_vec1::<u32>()?,
        vec![0, 1, 1, 2, 2]
    );
    assert_eq!(batches[0]["image"].dims(), &[5, 3, 8, 8]);
    // concatenated with a list dataset yielding no class label: an error naming both blocks
    let other = tempfile::tempdir()?;
    let list = image_set(other.path(), 1, 8, 8)?;
    let yaml = yaml_data(&format!(
        "    batch_size: 8\n    train:\n    - {{target: taming.data.folder.ImageFolder, params: {{root: {}}}}}\n    - {{target: taming.data.custom.CustomTrain, params: {{training_images_list_file: {}, size: 8}}}}\n",
        dir.path().display(),
        list.display()
    ));
    let msg = module(&yaml).map(|_| ()).unwrap_err().to_string();
    assert!(
        msg.contains("data.params.train.1") && msg.contains("data.params.train.0"),
        "{msg}"
    );
    Ok(())
}
