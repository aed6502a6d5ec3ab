// The residual stream's mix y = a·x + b·z, for one-element a and b (a layer's learned scalars, in
// f32, taken at the tensors' precision as the plain path casts them), and its gradient: dx = a·g,
// dz = b·g, and each block's part of Σ g·x and Σ g·z (the scalars' gradients), which the caller
// sums over the blocks. Forward: eight elements a thread. Backward: a grid of at most 1,024 blocks
// (cuda.rs) strides over the elements, so the sums' order depends on n alone (the same from run
// to run).
// Built to PTX by build.rs under `cuda`.
#include "loads.cuh"

#define THREADS 256

__device__ __forceinline__ float at_precision(const float *, float v) { return v; }
__device__ __forceinline__ float at_precision(const __nv_bfloat16 *, float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// Eight elements a thread (loads.cuh).
template <typename T>
__device__ void forward(const T *x, const T *z, const float *ab, T *y, size_t n) {
  const size_t i = 8 * ((size_t)blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const float a = at_precision(x, ab[0]), b = at_precision(x, ab[1]);
  float u[8], v[8];
  load8(x, i, n, u);
  load8(z, i, n, v);
#pragma unroll
  for (int k = 0; k < 8; k++) u[k] = a * u[k] + b * v[k];
  store8(y, i, n, u);
}

// Eight elements a thread at a time, the grid striding over them. Shared memory: the warps' two
// sums, 2 × THREADS / 32 floats.
template <typename T>
__device__ void backward(const T *x, const T *z, const T *g, const float *ab, T *dx, T *dz,
                         float *partial, size_t n) {
  extern __shared__ __align__(16) unsigned char shared[];
  float *sums = reinterpret_cast<float *>(shared);
  const float a = at_precision(x, ab[0]), b = at_precision(x, ab[1]);
  float sx = 0.0f, sz = 0.0f;
  for (size_t i = 8 * ((size_t)blockIdx.x * blockDim.x + threadIdx.x); i < n;
       i += 8 * (size_t)gridDim.x * blockDim.x) {
    float gv[8], xv[8], zv[8], out[8];
    load8(g, i, n, gv);
    load8(x, i, n, xv);
    load8(z, i, n, zv);
#pragma unroll
    for (int k = 0; k < 8; k++) {  // past n, g is 0: nothing is added
      sx += gv[k] * xv[k];
      sz += gv[k] * zv[k];
      out[k] = a * gv[k];
    }
    store8(dx, i, n, out);
#pragma unroll
    for (int k = 0; k < 8; k++) out[k] = b * gv[k];
    store8(dz, i, n, out);
  }
  for (int o = 16; o > 0; o /= 2) {
    sx += __shfl_xor_sync(0xffffffffu, sx, o);
    sz += __shfl_xor_sync(0xffffffffu, sz, o);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    sums[warp] = sx;
    sums[THREADS / 32 + warp] = sz;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float tx = 0.0f, tz = 0.0f;
    for (int w = 0; w < THREADS / 32; w++) {
      tx += sums[w];
      tz += sums[THREADS / 32 + w];
    }
    partial[2 * blockIdx.x] = tx;
    partial[2 * blockIdx.x + 1] = tz;
  }
}

#define MIX(SUFFIX, T)                                                                             \
  extern "C" __global__ void __launch_bounds__(THREADS)                                            \
      mix_forward_##SUFFIX(const T *x, const T *z, const float *ab, T *y, size_t n) {              \
    forward(x, z, ab, y, n);                                                                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) mix_backward_##SUFFIX(                     \
      const T *x, const T *z, const T *g, const float *ab, T *dx, T *dz, float *partial,           \
      size_t n) {                                                                                  \
    backward(x, z, g, ab, dx, dz, partial, n);                                                     \
  }
MIX(bf16, __nv_bfloat16)
MIX(f32, float)
