//! A training run on disk: `logs/<timestamp>_<name>/` with `configs/`, `checkpoints/`, `images/`
//! and `metrics.csv`, as the reference's `main.py` lays out its log directories.
//!
//! Checkpoints are safetensors files holding the model's state dict under the reference's keys
//! (so `taming sample -r LOGDIR` and every other command load them like a converted reference
//! checkpoint), the optimizers' moments under `optimizer_states.<i>.` and the training position
//! (`global_step`, `epoch`, `batch_in_epoch`, `seed`) as metadata. They are written atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::checkpoint::StateDict;
use crate::{Error, Result};

/// Where a run is in its schedule; saved in every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainState {
    /// Optimizer steps done (the reference's `global_step`).
    pub global_step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Batches of the current epoch already consumed.
    pub batch_in_epoch: u64,
    /// The run's seed (data order, initialisation, noise).
    pub seed: u64,
}

impl TrainState {
    fn to_metadata(self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), "taming-rs training checkpoint 1".into());
        m.insert("global_step".into(), self.global_step.to_string());
        m.insert("epoch".into(), self.epoch.to_string());
        m.insert("batch_in_epoch".into(), self.batch_in_epoch.to_string());
        m.insert("seed".into(), self.seed.to_string());
        m
    }

    fn from_metadata(path: &Path, m: &BTreeMap<String, String>) -> Result<Self> {
        let get = |k: &str| -> Result<u64> {
            let v = m.get(k).ok_or_else(|| Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("not a taming-rs training checkpoint: metadata `{k}` missing (resume needs one written by `taming train`)"),
            })?;
            v.parse().map_err(|_| Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("metadata `{k}` = {v:?} is not a whole number"),
            })
        };
        Ok(Self {
            global_step: get("global_step")?,
            epoch: get("epoch")?,
            batch_in_epoch: get("batch_in_epoch")?,
            seed: get("seed")?,
        })
    }
}

/// Prefix of optimizer `i`'s tensors in a training checkpoint.
pub fn optimizer_prefix(i: usize) -> String {
    format!("optimizer_states.{i}.")
}

/// Writes a training checkpoint atomically: `tensors` (model state dict and optimizer state) plus
/// the training position as metadata.
pub fn save_checkpoint(
    path: &Path,
    tensors: BTreeMap<String, Tensor>,
    state: TrainState,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // detach from any graph and bring to the CPU for writing
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.detach().to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    StateDict::from_tensors(tensors, path)
        .with_metadata(state.to_metadata())
        .save_safetensors(path)
}

/// Reads a training checkpoint: its tensors and training position.
pub fn load_checkpoint(path: &Path) -> Result<(StateDict, TrainState)> {
    let sd = StateDict::load(path)?;
    let state = TrainState::from_metadata(path, sd.metadata())?;
    Ok((sd, state))
}

/// The folders and files of one run.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    /// Creates `logs_root/<timestamp>_<name>/` (the reference's naming: `%Y-%m-%dT%H-%M-%S`) with
    /// its sub-folders, and writes the merged config to `configs/<timestamp>-project.yaml`.
    pub fn create(logs_root: &Path, name: &str, config_yaml: &str) -> Result<Self> {
        let stamp = timestamp();
        let dir_name = if name.is_empty() {
            stamp.clone()
        } else {
            format!("{stamp}_{name}")
        };
        let root = logs_root.join(dir_name);
        if root.exists() {
            return Err(Error::invalid(format!(
                "run directory {} already exists",
                root.display()
            )));
        }
        let run = Self { root };
        for d in [run.configs_dir(), run.checkpoints_dir(), run.images_dir()] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        crate::image_io::write_atomic(
            &run.configs_dir().join(format!("{stamp}-project.yaml")),
            config_yaml.as_bytes(),
        )?;
        Ok(run)
    }

    /// An existing run (for `-r`): must hold `configs/` and `checkpoints/`.
    pub fn open(root: &Path) -> Result<Self> {
        let run = Self {
            root: root.to_path_buf(),
        };
        for d in [run.configs_dir(), run.checkpoints_dir()] {
            if !d.is_dir() {
                return Err(Error::invalid(format!(
                    "{} is not a taming-rs run: {} is missing",
                    root.display(),
                    d.display()
                )));
            }
        }
        let images = run.images_dir();
        std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
        Ok(run)
    }

    pub fn configs_dir(&self) -> PathBuf {
        self.root.join("configs")
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn last_checkpoint(&self) -> PathBuf {
        self.checkpoints_dir().join("last.safetensors")
    }
    pub fn step_checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints_dir()
            .join(format!("step-{step:07}.safetensors"))
    }
    pub fn metrics_csv(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }
}

