// kernels/flash_attention.cu run on the CPU, a thread per GPU thread: warps exchange registers
// through shared arrays at each mma.sync and shuffle (in the PTX ISA's fragment layouts), blocks
// run one after another with __syncthreads as a barrier. Checks the four kernels against
// attention computed in double precision from the same bf16 inputs: the index arithmetic,
// tiling, masking, online softmax and backward formulas, without a GPU. What it cannot check is
// the hardware's side: that mma.sync's fragments are what the ISA says, timing, and the PTX build
// (CI compiles that). Built and run by tests/flash_emulated.rs; exits 1 on a mismatch.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "cuda_bf16.h"

using std::max;
using std::min;

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};

#define __device__ inline
#define __forceinline__
#define __global__
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

thread_local dim3 threadIdx;
dim3 blockIdx, gridDim;
alignas(16) unsigned char shared[228 * 1024];  // one block at a time: one block's shared memory

constexpr int kWarps = 4, kLanes = 32;
std::unique_ptr<std::barrier<>> block_barrier;
struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  uint32_t a[kLanes][4], b[kLanes][2];
  float value[kLanes];
};
Warp warps[kWarps];

void __syncthreads() { block_barrier->arrive_and_wait(); }
[[noreturn]] void __trap() { std::abort(); }

float __shfl_xor_sync(unsigned, float v, int mask) {
  Warp &w = warps[threadIdx.x / kLanes];
  const int lane = threadIdx.x % kLanes;
  w.value[lane] = v;
  w.barrier->arrive_and_wait();
  const float other = w.value[lane ^ mask];
  w.barrier->arrive_and_wait();
  return other;
}

float half_of(uint32_t reg, int high) { return __bfloat162float({uint16_t(reg >> (16 * high))}); }

// D = A · B + C for m16n8k16 with the lanes' fragments laid out as the PTX ISA gives them.
void emulated_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  Warp &w = warps[threadIdx.x / kLanes];
  const int lane = threadIdx.x % kLanes;
  for (int i = 0; i < 4; i++) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.barrier->arrive_and_wait();
  auto A = [&](int row, int k) {
    return half_of(w.a[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2);
  };
  auto B = [&](int k, int n) { return half_of(w.b[4 * n + (k % 8) / 2][k >= 8], k % 2); };
  const int g = lane / 4, col = 2 * (lane % 4);
  float d[4];
  for (int x = 0; x < 4; x++) {
    const int row = g + 8 * (x / 2), n = col + x % 2;
    float sum = c[x];
    for (int k = 0; k < 16; k++) sum += A(row, k) * B(k, n);
    d[x] = sum;
  }
  w.barrier->arrive_and_wait();  // every lane has read the fragments
  for (int x = 0; x < 4; x++) c[x] = d[x];
}

#define FLASH_EMULATED
#include "../../kernels/flash_attention.cu"

// A grid of blocks of THREADS threads, one block at a time.
void launch(dim3 grid, const std::function<void()> &kernel) {
  gridDim = grid;
  block_barrier = std::make_unique<std::barrier<>>(THREADS);
  for (auto &w : warps) w.barrier = std::make_unique<std::barrier<>>(kLanes);
  for (unsigned y = 0; y < grid.y; y++) {
    for (unsigned x = 0; x < grid.x; x++) {
      blockIdx = {x, y, 0};
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < THREADS; t++) {
        threads.emplace_back([t, &kernel] {
          threadIdx = {t, 0, 0};
          kernel();
        });
      }
      for (auto &t : threads) t.join();
    }
  }
}

using Bf = std::vector<bf16>;

Bf random_bf16(size_t n, std::mt19937 &rng, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  Bf out(n);
  for (auto &x : out) x = __float2bfloat16_rn(u(rng));
  return out;
}

double f(bf16 x) { return __bfloat162float(x); }

// max |got - want| / max |want|, where a gradient that is 0 in exact arithmetic (a window of 0)
// is measured against 1e-3 (its rounding is ~1e-7).
double relative_error(const std::vector<double> &got, const std::vector<double> &want) {
  double diff = 0, size = 0;
  for (size_t i = 0; i < want.size(); i++) {
    diff = std::max(diff, std::fabs(got[i] - want[i]));
    size = std::max(size, std::fabs(want[i]));
  }
  return diff / std::max(size, 1e-3);
}

std::vector<double> widen(const Bf &x) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); i++) out[i] = f(x[i]);
  return out;
}

