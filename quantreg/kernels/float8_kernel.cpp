// quantreg's float8 / fp4 weight-only CPU matmul for AVX2 + FMA + F16C; built and called by
// quantreg/kernels/cpu_float8.py, after cpu_common.h (parallel_blocks) and float8_common.h (the
// checks of a call's arguments). Compiled apart from
// wna16_kernel.cpp (whose whole unit is built with AVX-512 flags), so that nothing here can carry
// an AVX-512 instruction.
//
// Layout: 16 outputs per block, K-major. fp8: byte 16k + o of a block is output o's e4m3 code
// at row k. fp4 (K and the group size multiples of 4): 32 bytes a step of four rows, e2m1 codes
// (bit 3 the sign) as nibbles, placed where the decoding's in-lane unpacks want them (see
// decode4_fp4; cpu_float8.FP4_STEP_INDEX builds it). Scales [N/16][G][16]: float32 (fp8 ones
// pre-multiplied by 2^8), or for fp4 e4m3 codes, a byte each, with one float32 multiplier.
//
// Decoding needs no table in memory: an e4m3 code b, sign-extended to 16 bits and shifted left
// by 7 with bit 14 cleared, is the fp16 of value * 2^-8 (normals and subnormals alike: fp16 has
// one more exponent bit), which F16C widens to float32; an e2m1 code indexes two 16-entry
// vpshufb tables, the high and low bytes of its bfloat16, and a bfloat16 shifted into the high
// half of a float32 is that float32.
//
// Up to DIRECT_M rows, each weight is decoded in registers and multiplied at once. More rows:
// per block and K chunk the weights are decoded and scaled once into a float32 buffer (L1),
// then every row of x runs over it with FMA (float32 accumulation in a per-thread [M][16]
// scratch). The result is written in the output's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace {

constexpr int NB = 16;   // outputs per block: two registers of float32
constexpr int KC = 256;  // rows decoded at a time: 16 KiB of float32
constexpr int MR = 6;    // rows of x per pass: 12 accumulators
constexpr int DIRECT_M = 4;  // up to this many rows: no buffer (direct_rows)
constexpr int PREFETCH = 2048;  // bytes ahead that the one-row fp4 loop prefetches

struct Geo {
  int64_t M, N, K, gs, G;
  bool fp4;
  const uint8_t* codes;        // [N/16][K * 16] (fp8) or [N/16][K * 8] (fp4)
  const float* scales;         // float32 [N/16][G][16], or
  const uint8_t* scale_codes;  // (fp4 only) e4m3 codes [N/16][G][16], and
  float scale_mult;            // what multiplies every sum (fp4)
  const float* x;              // [M][K]
};

void decode_chunk_fp4(const Geo& g, int64_t b, int64_t k0, int64_t kc, float* buf);

inline void decode_fp8(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16((short)0xBFFF));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// rows k0 .. k0 + kc of block b, scaled, as float32 [kc][16] in buf
void decode_chunk(const Geo& g, int64_t b, int64_t k0, int64_t kc, float* buf) {
  if (g.fp4) return decode_chunk_fp4(g, b, k0, kc, buf);
  const uint8_t* src = g.codes + b * g.K * 16 + k0 * 16;
  int64_t k = 0;
  while (k < kc) {
    const int64_t grp = (k0 + k) / g.gs, end = std::min(kc, (grp + 1) * g.gs - k0);
    const float* s = g.scales + (b * g.G + grp) * NB;
    const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
    for (; k < end; ++k) {
      __m256 lo, hi;
      decode_fp8(src + k * 16, lo, hi);
      _mm256_store_ps(buf + k * NB, _mm256_mul_ps(lo, s0));
      _mm256_store_ps(buf + k * NB + 8, _mm256_mul_ps(hi, s1));
    }
  }
}

