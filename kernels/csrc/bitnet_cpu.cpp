// torch bindings of the native CPU kernels (bitnet_kernels.h): the bitnet_cpu ops, argument
// checks, activation quantization into padded rows, threads (at::parallel_for), the epilogue, and
// the int8 GEMM path (torch._int_mm) for large M. The packed layout and the arithmetic are
// described in bitnet_kernels.h.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstring>

#include "bitnet_attention.h"
#include "bitnet_kernels.h"

namespace bitnet_cpu {

static std::atomic<int64_t> g_cap{AMX};  // no cap: the detected level
static std::atomic<int64_t> g_large_m{0};  // 0: automatic (gemm_rows)

static int64_t active_isa() { return std::min<int64_t>(kDetected, g_cap.load()); }

static int parse_fmt(c10::string_view s) {
  if (s == "2bit") return F2;
  if (s == "1.6bit") return F16;
  if (s == "1bit") return F1;
  TORCH_CHECK(false, "bitnet_cpu: unknown packed format '", std::string(s), "'; expected 2bit, 1.6bit or 1bit");
}

static void check_packed(const at::Tensor& packed, int64_t n, int fmt, int64_t K) {
  TORCH_CHECK(packed.device().is_cpu(), "bitnet_cpu: packed weight must be a CPU tensor, got ", packed.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2,
              "bitnet_cpu: packed weight must be a 2-D uint8 tensor, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.size(1) == K, "bitnet_cpu: packed weight has ", packed.size(1), " columns but the input has K = ", K);
  const int P = values_per_byte(fmt);
  TORCH_CHECK(n > 0 && (packed.size(0) - 1) * P < n && n <= packed.size(0) * P, "bitnet_cpu: packed rows ",
              packed.size(0), " cannot hold ", n, " weight rows of this format (needs ", (n + P - 1) / P, ")");
}

// Prefill (M >= large_m): decode the packed weights to int8 (n, K) once, then the vendor's int8
// GEMM (torch._int_mm: oneDNN, VNNI or AMX-INT8), exact in int32. K >= 16: for K = 1 the (K, n)
// view has ambiguous strides for _int_mm.
// The rows from which the decoded int8 GEMM runs: set_large_m's value, or automatically by level
// (2 threads on the Xeon, oneDNN capped to the same level, 4096x1536 and 1536x4096):
//   AMX 257: the tile path decodes each pass of weights once for all rows and beats decode +
//     _int_mm up to 256 rows (2.1 vs 2.5 ms and 1.4 vs 2.5 at 256; at 512 the GEMM leads, 4.2 vs 3.6);
//   AVX-512 VNNI 48: the GEMM leads from about 48 rows (128 rows: 1.8 vs 3.7 ms);
//   AVX2 513: oneDNN's AVX2 int8 GEMM trails the maddubs tiles even at 256 rows (8.5 vs 8.0 and 7.0 ms).
static int64_t gemm_rows(int64_t isa) {
  const int64_t m = g_large_m.load();
  return m > 0 ? m : isa >= AMX ? 257 : isa >= AVX512 ? 48 : isa >= AVX2 ? 513 : 48;
}
static bool use_gemm(int64_t M, int64_t K, int64_t isa) { return M >= gemm_rows(isa) && K >= 16; }

static at::Tensor decoded_int_mm(const at::Tensor& xq, const at::Tensor& packed, int64_t n, int fmt, int64_t isa) {
  const int64_t R = packed.size(0), K = packed.size(1);
  at::Tensor w = at::empty({n, K}, packed.options().dtype(at::kChar));
  int8_t* wp = w.data_ptr<int8_t>();
  const uint8_t* W = packed.data_ptr<uint8_t>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) { unpack_rows(isa, fmt, W, R, K, n, r0, r1, wp); });
  return at::_int_mm(xq, w.t());
}

// Exact int32 x_q (M, K) @ W_q^T (K, N) from the packed weights.
static at::Tensor matmul_int32_impl(const at::Tensor& xq, const at::Tensor& packed_in, int64_t n, int fmt, int64_t isa) {
  TORCH_CHECK(xq.scalar_type() == at::kChar && xq.dim() == 2, "bitnet_cpu: x_q must be a 2-D int8 tensor, got ",
              xq.scalar_type(), " ", xq.sizes());
  const int64_t M = xq.size(0), K = xq.size(1);
  check_packed(packed_in, n, fmt, K);
  const at::Tensor x = xq.contiguous(), packed = packed_in.contiguous();
  const int64_t R = packed.size(0);
  const uint8_t* W = packed.data_ptr<uint8_t>();
  if (use_gemm(M, K, isa)) return decoded_int_mm(x, packed, n, fmt, isa);
  at::Tensor acc = at::empty({M, n}, packed.options().dtype(at::kInt));
  int32_t* ap = acc.data_ptr<int32_t>();
  if (K == 0) return acc.zero_();
  // activations zero-padded to a multiple of 64 bytes a row: full-width loads everywhere
  const int64_t xs = (K + 63) / 64 * 64;
  at::Tensor xpad = at::zeros({M, xs}, x.options());
  xpad.narrow(1, 0, K).copy_(x);
  const int8_t* xp = xpad.data_ptr<int8_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) { codes_dot(isa, fmt, W, R, K, n, r0, r1, xp, xs, M, ap, n); });
  // x.w = x.c - sum(x) (ternary: w = c - 1), 2 x.c - sum(x) (binary: w = 2c - 1)
  const at::Tensor xsum = x.sum(1, /*keepdim=*/false, at::kInt);
  const int32_t* sp = xsum.data_ptr<int32_t>();
  const int32_t mult = fmt == F1 ? 2 : 1;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) ap[m * n + j] = mult * ap[m * n + j] - sp[m];
  return acc;
}

static at::Tensor matmul_int32(const at::Tensor& xq, const at::Tensor& packed, int64_t n, c10::string_view fmt) {
  return matmul_int32_impl(xq, packed, n, parse_fmt(fmt), active_isa());
}

// y = (x_q @ W_q^T) * scale / a (+ bias), in x's dtype, x (..., K) float32 / bfloat16 / float16 /
// float64 (quantized from its float32 value, as the reference does: x.float()).
// A row as float32: in place for float32, converted into buf otherwise (exact for bf16 / fp16).
template <typename T>
static const float* float_row(const T* x, int64_t K, float* buf) {
  for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<float>(x[k]);
  return buf;
}
static const float* float_row(const float* x, int64_t, float*) { return x; }

// y[m, j] = float(acc) * (s / a[m]) in scalar_t (+ bias in scalar_t), the reference's operations
template <typename scalar_t>
static inline scalar_t finish(int32_t acc, float f, const scalar_t* bp, int64_t j) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t v = static_cast<scalar_t>(static_cast<float>(acc) * f);
  if (bp) v = static_cast<scalar_t>(static_cast<opmath_t>(v) + static_cast<opmath_t>(bp[j]));  // as torch adds
  return v;
}

// finish() over outputs [0, n) of one row: acc the raw code sums, y[j] from mult * acc[j] - sum; in
// SIMD lanes for float32 and bfloat16 (bitnet_kernels.h: the same bits), else one by one.
template <typename scalar_t>
static void finish_range(int64_t isa, const int32_t* acc, int64_t n, int32_t mult, int32_t sum, float f, const scalar_t* bp,
                         scalar_t* y) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    finish_f32_fn(isa)(acc, n, mult, sum, f, bp, y);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    finish_bf16_fn(isa)(acc, n, mult, sum, f, reinterpret_cast<const uint16_t*>(bp), reinterpret_cast<uint16_t*>(y));
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = finish<scalar_t>(mult * acc[j] - sum, f, bp, j);
  }
}

