// quantreg's float8 / fp4 weight-only CPU matmul for AVX512-BF16 (kernel cpu-avx512-float8);
// built and called by quantreg/kernels/cpu_float8_avx512.py, after cpu_common.h and
// float8_common.h. It reads the layout float8_kernel.cpp (the AVX2 build) reads
// (cpu_float8.CPUFloat8Layout): 16 outputs a block, fp8 byte 16k + o, fp4 steps of 4 rows.
//
// Why another kernel: float8_kernel.cpp multiplies in float32 on 256-bit registers, 16
// multiply-adds an instruction; vdpbf16ps takes 32, on bf16 pairs, and a float8 or e2m1 value
// is a bf16 exactly. On a 2-core Zen 5 the AVX2 kernel ran M = 64 at a quarter of a dense bf16
// matmul's speed.
//
// Decoding, 64 bytes at a time, no table in memory: an fp8 code's bf16 (value * 2^-8, the
// factor the layout's scales hold) is looked up by its low 7 bits in two 128-entry byte tables
// (vpermi2b: high and low bytes; the sign is or-ed into the high one); an e2m1 code's by vpshufb
// in two 16-entry ones. One more two-table byte permute per register (vpermt2b) sets each
// output's bytes of rows k, k + 1 side by side as vdpbf16ps wants them.
//
// Rows: x's rows are copied once a call to bf16 parts, which give x exactly: one for bf16, two
// for fp16 (x = hi + lo), three for float32 -- each multiplies as a row of its own, and a row's
// parts are added at the end. vdpbf16ps's products of bf16 pairs are exact in float32 (it
// flushes bf16 denormals, below 2^-126, to zero).
//
// Groups: K runs as segments, each within one group and at most KC rows, its rows taken in
// pairs from the group's first (an odd length ends with a pair whose second weight is zero).
// Per NBK blocks (a unit) and chunk of segments (at most KCP pairs): the weights are decoded
// once into an L1 buffer, then every pass of R rows multiplies them, its sums for a segment
// scaled once and added to the rows' totals. Up to DIRECT rows, each 64 bytes are decoded in
// registers and multiplied at once instead. Both sum a row's products in one order (SETS), so
// a row's logits do not depend on the rows that share its call.
#include <cmath>
#include <cstring>

namespace f8x {

constexpr int NB = 16;
constexpr int KC = 256;          // rows of K a segment holds at most
constexpr int KCP = KC / 2;      // pairs a chunk's buffer holds
constexpr int SLACK = 4;         // pairs a decode may write past a segment (later overwritten)
constexpr int DIRECT = 4;        // bf16 rows (M times x's parts) up to which direct() runs
constexpr int64_t HELD_BELOW = 64;  // rows a segment on average, below which passes hold totals

struct Tables {
  alignas(64) uint8_t fp8_hi[128];  // bf16 of an e4m3 magnitude code, times 2^-8: high byte
  alignas(64) uint8_t fp8_lo[128];  //   and low byte
  alignas(64) uint8_t fp8_pairs[2][64];  // vpermt2b indexes: rows (k, k + 1), (k + 2, k + 3)
  alignas(64) uint8_t fp4_hi[64];   // bf16 of an e2m1 code (bit 3 the sign), 4 lanes of 16
  alignas(64) uint8_t fp4_lo[64];
  alignas(64) uint8_t fp4_pairs[2][64];  // indexes: rows of the first and of the second step

