//! `taming reconstruct`, `taming encode` and `taming decode`: the first stage on files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use clap::Args;
use taming::config::{ModelConfig, VqKind, VqModelConfig};
use taming::first_stage::VqModel;
use taming::image_io::{self, LabelShift};

use crate::common::{ModelArgs, DTYPE};

#[derive(Args)]
pub struct ReconstructArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input: a photo (RGB models), a label PNG (segmentation models) or an RGBA depth PNG (1-channel models).
    pub input: PathBuf,
    /// Output PNG.
    #[arg(short, long, default_value = "reconstruction.png")]
    pub output: PathBuf,
    #[command(flatten)]
    pub prep: PrepArgs,
}

#[derive(Args, Clone)]
pub struct PrepArgs {
    /// Rescale the smaller side to SIZE and center-crop SIZE x SIZE (the reference's preprocessing).
    /// Without it the input is used as is and must be divisible by the downsampling factor.
    #[arg(long)]
    pub size: Option<u32>,
    /// COCO-Stuff label maps: add 1 to every label (255 = unlabeled wraps to 0), as the reference does.
    #[arg(long)]
    pub coco_shift: bool,
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input image (see `reconstruct`).
    pub input: PathBuf,
    /// Output file: .safetensors (tensors `indices` (1, h*w) int64 and `grid` [h, w]) or .json.
    #[arg(short, long, default_value = "codes.safetensors")]
    pub output: PathBuf,
    #[command(flatten)]
    pub prep: PrepArgs,
}

#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Codes written by `taming encode` (.safetensors or .json).
    pub codes: PathBuf,
    /// Output PNG (several samples: one file per sample, numbered).
    #[arg(short, long, default_value = "decoded.png")]
    pub output: PathBuf,
}

/// Loads a first-stage model: a VQ config as is, or a transformer config's first stage.
pub fn load_first_stage(args: &ModelArgs) -> anyhow::Result<(VqModel, VqModelConfig, Device)> {
    let device = args.device()?;
    let (config, sd) = args.load()?;
    let (cfg, sd) = match &config.model {
        ModelConfig::Vq(cfg) => (cfg.clone(), sd),
        ModelConfig::Transformer(t) => (t.first_stage.clone(), sd.sub("first_stage_model.")),
    };
    let (model, report) = taming::model::load_vq(&cfg, &sd, DTYPE, &device)?;
    tracing::info!("{}", report.summary());
    Ok((model, cfg, device))
}

/// What the model's input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Rgb,
    Labels,
    Depth,
}

pub fn modality(cfg: &VqModelConfig) -> Modality {
    match cfg.kind {
        VqKind::Segmentation { .. } => Modality::Labels,
        _ if cfg.ddconfig.in_channels == 1 => Modality::Depth,
        _ => Modality::Rgb,
    }
}

/// Loads an input file as the model's (1, C, H, W) tensor.
pub fn load_input(
    cfg: &VqModelConfig,
    path: &Path,
    prep: &PrepArgs,
    device: &Device,
) -> anyhow::Result<Tensor> {
    Ok(match modality(cfg) {
        Modality::Labels => {
            let n = cfg.ddconfig.in_channels;
            let shift = if prep.coco_shift {
                LabelShift::CocoPlusOne
            } else {
                LabelShift::None
            };
            image_io::load_segmentation(path, n, shift, prep.size, device)?.1
        }
        Modality::Depth => image_io::load_depth(path, prep.size, device)?,
        Modality::Rgb => {
            let img = image_io::load_rgb(path)?;
            let img = match prep.size {
                Some(s) => image_io::rescale_center_crop(&img, s)?,
                None => img,
            };
            image_io::rgb_to_tensor(&img, device)?
        }
    })
}

/// A model output (1, C, H, W) as a picture: RGB as is, label logits colorized, depth as gray.
fn to_picture(model: &VqModel, cfg: &VqModelConfig, x: &Tensor) -> anyhow::Result<Tensor> {
    Ok(match modality(cfg) {
        Modality::Labels => {
            let n = x.dim(1)?;
            let ids = x.argmax_keepdim(1)?; // (B, 1, H, W)
            let classes = Tensor::arange(0u32, n as u32, x.device())?.reshape((1, n, 1, 1))?;
            let onehot = ids.broadcast_eq(&classes)?.to_dtype(DType::F32)?; // (B, n, H, W)
            model.to_rgb(&onehot)?
        }
        _ => x.clone(),
    })
}

