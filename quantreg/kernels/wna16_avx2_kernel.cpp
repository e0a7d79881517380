// quantreg's int4 / int8 weight-only CPU matmul for AVX2 + FMA (+ F16C); built and called by
// quantreg/kernels/cpu_avx2.py, after cpu_common.h (parallel_blocks). Compiled apart from
// wna16_kernel.cpp (whose whole unit is built with AVX-512 flags), so that nothing here can carry
// an AVX-512 instruction. Built a second time with QR_VNNI and AVX512-VNNI flags
// (quantreg/kernels/cpu_vnni.py): the same layout and entry points, the integer-activation
// inner loop (namespace ia) in 512-bit registers; see there.
//
// Layout: 16 outputs per block; a block is `units` words of 16 int32 lanes, one lane per
// output. Lane o of unit t holds P = 32 / bits codes of output o, rows P*t .. P*t + P - 1,
// code j at bits j * bits (GPTQ's qweight order, per output). Scales s [N/16][G][16] in the
// checkpoint's dtype (float32, bf16 or fp16) and zero points z [N/16][G][16] (uint8, or float32
// when one is not an integer in 0..255): 3 bytes per output and group where float32 s and s * z
// took 8 (at int4 g128 that is 7 % of the bytes a call reads). s * z is computed per group as
// float32(s) * float32(z), the same value the float32 pair held.
//
// Decoding: code j of every lane is (v & (mask << j * bits)), converted to float32: the code
// times 2^(j * bits), exact. The activations are pre-scaled by 2^-(j * bits) (exact: a power
// of two), so one AND, one convert and one FMA per 8 weights; the last code of a lane is a
// shift by 32 - bits instead (the AND would leave the sign bit). The zero point and the scale
// are applied once per group on the partial sums: s * (sum x q) - s z * (sum x), with the
// group sums of x computed once per call for every output.
//
// Rows of x are taken R <= 4 at a time (interleaved once per call, so that one pointer reaches
// them), every weight decoded once per pass and multiplied by R rows; U accumulator sets
// (code j into set j % U) hide the FMA latency when R is small.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int NB = 16;  // outputs per block: two registers of float32
constexpr int RB = 4;   // rows of x per pass

// A block's scales and zero points of one group, as float32: s and s * z, 16 outputs each
struct Scales {
  const void* s;  // [N/16][G][16]: float32 (kind 0), bf16 (1) or fp16 (2)
  const void* z;  // [N/16][G][16]: uint8 (kind 0) or float32 (1)
  int s_kind, z_kind;
  int64_t G;

  __attribute__((always_inline)) inline void get(int64_t b, int64_t grp, __m256& s0, __m256& s1,
                                                 __m256& z0, __m256& z1) const {
    const int64_t i = (b * G + grp) * NB;
    if (s_kind == 0) {
      s0 = _mm256_loadu_ps((const float*)s + i);
      s1 = _mm256_loadu_ps((const float*)s + i + 8);
    } else {
      const uint16_t* h = (const uint16_t*)s + i;
      s0 = half8_ps(_mm_loadu_si128((const __m128i*)h), s_kind == 1);
      s1 = half8_ps(_mm_loadu_si128((const __m128i*)(h + 8)), s_kind == 1);
    }
    __m256 f0, f1;
    if (z_kind == 0) {
      const __m128i zb = _mm_loadu_si128((const __m128i*)((const uint8_t*)z + i));
      f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(zb));
      f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(zb, 8)));
    } else {
      f0 = _mm256_loadu_ps((const float*)z + i);
      f1 = _mm256_loadu_ps((const float*)z + i + 8);
    }
    z0 = _mm256_mul_ps(s0, f0);
    z1 = _mm256_mul_ps(s1, f1);
  }
};

// One block's s and s * z decoded once, float32 [G][2][16], for blocks that take several passes
// of rows (M > 4): each pass then loads them from L1 rather than decoding them again (which made
// int4 g32 1.06x slower at M = 64). A single pass decodes in place: decoding a block's scales
// up front cost 1.05x at M = 4.
struct Decoded {
  float* pairs;

  Decoded(const Scales& sc, int64_t b, float* buf) : pairs(buf) {
    for (int64_t grp = 0; grp < sc.G; ++grp) {
      __m256 v[4];
      sc.get(b, grp, v[0], v[1], v[2], v[3]);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(buf + grp * 2 * NB + i * 8, v[i]);
    }
  }

  __attribute__((always_inline)) inline void get(int64_t, int64_t grp, __m256& s0, __m256& s1,
                                                 __m256& z0, __m256& z1) const {
    const float* p = pairs + grp * 2 * NB;
    s0 = _mm256_loadu_ps(p), s1 = _mm256_loadu_ps(p + 8);
    z0 = _mm256_loadu_ps(p + NB), z1 = _mm256_loadu_ps(p + NB + 8);
  }
};

struct Geo {
  int64_t M, N, K;   // K: rows, padded to a multiple of P
  int64_t units, G, gsu;  // words per output; groups; units per group
  const int32_t* codes;   // [N/16][units][16]
  Scales sz;
  const float* xs;        // [M][K], pre-scaled, each pass's rows interleaved ([K][R])
  const float* sx;        // [M][G], group sums of x
};

template <int BITS, int J>
__attribute__((always_inline)) inline __m256 code(__m256i v) {
  constexpr int P = 32 / BITS;
  if (J == P - 1) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 32 - BITS));
  constexpr int32_t mask = ((1 << BITS) - 1) << (J * BITS);
  return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(mask)));
}

