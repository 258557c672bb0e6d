//! Building blocks of the VQGAN encoder and decoder.
//!
//! Mirrors `taming/modules/diffusionmodules/model.py`: `Normalize` (GroupNorm with 32 groups and the
//! reference's eps of 1e-6), `nonlinearity` (swish), `ResnetBlock`, `AttnBlock`, `Upsample` and
//! `Downsample` (with the reference's asymmetric `(0, 1, 0, 1)` zero padding before a stride-2 conv).
//! Module paths follow the reference's state-dict keys (`norm1`, `conv1`, `nin_shortcut`, `q`, ...).
//!
//! Training mode ([`training_mode`]) swaps candle's fused kernels, which record no gradient
//! (`softmax_last_dim`, `LayerNorm`'s fused path) or have a slow backward (`conv2d`), for
//! differentiable forms: [`conv`], [`softmax_last_dim`] and [`layer_norm`] pick the form. Inference
//! keeps the fused kernels.

use std::cell::Cell;

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};

use crate::kernels::{conv2d_im2col, im2col_supported, Padding};
use crate::Result;

thread_local! {
    static TRAINING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread runs forward passes for training (see [`training_mode`]).
pub fn training() -> bool {
    TRAINING.with(|t| t.get())
}

/// While alive, forward passes on this thread use differentiable kernels; the previous mode is
/// restored on drop (like `torch.enable_grad()` as a context manager).
#[derive(Debug)]
pub struct TrainingMode {
    previous: bool,
}

/// Enters training mode on this thread until the returned guard is dropped.
pub fn training_mode() -> TrainingMode {
    let previous = TRAINING.with(|t| t.replace(true));
    TrainingMode { previous }
}

impl Drop for TrainingMode {
    fn drop(&mut self) {
        let previous = self.previous;
        TRAINING.with(|t| t.set(previous));
    }
}

/// Largest `im2col` buffer (bytes) that inference builds; larger convolutions use candle's kernel.
const INFERENCE_IM2COL_BYTES: usize = 512 << 20;

/// Applies a candle `Conv2d`: on the CPU through [`conv2d_im2col`] (fast backward in training
/// mode; at inference about 1.7x candle's kernel on a 128-channel 256x256 layer; 3x3 stride-1
/// convolutions run [`crate::direct_conv`] there without a column buffer) unless its column
/// buffer would exceed [`INFERENCE_IM2COL_BYTES`] at inference; otherwise candle's kernel.
pub fn conv(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    let cfg = conv.config();
    if im2col_supported(x) && cfg.dilation == 1 && cfg.groups == 1 {
        let (b, _, h, w) = x.dims4()?;
        let k = conv.weight().dims().iter().skip(1).product::<usize>();
        let cols_bytes = 4 * b * k * (h + 2 * cfg.padding) * (w + 2 * cfg.padding)
            / (cfg.stride * cfg.stride).max(1);
        let direct = conv.weight().dims()[2..] == [3, 3]
            && cfg.stride == 1
            && cfg.padding == 1
            && crate::direct_conv::conv3x3_supported(x);
        if training() || direct || cols_bytes <= INFERENCE_IM2COL_BYTES {
            return conv2d_im2col(
                x,
                conv.weight(),
                conv.bias(),
                cfg.stride,
                Padding::same(cfg.padding),
            );
        }
    }
    Ok(conv.forward(x)?)
}

/// Softmax over the last dimension: fused at inference, differentiable in training mode.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if training() {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(x)?)
    }
}

