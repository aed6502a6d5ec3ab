// kernels/mix.cu run on the CPU (cuda_emulator.h), in f32 and bf16: y = a·x + b·z and its
// gradient, against double precision from the same values. The backward's grid is cut to a few
// blocks so that each thread strides over several elements, as on the card once n passes the
// host's 1,024 blocks × THREADS; the blocks' sums are then added up, as the host does. Built and run by
// tests/emulated.rs; exits 1 on a mismatch.
#include "cuda_emulator.h"

#include "../../kernels/mix.cu"

template <typename T>
bool check(size_t n, unsigned blocks, size_t offset, unsigned seed, double tolerance,
           const char *dtype) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  // Each tensor starts `offset` elements into its buffer: 1 puts it off the 16-byte boundary,
  // where the kernels read and write one element at a time.
  std::vector<T> xb(n + offset), zb(n + offset), gb(n + offset);
  for (auto *v : {&xb, &zb, &gb}) {
    for (auto &e : *v) e = narrow_to<T>(u(rng));
  }
  const std::vector<float> ab = {0.93f, 0.1f};
  std::vector<T> yb(n + offset, narrow_to<T>(NAN)), dxb(n + offset, narrow_to<T>(NAN)),
      dzb(n + offset, narrow_to<T>(NAN));
  const T *x = xb.data() + offset, *z = zb.data() + offset, *g = gb.data() + offset;
  T *y = yb.data() + offset, *dx = dxb.data() + offset, *dz = dzb.data() + offset;
  std::vector<float> partial(2 * blocks, NAN);
  launch({unsigned((n + 8 * THREADS - 1) / (8 * THREADS)), 1, 1}, THREADS, 0,
         [&] { forward(x, z, ab.data(), y, n); });
  launch({blocks, 1, 1}, THREADS, launch_shared("mix_backward"),
         [&] { backward(x, z, g, ab.data(), dx, dz, partial.data(), n); });

  // The scalars at the tensors' precision, as the kernel and the plain path take them.
  const double a = widen(narrow_to<T>(ab[0])), b = widen(narrow_to<T>(ab[1]));
  std::vector<double> want_y(n), want_dx(n), want_dz(n), got_y(n), got_dx(n), got_dz(n);
  double want_da = 0, want_db = 0, got_da = 0, got_db = 0;
  for (size_t i = 0; i < n; i++) {
    const double xi = widen(x[i]), zi = widen(z[i]), gi = widen(g[i]);
    want_y[i] = a * xi + b * zi;
    want_dx[i] = a * gi;
    want_dz[i] = b * gi;
    want_da += gi * xi;
    want_db += gi * zi;
    got_y[i] = widen(y[i]);
    got_dx[i] = widen(dx[i]);
    got_dz[i] = widen(dz[i]);
  }
  for (unsigned k = 0; k < blocks; k++) {
    got_da += partial[2 * k];
    got_db += partial[2 * k + 1];
  }
  const double sums = relative_error({got_da, got_db}, {want_da, want_db});
  const double err[] = {relative_error(got_y, want_y), relative_error(got_dx, want_dx),
                        relative_error(got_dz, want_dz), sums};
  bool pass = true;
  for (double e : err) pass &= e <= tolerance;  // NaN (an unwritten element) fails
  std::printf("%s, %zu elements from %zu, backward in %u blocks: y %.1e dx %.1e dz %.1e sums %.1e%s\n",
              dtype, n, offset, blocks, err[0], err[1], err[2], err[3], pass ? "" : " (FAILED)");
  return pass;
}

int main() {
  bool ok = true;
  ok &= check<float>(1000, 1, 0, 1, 1e-5, "f32");  // one block, its last threads idle
  // Each thread strides 2-3 times over eight elements; n is not a multiple of 8.
  ok &= check<float>(3 * 2048 * 2 + 17, 3, 0, 2, 1e-5, "f32");
  ok &= check<bf16>(3 * 2048 * 2 + 17, 3, 0, 3, 1e-2, "bf16");
  ok &= check<bf16>(3 * 2048 + 5, 2, 1, 4, 1e-2, "bf16");  // off the 16-byte boundary
  ok &= check<float>(3 * 2048 + 5, 2, 1, 5, 1e-5, "f32");
  return ok ? 0 : 1;
}
