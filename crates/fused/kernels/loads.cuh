// bf16 and f32 element access in f32, shared by the kernels.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16 *p, size_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, size_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// Eight consecutive elements [i, i + 8) at a time, in f32: one 16-byte access for bf16 (two for
// f32) where all eight lie below n and p + i is 16-byte aligned, else one element at a time
// (0 read past n, nothing written). A thread with one 2-byte load in flight keeps too few bytes
// moving to fill HBM's latency; eight at once do.
__device__ __forceinline__ bool vector8(const void *p, size_t i, size_t n) {
  return i + 8 <= n && ((uintptr_t)p & 15) == 0;
}
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, size_t i, size_t n, float v[8]) {
  if (vector8(p + i, i, n)) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p + i);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; k++) {
      const float2 f = __bfloat1622float2(h[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; k++) v[k] = i + k < n ? load(p, i + k) : 0.0f;
}
__device__ __forceinline__ void load8(const float *p, size_t i, size_t n, float v[8]) {
  if (vector8(p + i, i, n)) {
    const float4 a = reinterpret_cast<const float4 *>(p + i)[0];
    const float4 b = reinterpret_cast<const float4 *>(p + i)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; k++) v[k] = i + k < n ? load(p, i + k) : 0.0f;
}
__device__ __forceinline__ void store8(__nv_bfloat16 *p, size_t i, size_t n, const float v[8]) {
  if (vector8(p + i, i, n)) {
    uint4 u;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4 *>(p + i) = u;
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; k++) {
    if (i + k < n) store(p, i + k, v[k]);
  }
}
__device__ __forceinline__ void store8(float *p, size_t i, size_t n, const float v[8]) {
  if (vector8(p + i, i, n)) {
    reinterpret_cast<float4 *>(p + i)[0] = {v[0], v[1], v[2], v[3]};
    reinterpret_cast<float4 *>(p + i)[1] = {v[4], v[5], v[6], v[7]};
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; k++) {
    if (i + k < n) store(p, i + k, v[k]);
  }
}
