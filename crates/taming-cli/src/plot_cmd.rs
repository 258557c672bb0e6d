//! `taming plot LOGDIR`: draws a run's `metrics.csv` as loss curves in a PNG (one panel per
//! metric group: training losses, validation, codebook usage, speed).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use plotters::prelude::*;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A run directory (`logs/<run>`) or its metrics.csv.
    pub logdir: PathBuf,
    /// Output PNG (default LOGDIR/metrics.png).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// Only these columns (repeatable); default: every column except step/epoch.
    #[arg(long = "metric")]
    pub metrics: Vec<String>,
}

const FONT: &str = "sans-serif";

fn register_font() -> anyhow::Result<()> {
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("cannot load the embedded DejaVu Sans font"))
}

pub fn plot(a: PlotArgs) -> anyhow::Result<std::process::ExitCode> {
    let csv = if a.logdir.is_dir() {
        a.logdir.join("metrics.csv")
    } else {
        a.logdir.clone()
    };
    let (header, rows) = taming::train::run::read_metrics(&csv)?;
    if rows.is_empty() {
        bail!("{}: no rows yet", csv.display());
    }
    let step_col = header
        .iter()
        .position(|h| h == "step")
        .context("metrics.csv has no `step` column")?;
    let mut cols: Vec<usize> = (0..header.len())
        .filter(|&i| i != step_col && header[i] != "epoch")
        .filter(|&i| a.metrics.is_empty() || a.metrics.contains(&header[i]))
        .filter(|&i| rows.iter().any(|r| r[i].is_finite()))
        .collect();
    for m in &a.metrics {
        if !header.contains(m) {
            bail!(
                "{}: no column `{m}` (columns: {})",
                csv.display(),
                header.join(", ")
            );
        }
    }
    cols.sort_by_key(|&i| group_of(&header[i]));
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for i in cols {
        let g = group_name(&header[i]);
        match groups.iter_mut().find(|(n, _)| *n == g) {
            Some((_, v)) => v.push(i),
            None => groups.push((g, vec![i])),
        }
    }
    if groups.is_empty() {
        bail!("{}: nothing to plot", csv.display());
    }
    let out = a.out.unwrap_or_else(|| csv.with_file_name("metrics.png"));
    register_font()?;
    let panels = groups.len() as u32;
    let (w, h) = (1000u32, 320 * panels);
    let tmp = tempfile::Builder::new()
        .suffix(".png")
        .tempfile_in(
            out.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new(".")),
        )
        .with_context(|| format!("cannot write next to {}", out.display()))?;
    {
        let root = BitMapBackend::new(tmp.path(), (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((groups.len(), 1));
        for ((title, cols), area) in groups.iter().zip(areas.iter()) {
            draw_panel(area, title, cols, &header, &rows, step_col)?;
        }
        root.present()?;
    }
    // a temporary file is private (0600); the plot is an ordinary output file
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    tmp.persist(&out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(std::process::ExitCode::SUCCESS)
}

fn group_of(name: &str) -> u8 {
    if name.starts_with("val/") {
        1
    } else if name.contains("perplexity") || name.contains("codes_used") {
        2
    } else if name == "lr"
        || name == "images_per_s"
        || name == "grad_norm"
        || name.contains("d_weight")
        || name.contains("disc_factor")
    {
        3
    } else {
        0
    }
}

fn group_name(name: &str) -> String {
    match group_of(name) {
        0 => "training losses".into(),
        1 => "validation".into(),
        2 => "codebook usage".into(),
        _ => "schedule and speed".into(),
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(
    area: &Area,
    title: &str,
    cols: &[usize],
    header: &[String],
    rows: &[Vec<f64>],
    step_col: usize,
) -> anyhow::Result<()> {
    let pts = |c: usize| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r[c].is_finite())
            .map(|r| (r[step_col], r[c]))
            .collect()
    };
    let all: Vec<(f64, f64)> = cols.iter().flat_map(|&c| pts(c)).collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style((FONT, 12))
        .draw()?;
    for (k, &c) in cols.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(pts(c), color.stroke_width(2)))?
            .label(header[c].clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
