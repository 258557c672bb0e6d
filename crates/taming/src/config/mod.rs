//! Project configs: the reference's OmegaConf YAML files (`configs/*.yaml`,
//! `logs/<run>/configs/*-project.yaml`) read into typed configs.
//!
//! Mirrors two things of the reference:
//! - OmegaConf as `main.py` uses it (loading, merging `-b a.yaml -b b.yaml`, dot-list overrides,
//!   `${...}` interpolation, saving): see [`omegaconf`];
//! - `main.instantiate_from_config`: every `{target, params}` block the reference would
//!   instantiate becomes a typed config here, with the parameter names and defaults of the
//!   reference's constructors (`VQModel`, `VQSegmentationModel`, `GumbelVQ`, `EMAVQ`,
//!   `Net2NetTransformer`, `mingpt.GPT`, the permuters, `Labelator`, `SOSProvider`,
//!   `CoordStage`, and the `Encoder`/`Decoder` kwargs of `ddconfig`).
//!
//! Unknown keys are not fatal (the reference's `Encoder`/`Decoder` swallow unknown `ddconfig`
//! keys too): they are collected as warnings naming the full key path. An unsupported `target` is
//! an error that lists the supported ones.

pub mod omegaconf;

use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

pub use omegaconf::{ConfigTree, KeyPath};

use crate::{Error, Result};

/// `taming.models.vqgan.VQModel`.
pub const VQ_MODEL: &str = "taming.models.vqgan.VQModel";
/// `taming.models.vqgan.VQSegmentationModel`.
pub const VQ_SEGMENTATION_MODEL: &str = "taming.models.vqgan.VQSegmentationModel";
/// `taming.models.vqgan.GumbelVQ`.
pub const GUMBEL_VQ: &str = "taming.models.vqgan.GumbelVQ";
/// `taming.models.vqgan.EMAVQ`.
pub const EMA_VQ: &str = "taming.models.vqgan.EMAVQ";
/// `taming.models.vqgan.VQNoDiscModel` (read as a [`VqKind::VqModel`]).
pub const VQ_NO_DISC_MODEL: &str = "taming.models.vqgan.VQNoDiscModel";
/// `taming.models.cond_transformer.Net2NetTransformer`.
pub const NET2NET_TRANSFORMER: &str = "taming.models.cond_transformer.Net2NetTransformer";
/// `taming.modules.transformer.mingpt.GPT`.
pub const GPT: &str = "taming.modules.transformer.mingpt.GPT";
/// `taming.modules.util.Labelator`.
pub const LABELATOR: &str = "taming.modules.util.Labelator";
/// `taming.modules.util.SOSProvider`.
pub const SOS_PROVIDER: &str = "taming.modules.util.SOSProvider";
/// `taming.modules.misc.coord.CoordStage`.
pub const COORD_STAGE: &str = "taming.modules.misc.coord.CoordStage";
/// The cond-stage marker for "use the first stage".
pub const IS_FIRST_STAGE: &str = "__is_first_stage__";
/// The cond-stage marker for "no conditioning" (an SOS token).
pub const IS_UNCONDITIONAL: &str = "__is_unconditional__";
/// Prefix of the permuter targets (`...permuter.Identity`, `...permuter.ZCurve`, ...).
pub const PERMUTER_PREFIX: &str = "taming.modules.transformer.permuter.";

const VQ_TARGETS: [&str; 5] = [
    VQ_MODEL,
    VQ_SEGMENTATION_MODEL,
    GUMBEL_VQ,
    EMA_VQ,
    VQ_NO_DISC_MODEL,
];
const PERMUTERS: [&str; 7] = [
    "Identity",
    "Subsample",
    "ZCurve",
    "SpiralOut",
    "SpiralIn",
    "Random",
    "AlternateParsing",
];

/// A project config: the `model:` section typed, everything merged and interpolated in `raw`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectConfig {
    pub model: ModelConfig,
    pub base_learning_rate: Option<f64>,
    /// The merged, interpolated tree (for writing back and for the `data:`/`lightning:` sections).
    pub raw: Value,
    /// Unknown keys and other non-fatal remarks, in file order.
    pub warnings: Vec<String>,
}

/// The model a project config describes (`model.target`).
// Built once per run; boxing the variants would only complicate matching on them.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Vq(VqModelConfig),
    Transformer(Net2NetConfig),
}

