//! The renderer: paints a [`Layout`] into colour, label and inverse-depth buffers.
//!
//! Layers go back to front with a depth test on inverse depth (larger = nearer): sky and clouds,
//! mountain ranges far to near, the ground plane (grass, sand, path, water), then trees and rocks
//! far to near. Water is coloured last, from the reflected ray: for a water pixel the reflected
//! ray crosses the image column upward, and the first standing thing it passes behind (or the
//! sky it reaches) is what the water mirrors, with ripples, a Fresnel mix and darkening.

use super::layout::{add, mix, modulate, scale, Ground, Layout, Rgb, Rock, Sprite, Tree, Water};
use super::noise::{clamp01, ifloor, smoothstep};
use super::{CLOUD, GRASS, MOUNTAIN, PATH, ROCK, SAND, SKY, SNOW, TREE, WATER};

/// The float buffers of one rendered scene (row-major).
pub(crate) struct Canvas {
    pub rgb: Vec<Rgb>,
    pub label: Vec<u8>,
    /// Inverse depth (1 / metres); 0 for the sky.
    pub invd: Vec<f32>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            rgb: vec![[0.0; 3]; w * h],
            label: vec![SKY; w * h],
            invd: vec![0.0; w * h],
        }
    }

    #[inline]
    fn set(&mut self, i: usize, rgb: Rgb, label: u8, invd: f32) {
        self.rgb[i] = rgb;
        self.label[i] = label;
        self.invd[i] = invd;
    }
}

/// Labels of things that stand up (and so show in reflections).
#[inline]
fn upright(label: u8) -> bool {
    matches!(label, SKY | CLOUD | MOUNTAIN | SNOW | TREE | ROCK)
}

/// Light direction in image space (x right, y down, z toward the viewer), normalised.
fn light_dir(light_x: f32) -> [f32; 3] {
    let l = [0.75 * light_x, -0.65, 0.45];
    let n = (l[0] * l[0] + l[1] * l[1] + l[2] * l[2]).sqrt();
    [l[0] / n, l[1] / n, l[2] / n]
}

struct Renderer<'a> {
    lay: &'a Layout,
    /// Frame height in pixels, as a float (the unit of `u` and `v`).
    hpx: f32,
    w: usize,
    h: usize,
    light: [f32; 3],
}

/// Renders `lay` at `w` x `h`.
pub(crate) fn paint(lay: &Layout, w: u32, h: u32) -> Canvas {
    let (w, h) = (w as usize, h as usize);
    let mut c = Canvas::new(w, h);
    if w == 0 || h == 0 {
        return c;
    }
    let r = Renderer {
        lay,
        hpx: h as f32,
        w,
        h,
        light: light_dir(lay.light_x),
    };
    r.sky(&mut c);
    r.mountains(&mut c);
    r.ground(&mut c);
    for s in &lay.sprites {
        match s {
            Sprite::Tree(t) => r.tree(&mut c, t),
            Sprite::Rock(k) => r.rock(&mut c, k),
        }
    }
    r.water(&mut c);
    c
}