// Activations of one call: per-row int8 from the float32 value of each row (x.float() in the
// reference: exact for bf16 / fp16), in rows zero-padded to a multiple of 64 bytes (full-width
// loads everywhere), with each row's scale a and sum of x_q.
struct QuantizedRows {
  int64_t M = 0, K = 0, xs = 64;
  std::vector<int8_t> q;
  std::vector<float> a;
  std::vector<int32_t> sum;
};

// Into r, reusing its vectors' capacity (a decode layer quantizes four times a call): the M rows of
// K values at xp, of dtype.
static void quantize_rows_into(const void* xp_in, at::ScalarType dtype, int64_t M, int64_t K, int64_t isa, QuantizedRows& r) {
  r.M = M;
  r.K = K;
  r.xs = std::max<int64_t>(64, (K + 63) / 64 * 64);
  r.q.assign(static_cast<size_t>(M * r.xs), 0);
  r.a.resize(static_cast<size_t>(M));
  r.sum.resize(static_cast<size_t>(M));
  const QuantFn qf = quant_fn(isa);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bitnet_cpu_quantize", [&] {
    const scalar_t* xp = static_cast<const scalar_t*>(xp_in);
    // a few rows a chunk: 16 decode rows of 4096 features are two chunks (one was 39 us on one thread)
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
      thread_local std::vector<float> row;  // a float32 copy of a row (kept: no allocation a call)
      if constexpr (!std::is_same_v<scalar_t, float>) row.resize(static_cast<size_t>(K));
      for (int64_t m = m0; m < m1; ++m) {
        const float* xf;
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          widen_bf16_fn(isa)(reinterpret_cast<const uint16_t*>(xp + m * K), K, row.data());
          xf = row.data();
        } else {
          xf = float_row(xp + m * K, K, row.data());
        }
        qf(xf, K, r.q.data() + m * r.xs, &r.a[m], &r.sum[m]);
      }
    });
  });
}

static QuantizedRows quantize_rows(const at::Tensor& x2, int64_t isa) {
  QuantizedRows r;
  quantize_rows_into(x2.data_ptr(), x2.scalar_type(), x2.size(0), x2.size(1), isa, r);
  return r;
}

// One packed matrix of a call: its weights, scale, outputs (n), bias, and where its result goes.
struct Projection {
  at::Tensor packed;  // contiguous (R, K) uint8
  int64_t n;
  float s;
  at::Tensor bias;  // in the output dtype, or undefined
  void* y;          // (M, n) contiguous in the output dtype
};

// A projection of inputs of K features and the given dtype; its output y set by the caller.
static Projection projection(int64_t K, at::ScalarType dtype, const at::Tensor& packed_in, const at::Tensor& scale, int64_t n,
                             int fmt, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(scale.numel() == 1, "bitnet_cpu: weight_scale must hold one value, got shape ", scale.sizes());
  check_packed(packed_in, n, fmt, K);
  // read without dispatching where they are as BitLinear holds them (a decode step makes ~200 of
  // these: contiguous uint8 weights, a float32 CPU scale)
  const float s = scale.device().is_cpu() && scale.scalar_type() == at::kFloat ? *scale.data_ptr<float>()
                                                                                : scale.to(at::kFloat).reshape({}).item<float>();
  Projection p{packed_in.is_contiguous() ? packed_in : packed_in.contiguous(), n, s, {}, nullptr};
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "bitnet_cpu: bias has ", bias->numel(), " values for ", n, " outputs");
    p.bias = bias->scalar_type() == dtype && bias->is_contiguous() ? *bias : bias->to(dtype).contiguous();
  }
  return p;
}

// Each projection's output as a tensor of x's leading shape, y pointed at it.
static std::vector<at::Tensor> output_tensors(std::vector<Projection>& ps, const at::Tensor& x_in) {
  std::vector<at::Tensor> out;
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  for (auto& p : ps) {
    shape.back() = p.n;
    out.push_back(at::empty(shape, x_in.options().memory_format(at::MemoryFormat::Contiguous)));
    p.y = out.back().data_ptr();
  }
  return out;
}

// y = (x_q @ W_q^T) * s / a (+ bias) for each projection, outputs of dtype; M >= large_m: decoded
// int8 GEMM per projection; else one parallel pass over the packed rows of all of them (one
// fork-join, shared activations), each thread finishing its own outputs.
static void run_projections(at::ArrayRef<Projection> ps, const QuantizedRows& xq, int fmt, int64_t isa, at::ScalarType dtype) {
  const int64_t M = xq.M, K = xq.K, xs = xq.xs;
  const int32_t mult = fmt == F1 ? 2 : 1;  // x.w = x.c - sum(x) (ternary), 2 x.c - sum(x) (binary)
  if (M == 0) return;
  if (use_gemm(M, K, isa)) {
    const at::Tensor xt = at::from_blob(const_cast<int8_t*>(xq.q.data()), {M, K}, {xs, 1},
                                        at::TensorOptions().dtype(at::kChar)).contiguous();
    for (const Projection& p : ps) {
      if (p.n == 0) continue;
      const at::Tensor acc = decoded_int_mm(xt, p.packed, p.n, fmt, isa);
      const int32_t* ap = acc.data_ptr<int32_t>();
      const int64_t n = p.n;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bitnet_cpu_linear", [&] {
        scalar_t* yp = static_cast<scalar_t*>(p.y);
        const scalar_t* bp = p.bias.defined() ? p.bias.data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, M, std::max<int64_t>(1, 65536 / n), [&](int64_t m0, int64_t m1) {
          for (int64_t m = m0; m < m1; ++m)  // as the reference: acc.float() * (scale / a)
            finish_range<scalar_t>(isa, ap + m * n, n, 1, 0, p.s / xq.a[m], bp, yp + m * n);
        });
      });
    }
    return;
  }
  // packed rows of all projections end to end; their int32 sums in one buffer, the thread's kept
  // one up to 4 MB (every decode call's; a larger prefill's is its own, freed after it)
  c10::SmallVector<int64_t, 8> start(ps.size() + 1, 0), at_(ps.size() + 1, 0);
  for (size_t i = 0; i < ps.size(); ++i) {
    start[i + 1] = start[i] + (ps[i].n ? ps[i].packed.size(0) : 0);
    at_[i + 1] = at_[i] + M * ps[i].n;
  }
  constexpr int64_t kKeptSums = 1 << 20;
  thread_local std::vector<int32_t> kept;
  std::vector<int32_t> own;
  std::vector<int32_t>& sums = at_.back() <= kKeptSums ? kept : own;
  if (sums.size() < static_cast<size_t>(at_.back())) sums.resize(static_cast<size_t>(at_.back()));
  int32_t* sp = sums.data();
  const int P = values_per_byte(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bitnet_cpu_linear", [&] {
    at::parallel_for(0, start.back(), std::max<int64_t>(1, 16384 / K), [&](int64_t g0, int64_t g1) {
      for (size_t i = 0; i < ps.size(); ++i) {
        const int64_t r0 = std::max(g0, start[i]) - start[i], r1 = std::min(g1, start[i + 1]) - start[i];
        if (r0 >= r1) continue;
        const Projection& p = ps[i];
        const int64_t R = p.packed.size(0), n = p.n;
        int32_t* acc = sp + at_[i];
        codes_dot(isa, fmt, p.packed.data_ptr<uint8_t>(), R, K, n, r0, r1, xq.q.data(), xs, M, acc, n);
        scalar_t* yp = static_cast<scalar_t*>(p.y);
        const scalar_t* bp = p.bias.defined() ? p.bias.data_ptr<scalar_t>() : nullptr;
        for (int64_t m = 0; m < M; ++m) {
          const float f = p.s / xq.a[m];
          const int32_t* am = acc + m * n;
          scalar_t* ym = yp + m * n;
          for (int q = 0; q < P; ++q) {
            const int64_t j0 = r0 + q * R, j1 = std::min(r1 + q * R, n);
            if (j0 < j1) finish_range<scalar_t>(isa, am + j0, j1 - j0, mult, xq.sum[m], f, bp ? bp + j0 : nullptr, ym + j0);
          }
        }
      }
    });
  });
}

