//! A direct 3x3 convolution (stride 1, zero padding 1) with AVX-512: the shape of nearly every
//! convolution in the reference's Encoder and Decoder (`conv_in`, the ResnetBlocks' `conv1` and
//! `conv2`, `Upsample.conv`, `conv_out`). No reference file: this is
//! `torch.nn.functional.conv2d(x, w, padding=1)`, computed without an `im2col` buffer.
//!
//! [`crate::kernels::conv2d_im2col`] builds a column buffer nine times the size of its input (38 MB
//! for a 32-channel 64x64 batch of 8, 300 MB for a 128-channel 256x256 image) and hands it to a
//! matrix product; writing, zeroing and reading that buffer cost more than the arithmetic. Here
//! each output tile (6 output channels x 64 pixels, 24 AVX-512 accumulators) is summed straight
//! from the input rows, with masked loads doing the zero padding at the image borders.
//! The input gradient of such a convolution is the same convolution of the output gradient with
//! the weights transposed and flipped ([`Conv3x3::flipped`]); the weight gradient has its own
//! kernel ([`weight_grad`]). The backward pass skips the gradient of an argument that no variable
//! feeds (an image, a frozen weight).
//!
//! [`conv3x3_reference`] is the plain version; the tests check the kernel against it and
//! against candle's `conv2d`, forward and backward.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Output channels per register tile.
const OB: usize = 6;
/// 16-lane vectors of output pixels per register tile.
const XV: usize = 4;
/// Lanes of an AVX-512 float vector.
const LANES: usize = 16;

/// Whether [`conv3x3`] runs on this input and CPU: float32 on the CPU, with AVX-512F.
pub fn conv3x3_supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && avx512()
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `conv2d(x (B, C, H, W), w (O, C, 3, 3), padding=1)`: (B, O, H, W), no bias; differentiable in
/// `x` and `w`. Needs [`conv3x3_supported`].
pub fn conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv3x3::plain())?)
}

/// [`conv3x3`] plus a bias (O) per output channel, added in the kernel; differentiable in all
/// three.
pub fn conv3x3_bias(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias.contiguous()?, Conv3x3Bias)?)
}

/// The weight gradient of [`conv3x3`] alone: `x` (B, C, H, W) and the output gradient `dy`
/// (B, O, H, W) give (O, C, 3, 3). Needs [`conv3x3_supported`]; not differentiable.
pub fn conv3x3_weight_grad(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let o = dy.dim(1)?;
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &WeightGrad { o })?)
}

/// The plain version: `x` (B, C, H, W) and `w` (O, C, 3, 3) row-major, returns (B, O, H, W).
pub fn conv3x3_reference(
    x: &[f32],
    w: &[f32],
    dims: (usize, usize, usize, usize),
    o: usize,
) -> Vec<f32> {
    let (b, c, h, wd) = dims;
    let mut y = vec![0f32; b * o * h * wd];
    for bi in 0..b {
        for oi in 0..o {
            for yy in 0..h {
                for xx in 0..wd {
                    let mut s = 0f32;
                    for ci in 0..c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (yy + ky, xx + kx);
                                if iy == 0 || ix == 0 || iy > h || ix > wd {
                                    continue;
                                }
                                s += w[((oi * c + ci) * 3 + ky) * 3 + kx]
                                    * x[((bi * c + ci) * h + iy - 1) * wd + ix - 1];
                            }
                        }
                    }
                    y[((bi * o + oi) * h + yy) * wd + xx] = s;
                }
            }
        }
    }
    y
}

/// The convolution as a candle op: `x (B, Cin, H, W)` with weights `w (O, C, 3, 3)`, used as
/// they are (Cin = C, output O channels) or, when `flip` is set, transposed and flipped
/// (Cin = O, output C channels): the input gradient of the plain convolution.
#[derive(Debug, Clone, Copy)]
pub struct Conv3x3 {
    flip: bool,
}