// acc[m][16] += x[m0 + m, k0 : k0 + kc] @ buf, for R rows (every loop over m unrolled, so
// that the accumulators stay in registers)
template <int R>
void rows_fma(const Geo& g, const float* __restrict buf, int64_t k0, int64_t kc, int64_t m0,
              float* __restrict acc) {
  const int64_t K = g.K;
  const float* __restrict x = g.x + m0 * K + k0;
  __m256 a[R][2];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    a[m][0] = _mm256_loadu_ps(acc + (m0 + m) * NB);
    a[m][1] = _mm256_loadu_ps(acc + (m0 + m) * NB + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(buf + k * NB), w1 = _mm256_load_ps(buf + k * NB + 8);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * K + k);
      a[m][0] = _mm256_fmadd_ps(xv, w0, a[m][0]);
      a[m][1] = _mm256_fmadd_ps(xv, w1, a[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    _mm256_storeu_ps(acc + (m0 + m) * NB, a[m][0]);
    _mm256_storeu_ps(acc + (m0 + m) * NB + 8, a[m][1]);
  }
}

void all_rows(const Geo& g, const float* buf, int64_t k0, int64_t kc, float* acc) {
  int64_t m0 = 0;
  for (; m0 + MR <= g.M; m0 += MR) rows_fma<MR>(g, buf, k0, kc, m0, acc);
  switch (g.M - m0) {
    case 1: rows_fma<1>(g, buf, k0, kc, m0, acc); break;
    case 2: rows_fma<2>(g, buf, k0, kc, m0, acc); break;
    case 3: rows_fma<3>(g, buf, k0, kc, m0, acc); break;
    case 4: rows_fma<4>(g, buf, k0, kc, m0, acc); break;
    case 5: rows_fma<5>(g, buf, k0, kc, m0, acc); break;
    default: break;
  }
}

// Few rows (M <= DIRECT_M): decode in registers and multiply at once, no buffer. Scales
// multiply the weights when there are groups, the sums once at the end when there is one.
// U independent accumulator sets (rows k, k + 1, ...) hide the FMA latency when R is small.
template <int R, bool GROUPED>
inline void direct_step(const float* __restrict x, int64_t K, const uint8_t* src, int64_t k,
                        __m256 s0, __m256 s1, __m256 (*a)[2]) {
  __m256 lo, hi;
  decode_fp8(src + k * 16, lo, hi);
  if (GROUPED) {
    lo = _mm256_mul_ps(lo, s0);
    hi = _mm256_mul_ps(hi, s1);
  }
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    const __m256 xv = _mm256_broadcast_ss(x + m * K + k);
    a[m][0] = _mm256_fmadd_ps(xv, lo, a[m][0]);
    a[m][1] = _mm256_fmadd_ps(xv, hi, a[m][1]);
  }
}

template <int R, int U, bool GROUPED>
void direct_rows(const Geo& g, int64_t b, float* __restrict acc) {
  const int64_t K = g.K, G = g.G, gs = g.gs;
  const float* __restrict x = g.x;
  const uint8_t* src = g.codes + b * K * 16;
  const float* sb = g.scales + b * G * NB;
  __m256 a[U][R][2];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) a[u][m][0] = a[u][m][1] = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < G; ++grp) {
    const __m256 s0 = _mm256_loadu_ps(sb + grp * NB), s1 = _mm256_loadu_ps(sb + grp * NB + 8);
    const int64_t end = std::min(K, (grp + 1) * gs);
    int64_t k = grp * gs;
    for (; k + U <= end; k += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) direct_step<R, GROUPED>(x, K, src, k + u, s0, s1, a[u]);
    }
    for (; k < end; ++k) direct_step<R, GROUPED>(x, K, src, k, s0, s1, a[0]);
  }
  const __m256 s0 = GROUPED ? _mm256_set1_ps(1.0f) : _mm256_loadu_ps(sb);
  const __m256 s1 = GROUPED ? _mm256_set1_ps(1.0f) : _mm256_loadu_ps(sb + 8);
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    __m256 t0, t1;
    sum_sets<U, R>(a, m, t0, t1);
    _mm256_storeu_ps(acc + m * NB, _mm256_mul_ps(t0, s0));
    _mm256_storeu_ps(acc + m * NB + 8, _mm256_mul_ps(t1, s1));
  }
}

