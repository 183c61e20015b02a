"""The kernels as torch.library custom ops (namespace "bitnet"), each with a fake implementation,
so that torch.compile traces models through them (fullgraph=True) and CUDA graphs capture them.

    bitnet::bitlinear(x, packed, scale, bias, n, fmt)            y (..., n) in x's dtype
    bitnet::packed_matmul(x_q, a, packed, scale, bias, n, fmt, out_dtype)
    bitnet::packed_matmul_cat(x_q, a, packed[], scales[], biases[], ns, fmt, out_dtype)
                                                                 several matrices of one input: y (..., sum(ns))
    bitnet::packed_matmul_int32(x_q, packed, n, fmt)            x_q . W_q^T, int32, exact
    bitnet::act_quant(x)                                         (x_q int8, a float32 (..., 1), xsum int32 (...))
    bitnet::rmsnorm_act_quant(x, weight, eps, up?)               (x_q, a, xsum) of RMSNorm(x), or of
                                                                 RMSNorm(relu(x)^2 * up)
    bitnet::rmsnorm_packed_matmul_cat(x, weight, eps, packed[], scales[], biases[], ns, fmt, up?, residual?)
                                                                 packed_matmul_cat of RMSNorm(x) (or of
                                                                 RMSNorm(relu(x)^2 * up)): y (..., sum(ns))
    bitnet::rope(q, k, v, cos, sin)                              (q', k', v) as (B, heads, T, hd)
    bitnet::rope_cache_(q, k, v, cos, sin, cache_k!, cache_v!, input_pos, cache_rows?)
                                                                 q'; k', v written to the cache
    bitnet::decode_attention(q, k_cache, v_cache, pos, rows?, key_mask?)
                                                                 y (N, H * D): one query per sequence
    bitnet::rope_decode_attention_(q, k, v, cos, sin, k_cache!, v_cache!, pos, rows?, key_mask?)
                                                                 the same after rope_cache_'s RoPE and
                                                                 cache write, in one launch
    bitnet::int8_linear(x, weight, scale, bias?)                 y = (x @ W_q^T) * s: an int8 lm_head, few rows
    bitnet::int4_linear(x, codes, scales, out_features, bias?)   a 4-bit grouped lm_head (Int4Linear), few rows

Dispatch by the number of activation rows M (all leading dimensions of x flattened):
- M == 1 (decode): the GEMV, with the activation quantization fused in: one launch. Several
  matrices of one input (packed_matmul_cat: q / k / v, gate / up) share one GEMV launch, and the
  RMSNorm in front of them runs inside it too (rmsnorm_packed_matmul_cat: every program
  normalizes the row; a decode layer's four norms launch nothing of their own).
- M > 1: act_quant, then the tensor-core GEMM (its small-M configs and split-K up to M = 64);
  several matrices of one input in one launch too (gemm_cat; from M = UNPACK_M after unpacking
  them into one int8 buffer, by the launch that quantizes x: rmsnorm_packed_matmul_cat's norm,
  bitlinear's act_quant). Up to
  M = 64 (a batched decode step) rmsnorm_packed_matmul_cat's norm runs inside the GEMM, as in the
  GEMV: every program normalizes and quantizes its rows.
Autotuning runs at the first call of each shape; run one eager call before capturing a CUDA graph.

The public functions at the bottom call the ops where torch.compile (or torch.export) traces, and
the ops' own Python implementations directly in eager code: torch.library's dispatch costs ~30 us
of host time a call (measured on a 2-core Xeon), more than a decode GEMV's GPU work, and eager
decode issues hundreds of them a token. Same functions, same results either way.
"""

from __future__ import annotations

from typing import Optional

import torch

from .activations import act_quant as _act_quant, rows_of
from .attention import decode_attention as _decode_attention
from . import gemm as _gemm
from .gemm import gemm, gemm_cat
from .gemv import MAX_K as GEMV_MAX_K, gemv, gemv_cat
from .int4_head import int4_linear as _int4_linear
from .int8_head import int8_linear as _int8_linear
from .rmsnorm_quant import rmsnorm_act_quant as _rmsnorm_act_quant, rmsnorm_act_quant_unpack as _rmsnorm_act_quant_unpack
from .rope import rope_cache as _rope_cache

