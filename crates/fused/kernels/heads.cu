// Attention's inputs from the q·k·v projection: qkv [B, T, 3·H·hd] → out [3, B, H, T, hd], q
// and k turned by the rotary angles (rope [2, T, hd/2]: cos, then sin) and RMS-normed in f32,
// v copied. Eight lanes an output row; the turn is recomputed rather than kept (a row is 256
// bytes, in L1). Backward: dqkv from the heads' gradient, through the norm's backward and the
// turn back; every element of dqkv is written once. Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256
// A row takes LANES lanes (a warp four rows), each lane runs of eight pairs (loads.cuh): one lane
// a row with one 2-byte load at a time keeps too few bytes in flight to fill HBM.
#define LANES 8
#define ROWS_PER_BLOCK (THREADS / LANES)

// The sum over the LANES lanes of a row. Every lane of the warp takes part (rows past the end
// and v rows too): the shuffles need the whole warp.
__device__ __forceinline__ float row_sum(float v) {
  for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
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

// Pairs i .. i + 7 of x (x[i] with x[i + half]) turned by their angles: r1, r2, and cos, sin.
template <typename T>
__device__ __forceinline__ void turn8(const T *x, const T *rope, int t, int pos, int half, int i,
                                      float r1[8], float r2[8], float c[8], float s[8]) {
  float x1[8], x2[8];
  load8(x, i, half, x1);
  load8(x + half, i, half, x2);
  load8(rope + (size_t)pos * half, i, half, c);
  load8(rope + ((size_t)t + pos) * half, i, half, s);
#pragma unroll
  for (int k = 0; k < 8; k++) {
    r1[k] = x1[k] * c[k] + x2[k] * s[k];
    r2[k] = x2[k] * c[k] - x1[k] * s[k];
  }
}

// This lane's output row, its part (3 past the last row) and its place among the row's lanes.
__device__ __forceinline__ size_t my_row(int b, int t, int h, int hd, int &part, int &pos,
                                         size_t &row, int &sub) {
  row = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / LANES;
  sub = threadIdx.x % LANES;
  if (row >= (size_t)3 * b * h * t) {
    part = 3;
    return 0;
  }
  return source(row, b, t, h, hd, part, pos);
}

template <typename T>
__device__ void forward(const T *qkv, const T *rope, T *out, int b, int t, int h, int hd,
                        float eps) {
  const int half = hd / 2;
  int part, pos, sub;
  size_t row;
  const T *x = qkv + my_row(b, t, h, hd, part, pos, row, sub);
  T *y = out + row * hd;
  float r1[8], r2[8], c[8], s[8], v[8];
  if (part == 2) {
    for (int i = 8 * sub; i < hd; i += 8 * LANES) {
      load8(x, i, hd, v);
      store8(y, i, hd, v);
    }
  }
  const bool turned = part < 2;
  float sq = 0.0f;
  for (int i = 8 * sub; turned && i < half; i += 8 * LANES) {
    turn8(x, rope, t, pos, half, i, r1, r2, c, s);
#pragma unroll
    for (int k = 0; k < 8; k++) sq += r1[k] * r1[k] + r2[k] * r2[k];
  }
  const float inv = rsqrtf(row_sum(sq) / hd + eps);
  for (int i = 8 * sub; turned && i < half; i += 8 * LANES) {
    turn8(x, rope, t, pos, half, i, r1, r2, c, s);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      r1[k] *= inv;
      r2[k] *= inv;
    }
    store8(y, i, half, r1);
    store8(y + half, i, half, r2);
  }
}

template <typename T>
__device__ void backward(const T *qkv, const T *rope, const T *grad, T *dqkv, int b, int t,
                         int h, int hd, float eps) {
  const int half = hd / 2;
  int part, pos, sub;
  size_t row;
  const size_t at = my_row(b, t, h, hd, part, pos, row, sub);
  const T *x = qkv + at, *g = grad + row * hd;
  T *dx = dqkv + at;
  float r1[8], r2[8], c[8], s[8], g1[8], g2[8];
  if (part == 2) {
    for (int i = 8 * sub; i < hd; i += 8 * LANES) {
      load8(g, i, hd, g1);
      store8(dx, i, hd, g1);
    }
  }
  const bool turned = part < 2;
  float sq = 0.0f, gr = 0.0f;
  for (int i = 8 * sub; turned && i < half; i += 8 * LANES) {
    turn8(x, rope, t, pos, half, i, r1, r2, c, s);
    load8(g, i, half, g1);
    load8(g + half, i, half, g2);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      sq += r1[k] * r1[k] + r2[k] * r2[k];
      gr += g1[k] * r1[k] + g2[k] * r2[k];
    }
  }
  const float inv = rsqrtf(row_sum(sq) / hd + eps);
  // y = r·inv, dr = inv·g − r·inv³·mean(g⊙r)
  const float k3 = inv * inv * inv * row_sum(gr) / hd;
  for (int i = 8 * sub; turned && i < half; i += 8 * LANES) {
    turn8(x, rope, t, pos, half, i, r1, r2, c, s);
    load8(g, i, half, g1);
    load8(g + half, i, half, g2);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float d1 = inv * g1[k] - r1[k] * k3, d2 = inv * g2[k] - r2[k] * k3;
      r1[k] = d1 * c[k] - d2 * s[k];
      r2[k] = d2 * c[k] + d1 * s[k];
    }
    store8(dx, i, half, r1);
    store8(dx + half, i, half, r2);
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
