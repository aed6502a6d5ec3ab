// CUDA on the CPU for the kernels' tests: a thread per GPU thread; warps exchange registers
// through shared arrays at each shuffle, ballot and mma.sync (in the PTX ISA's fragment layouts);
// blocks run one after another, __syncthreads a barrier of the block. A kernel file is included
// after this header. Not covered: `__shared__` arrays declared inside a kernel (each thread
// would get its own); `extern __shared__` memory is one buffer, as blocks run one at a time.
// Each block's shared memory starts as NaN bytes (the card does not clear it), and the bytes past
// what the launch gives are poisoned under AddressSanitizer, as the card would fault on them. A
// block that does not finish in EMULATOR_BLOCK_SECONDS stops the run (exit 3), named.
#pragma once
#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include "cuda_bf16.h"

typedef __nv_bfloat16 bf16;

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
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;
alignas(16) unsigned char shared[228 * 1024];  // one block at a time: one block's shared memory
size_t shared_given = 0;                          // what this launch gives of it

constexpr int kLanes = 32;
std::unique_ptr<std::barrier<>> block_barrier;
struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  uint32_t a[kLanes][4], b[kLanes][2];
  float value[kLanes];
  bool vote[kLanes];
  const bf16 *row[kLanes];
};
std::vector<Warp> warps;

void __syncthreads() { block_barrier->arrive_and_wait(); }

float __shfl_xor_sync(unsigned, float v, int mask) {
  Warp &w = warps[threadIdx.x / kLanes];
  const int lane = threadIdx.x % kLanes;
  w.value[lane] = v;
  w.barrier->arrive_and_wait();
  const float other = w.value[lane ^ mask];
  w.barrier->arrive_and_wait();
  return other;
}

unsigned __ballot_sync(unsigned, bool predicate) {
  Warp &w = warps[threadIdx.x / kLanes];
  w.vote[threadIdx.x % kLanes] = predicate;
  w.barrier->arrive_and_wait();
  unsigned word = 0;
  for (int lane = 0; lane < kLanes; lane++) word |= unsigned(w.vote[lane]) << lane;
  w.barrier->arrive_and_wait();
  return word;
}

int __popc(unsigned x) { return __builtin_popcount(x); }

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

// Where the card would fault: a shared-memory access of 16 bytes outside what the launch gives or
// not on a 16-byte boundary (ldmatrix rows, cp.async destinations), or a misaligned 16-byte source.
void check_access16(const void *p, bool in_shared, const char *what) {
  const auto *at = static_cast<const unsigned char *>(p);
  const bool inside = !in_shared || (at >= shared && at + 16 <= shared + shared_given);
  if (reinterpret_cast<uintptr_t>(at) % 16 != 0 || !inside) {
    std::fprintf(stderr, "%s: %p is %s\n", what, p, inside ? "not 16-byte aligned" : "outside shared memory");
    std::abort();
  }
}

// cp.async.cg of 16 bytes, done at once.
void emulated_copy16(void *dst, const void *src) {
  check_access16(dst, true, "cp.async destination");
  check_access16(src, false, "cp.async source");
  std::memcpy(dst, src, 16);
}

// ldmatrix .x4 (.trans): lane l gives the address of row l % 8 of matrix l / 8 (8 bf16); register
// m gets (row l / 4, columns 2(l % 4), + 1) of matrix m, or transposed (rows 2(l % 4), + 1,
// column l / 4); the lower column (row) in the low half.
void emulated_ldmatrix(uint32_t r[4], const bf16 *row, bool trans) {
  Warp &w = warps[threadIdx.x / kLanes];
  const int lane = threadIdx.x % kLanes;
  check_access16(row, true, "ldmatrix row");
  w.row[lane] = row;
  w.barrier->arrive_and_wait();
  auto bits = [](bf16 x) { return uint32_t(x.bits); };
  for (int m = 0; m < 4; m++) {
    const bf16 *const *rows = w.row + 8 * m;
    const int i = lane / 4, j = 2 * (lane % 4);
    r[m] = trans ? bits(rows[j][i]) | bits(rows[j + 1][i]) << 16
                 : bits(rows[i][j]) | bits(rows[i][j + 1]) << 16;
  }
  w.barrier->arrive_and_wait();  // every lane has read the rows
}

float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// The card's fast exp (ex2.approx: a few ulp); glibc declares an __expf it does not export.
#define __expf(x) std::exp(float(x))
#define __fdividef(x, y) (float(x) / float(y))

