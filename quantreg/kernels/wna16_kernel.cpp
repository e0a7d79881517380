// quantreg's weight-only int4/int8 CPU matmul; built and called by quantreg/kernels/cpu.py.
//
// One layout, three paths (chosen by the caller per call):
//   path 0  float32 activations, AVX-512 FMA; every weight (q - z) * s rounded to the scale dtype
//   path 1  bf16 activations, AVX512-BF16 vdpbf16ps, for a few rows
//   path 2  bf16 activations, AMX tdpbf16ps, for many rows
// Paths 1 and 2 convert codes to bf16 without rounding: a 4-bit code q becomes 128 + q by
// OR-ing its bits into the mantissa of 128.0 (0x4300), an 8-bit code becomes q - 128. Per
// group the kernel accumulates sum x * (q + c) in float32 and the epilogue adds
// s * (acc - (z + c) * sum x) to the output.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int NB = 16;  // outputs per block: one register of float32
constexpr int KU = 32;  // K is padded to a multiple of 32: one AMX tile row of bf16

struct Geo {
  int64_t M, N, Kp, gs, G, bits, blk_bytes;
  const uint8_t* codes;  // [N/16][blk_bytes]: int4 32-byte units of 4 rows, int8 of 2 rows
  const void* scales;    // [N/16][G][16] float32 / float16 / bfloat16
  int sdt;               // 0 float32, 1 float16, 2 bfloat16
  const uint8_t* zeros;  // [N/16][G][16] unsigned zero points
  float* out;            // [M][N], zero-initialised; every path adds into it
};

inline __m512 load_scales(const Geo& g, int64_t off) {
  if (g.sdt == 0) return _mm512_loadu_ps((const float*)g.scales + off);
  const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)g.scales + off));
  if (g.sdt == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load_zeros(const Geo& g, int64_t off) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(g.zeros + off))));
}

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

inline int64_t group_end(const Geo& g, int64_t grp) { return std::min(g.Kp, (grp + 1) * g.gs); }

// ---------------------------------------------------------------- path 0: float32, exact

// An int4 unit holds, at byte 2o + j, output o's codes for rows j and j + 2 (high nibble);
// vpermb regroups it as [j][o]: 16 bytes per row. An int8 unit is already [j][o].
template <int BITS>
inline __m256i rows_of_unit(const uint8_t* p) {
  if (BITS == 8) return _mm256_loadu_si256((const __m256i*)p);
  const __m256i idx = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm256_permutexvar_epi8(idx, _mm256_loadu_si256((const __m256i*)p));
}

template <int BITS, int MR>
void exact_rows(const Geo& g, const float* x, int64_t b, int64_t m0, int64_t mode) {
  constexpr int STEP = BITS == 4 ? 4 : 2;  // rows per unit
  const uint8_t* blk = g.codes + b * g.blk_bytes;
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < g.G; ++grp) {
    const int64_t off = (b * g.G + grp) * NB;
    const __m512 s = load_scales(g, off), z = load_zeros(g, off);
    for (int64_t k = grp * g.gs; k < group_end(g, grp); k += STEP) {
      const __m256i u = rows_of_unit<BITS>(blk + (k / STEP) * 32);
      const __m512i v0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(u));
      const __m512i v1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(u, 1));
      __m512i q[STEP];
      if (BITS == 4) {
        const __m512i lo = _mm512_set1_epi32(0xF);
        q[0] = _mm512_and_si512(v0, lo);
        q[1] = _mm512_and_si512(v1, lo);
        q[STEP / 2] = _mm512_srli_epi32(v0, 4);  // rows 4t + 2 and 4t + 3
        q[STEP - 1] = _mm512_srli_epi32(v1, 4);
      } else {
        q[0] = v0;
        q[1] = v1;
      }
#pragma GCC unroll 4
      for (int c = 0; c < STEP; ++c) {
        const __m512 w = round_to(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q[c]), z), s), mode);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[(m0 + m) * g.Kp + k + c]), w, acc[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(g.out + (m0 + m) * g.N + b * NB, acc[m]);
}

template <int BITS>
void exact_block(const Geo& g, const float* x, int64_t b, int64_t mode) {
  int64_t m0 = 0;
  for (; m0 + 4 <= g.M; m0 += 4) exact_rows<BITS, 4>(g, x, b, m0, mode);
  switch (g.M - m0) {
    case 1: exact_rows<BITS, 1>(g, x, b, m0, mode); break;
    case 2: exact_rows<BITS, 2>(g, x, b, m0, mode); break;
    case 3: exact_rows<BITS, 3>(g, x, b, m0, mode); break;
    default: break;
  }
}

