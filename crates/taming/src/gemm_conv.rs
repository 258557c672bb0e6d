//! A 2-D convolution of any kernel size, stride and (possibly asymmetric) zero padding, computed
//! image by image as `W (O, C*kh*kw) @ im2col(x_b) (C*kh*kw, Ho*Wo)` with gemm, as one candle op
//! whose backward computes only the gradients the graph needs. No reference file: this is
//! `torch.nn.functional.conv2d` for the convolutions [`crate::direct_conv`] does not cover (the
//! 1x1 shortcuts and attention projections, `Downsample`'s stride-2 convolution, the
//! discriminator's 4x4 convolutions).
//!
//! Built from candle ops (an `im2col` op, a broadcast matrix product and a bias add), a
//! convolution's backward also computes the gradient of inputs nothing needs: the weights of a
//! frozen network, the image a discriminator reads; candle differentiates every argument of a
//! tracked op and adds each gradient into a zeroed buffer. Here the backward skips an argument
//! that no variable feeds ([`Tensor::track_op`]), the column buffer holds one image at a time
//! instead of the whole batch, and the weight gradient is summed over the images in gemm's
//! accumulator instead of a (B, O, K) product reduced afterwards.
//!
//! The plain version is candle's `conv2d`; the tests of [`crate::kernels::conv2d_im2col`] check
//! this op against it, forward and all three gradients.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::kernels::{cpu_f32, Geometry, Padding};
use crate::Result;

/// `conv2d(x (B, C, H, W), w (O, C, kh, kw)) + bias (O)` with `stride` and zero padding `pad`:
/// (B, O, Ho, Wo). Differentiable in all three; CPU and float32 only. Without a bias a zero one
/// is used (not a variable, so never differentiated).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Padding,
) -> Result<Tensor> {
    let o = w.dim(0)?;
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(o, w.dtype(), w.device())?,
    };
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias, GemmConv { stride, pad })?)
}

/// The op: arguments `x` (B, C, H, W), `w` (O, C, kh, kw) and `bias` (O).
#[derive(Debug, Clone, Copy)]
struct GemmConv {
    stride: usize,
    pad: Padding,
}

/// A convolution's shapes with the operands' sizes checked.
fn geometry(
    x: &[usize],
    w: &[usize],
    stride: usize,
    pad: Padding,
) -> candle_core::Result<(Geometry, usize)> {
    let [o, c, kh, kw] = w else {
        candle_core::bail!("convolution: weight of shape {w:?}, expected (O, C, kh, kw)")
    };
    let g = Geometry::new(x, *kh, *kw, stride, pad)?;
    if g.c != *c {
        candle_core::bail!("convolution: a weight of shape {w:?} for an input of shape {x:?}")
    }
    Ok((g, *o))
}

impl Geometry {
    /// Whether the convolution reads the input as it is (1x1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == Padding::same(0)
    }
}

/// How a batch is split: images run in parallel with a single-threaded gemm when there are at
/// least as many as threads (`None`), otherwise one after another, each product and column
/// gather on all threads.
fn parallelism(b: usize) -> Option<Parallelism> {
    let threads = rayon::current_num_threads();
    if b >= threads || threads == 1 {
        None
    } else {
        Some(Parallelism::Rayon(threads))
    }
}

/// `dst (m, n) = beta * lhs (m, k) @ rhs (k, n) [+ dst]` on row-major/strided operands.
/// `lhs` element (i, p) is at `lhs[i * lrs + p * lcs]`, `rhs` (p, j) at `rhs[p * rrs + j * rcs]`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    par: Option<Parallelism>,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    // the callers slice whole matrices out of buffers whose sizes they checked against the
    // shapes; these restate that in debug builds
    debug_assert!(dst.len() >= m * n);
    debug_assert!(k == 0 || lhs.len() > last(lrs, lcs, m, k));
    debug_assert!(k == 0 || rhs.len() > last(rrs, rcs, k, n));
    // SAFETY: dst holds m * n values written row-major (row stride n); lhs and rhs hold every
    // element the strides address (the callers size them from checked shapes); the three do
    // not overlap (distinct slices, one of them mutable).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par.unwrap_or(Parallelism::None),
        )
    }
}

