// Soft-capped cross-entropy, one block per row, in one pass over the logits each way: the
// normalised logits are never written. z = cap * tanh(x / cap); loss = logsumexp(z) - z[t];
// dL/dx = g * (softmax(z) - onehot(t)) * (1 - tanh^2). Built to PTX by build.rs (nvcc) under
// the `cuda` feature; src/cuda.rs launches it and checks it against the plain path at start-up.
#include "loads.cuh"

#define THREADS 256

// Merges a running (max, sum of exp(z - max)) with another. Both maxima -inf: nothing but NaN
// can be in the sums (fmaxf passes over NaN logits), and a NaN must reach the loss.
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  float top = fmaxf(m, m2);
  if (top == -INFINITY) {
    s += s2;
    return;
  }
  s = s * expf(m - top) + s2 * expf(m2 - top);
  m = top;
}

// tanh(y) as 1 - 2 / (e^2y + 1): two special-function instructions where tanhf spends ~20 and
// branches; the error is a few 1e-7 absolute (the logits are bf16 on the GPU). Saturates to ±1,
// keeps NaN.
__device__ __forceinline__ float fast_tanh(float y) {
  return 1.0f - __fdividef(2.0f, __expf(2.0f * y) + 1.0f);
}

// Each thread takes eight logits at a time (loads.cuh), GROUP such runs loaded before it computes
// on them, so that a row's loads are in flight together rather than one after another.
#define GROUP 4

// The GROUP runs of eight a thread takes from `base`, `stride` apart (0 past the row).
template <typename T>
__device__ __forceinline__ void load_group(const T *xr, int base, int stride, int vocab,
                                           float v[GROUP][8]) {
#pragma unroll
  for (int c = 0; c < GROUP; c++) load8(xr, base + c * stride, vocab, v[c]);
}

// Shared memory: the warps' running maxima and sums, 2 × THREADS / 32 floats.
template <typename T>
__device__ void forward(const T *x, const uint32_t *targets, float *loss, int vocab, float cap) {
  extern __shared__ __align__(16) unsigned char shared[];
  float *ms = reinterpret_cast<float *>(shared), *ss = ms + THREADS / 32;
  const size_t row = blockIdx.x;
  const T *xr = x + row * (size_t)vocab;
  const float inv = 1.0f / cap;
  const int stride = 8 * blockDim.x;
  float m = -INFINITY, s = 0.0f;
  for (int base = 8 * threadIdx.x; base < vocab; base += GROUP * stride) {
    float v[GROUP][8];
    load_group(xr, base, stride, vocab, v);
#pragma unroll
    for (int c = 0; c < GROUP; c++) {
      const int at = base + c * stride;
      if (at >= vocab) break;  // this run and the next ones lie past the row
      float top = -INFINITY;
#pragma unroll
      for (int k = 0; k < 8; k++) {
        v[c][k] = at + k < vocab ? cap * fast_tanh(v[c][k] * inv) : -INFINITY;
        top = fmaxf(top, v[c][k]);
      }
      float sum = 0.0f;  // NaN when a logit is: exp(NaN - top)
#pragma unroll
      for (int k = 0; k < 8; k++) sum += __expf(v[c][k] - top);
      merge(m, s, top, sum);
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
    const float zt = t < (uint32_t)vocab ? cap * fast_tanh(load(xr, t) * inv) : NAN;
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
  const float zt = t < (uint32_t)vocab ? cap * fast_tanh(load(xr, t) * inv) : NAN;
  const float lse = loss_grad[2 * row] + zt;
  const float g = loss_grad[2 * row + 1];
  const int stride = 8 * blockDim.x;
  for (int base = 8 * threadIdx.x; base < vocab; base += GROUP * stride) {
    float v[GROUP][8];
    load_group(xr, base, stride, vocab, v);
#pragma unroll
    for (int c = 0; c < GROUP; c++) {
      const int at = base + c * stride;
      if (at >= vocab) break;
#pragma unroll
      for (int k = 0; k < 8; k++) {
        const float th = fast_tanh(v[c][k] * inv);
        const float p = __expf(cap * th - lse);
        v[c][k] = g * (p - ((uint32_t)(at + k) == t ? 1.0f : 0.0f)) * (1.0f - th * th);
      }
      store8(dr, at, vocab, v[c]);
    }
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
