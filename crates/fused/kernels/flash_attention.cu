// Causal attention with a sliding window in the style of FlashAttention-2: the T × T scores and
// probabilities live only in registers, a tile of keys at a time, with an online softmax; the
// backward pass recomputes them from the saved log-sum-exp. Products on tensor cores
// (mma.sync m16n8k16: bf16 in, f32 accumulate), whose fragment layouts the PTX ISA fixes:
//   A (16 × 16, row-major), 4 registers of 2 bf16: a0 = (g, 2c..2c+1), a1 = (g + 8, 2c..),
//     a2 = (g, 2c + 8..), a3 = (g + 8, 2c + 8..);
//   B (16 × 8, k × n), 2 registers: b0 = (k = 2c..2c+1, n = g), b1 = (k = 2c + 8.., n = g);
//   C (16 × 8, f32), 4 floats: (g, 2c), (g, 2c + 1), (g + 8, 2c), (g + 8, 2c + 1);
// for lane = 4g + c. Two n8 tiles of C side by side are, rounded to bf16, one A fragment: that
// is how P (and dS) go from one product to the next without leaving registers. Fragments read
// from shared memory come through ldmatrix: four 8 × 8 matrices a warp instruction, lane l
// giving the address of row l % 8 of matrix l / 8 and receiving, in register m, (row l / 4,
// columns 2(l % 4) and + 1) of matrix m, or with .trans (rows 2(l % 4) and + 1, column l / 4).
//
// q, k, v and their gradients: [B, H, T, HD], rows contiguous. o and its gradient: [B, T, H, HD]
// (the layout the output projection reads). Query i sees keys i - window ..= i. T must be a
// multiple of 64 (the caller falls back to the plain path otherwise). lse: [B, H, T] f32, the
// row's log2-sum-exp of the scaled scores, saved by the forward pass for the backward.
#include "loads.cuh"

typedef __nv_bfloat16 bf16;

#define WARPS 4
#define THREADS (WARPS * 32)
#define PAD 8  // bf16 of padding per shared row: fragment reads hit 32 distinct banks

__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if defined(FLASH_EMULATED)
  emulated_mma(c, a, b0, b1);  // crates/fused/tests/emulator: this file run on the CPU
#elif __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  // Below sm_80 (no bf16 mma) nothing is added: the host refuses such a GPU before any launch,
  // and a module built for one anyway fails the self-check on its numbers, not with a trap
  // that would end the process's CUDA context.
}

// Four 8 × 8 bf16 matrices from shared memory (the layout above); `row` is this lane's row.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16 *row) {
#if defined(FLASH_EMULATED)
  emulated_ldmatrix(r, row, TRANS);
#elif __CUDA_ARCH__ >= 800
  const unsigned at = (unsigned)__cvta_generic_to_shared(row);
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
  }
#else
  r[0] = r[1] = r[2] = r[3] = 0;  // below sm_80: see mma
#endif
}

// Two adjacent bf16 (the lower column in the low half).
__device__ __forceinline__ uint32_t pair(const bf16 *p) {
  return *reinterpret_cast<const uint32_t *>(p);
}
// Two bf16 from separate places.
__device__ __forceinline__ uint32_t pair(bf16 lo, bf16 hi) {
  return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}
__device__ __forceinline__ uint32_t pair(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return pair(v.x, v.y);
}

// 16 bytes from global to shared memory without passing through registers (cp.async, sm_80+):
// the copy lands while the block computes; wait_copies() waits for the thread's own copies, and
// a __syncthreads after it shows them to the block. The emulator copies at once.
__device__ __forceinline__ void copy16(void *dst, const void *src) {
#if defined(FLASH_EMULATED)
  emulated_copy16(dst, src);
#elif __CUDA_ARCH__ >= 800
  const unsigned to = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(src));
#else
  *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
