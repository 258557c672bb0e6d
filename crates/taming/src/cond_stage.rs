//! Conditioning stages: what turns a condition (label map, depth map, image, class, coordinates or
//! nothing) into condition tokens for the transformer.
//!
//! Mirrors the reference's cond stages used by `Net2NetTransformer`: a VQ model (any first-stage
//! kind, e.g. `VQSegmentationModel` or a 1-channel depth `VQModel`), `__is_first_stage__` (the first
//! stage itself, e.g. for super-resolution), `__is_unconditional__` / `SOSProvider` (one start token),
//! `Labelator` (the class id as a token) from `taming/modules/util.py`, and `CoordStage` from
//! `taming/modules/misc/coord.py` (area-downsampled coordinates in [0, 1] scaled to `n_embed` and
//! rounded half-to-even, as `torch.round` does).

use candle_core::{DType, Tensor};

use crate::first_stage::VqModel;
use crate::{Error, Result};

/// Condition tokens and, for spatial conditions, their latent grid.
#[derive(Debug, Clone)]
pub struct CondTokens {
    /// (B, n) u32.
    pub indices: Tensor,
    /// (h, w) when the tokens lie on a grid (VQ and coordinate stages), None for a prefix token.
    pub grid: Option<(usize, usize)>,
}

/// A conditioning stage without weights of its own, or a VQ model.
#[derive(Debug, Clone)]
pub enum CondStage {
    /// `__is_first_stage__`: the first stage encodes the condition.
    FirstStage,
    /// A VQ model of its own (`cond_stage_model.*` keys).
    Vq(Box<VqModel>),
    /// `SOSProvider`: one start-of-sequence token per sample.
    Sos { token: usize },
    /// `Labelator`: the class id is the token.
    Labelator { n_classes: usize },
    /// `CoordStage`.
    Coord { n_embed: usize, down_factor: usize },
}

impl CondStage {
    /// Short human-readable kind.
    pub fn describe(&self) -> String {
        match self {
            CondStage::FirstStage => "first stage (image-conditioned)".into(),
            CondStage::Vq(m) => format!(
                "{:?} VQ model, {} input channels",
                m.kind(),
                m.in_channels()
            ),
            CondStage::Sos { token } => format!("unconditional (SOS token {token})"),
            CondStage::Labelator { n_classes } => format!("class label ({n_classes} classes)"),
            CondStage::Coord {
                n_embed,
                down_factor,
            } => {
                format!("coordinates ({n_embed} levels, downsampled by {down_factor})")
            }
        }
    }

    /// Whether the condition is a spatial input (an image-like tensor) rather than a class id or nothing.
    pub fn is_spatial(&self) -> bool {
        matches!(
            self,
            CondStage::FirstStage | CondStage::Vq(_) | CondStage::Coord { .. }
        )
    }

    /// `encode_to_c` without resizing: `c` is (B, C, H, W) for spatial stages, (B,) class ids for
    /// `Labelator`, and anything with a batch dimension for `Sos`.
    pub fn encode(&self, c: &Tensor, first_stage: &VqModel) -> Result<CondTokens> {
        match self {
            CondStage::FirstStage => {
                let q = first_stage.encode(c)?;
                Ok(CondTokens {
                    indices: q.indices,
                    grid: Some(q.grid),
                })
            }
            CondStage::Vq(m) => {
                let q = m.encode(c)?;
                Ok(CondTokens {
                    indices: q.indices,
                    grid: Some(q.grid),
                })
            }
            CondStage::Sos { token } => {
                let b = c.dim(0)?;
                let v = vec![*token as u32; b];
                Ok(CondTokens {
                    indices: Tensor::from_vec(v, (b, 1), c.device())?,
                    grid: None,
                })
            }
            CondStage::Labelator { n_classes } => {
                let ids = c.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
                if let Some(bad) = ids.iter().find(|&&v| v < 0 || v as usize >= *n_classes) {
                    return Err(Error::invalid(format!(
                        "class id {bad} is out of range: the model has {n_classes} classes (0..={})",
                        n_classes.saturating_sub(1)
                    )));
                }
                let b = ids.len();
                let v = ids.into_iter().map(|x| x as u32).collect();
                Ok(CondTokens {
                    indices: Tensor::from_vec(v, (b, 1), c.device())?,
                    grid: None,
                })
            }
            CondStage::Coord {
                n_embed,
                down_factor,
            } => coord_tokens(c, *n_embed, *down_factor),
        }
    }
}

/// `CoordStage.encode`: area-downsample a (B, 1, H, W) map in [0, 1] by `down_factor`, scale to
/// `n_embed` and round half-to-even: tokens (B, H/f * W/f) on an (H/f, W/f) grid.
pub fn coord_tokens(c: &Tensor, n_embed: usize, down_factor: usize) -> Result<CondTokens> {
    let (b, ch, h, w) = c.dims4()?;
    if ch != 1 {
        return Err(Error::invalid(format!(
            "a coordinate condition has 1 channel, got {ch}"
        )));
    }
    let min = c.min_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let max = c.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if min < 0.0 || max > 1.0 {
        return Err(Error::invalid(format!(
            "coordinate values must lie in [0, 1], got [{min}, {max}]"
        )));
    }
    let f = down_factor.max(1);
    if h % f != 0 || w % f != 0 {
        return Err(Error::invalid(format!(
            "coordinate map {h}x{w} is not divisible by the down factor {f}"
        )));
    }
    // F.interpolate(mode="area") by an integer factor is an average pool.
    let pooled = c.to_dtype(DType::F32)?.avg_pool2d(f)?.clamp(0f32, 1f32)?; // (B, 1, h/f, w/f)
    let scaled = (pooled * n_embed as f64)?.flatten_all()?.to_vec1::<f32>()?;
    let v: Vec<u32> = scaled.iter().map(|x| x.round_ties_even() as u32).collect();
    let (gh, gw) = (h / f, w / f);
    Ok(CondTokens {
        indices: Tensor::from_vec(v, (b, gh * gw), c.device())?,
        grid: Some((gh, gw)),
    })
}

/// The reference's coordinate condition (`taming/data/faceshq.py`, `coord=True`): the raster
/// position `arange(h*w) / (h*w)` of each pixel of the full image, cropped like the image. For an
/// uncropped `h` x `w` image: (1, 1, h, w) in [0, 1).
pub fn coordinate_map(h: usize, w: usize, device: &candle_core::Device) -> Result<Tensor> {
    let n = (h * w) as f32;
    let v: Vec<f32> = (0..h * w).map(|i| i as f32 / n).collect();
    Ok(Tensor::from_vec(v, (1, 1, h, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn coord_rounds_half_to_even_like_torch() -> anyhow::Result<()> {
        // area-pooled values 0.125 and 0.375 times 4 = 0.5 -> 0 and 1.5 -> 2 (half to even)
        let c = Tensor::new(
            &[[[[0.0f32, 0.25, 0.25, 0.5], [0.0, 0.25, 0.25, 0.5]]]],
            &Device::Cpu,
        )?; // (1, 1, 2, 4)
        let t = coord_tokens(&c, 4, 2)?;
        assert_eq!(t.indices.to_vec2::<u32>()?, vec![vec![0, 2]]);
        assert_eq!(t.grid, Some((1, 2)));
        let e = coord_tokens(&(c + 1.0)?, 4, 2).unwrap_err();
        assert!(e.to_string().contains("[0, 1]"), "{e}");
        Ok(())
    }
}
