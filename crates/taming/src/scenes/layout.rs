//! A scene's composition, drawn from its seed: camera, time of day, sky and clouds, mountain
//! ranges, the ground plan (water, beach, path) and the trees and rocks standing on it.
//!
//! World units are metres. The camera looks horizontally from `height` metres above a flat
//! ground; image coordinates `u` (right) and `v` (down) are measured in frame heights, so that a
//! point at distance `z` and height `y` appears at `v = horizon + focal * (height - y) / z`.

use super::noise::{clamp01, lerp, Noise, Rand};
use super::{TimeOfDay, WaterKind};

/// Linear RGB in [0, 1] (the renderer works in floats, then quantises once).
pub(crate) type Rgb = [f32; 3];

/// Mixes two colours.
#[inline]
pub(crate) fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [
        lerp(a[0], b[0], t),
        lerp(a[1], b[1], t),
        lerp(a[2], b[2], t),
    ]
}

/// Multiplies a colour by a scalar.
#[inline]
pub(crate) fn scale(a: Rgb, s: f32) -> Rgb {
    [a[0] * s, a[1] * s, a[2] * s]
}

/// Multiplies two colours channel-wise.
#[inline]
pub(crate) fn modulate(a: Rgb, b: Rgb) -> Rgb {
    [a[0] * b[0], a[1] * b[1], a[2] * b[2]]
}

/// Adds two colours.
#[inline]
pub(crate) fn add(a: Rgb, b: Rgb) -> Rgb {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn jitter(rng: &mut Rand, c: Rgb, amount: f32) -> Rgb {
    let common = rng.signed() * amount;
    [
        clamp01(c[0] + common + rng.signed() * amount * 0.5),
        clamp01(c[1] + common + rng.signed() * amount * 0.5),
        clamp01(c[2] + common + rng.signed() * amount * 0.5),
    ]
}

/// The pinhole camera over the ground plane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Camera {
    /// Horizon row in frame heights from the top.
    pub horizon: f32,
    /// Focal length in frame heights.
    pub focal: f32,
    /// Eye height above the ground (metres).
    pub height: f32,
    /// Width / height of the frame.
    pub aspect: f32,
}

impl Camera {
    /// Distance of the ground seen at row `v` (> horizon).
    #[inline]
    pub(crate) fn ground_z(&self, v: f32) -> f32 {
        self.focal * self.height / (v - self.horizon)
    }

    /// Lateral world position of the ground point at column `u`, distance `z`.
    #[inline]
    pub(crate) fn ground_x(&self, u: f32, z: f32) -> f32 {
        (u - 0.5 * self.aspect) * z / self.focal
    }

    /// Row of the ground point at distance `z`.
    #[inline]
    pub(crate) fn base_v(&self, z: f32) -> f32 {
        self.horizon + self.focal * self.height / z
    }

    /// Column of a point at lateral position `x`, distance `z`.
    #[inline]
    pub(crate) fn screen_u(&self, x: f32, z: f32) -> f32 {
        0.5 * self.aspect + self.focal * x / z
    }
}

/// Sky colours and light of the time of day.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SkyLook {
    pub top: Rgb,
    pub horizon: Rgb,
    /// Colour distant things fade to (aerial perspective).
    pub haze: Rgb,
    /// Colour and strength of the direct light on the scene.
    pub light: Rgb,
    pub cloud_lit: Rgb,
    pub cloud_shade: Rgb,
    pub sun: Option<Sun>,
}

/// A visible sun (low in the sky) with its glow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sun {
    pub u: f32,
    pub v: f32,
    pub radius: f32,
    pub color: Rgb,
    pub glow: f32,
}

/// The cloud layer: a textured plane `altitude` metres up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clouds {
    pub noise: Noise,
    pub cover: f32,
    pub altitude: f32,
    /// Size of the cloud features (metres).
    pub scale: f32,
    /// Stretch of the features across the view (> 1: elongated banks).
    pub stretch: f32,
    /// Softness of the edges.
    pub soft: f32,
    /// Clouds are placed behind the farthest mountains in the depth map.
    pub min_z: f32,
}

