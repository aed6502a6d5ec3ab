// kernels/gate_heads.cu run on the CPU (cuda_emulator.h), in f32 and bf16: x [B, T, H·hd] times
// its gates [B, T, H], head-major, and the gradient, against double precision from the same
// values. Head sizes below, at and past a warp's 32 lanes (and not a multiple of them); rows
// that do not fill the last block. Built and run by tests/emulated.rs; exits 1 on a mismatch.
#include "cuda_emulator.h"

#include "../../kernels/gate_heads.cu"

template <typename T>
bool check(int B, int seq, int H, int hd, unsigned seed, double tolerance, const char *dtype) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  const size_t rows = (size_t)B * seq * H, n = rows * hd;
  std::vector<T> x(n), gate(rows), gy(n);
  for (auto &e : x) e = narrow_to<T>(u(rng));
  for (auto &e : gate) e = narrow_to<T>(u(rng));
  for (auto &e : gy) e = narrow_to<T>(u(rng));
  std::vector<T> y(n, narrow_to<T>(NAN)), dx(n, narrow_to<T>(NAN)), dgate(rows, narrow_to<T>(NAN));
  const dim3 grid{unsigned((rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK), 1, 1};
  launch(grid, THREADS, 0, [&] { forward(x.data(), gate.data(), y.data(), rows, seq, H, hd); });
  launch(grid, THREADS, 0, [&] {
    backward(x.data(), gate.data(), gy.data(), dx.data(), dgate.data(), rows, seq, H, hd);
  });

  std::vector<double> want_y(n), want_dx(n), want_dgate(rows, 0.0), got_y(n), got_dx(n),
      got_dgate(rows);
  for (int b = 0; b < B; b++) {
    for (int t = 0; t < seq; t++) {
      for (int h = 0; h < H; h++) {
        const size_t r = ((size_t)b * seq + t) * H + h, out = (((size_t)b * H + h) * seq + t) * hd;
        for (int d = 0; d < hd; d++) {
          want_y[out + d] = widen(gate[r]) * widen(x[r * hd + d]);
          want_dx[r * hd + d] = widen(gate[r]) * widen(gy[out + d]);
          want_dgate[r] += widen(gy[out + d]) * widen(x[r * hd + d]);
        }
      }
    }
  }
  for (size_t i = 0; i < n; i++) {
    got_y[i] = widen(y[i]);
    got_dx[i] = widen(dx[i]);
  }
  for (size_t r = 0; r < rows; r++) got_dgate[r] = widen(dgate[r]);
  const double err[] = {relative_error(got_y, want_y), relative_error(got_dx, want_dx),
                        relative_error(got_dgate, want_dgate)};
  bool pass = true;
  for (double e : err) pass &= e <= tolerance;  // NaN (an unwritten element) fails
  std::printf("%s, B %d, T %d, H %d, hd %d: y %.1e dx %.1e dgate %.1e%s\n", dtype, B, seq, H, hd,
              err[0], err[1], err[2], pass ? "" : " (FAILED)");
  return pass;
}

int main() {
  bool ok = true;
  ok &= check<float>(2, 5, 3, 40, 1, 1e-6, "f32");    // 30 rows: 4 blocks, the last partial
  ok &= check<float>(1, 9, 4, 128, 2, 1e-6, "f32");   // the h100 preset's head size
  ok &= check<bf16>(2, 7, 3, 128, 3, 1e-2, "bf16");   // the same in bf16
  ok &= check<float>(3, 4, 2, 16, 4, 1e-6, "f32");    // half a warp's lanes idle
  return ok ? 0 : 1;
}