/// `taming.models.vqgan.VQModel` / `VQSegmentationModel` / `GumbelVQ` / `EMAVQ` (and
/// `VQNoDiscModel`, read as a `VQModel`).
#[derive(Debug, Clone, PartialEq)]
pub struct VqModelConfig {
    pub kind: VqKind,
    pub ddconfig: DdConfig,
    pub n_embed: usize,
    pub embed_dim: usize,
    /// Default `"image"`.
    pub image_key: String,
    pub colorize_nlabels: Option<usize>,
    /// Path of a `.npy` file of used codebook indices.
    pub remap: Option<String>,
    /// The quantizer's `unknown_index` (not a `VQModel` parameter; key `unknown_index`); default
    /// [`UnknownIndex::Random`].
    pub unknown_index: UnknownIndex,
    /// Default false.
    pub sane_index_shape: bool,
    /// `VectorQuantizer2(legacy=...)` (key `legacy` or `legacy_beta`); default true, which is what
    /// `VQModel` always uses.
    pub legacy_beta: bool,
    /// The loss block, kept generic (never instantiated here).
    pub lossconfig: Option<TargetConfig>,
    pub monitor: Option<String>,
    pub ckpt_path: Option<String>,
    pub ignore_keys: Vec<String>,
}

impl VqModelConfig {
    /// The reference's target string of this kind.
    pub fn target(&self) -> &'static str {
        match self.kind {
            VqKind::VqModel => VQ_MODEL,
            VqKind::Segmentation { .. } => VQ_SEGMENTATION_MODEL,
            VqKind::Gumbel { .. } => GUMBEL_VQ,
            VqKind::Ema => EMA_VQ,
        }
    }
}

/// What the quantizer does with indices that are not in the remap table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownIndex {
    /// `"random"`: a random used index.
    #[default]
    Random,
    /// `"extra"`: one extra index past the used ones.
    Extra,
    /// A fixed index.
    Index(i64),
}

impl<'de> Deserialize<'de> for UnknownIndex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == "random" => Ok(UnknownIndex::Random),
            Value::String(s) if s == "extra" => Ok(UnknownIndex::Extra),
            Value::Number(n) if n.as_i64().is_some() => {
                Ok(UnknownIndex::Index(n.as_i64().unwrap_or_default()))
            }
            other => Err(D::Error::custom(format!(
                "expected \"random\", \"extra\" or an integer, found {other}"
            ))),
        }
    }
}

/// The VQ model variant, with its own parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum VqKind {
    VqModel,
    Segmentation {
        n_labels: usize,
    },
    Gumbel {
        /// Default 1e-8.
        kl_weight: f64,
        temperature_scheduler: Option<TargetConfig>,
    },
    Ema,
}

/// The reference's `ddconfig` (Encoder/Decoder kwargs) with the reference's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DdConfig {
    pub ch: usize,
    pub out_ch: usize,
    /// Default `[1, 2, 4, 8]`.
    #[serde(default = "default_ch_mult")]
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    /// Default 0.0.
    #[serde(default)]
    pub dropout: f64,
    /// Default true.
    #[serde(default = "yes")]
    pub resamp_with_conv: bool,
    pub in_channels: usize,
    pub resolution: usize,
    pub z_channels: usize,
    /// Default true.
    #[serde(default = "yes")]
    pub double_z: bool,
    /// Default false.
    #[serde(default)]
    pub give_pre_end: bool,
}

impl DdConfig {
    /// The encoder's spatial downsampling factor, `2^(len(ch_mult) - 1)`.
    pub fn downsample_factor(&self) -> usize {
        1usize << self.ch_mult.len().saturating_sub(1)
    }
}

/// A nested `{target, params}` block kept generic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TargetConfig {
    pub target: String,
    /// Always a mapping (`{}` when absent or null).
    #[serde(default = "empty_object", deserialize_with = "params_mapping")]
    pub params: Value,
}

/// `taming.models.cond_transformer.Net2NetTransformer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Net2NetConfig {
    pub transformer: GptConfig,
    pub first_stage: VqModelConfig,
    pub cond_stage: CondStageConfig,
    /// Default [`PermuterConfig::Identity`].
    pub permuter: PermuterConfig,
    /// Default `"image"`.
    pub first_stage_key: String,
    /// Default `"depth"` (the reference's default). For an unconditional model this is the
    /// first-stage key, as the reference sets it.
    pub cond_stage_key: String,
    /// Default -1.
    pub downsample_cond_size: i64,
    /// Default 1.0.
    pub pkeep: f64,
    /// Default 0.
    pub sos_token: usize,
    /// Default false; when true the cond stage is [`CondStageConfig::Unconditional`] regardless.
    /// Also true for `cond_stage_config: __is_unconditional__`, as the reference's
    /// `be_unconditional` is.
    pub unconditional: bool,
    pub ckpt_path: Option<String>,
    pub ignore_keys: Vec<String>,
}

