// Soft-capped cross-entropy, one block per row, in one pass over the logits each way: the
// normalised logits are never written. z = cap * tanh(x / cap); loss = logsumexp(z) - z[t];
// dL/dx = g * (softmax(z) - onehot(t)) * (1 - tanh^2). Built to PTX by build.rs (nvcc) under
// the `cuda` feature; src/cuda.rs launches it and checks it against the plain path at start-up.
#include "loads.cuh"

#define THREADS 256

// Merges a running (max, sum of exp(z - max)) with another.
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  float top = fmaxf(m, m2);
  if (top == -INFINITY) return;  // both empty
  s = s * expf(m - top) + s2 * expf(m2 - top);
  m = top;
}

template <typename T>
__device__ void forward(const T *x, const uint32_t *targets, float *loss, int vocab, float cap) {
  __shared__ float ms[THREADS / 32], ss[THREADS / 32];
  const size_t row = blockIdx.x;
  const T *xr = x + row * (size_t)vocab;
  const float inv = 1.0f / cap;
  float m = -INFINITY, s = 0.0f;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float z = cap * tanhf(load(xr, v) * inv);
    if (z > m) {
      s = s * expf(m - z) + 1.0f;
      m = z;
    } else {
      s += expf(z - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    ms[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x / 32); w++) merge(m, s, ms[w], ss[w]);
    const uint32_t t = targets[row];
    // A target outside the vocabulary is a NaN loss: the train loop stops on it.
    const float zt = t < (uint32_t)vocab ? cap * tanhf(load(xr, t) * inv) : NAN;
    loss[row] = m + logf(s) - zt;
  }
}

// loss_grad holds, per row, the forward's loss and the gradient arriving at it.
template <typename T>
__device__ void backward(const T *x, const uint32_t *targets, const float *loss_grad, T *dx,
                         int vocab, float cap) {
  const size_t row = blockIdx.x;
  const T *xr = x + row * (size_t)vocab;
  T *dr = dx + row * (size_t)vocab;
  const float inv = 1.0f / cap;
  const uint32_t t = targets[row];
  const float zt = t < (uint32_t)vocab ? cap * tanhf(load(xr, t) * inv) : NAN;
  const float lse = loss_grad[2 * row] + zt;
  const float g = loss_grad[2 * row + 1];
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float th = tanhf(load(xr, v) * inv);
    const float p = expf(cap * th - lse);
    store(dr, v, g * (p - ((uint32_t)v == t ? 1.0f : 0.0f)) * (1.0f - th * th));
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    softcap_ce_forward_bf16(const __nv_bfloat16 *x, const uint32_t *targets, float *loss,
                            int vocab, float cap) {
  forward(x, targets, loss, vocab, cap);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    softcap_ce_forward_f32(const float *x, const uint32_t *targets, float *loss, int vocab,
                           float cap) {
  forward(x, targets, loss, vocab, cap);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    softcap_ce_backward_bf16(const __nv_bfloat16 *x, const uint32_t *targets,
                             const float *loss_grad, __nv_bfloat16 *dx, int vocab, float cap) {
  backward(x, targets, loss_grad, dx, vocab, cap);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    softcap_ce_backward_f32(const float *x, const uint32_t *targets, const float *loss_grad,
                            float *dx, int vocab, float cap) {
  backward(x, targets, loss_grad, dx, vocab, cap);
}