pub fn reconstruct(a: ReconstructArgs) -> anyhow::Result<ExitCode> {
    let (model, cfg, device) = load_first_stage(&a.model)?;
    let x = load_input(&cfg, &a.input, &a.prep, &device)?;
    let (_, _, h, w) = x.dims4()?;
    let q = model
        .encode(&x)
        .with_context(|| format!("cannot encode {}", a.input.display()))?;
    let rec = model.decode(&q.quant)?;
    let pic = to_picture(&model, &cfg, &rec)?;
    image_io::save_tensor_png(&pic.get(0)?, &a.output)?;
    let (gh, gw) = q.grid;
    match modality(&cfg) {
        Modality::Labels => {
            let acc = x
                .argmax(1)?
                .eq(&rec.argmax(1)?)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()?;
            println!(
                "{}: {w}x{h} -> {gw}x{gh} codes -> {} (label accuracy {:.2}%)",
                a.input.display(),
                a.output.display(),
                100.0 * acc
            );
        }
        _ => {
            let psnr = image_io::psnr(&x, &rec)?;
            println!(
                "{}: {w}x{h} -> {gw}x{gh} codes -> {} (PSNR {psnr:.2} dB)",
                a.input.display(),
                a.output.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn encode(a: EncodeArgs) -> anyhow::Result<ExitCode> {
    let (model, cfg, device) = load_first_stage(&a.model)?;
    let x = load_input(&cfg, &a.input, &a.prep, &device)?;
    let q = model
        .encode(&x)
        .with_context(|| format!("cannot encode {}", a.input.display()))?;
    let idx = q.indices.to_dtype(DType::I64)?; // (1, h*w)
    write_codes(&a.output, &idx, q.grid)?;
    println!(
        "{}: {}x{} codes (of {}) -> {}",
        a.input.display(),
        q.grid.1,
        q.grid.0,
        model.n_embed(),
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes indices (B, h*w) and the grid, as JSON or safetensors (atomically).
pub fn write_codes(path: &Path, idx: &Tensor, grid: (usize, usize)) -> anyhow::Result<()> {
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json {
        let rows = idx.to_vec2::<i64>()?;
        let bytes = serde_json::to_vec_pretty(&serde_json::json!({
            "grid": [grid.0, grid.1],
            "indices": rows,
        }))?;
        taming::image_io::write_atomic(path, &bytes)?;
    } else {
        let g = Tensor::new(&[grid.0 as i64, grid.1 as i64], &Device::Cpu)?;
        let map = std::collections::HashMap::from([
            ("indices".to_string(), idx.to_device(&Device::Cpu)?),
            ("grid".to_string(), g),
        ]);
        taming::image_io::write_atomic_with(path, |tmp| {
            Ok(candle_core::safetensors::save(&map, tmp)?)
        })?;
    }
    Ok(())
}

/// Reads codes written by [`write_codes`]: indices (B, h*w) and grid.
pub fn read_codes(path: &Path, device: &Device) -> anyhow::Result<(Tensor, (usize, usize))> {
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let grid = v["grid"]
            .as_array()
            .filter(|g| g.len() == 2)
            .and_then(|g| Some((g[0].as_u64()? as usize, g[1].as_u64()? as usize)))
            .with_context(|| format!("{}: `grid` must be [height, width]", path.display()))?;
        let rows = v["indices"]
            .as_array()
            .with_context(|| format!("{}: `indices` must be a list of lists", path.display()))?;
        let mut flat = Vec::new();
        for r in rows {
            let r = r
                .as_array()
                .with_context(|| format!("{}: `indices` rows must be lists", path.display()))?;
            if r.len() != grid.0 * grid.1 {
                bail!(
                    "{}: a row has {} indices, the grid {}x{} needs {}",
                    path.display(),
                    r.len(),
                    grid.0,
                    grid.1,
                    grid.0 * grid.1
                );
            }
            for x in r {
                flat.push(x.as_u64().with_context(|| {
                    format!(
                        "{}: index {x} is not a non-negative integer",
                        path.display()
                    )
                })? as u32);
            }
        }
        let b = rows.len();
        Ok((Tensor::from_vec(flat, (b, grid.0 * grid.1), device)?, grid))
    } else {
        let t = candle_core::safetensors::load(path, device)
            .with_context(|| format!("cannot read codes from {}", path.display()))?;
        let idx = t
            .get("indices")
            .with_context(|| format!("{}: no `indices` tensor", path.display()))?;
        let g = t
            .get("grid")
            .with_context(|| format!("{}: no `grid` tensor", path.display()))?;
        let g = g.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        if g.len() != 2 || g.iter().any(|&v| v <= 0) {
            bail!(
                "{}: `grid` must be [height, width], got {g:?}",
                path.display()
            );
        }
        let grid = (g[0] as usize, g[1] as usize);
        let idx = if idx.rank() == 1 {
            idx.unsqueeze(0)?
        } else {
            idx.clone()
        };
        if idx.dim(D::Minus1)? != grid.0 * grid.1 {
            bail!(
                "{}: indices of shape {:?} do not fill the grid {}x{}",
                path.display(),
                idx.dims(),
                grid.0,
                grid.1
            );
        }
        Ok((idx.to_dtype(DType::U32)?, grid))
    }
}

pub fn decode(a: DecodeArgs) -> anyhow::Result<ExitCode> {
    let (model, cfg, device) = load_first_stage(&a.model)?;
    let (idx, grid) = read_codes(&a.codes, &device)?;
    let img = model
        .decode_indices(&idx, grid)
        .with_context(|| format!("cannot decode {}", a.codes.display()))?;
    let pic = to_picture(&model, &cfg, &img)?;
    let b = pic.dim(0)?;
    for i in 0..b {
        let out = numbered(&a.output, i, b);
        image_io::save_tensor_png(&pic.get(i)?, &out)?;
        println!("{} -> {}", a.codes.display(), out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `out.png` for one sample, `out_000.png`... for several.
pub fn numbered(path: &Path, i: usize, n: usize) -> PathBuf {
    if n <= 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}_{i:03}.{ext}"))
}
