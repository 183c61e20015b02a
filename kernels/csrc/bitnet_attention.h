// Decode attention on the CPU, pure C++ (no torch): one query token per sequence against the
// KV cache rows it has written (float32, or bfloat16: KT = uint16_t, its bits), for every head; the piece of a decode step that torch's
// scaled_dot_product_attention would run as one call per layer (tens of microseconds of dispatch
// and setup for a few thousand multiply-adds at decode's context lengths).
//
// For query row n (cache row rows[n], position pos[n]) and head h (KV head g = h / (H / G)):
//     s_j = (q . k_j) * scale          for the keys j in [0, pos[n]] the mask allows (slot pos[n],
//                                      the query's own, always: a query is never all-masked)
//     y   = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)
// in float32 (a bf16 cache widened as it is read), the dot products and weighted sums in SIMD lanes (AVX-512 or AVX2 where the CPU has
// them; the exponentials too, a polynomial within about 2 ulps): the last bits can
// differ from torch's kernel, as any two attention kernels do; tests hold it to a float64 reference.
// The query heads that share a KV head run together (attend_part), so that each cache row streams
// from memory once for all of them, a software prefetch 8 KB ahead, and a context longer than 512
// slots runs in parts merged at the end (kPartKeys: work for more threads than a model has KV
// heads). At long contexts a decode step reads nearly as much cache as weights (2B-4T at 2048
// tokens: 315 MB of float32 cache a token beside 522 MB of packed weights); measured on the 2-core
// Zen 5 EPYC, 30 layers of 2B-4T at 2048 tokens: 34.5 -> 13.2 ms on one thread, 24.5 -> 9.0 on two;
// at 1024 tokens 15.7 -> 6.3 and 9.1 -> 4.7 (before: one head at a time, each row read 4 times,
// no prefetch, threads over (query, head) pairs).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bitnet_kernels.h"