impl Conv3x3 {
    /// `conv2d(x, w, padding=1)`.
    pub fn plain() -> Self {
        Self { flip: false }
    }

    /// `conv2d(x, w.transpose(0, 1).flip(2, 3), padding=1)`, i.e. `conv_transpose2d(x, w, padding=1)`.
    pub fn flipped() -> Self {
        Self { flip: true }
    }
}

/// Weights packed for the kernel: for each block of [`OB`] output channels, for each input
/// channel and tap `ky*3 + kx`, the block's [`OB`] weights (zeros past the last channel).
fn pack(w: &[f32], wo: usize, wc: usize, flip: bool) -> (Vec<f32>, usize, usize) {
    // as used: `cin` input channels, `cout` output channels
    let (cin, cout) = if flip { (wo, wc) } else { (wc, wo) };
    let blocks = cout.div_ceil(OB);
    let mut p = vec![0f32; blocks * cin * 9 * OB];
    // one task per block of output channels (the weights of a 128-channel layer are as large as
    // its 8x8 activations, and arrive cold from memory)
    p.par_chunks_mut((cin * 9 * OB).max(1))
        .enumerate()
        .for_each(|(blk, pb)| {
            for ci in 0..cin {
                for tap in 0..9 {
                    for ob in 0..OB {
                        let co = blk * OB + ob;
                        if co >= cout {
                            continue;
                        }
                        let v = if flip {
                            // w[ci][co][2-ky][2-kx] of the (O = cin, C = cout) weight
                            w[(ci * wc + co) * 9 + 8 - tap]
                        } else {
                            w[(co * wc + ci) * 9 + tap]
                        };
                        pb[(ci * 9 + tap) * OB + ob] = v;
                    }
                }
            }
        });
    (p, cin, cout)
}

/// One 16-pixel vector of output: 16 consecutive pixels of the row-major (h, w) plane from
/// `start` (crossing rows when w is not a multiple of 16, so that narrow planes such as 8x8 still
/// fill the lanes), and which lanes exist (the plane's last vector may be short).
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    lanes: u16,
}

/// The output pixels of an (h, w) plane as 16-lane spans.
fn spans(h: usize, w: usize) -> Vec<Span> {
    let hw = h * w;
    (0..hw)
        .step_by(LANES)
        .map(|start| Span {
            start,
            lanes: ((1u32 << (hw - start).min(LANES)) - 1) as u16,
        })
        .collect()
}

/// Spans grouped into bands of about `rows` rows (whole spans), each band into tiles of [`XV`]
/// spans with their [`Taps`].
fn bands(h: usize, w: usize, rows: usize) -> Vec<Vec<(Taps, Vec<Span>)>> {
    let per_band = (rows * w / LANES).max(1);
    spans(h, w)
        .chunks(per_band)
        .map(|band| {
            band.chunks(XV)
                .map(|t| (taps(t, h, w), t.to_vec()))
                .collect()
        })
        .collect()
}

/// For each tap and each span of a tile: the offset of the input pixel that lane 0 reads
/// (relative to the channel plane, may be negative) and the lanes that read inside the plane.
/// Lane l of a span stands for output pixel p = start + l, at (p / w, p % w); for tap (ky, kx) it
/// reads input pixel p + (ky - 1) * w + kx - 1, consecutive in l, which is valid when its row and
/// column (not the flat index) lie inside the plane.
type Taps = [[(isize, u16); XV]; 9];

fn taps(tile: &[Span], h: usize, w: usize) -> Taps {
    let mut t = [[(0isize, 0u16); XV]; 9];
    for (v, s) in tile.iter().enumerate() {
        for ky in 0..3 {
            for kx in 0..3 {
                let mut m = 0u16;
                for l in 0..LANES {
                    if s.lanes & (1 << l) == 0 {
                        continue;
                    }
                    let p = s.start + l;
                    let iy = (p / w) as isize + ky as isize - 1;
                    let ix = (p % w) as isize + kx as isize - 1;
                    if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                        m |= 1 << l;
                    }
                }
                let off = s.start as isize + (ky as isize - 1) * w as isize + kx as isize - 1;
                t[ky * 3 + kx][v] = (off, m);
            }
        }
    }
    t
}

