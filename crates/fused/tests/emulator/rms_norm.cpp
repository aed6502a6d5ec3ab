// kernels/rms_norm.cu run on the CPU (cuda_emulator.h), in f32 and bf16: RMSNorm of each row and
// its gradient, against double precision from the same values. Rows of 512 (16-byte aligned: the
// vector path), of 300 (a lane's run cut by the row's end; in bf16, 600-byte rows: every other
// row off the boundary, one element at a time) and of 40 (most lanes idle); rows that do not
// fill a block. Built and run by tests/emulated.rs; exits 1 on a mismatch.
#include "cuda_emulator.h"

#include "../../kernels/rms_norm.cu"

template <typename T>
bool check(int rows, int n, unsigned seed, double tolerance, const char *dtype) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  const float eps = 1e-6f;
  const size_t len = (size_t)rows * n;
  std::vector<T> x(len), g(len), y(len, narrow_to<T>(NAN)), dx(len, narrow_to<T>(NAN));
  for (auto &e : x) e = narrow_to<T>(u(rng));
  for (auto &e : g) e = narrow_to<T>(u(rng));
  const dim3 grid{unsigned((rows + THREADS / 32 - 1) / (THREADS / 32)), 1, 1};
  launch(grid, THREADS, 0, [&] { forward(x.data(), y.data(), rows, n, eps); });
  launch(grid, THREADS, 0, [&] { backward(x.data(), g.data(), dx.data(), rows, n, eps); });

  std::vector<double> want_y(len), want_dx(len), got_y(len), got_dx(len);
  for (int r = 0; r < rows; r++) {
    const size_t at = (size_t)r * n;
    double sq = 0, gy = 0;
    for (int j = 0; j < n; j++) sq += double(widen(x[at + j])) * widen(x[at + j]);
    const double inv = 1.0 / std::sqrt(sq / n + eps);
    for (int j = 0; j < n; j++) gy += widen(g[at + j]) * widen(x[at + j]) * inv;
    for (int j = 0; j < n; j++) {
      want_y[at + j] = widen(x[at + j]) * inv;
      want_dx[at + j] = inv * (widen(g[at + j]) - widen(x[at + j]) * inv * gy / n);
    }
  }
  for (size_t i = 0; i < len; i++) {
    got_y[i] = widen(y[i]);
    got_dx[i] = widen(dx[i]);
  }
  const double err_y = relative_error(got_y, want_y), err_dx = relative_error(got_dx, want_dx);
  const bool pass = err_y <= tolerance && err_dx <= tolerance;  // NaN (unwritten) fails
  std::printf("%s, %d rows of %d: y %.1e dx %.1e%s\n", dtype, rows, n, err_y, err_dx,
              pass ? "" : " (FAILED)");
  return pass;
}

int main() {
  bool ok = true;
  ok &= check<float>(11, 512, 1, 1e-5, "f32");  // 2 blocks, the last partial
  ok &= check<bf16>(11, 512, 2, 1e-2, "bf16");
  ok &= check<float>(9, 300, 3, 1e-5, "f32");   // runs cut by the row's end
  ok &= check<bf16>(9, 300, 5, 1e-2, "bf16");   // and every other row off the boundary
  ok &= check<bf16>(5, 40, 4, 1e-2, "bf16");    // five lanes' runs a row
  return ok ? 0 : 1;
}
