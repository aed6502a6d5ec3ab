// kernels/embedding.cu run on the CPU (cuda_emulator.h): the forward's gather, exactly, and the
// backward in f32 and bf16: the table's gradient from chunked sums, checked against the sum in
// double of each row's tokens.
// The ids are skewed (a third of the tokens share one id), the width takes a second, partial
// block of columns, and the table's rows do not fill the last block; ids past the table (which
// the forward reads as zero rows) get no gradient. Built and run by
// tests/emulated.rs; exits 1 on a mismatch.
#include "cuda_emulator.h"

#include "../../kernels/embedding.cu"

// TG: the gradient's type; TT: the table's (and its gradient's).
template <typename TG, typename TT = TG>
bool check(int vocab, int d, int n, int chunk, bool past_table, unsigned seed, double tolerance,
           const char *dtype) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> any_id(0, vocab - 1);
  std::vector<uint32_t> ids(n);
  for (auto &id : ids) id = rng() % 3 == 0 ? 17 % vocab : any_id(rng);
  if (past_table) {
    for (int j = 0; j < n; j += 7) ids[j] = vocab + j % 20;
  }
  std::vector<TG> g((size_t)n * d);
  for (auto &x : g) x = narrow_to<TG>(u(rng));

  const int chunks = (n + chunk - 1) / chunk;
  std::vector<float> partial((size_t)chunks * vocab * d, NAN);
  std::vector<TT> dtable((size_t)vocab * d, narrow_to<TT>(NAN));
  const dim3 grid{unsigned((vocab + ROWS - 1) / ROWS), unsigned((d + COLS - 1) / COLS),
                  unsigned(chunks)};
  launch(grid, THREADS, launch_shared("embedding_grad_chunk"),
         [&] { grad_chunk(ids.data(), g.data(), partial.data(), n, d, vocab, chunk); });
  const size_t len = (size_t)vocab * d;
  launch({unsigned((len + THREADS - 1) / THREADS), 1, 1}, THREADS, 0,
         [&] { grad_sum(partial.data(), dtable.data(), len, chunks); });

  std::vector<double> want(len, 0.0), got(len);
  for (int j = 0; j < n; j++) {
    if (ids[j] >= (uint32_t)vocab) continue;
    for (int c = 0; c < d; c++) want[(size_t)ids[j] * d + c] += widen(g[(size_t)j * d + c]);
  }
  for (size_t i = 0; i < len; i++) got[i] = widen(dtable[i]);
  const double err = relative_error(got, want);
  const bool pass = err <= tolerance;  // NaN (an unwritten element) fails
  std::printf("%s, vocab %d, d %d, %d tokens in %d chunks: dtable %.1e%s\n", dtype, vocab, d, n,
              chunks, err, pass ? "" : " (FAILED)");
  return pass;
}

// The forward: rows of a TT table gathered into a TO tensor, eight elements a thread, checked
// element by element (the value rounded to TO once; 0 for an id past the table). The table
// starts `offset` elements into its buffer (1: rows off the 16-byte boundary, read one element at
// a time), and a width that is not a multiple of eight puts runs across rows.
template <typename TT, typename TO>
bool check_gather(int vocab, int d, int n, size_t offset, unsigned seed, const char *dtypes) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<TT> table_buffer((size_t)vocab * d + offset);
  for (auto &x : table_buffer) x = narrow_to<TT>(u(rng));
  const TT *table = table_buffer.data() + offset;
  std::vector<uint32_t> ids(n);
  for (int j = 0; j < n; j++) ids[j] = j % 11 == 5 ? vocab + j : rng() % vocab;
  std::vector<TO> out((size_t)n * d, narrow_to<TO>(NAN));
  const size_t len = (size_t)n * d;
  launch({unsigned((len + 8 * THREADS - 1) / (8 * THREADS)), 1, 1}, THREADS, 0,
         [&] { gather(table, ids.data(), out.data(), n, d, vocab); });
  size_t wrong = 0;
  for (int j = 0; j < n; j++) {
    for (int c = 0; c < d; c++) {
      const float want =
          ids[j] < (uint32_t)vocab ? widen(narrow_to<TO>(widen(table[(size_t)ids[j] * d + c]))) : 0.0f;
      wrong += !(widen(out[(size_t)j * d + c]) == want);  // NaN (unwritten) counts
    }
  }
  std::printf("gather %s, vocab %d, d %d, %d tokens, table from %zu: %zu wrong\n", dtypes, vocab,
              d, n, offset, wrong);
  return wrong == 0;
}

int main() {
  bool ok = true;
  ok &= check_gather<float, bf16>(100, 512, 40, 0, 5, "f32 to bf16");  // whole runs of 16 bytes
  ok &= check_gather<float, bf16>(100, 512, 40, 1, 6, "f32 to bf16");  // rows off the boundary
  ok &= check_gather<float, float>(37, 300, 41, 0, 7, "f32");           // runs across rows
  ok &= check_gather<bf16, bf16>(37, 64, 77, 0, 8, "bf16");
  ok &= check<float>(100, 600, 2000, 512, false, 1, 1e-6, "f32");  // 4 chunks, the last partial
  ok &= check<bf16>(100, 600, 2000, 512, false, 2, 1e-2, "bf16");  // the same in bf16
  ok &= check<bf16, float>(100, 600, 2000, 512, false, 9, 1e-6, "bf16 into f32");  // a bf16 model
  ok &= check<float>(37, 64, 300, 4096, false, 3, 1e-6, "f32");    // one chunk, one narrow block
  ok &= check<float>(50, 520, 1000, 300, true, 4, 1e-6, "f32");    // chunks not of 256; bad ids
  return ok ? 0 : 1;
}