#endif
}
__device__ __forceinline__ void wait_copies() {
#if !defined(FLASH_EMULATED) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// Starts copying ROWS rows of HD bf16 from global memory (row r at src + r * stride) into
// shared memory (row r at dst + r * (HD + PAD)), 16 bytes a thread at a time. Every thread makes
// the same number of copies, so the loop unrolls and each copy's address is a constant step.
template <int HD, int ROWS>
__device__ __forceinline__ void load_rows(bf16 *dst, const bf16 *src, size_t stride) {
  constexpr int CHUNKS = HD / 8, STEP = THREADS / CHUNKS;  // rows the block copies at once
  static_assert(THREADS % CHUNKS == 0 && ROWS % STEP == 0, "whole rows a pass of the block");
  const int r = threadIdx.x / CHUNKS, c = threadIdx.x % CHUNKS;
  dst += r * (HD + PAD) + c * 8;
  src += r * stride + c * 8;
#pragma unroll
  for (int i = 0; i < ROWS; i += STEP) copy16(dst + i * (HD + PAD), src + i * stride);
}

// 2^x, flushing results under 2^-126 to zero: one MUFU instruction, where exp2f adds a range
// test and two multiplies for subnormal results (a probability that small adds nothing).
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(FLASH_EMULATED) || !defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// Starts copying the k and v rows of the key tile from k0 (BK rows each, of one head) into
// buffer `buf` of `tiles` ([2][k, v][BK][HD + PAD]).
template <int HD, int BK>
__device__ __forceinline__ void load_kv(bf16 *tiles, const bf16 *k, const bf16 *v, int k0,
                                        int buf) {
  bf16 *dst = tiles + buf * 2 * BK * (HD + PAD);
  load_rows<HD, BK>(dst, k + (size_t)k0 * HD, HD);
  load_rows<HD, BK>(dst + BK * (HD + PAD), v + (size_t)k0 * HD, HD);
}

// The key tile from k0, in buffer `buf`, once its copies are in; then starts copying the next
// tile (below `end`) into the other buffer, which every warp has finished reading by then.
template <int HD, int BK>
__device__ __forceinline__ const bf16 *kv_tile(bf16 *tiles, const bf16 *k, const bf16 *v, int k0,
                                               int end, int buf) {
  wait_copies();
  __syncthreads();
  if (k0 + BK < end) load_kv<HD, BK>(tiles, k, v, k0 + BK, buf ^ 1);
  return tiles + buf * 2 * BK * (HD + PAD);
}

// The A fragments of 16 rows × HD: rows at p + r * stride (global or shared memory).
template <int HD>
__device__ __forceinline__ void a_fragments(uint32_t a[HD / 16][4], const bf16 *p, size_t stride) {
  const int g = (threadIdx.x % 32) >> 2, c = threadIdx.x & 3;
#pragma unroll
  for (int kk = 0; kk < HD / 16; kk++) {
    const bf16 *r0 = p + g * stride + kk * 16 + 2 * c, *r1 = r0 + 8 * stride;
    a[kk][0] = pair(r0);
    a[kk][1] = pair(r1);
    a[kk][2] = pair(r0 + 8);
    a[kk][3] = pair(r1 + 8);
  }
}

// acc[n..n+1] += A (16 × 16: the HD columns kk·16 ..) · Bᵀ for B's rows n·8 .. n·8 + 15, the
// shared rows of `b` (HD + PAD apart): one ldmatrix gives both B fragments of two n8 tiles.
template <int HD, int N8>
__device__ __forceinline__ void products_over_16(float acc[N8][4], const uint32_t a[4],
                                                 const bf16 *b, int kk) {
  static_assert(N8 % 2 == 0, "n8 tiles go two to an ldmatrix");
  const int lane = threadIdx.x % 32, m = lane / 8;
#pragma unroll
  for (int n = 0; n < N8; n += 2) {
    uint32_t f[4];
    ldmatrix_x4<false>(f, b + ((n + m / 2) * 8 + lane % 8) * (HD + PAD) + kk * 16 + m % 2 * 8);
    mma(acc[n], a, f[0], f[1]);
    mma(acc[n + 1], a, f[2], f[3]);
  }
}

// acc[n] (16 × 8 each) = A (16 × HD) · Bᵀ, where B's rows n·8 .. n·8 + 7 are the shared rows of
// `b` (HD + PAD apart): a product with the contraction over HD. A is held in registers.
template <int HD, int N8>
__device__ __forceinline__ void product_over_hd(float acc[N8][4], const uint32_t a[HD / 16][4],
                                                const bf16 *b) {
#pragma unroll
  for (int n = 0; n < N8; n++) {
    acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < HD / 16; kk++) products_over_16<HD, N8>(acc, a[kk], b, kk);
}

// The same with A's 16 rows in shared memory, read a fragment at a time (fewer registers).
template <int HD, int N8>
__device__ __forceinline__ void product_over_hd(float acc[N8][4], const bf16 *a, const bf16 *b) {
  const int lane = threadIdx.x % 32, m = lane / 8;
#pragma unroll
  for (int n = 0; n < N8; n++) {
    acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < HD / 16; kk++) {
    // Matrices: rows 0-7 and 8-15 of columns kk·16 + 0..7, then of kk·16 + 8..15.
    uint32_t frag[4];
    ldmatrix_x4<false>(frag, a + (m % 2 * 8 + lane % 8) * (HD + PAD) + kk * 16 + m / 2 * 8);
    products_over_16<HD, N8>(acc, frag, b, kk);
  }
}

// acc (16 × HD) += P (16 × 16·K16, as C tiles p[2·K16]) · B, B's rows the shared rows of `b`:
// a product with the contraction over the tile's keys (or queries).
template <int HD, int K16>
__device__ __forceinline__ void product_over_tile(float acc[HD / 8][4], const float p[2 * K16][4],
                                                  const bf16 *b) {
  static_assert(HD % 16 == 0, "n8 tiles go two to an ldmatrix");
  const int lane = threadIdx.x % 32, m = lane / 8;
  constexpr int LD = HD + PAD;
#pragma unroll
  for (int kc = 0; kc < K16; kc++) {
    const uint32_t a[4] = {pair(p[2 * kc][0], p[2 * kc][1]), pair(p[2 * kc][2], p[2 * kc][3]),
                           pair(p[2 * kc + 1][0], p[2 * kc + 1][1]),
                           pair(p[2 * kc + 1][2], p[2 * kc + 1][3])};
    // Transposed matrices: rows (the contraction) kc·16 + 0..7 and + 8..15 of columns j·8 ..,
    // then of (j + 1)·8 ..: the B fragments of two n8 tiles.
#pragma unroll
    for (int j = 0; j < HD / 8; j += 2) {
      uint32_t f[4];
      ldmatrix_x4<true>(f, b + (kc * 16 + m % 2 * 8 + lane % 8) * LD + (j + m / 2) * 8);
      mma(acc[j], a, f[0], f[1]);
      mma(acc[j + 1], a, f[2], f[3]);
    }
  }
}

// Whether query i sees key j.
__device__ __forceinline__ bool sees(int i, int j, int window) { return j <= i && i - j <= window; }

// Of queries i0 .. i0 + QN - 1 and keys j0 .. j0 + KN - 1: whether every query sees every key
// (no mask needed), and whether none sees any (no work). The same for a whole warp: its branch
// does not diverge.
template <int QN, int KN>
__device__ __forceinline__ bool sees_all(int i0, int j0, int window) {
  return j0 + KN - 1 <= i0 && i0 + QN - 1 - j0 <= window;
}
template <int QN, int KN>
__device__ __forceinline__ bool sees_none(int i0, int j0, int window) {
  return j0 > i0 + QN - 1 || i0 - (j0 + KN - 1) > window;
}

// Forward: a block is 64 queries of one head (16 per warp), over tiles of 64 keys, two tiles
// in shared memory: the next one is copied in while the block computes on this one.
template <int HD>
__device__ void forward(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int H,
                        int T, int window, float scale_log2) {
  constexpr int BQ = 16 * WARPS, BK = 64, LD = HD + PAD;
  extern __shared__ __align__(16) unsigned char shared[];
  bf16 *const tiles = reinterpret_cast<bf16 *>(shared);  // [2][k, v][BK][LD]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int first = (gridDim.x - 1 - blockIdx.x) * BQ;  // the longest rows start first
  const int q0 = first + warp * 16;
  const size_t head = (size_t)bh * T * HD;

  uint32_t qf[HD / 16][4];
  a_fragments<HD>(qf, q + head + (size_t)q0 * HD, HD);
  float acc[HD / 8][4];
#pragma unroll
  for (int j = 0; j < HD / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  const int from = max(0, first - window) / BK * BK, end = first + BQ;
  load_kv<HD, BK>(tiles, k + head, v + head, from, 0);
  for (int k0 = from, buf = 0; k0 < end; k0 += BK, buf ^= 1) {
    const bf16 *ks = kv_tile<HD, BK>(tiles, k + head, v + head, k0, end, buf), *vs = ks + BK * LD;
    if (sees_none<16, BK>(q0, k0, window)) continue;  // this warp's rows see none of the tile
    float s[BK / 8][4];
    product_over_hd<HD, BK / 8>(s, qf, ks);
    if (!sees_all<16, BK>(q0, k0, window)) {
#pragma unroll
      for (int n = 0; n < BK / 8; n++) {
#pragma unroll
        for (int x = 0; x < 4; x++) {
          if (!sees(q0 + g + 8 * (x / 2), k0 + n * 8 + 2 * c + x % 2, window)) s[n][x] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
      // The max of the raw scores, then the exponents as one multiply-add from the scores.
      float top = -INFINITY;
#pragma unroll
      for (int n = 0; n < BK / 8; n++) top = fmaxf(top, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      top = fmaxf(m[r], top * scale_log2);
      top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 1));
      top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 2));
      // A row that has seen no key yet keeps a max of -inf: shift by 0 so that no inf - inf.
      const float shift = top == -INFINITY ? 0.0f : top;
      const float rescale = exp2_ftz(m[r] - shift);
      m[r] = top;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < BK / 8; n++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const float p = exp2_ftz(fmaf(s[n][2 * r + e], scale_log2, -shift));
          s[n][2 * r + e] = p;
          sum += p;
        }
      }
      l[r] = l[r] * rescale + sum;  // this lane's part; the four lanes of a row add up at the end
#pragma unroll
      for (int j = 0; j < HD / 8; j++) {
        acc[j][2 * r] *= rescale;
        acc[j][2 * r + 1] *= rescale;
      }
    }
    product_over_tile<HD, BK / 16>(acc, s, vs);
  }

