//! Procedural outdoor scenes: taming-rs's own synthetic dataset for the built-in model
//! (label map -> picture). No reference file mirrors this module.
//!
//! Each scene is a pure function of `(seed, width, height)`: a composition drawn from a ChaCha8
//! stream (horizon height, time of day, 0-3 mountain ranges with or without snow caps, clouds or
//! a clear sky, no water / a lake / the sea, beach, dirt path, trees and rocks), then rendered
//! with hand-written value noise into three aligned outputs:
//!
//! - `image`: an RGB picture, every label with its own texture and shading (sky gradient with
//!   the time of day, soft noise clouds, ridge-line mountains with aerial perspective and snow
//!   caps, water mirroring what stands beyond the shore, textured grass darkening toward the
//!   viewer, broadleaf and conifer trees with shadows, sand, shaded rocks, a dirt path);
//! - `labels`: the label id of every pixel (see [`LABELS`]);
//! - `depth`: inverse depth in 1/metres (larger = nearer, like MiDaS / D-RIN), 0 for the sky.
//!
//! The ground is a plane seen from a camera a few metres up, so textures and objects grow
//! toward the bottom of the frame and the ground's depth follows from the row alone. The
//! renderer uses only `+ - * /`, `sqrt` and integer hashing, and no threads, so outputs are
//! byte-identical on every machine. [`write_dataset`] writes a train/validation split in the
//! layout of the reference's segmentation and depth datasets (`images/`, `segmentations/`,
//! `depth/` as D-RIN float32-in-RGBA PNGs, `train.txt`, `val.txt`).

mod dataset;
mod layout;
mod noise;
mod paint;

use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, RgbaImage};

pub use dataset::{scene_seed, write_dataset, DatasetSummary, Split};

/// Label id of the sky (and the sun).
pub const SKY: u8 = 0;
/// Label id of clouds.
pub const CLOUD: u8 = 1;
/// Label id of mountains and hills (their rock and forested flanks).
pub const MOUNTAIN: u8 = 2;
/// Label id of water (lakes and the sea, with their reflections and foam).
pub const WATER: u8 = 3;
/// Label id of grass (meadows, the open ground).
pub const GRASS: u8 = 4;
/// Label id of trees (crowns and trunks).
pub const TREE: u8 = 5;
/// Label id of sand (beaches along the water).
pub const SAND: u8 = 6;
/// Label id of rocks and boulders on the ground or in the surf.
pub const ROCK: u8 = 7;
/// Label id of snow caps on mountains.
pub const SNOW: u8 = 8;
/// Label id of dirt paths.
pub const PATH: u8 = 9;

/// Number of labels; ids are `0..NUM_LABELS`.
pub const NUM_LABELS: usize = 10;

/// One entry of the label table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelInfo {
    /// The id written in label maps.
    pub id: u8,
    /// A short lowercase name.
    pub name: &'static str,
    /// Display colour of the palette ([`colorize_labels`]).
    pub color: [u8; 3],
}

/// The label table, indexed by id. Ids are stable: new labels only ever get new ids.
pub const LABELS: [LabelInfo; NUM_LABELS] = [
    LabelInfo {
        id: SKY,
        name: "sky",
        color: [110, 180, 240],
    },
    LabelInfo {
        id: CLOUD,
        name: "cloud",
        color: [200, 200, 215],
    },
    LabelInfo {
        id: MOUNTAIN,
        name: "mountain",
        color: [125, 95, 80],
    },
    LabelInfo {
        id: WATER,
        name: "water",
        color: [25, 70, 190],
    },
    LabelInfo {
        id: GRASS,
        name: "grass",
        color: [95, 190, 60],
    },
    LabelInfo {
        id: TREE,
        name: "tree",
        color: [20, 95, 35],
    },
    LabelInfo {
        id: SAND,
        name: "sand",
        color: [235, 210, 140],
    },
    LabelInfo {
        id: ROCK,
        name: "rock",
        color: [120, 120, 120],
    },
    LabelInfo {
        id: SNOW,
        name: "snow",
        color: [255, 255, 255],
    },
    LabelInfo {
        id: PATH,
        name: "path",
        color: [175, 120, 70],
    },
];

/// The table entry of label `id`, if it is one.
pub fn label_info(id: u8) -> Option<&'static LabelInfo> {
    LABELS.get(id as usize)
}

/// The label of a name of [`LABELS`] (e.g. `"water"`).
pub fn label_id(name: &str) -> Option<u8> {
    LABELS.iter().find(|l| l.name == name).map(|l| l.id)
}

