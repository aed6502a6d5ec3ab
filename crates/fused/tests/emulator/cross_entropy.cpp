// kernels/cross_entropy.cu run on the CPU (cuda_emulator.h), in f32 and bf16: the soft-capped
// cross-entropy of each row and its gradient, against double precision from the same logits.
// Vocabularies that fill whole runs of eight (8,192, 16-byte aligned rows: the vector path), that
// do not (1,003: rows off the boundary, one element at a time) and past one group of runs; a
// target outside the vocabulary, or a run of NaN logits, must give a NaN loss. Built and run by tests/emulated.rs; exits 1
// on a mismatch.
#include "cuda_emulator.h"

#include "../../kernels/cross_entropy.cu"

template <typename T>
bool check(int rows, int vocab, unsigned seed, double tolerance, const char *dtype) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-30.0f, 30.0f);
  const float cap = 15.0f;
  const size_t n = (size_t)rows * vocab;
  std::vector<T> x(n);
  for (auto &e : x) e = narrow_to<T>(u(rng));
  std::vector<uint32_t> targets(rows);
  for (auto &t : targets) t = rng() % vocab;
  targets[rows - 1] = vocab + 3;  // outside: NaN
  // A run of eight NaN logits in the next-to-last row (not its target): its loss must be NaN.
  for (int v = 16; v < 24; v++) x[(size_t)(rows - 2) * vocab + v] = narrow_to<T>(NAN);
  if (targets[rows - 2] >= 16 && targets[rows - 2] < 24) targets[rows - 2] = 0;
  std::vector<float> loss(rows, -1.0f), loss_grad(2 * rows);
  std::vector<T> dx(n, narrow_to<T>(NAN));
  launch({unsigned(rows), 1, 1}, THREADS, launch_shared("softcap_ce_forward"),
         [&] { forward(x.data(), targets.data(), loss.data(), vocab, cap); });
  for (int r = 0; r < rows; r++) {
    loss_grad[2 * r] = loss[r];
    loss_grad[2 * r + 1] = 0.5f + 0.01f * r;  // the gradient arriving at each row's loss
  }
  launch({unsigned(rows), 1, 1}, THREADS, 0, [&] {
    backward(x.data(), targets.data(), loss_grad.data(), dx.data(), vocab, cap);
  });

  std::vector<double> want_loss, got_loss, want_dx, got_dx;
  for (int r = 0; r + 2 < rows; r++) {  // the last two rows' NaN losses are checked apart
    std::vector<double> z(vocab);
    double top = -INFINITY, sum = 0;
    for (int v = 0; v < vocab; v++) {
      z[v] = cap * std::tanh(double(widen(x[(size_t)r * vocab + v])) / cap);
      top = std::max(top, z[v]);
    }
    for (int v = 0; v < vocab; v++) sum += std::exp(z[v] - top);
    const double lse = top + std::log(sum);
    want_loss.push_back(lse - z[targets[r]]);
    got_loss.push_back(loss[r]);
    const double g = loss_grad[2 * r + 1];
    for (int v = 0; v < vocab; v++) {
      const double th = z[v] / cap, p = std::exp(z[v] - lse);
      want_dx.push_back(g * (p - (v == (int)targets[r] ? 1.0 : 0.0)) * (1.0 - th * th));
      got_dx.push_back(widen(dx[(size_t)r * vocab + v]));
    }
  }
  const double err_loss = relative_error(got_loss, want_loss), err_dx = relative_error(got_dx, want_dx);
  const bool nan_loss = std::isnan(loss[rows - 1]) && std::isnan(loss[rows - 2]);
  // The loss comes out in f32 from the same values whatever the logits' type; dx takes theirs.
  const bool pass = err_loss <= 1e-5 && err_dx <= tolerance && nan_loss;
  std::printf("%s, %d rows of %d: loss %.1e dx %.1e, NaN logits or a target past the vocabulary: %s%s\n",
              dtype, rows, vocab, err_loss, err_dx, nan_loss ? "NaN" : "not NaN", pass ? "" : " (FAILED)");
  return pass;
}

int main() {
  bool ok = true;
  ok &= check<float>(3, 8192, 1, 1e-5, "f32");     // whole runs of eight, one group a thread
  ok &= check<bf16>(3, 8192, 2, 1e-2, "bf16");
  ok &= check<float>(4, 1003, 3, 1e-5, "f32");     // rows off the 16-byte boundary
  ok &= check<bf16>(3, 20000, 4, 1e-2, "bf16");    // past one group of runs a thread
  return ok ? 0 : 1;
}