// One row: the group sums (two sets, rows k and k + 1) are scaled once per group.
void direct_one(const Geo& g, int64_t b, float* __restrict acc) {
  const int64_t K = g.K, G = g.G, gs = g.gs;
  const float* __restrict x = g.x;
  const uint8_t* src = g.codes + b * K * 16;
  const float* sb = g.scales + b * G * NB;
  __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < G; ++grp) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    const int64_t end = std::min(K, (grp + 1) * gs);
    int64_t k = grp * gs;
    for (; k + 2 <= end; k += 2) {
      __m256 lo, hi, lo2, hi2;
      decode_fp8(src + k * 16, lo, hi);
      decode_fp8(src + (k + 1) * 16, lo2, hi2);
      const __m256 xv = _mm256_broadcast_ss(x + k), xv2 = _mm256_broadcast_ss(x + k + 1);
      a0 = _mm256_fmadd_ps(xv, lo, a0);
      a1 = _mm256_fmadd_ps(xv, hi, a1);
      c0 = _mm256_fmadd_ps(xv2, lo2, c0);
      c1 = _mm256_fmadd_ps(xv2, hi2, c1);
    }
    if (k < end) {
      __m256 lo, hi;
      decode_fp8(src + k * 16, lo, hi);
      const __m256 xv = _mm256_broadcast_ss(x + k);
      a0 = _mm256_fmadd_ps(xv, lo, a0);
      a1 = _mm256_fmadd_ps(xv, hi, a1);
    }
    t0 = _mm256_fmadd_ps(_mm256_loadu_ps(sb + grp * NB), _mm256_add_ps(a0, c0), t0);
    t1 = _mm256_fmadd_ps(_mm256_loadu_ps(sb + grp * NB + 8), _mm256_add_ps(a1, c1), t1);
  }
  _mm256_storeu_ps(acc, t0);
  _mm256_storeu_ps(acc + 8, t1);
}

// ---- fp4: four rows of a block a step, 32 bytes, byte scales ----
//
// One step (32 bytes) holds rows 4t .. 4t + 3 of a block: the low nibbles rows 4t and 4t + 1,
// the high nibbles rows 4t + 2 and 4t + 3. Two vpshufb look up the high and low bytes of each
// code's bfloat16 and two byte unpacks make the bfloat16 words; a 32-bit lane then holds two,
// and the even one shifted left by 16 or the odd one with the low half cleared is a float32
// -- every instruction 256 bits wide and one uop, no conversion. Which byte holds which (row,
// output) is what the in-lane unpacks need (cpu_float8.FP4_STEP_INDEX): the eight registers
// of a step come out as rows 4t .. 4t + 3, outputs 0-7 | 8-15, in order.
// Group scales are e4m3 codes (a byte an output and group, decoded like fp8 weights: value *
// 2^-8); one float32 per call (scale_mult) multiplies the sums last.

inline void decode4_fp4(const uint8_t* p, __m256 (&w)[4][2]) {
  const __m256i th = _mm256_broadcastsi128_si256(_mm_setr_epi8(
      0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, (char)0x80, (char)0xBF, (char)0xBF,
      (char)0xBF, (char)0xC0, (char)0xC0, (char)0xC0, (char)0xC0));
  const __m256i tl = _mm256_broadcastsi128_si256(_mm_setr_epi8(
      0x00, 0x00, (char)0x80, (char)0xC0, 0x00, 0x40, (char)0x80, (char)0xC0, 0x00, 0x00,
      (char)0x80, (char)0xC0, 0x00, 0x40, (char)0x80, (char)0xC0));
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  const __m256i c[2] = {_mm256_and_si256(v, nib), _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)};
  const __m256i himask = _mm256_set1_epi32((int)0xFFFF0000);
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256i hi = _mm256_shuffle_epi8(th, c[h]), lo = _mm256_shuffle_epi8(tl, c[h]);
    const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
    w[2 * h][0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    w[2 * h][1] = _mm256_castsi256_ps(_mm256_and_si256(w0, himask));
    w[2 * h + 1][0] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    w[2 * h + 1][1] = _mm256_castsi256_ps(_mm256_and_si256(w1, himask));
  }
}