/// One mountain range: a ridge line from 1-D fractal noise at distance `z`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    pub z: f32,
    /// Peak height in frame heights.
    pub amp: f32,
    /// Width of the main features in frame heights.
    pub wavelength: f32,
    pub offset: f32,
    /// Share of the smooth fBm against the ridged one.
    pub smooth: f32,
    /// Lowest ridge level (share of `amp`) where the range is present.
    pub floor: f32,
    pub noise: Noise,
    pub ridge_noise: Noise,
    pub face_noise: Noise,
    /// `Some(threshold)`: the range covers only part of the width.
    pub envelope: Option<(Noise, f32, f32)>,
    pub color: Rgb,
}

impl Range {
    /// Ridge height in [0, 1] (times `amp`) at column `u`; 0 where the range is absent.
    pub(crate) fn profile(&self, u: f32) -> f32 {
        let x = u / self.wavelength + self.offset;
        let smooth = self.noise.fbm1(x, 6);
        let ridged = self.ridge_noise.ridged1(x * 0.8 + 3.1, 5);
        let p = self.smooth * smooth + (1.0 - self.smooth) * ridged;
        let p = ((p - 0.2) / 0.52).max(0.0);
        // More relief: valleys sink, peaks stand out.
        let p = p * p.sqrt();
        // Soft knee instead of a clamp: high peaks stay peaks, no plateaus.
        let p = if p > 0.75 {
            0.75 + (p - 0.75) / (1.0 + 2.0 * (p - 0.75))
        } else {
            p
        };
        let p = self.floor + (1.0 - self.floor) * p;
        match self.envelope {
            None => p,
            Some((n, len, threshold)) => {
                let e = n.fbm1(u / len + self.offset, 3);
                let e = clamp01((e - threshold) / 0.3);
                // Tapers to the ground where the envelope closes.
                p * e * (2.0 - e) - (1.0 - e) * 0.1
            }
        }
    }

    /// Large-scale profile (for the lighting of the faces).
    pub(crate) fn profile_low(&self, u: f32) -> f32 {
        let x = u / self.wavelength + self.offset;
        self.noise.fbm1(x, 3) * self.smooth
            + (1.0 - self.smooth) * self.ridge_noise.ridged1(x * 0.8 + 3.1, 3)
    }
}

/// Standing water.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Water {
    None,
    /// An elliptic lake with a noisy shore.
    Lake {
        x: f32,
        z: f32,
        rx: f32,
        rz: f32,
        noise: Noise,
    },
    /// The sea beyond a shoreline at distance `z` (with a slant and a noisy coast).
    Sea {
        z: f32,
        slant: f32,
        coast_len: f32,
        noise: Noise,
    },
}

/// A dirt path winding away from the viewer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PathSpec {
    /// Lateral position at distance `z0` (the bottom of the frame).
    pub x0: f32,
    pub z0: f32,
    pub amp: f32,
    pub wavelength: f32,
    pub width: f32,
    pub z_end: f32,
    pub noise: Noise,
}

/// What covers the ground at a point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Ground {
    Grass,
    /// `wet` is 1 at the water's edge, 0 on dry sand.
    Sand {
        wet: f32,
    },
    /// `edge` is |offset| / half width.
    Path {
        edge: f32,
    },
    /// `shore` is the distance to the shore (metres).
    Water {
        shore: f32,
    },
}

/// Surface colours of the scene (before light).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Materials {
    pub grass_near: Rgb,
    pub grass_far: Rgb,
    pub tree: Rgb,
    pub conifer: Rgb,
    pub trunk: Rgb,
    pub sand: Rgb,
    pub wet_sand: Rgb,
    pub rock: Rgb,
    pub path: Rgb,
    pub snow: Rgb,
    pub water: Rgb,
}

/// A tree standing at (x, z).
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    pub x: f32,
    pub z: f32,
    pub height: f32,
    pub conifer: bool,
    /// Crown radius / height.
    pub crown: f32,
    /// Blobs of a broadleaf crown: (dx, dy, r) in crown radii.
    pub blobs: Vec<[f32; 3]>,
    pub tint: f32,
    pub noise: Noise,
}

/// A rock at (x, z).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rock {
    pub x: f32,
    pub z: f32,
    pub size: f32,
    pub flat: f32,
    pub tint: f32,
    pub noise: Noise,
}

/// Things standing on the ground, drawn far to near.
#[derive(Debug, Clone)]
pub(crate) enum Sprite {
    Tree(Tree),
    Rock(Rock),
}

