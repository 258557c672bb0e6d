//! `taming sample`: every task of the reference's transformer models, writing PNGs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use taming::cond_stage::{coordinate_map, CondStage};
use taming::cond_transformer::Net2NetTransformer;
use taming::config::ModelConfig;
use taming::first_stage::VqModelKind;
use taming::image_io::{self, Interpolation, LabelShift};
use taming::pipeline::{self, Condition, Keep, SampleRequest};
use taming::sampling::{Control, SamplingOptions};

use crate::common::{Builtin, ModelArgs};

#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (sample_000.png ..., grid.png, condition.png).
    #[arg(short, long, default_value = "samples")]
    pub out: PathBuf,
    /// Class id (class-conditional models).
    #[arg(long)]
    pub class: Option<usize>,
    /// Label map PNG, 8-bit label ids (label-to-image models).
    #[arg(long, value_name = "PNG")]
    pub segmentation: Option<PathBuf>,
    /// The label map (or, for a depth-conditioned model, the depth map) of procedural scene N
    /// (the generator of `taming scenes`): the built-in models' examples. With no model and no
    /// condition given, scene 7.
    #[arg(long, value_name = "N")]
    pub example_scene: Option<u64>,
    /// Which built-in model to sample when no model is named: `labels` (label map to picture,
    /// the default) or `depth` (depth map to picture; the default when --depth is given).
    #[arg(long, value_enum)]
    pub builtin: Option<Builtin>,
    /// COCO-Stuff label maps: add 1 to every label (255 = unlabeled wraps to 0), as the reference does.
    #[arg(long)]
    pub coco_shift: bool,
    /// Depth map PNG (RGBA8 holding one float32 per pixel; depth-to-image models).
    #[arg(long, value_name = "PNG")]
    pub depth: Option<PathBuf>,
    /// Low-resolution image (super-resolution / image-conditioned models); resized to the output size.
    #[arg(long, value_name = "PNG")]
    pub low_res: Option<PathBuf>,
    /// Use the coordinate map of the output size (coordinate-conditioned models).
    #[arg(long)]
    pub coord: bool,
    /// Image completion: keep part of this image's tokens and sample the rest.
    #[arg(long, value_name = "PNG")]
    pub complete: Option<PathBuf>,
    /// With --complete: keep this many latent rows (default: the top half).
    #[arg(long, value_name = "N")]
    pub keep_rows: Option<usize>,
    /// With --complete: keep where this mask PNG is white (a latent position is kept when most of its pixels are).
    #[arg(long, value_name = "PNG")]
    pub keep_mask: Option<PathBuf>,
    /// Output size HxW in pixels (default: the condition's size, else the training size). Larger
    /// than the training size uses the sliding window.
    #[arg(long, value_name = "HxW")]
    pub size: Option<String>,
    /// Seed of the draws: the same seed gives the same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Softmax temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens with probability mass p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Take the most likely token at every step (deterministic).
    #[arg(long)]
    pub greedy: bool,
    /// Number of samples.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Save the sampling progress of the first sample as animation.gif.
    #[arg(long)]
    pub animate: bool,
    /// With --animate: tokens between frames (default: one latent row).
    #[arg(long)]
    pub animate_every: Option<usize>,
    /// Transformer weight precision: f32, f16 or bf16 (the first stage stays f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    match parts.as_slice() {
        [h, w] => Ok((
            h.trim()
                .parse()
                .with_context(|| format!("--size {s}: height is not a number"))?,
            w.trim()
                .parse()
                .with_context(|| format!("--size {s}: width is not a number"))?,
        )),
        [n] => {
            let n = n
                .trim()
                .parse()
                .with_context(|| format!("--size {s}: expected HxW"))?;
            Ok((n, n))
        }
        _ => bail!("--size {s}: expected HxW, e.g. 256x384"),
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown --dtype {other}: use f32, f16 or bf16"),
    })
}