/// Time of day of a scene: sets the sky colours, the light and the haze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeOfDay {
    /// Blue sky, white light.
    Day,
    /// Warm low sun, often visible.
    Golden,
    /// Orange horizon, dark blue top, dim warm light.
    Dusk,
    /// Grey, mostly clouded sky, flat light, more haze.
    Overcast,
}

/// The water of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaterKind {
    /// Dry land only.
    None,
    /// A lake lying on the ground plane, land beyond it.
    Lake,
    /// The sea up to the horizon beyond a coastline.
    Sea,
}

/// Inverse depth map (1/metres, larger = nearer; 0 for the sky), one float per pixel.
pub type DepthMap = ImageBuffer<Luma<f32>, Vec<f32>>;

/// What a scene was composed of (drawn from its seed).
#[derive(Debug, Clone, PartialEq)]
pub struct SceneInfo {
    /// The seed the scene was drawn from.
    pub seed: u64,
    /// Time of day.
    pub time_of_day: TimeOfDay,
    /// Water present.
    pub water: WaterKind,
    /// Horizon height as a share of the frame height from the top.
    pub horizon: f32,
    /// Camera height above the ground (metres).
    pub camera_height: f32,
    /// Number of mountain ranges (0-3).
    pub mountain_ranges: usize,
    /// Whether the mountains can carry snow.
    pub snow: bool,
    /// Cloud cover in [0, 1] (0: clear sky).
    pub cloud_cover: f32,
    /// Whether a beach lines the water.
    pub beach: bool,
    /// Whether a dirt path crosses the ground.
    pub path: bool,
    /// Trees placed (some may be hidden or out of frame).
    pub trees: usize,
    /// Rocks placed.
    pub rocks: usize,
}

/// A rendered scene: picture, label map and inverse depth, all of the same size.
#[derive(Debug, Clone)]
pub struct Scene {
    /// The picture.
    pub image: RgbImage,
    /// Label id per pixel (see [`LABELS`]).
    pub labels: GrayImage,
    /// Inverse depth per pixel (1/metres; larger = nearer, sky 0).
    pub depth: DepthMap,
    /// The composition.
    pub info: SceneInfo,
}

impl Scene {
    /// The depth map as a D-RIN PNG image (see [`depth_to_rgba`]).
    pub fn depth_rgba(&self) -> RgbaImage {
        depth_to_rgba(&self.depth)
    }

    /// Pixel count of every label.
    pub fn label_histogram(&self) -> [u64; NUM_LABELS] {
        label_histogram(&self.labels)
    }
}

/// Scene options: size, seed and optional fixed choices (the rest still comes from the seed,
/// and a fixed choice leaves every other random draw as it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SceneParams {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Seed of the composition.
    pub seed: u64,
    /// Force a time of day.
    pub time_of_day: Option<TimeOfDay>,
    /// Force the kind of water.
    pub water: Option<WaterKind>,
}

impl SceneParams {
    /// Scene `seed` at `width` x `height`, everything drawn from the seed.
    pub fn new(seed: u64, width: u32, height: u32) -> Self {
        SceneParams {
            width,
            height,
            seed,
            time_of_day: None,
            water: None,
        }
    }

    /// The same with a fixed time of day.
    pub fn with_time_of_day(mut self, t: TimeOfDay) -> Self {
        self.time_of_day = Some(t);
        self
    }

    /// The same with a fixed kind of water.
    pub fn with_water(mut self, w: WaterKind) -> Self {
        self.water = Some(w);
        self
    }

    /// Renders the scene. A zero width or height gives empty images.
    pub fn render(&self) -> Scene {
        let (w, h) = (self.width, self.height);
        let aspect = if h == 0 { 1.0 } else { w as f32 / h as f32 };
        let lay = layout::Layout::generate(
            self.seed,
            aspect,
            layout::Overrides {
                time: self.time_of_day,
                water: self.water,
            },
        );
        let canvas = paint::paint(&lay, w, h);
        let data: Vec<u8> = canvas
            .rgb
            .iter()
            .flat_map(|c| c.map(|x| (x.clamp(0.0, 1.0) * 255.0 + 0.5) as u8))
            .collect();
        let image = RgbImage::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(w, h));
        let labels =
            GrayImage::from_raw(w, h, canvas.label).unwrap_or_else(|| GrayImage::new(w, h));
        let depth = DepthMap::from_raw(w, h, canvas.invd).unwrap_or_else(|| DepthMap::new(w, h));
        let info = SceneInfo {
            seed: self.seed,
            time_of_day: lay.time,
            water: match lay.water {
                layout::Water::None => WaterKind::None,
                layout::Water::Lake { .. } => WaterKind::Lake,
                layout::Water::Sea { .. } => WaterKind::Sea,
            },
            horizon: lay.cam.horizon,
            camera_height: lay.cam.height,
            mountain_ranges: lay.ranges.len(),
            snow: lay.snow_alt.is_finite(),
            cloud_cover: lay.clouds.map(|c| c.cover).unwrap_or(0.0),
            beach: lay.beach.is_some(),
            path: lay.path.is_some(),
            trees: lay.tree_count(),
            rocks: lay.rock_count(),
        };
        Scene {
            image,
            labels,
            depth,
            info,
        }
    }
}