impl Sprite {
    pub(crate) fn z(&self) -> f32 {
        match self {
            Sprite::Tree(t) => t.z,
            Sprite::Rock(r) => r.z,
        }
    }
}

/// Everything the renderer needs, drawn from the seed.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub time: TimeOfDay,
    pub cam: Camera,
    pub sky: SkyLook,
    pub clouds: Option<Clouds>,
    /// Far to near.
    pub ranges: Vec<Range>,
    /// Height above the ground (metres) where snow starts; infinite: no snow.
    pub snow_alt: f32,
    pub snow_noise: Noise,
    /// Distance (metres) at which things are half faded into the haze.
    pub visibility: f32,
    pub mat: Materials,
    pub water: Water,
    /// Beach width (relative to the lake radius, or metres at sea).
    pub beach: Option<f32>,
    pub path: Option<PathSpec>,
    /// Far to near.
    pub sprites: Vec<Sprite>,
    /// Where the light comes from, across the view: -1 left .. 1 right.
    pub light_x: f32,
    /// Shadows fall away from (> 0) or toward (< 0) the viewer, in object heights.
    pub shadow_dz: f32,
    pub ground_noise: Noise,
    pub detail_noise: Noise,
    pub shore_noise: Noise,
    pub ripple_noise: Noise,
    /// Ripple strength of the water (0 calm).
    pub ripple: f32,
    /// Wave length of the ripples (metres).
    pub wave_len: f32,
    /// Distance scale of the grass colour gradient.
    pub grass_gradient: f32,
}

/// Optional fixed choices; the rest of the scene still comes from the seed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Overrides {
    pub time: Option<TimeOfDay>,
    pub water: Option<WaterKind>,
}

fn sky_look(rng: &mut Rand, time: TimeOfDay, cam: &Camera) -> SkyLook {
    let (top, horizon, light, lit, shade) = match time {
        TimeOfDay::Day => (
            [0.20, 0.42, 0.82],
            [0.66, 0.80, 0.94],
            [1.0, 0.98, 0.93],
            [0.99, 0.99, 0.98],
            [0.66, 0.71, 0.80],
        ),
        TimeOfDay::Golden => (
            [0.30, 0.46, 0.76],
            [0.96, 0.82, 0.62],
            [1.0, 0.86, 0.66],
            [1.0, 0.90, 0.74],
            [0.62, 0.58, 0.66],
        ),
        TimeOfDay::Dusk => (
            [0.16, 0.18, 0.42],
            [0.98, 0.56, 0.32],
            [0.82, 0.58, 0.46],
            [0.98, 0.64, 0.46],
            [0.38, 0.30, 0.44],
        ),
        TimeOfDay::Overcast => (
            [0.55, 0.58, 0.63],
            [0.80, 0.82, 0.84],
            [0.78, 0.80, 0.82],
            [0.86, 0.87, 0.89],
            [0.56, 0.58, 0.63],
        ),
    };
    let top = jitter(rng, top, 0.04);
    let horizon = jitter(rng, horizon, 0.03);
    let light = jitter(rng, light, 0.03);
    let haze = mix(horizon, top, 0.18);
    let sun = match time {
        TimeOfDay::Golden | TimeOfDay::Dusk if rng.chance(0.8) => {
            let color = if time == TimeOfDay::Dusk {
                [1.0, 0.80, 0.55]
            } else {
                [1.0, 0.95, 0.80]
            };
            Some(Sun {
                u: rng.range(0.12, 0.88) * cam.aspect,
                v: cam.horizon - rng.range(0.02, 0.16),
                radius: rng.range(0.018, 0.035),
                color,
                glow: if time == TimeOfDay::Dusk { 0.55 } else { 0.4 },
            })
        }
        _ => None,
    };
    SkyLook {
        top,
        horizon,
        haze,
        light,
        cloud_lit: jitter(rng, lit, 0.02),
        cloud_shade: jitter(rng, shade, 0.03),
        sun,
    }
}

