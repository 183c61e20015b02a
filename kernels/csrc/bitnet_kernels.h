// Packed ternary / binary matmul kernels for the CPU, pure C++ (no torch): activation
// quantization, the packed GEMV / small-M dot products and the decode to int8, for every
// instruction set (scalar, AVX2, AVX-512 VNNI), chosen by the caller (bitnet_cpu.cpp binds them
// to torch; tests/native/kernels_test.cpp holds each SIMD path equal to the scalar one).
//
// The packed layout is the checkpoint layout, read in place (bitnet/packing.py):
//     W: (N, K) with values in the format's alphabet, P values a byte, R = ceil(N / P)
//     byte[r, k] holds rows r, r + R, ..., r + (P-1)R of column k; packed is uint8 (R, K), row-major
//     "2bit"   P = 4  code c = w + 1 in {0,1,2} at bits 2i..2i+1
//     "1.6bit" P = 5  code c = w + 1 in {0,1,2}, byte = sum_i c_i 3^i (< 243)
//     "1bit"   P = 8  code c = (w > 0) in {0,1} at bit i
// So one contiguous run of packed row r along K is, after decoding, P rows of codes along K that
// all meet the same activations x[m, k]: one load of x serves P output rows (no layout change
// needed on the CPU either).
//
// Arithmetic (exact): activations are quantized per row exactly as bitnet.quant.quantize_activation
// (float32 a = 127 / max(|x|, 1e-5), x_q = round-half-even(x * a) clamped to [-128, 127]); the dot
// product runs on unsigned codes times signed int8 activations (maddubs / vpdpbusd), and the
// identity x.w = x.c - sum(x) (ternary, w = c - 1) or x.w = 2 x.c - sum(x) (binary, w = 2c - 1)
// gives the int32 accumulation of x_q . W_q exactly. The scales are applied once:
//     y = float(acc) * (s / a)  -> output dtype  (+ bias in the output dtype)
// the same float32 operations in the same order as the torch reference, so outputs are
// bit-identical to it.
//
// Paths: M < large_m: a GEMV-style kernel over packed rows (all M rows per decoded vector); M >=
// large_m: the packed weights are decoded to int8 (N, K) once per call and the int8 GEMM of
// ATen (_int_mm: oneDNN / MKL, VNNI or AMX where the CPU has them) does the product, exact in
// int32. Instruction sets, chosen at run time, capped by set_isa (BITNET_CPU_ISA in Python):
// 0 scalar (portable C++), 1 AVX2, 2 AVX-512 (F, BW, VL, VNNI). Threads: at::parallel_for over
// packed rows, torch's intra-op threads.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define BITNET_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__aarch64__)
#define BITNET_ARM 1
#include <arm_neon.h>
#include <sys/auxv.h>
#endif

namespace bitnet_cpu {

// Instruction-set levels: 0 portable; x86-64: 1 AVX2, 2 AVX-512 VNNI, 3 AVX-512 VNNI and AMX-INT8
// (the tile unit, Sapphire Rapids and later: packed matmuls on it, everything else as level 2);
// AArch64: 1 NEON with the dot-product extension (sdot, Armv8.2 and later: Graviton 2+, Apple M1+,
// Ampere).
enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2, AMX = 3, NEON = 1 };
enum Fmt : int { F2 = 0, F16 = 1, F1 = 2 };  // "2bit", "1.6bit", "1bit"

#ifdef BITNET_X86
// AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24, 25), and the kernel's leave to use the tile
// data (Linux asks each process to request it: arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
static bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

static int64_t detect_isa() {
#ifdef BITNET_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return amx_usable() ? AMX : AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#elif defined(BITNET_ARM)
  if (getauxval(AT_HWCAP) & (1UL << 20)) return NEON;  // HWCAP_ASIMDDP
#endif
  return SCALAR;
}

static const int64_t kDetected = detect_isa();


static int values_per_byte(int fmt) { return fmt == F2 ? 4 : fmt == F16 ? 5 : 8; }


// ------------------------------------------------------------------------------------ scalar
// Codes of every byte value, the portable path's decoder: kCodes[fmt][byte][i] = code of row r + iR.
struct CodeTable {
  uint8_t t[3][256][8];
  CodeTable() {
    for (int v = 0; v < 256; ++v) {
      int x = v;
      for (int i = 0; i < 8; ++i) {
        t[F2][v][i] = i < 4 ? (v >> (2 * i)) & 3 : 0;
        t[F1][v][i] = (v >> i) & 1;
        t[F16][v][i] = i < 5 ? x % 3 : 0;
        if (i < 5) x /= 3;
      }
    }
  }
};
static const CodeTable kCodes;

static void quantize_row_scalar(const float* x, int64_t K, int8_t* q, float* a, int32_t* sum) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = (1.0f / std::max(amax, 1e-5f)) * 127.0f;  // torch evaluates 127 / t as t.reciprocal() * 127
  int32_t acc = 0;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] * s);  // round half to even (default rounding mode), as torch.round
    v = std::min(127.0f, std::max(-128.0f, v));
    q[k] = static_cast<int8_t>(v);
    acc += q[k];
  }
  *a = s;
  *sum = acc;
}

// acc[m * ldc + r + i R] = sum_k code_i(W[r, k]) * xq[m, k] for packed rows r in [r0, r1).
static void codes_dot_scalar(int fmt, const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1,
                             const int8_t* xq, int64_t xs, int64_t M, int32_t* acc, int64_t ldc) {
  const int P = values_per_byte(fmt);
  std::vector<int32_t> part(static_cast<size_t>(P));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W + r * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + m * xs;
      std::fill(part.begin(), part.end(), 0);
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* c = kCodes.t[fmt][w[k]];
        for (int i = 0; i < P; ++i) part[i] += c[i] * x[k];
      }
      for (int i = 0; i < P; ++i)
        if (r + i * R < N) acc[m * ldc + r + i * R] = part[i];
    }
  }
}

// out[(r + i R) * K + k] = W_q value for packed rows r in [r0, r1) (int8 in {-1, 0, 1}).
static void unpack_scalar(int fmt, const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1, int8_t* out) {
  const int P = values_per_byte(fmt);
  for (int64_t r = r0; r < r1; ++r)
    for (int i = 0; i < P; ++i) {
      if (r + i * R >= N) break;
      int8_t* o = out + (r + i * R) * K;
      const uint8_t* w = W + r * K;
      for (int64_t k = 0; k < K; ++k) {
        int c = kCodes.t[fmt][w[k]][i];
        o[k] = static_cast<int8_t>(fmt == F1 ? 2 * c - 1 : c - 1);
      }
    }
}

// Float-accumulated weight rows (a float lm_head): out[n - n0] = sum_k float(W[n, k]) * x[k] in
// float32 for n in [n0, n1), W row-major with K columns, either int8 (an int8 head: the caller
// applies the row scales) or bfloat16 (its raw 16 bits: a bf16 head streamed once, no copy).
static inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
static inline float weight_to_float(int8_t w) { return static_cast<float>(w); }
static inline float weight_to_float(uint16_t w) { return bf16_bits_to_float(w); }

template <typename T>
static void float_rows_scalar(const T* W, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += weight_to_float(w[k]) * x[k];
    out[n - n0] = acc;
  }
}

// The driver every SIMD level shares, over three kernels of its own:
//   row_dot1(w, K, x, tot)        M = 1: decode packed row w and meet x at once (tot: P sums)
//   decode_row(w, K, Kp, codes)   P rows of codes of packed row w, zero-padded to Kp
//   tile(g, mb, codes, x, ...)    g code rows x mb activation rows (tot: g * mb sums)
// acc[m * ldc + r + i R] = sum_k code_i(W[r, k]) * xq[m, k] for packed rows r in [r0, r1).
using RowDot1Fn = void (*)(const uint8_t*, int64_t, const int8_t*, int32_t*);
using DecodeRowFn = void (*)(const uint8_t*, int64_t, int64_t, uint8_t*);
using TileFn = void (*)(int, int, const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*);

template <int P, int MBMAX>
static void codes_dot_simd(RowDot1Fn row_dot1, DecodeRowFn decode_row, TileFn tile, const uint8_t* W, int64_t R,
                           int64_t K, int64_t N, int64_t r0, int64_t r1, const int8_t* xq, int64_t xs, int64_t M,
                           int32_t* acc, int64_t ldc) {
  int32_t tot[8 * 4];
  if (M == 1) {
    for (int64_t r = r0; r < r1; ++r) {
      row_dot1(W + r * K, K, xq, tot);
      for (int i = 0; i < P && r + i * R < N; ++i) acc[r + i * R] = tot[i];
    }
    return;
  }
  // M > 1: decode a packed row once, then tiles of (up to) 4 code rows x MBMAX activation rows
  std::vector<uint8_t> buf(static_cast<size_t>(P * xs));
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(W + r * K, K, xs, buf.data());
    for (int64_t m = 0; m < M; m += MBMAX) {
      const int mb = static_cast<int>(std::min<int64_t>(MBMAX, M - m));
      for (int g0 = 0; g0 < P; g0 += 4) {
        const int g = std::min(4, P - g0);  // 4, or 1 (the fifth row of 1.6-bit)
        tile(g, mb, buf.data() + g0 * xs, xs, xq + m * xs, xs, xs, tot);
        for (int gi = 0; gi < g; ++gi) {
          const int64_t row = r + (g0 + gi) * R;
          if (row >= N) break;
          for (int j = 0; j < mb; ++j) acc[(m + j) * ldc + row] = tot[gi * mb + j];
        }
      }
    }
  }
}

// Decode streams every weight from memory (a model is larger than the caches): the SIMD kernels
// prefetch kPrefetch bytes ahead of the row they read (into the rows after it, which follow in
// memory), which keeps more lines in flight than the hardware prefetcher alone (numbers at
// row_dot1_avx512). The distance must cover the memory latency at the rate one core reads, with
// the decode's instructions between the loads: at 1 KB (chosen on the 2-core Xeon against none)
// one core of the 2-core AMD EPYC (Zen 5, family 26; AVX-512) ran 2b4t's seven projections, cycling
// through 30 layers' weights, at 24-29 GB/s where a bare read loop reaches 40, the compute and the
// misses nearly in series (the same weights hot in cache: 63 GB/s). 8 KB, 2026-12-07, alternating
// builds, 3-5 rounds: us a layer, 1 thread 700 -> 535 (AVX2 cap: 785 -> 636), 2 threads 430 -> 330
// (17.4 MB at 50 GB/s, the bare read's rate); the int8 / int4 heads at 1 thread 29 / 26 -> 37 / 37
// GB/s; the bf16 head (already near the read rate) unchanged. 4 KB gave about half the gain, 16 KB
// no more. Ahead of a row's end the prefetches run into the next matrix or past the last one: a
// prefetch never faults, and 8 KB a matrix is nothing beside its megabytes.
constexpr int64_t kPrefetch = 8192;

#ifdef BITNET_X86
// ------------------------------------------------------------------------------------ AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")

static inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

static inline float hsum256_ps(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

static inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

static void quantize_row_avx2(const float* x, int64_t K, int8_t* q, float* a, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  float amax = hmax256(vmax);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = (1.0f / std::max(amax, 1e-5f)) * 127.0f;  // torch evaluates 127 / t as t.reciprocal() * 127
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256i vsum = _mm256_setzero_si256();
  k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i i32[4];
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * j), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      i32[j] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
      vsum = _mm256_add_epi32(vsum, i32[j]);
    }
    __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
    __m256i i8 = _mm256_packs_epi16(i16a, i16b);  // lanes interleaved by the 128-bit packs: fix order
    i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), i8);
  }
  int32_t acc = hsum256(vsum);
  for (; k < K; ++k) {
    float v = std::min(127.0f, std::max(-128.0f, std::nearbyint(x[k] * s)));
    q[k] = static_cast<int8_t>(v);
    acc += q[k];
  }
  *a = s;
  *sum = acc;
}

