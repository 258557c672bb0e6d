//! Fast CPU kernels for training: a differentiable 2-D convolution built from an `im2col`
//! custom op and a matrix product.
//!
//! candle 0.11's `conv2d` backward always computes the input gradient with `conv_transpose2d`,
//! whose CPU kernel is a direct loop and dominates a training step. Here a convolution is
//! `W (O, C*kh*kw) @ im2col(x) (B, C*kh*kw, Ho*Wo)`: the forward and both gradients are then
//! matrix products (candle's gemm), and the input gradient is `col2im`, a scatter-add that is as
//! cheap as the gather. Padding may be asymmetric (the reference's `Downsample` pads right and
//! bottom only). No reference file: `torch.nn.functional.conv2d` is what this computes.
//!
//! [`conv2d_im2col`] is tested against candle's `conv2d` (forward and both gradients), the plain
//! reference version it replaces during training.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

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

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: Padding,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(
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

    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn cols(&self) -> usize {
        self.ho * self.wo
    }

    /// Input row and column read by output position `o` along one axis for kernel offset `k`, if
    /// inside the unpadded input.
    fn source(o: usize, k: usize, stride: usize, pad_before: usize, size: usize) -> Option<usize> {
        let p = o * stride + k;
        p.checked_sub(pad_before).filter(|i| *i < size)
    }
}

/// Runs `f(plane_index, plane)` over the `planes` equal chunks of `data` on all threads.
fn par_planes(data: &mut [f32], plane_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let n_planes = data.len().checked_div(plane_len).unwrap_or(0);
    let threads = candle_core::utils::get_num_threads().clamp(1, n_planes.max(1));
    if threads <= 1 || n_planes < 2 {
        for (i, p) in data.chunks_mut(plane_len.max(1)).enumerate() {
            f(i, p);
        }
        return;
    }
    let per = n_planes.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, chunk) in data.chunks_mut(per * plane_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (j, p) in chunk.chunks_mut(plane_len).enumerate() {
                    f(t * per + j, p);
                }
            });
        }
    });
}

/// `im2col`: (B, C, H, W) -> (B, C*kh*kw, Ho*Wo); row `(c*kh + i)*kw + j` holds the input pixels
/// that kernel tap (i, j) of channel c sees at every output position (zeros in the padding).
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    pad: Padding,
}