namespace bitnet_cpu {

// One head, the portable and AVX2 paths: scores[j] = q . keys[j] (j < L, rows D apart) and y +=
// sum_j p[j] values[j] (p[j] == 0 skipped), the loops over keys inside the SIMD code (no call per key).
template <typename KT>
using ScoresFn = void (*)(const float*, const KT*, int64_t, int64_t, float*);
template <typename KT>
using WeightedFn = void (*)(const float*, const KT*, int64_t, int64_t, float*);

// A cache element as float32: itself, or bf16 bits widened (exact)
static inline float cache_float(float x) { return x; }
static inline float cache_float(uint16_t x) { return bf16_bits_to_float(x); }

// Cache rows read ahead by a software prefetch: 8 KB, the distance the weight kernels stream at
// (bitnet_kernels.h, kPrefetch); the hardware prefetcher alone left one Zen 5 core at ~9 GB/s here.
template <typename KT>
static inline int64_t rows_ahead(int64_t D) {
  return std::max<int64_t>(4, kPrefetch / (static_cast<int64_t>(sizeof(KT)) * std::max<int64_t>(D, 1)));
}
// The elements between two prefetches of a row: one 64-byte line
template <typename KT>
constexpr int64_t kLine = 64 / sizeof(KT);

template <typename KT>
static void scores_scalar(const float* q, const KT* keys, int64_t L, int64_t D, float* s) {
  for (int64_t j = 0; j < L; ++j) {
    float a = 0.f;
    for (int64_t d = 0; d < D; ++d) a += q[d] * cache_float(keys[j * D + d]);
    s[j] = a;
  }
}
// y += sum_j p[j] values[j], key by key in order (the weighted sums of a block of keys added to
// those of the blocks before it: the same operations as one pass)
template <typename KT>
static void weighted_acc_scalar(const float* p, const KT* values, int64_t L, int64_t D, float* y) {
  for (int64_t j = 0; j < L; ++j)
    if (p[j] != 0.f)
      for (int64_t d = 0; d < D; ++d) y[d] += p[j] * cache_float(values[j * D + d]);
}

// The softmax's exponentials on AVX2 and AVX-512, one method: e^x by range reduction (n = round(x
// log2 e), r = x - n ln 2 in two parts) and Cephes' degree-6 polynomial for e^r (max relative error
// about 2 float32 ulps), scaled by 2^n; x clamped below at kExpMin (e^x then ~1e-38: a weight of 0).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kExpMin = -87.3f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// hsum256_ps: bitnet_kernels.h
// 8 cache elements as float32
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
template <typename KT>
static void scores_avx2(const float* q, const KT* keys, int64_t L, int64_t D, float* s) {
  const int64_t D8 = D / 8 * 8, ahead = rows_ahead<KT>(D);
  int64_t j = 0;
  if (D8 == D)  // four keys at a time, their four sums in one reduction (3 hadds), q loaded once for them
    for (; j + 4 <= L; j += 4) {
      const KT* k = keys + j * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 8) {
        if ((d & (kLine<KT> - 1)) == 0)
          for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(k + (ahead + r) * D + d), _MM_HINT_T0);
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, load8(k + d), a0);
        a1 = _mm256_fmadd_ps(qv, load8(k + D + d), a1);
        a2 = _mm256_fmadd_ps(qv, load8(k + 2 * D + d), a2);
        a3 = _mm256_fmadd_ps(qv, load8(k + 3 * D + d), a3);
      }
      const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half: a0..a3
      _mm_storeu_ps(s + j, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
    }
  for (; j < L; ++j) {
    const KT* k = keys + j * D;
    for (int64_t d = 0; d < D; d += kLine<KT>) _mm_prefetch(reinterpret_cast<const char*>(k + ahead * D + d), _MM_HINT_T0);
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a);
    float t = hsum256_ps(a);
    for (int64_t d = D8; d < D; ++d) t += q[d] * cache_float(k[d]);
    s[j] = t;
  }
}
// y[d0, d0 + 8 NV) += sum_j p[j] values[j][...], the NV vectors of y in registers across the keys
// (through memory, each key's add waited on the last one's store)
template <int NV, typename KT>
static void weighted_block_avx2(const float* p, const KT* values, int64_t L, int64_t D, int64_t d0, bool fetch, float* y) {
  const int64_t ahead = rows_ahead<KT>(D);
  __m256 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_loadu_ps(y + d0 + 8 * c);
  for (int64_t j = 0; j < L; ++j) {
    if (p[j] == 0.f) continue;
    const KT* v = values + j * D;
    if (fetch)
      for (int64_t d = 0; d < D; d += kLine<KT>) _mm_prefetch(reinterpret_cast<const char*>(v + ahead * D + d), _MM_HINT_T0);
    const __m256 vp = _mm256_set1_ps(p[j]);
    for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_ps(vp, load8(v + d0 + 8 * c), acc[c]);
  }
  for (int c = 0; c < NV; ++c) _mm256_storeu_ps(y + d0 + 8 * c, acc[c]);
}

template <typename KT>
static void weighted_acc_avx2(const float* p, const KT* values, int64_t L, int64_t D, float* y) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t d0 = 0; d0 < D8; d0 += 64) {  // 64 features (8 vectors) a pass, each key's products in order
    const bool fetch = d0 == 0;
    switch (std::min<int64_t>(8, (D8 - d0) / 8)) {
      case 8: weighted_block_avx2<8, KT>(p, values, L, D, d0, fetch, y); break;
      case 7: weighted_block_avx2<7, KT>(p, values, L, D, d0, fetch, y); break;
      case 6: weighted_block_avx2<6, KT>(p, values, L, D, d0, fetch, y); break;
      case 5: weighted_block_avx2<5, KT>(p, values, L, D, d0, fetch, y); break;
      case 4: weighted_block_avx2<4, KT>(p, values, L, D, d0, fetch, y); break;
      case 3: weighted_block_avx2<3, KT>(p, values, L, D, d0, fetch, y); break;
      case 2: weighted_block_avx2<2, KT>(p, values, L, D, d0, fetch, y); break;
      default: weighted_block_avx2<1, KT>(p, values, L, D, d0, fetch, y); break;
    }
  }
  for (int64_t j = 0; j < L; ++j)
    if (p[j] != 0.f)
      for (int64_t d = D8; d < D; ++d) y[d] += p[j] * cache_float(values[j * D + d]);
}