// P code vectors (bytes in {0,1,2} or {0,1}) of 32 packed bytes.
template <int FMT>
static inline void decode_avx2(__m256i v, __m256i* c) {
  if constexpr (FMT == F2) {
    const __m256i m3 = _mm256_set1_epi8(3);
    c[0] = _mm256_and_si256(v, m3);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
    c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3);
    c[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3);
  } else if constexpr (FMT == F1) {
    const __m256i m1 = _mm256_set1_epi8(1);
    c[0] = _mm256_and_si256(v, m1);
    for (int i = 1; i < 8; ++i) c[i] = _mm256_and_si256(_mm256_srli_epi16(v, i), m1);
  } else {
    // base-3 digits in 16-bit lanes (even and odd bytes apart): t = x / 3 = (x * 21846) >> 16
    // for x < 256, digit = x - 3t
    const __m256i lomask = _mm256_set1_epi16(0x00FF), third = _mm256_set1_epi16(21846), three = _mm256_set1_epi16(3);
    __m256i lo = _mm256_and_si256(v, lomask), hi = _mm256_srli_epi16(v, 8);
    for (int i = 0; i < 4; ++i) {
      __m256i tl = _mm256_mulhi_epu16(lo, third), th = _mm256_mulhi_epu16(hi, third);
      __m256i dl = _mm256_sub_epi16(lo, _mm256_mullo_epi16(tl, three));
      __m256i dh = _mm256_sub_epi16(hi, _mm256_mullo_epi16(th, three));
      c[i] = _mm256_or_si256(dl, _mm256_slli_epi16(dh, 8));
      lo = tl;
      hi = th;
    }
    c[4] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 8));
  }
}

static inline __m256i load_tail256(const void* p, int64_t n) {
  alignas(32) uint8_t buf[32] = {0};
  std::memcpy(buf, p, static_cast<size_t>(n));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// int16 partial sums in registers: each maddubs lane is at most 2 * 2 * 128 = 512 in magnitude,
// so 32 steps (16384) fit; then they are summed into int32 totals in memory (AVX2 has 16 vector
// registers, the codes, activations and partial sums take them all).
constexpr int kAvx2Flush = 32;

// M = 1: decode each 32-byte vector of packed row r and meet the activations at once.
// x is zero-padded to a multiple of 64 (xs), so only the weights' last vector needs care.
//
// 2bit takes two of its slots scaled, as the AVX-512 kernel does: c1 = v & 0x0C and c2 = (v >> 2)
// & 0x0C are 4 times the codes (two shifts and four ands a vector instead of three and four); their
// int16 partial sums (each maddubs lane |.| <= 2 * 8 * 128) are widened every 16 steps into int32
// vectors, reduced once at the end and divided back exactly.
static void row_dot1_avx2_f2(const uint8_t* w, int64_t K, const int8_t* x, int32_t* tot) {
  const __m256i ones = _mm256_set1_epi16(1), m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
  __m256i part[4], wide[4];
  for (int i = 0; i < 4; ++i) part[i] = wide[i] = _mm256_setzero_si256();
  int steps = 0;
  for (int64_t k = 0; k < K; k += 32) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
    const __m256i v = k + 32 <= K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)) : load_tail256(w + k, K - k);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
    const __m256i c[4] = {_mm256_and_si256(v, m3), _mm256_and_si256(v, m12), _mm256_and_si256(_mm256_srli_epi16(v, 2), m12),
                          _mm256_and_si256(_mm256_srli_epi16(v, 6), m3)};
    for (int i = 0; i < 4; ++i) part[i] = _mm256_add_epi16(part[i], _mm256_maddubs_epi16(c[i], xv));
    if (++steps == 16 || k + 32 >= K) {
      for (int i = 0; i < 4; ++i) wide[i] = _mm256_add_epi32(wide[i], _mm256_madd_epi16(part[i], ones)), part[i] = _mm256_setzero_si256();
      steps = 0;
    }
  }
  tot[0] = hsum256(wide[0]);
  tot[1] = hsum256(wide[1]) >> 2;
  tot[2] = hsum256(wide[2]) >> 2;
  tot[3] = hsum256(wide[3]);
}

template <int FMT>
static void row_dot1_avx2_generic(const uint8_t* w, int64_t K, const int8_t* x, int32_t* tot) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i part[P];
  for (int i = 0; i < P; ++i) part[i] = _mm256_setzero_si256(), tot[i] = 0;
  int steps = 0;
  for (int64_t k = 0; k < K; k += 32) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
    const __m256i v = k + 32 <= K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)) : load_tail256(w + k, K - k);
    __m256i c[P];
    decode_avx2<FMT>(v, c);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
    for (int i = 0; i < P; ++i) part[i] = _mm256_add_epi16(part[i], _mm256_maddubs_epi16(c[i], xv));
    if (++steps == kAvx2Flush || k + 32 >= K) {
      for (int i = 0; i < P; ++i) tot[i] += hsum256(_mm256_madd_epi16(part[i], ones)), part[i] = _mm256_setzero_si256();
      steps = 0;
    }
  }
}

template <int FMT>
static void row_dot1_avx2(const uint8_t* w, int64_t K, const int8_t* x, int32_t* tot) {
  if constexpr (FMT == F2) row_dot1_avx2_f2(w, K, x, tot);
  else row_dot1_avx2_generic<FMT>(w, K, x, tot);
}

// G rows of decoded codes (stride cs) against MB activation rows (stride xs), Kp a multiple of 32:
// tot[g * MB + j] = sum_k c[g, k] * x[j, k].
template <int G, int MB>
static void tile_avx2(const uint8_t* c, int64_t cs, const int8_t* x, int64_t xs, int64_t Kp, int32_t* tot) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i part[G][MB];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < MB; ++j) part[g][j] = _mm256_setzero_si256(), tot[g * MB + j] = 0;
  int steps = 0;
  for (int64_t k = 0; k < Kp; k += 32) {
    __m256i cv[G], xv[MB];
    for (int g = 0; g < G; ++g) cv[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + g * cs + k));
    for (int j = 0; j < MB; ++j) xv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j * xs + k));
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < MB; ++j) part[g][j] = _mm256_add_epi16(part[g][j], _mm256_maddubs_epi16(cv[g], xv[j]));
    if (++steps == kAvx2Flush || k + 32 >= Kp) {
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < MB; ++j)
          tot[g * MB + j] += hsum256(_mm256_madd_epi16(part[g][j], ones)), part[g][j] = _mm256_setzero_si256();
      steps = 0;
    }
  }
}

// Decode packed row r (K bytes) into P rows of codes, zero-padded to Kp.
template <int FMT>
static void decode_row_avx2(const uint8_t* w, int64_t K, int64_t Kp, uint8_t* out) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  for (int64_t k = 0; k < Kp; k += 32) {
    const __m256i v = k + 32 <= K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))
                                  : k < K ? load_tail256(w + k, K - k) : _mm256_setzero_si256();
    __m256i c[P];
    decode_avx2<FMT>(v, c);
    for (int i = 0; i < P; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * Kp + k), c[i]);
  }
}

static void tile_any_avx2(int g, int mb, const uint8_t* c, int64_t cs, const int8_t* x, int64_t xs, int64_t Kp, int32_t* tot) {
  switch (g * 8 + mb) {
    case 4 * 8 + 2: return tile_avx2<4, 2>(c, cs, x, xs, Kp, tot);
    case 4 * 8 + 1: return tile_avx2<4, 1>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 2: return tile_avx2<1, 2>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 1: return tile_avx2<1, 1>(c, cs, x, xs, Kp, tot);
    default: std::abort();  // unreachable: g in {1, 4}, mb in 1..2
  }
}

// 2bit, several activation rows (batched decode, prefill without tiles): row_dot1_avx2_f2's
// in-register decode of each 32-byte vector (the slots masked in place, two of them 4x scaled) met by
// MB = 2 activation rows at once, the packed row read from memory once and from L1 for the next rows,
// where the decode-to-buffer path (codes_dot_simd's M > 1) stores every code and loads it again. The
// 700m MLP (72 matrices) on the 2-core EPYC capped to AVX2, 2 threads: 2 / 4 / 16 / 32 rows 5.7-6.1 /
// 11.3 / 27-28 / 47-48 -> 3.8-4.0 / 6.9-7.1 / 24-26 / 48-50 ms (one row 2.8-3.2). 8 partial and 8
// wide accumulators, the codes and the activations fill the 16 registers: 3 or 4 rows would spill.
template <int MB>
static void row_dotm_avx2_f2(const uint8_t* w, int64_t K, const int8_t* x, int64_t xs, int32_t* tot) {
  const __m256i ones = _mm256_set1_epi16(1), m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
  __m256i part[MB][4], wide[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < 4; ++i) part[m][i] = wide[m][i] = _mm256_setzero_si256();
  int steps = 0;
  for (int64_t k = 0; k < K; k += 32) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
    const __m256i v = k + 32 <= K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)) : load_tail256(w + k, K - k);
    const __m256i c[4] = {_mm256_and_si256(v, m3), _mm256_and_si256(v, m12), _mm256_and_si256(_mm256_srli_epi16(v, 2), m12),
                          _mm256_and_si256(_mm256_srli_epi16(v, 6), m3)};
    for (int m = 0; m < MB; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * xs + k));
      for (int i = 0; i < 4; ++i) part[m][i] = _mm256_add_epi16(part[m][i], _mm256_maddubs_epi16(c[i], xv));
    }
    if (++steps == 16 || k + 32 >= K) {
      for (int m = 0; m < MB; ++m)
        for (int i = 0; i < 4; ++i)
          wide[m][i] = _mm256_add_epi32(wide[m][i], _mm256_madd_epi16(part[m][i], ones)), part[m][i] = _mm256_setzero_si256();
      steps = 0;
    }
  }
  for (int m = 0; m < MB; ++m) {
    tot[m * 4 + 0] = hsum256(wide[m][0]);
    tot[m * 4 + 1] = hsum256(wide[m][1]) >> 2;
    tot[m * 4 + 2] = hsum256(wide[m][2]) >> 2;
    tot[m * 4 + 3] = hsum256(wide[m][3]);
  }
}

template <int FMT>
static void codes_dot_avx2(const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1,
                           const int8_t* xq, int64_t xs, int64_t M, int32_t* acc, int64_t ldc) {
  if constexpr (FMT == F2) {
    if (M > 1) {
      int32_t tot[2 * 4];
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t m = 0; m < M; m += 2) {
          const int mb = static_cast<int>(std::min<int64_t>(2, M - m));
          if (mb == 2)
            row_dotm_avx2_f2<2>(W + r * K, K, xq + m * xs, xs, tot);
          else
            row_dotm_avx2_f2<1>(W + r * K, K, xq + m * xs, xs, tot);
          for (int j = 0; j < mb; ++j)
            for (int i = 0; i < 4 && r + i * R < N; ++i) acc[(m + j) * ldc + r + i * R] = tot[j * 4 + i];
        }
      return;
    }
  }
  codes_dot_simd<FMT == F2 ? 4 : FMT == F16 ? 5 : 8, 2>(row_dot1_avx2<FMT>, decode_row_avx2<FMT>, tile_any_avx2, W, R, K, N,
                                                          r0, r1, xq, xs, M, acc, ldc);
}

