// What quantreg's AVX2 kernels share (wna16_avx2_kernel.cpp, float8_kernel.cpp): cpu_build puts
// this file before each of their sources in one unit, and into their build keys.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

// fn(b0, b1) for ranges of blocks (of block_bytes of weights each) that cover [0, blocks), on
// torch's threads, a range at a time as threads come free (about 16 ranges a thread, each of at
// least 256 KiB of weights) rather than one equal share each: on a shared machine one core is
// often slower for a while, and with equal shares the call waits for it (up to 1.4x longer at
// M = 64 on this project's 2-core VM; no slower when the cores are even)
template <typename F>
void parallel_blocks(int64_t blocks, int64_t block_bytes, const F& fn) {
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t least = ((int64_t)1 << 18) / std::max<int64_t>(1, block_bytes);
  const int64_t step = std::max<int64_t>({1, least, blocks / (16 * threads)});
  const int64_t ranges = (blocks + step - 1) / step;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t r = 0; r < ranges; ++r) fn(r * step, std::min(blocks, (r + 1) * step));
}

// Row m's U accumulator sets (a[u][m]: two registers of 8 float32 outputs) added up
template <int U, int R>
__attribute__((always_inline)) inline void sum_sets(__m256 (*a)[R][2], int m, __m256& t0,
                                                    __m256& t1) {
  t0 = a[0][m][0];
  t1 = a[0][m][1];
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u) {
    t0 = _mm256_add_ps(t0, a[u][m][0]);
    t1 = _mm256_add_ps(t1, a[u][m][1]);
  }
}

}  // namespace