impl Renderer<'_> {
    #[inline]
    fn u(&self, x: usize) -> f32 {
        (x as f32 + 0.5) / self.hpx
    }

    #[inline]
    fn v(&self, y: usize) -> f32 {
        (y as f32 + 0.5) / self.hpx
    }

    /// Haze share at distance `z`.
    #[inline]
    fn haze(&self, z: f32) -> f32 {
        z / (z + self.lay.visibility)
    }

    /// Lit and hazed surface colour.
    #[inline]
    fn finish(&self, albedo: Rgb, z: f32) -> Rgb {
        mix(
            modulate(albedo, self.lay.sky.light),
            self.lay.sky.haze,
            self.haze(z),
        )
    }

    /// Sky (and cloud) seen in the direction of (u, v); `v` may lie above the frame or below the
    /// horizon (for reflections). Returns colour, label and inverse depth.
    fn sky_at(&self, u: f32, v: f32) -> (Rgb, u8, f32) {
        let lay = self.lay;
        let cam = &lay.cam;
        let sky = &lay.sky;
        let t = clamp01((cam.horizon - v) / cam.horizon.max(0.25));
        let g = t * (2.0 - t);
        let mut col = mix(sky.horizon, sky.top, g);
        let mut glow = 0.0;
        let mut sun_color = [1.0, 1.0, 1.0];
        if let Some(sun) = sky.sun {
            let (du, dv) = (u - sun.u, v - sun.v);
            let d2 = du * du + dv * dv;
            let r2 = sun.radius * sun.radius;
            glow = sun.glow * (r2 * 40.0) / (d2 + r2 * 40.0) + 0.5 * (r2 * 2.0) / (d2 + r2 * 2.0);
            sun_color = sun.color;
            col = add(col, scale(sun.color, glow));
            if d2 < r2 {
                col = mix(sun.color, [1.0, 1.0, 0.96], 0.6);
            }
        }
        let mut label = SKY;
        let mut invd = 0.0;
        if let Some(cl) = &lay.clouds {
            let dz = cam.horizon - v;
            if dz > 1e-4 {
                // The plane's depth is eased near the horizon (dz + 0.1) so that far clouds
                // flatten without turning into streaks.
                let zc = cam.focal * cl.altitude / (dz + 0.1);
                let x = (u - 0.5 * cam.aspect) * zc / cam.focal;
                let sx = cl.scale * cl.stretch;
                let (nx, nz) = (x / sx, zc / cl.scale);
                let fpx = zc / (cam.focal * self.hpx) / sx;
                let fpz = cam.focal * cl.altitude / ((dz + 0.1) * (dz + 0.1) * self.hpx) / cl.scale;
                let fp = fpx.max(0.5 * fpz);
                let d = cl.noise.fbm2_lod(nx, nz, 6, fp);
                let th = 0.64 - 0.26 * cl.cover;
                let a = smoothstep(th, th + cl.soft, d) * smoothstep(0.0, 0.07, dz);
                if a > 0.0 {
                    // Nearer parts of the cloud plane lie higher in the image: compare with the
                    // density just above to light the tops and shade the bellies.
                    let up = cl.noise.fbm2_lod(nx, nz - 0.05, 6, fp);
                    let lit = clamp01(0.62 + (d - up) * 4.0 - (d - th) * 1.0);
                    let cc = mix(sky.cloud_shade, sky.cloud_lit, lit);
                    let cc = add(cc, scale(sun_color, glow * 0.6));
                    col = mix(col, cc, a);
                    if a > 0.5 {
                        label = CLOUD;
                        invd = 1.0 / zc.max(cl.min_z);
                    }
                }
            }
        }
        (col, label, invd)
    }

    fn sky(&self, c: &mut Canvas) {
        let hv = self.lay.cam.horizon;
        for y in 0..self.h {
            let v = self.v(y);
            if v > hv {
                break;
            }
            for x in 0..self.w {
                let (col, label, invd) = self.sky_at(self.u(x), v);
                c.set(y * self.w + x, col, label, invd);
            }
        }
    }

    fn mountains(&self, c: &mut Canvas) {
        let lay = self.lay;
        let cam = lay.cam;
        let lx = lay.light_x;
        for range in &lay.ranges {
            let vb = cam.base_v(range.z);
            let invd = 1.0 / range.z;
            let haze = self.haze(range.z);
            let step = 3.0 / self.hpx;
            let peak_world = range.amp * range.z / cam.focal;
            let s = 3.0 / range.wavelength;
            let y_end = ifloor(vb * self.hpx - 0.5).min(self.h as i32 - 1);
            for x in 0..self.w {
                let u = self.u(x);
                let p = range.profile(u);
                if p <= 0.0 {
                    continue;
                }
                let vr = vb - range.amp * p;
                let slope = (range.profile_low(u + step) - range.profile_low(u - step))
                    / (2.0 * step)
                    * range.amp;
                let y0 = ifloor(vr * self.hpx - 0.5).saturating_add(1).max(0);
                for y in y0..=y_end {
                    let y = y as usize;
                    let i = y * self.w + x;
                    if invd <= c.invd[i] {
                        continue;
                    }
                    let v = self.v(y);
                    let below = ((v - vr) / range.amp.max(1e-4)).max(0.0);
                    // Gullies: noise stretched down the slope; its horizontal gradient lights
                    // one flank and shades the other.
                    let fq = (u * s * 2.0, v * s * 0.7);
                    let e = 0.02;
                    let g = (range.face_noise.fbm2(fq.0 + e, fq.1, 4)
                        - range.face_noise.fbm2(fq.0 - e, fq.1, 4))
                        / (2.0 * e);
                    let w_ridge = 1.0 / (1.0 + below * 4.0);
                    let facing = -(slope * 1.6 * w_ridge + g * 0.12 * (1.0 - w_ridge * 0.5));
                    let lam = clamp01(0.55 + 0.5 * facing * lx);
                    let tex = range.face_noise.fbm2(u * s * 9.0 + 40.0, v * s * 9.0, 3);
                    let world_y = (vb - v) * range.z / cam.focal;
                    let sn = lay.snow_noise.fbm2(u * s * 2.5, v * s * 1.2, 4);
                    let snowy =
                        world_y + (sn - 0.5) * 0.6 * peak_world + (lam - 0.5) * 0.25 * peak_world
                            > lay.snow_alt;
                    let (albedo, label) = if snowy {
                        (scale(lay.mat.snow, 0.7 + 0.4 * lam), SNOW)
                    } else {
                        (
                            scale(range.color, (0.5 + 0.8 * lam) * (0.82 + 0.36 * tex)),
                            MOUNTAIN,
                        )
                    };
                    let lit = modulate(albedo, lay.sky.light);
                    let mist = 0.32 * smoothstep(0.55, 1.0, (v - vr) / (vb - vr).max(1e-6));
                    let mut hz = haze + (1.0 - haze) * mist;
                    if label == SNOW {
                        // Bright snow shows through the haze better than rock.
                        hz *= 0.7;
                    }
                    c.set(i, mix(lit, lay.sky.haze, hz), label, invd);
                }
            }
        }
    }

    fn ground(&self, c: &mut Canvas) {
        let lay = self.lay;
        let cam = lay.cam;
        let mat = &lay.mat;
        for y in 0..self.h {
            let v = self.v(y);
            if v <= cam.horizon {
                continue;
            }
            let z = cam.ground_z(v);
            let invd = 1.0 / z;
            // A pixel's footprint on the ground, across and along the view.
            let fpx = z / (cam.focal * self.hpx);
            let fpz = fpx * z / cam.height;
            let fp = fpx.max(0.35 * fpz);
            let base_grass = mix(mat.grass_near, mat.grass_far, z / (z + lay.grass_gradient));
            for x in 0..self.w {
                let i = y * self.w + x;
                if invd <= c.invd[i] {
                    continue;
                }
                let gx = cam.ground_x(self.u(x), z);
                let (albedo, label) = match lay.ground_at(gx, z) {
                    Ground::Grass => {
                        let patch = lay.ground_noise.fbm2_lod(gx / 12.0, z / 12.0, 5, fp / 12.0);
                        let hue =
                            lay.ground_noise
                                .fbm2_lod(gx / 30.0 + 70.0, z / 30.0, 3, fp / 30.0);
                        let detail = lay.detail_noise.fbm2_lod(gx * 1.3, z * 1.3, 5, fp * 1.3);
                        let blades = lay.detail_noise.fbm2_lod(gx * 9.0, z * 2.0, 2, fpx * 9.0);
                        let col = mix(
                            base_grass,
                            mat.grass_far,
                            0.45 * smoothstep(0.45, 0.75, hue),
                        );
                        let m =
                            (0.62 + 0.7 * patch) * (0.82 + 0.36 * detail) * (0.88 + 0.24 * blades);
                        (scale(col, m), GRASS)
                    }
                    Ground::Sand { wet } => {
                        let grain = lay.detail_noise.fbm2_lod(gx * 0.9, z * 0.9, 4, fp * 0.9);
                        let ripples = lay.ground_noise.fbm2_lod(gx * 0.25, z * 2.2, 3, fp * 2.2);
                        let col = mix(mat.sand, mat.wet_sand, smoothstep(0.45, 0.95, wet));
                        (
                            scale(col, (0.86 + 0.26 * grain) * (0.93 + 0.14 * ripples)),
                            SAND,
                        )
                    }
                    Ground::Path { edge } => {
                        let grain = lay
                            .detail_noise
                            .fbm2_lod(gx * 1.6 + 9.0, z * 1.6, 5, fp * 1.6);
                        let m = (0.78 + 0.4 * grain) * (1.0 - 0.22 * smoothstep(0.65, 1.0, edge));
                        (scale(mat.path, m), PATH)
                    }
                    Ground::Water { .. } => (mat.water, WATER),
                };
                c.set(i, self.finish(albedo, z), label, invd);
            }
        }
    }

    /// Darkens the ground inside an ellipse (world radii `rx`, `rz`) around (`cx`, `cz`).
    fn shadow(&self, c: &mut Canvas, cx: f32, cz: f32, rx: f32, rz: f32, strength: f32) {
        let cam = self.lay.cam;
        let z_near = (cz - rz).max(cam.ground_z(2.0));
        let z_far = cz + rz;
        let y0 = ifloor(cam.base_v(z_far) * self.hpx - 0.5).max(0);
        let y1 = ifloor(cam.base_v(z_near) * self.hpx - 0.5)
            .saturating_add(1)
            .min(self.h as i32 - 1);
        let ua = cam
            .screen_u(cx - rx, z_near)
            .min(cam.screen_u(cx - rx, z_far));
        let ub = cam
            .screen_u(cx + rx, z_near)
            .max(cam.screen_u(cx + rx, z_far));
        let x0 = ifloor(ua * self.hpx - 0.5).max(0);
        let x1 = ifloor(ub * self.hpx - 0.5)
            .saturating_add(1)
            .min(self.w as i32 - 1);
        for y in y0..=y1 {
            let v = self.v(y as usize);
            if v <= cam.horizon {
                continue;
            }
            let z = cam.ground_z(v);
            for x in x0..=x1 {
                let i = y as usize * self.w + x as usize;
                if !matches!(c.label[i], GRASS | SAND | PATH) {
                    continue;
                }
                let gx = cam.ground_x(self.u(x as usize), z);
                let (dx, dz) = ((gx - cx) / rx, (z - cz) / rz);
                let d = dx * dx + dz * dz;
                if d < 1.0 {
                    let k = 1.0 - strength * smoothstep(1.0, 0.45, d);
                    c.rgb[i] = scale(c.rgb[i], k);
                }
            }
        }
    }

    fn tree(&self, c: &mut Canvas, t: &Tree) {
        let lay = self.lay;
        let cam = lay.cam;
        let s = cam.focal * self.hpx / t.z;
        let th = t.height * s;
        if th < 0.8 {
            return;
        }
        let xb = cam.screen_u(t.x, t.z) * self.hpx - 0.5;
        let yb = cam.base_v(t.z) * self.hpx - 0.5;
        let r = t.crown * th;
        if xb + 1.4 * r + 1.0 < 0.0 || xb - 1.4 * r - 1.0 > self.w as f32 {
            return;
        }
        let crown_world = t.crown * t.height;
        if th >= 3.0 {
            let reach = t.height * 0.5;
            self.shadow(
                c,
                t.x - lay.light_x * reach * 0.7,
                t.z + lay.shadow_dz * reach,
                crown_world * 1.2,
                crown_world * (1.2 + lay.shadow_dz.abs()),
                0.42,
            );
        }
        let invd = 1.0 / (t.z - 0.5 * crown_world).max(0.5);
        let haze = self.haze(t.z);
        let tint = [1.0 + 0.25 * t.tint, 1.0 + 0.08 * t.tint, 1.0 - 0.2 * t.tint];
        let albedo = modulate(
            if t.conifer {
                lay.mat.conifer
            } else {
                lay.mat.tree
            },
            tint,
        );
        let trunk_w = (0.035 * th).max(0.5);
        let l = self.light;
        let x0 = ifloor(xb - 1.4 * r).max(0);
        let x1 = ifloor(xb + 1.4 * r)
            .saturating_add(1)
            .min(self.w as i32 - 1);
        let y0 = ifloor(yb - th - 0.2 * r).max(0);
        let y1 = ifloor(yb + 0.5).min(self.h as i32 - 1);
        let yc = yb - th + r;
        let cone_bottom = yb - 0.1 * th;
        let cone_w = r * 1.15;
        let tiers = 3.0 + (t.tint + 1.0) * 1.5;
        for py in y0..=y1 {
            let fy = py as f32;
            for px in x0..=x1 {
                let i = py as usize * self.w + px as usize;
                if invd <= c.invd[i] {
                    continue;
                }
                let fx = px as f32;
                let mut shade = None;
                if t.conifer {
                    let q = (cone_bottom - fy) / (cone_bottom - (yb - th));
                    if (0.0..=1.0).contains(&q) {
                        let tier = q * tiers;
                        let frac = tier - ifloor(tier) as f32;
                        let jag =
                            0.85 + 0.3 * t.noise.value2(fx * 0.9 / (r * 0.2).max(0.5), fy * 0.4);
                        let hw = cone_w * (1.0 - q) * (1.0 - 0.35 * frac) * jag + 0.3;
                        let off = fx - xb;
                        if off.abs() < hw {
                            let side = off / hw.max(0.5);
                            let needles =
                                t.noise
                                    .fbm2(fx / (r * 0.25).max(0.7), fy / (r * 0.25).max(0.7), 3);
                            let lam =
                                clamp01(0.42 + 0.45 * side * lay.light_x + 0.25 * (1.0 - frac));
                            shade = Some((0.35 + 0.8 * lam) * (0.75 + 0.5 * needles));
                        }
                    }
                } else {
                    let en = (t
                        .noise
                        .value2(fx / (r * 0.35).max(0.6), fy / (r * 0.35).max(0.6))
                        - 0.5)
                        * 0.55;
                    let mut best: Option<(f32, f32, f32, f32)> = None;
                    for b in &t.blobs {
                        let (bx, by, br) = (xb + b[0] * r, yc + b[1] * r, b[2] * r + 0.35);
                        let (nx, ny) = ((fx - bx) / br, (fy - by) / br);
                        let d2 = nx * nx + ny * ny;
                        if d2 < 1.0 + en {
                            let height = (1.0 - d2).max(0.0).sqrt() * br;
                            if best.is_none_or(|bb| height > bb.0) {
                                best = Some((height, nx, ny, (1.0 - d2).max(0.0).sqrt()));
                            }
                        }
                    }
                    if let Some((_, nx, ny, nz)) = best {
                        let lam = (nx * l[0] + ny * l[1] + nz * l[2]).max(0.0);
                        let leaves =
                            t.noise
                                .fbm2(fx / (r * 0.22).max(0.6), fy / (r * 0.22).max(0.6), 3);
                        let low = clamp01((fy - yc) / r.max(0.5));
                        shade =
                            Some((0.32 + 0.85 * lam) * (0.72 + 0.56 * leaves) * (1.0 - 0.3 * low));
                    }
                }
                let col = match shade {
                    Some(k) => scale(albedo, k),
                    None => {
                        let trunk_top = if t.conifer { cone_bottom - 1.0 } else { yc };
                        let off = fx - xb;
                        if th >= 4.0 && off.abs() <= trunk_w && fy > trunk_top && fy <= yb + 0.5 {
                            let lit = if off * lay.light_x > 0.0 { 1.0 } else { 0.65 };
                            scale(lay.mat.trunk, lit)
                        } else {
                            continue;
                        }
                    }
                };
                let col = mix(modulate(col, lay.sky.light), lay.sky.haze, haze);
                c.set(i, col, TREE, invd);
            }
        }
    }

    fn rock(&self, c: &mut Canvas, k: &Rock) {
        let lay = self.lay;
        let cam = lay.cam;
        let s = cam.focal * self.hpx / k.z;
        let r = 0.5 * k.size * s;
        if r < 0.4 {
            return;
        }
        let xb = cam.screen_u(k.x, k.z) * self.hpx - 0.5;
        let yb = cam.base_v(k.z) * self.hpx - 0.5;
        let rv = r * k.flat;
        let yc = yb - 0.45 * rv;
        if r >= 1.5 {
            self.shadow(
                c,
                k.x - lay.light_x * k.size * 0.45,
                k.z + lay.shadow_dz * k.size,
                k.size * 0.75,
                k.size * 0.75,
                0.45,
            );
        }
        let invd = 1.0 / (k.z - 0.5 * k.size).max(0.5);
        let haze = self.haze(k.z);
        let albedo = modulate(
            lay.mat.rock,
            [1.0 + 0.08 * k.tint, 1.0, 1.0 - 0.08 * k.tint],
        );
        let l = self.light;
        let x0 = ifloor(xb - 1.3 * r).max(0);
        let x1 = ifloor(xb + 1.3 * r)
            .saturating_add(1)
            .min(self.w as i32 - 1);
        let y0 = ifloor(yc - 1.3 * rv).max(0);
        let y1 = ifloor(yc + 1.3 * rv)
            .saturating_add(1)
            .min(self.h as i32 - 1);
        for py in y0..=y1 {
            for px in x0..=x1 {
                let i = py as usize * self.w + px as usize;
                if invd <= c.invd[i] {
                    continue;
                }
                let dx = (px as f32 - xb) / (r + 0.3);
                let dy = (py as f32 - yc) / (rv + 0.3);
                let en = (k.noise.value2(dx * 2.2, dy * 2.2) - 0.5) * 0.45;
                let d2 = dx * dx + dy * dy;
                if d2 >= 1.0 + en {
                    continue;
                }
                let nz = (1.0 - d2).max(0.0).sqrt();
                // Facets: bend the normal by the noise gradient.
                let f1 = k.noise.fbm2(dx * 3.0 + 5.0, dy * 3.0, 3);
                let f2 = k.noise.fbm2(dx * 3.0 + 5.1, dy * 3.0, 3);
                let (nx, ny) = (dx + (f2 - f1) * 6.0, dy);
                let n = (nx * nx + ny * ny + nz * nz).sqrt().max(1e-4);
                let lam = ((nx * l[0] + ny * l[1] + nz * l[2]) / n).max(0.0);
                let tex = k.noise.fbm2(dx * 6.0 + 20.0, dy * 6.0, 3);
                let col = scale(albedo, (0.28 + 0.9 * lam) * (0.78 + 0.44 * tex));
                let col = mix(modulate(col, lay.sky.light), lay.sky.haze, haze);
                c.set(i, col, ROCK, invd);
            }
        }
    }

    fn water(&self, c: &mut Canvas) {
        let lay = self.lay;
        let cam = lay.cam;
        let hv = cam.horizon;
        let fh2 = 2.0 * cam.focal * cam.height;
        let body = modulate(lay.mat.water, lay.sky.light);
        let sea = matches!(lay.water, Water::Sea { .. });
        for y in 0..self.h {
            let v = self.v(y);
            if v <= hv {
                continue;
            }
            let z = cam.ground_z(v);
            let invd = 1.0 / z;
            let fpx = z / (cam.focal * self.hpx);
            let fpz = fpx * z / cam.height;
            let wl = lay.wave_len;
            // Schlick's Fresnel term from the grazing angle.
            let sin_t = (v - hv) / cam.focal;
            let sin_t = sin_t / (1.0 + sin_t * sin_t).sqrt();
            let m = 1.0 - sin_t;
            let fresnel = 0.08 + 0.92 * m * m * m * m;
            for x in 0..self.w {
                let i = y * self.w + x;
                if c.label[i] != WATER {
                    continue;
                }
                let u = self.u(x);
                let gx = cam.ground_x(u, z);
                let r1 =
                    lay.ripple_noise
                        .fbm2_lod(gx / (wl * 3.0), z / wl, 4, fpz.max(fpx * 3.0) / wl);
                let r2 = lay.ripple_noise.fbm2_lod(
                    gx / (wl * 3.0) + 31.0,
                    z / wl,
                    3,
                    fpz.max(fpx * 3.0) / wl,
                );
                let ve = v + (v - hv) * lay.ripple * 1.6 * (r1 - 0.5);
                let ue = u + (v - hv) * lay.ripple * 0.5 * (r2 - 0.5);
                let xs = ifloor(ue * self.hpx).clamp(0, self.w as i32 - 1) as usize;
                // March the reflected ray up the column: at row r it is at distance
                // 2 f h / (r + ve - 2 hv); it hits the first standing thing not in front of the
                // water point that lies nearer than that.
                let mut refl = None;
                let mut yy = y;
                while yy > 0 {
                    yy -= 1;
                    let j = yy * self.w + xs;
                    let lab = c.label[j];
                    if !upright(lab) {
                        continue;
                    }
                    let need = (self.v(yy) + ve - 2.0 * hv) / fh2;
                    let d = c.invd[j];
                    if d < invd && d >= need {
                        refl = Some(c.rgb[j]);
                        break;
                    }
                }
                let refl = match refl {
                    Some(col) => col,
                    None => self.sky_at(ue, 2.0 * hv - ve).0,
                };
                let refl = mix(scale(refl, 0.86), modulate(refl, [0.8, 0.92, 1.0]), 0.5);
                let surface = mix(body, lay.sky.haze, self.haze(z) * 0.8);
                let mut col = mix(surface, refl, fresnel);
                if sea {
                    if let Ground::Water { shore } = lay.ground_at(gx, z) {
                        let foam_w = wl * 0.6 * (0.5 + lay.shore_noise.fbm2(gx / wl, z / wl, 3));
                        let f = smoothstep(foam_w, 0.0, shore)
                            + 0.35
                                * smoothstep(0.72, 0.85, r1)
                                * smoothstep(foam_w * 6.0, foam_w, shore);
                        col = mix(
                            col,
                            modulate([0.92, 0.95, 0.96], lay.sky.light),
                            clamp01(f) * 0.85,
                        );
                    }
                }
                c.rgb[i] = col;
            }
        }
    }
}