template <int FMT>
static void unpack_avx2(const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1, int8_t* out) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W + r * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m256i c[P];
      decode_avx2<FMT>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)), c);
      for (int i = 0; i < P; ++i) {
        if (r + i * R >= N) break;
        __m256i v = FMT == F1 ? _mm256_sub_epi8(_mm256_add_epi8(c[i], c[i]), one) : _mm256_sub_epi8(c[i], one);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r + i * R) * K + k), v);
      }
    }
    for (; k < K; ++k)
      for (int i = 0; i < P; ++i) {
        if (r + i * R >= N) break;
        int c = kCodes.t[FMT][w[k]][i];
        out[(r + i * R) * K + k] = static_cast<int8_t>(FMT == F1 ? 2 * c - 1 : c - 1);
      }
  }
}
// 8 weights as float32: int8 sign-extended and converted; bf16 widened and shifted into the high half
static inline __m256 load8_avx2(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
static inline __m256 load8_avx2(const uint16_t* w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 16));
}
// bf16 rows without widening shuffles: a 32-bit lane holds weights 2j (low half) and 2j + 1 (high
// half), which are, as float32, the lane shifted up 16 and the lane with its low half cleared; x is
// split once per call into its even and odd elements to meet them.
static void float_rows_avx2_bf16(const uint16_t* W, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  const int64_t K16 = K / 16 * 16;
  std::vector<float> xe(static_cast<size_t>(K16 / 2 + 8)), xo(static_cast<size_t>(K16 / 2 + 8));
  for (int64_t k = 0; k < K16; k += 16)
    for (int j = 0; j < 8; ++j) xe[k / 2 + j] = x[k + 2 * j], xo[k / 2 + j] = x[k + 2 * j + 1];
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= K16; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16));
      a[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(&xe[k / 2]), a[0]);
      a[1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, high)), _mm256_loadu_ps(&xo[k / 2]), a[1]);
      a[2] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(&xe[k / 2 + 8]), a[2]);
      a[3] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, high)), _mm256_loadu_ps(&xo[k / 2 + 8]), a[3]);
    }
    for (; k < K16; k += 16) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      a[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(&xe[k / 2]), a[0]);
      a[1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, high)), _mm256_loadu_ps(&xo[k / 2]), a[1]);
    }
    float acc = hsum256_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    for (; k < K; ++k) acc += bf16_bits_to_float(w[k]) * x[k];
    out[n - n0] = acc;
  }
}

template <typename T>
static void float_rows_avx2_widen(const T* W, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) a[j] = _mm256_fmadd_ps(load8_avx2(w + k + 8 * j), _mm256_loadu_ps(x + k + 8 * j), a[j]);
    }
    for (; k + 8 <= K; k += 8) a[0] = _mm256_fmadd_ps(load8_avx2(w + k), _mm256_loadu_ps(x + k), a[0]);
    float acc = hsum256_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    for (; k < K; ++k) acc += weight_to_float(w[k]) * x[k];
    out[n - n0] = acc;
  }
}

template <typename T>
static void float_rows_avx2(const T* W, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  if constexpr (std::is_same_v<T, uint16_t>) float_rows_avx2_bf16(W, K, x, n0, n1, out);
  else float_rows_avx2_widen<T>(W, K, x, n0, n1, out);
}
#pragma GCC pop_options

// ------------------------------------------------------------------------------------ AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")

static void quantize_row_avx512(const float* x, int64_t K, int8_t* q, float* a, int32_t* sum) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  if (k < K) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (K - k)) - 1), x + k)));
  const float amax = _mm512_reduce_max_ps(vmax);
  const float s = (1.0f / std::max(amax, 1e-5f)) * 127.0f;  // torch evaluates 127 / t as t.reciprocal() * 127
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  __m512i vsum = _mm512_setzero_si512();
  for (k = 0; k < K; k += 16) {
    const int64_t n = std::min<int64_t>(16, K - k);
    const __mmask16 mk = n == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i i32 = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
    vsum = _mm512_add_epi32(vsum, i32);  // masked-off lanes are 0
    _mm_mask_storeu_epi8(q + k, mk, _mm512_cvtepi32_epi8(i32));
  }
  *a = s;
  *sum = _mm512_reduce_add_epi32(vsum);
}

template <int FMT>
static inline void decode_avx512(__m512i v, __m512i* c) {
  if constexpr (FMT == F2) {
    const __m512i m3 = _mm512_set1_epi8(3);
    c[0] = _mm512_and_si512(v, m3);
    c[1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3);
    c[2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3);
    c[3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), m3);
  } else if constexpr (FMT == F1) {
    const __m512i m1 = _mm512_set1_epi8(1);
    c[0] = _mm512_and_si512(v, m1);
    for (int i = 1; i < 8; ++i) c[i] = _mm512_and_si512(_mm512_srli_epi16(v, i), m1);
  } else {
    const __m512i lomask = _mm512_set1_epi16(0x00FF), third = _mm512_set1_epi16(21846), three = _mm512_set1_epi16(3);
    __m512i lo = _mm512_and_si512(v, lomask), hi = _mm512_srli_epi16(v, 8);
    for (int i = 0; i < 4; ++i) {
      __m512i tl = _mm512_mulhi_epu16(lo, third), th = _mm512_mulhi_epu16(hi, third);
      __m512i dl = _mm512_sub_epi16(lo, _mm512_mullo_epi16(tl, three));
      __m512i dh = _mm512_sub_epi16(hi, _mm512_mullo_epi16(th, three));
      c[i] = _mm512_or_si512(dl, _mm512_slli_epi16(dh, 8));
      lo = tl;
      hi = th;
    }
    c[4] = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 8));
  }
}

// M = 1: decode each 64-byte vector of packed row r and meet the activations at once (x is
// zero-padded to a multiple of 64; the weights' last vector is a masked load).
//
// 2bit and 1bit do not shift the codes down: slot i of a byte is masked in place (2bit: bits
// 2i..2i+1, the code times 4^i; 1bit: bit i, the code times 2^i) and vpdpbusd takes it as it is, so
// accumulator i sums 4^i (2^i) times the slot's products, exactly (int32: |sum| <= 192 * 128 * K,
// below 2^31 for K <= kMaskedMaxK), and one arithmetic shift at the end divides it back, exact for
// an exact multiple of a power of two. Per 256 weights: one load, 4 ands and 4 vpdpbusd (the
// shifting decode needs 3 more). Two 64-byte steps per iteration keep 2P accumulators in flight
// (vpdpbusd's latency, not its throughput, bounded one step). The weights stream from memory at
// decode (a model is larger than the caches): a software prefetch kPrefetch bytes ahead (into the
// next rows, which follow in memory) keeps more lines in flight than the hardware prefetcher does,
// measured on the 2-core Xeon (one thread cycling over 300 MB of 4096x1536 weights): 8.3 GB/s
// without, 11.5 with, where a bare read loop reaches 13.7 (2 threads: 14.6, 22.2, 26.5).
constexpr int64_t kMaskedMaxK = 65536;

template <int FMT>
static void row_dot1_avx512(const uint8_t* w, int64_t K, const int8_t* x, int32_t* tot) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  constexpr bool masked = FMT != F16;
  if constexpr (masked) {
    if (K > kMaskedMaxK) {  // int32 headroom of the scaled sums: split K (never at model shapes)
      int32_t part[P];
      for (int i = 0; i < P; ++i) tot[i] = 0;
      for (int64_t k0 = 0; k0 < K; k0 += kMaskedMaxK) {
        row_dot1_avx512<FMT>(w + k0, std::min(kMaskedMaxK, K - k0), x + k0, part);
        for (int i = 0; i < P; ++i) tot[i] += part[i];
      }
      return;
    }
  }
  __m512i mask[P];
  for (int i = 0; i < P; ++i) mask[i] = _mm512_set1_epi8(static_cast<char>(FMT == F2 ? 3 << (2 * i) : 1 << i));
  auto step = [&](__m512i v, __m512i xv, __m512i* a) {
    if constexpr (masked) {
      for (int i = 0; i < P; ++i) a[i] = _mm512_dpbusd_epi32(a[i], _mm512_and_si512(v, mask[i]), xv);
    } else {
      __m512i c[P];
      decode_avx512<FMT>(v, c);
      for (int i = 0; i < P; ++i) a[i] = _mm512_dpbusd_epi32(a[i], c[i], xv);
    }
  };
  __m512i a[P], b[P];
  for (int i = 0; i < P; ++i) a[i] = b[i] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch + 64), _MM_HINT_T0);
    step(_mm512_loadu_si512(w + k), _mm512_loadu_si512(x + k), a);
    step(_mm512_loadu_si512(w + k + 64), _mm512_loadu_si512(x + k + 64), b);
  }
  for (; k < K; k += 64) {
    const __m512i v = k + 64 <= K ? _mm512_loadu_si512(w + k) : _mm512_maskz_loadu_epi8((1ULL << (K - k)) - 1, w + k);
    step(v, _mm512_loadu_si512(x + k), a);
  }
  for (int i = 0; i < P; ++i) {
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(a[i], b[i]));
    tot[i] = masked ? sum >> (FMT == F2 ? 2 * i : i) : sum;
  }
}

// G rows of decoded codes (stride cs) against MB activation rows (stride xs), Kp a multiple of 64.
template <int G, int MB>
static void tile_avx512(const uint8_t* c, int64_t cs, const int8_t* x, int64_t xs, int64_t Kp, int32_t* tot) {
  __m512i a[G][MB];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < MB; ++j) a[g][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 64) {
    __m512i cv[G], xv[MB];
    for (int g = 0; g < G; ++g) cv[g] = _mm512_loadu_si512(c + g * cs + k);
    for (int j = 0; j < MB; ++j) xv[j] = _mm512_loadu_si512(x + j * xs + k);
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < MB; ++j) a[g][j] = _mm512_dpbusd_epi32(a[g][j], cv[g], xv[j]);
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < MB; ++j) tot[g * MB + j] = _mm512_reduce_add_epi32(a[g][j]);
}

template <int FMT>
static void decode_row_avx512(const uint8_t* w, int64_t K, int64_t Kp, uint8_t* out) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  for (int64_t k = 0; k < Kp; k += 64) {
    const __m512i v = k + 64 <= K ? _mm512_loadu_si512(w + k)
                                  : k < K ? _mm512_maskz_loadu_epi8((1ULL << (K - k)) - 1, w + k) : _mm512_setzero_si512();
    __m512i c[P];
    decode_avx512<FMT>(v, c);
    for (int i = 0; i < P; ++i) _mm512_storeu_si512(out + i * Kp + k, c[i]);
  }
}

static void tile_any_avx512(int g, int mb, const uint8_t* c, int64_t cs, const int8_t* x, int64_t xs, int64_t Kp, int32_t* tot) {
  switch (g * 8 + mb) {
    case 4 * 8 + 4: return tile_avx512<4, 4>(c, cs, x, xs, Kp, tot);
    case 4 * 8 + 3: return tile_avx512<4, 3>(c, cs, x, xs, Kp, tot);
    case 4 * 8 + 2: return tile_avx512<4, 2>(c, cs, x, xs, Kp, tot);
    case 4 * 8 + 1: return tile_avx512<4, 1>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 4: return tile_avx512<1, 4>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 3: return tile_avx512<1, 3>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 2: return tile_avx512<1, 2>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 1: return tile_avx512<1, 1>(c, cs, x, xs, Kp, tot);
    default: std::abort();  // unreachable: g in {1, 4}, mb in 1..4
  }
}