/// Renders scene `seed` at `width` x `height` (see the module docs); a pure function.
pub fn render(seed: u64, width: u32, height: u32) -> Scene {
    SceneParams::new(seed, width, height).render()
}

/// The label map of scene `seed`: an example input for label-map-conditioned sampling.
pub fn example_label_map(seed: u64, width: u32, height: u32) -> GrayImage {
    render(seed, width, height).labels
}

/// Paints a label map with the palette of [`LABELS`]; unknown ids become magenta.
pub fn colorize_labels(labels: &GrayImage) -> RgbImage {
    let (w, h) = labels.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let id = labels.get_pixel(x, y).0[0];
        Rgb(label_info(id).map(|l| l.color).unwrap_or([255, 0, 255]))
    })
}

/// Pixel count of every label id of [`LABELS`] in a label map (other ids are not counted).
pub fn label_histogram(labels: &GrayImage) -> [u64; NUM_LABELS] {
    let mut counts = [0u64; NUM_LABELS];
    for &v in labels.as_raw() {
        if let Some(c) = counts.get_mut(v as usize) {
            *c += 1;
        }
    }
    counts
}

/// A depth map in D-RIN's PNG format: RGBA8 whose four bytes per pixel are one little-endian
/// float32 (read back by [`crate::image_io::load_depth_raw`] or [`depth_from_rgba`]).
pub fn depth_to_rgba(depth: &DepthMap) -> RgbaImage {
    let (w, h) = depth.dimensions();
    let bytes: Vec<u8> = depth
        .as_raw()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    RgbaImage::from_raw(w, h, bytes).unwrap_or_else(|| RgbaImage::new(w, h))
}

/// Inverse of [`depth_to_rgba`].
pub fn depth_from_rgba(img: &RgbaImage) -> DepthMap {
    let (w, h) = img.dimensions();
    let vals: Vec<f32> = img
        .as_raw()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    DepthMap::from_raw(w, h, vals).unwrap_or_else(|| DepthMap::new(w, h))
}

/// A viewable grey picture of a depth map: min-max normalised, near = white.
pub fn depth_preview(depth: &DepthMap) -> GrayImage {
    let (w, h) = depth.dimensions();
    let vals = depth.as_raw();
    let lo = vals.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let range = (hi - lo).max(1e-12);
    let data = vals
        .iter()
        .map(|v| (((v - lo) / range).clamp(0.0, 1.0) * 255.0 + 0.5) as u8)
        .collect();
    GrayImage::from_raw(w, h, data).unwrap_or_else(|| GrayImage::new(w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_indexed_by_id() {
        for (i, l) in LABELS.iter().enumerate() {
            assert_eq!(l.id as usize, i);
            assert_eq!(label_id(l.name), Some(l.id));
        }
        assert!(label_info(NUM_LABELS as u8).is_none());
    }

    #[test]
    fn sizes_and_degenerate_sizes() {
        for (w, h) in [
            (0, 0),
            (0, 5),
            (5, 0),
            (1, 1),
            (3, 2),
            (33, 17),
            (64, 64),
            (96, 48),
        ] {
            let s = render(9, w, h);
            assert_eq!(s.image.dimensions(), (w, h));
            assert_eq!(s.labels.dimensions(), (w, h));
            assert_eq!(s.depth.dimensions(), (w, h));
            assert!(s.depth.as_raw().iter().all(|v| v.is_finite() && *v >= 0.0));
            assert!(s.labels.as_raw().iter().all(|&v| (v as usize) < NUM_LABELS));
        }
    }

    #[test]
    fn overrides_apply() {
        for seed in 0..12 {
            let p = SceneParams::new(seed, 48, 32)
                .with_water(WaterKind::Sea)
                .with_time_of_day(TimeOfDay::Dusk);
            let s = p.render();
            assert_eq!(s.info.water, WaterKind::Sea);
            assert_eq!(s.info.time_of_day, TimeOfDay::Dusk);
            let plain = render(seed, 48, 32);
            assert_eq!(plain.info.horizon, s.info.horizon);
        }
    }

    #[test]
    fn depth_rgba_roundtrip() {
        let s = render(3, 20, 10);
        let back = depth_from_rgba(&s.depth_rgba());
        assert_eq!(back.as_raw(), s.depth.as_raw());
    }
}
