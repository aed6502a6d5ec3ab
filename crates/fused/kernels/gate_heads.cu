// The value residual's term: x [B, T, H·hd] with each head's slice times its gate [B, T, H],
// written head-major, [B, H, T, hd] (the layout attention takes v in), and its gradient: dx =
// gate·g back in x's layout, and dgate = Σ_d g·x for each position and head. The plain path is a
// broadcast product and a transposed view: candle's strided kernels, each way. A warp per
// (position, head) row of hd elements.
// Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)

// Where row r = (b·T + t)·H + h of x starts in the head-major layout.
__device__ __forceinline__ size_t head_major(size_t r, int seq, int heads, int hd) {
  const size_t h = r % heads, bt = r / heads, t = bt % seq, b = bt / seq;
  return ((b * heads + h) * seq + t) * hd;
}

template <typename T>
__device__ void forward(const T *x, const T *gate, T *y, size_t rows, int seq, int heads, int hd) {
  const size_t r = (size_t)blockIdx.x * WARPS + threadIdx.x / 32;
  if (r >= rows) return;
  const float g = load(gate, r);
  const size_t at = head_major(r, seq, heads, hd);
  for (int d = threadIdx.x % 32; d < hd; d += 32) store(y, at + d, g * load(x, r * hd + d));
}

// The early return is a whole warp's (r is the warp's), so the shuffles see all 32 lanes.
template <typename T>
__device__ void backward(const T *x, const T *gate, const T *gy, T *dx, T *dgate, size_t rows,
                         int seq, int heads, int hd) {
  const size_t r = (size_t)blockIdx.x * WARPS + threadIdx.x / 32;
  if (r >= rows) return;
  const float g = load(gate, r);
  const size_t at = head_major(r, seq, heads, hd);
  float s = 0.0f;
  for (int d = threadIdx.x % 32; d < hd; d += 32) {
    const float gd = load(gy, at + d);
    store(dx, r * hd + d, g * gd);
    s += gd * load(x, r * hd + d);
  }
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) store(dgate, r, s);
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