/// Loads a transformer model (config + checkpoint).
pub fn load_transformer(
    args: &ModelArgs,
    dtype: DType,
) -> anyhow::Result<(Net2NetTransformer, Device)> {
    let device = args.device()?;
    let (config, sd) = args.load()?;
    let ModelConfig::Transformer(cfg) = &config.model else {
        bail!("this config is a first-stage model: `taming sample` needs a Net2NetTransformer config (use `taming reconstruct` for first stages)");
    };
    let (model, report) = Net2NetTransformer::load(cfg, &sd, dtype, &device)?;
    tracing::info!("{}", report.summary());
    Ok((model, device))
}

/// The scene (`taming::scenes`) whose label map the built-in model samples when given no condition.
pub const BUILTIN_EXAMPLE_SCENE: u64 = 7;
/// Output size of the built-in model when no size or spatial input is given.
pub const BUILTIN_SIZE: (usize, usize) = (128, 128);

fn round_down(v: u32, f: usize) -> u32 {
    (v / f as u32 * f as u32).max(f as u32)
}

/// The spatial input given on the command line, if any, with its natural size.
fn spatial_size(a: &SampleArgs, f: usize) -> anyhow::Result<Option<(usize, usize)>> {
    let path = [&a.segmentation, &a.depth, &a.low_res, &a.complete]
        .into_iter()
        .flatten()
        .next();
    let Some(path) = path else { return Ok(None) };
    let img = image_io::open(path)?;
    let (w, h) = (img.width(), img.height());
    Ok(Some((round_down(h, f) as usize, round_down(w, f) as usize)))
}

