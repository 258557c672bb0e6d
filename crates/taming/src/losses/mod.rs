//! Training losses of the first stage.
//!
//! Mirrors `taming/modules/losses/`: [`vqperceptual`] (`VQLPIPSWithDiscriminator`: L1 + LPIPS +
//! codebook loss + PatchGAN with the adaptive weight), [`lpips`] (`LPIPS`: VGG16 features and
//! linear heads), [`discriminator`] (`NLayerDiscriminator` of `taming/modules/discriminator/model.py`
//! with BatchNorm or `ActNorm`) and [`segmentation`] (`BCELossWithQuant`). [`LossConfig`] maps a
//! config's `lossconfig` block (`target` + `params`) to these, with the reference's defaults.

pub mod discriminator;
pub mod lpips;
pub mod segmentation;
pub mod vqperceptual;

use serde::Deserialize;

use crate::config::TargetConfig;
use crate::{Error, Result};

/// `VQLPIPSWithDiscriminator`'s parameters with the reference's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VqLpipsConfig {
    /// Step from which the GAN terms count (`discriminator_iter_start`); required.
    pub disc_start: u64,
    #[serde(default = "one")]
    pub codebook_weight: f64,
    #[serde(default = "one")]
    pub pixelloss_weight: f64,
    #[serde(default = "three")]
    pub disc_num_layers: usize,
    #[serde(default = "three")]
    pub disc_in_channels: usize,
    #[serde(default = "one")]
    pub disc_factor: f64,
    #[serde(default = "one")]
    pub disc_weight: f64,
    #[serde(default = "one")]
    pub perceptual_weight: f64,
    #[serde(default)]
    pub use_actnorm: bool,
    #[serde(default)]
    pub disc_conditional: bool,
    #[serde(default = "sixty_four")]
    pub disc_ndf: usize,
    /// `"hinge"` (default) or `"vanilla"`.
    #[serde(default = "hinge")]
    pub disc_loss: String,
}

/// `BCELossWithQuant`'s parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BceConfig {
    #[serde(default = "one")]
    pub codebook_weight: f64,
}

fn one() -> f64 {
    1.0
}
fn three() -> usize {
    3
}
fn sixty_four() -> usize {
    64
}
fn hinge() -> String {
    "hinge".into()
}

/// A first stage's loss, from its config's `lossconfig`.
#[derive(Debug, Clone, PartialEq)]
pub enum LossConfig {
    /// `taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator`
    VqLpips(VqLpipsConfig),
    /// `taming.modules.losses.segmentation.BCELossWithQuant`
    BceWithQuant(BceConfig),
    /// `taming.modules.losses.DummyLoss` (inference-only checkpoints)
    Dummy,
}

const ORIGIN: &str = "model.params.lossconfig";

fn parse<T: serde::de::DeserializeOwned>(
    target: &str,
    params: &serde_json::Value,
) -> Result<(T, Vec<String>)> {
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(params, &mut track);
    let value: std::result::Result<T, _> =
        serde_ignored::deserialize(de, |p| unknown.push(p.to_string()));
    let value = value.map_err(|e| Error::Config {
        origin: format!("{ORIGIN}.params.{}", track.path()),
        msg: format!("{e} (in the parameters of {target})"),
    })?;
    let warnings = unknown
        .into_iter()
        .map(|k| format!("{ORIGIN}.params.{k}: unknown parameter of {target}, ignored"))
        .collect();
    Ok((value, warnings))
}

impl LossConfig {
    /// Types a `lossconfig` block; unknown parameters come back as warnings.
    pub fn from_target(t: &TargetConfig) -> Result<(Self, Vec<String>)> {
        let name = t.target.rsplit('.').next().unwrap_or("");
        match name {
            "VQLPIPSWithDiscriminator" => {
                let (c, w): (VqLpipsConfig, _) = parse(&t.target, &t.params)?;
                if c.disc_loss != "hinge" && c.disc_loss != "vanilla" {
                    return Err(Error::Config {
                        origin: format!("{ORIGIN}.params.disc_loss"),
                        msg: format!("unknown GAN loss {:?}: use \"hinge\" or \"vanilla\"", c.disc_loss),
                    });
                }
                Ok((LossConfig::VqLpips(c), w))
            }
            "BCELossWithQuant" => {
                let (c, w): (BceConfig, _) = parse(&t.target, &t.params)?;
                Ok((LossConfig::BceWithQuant(c), w))
            }
            "DummyLoss" => Ok((LossConfig::Dummy, Vec::new())),
            _ => Err(Error::Config {
                origin: format!("{ORIGIN}.target"),
                msg: format!(
                    "unknown loss {:?}: taming-rs trains with taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator \
                     or taming.modules.losses.segmentation.BCELossWithQuant",
                    t.target
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(t: &str, params: serde_json::Value) -> TargetConfig {
        TargetConfig {
            target: t.into(),
            params,
        }
    }

    #[test]
    fn defaults_unknown_keys_and_bad_values() -> anyhow::Result<()> {
        let t = target(
            "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            serde_json::json!({"disc_start": 10, "disc_wieght": 0.8}),
        );
        let (c, w) = LossConfig::from_target(&t)?;
        let LossConfig::VqLpips(c) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            (
                c.disc_start,
                c.disc_num_layers,
                c.disc_ndf,
                c.perceptual_weight
            ),
            (10, 3, 64, 1.0)
        );
        assert_eq!(c.disc_loss, "hinge");
        assert!(w[0].contains("disc_wieght"), "{w:?}");
        let bad = target(
            "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            serde_json::json!({}),
        );
        let e = LossConfig::from_target(&bad).unwrap_err().to_string();
        assert!(e.contains("disc_start"), "{e}");
        let e = LossConfig::from_target(&target("my.Loss", serde_json::json!({})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("my.Loss"), "{e}");
        Ok(())
    }
}
