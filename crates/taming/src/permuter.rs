//! Mirrors `taming/modules/transformer/permuter.py`: fixed permutations of the `H*W` latent
//! positions that set the order in which the transformer sees the tokens (`Identity`,
//! `Subsample`, `ZCurve`, `SpiralOut`, `SpiralIn`, `Random`, `AlternateParsing`).
//!
//! Every permutation is computed exactly as the reference computes it, including
//! `Random`'s `np.random.RandomState(1).permutation(H*W)` (a port of numpy's legacy MT19937
//! seeding and shuffle), so the orders match the `forward_shuffle_idx` /
//! `backward_shuffle_idx` buffers stored in the reference's checkpoints.

use candle_core::Tensor;

use crate::config::PermuterConfig;
use crate::{Error, Result};

/// A fixed permutation of the H*W latent positions (the order in which the transformer sees tokens).
#[derive(Debug, Clone)]
pub struct Permuter {
    /// `forward_shuffle_idx`; `None` for the identity.
    forward: Option<Vec<u32>>,
    /// `backward_shuffle_idx`; `None` for the identity.
    backward: Option<Vec<u32>>,
}

impl Permuter {
    /// The reference's `Identity` permuter: `apply` and `reverse` return their input.
    pub fn identity() -> Self {
        Permuter {
            forward: None,
            backward: None,
        }
    }

    /// Builds the permuter a `permuter_config` block describes, as the reference's constructors
    /// do. Errors where the reference's constructor would fail (an assertion, an index out of
    /// range) or would build buffers that are not permutations of `0..H*W`.
    pub fn from_config(cfg: &PermuterConfig) -> Result<Self> {
        let (forward, backward) = match *cfg {
            PermuterConfig::Identity => return Ok(Self::identity()),
            PermuterConfig::Subsample { h, w } => {
                let forward = subsample(h, w)?;
                let backward = argsort(&forward);
                (forward, backward)
            }
            PermuterConfig::ZCurve { h, w } => zcurve(h, w)?,
            PermuterConfig::SpiralOut { h, w } => {
                let forward = spiral("SpiralOut", h, w)?;
                let backward = argsort(&forward);
                (forward, backward)
            }
            PermuterConfig::SpiralIn { h, w } => {
                let mut forward = spiral("SpiralIn", h, w)?;
                forward.reverse();
                let backward = argsort(&forward);
                (forward, backward)
            }
            PermuterConfig::Random { h, w } => {
                let n = grid_len("Random", h, w)?;
                let forward = numpy_legacy_permutation(1, n);
                let backward = argsort(&forward);
                (forward, backward)
            }
            PermuterConfig::AlternateParsing { h, w } => {
                grid_len("AlternateParsing", h, w)?;
                let forward = alternate_parsing(h, w);
                let backward = argsort(&forward);
                (forward, backward)
            }
        };
        Self::from_indices(forward, backward).map_err(|e| config_err(format!("{cfg:?}: {e}")))
    }

    /// From buffers stored in a checkpoint (`permuter.forward_shuffle_idx`,
    /// `permuter.backward_shuffle_idx`), validated to be inverse permutations of each other;
    /// error otherwise.
    pub fn from_indices(forward: Vec<u32>, backward: Vec<u32>) -> Result<Self> {
        let n = forward.len();
        if n == 0 {
            return Err(Error::invalid("permuter: the shuffle indices are empty"));
        }
        if backward.len() != n {
            return Err(Error::invalid(format!(
                "permuter: forward_shuffle_idx has {n} entries, backward_shuffle_idx has {}",
                backward.len()
            )));
        }
        for (name, idx) in [
            ("forward_shuffle_idx", &forward),
            ("backward_shuffle_idx", &backward),
        ] {
            if let Some((pos, &v)) = idx.iter().enumerate().find(|(_, &v)| v as usize >= n) {
                return Err(Error::invalid(format!(
                    "permuter: {name}[{pos}] = {v} is out of range for {n} positions"
                )));
            }
        }
        for (i, &f) in forward.iter().enumerate() {
            let back = backward[f as usize];
            if back as usize != i {
                return Err(Error::invalid(format!(
                    "permuter: backward_shuffle_idx is not the inverse of forward_shuffle_idx \
                     (forward[{i}] = {f}, backward[{f}] = {back})"
                )));
            }
        }
        // forward is injective into 0..n (backward[forward[i]] == i), hence a permutation, and
        // backward is its inverse.
        Ok(Permuter {
            forward: Some(forward),
            backward: Some(backward),
        })
    }