/// The conditioning stage of a [`Net2NetConfig`] (`cond_stage_config`).
// Built once per run; boxing the VQ variant would only complicate matching on it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CondStageConfig {
    /// `"__is_first_stage__"`.
    FirstStage,
    /// `"__is_unconditional__"` (an `SOSProvider` with the transformer's `sos_token`).
    Unconditional,
    /// Any vqgan target, incl. `VQSegmentationModel` and a 1-channel depth `VQModel`.
    Vq(VqModelConfig),
    /// `taming.modules.util.Labelator`.
    Labelator { n_classes: usize },
    /// `taming.modules.util.SOSProvider`.
    Sos { sos_token: usize },
    /// `taming.modules.misc.coord.CoordStage`.
    Coord { n_embed: usize, down_factor: usize },
}

/// `taming.modules.transformer.mingpt.GPT` params with the reference defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub block_size: usize,
    /// Default 12.
    #[serde(default = "default_n_layer")]
    pub n_layer: usize,
    /// Default 8.
    #[serde(default = "default_n_head")]
    pub n_head: usize,
    /// Default 256.
    #[serde(default = "default_n_embd")]
    pub n_embd: usize,
    /// Default 0.0.
    #[serde(default)]
    pub embd_pdrop: f64,
    /// Default 0.0.
    #[serde(default)]
    pub resid_pdrop: f64,
    /// Default 0.0.
    #[serde(default)]
    pub attn_pdrop: f64,
    /// Default 0.
    #[serde(default)]
    pub n_unmasked: usize,
}

/// `taming.modules.transformer.permuter.*` (params `H`, `W`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermuterConfig {
    Identity,
    Subsample { h: usize, w: usize },
    ZCurve { h: usize, w: usize },
    SpiralOut { h: usize, w: usize },
    SpiralIn { h: usize, w: usize },
    Random { h: usize, w: usize },
    AlternateParsing { h: usize, w: usize },
}

fn yes() -> bool {
    true
}
fn default_ch_mult() -> Vec<usize> {
    vec![1, 2, 4, 8]
}
fn default_n_layer() -> usize {
    12
}
fn default_n_head() -> usize {
    8
}
fn default_n_embd() -> usize {
    256
}
fn default_image_key() -> String {
    "image".to_string()
}
fn default_cond_stage_key() -> String {
    "depth".to_string()
}
fn default_downsample_cond_size() -> i64 {
    -1
}
fn default_pkeep() -> f64 {
    1.0
}
fn empty_object() -> Value {
    Value::Object(Map::new())
}

fn params_mapping<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Value, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(empty_object()),
        v @ Value::Object(_) => Ok(v),
        other => Err(D::Error::custom(format!(
            "`params` must be a mapping, found {other}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw parameter blocks (what the reference's constructors take)
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ModelSection {
    #[serde(default)]
    base_learning_rate: Option<f64>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default = "empty_object", deserialize_with = "params_mapping")]
    params: Value,
}

#[derive(Deserialize)]
struct VqParams {
    ddconfig: DdConfig,
    #[serde(default)]
    lossconfig: Option<TargetConfig>,
    n_embed: usize,
    embed_dim: usize,
    #[serde(default = "default_image_key")]
    image_key: String,
    #[serde(default)]
    colorize_nlabels: Option<usize>,
    #[serde(default)]
    remap: Option<String>,
    #[serde(default)]
    unknown_index: UnknownIndex,
    #[serde(default)]
    sane_index_shape: bool,
    #[serde(default = "yes", alias = "legacy_beta")]
    legacy: bool,
    #[serde(default)]
    monitor: Option<String>,
    #[serde(default)]
    ckpt_path: Option<String>,
    #[serde(default)]
    ignore_keys: Vec<String>,
    // Variant-specific.
    #[serde(default)]
    n_labels: Option<usize>,
    #[serde(default)]
    kl_weight: Option<f64>,
    #[serde(default)]
    temperature_scheduler_config: Option<TargetConfig>,
}

#[derive(Deserialize)]
struct Net2NetParams {
    transformer_config: TargetConfig,
    first_stage_config: TargetConfig,
    #[serde(default)]
    cond_stage_config: Option<Value>,
    #[serde(default)]
    permuter_config: Option<TargetConfig>,
    #[serde(default)]
    ckpt_path: Option<String>,
    #[serde(default)]
    ignore_keys: Vec<String>,
    #[serde(default = "default_image_key")]
    first_stage_key: String,
    #[serde(default = "default_cond_stage_key")]
    cond_stage_key: String,
    #[serde(default = "default_downsample_cond_size")]
    downsample_cond_size: i64,
    #[serde(default = "default_pkeep")]
    pkeep: f64,
    #[serde(default)]
    sos_token: usize,
    #[serde(default)]
    unconditional: bool,
}

#[derive(Deserialize)]
struct LabelatorParams {
    n_classes: usize,
    #[serde(default = "yes")]
    quantize_interface: bool,
}

#[derive(Deserialize)]
struct SosParams {
    sos_token: usize,
    #[serde(default = "yes")]
    quantize_interface: bool,
}

#[derive(Deserialize)]
struct CoordParams {
    n_embed: usize,
    down_factor: usize,
}

#[derive(Deserialize)]
struct HwParams {
    #[serde(rename = "H")]
    h: usize,
    #[serde(rename = "W")]
    w: usize,
}

#[derive(Deserialize)]
struct NoParams {}

// ---------------------------------------------------------------------------------------------
// From the tree to typed configs
// ---------------------------------------------------------------------------------------------

struct Ctx<'a> {
    tree: &'a ConfigTree,
    warnings: Vec<String>,
}