/// Input rows (all channels) that one task keeps in cache while it runs every output channel.
const BAND_BYTES: usize = 1 << 20;

/// The output pointer shared by the tasks of [`run`]; each writes its own rows and channels.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks of `run` write disjoint parts of the buffer (see there), and the buffer
// outlives them (they are joined before it is returned).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Out`, which is `Sync`).
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// The kernel: `x` (B, cin, H, W) and packed weights into `y` (B, cout, H, W).
///
/// Tasks are (image, band of output rows, group of output-channel blocks): a band is sized so
/// that the input rows it reads (all channels) stay in the core's cache while every block of
/// output channels runs over them; groups split the channels when there are too few bands to
/// keep every thread busy.
fn run(
    x: &[f32],
    packed: &[f32],
    bias: &[f32],
    dims: (usize, usize, usize, usize),
    cout: usize,
) -> Vec<f32> {
    let (b, cin, h, w) = dims;
    let hw = h * w;
    let n = b * cout * hw;
    if n == 0 {
        return Vec::new();
    }
    // not zeroed first: the tasks below write every element once (tiles cover each plane's
    // pixels, blocks every output channel, tasks every image), and zeroing 4-8 MB per
    // convolution was a serial pass before each one
    let mut y: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation; the capacity is n.
    unsafe { y.set_len(n) };
    let row_bytes = 4 * cin * w;
    let band = (BAND_BYTES / row_bytes.max(1))
        .saturating_sub(2)
        .clamp(1, h);
    let bands = bands(h, w, band);
    let blocks = cout.div_ceil(OB);
    let threads = rayon::current_num_threads();
    let groups = (4 * threads).div_ceil(b * bands.len()).clamp(1, blocks);
    let per_group = blocks.div_ceil(groups);
    let out = Out(y.as_mut_ptr().cast::<f32>());
    let n_tasks = b * bands.len() * groups;
    (0..n_tasks).into_par_iter().for_each(|task| {
        let g = task % groups;
        let bnd = (task / groups) % bands.len();
        let bi = task / (groups * bands.len());
        let xb = &x[bi * cin * hw..(bi + 1) * cin * hw];
        for blk in g * per_group..((g + 1) * per_group).min(blocks) {
            let wp = &packed[blk * cin * 9 * OB..(blk + 1) * cin * 9 * OB];
            let bp = &bias[blk * OB..(blk + 1) * OB];
            let planes = (cout - blk * OB).min(OB);
            for (tp, tile) in &bands[bnd] {
                // SAFETY: `conv3x3_supported` checked AVX-512F before any op ran. The kernel
                // reads `xb` only at lanes its masks keep (inside each plane) and `wp` within
                // cin * 9 * OB; it writes `planes` planes from channel blk * OB of image bi, only
                // at the pixels of `tile`, which lie in this task's band: no other task writes
                // them (tasks differ in image, band or channel block), and all lie inside `y`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let yo = out.ptr().add((bi * cout + blk * OB) * hw);
                    tile_avx512(xb, hw, cin, wp, bp, tp, tile, yo, planes)
                };
            }
        }
    });
    // SAFETY: every element was written (see above); MaybeUninit<f32> and f32 have the same
    // size and alignment, so the allocation is a valid Vec<f32> of the same length and capacity.
    let mut y = std::mem::ManuallyDrop::new(y);
    unsafe { Vec::from_raw_parts(y.as_mut_ptr().cast::<f32>(), y.len(), y.capacity()) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512(
    x: &[f32],
    hw: usize,
    cin: usize,
    wp: &[f32],
    bias: &[f32],
    taps: &Taps,
    tile: &[Span],
    y: *mut f32,
    planes: usize,
) {
    use std::arch::x86_64::*;
    // the accumulators start at the bias (OB values)
    let mut acc: [[__m512; XV]; OB] = std::array::from_fn(|o| [_mm512_set1_ps(bias[o]); XV]);
    let xp = x.as_ptr();
    let wptr = wp.as_ptr();
    for ci in 0..cin {
        let xc = xp.wrapping_add(ci * hw);
        let wc = wptr.add(ci * 9 * OB);
        for (t, tap) in taps.iter().enumerate() {
            let mut xv = [_mm512_setzero_ps(); XV];
            for (v, &(off, m)) in tap.iter().enumerate() {
                // masked-off lanes are not read (AVX-512 suppresses their faults)
                xv[v] = _mm512_maskz_loadu_ps(m, xc.wrapping_offset(off));
            }
            for (o, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*wc.add(t * OB + o));
                for (a, xi) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, *xi, *a);
                }
            }
        }
    }
    for (o, row) in acc.iter().enumerate().take(planes) {
        for (s, a) in tile.iter().zip(row) {
            _mm512_mask_storeu_ps(y.add(o * hw + s.start), s.lanes, *a);
        }
    }
}

