//! Embedding lookup with a gradient that scales: `table[ids]` forward, and backward each table
//! row sums the gradient rows of the tokens that chose it. candle's `index_select` backward is
//! `index_add`, whose CUDA kernel runs as one block of 1,024 threads, each looping over every
//! token id: 16.5 ms per table at 32,768 tokens on an H200, a quarter of a training pass (five
//! tables: wte and the value embeddings). Here a block owns 16 table rows, 512 columns and a
//! chunk of 16,384 tokens: it lists the chunk's tokens of its rows in order and sums their
//! gradient rows in shared memory; a second kernel adds the chunks' sums in order. The sum's
//! order is fixed, so the gradient is the same from run to run (no atomics).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::{Kernel, is_fused};

/// `table[ids]`: rows of `table [V, D]` chosen by `ids [N]` (u32), as `[N, D]` in `dtype`.
/// Differentiable in `table` (its gradient in the table's dtype). On CUDA an f32 table gives
/// bf16 rows directly: a bf16 model reads its f32 master table without an f32 copy and a cast
/// each way. An id past the table is an error on the CPU; the CUDA kernel cannot stop the run
/// and reads it as a zero row (with no gradient), so callers keep ids in range.
pub fn embedding(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let (vocab, _) = table.dims2()?;
    ids.dims1()?;
    if ids.dtype() != DType::U32 {
        candle_core::bail!("embedding: ids must be u32, not {:?}", ids.dtype())
    }
    let kernel_has = match (table.dtype(), dtype) {
        (from, to) if from == to => true,
        (DType::F32, DType::BF16) => table.device().is_cuda(),
        _ => false,
    };
    if kernel_has
        && ids.elem_count() > 0
        && is_fused(Kernel::Embedding, table.device(), table.dtype())
    {
        return table
            .contiguous()?
            .apply_op2(&ids.contiguous()?, Embedding { vocab, dtype });
    }
    table.index_select(ids, 0)?.to_dtype(dtype)
}

pub(crate) struct Embedding {
    pub(crate) vocab: usize,
    /// The output's dtype: the table's, or bf16 from an f32 table (CUDA).
    pub(crate) dtype: DType,
}

/// `(start, rows, cols)` of a contiguous layout.
fn extent(layout: &Layout) -> Result<(usize, usize, usize)> {
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused ops need a contiguous input")
    };
    let cols = if layout.dims().len() > 1 {
        *layout.dims().last().unwrap()
    } else {
        1
    };
    Ok((start, layout.shape().elem_count() / cols.max(1), cols))
}

fn cpu_ids<'a>(storage: &'a CpuStorage, layout: &Layout, vocab: usize) -> Result<&'a [u32]> {
    let CpuStorage::U32(ids) = storage else {
        candle_core::bail!("embedding: ids must be u32")
    };
    let (start, n, _) = extent(layout)?;
    let ids = &ids[start..start + n];
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        candle_core::bail!("embedding: id {bad} is past the table's {vocab} rows")
    }
    Ok(ids)
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "fused-embedding"
    }

    fn cpu_fwd(
        &self,
        ts: &CpuStorage,
        tl: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(table), DType::F32) = (ts, self.dtype) else {
            candle_core::bail!("fused ops run f32 on the CPU")
        };
        let (start, _, d) = extent(tl)?;
        let ids = cpu_ids(is, il, self.vocab)?;
        let mut out = Vec::with_capacity(ids.len() * d);
        for &i in ids {
            let row = start + i as usize * d;
            out.extend_from_slice(&table[row..row + d]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        is: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::embedding(ts, tl, is, il, self.dtype)
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = EmbeddingBackward {
            vocab: self.vocab,
            dtype: table.dtype(),
        };
        let dtable = ids.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        Ok((Some(dtable), None))
    }
}

/// `dtable [V, D]`: row v is the sum, in token order, of the gradient rows of the tokens whose
/// id is v (0 where none is).
pub(crate) struct EmbeddingBackward {
    pub(crate) vocab: usize,
    /// The table's dtype, which its gradient takes (the incoming gradient may be bf16).
    pub(crate) dtype: DType,
}

impl CustomOp2 for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "fused-embedding-backward"
    }

    fn cpu_fwd(
        &self,
        is: &CpuStorage,
        il: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = cpu_ids(is, il, self.vocab)?;
        let (CpuStorage::F32(g), DType::F32) = (gs, self.dtype) else {
            candle_core::bail!("fused ops run f32 on the CPU")
        };
        let (start, n, d) = extent(gl)?;
        if n != ids.len() {
            candle_core::bail!("embedding backward: {} ids, {n} gradient rows", ids.len())
        }
        let mut dtable = vec![0f32; self.vocab * d];
        for (row, &i) in ids.iter().enumerate() {
            let g = &g[start + row * d..start + (row + 1) * d];
            let acc = &mut dtable[i as usize * d..(i as usize + 1) * d];
            acc.iter_mut().zip(g).for_each(|(a, g)| *a += g);
        }
        Ok((CpuStorage::F32(dtable), Shape::from((self.vocab, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        is: &candle_core::CudaStorage,
        il: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::embedding_backward(self.vocab, self.dtype, is, il, gs, gl)
    }
}
