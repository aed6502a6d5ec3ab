// Attention's softmax over materialised scores, with the scale and the causal sliding window
// applied in the kernel: p = softmax(scale * s + mask) per row, where query i of T sees keys
// i - window ..= i. One block per row; only the window's keys are read, the rest written as 0.
// Backward: ds = scale * p * (g - sum(g * p)). Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

// The block's max (op 0) or sum (op 1) of v, in every thread.
__device__ float block_reduce(float v, bool is_max) {
  __shared__ float part[THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffff, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // part[] may still be read by a previous reduction
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = part[0];
  for (int w = 1; w < (int)(blockDim.x / 32); w++) v = is_max ? fmaxf(v, part[w]) : v + part[w];
  return v;
}

// The keys query `row % t` sees: [lo, hi].
__device__ __forceinline__ void window_of(size_t row, int t, int window, int &lo, int &hi) {
  hi = (int)(row % (size_t)t);
  lo = hi > window ? hi - window : 0;
}

template <typename T>
__device__ void forward(const T *s, T *p, int t, int window, float scale) {
  const size_t row = blockIdx.x;
  const T *sr = s + row * (size_t)t;
  T *pr = p + row * (size_t)t;
  int lo, hi;
  window_of(row, t, window, lo, hi);
  float m = -INFINITY;
  for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) m = fmaxf(m, scale * load(sr, j));
  m = block_reduce(m, true);
  float sum = 0.0f;
  for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) sum += expf(scale * load(sr, j) - m);
  const float inv = 1.0f / block_reduce(sum, false);
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    store(pr, j, (j >= lo && j <= hi) ? expf(scale * load(sr, j) - m) * inv : 0.0f);
  }
}

template <typename T>
__device__ void backward(const T *p, const T *g, T *ds, int t, int window, float scale) {
  const size_t row = blockIdx.x;
  const T *pr = p + row * (size_t)t;
  const T *gr = g + row * (size_t)t;
  T *dr = ds + row * (size_t)t;
  int lo, hi;
  window_of(row, t, window, lo, hi);
  float dot = 0.0f;
  for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) dot += load(pr, j) * load(gr, j);
  dot = block_reduce(dot, false);
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    store(dr, j, (j >= lo && j <= hi) ? scale * load(pr, j) * (load(gr, j) - dot) : 0.0f);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    causal_softmax_forward_bf16(const __nv_bfloat16 *s, __nv_bfloat16 *p, int t, int window,
                                float scale) {
  forward(s, p, t, window, scale);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    causal_softmax_forward_f32(const float *s, float *p, int t, int window, float scale) {
  forward(s, p, t, window, scale);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    causal_softmax_backward_bf16(const __nv_bfloat16 *p, const __nv_bfloat16 *g,
                                 __nv_bfloat16 *ds, int t, int window, float scale) {
  backward(p, g, ds, t, window, scale);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    causal_softmax_backward_f32(const float *p, const float *g, float *ds, int t, int window,
                                float scale) {
  backward(p, g, ds, t, window, scale);
}
