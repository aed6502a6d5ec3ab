// kernels/heads.cu run on the CPU (cuda_emulator.h), in f32 and bf16, checked against a
// reference in double: qkv [B, T, 3·H·hd] → [3, B, H, T, hd] with q and k turned by the rotary
// angles and RMS-normed, v copied; the backward against finite differences of Σ g ⊙ output,
// row by row. Built and run by tests/emulated.rs; exits 1 on a mismatch.
#include "cuda_emulator.h"

#include "../../kernels/heads.cu"

// One output row from its input row `x` (hd values): turned and normed (q, k), or as it is (v).
std::vector<double> row_forward(const std::vector<double> &x, const double *cos,
                                const double *sin, bool turned, double eps) {
  if (!turned) return x;
  const size_t half = x.size() / 2;
  std::vector<double> r(x.size());
  for (size_t i = 0; i < half; i++) {
    r[i] = x[i] * cos[i] + x[i + half] * sin[i];
    r[i + half] = x[i + half] * cos[i] - x[i] * sin[i];
  }
  double sq = 0;
  for (double v : r) sq += v * v;
  const double inv = 1.0 / std::sqrt(sq / x.size() + eps);
  for (double &v : r) v *= inv;
  return r;
}

template <typename T>
bool check(int B, int T_, int H, int hd, unsigned seed, double tolerance, const char *dtype) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  const size_t n = (size_t)B * T_ * 3 * H * hd;
  const int half = hd / 2;
  const float eps = 1e-6f;
  std::vector<T> qkv(n), grad(n), rope(2 * (size_t)T_ * half);
  for (auto &x : qkv) x = narrow_to<T>(u(rng));
  for (auto &x : grad) x = narrow_to<T>(u(rng) / 2);
  for (int p = 0; p < T_; p++) {
    for (int i = 0; i < half; i++) {
      const double angle = p * 0.37 + i * 0.11;
      rope[(size_t)p * half + i] = narrow_to<T>(std::cos(angle));
      rope[((size_t)T_ + p) * half + i] = narrow_to<T>(std::sin(angle));
    }
  }
  std::vector<T> out(n, narrow_to<T>(NAN)), dqkv(n, narrow_to<T>(NAN));
  const size_t rows = (size_t)3 * B * H * T_;
  const dim3 grid{unsigned((rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK), 1, 1};
  launch(grid, THREADS, 0, [&] { forward(qkv.data(), rope.data(), out.data(), B, T_, H, hd, eps); });
  launch(grid, THREADS, 0,
         [&] { backward(qkv.data(), rope.data(), grad.data(), dqkv.data(), B, T_, H, hd, eps); });

  std::vector<double> want_out(n), want_d(n), got_out(n), got_d(n);
  for (size_t row = 0; row < rows; row++) {
    const int pos = row % T_, head = row / T_ % H, batch = row / ((size_t)T_ * H) % B,
              part = row / ((size_t)T_ * H * B);
    const size_t at = ((size_t)batch * T_ + pos) * 3 * H * hd + ((size_t)part * H + head) * hd;
    std::vector<double> x(hd), cos(half), sin(half), g(hd);
    for (int i = 0; i < hd; i++) {
      x[i] = widen(qkv[at + i]);
      g[i] = widen(grad[row * hd + i]);
    }
    for (int i = 0; i < half; i++) {
      cos[i] = widen(rope[(size_t)pos * half + i]);
      sin[i] = widen(rope[((size_t)T_ + pos) * half + i]);
    }
    const bool turned = part < 2;
    const std::vector<double> y = row_forward(x, cos.data(), sin.data(), turned, eps);
    for (int i = 0; i < hd; i++) {
      want_out[row * hd + i] = y[i];
      got_out[row * hd + i] = widen(out[row * hd + i]);
      got_d[at + i] = widen(dqkv[at + i]);
    }
    // d(Σ g ⊙ y)/dx by central differences, in double.
    for (int i = 0; i < hd; i++) {
      const double step = 1e-6;
      std::vector<double> up = x, down = x;
      up[i] += step;
      down[i] -= step;
      const std::vector<double> yu = row_forward(up, cos.data(), sin.data(), turned, eps),
                                yd = row_forward(down, cos.data(), sin.data(), turned, eps);
      double d = 0;
      for (int j = 0; j < hd; j++) d += g[j] * (yu[j] - yd[j]);
      want_d[at + i] = d / (2 * step);
    }
  }
  const double out_err = relative_error(got_out, want_out), d_err = relative_error(got_d, want_d);
  const bool ok = out_err <= tolerance && d_err <= tolerance;  // NaN (unwritten) fails
  std::printf("%s, B %d, T %d, H %d, hd %d: output %.1e, gradient %.1e%s\n", dtype, B, T_, H, hd,
              out_err, d_err, ok ? "" : " (FAILED)");
  return ok;
}

int main() {
  bool ok = true;
  ok &= check<float>(2, 37, 3, 72, 1, 1e-5, "f32");   // rows that do not fill a block or a warp
  ok &= check<float>(1, 16, 4, 128, 2, 1e-5, "f32");  // the h100 preset's head size
  ok &= check<bf16>(2, 37, 3, 72, 3, 1e-2, "bf16");
  ok &= check<bf16>(1, 16, 4, 128, 4, 1e-2, "bf16");
  return ok ? 0 : 1;
}