// p[j] = exp(s[j] - m) in place (0 where s[j] is -inf: a masked key), returning their sum, 8 lanes
// a step (kExpPoly; 2^n made in the exponent's bits: n lies in [-126, 0] since x >= kExpMin), a
// short tail through a padded copy. std::exp a key at a time took about a third of the AVX2 decode attention at 1024
// tokens (2B-4T: 20 heads x 1024 keys x 30 layers, 614k exponentials a token). The 2-core EPYC
// capped to AVX2, 30 layers of 2B-4T's attention from a bf16 cache, alternating processes, 2 rounds:
// 1 thread 1024 / 2048 tokens 8.1-8.3 / 16.2-16.3 -> 6.4-6.8 / 12.7-13.1 ms; 2 threads 4.3 / 8.5-8.6
// -> 3.5 / 6.5-6.7 ms.
static float softmax_exp_avx2(float* s, int64_t L, float m) {
  const __m256 log2e = _mm256_set1_ps(kLog2e), ln2_hi = _mm256_set1_ps(kLn2Hi), ln2_lo = _mm256_set1_ps(kLn2Lo),
               lo = _mm256_set1_ps(kExpMin), mv = _mm256_set1_ps(m);
  const __m256 c0 = _mm256_set1_ps(kExpPoly[0]), c1 = _mm256_set1_ps(kExpPoly[1]), c2 = _mm256_set1_ps(kExpPoly[2]),
               c3 = _mm256_set1_ps(kExpPoly[3]), c4 = _mm256_set1_ps(kExpPoly[4]), c5 = _mm256_set1_ps(kExpPoly[5]),
               one = _mm256_set1_ps(1.f), ninf = _mm256_set1_ps(-INFINITY);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; j += 8) {
    alignas(32) float buf[8];
    const bool tail = j + 8 > L;
    float* src = s + j;
    if (tail) {
      for (int i = 0; i < 8; ++i) buf[i] = j + i < L ? s[j + i] : -INFINITY;
      src = buf;
    }
    const __m256 sv = _mm256_loadu_ps(src);
    const __m256 live = _mm256_cmp_ps(sv, ninf, _CMP_NEQ_OQ);
    const __m256 x = _mm256_max_ps(_mm256_sub_ps(sv, mv), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, x));
    __m256 p = _mm256_fmadd_ps(c0, r, c1);
    p = _mm256_fmadd_ps(p, r, c2);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c4);
    p = _mm256_fmadd_ps(p, r, c5);
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
    const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), bias), 23));
    const __m256 e = _mm256_and_ps(live, _mm256_mul_ps(p, two_n));
    _mm256_storeu_ps(src, e);
    if (tail)
      for (int i = 0; j + i < L; ++i) s[j + i] = buf[i];
    sum = _mm256_add_ps(sum, e);
  }
  return hsum256_ps(sum);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
static inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
// the cache elements of mask m among 16 as float32 (0 elsewhere)
static inline __m512 load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// lane i of the result = the sum of v[i]'s 16 lanes (i < 16): a transposing tree of 15 adds and 30
// shuffles for 16 dot products, where 16 separate reductions take ~4x the instructions, in series
static inline __m512 hsum16x16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane k: [a0+a2, b0+b2, a1+a3, b1+b3], a = v[2i], b = v[2i + 1]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane k: the lane's sums of v[4i..4i+3], in order
    const __m512d lo = _mm512_castps_pd(w[2 * i]), hi = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)), _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes 0 + 1 and 2 + 3 of x[2i], then of x[2i + 1]
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88), _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