// ------------------------------------------------- shared by the bf16 paths: codes -> bf16

#define QR_BF16 __attribute__((target("avx512bf16")))

constexpr int kMagic4 = 0x43004300;  // bf16 128.0, twice

// One 32-byte unit as bf16 pair rows. int4: rows (4t, 4t+1) and (4t+2, 4t+3) as 128 + q, the
// code OR-ed into the mantissa of 128.0. int8: rows (2p, 2p+1) as q - 128, converted exactly.
template <int BITS>
QR_BF16 inline void unit_rows(const uint8_t* p, __m512i* rows) {
  if (BITS == 4) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
    const __m512i magic = _mm512_set1_epi32(kMagic4);
    rows[0] = _mm512_ternarylogic_epi32(w, _mm512_set1_epi32(0x000F000F), magic, 0xEA);
    rows[1] = _mm512_or_si512(_mm512_srli_epi16(w, 4), magic);
  } else {
    const __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)p),
                                       _mm256_set1_epi8((char)0x80));
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(u)));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(u, 1)));
    // small integers: bf16 is the high half of float32; interleave rows 2p and 2p + 1
    rows[0] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 16),
                                        _mm512_castps_si512(b), _mm512_set1_epi32((int)0xFFFF0000),
                                        0xF8);
  }
}

// A group's scale and shifted zero point for one block: out += s * (acc - zc * sum x).
struct Coef {
  __m512 s, zc;
};

inline Coef coef(const Geo& g, int64_t b, int64_t grp) {
  const int64_t off = (b * g.G + grp) * NB;
  const float c = g.bits == 4 ? 128.0f : -128.0f;  // the offset the bf16 codes carry
  return {load_scales(g, off), _mm512_add_ps(load_zeros(g, off), _mm512_set1_ps(c))};
}

inline void accumulate_at(float* o, const Coef& c, float xs, __m512 acc) {
  const __m512 r = _mm512_fnmadd_ps(c.zc, _mm512_set1_ps(xs), acc);
  _mm512_storeu_ps(o, _mm512_fmadd_ps(c.s, r, _mm512_loadu_ps(o)));
}

inline void accumulate(const Geo& g, const Coef& c, int64_t b, int64_t m, float xs, __m512 acc) {
  accumulate_at(g.out + m * g.N + b * NB, c, xs, acc);
}

// ---------------------------------------------------------- path 1: bf16, vdpbf16ps

// Every loop over rows, blocks and pairs is unrolled (the last one too, which reads the
// accumulators by index) and the blocks' code pointers and x's row stride are locals: otherwise
// GCC kept the accumulators on the stack and reloaded g's fields on every step (a load, a store
// and a multiply of g.blk_bytes around each multiply-add). On a 2-core Zen 5, two A/B runs:
// int4 1.06-1.16x at M = 4, 1.04x at M = 16, 1.02-1.03x at M = 64; M = 1 and int8 level; the
// same results bit for bit
template <int BITS, int MR, int NBK>
QR_BF16 void dot_rows(const Geo& g, const uint16_t* xb, const float* xsum, int64_t b0, int64_t m0) {
  constexpr int STEP = BITS == 4 ? 4 : 2;  // input rows per unit
  constexpr int PAIRS = STEP / 2;          // pair rows per unit
  const int64_t kp = g.Kp;
  const uint8_t* blk[NBK];
#pragma GCC unroll 8
  for (int j = 0; j < NBK; ++j) blk[j] = g.codes + (b0 + j) * g.blk_bytes;
  const uint16_t* xr = xb + m0 * kp;
  for (int64_t grp = 0; grp < g.G; ++grp) {
    __m512 acc[MR][NBK];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < NBK; ++j) acc[m][j] = _mm512_setzero_ps();
    const int64_t k1 = group_end(g, grp);
    for (int64_t k = grp * g.gs; k < k1; k += STEP) {
      __m512i xv[PAIRS][MR];
#pragma GCC unroll 2
      for (int p = 0; p < PAIRS; ++p)
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m)
          xv[p][m] = _mm512_set1_epi32(*(const int32_t*)(xr + m * kp + k + 2 * p));
      const int64_t off = (k / STEP) * 32;
#pragma GCC unroll 8
      for (int j = 0; j < NBK; ++j) {
        __m512i rows[2];
        unit_rows<BITS>(blk[j] + off, rows);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
          for (int p = 0; p < PAIRS; ++p)
            acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv[p][m], (__m512bh)rows[p]);
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NBK; ++j) {
      const Coef c = coef(g, b0 + j, grp);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) accumulate(g, c, b0 + j, m0 + m, xsum[(m0 + m) * g.G + grp], acc[m][j]);
    }
  }
}

