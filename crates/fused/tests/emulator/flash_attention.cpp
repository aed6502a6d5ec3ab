// kernels/flash_attention.cu run on the CPU (cuda_emulator.h), checked against attention
// computed in double precision from the same bf16 inputs: the index arithmetic, tiling,
// masking, online softmax and backward formulas, without a GPU. What it cannot check is the
// hardware's side: that mma.sync's fragments are what the ISA says, timing, and the PTX build
// (CI compiles that). Built and run by tests/emulated.rs; exits 1 on a mismatch.
#include "cuda_emulator.h"

#define FLASH_EMULATED
#include "../../kernels/flash_attention.cu"

using Bf = std::vector<bf16>;

Bf random_bf16(size_t n, std::mt19937 &rng, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  Bf out(n);
  for (auto &x : out) x = __float2bfloat16_rn(u(rng));
  return out;
}

double f(bf16 x) { return __bfloat162float(x); }

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
  const std::string hd = std::to_string(HD);
  launch({unsigned(T / 64), unsigned(B * H), 1}, THREADS, launch_shared("flash_forward_" + hd), [&] {
    forward<HD>(q.data(), k.data(), v.data(), o.data(), lse.data(), H, T, w, scale_log2);
  });
  launch({unsigned((B * T * H + DELTA_ROWS - 1) / DELTA_ROWS), 1, 1}, THREADS, 0,
         [&] { delta<HD>(o.data(), d_o.data(), dlt.data(), B, H, T); });
  launch({unsigned(T / 64), unsigned(B * H), 1}, THREADS, launch_shared("flash_backward_kv_" + hd), [&] {
    backward_kv<HD>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), dlt.data(),
                    grads.data(), H, T, w, scale, scale_log2);
  });
  launch({unsigned(T / 64), unsigned(B * H), 1}, THREADS, launch_shared("flash_backward_q_" + hd), [&] {
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
  // Tiles each warp sees whole (no mask), in part, and not at all. Rows and tiles start at
  // multiples of 16, so the farthest pair of a warp and a tile is 15 more than a multiple of 16
  // apart (302 + 1: one past the window), and the nearest 1 more (33: just inside, one key in
  // 34 of a row, which a tile skipped wrongly would lose).
  ok &= check<64>(1, 1, 512, 302, 6);
  ok &= check<64>(1, 1, 256, 33, 7);
  return ok ? 0 : 1;
}