// Code J of one unit (two registers of 8 lanes) times R rows of x into set J % U; x holds
// the R rows interleaved: x[j * R + m].
template <int BITS, int R, int U, int J>
__attribute__((always_inline)) inline void step(__m256i v0, __m256i v1, const float* __restrict x,
                                                __m256 (*a)[R][2]) {
  const __m256 q0 = code<BITS, J>(v0), q1 = code<BITS, J>(v1);
#pragma GCC unroll 4
  for (int m = 0; m < R; ++m) {
    const __m256 xb = _mm256_broadcast_ss(x + J * R + m);
    a[J % U][m][0] = _mm256_fmadd_ps(xb, q0, a[J % U][m][0]);
    a[J % U][m][1] = _mm256_fmadd_ps(xb, q1, a[J % U][m][1]);
  }
}

template <int BITS, int R, int U, int... J>
__attribute__((always_inline)) inline void unit(const int32_t* w, const float* x,
                                                __m256 (*a)[R][2],
                                                std::integer_sequence<int, J...>) {
  const __m256i v0 = _mm256_loadu_si256((const __m256i*)w);
  const __m256i v1 = _mm256_loadu_si256((const __m256i*)(w + 8));
  (step<BITS, R, U, J>(v0, v1, x, a), ...);
}

// acc[m][16] (rows m0 .. m0 + R, zeroed by the caller) += the block's outputs for those rows;
// the group totals go through acc (L1), so that only the group's sums take registers
template <int BITS, int R, int U, typename S>
void rows(const Geo& g, const S& sc, int64_t b, int64_t m0, float* __restrict acc) {
  constexpr int P = 32 / BITS;
  const int64_t G = g.G;
  const int32_t* wb = g.codes + b * g.units * NB;
  const float* x = g.xs + m0 * g.K;  // the R rows interleaved: [K][R]
  for (int64_t grp = 0; grp < G; ++grp) {
    __m256 a[U][R][2];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m) a[u][m][0] = a[u][m][1] = _mm256_setzero_ps();
    const int64_t u1 = std::min(g.units, (grp + 1) * g.gsu);
    for (int64_t u = grp * g.gsu; u < u1; ++u)
      unit<BITS, R, U>(wb + u * NB, x + u * P * R, a, std::make_integer_sequence<int, P>());
    __m256 s0, s1, z0, z1;
    sc.get(b, grp, s0, s1, z0, z1);
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m) {
      __m256 p0, p1;
      sum_sets<U, R>(a, m, p0, p1);
      const __m256 sxb = _mm256_broadcast_ss(g.sx + (m0 + m) * G + grp);
      float* t = acc + (m0 + m) * NB;
      _mm256_storeu_ps(t, _mm256_fnmadd_ps(z0, sxb, _mm256_fmadd_ps(s0, p0, _mm256_loadu_ps(t))));
      _mm256_storeu_ps(t + 8,
                       _mm256_fnmadd_ps(z1, sxb, _mm256_fmadd_ps(s1, p1, _mm256_loadu_ps(t + 8))));
    }
  }
}

template <int BITS, typename S>
void passes(const Geo& g, const S& sc, int64_t b, float* acc) {
  int64_t m0 = 0;
  for (; m0 + RB <= g.M; m0 += RB) rows<BITS, RB, 1>(g, sc, b, m0, acc);
  switch (g.M - m0) {
    case 1: rows<BITS, 1, 4>(g, sc, b, m0, acc); break;
    case 2: rows<BITS, 2, 2>(g, sc, b, m0, acc); break;
    case 3: rows<BITS, 3, 1>(g, sc, b, m0, acc); break;
    default: break;
  }
}

// acc: M * 16 floats, then G * 2 * 16 for the block's decoded scales
template <int BITS>
void block(const Geo& g, int64_t b, float* acc) {
  std::fill(acc, acc + g.M * NB, 0.0f);
  if (g.M <= RB) passes<BITS>(g, g.sz, b, acc);
  else passes<BITS>(g, Decoded(g.sz, b, acc + g.M * NB), b, acc);
}

template <typename T>
void write_out(const Geo& g, const float* acc, int64_t b, T* out) {
  const int64_t n0 = b * NB, cols = std::min<int64_t>(NB, g.N - n0);
  for (int64_t m = 0; m < g.M; ++m) store16(out + m * g.N + n0, acc + m * NB, 1.0f, cols);
}

template <int BITS, typename T>
void run(const Geo& g, T* out) {
  const int64_t blocks = (g.N + NB - 1) / NB;
  parallel_blocks(blocks, g.units * NB * 4, [&](int64_t begin, int64_t end) {
    std::vector<float> acc((g.M + g.G * 2) * NB);
    for (int64_t b = begin; b < end; ++b) {
      block<BITS>(g, b, acc.data());
      write_out(g, acc.data(), b, out);
    }
  });
}

template <typename T>
void run(const Geo& g, int bits, T* out) {
  if (bits == 4) run<4>(g, out); else run<8>(g, out);
}

}  // namespace

// The checks both entry points make on their arguments after FloatRows has checked x (the
// layout's shapes come after)
static void check_args(const torch::Tensor& x, const torch::Tensor& out,
                       const torch::Tensor& codes, const torch::Tensor& scales,
                       const torch::Tensor& zeros, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == x.size(0) &&
              (out.dtype() == torch::kFloat32 || out.dtype() == torch::kBFloat16 ||
               out.dtype() == torch::kFloat16),
              "out must be a contiguous float32 / bfloat16 / float16 [M, N] matrix");
  TORCH_CHECK(codes.dtype() == torch::kInt32 && codes.is_contiguous() && codes.dim() == 3 &&
              codes.size(2) == NB, "codes: int32 [N/16, units, 16]");
  TORCH_CHECK((scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kBFloat16 ||
               scales.dtype() == torch::kFloat16) && scales.is_contiguous() &&
              scales.dim() == 3 && scales.size(0) == codes.size(0) && scales.size(2) == NB,
              "scales: float32 / bfloat16 / float16 [N/16, G, 16]");
  TORCH_CHECK((zeros.dtype() == torch::kUInt8 || zeros.dtype() == torch::kFloat32) &&
              zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "zeros: uint8 / float32, the scales' shape");
}

