// quantreg's AVX-512 weight-only int4/int8 matmul; built by methods/_cpu_kernels.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int NB = 16;  // outputs per block: one register of float32
constexpr int MB = 4;   // activation rows per pass: 4 x 4 accumulators stay in registers
constexpr int CH = 4;   // input rows per step, each with its own accumulator chain

struct Args {
  const float* x;         // [M, K] float32 activations (this pass starts at row 0)
  int64_t ldx;
  const uint8_t* blk;     // this block's codes: [K/2, 16] (int4) or [K, 16] (int8)
  const void* scales;     // [G, N] float32 / float16 / bfloat16
  int sdt;                // scales dtype: 0 float32, 1 float16, 2 bfloat16
  const uint8_t* zeros;   // [G, N] unsigned zero points
  const float* xsum;      // [M, G] sum of x over each group (fast mode)
  int64_t n0, N, K, gs, mode;
  float* out;             // [M, N]
};

inline __m512 round_to(__m512 w, int64_t mode) {
  if (mode == 1) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (mode == 2) {  // round to nearest even bf16
    __m512i b = _mm512_castps_si512(w);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000)));
  }
  return w;
}

inline __m512 load_scales(const Args& a, int64_t offset) {
  if (a.sdt == 0) return _mm512_loadu_ps((const float*)a.scales + offset);
  const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)a.scales + offset));
  if (a.sdt == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load_bytes(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// codes of input row k for the 16 outputs of a block, as float
template <int BITS>
inline __m512 codes_at(const uint8_t* blk, int64_t k) {
  if (BITS == 8) return load_bytes(blk + k * NB);
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + (k >> 1) * NB)));
  v = (k & 1) ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(0xF));
  return _mm512_cvtepi32_ps(v);
}

// raw codes (fast mode) or weights rounded to the scale dtype (exact modes) of row k
template <int BITS>
inline __m512 row_at(const Args& a, int64_t k, __m512 s, __m512 z) {
  const __m512 q = codes_at<BITS>(a.blk, k);
  return a.mode == 0 ? q : round_to(_mm512_mul_ps(_mm512_sub_ps(q, z), s), a.mode);
}

// MR activation rows (compile time: the accumulators live in registers) x 16 outputs, all K.
template <int BITS, int MR>
void block_rows(const Args& a) {
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t groups = (a.K + a.gs - 1) / a.gs;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = load_scales(a, g * a.N + a.n0);
    const __m512 z = load_bytes(a.zeros + g * a.N + a.n0);
    const int64_t k0 = g * a.gs, k1 = std::min(a.K, k0 + a.gs);
    __m512 part[CH][MR];
    for (int c = 0; c < CH; ++c)
      for (int m = 0; m < MR; ++m) part[c][m] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + CH <= k1; k += CH) {
      __m512 w[CH];
      if (BITS == 4 && a.mode == 0) {  // one load feeds two rows: low and high nibbles
#pragma GCC unroll 4
        for (int c = 0; c < CH; c += 2) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128((const __m128i*)(a.blk + ((k + c) >> 1) * NB)));
          w[c] = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
          w[c + 1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        }
      } else {
#pragma GCC unroll 4
        for (int c = 0; c < CH; ++c) w[c] = row_at<BITS>(a, k + c, s, z);
      }
#pragma GCC unroll 4
      for (int c = 0; c < CH; ++c)
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m)
          part[c][m] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[m * a.ldx + k + c]), w[c], part[c][m]);
    }
    for (; k < k1; ++k) {
      const __m512 w = row_at<BITS>(a, k, s, z);
      for (int m = 0; m < MR; ++m)
        part[0][m] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[m * a.ldx + k]), w, part[0][m]);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[0][m], part[1][m]),
                                       _mm512_add_ps(part[2][m], part[3][m]));
      if (a.mode != 0) {
        acc[m] = _mm512_add_ps(acc[m], sum);
      } else {  // s * (sum x*q - z * sum x)
        const __m512 shifted = _mm512_fnmadd_ps(z, _mm512_set1_ps(a.xsum[m * groups + g]), sum);
        acc[m] = _mm512_fmadd_ps(s, shifted, acc[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(a.out + m * a.N + a.n0, acc[m]);
}

template <int BITS>
void block(int64_t rows, const Args& a) {
  switch (rows) {
    case 1: block_rows<BITS, 1>(a); break;
    case 2: block_rows<BITS, 2>(a); break;
    case 3: block_rows<BITS, 3>(a); break;
    default: block_rows<BITS, MB>(a); break;
  }
}

}  // namespace

torch::Tensor wna16_gemm(torch::Tensor x, torch::Tensor blocked, torch::Tensor scales,
                         torch::Tensor zeros, int64_t bits, int64_t group_size, int64_t mode) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: float32 [M, K]");
  TORCH_CHECK(blocked.dtype() == torch::kUInt8 && blocked.is_contiguous(), "blocked: uint8");
  TORCH_CHECK(zeros.dtype() == torch::kUInt8 && zeros.is_contiguous(), "zeros: uint8");
  TORCH_CHECK(scales.is_contiguous() && (scales.dtype() == torch::kFloat32 ||
              scales.dtype() == torch::kFloat16 || scales.dtype() == torch::kBFloat16),
              "scales: float32, float16 or bfloat16");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(1);
  const int64_t gs = group_size > 0 ? group_size : K;
  const int64_t groups = (K + gs - 1) / gs;
  TORCH_CHECK(N % NB == 0, "N must be a multiple of 16");
  TORCH_CHECK(scales.size(0) == groups && zeros.sizes() == scales.sizes(),
              "scales and zeros must be [ceil(K / group_size), N]");
  const int64_t per_block = bits == 4 ? (K / 2) * NB : K * NB;
  TORCH_CHECK(blocked.numel() == (N / NB) * per_block, "blocked size does not match N, K, bits");
  auto out = torch::empty({M, N}, x.options());
  auto xsum = torch::zeros({M, groups}, x.options());
  if (mode == 0) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
      xsum.select(1, g).copy_(x.narrow(1, k0, k1 - k0).sum(1));
    }
  }
  const int sdt = scales.dtype() == torch::kFloat32 ? 0 : (scales.dtype() == torch::kFloat16 ? 1 : 2);
  Args base{x.data_ptr<float>(), K, blocked.data_ptr<uint8_t>(), scales.data_ptr(), sdt,
            zeros.data_ptr<uint8_t>(), xsum.data_ptr<float>(), 0, N, K, gs, mode,
            out.data_ptr<float>()};
  at::parallel_for(0, N / NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        Args a = base;
        a.x = base.x + m0 * K;
        a.blk = base.blk + b * per_block;
        a.xsum = base.xsum + m0 * groups;
        a.n0 = b * NB;
        a.out = base.out + m0 * N;
        const int64_t rows = std::min<int64_t>(MB, M - m0);
        if (bits == 4) block<4>(rows, a); else block<8>(rows, a);
      }
    }
  });
  return out;
}