impl Ctx<'_> {
    fn err(&self, path: &KeyPath, msg: impl std::fmt::Display) -> Error {
        self.tree.error_at(path, msg)
    }

    fn warn(&mut self, path: &KeyPath, msg: impl std::fmt::Display) {
        self.warnings.push(format!("{path}: {msg}"));
    }

    /// Deserializes `value` (found at `path`), reporting unknown keys as warnings and errors
    /// with the full key path.
    fn de<T: DeserializeOwned>(&mut self, value: &Value, path: &KeyPath) -> Result<T> {
        let mut ignored: Vec<Vec<String>> = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let result: std::result::Result<T, serde_json::Error> = {
            let de = serde_path_to_error::Deserializer::new(value, &mut track);
            serde_ignored::deserialize(de, |p| {
                let mut segs = Vec::new();
                ignored_segments(&p, &mut segs);
                ignored.push(segs);
            })
        };
        match result {
            Ok(v) => {
                for segs in ignored {
                    self.warn(&path.join(&segs), "unknown key, ignored");
                }
                Ok(v)
            }
            Err(e) => {
                let mut at = path.clone();
                for seg in track.path().iter() {
                    match seg {
                        serde_path_to_error::Segment::Seq { index } => {
                            at = at.child(index.to_string())
                        }
                        serde_path_to_error::Segment::Map { key } => at = at.child(key.clone()),
                        serde_path_to_error::Segment::Enum { variant } => {
                            at = at.child(variant.clone())
                        }
                        serde_path_to_error::Segment::Unknown => {}
                    }
                }
                Err(self.err(&at, e))
            }
        }
    }

    fn unsupported(&self, path: &KeyPath, what: &str, target: &str, supported: &[&str]) -> Error {
        self.err(
            path,
            format!(
                "unsupported {what} target `{target}`; supported: {}",
                supported.join(", ")
            ),
        )
    }
}

