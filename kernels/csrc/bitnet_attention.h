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
// them): the last bits can differ from torch's kernel (another summation order), as any two
// attention kernels do; tests hold it to a float64 reference.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bitnet_kernels.h"

namespace bitnet_cpu {

using DotF32Fn = float (*)(const float*, const float*, int64_t);
using AxpyF32Fn = void (*)(float*, float, const float*, int64_t);

static float dot_f32_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
static void axpy_f32_scalar(float* y, float p, const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += p * v[i];
}

#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
static float dot_f32_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  const __m256 t = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
static void axpy_f32_avx2(float* y, float p, const float* v, int64_t n) {
  const __m256 vp = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * v[i];
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
static float dot_f32_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
static void axpy_f32_avx512(float* y, float p, const float* v, int64_t n) {
  const __m512 vp = _mm512_set1_ps(p);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(vp, _mm512_maskz_loadu_ps(m, v + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}
#pragma GCC pop_options
#endif

static DotF32Fn dot_f32_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return dot_f32_avx512;
  if (isa >= AVX2) return dot_f32_avx2;
#endif
  (void)isa;
  return dot_f32_scalar;
}
static AxpyF32Fn axpy_f32_fn(int64_t isa) {
#ifdef BITNET_X86
  if (isa >= AVX512) return axpy_f32_avx512;
  if (isa >= AVX2) return axpy_f32_avx2;
#endif
  (void)isa;
  return axpy_f32_scalar;
}

// One (query row, head): q (D,), keys / values (L, D) rows D apart (L = pos + 1: slots 0..pos),
// allowed[j] (nullptr: every key) for j < pos, y (D,) written. scores: L floats of scratch.
static void attend_one(int64_t isa, const float* q, const float* keys, const float* values, int64_t L, int64_t D,
                       const bool* allowed, float scale, float* scores, float* y) {
  const DotF32Fn dot = dot_f32_fn(isa);
  const AxpyF32Fn axpy = axpy_f32_fn(isa);
  float m = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    if (allowed && j + 1 < L && !allowed[j]) {
      scores[j] = -INFINITY;
      continue;
    }
    scores[j] = dot(q, keys + j * D, D) * scale;
    m = std::max(m, scores[j]);
  }
  std::fill(y, y + D, 0.f);
  float sum = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    if (scores[j] == -INFINITY) continue;
    const float p = std::exp(scores[j] - m);
    sum += p;
    axpy(y, p, values + j * D, D);
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) y[d] *= inv;
}

}  // namespace bitnet_cpu