template <int BITS, int NBK>
QR_BF16 void dot_blocks(const Geo& g, const uint16_t* xb, const float* xsum, int64_t b0) {
  int64_t m0 = 0;
  for (; m0 + 4 <= g.M; m0 += 4) dot_rows<BITS, 4, NBK>(g, xb, xsum, b0, m0);
  switch (g.M - m0) {
    case 1: dot_rows<BITS, 1, NBK>(g, xb, xsum, b0, m0); break;
    case 2: dot_rows<BITS, 2, NBK>(g, xb, xsum, b0, m0); break;
    case 3: dot_rows<BITS, 3, NBK>(g, xb, xsum, b0, m0); break;
    default: break;
  }
}

// ---------------------------------------------------------- path 2: bf16, AMX

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#define QR_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16")))

constexpr int TILE = 16 * 32;  // bf16 elements of one tile: 16 rows of 32
constexpr int SUB = 2;    // 32-row steps dequantized at a time (2 blocks x 2 tiles)
constexpr int DEPTH = 2;  // sub-steps in flight: dequantized DEPTH - 1 ahead (3 and 5 measured no faster)

// Tiles: 0-3 accumulators (2 row tiles x 2 blocks), 4-5 activations, 6-7 weights.
// xt: activations as tiles, [M/16][Kp/32][16][32] bf16. With more than 32 rows the
// accumulators of each row pair live in `cacc` between the sub-steps of a group.
struct AmxPair {
  const Geo& g;
  const uint16_t* xt;
  const float* xsum;
  float* cacc;
  float* obuf;  // this pair's output rows, [M][32] float32, written to out at the end
  int64_t b0;
  bool two;

  int64_t steps_in(int64_t grp) const { return (group_end(g, grp) - grp * g.gs) / KU; }

  // weights of steps s0 .. s0 + SUB of group grp, both blocks, as bf16 tiles in wb
  template <int BITS>
  QR_AMX void dequantize(int64_t grp, int64_t s0, uint16_t* wb) const {
    constexpr int STEP = BITS == 4 ? 4 : 2;
    constexpr int PAIRS = STEP / 2;
    const int64_t ns = std::min<int64_t>(SUB, steps_in(grp) - s0);
    const uint8_t* src = g.codes + b0 * g.blk_bytes + ((grp * g.gs + s0 * KU) / STEP) * 32;
    const int blocks = two ? 2 : 1;
    // Software prefetch 2 KiB ahead keeps more misses in flight than the hardware streamer
    // does here (int8: +15-25 %); int4 with more than 32 rows is compute bound and loses by it.
    const bool prefetch = BITS == 8 || g.M <= 32;
    for (int64_t u = 0; u < ns * (KU / STEP); ++u) {
      for (int j = 0; j < blocks; ++j) {  // both blocks' streams at once
        __m512i rows[2];
        const uint8_t* unit = src + j * g.blk_bytes + u * 32;
        if (prefetch) _mm_prefetch((const char*)(unit + 2048), _MM_HINT_T0);
        unit_rows<BITS>(unit, rows);
        for (int p = 0; p < PAIRS; ++p)
          _mm512_store_si512((__m512i*)(wb + j * SUB * TILE + (u * PAIRS + p) * 32), rows[p]);
      }
    }
  }

