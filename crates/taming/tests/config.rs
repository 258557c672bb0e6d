//! Tests of `taming::config`: the reference's released configs and the parity fixtures' configs
//! parse to the expected typed values; merging, overrides, interpolation, warnings and errors
//! behave as OmegaConf and `instantiate_from_config` do.

use std::path::{Path, PathBuf};

use serde_json::json;
use taming::config::{
    find_configs, CondStageConfig, ModelConfig, Net2NetConfig, PermuterConfig, ProjectConfig,
    UnknownIndex, VqKind, VqModelConfig,
};

fn shared_dir() -> PathBuf {
    match std::env::var_os("TAMING_SHARED") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

/// The fixtures folder, or None (with a reason printed) when it is absent outside CI.
fn fixtures_dir() -> Option<PathBuf> {
    let dir = shared_dir().join("fixtures");
    if dir.is_dir() {
        return Some(dir);
    }
    let reason = format!(
        "fixtures folder {} not found (set TAMING_SHARED)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

fn fixture(name: &str) -> Option<ProjectConfig> {
    let dir = fixtures_dir()?;
    let path = dir.join(name).join("config.yaml");
    Some(ProjectConfig::from_files(&[&path], &[]).unwrap_or_else(|e| panic!("{e}")))
}

fn vq(c: &ProjectConfig) -> &VqModelConfig {
    match &c.model {
        ModelConfig::Vq(v) => v,
        other => panic!("expected a VQ model, got {other:?}"),
    }
}

fn transformer(c: &ProjectConfig) -> &Net2NetConfig {
    match &c.model {
        ModelConfig::Transformer(t) => t,
        other => panic!("expected a transformer, got {other:?}"),
    }
}

fn parse(yaml: &str, origin: &str) -> ProjectConfig {
    ProjectConfig::from_yaml_str(yaml, origin).unwrap_or_else(|e| panic!("{e}"))
}

fn err(yaml: &str, origin: &str) -> String {
    match ProjectConfig::from_yaml_str(yaml, origin) {
        Ok(c) => panic!("expected an error, got {:?}", c.model),
        Err(e) => e.to_string(),
    }
}

/// A small VQModel config for the behaviour tests.
const SMALL_VQ: &str = "model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 64
    ddconfig:
      double_z: false
      z_channels: 16
      resolution: 32
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.DummyLoss
";

// ------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------

#[test]
fn every_fixture_config_parses() {
    let Some(dir) = fixtures_dir() else { return };
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path().join("config.yaml");
        if !path.is_file() {
            continue;
        }
        let c = ProjectConfig::from_files(&[&path], &[])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            c.warnings.is_empty(),
            "{}: {:?}",
            path.display(),
            c.warnings
        );
        assert_eq!(c.base_learning_rate, Some(4.5e-6), "{}", path.display());
        // Writing back and reading again gives the same config.
        let again = ProjectConfig::from_yaml_str(&c.to_yaml(), "round trip").unwrap();
        assert_eq!(again.model, c.model, "{}", path.display());
        assert_eq!(again.raw, c.raw, "{}", path.display());
        n += 1;
    }
    assert!(n >= 5, "only {n} fixture configs in {}", dir.display());
}

#[test]
fn fixture_vqgan_f4() {
    let Some(c) = fixture("vqgan_f4") else { return };
    let v = vq(&c);
    assert_eq!(v.kind, VqKind::VqModel);
    assert_eq!((v.n_embed, v.embed_dim), (64, 8));
    assert_eq!(v.ddconfig.ch_mult, vec![1, 2, 2]);
    assert_eq!(v.ddconfig.attn_resolutions, vec![8]);
    assert_eq!(v.ddconfig.downsample_factor(), 4);
    assert!(!v.ddconfig.double_z);
    assert!(v.legacy_beta);
    let loss = v.lossconfig.as_ref().unwrap();
    assert_eq!(
        loss.target,
        "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
    );
    assert_eq!(loss.params["disc_ndf"], json!(16));
    assert_eq!(loss.params["disc_weight"], json!(0.8));
}

#[test]
fn fixture_vqgan_gumbel_f8() {
    let Some(c) = fixture("vqgan_gumbel_f8") else {
        return;
    };
    let v = vq(&c);
    let VqKind::Gumbel {
        kl_weight,
        temperature_scheduler,
    } = &v.kind
    else {
        panic!("{:?}", v.kind)
    };
    assert_eq!(*kl_weight, 1e-8);
    let sched = temperature_scheduler.as_ref().unwrap();
    assert_eq!(
        sched.target,
        "taming.lr_scheduler.LambdaWarmUpCosineScheduler"
    );
    assert_eq!(sched.params["lr_min"], json!(1e-6));
    assert_eq!(v.ddconfig.downsample_factor(), 8);
    assert_eq!((v.n_embed, v.embed_dim), (128, 16));
}

#[test]
fn fixture_vqseg_f4() {
    let Some(c) = fixture("vqseg_f4") else { return };
    let v = vq(&c);
    assert_eq!(v.kind, VqKind::Segmentation { n_labels: 8 });
    assert_eq!(v.image_key, "segmentation");
    assert_eq!(v.ddconfig.in_channels, 8);
    assert_eq!(v.ddconfig.out_ch, 8);
}

#[test]
fn fixture_transformer_seg() {
    let Some(c) = fixture("transformer_seg") else {
        return;
    };
    let t = transformer(&c);
    assert_eq!(t.transformer.block_size, 128);
    assert_eq!(t.transformer.vocab_size, 64);
    assert_eq!(
        (
            t.transformer.n_layer,
            t.transformer.n_head,
            t.transformer.n_embd
        ),
        (2, 4, 64)
    );
    // GPT defaults of the reference's mingpt.GPT.__init__.
    assert_eq!(t.transformer.embd_pdrop, 0.0);
    assert_eq!(t.transformer.resid_pdrop, 0.0);
    assert_eq!(t.transformer.attn_pdrop, 0.0);
    assert_eq!(t.transformer.n_unmasked, 0);
    let CondStageConfig::Vq(cond) = &t.cond_stage else {
        panic!("{:?}", t.cond_stage)
    };
    assert_eq!(cond.kind, VqKind::Segmentation { n_labels: 8 });
    assert_eq!(cond.image_key, "segmentation");
    assert_eq!(t.cond_stage_key, "segmentation");
    assert_eq!(t.first_stage_key, "image");
    assert_eq!(t.first_stage.kind, VqKind::VqModel);
    assert_eq!(t.permuter, PermuterConfig::Identity);
    assert_eq!((t.pkeep, t.sos_token, t.downsample_cond_size), (1.0, 0, -1));
    assert!(!t.unconditional);
}

#[test]
fn fixture_transformer_uncond() {
    let Some(c) = fixture("transformer_uncond") else {
        return;
    };
    let t = transformer(&c);
    assert_eq!(t.cond_stage, CondStageConfig::Unconditional);
    assert_eq!(t.sos_token, 5);
    assert!(t.unconditional);
    assert_eq!(t.cond_stage_key, t.first_stage_key);
}

#[test]
fn fixture_transformer_class() {
    let Some(c) = fixture("transformer_class") else {
        return;
    };
    let t = transformer(&c);
    assert_eq!(t.cond_stage, CondStageConfig::Labelator { n_classes: 10 });
    assert_eq!(t.cond_stage_key, "class_label");
    assert_eq!(t.transformer.block_size, 80);
}

#[test]
fn fixture_transformer_sliding() {
    let Some(c) = fixture("transformer_sliding") else {
        return;
    };
    let t = transformer(&c);
    assert_eq!(t.transformer.block_size, 512);
    assert_eq!(t.first_stage.ddconfig.resolution, 64);
    assert!(t.first_stage.ddconfig.attn_resolutions.is_empty());
    let CondStageConfig::Vq(cond) = &t.cond_stage else {
        panic!("{:?}", t.cond_stage)
    };
    assert_eq!(cond.kind, VqKind::Segmentation { n_labels: 5 });
}

// ------------------------------------------------------------------------------------------
// The reference's released configs (copied: the reference is not available in CI)
// ------------------------------------------------------------------------------------------

#[test]
fn reference_faceshq_transformer() {
    let c = parse(FACESHQ_TRANSFORMER, "faceshq_transformer.yaml");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let t = transformer(&c);
    assert_eq!(
        t.cond_stage,
        CondStageConfig::Coord {
            n_embed: 1024,
            down_factor: 16
        }
    );
    assert_eq!(t.cond_stage_key, "coord");
    assert_eq!(
        (
            t.transformer.n_layer,
            t.transformer.n_head,
            t.transformer.n_embd
        ),
        (24, 16, 1024)
    );
    assert_eq!(
        t.first_stage.ckpt_path.as_deref(),
        Some("logs/2020-11-09T13-33-36_faceshq_vqgan/checkpoints/last.ckpt")
    );
    assert_eq!(t.first_stage.ddconfig.downsample_factor(), 16);
    assert_eq!(
        c.raw["data"]["params"]["train"]["params"]["coord"],
        json!(true)
    );
    assert_eq!(c.raw["data"]["params"]["batch_size"], json!(2));
}

#[test]
fn reference_sflckr_cond_stage() {
    let c = parse(SFLCKR_COND_STAGE, "sflckr_cond_stage.yaml");
    let v = vq(&c);
    assert_eq!(v.kind, VqKind::Segmentation { n_labels: 182 });
    assert_eq!(v.image_key, "segmentation");
    assert_eq!(v.ddconfig.in_channels, 182);
    assert_eq!(
        v.lossconfig.as_ref().unwrap().target,
        "taming.modules.losses.segmentation.BCELossWithQuant"
    );
}

#[test]
fn reference_drin_transformer() {
    let c = parse(DRIN_TRANSFORMER, "drin_transformer.yaml");
    let t = transformer(&c);
    assert_eq!(t.cond_stage_key, "depth");
    let CondStageConfig::Vq(depth) = &t.cond_stage else {
        panic!("{:?}", t.cond_stage)
    };
    assert_eq!(depth.kind, VqKind::VqModel);
    assert_eq!((depth.ddconfig.in_channels, depth.ddconfig.out_ch), (1, 1));
    assert_eq!(
        depth.ckpt_path.as_deref(),
        Some("logs/2020-11-03T15-34-24_imagenetdepth_vqgan/checkpoints/last.ckpt")
    );
}

#[test]
fn reference_imagenet_vqgan() {
    let c = parse(IMAGENET_VQGAN, "imagenet_vqgan.yaml");
    assert_eq!(c.base_learning_rate, Some(4.5e-6));
    let v = vq(&c);
    assert_eq!(v.ddconfig.ch_mult, vec![1, 1, 2, 2, 4]);
    assert_eq!(v.ddconfig.attn_resolutions, vec![16]);
    assert!(!v.ddconfig.double_z);
    assert_eq!((v.n_embed, v.embed_dim), (1024, 256));
    assert_eq!(
        v.lossconfig.as_ref().unwrap().params["disc_start"],
        json!(250001)
    );
    assert_eq!(
        c.raw["data"]["params"]["train"]["params"]["config"]["size"],
        json!(256)
    );
}

#[test]
fn reference_coco_scene_images_transformer_is_a_clear_error() {
    let e = err(
        COCO_SCENE_IMAGES_TRANSFORMER,
        "coco_scene_images_transformer.yaml",
    );
    assert!(e.contains("coco_scene_images_transformer.yaml"), "{e}");
    assert!(e.contains("model.params.cond_stage_config.target"), "{e}");
    assert!(
        e.contains("taming.models.dummy_cond_stage.DummyCondStage"),
        "{e}"
    );
    assert!(
        e.contains("taming.modules.util.Labelator") && e.contains("__is_unconditional__"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------
// OmegaConf behaviour
// ------------------------------------------------------------------------------------------

#[test]
fn merging_files_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(&a, SMALL_VQ).unwrap();
    std::fs::write(
        &b,
        "model:\n  params:\n    embed_dim: 16\n    ddconfig:\n      ch_mult: [1, 1, 2, 2]\ndata:\n  params:\n    batch_size: 3\n",
    )
    .unwrap();
    let c = ProjectConfig::from_files(&[&a, &b], &[]).unwrap();
    let v = vq(&c);
    assert_eq!(v.embed_dim, 16);
    assert_eq!(v.n_embed, 64);
    assert_eq!(v.ddconfig.ch_mult, vec![1, 1, 2, 2]);
    assert_eq!(v.ddconfig.ch, 32);
    assert_eq!(c.raw["data"]["params"]["batch_size"], json!(3));

    let overrides = vec![
        "model.params.n_embed=32".to_string(),
        "model.base_learning_rate=1.5e-6".to_string(),
        "model.params.ddconfig.ch_mult.0=2".to_string(),
        "model.params.ddconfig.attn_resolutions=[4,8]".to_string(),
        "model.params.remap=used.npy".to_string(),
        "model.params.unknown_index=extra".to_string(),
        "model.params.colorize_nlabels=null".to_string(),
        "lightning.trainer.max_epochs=3".to_string(),
    ];
    let c = ProjectConfig::from_files(&[&a, &b], &overrides).unwrap();
    let v = vq(&c);
    assert_eq!(v.n_embed, 32);
    assert_eq!(c.base_learning_rate, Some(1.5e-6));
    assert_eq!(v.ddconfig.ch_mult, vec![2, 1, 2, 2]);
    assert_eq!(v.ddconfig.attn_resolutions, vec![4, 8]);
    assert_eq!(v.remap.as_deref(), Some("used.npy"));
    assert_eq!(v.unknown_index, UnknownIndex::Extra);
    assert_eq!(v.colorize_nlabels, None);
    assert_eq!(c.raw["lightning"]["trainer"]["max_epochs"], json!(3));

    // A type error from an override names the override.
    let e = ProjectConfig::from_files(&[&a], &["model.params.n_embed=many".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.params.n_embed") && e.contains("override"),
        "{e}"
    );
    let e = ProjectConfig::from_files(&[&a], &["model.params.n_embed".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("key=value"), "{e}");
    // A missing key names the file that holds the block.
    std::fs::write(&b, "model:\n  params:\n    n_embed: null\n").unwrap();
    let e = ProjectConfig::from_files(&[&a, &b], &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("b.yaml") && e.contains("model.params.n_embed"),
        "{e}"
    );
}

#[test]
fn interpolation() {
    let yaml = SMALL_VQ.replace("embed_dim: 8", "embed_dim: ${model.params.ddconfig.z_channels}")
        .replace("in_channels: 3", "in_channels: ${.out_ch}")
        + "data:\n  params:\n    size: ${model.params.ddconfig.resolution}\n    name: \"run_${data.params.size}px\"\n";
    let c = parse(&yaml, "interp.yaml");
    let v = vq(&c);
    assert_eq!(v.embed_dim, 16);
    assert_eq!(v.ddconfig.in_channels, 3);
    assert_eq!(c.raw["data"]["params"]["size"], json!(32));
    assert_eq!(c.raw["data"]["params"]["name"], json!("run_32px"));
    assert!(c.to_yaml().contains("embed_dim: 16"));

    let missing = SMALL_VQ.replace("embed_dim: 8", "embed_dim: ${model.params.nothing}");
    let e = err(&missing, "missing.yaml");
    assert!(
        e.contains("missing.yaml")
            && e.contains("model.params.embed_dim")
            && e.contains("${model.params.nothing}"),
        "{e}"
    );

    let cycle = SMALL_VQ
        .replace("embed_dim: 8", "embed_dim: ${model.params.n_embed}")
        .replace("n_embed: 64", "n_embed: ${model.params.embed_dim}");
    let e = err(&cycle, "cycle.yaml");
    assert!(e.contains("cycle.yaml") && e.contains("cycle"), "{e}");
    assert!(
        e.contains("model.params.embed_dim -> model.params.n_embed -> model.params.embed_dim"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_warnings_with_the_key_path() {
    let yaml = SMALL_VQ
        .replace("dropout: 0.0", "dropout: 0.0\n      foo: 1")
        .replace("embed_dim: 8", "embed_dim: 8\n    n_labels: 3\n    bar: x")
        + "extra_section: 1\n";
    let c = parse(&yaml, "warn.yaml");
    assert!(
        c.warnings
            .contains(&"model.params.ddconfig.foo: unknown key, ignored".to_string()),
        "{:?}",
        c.warnings
    );
    assert!(
        c.warnings
            .contains(&"model.params.bar: unknown key, ignored".to_string()),
        "{:?}",
        c.warnings
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with("model.params.n_labels:")
                && w.contains("taming.models.vqgan.VQModel")),
        "{:?}",
        c.warnings
    );
    assert!(
        c.warnings.iter().any(|w| w.starts_with("extra_section:")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn unknown_target_is_an_error_naming_it() {
    let yaml = SMALL_VQ.replace(
        "taming.models.vqgan.VQModel",
        "taming.models.vqgan.VQModelX",
    );
    let e = err(&yaml, "target.yaml");
    assert!(
        e.contains("target.yaml") && e.contains("model.target"),
        "{e}"
    );
    assert!(e.contains("`taming.models.vqgan.VQModelX`"), "{e}");
    assert!(
        e.contains("taming.models.vqgan.GumbelVQ")
            && e.contains("taming.models.cond_transformer.Net2NetTransformer"),
        "{e}"
    );
    let e = err("model:\n  params: {}\n", "notarget.yaml");
    assert!(e.contains("model") && e.contains("`target`"), "{e}");
    let e = err("data: {}\n", "nomodel.yaml");
    assert!(e.contains("`model`"), "{e}");
}

#[test]
fn malformed_yaml_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.yaml");
    std::fs::write(&bad, "model:\n  target: [unclosed\n  params: 1\n").unwrap();
    let e = ProjectConfig::from_files(&[&bad], &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("broken.yaml") && e.contains("malformed YAML"),
        "{e}"
    );
    let e = ProjectConfig::from_files(&[dir.path().join("absent.yaml")], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.yaml"), "{e}");
    let e = err("- just\n- a list\n", "list.yaml");
    assert!(e.contains("list.yaml") && e.contains("mapping"), "{e}");
}

#[test]
fn transformer_options() {
    let yaml = FACESHQ_TRANSFORMER
        .replace("cond_stage_key: coord", "cond_stage_key: coord\n    pkeep: 0.5\n    downsample_cond_size: 8\n    permuter_config:\n      target: taming.modules.transformer.permuter.ZCurve\n      params: {H: 16, W: 16}");
    let t = transformer(&parse(&yaml, "opts.yaml")).clone();
    assert_eq!(t.permuter, PermuterConfig::ZCurve { h: 16, w: 16 });
    assert_eq!((t.pkeep, t.downsample_cond_size), (0.5, 8));

    let spiral = yaml.replace("ZCurve", "SpiralOut").replace("W: 16", "W: 8");
    let e = err(&spiral, "spiral.yaml");
    assert!(
        e.contains("model.params.permuter_config.params") && e.contains("H == W"),
        "{e}"
    );

    let first = FACESHQ_TRANSFORMER.replace(
        "    cond_stage_config:\n      target: taming.modules.misc.coord.CoordStage\n      params:\n        n_embed: 1024\n        down_factor: 16\n",
        "    cond_stage_config: __is_first_stage__\n",
    );
    assert_eq!(
        transformer(&parse(&first, "first.yaml")).cond_stage,
        CondStageConfig::FirstStage
    );

    let uncond = FACESHQ_TRANSFORMER.replace(
        "cond_stage_key: coord",
        "cond_stage_key: coord\n    unconditional: true\n    sos_token: 3",
    );
    let c = parse(&uncond, "uncond.yaml");
    let t = transformer(&c);
    assert_eq!(t.cond_stage, CondStageConfig::Unconditional);
    assert_eq!((t.sos_token, t.cond_stage_key.as_str()), (3, "image"));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with("model.params.cond_stage_config:")),
        "{:?}",
        c.warnings
    );

    let sos = FACESHQ_TRANSFORMER
        .replace(
            "taming.modules.misc.coord.CoordStage",
            "taming.modules.util.SOSProvider",
        )
        .replace(
            "        n_embed: 1024\n        down_factor: 16\n",
            "        sos_token: 7\n",
        );
    assert_eq!(
        transformer(&parse(&sos, "sos.yaml")).cond_stage,
        CondStageConfig::Sos { sos_token: 7 }
    );

    let heads = FACESHQ_TRANSFORMER.replace("n_head: 16", "n_head: 10");
    let e = err(&heads, "heads.yaml");
    assert!(
        e.contains("model.params.transformer_config.params.n_embd") && e.contains("n_head"),
        "{e}"
    );

    let defaults = FACESHQ_TRANSFORMER
        .replace(
            "        n_layer: 24\n        n_head: 16\n        n_embd: 1024\n",
            "",
        )
        .replace("    cond_stage_key: coord\n", "");
    let t = transformer(&parse(&defaults, "defaults.yaml")).clone();
    assert_eq!(
        (
            t.transformer.n_layer,
            t.transformer.n_head,
            t.transformer.n_embd
        ),
        (12, 8, 256)
    );
    assert_eq!(t.cond_stage_key, "depth");
}

#[test]
fn find_configs_in_a_log_dir() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir
        .path()
        .join("logs")
        .join("2020-11-09T13-33-36_faceshq_transformer");
    std::fs::create_dir_all(run.join("configs")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    let e = find_configs(&run).unwrap_err().to_string();
    assert!(e.contains("last.ckpt"), "{e}");
    std::fs::write(run.join("checkpoints/last.ckpt"), b"").unwrap();
    std::fs::write(run.join("checkpoints/epoch=3.ckpt"), b"").unwrap();
    let e = find_configs(&run).unwrap_err().to_string();
    assert!(e.contains("project"), "{e}");
    for name in [
        "2020-11-10T01-00-00-project.yaml",
        "2020-11-09T13-33-36-project.yaml",
        "2020-11-09T13-33-36-lightning.yaml",
    ] {
        std::fs::write(run.join("configs").join(name), SMALL_VQ).unwrap();
    }
    let (configs, ckpt) = find_configs(&run).unwrap();
    let names: Vec<String> = configs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "2020-11-09T13-33-36-project.yaml",
            "2020-11-10T01-00-00-project.yaml"
        ]
    );
    assert_eq!(ckpt, run.join("checkpoints/last.ckpt"));
    let (configs2, ckpt) = find_configs(&run.join("checkpoints/epoch=3.ckpt")).unwrap();
    assert_eq!(configs2, configs);
    assert_eq!(ckpt, run.join("checkpoints/epoch=3.ckpt"));
    assert!(ProjectConfig::from_files(&configs, &[]).is_ok());
    assert!(find_configs(&dir.path().join("nope")).is_err());
}

/// `configs/faceshq_transformer.yaml` of the reference.
const FACESHQ_TRANSFORMER: &str = r#"model:
  base_learning_rate: 4.5e-06
  target: taming.models.cond_transformer.Net2NetTransformer
  params:
    cond_stage_key: coord
    transformer_config:
      target: taming.modules.transformer.mingpt.GPT
      params:
        vocab_size: 1024
        block_size: 512
        n_layer: 24
        n_head: 16
        n_embd: 1024
    first_stage_config:
      target: taming.models.vqgan.VQModel
      params:
        ckpt_path: logs/2020-11-09T13-33-36_faceshq_vqgan/checkpoints/last.ckpt
        embed_dim: 256
        n_embed: 1024
        ddconfig:
          double_z: false
          z_channels: 256
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 1
          - 2
          - 2
          - 4
          num_res_blocks: 2
          attn_resolutions:
          - 16
          dropout: 0.0
        lossconfig:
          target: taming.modules.losses.DummyLoss
    cond_stage_config:
      target: taming.modules.misc.coord.CoordStage
      params:
        n_embed: 1024
        down_factor: 16

data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 2
    num_workers: 8
    train:
      target: taming.data.faceshq.FacesHQTrain
      params:
        size: 256
        crop_size: 256
        coord: True
    validation:
      target: taming.data.faceshq.FacesHQValidation
      params:
        size: 256
        crop_size: 256
        coord: True
"#;

/// `configs/sflckr_cond_stage.yaml` of the reference.
const SFLCKR_COND_STAGE: &str = r#"model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQSegmentationModel
  params:
    embed_dim: 256
    n_embed: 1024
    image_key: "segmentation"
    n_labels: 182
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 182
      out_ch: 182
      ch: 128
      ch_mult:
      - 1
      - 1
      - 2
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions:
      - 16
      dropout: 0.0

    lossconfig:
      target: taming.modules.losses.segmentation.BCELossWithQuant
      params:
        codebook_weight: 1.0

data:
  target: cutlit.DataModuleFromConfig
  params:
    batch_size: 12
    train:
      target: taming.data.sflckr.Examples # adjust
      params:
        size: 256
    validation:
      target: taming.data.sflckr.Examples # adjust
      params:
        size: 256
"#;

/// `configs/drin_transformer.yaml` of the reference.
const DRIN_TRANSFORMER: &str = r#"model:
  base_learning_rate: 4.5e-06
  target: taming.models.cond_transformer.Net2NetTransformer
  params:
    cond_stage_key: depth
    transformer_config:
      target: taming.modules.transformer.mingpt.GPT
      params:
        vocab_size: 1024
        block_size: 512
        n_layer: 24
        n_head: 16
        n_embd: 1024
    first_stage_config:
      target: taming.models.vqgan.VQModel
      params:
        ckpt_path: logs/2020-09-23T17-56-33_imagenet_vqgan/checkpoints/last.ckpt
        embed_dim: 256
        n_embed: 1024
        ddconfig:
          double_z: false
          z_channels: 256
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 1
          - 2
          - 2
          - 4
          num_res_blocks: 2
          attn_resolutions:
          - 16
          dropout: 0.0
        lossconfig:
          target: taming.modules.losses.DummyLoss
    cond_stage_config:
      target: taming.models.vqgan.VQModel
      params:
        ckpt_path: logs/2020-11-03T15-34-24_imagenetdepth_vqgan/checkpoints/last.ckpt
        embed_dim: 256
        n_embed: 1024
        ddconfig:
          double_z: false
          z_channels: 256
          resolution: 256
          in_channels: 1
          out_ch: 1
          ch: 128
          ch_mult:
          - 1
          - 1
          - 2
          - 2
          - 4
          num_res_blocks: 2
          attn_resolutions:
          - 16
          dropout: 0.0
        lossconfig:
          target: taming.modules.losses.DummyLoss

data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 2
    num_workers: 8
    train:
      target: taming.data.imagenet.RINTrainWithDepth
      params:
        size: 256
    validation:
      target: taming.data.imagenet.RINValidationWithDepth
      params:
        size: 256
"#;

/// `configs/imagenet_vqgan.yaml` of the reference.
const IMAGENET_VQGAN: &str = r#"model:
  base_learning_rate: 4.5e-6
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 1024
    ddconfig:
      double_z: False
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [ 1,1,2,2,4]  # num_down = len(ch_mult)-1
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0

    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: False
        disc_in_channels: 3
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0

data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 12
    num_workers: 24
    train:
      target: taming.data.imagenet.ImageNetTrain
      params:
        config:
          size: 256
    validation:
      target: taming.data.imagenet.ImageNetValidation
      params:
        config:
          size: 256
"#;

/// `configs/coco_scene_images_transformer.yaml` of the reference.
const COCO_SCENE_IMAGES_TRANSFORMER: &str = r#"model:
  base_learning_rate: 4.5e-06
  target: taming.models.cond_transformer.Net2NetTransformer
  params:
    cond_stage_key: objects_bbox
    transformer_config:
      target: taming.modules.transformer.mingpt.GPT
      params:
        vocab_size: 8192
        block_size: 348  # = 256 + 92 = dim(vqgan_latent_space,16x16) + dim(conditional_builder.embedding_dim)
        n_layer: 40
        n_head: 16
        n_embd: 1408
        embd_pdrop: 0.1
        resid_pdrop: 0.1
        attn_pdrop: 0.1
    first_stage_config:
      target: taming.models.vqgan.VQModel
      params:
        ckpt_path: /path/to/coco_epoch117.ckpt  # https://heibox.uni-heidelberg.de/f/78dea9589974474c97c1/
        embed_dim: 256
        n_embed: 8192
        ddconfig:
          double_z: false
          z_channels: 256
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 1
          - 2
          - 2
          - 4
          num_res_blocks: 2
          attn_resolutions:
          - 16
          dropout: 0.0
        lossconfig:
          target: taming.modules.losses.DummyLoss
    cond_stage_config:
      target: taming.models.dummy_cond_stage.DummyCondStage
      params:
        conditional_key: objects_bbox

data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 6
    train:
      target: taming.data.annotated_objects_coco.AnnotatedObjectsCoco
      params:
        data_path: data/coco_annotations_100  # substitute with path to full dataset
        split: train
        keys: [image, objects_bbox, file_name, annotations]
        no_tokens: 8192
        target_image_size: 256
        min_object_area: 0.00001
        min_objects_per_image: 2
        max_objects_per_image: 30
        crop_method: random-1d
        random_flip: true
        use_group_parameter: true
        encode_crop: true
    validation:
      target: taming.data.annotated_objects_coco.AnnotatedObjectsCoco
      params:
        data_path: data/coco_annotations_100  # substitute with path to full dataset
        split: validation
        keys: [image, objects_bbox, file_name, annotations]
        no_tokens: 8192
        target_image_size: 256
        min_object_area: 0.00001
        min_objects_per_image: 2
        max_objects_per_image: 30
        crop_method: center
        random_flip: false
        use_group_parameter: true
        encode_crop: true
"#;
