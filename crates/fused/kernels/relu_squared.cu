// ReLU squared, y = max(x, 0)^2, and its gradient dx = 2 max(x, 0) g: eight elements a thread.
// Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

// Eight elements a thread (loads.cuh).
template <typename T>
__device__ void forward(const T *x, T *y, size_t n) {
  const size_t i = 8 * ((size_t)blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  float v[8];
  load8(x, i, n, v);
#pragma unroll
  for (int k = 0; k < 8; k++) {
    const float r = fmaxf(v[k], 0.0f);
    v[k] = r * r;
  }
  store8(y, i, n, v);
}

template <typename T>
__device__ void backward(const T *x, const T *g, T *dx, size_t n) {
  const size_t i = 8 * ((size_t)blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  float v[8], w[8];
  load8(x, i, n, v);
  load8(g, i, n, w);
#pragma unroll
  for (int k = 0; k < 8; k++) v[k] = 2.0f * fmaxf(v[k], 0.0f) * w[k];
  store8(dx, i, n, v);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    relu_squared_forward_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, size_t n) {
  forward(x, y, n);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    relu_squared_forward_f32(const float *x, float *y, size_t n) {
  forward(x, y, n);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    relu_squared_backward_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *g, __nv_bfloat16 *dx,
                               size_t n) {
  backward(x, g, dx, n);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    relu_squared_backward_f32(const float *x, const float *g, float *dx, size_t n) {
  backward(x, g, dx, n);
}