// The dynamic shared memory the launcher gives `kernel` (its name in the kernel file, without the
// dtype): tests/emulated.rs passes the launchers' figures (`fused::launch`) as SHARED_<kernel>.
size_t launch_shared(const std::string &kernel) {
  const char *given = std::getenv(("SHARED_" + kernel).c_str());
  if (given == nullptr) {
    std::fprintf(stderr, "SHARED_%s is not set: run this through tests/emulated.rs\n", kernel.c_str());
    std::exit(2);
  }
  return std::strtoull(given, nullptr, 10);
}

// Seconds a block may take before it counts as hung (the drivers' blocks take well under one
// here, under AddressSanitizer on two busy cores). tests/emulated.rs sets a short one to test it.
#ifndef EMULATOR_BLOCK_SECONDS
#define EMULATOR_BLOCK_SECONDS 60
#endif
constexpr int kBlockSeconds = EMULATOR_BLOCK_SECONDS;

// A grid of blocks of `threads` threads (a multiple of 32), one block at a time, each given
// `shared_bytes` of dynamic shared memory.
void launch(dim3 grid, unsigned threads, size_t shared_bytes, const std::function<void()> &kernel) {
  if (shared_bytes > sizeof(shared)) {
    std::fprintf(stderr, "a launch asks for %zu bytes of shared memory, past the card's\n", shared_bytes);
    std::exit(2);
  }
  shared_given = shared_bytes;
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(shared, sizeof(shared));
  ASAN_POISON_MEMORY_REGION(shared + shared_bytes, sizeof(shared) - shared_bytes);
#endif
  gridDim = grid;
  blockDim = {threads, 1, 1};
  block_barrier = std::make_unique<std::barrier<>>(threads);
  warps = std::vector<Warp>(threads / kLanes);
  for (auto &w : warps) w.barrier = std::make_unique<std::barrier<>>(kLanes);
  for (unsigned z = 0; z < std::max(grid.z, 1u); z++) {
    for (unsigned y = 0; y < grid.y; y++) {
      for (unsigned x = 0; x < grid.x; x++) {
        blockIdx = {x, y, z};
        std::memset(shared, 0xff, shared_bytes);  // NaN in bf16 and f32, -1 in ints
        // A block that does not finish is a barrier, shuffle, ballot or mma.sync that some
        // thread of the block (or lane of the warp) never reaches: undefined on the card, a
        // hang here. Said and stopped rather than left to the test's own time limit.
        std::mutex m;
        std::condition_variable all_done;
        unsigned finished = 0;
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; t++) {
          pool.emplace_back([t, &kernel, &m, &all_done, &finished, threads] {
            threadIdx = {t, 0, 0};
            kernel();
            std::lock_guard<std::mutex> lock(m);
            if (++finished == threads) all_done.notify_one();
          });
        }
        {
          std::unique_lock<std::mutex> lock(m);
          if (!all_done.wait_for(lock, std::chrono::seconds(kBlockSeconds),
                                 [&] { return finished == threads; })) {
            std::fprintf(stderr,
                         "block (%u, %u, %u): %u of %u threads finished in %d s: a __syncthreads, "
                         "shuffle, ballot or mma.sync that not every thread (lane) of the block "
                         "(warp) reaches\n",
                         x, y, z, finished, threads, kBlockSeconds);
            std::_Exit(3);
          }
        }
        for (auto &t : pool) t.join();
      }
    }
  }
}

// The drivers' f32 and bf16 values, to and from f32.
inline float widen(float x) { return x; }
inline float widen(bf16 x) { return __bfloat162float(x); }
template <typename T> T narrow_to(float x);
template <> inline float narrow_to<float>(float x) { return x; }
template <> inline bf16 narrow_to<bf16>(float x) { return __float2bfloat16_rn(x); }

// max |got - want| / max |want|, where a value that is 0 in exact arithmetic (a window of 0)
// is measured against 1e-3 (its rounding is ~1e-7). NaN where a value is NaN (unwritten).
inline double relative_error(const std::vector<double> &got, const std::vector<double> &want) {
  double diff = 0, size = 0;
  for (size_t i = 0; i < want.size(); i++) {
    if (std::isnan(got[i])) return NAN;
    diff = std::max(diff, std::fabs(got[i] - want[i]));
    size = std::max(size, std::fabs(want[i]));
  }
  return diff / std::max(size, 1e-3);
}