// Several activation rows (batched decode and prefill without tiles): row_dot1_avx512's
// in-register decode of each 64-byte vector (2bit / 1bit: the slots masked in place, the sums
// shifted back at the end; 1.6bit: decoded) met by MB = 2 activation rows at once (2 x P int32
// accumulators), the packed row read from memory once and from L1 for the next two rows. Exact,
// as every path: int32 sums. Why: the decode-to-buffer path (codes_dot_simd's M > 1) stores and
// reloads every code; at the 700m MLP shapes on the 2-core EPYC (2 threads, 24 layers' gate / up /
// down) it took 6.2 ms for 2 rows, 10.5 for 4, 22.3 for 16, against 2.5 for one; this takes 3.0,
// 6.5, 15.9. Three or four rows at once spill registers (4 rows: 9.8 ms).
template <int FMT, int MB>
static void row_dotm_avx512(const uint8_t* w, int64_t K, const int8_t* x, int64_t xs, int32_t* tot) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  constexpr bool masked = FMT != F16;
  __m512i a[MB][P];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < P; ++i) a[m][i] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
    const __m512i v = k + 64 <= K ? _mm512_loadu_si512(w + k) : _mm512_maskz_loadu_epi8((1ULL << (K - k)) - 1, w + k);
    __m512i c[P];
    if constexpr (masked) {
      for (int i = 0; i < P; ++i) c[i] = _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(FMT == F2 ? 3 << (2 * i) : 1 << i)));
    } else {
      decode_avx512<FMT>(v, c);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * xs + k);
      for (int i = 0; i < P; ++i) a[m][i] = _mm512_dpbusd_epi32(a[m][i], c[i], xv);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < P; ++i) {
      const int32_t sum = _mm512_reduce_add_epi32(a[m][i]);
      tot[m * P + i] = masked ? sum >> (FMT == F2 ? 2 * i : i) : sum;
    }
}

template <int FMT>
static void codes_dot_avx512(const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1,
                           const int8_t* xq, int64_t xs, int64_t M, int32_t* acc, int64_t ldc) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  // 2bit: every M (the masks cost 4 ands a vector); 1.6bit's decode and 1bit's 8 slots cost more
  // than the buffer's stores past 2 rows (700m MLP, 2 threads: 1.6bit 2 rows 6.5 -> 5.3 ms but 16
  // rows 27 -> 33; 1bit 5.5 -> 4.2, 16 rows 18 -> 27; 2bit 16 rows 25-32 -> 16, 32 rows 44 -> 29)
  if ((FMT == F2 ? M > 1 : M == 2) && (FMT == F16 || K <= kMaskedMaxK)) {
    int32_t tot[2 * 8];
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t m = 0; m < M; m += 2) {
        const int mb = static_cast<int>(std::min<int64_t>(2, M - m));
        if (mb == 2)
          row_dotm_avx512<FMT, 2>(W + r * K, K, xq + m * xs, xs, tot);
        else
          row_dotm_avx512<FMT, 1>(W + r * K, K, xq + m * xs, xs, tot);
        for (int j = 0; j < mb; ++j)
          for (int i = 0; i < P && r + i * R < N; ++i) acc[(m + j) * ldc + r + i * R] = tot[j * P + i];
      }
    return;
  }
  codes_dot_simd<P, 4>(row_dot1_avx512<FMT>, decode_row_avx512<FMT>, tile_any_avx512, W, R, K, N, r0, r1, xq, xs, M, acc, ldc);
}

template <int FMT>
static void unpack_avx512(const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1, int8_t* out) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  const __m512i one = _mm512_set1_epi8(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W + r * K;
    for (int64_t k = 0; k < K; k += 64) {
      const int64_t n = std::min<int64_t>(64, K - k);
      const __mmask64 mk = n == 64 ? ~0ULL : (1ULL << n) - 1;
      __m512i c[P];
      decode_avx512<FMT>(_mm512_maskz_loadu_epi8(mk, w + k), c);
      for (int i = 0; i < P; ++i) {
        if (r + i * R >= N) break;
        __m512i v = FMT == F1 ? _mm512_sub_epi8(_mm512_add_epi8(c[i], c[i]), one) : _mm512_sub_epi8(c[i], one);
        _mm512_mask_storeu_epi8(out + (r + i * R) * K + k, mk, v);
      }
    }
  }
}
// The float rows of a head (64 weights an iteration, one or two cache lines) are prefetched
// kPrefetch bytes ahead, as the packed rows are: 32000x1536 bf16, 2 threads, 19.7 -> 23.3 GB/s
// (the Xeon, 1 KB; 8 KB on the EPYC: the bf16 head the same, int8 29 -> 37 GB/s on one thread).
template <typename T>
static inline void prefetch_ahead(const T* w) {
  const char* p = reinterpret_cast<const char*>(w) + kPrefetch;
  for (size_t line = 0; line < sizeof(T); ++line) _mm_prefetch(p + 64 * line, _MM_HINT_T0);
}
static inline __m512 load16_avx512(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
static inline __m512 load16_avx512(const uint16_t* w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 16));
}
template <typename T>
static void float_rows_avx512(const T* W, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      prefetch_ahead(w + k);
      for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(load16_avx512(w + k + 16 * j), _mm512_loadu_ps(x + k + 16 * j), a[j]);
    }
    for (; k + 16 <= K; k += 16) a[0] = _mm512_fmadd_ps(load16_avx512(w + k), _mm512_loadu_ps(x + k), a[0]);
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    for (; k < K; ++k) acc += weight_to_float(w[k]) * x[k];
    out[n - n0] = acc;
  }
}

// float_rows_avx512 for MB input rows at once (x rows xs apart, out rows ldo apart): each weight
// vector is loaded and converted once for all MB rows, and every row's sums run through the very
// operations of the one-row kernel in the same order, so each output equals the one-row kernel's
// bit for bit (a batch of decode rows gets each row's solo logits).
template <typename T, int MB>
static void float_rows_multi_avx512(const T* W, int64_t K, const float* x, int64_t xs, int64_t n0, int64_t n1,
                                    float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    __m512 a[MB][4];
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      prefetch_ahead(w + k);
      for (int j = 0; j < 4; ++j) {
        const __m512 wv = load16_avx512(w + k + 16 * j);
        for (int r = 0; r < MB; ++r) a[r][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * xs + k + 16 * j), a[r][j]);
      }
    }
    for (; k + 16 <= K; k += 16) {
      const __m512 wv = load16_avx512(w + k);
      for (int r = 0; r < MB; ++r) a[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * xs + k), a[r][0]);
    }
    for (int r = 0; r < MB; ++r) {
      float acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3])));
      for (int64_t kk = k; kk < K; ++kk) acc += weight_to_float(w[kk]) * x[r * xs + kk];
      out[r * ldo + n - n0] = acc;
    }
  }
}
#pragma GCC pop_options

// ------------------------------------------------------------------------------------ AMX-INT8
// The tile unit: one TDPBUSD multiplies a 16 x 64 tile of unsigned bytes by a 64 x 16 tile of
// signed bytes (held as 16 rows of 16 columns x 4 consecutive k, "VNNI order") into a 16 x 16
// int32 tile: 16384 multiply-adds, where vpdpbusd does 64. Here, for each 64 k:
//   A: 16 rows of codes, G = 16 / P packed rows x their P slices (2bit 4 x 4, 1bit 2 x 8, 1.6bit
//      3 x 5 and a zero row), decoded by AVX-512 into a 1 KB buffer that stays in L1;
//   B: those 64 k of up to 16 activation rows in VNNI order, laid out once per call;
//   C: four 16-row tiles (64 code rows, 4G packed rows) x the activation rows, accumulated in tile
//      registers over the whole of K, then stored and scattered to their output features.
// The decode costs about 30 instructions per 1024 weights whatever M is (VNNI's M = 1 kernel about
// 64), the products 16 cycles of the tile unit: one pass over the weights serves up to 16
// activation rows for little more than the cost of one. Exact: int32 sums of u8 x s8 products.
// Tile registers: tmm0-3 the four C, tmm4 B, tmm5-6 A (two, alternating, with two buffers: the
// decode of the next A does not wait for the multiply that reads the last one).
// Measured on a 2-core Xeon with AMX (one thread, 2bit, us per call, 2026-12-04): 1536x4096 M = 16
// 194 vs VNNI's 864, M = 8 170 vs 313, M = 3 160 vs 144; at M = 1 VNNI's row kernel is twice as
// fast (70 vs 152: a tile's decode, stores and reload cost more than its 16 cycles of multiply).
// Hence the tile path from kAmxMinM rows: with the prefetch below, 2 rows already gain (700m decode
// step, 2 threads: 2 rows 23.3 ms vs 25.4 on VNNI, 3 rows 24.4 vs 28.0).
static constexpr int64_t kAmxMinM = 2;
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,amx-tile,amx-int8")

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of each tile register
  uint8_t rows[16];
};

// GCC 12's tileloadd (like its ldtilecfg) does not tell the optimizer that it reads memory, so
// the stores that fill a buffer could be moved past the load that reads it (seen at -O3: wrong
// sums); a compiler barrier before each load keeps them in order.
#define BITNET_TILE_LOADD(tmm, base, stride)        \
  do {                                              \
    __asm__ __volatile__("" : : : "memory");        \
    _tile_loadd(tmm, base, stride);                 \
  } while (0)

static void amx_configure(int mb) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(mb * 4);  // C: 16 x mb int32
  cfg.rows[4] = 16, cfg.colsb[4] = static_cast<uint16_t>(mb * 4);                              // B: 16 x (mb x 4 k)
  for (int t = 5; t < 7; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                             // A: 16 x 64 codes
  // GCC 12's ldtilecfg does not tell the optimizer that it reads cfg: without this barrier the
  // stores above are dropped at -O2 and the first tile instruction faults (#UD).
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// A tile's 16 code rows of packed rows r .. r + G - 1 (those below r1) at k .. k + 63: row i G + g
// holds slice i of packed row r + g (slice-major: rows i G .. i G + G - 1 are the G consecutive
// output features r + i R ..); rows of packed rows at or past r1 stay zero. The 4G packed rows of
// a pass are read side by side, a stream each: each is prefetched a shorter way ahead than one row.
constexpr int64_t kAmxPrefetch = 512;
template <int FMT>
static inline void amx_decode(const uint8_t* W, int64_t K, int64_t r, int64_t r1, int64_t k, uint8_t* a) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  constexpr int G = 16 / P;
  for (int g = 0; g < G; ++g) {
    __m512i c[P];
    if (r + g < r1) {
      const uint8_t* w = W + (r + g) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(w + kAmxPrefetch), _MM_HINT_T0);
      const __m512i v = k + 64 <= K ? _mm512_loadu_si512(w) : _mm512_maskz_loadu_epi8((1ULL << (K - k)) - 1, w);
      decode_avx512<FMT>(v, c);
    } else {
      for (int i = 0; i < P; ++i) c[i] = _mm512_setzero_si512();
    }
    for (int i = 0; i < P; ++i) _mm512_store_si512(a + (i * G + g) * 64, c[i]);
  }
}