// The kernels' view of checked scales and zero points (see Scales)
static Scales scales_of(const torch::Tensor& scales, const torch::Tensor& zeros) {
  const auto t = scales.dtype();
  const int s_kind = t == torch::kFloat32 ? 0 : t == torch::kBFloat16 ? 1 : 2;
  return Scales{scales.data_ptr(), zeros.data_ptr(), s_kind,
                zeros.dtype() == torch::kUInt8 ? 0 : 1, scales.size(1)};
}

// out [M, N] (float32, bfloat16 or float16) = x [M, Kx] (float32, bfloat16 or float16; Kx <= K
// padded) @ W.T
void wna16_avx2_gemm(torch::Tensor x, torch::Tensor out, torch::Tensor codes,
                     torch::Tensor scales, torch::Tensor zeros, int64_t bits, int64_t group_size) {
  const FloatRows xf(x);
  check_args(x, out, codes, scales, zeros, bits);
  const int64_t P = 32 / bits, M = x.size(0), Kx = x.size(1), N = out.size(1);
  const int64_t units = codes.size(1), K = units * P, G = scales.size(1);
  const int64_t blocks = (N + NB - 1) / NB;
  TORCH_CHECK(codes.size(0) == blocks, "N does not match the layout");
  TORCH_CHECK(Kx <= K && K - Kx < P, "x's features do not match the layout's rows");
  TORCH_CHECK(group_size > 0 && group_size % P == 0 && (K + group_size - 1) / group_size == G,
              "the group size must be a multiple of 32 / bits and give the scales' groups");
  if (M == 0 || N == 0) return;
  // x pre-scaled by 2^-(j * bits) for code j of a lane (the last one: by 1), zero-padded to K,
  // its rows interleaved by passes (rows m0 .. m0 + R as [K][R]), and the group sums of x
  std::vector<float> xs(M * K, 0.0f), sx(M * G, 0.0f);
  const float* xp = xf.p;
  float pw[8];
  for (int j = 0; j < P; ++j) pw[j] = j == P - 1 ? 1.0f : std::ldexp(1.0f, -(int)(j * bits));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < Kx; ++k) {
      const float v = xp[m * Kx + k];
      const int64_t m0 = m / RB * RB, r = std::min<int64_t>(RB, M - m0);
      xs[m0 * K + k * r + (m - m0)] = v * pw[k % P];
      sx[m * G + k / group_size] += v;
    }
  }
  Geo g{M, N, K, units, G, group_size / P, codes.data_ptr<int32_t>(), scales_of(scales, zeros),
        xs.data(), sx.data()};
  if (out.dtype() == torch::kFloat32) run(g, (int)bits, out.data_ptr<float>());
  else if (out.dtype() == torch::kBFloat16) run(g, (int)bits, (c10::BFloat16*)out.data_ptr());
  else run(g, (int)bits, (c10::Half*)out.data_ptr());
}

