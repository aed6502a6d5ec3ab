// Embedding lookup and its gradient. Forward: out[n, :] = table[ids[n], :], one thread per
// element. Backward: dtable[v, :] = sum over the tokens n with ids[n] == v of g[n, :], in token
// order (so the same from run to run, no atomics): a block per (row v, 512 columns), each warp
// reading 32 ids at a time and adding the gradient rows of the ones that match (most words of
// 32 ids hold none). Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

template <typename T>
__device__ void gather(const T *table, const uint32_t *ids, T *out, int n, int d, int vocab) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)n * d) return;
  const uint32_t id = ids[i / d];
  store(out, i, id < (uint32_t)vocab ? load(table, (size_t)id * d + i % d) : 0.0f);
}

template <typename T>
__device__ void scatter_sum(const uint32_t *ids, const T *g, T *dtable, int n, int d) {
  const uint32_t v = blockIdx.x;
  // Two columns a thread (512 a block): each scan of the ids serves twice the columns.
  const int col = blockIdx.y * 2 * blockDim.x + threadIdx.x, col2 = col + blockDim.x;
  const int lane = threadIdx.x % 32;
  float acc = 0.0f, acc2 = 0.0f;
  for (int base = 0; base < n; base += 32) {
    const int j = base + lane;
    unsigned hits = __ballot_sync(0xffffffff, j < n && ids[j] == v);
    while (hits) {
      const size_t row = (size_t)(base + __ffs(hits) - 1) * d;
      hits &= hits - 1;
      if (col < d) acc += load(g, row + col);
      if (col2 < d) acc2 += load(g, row + col2);
    }
  }
  if (col < d) store(dtable, (size_t)v * d + col, acc);
  if (col2 < d) store(dtable, (size_t)v * d + col2, acc2);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_forward_bf16(const __nv_bfloat16 *table, const uint32_t *ids, __nv_bfloat16 *out,
                           int n, int d, int vocab) {
  gather(table, ids, out, n, d, vocab);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_forward_f32(const float *table, const uint32_t *ids, float *out, int n, int d,
                          int vocab) {
  gather(table, ids, out, n, d, vocab);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_backward_bf16(const uint32_t *ids, const __nv_bfloat16 *g, __nv_bfloat16 *dtable,
                            int n, int d) {
  scatter_sum(ids, g, dtable, n, d);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_backward_f32(const uint32_t *ids, const float *g, float *dtable, int n, int d) {
  scatter_sum(ids, g, dtable, n, d);
}