// C tile T (stored in cbuf, 16 rows x mb) to its output features. (The tile intrinsics take
// their register numbers as literals, so the callers spell each T out.)
template <int FMT>
static inline void amx_scatter(int T, int64_t r, int64_t r1, int64_t R, int64_t N, int mb, int cols, const int32_t* cbuf,
                               int32_t* acc, int64_t ldc) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  constexpr int G = 16 / P;
  const int64_t pr = r + T * G;  // the tile's first packed row
  const int64_t rows = std::min<int64_t>(G, r1 - pr);
  if (rows <= 0) return;
  // Column j of the tile (16 code rows of token j) in one gather; slice i's G rows are G
  // consecutive output features from pr + i R: one masked store each puts lanes i G .. i G + n - 1
  // at those features (masked-off lanes are neither written nor touched).
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(mb));
  __mmask16 mask[P];
  for (int i = 0; i < P; ++i) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(rows, N - (pr + i * R)));
    mask[i] = static_cast<__mmask16>(((1u << n) - 1) << (i * G));
  }
  for (int j = 0; j < cols; ++j) {
    const __m512i v = _mm512_i32gather_epi32(idx, cbuf + j, 4);
    // lane i G + g goes to feature pr + i R + g (an address computed as an integer: for R < G the
    // base of the store lies before acc, though no lane it writes does)
    const uintptr_t out = reinterpret_cast<uintptr_t>(acc + j * ldc + pr);
    for (int i = 0; i < P; ++i)
      _mm512_mask_storeu_epi32(reinterpret_cast<void*>(out + (i * R - i * G) * sizeof(int32_t)), mask[i], v);
  }
}

// acc[m * ldc + r + i R] = sum_k code_i(W[r, k]) * xq[m, k] for packed rows r in [r0, r1), any M;
// xq rows zero-padded to xs, a multiple of 64. Up to 16 rows (decode): each A tile is decoded just
// before its multiply. More (prefill, batched prompts): the 4G packed rows of a pass are decoded
// once for all of K into an L2-resident buffer (4 KB per 64 k), then every block of 16 activation
// rows runs its tiles over it, so the decode is paid once per pass whatever M is.
template <int FMT>
static void codes_dot_amx(const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1,
                          const int8_t* xq, int64_t xs, int64_t M, int32_t* acc, int64_t ldc) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  constexpr int G = 16 / P;
  const int64_t chunks = xs / 64, blocks = (M + 15) / 16;
  const int mb = static_cast<int>(std::min<int64_t>(16, M));  // tile columns: every block padded to mb
  alignas(64) uint8_t abuf[2 * 1024];
  alignas(64) int32_t cbuf[16 * 16];
  std::memset(abuf, 0, sizeof(abuf));  // 1.6bit: row 15 of each A is never written
  // B in VNNI order, block b, chunk c, row q (k = 64 c + 4 q .. + 3), column j: x[16 b + j, 64 c + 4 q + 0..3]
  // (columns past M zero)
  std::vector<int8_t> bbuf(static_cast<size_t>(blocks * chunks * 16 * mb * 4), 0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t c = 0; c < chunks; ++c)
      for (int q = 0; q < 16; ++q)
        for (int j = 0; j < mb && 16 * b + j < M; ++j)
          std::memcpy(&bbuf[((b * chunks + c) * 16 + q) * mb * 4 + j * 4], xq + (16 * b + j) * xs + c * 64 + q * 4, 4);
  amx_configure(mb);
  auto finish_block = [&](int64_t r, int64_t b) {
    int32_t* out = acc + 16 * b * ldc;
    const int cols = static_cast<int>(std::min<int64_t>(mb, M - 16 * b));
    _tile_stored(0, cbuf, mb * 4);
    amx_scatter<FMT>(0, r, r1, R, N, mb, cols, cbuf, out, ldc);
    _tile_stored(1, cbuf, mb * 4);
    amx_scatter<FMT>(1, r, r1, R, N, mb, cols, cbuf, out, ldc);
    _tile_stored(2, cbuf, mb * 4);
    amx_scatter<FMT>(2, r, r1, R, N, mb, cols, cbuf, out, ldc);
    _tile_stored(3, cbuf, mb * 4);
    amx_scatter<FMT>(3, r, r1, R, N, mb, cols, cbuf, out, ldc);
  };
  if (blocks == 1) {
    for (int64_t r = r0; r < r1; r += 4 * G) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k = c * 64;
        uint8_t* a0 = abuf;
        uint8_t* a1 = abuf + 1024;
        BITNET_TILE_LOADD(4, &bbuf[c * 16 * mb * 4], mb * 4);
        amx_decode<FMT>(W, K, r, r1, k, a0);
        BITNET_TILE_LOADD(5, a0, 64);
        _tile_dpbusd(0, 5, 4);
        amx_decode<FMT>(W, K, r + G, r1, k, a1);
        BITNET_TILE_LOADD(6, a1, 64);
        _tile_dpbusd(1, 6, 4);
        amx_decode<FMT>(W, K, r + 2 * G, r1, k, a0);
        BITNET_TILE_LOADD(5, a0, 64);
        _tile_dpbusd(2, 5, 4);
        amx_decode<FMT>(W, K, r + 3 * G, r1, k, a1);
        BITNET_TILE_LOADD(6, a1, 64);
        _tile_dpbusd(3, 6, 4);
      }
      finish_block(r, 0);
    }
  } else {
    std::vector<uint8_t> decoded(static_cast<size_t>(chunks * 4 * 1024 + 64));
    uint8_t* dec = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(decoded.data()) + 63) & ~uintptr_t(63));
    for (int64_t r = r0; r < r1; r += 4 * G) {
      for (int64_t c = 0; c < chunks; ++c)
        for (int t = 0; t < 4; ++t) amx_decode<FMT>(W, K, r + t * G, r1, c * 64, dec + (c * 4 + t) * 1024);
      for (int64_t b = 0; b < blocks; ++b) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const int8_t* bb = &bbuf[b * chunks * 16 * mb * 4];
        for (int64_t c = 0; c < chunks; ++c) {
          const uint8_t* a = dec + c * 4 * 1024;
          BITNET_TILE_LOADD(4, bb + c * 16 * mb * 4, mb * 4);
          BITNET_TILE_LOADD(5, a, 64);
          _tile_dpbusd(0, 5, 4);
          BITNET_TILE_LOADD(6, a + 1024, 64);
          _tile_dpbusd(1, 6, 4);
          BITNET_TILE_LOADD(5, a + 2048, 64);
          _tile_dpbusd(2, 5, 4);
          BITNET_TILE_LOADD(6, a + 3072, 64);
          _tile_dpbusd(3, 6, 4);
        }
        finish_block(r, b);
      }
    }
  }
  _tile_release();
}
#pragma GCC pop_options

// AMX-BF16 (CPUID leaf 7 EDX bit 22), with the tile data the process was granted for AMX-INT8.
static bool amx_bf16_present() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1);
}
static const bool kAmxBf16 = kDetected >= AMX && amx_bf16_present();

// AVX512-BF16 (CPUID leaf 7 subleaf 1 EAX bit 5: Zen 4 and 5, Cooper Lake, Sapphire Rapids on).
static bool avx512_bf16_present() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
}
static const bool kAvx512Bf16 = kDetected >= AVX512 && avx512_bf16_present();

// A bfloat16 head on the tile unit, for bfloat16 activations: out[m * ldo + n - n0] = sum_k
// W[n, k] * x[m, k] for n in [n0, n1) and M <= 16 rows of x, float32 sums. TDPBF16PS multiplies
// 16 rows x 32 k of W, read in place (a tile load with the row stride), by 32 k x M columns of x
// (pairs of k in "VNNI order", laid out once per call) into a 16 x M float32 tile, accumulated over
// K; four such tiles (64 rows of W) per pass share each load of x. Every output's sum runs over the
// same tiles in the same order whatever M is, so a row's outputs do not depend on the other rows
// (a batch of decode rows gets each row's solo logits); the tile unit treats denormal inputs as
// zero and rounds its float32 sums to nearest even. Why: the AVX-512 kernel converts and multiplies
// one row of x at a time; 16 decode rows of the 700m head (32000 x 1536) take it 11.7 ms on the
// 2-core Xeon, where a pass over the bytes takes about 4.5.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,amx-tile,amx-bf16")
static void amx_bf16_configure(int mb) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(mb * 4);  // C: 16 x mb float32
  cfg.rows[4] = 16, cfg.colsb[4] = static_cast<uint16_t>(mb * 4);                              // B: 16 x (mb x 2 k)
  for (int t = 5; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                             // A: 16 x 32 bf16
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// xb: M rows of bf16 bits, row stride xs (a multiple of 32, zero past K)
static void bf16_rows_amx(const uint16_t* W, int64_t K, const uint16_t* xb, int64_t xs, int64_t M, int64_t n0, int64_t n1,
                          float* out, int64_t ldo) {
  const int64_t chunks = xs / 32, full = K / 32;  // k chunks of 32; the last (K % 32) from a padded copy
  const int mb = static_cast<int>(M);
  std::vector<uint16_t> bbuf(static_cast<size_t>(chunks * 16 * mb * 2));
  for (int64_t c = 0; c < chunks; ++c)  // B: chunk c, row q, column j: x[j, 32 c + 2 q .. + 1]
    for (int q = 0; q < 16; ++q)
      for (int j = 0; j < mb; ++j) std::memcpy(&bbuf[((c * 16 + q) * mb + j) * 2], xb + j * xs + c * 32 + 2 * q, 4);
  alignas(64) uint16_t abuf[16 * 32];
  alignas(64) float cbuf[16 * 16];
  amx_bf16_configure(mb);
  const int64_t stride = K * static_cast<int64_t>(sizeof(uint16_t));
  // A tile of rows n .. n + 15 at chunk c: in place where all 16 rows and 32 k exist, else copied
  // into abuf with zeros past K and past n1
  auto load_a = [&](int tmm_is_5, int64_t n, int64_t c) {
    if (c < full && n + 16 <= n1) {
      for (int i = 0; i < 16; i += 4)  // the lines of the next chunks of these rows, ahead
        _mm_prefetch(reinterpret_cast<const char*>(W + (n + i) * K + c * 32) + kAmxPrefetch, _MM_HINT_T0);
      if (tmm_is_5) BITNET_TILE_LOADD(5, W + n * K + c * 32, stride);
      else BITNET_TILE_LOADD(6, W + n * K + c * 32, stride);
      return;
    }
    std::memset(abuf, 0, sizeof(abuf));
    const int64_t kk = std::min<int64_t>(32, K - c * 32);
    for (int64_t i = 0; i < 16 && n + i < n1; ++i) std::memcpy(abuf + i * 32, W + (n + i) * K + c * 32, sizeof(uint16_t) * kk);
    if (tmm_is_5) BITNET_TILE_LOADD(5, abuf, 64);
    else BITNET_TILE_LOADD(6, abuf, 64);
  };
  auto store = [&](int t, int64_t n) {
    if (t == 0) _tile_stored(0, cbuf, mb * 4);
    if (t == 1) _tile_stored(1, cbuf, mb * 4);
    if (t == 2) _tile_stored(2, cbuf, mb * 4);
    if (t == 3) _tile_stored(3, cbuf, mb * 4);
    __asm__ __volatile__("" : : : "memory");
    for (int64_t i = 0; i < 16 && n + i < n1; ++i)
      for (int j = 0; j < mb; ++j) out[j * ldo + (n + i - n0)] = cbuf[i * mb + j];
  };
  for (int64_t n = n0; n < n1; n += 64) {
    const int tiles = static_cast<int>(std::min<int64_t>(4, (n1 - n + 15) / 16));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; ++c) {
      BITNET_TILE_LOADD(4, &bbuf[c * 16 * mb * 2], mb * 4);
      load_a(1, n, c);
      _tile_dpbf16ps(0, 5, 4);
      if (tiles > 1) {
        load_a(0, n + 16, c);
        _tile_dpbf16ps(1, 6, 4);
      }
      if (tiles > 2) {
        load_a(1, n + 32, c);
        _tile_dpbf16ps(2, 5, 4);
      }
      if (tiles > 3) {
        load_a(0, n + 48, c);
        _tile_dpbf16ps(3, 6, 4);
      }
    }
    for (int t = 0; t < tiles; ++t) store(t, n + 16 * t);
  }
  _tile_release();
}
#pragma GCC pop_options
#endif  // BITNET_X86