  Tables() {
    for (int c = 0; c < 128; ++c) {
      const int e = c >> 3, m = c & 7;
      const float v = c == 127 ? NAN : e ? std::ldexp(1.0f + m / 8.0f, e - 15)
                                         : std::ldexp((float)m, -17);
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      fp8_hi[c] = (uint8_t)(bits >> 24);
      fp8_lo[c] = (uint8_t)(bits >> 16);
    }
    static const float e2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int c = 0; c < 64; ++c) {
      const float v = (c & 8 ? -1.0f : 1.0f) * e2m1[c & 7];
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      fp4_hi[c] = (uint8_t)(bits >> 24);
      fp4_lo[c] = (uint8_t)(bits >> 16);
    }
    // fp4: byte b of a 32-byte step holds, in each nibble, code i = index(b) of its two rows
    // (16 * row + output); cpu_float8.FP4_STEP_INDEX
    int where[32];
    for (int b = 0; b < 32; ++b)
      where[(b % 16) / 8 * 16 + (b % 2) * 8 + 4 * (b / 16) + (b % 8) / 2] = b;
    for (int s = 0; s < 2; ++s)
      for (int o = 0; o < NB; ++o)
        for (int j = 0; j < 2; ++j)
          for (int h = 0; h < 2; ++h) {  // byte h of output o's bf16 of row j of the pair
            fp8_pairs[s][4 * o + 2 * j + h] = (uint8_t)(64 * h + 16 * (2 * s + j) + o);
            fp4_pairs[s][4 * o + 2 * j + h] = (uint8_t)(64 * h + 32 * s + where[16 * j + o]);
          }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline __m512i load64(const uint8_t* p) { return _mm512_load_si512((const void*)p); }

// the lookup registers, loaded once a unit
struct Decoder {
  __m512i hi0, hi1, lo0, lo1, sign, ix0, ix1, th, tl, nib;
  Decoder() {
    const Tables& t = tables();
    hi0 = load64(t.fp8_hi), hi1 = load64(t.fp8_hi + 64);
    lo0 = load64(t.fp8_lo), lo1 = load64(t.fp8_lo + 64);
    sign = _mm512_set1_epi8((char)0x80);
    th = load64(t.fp4_hi), tl = load64(t.fp4_lo), nib = _mm512_set1_epi8(0x0F);
    ix0 = ix1 = _mm512_setzero_si512();
  }
  void for_fp4(bool fp4) {
    const Tables& t = tables();
    ix0 = load64(fp4 ? t.fp4_pairs[0] : t.fp8_pairs[0]);
    ix1 = load64(fp4 ? t.fp4_pairs[1] : t.fp8_pairs[1]);
  }
};

// 64 fp8 codes (rows k .. k + 3 of a block) as two registers of bf16 pairs
__attribute__((always_inline)) inline void fp8_pairs(const Decoder& d, __m512i v, __m512i* p) {
  __m512i hi = _mm512_permutex2var_epi8(d.hi0, v, d.hi1);
  hi = _mm512_ternarylogic_epi32(hi, v, d.sign, 0xF8);  // hi | (v & 0x80)
  const __m512i lo = _mm512_permutex2var_epi8(d.lo0, v, d.lo1);
  p[0] = _mm512_permutex2var_epi8(lo, d.ix0, hi);
  p[1] = _mm512_permutex2var_epi8(lo, d.ix1, hi);
}

// 64 bytes of fp4 steps (rows k .. k + 7) as four registers of bf16 pairs
__attribute__((always_inline)) inline void fp4_pairs(const Decoder& d, __m512i v, __m512i* p) {
  const __m512i cl = _mm512_and_si512(v, d.nib);
  const __m512i ch = _mm512_and_si512(_mm512_srli_epi16(v, 4), d.nib);
  const __m512i hl = _mm512_shuffle_epi8(d.th, cl), ll = _mm512_shuffle_epi8(d.tl, cl);
  const __m512i hh = _mm512_shuffle_epi8(d.th, ch), lh = _mm512_shuffle_epi8(d.tl, ch);
  p[0] = _mm512_permutex2var_epi8(ll, d.ix0, hl);
  p[1] = _mm512_permutex2var_epi8(lh, d.ix0, hh);
  p[2] = _mm512_permutex2var_epi8(ll, d.ix1, hl);
  p[3] = _mm512_permutex2var_epi8(lh, d.ix1, hh);
}

struct Seg {
  int32_t k0, len, g, p0;  // rows k0 .. k0 + len of group g; its pairs from p0 in the buffer
};
struct Chunk {
  int32_t s0, s1;  // segments s0 .. s1 - 1
  bool whole;      // their pairs are contiguous in the buffer
};

struct Geo {
  int64_t M, N, K, G, rows, parts, ldx;  // rows = M * parts bf16 rows of ldx values
  bool fp4;
  const uint8_t* codes;
  const float* scales;         // float32 [N/16][G][16], or
  const uint8_t* scale_codes;  // (fp4) e4m3 codes [N/16][G][16]
  float scale_mult;
  const uint16_t* x;           // bf16 [rows][ldx]: row r is part r % parts of x's row r / parts
  bool held;                   // the passes hold the totals in registers (short segments)
  std::vector<Seg> segs;
  std::vector<Chunk> chunks;
};

// g's segments and chunks for groups of gs rows (the same for every block), and whether the
// passes hold their totals
void plan(Geo& g, int64_t gs) {
  int32_t pairs = 0;
  for (int64_t grp = 0; grp < g.G; ++grp) {
    const int64_t end = std::min(g.K, (grp + 1) * gs);
    for (int64_t k = grp * gs; k < end; k += KC) {
      const int32_t len = (int32_t)std::min<int64_t>(KC, end - k), p = (len + 1) / 2;
      if (g.chunks.empty() || pairs + p > KCP) {
        g.chunks.push_back({(int32_t)g.segs.size(), (int32_t)g.segs.size(), true});
        pairs = 0;
      } else if (g.segs.back().len % 2) {
        g.chunks.back().whole = false;
      }
      g.segs.push_back({(int32_t)k, len, (int32_t)grp, pairs});
      pairs += p;
      g.chunks.back().s1 = (int32_t)g.segs.size();
    }
  }
  g.held = g.K < HELD_BELOW * (int64_t)g.segs.size();
}

// rows k0 .. k0 + len of block b as bf16 pairs from out[0] (fp8: 2 pairs per 64 bytes, fp4: 4;
// a last partial load reads zeros past the rows, which may write a few pairs past them). The
// codes a chunk (KC rows) ahead are asked for: the hardware's prefetcher stops at pages, and two
// blocks are two streams. Measured cold at M = 1 (32000 x 4096, a 2-core Zen 5): without it
// 1.3-1.5x slower; 1 KiB ahead 1.1x, 2-4 KiB best, 8 KiB 1.1x and 16 KiB 1.2x slower
template <bool FP4>
__attribute__((always_inline)) inline void decode_rows(const Geo& g, const Decoder& dm, int64_t b,
                                                       int64_t k0, int64_t len, __m512i* out) {
  constexpr int BYTES = FP4 ? 8 : 16, STEP = FP4 ? 4 : 2;  // bytes a row, pairs a load
  const Decoder d = dm;  // in registers: the stores to out might alias dm, in memory
  const uint8_t* src = g.codes + (b * g.K + k0) * BYTES;
  const int64_t bytes = len * BYTES;
  int64_t off = 0;
  for (; off + 64 <= bytes; off += 64, out += STEP) {
    _mm_prefetch((const char*)(src + off + KC * BYTES), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512((const void*)(src + off));
    if (FP4) fp4_pairs(d, v, out);
    else fp8_pairs(d, v, out);
  }
  if (off < bytes) {
    const __m512i v = _mm512_maskz_loadu_epi8((1ULL << (bytes - off)) - 1, src + off);
    if (FP4) fp4_pairs(d, v, out);
    else fp8_pairs(d, v, out);
  }
}

// the 16 scales of block b, group grp, times the multiplier (fp4's e4m3 codes: value * 2^-8
// through fp16: sign-extended, shifted left by 7, bit 14 cleared)
__attribute__((always_inline)) inline __m512 scale16(const Geo& g, int64_t b, int64_t grp) {
  const int64_t at = (b * g.G + grp) * NB;
  __m512 v;
  if (g.scale_codes != nullptr) {
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(g.scale_codes + at)));
    v = _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16((short)0xBFFF)));
  } else {
    v = _mm512_loadu_ps(g.scales + at);
  }
  return _mm512_mul_ps(v, _mm512_set1_ps(g.scale_mult));
}