Tensor = torch.Tensor


def _output_like(x: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=dtype)


def _one_row(x2: Tensor) -> bool:
    """The GEMV's case: one activation row (a decode step), at a K its int32 sums hold (else the GEMM)."""
    return x2.shape[0] == 1 and x2.shape[1] <= GEMV_MAX_K


def _one_launch(packed: list[Tensor], biases: list[Optional[Tensor]]) -> bool:
    """What one gemv_cat / gemm_cat launch takes: up to three matrices, a bias each or none."""
    return len(packed) <= 3 and len({b is None for b in biases}) == 1


def _one_matrix_residual(packed: list[Tensor], r2: Optional[Tensor]) -> bool:
    """A residual the GEMV's and the GEMM's epilogue add: one matrix's output, unit stride along it."""
    return r2 is not None and len(packed) == 1 and r2.stride(-1) == 1


def _one_gemv(x2: Tensor, packed: list[Tensor], biases: list[Optional[Tensor]], r2: Optional[Tensor]) -> bool:
    """One gemv_cat launch for all the matrices, a residual (one matrix, unit stride) in its epilogue."""
    return _one_row(x2) and _one_launch(packed, biases) and (r2 is None or _one_matrix_residual(packed, r2))


def _bitlinear_impl(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, n: int, fmt: str) -> Tensor:
    x2 = rows_of(x)
    if _one_row(x2):
        y = gemv(x2, packed, n, fmt, scale=scale, bias=bias)
    elif 0 < _gemm.UNPACK_M <= x2.shape[0]:  # the quantization of x and the weights' unpack in one launch
        x_q, a, xsum, w = _rmsnorm_act_quant_unpack(x2, None, 0.0, [packed], [n], fmt)
        y = gemm_cat(x_q, [packed], [n], fmt, [scale], [bias], a.reshape(-1), xsum, x.dtype, unpacked=w)
    else:
        x_q, a, xsum = _act_quant(x2)
        y = gemm(x_q, packed, n, fmt, scale=scale, bias=bias, a=a, xsum=xsum, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], n)


_bitlinear = torch.library.custom_op("bitnet::bitlinear", _bitlinear_impl, mutates_args=())


@_bitlinear.register_fake
def _(x, packed, scale, bias, n, fmt):
    return _output_like(x, n, x.dtype)


def _packed_matmul_impl(x_q: Tensor, a: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, n: int, fmt: str,
                   out_dtype: torch.dtype) -> Tensor:
    x2, a2 = rows_of(x_q), a.reshape(-1)
    if _one_row(x2):
        y = gemv(x2, packed, n, fmt, scale=scale, bias=bias, a=a2, out_dtype=out_dtype)
    else:
        y = gemm(x2, packed, n, fmt, scale=scale, bias=bias, a=a2, out_dtype=out_dtype)
    return y.reshape(*x_q.shape[:-1], n)


_packed_matmul = torch.library.custom_op("bitnet::packed_matmul", _packed_matmul_impl, mutates_args=())


@_packed_matmul.register_fake
def _(x_q, a, packed, scale, bias, n, fmt, out_dtype):
    return _output_like(x_q, n, out_dtype)