/// The column matrix (C*kh*kw, Ho*Wo) of image `xb` (C, H, W) in `cols`, whose padding entries
/// are zero already (they are never written, so a buffer can serve image after image).
fn gather_image(xb: &[f32], g: &Geometry, cols: &mut [f32], parallel: bool) {
    let (hw, plane) = (g.h * g.w, g.kh * g.kw * g.cols());
    if parallel {
        cols.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(c, dst)| g.gather_plane(&xb[c * hw..(c + 1) * hw], dst));
    } else {
        for (c, dst) in cols.chunks_mut(plane).enumerate() {
            g.gather_plane(&xb[c * hw..(c + 1) * hw], dst);
        }
    }
}

/// The operands' element counts against the shapes (the kernels index them by the shapes).
fn check_sizes(g: &Geometry, o: usize, x: &[f32], w: &[f32]) -> candle_core::Result<()> {
    if x.len() != g.b * g.c * g.h * g.w || w.len() != o * g.rows() {
        candle_core::bail!(
            "convolution: {} input and {} weight values for {}x{}x{}x{} and {o}x{}",
            x.len(),
            w.len(),
            g.b,
            g.c,
            g.h,
            g.w,
            g.rows()
        )
    }
    Ok(())
}

/// The weight gradient (O, C*kh*kw) row-major: the sum over images of `dy_b (O, L) @ cols_b^T
/// (L, K)`, each thread summing its images in gemm's accumulator.
fn weight_grad_data(x: &[f32], dy: &[f32], g: &Geometry, o: usize) -> Vec<f32> {
    let (k, l, chw) = (g.rows(), g.cols(), g.c * g.h * g.w);
    let par = parallelism(g.b);
    let pointwise = g.pointwise();
    (0..g.b)
        .into_par_iter()
        .fold(
            || {
                (
                    vec![0f32; o * k],
                    vec![0f32; if pointwise { 0 } else { k * l }],
                )
            },
            |(mut acc, mut cols), bi| {
                let xb = &x[bi * chw..(bi + 1) * chw];
                let colsb: &[f32] = if pointwise {
                    xb
                } else {
                    gather_image(xb, g, &mut cols, par.is_some());
                    &cols
                };
                let dyb = &dy[bi * o * l..(bi + 1) * o * l];
                matmul(&mut acc, (o, k, l), true, dyb, (l, 1), colsb, (1, l), par);
                (acc, cols)
            },
        )
        .map(|(acc, _)| acc)
        .reduce(
            || vec![0f32; o * k],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// The gradient of `sum(dy * conv2d(x, W))` with respect to `W`, given the convolution's input
/// `x` (B, C, H, W), its output gradient `dy` (B, O, Ho, Wo) and the weight's shape: (O, C, kh,
/// kw). Not differentiable.
pub fn weight_grad(
    x: &Tensor,
    dy: &Tensor,
    weight_dims: (usize, usize, usize, usize),
    stride: usize,
    pad: Padding,
) -> Result<Tensor> {
    let (o, c, kh, kw) = weight_dims;
    let g = Geometry::new(x.dims(), kh, kw, stride, pad)?;
    if g.c != c || dy.dims() != [g.b, o, g.ho, g.wo] {
        return Err(crate::Error::invalid(format!(
            "weight gradient: output gradient of shape {:?} and input of shape {:?} do not fit \
             a ({o}, {c}, {kh}, {kw}) convolution with stride {stride}",
            dy.dims(),
            x.dims()
        )));
    }
    let (x, dy) = (x.contiguous()?, dy.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ds)) = (&*xs, &*ds) else {
        return Err(crate::Error::invalid(
            "the weight gradient runs on CPU float32 tensors",
        ));
    };
    let xv = cpu_f32(xs, xl, "convolution input")?;
    let dv = cpu_f32(ds, dl, "convolution output gradient")?;
    let dw = weight_grad_data(xv, dv, &g, o);
    Ok(Tensor::from_vec(dw, weight_dims, x.device())?)
}

impl CustomOp3 for GemmConv {
    fn name(&self) -> &'static str {
        "gemm-conv2d"
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
        let x = cpu_f32(s1, l1, "convolution input")?;
        let wt = cpu_f32(s2, l2, "convolution weight")?;
        let bias = cpu_f32(s3, l3, "convolution bias")?;
        let (g, o) = geometry(l1.dims(), l2.dims(), self.stride, self.pad)?;
        check_sizes(&g, o, x, wt)?;
        if bias.len() != o {
            candle_core::bail!("convolution: {} biases for {o} output channels", bias.len())
        }
        let (k, l, chw) = (g.rows(), g.cols(), g.c * g.h * g.w);
        let mut y = vec![0f32; g.b * o * l];
        let par = parallelism(g.b);
        let pointwise = g.pointwise();
        y.par_chunks_mut((o * l).max(1)).enumerate().for_each_init(
            || vec![0f32; if pointwise { 0 } else { k * l }],
            |cols, (bi, yb)| {
                let xb = &x[bi * chw..(bi + 1) * chw];
                let colsb: &[f32] = if pointwise {
                    xb
                } else {
                    gather_image(xb, &g, cols, par.is_some());
                    cols
                };
                for (row, bv) in yb.chunks_mut(l.max(1)).zip(bias) {
                    row.fill(*bv);
                }
                // y_b (O, L) = bias + W (O, K) @ cols_b (K, L)
                matmul(yb, (o, l, k), true, wt, (k, 1), colsb, (l, 1), par);
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((g.b, o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g, o) = geometry(x.dims(), w.dims(), self.stride, self.pad)?;
        let grad = grad.contiguous()?;
        let (k, l, chw) = (g.rows(), g.cols(), g.c * g.h * g.w);
        let par = parallelism(g.b);
        let pointwise = g.pointwise();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(ds)) = (&*xs, &*ws, &*ds) else {
            candle_core::bail!("convolution: the gemm kernel runs on the CPU")
        };
        let xv = cpu_f32(xs, xl, "convolution input")?;
        let wv = cpu_f32(ws, wl, "convolution weight")?;
        let dy = cpu_f32(ds, dl, "convolution output gradient")?;
        check_sizes(&g, o, xv, wv)?;
        if dy.len() != g.b * o * l {
            candle_core::bail!(
                "convolution: output gradient of shape {:?} for an output ({}, {o}, {}, {})",
                grad.dims(),
                g.b,
                g.ho,
                g.wo
            )
        }
        // the input gradient: col2im(W^T (K, O) @ dy_b (O, L)) per image
        let dx = if x.track_op() {
            let mut dx = vec![0f32; g.b * chw];
            dx.par_chunks_mut(chw.max(1)).enumerate().for_each_init(
                || vec![0f32; if pointwise { 0 } else { k * l }],
                |dcols, (bi, dxb)| {
                    let dyb = &dy[bi * o * l..(bi + 1) * o * l];
                    if pointwise {
                        matmul(dxb, (k, l, o), false, wv, (1, k), dyb, (l, 1), par);
                    } else {
                        matmul(dcols, (k, l, o), false, wv, (1, k), dyb, (l, 1), par);
                        let (hw, plane) = (g.h * g.w, g.kh * g.kw * l);
                        for (c, dst) in dxb.chunks_mut(hw.max(1)).enumerate() {
                            g.scatter_plane(&dcols[c * plane..(c + 1) * plane], dst);
                        }
                    }
                },
            );
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = weight_grad_data(xv, dy, &g, o);
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        let db = if bias.track_op() {
            Some(crate::kernels::channel_sums(&grad, bias)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