// chunk c of block b into buf (pairs from 0), each segment's 16 scales into sc (a segment's
// NBK blocks side by side): the chunk's rows in one run when its segments' pairs are
// contiguous (every segment but the last of an even length), else segment by segment
template <bool FP4, int NBK>
void decode(const Geo& g, const Decoder& d, const Chunk& c, int64_t b, __m512i* buf, float* sc) {
  const Seg &first = g.segs[c.s0], &last = g.segs[c.s1 - 1];
  if (c.whole) {
    decode_rows<FP4>(g, d, b, first.k0, last.k0 + last.len - first.k0, buf);
  } else {
    for (int32_t si = c.s0; si < c.s1; ++si)
      decode_rows<FP4>(g, d, b, g.segs[si].k0, g.segs[si].len, buf + g.segs[si].p0);
  }
  for (int32_t si = c.s0; si < c.s1; ++si, sc += NBK * NB)
    _mm512_store_ps(sc, scale16(g, b, g.segs[si].g));
}

// acc += a * b on bf16 pairs, in place (through the intrinsic GCC 12 copies accumulators)
__attribute__((always_inline)) inline void dp(__m512& acc, __m512i a, __m512i b) {
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// Every path sums a segment's pairs in SETS sets, pair p into set p % SETS, added in order and
// then scaled: a row's logits are the same bits whichever rows share its call (and the passes
// or the direct path take it), as tiling a call's rows needs
constexpr int SETS = 2;

template <int R, int NBK>
__attribute__((always_inline)) inline void zero_sums(__m512 (&a)[SETS][R][NBK]) {
#pragma GCC unroll 4
  for (int u = 0; u < SETS; ++u)
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 2
      for (int j = 0; j < NBK; ++j) a[u][m][j] = _mm512_setzero_ps();
}

// row m's sums of block j, set by set in order
template <int R, int NBK>
__attribute__((always_inline)) inline __m512 sets_sum(const __m512 (&a)[SETS][R][NBK], int m,
                                                      int j) {
  __m512 sum = a[0][m][j];
#pragma GCC unroll 4
  for (int u = 1; u < SETS; ++u) sum = _mm512_add_ps(sum, a[u][m][j]);
  return sum;
}

// *to = sum * scale, first; else *to += sum * scale
__attribute__((always_inline)) inline void add_scaled(float* to, __m512 sum, __m512 scale,
                                                      bool first) {
  _mm512_store_ps(to, first ? _mm512_mul_ps(sum, scale)
                            : _mm512_fmadd_ps(sum, scale, _mm512_load_ps(to)));
}

// rows r0 .. r0 + R over one chunk of NBK blocks: tot [rows][NBK][16] += each segment's sums
// times its scales (first: the chunk is the first, tot holds nothing yet). HELD: the totals
// stay in registers through the chunk, beside the sums, which leaves room for 4 rows a pass;
// else they are read and written once a segment, and a pass takes 6 rows. Held totals pay for
// short segments (NVFP4's 16 rows), 6 rows for long ones (fp8 channel and 128-row blocks).
template <int R, int NBK, bool HELD>
void pass(const Geo& g, const Chunk& c, const __m512i* buf, const float* sc, int64_t r0,
          bool first, float* tot) {
  constexpr int U = SETS;  // pair p into set p % U: the unrolled u below
  __m512 t[HELD ? R : 1][NBK];
  if constexpr (HELD) {
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 2
      for (int j = 0; j < NBK; ++j)
        t[m][j] = first ? _mm512_setzero_ps() : _mm512_load_ps(tot + ((r0 + m) * NBK + j) * NB);
  }
  for (int32_t si = c.s0; si < c.s1; ++si) {
    const Seg& s = g.segs[si];
    const uint16_t* x = g.x + r0 * g.ldx + s.k0;
    const __m512i* w = buf + s.p0;
    const int32_t pairs = (s.len + 1) / 2;
    __m512 a[U][R][NBK];
    zero_sums(a);
    int32_t p = 0;
    for (; p + U <= pairs; p += U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        __m512i wv[NBK];
#pragma GCC unroll 2
        for (int j = 0; j < NBK; ++j) wv[j] = _mm512_load_si512(w + j * (KCP + SLACK) + p + u);
#pragma GCC unroll 16
        for (int m = 0; m < R; ++m) {
          int32_t pair;
          std::memcpy(&pair, x + m * g.ldx + 2 * (p + u), 4);
          const __m512i xv = _mm512_set1_epi32(pair);
#pragma GCC unroll 2
          for (int j = 0; j < NBK; ++j) dp(a[u][m][j], wv[j], xv);
        }
      }
    for (; p < pairs; ++p) {
#pragma GCC unroll 16
      for (int m = 0; m < R; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * g.ldx + 2 * p, 4);
        const __m512i xv = _mm512_set1_epi32(pair);
#pragma GCC unroll 2
        for (int j = 0; j < NBK; ++j)
          dp(a[0][m][j], _mm512_load_si512(w + j * (KCP + SLACK) + p), xv);
      }
    }
    const float* s16 = sc + (si - c.s0) * NBK * NB;
    const bool init = first && si == c.s0;
#pragma GCC unroll 2
    for (int j = 0; j < NBK; ++j) {
      const __m512 sv = _mm512_load_ps(s16 + j * NB);
#pragma GCC unroll 16
      for (int m = 0; m < R; ++m) {
        if constexpr (HELD) t[m][j] = _mm512_fmadd_ps(sets_sum(a, m, j), sv, t[m][j]);
        else add_scaled(tot + ((r0 + m) * NBK + j) * NB, sets_sum(a, m, j), sv, init);
      }
    }
  }
  if constexpr (HELD) {
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 2
      for (int j = 0; j < NBK; ++j) _mm512_store_ps(tot + ((r0 + m) * NBK + j) * NB, t[m][j]);
  }
}

