// A kernel whose second warp never reaches the block's barrier, as a bug would leave it: the
// emulator must stop with the block named (exit 3) rather than hang. Built by tests/emulated.rs
// with a 2-second limit.
#include "cuda_emulator.h"

void stuck() {
  if (threadIdx.x < 32) __syncthreads();
}

int main() {
  launch({2, 1, 1}, 64, 0, stuck);
  std::printf("the block finished\n");
  return 0;
}
