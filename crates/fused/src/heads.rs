//! Attention's inputs from the q·k·v projection in one pass: `qkv [B, T, 3·H·hd]` becomes
//! `[3, B, H, T, hd]`, q and k turned by the rotary angles and RMS-normed (QK-norm), v as it is,
//! each head's rows contiguous for the attention products. The composed path splits the
//! projection (a copy per part), turns and norms q and k (a pass each) and makes each part
//! head-major (a strided copy each), each again backward: about 20 passes over a layer's
//! activations, where this is one each way.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{Kernel, is_fused};

/// `qkv [B, T, 3·H·hd]` → `[3, B, H, T, hd]`: `norm(rotary(q))`, `norm(rotary(k))`, `v`, with
/// `rope [2, T, hd/2]` (cos, then sin). Differentiable in `qkv`.
pub fn heads(qkv: &Tensor, n_head: usize, rope: &Tensor, eps: f64) -> Result<Tensor> {
    let (_, t, width) = qkv.dims3()?;
    let hd = width / (3 * n_head.max(1));
    if n_head == 0
        || width != 3 * n_head * hd
        || !hd.is_multiple_of(2)
        || rope.dims() != [2, t, hd / 2]
    {
        candle_core::bail!(
            "heads: qkv {:?} with {n_head} heads needs a width of 3·heads·(even head size) and rope [2, {t}, head size / 2], not {:?}",
            qkv.dims(),
            rope.dims()
        )
    }
    if qkv.elem_count() > 0 && is_fused(Kernel::Heads, qkv.device(), qkv.dtype()) {
        let rope = rope.to_dtype(qkv.dtype())?.contiguous()?;
        let op = Heads {
            n_head,
            eps: eps as f32,
        };
        return qkv.contiguous()?.apply_op2(&rope, op);
    }
    composed(qkv, n_head, rope, eps, &crate::rotary, &crate::rms_norm)
}

type Turn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
type Norm<'a> = &'a dyn Fn(&Tensor, f64) -> Result<Tensor>;

/// The same from a split, `turn`, `norm` and transposes.
fn composed(
    qkv: &Tensor,
    n_head: usize,
    rope: &Tensor,
    eps: f64,
    turn: Turn,
    norm: Norm,
) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3()?;
    let hd = width / (3 * n_head);
    let (cos, sin) = (rope.get(0)?, rope.get(1)?);
    let part = |i: usize| {
        qkv.narrow(2, i * n_head * hd, n_head * hd)?
            .reshape((b, t, n_head, hd))
    };
    let q = norm(&turn(&part(0)?, &cos, &sin)?, eps)?;
    let k = norm(&turn(&part(1)?, &cos, &sin)?, eps)?;
    let head_major = |x: Tensor| x.transpose(1, 2)?.contiguous();
    Tensor::stack(&[head_major(q)?, head_major(k)?, head_major(part(2)?)?], 0)
}

pub(crate) mod plain {
    use super::*;

    /// The reference: primitive ops only.
    pub fn heads(qkv: &Tensor, n_head: usize, rope: &Tensor, eps: f64) -> Result<Tensor> {
        composed(
            qkv,
            n_head,
            rope,
            eps,
            &crate::rotary::plain::rotary,
            &crate::plain::rms_norm,
        )
    }
}

pub(crate) struct Heads {
    pub(crate) n_head: usize,
    pub(crate) eps: f32,
}

/// The shapes: (B, T, H, hd).
fn dims(ql: &Layout, n_head: usize) -> Result<(usize, usize, usize, usize)> {
    let (b, t, width) = ql.shape().dims3()?;
    Ok((b, t, n_head, width / (3 * n_head)))
}

/// Row `row` of the output `[3, B, H, T, hd]`: (part, offset of its input row in qkv, position).
fn source(row: usize, (b, t, h, hd): (usize, usize, usize, usize)) -> (usize, usize, usize) {
    let pos = row % t;
    let head = row / t % h;
    let batch = row / (t * h) % b;
    let part = row / (t * h * b);
    let at = (batch * t + pos) * 3 * h * hd + (part * h + head) * hd;
    (part, at, pos)
}

