// RMSNorm without weights over rows of n, computed in f32: y = x * r with
// r = 1 / sqrt(mean(x^2) + eps). Backward: dx = r * (g - y * mean(g * y)). One warp per row
// (the rows are short: 128 or 512 here), so the reductions are warp shuffles; 8 rows a block.
// Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Each lane takes runs of eight (loads.cuh); the second pass reads the row again (from cache).
template <typename T>
__device__ void forward(const T *x, T *y, int rows, int n, float eps) {
  const int row = blockIdx.x * (THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T *xr = x + (size_t)row * n;
  T *yr = y + (size_t)row * n;
  float sq = 0.0f, v[8];
  for (int j = 8 * lane; j < n; j += 256) {
    load8(xr, j, n, v);  // 0 past n
#pragma unroll
    for (int k = 0; k < 8; k++) sq += v[k] * v[k];
  }
  const float r = rsqrtf(warp_sum(sq) / n + eps);
  for (int j = 8 * lane; j < n; j += 256) {
    load8(xr, j, n, v);
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] *= r;
    store8(yr, j, n, v);
  }
}

template <typename T>
__device__ void backward(const T *x, const T *g, T *dx, int rows, int n, float eps) {
  const int row = blockIdx.x * (THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T *xr = x + (size_t)row * n;
  const T *gr = g + (size_t)row * n;
  T *dr = dx + (size_t)row * n;
  float sq = 0.0f, gx = 0.0f, v[8], w[8];
  for (int j = 8 * lane; j < n; j += 256) {
    load8(xr, j, n, v);
    load8(gr, j, n, w);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      sq += v[k] * v[k];
      gx += w[k] * v[k];
    }
  }
  const float r = rsqrtf(warp_sum(sq) / n + eps);
  // mean(g * y) = r * mean(g * x)
  const float dot = r * warp_sum(gx) / n;
  for (int j = 8 * lane; j < n; j += 256) {
    load8(xr, j, n, v);
    load8(gr, j, n, w);
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] = r * (w[k] - v[k] * r * dot);
    store8(dr, j, n, v);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rms_norm_forward_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, int rows, int n, float eps) {
  forward(x, y, rows, n, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    rms_norm_forward_f32(const float *x, float *y, int rows, int n, float eps) {
  forward(x, y, rows, n, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    rms_norm_backward_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *g, __nv_bfloat16 *dx,
                           int rows, int n, float eps) {
  backward(x, g, dx, rows, n, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    rms_norm_backward_f32(const float *x, const float *g, float *dx, int rows, int n, float eps) {
  backward(x, g, dx, rows, n, eps);
}