// every row over one chunk, in passes of the most rows that fit the registers
template <int NBK, bool HELD>
void passes(const Geo& g, const Chunk& c, const __m512i* buf, const float* sc, bool first,
            float* tot) {
  constexpr int MOST = HELD ? 4 : 6;
  int64_t r = 0;
  for (; r + MOST <= g.rows; r += MOST) pass<MOST, NBK, HELD>(g, c, buf, sc, r, first, tot);
  switch (g.rows - r) {
#define QR_PASS(n) \
    case n: if constexpr (n < MOST) pass<n, NBK, HELD>(g, c, buf, sc, r, first, tot); break;
    QR_PASS(1) QR_PASS(2) QR_PASS(3) QR_PASS(4) QR_PASS(5)
#undef QR_PASS
    default: break;
  }
}

// Few rows (at most DIRECT bf16 rows): each 64 bytes of codes decoded in registers and
// multiplied at once, no buffer -- at M = 1 the buffer's stores and loads, and a second loop,
// cost as much as the decoding. A segment's sums scaled into tot.
template <bool FP4, int R, int NBK>
void direct(const Geo& g, const Decoder& dm, int64_t b0, float* tot) {
  constexpr int BYTES = FP4 ? 8 : 16, STEP = FP4 ? 4 : 2;  // bytes a row, pairs a load
  const Decoder d = dm;
  constexpr bool HOLD = R * NBK <= 4;  // the totals in registers too (more rows: they spill)
  const uint8_t* src[NBK];
#pragma GCC unroll 2
  for (int j = 0; j < NBK; ++j) src[j] = g.codes + (b0 + j) * g.K * BYTES;
  __m512 t[HOLD ? R : 1][NBK];
#pragma GCC unroll 4
  for (int m = 0; m < (HOLD ? R : 1); ++m)
#pragma GCC unroll 2
    for (int j = 0; j < NBK; ++j) t[m][j] = _mm512_setzero_ps();
  bool first = true;
  for (const Seg& s : g.segs) {
    __m512 a[SETS][R][NBK];
    zero_sums(a);
    const uint16_t* x = g.x + s.k0;
    for (int64_t k = 0; k < s.len; k += 2 * STEP) {
      const int64_t off = (s.k0 + k) * BYTES, rest = (s.len - k) * BYTES;
      __m512i p[NBK][STEP];
#pragma GCC unroll 2
      for (int j = 0; j < NBK; ++j) {
        _mm_prefetch((const char*)(src[j] + off + KC * BYTES), _MM_HINT_T0);
        const __m512i v = rest >= 64 ? _mm512_loadu_si512((const void*)(src[j] + off))
                                     : _mm512_maskz_loadu_epi8((1ULL << rest) - 1, src[j] + off);
        if (FP4) fp4_pairs(d, v, p[j]);
        else fp8_pairs(d, v, p[j]);
      }
#pragma GCC unroll 4
      for (int q = 0; q < STEP; ++q)
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m) {
          int32_t pair;
          std::memcpy(&pair, x + m * g.ldx + k + 2 * q, 4);
          const __m512i xv = _mm512_set1_epi32(pair);
#pragma GCC unroll 2
          for (int j = 0; j < NBK; ++j) dp(a[q % SETS][m][j], p[j][q], xv);  // k / 2 is even
        }
    }
#pragma GCC unroll 2
    for (int j = 0; j < NBK; ++j) {
      const __m512 sv = scale16(g, b0 + j, s.g);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m) {
        if constexpr (HOLD) t[m][j] = _mm512_fmadd_ps(sets_sum(a, m, j), sv, t[m][j]);
        else add_scaled(tot + (m * NBK + j) * NB, sets_sum(a, m, j), sv, first);
      }
    }
    first = false;
  }
  if constexpr (HOLD) {
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 2
      for (int j = 0; j < NBK; ++j) _mm512_store_ps(tot + (m * NBK + j) * NB, t[m][j]);
  }
}

