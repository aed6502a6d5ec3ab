// kernels/relu_squared.cu run on the CPU (cuda_emulator.h), in f32 and bf16: max(x, 0)² and its
// gradient against double precision, with the host's grid (eight elements a thread). Lengths
// that are not a multiple of eight, and tensors one element off the 16-byte boundary (one
// element at a time). Built and run by tests/emulated.rs; exits 1 on a mismatch.
#include "cuda_emulator.h"

#include "../../kernels/relu_squared.cu"

template <typename T>
bool check(size_t n, size_t offset, unsigned seed, double tolerance, const char *dtype) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  // Eight spare elements after each tensor: nothing may be written there, nor before it.
  const size_t len = offset + n + 8;
  std::vector<T> xb(len), gb(len);
  for (auto &e : xb) e = narrow_to<T>(u(rng));
  for (auto &e : gb) e = narrow_to<T>(u(rng));
  std::vector<T> yb(len, narrow_to<T>(NAN)), dxb(len, narrow_to<T>(NAN));
  const T *x = xb.data() + offset, *g = gb.data() + offset;
  T *y = yb.data() + offset, *dx = dxb.data() + offset;
  const dim3 grid{unsigned((n + 8 * THREADS - 1) / (8 * THREADS)), 1, 1};
  launch(grid, THREADS, 0, [&] { forward(x, y, n); });
  launch(grid, THREADS, 0, [&] { backward(x, g, dx, n); });
  std::vector<double> want_y(n), want_dx(n), got_y(n), got_dx(n);
  for (size_t i = 0; i < n; i++) {
    const double r = std::max(0.0, double(widen(x[i])));
    want_y[i] = r * r;
    want_dx[i] = 2 * r * widen(g[i]);
    got_y[i] = widen(y[i]);
    got_dx[i] = widen(dx[i]);
  }
  bool kept = true;
  for (size_t i = 0; i < len; i++) {
    if (i < offset || i >= offset + n) kept &= std::isnan(widen(yb[i])) && std::isnan(widen(dxb[i]));
  }
  const double err_y = relative_error(got_y, want_y), err_dx = relative_error(got_dx, want_dx);
  const bool pass = err_y <= tolerance && err_dx <= tolerance && kept;  // NaN (unwritten) fails
  std::printf("%s, %zu elements from %zu: y %.1e dx %.1e, outside untouched: %s%s\n", dtype, n,
              offset, err_y, err_dx, kept ? "yes" : "no", pass ? "" : " (FAILED)");
  return pass;
}

int main() {
  bool ok = true;
  ok &= check<float>(2048 * 3 + 5, 0, 1, 1e-6, "f32");  // a partial last block and run
  ok &= check<bf16>(2048 * 3 + 5, 0, 2, 1e-2, "bf16");
  ok &= check<bf16>(1001, 1, 3, 1e-2, "bf16");          // off the 16-byte boundary
  ok &= check<float>(1001, 1, 4, 1e-6, "f32");
  return ok ? 0 : 1;
}
