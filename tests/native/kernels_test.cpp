// Holds every SIMD path of kernels/csrc/bitnet_kernels.h equal to the portable one, without torch:
// activation quantization bit for bit, packed dot products and the decode to int8 exactly, over
// ragged shapes, every format and several M. Built and run by tests/test_cpu_kernels.py, natively
// and, where a cross compiler and qemu are present, for AArch64 (the NEON path).
//     g++ -O2 -std=c++17 -I kernels/csrc tests/native/kernels_test.cpp -o t && ./t
// Prints "ok <isa level> <cases>" for every level the CPU has; exits 1 on the first mismatch.

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "bitnet_kernels.h"

using namespace bitnet_cpu;

static int fail(const char* what, int level, int fmt, long n, long k, long m) {
  std::printf("MISMATCH %s level %d fmt %d N %ld K %ld M %ld\n", what, level, fmt, n, k, m);
  return 1;
}

int main() {
  std::mt19937 rng(1234);
  const long shapes[][2] = {{37, 45}, {64, 64}, {129, 200}, {5, 1}, {40, 1027}, {12, 4160}, {8, 17}};
  const long ms[] = {1, 2, 3, 5, 16, 33};
  int cases = 0;
  for (int level = 1; level <= kDetected; ++level) {
    for (int fmt = 0; fmt < 3; ++fmt) {
      const int P = values_per_byte(fmt);
      for (const auto& sh : shapes) {
        const long N = sh[0], K = sh[1], R = (N + P - 1) / P, xs = std::max<long>(64, (K + 63) / 64 * 64);
        std::vector<uint8_t> W(static_cast<size_t>(R * K));
        const int top = fmt == F16 ? 243 : 256;
        for (auto& b : W) b = static_cast<uint8_t>(rng() % top);
        for (long M : ms) {
          std::vector<float> x(static_cast<size_t>(M * K));
          std::normal_distribution<float> nd(0.f, 3.f);
          for (auto& v : x) v = nd(rng);
          for (long k = 0; k < K; k += 7) x[k] = 0.5f * static_cast<float>(k % 5);  // ties after scaling
          std::vector<int8_t> q0(static_cast<size_t>(M * xs), 0), q1(static_cast<size_t>(M * xs), 0);
          for (long m = 0; m < M; ++m) {
            float a0, a1;
            int32_t s0, s1;
            quant_fn(SCALAR)(x.data() + m * K, K, q0.data() + m * xs, &a0, &s0);
            quant_fn(level)(x.data() + m * K, K, q1.data() + m * xs, &a1, &s1);
            if (a0 != a1 || s0 != s1 || std::memcmp(q0.data() + m * xs, q1.data() + m * xs, K) != 0)
              return fail("quantize", level, fmt, N, K, M);
          }
          std::vector<int32_t> c0(static_cast<size_t>(M * N), -7), c1(static_cast<size_t>(M * N), -7);
          codes_dot(SCALAR, fmt, W.data(), R, K, N, 0, R, q0.data(), xs, M, c0.data(), N);
          codes_dot(level, fmt, W.data(), R, K, N, 0, R, q0.data(), xs, M, c1.data(), N);
          if (c0 != c1) return fail("codes_dot", level, fmt, N, K, M);
          ++cases;
        }
        std::vector<int8_t> u0(static_cast<size_t>(N * K)), u1(static_cast<size_t>(N * K));
        unpack_rows(SCALAR, fmt, W.data(), R, K, N, 0, R, u0.data());
        unpack_rows(level, fmt, W.data(), R, K, N, 0, R, u1.data());
        if (u0 != u1) return fail("unpack", level, fmt, N, K, 0);
      }
    }
    // float rows (an int8 or a bf16 lm_head): float32 sums in another order, equal within rounding
    // (|difference| <= 1e-5 sum_k |w_k x_k|, float32 rounding of K terms in any order)
    for (long K : {1L, 45L, 1027L, 1536L}) {
      const long N = 33;
      std::vector<int8_t> W8(static_cast<size_t>(N * K));
      std::vector<uint16_t> W16(static_cast<size_t>(N * K));
      std::vector<float> x(static_cast<size_t>(K)), y0(N), y1(N), bound(N, 0.f);
      std::normal_distribution<float> nd(0.f, 1.f);
      for (auto& b : W8) b = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
      for (auto& b : W16) {
        const float f = nd(rng);
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        b = static_cast<uint16_t>(u >> 16);  // truncated to bf16: any bf16 value will do
      }
      for (auto& v : x) v = nd(rng);
      for (int t = 0; t < 2; ++t) {
        for (long n = 0; n < N; ++n) {
          bound[n] = 0.f;
          for (long k = 0; k < K; ++k)
            bound[n] += std::fabs((t ? bf16_bits_to_float(W16[n * K + k]) : static_cast<float>(W8[n * K + k])) * x[k]);
        }
        if (t) {
          float_rows_fn<uint16_t>(SCALAR)(W16.data(), K, x.data(), 0, N, y0.data());
          float_rows_fn<uint16_t>(level)(W16.data(), K, x.data(), 0, N, y1.data());
        } else {
          float_rows_fn<int8_t>(SCALAR)(W8.data(), K, x.data(), 0, N, y0.data());
          float_rows_fn<int8_t>(level)(W8.data(), K, x.data(), 0, N, y1.data());
        }
        for (long n = 0; n < N; ++n)
          if (std::fabs(y0[n] - y1[n]) > 1e-5f * bound[n] + 1e-30f) return fail(t ? "bf16_rows" : "int8_rows", level, 0, N, K, 1);
        ++cases;
        // several rows at once: every row equal, bit for bit, to the one-row kernel on that row
        for (long M : {2L, 3L, 4L, 7L}) {
          std::vector<float> xm(static_cast<size_t>(M * K)), ym(static_cast<size_t>(M * N)), y1m(static_cast<size_t>(N));
          for (auto& v : xm) v = nd(rng);
          if (t) float_rows_multi<uint16_t>(level, W16.data(), K, xm.data(), K, M, 0, N, ym.data(), N);
          else float_rows_multi<int8_t>(level, W8.data(), K, xm.data(), K, M, 0, N, ym.data(), N);
          for (long m = 0; m < M; ++m) {
            if (t) float_rows_fn<uint16_t>(level)(W16.data(), K, xm.data() + m * K, 0, N, y1m.data());
            else float_rows_fn<int8_t>(level)(W8.data(), K, xm.data() + m * K, 0, N, y1m.data());
            if (std::memcmp(ym.data() + m * N, y1m.data(), N * sizeof(float)) != 0)
              return fail(t ? "bf16_rows_multi" : "int8_rows_multi", level, 0, N, K, M);
          }
          ++cases;
        }
      }
    }
    std::printf("ok %d %d\n", level, cases);
  }
  if (kDetected == 0) std::printf("ok 0 0\n");
  return 0;
}
