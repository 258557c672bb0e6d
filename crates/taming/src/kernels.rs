//! Convolution helpers for training and inference on the CPU: zero padding (possibly
//! asymmetric), the `im2col` geometry shared by [`crate::gemm_conv`], the dispatch of a
//! convolution to [`crate::direct_conv`] (3x3, stride 1) or [`crate::gemm_conv`] (any other
//! shape), and per-channel gradient sums.
//!
//! candle 0.11's `conv2d` backward always computes the input gradient with `conv_transpose2d`,
//! whose CPU kernel is a direct loop and dominates a training step; both kernels here compute
//! every gradient as a convolution or a matrix product instead. Padding may be asymmetric (the
//! reference's `Downsample` pads right and bottom only). No reference file:
//! `torch.nn.functional.conv2d` is what this computes.
//!
//! [`conv2d_im2col`] is tested against candle's `conv2d` (forward and all three gradients), the
//! plain reference version it replaces.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Zero padding of a convolution: (top, bottom, left, right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// The same padding on every side (`torch.nn.Conv2d(padding=p)`).
    pub fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// Geometry of one convolution: input (b, c, h, w), kernel kh x kw, output (ho, wo).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) b: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) stride: usize,
    pub(crate) pad: Padding,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Geometry {
    pub(crate) fn new(
        dims: &[usize],
        kh: usize,
        kw: usize,
        stride: usize,
        pad: Padding,
    ) -> candle_core::Result<Self> {
        let [b, c, h, w] = dims else {
            candle_core::bail!("im2col expects a (B, C, H, W) input, got {dims:?}")
        };
        let (hp, wp) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
        if hp < kh || wp < kw || stride == 0 {
            candle_core::bail!("im2col: a {kh}x{kw} kernel does not fit a padded {hp}x{wp} input")
        }
        Ok(Self {
            b: *b,
            c: *c,
            h: *h,
            w: *w,
            kh,
            kw,
            stride,
            pad,
            ho: (hp - kh) / stride + 1,
            wo: (wp - kw) / stride + 1,
        })
    }

    /// Rows of the column matrix: C * kh * kw.
    pub(crate) fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the column matrix: Ho * Wo.
    pub(crate) fn cols(&self) -> usize {
        self.ho * self.wo
    }

    /// Input row and column read by output position `o` along one axis for kernel offset `k`, if
    /// inside the unpadded input.
    fn source(o: usize, k: usize, stride: usize, pad_before: usize, size: usize) -> Option<usize> {
        let p = o * stride + k;
        p.checked_sub(pad_before).filter(|i| *i < size)
    }
}

impl Geometry {
    /// The runs that connect one channel plane (h, w) to its column matrix (kh * kw, Ho * Wo):
    /// for each kernel tap and output row inside the input, `f(col, pix, len)` with the run's
    /// start in the column matrix (`len` consecutive entries) and in the plane (`len` pixels
    /// `stride` apart). Output positions that read the padding belong to no run.
    fn runs(&self, mut f: impl FnMut(usize, usize, usize)) {
        let cols = self.cols();
        for i in 0..self.kh {
            for j in 0..self.kw {
                let (lo, hi) = self.inside(j);
                if lo >= hi {
                    continue;
                }
                let s0 = lo * self.stride + j - self.pad.left;
                for oy in 0..self.ho {
                    if let Some(iy) = Self::source(oy, i, self.stride, self.pad.top, self.h) {
                        f(
                            (i * self.kw + j) * cols + oy * self.wo + lo,
                            iy * self.w + s0,
                            hi - lo,
                        );
                    }
                }
            }
        }
    }

    /// `im2col` of one channel plane `src` (h, w) into `dst` (kh * kw, Ho * Wo): row `i * kw + j`
    /// holds the pixels that kernel tap (i, j) sees at every output position. Entries that fall
    /// in the padding are not written (a zeroed `dst` keeps them zero).
    pub(crate) fn gather_plane(&self, src: &[f32], dst: &mut [f32]) {
        self.runs(|col, pix, len| {
            let d = &mut dst[col..col + len];
            if self.stride == 1 {
                d.copy_from_slice(&src[pix..pix + len]);
            } else {
                for (d, v) in d.iter_mut().zip(src[pix..].iter().step_by(self.stride)) {
                    *d = *v;
                }
            }
        });
    }