  QR_AMX void multiply(int64_t grp, int64_t s0, const uint16_t* wb) const {
    const int64_t ksteps = g.Kp / KU, mtiles = (g.M + 15) / 16, nsteps = steps_in(grp);
    const int64_t ns = std::min<int64_t>(SUB, nsteps - s0);
    const bool resident = mtiles <= 2, first = s0 == 0, last = s0 + ns == nsteps;
    for (int64_t mt = 0; mt < mtiles; mt += 2) {
      const bool pair = mt + 1 < mtiles;
      float* cm = cacc + (mt / 2) * 4 * NB * NB;
      if (first) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else if (!resident) {
        _tile_loadd(0, cm, 64);
        _tile_loadd(1, cm + NB * NB, 64);
        _tile_loadd(2, cm + 2 * NB * NB, 64);
        _tile_loadd(3, cm + 3 * NB * NB, 64);
      }
      for (int64_t s = 0; s < ns; ++s) {
        const uint16_t* xa = xt + (mt * ksteps + grp * g.gs / KU + s0 + s) * TILE;
        _tile_loadd(4, xa, 64);
        _tile_loadd(6, wb + s * TILE, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (pair) {
          _tile_loadd(5, xa + ksteps * TILE, 64);
          _tile_dpbf16ps(2, 5, 6);
        }
        if (two) {
          _tile_loadd(7, wb + (SUB + s) * TILE, 64);
          _tile_dpbf16ps(1, 4, 7);
          if (pair) _tile_dpbf16ps(3, 5, 7);
        }
      }
      if (!last && resident) continue;
      _tile_stored(0, cm, 64);
      _tile_stored(1, cm + NB * NB, 64);
      _tile_stored(2, cm + 2 * NB * NB, 64);
      _tile_stored(3, cm + 3 * NB * NB, 64);
      if (!last) continue;
      for (int j = 0; j < (two ? 2 : 1); ++j) {
        const Coef c = coef(g, b0 + j, grp);
        for (int h = 0; h < (pair ? 2 : 1); ++h) {
          const float* tile = cm + (2 * h + j) * NB * NB;
          const int64_t rt = mt + h, rows = std::min<int64_t>(16, g.M - rt * 16);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t m = rt * 16 + r;
            accumulate_at(obuf + m * 2 * NB + j * NB, c, xsum[m * g.G + grp],
                          _mm512_load_ps(tile + r * NB));
          }
        }
      }
    }
  }

  // Software pipeline: the weights of sub-step i + DEPTH - 1 are dequantized before the tiles
  // of sub-step i are multiplied, so no tile load waits on stores still in flight.
  template <int BITS>
  QR_AMX void run(const std::vector<std::pair<int64_t, int64_t>>& subs, uint16_t* wb) const {
    const int64_t n = (int64_t)subs.size();
    auto buffer = [&](int64_t i) { return wb + (i % DEPTH) * 2 * SUB * TILE; };
    for (int64_t i = 0; i < std::min<int64_t>(DEPTH - 1, n); ++i)
      dequantize<BITS>(subs[i].first, subs[i].second, buffer(i));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ahead = i + DEPTH - 1;
      if (ahead < n) dequantize<BITS>(subs[ahead].first, subs[ahead].second, buffer(ahead));
      multiply(subs[i].first, subs[i].second, buffer(i));
    }
  }
};

template <int BITS>
QR_AMX void amx_pairs(const Geo& g, const uint16_t* xt, const float* xsum, int64_t p0, int64_t p1) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const int64_t mpairs = ((g.M + 15) / 16 + 1) / 2;
  // DEPTH x 2 x SUB weight tiles, the row pairs' accumulators, the pair's output rows
  std::vector<float> buf(DEPTH * SUB * TILE + mpairs * 4 * NB * NB + g.M * 2 * NB + 32);
  uint16_t* wb = (uint16_t*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
  float* cacc = (float*)(wb + DEPTH * 2 * SUB * TILE);
  float* obuf = cacc + mpairs * 4 * NB * NB;
  std::vector<std::pair<int64_t, int64_t>> subs;  // (group, first step) of every sub-step
  for (int64_t grp = 0; grp < g.G; ++grp) {
    const int64_t steps = (group_end(g, grp) - grp * g.gs) / KU;
    for (int64_t s0 = 0; s0 < steps; s0 += SUB) subs.emplace_back(grp, s0);
  }
  const int64_t blocks = g.N / NB;
  for (int64_t pb = p0; pb < p1; ++pb) {
    const bool two = 2 * pb + 1 < blocks;
    std::fill(obuf, obuf + g.M * 2 * NB, 0.0f);
    const AmxPair pair{g, xt, xsum, cacc, obuf, 2 * pb, two};
    pair.run<BITS>(subs, wb);
    // one contiguous pass over the output (rows of out are N floats apart: a page each)
    for (int64_t m = 0; m < g.M; ++m) {
      float* o = g.out + m * g.N + 2 * pb * NB;
      _mm512_storeu_ps(o, _mm512_load_ps(obuf + m * 2 * NB));
      if (two) _mm512_storeu_ps(o + NB, _mm512_load_ps(obuf + m * 2 * NB + NB));
    }
  }
  _tile_release();
}

}  // namespace