// s[r * L + j] = q_r . keys[j] for RB queries (rows D apart) and every key, KB keys at a time (RB * KB
// <= 16 dot products side by side, one hsum16x16), the keys past the last full block one by one
template <int RB, int KB, typename KT>
static void group_scores_avx512(const float* q, const KT* keys, int64_t L, int64_t D, float* s) {
  static_assert(RB * KB <= 16, "16 accumulators at most");
  const int64_t ahead = rows_ahead<KT>(D);
  int64_t j = 0;
  for (; j + KB <= L; j += KB) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail16(D - d);
      __m512 kv[KB];
      for (int jj = 0; jj < KB; ++jj) {
        if ((d & (kLine<KT> - 1)) == 0) _mm_prefetch(reinterpret_cast<const char*>(keys + (j + jj + ahead) * D + d), _MM_HINT_T0);
        kv[jj] = load16(m, keys + (j + jj) * D + d);
      }
      for (int r = 0; r < RB; ++r) {
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + r * D + d);
        for (int jj = 0; jj < KB; ++jj) acc[r * KB + jj] = _mm512_fmadd_ps(qv, kv[jj], acc[r * KB + jj]);
      }
    }
    alignas(64) float out[16];
    _mm512_store_ps(out, hsum16x16(acc));
    for (int r = 0; r < RB; ++r)
      for (int jj = 0; jj < KB; ++jj) s[r * L + j + jj] = out[r * KB + jj];
  }
  for (; j < L; ++j)
    for (int r = 0; r < RB; ++r) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = tail16(D - d);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + r * D + d), load16(m, keys + j * D + d), a);
      }
      s[r * L + j] = _mm512_reduce_add_ps(a);
    }
}

// y_r[d0, d0 + 16 NV) = sum_j p[r * L + j] values[j][...] for RB heads (the last vector masked by
// mlast): each value row read once for the RB heads, the accumulators in registers; a key whose
// weight is 0 for all of them (masked) is skipped.
template <int RB, int NV, typename KT>
static void group_weighted_block_avx512(const float* p, const KT* values, int64_t L, int64_t D, int64_t d0, __mmask16 mlast,
                                        float* y) {
  const int64_t ahead = rows_ahead<KT>(D);
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    uint32_t any = 0;  // the weights' bits: all zero only where every weight is +0
    for (int r = 0; r < RB; ++r) {
      uint32_t b;
      std::memcpy(&b, p + r * L + j, sizeof b);
      any |= b;
    }
    if (!any) continue;
    for (int c = 0; c < NV; ++c)
      if (((16 * c) & (kLine<KT> - 1)) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(values + (j + ahead) * D + d0 + 16 * c), _MM_HINT_T0);
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load16(c + 1 < NV ? static_cast<__mmask16>(0xFFFF) : mlast, values + j * D + d0 + 16 * c);
    for (int r = 0; r < RB; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * L + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c)
      _mm512_mask_storeu_ps(y + r * D + d0 + 16 * c, c + 1 < NV ? static_cast<__mmask16>(0xFFFF) : mlast, acc[r][c]);
}

// y_r = sum_j p[r * L + j] values[j] for RB heads, 64 output features (4 vectors) a pass
template <int RB, typename KT>
static void group_weighted_avx512(const float* p, const KT* values, int64_t L, int64_t D, float* y) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t left = D - d0;
    const __mmask16 mlast = tail16(left - (std::min<int64_t>(4, (left + 15) / 16) - 1) * 16);
    switch (std::min<int64_t>(4, (left + 15) / 16)) {
      case 4: group_weighted_block_avx512<RB, 4, KT>(p, values, L, D, d0, mlast, y); break;
      case 3: group_weighted_block_avx512<RB, 3, KT>(p, values, L, D, d0, mlast, y); break;
      case 2: group_weighted_block_avx512<RB, 2, KT>(p, values, L, D, d0, mlast, y); break;
      default: group_weighted_block_avx512<RB, 1, KT>(p, values, L, D, d0, mlast, y); break;
    }
  }
}

