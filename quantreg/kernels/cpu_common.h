// What quantreg's AVX2 kernels share (wna16_avx2_kernel.cpp and its VNNI build, float8_kernel.cpp,
// float8_avx512_kernel.cpp): cpu_build puts this file before each of their sources in one unit,
// and into their build keys.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// 8 bf16 (bf16 true: the high halves of float32s) or fp16 (F16C) values as float32, exactly
__attribute__((always_inline)) inline __m256 half8_ps(__m128i v, bool bf16) {
  return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
              : _mm256_cvtph_ps(v);
}

// x [M, K] (contiguous float32, bfloat16 or float16) as float32, what the kernels compute with:
// x's own data when float32, else a copy converted here. Callers pass bf16 / fp16 rows as they
// are: each torch op a call adds (a conversion, a slice) costs tens of microseconds when the
// weights streamed through the caches just before, as they do in a decode step.
struct FloatRows {
  std::vector<float> copy;
  const float* p;

  explicit FloatRows(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                (x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16 ||
                 x.dtype() == torch::kFloat16),
                "x must be a contiguous float32 / bfloat16 / float16 [M, K] matrix");
    if (x.dtype() == torch::kFloat32) {
      p = x.data_ptr<float>();
      return;
    }
    const int64_t n = x.numel();
    copy.resize(n);
    const uint16_t* h = (const uint16_t*)x.data_ptr();
    const bool bf16 = x.dtype() == torch::kBFloat16;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(copy.data() + i, half8_ps(_mm_loadu_si128((const __m128i*)(h + i)), bf16));
    for (; i < n; ++i)
      copy[i] = bf16 ? static_cast<float>(c10::BFloat16(h[i], c10::BFloat16::from_bits()))
                     : static_cast<float>(c10::Half(h[i], c10::Half::from_bits()));
    p = copy.data();
  }
};

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

// A kernel's call from Python: x [M, K] @ W.T as a new [M, n] matrix in x's dtype, by gemm(x
// tile, out tile) over tiles of x's rows of at most tile_bytes as float32 (what FloatRows copies
// a tile to); x itself, in one call, when it fits one tile. One op for the whole call, the
// output's allocation and the tiling included: in a decode step the weights have just streamed
// through the caches, and each op of a call's Python side then costs tens of microseconds.
template <typename F>
torch::Tensor in_row_tiles(torch::Tensor x, int64_t n, int64_t tile_bytes, const F& gemm) {
  TORCH_CHECK(x.dim() == 2, "x must be an [M, K] matrix");
  if (!x.is_contiguous()) x = x.contiguous();
  const int64_t M = x.size(0);
  torch::Tensor out = torch::empty({M, n}, x.options());
  const int64_t rows = std::max<int64_t>(1, tile_bytes / (4 * std::max<int64_t>(1, x.size(1))));
  if (M <= rows) gemm(x, out);
  else
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
      const int64_t r = std::min(rows, M - r0);
      gemm(x.narrow(0, r0, r), out.narrow(0, r0, r));
    }
  return out;
}

// out[0 .. 16) = scale * v[0 .. 16) in T (float32, bfloat16 or float16), each rounded as
// static_cast<T> rounds it (to nearest even; a NaN as c10's NaN for bfloat16), cols < 16: the
// first cols only. Vectorized: at M = 64 a scalar loop over the outputs took a tenth of a call
template <typename T>
__attribute__((always_inline)) inline void store16(T* out, const float* v, float scale,
                                                   int64_t cols) {
  if (cols < 16) {
    for (int64_t o = 0; o < cols; ++o) out[o] = static_cast<T>(scale * v[o]);
    return;
  }
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_mul_ps(s, _mm256_loadu_ps(v)), hi = _mm256_mul_ps(s, _mm256_loadu_ps(v + 8));
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps((float*)out, lo);
    _mm256_storeu_ps((float*)out + 8, hi);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm_storeu_si128((__m128i*)out, _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128((__m128i*)out + 1, _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
  } else {  // bfloat16: bits + 0x7FFF + (bit 16), the high half; NaN -> 0x7FC0 (c10's rule)
    __m256i h[2];
    const __m256 f[2] = {lo, hi};
    for (int i = 0; i < 2; ++i) {
      const __m256i b = _mm256_castps_si256(f[i]);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f[i], f[i], _CMP_UNORD_Q));
      h[i] = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    }
    // packus works within 128-bit lanes: 0-3 | 8-11 | 4-7 | 12-15, put back in order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xD8);
    _mm256_storeu_si256((__m256i*)out, packed);
  }
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