template <bool FP4, int NBK>
void direct_rows(const Geo& g, const Decoder& d, int64_t b0, float* tot) {
  switch (g.rows) {
    case 1: direct<FP4, 1, NBK>(g, d, b0, tot); break;
    case 2: direct<FP4, 2, NBK>(g, d, b0, tot); break;
    case 3: direct<FP4, 3, NBK>(g, d, b0, tot); break;
    default: direct<FP4, 4, NBK>(g, d, b0, tot); break;
  }
}

// blocks b0 .. b0 + NBK: every chunk decoded once, then multiplied by every row
template <bool FP4, int NBK>
void unit(const Geo& g, const Decoder& d, int64_t b0, __m512i* buf, float* sc, float* tot) {
  if (g.rows <= DIRECT) return direct_rows<FP4, NBK>(g, d, b0, tot);
  for (size_t ci = 0; ci < g.chunks.size(); ++ci) {
    const Chunk& c = g.chunks[ci];
#pragma GCC unroll 2
    for (int j = 0; j < NBK; ++j)
      decode<FP4, NBK>(g, d, c, b0 + j, buf + j * (KCP + SLACK), sc + j * NB);
    if (g.held) passes<NBK, true>(g, c, buf, sc, ci == 0, tot);
    else passes<NBK, false>(g, c, buf, sc, ci == 0, tot);
  }
}