static at::Tensor check_input(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "bitnet_cpu: input must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(x_in.dim() >= 1, "bitnet_cpu: input must have a feature dimension");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "bitnet_cpu: input dtype must be float32, bfloat16, float16 or float64, got ", dtype);
  return x_in.reshape({-1, x_in.size(-1)}).contiguous();
}

static at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale, int64_t n,
                         c10::string_view fmt_s, const std::optional<at::Tensor>& bias) {
  const int fmt = parse_fmt(fmt_s);
  const int64_t isa = active_isa();
  const at::Tensor x2 = check_input(x_in);
  std::vector<Projection> ps;
  ps.push_back(projection(x2.size(1), x2.scalar_type(), packed, scale, n, fmt, bias));
  at::Tensor y = output_tensors(ps, x_in)[0];
  if (x2.size(0) == 0 || n == 0) return y;
  run_projections(ps, quantize_rows(x2, isa), fmt, isa, x2.scalar_type());
  return y;
}

// Several packed matrices of one input (q / k / v, gate / up): the activations quantized once and
// one parallel pass over all their rows; each output equal to linear() of its own matrix.
static std::vector<at::Tensor> linear_many(const at::Tensor& x_in, at::TensorList packed, at::TensorList scales,
                                           at::IntArrayRef ns, c10::string_view fmt_s, const c10::List<std::optional<at::Tensor>>& biases) {
  const int fmt = parse_fmt(fmt_s);
  const int64_t isa = active_isa();
  const size_t J = packed.size();
  TORCH_CHECK(J > 0 && scales.size() == J && ns.size() == J && biases.size() == J,
              "bitnet_cpu: linear_many takes as many scales, sizes and biases as packed matrices (", J, "), got ",
              scales.size(), ", ", ns.size(), ", ", biases.size());
  const at::Tensor x2 = check_input(x_in);
  std::vector<Projection> ps;
  for (size_t i = 0; i < J; ++i) ps.push_back(projection(x2.size(1), x2.scalar_type(), packed[i], scales[i], ns[i], fmt, biases.get(i)));
  std::vector<at::Tensor> out = output_tensors(ps, x_in);
  if (x2.size(0) > 0) run_projections(ps, quantize_rows(x2, isa), fmt, isa, x2.scalar_type());
  return out;
}

// Per-row int8 quantization, bit-identical to bitnet.quant.quantize_activation: (x_q, a, sum x_q).
static std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 1, "bitnet_cpu: quantize takes a CPU tensor with a feature dimension");
  const int64_t K = x_in.size(-1);
  const at::Tensor xf = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor xq = at::empty({M, K}, xf.options().dtype(at::kChar));
  at::Tensor a = at::empty({M, 1}, xf.options());
  at::Tensor s = at::empty({M}, xf.options().dtype(at::kInt));
  const QuantFn qf = quant_fn(active_isa());
  for (int64_t m = 0; m < M; ++m)
    qf(xf.data_ptr<float>() + m * K, K, xq.data_ptr<int8_t>() + m * K, a.data_ptr<float>() + m, s.data_ptr<int32_t>() + m);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  std::vector<int64_t> ashape = shape;
  ashape.back() = 1;
  shape.pop_back();
  return {xq.reshape(x_in.sizes()), a.reshape(ashape), s.reshape(shape)};
}

// Float-accumulated rows for few input rows (decode: the weights stream once), W (N, K) int8 or
// bf16: y32[m, n] = sum_k float(W[n, k]) * x[m, k] (* scale[n]), x as float32 (M, K). Rows go in
// blocks of 32 so that every input row meets a block while it is in cache.
template <typename T>
static at::Tensor float_rows(const at::Tensor& xf, const T* wp, int64_t N, int64_t K, const float* scale) {
  const int64_t M = xf.size(0);
  at::Tensor y32 = at::empty({M, N}, xf.options());
  const int64_t isa = active_isa();
  const float* xp = xf.data_ptr<float>();
  float* yp = y32.data_ptr<float>();
  constexpr int64_t kBlock = 32;
  at::parallel_for(0, (N + kBlock - 1) / kBlock, std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t n0 = b0 * kBlock; n0 < std::min(b1 * kBlock, N); n0 += kBlock) {
      const int64_t n1 = std::min(n0 + kBlock, N);
      // every row of x against this block (each weight converted once for several rows; each
      // row's sums exactly those of a one-row call)
      float_rows_multi<T>(isa, wp, K, xp, K, M, n0, n1, yp + n0, N);
      if (scale)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) yp[m * N + n] *= scale[n];
    }
  });
  return y32;
}

// (M, N) float32 sums -> x's leading shape and dtype; a bias is added in float32, one rounding.
static at::Tensor rows_output(at::Tensor y32, const at::Tensor& x_in, const std::optional<at::Tensor>& bias) {
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = y32.size(1);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == y32.size(1), "bitnet_cpu: bias has ", bias->numel(), " values for ", y32.size(1), " outputs");
    y32.add_(bias->to(at::kFloat).reshape({1, -1}));
  }
  return y32.to(x_in.scalar_type()).reshape(shape);
}

static at::Tensor rows_input(const at::Tensor& x_in, const at::Tensor& w, const char* what) {
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "bitnet_cpu: ", what, " takes CPU tensors");
  TORCH_CHECK(w.dim() == 2, "bitnet_cpu: ", what, " weight must be 2-D, got ", w.sizes());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == w.size(1), "bitnet_cpu: ", what, " input has ", x_in.size(-1),
              " features, the weight ", w.size(1));
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "bitnet_cpu: ", what, " input dtype must be float32, bfloat16, float16 or float64, got ", dtype);
  return x_in.reshape({-1, w.size(1)}).to(at::kFloat).contiguous();
}

// Weight-only int8 linear (an int8 lm_head): y = (x @ W^T) * scale[n] (+ bias), W int8 (N, K),
// scale float32 (N,), accumulated in float32; x (..., K) float32 / bf16 / fp16 / fp64, y in x's dtype.
// Meant for few rows (decode: the weights stream once); callers dequantize for large M.
static at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& scale_in,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_in.scalar_type() == at::kChar, "bitnet_cpu: int8 weight must be an int8 tensor, got ", w_in.scalar_type());
  const at::Tensor xf = rows_input(x_in, w_in, "int8_linear");
  const int64_t N = w_in.size(0), K = w_in.size(1);
  TORCH_CHECK(scale_in.numel() == N, "bitnet_cpu: int8 weight scale has ", scale_in.numel(), " values for ", N, " rows");
  const at::Tensor w = w_in.contiguous(), scale = scale_in.to(at::kFloat).contiguous();
  return rows_output(float_rows<int8_t>(xf, w.data_ptr<int8_t>(), N, K, scale.data_ptr<float>()), x_in, bias);
}

