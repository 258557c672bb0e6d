//! Parity verification against fixtures made by the reference implementation.
//!
//! A fixture folder holds `config.yaml`, `model.ckpt` and `io.safetensors` (see
//! `shared/fixtures/FIXTURES.md`, produced by the reference's model code). [`verify_dir`] builds the
//! model from the config alone (never from the folder's name), recomputes every tensor of
//! `io.safetensors` it knows how to produce from that file's inputs, and compares:
//! indices exactly, float tensors within 1e-4 absolute (scaled by the tensor's magnitude when it
//! exceeds 1), scalar losses within 1e-5 relative. Tensors it cannot produce are listed as skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};

use crate::checkpoint::StateDict;
use crate::cond_transformer::Net2NetTransformer;
use crate::config::{ModelConfig, ProjectConfig, VqKind};
use crate::first_stage::VqModel;
use crate::quantize::{index_margin, Quantizer};
use crate::sampling::{no_progress, sample_sequence, sample_sliding, SamplingOptions, SlidingCond};
use crate::{Error, Result};

/// How a tensor is compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    /// Integer tensors: every element equal.
    Exact,
    /// max |a - b| <= tol * max(1, max |expected|).
    Abs(f64),
    /// |a - b| <= tol * |expected| (scalar losses).
    Rel(f64),
    /// |a - b| <= tol * scale: a sum of terms that nearly cancel, whose float32 error scales with
    /// the terms' magnitudes (`scale`), not with the small result.
    RelTo(f64, f64),
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tolerance::Exact => write!(f, "exact"),
            Tolerance::Abs(t) => write!(f, "abs {t:.0e}"),
            Tolerance::Rel(t) => write!(f, "rel {t:.0e}"),
            Tolerance::RelTo(t, s) => write!(f, "rel {t:.0e} of the terms' magnitude {s:.3}"),
        }
    }
}

/// Default tolerance for float tensors of magnitude ~1.
pub const ABS_TOL: f64 = 1e-4;
/// Default tolerance for scalar losses.
pub const REL_TOL: f64 = 1e-5;

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    /// Max absolute difference (for Exact: number of differing elements).
    pub diff: f64,
    pub tolerance: Tolerance,
    pub passed: bool,
    pub note: String,
}

/// The outcome of verifying one fixture.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub dir: PathBuf,
    pub model: String,
    pub checks: Vec<Check>,
    /// Tensors that are inputs of the computation.
    pub inputs: Vec<String>,
    /// Tensors this build cannot produce yet, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.passed).count()
    }
    pub fn failed(&self) -> usize {
        self.checks.len() - self.passed()
    }
    pub fn all_passed(&self) -> bool {
        self.failed() == 0 && !self.checks.is_empty()
    }
    /// The check of tensor `name`, if it was compared.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
    /// One line per tensor, then `N passed, M failed`.
    pub fn render(&self) -> String {
        let mut s = format!("{} ({})\n", self.dir.display(), self.model);
        for c in &self.checks {
            let (what, d) = if c.tolerance == Tolerance::Exact {
                ("mismatches", format!("{}", c.diff))
            } else {
                ("max |diff|", format!("{:.3e}", c.diff))
            };
            s.push_str(&format!(
                "  {:<6} {:<24} {what} {d:<10} tol {}{}\n",
                if c.passed { "ok" } else { "FAIL" },
                c.name,
                c.tolerance,
                if c.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", c.note)
                }
            ));
        }
        for i in &self.inputs {
            s.push_str(&format!("  input  {i}\n"));
        }
        for (name, why) in &self.skipped {
            s.push_str(&format!("  skip   {name:<24} {why}\n"));
        }
        s.push_str(&format!(
            "{} passed, {} failed\n",
            self.passed(),
            self.failed()
        ));
        s
    }
}