fn ignored_segments(p: &serde_ignored::Path, out: &mut Vec<String>) {
    match p {
        serde_ignored::Path::Root => {}
        serde_ignored::Path::Seq { parent, index } => {
            ignored_segments(parent, out);
            out.push(index.to_string());
        }
        serde_ignored::Path::Map { parent, key } => {
            ignored_segments(parent, out);
            out.push(key.clone());
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => ignored_segments(parent, out),
    }
}

fn parse_model(ctx: &mut Ctx, raw: &Value) -> Result<(ModelConfig, Option<f64>)> {
    let path = KeyPath::parse("model");
    let Some(model) = raw.get("model") else {
        return Err(ctx.err(
            &KeyPath::root(),
            "missing the `model` section (`model: {target: ..., params: ...}`)",
        ));
    };
    let section: ModelSection = ctx.de(model, &path)?;
    let Some(target) = section.target else {
        return Err(ctx.err(
            &path,
            "missing key `target` (the model class, e.g. taming.models.vqgan.VQModel)",
        ));
    };
    let params_path = path.child("params");
    let model = if VQ_TARGETS.contains(&target.as_str()) {
        ModelConfig::Vq(parse_vq(ctx, &target, &section.params, &params_path)?)
    } else if target == NET2NET_TRANSFORMER {
        ModelConfig::Transformer(parse_net2net(ctx, &section.params, &params_path)?)
    } else {
        let mut supported = VQ_TARGETS.to_vec();
        supported.push(NET2NET_TRANSFORMER);
        return Err(ctx.unsupported(&path.child("target"), "model", &target, &supported));
    };
    Ok((model, section.base_learning_rate))
}

fn parse_vq(ctx: &mut Ctx, target: &str, params: &Value, path: &KeyPath) -> Result<VqModelConfig> {
    let p: VqParams = ctx.de(params, path)?;
    let not_param = |ctx: &mut Ctx, key: &str| {
        ctx.warn(
            &path.child(key),
            format!("not a parameter of {target}, ignored"),
        )
    };
    if target != VQ_SEGMENTATION_MODEL && p.n_labels.is_some() {
        not_param(ctx, "n_labels");
    }
    if target != GUMBEL_VQ {
        if p.kl_weight.is_some() {
            not_param(ctx, "kl_weight");
        }
        if p.temperature_scheduler_config.is_some() {
            not_param(ctx, "temperature_scheduler_config");
        }
    }
    let kind = match target {
        VQ_SEGMENTATION_MODEL => VqKind::Segmentation {
            n_labels: p.n_labels.ok_or_else(|| {
                ctx.err(
                    path,
                    format!("missing field `n_labels` (required by {target})"),
                )
            })?,
        },
        GUMBEL_VQ => VqKind::Gumbel {
            kl_weight: p.kl_weight.unwrap_or(1e-8),
            temperature_scheduler: p.temperature_scheduler_config,
        },
        EMA_VQ => VqKind::Ema,
        _ => VqKind::VqModel,
    };
    let dd_path = path.child("ddconfig");
    if p.ddconfig.ch_mult.is_empty() {
        return Err(ctx.err(&dd_path.child("ch_mult"), "must not be empty"));
    }
    for (key, v) in [("n_embed", p.n_embed), ("embed_dim", p.embed_dim)] {
        if v == 0 {
            return Err(ctx.err(&path.child(key), "must be at least 1"));
        }
    }
    Ok(VqModelConfig {
        kind,
        ddconfig: p.ddconfig,
        n_embed: p.n_embed,
        embed_dim: p.embed_dim,
        image_key: p.image_key,
        colorize_nlabels: p.colorize_nlabels,
        remap: p.remap,
        unknown_index: p.unknown_index,
        sane_index_shape: p.sane_index_shape,
        legacy_beta: p.legacy,
        lossconfig: p.lossconfig,
        monitor: p.monitor,
        ckpt_path: p.ckpt_path,
        ignore_keys: p.ignore_keys,
    })
}

/// A `{target, params}` block that must name a VQ model.
fn parse_vq_block(
    ctx: &mut Ctx,
    block: &TargetConfig,
    path: &KeyPath,
    what: &str,
) -> Result<VqModelConfig> {
    if !VQ_TARGETS.contains(&block.target.as_str()) {
        return Err(ctx.unsupported(&path.child("target"), what, &block.target, &VQ_TARGETS));
    }
    parse_vq(ctx, &block.target, &block.params, &path.child("params"))
}

fn parse_net2net(ctx: &mut Ctx, params: &Value, path: &KeyPath) -> Result<Net2NetConfig> {
    let p: Net2NetParams = ctx.de(params, path)?;

    let t_path = path.child("transformer_config");
    if p.transformer_config.target != GPT {
        return Err(ctx.unsupported(
            &t_path.child("target"),
            "transformer",
            &p.transformer_config.target,
            &[GPT],
        ));
    }
    let gpt_path = t_path.child("params");
    let transformer: GptConfig = ctx.de(&p.transformer_config.params, &gpt_path)?;
    for (key, v) in [
        ("vocab_size", transformer.vocab_size),
        ("block_size", transformer.block_size),
        ("n_layer", transformer.n_layer),
        ("n_head", transformer.n_head),
        ("n_embd", transformer.n_embd),
    ] {
        if v == 0 {
            return Err(ctx.err(&gpt_path.child(key), "must be at least 1"));
        }
    }
    if !transformer.n_embd.is_multiple_of(transformer.n_head) {
        return Err(ctx.err(
            &gpt_path.child("n_embd"),
            format!(
                "{} is not divisible by n_head = {}",
                transformer.n_embd, transformer.n_head
            ),
        ));
    }

    let first_stage = parse_vq_block(
        ctx,
        &p.first_stage_config,
        &path.child("first_stage_config"),
        "first stage",
    )?;

    let c_path = path.child("cond_stage_config");
    let cond_stage = if p.unconditional {
        match &p.cond_stage_config {
            Some(Value::String(s)) if s == IS_UNCONDITIONAL => {}
            None => {}
            Some(_) => ctx.warn(&c_path, "ignored: `unconditional` is true"),
        }
        CondStageConfig::Unconditional
    } else {
        match &p.cond_stage_config {
            None => return Err(ctx.err(path, "missing field `cond_stage_config`")),
            Some(v) => parse_cond_stage(ctx, v, &c_path)?,
        }
    };
    let cond_stage_key = if cond_stage == CondStageConfig::Unconditional {
        p.first_stage_key.clone()
    } else {
        p.cond_stage_key
    };

    let permuter = match &p.permuter_config {
        None => PermuterConfig::Identity,
        Some(block) => parse_permuter(ctx, block, &path.child("permuter_config"))?,
    };

    let unconditional = p.unconditional || cond_stage == CondStageConfig::Unconditional;
    Ok(Net2NetConfig {
        transformer,
        first_stage,
        cond_stage,
        permuter,
        first_stage_key: p.first_stage_key,
        cond_stage_key,
        downsample_cond_size: p.downsample_cond_size,
        pkeep: p.pkeep,
        sos_token: p.sos_token,
        unconditional,
        ckpt_path: p.ckpt_path,
        ignore_keys: p.ignore_keys,
    })
}

fn cond_stage_targets() -> Vec<&'static str> {
    let mut v = vec![IS_FIRST_STAGE, IS_UNCONDITIONAL];
    v.extend(VQ_TARGETS);
    v.extend([LABELATOR, SOS_PROVIDER, COORD_STAGE]);
    v
}