#ifdef BITNET_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
// A bfloat16 head for bfloat16 activations with VDPBF16PS, where there is no tile unit:
// out[r * ldo + n - n0] = sum_k W[n, k] x[r, k] for n in [n0, n1) and MB (<= 4) rows of x (xs
// apart, bf16, zero past K), float32 sums. As the AVX-512 float kernel (float_rows_multi_avx512)
// but on bf16 pairs: each weight row streams once for the MB rows, four accumulators a row over
// k in 128s (32 k an instruction), then the same reduction; a sum runs through the same operations
// whatever MB is, so a row's outputs do not depend on the other rows (a batch of decode rows gets
// each row's solo logits). The instruction treats denormal inputs as zero and rounds its float32
// sums to nearest even. Why: the float kernel widens every weight and multiplies one row of x at a
// time; 16 rows of 2B-4T's head (128256 x 2560) took it 44-49 ms on the 2-core EPYC (2 threads),
// torch's GEMM 33-35, this 25 (one row: ~10 ms either way, the weight's bytes).
template <int MB>
static void bf16_rows_dp(const uint16_t* W, int64_t K, const uint16_t* xb, int64_t xs, int64_t n0, int64_t n1, float* out,
                         int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    __m512 a[MB][4];
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch / 2), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch / 2 + 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch / 2 + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch / 2 + 96), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) {
        const __m512i wv = _mm512_loadu_si512(w + k + 32 * j);
        for (int r = 0; r < MB; ++r)
          a[r][j] = _mm512_dpbf16_ps(a[r][j], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(xb + r * xs + k + 32 * j));
      }
    }
    for (; k < K; k += 32) {  // (x is zero past K: the masked weights' lanes add nothing)
      const __mmask32 t = K - k >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << (K - k)) - 1);
      const __m512i wv = _mm512_maskz_loadu_epi16(t, w + k);
      for (int r = 0; r < MB; ++r)
        a[r][0] = _mm512_dpbf16_ps(a[r][0], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(xb + r * xs + k));
    }
    for (int r = 0; r < MB; ++r)
      out[r * ldo + n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3])));
  }
}
#pragma GCC pop_options

// bf16_rows_dp for any M, the rows in groups of 4 (the weight block stays in cache across them)
static void bf16_rows_dp_any(const uint16_t* W, int64_t K, const uint16_t* xb, int64_t xs, int64_t M, int64_t n0, int64_t n1,
                             float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) bf16_rows_dp<4>(W, K, xb + m * xs, xs, n0, n1, out + m * ldo, ldo);
  switch (M - m) {
    case 3: bf16_rows_dp<3>(W, K, xb + m * xs, xs, n0, n1, out + m * ldo, ldo); break;
    case 2: bf16_rows_dp<2>(W, K, xb + m * xs, xs, n0, n1, out + m * ldo, ldo); break;
    case 1: bf16_rows_dp<1>(W, K, xb + m * xs, xs, n0, n1, out + m * ldo, ldo); break;
    default: break;
  }
}
#endif

// y = x @ W^T (+ bias) for a bfloat16 W (N, K) (a bf16 lm_head), accumulated in float32, y in x's
// dtype. For few rows: the one pass over W runs near the memory bandwidth (torch's bf16 GEMV for
// M = 1 reaches about half of it on the CPUs measured, README).
// bfloat16 activations on a CPU with AMX-BF16 take the tile unit (bf16_rows_amx), on one with
// AVX512-BF16 VDPBF16PS (bf16_rows_dp), every row the same whatever the number of rows; float32
// ones, or other CPUs, the float32 kernel.
static at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_in.scalar_type() == at::kBFloat16, "bitnet_cpu: bf16_linear weight must be bfloat16, got ", w_in.scalar_type());
  const at::Tensor xf = rows_input(x_in, w_in, "bf16_linear");
  const at::Tensor w = w_in.contiguous();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
#ifdef BITNET_X86
  const bool tiles = kAmxBf16 && active_isa() >= AMX, dp = kAvx512Bf16 && active_isa() >= AVX512;
  if (x_in.scalar_type() == at::kBFloat16 && (tiles || dp)) {
    // x's bf16 rows, xs apart (K rounded up to 32, zero past K): what both kernels read
    const int64_t M = xf.size(0), N = w.size(0), K = w.size(1), xs = std::max<int64_t>(32, (K + 31) / 32 * 32);
    at::Tensor xb = at::zeros({M, xs}, x_in.options().dtype(at::kBFloat16));
    xb.narrow(1, 0, K).copy_(x_in.reshape({M, K}));
    at::Tensor y32 = at::empty({M, N}, xf.options());
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    float* yp = y32.data_ptr<float>();
    if (tiles) {
      at::parallel_for(0, (N + 63) / 64, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
        for (int64_t m0 = 0; m0 < M; m0 += 16)
          bf16_rows_amx(wp, K, xp + m0 * xs, xs, std::min<int64_t>(16, M - m0), b0 * 64, std::min(b1 * 64, N),
                        yp + m0 * N + b0 * 64, N);
      });
    } else {
      constexpr int64_t kBlock = 32;  // weight rows that stay in cache while every row of x meets them
      at::parallel_for(0, (N + kBlock - 1) / kBlock, std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1)),
                       [&](int64_t b0, int64_t b1) {
        for (int64_t n0 = b0 * kBlock; n0 < std::min(b1 * kBlock, N); n0 += kBlock)
          bf16_rows_dp_any(wp, K, xp, xs, M, n0, std::min(n0 + kBlock, N), yp + n0, N);
      });
    }
    return rows_output(y32, x_in, bias);
  }
#endif
  return rows_output(float_rows<uint16_t>(xf, wp, w.size(0), w.size(1), nullptr), x_in, bias);
}

// An int4 head (Int4Linear; bitnet_kernels.h, q4_rows): y = (sum_g d_g sum_k (c - 8) x_q) / a (+ bias)
// for x (..., K) float32 / bf16 / fp16 / fp64 quantized per row to int8, codes uint8 (N, Kp / 2),
// scales float32 (N, Kp / 32), Kp = K rounded up to 64; y in x's dtype.
static at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in, int64_t N,
                              const std::optional<at::Tensor>& bias) {
  const at::Tensor x2 = check_input(x_in);
  const int64_t M = x2.size(0), K = x2.size(1), Kp = std::max<int64_t>(64, (K + 63) / 64 * 64);
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && codes_in.dim() == 2 && codes_in.size(0) == N && codes_in.size(1) == Kp / 2,
              "bitnet_cpu: int4 codes must be uint8 (", N, ", ", Kp / 2, ") for K = ", K, ", got ", codes_in.scalar_type(), " ",
              codes_in.sizes());
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N && scales_in.size(1) == Kp / 32,
              "bitnet_cpu: int4 scales must be float32 (", N, ", ", Kp / 32, "), got ", scales_in.scalar_type(), " ", scales_in.sizes());
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  const int64_t isa = active_isa();
  const QuantizedRows xq = quantize_rows(x2, isa);  // rows of xs = Kp bytes, zero past K
  std::vector<int32_t> x8s(static_cast<size_t>(M * Kp / 4));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < Kp / 4; ++j) {
      const int8_t* q = xq.q.data() + m * xq.xs + 4 * j;
      x8s[m * (Kp / 4) + j] = 8 * (q[0] + q[1] + q[2] + q[3]);
    }
  at::Tensor y32 = at::empty({M, N}, x2.options().dtype(at::kFloat));
  float* yp = y32.data_ptr<float>();
  const Q4RowsFn f = q4_rows_fn(isa);
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / Kp), [&](int64_t n0, int64_t n1) {
    f(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), Kp, xq.q.data(), x8s.data(), xq.xs, M, n0, n1, yp + n0, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) yp[m * N + n] /= xq.a[m];
  });
  return rows_output(y32, x_in, bias);
}