// the 16 group scales of block b, group grp, as float32 (codes: value * 2^-8)
inline void fp4_scales(const Geo& g, int64_t b, int64_t grp, __m256& s0, __m256& s1) {
  if (g.scale_codes != nullptr) {
    decode_fp8(g.scale_codes + (b * g.G + grp) * NB, s0, s1);
  } else {
    s0 = _mm256_loadu_ps(g.scales + (b * g.G + grp) * NB);
    s1 = _mm256_loadu_ps(g.scales + (b * g.G + grp) * NB + 8);
  }
}

// rows k0 .. k0 + kc of block b (k0, kc multiples of 4), scaled, as float32 [kc][16] in buf
void decode_chunk_fp4(const Geo& g, int64_t b, int64_t k0, int64_t kc, float* buf) {
  const uint8_t* src = g.codes + b * g.K * 8;
  const __m256 mult = _mm256_set1_ps(g.scale_mult);
  for (int64_t k = 0; k < kc;) {
    const int64_t grp = (k0 + k) / g.gs, end = std::min(kc, (grp + 1) * g.gs - k0);
    __m256 s0, s1;
    fp4_scales(g, b, grp, s0, s1);
    s0 = _mm256_mul_ps(s0, mult);
    s1 = _mm256_mul_ps(s1, mult);
    for (; k < end; k += 4) {
      __m256 w[4][2];
      decode4_fp4(src + (k0 + k) * 8, w);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        _mm256_store_ps(buf + (k + r) * NB, _mm256_mul_ps(w[r][0], s0));
        _mm256_store_ps(buf + (k + r) * NB + 8, _mm256_mul_ps(w[r][1], s1));
      }
    }
  }
}

// One row: four accumulators (even and odd rows of W by two halves: eight would spill), summed
// and scaled once a group.
void direct_one_fp4(const Geo& g, int64_t b, float* __restrict acc) {
  const int64_t K = g.K, G = g.G, gs = g.gs;
  const float* __restrict x = g.x;
  const uint8_t* src = g.codes + b * K * 8;
  __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < G; ++grp) {
    __m256 a[2][2];
    a[0][0] = a[0][1] = a[1][0] = a[1][1] = _mm256_setzero_ps();
    const int64_t end = std::min(K, (grp + 1) * gs);
    // two cache lines 2 KiB ahead a group (one group of 16 is two lines): the hardware's
    // prefetcher stops at page boundaries
    _mm_prefetch((const char*)(src + grp * gs * 8 + PREFETCH), _MM_HINT_T0);
    _mm_prefetch((const char*)(src + grp * gs * 8 + PREFETCH + 64), _MM_HINT_T0);
    for (int64_t k = grp * gs; k < end; k += 4) {
      __m256 w[4][2];
      decode4_fp4(src + k * 8, w);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + k + r);
        a[r & 1][0] = _mm256_fmadd_ps(xv, w[r][0], a[r & 1][0]);
        a[r & 1][1] = _mm256_fmadd_ps(xv, w[r][1], a[r & 1][1]);
      }
    }
    __m256 s0, s1;
    fp4_scales(g, b, grp, s0, s1);
    t0 = _mm256_fmadd_ps(s0, _mm256_add_ps(a[0][0], a[1][0]), t0);
    t1 = _mm256_fmadd_ps(s1, _mm256_add_ps(a[0][1], a[1][1]), t1);
  }
  const __m256 mult = _mm256_set1_ps(g.scale_mult);
  _mm256_storeu_ps(acc, _mm256_mul_ps(t0, mult));
  _mm256_storeu_ps(acc + 8, _mm256_mul_ps(t1, mult));
}