/// Compares `actual` with `expected` and records the check.
pub fn compare(name: &str, actual: &Tensor, expected: &Tensor, tol: Tolerance) -> Result<Check> {
    if actual.dims() != expected.dims() {
        return Ok(Check {
            name: name.into(),
            diff: f64::INFINITY,
            tolerance: tol,
            passed: false,
            note: format!("shape {:?}, expected {:?}", actual.dims(), expected.dims()),
        });
    }
    let (diff, passed) = match tol {
        Tolerance::Exact => {
            let a = actual
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?;
            let e = expected
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?;
            let n = a.iter().zip(&e).filter(|(x, y)| x != y).count();
            (n as f64, n == 0)
        }
        Tolerance::Abs(t) => {
            let a = actual.to_dtype(DType::F64)?;
            let e = expected.to_dtype(DType::F64)?;
            let d = (a - &e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
            (d, d <= t * scale)
        }
        Tolerance::Rel(t) => {
            let a = actual.to_dtype(DType::F64)?;
            let e = expected.to_dtype(DType::F64)?;
            let d = (a - &e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            (d, d <= t * scale.max(1e-12))
        }
        Tolerance::RelTo(t, scale) => {
            let a = actual.to_dtype(DType::F64)?;
            let e = expected.to_dtype(DType::F64)?;
            let d = (a - &e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            (d, d <= t * scale.max(1e-12))
        }
    };
    Ok(Check {
        name: name.into(),
        diff,
        tolerance: tol,
        passed: passed && diff.is_finite(),
        note: String::new(),
    })
}

/// The tensors of an `io.safetensors` file.
pub struct FixtureIo {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl FixtureIo {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("cannot read fixture tensors: {e}"),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors: tensors.into_iter().collect(),
        })
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Checkpoint {
            path: self.path.clone(),
            msg: format!("fixture has no input tensor `{name}`"),
        })
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }
}

/// Accumulates checks for the tensors present in a fixture.
pub struct Checker<'a> {
    pub io: &'a FixtureIo,
    pub report: Report,
}

impl<'a> Checker<'a> {
    pub fn new(io: &'a FixtureIo, dir: &Path, model: String) -> Self {
        Self {
            io,
            report: Report {
                dir: dir.to_path_buf(),
                model,
                ..Default::default()
            },
        }
    }

    /// Whether the fixture holds `name` (so that it is worth computing).
    pub fn wants(&self, name: &str) -> bool {
        self.io.get(name).is_some()
    }

    /// Compares `actual` with the fixture's `name`, if present.
    pub fn check(&mut self, name: &str, actual: &Tensor, tol: Tolerance) -> Result<()> {
        if let Some(expected) = self.io.get(name) {
            let c = compare(name, actual, expected, tol)?;
            self.report.checks.push(c);
        }
        Ok(())
    }

    /// Marks fixture tensors as inputs.
    pub fn inputs(&mut self, names: &[&str]) {
        for n in names {
            if self.wants(n) {
                self.report.inputs.push((*n).to_string());
            }
        }
    }

    /// Lists every fixture tensor neither checked nor an input as skipped with `why`.
    pub fn finish(mut self, why: impl Fn(&str) -> String) -> Report {
        let done: Vec<String> = self
            .report
            .checks
            .iter()
            .map(|c| c.name.clone())
            .chain(self.report.inputs.iter().cloned())
            .collect();
        for n in self.io.names() {
            if !done.iter().any(|d| d == n) {
                self.report.skipped.push((n.to_string(), why(n)));
            }
        }
        self.report
    }
}

/// Verifies a fixture folder (`config.yaml`, `model.ckpt`, `io.safetensors`).
pub fn verify_dir(dir: &Path, device: &Device) -> Result<Report> {
    let config = ProjectConfig::from_files(&[dir.join("config.yaml")], &[])?;
    let sd = StateDict::load(dir.join("model.ckpt"))?;
    let io = FixtureIo::load(&dir.join("io.safetensors"), device)?;
    match &config.model {
        ModelConfig::Vq(cfg) => {
            let (model, _) = crate::model::load_vq(cfg, &sd, DType::F32, device)?;
            let name = format!("{:?}", model.kind());
            let mut ck = Checker::new(&io, dir, name);
            check_first_stage(&mut ck, &model, &cfg.kind)?;
            check_losses(&mut ck, &model, cfg, &sd)?;
            Ok(ck.finish(skip_reason))
        }
        ModelConfig::Transformer(cfg) => {
            let (model, _) = Net2NetTransformer::load(cfg, &sd, DType::F32, device)?;
            let name = format!(
                "Net2NetTransformer, cond stage: {}",
                model.cond_stage().describe()
            );
            let mut ck = Checker::new(&io, dir, name);
            check_transformer(&mut ck, &model)?;
            Ok(ck.finish(skip_reason))
        }
    }
}

fn skip_reason(name: &str) -> String {
    if name.starts_with("loss/") {
        "not a loss term of the config's lossconfig".into()
    } else {
        "not produced by this build".into()
    }
}