// ---------------------------------------------------------------------------------------------
// Integer activations, the same layout: x quantized per row (dynamic, symmetric: q = round(x *
// QMAX / max|x|), scale max|x| / QMAX) and multiplied in integers. A lane of a unit is one
// output's codes, so multiply-adds of 16-bit pairs (vpmaddwd) or byte pairs (vpmaddubsw, then
// vpmaddwd by ones) give that output's sums in its own int32 lane: no horizontal sums.
//   A = 8 (kernel cpu-avx2-a8, opt-in; QMAX 127):
//     int4: a byte of a lane holds two codes (rows 2i and 2i + 1 of the unit), each 0..15, the
//           unsigned operand as they are (15 * 127 * 4 fits int16); x's bytes are arranged once
//           per call to match: even rows, then odd rows, per unit.
//     int8: codes 0..255 would overflow int16, so w = code - 128 (signed) multiplies as
//           |w| * (x * sign w) (|w| <= 128 unsigned, |x| <= 127: 2 * 128 * 127 fits int16),
//           and 128 * (sum q) is added back per chunk.
//   A = 16 (cpu-avx2-wna16's path for bf16 / fp16 rows; QMAX 32767): (v >> s) & 0x000F000F
//     (int4; 0x00FF00FF for int8) puts codes j and j + P/2 of a lane in its two 16-bit halves
//     (the last pair by a 16-bit shift alone); x's 16-bit values are paired to match. Sums are
//     flushed to float32 every chunk of rows small enough that int32 cannot overflow: 2048
//     rows for int4, 256 for int8 (256 * 255 * 32767 < 2^31).
// Per chunk (a group, or a part of one) and output: s * (sum q c) - s z * (sum q), in float32;
// times the row's scale at the end.
//   QR_VNNI (kernels cpu-vnni-wna16, cpu-vnni-a8): a unit is one 512-bit register; vpdpwssd
//     (A = 16) and vpdpbusd (A = 8, the codes unsigned as they are: int8 needs no offset, its
//     chunks at most 65536 rows) multiply and add in one instruction; passes of 8 rows.
namespace ia {

constexpr int NB = 16;
#ifdef QR_VNNI
constexpr int RB = 8;  // 32 registers: 8 rows' accumulators and the decoded codes
#else
constexpr int RB = 4;
#endif

struct Geo {
  int64_t M, N, units, G, gsu, csu, C;  // C chunks of csu units; csu divides gsu
  const int32_t* codes;  // [N/16][units][16]
  Scales sz;
  const int32_t* xq;     // each pass's rows: [units][D][R] dwords of activation bytes / halves
  const float* sq;       // [M][C][2]: sum of q per chunk, and 128 times it (for A = 8, int8)
  const float* sx;       // [M]: the row's scale (NaN for a row with a non-finite value)
};

template <int BITS, int A>
constexpr int dwords() { return A == 8 ? (BITS == 4 ? 2 : 1) : (BITS == 4 ? 4 : 2); }

// Integer adds are associative, so GCC regroups a unit's products into a tree of sums before
// they reach the accumulators, which needs more registers than there are: the products spill
// to the stack (int4 at M >= 4 ran 1.2x slower so). This empty asm makes each accumulator's
// value a register the compiler must have after every add, which keeps the adds in order.
__attribute__((always_inline)) inline void settle(__m256i (&a)[2]) {
  __asm__("" : "+x"(a[0]), "+x"(a[1]));
}

template <int BITS, int A, int R>
__attribute__((always_inline)) inline void unit(const int32_t* w, const int32_t* x,
                                                __m256i (*a)[2]) {
  const __m256i v0 = _mm256_loadu_si256((const __m256i*)w);
  const __m256i v1 = _mm256_loadu_si256((const __m256i*)(w + 8));
  if constexpr (A == 16) {
    constexpr int J = BITS == 4 ? 4 : 2;
    const __m256i mask = _mm256_set1_epi32(BITS == 4 ? 0x000F000F : 0x00FF00FF);
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      const __m256i c0 = j == J - 1 ? _mm256_srli_epi16(v0, j * BITS)
                                    : _mm256_and_si256(_mm256_srli_epi32(v0, j * BITS), mask);
      const __m256i c1 = j == J - 1 ? _mm256_srli_epi16(v1, j * BITS)
                                    : _mm256_and_si256(_mm256_srli_epi32(v1, j * BITS), mask);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m) {
        const __m256i xb = _mm256_set1_epi32(x[j * R + m]);
        a[m][0] = _mm256_add_epi32(a[m][0], _mm256_madd_epi16(c0, xb));
        a[m][1] = _mm256_add_epi32(a[m][1], _mm256_madd_epi16(c1, xb));
        settle(a[m]);
      }
    }
  } else if constexpr (BITS == 4) {
    const __m256i ones = _mm256_set1_epi16(1), lo = _mm256_set1_epi8(0x0F);
    const __m256i l0 = _mm256_and_si256(v0, lo), l1 = _mm256_and_si256(v1, lo);
    const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo);
    const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo);
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m) {
      const __m256i xl = _mm256_set1_epi32(x[m]), xh = _mm256_set1_epi32(x[R + m]);
      const __m256i p0 =
          _mm256_add_epi16(_mm256_maddubs_epi16(l0, xl), _mm256_maddubs_epi16(h0, xh));
      const __m256i p1 =
          _mm256_add_epi16(_mm256_maddubs_epi16(l1, xl), _mm256_maddubs_epi16(h1, xh));
      a[m][0] = _mm256_add_epi32(a[m][0], _mm256_madd_epi16(p0, ones));
      a[m][1] = _mm256_add_epi32(a[m][1], _mm256_madd_epi16(p1, ones));
      settle(a[m]);
    }
  } else {
    const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8((char)0x80);
    const __m256i w0 = _mm256_xor_si256(v0, bias), w1 = _mm256_xor_si256(v1, bias);
    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m) {
      const __m256i xb = _mm256_set1_epi32(x[m]);
      const __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, w0));
      const __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, w1));
      a[m][0] = _mm256_add_epi32(a[m][0], _mm256_madd_epi16(p0, ones));
      a[m][1] = _mm256_add_epi32(a[m][1], _mm256_madd_epi16(p1, ones));
      settle(a[m]);
    }
  }
}

#ifdef QR_VNNI
// AVX512-VNNI (the wna16_vnni build of this file): a unit is one register of 16 lanes, and
// one instruction multiplies and adds where AVX2 takes two -- vpdpwssd (16-bit pairs, A = 16)
// and vpdpbusd (unsigned codes times signed activation bytes, A = 8: int8 codes need no
// offset). U accumulator sets (step j into set j % U) keep few rows from waiting on the
// instruction's latency (4 rows: 2 sets, 8 accumulators). The int16 path's sums are the AVX2
// build's, exactly.
template <int R>
constexpr int sets() { return R > 4 ? 1 : R == 1 ? 4 : 2; }

// Each unit asks for the weights 128 units (8 KiB) ahead (the AVX2 build: 2 KiB). Measured on
// a 2-core Zen 5 against 2 KiB: M = 1 1.2-1.3x faster while the machine read at 65 GB/s, level
// while it read at 40; M = 4 1.1-1.4x; 12-16 KiB no faster
constexpr int64_t AHEAD = 128;  // units

// acc += the products, in place. Through the intrinsics GCC 12 copied every accumulator to a
// scratch register and back around each instruction (two moves per multiply-add, and spills:
// int8 activations at M = 64 ran at 56 % of vpdpbusd's rate); asm keeps acc where it is
__attribute__((always_inline)) inline void dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}
__attribute__((always_inline)) inline void dpwssd(__m512i& acc, __m512i a, __m512i b) {
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}
// the same with the dword at p broadcast by the instruction itself ({1to16}): one instruction
// where a vpbroadcastd and a multiply-add took two
__attribute__((always_inline)) inline void dpbusd_at(__m512i& acc, __m512i u8, const int32_t* p) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*p));
}
__attribute__((always_inline)) inline void dpwssd_at(__m512i& acc, __m512i a, const int32_t* p) {
  __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*p));
}