#ifdef BITNET_ARM
// ------------------------------------------------------------------------------------ NEON
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")

static void quantize_row_neon(const float* x, int64_t K, int8_t* q, float* a, int32_t* sum) {
  float32x4_t vmax = vdupq_n_f32(0.f);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) vmax = vmaxq_f32(vmax, vabsq_f32(vld1q_f32(x + k)));
  float amax = vmaxvq_f32(vmax);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = (1.0f / std::max(amax, 1e-5f)) * 127.0f;  // torch evaluates 127 / t as t.reciprocal() * 127
  const float32x4_t vs = vdupq_n_f32(s), lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
  int32x4_t vsum = vdupq_n_s32(0);
  k = 0;
  for (; k + 8 <= K; k += 8) {
    // vrndnq: round to nearest, ties to even, as torch.round; the multiply is not fused
    const int32x4_t i0 = vcvtq_s32_f32(vminq_f32(hi, vmaxq_f32(lo, vrndnq_f32(vmulq_f32(vld1q_f32(x + k), vs)))));
    const int32x4_t i1 = vcvtq_s32_f32(vminq_f32(hi, vmaxq_f32(lo, vrndnq_f32(vmulq_f32(vld1q_f32(x + k + 4), vs)))));
    vsum = vaddq_s32(vsum, vaddq_s32(i0, i1));
    vst1_s8(q + k, vmovn_s16(vcombine_s16(vmovn_s32(i0), vmovn_s32(i1))));
  }
  int32_t acc = vaddvq_s32(vsum);
  for (; k < K; ++k) {
    float v = std::min(127.0f, std::max(-128.0f, std::nearbyint(x[k] * s)));
    q[k] = static_cast<int8_t>(v);
    acc += q[k];
  }
  *a = s;
  *sum = acc;
}

// P code vectors of 16 packed bytes. 1.6-bit: x / 3 = (x * 171) >> 9 for bytes, digit = x - 3t.
template <int FMT>
static inline void decode_neon(uint8x16_t v, uint8x16_t* c) {
  if constexpr (FMT == F2) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    c[0] = vandq_u8(v, m3);
    c[1] = vandq_u8(vshrq_n_u8(v, 2), m3);
    c[2] = vandq_u8(vshrq_n_u8(v, 4), m3);
    c[3] = vshrq_n_u8(v, 6);
  } else if constexpr (FMT == F1) {
    const uint8x16_t m1 = vdupq_n_u8(1);
    for (int i = 0; i < 8; ++i) c[i] = vandq_u8(vshlq_u8(v, vdupq_n_s8(static_cast<int8_t>(-i))), m1);
  } else {
    const uint8x8_t k171 = vdup_n_u8(171);
    const uint8x16_t three = vdupq_n_u8(3);
    uint8x16_t x = v;
    for (int i = 0; i < 4; ++i) {
      const uint16x8_t lo = vmull_u8(vget_low_u8(x), k171), hi = vmull_u8(vget_high_u8(x), k171);
      const uint8x16_t t = vshrq_n_u8(vcombine_u8(vshrn_n_u16(lo, 8), vshrn_n_u16(hi, 8)), 1);
      c[i] = vmlsq_u8(x, t, three);
      x = t;
    }
    c[4] = x;
  }
}

static inline uint8x16_t load_tail128(const void* p, int64_t n) {
  uint8_t buf[16] = {0};
  std::memcpy(buf, p, static_cast<size_t>(n));
  return vld1q_u8(buf);
}

template <int FMT>
static void row_dot1_neon(const uint8_t* w, int64_t K, const int8_t* x, int32_t* tot) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  int32x4_t a[P];
  for (int i = 0; i < P; ++i) a[i] = vdupq_n_s32(0);
  for (int64_t k = 0; k < K; k += 16) {
    uint8x16_t c[P];
    decode_neon<FMT>(k + 16 <= K ? vld1q_u8(w + k) : load_tail128(w + k, K - k), c);
    const int8x16_t xv = vld1q_s8(x + k);  // zero-padded past K
    for (int i = 0; i < P; ++i) a[i] = vdotq_s32(a[i], vreinterpretq_s8_u8(c[i]), xv);
  }
  for (int i = 0; i < P; ++i) tot[i] = vaddvq_s32(a[i]);
}

template <int G, int MB>
static void tile_neon(const uint8_t* c, int64_t cs, const int8_t* x, int64_t xs, int64_t Kp, int32_t* tot) {
  int32x4_t a[G][MB];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < MB; ++j) a[g][j] = vdupq_n_s32(0);
  for (int64_t k = 0; k < Kp; k += 16) {
    int8x16_t cv[G], xv[MB];
    for (int g = 0; g < G; ++g) cv[g] = vreinterpretq_s8_u8(vld1q_u8(c + g * cs + k));
    for (int j = 0; j < MB; ++j) xv[j] = vld1q_s8(x + j * xs + k);
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < MB; ++j) a[g][j] = vdotq_s32(a[g][j], cv[g], xv[j]);
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < MB; ++j) tot[g * MB + j] = vaddvq_s32(a[g][j]);
}

template <int FMT>
static void decode_row_neon(const uint8_t* w, int64_t K, int64_t Kp, uint8_t* out) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  for (int64_t k = 0; k < Kp; k += 16) {
    const uint8x16_t v = k + 16 <= K ? vld1q_u8(w + k) : k < K ? load_tail128(w + k, K - k) : vdupq_n_u8(0);
    uint8x16_t c[P];
    decode_neon<FMT>(v, c);
    for (int i = 0; i < P; ++i) vst1q_u8(out + i * Kp + k, c[i]);
  }
}

static void tile_any_neon(int g, int mb, const uint8_t* c, int64_t cs, const int8_t* x, int64_t xs, int64_t Kp, int32_t* tot) {
  switch (g * 8 + mb) {
    case 4 * 8 + 4: return tile_neon<4, 4>(c, cs, x, xs, Kp, tot);
    case 4 * 8 + 3: return tile_neon<4, 3>(c, cs, x, xs, Kp, tot);
    case 4 * 8 + 2: return tile_neon<4, 2>(c, cs, x, xs, Kp, tot);
    case 4 * 8 + 1: return tile_neon<4, 1>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 4: return tile_neon<1, 4>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 3: return tile_neon<1, 3>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 2: return tile_neon<1, 2>(c, cs, x, xs, Kp, tot);
    case 1 * 8 + 1: return tile_neon<1, 1>(c, cs, x, xs, Kp, tot);
    default: std::abort();  // unreachable: g in {1, 4}, mb in 1..4
  }
}

template <int FMT>
static void codes_dot_neon(const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1,
                           const int8_t* xq, int64_t xs, int64_t M, int32_t* acc, int64_t ldc) {
  codes_dot_simd<FMT == F2 ? 4 : FMT == F16 ? 5 : 8, 4>(row_dot1_neon<FMT>, decode_row_neon<FMT>, tile_any_neon, W, R, K, N,
                                                          r0, r1, xq, xs, M, acc, ldc);
}

template <int FMT>
static void unpack_neon(const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1, int8_t* out) {
  constexpr int P = FMT == F2 ? 4 : FMT == F16 ? 5 : 8;
  const uint8x16_t one = vdupq_n_u8(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W + r * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      uint8x16_t c[P];
      decode_neon<FMT>(vld1q_u8(w + k), c);
      for (int i = 0; i < P; ++i) {
        if (r + i * R >= N) break;
        const uint8x16_t v = FMT == F1 ? vsubq_u8(vaddq_u8(c[i], c[i]), one) : vsubq_u8(c[i], one);
        vst1q_s8(out + (r + i * R) * K + k, vreinterpretq_s8_u8(v));
      }
    }
    for (; k < K; ++k)
      for (int i = 0; i < P; ++i) {
        if (r + i * R >= N) break;
        const int c = kCodes.t[FMT][w[k]][i];
        out[(r + i * R) * K + k] = static_cast<int8_t>(FMT == F1 ? 2 * c - 1 : c - 1);
      }
  }
}
// 16 weights as four float32x4
static inline void load16_neon(const int8_t* w, float32x4_t* f) {
  const int8x16_t wv = vld1q_s8(w);
  const int16x8_t lo = vmovl_s8(vget_low_s8(wv)), hi = vmovl_s8(vget_high_s8(wv));
  f[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  f[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
  f[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  f[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}
static inline void load16_neon(const uint16_t* w, float32x4_t* f) {
  const uint16x8_t a = vld1q_u16(w), b = vld1q_u16(w + 8);
  f[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(a), 16));
  f[1] = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(a), 16));
  f[2] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16));
  f[3] = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(b), 16));
}
template <typename T>
static void float_rows_neon(const T* W, int64_t K, const float* x, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    float32x4_t a[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      float32x4_t f[4];
      load16_neon(w + k, f);
      for (int j = 0; j < 4; ++j) a[j] = vfmaq_f32(a[j], f[j], vld1q_f32(x + k + 4 * j));
    }
    float acc = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
    for (; k < K; ++k) acc += weight_to_float(w[k]) * x[k];
    out[n - n0] = acc;
  }
}
#pragma GCC pop_options
#endif  // BITNET_ARM

// ------------------------------------------------------------------------------------ epilogue
// The outputs of one row of a projection: y[j] = T(float(mult * acc[j] - sum) * f) (+ bias[j],
// added in float32 and rounded again), T float32 or bfloat16 (its 16 bits). The same float32
// operations as the torch reference and the same rounding as c10::BFloat16 (to nearest even; NaN
// -> 0x7FC0), so any level gives the scalar path's bits; in SIMD lanes because at decode this is
// one conversion per output feature, tens of thousands a layer.
static inline uint16_t bf16_bits(float v) {
  if (std::isnan(v)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFFu) >> 16);
}

static void finish_f32_scalar(const int32_t* acc, int64_t n, int32_t mult, int32_t sum, float f, const float* bias, float* y) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(mult * acc[j] - sum) * f;
    y[j] = bias ? v + bias[j] : v;
  }
}
static void finish_bf16_scalar(const int32_t* acc, int64_t n, int32_t mult, int32_t sum, float f, const uint16_t* bias, uint16_t* y) {
  for (int64_t j = 0; j < n; ++j) {
    uint16_t b = bf16_bits(static_cast<float>(mult * acc[j] - sum) * f);
    if (bias) b = bf16_bits(bf16_bits_to_float(b) + bf16_bits_to_float(bias[j]));
    y[j] = b;
  }
}

#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
static inline __m512i bf16_rne_avx512(__m512 v) {  // 32-bit lanes, the bf16 bits in the low half
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
}
static inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
static void finish_f32_avx512(const int32_t* acc, int64_t n, int32_t mult, int32_t sum, float f, const float* bias, float* y) {
  const __m512i vm = _mm512_set1_epi32(mult), vs = _mm512_set1_epi32(sum);
  const __m512 vf = _mm512_set1_ps(f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512i a = _mm512_sub_epi32(_mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m, acc + j), vm), vs);
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), vf);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j));
    _mm512_mask_storeu_ps(y + j, m, v);
  }
}
static void finish_bf16_avx512(const int32_t* acc, int64_t n, int32_t mult, int32_t sum, float f, const uint16_t* bias, uint16_t* y) {
  const __m512i vm = _mm512_set1_epi32(mult), vs = _mm512_set1_epi32(sum);
  const __m512 vf = _mm512_set1_ps(f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512i a = _mm512_sub_epi32(_mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m, acc + j), vm), vs);
    __m512i b = bf16_rne_avx512(_mm512_mul_ps(_mm512_cvtepi32_ps(a), vf));
    if (bias) {
      const __m512 bv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bias + j)), 16));
      b = bf16_rne_avx512(_mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), bv));
    }
    _mm256_mask_storeu_epi16(y + j, m, _mm512_cvtepi32_epi16(b));
  }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