/// Output-gradient rows (all [`WB`] channels of a block) that a weight-gradient band holds.
const WGRAD_BAND_BYTES: usize = 24 << 10;

/// Output channels per weight-gradient tile (with 3 taps of a kernel row: 18 accumulators, 6
/// output-gradient vectors and one input vector: 25 of the 32 registers).
const WB: usize = 6;

/// The weight gradient of the plain convolution: `dw[o, c, ky, kx] = sum over images and pixels
/// of dy[o, y, x] * x[c, y + ky - 1, x + kx - 1]`, for `x` (B, C, H, W) and `dy` (B, O, H, W):
/// (O, C, 3, 3) row-major. Plain version: [`weight_grad_reference`].
///
/// Tasks are (block of [`WB`] output channels, group of input channels) and own their part of
/// the result. Each walks the images band by band (as [`run`]); per input channel and kernel row
/// it keeps 6 x 3 vector accumulators in registers over the band and in a small buffer between
/// bands, and reduces their lanes at the end.
pub fn weight_grad(
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize),
    o: usize,
) -> Vec<f32> {
    let (b, c, h, w) = dims;
    let hw = h * w;
    let mut dw = vec![0f32; o * c * 9];
    if dw.is_empty() || hw == 0 || b == 0 {
        return dw;
    }
    // bands whose output-gradient rows (WB channels) stay in the L1 cache across the input
    // channels and kernel rows that read them; a small plane is one band, and then a band
    // holds several images, so that the accumulators stay in registers across them
    let band = (WGRAD_BAND_BYTES / (4 * WB * w)).clamp(1, h);
    let bands = bands(h, w, band);
    let images = if bands.len() == 1 {
        (WGRAD_BAND_BYTES / (4 * WB * hw)).clamp(1, b)
    } else {
        1
    };
    let blocks = o.div_ceil(WB);
    let threads = rayon::current_num_threads();
    // enough tasks that threads finish together (11 tasks on 2 threads would leave one idle
    // for a twelfth of the time)
    let groups = (8 * threads).div_ceil(blocks).clamp(1, c);
    let per_group = c.div_ceil(groups);
    let out = Out(dw.as_mut_ptr());
    (0..blocks * groups).into_par_iter().for_each(|task| {
        let (blk, g) = (task / groups, task % groups);
        let (c0, c1) = (g * per_group, ((g + 1) * per_group).min(c));
        if c0 >= c1 {
            return;
        }
        let planes = (o - blk * WB).min(WB);
        // accumulators between bands: per (channel, kernel row), WB x 3 vectors of 16 lanes
        let mut acc = vec![0f32; (c1 - c0) * 3 * WB * 3 * LANES];
        let mut pairs: Vec<(&[f32], &[f32])> = Vec::with_capacity(images);
        for i0 in (0..b).step_by(images) {
            for tiles in &bands {
                for ci in c0..c1 {
                    pairs.clear();
                    pairs.extend((i0..(i0 + images).min(b)).map(|bi| {
                        (
                            &x[(bi * c + ci) * hw..(bi * c + ci + 1) * hw],
                            &dy[(bi * o + blk * WB) * hw..(bi * o + blk * WB + planes) * hw],
                        )
                    }));
                    for ky in 0..3 {
                        let at = ((ci - c0) * 3 + ky) * WB * 3 * LANES;
                        let a = &mut acc[at..at + WB * 3 * LANES];
                        // SAFETY: `conv3x3_supported` checked AVX-512F before any op ran; the
                        // kernel reads each image's `xc` plane and `planes` planes of its `dy`
                        // only at lanes its masks keep (inside the planes), and writes only `a`.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            wgrad_row_avx512(&pairs, hw, planes, ky, tiles, a)
                        };
                    }
                }
            }
        }
        for ci in c0..c1 {
            for ky in 0..3 {
                for ob in 0..planes {
                    for kx in 0..3 {
                        let at = (((ci - c0) * 3 + ky) * WB * 3 + ob * 3 + kx) * LANES;
                        let v: f32 = acc[at..at + LANES].iter().sum();
                        let idx = (((blk * WB + ob) * c + ci) * 3 + ky) * 3 + kx;
                        // SAFETY: idx < o * c * 9 (ob < planes, ci < c); only this task
                        // writes entries of its channel block and channel group.
                        unsafe { *out.ptr().add(idx) = v };
                    }
                }
            }
        }
    });
    dw
}

