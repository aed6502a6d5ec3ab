// Embedding lookup and its gradient. Forward: out[n, :] = table[ids[n], :], eight elements a
// thread, in the table's type or from f32 to bf16. Backward: dtable[v, :] = sum over the tokens
// n with ids[n] == v of g[n, :], in token order (so the same from run to run, no atomics), in
// two kernels (the gradient's type and the table's may differ):
// - embedding_grad_chunk: a block owns ROWS table rows, 512 columns and one chunk of the
//   tokens. It lists the chunk's tokens whose id it owns, 256 at a time and in order (a ballot
//   per warp, then the warps' counts), and adds their gradient rows into its rows' sums in
//   shared memory, loading LOADS rows ahead. Each token id is read once per ROWS rows (not once
//   per row), and a frequent token's rows are split over the chunks (not all in one block).
// - embedding_grad_sum: dtable = the chunks' sums, added in chunk order.
// Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256
#define ROWS 16
#define COLS (2 * THREADS)
#define LOADS 4

// Eight output elements a thread (loads.cuh), read from a table of type TT and written as TO:
// an f32 table gives bf16 rows straight to a bf16 model, without an f32 copy and a cast.
template <typename TT, typename TO>
__device__ void gather(const TT *table, const uint32_t *ids, TO *out, int n, int d, int vocab) {
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8, len = (size_t)n * d;
  if (i >= len) return;
  float v[8];
  if (d % 8 == 0) {  // the eight lie in one row
    const uint32_t id = ids[i / d];
    if (id < (uint32_t)vocab) {
      load8(table + (size_t)id * d, i % d, d, v);
    } else {
#pragma unroll
      for (int k = 0; k < 8; k++) v[k] = 0.0f;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const size_t at = i + k < len ? i + k : i;
      const uint32_t id = ids[at / d];
      v[k] = id < (uint32_t)vocab ? load(table, (size_t)id * d + at % d) : 0.0f;
    }
  }
  store8(out, i, len, v);
}

// Shared memory: sums [ROWS][COLS] f32, then the listed tokens' positions and rows (THREADS
// each), then the warps' counts: 34,848 bytes.
template <typename T>
__device__ void grad_chunk(const uint32_t *ids, const T *g, float *partial, int n, int d,
                           int vocab, int chunk) {
  extern __shared__ __align__(16) unsigned char shared[];
  float *sums = reinterpret_cast<float *>(shared);
  int *listed_at = reinterpret_cast<int *>(sums + ROWS * COLS);
  int *listed_row = listed_at + THREADS;
  int *counts = listed_row + THREADS;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int v0 = blockIdx.x * ROWS, col = blockIdx.y * COLS + tid, col2 = col + THREADS;
  const int begin = blockIdx.z * chunk, end = min(n, begin + chunk);
  for (int r = 0; r < ROWS; r++) sums[r * COLS + tid] = sums[r * COLS + tid + THREADS] = 0.0f;
  for (int base = begin; base < end; base += THREADS) {
    const int j = base + tid;
    const uint32_t row = j < end ? ids[j] - (uint32_t)v0 : ROWS;  // wraps past ROWS below v0
    const bool mine = row < ROWS;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) counts[warp] = __popc(ballot);
    __syncthreads();
    int at = 0, listed = 0;
    for (int w = 0; w < THREADS / 32; w++) {
      at += w < warp ? counts[w] : 0;
      listed += counts[w];
    }
    if (mine) {
      at += __popc(ballot & ((1u << lane) - 1));
      listed_at[at] = j;
      listed_row[at] = (int)row;
    }
    __syncthreads();
    for (int h = 0; h < listed; h += LOADS) {
      float a[LOADS], b[LOADS];
#pragma unroll
      for (int k = 0; k < LOADS; k++) {
        const size_t src = (size_t)listed_at[min(h + k, listed - 1)] * d;
        a[k] = col < d ? load(g, src + col) : 0.0f;
        b[k] = col2 < d ? load(g, src + col2) : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < LOADS; k++) {
        if (h + k < listed) {
          sums[listed_row[h + k] * COLS + tid] += a[k];
          sums[listed_row[h + k] * COLS + tid + THREADS] += b[k];
        }
      }
    }
    __syncthreads();  // the list is rewritten by the next round
  }
  for (int r = 0; r < ROWS && v0 + r < vocab; r++) {
    const size_t out = ((size_t)blockIdx.z * vocab + v0 + r) * d;
    if (col < d) partial[out + col] = sums[r * COLS + tid];
    if (col2 < d) partial[out + col2] = sums[r * COLS + tid + THREADS];
  }
}

template <typename T>
__device__ void grad_sum(const float *partial, T *dtable, size_t len, int chunks) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= len) return;
  float sum = 0.0f;
  for (int c = 0; c < chunks; c++) sum += partial[c * len + i];
  store(dtable, i, sum);
}

#define FORWARD(NAME, TT, TO)                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS)                                          \
      NAME(const TT *table, const uint32_t *ids, TO *out, int n, int d, int vocab) {             \
    gather(table, ids, out, n, d, vocab);                                                        \
  }
FORWARD(embedding_forward_bf16, __nv_bfloat16, __nv_bfloat16)
FORWARD(embedding_forward_f32, float, float)
FORWARD(embedding_forward_f32_bf16, float, __nv_bfloat16)  // f32 master weights, bf16 compute
extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_grad_chunk_bf16(const uint32_t *ids, const __nv_bfloat16 *g, float *partial, int n,
                              int d, int vocab, int chunk) {
  grad_chunk(ids, g, partial, n, d, vocab, chunk);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_grad_chunk_f32(const uint32_t *ids, const float *g, float *partial, int n, int d,
                             int vocab, int chunk) {
  grad_chunk(ids, g, partial, n, d, vocab, chunk);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_grad_sum_bf16(const float *partial, __nv_bfloat16 *dtable, size_t len, int chunks) {
  grad_sum(partial, dtable, len, chunks);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    embedding_grad_sum_f32(const float *partial, float *dtable, size_t len, int chunks) {
  grad_sum(partial, dtable, len, chunks);
}