static inline __m256i bf16_rne_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
static void finish_f32_avx2(const int32_t* acc, int64_t n, int32_t mult, int32_t sum, float f, const float* bias, float* y) {
  const __m256i vm = _mm256_set1_epi32(mult), vs = _mm256_set1_epi32(sum);
  const __m256 vf = _mm256_set1_ps(f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i a = _mm256_sub_epi32(_mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)), vm), vs);
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(a), vf);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    _mm256_storeu_ps(y + j, v);
  }
  finish_f32_scalar(acc + j, n - j, mult, sum, f, bias ? bias + j : nullptr, y + j);
}
static void finish_bf16_avx2(const int32_t* acc, int64_t n, int32_t mult, int32_t sum, float f, const uint16_t* bias, uint16_t* y) {
  const __m256i vm = _mm256_set1_epi32(mult), vs = _mm256_set1_epi32(sum);
  const __m256 vf = _mm256_set1_ps(f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i a = _mm256_sub_epi32(_mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)), vm), vs);
    __m256i b = bf16_rne_avx2(_mm256_mul_ps(_mm256_cvtepi32_ps(a), vf));
    if (bias) {
      const __m256 bv = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bias + j))), 16));
      b = bf16_rne_avx2(_mm256_add_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), bv));
    }
    // 8 lanes of 32 bits -> 8 x 16 bits (values < 65536: packus is exact)
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j), h);
  }
  finish_bf16_scalar(acc + j, n - j, mult, sum, f, bias ? bias + j : nullptr, y + j);
}
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------------------------ norms, rope
// One row of RMSNorm and of the rotary embedding in AVX-512 lanes, for float32 and bfloat16 (BF16:
// its 16 bits), with the scalar loops' operations and roundings (bitnet_cpu.cpp's rms_norm / rope;
// c10's bf16 rounding). The one reduction, RMSNorm's float64 sum of the float32 squares, runs in
// 16 lanes instead of one: each square is exact in float64, only the order of the additions
// differs (the float32 mean can differ in its last bit, as torch's own can).
#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
template <bool BF16>
static inline __m512 load_row16(const void* p, int64_t i, __mmask16 m) {
  if constexpr (BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i)), 16));
  else
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
}
template <bool BF16>
static inline __m512 round_row16(__m512 v) {  // to the row's dtype and back to float32
  if constexpr (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_rne_avx512(v), 16));
  else return v;
}
template <bool BF16>
static inline void store_row16(void* p, int64_t i, __mmask16 m, __m512 v) {
  if constexpr (BF16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, _mm512_cvtepi32_epi16(bf16_rne_avx512(v)));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
}

template <bool BF16>
static void rms_row_avx512(const void* x, const void* w, int64_t C, float eps, void* y) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int64_t c = 0; c < C; c += 16) {
    const __m512 v = load_row16<BF16>(x, c, mask16(C - c));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    s0 = _mm512_fmadd_pd(lo, lo, s0);  // lo * lo is exact in float64: the fma rounds once, as an add
    s1 = _mm512_fmadd_pd(hi, hi, s1);
  }
  const float var = static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) / static_cast<double>(C));
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(var + eps));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = mask16(C - c);
    const __m512 h = round_row16<BF16>(_mm512_mul_ps(load_row16<BF16>(x, c, m), r));
    store_row16<BF16>(y, c, m, _mm512_mul_ps(load_row16<BF16>(w, c, m), h));
  }
}

// y = x * cos + rotate_half(x) * sin for one head vector (D even, contiguous), each product and the
// sum rounded to the dtype
template <bool BF16>
static void rope_row_avx512(const void* x, const void* cs, const void* sn, int64_t D, void* y) {
  const int64_t h2 = D / 2;
  for (int64_t d = 0; d < h2; d += 16) {
    const __mmask16 m = mask16(h2 - d);
    const __m512 x1 = load_row16<BF16>(x, d, m), x2 = load_row16<BF16>(x, d + h2, m);
    const __m512 a1 = round_row16<BF16>(_mm512_mul_ps(x1, load_row16<BF16>(cs, d, m)));
    const __m512 r1 = round_row16<BF16>(_mm512_mul_ps(_mm512_xor_ps(x2, _mm512_set1_ps(-0.f)), load_row16<BF16>(sn, d, m)));
    store_row16<BF16>(y, d, m, _mm512_add_ps(a1, r1));
    const __m512 a2 = round_row16<BF16>(_mm512_mul_ps(x2, load_row16<BF16>(cs, d + h2, m)));
    const __m512 r2 = round_row16<BF16>(_mm512_mul_ps(x1, load_row16<BF16>(sn, d + h2, m)));
    store_row16<BF16>(y, d + h2, m, _mm512_add_ps(a2, r2));
  }
}
// A decode layer's elementwise steps on rows of n values, as torch's ops compute them (each
// result rounded to the dtype): y = x + r (the residual), and the MLP's act(g) * u with act relu
// (g < 0 -> 0: NaN and -0 pass, as clamp_min) or relu2 (relu then squared, rounded).
template <bool BF16>
static void add_rows_avx512(const void* x, const void* r, int64_t n, void* y) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    store_row16<BF16>(y, i, m, _mm512_add_ps(load_row16<BF16>(x, i, m), load_row16<BF16>(r, i, m)));
  }
}
template <bool BF16>
static void relu_mul_avx512(const void* g, const void* u, int64_t n, bool square, void* y) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    const __m512 gv = load_row16<BF16>(g, i, m);
    __m512 a = _mm512_mask_mov_ps(gv, _mm512_cmp_ps_mask(gv, zero, _CMP_LT_OQ), zero);
    if (square) a = round_row16<BF16>(_mm512_mul_ps(a, a));
    store_row16<BF16>(y, i, m, _mm512_mul_ps(a, load_row16<BF16>(u, i, m)));
  }
}

#pragma GCC pop_options
#endif

// bf16 rows widened to float32 (exact: the bits shifted up), the input of activation
// quantization, in SIMD lanes (one conversion per input feature and row, tens of thousands a
// layer at decode).
static void widen_bf16_scalar(const uint16_t* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_bits_to_float(x[i]);
}
#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
static void widen_bf16_avx512(const uint16_t* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x + i)), 16)));
  }
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
static void widen_bf16_avx2(const uint16_t* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))), 16)));
  widen_bf16_scalar(x + i, n - i, y + i);
}
#pragma GCC pop_options
#endif
using WidenFn = void (*)(const uint16_t*, int64_t, float*);
static WidenFn widen_bf16_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return widen_bf16_avx512;
  if (isa >= AVX2) return widen_bf16_avx2;
#endif
  (void)isa;
  return widen_bf16_scalar;
}

// float32 rows narrowed to bf16 bits, rounded as c10::BFloat16 (bf16_bits: to nearest even, NaN ->
// 0x7FC0), in SIMD lanes (a decode layer's attention output, thousands of values a call).
static void narrow_bf16_scalar(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_bits(x[i]);
}
#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
static void narrow_bf16_avx512(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    store_row16<true>(y, i, m, _mm512_maskz_loadu_ps(m, x + i));
  }
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
static void narrow_bf16_avx2(const float* x, int64_t n, uint16_t* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // the low 16 bits of each 32-bit lane, packed in order
    const __m256i b = bf16_rne_avx2(_mm256_loadu_ps(x + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
  }
  narrow_bf16_scalar(x + i, n - i, y + i);
}
#pragma GCC pop_options
#endif
using NarrowFn = void (*)(const float*, int64_t, uint16_t*);
static NarrowFn narrow_bf16_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return narrow_bf16_avx512;
  if (isa >= AVX2) return narrow_bf16_avx2;
#endif
  (void)isa;
  return narrow_bf16_scalar;
}

// The same rows in AVX2 lanes (8 floats), the remainder one value at a time with the same
// operations: the results equal the AVX-512 rows' but for RMSNorm's float64 summation order.
template <bool BF16>
static inline float row_get(const void* p, int64_t i) {
  if constexpr (BF16) return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  else return static_cast<const float*>(p)[i];
}
template <bool BF16>
static inline float row_round(float v) {
  if constexpr (BF16) return bf16_bits_to_float(bf16_bits(v));
  else return v;
}
template <bool BF16>
static inline void row_put(void* p, int64_t i, float v) {
  if constexpr (BF16) static_cast<uint16_t*>(p)[i] = bf16_bits(v);
  else static_cast<float*>(p)[i] = v;
}
#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
template <bool BF16>
static inline __m256 load_row8(const void* p, int64_t i) {
  if constexpr (BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i))), 16));
  else
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}
template <bool BF16>
static inline __m256 round_row8(__m256 v) {
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_rne_avx2(v), 16));
  else return v;
}
template <bool BF16>
static inline void store_row8(void* p, int64_t i, __m256 v) {
  if constexpr (BF16) {
    const __m256i b = bf16_rne_avx2(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
  } else {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  }
}

template <bool BF16>
static void rms_row_avx2(const void* x, const void* w, int64_t C, float eps, void* y) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 v = load_row8<BF16>(x, c);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_fmadd_pd(lo, lo, s0);
    s1 = _mm256_fmadd_pd(hi, hi, s1);
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, _mm256_add_pd(s0, s1));
  double ss = (part[0] + part[1]) + (part[2] + part[3]);
  for (int64_t t = c; t < C; ++t) {
    const double v = row_get<BF16>(x, t);
    ss += v * v;
  }
  const float var = static_cast<float>(ss / static_cast<double>(C));
  const float r = 1.f / std::sqrt(var + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (c = 0; c + 8 <= C; c += 8)
    store_row8<BF16>(y, c, _mm256_mul_ps(load_row8<BF16>(w, c), round_row8<BF16>(_mm256_mul_ps(load_row8<BF16>(x, c), rv))));
  for (; c < C; ++c) row_put<BF16>(y, c, row_get<BF16>(w, c) * row_round<BF16>(row_get<BF16>(x, c) * r));
}

template <bool BF16>
static void add_rows_avx2(const void* x, const void* r, int64_t n, void* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store_row8<BF16>(y, i, _mm256_add_ps(load_row8<BF16>(x, i), load_row8<BF16>(r, i)));
  for (; i < n; ++i) row_put<BF16>(y, i, row_get<BF16>(x, i) + row_get<BF16>(r, i));
}
template <bool BF16>
static void relu_mul_avx2(const void* g, const void* u, int64_t n, bool square, void* y) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = load_row8<BF16>(g, i);
    __m256 a = _mm256_blendv_ps(gv, zero, _mm256_cmp_ps(gv, zero, _CMP_LT_OQ));
    if (square) a = round_row8<BF16>(_mm256_mul_ps(a, a));
    store_row8<BF16>(y, i, _mm256_mul_ps(a, load_row8<BF16>(u, i)));
  }
  for (; i < n; ++i) {
    const float gv = row_get<BF16>(g, i);
    float a = gv < 0.f ? 0.f : gv;
    if (square) a = row_round<BF16>(a * a);
    row_put<BF16>(y, i, a * row_get<BF16>(u, i));
  }
}

