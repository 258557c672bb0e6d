//! The first stage: convolutional encoder/decoder and the VQ models around them.
//!
//! Mirrors `Encoder` and `Decoder` of `taming/modules/diffusionmodules/model.py` (every `ddconfig`
//! knob: ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, double_z, in/out channels,
//! resamp_with_conv, give_pre_end) and `VQModel`, `VQSegmentationModel`, `GumbelVQ` and `EMAVQ` of
//! `taming/models/vqgan.py`. State-dict paths are the reference's (`encoder.down.1.block.0.norm1`,
//! `quantize.embedding.weight`, `quant_conv`, `post_quant_conv`, `colorize`).
//!
//! Attention placement follows the reference: a level gets attention when the resolution computed
//! from the config's `resolution` is listed in `attn_resolutions`, whatever size the input has. Any
//! input whose height and width are divisible by the downsampling factor is accepted.

use candle_core::Tensor;
use candle_nn::{Conv2d, VarBuilder};

use crate::config::{DdConfig, VqKind, VqModelConfig};
use crate::nn::{conv, conv2d, normalize, AttnBlock, Downsample, Normalize, ResnetBlock, Upsample};
use crate::quantize::{
    BetaPlacement, EmaVectorQuantizer, GumbelQuantizer, Quantized, Quantizer, Remap,
    VectorQuantizer,
};
use crate::{Error, Result};

/// One resolution level: residual blocks, optional attention after each, optional resampling.
#[derive(Debug, Clone)]
struct Level<S> {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    resample: Option<S>,
}

impl<S> Level<S> {
    fn forward_blocks(&self, mut h: Tensor) -> Result<Tensor> {
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attns.get(i) {
                h = attn.forward(&h)?;
            }
        }
        Ok(h)
    }
}

/// `mid`: block_1, attn_1, block_2.
#[derive(Debug, Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(c, c, false, vb.pp("block_1"))?,
            attn_1: AttnBlock::new(c, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(c, c, false, vb.pp("block_2"))?,
        })
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(h)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