// R rows (2 .. DIRECT_M): the decoded weights are scaled, then multiplied into every row.
template <int R>
void direct_rows_fp4(const Geo& g, int64_t b, float* __restrict acc) {
  const int64_t K = g.K, G = g.G, gs = g.gs;
  const float* __restrict x = g.x;
  const uint8_t* src = g.codes + b * K * 8;
  const __m256 mult = _mm256_set1_ps(g.scale_mult);
  __m256 a[R][2];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < G; ++grp) {
    __m256 s0, s1;
    fp4_scales(g, b, grp, s0, s1);
    s0 = _mm256_mul_ps(s0, mult);
    s1 = _mm256_mul_ps(s1, mult);
    const int64_t end = std::min(K, (grp + 1) * gs);
    for (int64_t k = grp * gs; k < end; k += 4) {
      __m256 w[4][2];
      decode4_fp4(src + k * 8, w);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m256 w0 = _mm256_mul_ps(w[r][0], s0), w1 = _mm256_mul_ps(w[r][1], s1);
#pragma GCC unroll 8
        for (int m = 0; m < R; ++m) {
          const __m256 xv = _mm256_broadcast_ss(x + m * K + k + r);
          a[m][0] = _mm256_fmadd_ps(xv, w0, a[m][0]);
          a[m][1] = _mm256_fmadd_ps(xv, w1, a[m][1]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    _mm256_storeu_ps(acc + m * NB, a[m][0]);
    _mm256_storeu_ps(acc + m * NB + 8, a[m][1]);
  }
}

void direct_block_fp4(const Geo& g, int64_t b, float* acc) {
  switch (g.M) {
    case 1: direct_one_fp4(g, b, acc); break;
    case 2: direct_rows_fp4<2>(g, b, acc); break;
    case 3: direct_rows_fp4<3>(g, b, acc); break;
    default: direct_rows_fp4<4>(g, b, acc); break;
  }
}

template <bool GROUPED>
void direct_block_fp8(const Geo& g, int64_t b, float* acc) {
  switch (g.M) {
    case 1: direct_one(g, b, acc); break;
    case 2: direct_rows<2, 2, GROUPED>(g, b, acc); break;
    case 3: direct_rows<3, 1, GROUPED>(g, b, acc); break;
    default: direct_rows<4, 1, GROUPED>(g, b, acc); break;
  }
}

void direct_block(const Geo& g, int64_t b, float* acc) {
  if (g.fp4) direct_block_fp4(g, b, acc);
  else if (g.G > 1) direct_block_fp8<true>(g, b, acc);
  else direct_block_fp8<false>(g, b, acc);
}

template <typename T>
void write_out(const Geo& g, const float* acc, int64_t b, T* out) {
  const int64_t n0 = b * NB, cols = std::min<int64_t>(NB, g.N - n0);
  for (int64_t m = 0; m < g.M; ++m) store16(out + m * g.N + n0, acc + m * NB, 1.0f, cols);
}

template <typename T>
void run(const Geo& g, T* out) {
  const int64_t blocks = (g.N + NB - 1) / NB;
  parallel_blocks(blocks, g.K * NB / (g.fp4 ? 2 : 1), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(KC * NB + g.M * NB + 16);
    float* buf = (float*)(((uintptr_t)scratch.data() + 31) & ~(uintptr_t)31);
    float* acc = buf + KC * NB;
    for (int64_t b = begin; b < end; ++b) {
      if (g.M <= DIRECT_M) {
        direct_block(g, b, acc);
        write_out(g, acc, b, out);
        continue;
      }
      std::fill(acc, acc + g.M * NB, 0.0f);
      for (int64_t k0 = 0; k0 < g.K; k0 += KC) {
        const int64_t kc = std::min<int64_t>(KC, g.K - k0);
        decode_chunk(g, b, k0, kc, buf);
        all_rows(g, buf, k0, kc, acc);
      }
      write_out(g, acc, b, out);
    }
  });
}

}  // namespace

