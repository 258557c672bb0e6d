//! Image conventions of the reference's data pipeline and of its sample scripts.
//!
//! Mirrors `taming/data/base.py` (`ImagePaths`: RGB, `SmallestMaxSize` then center or random crop,
//! `x / 127.5 - 1`), `taming/data/sflckr.py` / `ade20k.py` / `coco.py` (8-bit label PNGs to one-hot with
//! `n_labels` channels, nearest-neighbour resizing, the COCO `+1` shift that wraps 255 to 0) and
//! `taming/data/imagenet.py` (`rgba_to_depth`: an RGBA8 PNG whose four bytes per pixel hold one
//! little-endian float32, min-max normalised to [-1, 1]). Tensors are NCHW float32 in [-1, 1].
//! PNGs are written atomically: to a temporary file in the target directory, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, DynamicImage, GrayImage, RgbImage};
use rand::Rng;

use crate::{Error, Result};

fn image_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Opens any image the `image` crate reads.
pub fn open(path: &Path) -> Result<DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader
        .decode()
        .map_err(|e| image_err(path, format!("cannot decode: {e}")))
}

/// Opens an image as 8-bit RGB (the reference converts every mode to RGB).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(open(path)?.to_rgb8())
}

/// Interpolation used when rescaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
}

impl Interpolation {
    fn filter(self) -> FilterType {
        match self {
            Interpolation::Nearest => FilterType::Nearest,
            Interpolation::Bilinear => FilterType::Triangle,
            Interpolation::Bicubic => FilterType::CatmullRom,
        }
    }
}

/// Size after `SmallestMaxSize(max_size=size)`: the smaller side becomes `size`, aspect kept.
pub fn smallest_side_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    if w <= h {
        let nh = ((h as f64) * size as f64 / w as f64).round() as u32;
        (size, nh.max(1))
    } else {
        let nw = ((w as f64) * size as f64 / h as f64).round() as u32;
        (nw.max(1), size)
    }
}

/// `SmallestMaxSize`: rescale so that the smaller side is `size`.
pub fn resize_smallest_side<P>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    size: u32,
    interp: Interpolation,
) -> image::ImageBuffer<P, Vec<P::Subpixel>>
where
    P: image::Pixel + 'static,
    P::Subpixel: 'static,
{
    let (w, h) = img.dimensions();
    let (nw, nh) = smallest_side_size(w, h, size);
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    image::imageops::resize(img, nw, nh, interp.filter())
}

/// Top-left corner of albumentations' `CenterCrop`.
pub fn center_crop_origin(w: u32, h: u32, cw: u32, ch: u32) -> (u32, u32) {
    ((w.saturating_sub(cw)) / 2, (h.saturating_sub(ch)) / 2)
}

/// Top-left corner of a `RandomCrop`.
pub fn random_crop_origin<R: Rng>(w: u32, h: u32, cw: u32, ch: u32, rng: &mut R) -> (u32, u32) {
    (
        rng.random_range(0..=w.saturating_sub(cw)),
        rng.random_range(0..=h.saturating_sub(ch)),
    )
}

/// Crops `(cw, ch)` at `origin`; errors when the image is smaller than the crop.
pub fn crop<P>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    origin: (u32, u32),
    cw: u32,
    ch: u32,
) -> Result<image::ImageBuffer<P, Vec<P::Subpixel>>>
where
    P: image::Pixel + 'static,
{
    let (w, h) = img.dimensions();
    if origin.0 + cw > w || origin.1 + ch > h {
        return Err(Error::invalid(format!(
            "cannot crop {cw}x{ch} at {origin:?} from a {w}x{h} image"
        )));
    }
    Ok(image::imageops::crop_imm(img, origin.0, origin.1, cw, ch).to_image())
}