bool amx_ready() {
  // Linux hands out AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

torch::Tensor wna16_gemm(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                         torch::Tensor zeros, int64_t bits, int64_t group_size, int64_t mode,
                         int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (float32), 1 (bf16 dot) or 2 (AMX)");
  TORCH_CHECK(x.dtype() == (path == 0 ? torch::kFloat32 : torch::kBFloat16),
              path == 0 ? "path 0 takes float32 x" : "paths 1 and 2 take bfloat16 x");
  TORCH_CHECK(path != 2 || amx_ready(), "AMX is not available to this process");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "codes: uint8");
  TORCH_CHECK(zeros.dtype() == torch::kUInt8 && zeros.is_contiguous(), "zeros: uint8");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 3 && scales.size(2) == NB &&
              (scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kFloat16 ||
               scales.dtype() == torch::kBFloat16),
              "scales: float32, float16 or bfloat16 [N/16, G, 16]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0) * NB, G = scales.size(1);
  const int64_t Kp = (K + KU - 1) / KU * KU;
  const int64_t gs = G == 1 ? Kp : group_size;
  TORCH_CHECK(G == 1 || (gs > 0 && gs % KU == 0 && (K + gs - 1) / gs == G),
              "scales and zeros must be [N/16, ceil(K / group_size), 16] with group_size a "
              "multiple of 32");
  TORCH_CHECK(zeros.sizes() == scales.sizes(), "zeros must have the shape of scales");
  const int64_t blk_bytes = bits == 4 ? Kp * 8 : Kp * 16;
  TORCH_CHECK(codes.numel() == (N / NB) * blk_bytes, "codes size does not match N, K, bits");
  auto out = torch::zeros({M, N}, x.options().dtype(torch::kFloat32));
  if (M == 0) return out;
  const int sdt = scales.dtype() == torch::kFloat32 ? 0 : (scales.dtype() == torch::kFloat16 ? 1 : 2);
  Geo g{M, N, Kp, gs, G, bits, blk_bytes, codes.data_ptr<uint8_t>(), scales.data_ptr(), sdt,
        zeros.data_ptr<uint8_t>(), out.data_ptr<float>()};
  const int64_t blocks = N / NB;
  if (path == 0) {
    TORCH_CHECK(mode >= 1 && mode <= 3, "path 0 needs mode 1 (fp16), 2 (bf16) or 3 (fp32)");
    auto xp = K == Kp ? x : torch::constant_pad_nd(x, {0, Kp - K});
    const float* xf = xp.data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (bits == 4) exact_block<4>(g, xf, b, mode); else exact_block<8>(g, xf, b, mode);
      }
    });
    return out;
  }
  // bf16 activations, rows padded to 16 and columns to Kp; sum of x over every group.
  const int64_t Mp = (M + 15) / 16 * 16;
  auto xp = torch::constant_pad_nd(x, {0, Kp - K, 0, Mp - M}).contiguous();
  auto xsum = torch::constant_pad_nd(x, {0, G * gs - K}).to(torch::kFloat32).view({M, G, gs})
                  .sum(2).contiguous();
  const uint16_t* xb = (const uint16_t*)xp.data_ptr();
  const float* xs = xsum.data_ptr<float>();
  if (path == 1) {
    constexpr int WIDE = 8;  // blocks per pass when M <= 2, else 4
    const int64_t nbk = M <= 2 ? WIDE : 4;
    at::parallel_for(0, (blocks + nbk - 1) / nbk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b0 = u * nbk, b1 = std::min(blocks, b0 + nbk);
        int64_t b = b0;
        if (b1 - b0 == nbk) {
          if (nbk == WIDE) {
            bits == 4 ? dot_blocks<4, WIDE>(g, xb, xs, b) : dot_blocks<8, WIDE>(g, xb, xs, b);
          } else {
            bits == 4 ? dot_blocks<4, 4>(g, xb, xs, b) : dot_blocks<8, 4>(g, xb, xs, b);
          }
          continue;
        }
        for (; b < b1; ++b) bits == 4 ? dot_blocks<4, 1>(g, xb, xs, b) : dot_blocks<8, 1>(g, xb, xs, b);
      }
    });
    return out;
  }
  const int64_t mtiles = Mp / 16, ksteps = Kp / KU;
  auto xt = xp.view({mtiles, 16, ksteps, KU}).permute({0, 2, 1, 3}).contiguous();
  const uint16_t* xtp = (const uint16_t*)xt.data_ptr();
  at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    if (bits == 4) amx_pairs<4>(g, xtp, xs, begin, end); else amx_pairs<8>(g, xtp, xs, begin, end);
  });
  return out;
}