def _packed_matmul_cat_impl(x_q: Tensor, a: Tensor, packed: list[Tensor], scales: list[Tensor],
                            biases: list[Optional[Tensor]], ns: list[int], fmt: str, out_dtype: torch.dtype,
                            xsum: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> Tensor:
    return _matmul_cat(x_q, a, packed, scales, biases, ns, fmt, out_dtype, xsum, residual)


def _matmul_cat(x_q: Tensor, a: Tensor, packed: list[Tensor], scales: list[Tensor], biases: list[Optional[Tensor]],
                ns: list[int], fmt: str, out_dtype: torch.dtype, xsum: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, unpacked: Optional[Tensor] = None) -> Tensor:
    """packed_matmul_cat; unpacked: the matrices' int8 weights made already (gemm_cat's)."""
    x2, a2 = rows_of(x_q), a.reshape(-1)
    one_launch = _one_launch(packed, biases)
    if residual is not None and (residual.shape[:-1] != x_q.shape[:-1] or residual.shape[-1] != sum(ns)
                                 or residual.dtype != out_dtype):
        raise ValueError(f"residual must be {(*x_q.shape[:-1], sum(ns))} {out_dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    r2 = None if residual is None else residual.reshape(x2.shape[0], sum(ns))
    one_row = _one_row(x2)
    if _one_gemv(x2, packed, biases, r2):
        y = gemv_cat(x2, packed, ns, fmt, scales, biases, a=a2, out_dtype=out_dtype, residual=r2)
        r2 = None  # added in the epilogue
    elif not one_row and one_launch:  # one GEMM launch for all of them (from UNPACK_M on: after one unpack)
        res = r2 if _one_matrix_residual(packed, r2) else None  # o_proj, down_proj: added in the epilogue
        y = gemm_cat(x2, packed, ns, fmt, scales, biases, a=a2, xsum=None if xsum is None else xsum.reshape(-1),
                     out_dtype=out_dtype, residual=res, unpacked=unpacked)  # (gemm_cat sums x_q where its kernel needs it and none is given)
        if res is not None:
            r2 = None
    else:
        y = x2.new_empty((x2.shape[0], sum(ns)), dtype=out_dtype)
        if xsum is None:
            xsum = x2.sum(-1, dtype=torch.int32)  # once for every matrix
        xsum = xsum.reshape(-1)
        col = 0
        for p, s, b, n in zip(packed, scales, biases, ns):
            if one_row:
                y[:, col:col + n] = gemv(x2, p, n, fmt, scale=s, bias=b, a=a2, out_dtype=out_dtype)
            else:
                gemm(x2, p, n, fmt, scale=s, bias=b, a=a2, xsum=xsum, out_dtype=out_dtype, out=y[:, col:col + n])
            col += n
    if r2 is not None:
        y.add_(r2)  # residual + y: the same bits (IEEE addition commutes)
    return y.reshape(*x_q.shape[:-1], sum(ns))


_packed_matmul_cat = torch.library.custom_op("bitnet::packed_matmul_cat", _packed_matmul_cat_impl, mutates_args=())


@_packed_matmul_cat.register_fake
def _(x_q, a, packed, scales, biases, ns, fmt, out_dtype, xsum=None, residual=None):
    return _output_like(x_q, sum(ns), out_dtype)


def _packed_matmul_int32_impl(x_q: Tensor, packed: Tensor, n: int, fmt: str) -> Tensor:
    x2 = rows_of(x_q)
    launch = gemv if _one_row(x2) else gemm
    return launch(x2, packed, n, fmt, out_dtype=torch.int32).reshape(*x_q.shape[:-1], n)


_packed_matmul_int32 = torch.library.custom_op("bitnet::packed_matmul_int32", _packed_matmul_int32_impl, mutates_args=())


@_packed_matmul_int32.register_fake
def _(x_q, packed, n, fmt):
    return _output_like(x_q, n, torch.int32)


def _act_quant_impl(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _act_quant(x)


_act_quant_op = torch.library.custom_op("bitnet::act_quant", _act_quant_impl, mutates_args=())


def _quantized_like(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
            x.new_empty(x.shape[:-1], dtype=torch.int32))


@_act_quant_op.register_fake
def _(x):
    return _quantized_like(x)


def _rmsnorm_act_quant_impl(x: Tensor, weight: Tensor, eps: float, up: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _rmsnorm_act_quant(x, weight, eps, up)


_rmsnorm_act_quant_op = torch.library.custom_op("bitnet::rmsnorm_act_quant", _rmsnorm_act_quant_impl, mutates_args=())


@_rmsnorm_act_quant_op.register_fake
def _(x, weight, eps, up=None):
    return _quantized_like(x)


def _rmsnorm_packed_matmul_cat_impl(x: Tensor, weight: Tensor, eps: float, packed: list[Tensor], scales: list[Tensor],
                                    biases: list[Optional[Tensor]], ns: list[int], fmt: str, up: Optional[Tensor] = None,
                                    residual: Optional[Tensor] = None) -> Tensor:
    x2 = rows_of(x)
    n = sum(ns)
    r2 = None if residual is None else residual.reshape(x2.shape[0], n)
    if _one_gemv(x2, packed, biases, r2):
        u2 = None if up is None else rows_of(up)
        y = gemv_cat(x2, packed, ns, fmt, scales, biases, residual=r2, norm_weight=weight, eps=eps, up=u2)
        return y.reshape(*x.shape[:-1], n)
    if 0 < _gemm.UNPACK_M <= x2.shape[0] and not _one_row(x2) and _one_launch(packed, biases):
        # a prefill: the norm and the weights' unpack for the int8 GEMM in one launch
        x_q, a, xsum, w = _rmsnorm_act_quant_unpack(x, weight, eps, packed, ns, fmt, up)
        return _matmul_cat(x_q, a, packed, scales, biases, ns, fmt, x.dtype, xsum, residual, unpacked=w)
    if x2.shape[0] <= _gemm.GEMM_NORM_M and _one_launch(packed, biases) and (r2 is None
                                                                            or _one_matrix_residual(packed, r2)):
        # a batched decode step (one row and a prefill took the branches above): the norm inside the
        # GEMM, every program normalizing its rows itself
        u2 = None if up is None else rows_of(up)
        y = gemm_cat(x2, packed, ns, fmt, scales, biases, out_dtype=x.dtype, residual=r2, norm_weight=weight, eps=eps,
                     up=u2)
        return y.reshape(*x.shape[:-1], n)
    x_q, a, xsum = _rmsnorm_act_quant_impl(x, weight, eps, up)
    return _matmul_cat(x_q, a, packed, scales, biases, ns, fmt, x.dtype, xsum, residual)


_rmsnorm_packed_matmul_cat = torch.library.custom_op("bitnet::rmsnorm_packed_matmul_cat", _rmsnorm_packed_matmul_cat_impl,
                                                     mutates_args=())


@_rmsnorm_packed_matmul_cat.register_fake
def _(x, weight, eps, packed, scales, biases, ns, fmt, up=None, residual=None):
    return _output_like(x, sum(ns), x.dtype)


def _rope_impl(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _rope_cache(q, k, v, cos, sin)


_rope_op = torch.library.custom_op("bitnet::rope", _rope_impl, mutates_args=())


@_rope_op.register_fake
def _(q, k, v, cos, sin):
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    return q.new_empty(B, nh, T, hd), q.new_empty(B, nkv, T, hd), v.new_empty(B, nkv, T, hd)


def _rope_cache_impl(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache_k: Tensor, cache_v: Tensor,
                     input_pos: Tensor, cache_rows: Optional[Tensor] = None) -> Tensor:
    return _rope_cache(q, k, v, cos, sin, cache_k, cache_v, input_pos, cache_rows)[0]


_rope_cache_op = torch.library.custom_op("bitnet::rope_cache_", _rope_cache_impl, mutates_args=("cache_k", "cache_v"))


@_rope_cache_op.register_fake
def _(q, k, v, cos, sin, cache_k, cache_v, input_pos, cache_rows=None):
    B, T, nh, hd = q.shape
    return q.new_empty(B, nh, T, hd)


def _decode_attention_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, rows: Optional[Tensor] = None,
                           key_mask: Optional[Tensor] = None) -> Tensor:
    return _decode_attention(q, k_cache, v_cache, pos, rows, key_mask)


_decode_attention_op = torch.library.custom_op("bitnet::decode_attention", _decode_attention_impl, mutates_args=())


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos, rows=None, key_mask=None):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _rope_decode_attention_impl(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                                v_cache: Tensor, pos: Tensor, rows: Optional[Tensor] = None,
                                key_mask: Optional[Tensor] = None) -> Tensor:
    return _decode_attention(q, k_cache, v_cache, pos, rows, key_mask, rope=(k, v, cos, sin))


_rope_decode_attention_op = torch.library.custom_op("bitnet::rope_decode_attention_", _rope_decode_attention_impl,
                                                    mutates_args=("k_cache", "v_cache"))


@_rope_decode_attention_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, rows=None, key_mask=None):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _int8_linear_impl(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return _int8_linear(x, weight, scale, bias)


_int8_linear_op = torch.library.custom_op("bitnet::int8_linear", _int8_linear_impl, mutates_args=())


@_int8_linear_op.register_fake
def _(x, weight, scale, bias=None):
    return _output_like(x, weight.shape[0], x.dtype)


def _int4_linear_impl(x: Tensor, codes: Tensor, scales: Tensor, out_features: int, bias: Optional[Tensor] = None) -> Tensor:
    return _int4_linear(x, codes, scales, out_features, bias)


_int4_linear_op = torch.library.custom_op("bitnet::int4_linear", _int4_linear_impl, mutates_args=())


@_int4_linear_op.register_fake
def _(x, codes, scales, out_features, bias=None):
    return _output_like(x, out_features, x.dtype)


# The public functions: the ops where torch.compile (or torch.export) traces, their implementations
# in eager code.
_tracing = torch.compiler.is_compiling


def bitlinear(x: Tensor, packed: Tensor, scale: Tensor, n: int, fmt: str, bias: Tensor | None = None) -> Tensor:
    """y = (x_q @ W_q^T) * scale / a (+ bias) for x (..., K), packed (R, K) uint8, scale float32 (1,);
    the signature bitnet.ops.bitlinear calls."""
    op = torch.ops.bitnet.bitlinear if _tracing() else _bitlinear_impl
    return op(x, packed, scale, bias, n, fmt)


def packed_matmul(x_q: Tensor, a: Tensor, packed: Tensor, scale: Tensor, n: int, fmt: str,
                  bias: Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """y = (x_q @ W_q^T) * scale / a (+ bias) from activations already quantized (act_quant)."""
    op = torch.ops.bitnet.packed_matmul if _tracing() else _packed_matmul_impl
    return op(x_q, a, packed, scale, bias, n, fmt, out_dtype)


def packed_matmul_cat(x_q: Tensor, a: Tensor, packed: list[Tensor], scales: list[Tensor], ns: list[int], fmt: str,
                      biases: list[Tensor | None] | None = None, out_dtype: torch.dtype = torch.float32,
                      xsum: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """packed_matmul of several matrices of one quantized input, outputs side by side: y (..., sum(ns)),
    matrix j's in columns sum(ns[:j]) .. sum(ns[:j+1]) - 1, each equal to its own packed_matmul. At
    M = 1 up to three matrices (with a bias each or none) run in one GEMV launch. xsum: the rows'
    sums of x_q (act_quant(..., with_sum=True) gives them), else computed here where needed (M > 1).
    residual (..., sum(ns)) of out_dtype: y = residual + y (the decoder layer's skip connection), in
    the GEMV's epilogue at M = 1 for one matrix, else one add after."""
    biases = list(biases) if biases is not None else [None] * len(packed)
    op = torch.ops.bitnet.packed_matmul_cat if _tracing() else _packed_matmul_cat_impl
    return op(x_q, a, list(packed), list(scales), biases, list(ns), fmt, out_dtype, xsum, residual)


def packed_matmul_int32(x_q: Tensor, packed: Tensor, n: int, fmt: str) -> Tensor:
    """The exact integer accumulator x_q @ W_q^T, int32 (..., n)."""
    op = torch.ops.bitnet.packed_matmul_int32 if _tracing() else _packed_matmul_int32_impl
    return op(x_q, packed, n, fmt)


def act_quant(x: Tensor, with_sum: bool = False) -> tuple[Tensor, ...]:
    """Per-token absmax int8: (x_q (..., K), a (..., 1)), bit-identical to bitnet.quant.quantize_activation;
    with_sum: also xsum (...) int32, the rows' sums of x_q (what the GEMM subtracts)."""
    out = torch.ops.bitnet.act_quant(x) if _tracing() else _act_quant_impl(x)
    return out if with_sum else out[:2]


def rmsnorm_act_quant(x: Tensor, weight: Tensor, eps: float = 1e-5, with_sum: bool = False,
                      up: Tensor | None = None) -> tuple[Tensor, ...]:
    """act_quant(RMSNorm(x)) in one kernel (with_sum: also xsum, as act_quant); with up,
    act_quant(RMSNorm(relu(x)^2 * up)), the relu2 MLP's activation folded in."""
    op = torch.ops.bitnet.rmsnorm_act_quant if _tracing() else _rmsnorm_act_quant_impl
    out = op(x, weight, eps, up)
    return out if with_sum else out[:2]


def rmsnorm_packed_matmul_cat(x: Tensor, weight: Tensor, eps: float, packed: list[Tensor], scales: list[Tensor],
                              ns: list[int], fmt: str, biases: list[Tensor | None] | None = None,
                              up: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """packed_matmul_cat of rmsnorm_act_quant(x, weight, eps, up=up), y (..., sum(ns)) in x's dtype
    (residual + y with a residual, one matrix). At M = 1 (up to three matrices, a bias each or none)
    one GEMV launch does it all, each program normalizing and quantizing the row itself with the
    norm kernel's arithmetic and summation order (rmsnorm_act_quant's x_q and a, bit for bit); up
    to M = 64 one GEMM launch does the same; from there on rmsnorm_act_quant, then
    packed_matmul_cat (from UNPACK_M on, the norm and the weights' unpack in one launch)."""
    biases = list(biases) if biases is not None else [None] * len(packed)
    op = torch.ops.bitnet.rmsnorm_packed_matmul_cat if _tracing() else _rmsnorm_packed_matmul_cat_impl
    return op(x, weight, eps, list(packed), list(scales), biases, list(ns), fmt, up, residual)


def rope_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache_k: Tensor | None = None,
               cache_v: Tensor | None = None, input_pos: Tensor | None = None,
               cache_rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RoPE of q (B, T, nh, hd) and k (B, T, nkv, hd) and the cache write of k and v, one launch
    (kernels/rope.py): (q' (B, nh, T, hd), K, V), K / V the caches when given (k', v written at
    input_pos; with cache_rows (T,) and B = 1, token t into cache row cache_rows[t]), else new
    (B, nkv, T, hd) tensors."""
    if cache_k is None:
        return torch.ops.bitnet.rope(q, k, v, cos, sin) if _tracing() else _rope_impl(q, k, v, cos, sin)
    op = torch.ops.bitnet.rope_cache_ if _tracing() else _rope_cache_impl
    return op(q, k, v, cos, sin, cache_k, cache_v, input_pos, cache_rows), cache_k, cache_v


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, rows: Tensor | None = None,
                     key_mask: Tensor | None = None) -> Tensor:
    """One query token per sequence over its cache row (kernels/attention.py): q (N, H, D), caches
    (rows, NKV, S, D) of q's dtype, pos (N,) or (1,) the query's slot (it sees slots 0 .. pos),
    rows (N,) its cache row (default n), key_mask (N, S) bool / integer (zero: padding, skipped)
    -> y (N, H * D), the heads side by side (the o_proj's input)."""
    op = torch.ops.bitnet.decode_attention if _tracing() else _decode_attention_impl
    return op(q, k_cache, v_cache, pos, rows, key_mask)


def rope_decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                          pos: Tensor, rows: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
    """A decode step's RoPE, cache write and attention in one launch: rope_cache of q (N, H, D)
    and the new key / value k, v (N, NKV, D) (cos / sin (N or 1, D) or a view of that many, e.g. the
    rotary cache's (N or 1, 1, 1, D)) into slot pos of each query's
    cache row, then decode_attention; y (N, H * D), the caches written in place."""
    op = torch.ops.bitnet.rope_decode_attention_ if _tracing() else _rope_decode_attention_impl
    return op(q, k, v, cos, sin, k_cache, v_cache, pos, rows, key_mask)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = (x @ W_q^T) * scale (+ bias) for an int8 weight (N, K) with float32 row scales and x
    (..., K) of at most 16 rows (kernels/int8_head.py), y in x's dtype."""
    op = torch.ops.bitnet.int8_linear if _tracing() else _int8_linear_impl
    return op(x, weight, scale, bias)


def int4_linear(x: Tensor, codes: Tensor, scales: Tensor, out_features: int, bias: Tensor | None = None) -> Tensor:
    """An Int4Linear's y for x (..., K) of at most 16 rows (kernels/int4_head.py): x quantized per
    row to int8, exact int32 sums per group of 32 weights, float32 over the groups; y in x's dtype."""
    op = torch.ops.bitnet.int4_linear if _tracing() else _int4_linear_impl
    return op(x, codes, scales, out_features, bias)