/// Builds the condition for the model's conditioning stage from the arguments.
fn condition(
    a: &SampleArgs,
    model: &Net2NetTransformer,
    size: (usize, usize),
    device: &Device,
) -> anyhow::Result<Condition> {
    let (h, w) = (size.0 as u32, size.1 as u32);
    let stage = model.cond_stage();
    let depth_model = matches!(stage, CondStage::Vq(m) if m.in_channels() == 1);
    let given = [
        a.class.is_some(),
        a.segmentation.is_some() || (a.example_scene.is_some() && !depth_model),
        a.depth.is_some() || (a.example_scene.is_some() && depth_model),
        a.low_res.is_some(),
        a.coord,
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given > 1 {
        bail!("give one condition: --class, --segmentation, --depth, --low-res or --coord");
    }
    let need = |what: &str| {
        anyhow::anyhow!(
            "this model is conditioned on {}: pass {what}",
            stage.describe()
        )
    };
    Ok(match stage {
        CondStage::Sos { .. } => {
            if given > 0 {
                bail!("this model is unconditional: drop the condition arguments");
            }
            Condition::None
        }
        CondStage::Labelator { .. } => Condition::Class(a.class.ok_or_else(|| need("--class N"))?),
        CondStage::Coord { .. } => {
            if !a.coord && given > 0 {
                return Err(need("--coord"));
            }
            Condition::Spatial(coordinate_map(size.0, size.1, device)?)
        }
        CondStage::Vq(m) if m.kind() == VqModelKind::Segmentation => {
            // the built-in model's own examples: label maps of the procedural scenes
            let example = |n: u64| {
                (
                    taming::scenes::example_label_map(n, w, h),
                    PathBuf::from(format!("(example scene {n})")),
                )
            };
            let (labels, path) = match (&a.segmentation, a.example_scene) {
                (Some(_), Some(_)) => bail!("give --segmentation or --example-scene, not both"),
                (Some(path), None) => (image_io::load_labels(path)?, path.clone()),
                (None, Some(n)) => example(n),
                (None, None) if a.model.is_unset() && given == 0 => example(BUILTIN_EXAMPLE_SCENE),
                (None, None) => return Err(need("--segmentation PNG")),
            };
            let labels = image_io::fit(&labels, h, w, Interpolation::Nearest)?;
            let path = path.as_path();
            let shift = if a.coco_shift {
                LabelShift::CocoPlusOne
            } else {
                LabelShift::None
            };
            let (_, onehot) =
                image_io::labels_to_onehot(&labels, m.in_channels(), shift, path, device)?;
            Condition::Spatial(onehot)
        }
        CondStage::Vq(m) if m.in_channels() == 1 => match (&a.depth, a.example_scene) {
            (Some(_), Some(_)) => bail!("give --depth or --example-scene, not both"),
            (Some(path), None) => Condition::Spatial(image_io::load_depth_fit(path, h, w, device)?),
            (None, n) => {
                // the built-in depth model's own examples: depth maps of the procedural scenes
                let n = match n {
                    Some(n) => n,
                    None if a.model.is_unset() && given == 0 => BUILTIN_EXAMPLE_SCENE,
                    None => return Err(need("--depth PNG")),
                };
                let depth = taming::scenes::render(n, w, h).depth.into_raw();
                Condition::Spatial(image_io::normalize_depth(
                    depth, h as usize, w as usize, device,
                )?)
            }
        },
        CondStage::Vq(_) | CondStage::FirstStage => {
            let path = a.low_res.as_ref().ok_or_else(|| need("--low-res PNG"))?;
            let img = image_io::fit(&image_io::load_rgb(path)?, h, w, Interpolation::Bicubic)?;
            Condition::Spatial(image_io::rgb_to_tensor(&img, device)?)
        }
    })
}

/// A picture of the condition for condition.png, if it has one.
fn condition_picture(model: &Net2NetTransformer, c: &Condition) -> anyhow::Result<Option<Tensor>> {
    let Condition::Spatial(t) = c else {
        return Ok(None);
    };
    Ok(Some(match model.cond_stage() {
        CondStage::Vq(m) if m.kind() == VqModelKind::Segmentation => m.to_rgb(t)?,
        // coordinates lie in [0, 1]; depth maps and images in [-1, 1]
        CondStage::Coord { .. } => ((t.clone() * 2.0)? - 1.0)?,
        _ => t.clone(),
    }))
}

fn keep_mask(path: &Path, size: (usize, usize), grid: (usize, usize)) -> anyhow::Result<Vec<bool>> {
    let img = image_io::open(path)?.to_luma8();
    let img = image_io::fit(&img, size.0 as u32, size.1 as u32, Interpolation::Nearest)?;
    let (gh, gw) = grid;
    let (fh, fw) = (size.0 / gh, size.1 / gw);
    Ok((0..gh * gw)
        .map(|p| {
            let (gi, gj) = (p / gw, p % gw);
            let mut on = 0;
            for y in gi * fh..(gi + 1) * fh {
                for x in gj * fw..(gj + 1) * fw {
                    if img.get_pixel(x as u32, y as u32).0[0] >= 128 {
                        on += 1;
                    }
                }
            }
            on * 2 > fh * fw
        })
        .collect())
}

pub fn sample(mut a: SampleArgs) -> anyhow::Result<ExitCode> {
    let dtype = parse_dtype(&a.dtype)?;
    if a.model.is_unset() {
        let builtin = a.builtin.unwrap_or(if a.depth.is_some() {
            Builtin::Depth
        } else {
            Builtin::Labels
        });
        a.model.builtin = builtin;
        let example = match builtin {
            Builtin::Labels if a.segmentation.is_none() => "label map",
            Builtin::Depth if a.depth.is_none() => "depth map",
            _ => "",
        };
        eprintln!(
            "no model given: sampling the built-in model ({}){}",
            builtin.dir().display(),
            if !example.is_empty() {
                let n = a.example_scene.unwrap_or(BUILTIN_EXAMPLE_SCENE);
                format!(" on the {example} of example scene {n}")
            } else {
                String::new()
            }
        );
    } else if a.builtin.is_some() {
        bail!(
            "--builtin chooses a built-in model: drop it when naming a model (--config/--ckpt/-r)"
        );
    }
    let (model, device) = load_transformer(&a.model, dtype)?;
    let f = model.first_stage().downsample_factor();
    let res = model.config().first_stage.ddconfig.resolution;
    let size = match &a.size {
        Some(s) => parse_size(s)?,
        None => match spatial_size(&a, f)? {
            Some(s) => s,
            None if a.model.is_unset() => BUILTIN_SIZE,
            None => (res, res),
        },
    };
    let grid = pipeline::latent_grid(&model, size)?;
    let cond = condition(&a, &model, size, &device)?;
    let complete = match &a.complete {
        Some(path) => {
            let img = image_io::fit(
                &image_io::load_rgb(path)?,
                size.0 as u32,
                size.1 as u32,
                Interpolation::Bicubic,
            )?;
            let keep = match (&a.keep_mask, a.keep_rows) {
                (Some(_), Some(_)) => bail!("give --keep-rows or --keep-mask, not both"),
                (Some(m), None) => Keep::Mask(keep_mask(m, size, grid)?),
                (None, Some(n)) => Keep::Rows(n),
                (None, None) => Keep::TopHalf,
            };
            Some((image_io::rgb_to_tensor(&img, &device)?, keep))
        }
        None => {
            if a.keep_rows.is_some() || a.keep_mask.is_some() {
                bail!("--keep-rows and --keep-mask need --complete IMAGE");
            }
            None
        }
    };
    let req = SampleRequest {
        condition: cond.clone(),
        size,
        complete,
        batch: a.batch,
        options: SamplingOptions {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            greedy: a.greedy,
            seed: a.seed,
        },
    };
    req.options.validate()?;
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        // a second Ctrl-C while stopping ends the process at once
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let bar = ProgressBar::new((grid.0 * grid.1) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} sampling [{bar:30}] {pos}/{len} tokens {per_sec} [{elapsed_precise}, ETA {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let every = a.animate_every.unwrap_or(grid.1).max(1);
    let mut frames: Vec<image::RgbImage> = Vec::new();
    let mut frame_err: Option<anyhow::Error> = None;
    let out = pipeline::sample(&model, &req, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        if a.animate && (p.done % every == 0 || p.done == p.total) && frame_err.is_none() {
            let frame = (|| -> anyhow::Result<image::RgbImage> {
                let t = Tensor::from_vec(p.raster[0].clone(), (1, grid.0 * grid.1), &device)?;
                let img = model.first_stage().decode_indices(&t, grid)?;
                Ok(image_io::tensor_to_rgb(&img.get(0)?)?)
            })();
            match frame {
                Ok(fr) => frames.push(fr),
                Err(e) => frame_err = Some(e),
            }
        }
        if cancel.load(Ordering::SeqCst) {
            Control::Cancel
        } else {
            Control::Continue
        }
    })?;
    bar.finish_and_clear();
    if out.cancelled {
        eprintln!("cancelled: nothing was written");
        return Ok(ExitCode::from(130));
    }
    if let Some(e) = frame_err {
        return Err(e.context("cannot decode an animation frame"));
    }
    let images = out.images.context("sampling returned no images")?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut written = Vec::new();
    for i in 0..images.dim(0)? {
        let p = a.out.join(format!("sample_{i:03}.png"));
        image_io::save_tensor_png(&images.get(i)?, &p)?;
        written.push(p);
    }
    let cols = (a.batch as f64).sqrt().ceil() as usize;
    let grid_path = a.out.join("grid.png");
    image_io::save_png(&image_io::grid(&images, cols)?, &grid_path)?;
    written.push(grid_path);
    if let Some(c) = condition_picture(&model, &cond)? {
        let p = a.out.join("condition.png");
        image_io::save_tensor_png(&c.get(0)?, &p)?;
        written.push(p);
    }
    if a.animate {
        let p = a.out.join("animation.gif");
        write_gif(&frames, &p)?;
        written.push(p);
    }
    println!(
        "sampled {} image(s) of {}x{} ({}x{} tokens{}) with seed {}:",
        a.batch,
        size.0,
        size.1,
        grid.0,
        grid.1,
        if out.sliding { ", sliding window" } else { "" },
        a.seed
    );
    for p in written {
        println!("  {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes frames as an animated GIF, atomically.
fn write_gif(frames: &[image::RgbImage], path: &Path) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut buf, 10);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite)?;
        let n = frames.len();
        for (i, f) in frames.iter().enumerate() {
            let rgba = image::DynamicImage::ImageRgb8(f.clone()).to_rgba8();
            let delay = if i + 1 == n { 1500 } else { 80 };
            let frame =
                image::Frame::from_parts(rgba, 0, 0, image::Delay::from_numer_denom_ms(delay, 1));
            enc.encode_frame(frame)?;
        }
    }
    image_io::write_atomic(path, &buf)?;
    Ok(())
}