    /// True for the identity permuter (no shuffle buffers).
    pub fn is_identity(&self) -> bool {
        self.forward.is_none()
    }

    /// The number of positions permuted; `None` for the identity, which takes any length.
    pub fn num_positions(&self) -> Option<usize> {
        self.forward.as_ref().map(Vec::len)
    }

    /// `forward_shuffle_idx`; `None` for the identity.
    pub fn forward_indices(&self) -> Option<&[u32]> {
        self.forward.as_deref()
    }

    /// `backward_shuffle_idx`; `None` for the identity.
    pub fn backward_indices(&self) -> Option<&[u32]> {
        self.backward.as_deref()
    }

    /// `x[:, forward_shuffle_idx]` on a (B, N) tensor of indices (any int dtype); error naming N
    /// if it does not match.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        gather(self.forward.as_deref(), x, "apply")
    }

    /// `x[:, backward_shuffle_idx]`: undoes [`Permuter::apply`].
    pub fn reverse(&self, x: &Tensor) -> Result<Tensor> {
        gather(self.backward.as_deref(), x, "reverse")
    }
}

fn gather(idx: Option<&[u32]>, x: &Tensor, what: &str) -> Result<Tensor> {
    let Some(idx) = idx else {
        return Ok(x.clone());
    };
    let dims = x.dims();
    if dims.len() != 2 {
        return Err(Error::invalid(format!(
            "permuter {what}: expected a (B, N) tensor, got shape {dims:?}"
        )));
    }
    if dims[1] != idx.len() {
        return Err(Error::invalid(format!(
            "permuter {what}: the tensor has N = {} positions (shape {dims:?}), the permuter \
             permutes {}",
            dims[1],
            idx.len()
        )));
    }
    let ids = Tensor::from_slice(idx, idx.len(), x.device())?;
    Ok(x.index_select(&ids, 1)?)
}

fn config_err(msg: String) -> Error {
    Error::Config {
        origin: "permuter_config".to_string(),
        msg,
    }
}

/// `H*W`, erroring when it is zero or does not fit the u32 indices.
fn grid_len(name: &str, h: usize, w: usize) -> Result<usize> {
    let n = h
        .checked_mul(w)
        .filter(|&n| n > 0 && n <= u32::MAX as usize)
        .ok_or_else(|| {
            config_err(format!(
                "{name}: H = {h}, W = {w} gives no usable number of positions (1 ..= 2^32-1)"
            ))
        })?;
    Ok(n)
}

/// `torch.argsort` of a permutation of `0..n`: its inverse.
fn argsort(perm: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        if let Some(slot) = inv.get_mut(p as usize) {
            *slot = i as u32;
        }
    }
    inv
}

