//! The LPIPS perceptual distance (VGG16 variant), frozen.
//!
//! Mirrors `taming/modules/losses/lpips.py` (`LPIPS`, `ScalingLayer`, `NetLinLayer`, `vgg16`,
//! `normalize_tensor`, `spatial_average`): both images are shifted and scaled
//! (`scaling_layer.shift/scale`), run through the 13 convolutions of VGG16's `features` cut into
//! five slices (outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), each feature map is
//! normalised over channels, the squared differences are weighted per channel by a 1x1 conv
//! (`lin0..lin4.model.1`) and averaged over space; the five averages are summed: (B, 1, 1, 1).
//! The linear heads' dropout is the identity (the reference constructs LPIPS in eval mode).
//!
//! State-dict keys are the reference's (`net.slice1.0.weight`, `net.slice2.5.bias`, ...,
//! `lin0.model.1.weight`, `scaling_layer.shift`), as stored under `loss.perceptual_loss.` in every
//! VQGAN checkpoint.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::checkpoint::StateDict;
use crate::nn::conv;
use crate::{Error, Result};

/// Output channels of the five VGG16 slices.
pub const CHANNELS: [usize; 5] = [64, 128, 256, 512, 512];

/// torchvision's `vgg16().features` up to relu5_3: (index, in, out) of every conv; a 2x2 max pool
/// precedes indices 5, 10, 17 and 24, which start slices 2..5.
const VGG_CONVS: [(usize, usize, usize); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];

/// Which slice a features index belongs to (slice1 = 0..4, slice2 = 4..9, slice3 = 9..16,
/// slice4 = 16..23, slice5 = 23..30).
fn slice_of(index: usize) -> usize {
    match index {
        0..=3 => 1,
        4..=8 => 2,
        9..=15 => 3,
        16..=22 => 4,
        _ => 5,
    }
}

/// The frozen LPIPS network.
#[derive(Debug, Clone)]
pub struct Lpips {
    /// (features index, conv)
    convs: Vec<(usize, Conv2d)>,
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

impl Lpips {
    /// Reads the network from `vb` (rooted at the LPIPS module: `net.*`, `lin*`, `scaling_layer.*`).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let convs = VGG_CONVS
            .iter()
            .map(|&(i, cin, cout)| {
                let v = vb.pp("net").pp(format!("slice{}", slice_of(i))).pp(i);
                Ok((i, candle_nn::conv2d(cin, cout, 3, cfg, v)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let lins = CHANNELS
            .iter()
            .enumerate()
            .map(|(k, &c)| {
                Ok(vb
                    .pp(format!("lin{k}"))
                    .pp("model")
                    .pp(1)
                    .get((1, c, 1, 1), "weight")?)
            })
            .collect::<Result<Vec<_>>>()?;
        let sl = vb.pp("scaling_layer");
        Ok(Self {
            convs,
            lins,
            shift: sl.get((1, 3, 1, 1), "shift")?,
            scale: sl.get((1, 3, 1, 1), "scale")?,
        })
    }

    /// From a state dict holding the LPIPS keys under `prefix` (e.g. `loss.perceptual_loss.`).
    pub fn from_state_dict(sd: &StateDict, prefix: &str, device: &Device) -> Result<Self> {
        let sub = sd.sub(prefix);
        if sub.is_empty() {
            return Err(Error::Checkpoint {
                path: sd.source().to_path_buf(),
                msg: format!("no LPIPS weights (no `{prefix}*` tensors)"),
            });
        }
        let (vb, _) = sub.var_builder(DType::F32, device);
        Self::new(vb)
    }

    /// From a file: a VQGAN checkpoint (`loss.perceptual_loss.*`) or bare LPIPS keys (the
    /// reference's `vgg.pth` state dict as converted by `taming convert`).
    pub fn from_file(path: &Path, device: &Device) -> Result<Self> {
        let sd = StateDict::load(path)?;
        let prefix = if sd.keys().any(|k| k.starts_with("loss.perceptual_loss.")) {
            "loss.perceptual_loss."
        } else {
            ""
        };
        Self::from_state_dict(&sd, prefix, device)
    }

    /// The five feature maps (relu1_2 .. relu5_3) of an image batch in [-1, 1].
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?; // (B, 3, H, W)
        let mut out = Vec::with_capacity(5);
        for (k, (i, c)) in self.convs.iter().enumerate() {
            if matches!(i, 5 | 10 | 17 | 24) {
                h = max_pool2x2(&h)?; // (B, C, H/2, W/2)
            }
            h = conv(c, &h)?.relu()?; // (B, C', H, W)
                                      // the last conv of each slice: 2, 7, 14, 21, 28
            if matches!(k, 1 | 3 | 6 | 9 | 12) {
                out.push(h.clone());
            }
        }
        Ok(out)
    }

    /// `LPIPS(input, target)`: (B, 1, 1, 1).
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        let f0 = self.features(input)?;
        let f1 = self.features(target)?;
        let mut total: Option<Tensor> = None;
        for ((a, b), lin) in f0.iter().zip(&f1).zip(&self.lins) {
            let d = (normalize_tensor(a)? - normalize_tensor(b)?)?.sqr()?; // (B, C, H, W)
            let r = d.broadcast_mul(lin)?.sum_keepdim(1)?; // (B, 1, H, W): the 1x1 conv without bias
            let r = r.mean_keepdim(2)?.mean_keepdim(3)?; // (B, 1, 1, 1)
            total = Some(match total {
                Some(t) => (t + r)?,
                None => r,
            });
        }
        total.ok_or_else(|| Error::invalid("LPIPS has no layers"))
    }
}

/// `nn.MaxPool2d(2)` (odd trailing rows and columns dropped) as a max over reshaped windows:
/// candle 0.11's `max_pool2d` backward scales the gradient of a unique maximum by 1/4, so the
/// gradient here goes through `max` reductions instead (a unique maximum gets all of it).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?.contiguous()?;
    let x = x.reshape((b, c, h2, 2, w2, 2))?; // (B, C, H/2, 2, W/2, 2)
    Ok(x.max(5)?.max(3)?) // (B, C, H/2, W/2)
}

/// `x / (sqrt(sum(x^2 over channels)) + 1e-10)`.
fn normalize_tensor(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(1)?.sqrt()?; // (B, 1, H, W)
    Ok(x.broadcast_div(&(n + 1e-10)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Forward equals candle's max_pool2d; the gradient of a unique maximum is the full upstream
    /// gradient (torch's behaviour), not a quarter of it.
    #[test]
    fn max_pool_forward_and_gradient() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 6, 8), &dev)?)?;
        let y = max_pool2x2(x.as_tensor())?;
        let want = x.as_tensor().max_pool2d(2)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        let g = y.sum_all()?.backward()?;
        let gx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        // one 1 per 2x2 window, zeros elsewhere
        assert_eq!(gx.iter().filter(|v| **v == 1.0).count(), 2 * 3 * 3 * 4);
        assert_eq!(
            gx.iter().filter(|v| **v == 0.0).count(),
            gx.len() - 2 * 3 * 3 * 4
        );
        Ok(())
    }
}
