//! Logit filtering for sampling, mirroring `Net2NetTransformer.top_k_logits` of
//! `taming/models/cond_transformer.py` (and `top_k_logits` of `mingpt.py`), the nucleus
//! filtering of HF `transformers.top_k_top_p_filtering` that `mingpt.py`'s `sample_with_past`
//! uses, and the softmax / argmax / `torch.multinomial` steps of the reference's sampling loops,
//! one row of logits at a time.

/// Top-k filtering of one row of logits: keep values >= the k-th largest (ties with the k-th
/// largest are kept, as the reference's `top_k_logits` does: `out[out < v[..., [-1]]] = -inf`),
/// set the rest to -inf. k == 0 or k >= len: unchanged.
pub fn top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    // Descending; NaN counts as the largest, as in torch.topk.
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for x in logits.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus (top-p) filtering: sort descending, keep the smallest prefix whose softmax
/// probability mass reaches p (always at least the top token), set the rest to -inf; as HF's
/// top_k_top_p_filtering (remove tokens with cumulative probability above the threshold,
/// shifted right so the first token above is kept). p >= 1.0 (or NaN): unchanged; p <= 0: keep
/// only the max.
///
/// Precisely: with the tokens sorted by logit descending and `cum[r]` the probability mass of
/// the first `r + 1` of them, the token at rank `r >= 1` is removed iff `cum[r - 1] > p`.
/// Tokens tied with the last kept token are kept too (torch's sort leaves the order of ties
/// unspecified; keeping them all makes the result independent of it, as [`top_k`] does).
/// A row whose logits are all -inf (or whose max is NaN) is left unchanged.
pub fn top_p(logits: &mut [f32], p: f32) {
    if p.is_nan() || p >= 1.0 || logits.is_empty() {
        return;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let max = logits[order[0]];
    if !max.is_finite() && max != f32::INFINITY {
        // all -inf, or NaN: nothing sensible to filter
        return;
    }
    let weight = |x: f32| -> f64 {
        if max == f32::INFINITY {
            // softmax puts all the mass on the +inf entries
            if x == f32::INFINITY {
                1.0
            } else {
                0.0
            }
        } else {
            (f64::from(x) - f64::from(max)).exp()
        }
    };
    let total: f64 = order.iter().map(|&i| weight(logits[i])).sum();
    let p = f64::from(p);
    let mut cum = 0.0f64;
    let mut keep = order.len();
    for (r, &i) in order.iter().enumerate() {
        cum += weight(logits[i]) / total;
        if cum > p {
            // ranks 0..=r are kept, r + 1.. removed
            keep = r + 1;
            break;
        }
    }
    let threshold = logits[order[keep - 1]];
    for x in logits.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Numerically stable softmax of one row in place (-inf gives 0). A row with no entry above
/// -inf (incl. an empty one) becomes all zeros.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        let e = if max == f32::INFINITY {
            // the +inf entries share all the mass
            if *v == f32::INFINITY {
                1.0
            } else {
                0.0
            }
        } else {
            (*v - max).exp()
        };
        *v = e;
        sum += f64::from(e);
    }
    for v in x.iter_mut() {
        *v = (f64::from(*v) / sum) as f32;
    }
}