/// Scales an image to cover `h` x `w` (keeping its aspect) and center-crops to exactly that size.
pub fn fit<P>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    h: u32,
    w: u32,
    interp: Interpolation,
) -> Result<image::ImageBuffer<P, Vec<P::Subpixel>>>
where
    P: image::Pixel + 'static,
    P::Subpixel: 'static,
{
    let (iw, ih) = img.dimensions();
    if iw == 0 || ih == 0 || h == 0 || w == 0 {
        return Err(Error::invalid(format!(
            "cannot fit a {iw}x{ih} image to {w}x{h}"
        )));
    }
    let scale = (h as f64 / ih as f64).max(w as f64 / iw as f64);
    let nw = ((iw as f64 * scale).round() as u32).max(w);
    let nh = ((ih as f64 * scale).round() as u32).max(h);
    let r = if (nw, nh) == (iw, ih) {
        img.clone()
    } else {
        image::imageops::resize(img, nw, nh, interp.filter())
    };
    crop(&r, center_crop_origin(nw, nh, w, h), w, h)
}

/// The reference's preprocessing for evaluation: smallest side to `size`, then a `size`x`size` center crop.
pub fn rescale_center_crop(img: &RgbImage, size: u32) -> Result<RgbImage> {
    let r = resize_smallest_side(img, size, Interpolation::Bilinear);
    let (w, h) = r.dimensions();
    crop(&r, center_crop_origin(w, h, size, size), size, size)
}

/// RGB bytes to a (1, 3, H, W) tensor in [-1, 1] (`x / 127.5 - 1`).
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), device)?; // (H, W, 3)
    Ok(t.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?) // (1, 3, H, W)
}

/// One image (C, H, W) in [-1, 1] (C = 1 or 3; other channel counts take the first three or are
/// shown as gray) to 8-bit RGB: `round((clamp(x, -1, 1) + 1) * 127.5)`.
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    let t = t.to_dtype(DType::F32)?.clamp(-1f32, 1f32)?;
    let t = match c {
        1 => t.repeat((3, 1, 1))?,
        3 => t,
        c if c > 3 => t.narrow(0, 0, 3)?,
        _ => t.narrow(0, 0, 1)?.repeat((3, 1, 1))?,
    };
    let hwc = t
        .permute((1, 2, 0))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?; // (H*W*3)
    let bytes: Vec<u8> = hwc
        .iter()
        .map(|&v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::invalid(format!("cannot make a {w}x{h} image from tensor")))
}

/// Lays out a batch (B, C, H, W) as a grid image with `cols` columns.
pub fn grid(batch: &Tensor, cols: usize) -> Result<RgbImage> {
    let (b, _, h, w) = batch.dims4()?;
    let cols = cols.clamp(1, b.max(1));
    let rows = b.div_ceil(cols);
    let mut out = RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..b {
        let img = tensor_to_rgb(&batch.get(i)?)?;
        let (x, y) = ((i % cols) * w, (i / cols) * h);
        image::imageops::replace(&mut out, &img, x as i64, y as i64);
    }
    Ok(out)
}

/// Runs `write` on a temporary path in `path`'s directory, then renames the result to `path`, so
/// that an interrupted run never leaves a half-written output. The temporary file is removed on
/// failure.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Saves an RGB image as PNG, atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
        .map_err(|e| image_err(path, format!("cannot encode PNG: {e}")))?;
    write_atomic(path, &buf)
}

/// Saves one (C, H, W) tensor in [-1, 1] as PNG, atomically.
pub fn save_tensor_png(t: &Tensor, path: &Path) -> Result<()> {
    save_png(&tensor_to_rgb(t)?, path)
}

