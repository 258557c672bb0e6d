//! `BCELossWithQuant`: the segmentation VQ model's loss.
//!
//! Mirrors `taming/modules/losses/segmentation.py`: binary cross-entropy with logits between the
//! reconstruction (logits per label channel) and the one-hot input, plus the quantizer's loss
//! weighted by `codebook_weight`.

use candle_core::{DType, Tensor};

use super::BceConfig;
use crate::Result;

/// The loss.
#[derive(Debug, Clone)]
pub struct BceWithQuant {
    codebook_weight: f64,
}

/// `F.binary_cross_entropy_with_logits(prediction, target)` (mean), in the stable form
/// `max(x, 0) - x * t + log(1 + exp(-|x|))`.
pub fn bce_with_logits(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    let x = prediction;
    let l = ((x.relu()? - (x * target)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(l.mean_all()?)
}

impl BceWithQuant {
    pub fn new(cfg: &BceConfig) -> Self {
        Self {
            codebook_weight: cfg.codebook_weight,
        }
    }

    /// `(loss, logs)` for quantizer loss `qloss`, one-hot `target` and logits `prediction`.
    pub fn forward(
        &self,
        qloss: &Tensor,
        target: &Tensor,
        prediction: &Tensor,
    ) -> Result<(Tensor, Vec<(String, f32)>)> {
        let bce = bce_with_logits(prediction, target)?;
        let q = qloss.mean_all()?;
        let loss = (&bce + (&q * self.codebook_weight)?)?;
        let s = |t: &Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?) };
        let logs = vec![
            ("total_loss".to_string(), s(&loss)?),
            ("bce_loss".to_string(), s(&bce)?),
            ("quant_loss".to_string(), s(&q)?),
        ];
        Ok((loss, logs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bce_matches_definition() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[2.0f32, -1.0, 0.5, -30.0], &dev)?;
        let t = Tensor::new(&[1.0f32, 0.0, 0.0, 1.0], &dev)?;
        let got = bce_with_logits(&x, &t)?.to_scalar::<f32>()?;
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let xs = [2.0f32, -1.0, 0.5, -30.0];
        let ts = [1.0f32, 0.0, 0.0, 1.0];
        let want: f32 = xs
            .iter()
            .zip(ts)
            .map(|(x, t)| {
                if t == 1.0 {
                    -(sig(*x).max(1e-30)).ln()
                } else {
                    -(1.0 - sig(*x)).ln()
                }
            })
            .sum::<f32>()
            / 4.0;
        assert!((got - want).abs() < 1e-4, "{got} {want}");
        Ok(())
    }
}