/// `Encoder`: image (B, in_channels, H, W) -> latent (B, z_channels (x2 if double_z), H/f, W/f).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level<Downsample>>,
    mid: Mid,
    norm_out: Normalize,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(cfg: &DdConfig, vb: VarBuilder) -> Result<Self> {
        check_ddconfig(cfg)?;
        let conv_in = conv2d(cfg.in_channels, cfg.ch, 3, 1, 1, vb.pp("conv_in"))?;
        let n_levels = cfg.ch_mult.len();
        let mut curr_res = cfg.resolution;
        let mut block_in = cfg.ch;
        let mut down = Vec::with_capacity(n_levels);
        for (i_level, &mult) in cfg.ch_mult.iter().enumerate() {
            let vbl = vb.pp("down").pp(i_level);
            block_in = cfg.ch
                * if i_level == 0 {
                    1
                } else {
                    cfg.ch_mult[i_level - 1]
                };
            let block_out = cfg.ch * mult;
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for i_block in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    false,
                    vbl.pp("block").pp(i_block),
                )?);
                block_in = block_out;
                if cfg.attn_resolutions.contains(&curr_res) {
                    attns.push(AttnBlock::new(block_in, vbl.pp("attn").pp(i_block))?);
                }
            }
            let resample = if i_level + 1 != n_levels {
                curr_res /= 2;
                Some(Downsample::new(
                    block_in,
                    cfg.resamp_with_conv,
                    vbl.pp("downsample"),
                )?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        let z_out = if cfg.double_z {
            2 * cfg.z_channels
        } else {
            cfg.z_channels
        };
        Ok(Self {
            conv_in,
            down,
            mid: Mid::new(block_in, vb.pp("mid"))?,
            norm_out: normalize(block_in, vb.pp("norm_out"))?,
            conv_out: conv2d(block_in, z_out, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// x: (B, in_channels, H, W) -> (B, z_out, H/f, W/f).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = conv(&self.conv_in, x)?; // (B, ch, H, W)
        for level in &self.down {
            h = level.forward_blocks(h)?;
            if let Some(down) = &level.resample {
                h = down.forward(&h)?; // (B, C, H/2, W/2)
            }
        }
        let h = self.mid.forward(&h)?;
        let h = self.norm_out.forward_swish(&h)?;
        conv(&self.conv_out, &h) // (B, z_out, h, w)
    }
}

/// `Decoder`: latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    /// Indexed like the reference's `up` list: `up[0]` is the finest level, run last.
    up: Vec<Level<Upsample>>,
    norm_out: Normalize,
    conv_out: Conv2d,
    give_pre_end: bool,
}

impl Decoder {
    pub fn new(cfg: &DdConfig, vb: VarBuilder) -> Result<Self> {
        check_ddconfig(cfg)?;
        let n_levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[n_levels - 1];
        let mut curr_res = cfg.resolution >> (n_levels - 1);
        let conv_in = conv2d(cfg.z_channels, block_in, 3, 1, 1, vb.pp("conv_in"))?;
        let mid = Mid::new(block_in, vb.pp("mid"))?;
        let mut up_rev = Vec::with_capacity(n_levels);
        for i_level in (0..n_levels).rev() {
            let vbl = vb.pp("up").pp(i_level);
            let block_out = cfg.ch * cfg.ch_mult[i_level];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for i_block in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    false,
                    vbl.pp("block").pp(i_block),
                )?);
                block_in = block_out;
                if cfg.attn_resolutions.contains(&curr_res) {
                    attns.push(AttnBlock::new(block_in, vbl.pp("attn").pp(i_block))?);
                }
            }
            let resample = if i_level != 0 {
                curr_res *= 2;
                Some(Upsample::new(
                    block_in,
                    cfg.resamp_with_conv,
                    vbl.pp("upsample"),
                )?)
            } else {
                None
            };
            up_rev.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        up_rev.reverse();
        Ok(Self {
            conv_in,
            mid,
            up: up_rev,
            norm_out: normalize(block_in, vb.pp("norm_out"))?,
            conv_out: conv2d(block_in, cfg.out_ch, 3, 1, 1, vb.pp("conv_out"))?,
            give_pre_end: cfg.give_pre_end,
        })
    }

    /// The last layer's weight, whose gradients the adaptive GAN weight compares.
    pub fn conv_out(&self) -> &Conv2d {
        &self.conv_out
    }

    /// z: (B, z_channels, h, w) -> (B, out_ch, h*f, w*f) (or the features before `norm_out` when
    /// `give_pre_end`).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_last_input(z)?.0)
    }

    /// [`Decoder::forward`] and the input of `conv_out` (B, C, H, W), which the adaptive GAN weight
    /// needs to form the gradient of `conv_out.weight` (equal to the output when `give_pre_end`).
    pub fn forward_with_last_input(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = conv(&self.conv_in, z)?; // (B, C, h, w)
        let mut h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            h = level.forward_blocks(h)?;
            if let Some(up) = &level.resample {
                h = up.forward(&h)?; // (B, C, 2h, 2w)
            }
        }
        if self.give_pre_end {
            return Ok((h.clone(), h));
        }
        let h = self.norm_out.forward_swish(&h)?; // (B, C, H, W)
        let out = conv(&self.conv_out, &h)?; // (B, out_ch, H, W)
        Ok((out, h))
    }
}

fn check_ddconfig(cfg: &DdConfig) -> Result<()> {
    let bad = |msg: String| Error::Config {
        origin: "ddconfig".into(),
        msg,
    };
    if cfg.ch_mult.is_empty() {
        return Err(bad("ch_mult must not be empty".into()));
    }
    if cfg.ch == 0 || !cfg.ch.is_multiple_of(crate::nn::GROUP_NORM_GROUPS) {
        return Err(bad(format!(
            "ch = {} must be a positive multiple of {} (GroupNorm groups)",
            cfg.ch,
            crate::nn::GROUP_NORM_GROUPS
        )));
    }
    Ok(())
}

/// The kind of first-stage model, from the config's `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VqModelKind {
    /// `taming.models.vqgan.VQModel`
    Vq,
    /// `taming.models.vqgan.VQSegmentationModel`
    Segmentation,
    /// `taming.models.vqgan.GumbelVQ`
    Gumbel,
    /// `taming.models.vqgan.EMAVQ`
    Ema,
}

/// What [`VqModel::forward_train`] returns.
#[derive(Debug, Clone)]
pub struct TrainForward {
    /// (B, out_ch, H, W)
    pub reconstruction: Tensor,
    /// The quantizer's loss (scalar).
    pub qloss: Tensor,
    /// (B, h*w) u32
    pub indices: Tensor,
    /// Input of `decoder.conv_out` (B, C, H, W).
    pub last_layer_input: Tensor,
    /// The quantizer's input (B, embed_dim, h, w) (for EMA codebook updates).
    pub prequant: Tensor,
}

