//! What the page needs to know about the served model: its task (label map, class,
//! unconditional, ...), the label names and colours of its palette, its sizes, and example label
//! maps.

use std::path::Path;

use image::GrayImage;
use serde::Serialize;
use taming::cond_stage::CondStage;
use taming::cond_transformer::Net2NetTransformer;
use taming::first_stage::VqModelKind;

use crate::WebError;

/// What the model is conditioned on, as far as the page is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// A segmentation cond stage: the page paints a label map.
    Labels { n_labels: usize },
    /// A class-conditional model.
    Class { n_classes: usize },
    /// An unconditional model.
    Unconditional,
    /// A coordinate-conditioned model: the coordinate map of the output size is built here.
    Coord,
    /// A condition the page cannot provide (depth maps, low-resolution images): sampling is
    /// refused with this description.
    Unsupported { describe: String },
}

/// One entry of the page's palette.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Label {
    pub id: usize,
    pub name: String,
    pub color: [u8; 3],
}

/// The model as the page sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// A short human-readable description (the conditioning stage).
    pub description: String,
    pub task: Task,
    /// The palette (empty unless the task is [`Task::Labels`]).
    pub labels: Vec<Label>,
    /// The first stage's downsampling factor: output sizes are multiples of it.
    pub factor: usize,
    /// The training size in pixels (H, W); larger outputs use the sliding window.
    pub training_size: (usize, usize),
    /// Whether the built-in scenes palette and example maps apply.
    pub scenes: bool,
}

impl ModelInfo {
    /// Describes `model`; `label_names` are (id, name) pairs, e.g. from [`read_labels_txt`].
    pub fn new(model: &Net2NetTransformer, label_names: &[(usize, String)]) -> Self {
        let stage = model.cond_stage();
        let task = match stage {
            CondStage::Vq(m) if m.kind() == VqModelKind::Segmentation => Task::Labels {
                n_labels: m.in_channels(),
            },
            CondStage::Labelator { n_classes } => Task::Class {
                n_classes: *n_classes,
            },
            CondStage::Sos { .. } => Task::Unconditional,
            CondStage::Coord { .. } => Task::Coord,
            other => Task::Unsupported {
                describe: other.describe(),
            },
        };
        let factor = model.first_stage().downsample_factor();
        let res = model.config().first_stage.ddconfig.resolution;
        let (labels, scenes) = match task {
            Task::Labels { n_labels } => palette(n_labels, label_names),
            _ => (Vec::new(), false),
        };
        let description = match &task {
            Task::Labels { n_labels } => format!("label map to image ({n_labels} labels)"),
            Task::Class { n_classes } => format!("class to image ({n_classes} classes)"),
            Task::Unconditional => "unconditional".to_string(),
            _ => stage.describe(),
        };
        ModelInfo {
            description,
            task,
            labels,
            factor,
            training_size: (res, res),
            scenes,
        }
    }

    /// Number of labels of a label-map model, else None.
    pub fn n_labels(&self) -> Option<usize> {
        match self.task {
            Task::Labels { n_labels } => Some(n_labels),
            _ => None,
        }
    }

    /// An example label map of `width` x `height` for scene `seed`: the built-in scenes' label
    /// maps; for other label counts their ids are folded into the model's range.
    pub fn example_labels(&self, seed: u64, width: u32, height: u32) -> GrayImage {
        let mut map = taming::scenes::example_label_map(seed, width, height);
        let n = self.n_labels().unwrap_or(1).clamp(1, 256);
        if !self.scenes {
            for p in map.pixels_mut() {
                p.0[0] = (p.0[0] as usize % n) as u8;
            }
        }
        map
    }
}

/// Palette of `n_labels` labels: the scenes colours when the names are the built-in scenes
/// labels, else colours spread evenly around the hue circle.
fn palette(n_labels: usize, names: &[(usize, String)]) -> (Vec<Label>, bool) {
    let name_of = |id: usize| names.iter().find(|(i, _)| *i == id).map(|(_, n)| n.clone());
    let scenes = n_labels == taming::scenes::NUM_LABELS
        && taming::scenes::LABELS
            .iter()
            .all(|l| name_of(l.id as usize).as_deref() == Some(l.name));
    let labels = (0..n_labels)
        .map(|id| {
            let color = if scenes {
                taming::scenes::LABELS[id].color
            } else {
                generated_color(id)
            };
            Label {
                id,
                name: name_of(id).unwrap_or_else(|| format!("label {id}")),
                color,
            }
        })
        .collect();
    (labels, scenes)
}

/// A deterministic, well-spread colour for label `id` (golden-angle hues, alternating lightness).
fn generated_color(id: usize) -> [u8; 3] {
    let h = (id as f64 * 137.507_764) % 360.0;
    let (s, l) = (0.65, if id.is_multiple_of(2) { 0.55 } else { 0.4 });
    let c = (1.0 - (2.0 * l - 1.0f64).abs()) * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let m = l - c / 2.0;
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let to8 = |v: f64| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    [to8(r), to8(g), to8(b)]
}

/// Parses a `labels.txt` (lines `ID NAME`; blank lines and `#` comments are skipped).
pub fn parse_labels_txt(text: &str, origin: &Path) -> Result<Vec<(usize, String)>, WebError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            WebError::Setup(format!(
                "{} line {}: expected `ID NAME`, got `{line}`",
                origin.display(),
                i + 1
            ))
        };
        let (id, name) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let id: usize = id.parse().map_err(|_| bad())?;
        out.push((id, name.trim().to_string()));
    }
    Ok(out)
}

/// Reads `labels.txt` if it exists (None when it does not).
pub fn read_labels_txt(path: &Path) -> Result<Option<Vec<(usize, String)>>, WebError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_labels_txt(&text, path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WebError::Setup(format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_txt_parses_and_names_bad_lines() {
        let p = Path::new("labels.txt");
        let l = parse_labels_txt("# c\n0 sky\n\n1 cloud cover\n", p).unwrap();
        assert_eq!(l, vec![(0, "sky".into()), (1, "cloud cover".into())]);
        let e = parse_labels_txt("0 sky\nx water\n", p).unwrap_err();
        assert!(e.to_string().contains("labels.txt line 2"), "{e}");
    }

    #[test]
    fn scenes_names_get_scenes_colours() {
        let names: Vec<_> = taming::scenes::LABELS
            .iter()
            .map(|l| (l.id as usize, l.name.to_string()))
            .collect();
        let (labels, scenes) = palette(10, &names);
        assert!(scenes);
        assert_eq!(labels[3].color, taming::scenes::LABELS[3].color);
        let (labels, scenes) = palette(8, &[]);
        assert!(!scenes);
        assert_eq!(labels[7].name, "label 7");
        assert_ne!(labels[0].color, labels[1].color);
    }
}