    /// `col2im` of one channel: the adjoint of [`Geometry::gather_plane`], adding every entry
    /// of `src` (kh * kw, Ho * Wo) into the pixel of `dst` (h, w) it came from.
    pub(crate) fn scatter_plane(&self, src: &[f32], dst: &mut [f32]) {
        self.runs(|col, pix, len| {
            for (d, v) in dst[pix..]
                .iter_mut()
                .step_by(self.stride)
                .zip(&src[col..col + len])
            {
                *d += *v;
            }
        });
    }

    /// The output columns `lo..hi` whose source column `ox * stride + j - pad.left` for kernel
    /// column `j` lies inside the input (the others read the padding).
    fn inside(&self, j: usize) -> (usize, usize) {
        let lo = self.pad.left.saturating_sub(j).div_ceil(self.stride);
        let hi = (self.w + self.pad.left)
            .saturating_sub(j)
            .div_ceil(self.stride)
            .min(self.wo);
        (lo, hi)
    }
}

/// The values of a contiguous float32 CPU storage; `what` names the operand in the error.
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{what} must be float32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous")
    };
    Ok(&d[a..b])
}

/// Whether [`conv2d_im2col`] can run on `x` (CPU, float32).
pub fn im2col_supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A convolution `x (B, C, H, W) * weight (O, C, kh, kw) + bias (O)` with zero padding `pad` and
/// `stride`: (B, O, Ho, Wo), differentiable in `x`, `weight` and `bias` (only those a variable
/// feeds are differentiated). 3x3 stride-1 convolutions with padding 1 run
/// [`crate::direct_conv`] where the CPU has AVX-512, any other shape [`crate::gemm_conv`]
/// (`weight (O, K) @ im2col(x_b) (K, Ho*Wo)` image by image). CPU and float32 only.
pub fn conv2d_im2col(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Padding,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let (_, cw, kh, kw) = weight.dims4()?;
    if cw != c {
        return Err(crate::Error::invalid(format!(
            "convolution of a {c}-channel input with a weight of shape {:?}",
            weight.dims()
        )));
    }
    if (kh, kw, stride) == (3, 3, 1)
        && pad == Padding::same(1)
        && crate::direct_conv::conv3x3_supported(x)
    {
        return match bias {
            Some(bias) => crate::direct_conv::conv3x3_bias(x, weight, bias), // (B, O, H, W)
            None => crate::direct_conv::conv3x3(x, weight),
        };
    }
    crate::gemm_conv::conv2d(x, weight, bias, stride, pad) // (B, O, Ho, Wo)
}

/// Nearest-neighbour 2x upsampling, (B, C, H, W) -> (B, C, 2H, 2W), as one op whose backward
/// sums each 2x2 block of the output gradient. candle's `upsample_nearest2d` computes the same
/// forward, but its backward is a grouped convolution with a ones kernel that runs channel by
/// channel (about 80 ms of a VQGAN training step on 2 cores, for three upsamplings). CPU and
/// float32 ([`im2col_supported`]); the tests check it against candle's, forward and backward.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Upsample2x)?)
}

#[derive(Debug, Clone, Copy)]
struct Upsample2x;

