// The value residual's term: x [B, T, H·hd] with each head's slice times its gate [B, T, H],
// written head-major, [B, H, T, hd] (the layout attention takes v in), and its gradient: dx =
// gate·g back in x's layout, and dgate = Σ_d g·x for each position and head. The plain path is a
// broadcast product and a transposed view: candle's strided kernels, each way. Eight lanes a
// (position, head) row of hd elements.
// Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256
// Eight lanes a row (a warp four rows), runs of eight elements a lane (loads.cuh).
#define LANES 8
#define ROWS_PER_BLOCK (THREADS / LANES)

// Where row r = (b·T + t)·H + h of x starts in the head-major layout.
__device__ __forceinline__ size_t head_major(size_t r, int seq, int heads, int hd) {
  const size_t h = r % heads, bt = r / heads, t = bt % seq, b = bt / seq;
  return ((b * heads + h) * seq + t) * hd;
}

template <typename T>
__device__ void forward(const T *x, const T *gate, T *y, size_t rows, int seq, int heads, int hd) {
  const size_t r = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / LANES;
  if (r >= rows) return;
  const float g = load(gate, r);
  const T *xr = x + r * hd;
  T *yr = y + head_major(r, seq, heads, hd);
  float v[8];
  for (int d = 8 * (threadIdx.x % LANES); d < hd; d += 8 * LANES) {
    load8(xr, d, hd, v);
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] *= g;
    store8(yr, d, hd, v);
  }
}

// Rows past the end keep their lanes to the sum's shuffles, which need the whole warp.
template <typename T>
__device__ void backward(const T *x, const T *gate, const T *gy, T *dx, T *dgate, size_t rows,
                         int seq, int heads, int hd) {
  const size_t r = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / LANES;
  const bool mine = r < rows;
  const float g = mine ? load(gate, r) : 0.0f;
  float s = 0.0f, gd[8], xv[8];
  for (int d = 8 * (threadIdx.x % LANES); mine && d < hd; d += 8 * LANES) {
    load8(gy + head_major(r, seq, heads, hd), d, hd, gd);
    load8(x + r * hd, d, hd, xv);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      s += gd[k] * xv[k];
      gd[k] *= g;
    }
    store8(dx + r * hd, d, hd, gd);
  }
  for (int o = LANES / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (mine && threadIdx.x % LANES == 0) store(dgate, r, s);
}

#define GATE_HEADS(SUFFIX, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(THREADS) gate_heads_forward_##SUFFIX(               \
      const T *x, const T *gate, T *y, size_t rows, int seq, int heads, int hd) {                  \
    forward(x, gate, y, rows, seq, heads, hd);                                                     \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) gate_heads_backward_##SUFFIX(              \
      const T *x, const T *gate, const T *gy, T *dx, T *dgate, size_t rows, int seq, int heads,    \
      int hd) {                                                                                    \
    backward(x, gate, gy, dx, dgate, rows, seq, heads, hd);                                        \
  }
GATE_HEADS(bf16, __nv_bfloat16)
GATE_HEADS(f32, float)
