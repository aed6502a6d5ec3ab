// Attention's inputs from the q·k·v projection: qkv [B, T, 3·H·hd] → out [3, B, H, T, hd], q
// and k turned by the rotary angles (rope [2, T, hd/2]: cos, then sin) and RMS-normed in f32,
// v copied. One warp per output row; the turn is recomputed rather than kept (a row is 256
// bytes, in L1). Backward: dqkv from the heads' gradient, through the norm's backward and the
// turn back; every element of dqkv is written once. Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Where output row `row` comes from: its part (0 q, 1 k, 2 v), position and input offset.
__device__ __forceinline__ size_t source(size_t row, int b, int t, int h, int hd, int &part,
                                         int &pos) {
  pos = row % t;
  const size_t head = row / t % h, batch = row / ((size_t)t * h) % b;
  part = row / ((size_t)t * h * b);
  return (batch * t + pos) * 3 * h * hd + ((size_t)part * h + head) * hd;
}

template <typename T>
__device__ __forceinline__ void turn(const T *x, const T *rope, int t, int pos, int half, int i,
                                     float &r1, float &r2, float &c, float &s) {
  c = load(rope, (size_t)pos * half + i);
  s = load(rope, ((size_t)t + pos) * half + i);
  const float x1 = load(x, i), x2 = load(x, i + half);
  r1 = x1 * c + x2 * s;
  r2 = x2 * c - x1 * s;
}

template <typename T>
__device__ void forward(const T *qkv, const T *rope, T *out, int b, int t, int h, int hd,
                        float eps) {
  const size_t row = (size_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, half = hd / 2;
  if (row >= (size_t)3 * b * h * t) return;
  int part, pos;
  const T *x = qkv + source(row, b, t, h, hd, part, pos);
  T *y = out + row * hd;
  if (part == 2) {
    for (int j = lane; j < hd; j += 32) store(y, j, load(x, j));
    return;
  }
  float sq = 0.0f, r1, r2, c, s;
  for (int i = lane; i < half; i += 32) {
    turn(x, rope, t, pos, half, i, r1, r2, c, s);
    sq += r1 * r1 + r2 * r2;
  }
  const float inv = rsqrtf(warp_sum(sq) / hd + eps);
  for (int i = lane; i < half; i += 32) {
    turn(x, rope, t, pos, half, i, r1, r2, c, s);
    store(y, i, r1 * inv);
    store(y, i + half, r2 * inv);
  }
}

template <typename T>
__device__ void backward(const T *qkv, const T *rope, const T *grad, T *dqkv, int b, int t,
                         int h, int hd, float eps) {
  const size_t row = (size_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, half = hd / 2;
  if (row >= (size_t)3 * b * h * t) return;
  int part, pos;
  const size_t at = source(row, b, t, h, hd, part, pos);
  const T *x = qkv + at, *g = grad + row * hd;
  T *dx = dqkv + at;
  if (part == 2) {
    for (int j = lane; j < hd; j += 32) store(dx, j, load(g, j));
    return;
  }
  float sq = 0.0f, gr = 0.0f, r1, r2, c, s;
  for (int i = lane; i < half; i += 32) {
    turn(x, rope, t, pos, half, i, r1, r2, c, s);
    sq += r1 * r1 + r2 * r2;
    gr += load(g, i) * r1 + load(g, i + half) * r2;
  }
  const float inv = rsqrtf(warp_sum(sq) / hd + eps);
  // y = r·inv, dr = inv·g − r·inv³·mean(g⊙r)
  const float k = inv * inv * inv * warp_sum(gr) / hd;
  for (int i = lane; i < half; i += 32) {
    turn(x, rope, t, pos, half, i, r1, r2, c, s);
    const float d1 = inv * load(g, i) - r1 * k, d2 = inv * load(g, i + half) - r2 * k;
    store(dx, i, d1 * c - d2 * s);
    store(dx, i + half, d2 * c + d1 * s);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    heads_forward_bf16(const __nv_bfloat16 *qkv, const __nv_bfloat16 *rope, __nv_bfloat16 *out,
                       int b, int t, int h, int hd, float eps) {
  forward(qkv, rope, out, b, t, h, hd, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    heads_forward_f32(const float *qkv, const float *rope, float *out, int b, int t, int h,
                      int hd, float eps) {
  forward(qkv, rope, out, b, t, h, hd, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    heads_backward_bf16(const __nv_bfloat16 *qkv, const __nv_bfloat16 *rope,
                        const __nv_bfloat16 *grad, __nv_bfloat16 *dqkv, int b, int t, int h,
                        int hd, float eps) {
  backward(qkv, rope, grad, dqkv, b, t, h, hd, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    heads_backward_f32(const float *qkv, const float *rope, const float *grad, float *dqkv, int b,
                       int t, int h, int hd, float eps) {
  backward(qkv, rope, grad, dqkv, b, t, h, hd, eps);
}