// a[k][m] += c[k] times the dword at p for every block k (vpdpwssd when WORDS, else vpdpbusd).
// One block a pass (M <= 8) takes the broadcast inside the multiply-add: M = 4 int4 2.14 ->
// 1.67 ms with 2 sets at 4 rows (before both, one process on a 2-core Zen 5); two blocks share
// one vpbroadcastd (fused into both multiply-adds, M = 64 ran 1.1x slower)
template <bool WORDS, int NBK, int R>
__attribute__((always_inline)) inline void madd(__m512i (*a)[R], int m, const __m512i* c,
                                                const int32_t* p) {
  if constexpr (NBK == 1) {
    if constexpr (WORDS) dpwssd_at(a[0][m], c[0], p);
    else dpbusd_at(a[0][m], c[0], p);
  } else {
    const __m512i xb = _mm512_set1_epi32(*p);
#pragma GCC unroll 2
    for (int k = 0; k < NBK; ++k) {
      if constexpr (WORDS) dpwssd(a[k][m], c[k], xb);
      else dpbusd(a[k][m], c[k], xb);
    }
  }
}

__attribute__((always_inline)) inline __m512 join(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                             _mm256_castps_pd(hi), 1));
}

// NBK blocks' units (NBK <= 2) times R rows: each activation broadcast feeds every block, so
// two blocks (32 outputs) load half the broadcasts a block alone does (M = 64: 1.05-1.1x)
template <int BITS, int A, int R, int NBK>
__attribute__((always_inline)) inline void unit(const int32_t* const* w, int64_t u,
                                                const int32_t* x, __m512i (*a)[NBK][R]) {
  constexpr int U = sets<R>();
  __m512i v[NBK];
#pragma GCC unroll 2
  for (int k = 0; k < NBK; ++k) v[k] = _mm512_loadu_si512((const void*)(w[k] + u * NB));
  if constexpr (A == 16) {
    constexpr int J = BITS == 4 ? 4 : 2;
    const __m512i mask = _mm512_set1_epi32(BITS == 4 ? 0x000F000F : 0x00FF00FF);
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      __m512i c[NBK];
#pragma GCC unroll 2
      for (int k = 0; k < NBK; ++k)
        c[k] = j == J - 1 ? _mm512_srli_epi16(v[k], j * BITS)
                          : _mm512_and_si512(_mm512_srli_epi32(v[k], j * BITS), mask);
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) madd<true, NBK>(a[j % U], m, c, x + j * R + m);
    }
  } else if constexpr (BITS == 4) {
    const __m512i lo = _mm512_set1_epi8(0x0F);
    __m512i l[NBK], h[NBK];
#pragma GCC unroll 2
    for (int k = 0; k < NBK; ++k) {
      l[k] = _mm512_and_si512(v[k], lo);
      h[k] = _mm512_and_si512(_mm512_srli_epi16(v[k], 4), lo);
    }
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      madd<false, NBK>(a[0], m, l, x + m);
      madd<false, NBK>(a[1 % U], m, h, x + R + m);
    }
  } else {
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) madd<false, NBK>(a[0], m, v, x + m);
  }
}

// acc[k][m][16] (blocks b .. b + NBK, rows m0 .. m0 + R; zeroed by the caller) += the blocks'
// chunk terms; sc[k]: block b + k's scales
template <int BITS, int A, int R, int NBK, typename S>
void rows(const Geo& g, const S* sc, int64_t b, int64_t m0, float* const* acc) {
  constexpr int D = dwords<BITS, A>(), U = sets<R>();
  const int32_t* w[NBK];
#pragma GCC unroll 2
  for (int k = 0; k < NBK; ++k) w[k] = g.codes + (b + k) * g.units * NB;
  const int32_t* x = g.xq + m0 * g.units * D;
  for (int64_t c = 0; c < g.C; ++c) {
    __m512i a[U][NBK][R];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 2
      for (int k = 0; k < NBK; ++k)
#pragma GCC unroll 8
        for (int m = 0; m < R; ++m) a[u][k][m] = _mm512_setzero_si512();
    const int64_t u1 = std::min(g.units, (c + 1) * g.csu);
    for (int64_t u = c * g.csu; u < u1; ++u) {
#pragma GCC unroll 2
      for (int k = 0; k < NBK; ++k) _mm_prefetch((const char*)(w[k] + (u + AHEAD) * NB), _MM_HINT_T0);
      unit<BITS, A, R, NBK>(w, u, x + u * D * R, a);
    }
#pragma GCC unroll 2
    for (int k = 0; k < NBK; ++k) {
      __m256 s0, s1, z0, z1;
      sc[k].get(b + k, c * g.csu / g.gsu, s0, s1, z0, z1);
      const __m512 s = join(s0, s1), z = join(z0, z1);  // the AVX2 build's float ops, 16 wide
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        __m512i t = a[0][k][m];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) t = _mm512_add_epi32(t, a[u][k][m]);
        const __m512 sqb = _mm512_set1_ps(g.sq[((m0 + m) * g.C + c) * 2]);
        float* o = acc[k] + (m0 + m) * NB;
        const __m512 r = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(t), _mm512_loadu_ps(o));
        _mm512_storeu_ps(o, _mm512_fnmadd_ps(z, sqb, r));
      }
    }
  }
}

