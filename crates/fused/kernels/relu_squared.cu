// ReLU squared, y = max(x, 0)^2, and its gradient dx = 2 max(x, 0) g: one thread per element.
// Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

template <typename T>
__device__ void forward(const T *x, T *y, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float r = fmaxf(load(x, i), 0.0f);
  store(y, i, r * r);
}

template <typename T>
__device__ void backward(const T *x, const T *g, T *dx, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  store(dx, i, 2.0f * fmaxf(load(x, i), 0.0f) * load(g, i));
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