// RMSNorm, the function of bitnet.quant.rms_norm: per row r = 1 / sqrt(mean(x32^2) + eps) in float32,
// y = weight * (x32 * r).to(x.dtype) in x's dtype. The one reduction, the mean of squares, is summed
// in float64 (torch sums float32 in an order of its own), so y can differ from torch's in the last
// bit where the float32 mean rounds differently; every other operation is torch's, in its order.
// The M rows of C values at xp (dtype) normalized into yp, weight wp of the same dtype.
static void rms_rows(const void* xp_in, const void* wp_in, int64_t M, int64_t C, float e, at::ScalarType dtype, void* yp_in) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bitnet_cpu_rms_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = static_cast<const scalar_t*>(xp_in);
    const scalar_t* wp = static_cast<const scalar_t*>(wp_in);
    scalar_t* yp = static_cast<scalar_t*>(yp_in);
    constexpr bool simd_type = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>;
    const int64_t level = simd_type ? active_isa() : SCALAR;
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
#ifdef BITNET_X86
        if constexpr (simd_type) {
          constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
          if (level >= AVX512) {
            rms_row_avx512<bf16>(xp + m * C, wp, C, e, yp + m * C);
            continue;
          }
          if (level >= AVX2) {
            rms_row_avx2<bf16>(xp + m * C, wp, C, e, yp + m * C);
            continue;
          }
        }
#endif
        const scalar_t* xr = xp + m * C;
        scalar_t* yr = yp + m * C;
        double ss = 0;  // x.float(): float64 inputs too are normalized in float32, as the reference does
        for (int64_t c = 0; c < C; ++c) {
          const double v = static_cast<float>(xr[c]);
          ss += v * v;
        }
        const float var = static_cast<float>(ss / static_cast<double>(C));
        const float r = 1.f / std::sqrt(var + e);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t h = static_cast<scalar_t>(static_cast<float>(xr[c]) * r);
          yr[c] = static_cast<scalar_t>(static_cast<opmath_t>(wp[c]) * static_cast<opmath_t>(h));
        }
      }
    });
  });
}

static at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), "bitnet_cpu: rms_norm takes CPU tensors");
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "bitnet_cpu: rms_norm weight has shape ", weight.sizes(),
              " for ", C, " features");
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type(), "bitnet_cpu: rms_norm weight dtype ", weight.scalar_type(),
              " differs from the input's ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  rms_rows(x.data_ptr(), w.data_ptr(), C ? x.numel() / C : 0, C, static_cast<float>(eps), x.scalar_type(), y.data_ptr());
  return y;
}

// One head vector of the rotary embedding below: x's D values at stride sd, cos / sin rows, y
// contiguous; SIMD for float32 / bf16 at stride 1 on AVX-512 or AVX2 (the same bits).
template <typename scalar_t>
static inline void rope_row(int64_t isa, const scalar_t* xr, int64_t sd, const scalar_t* cr, const scalar_t* sr, int64_t D,
                            scalar_t* yr) {
  using opmath_t = at::opmath_type<scalar_t>;
#ifdef BITNET_X86
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
    constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
    if (sd == 1 && isa >= AVX512) return rope_row_avx512<bf16>(xr, cr, sr, D, yr);
    if (sd == 1 && isa >= AVX2) return rope_row_avx2<bf16>(xr, cr, sr, D, yr);
  }
#endif
  const int64_t h2 = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const opmath_t rot = d < h2 ? -static_cast<opmath_t>(xr[(d + h2) * sd]) : static_cast<opmath_t>(xr[(d - h2) * sd]);
    const scalar_t a = static_cast<scalar_t>(static_cast<opmath_t>(xr[d * sd]) * static_cast<opmath_t>(cr[d]));
    const scalar_t r = static_cast<scalar_t>(rot * static_cast<opmath_t>(sr[d]));
    yr[d] = static_cast<scalar_t>(static_cast<opmath_t>(a) + static_cast<opmath_t>(r));
  }
}

// Rotary embedding, the function of bitnet.model's `x * cos + rotate_half(x) * sin`, bit for bit:
// x (B, H, T, D) (any strides), cos / sin (B, 1, T, D) in x's dtype; each product and the sum
// rounded to x's dtype as torch's three elementwise ops do. Returns a contiguous (B, H, T, D).
static at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "bitnet_cpu: rope takes a 4-D CPU tensor (B, H, T, D), got ", x.sizes());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "bitnet_cpu: rope needs an even head dimension, got ", D);
  TORCH_CHECK(cos_in.dim() == 4 && sin_in.sizes() == cos_in.sizes() && cos_in.size(1) == 1 && cos_in.size(2) == T &&
              cos_in.size(3) == D && (cos_in.size(0) == B || cos_in.size(0) == 1),
              "bitnet_cpu: rope cos / sin must be (B or 1, 1, T, D) = (", B, ", 1, ", T, ", ", D, "), got ", cos_in.sizes(),
              " and ", sin_in.sizes());
  TORCH_CHECK(cos_in.scalar_type() == x.scalar_type() && sin_in.scalar_type() == x.scalar_type(),
              "bitnet_cpu: rope cos / sin dtype must be the input's ", x.scalar_type());
  const at::Tensor c = cos_in.contiguous(), s = sin_in.contiguous();
  at::Tensor y = at::empty({B, H, T, D}, x.options());
  const int64_t cb = cos_in.size(0) == 1 ? 0 : T * D;
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2), sd = x.stride(3);
  const int64_t isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bitnet_cpu_rope", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* spn = s.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * T, std::max<int64_t>(1, 16384 / D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / (H * T), h = (i / T) % H, t = i % T;
        rope_row<scalar_t>(isa, xp + b * sb + h * sh + t * st, sd, cp + b * cb + t * D, spn + b * cb + t * D, D, yp + i * D);
      }
    });
  });
  return y;
}