// blocks b0 .. b0 + nbk of every row from tot (a row's parts added), 16 outputs at a time by
// cpu_common.h's store16, which rounds as static_cast does (vcvtneps2bf16 would flush denormal
// logits to zero)
template <typename T>
void write_out(const Geo& g, const float* tot, int nbk, int64_t b0, T* out) {
  alignas(64) float sum[NB];
  for (int j = 0; j < nbk; ++j) {
    const int64_t n0 = (b0 + j) * NB, cols = std::min<int64_t>(NB, g.N - n0);
    for (int64_t m = 0; m < g.M; ++m) {
      const float* v = tot + ((m * g.parts) * nbk + j) * NB;
      if (g.parts > 1) {
        __m512 s = _mm512_load_ps(v);
        for (int64_t p = 1; p < g.parts; ++p)
          s = _mm512_add_ps(s, _mm512_load_ps(tot + ((m * g.parts + p) * nbk + j) * NB));
        _mm512_store_ps(sum, s);
        v = sum;
      }
      store16(out + m * g.N + n0, v, 1.0f, cols);
    }
  }
}

template <typename T>
void run(const Geo& g, T* out) {
  const int64_t blocks = (g.N + NB - 1) / NB, units = (blocks + 1) / 2;
  parallel_blocks(units, 2 * g.K * NB / (g.fp4 ? 2 : 1), [&](int64_t begin, int64_t end) {
    Decoder d;
    d.for_fp4(g.fp4);
    size_t most = 0;
    for (const Chunk& c : g.chunks) most = std::max<size_t>(most, c.s1 - c.s0);
    // 64-byte aligned: the weight buffer (2 blocks), the scales of a chunk, the rows' totals
    const size_t wb = 2 * (KCP + SLACK) * 64, sb = most * 2 * 64, tb = g.rows * 2 * 64;
    std::vector<uint8_t> scratch(wb + sb + tb + 64);
    uint8_t* base = (uint8_t*)(((uintptr_t)scratch.data() + 63) & ~(uintptr_t)63);
    __m512i* buf = (__m512i*)base;
    float* s = (float*)(base + wb);
    float* t = (float*)(base + wb + sb);
    for (int64_t u = begin; u < end; ++u) {
      const int nbk = 2 * u + 1 < blocks ? 2 : 1;
      if (g.fp4) {
        if (nbk == 2) unit<true, 2>(g, d, 2 * u, buf, s, t);
        else unit<true, 1>(g, d, 2 * u, buf, s, t);
      } else {
        if (nbk == 2) unit<false, 2>(g, d, 2 * u, buf, s, t);
        else unit<false, 1>(g, d, 2 * u, buf, s, t);
      }
      write_out(g, t, nbk, 2 * u, out);
    }
  });
}