// out [M, N] (float32, bfloat16 or float16) = x [M, K] (float32, bfloat16 or float16) @ W.T
void float8_gemm(torch::Tensor x, torch::Tensor out, torch::Tensor codes, torch::Tensor scales,
                 int64_t group_size, bool fp4, double scale_mult) {
  const Float8Args a(x, out, codes, scales, group_size, fp4, scale_mult);
  const FloatRows xf(x);
  if (a.M == 0 || a.N == 0) return;
  if (a.K == 0) {
    out.zero_();
    return;
  }
  Geo g{a.M, a.N, a.K, group_size, a.G, fp4, a.codes, a.scales, a.scale_codes,
        static_cast<float>(scale_mult), xf.p};
  if (out.dtype() == torch::kFloat32) run(g, out.data_ptr<float>());
  else if (out.dtype() == torch::kBFloat16) run(g, (c10::BFloat16*)out.data_ptr());
  else run(g, (c10::Half*)out.data_ptr());
}

// What the Python side calls (see in_row_tiles): x [M, K] @ W.T as a new [M, n] matrix in x's
// dtype
torch::Tensor float8_mm(torch::Tensor x, int64_t n, torch::Tensor codes, torch::Tensor scales,
                        int64_t group_size, bool fp4, double scale_mult, int64_t tile_bytes) {
  return in_row_tiles(x, n, tile_bytes, [&](const torch::Tensor& xt, const torch::Tensor& ot) {
    float8_gemm(xt, ot, codes, scales, group_size, fp4, scale_mult);
  });
}

namespace {

// dst[16 * i + o] = row[o][k + i] for i, o < 16: a 16 x 16 byte transpose in registers
inline void transpose16(const uint8_t* const* row, int64_t k, uint8_t* dst) {
  __m128i r[NB], t[NB];
  for (int o = 0; o < NB; ++o) r[o] = _mm_loadu_si128((const __m128i*)(row[o] + k));
  for (int i = 0; i < NB / 2; ++i) {  // bytes of rows 2i, 2i + 1 interleaved
    t[i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    t[i + 8] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {  // 16-bit pairs of rows 4i .. 4i + 3
      r[h * 8 + i] = _mm_unpacklo_epi16(t[h * 8 + 2 * i], t[h * 8 + 2 * i + 1]);
      r[h * 8 + i + 4] = _mm_unpackhi_epi16(t[h * 8 + 2 * i], t[h * 8 + 2 * i + 1]);
    }
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < 2; ++i) {  // 32-bit quads of rows 8i .. 8i + 7
      t[q * 4 + i] = _mm_unpacklo_epi32(r[q * 4 + 2 * i], r[q * 4 + 2 * i + 1]);
      t[q * 4 + i + 2] = _mm_unpackhi_epi32(r[q * 4 + 2 * i], r[q * 4 + 2 * i + 1]);
    }
  for (int q = 0; q < 8; ++q) {  // all 16 rows of two k
    r[q * 2] = _mm_unpacklo_epi64(t[q * 2], t[q * 2 + 1]);
    r[q * 2 + 1] = _mm_unpackhi_epi64(t[q * 2], t[q * 2 + 1]);
  }
  for (int j = 0; j < NB; ++j) _mm_storeu_si128((__m128i*)(dst + NB * j), r[j]);  // row k + j
}

// the 16 e4m3 bytes of one row (outputs 0-15) as e2m1 codes (bit 3 the sign), same order;
// bit 7 of a byte of bad is set where a byte is off the e2m1 grid
inline __m128i fp4_codes(__m128i v, __m128i& bad) {
  // magnitude 0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C -> code 0-7, by its high nibble
  // (0, 3 or 4) and a table over its low nibble; 0xFF elsewhere
  const __m128i t0 = _mm_setr_epi8(0, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i t3 = _mm_setr_epi8(1, -1, -1, -1, -1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1);
  const __m128i t4 = _mm_setr_epi8(4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
  const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x07));
  __m128i code = _mm_set1_epi8(-1);
  code = _mm_blendv_epi8(code, _mm_shuffle_epi8(t0, lo), _mm_cmpeq_epi8(hi, _mm_setzero_si128()));
  code = _mm_blendv_epi8(code, _mm_shuffle_epi8(t3, lo), _mm_cmpeq_epi8(hi, _mm_set1_epi8(3)));
  code = _mm_blendv_epi8(code, _mm_shuffle_epi8(t4, lo), _mm_cmpeq_epi8(hi, _mm_set1_epi8(4)));
  bad = _mm_or_si128(bad, code);
  const __m128i sign = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x08));
  return _mm_or_si128(_mm_and_si128(code, _mm_set1_epi8(0x07)), sign);
}