// ------------------------------------------------------------------------------------ decode
// Attention of one query token per sequence over its cache row (bitnet_attention.h): q (N, H, D)
// float32, k_cache / v_cache (B, G, S, D) float32 or bfloat16 (read as float32), rows / pos (N,)
// int64 (query n sits at slot pos[n] of cache row rows[n] and sees slots 0..pos[n]), key_mask
// (N, >= max pos + 1) bool or None (a masked slot is skipped; the query's own never is). Returns
// y (N, H, D) float32.
static void check_decode_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t G, int64_t D) {
  TORCH_CHECK(k_cache.device().is_cpu() && (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  k_cache.dim() == 4 && k_cache.is_contiguous(),
              "bitnet_cpu: the KV cache must be a contiguous float32 or bfloat16 CPU tensor (B, G, S, D), got ",
              k_cache.scalar_type(), " ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type() && v_cache.is_contiguous(),
              "bitnet_cpu: the value cache must match the key cache ", k_cache.scalar_type(), " ", k_cache.sizes(), ", got ",
              v_cache.scalar_type(), " ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(1) == G && k_cache.size(3) == D, "bitnet_cpu: the KV cache holds ", k_cache.size(1), " heads of ",
              k_cache.size(3), ", the layer has ", G, " of ", D);
}

static void check_decode_rows(const at::Tensor& rows, const at::Tensor& pos, int64_t N, const at::Tensor& k_cache,
                              const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && rows.numel() == N && pos.numel() == N,
              "bitnet_cpu: rows and pos must be int64 with one value per query (", N, "), got ", rows.sizes(), " and ", pos.sizes());
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(rp[n] >= 0 && rp[n] < k_cache.size(0), "bitnet_cpu: cache row ", rp[n], " outside [0, ", k_cache.size(0), ")");
    TORCH_CHECK(pp[n] >= 0 && pp[n] < k_cache.size(2), "bitnet_cpu: position ", pp[n], " outside the cache's ", k_cache.size(2), " slots");
    if (key_mask.has_value() && key_mask->defined())
      TORCH_CHECK(pp[n] < key_mask->size(1), "bitnet_cpu: key_mask has ", key_mask->size(1), " slots, position ", pp[n]);
  }
  if (key_mask.has_value() && key_mask->defined())
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == N,
                "bitnet_cpu: key_mask must be bool (N, S) with N = ", N, ", got ", key_mask->scalar_type(), " ", key_mask->sizes());
}

// The attention itself: q (N, H, D) float32 contiguous at qp, the checked caches, rows / pos (N,),
// mask rows of ms slots or null -> y (N, H, D) float32 at yp.
template <typename KT>
static void attend_rows_t(const float* qp, int64_t N, int64_t H, int64_t D, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const int64_t* rp, const int64_t* pp, const bool* mp, int64_t ms, float* yp) {
  const int64_t G = k_cache.size(1), S = k_cache.size(2), isa = active_isa(), rep = H / G;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const KT* kp = static_cast<const KT*>(k_cache.data_ptr());
  const KT* vp = static_cast<const KT*>(v_cache.data_ptr());
  // threads over the parts of (query, KV head) pairs (attend_part: the rep query heads of a KV head
  // together, the cache rows streaming once for them; kPartKeys slots a part), only where each has
  // work worth the fork: ~64K key and value elements a chunk at least (a decode step at a short
  // context runs on one thread); then each pair's parts merged (merge_parts)
  int64_t live = 1, most = 1;
  for (int64_t n = 0; n < N; ++n) {
    live = std::max(live, pp[n] + 1);
    most = std::max(most, (pp[n] + kPartKeys) / kPartKeys);
  }
  const int64_t stride = rep * (D + 2);  // a part's y, m and sum
  thread_local std::vector<float> parts_kept;
  std::vector<float>& parts = parts_kept;
  if (parts.size() < static_cast<size_t>(N * G * most * stride)) parts.resize(static_cast<size_t>(N * G * most * stride));
  float* partp = parts.data();
  const int64_t part_len = std::min(live, kPartKeys);
  at::parallel_for(0, N * G * most, std::max<int64_t>(1, 65536 / (part_len * D * rep)), [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scores;  // kept by the thread: no allocation a call
    if (scores.size() < static_cast<size_t>(rep * kPartKeys)) scores.resize(static_cast<size_t>(rep * kPartKeys));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / (G * most), g = (i / most) % G, c = i % most;
      const int64_t L = pp[n] + 1, j0 = c * kPartKeys;
      if (j0 >= L) continue;  // a shorter context than the longest: fewer parts
      const int64_t len = std::min(kPartKeys, L - j0);
      const int64_t base = ((rp[n] * G + g) * S + j0) * D;
      float* out = partp + i * stride;
      attend_part<KT>(isa, qp + (n * H + g * rep) * D, rep, kp + base, vp + base, len, D, mp ? mp + n * ms + j0 : nullptr,
                  L - 1 - j0 < len ? L - 1 - j0 : -1, scale, scores.data(), out, out + rep * D, out + rep * D + rep);
    }
  });
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g)
      merge_parts(partp + (n * G + g) * most * stride, (pp[n] + kPartKeys) / kPartKeys, stride, rep, D,
                  yp + (n * H + g * rep) * D);
}

// attend_rows_t for the caches' element type (checked: float32 or bfloat16, its bits)
static void attend_rows(const float* qp, int64_t N, int64_t H, int64_t D, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const int64_t* rp, const int64_t* pp, const bool* mp, int64_t ms, float* yp) {
  if (k_cache.scalar_type() == at::kBFloat16)
    attend_rows_t<uint16_t>(qp, N, H, D, k_cache, v_cache, rp, pp, mp, ms, yp);
  else
    attend_rows_t<float>(qp, N, H, D, k_cache, v_cache, rp, pp, mp, ms, yp);
}

static at::Tensor decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& rows_in, const at::Tensor& pos_in, const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3,
              "bitnet_cpu: decode_attention q must be float32 (N, H, D), got ", q.scalar_type(), " ", q.sizes());
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), G = k_cache.size(1);
  check_decode_cache(k_cache, v_cache, G, D);
  TORCH_CHECK(G > 0 && H % G == 0, "bitnet_cpu: ", H, " query heads cannot share ", G, " KV heads");
  const at::Tensor rows = rows_in.contiguous(), pos = pos_in.contiguous();
  check_decode_rows(rows, pos, N, k_cache, key_mask);
  const at::Tensor qc = q.contiguous();
  const at::Tensor mask = key_mask.has_value() && key_mask->defined() ? key_mask->contiguous() : at::Tensor();
  at::Tensor y = at::empty({N, H, D}, q.options());
  attend_rows(qc.data_ptr<float>(), N, H, D, k_cache, v_cache, rows.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
              mask.defined() ? mask.data_ptr<bool>() : nullptr, mask.defined() ? mask.size(1) : 0, y.data_ptr<float>());
  return y;
}

static at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& rows, const at::Tensor& pos, const std::optional<at::Tensor>& key_mask) {
  return decode_attention_impl(q, k_cache, v_cache, rows, pos, key_mask);
}

// y = x + r and y = act(g) * u over n contiguous values of one dtype: one SIMD pass for float32 /
// bf16 on AVX-512 or AVX2 (bitnet_kernels.h: torch's roundings), torch's own ops on views of the
// buffers otherwise; the same bits either way.
static at::Tensor blob(const void* p, int64_t n, at::ScalarType dtype) {
  return at::from_blob(const_cast<void*>(p), {n}, at::TensorOptions().dtype(dtype));
}

static void add_into(const void* x, const void* r, int64_t n, at::ScalarType dtype, int64_t isa, void* y) {
#ifdef BITNET_X86
  if (dtype == at::kFloat || dtype == at::kBFloat16) {
    const bool bf16 = dtype == at::kBFloat16;
    if (isa >= AVX512) return (bf16 ? add_rows_avx512<true> : add_rows_avx512<false>)(x, r, n, y);
    if (isa >= AVX2) return (bf16 ? add_rows_avx2<true> : add_rows_avx2<false>)(x, r, n, y);
  }
#endif
  at::Tensor out = blob(y, n, dtype);
  at::add_out(out, blob(x, n, dtype), blob(r, n, dtype));
}

