// Decode attention on the CPU, pure C++ (no torch): one query token per sequence against the
// float32 KV cache rows it has written, for every head; the piece of a decode step that torch's
// scaled_dot_product_attention would run as one call per layer (tens of microseconds of dispatch
// and setup for a few thousand multiply-adds at decode's context lengths).
//
// For query row n (cache row rows[n], position pos[n]) and head h (KV head g = h / (H / G)):
//     s_j = (q . k_j) * scale          for the keys j in [0, pos[n]] the mask allows (slot pos[n],
//                                      the query's own, always: a query is never all-masked)
//     y   = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)
// in float32, the dot products and weighted sums in SIMD lanes (AVX-512 or AVX2 where the CPU has
// them; on AVX-512 the exponentials too, a polynomial within about 2 ulps): the last bits can
// differ from torch's kernel, as any two attention kernels do; tests hold it to a float64 reference.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bitnet_kernels.h"

namespace bitnet_cpu {

// scores[j] = q . keys[j] (j < L, rows D apart) and y = sum_j p[j] values[j] (p[j] == 0 skipped): one
// call per (query, head), the loops over keys inside the SIMD code (no call per key).
using ScoresFn = void (*)(const float*, const float*, int64_t, int64_t, float*);
using WeightedFn = void (*)(const float*, const float*, int64_t, int64_t, float*);

static void scores_scalar(const float* q, const float* keys, int64_t L, int64_t D, float* s) {
  for (int64_t j = 0; j < L; ++j) {
    float a = 0.f;
    for (int64_t d = 0; d < D; ++d) a += q[d] * keys[j * D + d];
    s[j] = a;
  }
}
static void weighted_scalar(const float* p, const float* values, int64_t L, int64_t D, float* y) {
  std::fill(y, y + D, 0.f);
  for (int64_t j = 0; j < L; ++j)
    if (p[j] != 0.f)
      for (int64_t d = 0; d < D; ++d) y[d] += p[j] * values[j * D + d];
}

#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// hsum256_ps: bitnet_kernels.h
static void scores_avx2(const float* q, const float* keys, int64_t L, int64_t D, float* s) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t j = 0; j < L; ++j) {
    const float* k = keys + j * D;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a);
    float t = hsum256_ps(a);
    for (int64_t d = D8; d < D; ++d) t += q[d] * k[d];
    s[j] = t;
  }
}
static void weighted_avx2(const float* p, const float* values, int64_t L, int64_t D, float* y) {
  const int64_t D8 = D / 8 * 8;
  std::fill(y, y + D, 0.f);
  for (int64_t j = 0; j < L; ++j) {
    if (p[j] == 0.f) continue;
    const float* v = values + j * D;
    const __m256 vp = _mm256_set1_ps(p[j]);
    for (int64_t d = 0; d < D8; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + d), _mm256_loadu_ps(y + d)));
    for (int64_t d = D8; d < D; ++d) y[d] += p[j] * v[d];
  }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
static inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
// four keys at a time: their dot products run side by side, then one reduction tree for the four
static void scores_avx512(const float* q, const float* keys, int64_t L, int64_t D, float* s) {
  int64_t j = 0;
  for (; j + 4 <= L; j += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail16(D - d);
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
      a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, keys + j * D + d), a0);
      a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, keys + (j + 1) * D + d), a1);
      a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, keys + (j + 2) * D + d), a2);
      a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, keys + (j + 3) * D + d), a3);
    }
    s[j] = _mm512_reduce_add_ps(a0);
    s[j + 1] = _mm512_reduce_add_ps(a1);
    s[j + 2] = _mm512_reduce_add_ps(a2);
    s[j + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; j < L; ++j) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail16(D - d);
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, keys + j * D + d), a);
    }
    s[j] = _mm512_reduce_add_ps(a);
  }
}
static void weighted_avx512(const float* p, const float* values, int64_t L, int64_t D, float* y) {
  if (D <= 128) {  // the whole output row in registers
    __m512 acc[8];
    const int64_t nv = (D + 15) / 16;
    for (int64_t i = 0; i < nv; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      if (p[j] == 0.f) continue;
      const __m512 vp = _mm512_set1_ps(p[j]);
      for (int64_t i = 0; i < nv; ++i)
        acc[i] = _mm512_fmadd_ps(vp, _mm512_maskz_loadu_ps(tail16(D - 16 * i), values + j * D + 16 * i), acc[i]);
    }
    for (int64_t i = 0; i < nv; ++i) _mm512_mask_storeu_ps(y + 16 * i, tail16(D - 16 * i), acc[i]);
    return;
  }
  std::fill(y, y + D, 0.f);
  for (int64_t j = 0; j < L; ++j) {
    if (p[j] == 0.f) continue;
    const __m512 vp = _mm512_set1_ps(p[j]);
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail16(D - d);
      _mm512_mask_storeu_ps(y + d, m, _mm512_fmadd_ps(vp, _mm512_maskz_loadu_ps(m, values + j * D + d), _mm512_maskz_loadu_ps(m, y + d)));
    }
  }
}
// p[j] = exp(s[j] - m) in place (0 where s[j] is -inf: a masked key), returning their sum: exp by
// range reduction (n = round(x log2 e), r = x - n ln 2 in two parts) and Cephes' degree-6
// polynomial for e^r (max relative error about 2 float32 ulps), scaled by 2^n.
static float softmax_exp_avx512(float* s, int64_t L, float m) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2_hi = _mm512_set1_ps(0.693359375f),
               ln2_lo = _mm512_set1_ps(-2.12194440e-4f), lo = _mm512_set1_ps(-87.3f), mv = _mm512_set1_ps(m);
  const __m512 c0 = _mm512_set1_ps(1.9875691500e-4f), c1 = _mm512_set1_ps(1.3981999507e-3f), c2 = _mm512_set1_ps(8.3334519073e-3f),
               c3 = _mm512_set1_ps(4.1665795894e-2f), c4 = _mm512_set1_ps(1.6666665459e-1f), c5 = _mm512_set1_ps(5.0000001201e-1f),
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

static ScoresFn scores_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return scores_avx512;
  if (isa >= AVX2) return scores_avx2;
#endif
  (void)isa;
  return scores_scalar;
}
static WeightedFn weighted_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return weighted_avx512;
  if (isa >= AVX2) return weighted_avx2;
#endif
  (void)isa;
  return weighted_scalar;
}

// One (query row, head): q (D,), keys / values (L, D) rows D apart (L = pos + 1: slots 0..pos),
// allowed[j] (nullptr: every key) for j < pos, y (D,) written. scores: L floats of scratch.
static void attend_one(int64_t isa, const float* q, const float* keys, const float* values, int64_t L, int64_t D,
                       const bool* allowed, float scale, float* scores, float* y) {
  scores_fn(isa)(q, keys, L, D, scores);
  float m = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    if (allowed && j + 1 < L && !allowed[j]) {
      scores[j] = -INFINITY;
      continue;
    }
    scores[j] *= scale;
    m = std::max(m, scores[j]);
  }
  float sum = 0.f;
#ifdef BITNET_X86
  if (isa >= AVX512) {
    sum = softmax_exp_avx512(scores, L, m);
  } else
#endif
  {
    for (int64_t j = 0; j < L; ++j) {  // scores -> weights p (0 for a masked key)
      const float p = scores[j] == -INFINITY ? 0.f : std::exp(scores[j] - m);
      scores[j] = p;
      sum += p;
    }
  }
  weighted_fn(isa)(scores, values, L, D, y);
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) y[d] *= inv;
}

}  // namespace bitnet_cpu