/// `Subsample`: the recursive 2x2 split of the reference. Its loop only ends at a 1x1 grid
/// (`assert H == W == 1`) with every reshape valid when H == W is a power of two.
fn subsample(h: usize, w: usize) -> Result<Vec<u32>> {
    grid_len("Subsample", h, w)?;
    if h != w || !h.is_power_of_two() {
        return Err(config_err(format!(
            "Subsample needs H == W, a power of two (the reference asserts H == W == 1 after \
             halving both), got H = {h}, W = {w}"
        )));
    }
    // indices has shape (C, H, W), row-major.
    let mut indices: Vec<u32> = (0..(h * w) as u32).collect();
    let (mut c, mut h, mut w) = (1usize, h, w);
    while h.min(w) > 1 {
        let (h2, w2) = (h / 2, w / 2);
        // reshape (C, H/2, 2, W/2, 2) -> transpose (0, 2, 4, 1, 3) -> (C*4, H/2, W/2)
        let mut next = Vec::with_capacity(indices.len());
        for ci in 0..c {
            for a in 0..2 {
                for b in 0..2 {
                    for y in 0..h2 {
                        for x in 0..w2 {
                            let src = ci * h * w + (y * 2 + a) * w + (x * 2 + b);
                            next.push(indices[src]);
                        }
                    }
                }
            }
        }
        indices = next;
        c *= 4;
        h = h2;
        w = w2;
    }
    Ok(indices)
}

/// The reference's `mortonify`: j in the even bits, i in the odd bits.
fn mortonify(i: u64, j: u64) -> u64 {
    let mut z = 0u64;
    for pos in 0..32 {
        z |= (j & (1u64 << pos)) << pos;
        z |= (i & (1u64 << pos)) << (pos + 1);
    }
    z
}

/// `ZCurve`: backward = the morton codes of the row-major positions, forward = their argsort.
/// The reference builds these for any H, W, but only where the codes are exactly `0..H*W`
/// are they permutations (elsewhere its `reverse` indexes out of range); error otherwise.
fn zcurve(h: usize, w: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let n = grid_len("ZCurve", h, w)?;
    let mut codes = Vec::with_capacity(n);
    for i in 0..h as u64 {
        for j in 0..w as u64 {
            let z = mortonify(i, j);
            match u32::try_from(z) {
                Ok(z) if (z as usize) < n => codes.push(z),
                _ => {
                    return Err(config_err(format!(
                        "ZCurve: H = {h}, W = {w}: the morton code {z} of position ({i}, {j}) is \
                         out of range for {n} positions (the codes form a permutation only when \
                         H and W are powers of two with H <= W <= 2H)"
                    )))
                }
            }
        }
    }
    // np.argsort of distinct codes; ties cannot occur (mortonify is injective).
    let mut forward: Vec<u32> = (0..n as u32).collect();
    forward.sort_by_key(|&k| codes[k as usize]);
    Ok((forward, codes))
}

/// The position walk shared by `SpiralOut` and `SpiralIn`, a port of the reference's loops
/// (starting at `(size//2, size//2-1)`, with numpy's negative-index wrap-around).
fn spiral(name: &str, h: usize, w: usize) -> Result<Vec<u32>> {
    grid_len(name, h, w)?;
    if h != w {
        return Err(config_err(format!(
            "{name} needs a square grid (H == W), got H = {h}, W = {w}"
        )));
    }
    let size = w as i64;
    let out_of_range = |i: i64, j: i64| {
        config_err(format!(
            "{name}: size {size}: the reference's walk indexes ({i}, {j}), out of range \
             (it only covers even sizes and 1)"
        ))
    };
    // indices[i, j] with numpy's wrap-around for -size <= k < 0.
    let at = |i: i64, j: i64| -> Result<u32> {
        let wrap = |k: i64| if k < 0 { k + size } else { k };
        let (wi, wj) = (wrap(i), wrap(j));
        if !(0..size).contains(&wi) || !(0..size).contains(&wj) {
            return Err(out_of_range(i, j));
        }
        Ok((wi * size + wj) as u32)
    };
    let (i0, j0) = (size / 2, size / 2 - 1);
    let (mut i, mut j) = (i0, j0);
    let mut idx = vec![at(i0, j0)?];
    let mut step_mult = 0i64;
    let half = size / 2;
    for c in 1..=half {
        step_mult += 1;
        // steps left
        for _ in 0..step_mult {
            i -= 1;
            idx.push(at(i, j)?);
        }
        // step down
        for _ in 0..step_mult {
            j += 1;
            idx.push(at(i, j)?);
        }
        step_mult += 1;
        if c < half {
            // step right
            for _ in 0..step_mult {
                i += 1;
                idx.push(at(i, j)?);
            }
            // step up
            for _ in 0..step_mult {
                j -= 1;
                idx.push(at(i, j)?);
            }
        } else {
            // end reached
            for _ in 0..step_mult - 1 {
                i += 1;
                idx.push(at(i, j)?);
            }
        }
    }
    if idx.len() as i64 != size * size {
        return Err(config_err(format!(
            "{name}: size {size}: the reference's walk visits {} positions, not {} (it only \
             covers even sizes and 1)",
            idx.len(),
            size * size
        )));
    }
    Ok(idx)
}

