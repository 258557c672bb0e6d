//! Seeded randomness for the procedural scenes: a ChaCha8 stream for the composition and
//! hand-written value noise / fractal Brownian motion (fBm) for textures and shapes.
//!
//! The noise hashes integer lattice points (MurmurHash3's finaliser) and interpolates with a
//! quintic fade; it uses only `+ - * /`, comparisons and integer casts, so it gives bit-identical
//! results on every IEEE-754 machine. `*_lod` variants drop the octaves finer than a pixel
//! (given as the pixel's footprint in noise units), which keeps far textures from aliasing.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// MurmurHash3's 32-bit finaliser: a bijective avalanche mix.
#[inline]
pub(crate) fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// SplitMix64's finaliser: a bijective avalanche mix on 64 bits.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline]
fn unit(h: u32) -> f32 {
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// `floor` as an integer, without a libm call.
#[inline]
pub(crate) fn ifloor(x: f32) -> i32 {
    let i = x as i32;
    if (i as f32) > x {
        i - 1
    } else {
        i
    }
}

#[inline]
fn fade(t: f32) -> f32 {
    t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
}

/// Linear interpolation.
#[inline]
pub(crate) fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

/// Clamps to [0, 1].
#[inline]
pub(crate) fn clamp01(x: f32) -> f32 {
    x.clamp(0.0, 1.0)
}

/// Hermite step from 0 at `a` to 1 at `b`.
#[inline]
pub(crate) fn smoothstep(a: f32, b: f32, x: f32) -> f32 {
    let t = clamp01((x - a) / (b - a));
    t * t * (3.0 - 2.0 * t)
}

/// Seeded value noise in [0, 1].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Noise {
    seed: u32,
}

const OCTAVE_SEED: u32 = 0x632b_e5ab;

impl Noise {
    pub(crate) fn new(seed: u32) -> Self {
        Noise {
            seed: fmix32(seed ^ 0x5bd1_e995),
        }
    }

    #[inline]
    fn octave(&self, i: u32) -> Noise {
        Noise {
            seed: self.seed.wrapping_add(i.wrapping_mul(OCTAVE_SEED)),
        }
    }

    #[inline]
    fn lattice1(&self, x: i32) -> f32 {
        unit(fmix32(self.seed ^ (x as u32).wrapping_mul(0x9e37_79b1)))
    }

    #[inline]
    fn lattice2(&self, x: i32, y: i32) -> f32 {
        let h = fmix32(self.seed ^ (x as u32).wrapping_mul(0x9e37_79b1));
        unit(fmix32(h ^ (y as u32).wrapping_mul(0x85eb_ca77)))
    }

    /// 1-D value noise.
    #[inline]
    pub(crate) fn value1(&self, x: f32) -> f32 {
        let i = ifloor(x);
        let t = fade(x - i as f32);
        lerp(self.lattice1(i), self.lattice1(i.wrapping_add(1)), t)
    }

    /// 2-D value noise.
    #[inline]
    pub(crate) fn value2(&self, x: f32, y: f32) -> f32 {
        let (ix, iy) = (ifloor(x), ifloor(y));
        let (tx, ty) = (fade(x - ix as f32), fade(y - iy as f32));
        let (jx, jy) = (ix.wrapping_add(1), iy.wrapping_add(1));
        let a = lerp(self.lattice2(ix, iy), self.lattice2(jx, iy), tx);
        let b = lerp(self.lattice2(ix, jy), self.lattice2(jx, jy), tx);
        lerp(a, b, ty)
    }

    /// 1-D fBm (lacunarity 2, gain 0.5), normalised to [0, 1].
    pub(crate) fn fbm1(&self, x: f32, octaves: u32) -> f32 {
        let (mut sum, mut norm, mut amp, mut freq) = (0.0, 0.0, 1.0, 1.0);
        for i in 0..octaves {
            sum += amp * self.octave(i).value1(x * freq + i as f32 * 17.31);
            norm += amp;
            amp *= 0.5;
            freq *= 2.0;
        }
        if norm > 0.0 {
            sum / norm
        } else {
            0.5
        }
    }

    /// 1-D ridged fBm in [0, 1]: sharp crests where the noise crosses its mean.
    pub(crate) fn ridged1(&self, x: f32, octaves: u32) -> f32 {
        let (mut sum, mut norm, mut amp, mut freq) = (0.0, 0.0, 1.0, 1.0);
        for i in 0..octaves {
            let n = self.octave(i).value1(x * freq + i as f32 * 7.77);
            let r = 1.0 - (2.0 * n - 1.0).abs();
            sum += amp * r * r;
            norm += amp;
            amp *= 0.5;
            freq *= 2.0;
        }
        if norm > 0.0 {
            sum / norm
        } else {
            0.5
        }
    }