/// Adds the products of one kernel row `ky` over the spans of `tiles` of each image (its input
/// plane and its [`WB`]-channel block of output-gradient planes) into `acc` ([`WB`] x 3 taps x
/// 16 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wgrad_row_avx512(
    images: &[(&[f32], &[f32])],
    hw: usize,
    planes: usize,
    ky: usize,
    tiles: &[(Taps, Vec<Span>)],
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut a = [[_mm512_setzero_ps(); 3]; WB];
    for (o, row) in a.iter_mut().enumerate() {
        for (kx, v) in row.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(acc.as_ptr().add((o * 3 + kx) * LANES));
        }
    }
    for (xc, dy) in images {
        let xp = xc.as_ptr();
        // past the last plane a block reads the last plane again (its sums are never stored),
        // so that all WB registers load from memory the block has, without per-plane masks
        let dyp: [*const f32; WB] =
            std::array::from_fn(|o| dy.as_ptr().add(o.min(planes - 1) * hw));
        for (tp, tile) in tiles {
            for (v, s) in tile.iter().enumerate() {
                let g: [__m512; WB] = if s.lanes == u16::MAX {
                    std::array::from_fn(|o| _mm512_loadu_ps(dyp[o].add(s.start)))
                } else {
                    std::array::from_fn(|o| _mm512_maskz_loadu_ps(s.lanes, dyp[o].add(s.start)))
                };
                for kx in 0..3 {
                    let (off, m) = tp[ky * 3 + kx][v];
                    // masked-off lanes are not read (AVX-512 suppresses their faults)
                    let xv = _mm512_maskz_loadu_ps(m, xp.wrapping_offset(off));
                    for (row, gv) in a.iter_mut().zip(&g) {
                        row[kx] = _mm512_fmadd_ps(*gv, xv, row[kx]);
                    }
                }
            }
        }
    }
    for (o, row) in a.iter().enumerate() {
        for (kx, v) in row.iter().enumerate() {
            _mm512_storeu_ps(acc.as_mut_ptr().add((o * 3 + kx) * LANES), *v);
        }
    }
}

