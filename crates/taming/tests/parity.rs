//! Parity with the reference implementation: every fixture of `shared/fixtures` (made by the
//! reference's model code) is recomputed by `taming::verify` and compared value by value
//! (indices exactly, floats within 1e-4, losses within 1e-5 relative).

mod common;

use candle_core::Device;
use taming::verify::verify_dir;

/// Verifies a fixture and asserts that every listed tensor was compared and passed.
fn assert_parity(name: &str, must_check: &[&str]) {
    let Some(dir) = common::fixture(name) else {
        return;
    };
    let report = verify_dir(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("{}", report.render());
    for t in must_check {
        let c = report
            .check(t)
            .unwrap_or_else(|| panic!("{name}: tensor `{t}` was not compared"));
        assert!(
            c.passed,
            "{name}: {t} differs: {} ({})",
            c.diff, c.tolerance
        );
    }
    assert!(report.all_passed(), "{name}: {} failed", report.failed());
}

const FIRST_STAGE: &[&str] = &[
    "encoder_out",
    "quant_conv_out",
    "quant",
    "indices",
    "index_margin",
    "emb_loss",
    "decoded",
    "decoded_from_indices",
];

/// One training step's loss terms (FIXTURES.md `loss/*`), the adaptive weight included.
const LOSSES: &[&str] = &[
    "loss/aeloss",
    "loss/total_loss",
    "loss/nll_loss",
    "loss/rec_loss",
    "loss/p_loss",
    "loss/g_loss",
    "loss/d_weight",
    "loss/disc_factor",
    "loss/quant_loss",
    "loss/discloss",
    "loss/disc_loss",
    "loss/logits_real",
    "loss/logits_fake",
];

#[test]
fn vqgan_f4() {
    let mut all = FIRST_STAGE.to_vec();
    all.extend(LOSSES);
    assert_parity("vqgan_f4", &all);
}

#[test]
fn vqgan_f4_64() {
    assert_parity("vqgan_f4_64", FIRST_STAGE);
}

#[test]
fn vqseg_f4() {
    assert_parity(
        "vqseg_f4",
        &["input", "quant", "indices", "decoded", "to_rgb"],
    );
}

#[test]
fn vqseg_f4_64() {
    assert_parity(
        "vqseg_f4_64",
        &["input", "quant", "indices", "decoded", "to_rgb"],
    );
}

#[test]
fn vqgan_gumbel_f8() {
    assert_parity(
        "vqgan_gumbel_f8",
        &[
            "quant_conv_out",
            "gumbel_logits",
            "indices",
            "quant",
            "decoded_from_indices",
        ],
    );
}

const TRANSFORMER: &[&str] = &[
    "z_indices",
    "c_indices",
    "logits",
    "cross_entropy",
    "greedy_indices",
    "greedy_logits",
    "greedy_image",
    "half_indices",
    "half_image",
];

#[test]
fn transformer_seg() {
    assert_parity("transformer_seg", TRANSFORMER);
}

#[test]
fn transformer_uncond() {
    assert_parity("transformer_uncond", TRANSFORMER);
}

#[test]
fn transformer_class() {
    assert_parity("transformer_class", TRANSFORMER);
}

#[test]
fn transformer_sliding() {
    let mut all = TRANSFORMER.to_vec();
    all.extend(["sliding_indices", "sliding_image"]);
    assert_parity("transformer_sliding", &all);
}

/// The four checkpoint forms of vqgan_f4_64 (zip, legacy, protocol 4, float16) give the same
/// indices, and the float32 ones the same decoded image.
#[test]
fn checkpoint_forms_give_the_same_codes() {
    use taming::checkpoint::StateDict;
    use taming::config::{ModelConfig, ProjectConfig};
    let Some(dir) = common::fixture("vqgan_f4_64") else {
        return;
    };
    let config = ProjectConfig::from_files(&[dir.join("config.yaml")], &[]).expect("config");
    let ModelConfig::Vq(cfg) = &config.model else {
        panic!("not a VQ config")
    };
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).expect("io");
    let expected = io["indices"]
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    let mut decoded = Vec::new();
    for file in [
        "model.ckpt",
        "model_legacy.ckpt",
        "model_p4.ckpt",
        "model_fp16.ckpt",
    ] {
        let sd = StateDict::load(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let (model, report) =
            taming::model::load_vq(cfg, &sd, candle_core::DType::F32, &Device::Cpu).expect(file);
        assert!(
            report.unexpected.is_empty(),
            "{file}: {:?}",
            report.unexpected
        );
        let q = model.encode(&io["input"]).expect("encode");
        let got = q
            .indices
            .to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap();
        assert_eq!(got, expected, "{file}: indices differ");
        decoded.push(model.decode(&q.quant).unwrap());
    }
    for (i, d) in decoded.iter().enumerate().take(3).skip(1) {
        let diff = (d - &decoded[0])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "float32 checkpoint form {i} decodes differently");
    }
}