/// `nn.LayerNorm` over the last dimension: candle's fused kernel at inference, a differentiable
/// composition (same formula: biased variance, eps inside the square root) in training mode.
pub fn layer_norm(ln: &LayerNorm, eps: f64, x: &Tensor) -> Result<Tensor> {
    if !training() {
        return Ok(ln.forward(x)?);
    }
    let n = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / n)?; // (.., 1)
    let xc = x.broadcast_sub(&mean)?; // (.., C)
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?; // (.., 1)
    let y = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(ln.weight())?;
    Ok(match ln.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// The reference's GroupNorm epsilon (`Normalize` in model.py), not torch's default 1e-5.
pub const GROUP_NORM_EPS: f64 = 1e-6;
/// The reference's GroupNorm group count.
pub const GROUP_NORM_GROUPS: usize = 32;

/// `Normalize(in_channels)`: GroupNorm(32, C, eps=1e-6, affine=True), state-dict keys `weight`
/// and `bias`. Runs as one fused kernel ([`crate::group_norm`]) on float32 CPU tensors.
#[derive(Debug, Clone)]
pub struct Normalize {
    weight: Tensor,
    bias: Tensor,
}

impl Normalize {
    /// x: (B, C, ...) -> GroupNorm(x), same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// `nonlinearity(norm(x))`: GroupNorm then swish, in one pass where the kernel applies.
    pub fn forward_swish(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, swish: bool) -> Result<Tensor> {
        crate::group_norm::group_norm(
            x,
            &self.weight,
            &self.bias,
            GROUP_NORM_GROUPS,
            GROUP_NORM_EPS,
            swish,
        )
    }
}

/// `Normalize(in_channels)` loaded from `vb` (`weight` and `bias`, each (C)).
pub fn normalize(channels: usize, vb: VarBuilder) -> Result<Normalize> {
    if !channels.is_multiple_of(GROUP_NORM_GROUPS) {
        return Err(crate::Error::invalid(format!(
            "GroupNorm: {channels} channels are not divisible into {GROUP_NORM_GROUPS} groups"
        )));
    }
    Ok(Normalize {
        weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
    })
}

/// A `torch.nn.Conv2d` with a square kernel, bias included.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)?)
}

/// `nonlinearity(x) = x * sigmoid(x)` (swish / SiLU).
pub fn swish(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// `ResnetBlock` without timestep embedding (the VQGAN uses `temb_channels=0`).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: Normalize,
    conv1: Conv2d,
    norm2: Normalize,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `conv_shortcut` selects the reference's 3x3 `conv_shortcut` instead of the 1x1 `nin_shortcut`
    /// when the channel count changes.
    pub fn new(in_c: usize, out_c: usize, conv_shortcut: bool, vb: VarBuilder) -> Result<Self> {
        let shortcut = if in_c != out_c {
            Some(if conv_shortcut {
                conv2d(in_c, out_c, 3, 1, 1, vb.pp("conv_shortcut"))?
            } else {
                conv2d(in_c, out_c, 1, 1, 0, vb.pp("nin_shortcut"))?
            })
        } else {
            None
        };
        Ok(Self {
            norm1: normalize(in_c, vb.pp("norm1"))?,
            conv1: conv2d(in_c, out_c, 3, 1, 1, vb.pp("conv1"))?,
            norm2: normalize(out_c, vb.pp("norm2"))?,
            conv2: conv2d(out_c, out_c, 3, 1, 1, vb.pp("conv2"))?,
            shortcut,
        })
    }

    /// x: (B, C_in, H, W) -> (B, C_out, H, W). Dropout is the identity at inference.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_swish(x)?; // (B, C_in, H, W)
        let h = conv(&self.conv1, &h)?; // (B, C_out, H, W)
        let h = self.norm2.forward_swish(&h)?;
        let h = conv(&self.conv2, &h)?; // (B, C_out, H, W)
        let x = match &self.shortcut {
            Some(c) => conv(c, x)?, // (B, C_out, H, W)
            None => x.clone(),
        };
        Ok((x + h)?)
    }
}

/// `AttnBlock`: single-head spatial self-attention with 1x1 convolutions for q, k, v and the output.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    norm: Normalize,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: normalize(c, vb.pp("norm"))?,
            q: conv2d(c, c, 1, 1, 0, vb.pp("q"))?,
            k: conv2d(c, c, 1, 1, 0, vb.pp("k"))?,
            v: conv2d(c, c, 1, 1, 0, vb.pp("v"))?,
            proj_out: conv2d(c, c, 1, 1, 0, vb.pp("proj_out"))?,
        })
    }

    /// x: (B, C, H, W) -> (B, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let q = conv(&self.q, &hn)?.reshape((b, c, h * w))?; // (B, C, HW)
        let k = conv(&self.k, &hn)?.reshape((b, c, h * w))?; // (B, C, HW)
        let v = conv(&self.v, &hn)?.reshape((b, c, h * w))?; // (B, C, HW)
        let q = q.transpose(1, 2)?.contiguous()?; // (B, HW, C)
        let scores = (q.matmul(&k)? * (c as f64).powf(-0.5))?; // (B, HWq, HWk)
        let attn = softmax_last_dim(&scores)?; // (B, HWq, HWk)
                                               // out[b, c, i] = sum_j v[b, c, j] * attn[b, i, j]
        let out = v.matmul(&attn.transpose(1, 2)?.contiguous()?)?; // (B, C, HWq)
        let out = conv(&self.proj_out, &out.reshape((b, c, h, w))?)?; // (B, C, H, W)
        Ok((x + out)?)
    }
}

