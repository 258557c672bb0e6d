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
    for (i, orow) in out.chunks_exact_mut(n).enumerate() {
        for (j, o) in orow.iter_mut().enumerate() {
            *o = t[j * m + i] + bias.map_or(0.0, |b| b[j]);
        }
    }
}

/// Dot products of every row of `w` (cols, K) with every row of `x` (M, K) into `block` (cols, M).
fn columns(x: &[f32], w: &[f32], k: usize, block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let m = x.len() / k;
        if m > 1 && k.is_multiple_of(16) && is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above); the kernel reads only inside
            // `x` and `w` and writes only inside `block` (see `columns_tiled`).
            unsafe { columns_tiled::<4, 4>(x, w, k, block, tile_avx512::<4, 4>) };
            return;
        }
        if k.is_multiple_of(8)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above); as above.
            unsafe {
                match m {
                    1 => columns_tiled::<4, 1>(x, w, k, block, tile_avx2::<4, 1>),
                    _ => columns_tiled::<4, 2>(x, w, k, block, tile_avx2::<4, 2>),
                }
            };
            return;
        }
    }
    let m = x.len() / k;
    for (wr, bvals) in w.chunks_exact(k).zip(block.chunks_exact_mut(m.max(1))) {
        for (xr, b) in x.chunks_exact(k).zip(bvals.iter_mut()) {
            *b = xr.iter().zip(wr).map(|(a, c)| a * c).sum();
        }
    }
}

/// One tile kernel: the dot products of C weight rows with R input rows (each k long) while
/// prefetching the part `lo .. lo + k / passes` of the C rows at `next` into L2.
#[cfg(target_arch = "x86_64")]
type TileFn<const C: usize, const R: usize> = unsafe fn(
    [*const f32; C],
    [*const f32; R],
    usize,
    [*const f32; C],
    usize,
    usize,
) -> [[f32; R]; C];

/// Tiles of C weight rows by R input rows over `block` (cols, M). A group of C weight rows is
/// used by ceil(M / R) passes (one per R input rows); the first pass brings it from memory, and
/// each pass prefetches its share of the next group, so the memory reads are spread over the
/// arithmetic instead of stalling it. (Measured on the full-size GPT's linears, 2 threads,
/// batch 8 per step: 4x4 AVX-512 tiles with prefetch 0.044 s, without 0.072 s; AVX2 4x2 tiles
/// with prefetch 0.048 s, without 0.073 s; batch 1: 0.039 s vs 0.042 s.)
///
/// Safety: `tile` must be callable on this CPU and read only k values from each pointer it
/// gets; `x.len()` and `w.len()` are multiples of k, `block.len()` = (w.len() / k) * M.
#[cfg(target_arch = "x86_64")]
unsafe fn columns_tiled<const C: usize, const R: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    block: &mut [f32],
    tile: TileFn<C, R>,
) {
    let m = x.len() / k;
    let cols = w.len() / k;
    let passes = m.div_ceil(R);
    // past the last row, a tile repeats it (computed again, not kept)
    let rows = |j: usize| -> [*const f32; C] {
        let jn = (cols - j).min(C);
        std::array::from_fn(|c| w.as_ptr().add((j + c.min(jn - 1)) * k))
    };
    let mut j = 0;
    while j < cols {
        let jn = (cols - j).min(C);
        let wrows = rows(j);
        // the last group prefetches itself (already in cache)
        let next = rows(if j + C < cols { j + C } else { j });
        for pass in 0..passes {
            let i = pass * R;
            let im = (m - i).min(R);
            let xrows: [*const f32; R] =
                std::array::from_fn(|r| x.as_ptr().add((i + r.min(im - 1)) * k));
            let sums = tile(wrows, xrows, k, next, pass * k / passes, passes);
            for (c, row_sums) in sums.iter().enumerate().take(jn) {
                for (r, v) in row_sums.iter().enumerate().take(im) {
                    block[(j + c) * m + i + r] = *v;
                }
            }
        }
        j += C;
    }
}