fn parse_cond_stage(ctx: &mut Ctx, value: &Value, path: &KeyPath) -> Result<CondStageConfig> {
    let block: TargetConfig = match value {
        Value::String(s) if s == IS_FIRST_STAGE => return Ok(CondStageConfig::FirstStage),
        Value::String(s) if s == IS_UNCONDITIONAL => return Ok(CondStageConfig::Unconditional),
        Value::String(s) => {
            return Err(ctx.unsupported(path, "cond stage", s, &cond_stage_targets()))
        }
        Value::Object(_) => ctx.de(value, path)?,
        other => {
            return Err(ctx.err(
                path,
                format!(
                    "expected `{IS_FIRST_STAGE}`, `{IS_UNCONDITIONAL}` or a {{target, params}} mapping, found {other}"
                ),
            ))
        }
    };
    let params_path = path.child("params");
    let no_quantize_interface = |ctx: &Ctx| {
        ctx.err(
            &params_path.child("quantize_interface"),
            "only `true` is supported (Net2NetTransformer needs the quantize interface)",
        )
    };
    match block.target.as_str() {
        t if VQ_TARGETS.contains(&t) => Ok(CondStageConfig::Vq(parse_vq(
            ctx,
            t,
            &block.params,
            &params_path,
        )?)),
        LABELATOR => {
            let p: LabelatorParams = ctx.de(&block.params, &params_path)?;
            if !p.quantize_interface {
                return Err(no_quantize_interface(ctx));
            }
            Ok(CondStageConfig::Labelator {
                n_classes: p.n_classes,
            })
        }
        SOS_PROVIDER => {
            let p: SosParams = ctx.de(&block.params, &params_path)?;
            if !p.quantize_interface {
                return Err(no_quantize_interface(ctx));
            }
            Ok(CondStageConfig::Sos {
                sos_token: p.sos_token,
            })
        }
        COORD_STAGE => {
            let p: CoordParams = ctx.de(&block.params, &params_path)?;
            if p.down_factor == 0 {
                return Err(ctx.err(&params_path.child("down_factor"), "must be at least 1"));
            }
            Ok(CondStageConfig::Coord {
                n_embed: p.n_embed,
                down_factor: p.down_factor,
            })
        }
        other => Err(ctx.unsupported(
            &path.child("target"),
            "cond stage",
            other,
            &cond_stage_targets(),
        )),
    }
}