// one 32-byte fp4 step from the codes of its four rows: byte b holds code FP4_STEP_INDEX[b] of
// rows 0-1 (row-major) in the low nibble and of rows 2-3 in the high one. That index takes
// codes 0, 8, 1, 9, ..., 7, 15 of a row: bytes 0-7 and 16-23 from the first row of a pair,
// 8-15 and 24-31 from the second.
inline void fp4_step(const __m128i* c, uint8_t* dst) {
  const __m128i s = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  __m128i p[4];
  for (int r = 0; r < 4; ++r) p[r] = _mm_shuffle_epi8(c[r], s);
  const __m128i lo0 = _mm_unpacklo_epi64(p[0], p[1]), lo1 = _mm_unpackhi_epi64(p[0], p[1]);
  const __m128i hi0 = _mm_unpacklo_epi64(p[2], p[3]), hi1 = _mm_unpackhi_epi64(p[2], p[3]);
  _mm_storeu_si128((__m128i*)dst, _mm_or_si128(lo0, _mm_slli_epi16(hi0, 4)));
  _mm_storeu_si128((__m128i*)(dst + 16), _mm_or_si128(lo1, _mm_slli_epi16(hi1, 4)));
}

// block b of the layout from rows 16b .. 16b + 15 of v [N][K] (rows past N: zeros); false
// when fp4 and a value is off the e2m1 grid
bool pack_block(const uint8_t* v, int64_t N, int64_t K, int64_t b, bool fp4, uint8_t* dst) {
  std::vector<uint8_t> zeros(b * NB + NB > N ? K : 0, 0);  // the last block's missing rows
  const uint8_t* row[NB];
  for (int o = 0; o < NB; ++o) row[o] = b * NB + o < N ? v + (b * NB + o) * K : zeros.data();
  if (!fp4) {
    int64_t k = 0;
    for (; k + NB <= K; k += NB) transpose16(row, k, dst + k * NB);
    for (; k < K; ++k)
      for (int o = 0; o < NB; ++o) dst[k * NB + o] = row[o][k];
    return true;
  }
  alignas(16) uint8_t tile[NB * NB];
  __m128i bad = _mm_setzero_si128(), c[NB];
  for (int64_t k = 0; k < K; k += NB) {  // K % 4 == 0
    const int64_t rows = std::min<int64_t>(NB, K - k);
    if (rows == NB) {
      transpose16(row, k, tile);
    } else {  // the last rows: gathered, the rest of the tile zeros
      std::fill(tile, tile + NB * NB, 0);
      for (int64_t i = 0; i < rows; ++i)
        for (int o = 0; o < NB; ++o) tile[NB * i + o] = row[o][k + i];
    }
    for (int64_t i = 0; i < rows; ++i)
      c[i] = fp4_codes(_mm_load_si128((const __m128i*)(tile + NB * i)), bad);
    for (int64_t i = 0; i < rows; i += 4) fp4_step(c + i, dst + (k + i) * (NB / 2));
  }
  return _mm_movemask_epi8(bad) == 0;
}

}  // namespace

