//! `taming`: the command-line interface of taming-rs.
//!
//! Subcommands mirror what the reference's scripts do (reconstruct, encode, decode with a trained
//! first stage) plus tools the reference lacks: `inspect`, `convert`, `verify` and `bench`.

mod bench;
mod bench_train;
mod common;
mod first_stage_cmds;
mod inspect;
mod plot_cmd;
mod sample_cmd;
mod scenes_cmd;
mod serve_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "taming",
    version,
    about = "Taming Transformers (VQGAN + transformer) in Rust"
)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Encode and decode an image with a first-stage model; writes the reconstruction and prints PSNR.
    Reconstruct(first_stage_cmds::ReconstructArgs),
    /// Encode an image to codebook indices (safetensors or JSON).
    Encode(first_stage_cmds::EncodeArgs),
    /// Decode codebook indices (from `taming encode`) to a PNG.
    Decode(first_stage_cmds::DecodeArgs),
    /// Show what a config and checkpoint hold: model kind, parameter counts, codebook, unused keys.
    Inspect(inspect::InspectArgs),
    /// Write a checkpoint's weights as safetensors, with its merged config beside it.
    Convert(inspect::ConvertArgs),
    /// Check parity with reference fixtures (DIR/config.yaml, DIR/model.ckpt, DIR/io.safetensors).
    Verify(inspect::VerifyArgs),
    /// Sample images from a transformer model (label-to-image, depth-to-image, class-conditional,
    /// unconditional, super-resolution, image completion; larger sizes with a sliding window).
    Sample(sample_cmd::SampleArgs),
    /// Interactive web demo: paint a label map, sample and watch the image build up.
    Serve(serve_cmd::ServeArgs),
    /// Train a first stage or a transformer from a config (the reference's `main.py --train`).
    Train(train_cmd::TrainArgs),
    /// Write procedural outdoor scenes (picture, label map, depth map) as a dataset folder.
    Scenes(scenes_cmd::ScenesArgs),
    /// Draw a run's metrics.csv as loss curves (PNG).
    Plot(plot_cmd::PlotArgs),
    /// Benchmarks, printing JSON lines.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

/// Fixes the thread count once. Without `RAYON_NUM_THREADS`, candle 0.11 counts the physical
/// cores by reading /proc/cpuinfo on every call of `get_num_threads`, i.e. in every matrix
/// product and parallel op: about 3 % of a VQGAN training step. Runs before any thread exists.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Training runs candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1` unless
/// set). candle 0.11 runs them on a pool of its own whose threads spin for up to 25,000 rounds
/// after each op, on the cores where the rayon pool runs the convolutions; a training step holds
/// hundreds of such ops (the gradient sums of backprop). Measured on 2 cores, VQGAN training step,
/// 5 alternating runs: median 0.636 -> 0.607 s, spread 0.63-0.72 -> 0.58-0.62 s. Sampling and
/// first-stage inference were 2-6 % slower with it, so they keep candle's pool. Runs before any
/// thread exists.
fn single_thread_elementwise_for_training(cmd: &Cmd) {
    let training = matches!(cmd, Cmd::Train(_) | Cmd::Bench(bench::BenchCmd::Train(_)));
    if training && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> std::process::ExitCode {
    pin_thread_count();
    taming::tune_allocator();
    let cli = Cli::parse();
    single_thread_elementwise_for_training(&cli.cmd);
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let result = match cli.cmd {
        Cmd::Reconstruct(a) => first_stage_cmds::reconstruct(a),
        Cmd::Encode(a) => first_stage_cmds::encode(a),
        Cmd::Decode(a) => first_stage_cmds::decode(a),
        Cmd::Inspect(a) => inspect::inspect(a),
        Cmd::Convert(a) => inspect::convert(a),
        Cmd::Verify(a) => inspect::verify(a),
        Cmd::Sample(a) => sample_cmd::sample(a),
        Cmd::Serve(a) => serve_cmd::serve(a),
        Cmd::Train(a) => train_cmd::train(a),
        Cmd::Plot(a) => plot_cmd::plot(a),
        Cmd::Scenes(a) => scenes_cmd::scenes(a),
        Cmd::Bench(b) => bench::run(b),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