#else
// acc[0][m][16] (rows m0 .. m0 + R, zeroed by the caller) += block b's chunk terms (sc[0]: its
// scales); the AVX2 build takes one block a pass (see run)
template <int BITS, int A, int R, int NBK, typename S>
void rows(const Geo& g, const S* scs, int64_t b, int64_t m0, float* const* accs) {
  static_assert(NBK == 1, "the AVX2 build takes one block a pass");
  const S& sc = scs[0];
  float* __restrict acc = accs[0];
  constexpr int D = dwords<BITS, A>();
  const int32_t* wb = g.codes + b * g.units * NB;
  const int32_t* x = g.xq + m0 * g.units * D;
  for (int64_t c = 0; c < g.C; ++c) {
    __m256i a[R][2];
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m) a[m][0] = a[m][1] = _mm256_setzero_si256();
    const int64_t u1 = std::min(g.units, (c + 1) * g.csu);
    for (int64_t u = c * g.csu; u < u1; ++u) {
      _mm_prefetch((const char*)(wb + (u + 32) * NB), _MM_HINT_T0);
      unit<BITS, A, R>(wb + u * NB, x + u * D * R, a);
    }
    __m256 s0, s1, z0, z1;
    sc.get(b, c * g.csu / g.gsu, s0, s1, z0, z1);
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m) {
      const float* q = g.sq + ((m0 + m) * g.C + c) * 2;
      __m256 p0 = _mm256_cvtepi32_ps(a[m][0]), p1 = _mm256_cvtepi32_ps(a[m][1]);
      if constexpr (A == 8 && BITS == 8) {  // codes - 128 were multiplied: add 128 * sum q
        const __m256 back = _mm256_broadcast_ss(q + 1);
        p0 = _mm256_add_ps(p0, back);
        p1 = _mm256_add_ps(p1, back);
      }
      const __m256 sqb = _mm256_broadcast_ss(q);
      float* t = acc + (m0 + m) * NB;
      _mm256_storeu_ps(t, _mm256_fnmadd_ps(z0, sqb, _mm256_fmadd_ps(s0, p0, _mm256_loadu_ps(t))));
      _mm256_storeu_ps(t + 8,
                       _mm256_fnmadd_ps(z1, sqb, _mm256_fmadd_ps(s1, p1, _mm256_loadu_ps(t + 8))));
    }
  }
}


#endif

template <int BITS, int A, int NBK, int R, typename S>
void remainder(const Geo& g, const S* sc, int64_t b, int64_t m0, float* const* acc) {
  if constexpr (R > 0) {
    if (g.M - m0 == R) rows<BITS, A, R, NBK>(g, sc, b, m0, acc);
    else remainder<BITS, A, NBK, R - 1>(g, sc, b, m0, acc);
  }
}

template <int BITS, int A, int NBK, typename S>
void passes(const Geo& g, const S* sc, int64_t b, float* const* acc) {
  int64_t m0 = 0;
  for (; m0 + RB <= g.M; m0 += RB) rows<BITS, A, RB, NBK>(g, sc, b, m0, acc);
  remainder<BITS, A, NBK, RB - 1>(g, sc, b, m0, acc);  // the last 1 .. RB - 1 rows
}

// NBK blocks from b: acc holds NBK * M * 16 floats, then NBK * G * 2 * 16 for the blocks'
// decoded scales (see Decoded)
template <int BITS, int A, int NBK>
void blocks(const Geo& g, int64_t b, float* acc) {
  std::fill(acc, acc + NBK * g.M * NB, 0.0f);
  float* parts[NBK];
  for (int k = 0; k < NBK; ++k) parts[k] = acc + k * g.M * NB;
  if (g.M <= RB) {
    Scales sc[NBK];
    for (int k = 0; k < NBK; ++k) sc[k] = g.sz;  // decoded in place: each pass reads them
    passes<BITS, A, NBK>(g, sc, b, parts);
    return;
  }
  float* dec = acc + NBK * g.M * NB;
  if constexpr (NBK == 2) {
    const Decoded sc[2] = {Decoded(g.sz, b, dec), Decoded(g.sz, b + 1, dec + g.G * 2 * NB)};
    passes<BITS, A, 2>(g, sc, b, parts);
  } else {
    const Decoded sc[1] = {Decoded(g.sz, b, dec)};
    passes<BITS, A, 1>(g, sc, b, parts);
  }
}

// Blocks per pass. The VNNI build takes two when a block takes several passes of rows (the last
// alone when their number is odd), else one: two blocks are two streams from memory, and one
// streams faster (M = 1: 1.15x). Measured on a Zen 5: pairs from M = 9 for A = 16 (M = 16:
// 1.05x), from M = 17 for A = 8 (at M = 16 one block was 1.05x faster; M = 32: level; M = 64:
// pairs 1.05x). The AVX2 build (16 registers) takes one.
template <int A>
int64_t blocks_a_pass(const Geo& g) {
#ifdef QR_VNNI
  return g.M > (A == 8 ? 16 : RB) ? 2 : 1;
#else
  return 1;
#endif
}

template <int BITS, int A, typename T>
void run(const Geo& g, T* out) {
  const int64_t n_blocks = (g.N + NB - 1) / NB, step = blocks_a_pass<A>(g);
  const int64_t groups = (n_blocks + step - 1) / step;
  parallel_blocks(groups, step * g.units * NB * 4, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(step * (g.M + g.G * 2) * NB);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = step * p, nbk = std::min(step, n_blocks - b);
#ifdef QR_VNNI
      if (nbk == 2) blocks<BITS, A, 2>(g, b, acc.data());
      else blocks<BITS, A, 1>(g, b, acc.data());
#else
      blocks<BITS, A, 1>(g, b, acc.data());
#endif
      for (int64_t k = 0; k < nbk; ++k) {
        const int64_t n0 = (b + k) * NB, cols = std::min<int64_t>(NB, g.N - n0);
        const float* a = acc.data() + k * g.M * NB;
        for (int64_t m = 0; m < g.M; ++m) store16(out + m * g.N + n0, a + m * NB, g.sx[m], cols);
      }
    }
  });
}