/// Checks the `loss/*` tensors: one training step's loss terms of `VQLPIPSWithDiscriminator` at
/// `global_step = disc_start`, computed on the fixture's `input` with the checkpoint's LPIPS and
/// discriminator weights (model in train mode, LPIPS in eval mode, discriminator BatchNorm on
/// batch statistics), including the adaptive weight, which needs gradients.
pub fn check_losses(
    ck: &mut Checker,
    model: &VqModel,
    cfg: &crate::config::VqModelConfig,
    sd: &StateDict,
) -> Result<()> {
    use crate::losses::vqperceptual::{LastLayer, VqLoss};
    use crate::losses::LossConfig;
    if !ck.io.names().any(|n| n.starts_with("loss/")) {
        return Ok(());
    }
    let Some(lossconfig) = &cfg.lossconfig else {
        return Ok(());
    };
    let (LossConfig::VqLpips(lc), _) = LossConfig::from_target(lossconfig)? else {
        return Ok(());
    };
    let step = lc.disc_start;
    let input = ck.io.require("input")?.clone();
    let loss = VqLoss::from_state_dict(lc, sd, "loss.", None, 0, input.device())?;
    // make_fixtures.py computes the losses after `model.train(); model.loss.eval()`, which puts the
    // discriminator in eval mode too: its BatchNorm uses the checkpoint's running statistics (the
    // fixture's values agree with that and not with batch statistics).
    loss.discriminator().set_training(false);
    let _mode = crate::nn::training_mode();
    let out = model.forward_train(&input)?;
    let last = LastLayer {
        input: &out.last_layer_input,
        conv: model.decoder().conv_out(),
    };
    let gen = loss.generator_step(
        &input,
        &out.reconstruction,
        &out.qloss,
        step,
        Some(last),
        None,
    )?;
    let disc = loss.discriminator_step(&input, &out.reconstruction, step, None)?;
    let one = |v: f32| Tensor::new(&[v], input.device());
    let magnitude = gen
        .logs
        .iter()
        .find(|(k, _)| k == "total_loss_terms_magnitude")
        .map(|(_, v)| *v as f64)
        .unwrap_or(1.0);
    for (k, v) in gen.logs.iter().chain(&disc.logs) {
        match k.as_str() {
            "total_loss" => {
                // nll + d_weight * g_loss + quant nearly cancel: compare relative to the terms
                let tol = Tolerance::RelTo(REL_TOL, magnitude);
                ck.check("loss/aeloss", &one(*v)?, tol)?;
                ck.check("loss/total_loss", &one(*v)?, tol)?;
            }
            "total_loss_terms_magnitude" => {}
            "disc_loss" => {
                ck.check("loss/discloss", &one(*v)?, Tolerance::Rel(REL_TOL))?;
                ck.check("loss/disc_loss", &one(*v)?, Tolerance::Rel(REL_TOL))?;
            }
            _ => ck.check(&format!("loss/{k}"), &one(*v)?, Tolerance::Rel(REL_TOL))?,
        }
    }
    Ok(())
}

/// Checks every first-stage tensor of FIXTURES.md that the fixture holds.
pub fn check_first_stage(ck: &mut Checker, model: &VqModel, kind: &VqKind) -> Result<()> {
    let tol = Tolerance::Abs(ABS_TOL);
    let input = ck.io.require("input")?.clone();
    ck.inputs(&["input"]);
    if let (Some(labels), VqKind::Segmentation { n_labels }) = (ck.io.get("labels"), kind) {
        // our label -> one-hot convention against the reference's `input`
        let labels = labels.clone();
        let (_, h, w) = labels.dims3()?;
        let ids = labels
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let bytes: Vec<u8> = ids.iter().map(|&v| v.min(255) as u8).collect();
        let img = image::GrayImage::from_raw(w as u32, h as u32, bytes)
            .ok_or_else(|| Error::invalid("labels tensor is not an image"))?;
        let (_, onehot) = crate::image_io::labels_to_onehot(
            &img,
            *n_labels,
            crate::image_io::LabelShift::None,
            Path::new("labels"),
            input.device(),
        )?;
        ck.report.inputs.push("labels".into());
        ck.check("input", &onehot, Tolerance::Exact)?;
        ck.report.inputs.retain(|n| n != "input");
    }
    let enc = model.encoder().forward(&input)?; // (B, z, h, w)
    ck.check("encoder_out", &enc, tol)?;
    let h = model.quant_conv().forward(&enc)?; // (B, embed_dim, h, w)
    ck.check("quant_conv_out", &h, tol)?;
    if let Quantizer::Gumbel(g) = model.quantizer() {
        ck.check("gumbel_logits", &g.logits(&h)?, tol)?;
    }
    let q = model.quantizer().forward(&h)?;
    ck.check("indices", &q.indices, Tolerance::Exact)?;
    ck.check("quant", &q.quant, tol)?;
    if ck.wants("emb_loss") {
        ck.check("emb_loss", &q.loss.reshape(1)?, Tolerance::Rel(REL_TOL))?;
    }
    if ck.wants("index_margin") {
        ck.check(
            "index_margin",
            &index_margin(&h, model.quantizer().codebook())?,
            tol,
        )?;
    }
    if ck.wants("decoded") {
        ck.check("decoded", &model.decode(&q.quant)?, tol)?;
    }
    if ck.wants("decoded_from_indices") {
        let expected_idx = ck.io.require("indices")?.clone();
        ck.check(
            "decoded_from_indices",
            &model.decode_indices(&expected_idx, q.grid)?,
            tol,
        )?;
    }
    if ck.wants("to_rgb") {
        ck.check("to_rgb", &model.to_rgb(&input)?, tol)?;
    }
    Ok(())
}