/// Peak signal-to-noise ratio of two tensors in [-1, 1], in dB, on the [0, 1] scale.
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = ((a.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?;
    let b = ((b.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?;
    let mse = (a - b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(if mse <= 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    })
}

/// How label ids in a segmentation PNG map to channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelShift {
    /// Label id = channel (S-FLCKR, ADE20k).
    #[default]
    None,
    /// COCO-Stuff: `uint8(label + 1)`, so 255 ("unlabeled") wraps to 0.
    CocoPlusOne,
}

/// Reads an 8-bit label PNG (grayscale; other modes use their first channel).
pub fn load_labels(path: &Path) -> Result<GrayImage> {
    Ok(labels_from_image(open(path)?))
}

/// A decoded label map as label ids, as [`load_labels`] reads files: 8-bit grayscale as is,
/// other modes the first channel of their 8-bit RGB conversion.
pub fn labels_from_image(img: DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g,
        other => {
            let rgb = other.to_rgb8();
            let (w, h) = rgb.dimensions();
            GrayImage::from_fn(w, h, |x, y| image::Luma([rgb.get_pixel(x, y).0[0]]))
        }
    }
}

/// Label map to (labels (1, H, W) as u32, one-hot (1, n_labels, H, W) float32); a label beyond
/// `n_labels` is an error naming the value, the pixel and `origin`.
pub fn labels_to_onehot(
    labels: &GrayImage,
    n_labels: usize,
    shift: LabelShift,
    origin: &Path,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (w, h) = labels.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut ids = Vec::with_capacity(w * h);
    let mut onehot = vec![0f32; n_labels * h * w];
    for (i, &v) in labels.as_raw().iter().enumerate() {
        let id = match shift {
            LabelShift::None => v,
            LabelShift::CocoPlusOne => v.wrapping_add(1),
        } as usize;
        if id >= n_labels {
            return Err(image_err(
                origin,
                format!(
                    "label {id} at pixel (x={}, y={}) is out of range: the model has n_labels = {n_labels} \
                     (labels 0..={})",
                    i % w,
                    i / w,
                    n_labels.saturating_sub(1)
                ),
            ));
        }
        onehot[id * h * w + i] = 1.0;
        ids.push(id as u32);
    }
    let ids = Tensor::from_vec(ids, (1, h, w), device)?;
    let onehot = Tensor::from_vec(onehot, (1, n_labels, h, w), device)?;
    Ok((ids, onehot))
}

/// Loads a segmentation PNG as (labels (1, H, W), one-hot (1, n_labels, H, W)), optionally
/// resized (nearest) and center-cropped to `size`.
pub fn load_segmentation(
    path: &Path,
    n_labels: usize,
    shift: LabelShift,
    size: Option<u32>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut labels = load_labels(path)?;
    if let Some(s) = size {
        let r = resize_smallest_side(&labels, s, Interpolation::Nearest);
        let (w, h) = r.dimensions();
        labels = crop(&r, center_crop_origin(w, h, s, s), s, s)?;
    }
    labels_to_onehot(&labels, n_labels, shift, path, device)
}

/// Reads a D-RIN depth PNG (RGBA8, four bytes per pixel = one little-endian float32) as raw floats
/// (H, W).
pub fn load_depth_raw(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let img = open(path)?;
    let rgba = match img {
        DynamicImage::ImageRgba8(x) => x,
        other => {
            return Err(image_err(
                path,
                format!(
                    "a depth map must be an RGBA8 PNG holding one float32 per pixel, got {:?}",
                    other.color()
                ),
            ))
        }
    };
    let (w, h) = rgba.dimensions();
    let vals: Vec<f32> = rgba
        .as_raw()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(bad) = vals.iter().position(|v| !v.is_finite()) {
        return Err(image_err(
            path,
            format!("depth value at pixel {bad} is not finite: not a float32 depth map"),
        ));
    }
    Ok((vals, h as usize, w as usize))
}

/// Loads a depth map as (1, 1, H, W) min-max normalised to [-1, 1] (`preprocess_depth`),
/// optionally rescaled (bilinear) and center-cropped to `size` x `size`. As in the reference the
/// map is normalised over the whole image first and then resized and cropped (so a crop need not
/// span the full [-1, 1]). The resize runs on the [0, 1] form and the affine map to [-1, 1] comes
/// after it: the `image` crate clamps float pixels to [0, 1] when resizing, and bilinear
/// interpolation commutes with the affine map.
pub fn load_depth(path: &Path, size: Option<u32>, device: &Device) -> Result<Tensor> {
    let (vals, mut h, mut w) = load_depth_raw(path)?;
    let mut unit = unit_range(&vals); // [0, 1]
    if let Some(s) = size {
        let buf =
            image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(w as u32, h as u32, unit)
                .ok_or_else(|| image_err(path, "depth map size mismatch"))?;
        let r = resize_smallest_side(&buf, s, Interpolation::Bilinear);
        let (rw, rh) = r.dimensions();
        let c = crop(&r, center_crop_origin(rw, rh, s, s), s, s)?;
        (h, w) = (s as usize, s as usize);
        unit = c.into_raw();
    }
    let norm: Vec<f32> = unit.iter().map(|v| 2.0 * v - 1.0).collect();
    Ok(Tensor::from_vec(norm, (1, 1, h, w), device)?)
}

/// Loads a depth map normalised to [-1, 1] over the whole map, then scaled to cover `h` x `w`
/// and center-cropped to exactly that size (bilinear; see [`load_depth`] for the order).
pub fn load_depth_fit(path: &Path, h: u32, w: u32, device: &Device) -> Result<Tensor> {
    let (vals, dh, dw) = load_depth_raw(path)?;
    let buf = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(
        dw as u32,
        dh as u32,
        unit_range(&vals),
    )
    .ok_or_else(|| image_err(path, "depth map size mismatch"))?;
    let buf = fit(&buf, h, w, Interpolation::Bilinear)?;
    let norm: Vec<f32> = buf.into_raw().iter().map(|v| 2.0 * v - 1.0).collect();
    Ok(Tensor::from_vec(
        norm,
        (1, 1, h as usize, w as usize),
        device,
    )?)
}

/// `(v - min) / max(max - min, 1e-8)`: raw depth values to [0, 1].
fn unit_range(vals: &[f32]) -> Vec<f32> {
    let min = vals.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let range = (max - min).max(1e-8);
    vals.iter().map(|v| (v - min) / range).collect()
}

/// Min-max normalises raw depth values (H*W) to [-1, 1]: (1, 1, H, W).
pub fn normalize_depth(vals: Vec<f32>, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let min = vals.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let range = (max - min).max(1e-8);
    let norm: Vec<f32> = vals
        .iter()
        .map(|v| 2.0 * ((v - min) / range) - 1.0)
        .collect();
    Ok(Tensor::from_vec(norm, (1, 1, h, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw inverse depths far outside [0, 1] keep their full range through a resize (the `image`
    /// crate clamps float pixels to [0, 1] when resizing).
    #[test]
    fn depth_resize_keeps_range() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let (w, h) = (40u32, 30u32);
        let mut bytes = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let v = -500.0f32 + 40.0 * x as f32 + 3.0 * y as f32;
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let img = image::RgbaImage::from_raw(w, h, bytes).unwrap();
        let p = tmp.path().join("d.png");
        img.save(&p)?;
        let t = load_depth(&p, Some(20), &Device::Cpu)?;
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let min = v.iter().cloned().fold(f32::INFINITY, f32::min);
        let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert!(min < -0.7 && max > 0.7, "range {min}..{max}");
        Ok(())
    }

    #[test]
    fn smallest_side() {
        assert_eq!(smallest_side_size(640, 480, 256), (341, 256));
        assert_eq!(smallest_side_size(480, 640, 256), (256, 341));
        assert_eq!(center_crop_origin(341, 256, 256, 256), (42, 0));
    }

    #[test]
    fn tensor_roundtrip_is_exact_on_bytes() -> anyhow::Result<()> {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 100, 255]));
        let t = rgb_to_tensor(&img, &Device::Cpu)?;
        assert_eq!(t.dims(), &[1, 3, 3, 5]);
        let back = tensor_to_rgb(&t.get(0)?)?;
        assert_eq!(back, img);
        Ok(())
    }

    #[test]
    fn onehot_and_label_errors() -> anyhow::Result<()> {
        let labels =
            GrayImage::from_raw(2, 1, vec![1, 255]).ok_or_else(|| anyhow::anyhow!("img"))?;
        let p = Path::new("seg.png");
        let err = labels_to_onehot(&labels, 3, LabelShift::None, p, &Device::Cpu).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("seg.png") && msg.contains("label 255") && msg.contains("n_labels = 3"),
            "{msg}"
        );
        // COCO shift: 255 wraps to 0, 1 -> 2
        let (ids, oh) = labels_to_onehot(&labels, 3, LabelShift::CocoPlusOne, p, &Device::Cpu)?;
        assert_eq!(ids.flatten_all()?.to_vec1::<u32>()?, vec![2, 0]);
        assert_eq!(
            oh.flatten_all()?.to_vec1::<f32>()?,
            vec![0., 1., 0., 0., 1., 0.]
        );
        Ok(())
    }
}