/// The plain version of [`weight_grad`].
pub fn weight_grad_reference(
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize),
    o: usize,
) -> Vec<f32> {
    let (b, c, h, w) = dims;
    let mut dw = vec![0f32; o * c * 9];
    for bi in 0..b {
        for oi in 0..o {
            for ci in 0..c {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let mut s = 0f32;
                        for yy in 0..h {
                            for xx in 0..w {
                                let (iy, ix) = (yy + ky, xx + kx);
                                if iy == 0 || ix == 0 || iy > h || ix > w {
                                    continue;
                                }
                                s += dy[((bi * o + oi) * h + yy) * w + xx]
                                    * x[((bi * c + ci) * h + iy - 1) * w + ix - 1];
                            }
                        }
                        dw[((oi * c + ci) * 3 + ky) * 3 + kx] += s;
                    }
                }
            }
        }
    }
    dw
}

/// The forward pass of [`Conv3x3`] and [`Conv3x3Bias`] on CPU storages.
fn forward(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
    flip: bool,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = crate::kernels::cpu_f32(s1, l1, "conv3x3 input")?;
    let wt = crate::kernels::cpu_f32(s2, l2, "conv3x3 weight")?;
    let (b, c, h, w) = l1.shape().dims4()?;
    let (wo, wc, kh, kw) = l2.shape().dims4()?;
    let cin = if flip { wo } else { wc };
    if (kh, kw) != (3, 3) || cin != c {
        candle_core::bail!(
            "conv3x3: weight of shape {:?} for an input of shape {:?}",
            l2.dims(),
            l1.dims()
        )
    }
    if !avx512() {
        candle_core::bail!("conv3x3: this CPU has no AVX-512F")
    }
    let (packed, _, cout) = pack(wt, wo, wc, flip);
    // the bias per output channel, padded to whole blocks
    let mut bp = vec![0f32; cout.div_ceil(OB) * OB];
    if let Some((s3, l3)) = bias {
        let bv = crate::kernels::cpu_f32(s3, l3, "conv3x3 bias")?;
        if bv.len() != cout {
            candle_core::bail!("conv3x3: {} biases for {cout} output channels", bv.len())
        }
        bp[..cout].copy_from_slice(bv);
    }
    let y = run(x, &packed, &bp, (b, c, h, w), cout);
    Ok((CpuStorage::F32(y), Shape::from((b, cout, h, w))))
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        forward(s1, l1, s2, l2, None, self.flip)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.flip {
            candle_core::bail!("conv3x3: the flipped convolution is not differentiated")
        }
        // only the gradients a variable needs (an image or a frozen weight gets none)
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &Conv3x3::flipped())?) // (B, C, H, W)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &WeightGrad { o: w.dim(0)? })?) // (O, C, 3, 3)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// [`Conv3x3`] with a bias (O) added in the kernel (its accumulators start there).
#[derive(Debug, Clone, Copy)]
struct Conv3x3Bias;

