//! The `taming` binary end to end: exit codes, messages a user can act on, files written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shared(sub: &str) -> Option<PathBuf> {
    let base = match std::env::var_os("TAMING_SHARED") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    };
    let dir = base.join(sub);
    if dir.exists() {
        return Some(dir);
    }
    let reason = format!("{} not found (set TAMING_SHARED)", dir.display());
    if std::env::var_os("CI").is_some() {
        panic!("{reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

fn taming(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_taming"))
        .args(args)
        .output()
        .expect("run taming")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn model_args(dir: &Path) -> Vec<String> {
    vec![
        "--config".into(),
        dir.join("config.yaml").display().to_string(),
        "--ckpt".into(),
        dir.join("model.ckpt").display().to_string(),
    ]
}

fn run(args: Vec<String>) -> Output {
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    taming(&refs)
}

#[test]
fn verify_prints_one_line_per_tensor_and_a_total() {
    let Some(dir) = shared("fixtures/vqgan_f4_64") else {
        return;
    };
    let o = taming(&["verify", dir.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("ok     indices"), "{t}");
    assert!(t.trim_end().ends_with("8 passed, 0 failed"), "{t}");
}

#[test]
fn verify_fails_on_a_fixture_it_cannot_load() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.yaml"),
        "model:\n  target: nowhere.Model\n",
    )
    .unwrap();
    let o = taming(&["verify", tmp.path().to_str().unwrap()]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("nowhere.Model") && t.contains("0 passed, 1 failed"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn reconstruct_rejects_a_size_the_model_cannot_take() {
    let Some(dir) = shared("fixtures/vqgan_f4_64") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("odd.png");
    image::RgbImage::from_pixel(30, 22, image::Rgb([10, 200, 30]))
        .save(&img)
        .unwrap();
    let mut args = vec!["reconstruct".to_string()];
    args.extend(model_args(&dir));
    args.extend([
        img.display().to_string(),
        "-o".into(),
        tmp.path().join("rec.png").display().to_string(),
    ]);
    let o = run(args);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("22x30") && t.contains("factor 4"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(!tmp.path().join("rec.png").exists(), "no output on failure");
}

#[test]
fn encode_then_decode_equals_reconstruct() {
    let Some(dir) = shared("fixtures/vqgan_f4_64") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("in.png");
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    })
    .save(&img)
    .unwrap();
    let p = |n: &str| tmp.path().join(n).display().to_string();
    for (cmd, extra) in [
        (
            "reconstruct",
            vec![img.display().to_string(), "-o".into(), p("rec.png")],
        ),
        (
            "encode",
            vec![img.display().to_string(), "-o".into(), p("codes.json")],
        ),
        ("decode", vec![p("codes.json"), "-o".into(), p("dec.png")]),
        (
            "encode",
            vec![
                img.display().to_string(),
                "-o".into(),
                p("codes.safetensors"),
            ],
        ),
        (
            "decode",
            vec![p("codes.safetensors"), "-o".into(), p("dec2.png")],
        ),
    ] {
        let mut args = vec![cmd.to_string()];
        args.extend(model_args(&dir));
        args.extend(extra);
        let o = run(args);
        assert!(o.status.success(), "{cmd}: {}", text(&o));
        if cmd == "reconstruct" {
            assert!(text(&o).contains("PSNR"), "{}", text(&o));
        }
    }
    // reconstruct decodes the straight-through quantized latent z + (zq - z), decode looks the
    // codes up in the codebook: the same values up to float rounding, so pixels may differ by one level.
    let rec = image::open(p("rec.png")).unwrap().to_rgb8();
    for other in ["dec.png", "dec2.png"] {
        let dec = image::open(p(other)).unwrap().to_rgb8();
        assert_eq!(rec.dimensions(), dec.dimensions());
        let worst = rec
            .as_raw()
            .iter()
            .zip(dec.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= 1, "{other} differs from rec.png by {worst} levels");
    }
    let codes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("codes.json")).unwrap()).unwrap();
    assert_eq!(codes["grid"], serde_json::json!([16, 16]));
}

#[test]
fn sample_is_reproducible_and_writes_pngs() {
    let Some(dir) = shared("fixtures/transformer_class") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for (i, seed) in ["4", "4", "5"].iter().enumerate() {
        let out = tmp.path().join(format!("run{i}"));
        let mut args = vec!["sample".to_string()];
        args.extend(model_args(&dir));
        args.extend(
            [
                "--class", "2", "--seed", seed, "--batch", "2", "--top-k", "40", "--out",
            ]
            .map(String::from),
        );
        args.push(out.display().to_string());
        let o = run(args);
        assert!(o.status.success(), "{}", text(&o));
        assert!(out.join("sample_001.png").exists() && out.join("grid.png").exists());
        outs.push(std::fs::read(out.join("sample_000.png")).unwrap());
    }
    assert_eq!(outs[0], outs[1], "same seed, same image");
    assert_ne!(outs[0], outs[2], "other seed, other image");
}

#[test]
fn sample_errors_name_the_problem() {
    let Some(seg) = shared("fixtures/transformer_seg") else {
        return;
    };
    let Some(class) = shared("fixtures/transformer_class") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let labels = tmp.path().join("labels.png");
    image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x > 20 { 12 } else { 1 }]))
        .save(&labels)
        .unwrap();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            [
                model_args(&seg),
                vec!["--segmentation".into(), labels.display().to_string()],
            ]
            .concat(),
            vec!["labels.png", "label 12", "n_labels = 8"],
        ),
        (
            [model_args(&seg), vec![]].concat(),
            vec!["--segmentation PNG"],
        ),
        (
            [model_args(&class), vec!["--class".into(), "10".into()]].concat(),
            vec!["class id 10", "10 classes"],
        ),
        (
            [
                model_args(&class),
                vec![
                    "--class".into(),
                    "1".into(),
                    "--size".into(),
                    "30x32".into(),
                ],
            ]
            .concat(),
            vec!["30x32", "factor 4"],
        ),
        (
            [
                model_args(&class),
                vec![
                    "--class".into(),
                    "1".into(),
                    "--size".into(),
                    "16x64".into(),
                ],
            ]
            .concat(),
            vec!["sliding window"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec![
            "sample".to_string(),
            "--out".into(),
            tmp.path().join("o").display().to_string(),
        ];
        args.extend(extra);
        let o = run(args);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(!t.contains("panicked"), "{t}");
        for n in needles {
            assert!(t.contains(n), "expected `{n}` in: {t}");
        }
        assert!(!tmp.path().join("o").join("sample_000.png").exists());
    }
}