/// AVX2 + FMA tile (k a multiple of 8): C*R 8-lane accumulators, each weight vector loaded
/// once for the R input rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const C: usize, const R: usize>(
    wrows: [*const f32; C],
    xrows: [*const f32; R],
    k: usize,
    next: [*const f32; C],
    lo: usize,
    passes: usize,
) -> [[f32; R]; C] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); R]; C];
    let mut p = 0;
    while p < k {
        // one 64-byte line of each next row per `passes` lines of this one: lo + p / passes
        // stays below lo + k / passes <= k
        if p.is_multiple_of(16) && (p / 16).is_multiple_of(passes) {
            for row in next {
                _mm_prefetch::<_MM_HINT_T1>(row.add(lo + p / passes) as *const i8);
            }
        }
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

/// AVX-512 tile (k a multiple of 16): 32 registers hold 4x4 accumulators, so batch 8 needs two
/// passes over a weight group instead of AVX2's four.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const C: usize, const R: usize>(
    wrows: [*const f32; C],
    xrows: [*const f32; R],
    k: usize,
    next: [*const f32; C],
    lo: usize,
    passes: usize,
) -> [[f32; R]; C] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    let mut p = 0;
    // counts 16-float steps down to the next prefetch (every `passes` steps)
    let mut until = 0;
    while p < k {
        if until == 0 {
            for row in next {
                _mm_prefetch::<_MM_HINT_T1>(row.add(lo + p / passes) as *const i8);
            }
            until = passes;
        }
        until -= 1;
        let b: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(xrows[r].add(p)));
        for c in 0..C {
            let a = _mm512_loadu_ps(wrows[c].add(p));
            for r in 0..R {
                acc[c][r] = _mm512_fmadd_ps(a, b[r], acc[c][r]);
            }
        }
        p += 16;
    }
    let mut sums = [[0f32; R]; C];
    for c in 0..C {
        for r in 0..R {
            sums[c][r] = _mm512_reduce_add_ps(acc[c][r]);
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

/// Attention of one new query per sequence over cached keys and values, the shape of every
/// KV-cached sampling step: for each sequence and head, `softmax(q . k_j * scale) @ v` over the
/// first `len` cached positions. `q` (B, nh, 1, hs); `keys`, `values` (B, nh, capacity, hs),
/// contiguous. Returns `(B, 1, nh * hs)`, the heads already side by side as the output
/// projection reads them, or `None` to leave it to candle's batched products (another device or
/// dtype, a tensor being trained, a layout this does not take).
///
/// candle runs this as B * nh separate (1, hs) x (hs, len) products, each padded to its gemm's
/// tiles; at batch 8 on the full-size GPT those small products and their softmax cost more than
/// a third of a step. Here each (sequence, head) is one rayon task over contiguous memory.
pub fn try_attend_one(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    len: usize,
    scale: f32,
) -> Result<Option<Tensor>> {
    let (b, nh, t, hs) = q.dims4()?;
    let (kb, knh, cap, khs) = keys.dims4()?;
    let tracked = q.track_op() || keys.track_op() || values.track_op();
    let applies = !tracked
        && t == 1
        && len >= 1
        && len <= cap
        && (kb, knh, khs) == (b, nh, hs)
        && values.dims() == keys.dims()
        && matches!(q.device(), Device::Cpu)
        && [q.dtype(), keys.dtype(), values.dtype()] == [DType::F32; 3];
    if !applies {
        return Ok(None);
    }
    let (qg, ql) = q.storage_and_layout();
    let (kg, kl) = keys.storage_and_layout();
    let (vg, vl) = values.storage_and_layout();
    let (Some(qs), Some(ks), Some(vs)) =
        (f32_slice(&qg, ql), f32_slice(&kg, kl), f32_slice(&vg, vl))
    else {
        return Ok(None);
    };
    let mut out = vec![0f32; b * nh * hs];
    out.par_chunks_mut(hs).enumerate().for_each(|(bh, y)| {
        let head = bh * cap * hs..(bh * cap + len) * hs;
        attend(
            &qs[bh * hs..(bh + 1) * hs],
            &ks[head.clone()],
            &vs[head],
            scale,
            y,
        );
    });
    Ok(Some(Tensor::from_vec(out, (b, 1, nh * hs), &Device::Cpu)?))
}

/// One query `q` (hs) over `keys`, `values` (len, hs) into `y` (hs): with AVX-512 when the CPU
/// has it and hs is a multiple of 16, else [`attend_plain`].
fn attend(q: &[f32], keys: &[f32], values: &[f32], scale: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if q.len().is_multiple_of(16) && is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); hs is a multiple of 16, and the
        // kernel reads whole rows of `keys` and `values` (len x hs) and writes `y` (hs).
        unsafe { attend_avx512(q, keys, values, scale, y) };
        return;
    }
    attend_plain(q, keys, values, scale, y)
}