static void act_mul_into(const void* g, const void* u, int64_t n, bool square, at::ScalarType dtype, int64_t isa, void* y) {
#ifdef BITNET_X86
  if (dtype == at::kFloat || dtype == at::kBFloat16) {
    const bool bf16 = dtype == at::kBFloat16;
    if (isa >= AVX512) return (bf16 ? relu_mul_avx512<true> : relu_mul_avx512<false>)(g, u, n, square, y);
    if (isa >= AVX2) return (bf16 ? relu_mul_avx2<true> : relu_mul_avx2<false>)(g, u, n, square, y);
  }
#endif
  const at::Tensor a = at::relu(blob(g, n, dtype));
  at::Tensor out = blob(y, n, dtype);
  at::mul_out(out, square ? a.square() : a, blob(u, n, dtype));
}

// n values of scalar_t as float32 (exact for bf16 / fp16; float64 rounds to nearest, as .float()).
template <typename scalar_t>
static void to_float(const scalar_t* x, int64_t n, int64_t isa, float* y) {
  if constexpr (std::is_same_v<scalar_t, float>)
    std::memcpy(y, x, sizeof(float) * n);
  else if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    widen_bf16_fn(isa)(reinterpret_cast<const uint16_t*>(x), n, y);
  else
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

// n float32 values as scalar_t, rounded as torch's .to() does (to nearest even).
template <typename scalar_t>
static void from_float(const float* x, int64_t n, int64_t isa, scalar_t* y) {
  if constexpr (std::is_same_v<scalar_t, float>)
    std::memcpy(y, x, sizeof(float) * n);
  else if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    narrow_bf16_fn(isa)(x, n, reinterpret_cast<uint16_t*>(y));
  else
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(x[i]);
}

// n values into a float32 or bfloat16 cache at element `at`: widened to float32 (exact), copied
// where the cache holds the input's own dtype, else rounded to bf16 as torch's .to() rounds
template <typename scalar_t>
static void to_cache(const scalar_t* x, int64_t n, int64_t isa, at::Tensor& cache, int64_t at) {
  if (cache.scalar_type() == at::kFloat) {
    to_float<scalar_t>(x, n, isa, cache.data_ptr<float>() + at);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    std::memcpy(cache.data_ptr<at::BFloat16>() + at, x, sizeof(at::BFloat16) * n);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    from_float<at::BFloat16>(x, n, isa, cache.data_ptr<at::BFloat16>() + at);
  } else {
    at::BFloat16* y = cache.data_ptr<at::BFloat16>() + at;
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<at::BFloat16>(static_cast<float>(x[i]));
  }
}

// The intermediates of a decode_layer call, carved from one buffer that the calling thread keeps
// and grows to the largest call it has made: a layer made ~20 tensors a call before (~1/3 of its
// host time at the 2-core EPYC's ~27 us a small layer), now only its output.
class Scratch {
 public:
  // room for pieces of these byte sizes, each at a 64-byte boundary
  void reserve(std::initializer_list<int64_t> sizes) {
    size_t total = 64;
    for (int64_t b : sizes) total += (static_cast<size_t>(b) + 63) / 64 * 64;
    if (buf_.size() < total) buf_.resize(total);
    used_ = (64 - reinterpret_cast<uintptr_t>(buf_.data()) % 64) % 64;
  }
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(buf_.data() + used_);
    used_ += (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
    TORCH_INTERNAL_ASSERT(used_ <= buf_.size(), "bitnet_cpu: decode_layer scratch overrun");
    return p;
  }

 private:
  std::vector<char> buf_;
  size_t used_ = 0;
};

// One decoder layer of a packed model for one token per sequence, the function of
// bitnet.model.DecoderLayer.forward at decode in one call (a decode step of a small model is
// otherwise hundreds of eager ops, each microseconds of dispatch):
//     h = rms_norm(x); q, k, v = projections(h); q, k = rope(q, k); k, v -> cache (float32)
//     y = attention(q) (decode_attention); y = attn_sub_norm(y)?; x = x + o_proj(y)
//     h = rms_norm(x); g, u = projections(h); h = act(g) * u; h = ffn_sub_norm(h)?; x = x + down(h)
// Every step but the attention is the very function the eager path runs (these ops' own C++, ATen's
// elementwise ops), so it equals that path bit for bit except where the attention kernels round
// differently. x (N, C) float32 / bf16 / fp16; norms [input, attn_sub or None, post_attention,
// ffn_sub or None] in x's dtype with their eps; the seven projections q, k, v, o, gate, up, down
// (packed, scale, bias or None, out features) of one format; act "relu2" or "relu"; cos / sin
// (N, D) in x's dtype; rows / pos / key_mask as decode_attention's. Writes the cache; returns x.
// Intermediates live in the thread's Scratch, raw: no tensor is made but the output (and, for
// dtypes or instruction sets without a SIMD step here, views of the scratch for torch's op).
static at::Tensor decode_layer(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& norms, at::ArrayRef<double> eps,
                               at::TensorList packed, at::TensorList scales, const c10::List<std::optional<at::Tensor>>& biases,
                               at::IntArrayRef ns, c10::string_view fmt_s, c10::string_view act, at::Tensor k_cache,
                               at::Tensor v_cache, const at::Tensor& rows_in, const at::Tensor& pos_in, const at::Tensor& cos_in,
                               const at::Tensor& sin_in, const std::optional<at::Tensor>& key_mask, int64_t n_head, int64_t n_kv) {
  TORCH_CHECK(norms.size() == 4 && eps.size() == 4, "bitnet_cpu: decode_layer takes 4 norms and 4 eps, got ", norms.size(), " and ",
              eps.size());
  TORCH_CHECK(packed.size() == 7 && scales.size() == 7 && biases.size() == 7 && ns.size() == 7,
              "bitnet_cpu: decode_layer takes the 7 projections q, k, v, o, gate, up, down");
  TORCH_CHECK(act == "relu2" || act == "relu", "bitnet_cpu: decode_layer activation must be relu2 or relu, got ", std::string(act));
  TORCH_CHECK(norms.get(0).has_value() && norms.get(2).has_value(), "bitnet_cpu: decode_layer needs the input and post-attention norms");
  const int fmt = parse_fmt(fmt_s);
  const int64_t isa = active_isa();
  const at::Tensor x = check_input(x_in);
  const auto dtype = x.scalar_type();
  const int64_t N = x.size(0), C = x.size(1), D = ns[0] / n_head, Q = ns[0], KV = ns[1], I = ns[4];
  TORCH_CHECK(n_head > 0 && n_kv > 0 && n_head % n_kv == 0 && ns[0] == n_head * D && ns[1] == n_kv * D && ns[2] == n_kv * D,
              "bitnet_cpu: q / k / v sizes ", ns[0], " / ", ns[1], " / ", ns[2], " do not fit ", n_head, " and ", n_kv, " heads");
  TORCH_CHECK(D % 2 == 0, "bitnet_cpu: rope needs an even head dimension, got ", D);
  TORCH_CHECK(ns[3] == C && ns[6] == C && ns[5] == I, "bitnet_cpu: decode_layer o / gate / up / down sizes ", ns[3], " / ", ns[4],
              " / ", ns[5], " / ", ns[6], " do not fit ", C, " features");
  check_decode_cache(k_cache, v_cache, n_kv, D);
  const at::Tensor rows = rows_in.contiguous(), pos = pos_in.contiguous();
  check_decode_rows(rows, pos, N, k_cache, key_mask);
  TORCH_CHECK(cos_in.sizes() == at::IntArrayRef({N, D}) && sin_in.sizes() == cos_in.sizes(), "bitnet_cpu: decode_layer cos / sin must be (",
              N, ", ", D, "), got ", cos_in.sizes(), " and ", sin_in.sizes());
  TORCH_CHECK(cos_in.scalar_type() == dtype && sin_in.scalar_type() == dtype, "bitnet_cpu: rope cos / sin dtype must be the input's ",
              dtype);
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t widths[4] = {C, Q, C, I};  // what each norm normalizes
  std::array<at::Tensor, 4> nw;
  for (size_t i = 0; i < 4; ++i) {
    if (!norms.get(i).has_value()) continue;
    const at::Tensor w = *norms.get(i);
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.size(0) == widths[i] && w.scalar_type() == dtype,
                "bitnet_cpu: decode_layer norm ", i, " weight must be ", dtype, " (", widths[i], "), got ", w.scalar_type(), " ",
                w.sizes());
    nw[i] = w.is_contiguous() ? w : w.contiguous();
  }
  std::vector<Projection> ps;
  for (size_t i = 0; i < 7; ++i)
    ps.push_back(projection(i < 3 ? C : i == 3 ? Q : i < 6 ? C : I, dtype, packed[i], scales[i], ns[i], fmt, biases.get(i)));
  const at::Tensor mask = key_mask.has_value() && key_mask->defined() ? key_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(x_in.sizes(), x.options());
  if (N == 0) return out;
  const int64_t E = x.element_size(), W = std::max({C, Q, I});
  thread_local Scratch scratch;
  thread_local QuantizedRows xq;
  scratch.reserve({N * W * E, N * (Q + 2 * KV) * E, N * (Q + KV) * E, N * Q * 4, N * Q * 4, N * Q * E, N * C * E, N * C * E,
                   N * 3 * I * E, N * C * E});
  const bool square = act == "relu2";
  const int64_t S = k_cache.size(2);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bitnet_cpu_decode_layer", [&] {
    using T = scalar_t;
    T* h = scratch.take<T>(N * W);  // the norms' outputs
    T* qkv = scratch.take<T>(N * (Q + 2 * KV));
    T* qr = scratch.take<T>(N * (Q + KV));  // q and k after the rotary embedding
    float* qf = scratch.take<float>(N * Q);
    float* att = scratch.take<float>(N * Q);
    T* y = scratch.take<T>(N * Q);
    T* o = scratch.take<T>(N * C);
    T* h1 = scratch.take<T>(N * C);
    T* gu = scratch.take<T>(N * 3 * I);  // gate, up, act(gate) * up
    T* d = scratch.take<T>(N * C);
    auto norm = [&](const T* in, size_t i, int64_t width) {
      rms_rows(in, nw[i].data_ptr(), N, width, static_cast<float>(eps[i]), dtype, h);
      return static_cast<const T*>(h);
    };
    auto project = [&](const T* in, int64_t K, size_t first, std::initializer_list<T*> outs) {
      size_t i = first;
      for (T* out_i : outs) ps[i++].y = out_i;
      quantize_rows_into(in, dtype, N, K, isa, xq);
      run_projections(at::ArrayRef<Projection>(ps.data() + first, outs.size()), xq, fmt, isa, dtype);
    };
    // attention
    T* q = qkv;
    T* k = qkv + N * Q;
    T* v = k + N * KV;
    project(norm(x.data_ptr<T>(), 0, C), C, 0, {q, k, v});
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* qrot = qr;
    T* krot = qr + N * Q;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t hd = 0; hd < n_head; ++hd)
        rope_row<T>(isa, q + (n * n_head + hd) * D, 1, cp + n * D, sp + n * D, D, qrot + (n * n_head + hd) * D);
      for (int64_t g = 0; g < n_kv; ++g) {
        rope_row<T>(isa, k + (n * n_kv + g) * D, 1, cp + n * D, sp + n * D, D, krot + (n * n_kv + g) * D);
        const int64_t at_ = ((rp[n] * n_kv + g) * S + pp[n]) * D;  // k, v -> the cache, in its dtype
        to_cache<T>(krot + (n * n_kv + g) * D, D, isa, k_cache, at_);
        to_cache<T>(v + (n * n_kv + g) * D, D, isa, v_cache, at_);
      }
    }
    to_float<T>(qrot, N * Q, isa, qf);
    attend_rows(qf, N, n_head, D, k_cache, v_cache, rp, pp, mask.defined() ? mask.data_ptr<bool>() : nullptr,
                mask.defined() ? mask.size(1) : 0, att);
    from_float<T>(att, N * Q, isa, y);
    project(nw[1].defined() ? norm(y, 1, Q) : y, Q, 3, {o});
    add_into(x.data_ptr<T>(), o, N * C, dtype, isa, h1);
    // MLP
    T* g = gu;
    T* u = gu + N * I;
    T* a = gu + 2 * N * I;
    project(norm(h1, 2, C), C, 4, {g, u});
    act_mul_into(g, u, N * I, square, dtype, isa, a);
    project(nw[3].defined() ? norm(a, 3, I) : a, I, 6, {d});
    add_into(h1, d, N * C, dtype, isa, out.data_ptr<T>());
  });
  return out;
}