#[test]
fn convert_and_inspect() {
    let Some(dir) = shared("fixtures/vqgan_f4") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("conv");
    let mut args = vec!["convert".to_string()];
    args.extend(model_args(&dir));
    args.extend([
        "-o".to_string(),
        out.display().to_string(),
        "--inference-only".into(),
    ]);
    let o = run(args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("model.safetensors").exists() && out.join("config.yaml").exists());
    let o = taming(&[
        "inspect",
        "--config",
        out.join("config.yaml").to_str().unwrap(),
        "--ckpt",
        out.join("model.safetensors").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("64 codes of dim 8") && t.contains("0 unread"),
        "{t}"
    );
    assert!(
        !t.contains("loss"),
        "inference-only conversion drops loss.*: {t}"
    );
    // the original: loss.* keys are listed as skipped, not as unread
    let mut args = vec!["inspect".to_string()];
    args.extend(model_args(&dir));
    let t = text(&run(args));
    assert!(
        t.contains("training-only skipped") && t.contains("0 unread"),
        "{t}"
    );
    // --dtype f16 halves the file, and the result still loads
    let half = tmp.path().join("half");
    let mut args = vec!["convert".to_string()];
    args.extend(model_args(&dir));
    args.extend([
        "-o".to_string(),
        half.display().to_string(),
        "--inference-only".into(),
        "--dtype".into(),
        "f16".into(),
    ]);
    let o = run(args);
    assert!(o.status.success(), "{}", text(&o));
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    let (full, small) = (size(&out), size(&half));
    assert!(small * 10 < full * 6, "f16: {small} bytes vs {full}");
    let bytes = std::fs::read(half.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + n]);
    assert!(
        header.contains("\"F16\"") && !header.contains("\"F32\""),
        "{header}"
    );
}

/// A tiny VQGAN run on generated 16x16 images: `taming train` stops on SIGINT (Ctrl-C) after
/// the current step, saves `last` (no temporary file left behind) and exits with 130; `-r`
/// then continues from the saved step to the new limit.
#[cfg(unix)]
#[test]
fn train_ctrl_c_saves_last_and_resume_continues() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut list = String::new();
    for i in 0..6u32 {
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            image::Rgb([(x * 16 + i * 30) as u8, (y * 16) as u8, ((x + y) * 8) as u8])
        });
        let p = dir.path().join(format!("img{i}.png"));
        img.save(&p).unwrap();
        list.push_str(&format!("{}\n", p.display()));
    }
    std::fs::write(dir.path().join("train.txt"), list).unwrap();
    let config = format!(
        "model:
  base_learning_rate: 1.0e-4
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 4
    n_embed: 16
    ddconfig: {{double_z: false, z_channels: 4, resolution: 16, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {{disc_start: 1000, perceptual_weight: 0.0, disc_in_channels: 3, disc_num_layers: 1, disc_ndf: 8}}
data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 2
    train:
      target: taming.data.custom.CustomTrain
      params: {{training_images_list_file: {}, size: 16}}
",
        dir.path().join("train.txt").display()
    );
    let cfg = dir.path().join("tiny.yaml");
    std::fs::write(&cfg, config).unwrap();
    let logs = dir.path().join("logs");
    let child = Command::new(env!("CARGO_BIN_EXE_taming"))
        .args(["train", "-b"])
        .arg(&cfg)
        .args([
            "-n",
            "tiny",
            "--max-steps",
            "100000",
            "--log-every",
            "1",
            "--logdir",
        ])
        .arg(&logs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait for a few steps in the metrics file
    let t0 = Instant::now();
    let run = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no training progress"
        );
        std::thread::sleep(Duration::from_millis(100));
        let Some(run) = std::fs::read_dir(&logs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
        else {
            continue;
        };
        let rows = std::fs::read_to_string(run.path().join("metrics.csv")).unwrap_or_default();
        if rows.lines().count() > 3 {
            break run.path();
        }
    };
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(130), "{msg}");
    assert!(msg.contains("interrupted at step"), "{msg}");
    let last = run.join("checkpoints/last.safetensors");
    assert!(last.exists(), "{msg}");
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "last.safetensors")
        .collect();
    assert!(leftovers.is_empty(), "unexpected files: {leftovers:?}");
    let step: u64 = msg
        .split("interrupted at step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no step in {msg}"));
    assert!(step >= 3, "{msg}");
    // resume: continues at the saved step, two more steps
    let out = Command::new(env!("CARGO_BIN_EXE_taming"))
        .args(["train", "-r"])
        .arg(&run)
        .args(["--max-steps", &(step + 2).to_string()])
        .output()
        .unwrap();
    let msg = text(&out);
    assert!(out.status.success(), "{msg}");
    assert!(msg.contains(&format!("at step {step}")), "{msg}");
    assert!(
        msg.contains(&format!("finished at step {}", step + 2)),
        "{msg}"
    );
}
