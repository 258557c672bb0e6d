//! Matrix products with few rows: `x (M, K) @ W (N, K)^T + b` for M up to [`MAX_ROWS`], the
//! shape of every Linear layer in a KV-cached sampling step (one row per sequence of the batch).
//! No reference file: this is `torch.nn.functional.linear`, computed faster for this shape.
//!
//! A sampling step is bound by reading the weights (1.2 GB for the full-size GPT). candle's gemm
//! packs its inputs into tiles of 16 rows, so at M = 8 half of its arithmetic is padding and a
//! batch-8 step ran about 3x slower than a batch-1 step. Here each weight row is read once from
//! memory and multiplied with all M input rows while it is in cache, with AVX2/FMA where the CPU
//! has them, split over the rayon pool by output columns.
//!
//! [`linear_reference`] is the plain version; the tests check one against the other, and
//! [`crate::transformer`] checks cached steps (which use this) against the full forward pass.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// The most input rows the fast path takes; larger products go to candle's gemm.
pub const MAX_ROWS: usize = 16;

/// Output columns handed to one rayon task.
const COLUMNS_PER_TASK: usize = 64;

/// `x (M, K) @ w (N, K)^T + bias (N)` into `out (M, N)`, all row-major: the plain version.
pub fn linear_reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize, out: &mut [f32]) {
    let n = w.len() / k;
    for (xr, orow) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
        for (j, (o, wr)) in orow.iter_mut().zip(w.chunks_exact(k)).enumerate() {
            let dot: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            *o = dot + bias.map_or(0.0, |b| b[j]);
        }
    }
}

/// The fast version of [`linear_reference`] (same arguments, M = x.len() / k rows).
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize, out: &mut [f32]) {
    let m = x.len() / k;
    let n = w.len() / k;
    if m == 0 || n == 0 {
        return;
    }
    // the product transposed, (N, M): each task fills a contiguous block of columns
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(COLUMNS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, block)| {
            let j0 = task * COLUMNS_PER_TASK;
            let j1 = j0 + block.len() / m;
            columns(x, &w[j0 * k..j1 * k], k, block);
        });
    for (j, vals) in t.chunks_exact(m).enumerate() {
        let b = bias.map_or(0.0, |b| b[j]);
        for (i, v) in vals.iter().enumerate() {
            out[i * n + j] = v + b;
        }
    }
}

/// Dot products of every row of `w` (cols, K) with every row of `x` (M, K) into `block` (cols, M).
fn columns(x: &[f32], w: &[f32], k: usize, block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if k % 8 == 0 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), and `columns_avx2` reads only
        // inside `x`, `w` and `block`, whose lengths are multiples of k (a multiple of 8).
        unsafe { columns_avx2(x, w, k, block) };
        return;
    }
    let m = x.len() / k;
    for (wr, bvals) in w.chunks_exact(k).zip(block.chunks_exact_mut(m.max(1))) {
        for (xr, b) in x.chunks_exact(k).zip(bvals.iter_mut()) {
            *b = xr.iter().zip(wr).map(|(a, c)| a * c).sum();
        }
    }
}

/// AVX2 + FMA kernel of [`columns`]: four weight rows at a time against the input rows in pairs,
/// so a weight row is read from memory once and stays in L1 for every pair. (Measured at batch 8
/// on the full-size GPT, per step: 4x2 tiles 0.099 s, 2x4 0.107 s, 3x4 0.114 s, 1x8 0.128 s.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2(x: &[f32], w: &[f32], k: usize, block: &mut [f32]) {
    match x.len() / k {
        1 => columns_tiled::<4, 1>(x, w, k, block),
        _ => columns_tiled::<4, 2>(x, w, k, block),
    }
}

/// [`columns_avx2`] with C weight rows and (up to) R input rows per tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_tiled<const C: usize, const R: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    block: &mut [f32],
) {
    let m = x.len() / k;
    let cols = w.len() / k;
    let mut j = 0;
    while j < cols {
        // past the last weight row, the tile repeats it (computed again, not kept)
        let jn = (cols - j).min(C);
        let wrows: [*const f32; C] =
            std::array::from_fn(|c| w.as_ptr().add((j + c.min(jn - 1)) * k));
        let mut i = 0;
        while i < m {
            let im = (m - i).min(R);
            let xrows: [*const f32; R] =
                std::array::from_fn(|r| x.as_ptr().add((i + r.min(im - 1)) * k));
            let sums = tile_avx2::<C, R>(wrows, xrows, k);
            for (c, row_sums) in sums.iter().enumerate().take(jn) {
                for (r, v) in row_sums.iter().enumerate().take(im) {
                    block[(j + c) * m + i + r] = *v;
                }
            }
            i += R;
        }
        j += C;
    }
}

