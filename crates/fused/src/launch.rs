//! Dynamic shared memory each CUDA kernel is launched with, in bytes. A kernel that reaches past
//! what its launch gives faults on the card (and poisons the context: no fallback then), so the
//! launchers (`cuda.rs`) and the emulated tests (`tests/emulated.rs`) take these same figures.
//! Public for those tests only.

/// Queries (and keys) a block of the flash attention kernels takes.
pub const FLASH_BLOCK: usize = 64;
/// Threads a block of the embedding's backward (`kernels/embedding.cu`, `THREADS`).
const EMBEDDING_THREADS: usize = 256;
/// Tokens a block of the embedding's backward scans: a frequent id's gradient rows are split
/// over ~n / 16,384 blocks, whose sums the second kernel adds in order.
pub const EMBEDDING_CHUNK: usize = 16_384;
/// Table rows a block of the embedding's backward sums (`ROWS`).
pub const EMBEDDING_ROWS: usize = 16;

/// A row of a tile of bf16 at head size `hd`: 8 elements of padding against bank conflicts.
fn tile_row(hd: usize) -> usize {
    (hd + 8) * 2
}

/// `flash_forward_{hd}`: two buffers of a 64-key tile's k and v rows.
pub fn flash_forward(hd: usize) -> usize {
    2 * 2 * FLASH_BLOCK * tile_row(hd)
}

/// `flash_backward_kv_{hd}`: two buffers of 32 query and output-gradient rows with their
/// log-sum-exp and delta (the block's k and v rows are in registers).
pub fn flash_backward_kv(hd: usize) -> usize {
    2 * (2 * 32 * tile_row(hd) + 2 * 32 * 4)
}

/// `flash_backward_q_{hd}`: two buffers of 32 k and v rows.
pub fn flash_backward_q(hd: usize) -> usize {
    2 * 2 * 32 * tile_row(hd)
}

/// `embedding_grad_chunk_*`: the rows' f32 sums (`ROWS` × 512 columns), the listed tokens'
/// positions and rows, and the warps' counts.
pub const EMBEDDING_GRAD_CHUNK: usize =
    EMBEDDING_ROWS * 2 * EMBEDDING_THREADS * 4 + 2 * EMBEDDING_THREADS * 4 + 32;

/// `mix_backward_*`: the warps' two sums (256 threads a block).
pub const MIX_BACKWARD: usize = 2 * (256 / 32) * 4;

/// `softcap_ce_forward_*`: the warps' running maxima and sums (256 threads a block).
pub const CROSS_ENTROPY_FORWARD: usize = 2 * (256 / 32) * 4;