/// [`attend`] with AVX-512: each score is hs / 16 fused multiply-adds and one lane sum; the
/// weighted sum of the values adds whole 16-lane rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(q: &[f32], keys: &[f32], values: &[f32], scale: f32, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let hs = q.len();
    let mut scores: Vec<f32> = keys
        .chunks_exact(hs)
        .map(|k| {
            let mut acc = _mm512_setzero_ps();
            for d in (0..hs).step_by(16) {
                let a = _mm512_loadu_ps(q.as_ptr().add(d));
                acc = _mm512_fmadd_ps(a, _mm512_loadu_ps(k.as_ptr().add(d)), acc);
            }
            _mm512_reduce_add_ps(acc) * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    y.fill(0.0);
    for (p, v) in scores.iter().zip(values.chunks_exact(hs)) {
        let pv = _mm512_set1_ps(p / total);
        for d in (0..hs).step_by(16) {
            let yd = y.as_mut_ptr().add(d);
            let r = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v.as_ptr().add(d)), _mm512_loadu_ps(yd));
            _mm512_storeu_ps(yd, r);
        }
    }
}

/// One query `q` (hs) over `keys`, `values` (len, hs) into `y` (hs): the plain arithmetic,
/// written so that the compiler vectorises it (8 independent partial sums per dot product).
fn attend_plain(q: &[f32], keys: &[f32], values: &[f32], scale: f32, y: &mut [f32]) {
    let hs = q.len();
    let mut scores: Vec<f32> = keys.chunks_exact(hs).map(|k| dot8(q, k) * scale).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    y.fill(0.0);
    for (p, v) in scores.iter().zip(values.chunks_exact(hs)) {
        let p = p / total;
        for (yi, vi) in y.iter_mut().zip(v) {
            *yi += p * vi;
        }
    }
}

/// Dot product with 8 partial sums (lanes of one vector register), then their sum.
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
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
    fn single_query_attention_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // head size 20: not a multiple of 8, so the dot products' tails are exercised too
        for (b, nh, cap, hs, len) in [(2, 3, 7, 16, 5), (1, 2, 9, 20, 9), (3, 1, 4, 8, 1)] {
            let q = Tensor::new(data(b * nh * hs, 7), &dev)?.reshape((b, nh, 1, hs))?;
            let k = Tensor::new(data(b * nh * cap * hs, 8), &dev)?.reshape((b, nh, cap, hs))?;
            let v = Tensor::new(data(b * nh * cap * hs, 9), &dev)?.reshape((b, nh, cap, hs))?;
            let scale = 1.0 / (hs as f32).sqrt();
            // the plain form, as the transformer computes it without this kernel
            let (kl, vl) = (k.narrow(2, 0, len)?, v.narrow(2, 0, len)?);
            let att = (q.matmul(&kl.t()?)? * scale as f64)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let want = att.matmul(&vl)?.transpose(1, 2)?.reshape((b, 1, nh * hs))?;
            let got = try_attend_one(&q, &k, &v, len, scale)?
                .ok_or_else(|| anyhow::anyhow!("not taken"))?;
            let d = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "b {b} nh {nh} len {len}: {d}");
        }
        // the AVX-512 kernel (hs a multiple of 16) against the plain loop
        for (len, hs) in [(1usize, 16usize), (7, 64), (33, 32)] {
            let (q, k, v) = (data(hs, 1), data(len * hs, 2), data(len * hs, 3));
            let (mut a, mut b) = (vec![0f32; hs], vec![0f32; hs]);
            attend(&q, &k, &v, 0.125, &mut a);
            attend_plain(&q, &k, &v, 0.125, &mut b);
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "len {len} hs {hs}: {d}");
        }
        // more than one query, or a length past the capacity: not taken
        let q2 = Tensor::zeros((1, 1, 2, 8), DType::F32, &dev)?;
        let kv = Tensor::zeros((1, 1, 4, 8), DType::F32, &dev)?;
        assert!(try_attend_one(&q2, &kv, &kv, 2, 1.0)?.is_none());
        let q1 = Tensor::zeros((1, 1, 1, 8), DType::F32, &dev)?;
        assert!(try_attend_one(&q1, &kv, &kv, 5, 1.0)?.is_none());
        Ok(())
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