template <bool BF16>
static void rope_row_avx2(const void* x, const void* cs, const void* sn, int64_t D, void* y) {
  const int64_t h2 = D / 2;
  const __m256 sign = _mm256_set1_ps(-0.f);
  int64_t d = 0;
  for (; d + 8 <= h2; d += 8) {
    const __m256 x1 = load_row8<BF16>(x, d), x2 = load_row8<BF16>(x, d + h2);
    const __m256 a1 = round_row8<BF16>(_mm256_mul_ps(x1, load_row8<BF16>(cs, d)));
    const __m256 r1 = round_row8<BF16>(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load_row8<BF16>(sn, d)));
    store_row8<BF16>(y, d, _mm256_add_ps(a1, r1));
    const __m256 a2 = round_row8<BF16>(_mm256_mul_ps(x2, load_row8<BF16>(cs, d + h2)));
    const __m256 r2 = round_row8<BF16>(_mm256_mul_ps(x1, load_row8<BF16>(sn, d + h2)));
    store_row8<BF16>(y, d + h2, _mm256_add_ps(a2, r2));
  }
  for (; d < h2; ++d) {
    const float x1 = row_get<BF16>(x, d), x2 = row_get<BF16>(x, d + h2);
    row_put<BF16>(y, d, row_round<BF16>(x1 * row_get<BF16>(cs, d)) + row_round<BF16>(-x2 * row_get<BF16>(sn, d)));
    row_put<BF16>(y, d + h2, row_round<BF16>(x2 * row_get<BF16>(cs, d + h2)) + row_round<BF16>(x1 * row_get<BF16>(sn, d + h2)));
  }
}
#pragma GCC pop_options
#endif

using FinishF32Fn = void (*)(const int32_t*, int64_t, int32_t, int32_t, float, const float*, float*);
using FinishBf16Fn = void (*)(const int32_t*, int64_t, int32_t, int32_t, float, const uint16_t*, uint16_t*);
static FinishF32Fn finish_f32_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return finish_f32_avx512;
  if (isa >= AVX2) return finish_f32_avx2;
#endif
  (void)isa;
  return finish_f32_scalar;
}
static FinishBf16Fn finish_bf16_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return finish_bf16_avx512;
  if (isa >= AVX2) return finish_bf16_avx2;
#endif
  (void)isa;
  return finish_bf16_scalar;
}

// ------------------------------------------------------------------------------------ int4 head
// A 4-bit grouped head with int8 activations (Int4Linear: the lm_head at a third of bf16's bytes):
// weights in groups of 32 along K, each w = d_g (c - 8) with a code c in [1, 15] and a float32
// scale d_g; activations per-row int8 as everywhere (x_q, a). For output n and row m:
//     out[m, n] = sum_g d_g * sum_{k in g} (c[n, k] - 8) * x_q[m, k]       (then / a[m], by the caller)
// Layout (Int4Linear.from_linear): K padded with zero weights (c = 8) to Kp, a multiple of 64;
// block b of 64 weights is 32 bytes, byte i holding weight 64b + i (low nibble) and 64b + 32 + i
// (high nibble): a block unpacks to 64 codes in order with one and, one shift and one and. The
// integer sums are exact per 4 weights (vpdpbusd on the codes, minus 8 x the sum of those 4
// activations, precomputed per call: x8s); each 4-weight sum is then scaled and summed in float32
// lanes, in a fixed order per ISA whatever M is (rows of a batch = each row alone).
static void q4_rows_scalar(const uint8_t* C, const float* D, int64_t Kp, const int8_t* x, const int32_t* x8s, int64_t xs,
                           int64_t M, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = Kp / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = C + n * (Kp / 2);
    const float* d = D + n * G;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = x + m * xs;
      const int32_t* x8 = x8s + m * (xs / 4);
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t b = g / 2, half = g % 2;
        for (int q = 0; q < 8; ++q) {  // 4 weights at a time, as the SIMD lanes
          int32_t s = 0;
          for (int i = 0; i < 4; ++i) {
            const int64_t j = q * 4 + i;  // 0..31 within the group
            const uint8_t byte = c[b * 32 + j];
            s += (half ? byte >> 4 : byte & 15) * xm[g * 32 + j];
          }
          acc += static_cast<float>(s - x8[g * 8 + q]) * d[g];
        }
      }
      out[m * ldo + n - n0] = acc;
    }
  }
}

#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
template <int MB>
static void q4_row_avx512(const uint8_t* c, const float* d, int64_t Kp, const int8_t* x, const int32_t* x8s, int64_t xs,
                          float* out, int64_t ldo) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < Kp / 64; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(c + b * 32) + kPrefetch, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 32));
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4)),
                                             _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), 1);
    const __m512 dv = _mm512_insertf32x8(_mm512_set1_ps(d[2 * b]), _mm256_set1_ps(d[2 * b + 1]), 1);
    for (int m = 0; m < MB; ++m) {
      const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(x + m * xs + b * 64)),
                                         _mm512_loadu_si512(x8s + m * (xs / 4) + b * 16));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dv, acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldo] = _mm512_reduce_add_ps(acc[m]);
}
static void q4_rows_avx512(const uint8_t* C, const float* D, int64_t Kp, const int8_t* x, const int32_t* x8s, int64_t xs,
                           int64_t M, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = Kp / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = C + n * (Kp / 2);
    const float* d = D + n * G;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) q4_row_avx512<4>(c, d, Kp, x + m * xs, x8s + m * (xs / 4), xs, out + m * ldo + n - n0, ldo);
    for (; m < M; ++m) q4_row_avx512<1>(c, d, Kp, x + m * xs, x8s + m * (xs / 4), xs, out + m * ldo + n - n0, ldo);
  }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
static void q4_rows_avx2(const uint8_t* C, const float* D, int64_t Kp, const int8_t* x, const int32_t* x8s, int64_t xs,
                         int64_t M, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = Kp / 32;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = C + n * (Kp / 2);
    const float* d = D + n * G;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = x + m * xs;
      const int32_t* x8 = x8s + m * (xs / 4);
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < Kp / 64; ++b) {
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(c + b * 32) + kPrefetch, _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b * 32));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        // each int32 lane: 4 products (maddubs pairs, |sum| <= 2 * 15 * 128, then pairs of pairs)
        const __m256i s0 = _mm256_sub_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * 64))), ones),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + b * 16)));
        const __m256i s1 = _mm256_sub_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * 64 + 32))), ones),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + b * 16 + 8)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(d[2 * b]), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(d[2 * b + 1]), acc);
      }
      out[m * ldo + n - n0] = hsum256_ps(acc);
    }
  }
}
#pragma GCC pop_options
#endif

using Q4RowsFn = void (*)(const uint8_t*, const float*, int64_t, const int8_t*, const int32_t*, int64_t, int64_t, int64_t,
                          int64_t, float*, int64_t);
static Q4RowsFn q4_rows_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return q4_rows_avx512;
  if (isa >= AVX2) return q4_rows_avx2;
#endif
  (void)isa;
  return q4_rows_scalar;
}

// ------------------------------------------------------------------------------------ dispatch
using DotFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t);
using UnpackFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int8_t*);
using QuantFn = void (*)(const float*, int64_t, int8_t*, float*, int32_t*);

static QuantFn quant_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return quantize_row_avx512;
  if (isa >= AVX2) return quantize_row_avx2;
#elif defined(BITNET_ARM)
  if (isa >= NEON) return quantize_row_neon;
#endif
  return quantize_row_scalar;
}

// acc[m * ldc + r + i R] = sum_k code_i(W[r, k]) * xq[m, k] for packed rows r in [r0, r1); xq has
// row stride xs, a multiple of 64, zero past K.
static void codes_dot(int64_t isa, int fmt, const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1,
                      const int8_t* xq, int64_t xs, int64_t M, int32_t* acc, int64_t ldc) {
#ifdef BITNET_X86
  if (isa >= AMX && M >= kAmxMinM) {
    static const DotFn f[3] = {codes_dot_amx<F2>, codes_dot_amx<F16>, codes_dot_amx<F1>};
    return f[fmt](W, R, K, N, r0, r1, xq, xs, M, acc, ldc);
  }
  if (isa >= AVX512) {
    static const DotFn f[3] = {codes_dot_avx512<F2>, codes_dot_avx512<F16>, codes_dot_avx512<F1>};
    return f[fmt](W, R, K, N, r0, r1, xq, xs, M, acc, ldc);
  }
  if (isa >= AVX2) {
    static const DotFn f[3] = {codes_dot_avx2<F2>, codes_dot_avx2<F16>, codes_dot_avx2<F1>};
    return f[fmt](W, R, K, N, r0, r1, xq, xs, M, acc, ldc);
  }
#elif defined(BITNET_ARM)
  if (isa >= NEON) {
    static const DotFn f[3] = {codes_dot_neon<F2>, codes_dot_neon<F16>, codes_dot_neon<F1>};
    return f[fmt](W, R, K, N, r0, r1, xq, xs, M, acc, ldc);
  }
#endif
  codes_dot_scalar(fmt, W, R, K, N, r0, r1, xq, xs, M, acc, ldc);
}

static void unpack_rows(int64_t isa, int fmt, const uint8_t* W, int64_t R, int64_t K, int64_t N, int64_t r0, int64_t r1, int8_t* out) {
#ifdef BITNET_X86
  if (isa >= AVX512) {
    static const UnpackFn f[3] = {unpack_avx512<F2>, unpack_avx512<F16>, unpack_avx512<F1>};
    return f[fmt](W, R, K, N, r0, r1, out);
  }
  if (isa >= AVX2) {
    static const UnpackFn f[3] = {unpack_avx2<F2>, unpack_avx2<F16>, unpack_avx2<F1>};
    return f[fmt](W, R, K, N, r0, r1, out);
  }
#elif defined(BITNET_ARM)
  if (isa >= NEON) {
    static const UnpackFn f[3] = {unpack_neon<F2>, unpack_neon<F16>, unpack_neon<F1>};
    return f[fmt](W, R, K, N, r0, r1, out);
  }
#endif
  unpack_scalar(fmt, W, R, K, N, r0, r1, out);
}

template <typename T>
using FloatRowsFn = void (*)(const T*, int64_t, const float*, int64_t, int64_t, float*);

template <typename T>
static FloatRowsFn<T> float_rows_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return float_rows_avx512<T>;
  if (isa >= AVX2) return float_rows_avx2<T>;
#elif defined(BITNET_ARM)
  if (isa >= NEON) return float_rows_neon<T>;
#endif
  return float_rows_scalar<T>;
}

// Several input rows at once (M rows of x, xs apart; out rows ldo apart), each output equal to
// float_rows_fn's for its row bit for bit: AVX-512 converts each weight vector once for up to 4
// rows; elsewhere the one-row kernel row by row.
template <typename T>
static void float_rows_multi(int64_t isa, const T* W, int64_t K, const float* x, int64_t xs, int64_t M, int64_t n0,
                             int64_t n1, float* out, int64_t ldo) {
  int64_t m = 0;
#ifdef BITNET_X86
  if (isa >= AVX512) {
    for (; m + 4 <= M; m += 4) float_rows_multi_avx512<T, 4>(W, K, x + m * xs, xs, n0, n1, out + m * ldo, ldo);
    if (M - m == 3) float_rows_multi_avx512<T, 3>(W, K, x + m * xs, xs, n0, n1, out + m * ldo, ldo);
    if (M - m == 2) float_rows_multi_avx512<T, 2>(W, K, x + m * xs, xs, n0, n1, out + m * ldo, ldo);
    if (M - m == 1) float_rows_avx512<T>(W, K, x + m * xs, n0, n1, out + m * ldo);
    return;
  }
#endif
  const FloatRowsFn<T> f = float_rows_fn<T>(isa);
  for (; m < M; ++m) f(W, K, x + m * xs, n0, n1, out + m * ldo);
}

}  // namespace bitnet_cpu