/// q or k's row turned (`x` → `r`), and 1/rms(r).
fn turn_row(x: &[f32], cos: &[f32], sin: &[f32], r: &mut [f32], eps: f32) -> f32 {
    let half = x.len() / 2;
    for i in 0..half {
        r[i] = x[i] * cos[i] + x[i + half] * sin[i];
        r[i + half] = x[i + half] * cos[i] - x[i] * sin[i];
    }
    1.0 / (r.iter().map(|r| r * r).sum::<f32>() / r.len() as f32 + eps).sqrt()
}

impl CustomOp2 for Heads {
    fn name(&self) -> &'static str {
        "fused-heads"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qkv, _) = crate::rows(qs, ql)?;
        let (rope, half) = crate::rows(rs, rl)?;
        let shape = dims(ql, self.n_head)?;
        let (b, t, h, hd) = shape;
        let mut out = vec![0f32; qkv.len()];
        out.par_chunks_mut(hd).enumerate().for_each(|(row, y)| {
            let (part, at, pos) = source(row, shape);
            let x = &qkv[at..at + hd];
            if part == 2 {
                y.copy_from_slice(x);
                return;
            }
            let cos = &rope[pos * half..][..half];
            let sin = &rope[(t + pos) * half..][..half];
            let inv = turn_row(x, cos, sin, y, self.eps);
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok((CpuStorage::F32(out), Shape::from((3, b, h, t, hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::heads(self, (qs, ql), (rs, rl), None)
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        rope: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = HeadsBackward {
            n_head: self.n_head,
            eps: self.eps,
        };
        let dqkv = qkv.apply_op3_no_bwd(rope, &grad.contiguous()?, &back)?;
        Ok((Some(dqkv), None))
    }
}

/// `dqkv [B, T, 3·H·hd]` from the gradient of the heads: v's as it is, q's and k's through the
/// norm's backward and the turn back.
pub(crate) struct HeadsBackward {
    pub(crate) n_head: usize,
    pub(crate) eps: f32,
}

impl CustomOp3 for HeadsBackward {
    fn name(&self) -> &'static str {
        "fused-heads-backward"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qkv, _) = crate::rows(qs, ql)?;
        let (rope, half) = crate::rows(rs, rl)?;
        let (g, _) = crate::rows(gs, gl)?;
        let shape = dims(ql, self.n_head)?;
        let (_, t, _, hd) = shape;
        if g.len() != qkv.len() {
            candle_core::bail!("heads backward: {} gradients for {}", g.len(), qkv.len())
        }
        // Each output row's gradient lands on its own input row: computed per output row, then
        // put in place.
        let rows: Vec<(usize, Vec<f32>)> = g
            .par_chunks(hd)
            .enumerate()
            .map(|(row, g)| {
                let (part, at, pos) = source(row, shape);
                if part == 2 {
                    return (at, g.to_vec());
                }
                let x = &qkv[at..at + hd];
                let cos = &rope[pos * half..][..half];
                let sin = &rope[(t + pos) * half..][..half];
                let mut r = vec![0f32; hd];
                let inv = turn_row(x, cos, sin, &mut r, self.eps);
                // y = r·inv; dr = inv·(g − y·mean(g⊙y)) = inv·(g − r·inv²·mean(g⊙r)).
                let mean_gr = g.iter().zip(&r).map(|(g, r)| g * r).sum::<f32>() / hd as f32;
                let dr: Vec<f32> = g
                    .iter()
                    .zip(&r)
                    .map(|(g, r)| inv * (g - r * inv * inv * mean_gr))
                    .collect();
                let mut dx = vec![0f32; hd];
                for i in 0..half {
                    dx[i] = dr[i] * cos[i] - dr[i + half] * sin[i];
                    dx[i + half] = dr[i + half] * cos[i] + dr[i] * sin[i];
                }
                (at, dx)
            })
            .collect();
        let mut dqkv = vec![0f32; qkv.len()];
        for (at, d) in rows {
            dqkv[at..at + hd].copy_from_slice(&d);
        }
        Ok((CpuStorage::F32(dqkv), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let op = Heads {
            n_head: self.n_head,
            eps: self.eps,
        };
        crate::cuda::heads(&op, (qs, ql), (rs, rl), Some((gs, gl)))
    }
}
