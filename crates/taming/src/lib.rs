//! taming-rs: Taming Transformers (Esser, Rombach, Ommer, CVPR 2021) in Rust on candle.
//!
//! The crate mirrors the reference's package layout:
//! - [`config`]: OmegaConf project YAML (merging, interpolation, overrides) to typed configs;
//! - [`checkpoint`]: Lightning/torch checkpoints (zip, legacy, any pickle protocol) and safetensors;
//! - [`nn`]: the building blocks of `taming/modules/diffusionmodules/model.py`;
//! - [`quantize`]: the quantizers of `taming/modules/vqvae/quantize.py`;
//! - [`first_stage`]: `Encoder`, `Decoder` and the VQ models of `taming/models/vqgan.py`;
//! - [`model`]: building a model from config + checkpoint, strictly, with a load report;
//! - [`image_io`]: the reference's image, segmentation and depth conventions;
//! - [`verify`]: parity checks against fixtures made by the reference.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod first_stage;
pub mod image_io;
pub mod model;
pub mod nn;
pub mod quantize;
pub mod verify;

pub use error::{Error, Result};