// Units per chunk: the group's, or for A = 16 its largest divisor that keeps int32 sums safe
int64_t chunk_units(int bits, int act, int64_t gsu) {
#ifdef QR_VNNI
  // A = 8 multiplies unsigned int8 codes (AVX2: code - 128): 4 * 255 * 127 a unit, so at most
  // 2^31 / 129540 units a chunk (16577); int4's 8 * 15 * 127 allow 140000 units
  if (act == 8 && bits == 4) return gsu;
  const int64_t limit = act == 8 ? 16384 : bits == 4 ? 2048 / 8 : 256 / 4;
#else
  if (act == 8) return gsu;
  const int64_t limit = bits == 4 ? 2048 / 8 : 256 / 4;
#endif
  int64_t c = std::min(gsu, limit);
  while (gsu % c) --c;
  return c;
}

// A row's largest magnitude, its sum of squares (in float64) and whether it is all finite
struct RowStats {
  float amax;
  double squares;
  bool finite;
};

RowStats row_stats(const float* row, int64_t Kx) {
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  __m256 vmax = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 8 <= Kx; k += 8) {
    const __m256 v = _mm256_loadu_ps(row + k), a = _mm256_andnot_ps(sign, v);
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, inf, _CMP_LT_OQ));  // false for inf and NaN
    vmax = _mm256_max_ps(vmax, a);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_fmadd_pd(lo, lo, s0);
    s1 = _mm256_fmadd_pd(hi, hi, s1);
  }
  alignas(32) float m8[8];
  alignas(32) double d4[4];
  _mm256_store_ps(m8, vmax);
  _mm256_store_pd(d4, _mm256_add_pd(s0, s1));
  RowStats st{0.0f, d4[0] + d4[1] + d4[2] + d4[3], _mm256_movemask_ps(ok) == 0xFF};
  for (float v : m8) st.amax = std::max(st.amax, v);
  for (; k < Kx; ++k) {
    st.finite = st.finite && std::isfinite(row[k]);
    st.amax = std::max(st.amax, std::fabs(row[k]));
    st.squares += (double)row[k] * row[k];
  }
  return st;
}

// q[k] = round(row[k] * inv) (half to even, as nearbyint), clamped to +-qmax
void round_row(const float* row, int64_t Kx, float inv, float qmax, int32_t* q) {
  const __m256 vi = _mm256_set1_ps(inv), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  int64_t k = 0;
  for (; k + 8 <= Kx; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + k), vi),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 c = _mm256_max_ps(lo, _mm256_min_ps(hi, r));
    _mm256_storeu_si256((__m256i*)(q + k), _mm256_cvtps_epi32(c));
  }
  for (; k < Kx; ++k) q[k] = (int32_t)std::max(-qmax, std::min(qmax, std::nearbyint(row[k] * inv)));
}

// Row m of x quantized (q: K codes, zero-padded) and written where the kernel reads it: its
// pass's dwords, its chunk sums (sq) and its scale (sx). Returns whether the row is left to
// the float path (limit > 0: its largest magnitude exceeds limit x its RMS, or it is not
// finite; its q are zeros and the caller computes it).
bool quantize_row(const float* row, int64_t Kx, int64_t m, int bits, int act, double limit,
                  const Geo& g, int32_t* q, int32_t* xq, float* sq, float* sx) {
  const int P = 32 / bits, D = act == 8 ? (bits == 4 ? 2 : 1) : (bits == 4 ? 4 : 2);
  const float qmax = act == 8 ? 127.0f : 32767.0f;
  const RowStats st = row_stats(row, Kx);
  const bool away = limit > 0.0 && !(st.amax <= limit * std::sqrt(st.squares / (double)Kx));
  const bool used = st.finite && !away && st.amax > 0.0f;
  sx[m] = away ? 0.0f : st.finite ? st.amax / qmax : std::numeric_limits<float>::quiet_NaN();
  std::fill(q, q + g.units * P, 0);
  if (used) round_row(row, Kx, qmax / st.amax, qmax, q);
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t k0 = c * g.csu * P, k1 = std::min<int64_t>(g.units * P, k0 + g.csu * P);
    int64_t sum = 0;
    for (int64_t k = k0; k < k1; ++k) sum += q[k];
    sq[(m * g.C + c) * 2] = (float)sum;
    sq[(m * g.C + c) * 2 + 1] = 128.0f * (float)sum;
  }
  const int64_t m0 = m / RB * RB, r = std::min<int64_t>(RB, g.M - m0);
  int32_t* dst = xq + m0 * g.units * D;
  for (int64_t u = 0; u < g.units; ++u) {
    const int32_t* qu = q + u * P;
    for (int d = 0; d < D; ++d) {
      uint32_t word = 0;
      if (act == 8) {
        for (int i = 0; i < 4; ++i)
          word |= (uint32_t)(uint8_t)(int8_t)(bits == 4 ? qu[2 * i + d] : qu[i]) << (8 * i);
      } else {  // codes d and d + P/2 of a lane: the two 16-bit halves
        word = (uint32_t)(uint16_t)(int16_t)qu[d] |
               (uint32_t)(uint16_t)(int16_t)qu[d + P / 2] << 16;
      }
      dst[(u * D + d) * r + (m - m0)] = (int32_t)word;
    }
  }
  return away;
}