/// Argmax (first index of the max, like torch.topk(k=1)/argmax on CPU for distinct values).
/// NaN entries are skipped; 0 for an empty slice or one of only NaN.
pub fn argmax(x: &[f32]) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// Draw an index from probabilities (already softmaxed, summing to ~1) with a uniform u in
/// [0,1): inverse CDF, skipping zero-probability entries; never returns an index with
/// probability 0.
///
/// The CDF is normalised by the actual total mass, so rows that sum to slightly more or less
/// than 1 are handled; `u` is clamped into [0, 1). Negative and NaN entries count as zero.
/// If no entry is positive, returns [`argmax`] of `probs` (0 for an empty slice).
pub fn draw(probs: &[f32], u: f32) -> usize {
    let mass = |p: f32| -> f64 {
        if p > 0.0 && p.is_finite() {
            f64::from(p)
        } else {
            0.0
        }
    };
    let total: f64 = probs.iter().map(|&p| mass(p)).sum();
    let mut last_positive = None;
    if total > 0.0 {
        let u = if u.is_nan() {
            0.0
        } else {
            f64::from(u).clamp(0.0, 1.0)
        };
        let target = u * total;
        let mut cum = 0.0f64;
        for (i, &p) in probs.iter().enumerate() {
            let m = mass(p);
            if m == 0.0 {
                continue;
            }
            cum += m;
            last_positive = Some(i);
            if cum > target {
                return i;
            }
        }
    }
    // rounding left the target at or past the total: the last token with mass
    last_positive.unwrap_or_else(|| argmax(probs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NI: f32 = f32::NEG_INFINITY;

    #[test]
    fn top_k_keeps_ties_at_kth() {
        let mut x = [1.0, 3.0, 2.0, 2.0, 0.5];
        top_k(&mut x, 2);
        assert_eq!(x, [NI, 3.0, 2.0, 2.0, NI]);
        let mut x = [1.0, 3.0, 2.0, 2.0, 0.5];
        top_k(&mut x, 3);
        assert_eq!(x, [NI, 3.0, 2.0, 2.0, NI]);
        let mut x = [1.0, 3.0, 2.0, 2.0, 0.5];
        top_k(&mut x, 4);
        assert_eq!(x, [1.0, 3.0, 2.0, 2.0, NI]);
    }

    #[test]
    fn top_k_edge_cases() {
        let orig = [1.0, -2.0, 0.5];
        for k in [0, 3, 4, 100] {
            let mut x = orig;
            top_k(&mut x, k);
            assert_eq!(x, orig, "k = {k}");
        }
        let mut x = orig;
        top_k(&mut x, 1);
        assert_eq!(x, [1.0, NI, NI]);
        let mut x = [0.1, 0.9, 0.9];
        top_k(&mut x, 1);
        assert_eq!(x, [NI, 0.9, 0.9]);
    }

    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn top_p_small_keeps_only_max() {
        let orig = logits_of(&[0.2, 0.5, 0.3]);
        for p in [0.0, -1.0, 0.1, 0.49] {
            let mut x = orig.clone();
            top_p(&mut x, p);
            assert_eq!(x, [NI, orig[1], NI], "p = {p}");
        }
    }

    #[test]
    fn top_p_one_is_unchanged() {
        let orig = logits_of(&[0.2, 0.5, 0.3]);
        for p in [1.0, 1.5, f32::NAN] {
            let mut x = orig.clone();
            top_p(&mut x, p);
            assert_eq!(x, orig);
        }
    }

    #[test]
    fn top_p_keeps_boundary_token() {
        // sorted probs 0.5, 0.3, 0.2: cum 0.5, 0.8, 1.0
        let orig = logits_of(&[0.2, 0.5, 0.3]);
        // cum[0] = 0.5 <= 0.6, so rank 1 (0.3) is kept although it takes the mass past p
        let mut x = orig.clone();
        top_p(&mut x, 0.6);
        assert_eq!(x, [NI, orig[1], orig[2]]);
        let mut x = orig.clone();
        top_p(&mut x, 0.79);
        assert_eq!(x, [NI, orig[1], orig[2]]);
        // cum[1] = 0.8 <= 0.85: all three kept
        let mut x = orig.clone();
        top_p(&mut x, 0.85);
        assert_eq!(x, orig);
        // the filter is shift invariant (softmax of the logits)
        let mut x: Vec<f32> = orig.iter().map(|v| v + 100.0).collect();
        top_p(&mut x, 0.6);
        assert_eq!(x[0], NI);
        assert!(x[1].is_finite() && x[2].is_finite());
    }

    #[test]
    fn top_p_keeps_ties() {
        // sorted probs 0.4, 0.2, 0.2, 0.2: the boundary token ties with two others
        let orig = logits_of(&[0.2, 0.4, 0.2, 0.2]);
        let mut x = orig.clone();
        top_p(&mut x, 0.5);
        assert_eq!(x, orig);
        // ties at the max with p <= 0
        let orig = [2.0, 1.0, 2.0];
        let mut x = orig;
        top_p(&mut x, 0.0);
        assert_eq!(x, [2.0, NI, 2.0]);
    }

    #[test]
    fn top_p_all_neg_inf_unchanged() {
        let mut x = [NI, NI];
        top_p(&mut x, 0.5);
        assert_eq!(x, [NI, NI]);
        let mut x: [f32; 0] = [];
        top_p(&mut x, 0.5);
    }

    #[test]
    fn top_k_then_top_p() {
        // probs 0.35, 0.25, 0.2, 0.15, 0.05
        let orig = logits_of(&[0.05, 0.35, 0.2, 0.25, 0.15]);
        let mut x = orig.clone();
        top_k(&mut x, 3);
        assert_eq!(x, [NI, orig[1], orig[2], orig[3], NI]);
        // renormalised over the top 3: 0.4375, 0.3125, 0.25; cum 0.4375, 0.75, 1.0
        let mut y = x.clone();
        top_p(&mut y, 0.5);
        assert_eq!(y, [NI, orig[1], NI, orig[3], NI]);
        let mut y = x.clone();
        top_p(&mut y, 0.8);
        assert_eq!(y, x);
        let mut y = x;
        top_p(&mut y, 0.4);
        assert_eq!(y, [NI, orig[1], NI, NI, NI]);
    }

    #[test]
    fn softmax_handles_neg_inf() {
        let mut x = [0.0, NI, 0.0, NI];
        softmax_in_place(&mut x);
        assert_eq!(x, [0.5, 0.0, 0.5, 0.0]);
        let mut x = [1000.0, 999.0, NI];
        softmax_in_place(&mut x);
        let e = (-1.0f32).exp();
        assert!((x[0] - 1.0 / (1.0 + e)).abs() < 1e-6);
        assert!((x[1] - e / (1.0 + e)).abs() < 1e-6);
        assert_eq!(x[2], 0.0);
        let mut x = [NI, NI];
        softmax_in_place(&mut x);
        assert_eq!(x, [0.0, 0.0]);
        let mut x = [1.0, 2.0, 3.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[0] < x[1] && x[1] < x[2]);
    }

    #[test]
    fn argmax_first_of_max() {
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), 1);
        assert_eq!(argmax(&[0.7, 0.1, 0.7]), 0);
        assert_eq!(argmax(&[NI, -3.0, NI]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn draw_never_picks_zero_probability() {
        let mut logits = [NI, 1.0, NI, 0.5, NI, NI];
        softmax_in_place(&mut logits);
        let mut us: Vec<f32> = (0..1000).map(|i| i as f32 / 1000.0).collect();
        us.extend([
            0.0,
            0.999_999,
            1.0 - f32::EPSILON / 2.0,
            1.0,
            1.5,
            -0.5,
            f32::NAN,
        ]);
        for u in us {
            let i = draw(&logits, u);
            assert!(i == 1 || i == 3, "u = {u} drew {i}");
        }
        // zeros at both ends
        let probs = [0.0, 0.0, 1.0, 0.0];
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(draw(&probs, u), 2);
        }
        // a row summing to a little less than 1
        let probs = [0.0, 0.3, 0.0, 0.69];
        assert_eq!(draw(&probs, 0.999_999), 3);
        assert_eq!(draw(&probs, 0.0), 1);
    }

    #[test]
    fn draw_follows_cdf() {
        let probs = [0.2, 0.5, 0.3];
        assert_eq!(draw(&probs, 0.0), 0);
        assert_eq!(draw(&probs, 0.19), 0);
        assert_eq!(draw(&probs, 0.21), 1);
        assert_eq!(draw(&probs, 0.69), 1);
        assert_eq!(draw(&probs, 0.71), 2);
        assert_eq!(draw(&probs, 0.999_999), 2);
        // empirical frequencies over a uniform grid of u
        let mut counts = [0usize; 3];
        let n = 10_000;
        for k in 0..n {
            counts[draw(&probs, (k as f32 + 0.5) / n as f32)] += 1;
        }
        assert_eq!(counts, [2000, 5000, 3000]);
    }
}