fn materials(rng: &mut Rand, time: TimeOfDay) -> Materials {
    let dry = rng.f() * rng.f();
    let near = mix([0.17, 0.36, 0.08], [0.42, 0.40, 0.14], dry);
    let far = mix([0.40, 0.55, 0.22], [0.62, 0.58, 0.32], dry);
    let snow = if time == TimeOfDay::Dusk {
        [0.96, 0.92, 0.98]
    } else {
        [0.95, 0.97, 1.0]
    };
    let sand = jitter(rng, [0.86, 0.77, 0.56], 0.04);
    Materials {
        grass_near: jitter(rng, near, 0.03),
        grass_far: jitter(rng, far, 0.03),
        tree: jitter(rng, [0.09, 0.24, 0.07], 0.025),
        conifer: jitter(rng, [0.05, 0.17, 0.09], 0.02),
        trunk: jitter(rng, [0.28, 0.19, 0.12], 0.03),
        sand,
        wet_sand: scale(sand, 0.68),
        rock: jitter(rng, [0.48, 0.47, 0.45], 0.06),
        path: jitter(rng, [0.56, 0.43, 0.29], 0.04),
        snow,
        water: jitter(rng, [0.05, 0.18, 0.28], 0.025),
    }
}

impl Layout {
    /// Draws the composition of scene `seed` for a frame of the given aspect (width / height).
    pub(crate) fn generate(seed: u64, aspect: f32, overrides: Overrides) -> Layout {
        let mut rng = Rand::new(seed);
        let drawn_time = match rng.weighted(&[0.5, 0.2, 0.18, 0.12]) {
            0 => TimeOfDay::Day,
            1 => TimeOfDay::Golden,
            2 => TimeOfDay::Dusk,
            _ => TimeOfDay::Overcast,
        };
        let time = overrides.time.unwrap_or(drawn_time);
        let drawn_water = match rng.weighted(&[0.34, 0.36, 0.30]) {
            0 => WaterKind::None,
            1 => WaterKind::Lake,
            _ => WaterKind::Sea,
        };
        let water_kind = overrides.water.unwrap_or(drawn_water);
        let cam = Camera {
            horizon: rng.range(0.30, 0.62),
            focal: rng.range(0.9, 1.4),
            height: rng.range(6.0, 24.0),
            aspect,
        };
        let sky = sky_look(&mut rng, time, &cam);
        let mat = materials(&mut rng, time);
        let visibility = match time {
            TimeOfDay::Overcast => rng.range(2500.0, 5000.0),
            TimeOfDay::Dusk => rng.range(4000.0, 9000.0),
            _ => rng.range(5000.0, 14000.0),
        };

        // Mountain ranges, far to near: each from its own distance band.
        let n_ranges = rng.weighted(&[0.12, 0.3, 0.36, 0.22]);
        let bands: [(f32, f32, f32, f32); 3] = [
            (7000.0, 16000.0, 0.12, 0.34),
            (2600.0, 5500.0, 0.08, 0.26),
            (900.0, 2000.0, 0.05, 0.18),
        ];
        let mut use_band = [n_ranges >= 3; 3];
        let mut placed = use_band.iter().filter(|&&b| b).count();
        while placed < n_ranges {
            let b = rng.int(0, 2);
            if !use_band[b] {
                use_band[b] = true;
                placed += 1;
            }
        }
        // Peaks reach at most ~1.2 amp: keep them inside the frame.
        let max_amp = ((cam.horizon - 0.04) / 1.2).max(0.02);
        let mut ranges = Vec::with_capacity(n_ranges);
        for (&(z0, z1, a0, a1), _) in bands.iter().zip(use_band).filter(|(_, u)| *u) {
            let z = rng.range(z0, z1);
            // A nearer range stays lower than the one behind it, so that every range shows.
            let below_prev = ranges
                .last()
                .map(|r: &Range| r.amp * 0.8)
                .unwrap_or(f32::INFINITY);
            let amp = rng.range(a0, a1).min(max_amp).min(below_prev);
            let forested = z < 3000.0 && rng.chance(0.5);
            let base = if forested {
                [0.16, 0.24, 0.14]
            } else {
                mix([0.38, 0.34, 0.30], [0.30, 0.31, 0.36], rng.f())
            };
            let envelope = if rng.chance(0.35) {
                Some((
                    Noise::new(rng.seed32()),
                    rng.range(0.5, 1.4),
                    rng.range(0.3, 0.55),
                ))
            } else {
                None
            };
            ranges.push(Range {
                z,
                amp,
                wavelength: rng.range(0.2, 0.6),
                offset: rng.range(0.0, 1000.0),
                smooth: rng.range(0.15, 0.7),
                floor: rng.range(0.0, 0.15),
                noise: Noise::new(rng.seed32()),
                ridge_noise: Noise::new(rng.seed32()),
                face_noise: Noise::new(rng.seed32()),
                envelope,
                color: jitter(&mut rng, base, 0.03),
            });
        }
        let peak = ranges
            .iter()
            .map(|r| r.amp * r.z / cam.focal)
            .fold(0.0f32, f32::max);
        let snow_alt = if peak > 0.0 && time != TimeOfDay::Overcast && rng.chance(0.6)
            || peak > 0.0 && rng.chance(0.3)
        {
            peak * rng.range(0.45, 0.85)
        } else {
            f32::INFINITY
        };
        let snow_noise = Noise::new(rng.seed32());

        // Clouds.
        let cover = match time {
            TimeOfDay::Overcast => rng.range(0.75, 1.0),
            _ if rng.chance(0.25) => 0.0,
            _ => rng.range(0.1, 0.85),
        };
        let farthest = ranges.first().map(|r| r.z).unwrap_or(8000.0);
        let clouds = (cover > 0.0).then(|| Clouds {
            noise: Noise::new(rng.seed32()),
            cover,
            altitude: rng.range(1500.0, 3500.0),
            scale: rng.range(900.0, 2600.0),
            stretch: rng.range(0.8, 1.8),
            soft: rng.range(0.06, 0.16),
            min_z: farthest * 1.25,
        });

        // The ground plan.
        let z_bottom = cam.ground_z(1.0);
        let half_view = |z: f32| 0.5 * cam.aspect * z / cam.focal;
        let below = 1.0 - cam.horizon;
        let water = match water_kind {
            WaterKind::None => Water::None,
            WaterKind::Lake => {
                let a = rng.range(0.03, 0.35);
                let b = (a + rng.range(0.2, 0.8)).min(1.25);
                let z_far = cam.ground_z(cam.horizon + below * a);
                let z_near = cam.ground_z(cam.horizon + below * b);
                let zc = 0.5 * (z_far + z_near);
                let hv = half_view(zc);
                Water::Lake {
                    x: rng.signed() * 0.6 * hv,
                    z: zc,
                    rx: hv * rng.range(0.5, 2.2),
                    rz: 0.5 * (z_far - z_near),
                    noise: Noise::new(rng.seed32()),
                }
            }
            WaterKind::Sea => {
                let r = rng.range(0.25, 1.05);
                let z = cam.ground_z(cam.horizon + below * r);
                Water::Sea {
                    z,
                    slant: rng.signed() * 0.5,
                    coast_len: half_view(z) * rng.range(0.5, 1.5),
                    noise: Noise::new(rng.seed32()),
                }
            }
        };
        let beach = match water {
            Water::None => None,
            Water::Lake { .. } => rng.chance(0.4).then(|| rng.range(0.06, 0.2)),
            Water::Sea { z, .. } => rng.chance(0.75).then(|| z * rng.range(0.12, 0.45)),
        };
        let path = rng.chance(0.3).then(|| {
            let u0 = rng.range(0.25, 0.75) * cam.aspect;
            PathSpec {
                x0: cam.ground_x(u0, z_bottom),
                z0: z_bottom,
                amp: rng.range(0.3, 1.5) * half_view(z_bottom),
                wavelength: z_bottom * rng.range(1.5, 6.0),
                width: rng.range(1.2, 3.5) * cam.height / 12.0,
                z_end: z_bottom * rng.range(4.0, 60.0),
                noise: Noise::new(rng.seed32()),
            }
        });

        let (light_x, shadow_dz) = match sky.sun {
            Some(s) => (clamp01(s.u / cam.aspect) * 2.0 - 1.0, -0.35),
            None => (if rng.chance(0.5) { -0.8 } else { 0.8 }, 0.25),
        };
        let mut layout = Layout {
            time,
            cam,
            sky,
            clouds,
            ranges,
            snow_alt,
            snow_noise,
            visibility,
            mat,
            water,
            beach,
            path,
            sprites: Vec::new(),
            light_x,
            shadow_dz,
            ground_noise: Noise::new(rng.seed32()),
            detail_noise: Noise::new(rng.seed32()),
            shore_noise: Noise::new(rng.seed32()),
            ripple_noise: Noise::new(rng.seed32()),
            ripple: if water_kind == WaterKind::Sea {
                rng.range(0.15, 0.5)
            } else {
                rng.range(0.04, 0.25)
            },
            wave_len: rng.range(1.5, 5.0) * cam.height / 12.0,
            grass_gradient: z_bottom * rng.range(4.0, 12.0),
        };
        layout.place_sprites(&mut rng);
        layout
    }