/// Checks every transformer tensor of FIXTURES.md that the fixture holds: encodings, teacher-forced
/// logits and cross-entropy, greedy sampling from the condition alone and from half the image,
/// their decodings, and the sliding-window sampler on a larger input.
pub fn check_transformer(ck: &mut Checker, model: &Net2NetTransformer) -> Result<()> {
    let tol = Tolerance::Abs(ABS_TOL);
    let x = ck.io.require("x")?.clone();
    let c = ck.io.require("c")?.clone();
    ck.inputs(&["x", "c", "sliding_x", "sliding_c"]);
    let z = model.encode_to_z(&x)?;
    ck.check("z_indices", &z.indices, Tolerance::Exact)?;
    let ct = model.encode_to_c(&c)?;
    ck.check("c_indices", &ct.indices, Tolerance::Exact)?;
    // use the reference's tokens from here on, so that each check tests one thing
    let z_idx = ck.io.get("z_indices").cloned().unwrap_or(z.indices.clone());
    let c_idx = ck
        .io
        .get("c_indices")
        .cloned()
        .unwrap_or(ct.indices.clone());
    let logits = model.logits(&c_idx, &z_idx)?;
    ck.check("logits", &logits, tol)?;
    if ck.wants("cross_entropy") {
        let ce = Net2NetTransformer::cross_entropy(&logits, &z_idx)?;
        ck.check("cross_entropy", &ce.reshape(1)?, Tolerance::Rel(REL_TOL))?;
    }
    let greedy = SamplingOptions {
        greedy: true,
        ..Default::default()
    };
    let (b, n) = z_idx.dims2()?;
    let gpt = model.gpt();
    let empty = Tensor::zeros((b, 0), DType::U32, x.device())?;
    if ck.wants("greedy_indices") {
        let s = sample_sequence(gpt, &c_idx, &empty, n, &greedy, None, &mut no_progress)?;
        ck.check("greedy_indices", &s.indices, Tolerance::Exact)?;
        let path = ck
            .io
            .get("greedy_indices")
            .cloned()
            .unwrap_or(s.indices.clone());
        if ck.wants("greedy_logits") {
            ck.check("greedy_logits", &model.logits(&c_idx, &path)?, tol)?;
        }
        if ck.wants("greedy_image") {
            ck.check("greedy_image", &model.decode_to_img(&path, z.grid)?, tol)?;
        }
    }
    if ck.wants("half_indices") {
        let prefix = z_idx.narrow(1, 0, n / 2)?;
        let s = sample_sequence(
            gpt,
            &c_idx,
            &prefix,
            n - n / 2,
            &greedy,
            None,
            &mut no_progress,
        )?;
        ck.check("half_indices", &s.indices, Tolerance::Exact)?;
        if ck.wants("half_image") {
            let path = ck
                .io
                .get("half_indices")
                .cloned()
                .unwrap_or(s.indices.clone());
            ck.check("half_image", &model.decode_to_img(&path, z.grid)?, tol)?;
        }
    }
    if let (Some(sx), Some(sc)) = (
        ck.io.get("sliding_x").cloned(),
        ck.io.get("sliding_c").cloned(),
    ) {
        let zs = model.encode_to_z(&sx)?;
        let cs = model.encode_to_c(&sc)?;
        let cond = if cs.grid == Some(zs.grid) {
            SlidingCond::Spatial(cs.indices)
        } else {
            SlidingCond::Prefix(cs.indices)
        };
        let s = sample_sliding(
            gpt,
            &cond,
            zs.grid,
            model.training_grid(),
            &greedy,
            None,
            &mut no_progress,
        )?;
        ck.check("sliding_indices", &s.indices, Tolerance::Exact)?;
        if ck.wants("sliding_image") {
            let path = ck
                .io
                .get("sliding_indices")
                .cloned()
                .unwrap_or(s.indices.clone());
            ck.check("sliding_image", &model.decode_to_img(&path, zs.grid)?, tol)?;
        }
    }
    Ok(())
}