/// A VQ first-stage model (any of the reference's four).
#[derive(Debug, Clone)]
pub struct VqModel {
    kind: VqModelKind,
    encoder: Encoder,
    decoder: Decoder,
    quantize: Quantizer,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    colorize: Option<Tensor>,
    downsample: usize,
    in_channels: usize,
    embed_dim: usize,
    n_embed: usize,
}

impl VqModel {
    /// Builds the model from its typed config, reading weights from `vb` (strictly: a missing or
    /// mis-shaped tensor is an error naming it).
    pub fn new(cfg: &VqModelConfig, vb: VarBuilder) -> Result<Self> {
        let dd = &cfg.ddconfig;
        let encoder = Encoder::new(dd, vb.pp("encoder"))?;
        let decoder = Decoder::new(dd, vb.pp("decoder"))?;
        let remap = match &cfg.remap {
            Some(path) => Some(Remap::from_npy(
                std::path::Path::new(path),
                cfg.unknown_index,
            )?),
            None => None,
        };
        let placement = if cfg.legacy_beta {
            BetaPlacement::Legacy
        } else {
            BetaPlacement::Fixed
        };
        let qvb = vb.pp("quantize");
        let (kind, quantize) = match &cfg.kind {
            VqKind::VqModel => (
                VqModelKind::Vq,
                Quantizer::Vq(VectorQuantizer::new(
                    cfg.n_embed,
                    cfg.embed_dim,
                    0.25,
                    placement,
                    remap,
                    qvb,
                )?),
            ),
            VqKind::Segmentation { .. } => (
                VqModelKind::Segmentation,
                Quantizer::Vq(VectorQuantizer::new(
                    cfg.n_embed,
                    cfg.embed_dim,
                    0.25,
                    placement,
                    remap,
                    qvb,
                )?),
            ),
            VqKind::Gumbel { kl_weight, .. } => (
                VqModelKind::Gumbel,
                Quantizer::Gumbel(GumbelQuantizer::new(
                    dd.z_channels,
                    cfg.embed_dim,
                    cfg.n_embed,
                    *kl_weight,
                    remap,
                    qvb,
                )?),
            ),
            VqKind::Ema => (
                VqModelKind::Ema,
                Quantizer::Ema(EmaVectorQuantizer::new(
                    cfg.n_embed,
                    cfg.embed_dim,
                    0.25,
                    remap,
                    qvb,
                )?),
            ),
        };
        let quant_conv = conv2d(dd.z_channels, cfg.embed_dim, 1, 1, 0, vb.pp("quant_conv"))?;
        let post_quant_conv = conv2d(
            cfg.embed_dim,
            dd.z_channels,
            1,
            1,
            0,
            vb.pp("post_quant_conv"),
        )?;
        let colorize_labels = match &cfg.kind {
            VqKind::Segmentation { n_labels } => Some(*n_labels),
            _ => cfg.colorize_nlabels,
        };
        let colorize = match colorize_labels {
            Some(n) => Some(vb.get((3, n, 1, 1), "colorize")?),
            None => None,
        };
        Ok(Self {
            kind,
            encoder,
            decoder,
            quantize,
            quant_conv,
            post_quant_conv,
            colorize,
            downsample: 1 << (dd.ch_mult.len() - 1),
            in_channels: dd.in_channels,
            embed_dim: cfg.embed_dim,
            n_embed: cfg.n_embed,
        })
    }

