// Rotary position embedding of x [B, T, H, hd] (contiguous) by cos, sin [T, hd/2]: one thread
// per pair (x1[i], x2[i]) of a head, y1 = x1 cos + x2 s, y2 = x2 cos - x1 s with s = sign * sin
// (sign -1 turns back: the gradient). Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

template <typename T>
__device__ void turn(const T *x, const T *cos, const T *sin, T *y, size_t pairs, int t, int h,
                     int half, float sign) {
  const size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const size_t row = p / half;
  const int i = p % half;
  const size_t at = (row / h % t) * half + i;
  const float c = load(cos, at), s = sign * load(sin, at);
  const size_t a = row * 2 * half + i, b = a + half;
  const float x1 = load(x, a), x2 = load(x, b);
  store(y, a, x1 * c + x2 * s);
  store(y, b, x2 * c - x1 * s);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rotary_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *cos, const __nv_bfloat16 *sin,
                __nv_bfloat16 *y, size_t pairs, int t, int h, int half, float sign) {
  turn(x, cos, sin, y, pairs, t, h, half, sign);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    rotary_f32(const float *x, const float *cos, const float *sin, float *y, size_t pairs, int t,
               int h, int half, float sign) {
  turn(x, cos, sin, y, pairs, t, h, half, sign);
}