fn parse_permuter(ctx: &mut Ctx, block: &TargetConfig, path: &KeyPath) -> Result<PermuterConfig> {
    let params_path = path.child("params");
    let name = block.target.strip_prefix(PERMUTER_PREFIX).unwrap_or("");
    if !PERMUTERS.contains(&name) {
        let supported: Vec<String> = PERMUTERS
            .iter()
            .map(|n| format!("{PERMUTER_PREFIX}{n}"))
            .collect();
        let supported: Vec<&str> = supported.iter().map(String::as_str).collect();
        return Err(ctx.unsupported(&path.child("target"), "permuter", &block.target, &supported));
    }
    if name == "Identity" {
        let _: NoParams = ctx.de(&block.params, &params_path)?;
        return Ok(PermuterConfig::Identity);
    }
    let HwParams { h, w } = ctx.de(&block.params, &params_path)?;
    if h == 0 || w == 0 {
        return Err(ctx.err(&params_path, "H and W must be at least 1"));
    }
    Ok(match name {
        "Subsample" => PermuterConfig::Subsample { h, w },
        "ZCurve" => PermuterConfig::ZCurve { h, w },
        "SpiralOut" | "SpiralIn" if h != w => {
            return Err(ctx.err(
                &params_path,
                format!("{name} needs a square grid (H == W), got H = {h}, W = {w}"),
            ))
        }
        "SpiralOut" => PermuterConfig::SpiralOut { h, w },
        "SpiralIn" => PermuterConfig::SpiralIn { h, w },
        "Random" => PermuterConfig::Random { h, w },
        _ => PermuterConfig::AlternateParsing { h, w },
    })
}

impl ProjectConfig {
    /// Loads project configs as `main.py -b a.yaml -b b.yaml key=value ...` does: the files
    /// merged left to right, then the dot-list overrides, then interpolation.
    pub fn from_files(paths: &[impl AsRef<Path>], overrides: &[String]) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::Config {
                origin: "<config>".to_string(),
                msg: "no config file given".to_string(),
            });
        }
        let mut tree = ConfigTree::new();
        for p in paths {
            tree.merge_file(p.as_ref())?;
        }
        for o in overrides {
            tree.apply_override(o)?;
        }
        Self::from_tree(&tree)
    }

    /// Loads one project config from YAML text; `origin` names it in errors.
    pub fn from_yaml_str(yaml: &str, origin: &str) -> Result<Self> {
        let mut tree = ConfigTree::new();
        tree.merge_yaml_str(yaml, origin)?;
        Self::from_tree(&tree)
    }

    /// Resolves and types a merged config.
    pub fn from_tree(tree: &ConfigTree) -> Result<Self> {
        let raw = tree.resolve()?;
        let mut ctx = Ctx {
            tree,
            warnings: Vec::new(),
        };
        if let Value::Object(m) = &raw {
            for key in m.keys() {
                if !matches!(key.as_str(), "model" | "data" | "lightning") {
                    ctx.warn(
                        &KeyPath::root().child(key.clone()),
                        "unknown top-level section, ignored",
                    );
                }
            }
        }
        let (model, base_learning_rate) = parse_model(&mut ctx, &raw)?;
        Ok(ProjectConfig {
            model,
            base_learning_rate,
            raw,
            warnings: ctx.warnings,
        })
    }

    /// YAML text of `raw` (for `taming convert`, which writes the config beside the weights).
    pub fn to_yaml(&self) -> String {
        omegaconf::to_yaml(&self.raw)
    }
}

/// The configs and checkpoint of a reference log directory `logs/<run>/`, as the reference's
/// `-r/--resume` flag finds them: `configs/*-project.yaml` sorted (all `configs/*.yaml` except
/// `*-lightning.yaml` when there is no `-project.yaml`), and `checkpoints/last.ckpt`. `logdir` may
/// also be a checkpoint file inside the run; that checkpoint is then returned.
pub fn find_configs(logdir: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    let origin = logdir.display().to_string();
    let err = |msg: String| Error::Config {
        origin: origin.clone(),
        msg,
    };
    if !logdir.exists() {
        return Err(err("no such file or directory".to_string()));
    }
    let (dir, ckpt) = if logdir.is_file() {
        (log_dir_of_checkpoint(logdir), logdir.to_path_buf())
    } else {
        // the reference writes last.ckpt; taming-rs runs write last.safetensors
        let ckpts = ["last.ckpt", "last.safetensors"].map(|n| logdir.join("checkpoints").join(n));
        let Some(ckpt) = ckpts.iter().find(|p| p.is_file()).cloned() else {
            return Err(err(format!(
                "missing checkpoint {} (a log directory has checkpoints/last.ckpt, or checkpoints/last.safetensors when written by taming train)",
                ckpts[0].display()
            )));
        };
        (logdir.to_path_buf(), ckpt)
    };
    let cfg_dir = dir.join("configs");
    let entries = std::fs::read_dir(&cfg_dir).map_err(|e| {
        err(format!(
            "cannot read the config folder {}: {e} (a log directory has configs/*-project.yaml)",
            cfg_dir.display()
        ))
    })?;
    let mut yaml = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&cfg_dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_file() && name.ends_with(".yaml") {
            yaml.push((name, path));
        }
    }
    yaml.sort();
    let project: Vec<PathBuf> = yaml
        .iter()
        .filter(|(n, _)| n.ends_with("-project.yaml"))
        .map(|(_, p)| p.clone())
        .collect();
    let configs = if project.is_empty() {
        yaml.into_iter()
            .filter(|(n, _)| !n.ends_with("-lightning.yaml"))
            .map(|(_, p)| p)
            .collect()
    } else {
        project
    };
    if configs.is_empty() {
        return Err(err(format!(
            "missing project config: no *-project.yaml in {}",
            cfg_dir.display()
        )));
    }
    Ok((configs, ckpt))
}