    pub fn kind(&self) -> VqModelKind {
        self.kind
    }
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }
    pub fn quantizer(&self) -> &Quantizer {
        &self.quantize
    }
    pub fn quantizer_mut(&mut self) -> &mut Quantizer {
        &mut self.quantize
    }
    pub fn quant_conv(&self) -> &Conv2d {
        &self.quant_conv
    }
    /// Spatial downsampling factor f = 2^(len(ch_mult) - 1).
    pub fn downsample_factor(&self) -> usize {
        self.downsample
    }
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }
    /// Codebook size.
    pub fn n_embed(&self) -> usize {
        self.n_embed
    }

    /// Checks that an input (B, C, H, W) has the model's channel count and a size divisible by f.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let dims = x.dims();
        if dims.len() != 4 {
            return Err(Error::invalid(format!(
                "the first stage takes (batch, channels, height, width) input, got shape {dims:?}"
            )));
        }
        if dims[1] != self.in_channels {
            return Err(Error::invalid(format!(
                "the model takes {} input channels, got {} (input shape {dims:?})",
                self.in_channels, dims[1]
            )));
        }
        let f = self.downsample;
        if !dims[2].is_multiple_of(f) || !dims[3].is_multiple_of(f) || dims[2] == 0 || dims[3] == 0
        {
            return Err(Error::invalid(format!(
                "input size {}x{} (HxW) is not divisible by the model's downsampling factor {f}; \
                 crop or resize to {}x{} or {}x{}",
                dims[2],
                dims[3],
                dims[2] / f * f,
                dims[3] / f * f,
                (dims[2] / f + 1) * f,
                (dims[3] / f + 1) * f
            )));
        }
        Ok(())
    }

    /// `encoder` then `quant_conv`: (B, C, H, W) -> (B, embed_dim, H/f, W/f).
    pub fn encode_to_prequant(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let h = self.encoder.forward(x)?;
        conv(&self.quant_conv, &h)
    }

    /// `encode`: (B, C, H, W) -> quantized latent, quantizer loss, indices (B, H/f * W/f).
    pub fn encode(&self, x: &Tensor) -> Result<Quantized> {
        let h = self.encode_to_prequant(x)?;
        self.quantize.forward(&h)
    }

    /// `decode`: quantized latent (B, embed_dim, h, w) -> (B, out_ch, h*f, w*f).
    pub fn decode(&self, quant: &Tensor) -> Result<Tensor> {
        let h = conv(&self.post_quant_conv, quant)?; // (B, z_channels, h, w)
        self.decoder.forward(&h)
    }

    /// Codebook lookup of (B, h*w) indices on an (h, w) grid: (B, embed_dim, h, w).
    pub fn lookup(&self, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        self.quantize.lookup(indices, grid)
    }

    /// Decode (B, h*w) code indices on an (h, w) grid to an image.
    pub fn decode_indices(&self, indices: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let q = self.lookup(indices, grid)?;
        self.decode(&q)
    }

    /// `forward`: reconstruction and quantizer loss.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let q = self.encode(x)?;
        Ok((self.decode(&q.quant)?, q.loss))
    }

    /// The training forward pass: reconstruction, quantizer loss, indices and the input of the
    /// decoder's last layer (for the adaptive GAN weight). Run it inside
    /// [`crate::nn::training_mode`] so that every kernel records gradients.
    pub fn forward_train(&self, x: &Tensor) -> Result<TrainForward> {
        self.forward_train_with(x, None)
    }

    /// [`VqModel::forward_train`] with a Gumbel quantizer's training draw (temperature, noise
    /// seed); `None` quantizes as at inference.
    pub fn forward_train_with(
        &self,
        x: &Tensor,
        gumbel: Option<(f64, u64)>,
    ) -> Result<TrainForward> {
        let prequant = self.encode_to_prequant(x)?; // (B, embed_dim, h, w)
        let q = match (&self.quantize, gumbel) {
            (Quantizer::Gumbel(g), Some((temperature, seed))) => {
                g.forward_train(&prequant, temperature, seed)?
            }
            _ => self.quantize.forward(&prequant)?,
        };
        let h = conv(&self.post_quant_conv, &q.quant)?; // (B, z_channels, h, w)
        let (reconstruction, last_layer_input) = self.decoder.forward_with_last_input(&h)?;
        Ok(TrainForward {
            reconstruction,
            qloss: q.loss,
            indices: q.indices,
            last_layer_input,
            prequant,
        })
    }

    /// `to_rgb`: the segmentation model's fixed random projection of label channels to RGB,
    /// min-max scaled over the whole batch to [-1, 1].
    pub fn to_rgb(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.colorize.as_ref().ok_or_else(|| {
            Error::invalid("this model has no `colorize` projection (not a segmentation model)")
        })?;
        let y = x.conv2d(w, 0, 1, 1, 1)?; // (B, 3, H, W)
        let min = y.min_all()?.to_scalar::<f32>()? as f64;
        let max = y.max_all()?.to_scalar::<f32>()? as f64;
        let range = if max > min { max - min } else { 1.0 };
        Ok(((y - min)? * (2.0 / range))?.affine(1.0, -1.0)?)
    }
}