// 16 float32 as bf16 parts whose sum is each value exactly (bf16 normals): parts 1-3. An
// infinite part leaves zeros after it (inf - inf would make the row's logits NaN where x's
// infinity makes them infinite, as the AVX2 kernel's are)
__attribute__((always_inline)) inline void split(__m512 v, int parts, uint16_t* dst,
                                                  int64_t stride, __mmask16 mask) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  for (int p = 0; p < parts; ++p) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_mask_storeu_epi16(dst + p * stride, mask, h);
    const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(hf), inf, _CMP_NEQ_UQ);
    v = _mm512_maskz_sub_ps(finite, v, hf);
  }
}

// x [M, K] as the bf16 rows the passes read: [M * parts][ldx], zeros past K
std::vector<uint16_t> bf16_rows(const torch::Tensor& x, int64_t parts, int64_t ldx) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<uint16_t> rows(M * parts * ldx, 0);
  const auto kind = x.scalar_type();
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* dst = rows.data() + m * parts * ldx;
    if (kind == torch::kBFloat16) {
      std::memcpy(dst, (const uint16_t*)x.data_ptr() + m * K, K * 2);
      continue;
    }
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = (__mmask16)((1u << std::min<int64_t>(16, K - k)) - 1);
      const __m512 v = kind == torch::kFloat32
          ? _mm512_maskz_loadu_ps(mask, x.data_ptr<float>() + m * K + k)
          : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t*)x.data_ptr() + m * K + k));
      split(v, (int)parts, dst + k, ldx, mask);
    }
  }
  return rows;
}

}  // namespace f8x

// out [M, N] (float32, bfloat16 or float16) = x [M, K] (float32, bfloat16 or float16) @ W.T
void float8_512_gemm(torch::Tensor x, torch::Tensor out, torch::Tensor codes, torch::Tensor scales,
                     int64_t group_size, bool fp4, double scale_mult) {
  const Float8Args a(x, out, codes, scales, group_size, fp4, scale_mult);
  if (a.M == 0 || a.N == 0) return;
  if (a.K == 0) {
    out.zero_();
    return;
  }
  const auto kind = x.scalar_type();
  const int64_t parts = kind == torch::kBFloat16 ? 1 : kind == torch::kFloat16 ? 2 : 3;
  // a row's stride: past K (a segment's last load reads up to 7 values past it, their weights
  // zeros), and a whole, odd number of cache lines, so that the rows of a pass and of a chunk
  // spread over L1's sets (a precaution: at K = 1024 and 4096 no timing changed)
  int64_t ldx = (a.K + 16 + 31) / 32 * 32;
  if (ldx / 32 % 2 == 0) ldx += 32;
  const std::vector<uint16_t> rows = f8x::bf16_rows(x, parts, ldx);
  f8x::Geo g{a.M, a.N, a.K, a.G, a.M * parts, parts, ldx, fp4, a.codes, a.scales, a.scale_codes,
             static_cast<float>(scale_mult), rows.data(), false, {}, {}};
  f8x::plan(g, group_size);
  if (out.dtype() == torch::kFloat32) f8x::run(g, out.data_ptr<float>());
  else if (out.dtype() == torch::kBFloat16) f8x::run(g, (c10::BFloat16*)out.data_ptr());
  else f8x::run(g, (c10::Half*)out.data_ptr());
}

// What the Python side calls (see in_row_tiles): x [M, K] @ W.T as a new [M, n] matrix in x's
// dtype
torch::Tensor float8_512_mm(torch::Tensor x, int64_t n, torch::Tensor codes, torch::Tensor scales,
                            int64_t group_size, bool fp4, double scale_mult, int64_t tile_bytes) {
  return in_row_tiles(x, n, tile_bytes, [&](const torch::Tensor& xt, const torch::Tensor& ot) {
    float8_512_gemm(xt, ot, codes, scales, group_size, fp4, scale_mult);
  });
}