template <int HD>
bool check(int B, int H, int T, int window, unsigned seed) {
  std::mt19937 rng(seed);
  const size_t n = (size_t)B * H * T * HD;
  const Bf q = random_bf16(n, rng, 2.0f), k = random_bf16(n, rng, 2.0f), v = random_bf16(n, rng, 1.0f);
  const Bf d_o = random_bf16(n, rng, 1.0f);  // [B, T, H, HD]
  const float scale = 1.0f / std::sqrt((float)HD), scale_log2 = scale * 1.4426950408889634f;
  const int w = std::min(window, T);

  Bf o(n), grads(3 * n);
  std::vector<float> lse((size_t)B * H * T, NAN), dlt((size_t)B * H * T, NAN);
  for (auto &x : o) x = __float2bfloat16_rn(NAN);  // poisoned: every element must be written
  for (auto &x : grads) x = __float2bfloat16_rn(NAN);
  launch({unsigned(T / 64), unsigned(B * H), 1}, [&] {
    forward<HD>(q.data(), k.data(), v.data(), o.data(), lse.data(), H, T, w, scale_log2);
  });
  launch({unsigned((B * T * H + kWarps - 1) / kWarps), 1, 1},
         [&] { delta<HD>(o.data(), d_o.data(), dlt.data(), B, H, T); });
  launch({unsigned(T / 64), unsigned(B * H), 1}, [&] {
    backward_kv<HD>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), dlt.data(),
                    grads.data(), H, T, w, scale, scale_log2);
  });
  launch({unsigned(T / 64), unsigned(B * H), 1}, [&] {
    backward_q<HD>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), dlt.data(),
                   grads.data(), H, T, w, scale, scale_log2);
  });

  // The reference, in double from the same bf16 values.
  std::vector<double> want_o(n), want_lse((size_t)B * H * T), want_grads(3 * n, 0.0);
  for (int b = 0; b < B; b++) {
    for (int h = 0; h < H; h++) {
      const size_t head = ((size_t)b * H + h) * T * HD;
      auto Q = [&](int t, int d) { return f(q[head + (size_t)t * HD + d]); };
      auto K = [&](int t, int d) { return f(k[head + (size_t)t * HD + d]); };
      auto V = [&](int t, int d) { return f(v[head + (size_t)t * HD + d]); };
      auto at_o = [&](int t) { return (((size_t)b * T + t) * H + h) * HD; };
      for (int i = 0; i < T; i++) {
        const int lo = std::max(0, i - w);
        std::vector<double> p(i - lo + 1), dp(i - lo + 1);
        double top = -INFINITY;
        for (int j = lo; j <= i; j++) {
          double s = 0;
          for (int d = 0; d < HD; d++) s += Q(i, d) * K(j, d);
          p[j - lo] = s * scale;
          top = std::max(top, p[j - lo]);
        }
        double sum = 0;
        for (auto &x : p) sum += (x = std::exp(x - top));
        for (auto &x : p) x /= sum;
        want_lse[((size_t)b * H + h) * T + i] = (top + std::log(sum)) / std::log(2.0);
        for (int d = 0; d < HD; d++) {
          double acc = 0;
          for (int j = lo; j <= i; j++) acc += p[j - lo] * V(j, d);
          want_o[at_o(i) + d] = acc;
        }
        double dot = 0;
        for (int j = lo; j <= i; j++) {
          double x = 0;
          for (int d = 0; d < HD; d++) x += f(d_o[at_o(i) + d]) * V(j, d);
          dp[j - lo] = x;
          dot += p[j - lo] * x;
        }
        for (int j = lo; j <= i; j++) {
          const double pj = p[j - lo], ds = pj * (dp[j - lo] - dot) * scale;
          for (int d = 0; d < HD; d++) {
            want_grads[head + (size_t)i * HD + d] += ds * K(j, d);
            want_grads[n + head + (size_t)j * HD + d] += ds * Q(i, d);
            want_grads[2 * n + head + (size_t)j * HD + d] += pj * f(d_o[at_o(i) + d]);
          }
        }
      }
    }
  }

  std::vector<double> got_lse(lse.begin(), lse.end());
  const std::vector<double> got_grads = widen(grads);
  auto part = [&](const std::vector<double> &x, int i) {
    return std::vector<double>(x.begin() + i * n, x.begin() + (i + 1) * n);
  };
  struct Row {
    const char *what;
    double err, tolerance;
  } rows[] = {
      {"o", relative_error(widen(o), want_o), 1e-2},
      {"lse", relative_error(got_lse, want_lse), 1e-4},
      {"dq", relative_error(part(got_grads, 0), part(want_grads, 0)), 2e-2},
      {"dk", relative_error(part(got_grads, 1), part(want_grads, 1)), 2e-2},
      {"dv", relative_error(part(got_grads, 2), part(want_grads, 2)), 2e-2},
  };
  bool ok = true;
  std::printf("HD %d, B %d, H %d, T %d, window %d:", HD, B, H, T, window);
  for (auto &r : rows) {
    const bool pass = r.err <= r.tolerance;  // NaN (an unwritten element) fails
    ok &= pass;
    std::printf(" %s %.1e%s", r.what, r.err, pass ? "" : " (FAILED)");
  }
  std::printf("\n");
  return ok;
}

int main() {
  bool ok = true;
  ok &= check<64>(1, 2, 128, 128, 1);  // plain causal
  ok &= check<64>(2, 1, 192, 37, 2);   // a window inside a tile, three tiles, two batches
  ok &= check<64>(1, 1, 128, 0, 3);    // each query sees itself only
  ok &= check<64>(1, 1, 256, 100, 4);  // a window across tiles: early tiles skipped
  ok &= check<128>(1, 2, 128, 70, 5);  // the h100 preset's head size
  return ok ? 0 : 1;
}