impl CustomOp3 for Conv3x3Bias {
    fn name(&self) -> &'static str {
        "conv3x3-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        forward(s1, l1, s2, l2, Some((s3, l3)), false)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = Conv3x3::plain().bwd(x, w, res, grad)?;
        // the bias gradient: the output gradient summed per channel
        let db = if bias.track_op() {
            Some(crate::kernels::channel_sums(grad, bias)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// [`weight_grad`] as a candle op on `x` (B, C, H, W) and `dy` (B, O, H, W): (O, C, 3, 3).
#[derive(Debug, Clone, Copy)]
struct WeightGrad {
    o: usize,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv3x3-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::kernels::cpu_f32(s1, l1, "conv3x3 input")?;
        let dy = crate::kernels::cpu_f32(s2, l2, "conv3x3 output gradient")?;
        let (b, c, h, w) = l1.shape().dims4()?;
        if l2.dims() != [b, self.o, h, w] {
            candle_core::bail!(
                "conv3x3: output gradient of shape {:?} for an input of shape {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        if !avx512() {
            candle_core::bail!("conv3x3: this CPU has no AVX-512F")
        }
        let dw = weight_grad(x, dy, (b, c, h, w), self.o);
        Ok((CpuStorage::F32(dw), Shape::from((self.o, c, 3, 3))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::transformer::max_abs_diff(a, b).unwrap()
    }

    /// Kernel against the plain loop and candle's conv2d, for widths below, at and across the
    /// 16-lane vectors (which then cross rows), channel counts not a multiple of the 6-channel
    /// tile, and the gradients against candle's.
    #[test]
    fn matches_plain_loop_and_candle_forward_and_backward() -> anyhow::Result<()> {
        if !avx512() {
            println!("skipped: this CPU has no AVX-512F");
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(b, c, o, h, w) in &[
            (1usize, 1usize, 1usize, 1usize, 1usize),
            (2, 3, 5, 7, 9),
            (1, 4, 7, 16, 16),
            (2, 5, 13, 5, 33),
            (1, 8, 6, 12, 20),
            // 8x8 planes: each 16-lane vector holds two rows
            (2, 16, 7, 8, 8),
            // 168 KB input rows: bands of 4 rows (the second one short) and two channel groups
            (1, 70, 7, 6, 600),
            // weight gradient: 16 images per band, the last band holding one
            (17, 2, 3, 8, 8),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, 3, 3), &dev)?)?;
            let got = conv3x3(x.as_tensor(), wt.as_tensor())?;
            let plain = conv3x3_reference(
                &x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                &wt.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                (b, c, h, w),
                o,
            );
            let plain = Tensor::from_vec(plain, (b, o, h, w), &dev)?;
            assert!(max_diff(&got, &plain) < 1e-4, "plain {b} {c} {o} {h} {w}");
            let want = x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1)?;
            assert!(max_diff(&got, &want) < 1e-4, "candle {b} {c} {o} {h} {w}");
            let probe = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
            let plain_dw = weight_grad_reference(
                &x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                &probe.flatten_all()?.to_vec1::<f32>()?,
                (b, c, h, w),
                o,
            );
            let fast_dw = weight_grad(
                &x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                &probe.flatten_all()?.to_vec1::<f32>()?,
                (b, c, h, w),
                o,
            );
            let (pd, fd) = (
                Tensor::from_vec(plain_dw, (o, c, 3, 3), &dev)?,
                Tensor::from_vec(fast_dw, (o, c, 3, 3), &dev)?,
            );
            assert!(max_diff(&pd, &fd) < 1e-2, "weight grad {b} {c} {o} {h} {w}");
            let gw = (want * &probe)?.sum_all()?.backward()?;
            let gg = (got * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &wt)] {
                let d = max_diff(
                    gw.get(v.as_tensor()).unwrap(),
                    gg.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-3, "grad {name} {b} {c} {o} {h} {w}: {d}");
            }
            // with a bias added in the kernel: against candle's conv2d + broadcast add
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev)?)?;
            let got = conv3x3_bias(x.as_tensor(), wt.as_tensor(), bias.as_tensor())?;
            let want = x
                .as_tensor()
                .conv2d(wt.as_tensor(), 1, 1, 1, 1)?
                .broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1))?)?;
            assert!(max_diff(&got, &want) < 1e-4, "bias {b} {c} {o} {h} {w}");
            let gg = (got * &probe)?.sum_all()?.backward()?;
            let gw = (want * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &wt), ("bias", &bias)] {
                let d = max_diff(
                    gw.get(v.as_tensor()).unwrap(),
                    gg.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-3, "grad {name} with bias {b} {c} {o} {h} {w}: {d}");
            }
        }
        Ok(())
    }
}
