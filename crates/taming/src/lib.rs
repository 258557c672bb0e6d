//! taming-rs: Taming Transformers (Esser, Rombach, Ommer, CVPR 2021) in Rust on candle.
//!
//! The crate mirrors the reference's package layout:
//! - [`config`]: OmegaConf project YAML (merging, interpolation, overrides) to typed configs;
//! - [`checkpoint`]: Lightning/torch checkpoints (zip, legacy, any pickle protocol) and safetensors;
//! - [`nn`]: the building blocks of `taming/modules/diffusionmodules/model.py`;
//! - [`quantize`]: the quantizers of `taming/modules/vqvae/quantize.py`;
//! - [`first_stage`]: `Encoder`, `Decoder` and the VQ models of `taming/models/vqgan.py`;
//! - [`transformer`]: the GPT of `taming/modules/transformer/mingpt.py`, with a KV cache;
//! - [`permuter`]: token orders of `taming/modules/transformer/permuter.py`;
//! - [`cond_stage`]: conditioning stages (VQ, class, SOS, coordinates);
//! - [`cond_transformer`]: `Net2NetTransformer` of `taming/models/cond_transformer.py`;
//! - [`sampling`]: cached autoregressive and sliding-window sampling with top-k/top-p;
//! - [`pipeline`]: sampling tasks end to end (condition in, images out);
//! - [`model`]: building a model from config + checkpoint, strictly, with a load report;
//! - [`image_io`]: the reference's image, segmentation and depth conventions;
//! - [`train`]: training both stages (optimizers, run directories, checkpoints, the loop);
//! - [`verify`]: parity checks against fixtures made by the reference.

pub mod checkpoint;
pub mod cond_stage;
pub mod cond_transformer;
pub mod config;
pub mod data;
pub mod error;
pub mod first_stage;
pub mod image_io;
pub mod kernels;
pub mod losses;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod permuter;
pub mod quantize;
pub mod sampling;
pub mod train;
pub mod transformer;
pub mod verify;

pub use error::{Error, Result};