// R heads in blocks of at most 4 (16 dot products a block of keys)
template <typename KT>
static void group_scores_avx512_any(const float* q, int64_t R, const KT* keys, int64_t L, int64_t D, float* s) {
  for (int64_t r = 0; r < R;) {
    const int64_t left = R - r;
    if (left >= 4) group_scores_avx512<4, 4, KT>(q + r * D, keys, L, D, s + r * L), r += 4;
    else if (left == 3) group_scores_avx512<3, 5, KT>(q + r * D, keys, L, D, s + r * L), r += 3;
    else if (left == 2) group_scores_avx512<2, 8, KT>(q + r * D, keys, L, D, s + r * L), r += 2;
    else group_scores_avx512<1, 16, KT>(q + r * D, keys, L, D, s + r * L), r += 1;
  }
}
template <typename KT>
static void group_weighted_avx512_any(const float* p, int64_t R, const KT* values, int64_t L, int64_t D, float* y) {
  for (int64_t r = 0; r < R;) {
    const int64_t left = R - r;
    if (left >= 4) group_weighted_avx512<4, KT>(p + r * L, values, L, D, y + r * D), r += 4;
    else if (left == 3) group_weighted_avx512<3, KT>(p + r * L, values, L, D, y + r * D), r += 3;
    else if (left == 2) group_weighted_avx512<2, KT>(p + r * L, values, L, D, y + r * D), r += 2;
    else group_weighted_avx512<1, KT>(p + r * L, values, L, D, y + r * D), r += 1;
  }
}
// p[j] = exp(s[j] - m) in place (0 where s[j] is -inf: a masked key), returning their sum, 16 lanes
// a step (kExpPoly; 2^n by scalef).
static float softmax_exp_avx512(float* s, int64_t L, float m) {
  const __m512 log2e = _mm512_set1_ps(kLog2e), ln2_hi = _mm512_set1_ps(kLn2Hi), ln2_lo = _mm512_set1_ps(kLn2Lo),
               lo = _mm512_set1_ps(kExpMin), mv = _mm512_set1_ps(m);
  const __m512 c0 = _mm512_set1_ps(kExpPoly[0]), c1 = _mm512_set1_ps(kExpPoly[1]), c2 = _mm512_set1_ps(kExpPoly[2]),
               c3 = _mm512_set1_ps(kExpPoly[3]), c4 = _mm512_set1_ps(kExpPoly[4]), c5 = _mm512_set1_ps(kExpPoly[5]),
               one = _mm512_set1_ps(1.f), ninf = _mm512_set1_ps(-INFINITY);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    const __mmask16 t = tail16(L - j);
    const __m512 sv = _mm512_mask_loadu_ps(ninf, t, s + j);
    const __mmask16 live = _mm512_cmp_ps_mask(sv, ninf, _CMP_NEQ_OQ);
    const __m512 x = _mm512_max_ps(_mm512_sub_ps(sv, mv), lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, x));
    __m512 p = _mm512_fmadd_ps(c0, r, c1);
    p = _mm512_fmadd_ps(p, r, c2);
    p = _mm512_fmadd_ps(p, r, c3);
    p = _mm512_fmadd_ps(p, r, c4);
    p = _mm512_fmadd_ps(p, r, c5);
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, one));
    const __m512 e = _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
    _mm512_mask_storeu_ps(s + j, t, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}
#pragma GCC pop_options
#endif

template <typename KT>
static ScoresFn<KT> scores_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX2) return scores_avx2<KT>;
#endif
  (void)isa;
  return scores_scalar<KT>;
}
template <typename KT>
static WeightedFn<KT> weighted_acc_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX2) return weighted_acc_avx2<KT>;
#endif
  (void)isa;
  return weighted_acc_scalar<KT>;
}