    /// The ground cover at world point (x, z).
    pub(crate) fn ground_at(&self, x: f32, z: f32) -> Ground {
        match self.water {
            Water::None => {}
            Water::Lake {
                x: cx,
                z: cz,
                rx,
                rz,
                noise,
            } => {
                let (dx, dz) = ((x - cx) / rx, (z - cz) / rz);
                let r =
                    (dx * dx + dz * dz).sqrt() + 0.35 * (noise.fbm2(dx * 1.6, dz * 1.6, 4) - 0.5);
                if r < 1.0 {
                    return Ground::Water {
                        shore: (1.0 - r) * rx.min(rz),
                    };
                }
                if let Some(bw) = self.beach {
                    let bw = bw * (0.6 + 0.8 * self.shore_noise.fbm2(dx * 3.0, dz * 3.0, 3));
                    if r < 1.0 + bw {
                        return Ground::Sand {
                            wet: 1.0 - (r - 1.0) / bw,
                        };
                    }
                }
            }
            Water::Sea {
                z: zs,
                slant,
                coast_len,
                noise,
            } => {
                let coast = zs
                    * (1.0
                        + slant * x / (zs / self.cam.focal).max(1e-3)
                        + 0.6 * (noise.fbm1(x / coast_len + 11.0, 4) - 0.5));
                let coast = coast.max(zs * 0.15);
                let d = z - coast;
                if d > 0.0 {
                    return Ground::Water { shore: d };
                }
                if let Some(bw) = self.beach {
                    let bw = bw * (0.6 + 0.8 * self.shore_noise.fbm1(x / coast_len * 2.0, 3));
                    if d > -bw {
                        return Ground::Sand { wet: 1.0 + d / bw };
                    }
                }
            }
        }
        if let Some(p) = &self.path {
            if z < p.z_end {
                let center = p.x0 + p.amp * (2.0 * p.noise.fbm1(z / p.wavelength, 3) - 1.0)
                    - p.amp * (2.0 * p.noise.fbm1(p.z0 / p.wavelength, 3) - 1.0);
                let taper = 1.0 - smooth_end(z / p.z_end);
                let half = 0.5 * p.width * taper * (0.8 + 0.4 * p.noise.value1(z * 0.7 + 50.0));
                let off = (x - center).abs();
                if off < half {
                    return Ground::Path { edge: off / half };
                }
            }
        }
        Ground::Grass
    }