#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
    const int i = q0 + g + 8 * r;
    const float inv = 1.0f / l[r];
    bf16 *row = o + (((size_t)b * T + i) * H + h) * HD + 2 * c;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      *reinterpret_cast<uint32_t *>(row + j * 8) =
          pair(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
    }
    if (c == 0) lse[(size_t)bh * T + i] = m[r] + log2f(l[r]);
  }
}

// Backward, first step: delta = rowsum(dO ⊙ O) per query, in [B, H, T]; DELTA_LANES lanes a
// row, eight elements a lane at a time (loads.cuh).
#define DELTA_LANES 8
#define DELTA_ROWS (THREADS / DELTA_LANES)  // rows a block
template <int HD>
__device__ void delta(const bf16 *o, const bf16 *d_o, float *out, int B, int H, int T) {
  const size_t row = (size_t)blockIdx.x * DELTA_ROWS + threadIdx.x / DELTA_LANES;  // [B, T, H]
  const bool mine = row < (size_t)B * T * H;  // other lanes still join the shuffles
  float sum = 0.0f, a[8], b[8];
  for (int d = 8 * (threadIdx.x % DELTA_LANES); mine && d < HD; d += 8 * DELTA_LANES) {
    load8(o + row * HD, d, HD, a);
    load8(d_o + row * HD, d, HD, b);
#pragma unroll
    for (int k = 0; k < 8; k++) sum += a[k] * b[k];
  }
  for (int s = DELTA_LANES / 2; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, s);
  if (!mine || threadIdx.x % DELTA_LANES != 0) return;
  const int h = row % H, t = row / H % T, bt = row / ((size_t)H * T);
  out[((size_t)bt * H + h) * T + t] = sum;
}