// Set the instruction-set cap (-1: leave it) and the large-M threshold (-1: leave it); returns the
// active instruction set (0 scalar, 1 AVX2, 2 AVX-512 VNNI).
static int64_t configure(int64_t cap, int64_t large_m) {
  if (cap >= 0) g_cap.store(cap);
  if (large_m >= 0) g_large_m.store(large_m);
  return active_isa();
}

static int64_t detected() { return kDetected; }
static int64_t gemm_rows_now() { return gemm_rows(active_isa()); }

}  // namespace bitnet_cpu

TORCH_LIBRARY(bitnet_cpu, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor scale, int n, str fmt, Tensor? bias=None) -> Tensor");
  m.def("linear_many(Tensor x, Tensor[] packed, Tensor[] scale, int[] n, str fmt, Tensor?[] bias) -> Tensor[]");
  m.def("matmul_int32(Tensor x_q, Tensor packed, int n, str fmt) -> Tensor");
  m.def("quantize(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scales, int n, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor pos, Tensor? key_mask) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor?[] norms, float[] eps, Tensor[] packed, Tensor[] scales, Tensor?[] biases, int[] ns, "
        "str fmt, str act, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, Tensor pos, Tensor cos, Tensor sin, "
        "Tensor? key_mask, int n_head, int n_kv) -> Tensor");
  m.def("configure(int cap, int large_m) -> int", &bitnet_cpu::configure);
  m.def("detected() -> int", &bitnet_cpu::detected);
  m.def("gemm_rows() -> int", &bitnet_cpu::gemm_rows_now);
}

TORCH_LIBRARY_IMPL(bitnet_cpu, CPU, m) {
  m.impl("linear", &bitnet_cpu::linear);
  m.impl("linear_many", &bitnet_cpu::linear_many);
  m.impl("matmul_int32", &bitnet_cpu::matmul_int32);
  m.impl("quantize", &bitnet_cpu::quantize);
  m.impl("int8_linear", &bitnet_cpu::int8_linear);
  m.impl("bf16_linear", &bitnet_cpu::bf16_linear);
  m.impl("int4_linear", &bitnet_cpu::int4_linear);
  m.impl("rms_norm", &bitnet_cpu::rms_norm);
  m.impl("rope", &bitnet_cpu::rope);
  m.impl("decode_attention", &bitnet_cpu::decode_attention);
  m.impl("decode_layer", &bitnet_cpu::decode_layer);
}
