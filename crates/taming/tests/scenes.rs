//! Tests of the procedural scene dataset (`taming::scenes`): determinism, label statistics,
//! colours and depth consistent with the labels, and the dataset files on disk.
//!
//! `cargo test --release -p taming --test scenes -- --ignored preview` writes contact sheets
//! (picture | labels | depth) to /tmp/scenes_preview for a visual check.

use std::collections::BTreeSet;

use image::{imageops, GrayImage, RgbImage};
use taming::scenes::{self, Scene, LABELS, NUM_LABELS};

fn mean_color(s: &Scene, label: u8) -> Option<[f64; 3]> {
    let mut sum = [0f64; 3];
    let mut n = 0usize;
    for (p, l) in s.image.pixels().zip(s.labels.pixels()) {
        if l.0[0] == label {
            for (acc, &v) in sum.iter_mut().zip(&p.0) {
                *acc += v as f64;
            }
            n += 1;
        }
    }
    (n > 0).then(|| sum.map(|v| v / n as f64))
}

#[test]
fn same_seed_same_bytes_different_seeds_differ() {
    for seed in [0u64, 1, 42, u64::MAX] {
        let a = scenes::render(seed, 96, 64);
        let b = scenes::render(seed, 96, 64);
        assert_eq!(a.image.as_raw(), b.image.as_raw());
        assert_eq!(a.labels.as_raw(), b.labels.as_raw());
        let (da, db): (Vec<u32>, Vec<u32>) = (
            a.depth.as_raw().iter().map(|v| v.to_bits()).collect(),
            b.depth.as_raw().iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(da, db);
        assert_eq!(a.info, b.info);
    }
    let a = scenes::render(5, 64, 64);
    let b = scenes::render(6, 64, 64);
    assert_ne!(a.image.as_raw(), b.image.as_raw());
    assert_ne!(a.labels.as_raw(), b.labels.as_raw());
}

/// A fingerprint of a few scenes, so that any change of the output (on another machine, or by
/// an edit) shows up. Update the constant when the look is changed on purpose.
#[test]
fn output_fingerprint() {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for seed in 0..4u64 {
        let s = scenes::render(seed, 64, 48);
        let bytes = s
            .image
            .as_raw()
            .iter()
            .chain(s.labels.as_raw())
            .copied()
            .chain(s.depth.as_raw().iter().flat_map(|v| v.to_le_bytes()));
        for b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("fingerprint {h:#018x}");
    assert_eq!(
        h, FINGERPRINT,
        "scene output changed: fingerprint {h:#018x}"
    );
}

const FINGERPRINT: u64 = 0x6eb4_ba58_073a_64a5;

#[test]
fn labels_are_in_the_table_and_all_appear() {
    let mut scenes_with = [0usize; NUM_LABELS];
    let mut horizons = BTreeSet::new();
    let mut label_sets = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for seed in 0..50u64 {
        let s = scenes::render(seed, 64, 64);
        let hist = s.label_histogram();
        assert_eq!(
            hist.iter().sum::<u64>(),
            64 * 64,
            "seed {seed}: a label outside the table"
        );
        let present: Vec<usize> = (0..NUM_LABELS).filter(|&l| hist[l] > 0).collect();
        for &l in &present {
            scenes_with[l] += 1;
        }
        // The first row (from the top) that is mostly ground or water.
        let row = (0..64u32).find(|&y| {
            (0..64u32)
                .filter(|&x| {
                    let l = s.labels.get_pixel(x, y).0[0];
                    l == scenes::GRASS || l == scenes::WATER || l == scenes::SAND
                })
                .count()
                > 20
        });
        horizons.insert(row);
        label_sets.insert(present);
        kinds.insert(format!("{:?}", s.info.water));
    }
    for (l, &n) in scenes_with.iter().enumerate() {
        println!("{:>8}: in {n} of 50 scenes", LABELS[l].name);
        assert!(n > 0, "label {} never appears", LABELS[l].name);
    }
    assert!(scenes_with[scenes::SKY as usize] >= 45);
    assert!(
        horizons.len() >= 10,
        "horizon rows barely vary: {horizons:?}"
    );
    assert!(
        label_sets.len() >= 15,
        "label sets barely vary: {}",
        label_sets.len()
    );
    assert_eq!(kinds.len(), 3, "water kinds: {kinds:?}");
}

#[test]
fn colours_follow_labels() {
    let (mut sky_blue, mut grass_green, mut water_dark, mut n_sky_grass, mut n_water) =
        (0, 0, 0, 0, 0);
    let mut sky_b = Vec::new();
    let mut grass_b = Vec::new();
    for seed in 0..40u64 {
        let s = scenes::render(seed, 64, 64);
        let sky = mean_color(&s, scenes::SKY);
        let grass = mean_color(&s, scenes::GRASS);
        let water = mean_color(&s, scenes::WATER);
        if let (Some(sky), Some(grass)) = (sky, grass) {
            n_sky_grass += 1;
            // Sky: bluer (blue against red+green) and brighter than grass.
            let blueness = |c: [f64; 3]| c[2] - 0.5 * (c[0] + c[1]);
            if blueness(sky) > blueness(grass)
                && sky.iter().sum::<f64>() > grass.iter().sum::<f64>()
            {
                sky_blue += 1;
            }
            if grass[1] > grass[2] {
                grass_green += 1;
            }
            sky_b.push(sky.iter().sum::<f64>());
            grass_b.push(grass.iter().sum::<f64>());
        }
        if let (Some(sky), Some(water)) = (sky, water) {
            n_water += 1;
            if water.iter().sum::<f64>() < sky.iter().sum::<f64>() {
                water_dark += 1;
            }
        }
    }
    println!("sky bluer+brighter {sky_blue}/{n_sky_grass}, grass green {grass_green}, water darker {water_dark}/{n_water}");
    assert!(n_sky_grass >= 20 && n_water >= 10);
    assert!(sky_blue as f64 >= 0.8 * n_sky_grass as f64);
    assert!(grass_green as f64 >= 0.95 * n_sky_grass as f64);
    assert!(water_dark as f64 >= 0.85 * n_water as f64);
}

#[test]
fn depth_follows_geometry() {
    let mut checked = 0;
    for seed in 0..40u64 {
        let s = scenes::render(seed, 64, 64);
        let mean = |pred: &dyn Fn(u32, u32, u8) -> bool| {
            let (mut sum, mut n) = (0f64, 0usize);
            for y in 0..64 {
                for x in 0..64 {
                    let l = s.labels.get_pixel(x, y).0[0];
                    if pred(x, y, l) {
                        sum += s.depth.get_pixel(x, y).0[0] as f64;
                        n += 1;
                    }
                }
            }
            (n > 0).then(|| sum / n as f64)
        };
        let sky = mean(&|_, _, l| l == scenes::SKY);
        let mountain = mean(&|_, _, l| l == scenes::MOUNTAIN || l == scenes::SNOW);
        let grass_bottom = mean(&|_, y, l| y >= 56 && l == scenes::GRASS);
        // Sky is at infinity.
        if let Some(sky) = sky {
            assert_eq!(sky, 0.0, "seed {seed}");
        }
        if let (Some(sky), Some(m), Some(g)) = (sky, mountain, grass_bottom) {
            assert!(
                sky < m && m < g,
                "seed {seed}: sky {sky} mountain {m} grass {g}"
            );
            checked += 1;
        }
        // The ground gets nearer row by row: the mean inverse depth of ground pixels grows.
        let mut last = 0.0;
        for y in 0..64 {
            let row: Vec<f32> = (0..64)
                .filter(|&x| {
                    matches!(
                        s.labels.get_pixel(x, y).0[0],
                        scenes::GRASS | scenes::WATER | scenes::SAND | scenes::PATH
                    )
                })
                .map(|x| s.depth.get_pixel(x, y).0[0])
                .collect();
            if let Some(&d) = row.first() {
                assert!(
                    row.iter().all(|&v| v == d),
                    "seed {seed} row {y}: flat ground at one depth per row"
                );
                assert!(d > last, "seed {seed} row {y}");
                last = d;
            }
        }
    }
    assert!(
        checked >= 15,
        "only {checked} scenes had sky, mountains and near grass"
    );
}

#[test]
fn write_dataset_files() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut calls = Vec::new();
    let summary = scenes::write_dataset(dir.path(), 3, 2, 32, 7, |d, t| calls.push((d, t)))?;
    assert_eq!(calls, vec![(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]);
    assert_eq!(summary.n_train, 3);
    assert_eq!(summary.n_val, 2);
    assert_eq!(summary.label_pixels.iter().sum::<u64>(), 5 * 32 * 32);
    let train = std::fs::read_to_string(dir.path().join("train.txt"))?;
    let val = std::fs::read_to_string(dir.path().join("val.txt"))?;
    assert_eq!(train, "00000.png\n00001.png\n00002.png\n");
    assert_eq!(val, "00003.png\n00004.png\n");
    let labels = std::fs::read_to_string(dir.path().join("labels.txt"))?;
    assert_eq!(labels.lines().count(), NUM_LABELS);
    assert_eq!(labels.lines().next(), Some("0 sky"));
    assert!(labels.contains("\n8 snow\n"));
    let seeds: BTreeSet<u64> = summary
        .train_seeds
        .iter()
        .chain(&summary.val_seeds)
        .copied()
        .collect();
    assert_eq!(seeds.len(), 5, "train and val seeds are disjoint");
    for (i, &seed) in summary
        .train_seeds
        .iter()
        .chain(&summary.val_seeds)
        .enumerate()
    {
        let name = format!("{i:05}.png");
        let scene = scenes::render(seed, 32, 32);
        let img = image::open(dir.path().join("images").join(&name))?.to_rgb8();
        assert_eq!(img.as_raw(), scene.image.as_raw());
        let seg = image::open(dir.path().join("segmentations").join(&name))?;
        assert!(matches!(seg, image::DynamicImage::ImageLuma8(_)));
        assert_eq!(seg.to_luma8().as_raw(), scene.labels.as_raw());
        let (depth, h, w) =
            taming::image_io::load_depth_raw(&dir.path().join("depth").join(&name))?;
        assert_eq!((h, w), (32, 32));
        let want: Vec<u32> = scene.depth.as_raw().iter().map(|v| v.to_bits()).collect();
        let got: Vec<u32> = depth.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
    }
    // No temporary files are left behind.
    for sub in ["", "images", "segmentations", "depth"] {
        for e in std::fs::read_dir(dir.path().join(sub))? {
            let n = e?.file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with('.'), "left over: {sub}/{n}");
        }
    }
    assert!(scenes::write_dataset(dir.path(), 1, 0, 0, 7, |_, _| {}).is_err());
    Ok(())
}

#[test]
fn timing() {
    for (size, budget_ms) in [(64u32, 25.0), (128, 50.0), (256, 1e9), (512, 1e9)] {
        let n = 20;
        let t = std::time::Instant::now();
        for seed in 0..n {
            std::hint::black_box(scenes::render(seed, size, size));
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!("{size}x{size}: {ms:.2} ms per scene");
        if !cfg!(debug_assertions) {
            assert!(ms < budget_ms, "{size}x{size} takes {ms:.1} ms");
        }
    }
}

fn sheet_row(s: &Scene, scale: u32) -> RgbImage {
    let (w, h) = s.image.dimensions();
    let labels = scenes::colorize_labels(&s.labels);
    let depth: GrayImage = scenes::depth_preview(&s.depth);
    let depth = image::DynamicImage::ImageLuma8(depth).to_rgb8();
    let mut row = RgbImage::new(3 * w * scale + 8, h * scale);
    for (k, img) in [&s.image, &labels, &depth].into_iter().enumerate() {
        let big = imageops::resize(img, w * scale, h * scale, imageops::FilterType::Nearest);
        imageops::replace(&mut row, &big, (k as u32 * (w * scale + 4)) as i64, 0);
    }
    row
}

#[test]
#[ignore = "writes preview sheets to /tmp/scenes_preview"]
fn preview() -> anyhow::Result<()> {
    let out = std::path::Path::new("/tmp/scenes_preview");
    std::fs::create_dir_all(out)?;
    // SCENES_PREVIEW_FROM=n starts the sheets at seed n.
    let first: u64 = std::env::var("SCENES_PREVIEW_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for sheet in 0..4u64 {
        let rows: Vec<RgbImage> = (0..4)
            .map(|k| sheet_row(&scenes::render(first + sheet * 4 + k, 128, 128), 2))
            .collect();
        let (w, h) = rows[0].dimensions();
        let mut img = RgbImage::new(w, 4 * h + 12);
        for (k, r) in rows.iter().enumerate() {
            imageops::replace(&mut img, r, 0, (k as u32 * (h + 4)) as i64);
        }
        img.save(out.join(format!("sheet{sheet}.png")))?;
    }
    // Chosen seeds at a chosen size: SCENES_PREVIEW_SEEDS=1,2,3 SCENES_PREVIEW_SIZE=256.
    if let Ok(list) = std::env::var("SCENES_PREVIEW_SEEDS") {
        let size: u32 = std::env::var("SCENES_PREVIEW_SIZE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(256);
        for seed in list.split(',').filter_map(|s| s.trim().parse::<u64>().ok()) {
            let s = scenes::render(seed, size, size);
            println!("seed {seed}: {:?}", s.info);
            sheet_row(&s, 1).save(out.join(format!("seed{seed}_{size}.png")))?;
        }
    }
    // Other sizes: 64x64 (x4) and a wide 192x96 (x2).
    for seed in 0..3u64 {
        sheet_row(&scenes::render(first + seed, 64, 64), 4)
            .save(out.join(format!("s64_{seed}.png")))?;
        sheet_row(&scenes::render(first + seed, 192, 96), 2)
            .save(out.join(format!("wide_{seed}.png")))?;
    }
    Ok(())
}