/// Dot products of C weight rows with R input rows (each k long, k a multiple of 8): C*R 8-lane
/// accumulators, each weight vector loaded once for the R input rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const C: usize, const R: usize>(
    wrows: [*const f32; C],
    xrows: [*const f32; R],
    k: usize,
) -> [[f32; R]; C] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); R]; C];
    let mut p = 0;
    while p < k {
        let b: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(xrows[r].add(p)));
        for c in 0..C {
            let a = _mm256_loadu_ps(wrows[c].add(p));
            for r in 0..R {
                acc[c][r] = _mm256_fmadd_ps(a, b[r], acc[c][r]);
            }
        }
        p += 8;
    }
    let mut sums = [[0f32; R]; C];
    for c in 0..C {
        for r in 0..R {
            // sum of the 8 lanes
            let v = acc[c][r];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            sums[c][r] = _mm_cvtss_f32(s);
        }
    }
    sums
}

/// Runs `x (M, K) @ weight (N, K)^T + bias` with [`linear`] when that applies (CPU, float32,
/// contiguous, M <= [`MAX_ROWS`], and no input that needs a gradient: the result of the fast path
/// records no op for backprop); returns `None` to leave the product to candle otherwise.
pub fn try_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, kw) = weight.dims2()?;
    let tracked = x.track_op() || weight.track_op() || bias.is_some_and(|b| b.track_op());
    let applies = !tracked
        && m <= MAX_ROWS
        && k == kw
        && matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32 && b.dims() == [n]);
    if !applies {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = weight.storage_and_layout();
    let bg = bias.map(|b| b.storage_and_layout());
    let (Some(xs), Some(ws)) = (f32_slice(&xg, xl), f32_slice(&wg, wl)) else {
        return Ok(None);
    };
    let bs = match &bg {
        Some((g, l)) => match f32_slice(g, l) {
            Some(s) => Some(s),
            None => return Ok(None),
        },
        None => None,
    };
    let mut out = vec![0f32; m * n];
    linear(xs, ws, bs, k, &mut out);
    Ok(Some(Tensor::from_vec(out, (m, n), &Device::Cpu)?))
}

/// The values of a contiguous float32 CPU tensor, borrowed from its storage (`None` otherwise).
fn f32_slice<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Option<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(data)) = storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    data.get(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn fast_equals_reference_for_every_row_count_and_odd_widths() {
        for &(k, n) in &[(64, 130), (1024, 67), (24, 1), (20, 9)] {
            for m in 1..=MAX_ROWS {
                let x = data(m * k, 1);
                let w = data(n * k, 2);
                let b = data(n, 3);
                let mut want = vec![0f32; m * n];
                let mut got = vec![0f32; m * n];
                linear_reference(&x, &w, Some(&b), k, &mut want);
                linear(&x, &w, Some(&b), k, &mut got);
                // both against the exact value (f64), within float32 rounding of a k-term sum
                for i in 0..m {
                    for j in 0..n {
                        let (xr, wr) = (&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                        let exact: f64 = xr
                            .iter()
                            .zip(wr)
                            .map(|(a, c)| *a as f64 * *c as f64)
                            .sum::<f64>()
                            + b[j] as f64;
                        let scale: f64 = xr
                            .iter()
                            .zip(wr)
                            .map(|(a, c)| (*a as f64 * *c as f64).abs())
                            .sum::<f64>()
                            + 1.0;
                        let tol = 1e-7 * k as f64 * scale;
                        for (what, v) in [("reference", want[i * n + j]), ("fast", got[i * n + j])]
                        {
                            let d = (v as f64 - exact).abs();
                            assert!(
                                d < tol,
                                "{what}: k {k} n {n} m {m} at ({i}, {j}): {d} > {tol}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tensor_entry_point_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(data(5 * 96, 4), &dev)?.reshape((5, 96))?;
        let w = Tensor::new(data(40 * 96, 5), &dev)?.reshape((40, 96))?;
        let b = Tensor::new(data(40, 6), &dev)?;
        let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let got = try_linear(&x, &w, Some(&b))?.ok_or_else(|| anyhow::anyhow!("not taken"))?;
        let d = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        // too many rows, or another dtype: left to candle
        let big = Tensor::zeros((MAX_ROWS + 1, 96), DType::F32, &dev)?;
        assert!(try_linear(&big, &w, None)?.is_none());
        assert!(try_linear(&x.to_dtype(DType::F16)?, &w, None)?.is_none());
        // a weight being trained: candle's product, which records the op for backprop
        let var = candle_core::Var::from_tensor(&w)?;
        assert!(try_linear(&x, var.as_tensor(), None)?.is_none());
        Ok(())
    }
}