/// `Upsample`: nearest-neighbour 2x, then an optional 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Option<Conv2d>,
}

impl Upsample {
    pub fn new(c: usize, with_conv: bool, vb: VarBuilder) -> Result<Self> {
        let conv = if with_conv {
            Some(conv2d(c, c, 3, 1, 1, vb.pp("conv"))?)
        } else {
            None
        };
        Ok(Self { conv })
    }

    /// x: (B, C, H, W) -> (B, C, 2H, 2W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let x = if im2col_supported(x) {
            crate::kernels::upsample_nearest2x(x)? // (B, C, 2H, 2W)
        } else {
            x.upsample_nearest2d(2 * h, 2 * w)?
        };
        match &self.conv {
            Some(c) => conv(c, &x),
            None => Ok(x),
        }
    }
}

/// `Downsample`: with a conv, the reference pads right and bottom by one zero row/column
/// (asymmetric padding, a named quirk) and applies a 3x3 stride-2 conv without padding;
/// without a conv it is a 2x2 average pool.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Option<Conv2d>,
}

impl Downsample {
    pub fn new(c: usize, with_conv: bool, vb: VarBuilder) -> Result<Self> {
        let conv = if with_conv {
            Some(conv2d(c, c, 3, 2, 0, vb.pp("conv"))?)
        } else {
            None
        };
        Ok(Self { conv })
    }

    /// x: (B, C, H, W) -> (B, C, H/2, W/2).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.conv {
            Some(c) => {
                if im2col_supported(x) {
                    // the same padding folded into im2col, without materialising the padded copy
                    let pad = Padding {
                        top: 0,
                        bottom: 1,
                        left: 0,
                        right: 1,
                    };
                    return conv2d_im2col(x, c.weight(), c.bias(), 2, pad);
                }
                // F.pad(x, (0, 1, 0, 1)): one zero column on the right, one zero row at the bottom.
                let x = x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(2, 0, 1)?; // (B, C, H+1, W+1)
                Ok(c.forward(&x)?)
            }
            None => Ok(x.avg_pool2d(2)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Downsample's asymmetric padding: the output only depends on the input's top-left pixels in
    /// the first output position, and the last row/column see one zero row/column of padding.
    #[test]
    fn downsample_pads_right_and_bottom_only() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut map = std::collections::HashMap::new();
        // A 3x3 kernel of ones, no bias: each output is the sum of a 3x3 window.
        map.insert(
            "conv.weight".to_string(),
            Tensor::ones((1, 1, 3, 3), DType::F32, &dev)?,
        );
        map.insert("conv.bias".to_string(), Tensor::zeros(1, DType::F32, &dev)?);
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let down = Downsample::new(1, true, vb)?;
        let x = Tensor::ones((1, 1, 4, 4), DType::F32, &dev)?;
        let y = down.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        // windows at (0,0) full 3x3 = 9; at (0,2) covers cols 2,3 + pad = 6; (2,0) = 6; (2,2) = 4.
        assert_eq!(y, vec![9.0, 6.0, 6.0, 4.0]);
        Ok(())
    }

    /// GroupNorm eps 1e-6 (the reference's), not torch's 1e-5: on a group whose variance is 1e-6 the
    /// normalised values are +-1/sqrt(2) with eps 1e-6 and +-0.30 with eps 1e-5.
    #[test]
    fn group_norm_uses_reference_eps() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_string(), Tensor::ones(32, DType::F32, &dev)?);
        map.insert("bias".to_string(), Tensor::zeros(32, DType::F32, &dev)?);
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let norm = normalize(32, vb)?;
        // Each channel (= group) holds the values 0 and 0.002: mean 0.001, variance 1e-6.
        let x = Tensor::new(&[0f32, 0.002], &dev)?
            .reshape((1, 1, 1, 2))?
            .repeat((1, 32, 1, 1))?;
        let y = norm.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let expected = 0.001 / (1e-6f32 + 1e-6).sqrt();
        assert!(
            (y[1] - expected).abs() < 1e-3,
            "got {} expected {}",
            y[1],
            expected
        );
        Ok(())
    }
}