/// The run directory of a checkpoint: `logs/<run>` when the path goes through `logs/`,
/// else the folder above `checkpoints/`, else the checkpoint's folder.
fn log_dir_of_checkpoint(ckpt: &Path) -> PathBuf {
    let comps: Vec<_> = ckpt.components().collect();
    if let Some(i) = comps.iter().rposition(|c| c.as_os_str() == "logs") {
        if i + 2 < comps.len() {
            return comps[..i + 2].iter().collect();
        }
    }
    let parent = ckpt.parent().unwrap_or(Path::new("."));
    if parent.file_name().is_some_and(|n| n == "checkpoints") {
        parent.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        parent.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VQ: &str = "model:\n  base_learning_rate: 4.5e-6\n  target: taming.models.vqgan.VQModel\n  params:\n    embed_dim: 8\n    n_embed: 64\n    ddconfig:\n      double_z: false\n      z_channels: 16\n      resolution: 32\n      in_channels: 3\n      out_ch: 3\n      ch: 32\n      ch_mult: [1, 2, 2]\n      num_res_blocks: 1\n      attn_resolutions: [8]\n";

    #[test]
    fn vq_defaults() {
        let c = ProjectConfig::from_yaml_str(VQ, "vq.yaml").unwrap();
        assert_eq!(c.base_learning_rate, Some(4.5e-6));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let ModelConfig::Vq(vq) = c.model else {
            panic!("not vq")
        };
        assert_eq!(vq.kind, VqKind::VqModel);
        assert_eq!(vq.image_key, "image");
        assert_eq!(vq.unknown_index, UnknownIndex::Random);
        assert!(vq.legacy_beta && !vq.sane_index_shape);
        assert!(vq.lossconfig.is_none());
        assert_eq!(vq.ddconfig.downsample_factor(), 4);
        assert_eq!(vq.ddconfig.dropout, 0.0);
        assert!(vq.ddconfig.resamp_with_conv && !vq.ddconfig.give_pre_end);
        assert_eq!(vq.target(), VQ_MODEL);
    }

    #[test]
    fn type_errors_name_the_key() {
        let bad = VQ.replace("ch: 32", "ch: thirty-two");
        let e = ProjectConfig::from_yaml_str(&bad, "vq.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vq.yaml") && e.contains("model.params.ddconfig.ch:"),
            "{e}"
        );
        let bad = VQ.replace("      ch: 32\n", "");
        let e = ProjectConfig::from_yaml_str(&bad, "vq.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.params.ddconfig") && e.contains("missing field `ch`"),
            "{e}"
        );
        let bad = VQ.replace(
            "n_embed: 64",
            "n_embed: 64\n    unknown_index: 3\n    legacy: false",
        );
        let c = ProjectConfig::from_yaml_str(&bad, "vq.yaml").unwrap();
        let ModelConfig::Vq(vq) = c.model else {
            panic!()
        };
        assert_eq!(vq.unknown_index, UnknownIndex::Index(3));
        assert!(!vq.legacy_beta);
        let bad = VQ.replace("n_embed: 64", "n_embed: 64\n    unknown_index: sometimes");
        let e = ProjectConfig::from_yaml_str(&bad, "vq.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.params.unknown_index"), "{e}");
    }

    #[test]
    fn checkpoint_log_dir() {
        assert_eq!(
            log_dir_of_checkpoint(Path::new("/x/logs/run/checkpoints/epoch=1.ckpt")),
            PathBuf::from("/x/logs/run")
        );
        assert_eq!(
            log_dir_of_checkpoint(Path::new("/x/run/checkpoints/last.ckpt")),
            PathBuf::from("/x/run")
        );
        assert_eq!(
            log_dir_of_checkpoint(Path::new("/x/run/model.ckpt")),
            PathBuf::from("/x/run")
        );
    }
}