// Every row of x quantized (see quantize_row), passes of rows in parallel (a pass's rows share
// cache lines); the rows left to the float path are added to fallback, in order
void quantize(const float* xp, int64_t Kx, int bits, int act, double limit, const Geo& g,
              std::vector<int32_t>& xq, std::vector<float>& sq, std::vector<float>& sx,
              std::vector<int64_t>& fallback) {
  std::vector<char> away(g.M, 0);
  const int64_t passes = (g.M + RB - 1) / RB, K = g.units * (32 / bits);
  at::parallel_for(0, passes, 1, [&](int64_t p0, int64_t p1) {
    std::vector<int32_t> q(K);
    for (int64_t m = p0 * RB; m < std::min(g.M, p1 * RB); ++m)
      away[m] = quantize_row(xp + m * Kx, Kx, m, bits, act, limit, g, q.data(), xq.data(),
                             sq.data(), sx.data());
  });
  for (int64_t m = 0; m < g.M; ++m)
    if (away[m]) fallback.push_back(m);
}

template <typename T>
void dispatch(const Geo& g, int bits, int act, T* out) {
  if (act == 8) { if (bits == 4) run<4, 8>(g, out); else run<8, 8>(g, out); }
  else { if (bits == 4) run<4, 16>(g, out); else run<8, 16>(g, out); }
}

}  // namespace ia

// out [M, N] (float32, bfloat16 or float16) = x [M, Kx] (float32, bfloat16 or float16) @ W.T
// with x quantized per row to `act`-bit integers (8 or 16; see the integer-activation section
// above). With limit > 0 a row whose largest magnitude exceeds limit x its RMS, or that holds
// a non-finite value, is computed by the float path (wna16_avx2_gemm) instead.
void wxa_avx2_gemm(torch::Tensor x, torch::Tensor out, torch::Tensor codes, torch::Tensor scales,
                   torch::Tensor zeros, int64_t bits, int64_t group_size, int64_t act,
                   double limit) {
  const FloatRows xf(x);
  check_args(x, out, codes, scales, zeros, bits);
  TORCH_CHECK(act == 8 || act == 16, "act must be 8 or 16");
  const int64_t P = 32 / bits, M = x.size(0), Kx = x.size(1), N = out.size(1);
  const int64_t units = codes.size(1), K = units * P, G = scales.size(1);
  const int64_t D = act == 8 ? (bits == 4 ? 2 : 1) : (bits == 4 ? 4 : 2);
  TORCH_CHECK(codes.size(0) == (N + ia::NB - 1) / ia::NB, "N does not match the layout");
  TORCH_CHECK(Kx <= K && K - Kx < P, "x's features do not match the layout's rows");
  TORCH_CHECK(group_size > 0 && group_size % P == 0 && (K + group_size - 1) / group_size == G,
              "the group size must be a multiple of 32 / bits and give the scales' groups");
  if (M == 0 || N == 0) return;
  const int64_t gsu = group_size / P, csu = ia::chunk_units((int)bits, (int)act, gsu);
  ia::Geo g{M, N, units, G, gsu, csu, (units + csu - 1) / csu, codes.data_ptr<int32_t>(),
            scales_of(scales, zeros), nullptr, nullptr, nullptr};
  std::vector<int32_t> xq(M * units * D);
  std::vector<float> sq(M * g.C * 2), sx(M);
  std::vector<int64_t> fallback;
  ia::quantize(xf.p, Kx, (int)bits, (int)act, limit, g, xq, sq, sx, fallback);
  g.xq = xq.data();
  g.sq = sq.data();
  g.sx = sx.data();
  if (out.dtype() == torch::kFloat32) ia::dispatch(g, (int)bits, (int)act, out.data_ptr<float>());
  else if (out.dtype() == torch::kBFloat16)
    ia::dispatch(g, (int)bits, (int)act, (c10::BFloat16*)out.data_ptr());
  else ia::dispatch(g, (int)bits, (int)act, (c10::Half*)out.data_ptr());
  if (fallback.empty()) return;
  // the rows left to the float path, in one call: one more pass over the weights, not one a row
  const torch::Tensor rows = torch::tensor(fallback, torch::kLong);
  torch::Tensor part = torch::empty({(int64_t)fallback.size(), N}, out.options());
  wna16_avx2_gemm(x.index_select(0, rows), part, codes, scales, zeros, bits, group_size);
  out.index_copy_(0, rows, part);
}

// What the Python side calls (see in_row_tiles): x [M, Kx] @ W.T as a new [M, n] matrix in x's
// dtype, by the float path (act 0, wna16_avx2_gemm) or act-bit integer activations (8 / 16,
// wxa_avx2_gemm with limit)
torch::Tensor avx2_int_mm(torch::Tensor x, int64_t n, torch::Tensor codes, torch::Tensor scales,
                          torch::Tensor zeros, int64_t bits, int64_t group_size, int64_t act,
                          double limit, int64_t tile_bytes) {
  TORCH_CHECK(act == 0 || act == 8 || act == 16, "act must be 0 (the float path), 8 or 16");
  return in_row_tiles(x, n, tile_bytes, [&](const torch::Tensor& xt, const torch::Tensor& ot) {
    if (act == 0) wna16_avx2_gemm(xt, ot, codes, scales, zeros, bits, group_size);
    else wxa_avx2_gemm(xt, ot, codes, scales, zeros, bits, group_size, act, limit);
  });
}