/// `AlternateParsing`: row-major order with every odd row reversed.
fn alternate_parsing(h: usize, w: usize) -> Vec<u32> {
    let mut idx = Vec::with_capacity(h * w);
    for r in 0..h {
        let row = (r * w) as u32..((r + 1) * w) as u32;
        if r % 2 == 1 {
            idx.extend(row.rev());
        } else {
            idx.extend(row);
        }
    }
    idx
}

/// numpy's legacy `RandomState(seed).permutation(n)`: MT19937 seeded with `init_genrand`,
/// then the legacy Fisher-Yates shuffle of `arange(n)`.
fn numpy_legacy_permutation(seed: u32, n: usize) -> Vec<u32> {
    let mut rng = Mt19937::new(seed);
    let mut x: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = rng.random_interval(i as u64) as usize;
        x.swap(i, j);
    }
    x
}

/// The Mersenne Twister MT19937 (32-bit), as numpy's legacy `RandomState` uses it.
struct Mt19937 {
    mt: [u32; 624],
    pos: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    /// `init_genrand(seed)` (numpy's `mt19937_seed` for an integer seed).
    fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..Self::N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, pos: Self::N }
    }

    fn generate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for k in 0..Self::N {
            let y = (self.mt[k] & UPPER) | (self.mt[(k + 1) % Self::N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.mt[k] = self.mt[(k + Self::M) % Self::N] ^ (y >> 1) ^ mag;
        }
        self.pos = 0;
    }

    /// `genrand_int32`.
    fn next_u32(&mut self) -> u32 {
        if self.pos >= Self::N {
            self.generate();
        }
        let mut y = self.mt[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// numpy's `random_interval(max)`: a uniform integer in `0..=max` by masked rejection.
    fn random_interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        mask |= mask >> 1;
        mask |= mask >> 2;
        mask |= mask >> 4;
        mask |= mask >> 8;
        mask |= mask >> 16;
        mask |= mask >> 32;
        if max <= 0xffff_ffff {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        } else {
            loop {
                let hi = u64::from(self.next_u32());
                let lo = u64::from(self.next_u32());
                let v = ((hi << 32) | lo) & mask;
                if v <= max {
                    return v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    // Expected arrays computed with numpy 2.4.6 by running the reference's constructors
    // (ported loops, same numpy calls) in a throwaway script.

    fn fwd(cfg: PermuterConfig) -> Vec<u32> {
        Permuter::from_config(&cfg)
            .unwrap()
            .forward_indices()
            .unwrap()
            .to_vec()
    }

    fn bwd(cfg: PermuterConfig) -> Vec<u32> {
        Permuter::from_config(&cfg)
            .unwrap()
            .backward_indices()
            .unwrap()
            .to_vec()
    }

    fn weighted_sum(v: &[u32]) -> u64 {
        v.iter()
            .enumerate()
            .map(|(i, &x)| i as u64 * u64::from(x))
            .sum()
    }

    #[test]
    fn mt19937_reference_outputs() {
        // The first outputs of init_genrand(5489) (the reference MT19937 default seed).
        let mut rng = Mt19937::new(5489);
        let first: Vec<u32> = (0..3).map(|_| rng.next_u32()).collect();
        assert_eq!(first, [3_499_211_612, 581_869_302, 3_890_346_734]);
    }

    #[test]
    fn random_matches_numpy() {
        assert_eq!(numpy_legacy_permutation(1, 5), [2, 1, 4, 0, 3]);
        let p = fwd(PermuterConfig::Random { h: 4, w: 4 });
        assert_eq!(p, [3, 13, 7, 2, 6, 10, 4, 1, 14, 0, 15, 9, 8, 12, 11, 5]);
        let p = fwd(PermuterConfig::Random { h: 16, w: 16 });
        assert_eq!(
            p[..20],
            [
                183, 34, 185, 233, 216, 181, 160, 27, 145, 187, 255, 62, 4, 229, 44, 163, 249, 51,
                182, 234
            ]
        );
        assert_eq!(weighted_sum(&p), 4_083_065);
        let p = fwd(PermuterConfig::Random { h: 32, w: 32 });
        assert_eq!(
            p[..20],
            [
                830, 795, 495, 822, 859, 104, 27, 986, 735, 786, 491, 844, 673, 613, 340, 258, 701,
                248, 49, 181
            ]
        );
        assert_eq!(weighted_sum(&p), 268_005_089);
    }

    #[test]
    fn subsample_matches_reference() {
        assert_eq!(
            fwd(PermuterConfig::Subsample { h: 4, w: 4 }),
            [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
        );
        assert_eq!(fwd(PermuterConfig::Subsample { h: 1, w: 1 }), [0]);
        for (h, w) in [(2, 4), (6, 6), (3, 3)] {
            let err = Permuter::from_config(&PermuterConfig::Subsample { h, w }).unwrap_err();
            assert!(err.to_string().contains("Subsample"), "{err}");
        }
    }

    #[test]
    fn zcurve_matches_reference() {
        let z44 = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15];
        assert_eq!(fwd(PermuterConfig::ZCurve { h: 4, w: 4 }), z44);
        assert_eq!(bwd(PermuterConfig::ZCurve { h: 4, w: 4 }), z44);
        let z24 = [0, 1, 4, 5, 2, 3, 6, 7];
        assert_eq!(fwd(PermuterConfig::ZCurve { h: 2, w: 4 }), z24);
        assert_eq!(bwd(PermuterConfig::ZCurve { h: 2, w: 4 }), z24);
        // 3x5: the reference's morton codes [0, 1, 4, 5, 16, ...] are not a permutation.
        let err = Permuter::from_config(&PermuterConfig::ZCurve { h: 3, w: 5 }).unwrap_err();
        assert!(err.to_string().contains("morton code 16"), "{err}");
        assert_eq!(mortonify(3, 5), 27);
        assert_eq!(mortonify(6, 9), 105);
    }

    #[test]
    fn spirals_match_reference() {
        let out4 = [9, 5, 6, 10, 14, 13, 12, 8, 4, 0, 1, 2, 3, 7, 11, 15];
        assert_eq!(fwd(PermuterConfig::SpiralOut { h: 4, w: 4 }), out4);
        assert_eq!(
            bwd(PermuterConfig::SpiralOut { h: 4, w: 4 }),
            [9, 10, 11, 12, 8, 1, 2, 13, 7, 0, 3, 14, 6, 5, 4, 15]
        );
        let mut in4 = out4;
        in4.reverse();
        assert_eq!(in4, [15, 11, 7, 3, 2, 1, 0, 4, 8, 12, 13, 14, 10, 6, 5, 9]);
        assert_eq!(fwd(PermuterConfig::SpiralIn { h: 4, w: 4 }), in4);
        assert_eq!(fwd(PermuterConfig::SpiralOut { h: 2, w: 2 }), [2, 0, 1, 3]);
        assert_eq!(
            fwd(PermuterConfig::SpiralOut { h: 6, w: 6 }),
            [
                20, 14, 15, 21, 27, 26, 25, 19, 13, 7, 8, 9, 10, 16, 22, 28, 34, 33, 32, 31, 30,
                24, 18, 12, 6, 0, 1, 2, 3, 4, 5, 11, 17, 23, 29, 35
            ]
        );
        assert_eq!(fwd(PermuterConfig::SpiralOut { h: 1, w: 1 }), [0]);
        assert!(Permuter::from_config(&PermuterConfig::SpiralOut { h: 3, w: 3 }).is_err());
        assert!(Permuter::from_config(&PermuterConfig::SpiralIn { h: 4, w: 2 }).is_err());
    }

    #[test]
    fn alternate_parsing_matches_reference() {
        assert_eq!(
            fwd(PermuterConfig::AlternateParsing { h: 3, w: 4 }),
            [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
        );
    }

    #[test]
    fn apply_then_reverse_round_trips() {
        let dev = Device::Cpu;
        let cfgs = [
            PermuterConfig::Identity,
            PermuterConfig::Subsample { h: 4, w: 4 },
            PermuterConfig::ZCurve { h: 4, w: 4 },
            PermuterConfig::SpiralOut { h: 4, w: 4 },
            PermuterConfig::SpiralIn { h: 4, w: 4 },
            PermuterConfig::Random { h: 4, w: 4 },
            PermuterConfig::AlternateParsing { h: 4, w: 4 },
        ];
        let x = Tensor::arange(0u32, 32, &dev)
            .unwrap()
            .reshape((2, 16))
            .unwrap();
        for cfg in cfgs {
            let p = Permuter::from_config(&cfg).unwrap();
            assert_eq!(p.is_identity(), cfg == PermuterConfig::Identity);
            for dtype in [DType::U32, DType::I64, DType::U8] {
                let xd = x.to_dtype(dtype).unwrap();
                let y = p.apply(&xd).unwrap();
                assert_eq!(y.dtype(), dtype);
                let back = p.reverse(&y).unwrap();
                let a = back.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
                let b = xd.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
                assert_eq!(a, b, "{cfg:?} {dtype:?}");
            }
            // apply is x[:, forward].
            if let Some(f) = p.forward_indices() {
                let y = p.apply(&x).unwrap().to_vec2::<u32>().unwrap();
                for (k, &fk) in f.iter().enumerate() {
                    assert_eq!(y[1][k], 16 + fk);
                }
            }
        }
    }

    #[test]
    fn apply_rejects_wrong_length() {
        let p = Permuter::from_config(&PermuterConfig::Random { h: 4, w: 4 }).unwrap();
        let x = Tensor::zeros((2, 15), DType::U32, &Device::Cpu).unwrap();
        let err = p.apply(&x).unwrap_err().to_string();
        assert!(err.contains("N = 15") && err.contains("16"), "{err}");
        let x = Tensor::zeros(16, DType::U32, &Device::Cpu).unwrap();
        assert!(p.reverse(&x).is_err());
    }

    #[test]
    fn from_indices_validates() {
        let p = Permuter::from_indices(vec![2, 0, 1], vec![1, 2, 0]).unwrap();
        assert_eq!(p.num_positions(), Some(3));
        // not inverses
        assert!(Permuter::from_indices(vec![2, 0, 1], vec![2, 0, 1]).is_err());
        // not a permutation
        assert!(Permuter::from_indices(vec![0, 0, 1], vec![0, 2, 1]).is_err());
        // out of range
        assert!(Permuter::from_indices(vec![0, 1, 3], vec![0, 1, 2]).is_err());
        // lengths differ / empty
        assert!(Permuter::from_indices(vec![0, 1], vec![0, 1, 2]).is_err());
        assert!(Permuter::from_indices(vec![], vec![]).is_err());
        // round trip of a config-built permuter's buffers
        let r = Permuter::from_config(&PermuterConfig::Random { h: 8, w: 8 }).unwrap();
        let again = Permuter::from_indices(
            r.forward_indices().unwrap().to_vec(),
            r.backward_indices().unwrap().to_vec(),
        )
        .unwrap();
        assert_eq!(again.forward_indices(), r.forward_indices());
    }
}