// codes [ceil(N/16), K * 16] (fp8) or [ceil(N/16), K * 8] (fp4) = the layout of the float8
// bytes values [N, K], in one pass; false (codes unfinished) when fp4 and a value is not an
// e2m1 number
bool float8_pack(torch::Tensor values, torch::Tensor codes, bool fp4) {
  TORCH_CHECK(values.dtype() == torch::kUInt8 && values.is_contiguous() && values.dim() == 2,
              "values: contiguous uint8 [N, K]");
  const int64_t N = values.size(0), K = values.size(1), blocks = (N + NB - 1) / NB;
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2 &&
              codes.size(0) == blocks && codes.size(1) == K * (fp4 ? 8 : 16),
              "codes: contiguous uint8 [ceil(N/16), K * (fp4 ? 8 : 16)]");
  TORCH_CHECK(!fp4 || K % 4 == 0, "fp4 steps take K a multiple of 4");
  const uint8_t* v = values.data_ptr<uint8_t>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1 && ok.load(std::memory_order_relaxed); ++b)
      if (!pack_block(v, N, K, b, fp4, out + b * K * (fp4 ? 8 : 16))) ok = false;
  });
  return ok.load();
}

namespace {

// the 16 e2m1 codes (a byte each, bit 3 the sign) of the 8 packed bytes at p: element 2j in the
// low nibble of byte j, 2j + 1 in the high one
inline __m128i e2m1_row(const uint8_t* p) {
  const __m128i v = _mm_loadl_epi64((const __m128i*)p), nib = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(v, nib), _mm_and_si128(_mm_srli_epi16(v, 4), nib));
}

// fp4 block b of the layout from rows 16b .. 16b + 15 of the packed codes p [N][K / 2] (rows
// past N: zeros): per 16 rows of K, each output's 8 bytes widened to 16 codes, the 16 x 16
// tile transposed, then placed as pack_block places them; no code can be off the grid
void e2m1_block(const uint8_t* p, int64_t N, int64_t K, int64_t b, uint8_t* dst) {
  const int64_t half = K / 2;
  alignas(16) uint8_t wide[NB * NB], tile[NB * NB];
  const uint8_t* row[NB];
  for (int o = 0; o < NB; ++o) row[o] = wide + NB * o;
  __m128i c[NB];
  for (int64_t k = 0; k < K; k += NB) {  // K % 4 == 0
    const int64_t rows = std::min<int64_t>(NB, K - k);
    for (int o = 0; o < NB; ++o) {
      const int64_t r = b * NB + o;
      if (r >= N) {
        std::fill(wide + NB * o, wide + NB * o + NB, 0);
      } else if (rows == NB) {
        _mm_store_si128((__m128i*)(wide + NB * o), e2m1_row(p + r * half + k / 2));
      } else {  // the last rows of K: the rest of the tile zeros
        std::fill(wide + NB * o, wide + NB * o + NB, 0);
        for (int64_t i = 0; i < rows; ++i) {
          const uint8_t byte = p[r * half + (k + i) / 2];
          wide[NB * o + i] = (k + i) % 2 ? byte >> 4 : byte & 0x0F;
        }
      }
    }
    transpose16(row, 0, tile);
    for (int64_t i = 0; i < rows; ++i) c[i] = _mm_load_si128((const __m128i*)(tile + NB * i));
    for (int64_t i = 0; i < rows; i += 4) fp4_step(c + i, dst + (k + i) * (NB / 2));
  }
}

}  // namespace

// codes [ceil(N/16), K * 8] = the fp4 layout of NVFP4's packed e2m1 codes [N, K / 2] (two a
// byte, the low nibble first), in one pass: the bytes float8_pack gives (fp4 true) for their
// float8 values, without those values between
void e2m1_pack(torch::Tensor packed, torch::Tensor codes) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2,
              "packed: contiguous uint8 [N, K / 2]");
  const int64_t N = packed.size(0), K = 2 * packed.size(1), blocks = (N + NB - 1) / NB;
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2 &&
              codes.size(0) == blocks && codes.size(1) == K * 8,
              "codes: contiguous uint8 [ceil(N/16), K * 8]");
  TORCH_CHECK(K % 4 == 0, "fp4 steps take K a multiple of 4");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) e2m1_block(p, N, K, b, out + b * K * 8);
  });
}