// One part of the attention of the R query heads (rows D apart) that share one KV head: keys /
// values (L, D) rows D apart, a run of a cache row's slots; allowed[j] (nullptr: every key) for
// j < L, except key `own` (the query's own slot, or -1 where the part does not hold it), which
// always counts. Writes, per head r: m[r] the part's largest scaled score (-inf where every key is
// masked), sum[r] the sum of exp(s_j - m[r]) and y[r] (D,) the sum of exp(s_j - m[r]) v_j, not yet
// divided by it (merge_parts does). scores: R * L floats of scratch.
// The keys and values stream once for the R heads (GQA: 2B-4T's 4 query heads a KV head read each
// cache row once, not 4 times): on AVX-512 in register blocks (group_*_avx512), elsewhere in blocks
// of 32 keys that stay in L1 across the R heads, each head's arithmetic the one-head kernels'
// (scores_*, weighted_acc_*).
template <typename KT>
static void attend_part(int64_t isa, const float* q, int64_t R, const KT* keys, const KT* values, int64_t L, int64_t D,
                        const bool* allowed, int64_t own, float scale, float* scores, float* y, float* m, float* sum) {
  constexpr int64_t kBlock = 32;
#ifdef BITNET_X86
  if (isa >= AVX512) {
    group_scores_avx512_any(q, R, keys, L, D, scores);
  } else
#endif
  {
    const ScoresFn<KT> sf = scores_fn<KT>(isa);
    for (int64_t j0 = 0; j0 < L; j0 += kBlock)
      for (int64_t r = 0; r < R; ++r) sf(q + r * D, keys + j0 * D, std::min(kBlock, L - j0), D, scores + r * L + j0);
  }
  for (int64_t r = 0; r < R; ++r) {  // scale, mask, softmax numerators (0 for a masked key) and their sum
    float* sr = scores + r * L;
    float mr = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
      if (allowed && j != own && !allowed[j]) {
        sr[j] = -INFINITY;
        continue;
      }
      sr[j] *= scale;
      mr = std::max(mr, sr[j]);
    }
    float total = 0.f;
#ifdef BITNET_X86
    if (isa >= AVX512) {
      total = softmax_exp_avx512(sr, L, mr);  // (every key masked: mr = -inf, every numerator 0)
    } else if (isa >= AVX2) {
      total = softmax_exp_avx2(sr, L, mr);
    } else
#endif
    {
      for (int64_t j = 0; j < L; ++j) {
        const float p = sr[j] == -INFINITY ? 0.f : std::exp(sr[j] - mr);
        sr[j] = p;
        total += p;
      }
    }
    m[r] = mr;
    sum[r] = total;
  }
#ifdef BITNET_X86
  if (isa >= AVX512) {
    group_weighted_avx512_any(scores, R, values, L, D, y);
  } else
#endif
  {
    std::fill(y, y + R * D, 0.f);
    const WeightedFn<KT> wf = weighted_acc_fn<KT>(isa);
    for (int64_t j0 = 0; j0 < L; j0 += kBlock)
      for (int64_t r = 0; r < R; ++r) wf(scores + r * L + j0, values + j0 * D, std::min(kBlock, L - j0), D, y + r * D);
  }
}

// The attention of a query's context cut in parts of kPartKeys slots (the last one shorter): a cut
// that depends on the context's length alone, never on the threads, so that a query's result is
// the same on any number of them (and alone or in a batch). A context of one part is one
// attend_part, its result y * (1 / sum); more parts give a step of one sequence work for more
// threads than it has KV heads (2B-4T: 5), and merge as flash-decoding does.
constexpr int64_t kPartKeys = 512;

// Part c of P parts (c < P) at stride `stride` floats: y (R, D), then m (R), then sum (R); the
// result (R, D) into out: M = max_c m_c, y = sum_c y_c e^(m_c - M) / sum_c sum_c e^(m_c - M).
static void merge_parts(const float* parts, int64_t P, int64_t stride, int64_t R, int64_t D, float* out) {
  for (int64_t r = 0; r < R; ++r) {
    float M = -INFINITY;
    for (int64_t c = 0; c < P; ++c) M = std::max(M, parts[c * stride + R * D + r]);
    float total = 0.f;
    float* o = out + r * D;
    std::fill(o, o + D, 0.f);
    for (int64_t c = 0; c < P; ++c) {
      const float* part = parts + c * stride;
      const float f = P == 1 ? 1.f : std::exp(part[R * D + r] - M);  // 0 for a part whose keys are all masked
      if (f == 0.f) continue;
      total += part[R * D + R + r] * f;
      const float* yc = part + r * D;
      if (P == 1) {
        std::copy(yc, yc + D, o);
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] += yc[d] * f;
      }
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

}  // namespace bitnet_cpu