    fn place_sprites(&mut self, rng: &mut Rand) {
        let cam = self.cam;
        let z_min = cam.ground_z(1.15);
        let mut sprites = Vec::new();
        let tree_scale = rng.range(0.8, 1.3);
        let conifer_share = match rng.weighted(&[0.4, 0.35, 0.25]) {
            0 => 0.0,
            1 => 0.5,
            _ => 1.0,
        };
        // A point of the visible ground from a screen position.
        let ground_point = |u: f32, v: f32| {
            let z = cam.ground_z(v.max(cam.horizon + 1e-3));
            (cam.ground_x(u, z), z)
        };
        let add_tree = |rng: &mut Rand, layout: &Layout, x: f32, z: f32, small: f32| {
            if z < z_min || layout.ground_at(x, z) != Ground::Grass {
                return None;
            }
            // Not taller than the frame: a tree that near would hide the scene.
            let max_height = 0.9 * z / cam.focal;
            let conifer = rng.chance(conifer_share);
            let height = small
                * tree_scale
                * if conifer {
                    rng.range(8.0, 20.0)
                } else {
                    rng.range(6.0, 14.0)
                };
            if height > max_height {
                return None;
            }
            let n_blobs = rng.int(4, 7);
            let mut blobs = vec![[0.0, 0.05, 0.72]];
            for _ in 1..n_blobs {
                let a = rng.signed();
                let b = rng.signed();
                blobs.push([a * 0.7, b * 0.45 - 0.05, rng.range(0.42, 0.62)]);
            }
            Some(Sprite::Tree(Tree {
                x,
                z,
                height,
                conifer,
                crown: if conifer { 0.2 } else { rng.range(0.3, 0.42) },
                blobs,
                tint: rng.signed(),
                noise: Noise::new(rng.seed32()),
            }))
        };
        if !rng.chance(0.15) {
            let n_clusters = rng.int(0, 4);
            for _ in 0..n_clusters {
                let near = rng.f();
                let (cx, cz) = ground_point(
                    rng.range(-0.1, cam.aspect + 0.1),
                    cam.horizon + (1.05 - cam.horizon) * near * near * rng.range(0.15, 1.0),
                );
                let n = rng.int(2, 12);
                let spread = rng.range(5.0, 20.0) * tree_scale;
                for _ in 0..n {
                    let x = cx + rng.bell() * spread;
                    let z = cz + rng.bell() * spread;
                    if let Some(t) = add_tree(rng, self, x, z, 1.0) {
                        sprites.push(t);
                    }
                }
            }
            let singles = rng.int(0, 5);
            for _ in 0..singles {
                let (x, z) = ground_point(
                    rng.range(0.0, cam.aspect),
                    cam.horizon + (1.1 - cam.horizon) * rng.f(),
                );
                if let Some(t) = add_tree(rng, self, x, z, 1.0) {
                    sprites.push(t);
                }
            }
            if rng.chance(0.4) {
                // A tree line on the far ground.
                let v = cam.horizon + (1.0 - cam.horizon) * rng.range(0.015, 0.12);
                let z0 = cam.ground_z(v);
                let half = 0.6 * cam.aspect * z0 / cam.focal;
                let gaps = Noise::new(rng.seed32());
                let gap_len = half * rng.range(0.2, 0.8);
                let threshold = rng.range(0.3, 0.55);
                let n = rng.int(40, 120);
                for _ in 0..n {
                    let x = rng.signed() * half;
                    let z = z0 * (1.0 + 0.3 * rng.f());
                    if gaps.fbm1(x / gap_len, 3) < threshold {
                        continue;
                    }
                    if let Some(t) = add_tree(rng, self, x, z, 1.0) {
                        sprites.push(t);
                    }
                }
            }
        }
        if rng.chance(0.55) {
            let n = rng.int(1, 6);
            for _ in 0..n {
                let (x, z) = ground_point(
                    rng.range(0.0, cam.aspect),
                    cam.horizon + (1.1 - cam.horizon) * rng.range(0.08, 1.0),
                );
                let ok = z >= z_min
                    && match self.ground_at(x, z) {
                        Ground::Grass | Ground::Sand { .. } => true,
                        Ground::Water { shore } => {
                            matches!(self.water, Water::Sea { .. }) && shore < 0.4 * z
                        }
                        Ground::Path { .. } => false,
                    };
                if !ok {
                    continue;
                }
                let size = rng.range(0.5, 2.0) * rng.range(0.5, 2.0) * cam.height / 12.0;
                sprites.push(Sprite::Rock(Rock {
                    x,
                    z,
                    size,
                    flat: rng.range(0.5, 0.85),
                    tint: rng.signed(),
                    noise: Noise::new(rng.seed32()),
                }));
            }
        }
        // Far to near; ties keep their drawing order (a stable sort on a total order).
        sprites.sort_by(|a, b| b.z().total_cmp(&a.z()));
        self.sprites = sprites;
    }

    /// Number of trees.
    pub(crate) fn tree_count(&self) -> usize {
        self.sprites
            .iter()
            .filter(|s| matches!(s, Sprite::Tree(_)))
            .count()
    }

    /// Number of rocks.
    pub(crate) fn rock_count(&self) -> usize {
        self.sprites
            .iter()
            .filter(|s| matches!(s, Sprite::Rock(_)))
            .count()
    }
}

/// 0 until 0.6, then smoothly to 1 at 1.
fn smooth_end(t: f32) -> f32 {
    super::noise::smoothstep(0.6, 1.0, t)
}