/// `%Y-%m-%dT%H-%M-%S` in UTC, from the system clock (no calendar crate needed).
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `metrics.csv`: one row per logged step, columns fixed by the first row's header. On resume,
/// rows after the resumed step are dropped so that the file tells one consistent history.
#[derive(Debug)]
pub struct MetricsCsv {
    path: PathBuf,
    columns: Vec<String>,
}

impl MetricsCsv {
    /// Opens (or creates) the file with `columns` (`step` first). An existing file keeps its rows
    /// up to `keep_until_step`; its header must name the same columns.
    pub fn open(path: &Path, columns: &[&str], keep_until_step: Option<u64>) -> Result<Self> {
        let columns: Vec<String> = std::iter::once("step".to_string())
            .chain(columns.iter().map(|c| c.to_string()))
            .collect();
        let header = columns.join(",");
        let mut kept = vec![header.clone()];
        if let (Some(until), true) = (keep_until_step, path.exists()) {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let mut lines = text.lines();
            if let Some(h) = lines.next() {
                if h != header {
                    return Err(Error::invalid(format!(
                        "{}: columns `{h}` differ from this run's `{header}`",
                        path.display()
                    )));
                }
            }
            for l in lines {
                let step: Option<u64> = l.split(',').next().and_then(|s| s.parse().ok());
                if step.is_some_and(|s| s <= until) {
                    kept.push(l.to_string());
                }
            }
        }
        let mut body = kept.join("\n");
        body.push('\n');
        crate::image_io::write_atomic(path, body.as_bytes())?;
        Ok(Self {
            path: path.to_path_buf(),
            columns,
        })
    }

    /// Appends one row; missing values are left empty.
    pub fn append(&mut self, step: u64, values: &BTreeMap<String, f64>) -> Result<()> {
        let mut row = vec![step.to_string()];
        for c in self.columns.iter().skip(1) {
            row.push(values.get(c).map(|v| format!("{v}")).unwrap_or_default());
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        writeln!(f, "{}", row.join(",")).map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads a `metrics.csv`: column names and rows (empty cells as NaN).
pub fn read_metrics(path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| Error::invalid(format!("{}: empty metrics file", path.display())))?
        .split(',')
        .map(str::to_string)
        .collect();
    let mut rows = Vec::new();
    for (i, l) in lines.enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let row: Vec<f64> = l
            .split(',')
            .map(|c| {
                if c.is_empty() {
                    Ok(f64::NAN)
                } else {
                    c.parse::<f64>()
                }
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::invalid(format!("{} line {}: {e}", path.display(), i + 2)))?;
        if row.len() != header.len() {
            return Err(Error::invalid(format!(
                "{} line {}: {} values for {} columns",
                path.display(),
                i + 2,
                row.len(),
                header.len()
            )));
        }
        rows.push(row);
    }
    Ok((header, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_790), (2026, 12, 3));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn metrics_resume_drops_later_rows() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let p = tmp.path().join("m.csv");
        let mut m = MetricsCsv::open(&p, &["loss", "lr"], None)?;
        for s in 1..=5u64 {
            let mut v = BTreeMap::new();
            v.insert("loss".to_string(), 1.0 / s as f64);
            m.append(s, &v)?;
        }
        let mut m = MetricsCsv::open(&p, &["loss", "lr"], Some(3))?;
        let mut v = BTreeMap::new();
        v.insert("lr".to_string(), 0.5);
        m.append(4, &v)?;
        let (h, rows) = read_metrics(&p)?;
        assert_eq!(h, ["step", "loss", "lr"]);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[3][0], 4.0);
        assert!(rows[3][1].is_nan() && rows[3][2] == 0.5);
        assert!(MetricsCsv::open(&p, &["other"], Some(3)).is_err());
        Ok(())
    }

    #[test]
    fn checkpoint_round_trip() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let p = tmp.path().join("ck").join("last.safetensors");
        let mut t = BTreeMap::new();
        t.insert(
            "a.weight".to_string(),
            Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu)?,
        );
        let st = TrainState {
            global_step: 12,
            epoch: 1,
            batch_in_epoch: 3,
            seed: 7,
        };
        save_checkpoint(&p, t, st)?;
        let (sd, back) = load_checkpoint(&p)?;
        assert_eq!(back, st);
        assert_eq!(sd.get("a.weight").unwrap().to_vec1::<f32>()?, [1.0, 2.0]);
        Ok(())
    }
}