// Backward, keys' side: a block is 64 keys of one head (16 per warp), over tiles of 32 queries;
// the warp's k and v rows (A fragments) and its dK and dV stay in registers. Transposed products (keys × queries) keep each warp on its own
// keys: Sᵀ = K Qᵀ, dV += Pᵀ dO, dPᵀ = V dOᵀ, dK += dSᵀ Q.
template <int HD>
__device__ void backward_kv(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o,
                            const float *lse, const float *dlt, bf16 *grads, int H, int T,
                            int window, float scale, float scale_log2) {
  constexpr int BK = 16 * WARPS, BQ = 32, LD = HD + PAD;
  // Two buffers of a query tile: q, dO, lse and delta rows.
  constexpr int TILE = 2 * BQ * LD * 2 + 2 * BQ * 4;  // bytes
  extern __shared__ __align__(16) unsigned char shared[];
  unsigned char *const tiles = shared;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int first = blockIdx.x * BK;  // the first keys have the most queries: they start first
  const int k0 = first + warp * 16;
  const size_t head = (size_t)bh * T * HD;
  bf16 *dk = grads + (size_t)gridDim.y * T * HD, *dv = dk + (size_t)gridDim.y * T * HD;

  // This warp's 16 keys' k and v rows as A fragments, held for the whole block: each tile's
  // products read only the queries' side from shared memory.
  uint32_t kf[HD / 16][4], vf[HD / 16][4];
  a_fragments<HD>(kf, k + head + (size_t)k0 * HD, HD);
  a_fragments<HD>(vf, v + head + (size_t)k0 * HD, HD);
  float dk_acc[HD / 8][4], dv_acc[HD / 8][4];
#pragma unroll
  for (int j = 0; j < HD / 8; j++) {
    dk_acc[j][0] = dk_acc[j][1] = dk_acc[j][2] = dk_acc[j][3] = 0.0f;
    dv_acc[j][0] = dv_acc[j][1] = dv_acc[j][2] = dv_acc[j][3] = 0.0f;
  }

  // Starts copying the query tile from q0 into buffer `buf`: its q and dO rows, then its lse
  // and delta (BQ floats each, 16 bytes a thread).
  auto load_tile = [&](int q0, int buf) {
    unsigned char *tile = tiles + buf * TILE;
    bf16 *qs = reinterpret_cast<bf16 *>(tile), *dos = qs + BQ * LD;
    load_rows<HD, BQ>(qs, q + head + (size_t)q0 * HD, HD);
    load_rows<HD, BQ>(dos, d_o + (((size_t)b * T + q0) * H + h) * HD, (size_t)H * HD);
    float *rows = reinterpret_cast<float *>(dos + BQ * LD);
    if (threadIdx.x < 2 * BQ / 4) {
      const int half = threadIdx.x / (BQ / 4), at = threadIdx.x % (BQ / 4) * 4;
      copy16(rows + half * BQ + at, (half ? dlt : lse) + (size_t)bh * T + q0 + at);
    }
  };
  const int last = min(T - 1, first + BK - 1 + window);
  load_tile(first / BQ * BQ, 0);
  for (int q0 = first / BQ * BQ, buf = 0; q0 <= last; q0 += BQ, buf ^= 1) {
    wait_copies();
    __syncthreads();  // this tile is in; the other buffer is free
    if (q0 + BQ <= last) load_tile(q0 + BQ, buf ^ 1);
    const bf16 *qs = reinterpret_cast<const bf16 *>(tiles + buf * TILE), *dos = qs + BQ * LD;
    const float *lse_s = reinterpret_cast<const float *>(dos + BQ * LD), *dlt_s = lse_s + BQ;
    if (sees_none<BQ, 16>(q0, k0, window)) continue;  // no query of the tile sees these keys
    float s[BQ / 8][4];
    product_over_hd<HD, BQ / 8>(s, kf, qs);
    // Pᵀ: row r is key k0 + g + 8r, column the query q0 + n·8 + 2c + e.
#pragma unroll
    for (int n = 0; n < BQ / 8; n++) {
#pragma unroll
      for (int x = 0; x < 4; x++) {
        s[n][x] = exp2_ftz(fmaf(s[n][x], scale_log2, -lse_s[n * 8 + 2 * c + x % 2]));
      }
    }
    if (!sees_all<BQ, 16>(q0, k0, window)) {
#pragma unroll
      for (int n = 0; n < BQ / 8; n++) {
#pragma unroll
        for (int x = 0; x < 4; x++) {
          if (!sees(q0 + n * 8 + 2 * c + x % 2, k0 + g + 8 * (x / 2), window)) s[n][x] = 0.0f;
        }
      }
    }
    product_over_tile<HD, BQ / 16>(dv_acc, s, dos);
    float dp[BQ / 8][4];
    product_over_hd<HD, BQ / 8>(dp, vf, dos);
#pragma unroll
    for (int n = 0; n < BQ / 8; n++) {
#pragma unroll
      for (int x = 0; x < 4; x++) {
        dp[n][x] = s[n][x] * (dp[n][x] - dlt_s[n * 8 + 2 * c + x % 2]);
      }
    }
    product_over_tile<HD, BQ / 16>(dk_acc, dp, qs);
  }

#pragma unroll
  for (int r = 0; r < 2; r++) {
    const size_t at = head + (size_t)(k0 + g + 8 * r) * HD + 2 * c;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      *reinterpret_cast<uint32_t *>(dk + at + j * 8) =
          pair(dk_acc[j][2 * r] * scale, dk_acc[j][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t *>(dv + at + j * 8) = pair(dv_acc[j][2 * r], dv_acc[j][2 * r + 1]);
    }
  }
}

// Backward, queries' side: a block is 64 queries of one head (16 per warp), over tiles of 32
// keys: S = Q Kᵀ, dP = dO Vᵀ, dQ += dS K. Apart from backward_kv so that no two blocks add to
// the same dQ: the gradient is the same bits every run.
template <int HD>
__device__ void backward_q(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o,
                           const float *lse, const float *dlt, bf16 *grads, int H, int T, int window,
                           float scale, float scale_log2) {
  constexpr int BQ = 16 * WARPS, BK = 32, LD = HD + PAD;
  extern __shared__ __align__(16) unsigned char shared[];
  bf16 *const tiles = reinterpret_cast<bf16 *>(shared);  // [2][k, v][BK][LD]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int first = (gridDim.x - 1 - blockIdx.x) * BQ;
  const int q0 = first + warp * 16;
  const size_t head = (size_t)bh * T * HD;

  uint32_t qf[HD / 16][4], dof[HD / 16][4];
  a_fragments<HD>(qf, q + head + (size_t)q0 * HD, HD);
  a_fragments<HD>(dof, d_o + (((size_t)b * T + q0) * H + h) * HD, (size_t)H * HD);
  float row_lse[2], row_dlt[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    row_lse[r] = lse[(size_t)bh * T + q0 + g + 8 * r];
    row_dlt[r] = dlt[(size_t)bh * T + q0 + g + 8 * r];
  }
  float acc[HD / 8][4];
#pragma unroll
  for (int j = 0; j < HD / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  const int from = max(0, first - window) / BK * BK, end = first + BQ;
  load_kv<HD, BK>(tiles, k + head, v + head, from, 0);
  for (int k0 = from, buf = 0; k0 < end; k0 += BK, buf ^= 1) {
    const bf16 *ks = kv_tile<HD, BK>(tiles, k + head, v + head, k0, end, buf), *vs = ks + BK * LD;
    if (sees_none<16, BK>(q0, k0, window)) continue;  // this warp's rows see none of the tile
    float s[BK / 8][4], dp[BK / 8][4];
    product_over_hd<HD, BK / 8>(s, qf, ks);
    product_over_hd<HD, BK / 8>(dp, dof, vs);
    const bool all = sees_all<16, BK>(q0, k0, window);
#pragma unroll
    for (int n = 0; n < BK / 8; n++) {
#pragma unroll
      for (int x = 0; x < 4; x++) {
        const int r = x / 2;
        float p = exp2_ftz(fmaf(s[n][x], scale_log2, -row_lse[r]));
        if (!all && !sees(q0 + g + 8 * r, k0 + n * 8 + 2 * c + x % 2, window)) p = 0.0f;
        dp[n][x] = p * (dp[n][x] - row_dlt[r]);
      }
    }
    product_over_tile<HD, BK / 16>(acc, dp, ks);
  }

#pragma unroll
  for (int r = 0; r < 2; r++) {
    bf16 *row = grads + head + (size_t)(q0 + g + 8 * r) * HD + 2 * c;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      *reinterpret_cast<uint32_t *>(row + j * 8) =
          pair(acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale);
    }
  }
}

#define HEAD_SIZES(X) X(64) X(128)
// Three forward blocks an SM: registers capped at 170 (168 used at head size 128, no spills),
// shared memory 3 × 68 KiB.
#define FORWARD_BLOCKS 3
// The backward kernels write into grads [3, B, H, T, HD]: dq, dk, dv.
#define BACKWARD(SIDE, HD)                                                                        \
  extern "C" __global__ void __launch_bounds__(THREADS) flash_backward_##SIDE##_##HD(             \
      const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o, const float *lse,             \
      const float *dlt, bf16 *grads, int H, int T, int window, float scale, float scale_log2) {   \
    backward_##SIDE<HD>(q, k, v, d_o, lse, dlt, grads, H, T, window, scale, scale_log2);          \
  }
#define KERNELS(HD)                                                                               \
  extern "C" __global__ void __launch_bounds__(THREADS, FORWARD_BLOCKS)                           \
      flash_forward_##HD(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int H, \
                         int T, int window, float scale_log2) {                                   \
    forward<HD>(q, k, v, o, lse, H, T, window, scale_log2);                                       \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(THREADS)                                           \
      flash_delta_##HD(const bf16 *o, const bf16 *d_o, float *out, int B, int H, int T) {         \
    delta<HD>(o, d_o, out, B, H, T);                                                              \
  }                                                                                               \
  BACKWARD(kv, HD)                                                                                \
  BACKWARD(q, HD)
HEAD_SIZES(KERNELS)