impl candle_core::CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "upsampling input")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let mut y = vec![0f32; b * c * 4 * h * w];
        y.par_chunks_mut((4 * h * w).max(1))
            .zip(x.par_chunks((h * w).max(1)))
            .for_each(|(dst, src)| {
                for (rows, srow) in dst.chunks_mut(4 * w).zip(src.chunks(w)) {
                    let (top, bottom) = rows.split_at_mut(2 * w);
                    for (pair, v) in top.chunks_mut(2).zip(srow) {
                        pair.fill(*v);
                    }
                    bottom.copy_from_slice(top);
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        if grad.dims() != [b, c, 2 * h, 2 * w] {
            candle_core::bail!(
                "upsampling: output gradient of shape {:?} for an input of shape {:?}",
                grad.dims(),
                x.dims()
            )
        }
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else {
            candle_core::bail!("upsampling: the kernel runs on the CPU")
        };
        let g = cpu_f32(gs, gl, "upsampling output gradient")?;
        let mut dx = vec![0f32; b * c * h * w];
        dx.par_chunks_mut((h * w).max(1))
            .zip(g.par_chunks((4 * h * w).max(1)))
            .for_each(|(dst, src)| {
                for (drow, rows) in dst.chunks_mut(w).zip(src.chunks(4 * w)) {
                    let (top, bottom) = rows.split_at(2 * w);
                    for ((d, t), u) in drow.iter_mut().zip(top.chunks(2)).zip(bottom.chunks(2)) {
                        *d = t[0] + t[1] + u[0] + u[1];
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The gradient of a per-channel bias (C) from the gradient `grad` (B, C, ...) of the output it
/// was added to: `grad` summed per channel over the batch and the spatial positions (in float64),
/// shaped like `bias`.
pub(crate) fn channel_sums(grad: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let c = bias.elem_count();
    let grad_c = grad.contiguous()?;
    let (storage, layout) = grad_c.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("channel bias: float32 CPU gradients only")
    };
    let g = cpu_f32(s, layout, "channel bias gradient")?;
    let b = grad.dim(0)?;
    let inner = g.len() / (b * c).max(1);
    // one task per channel, each summing its plane of every image
    let db: Vec<f32> = (0..c)
        .into_par_iter()
        .map(|ci| {
            (0..b)
                .map(|bi| {
                    let at = (bi * c + ci) * inner;
                    crate::group_norm::sum8(&g[at..at + inner], |v| v as f64)
                })
                .sum::<f64>() as f32
        })
        .collect();
    Tensor::from_vec(db, bias.shape(), bias.device())
}

/// The gradient of `sum(grad_out * conv(x, W))` with respect to `W` (O, C, kh, kw), i.e.
/// `torch.autograd.grad(loss, weight)` for a convolution given its input `x` and the gradient
/// arriving at its output; nothing else is differentiated.
pub fn conv2d_weight_grad(
    x: &Tensor,
    grad_out: &Tensor,
    weight_dims: (usize, usize, usize, usize),
    stride: usize,
    pad: Padding,
) -> Result<Tensor> {
    let (o, c, kh, kw) = weight_dims;
    let x = x.detach();
    let (b, go, ho, wo) = grad_out.dims4()?;
    if (kh, kw, stride) == (3, 3, 1)
        && pad == Padding::same(1)
        && crate::direct_conv::conv3x3_supported(&x)
        && x.dims4()? == (b, c, ho, wo)
        && go == o
    {
        return crate::direct_conv::conv3x3_weight_grad(&x, &grad_out.detach()); // (O, C, 3, 3)
    }
    if !im2col_supported(&x) {
        return Err(crate::Error::invalid(
            "conv2d_weight_grad runs on CPU float32 tensors",
        ));
    }
    crate::gemm_conv::weight_grad(&x, &grad_out.detach(), weight_dims, stride, pad)
    // (O, C, kh, kw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::transformer::max_abs_diff(a, b).unwrap()
    }

    /// Forward and all three gradients against candle's own conv2d (the reference version), for
    /// symmetric padding, stride 2, no padding, and a 1x1 kernel; one image (products on all
    /// threads) and three (images in parallel).
    #[test]
    fn matches_candle_conv2d_forward_and_backward() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(bs, c, o, k, stride, p, h, w) in &[
            (
                2usize, 3usize, 5usize, 3usize, 1usize, 1usize, 9usize, 7usize,
            ),
            (2, 4, 6, 3, 2, 0, 9, 9),
            (1, 4, 6, 3, 2, 0, 9, 9),
            (3, 4, 6, 4, 2, 1, 8, 10),
            (1, 4, 6, 4, 2, 1, 8, 10),
            (2, 6, 3, 1, 1, 0, 5, 4),
            (1, 6, 3, 1, 1, 0, 5, 4),
            (3, 2, 3, 4, 1, 1, 6, 6),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (bs, c, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, k, k), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, o, &dev)?)?;
            let want = x
                .as_tensor()
                .conv2d(wt.as_tensor(), p, stride, 1, 1)?
                .broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1))?)?;
            let got = conv2d_im2col(
                x.as_tensor(),
                wt.as_tensor(),
                Some(bias.as_tensor()),
                stride,
                Padding::same(p),
            )?;
            assert_eq!(got.dims(), want.dims());
            assert!(
                max_diff(&got, &want) < 1e-4,
                "forward {c} {o} {k} {stride} {p}"
            );
            let probe = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
            let gw = (want * &probe)?.sum_all()?.backward()?;
            let gg = (got * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &wt), ("b", &bias)] {
                let a = gw.get(v.as_tensor()).unwrap();
                let b = gg.get(v.as_tensor()).unwrap();
                assert!(
                    max_diff(a, b) < 1e-3,
                    "grad {name} for b={bs} k={k} s={stride} p={p}: {}",
                    max_diff(a, b)
                );
            }
            // the weight gradient alone
            let gonly = conv2d_weight_grad(
                x.as_tensor(),
                &probe,
                (o, c, k, k),
                stride,
                Padding::same(p),
            )?;
            assert!(max_diff(&gonly, gw.get(wt.as_tensor()).unwrap()) < 1e-3);
        }
        Ok(())
    }

    /// Only the gradients a variable needs are computed: a detached weight (a frozen network)
    /// and an input that no variable feeds (an image) get none, the others the same as before.
    #[test]
    fn differentiates_only_tracked_arguments() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(k, stride, p) in &[(4usize, 2usize, 1usize), (1, 1, 0), (3, 1, 1)] {
            let image = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev)?;
            let x = Var::from_tensor(&image)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (4, 3, k, k), &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (2, 4, 8 / stride, 8 / stride), &dev)?;
            let pad = Padding::same(p);
            let both = (conv2d_im2col(x.as_tensor(), wt.as_tensor(), None, stride, pad)? * &probe)?
                .sum_all()?
                .backward()?;
            let frozen =
                (conv2d_im2col(x.as_tensor(), &wt.as_tensor().detach(), None, stride, pad)?
                    * &probe)?
                    .sum_all()?
                    .backward()?;
            assert!(frozen.get(wt.as_tensor()).is_none(), "k={k}");
            let dx = frozen.get(x.as_tensor()).expect("input gradient");
            assert!(max_diff(dx, both.get(x.as_tensor()).unwrap()) < 1e-5);
            let from_image = (conv2d_im2col(&image, wt.as_tensor(), None, stride, pad)? * &probe)?
                .sum_all()?
                .backward()?;
            assert!(from_image.get(&image).is_none(), "k={k}");
            let dw = from_image.get(wt.as_tensor()).expect("weight gradient");
            assert!(max_diff(dw, both.get(wt.as_tensor()).unwrap()) < 1e-5);
        }
        Ok(())
    }

    /// The 2x upsampling op against candle's `upsample_nearest2d`, forward and input gradient,
    /// on square and non-square planes.
    #[test]
    fn upsample_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(b, c, h, w) in &[(2usize, 3usize, 4usize, 4usize), (1, 2, 3, 5), (3, 1, 1, 1)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
            let want = x.as_tensor().upsample_nearest2d(2 * h, 2 * w)?;
            let got = upsample_nearest2x(x.as_tensor())?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(max_diff(&got, &want), 0.0);
            let probe = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
            let gw = (want * &probe)?.sum_all()?.backward()?;
            let gg = (got * &probe)?.sum_all()?.backward()?;
            let d = max_diff(
                gw.get(x.as_tensor()).unwrap(),
                gg.get(x.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{b} {c} {h} {w}: {d}");
        }
        Ok(())
    }

    /// Asymmetric padding (right and bottom only) equals explicit zero padding then a plain conv.
    #[test]
    fn asymmetric_padding_matches_explicit_pad() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 6, 6), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &dev)?;
        let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        let want = padded.conv2d(&wt, 0, 2, 1, 1)?;
        let pad = Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        let got = conv2d_im2col(&x, &wt, None, 2, pad)?;
        assert!(max_diff(&got, &want) < 1e-4);
        Ok(())
    }
}