    /// 2-D fBm normalised to [0, 1].
    pub(crate) fn fbm2(&self, x: f32, y: f32, octaves: u32) -> f32 {
        self.fbm2_lod(x, y, octaves, 0.0)
    }

    /// 2-D fBm whose octaves finer than `footprint` (a pixel's size in noise units) fade to
    /// their mean, so that a texture seen far away turns smooth instead of aliasing.
    pub(crate) fn fbm2_lod(&self, x: f32, y: f32, octaves: u32, footprint: f32) -> f32 {
        let (mut sum, mut norm, mut amp, mut freq) = (0.0, 0.0, 1.0, 1.0);
        // Amplitude of the dropped octaves: they count at their mean, 0.5.
        let mut rest = 0.0;
        for i in 0..octaves {
            // Wavelength 1/freq against the footprint: full weight from two pixels up, none
            // at one pixel or less.
            let w = clamp01(1.0 / (freq * footprint.max(1e-9)) - 1.0);
            if w <= 0.0 {
                let mut a = amp;
                for _ in i..octaves {
                    rest += a;
                    a *= 0.5;
                }
                break;
            }
            let n = self
                .octave(i)
                .value2(x * freq + i as f32 * 17.31, y * freq - i as f32 * 9.13);
            sum += amp * (0.5 + w * (n - 0.5));
            norm += amp;
            amp *= 0.5;
            freq *= 2.0;
        }
        let total = norm + rest;
        if total > 0.0 {
            (sum + 0.5 * rest) / total
        } else {
            0.5
        }
    }
}

/// The composition's random stream: ChaCha8 seeded from a `u64`, with portable float draws
/// (24 random bits per float, independent of `rand`'s distribution code).
pub(crate) struct Rand(ChaCha8Rng);

impl Rand {
    pub(crate) fn new(seed: u64) -> Self {
        Rand(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in [0, 1).
    pub(crate) fn f(&mut self) -> f32 {
        unit(self.0.next_u32())
    }

    /// Uniform in [a, b).
    pub(crate) fn range(&mut self, a: f32, b: f32) -> f32 {
        a + (b - a) * self.f()
    }

    /// Uniform in [-1, 1).
    pub(crate) fn signed(&mut self) -> f32 {
        self.f() * 2.0 - 1.0
    }

    /// Roughly normal with mean 0 and unit-ish spread (sum of three uniforms).
    pub(crate) fn bell(&mut self) -> f32 {
        (self.signed() + self.signed() + self.signed()) * 0.6
    }

    /// Uniform integer in `lo..=hi`.
    pub(crate) fn int(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + (self.0.next_u64() % ((hi - lo + 1) as u64)) as usize
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f32) -> bool {
        self.f() < p
    }

    /// A fresh 32-bit seed for a noise field.
    pub(crate) fn seed32(&mut self) -> u32 {
        self.0.next_u32()
    }

    /// Index drawn with the given (non-negative) weights.
    pub(crate) fn weighted(&mut self, weights: &[f32]) -> usize {
        let total: f32 = weights.iter().sum();
        let mut x = self.f() * total;
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        weights.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_bounded_and_seeded() {
        let a = Noise::new(1);
        let b = Noise::new(2);
        let mut differ = 0;
        for i in 0..500 {
            let x = i as f32 * 0.37 - 50.0;
            let y = i as f32 * 0.11 + 3.0;
            for v in [
                a.value1(x),
                a.value2(x, y),
                a.fbm1(x, 5),
                a.ridged1(x, 4),
                a.fbm2(x, y, 6),
            ] {
                assert!((0.0..=1.0).contains(&v), "{v}");
            }
            let l = a.fbm2_lod(x, y, 6, 0.3);
            assert!((0.0..=1.0).contains(&l));
            if a.value2(x, y) != b.value2(x, y) {
                differ += 1;
            }
        }
        assert!(differ > 450);
        assert_eq!(ifloor(-0.5), -1);
        assert_eq!(ifloor(2.0), 2);
        assert_eq!(ifloor(-3.0), -3);
    }

    #[test]
    fn lod_smooths_far_octaves() {
        let n = Noise::new(7);
        // A footprint larger than every wavelength gives the mean.
        assert!((n.fbm2_lod(3.3, 4.4, 6, 4.0) - 0.5).abs() < 1e-6);
        // A tiny footprint gives the full fBm.
        let full = n.fbm2_lod(3.3, 4.4, 6, 1e-6);
        let coarse = n.fbm2_lod(3.3, 4.4, 6, 0.2);
        assert!((full - n.fbm2(3.3, 4.4, 6)).abs() < 1e-6);
        assert!((full - coarse).abs() > 0.0);
    }
}