impl Im2Col {
    fn gather(&self, x: &[f32], g: &Geometry) -> Vec<f32> {
        let (rows, cols) = (g.rows(), g.cols());
        let mut out = vec![0f32; g.b * rows * cols];
        // one plane = the kh*kw rows of one (batch, channel)
        let plane = g.kh * g.kw * cols;
        par_planes(&mut out, plane, |bc, dst| {
            let src = &x[bc * g.h * g.w..(bc + 1) * g.h * g.w];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &mut dst[(i * g.kw + j) * cols..(i * g.kw + j + 1) * cols];
                    for oy in 0..g.ho {
                        let Some(iy) = Geometry::source(oy, i, g.stride, g.pad.top, g.h) else {
                            continue;
                        };
                        let src_row = &src[iy * g.w..(iy + 1) * g.w];
                        let dst_row = &mut row[oy * g.wo..(oy + 1) * g.wo];
                        if g.stride == 1 {
                            // contiguous run: output columns whose source column is inside
                            let lo = g.pad.left.saturating_sub(j);
                            let hi = (g.w + g.pad.left).saturating_sub(j).min(g.wo);
                            if lo < hi {
                                let s0 = lo + j - g.pad.left;
                                dst_row[lo..hi].copy_from_slice(&src_row[s0..s0 + (hi - lo)]);
                            }
                        } else {
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                if let Some(ix) = Geometry::source(ox, j, g.stride, g.pad.left, g.w)
                                {
                                    *d = src_row[ix];
                                }
                            }
                        }
                    }
                }
            }
        });
        out
    }

    /// `col2im`: the adjoint of [`Im2Col::gather`], (B, C*kh*kw, Ho*Wo) -> (B, C, H, W) summing
    /// every column entry into the pixel it came from.
    fn scatter(&self, cols_data: &[f32], g: &Geometry) -> Vec<f32> {
        let cols = g.cols();
        let mut out = vec![0f32; g.b * g.c * g.h * g.w];
        let plane_in = g.kh * g.kw * cols;
        par_planes(&mut out, g.h * g.w, |bc, dst| {
            let src = &cols_data[bc * plane_in..(bc + 1) * plane_in];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &src[(i * g.kw + j) * cols..(i * g.kw + j + 1) * cols];
                    for oy in 0..g.ho {
                        let Some(iy) = Geometry::source(oy, i, g.stride, g.pad.top, g.h) else {
                            continue;
                        };
                        let dst_row = &mut dst[iy * g.w..(iy + 1) * g.w];
                        let src_row = &row[oy * g.wo..(oy + 1) * g.wo];
                        if g.stride == 1 {
                            let lo = g.pad.left.saturating_sub(j);
                            let hi = (g.w + g.pad.left).saturating_sub(j).min(g.wo);
                            if lo < hi {
                                let s0 = lo + j - g.pad.left;
                                for (d, s) in
                                    dst_row[s0..s0 + (hi - lo)].iter_mut().zip(&src_row[lo..hi])
                                {
                                    *d += *s;
                                }
                            }
                        } else {
                            for (ox, s) in src_row.iter().enumerate() {
                                if let Some(ix) = Geometry::source(ox, j, g.stride, g.pad.left, g.w)
                                {
                                    dst_row[ix] += *s;
                                }
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

/// The contiguous f32 data of a tensor (copied only when it is not already contiguous f32).
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

fn f32_data(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(layout.dims(), self.kh, self.kw, self.stride, self.pad)?;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("im2col: only float32 is supported (training runs in float32)")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col: input must be contiguous")
        };
        let out = self.gather(&data[start..end], &g);
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.rows(), g.cols()))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = Geometry::new(arg.dims(), self.kh, self.kw, self.stride, self.pad)?;
        let grad = f32_data(grad_res)?;
        let dx = self.scatter(&grad, &g);
        Ok(Some(
            Tensor::from_vec(dx, (g.b, g.c, g.h, g.w), arg.device())?.to_dtype(arg.dtype())?,
        ))
    }
}

/// `im2col` of `x` (B, C, H, W) for a kh x kw kernel: (B, C*kh*kw, Ho*Wo) and (Ho, Wo),
/// differentiable (its backward is `col2im`). CPU and float32 only.
pub fn im2col(
    x: &Tensor,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: Padding,
) -> Result<(Tensor, (usize, usize))> {
    let g = Geometry::new(x.dims(), kh, kw, stride, pad)?;
    let cols = x.contiguous()?.apply_op1(Im2Col {
        kh,
        kw,
        stride,
        pad,
    })?; // (B, C*kh*kw, Ho*Wo)
    Ok((cols, (g.ho, g.wo)))
}

/// Whether [`conv2d_im2col`] can run on `x` (CPU, float32).
pub fn im2col_supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A convolution `x (B, C, H, W) * weight (O, C, kh, kw) + bias (O)` with zero padding `pad` and
/// `stride`, computed as `weight (O, K) @ im2col(x) (B, K, Ho*Wo)`: (B, O, Ho, Wo).
/// Differentiable in `x`, `weight` and `bias`; a 1x1 stride-1 unpadded convolution skips im2col.
pub fn conv2d_im2col(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Padding,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, cw, kh, kw) = weight.dims4()?;
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
    let pointwise = kh == 1 && kw == 1 && stride == 1 && pad == Padding::same(0);
    let (cols, (ho, wo)) = if pointwise {
        (x.reshape((b, c, h * w))?, (h, w)) // (B, C, HW)
    } else {
        im2col(x, kh, kw, stride, pad)? // (B, C*kh*kw, Ho*Wo)
    };
    let wm = weight.reshape((o, c * kh * kw))?; // (O, K)
    let y = wm.broadcast_matmul(&cols)?; // (B, O, Ho*Wo)
    let y = y.reshape((b, o, ho, wo))?; // (B, O, Ho, Wo)
    Ok(match bias {
        Some(bias) => y.apply_op2(bias, ChannelBias)?,
        None => y,
    })
}

/// `y (B, C, ...) + bias (C)` broadcast over the batch and the spatial positions, with a backward
/// pass that sums the bias gradient per channel over contiguous runs. candle's
/// `broadcast_add` computes the same, but its backward reduces over dims (0, 2, 3) with a generic
/// single-threaded strided loop that took about a tenth of a VQGAN training step.
#[derive(Debug, Clone, Copy)]
struct ChannelBias;

impl candle_core::CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(y), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("channel bias: float32 only")
        };
        let (Some((y0, y1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("channel bias: contiguous tensors only")
        };
        let dims = l1.dims();
        let (y, b) = (&y[y0..y1], &b[b0..b1]);
        if dims.len() < 2 || dims[1] != b.len() {
            candle_core::bail!(
                "channel bias: {} biases for a tensor of shape {dims:?}",
                b.len()
            )
        }
        let inner: usize = dims[2..].iter().product();
        let mut out = y.to_vec();
        for (i, plane) in out.chunks_mut(inner.max(1)).enumerate() {
            let v = b[i % b.len()];
            plane.iter_mut().for_each(|p| *p += v);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = channel_sums(grad, bias)?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// The gradient of a per-channel bias (C) from the gradient `grad` (B, C, ...) of the output it
/// was added to: `grad` summed per channel over the batch and the spatial positions (in float64),
/// shaped like `bias`.
pub(crate) fn channel_sums(grad: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let c = bias.elem_count();
    let grad_c = grad.contiguous()?;
    let mut db = vec![0f64; c];
    {
        let (storage, layout) = grad_c.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            candle_core::bail!("channel bias: float32 CPU gradients only")
        };
        let g = cpu_f32(s, layout, "channel bias gradient")?;
        let inner = g.len() / (grad.dim(0)? * c).max(1);
        for (i, plane) in g.chunks(inner.max(1)).enumerate() {
            db[i % c] += plane.iter().map(|v| *v as f64).sum::<f64>();
        }
    }
    let db: Vec<f32> = db.into_iter().map(|v| v as f32).collect();
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
    let (cols, (eh, ew)) = if im2col_supported(&x) {
        im2col(&x, kh, kw, stride, pad)?
    } else {
        return Err(crate::Error::invalid(
            "conv2d_weight_grad runs on CPU float32 tensors",
        ));
    };
    if go != o || (eh, ew) != (ho, wo) {
        return Err(crate::Error::invalid(format!(
            "gradient of shape {:?} does not match a convolution with output ({o}, {eh}, {ew})",
            grad_out.dims()
        )));
    }
    let g = grad_out.detach().reshape((b, o, ho * wo))?; // (B, O, L)
    let gw = g.matmul(&cols.transpose(1, 2)?)?.sum(0)?; // (O, K)
    Ok(gw.reshape((o, c, kh, kw))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::transformer::max_abs_diff(a, b).unwrap()
    }

    /// Forward and all three gradients against candle's own conv2d (the reference version), for
    /// symmetric padding, stride 2, no padding, and a 1x1 kernel.
    #[test]
    fn matches_candle_conv2d_forward_and_backward() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(c, o, k, stride, p, h, w) in &[
            (3usize, 5usize, 3usize, 1usize, 1usize, 9usize, 7usize),
            (4, 6, 3, 2, 0, 9, 9),
            (4, 6, 4, 2, 1, 8, 10),
            (6, 3, 1, 1, 0, 5, 4),
            (2, 3, 4, 1, 1, 6, 6),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?)?;
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
                    "grad {name} for k={k} s={stride} p={p}: {}",
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
