"""Tensor and sequence parallelism (Megatron-style) for BitNet, on torch's DTensor.

    mesh = device_mesh("cuda", world=8, tp=4)              # (dp, tp) = (2, 4), ranks [[0..3], [4..7]]
    tensor_parallel(model, mesh["tp"])                     # then fully_shard(..., mesh=mesh["dp"]) for 2-D

The layout is Megatron's, written as a `parallelize_module` plan (torchtitan's Llama plan):

    embed_tokens     RowwiseParallel   vocab rows sharded; output reduce-scattered to Shard(1) (sequence)
    input_layernorm  SequenceParallel  on (B, T/N, C): the norm, and the residual add after it, see 1/N tokens
    self_attn        PrepareModuleInput  Shard(1) -> Replicate: ONE all-gather feeds q, k and v
    q/k/v_proj       colwise           output rows sharded = heads [t*nh/N, (t+1)*nh/N) (GQA: kv heads too)
    attn_sub_norm    sharded norm      weight Shard(0), over the rank's heads (see "reductions" below)
    o_proj           rowwise           input columns sharded; output reduce-scattered to Shard(1)
    post_attention_layernorm, mlp (gate/up colwise, ffn_sub_norm sharded, down rowwise): the same
    norm             SequenceParallel
    lm_head          colwise           vocab rows sharded; input all-gathered; logits (B, T, V/N) with
                                       loss_parallel (the trainer's: vocab-parallel cross-entropy under
                                       torch's `loss_parallel()`), else all-gathered to (B, T, V)

Sequence parallelism (on by default; `sequence_parallel=False` keeps the norms replicated) shards the
residual stream, the norms and the residual adds along the sequence: their activations are 1/N per
rank, and the all-reduce of plain TP becomes the all-gather + reduce-scatter pair it is made of,
so the communication volume is the same.

The reductions BitNet needs beyond float TP. Its quantizers read whole matrices and whole rows:
1. weight scale: s = mean|W| (ternary) or beta = mean|W|, alpha = mean W (binary) of the WHOLE matrix.
   `BitLinear`'s forward computes `w.abs().mean()` on the DTensor weight: DTensor reduces the
   rank's partial sum and then all-reduces it (Partial -> Replicate), so s is the global mean; a
   per-shard mean would quantize each rank's rows with its own scale and change the function
   (tests/test_tp.py checks both: global equals one process, per-shard does not).
2. activation scale of a row-parallel input (o_proj, down_proj): a = 127 / max_k |x[t, k]| over the
   FULL row; the rank holds columns K/N of it. On the Shard(-1) DTensor input, `amax(-1)` is a
   Partial(max) that DTensor all-reduces with MAX: one (B, T, 1) all-reduce per layer.
3. sub-norms (attn_sub_norm, ffn_sub_norm) on the same sharded rows: mean(x^2) over the full row,
   the same Partial -> Replicate all-reduce of a (B, T, 1) tensor, on DTensor inputs.
Colwise layers see replicated inputs, so their activation absmax is local; nothing else changes.
All three are DTensor's own reductions triggered by the unchanged quantization code of
bitnet.quant; the only explicit collectives of this module are those of the frozen (packed)
layers below, which run native kernels on local tensors and so reduce by hand, the same two
reductions (absmax MAX, and the row-parallel sum of int32 accumulators, which is exact).

Frozen (packed) models for inference: every frozen BitLinear is swapped for a `PackedShard`.
- gate_proj / up_proj keep a slab of the checkpoint's packed rows, bytes [r0, r1) untouched. Packed
  row r holds output rows r, r + R, r + 2R, ... (bitnet.packing), so rank t computes the outputs
  {r + i*R : r0 <= r < r1}, in that order; ffn_sub_norm's weight and down_proj's input columns are
  permuted with the same order, and the MLP computes the same function (a sum over columns does not
  depend on their order). Needs intermediate_size % (P * N) == 0 (P values a byte), else the rows
  are repacked as for attention.
- q/k/v_proj: a rank must own whole heads, and packed row r mixes rows of P different heads (2B4T's
  k_proj: R = 160 rows, head_dim 128), so the rank's contiguous head rows are unpacked and packed
  again into its own (N/(P*tp), K) packed matrix, once, at load time.
- o_proj / down_proj: packing is along the output dimension, so input columns slice exactly.
Inference runs without sequence parallelism (a decode step has one token).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..bitlinear import BitLinear
from ..config import BitNetConfig
from ..packing import pack, packed_rows, unpack, values_per_byte
from ..quant import EPS, QMAX, QMIN, int_matmul


class ParallelError(ValueError):
    """A tensor-parallel layout that cannot hold this model on this many ranks."""


# ----------------------------------------------------------------------------- layout
def check_layout(config: BitNetConfig, tp: int, world: int, seq_len: int | None = None,
                 sequence_parallel: bool = True) -> None:
    """Raise ParallelError, before any step, when `tp` ranks cannot split this model."""
    if tp < 1:
        raise ParallelError(f"--tp must be at least 1, got {tp}")
    if tp > world:
        raise ParallelError(f"--tp {tp} is larger than the world size {world}: tensor parallelism splits each layer "
                            f"over --tp processes of one torchrun (e.g. torchrun --nproc-per-node {tp})")
    if world % tp:
        raise ParallelError(f"the world size {world} is not a multiple of --tp {tp}: the (dp, tp) mesh needs "
                            f"dp x tp = world")
    c = config
    need = [("num_attention_heads", c.num_attention_heads, "attention heads"),
            ("num_key_value_heads", c.num_key_value_heads, "KV heads (GQA: each rank needs the KV heads of its "
             "query heads)"),
            ("intermediate_size", c.intermediate_size, "MLP rows (gate_proj, up_proj) and columns (down_proj)"),
            ("vocab_size", c.vocab_size, "vocabulary rows (embed_tokens, lm_head)")]
    for name, value, what in need:
        if value % tp:
            raise ParallelError(f"{name} {value} is not divisible by --tp {tp}: the {what} split evenly over the "
                                f"tensor-parallel ranks")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        raise ParallelError(f"--seq-len {seq_len} is not divisible by --tp {tp}: sequence parallelism shards every "
                            f"sequence into {tp} equal parts")


def device_mesh(device_type: str, world: int, tp: int):
    """The 2-D (dp, tp) mesh: rank = dp_rank * tp + tp_rank, so a TP group is `tp` consecutive ranks
    (one node's GPUs, on the fast links)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


# ----------------------------------------------------------------------------- training styles
def _bitlinear_partition(weight, bias, norm, name, module, mesh):
    """distribute_module's partition_fn for a training BitLinear: the latent weight, the bias and the
    optional input RMSNorm (use_rms_norm) get the given placements (nn.Linear's styles would not
    know the norm, nor accept the class)."""
    from torch.distributed.tensor import distribute_tensor

    if name:  # only the BitLinear itself; its rms_norm is handled here
        return

    def put(owner: nn.Module, key: str, placement) -> None:
        p = getattr(owner, key)
        if p is not None:
            owner.register_parameter(key, nn.Parameter(distribute_tensor(p.data, mesh, [placement]),
                                                       requires_grad=p.requires_grad))

    put(module, "weight", weight)
    put(module, "bias", bias)
    if module.rms_norm is not None:
        put(module.rms_norm, "weight", norm)


def _styles():
    """ParallelStyle subclasses that accept BitLinear (imported late: torch.distributed.tensor)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

    class BitColwise(ColwiseParallel):
        """ColwiseParallel for nn.Linear and training BitLinear: weight rows sharded; the input
        (replicated) norm of use_rms_norm stays replicated."""

        def _apply(self, module, mesh):
            if not isinstance(module, BitLinear):
                return super()._apply(module, mesh)
            return distribute_module(
                module, mesh, partial(_bitlinear_partition, Shard(0), Shard(0), Replicate()),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    class BitRowwise(RowwiseParallel):
        """RowwiseParallel for nn.Linear and training BitLinear: weight columns sharded, bias
        replicated; the norm of use_rms_norm sees the sharded input, so its weight is Shard(0)."""

        def _apply(self, module, mesh):
            if not isinstance(module, BitLinear):
                return super()._apply(module, mesh)
            self.desired_input_layouts = (Shard(-1),)
            return distribute_module(
                module, mesh, partial(_bitlinear_partition, Shard(1), Replicate(), Shard(0)),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    class ShardedNorm(ParallelStyle):
        """A sub-norm between a colwise and a rowwise layer: its input is sharded along the hidden
        dimension (the rank's heads / MLP rows), its weight Shard(0) to match; the output stays a
        Shard(-1) DTensor for the rowwise layer. mean(x^2) over the full row: reduction 3 above."""

        def _apply(self, module, mesh):
            def partition(name, m, mesh):
                if not name:
                    m.register_parameter("weight", nn.Parameter(distribute_tensor(m.weight.data, mesh, [Shard(0)]),
                                                                requires_grad=m.weight.requires_grad))

            def to_dtensor(m, inputs, mesh):
                x = inputs[0]
                return x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, (Shard(-1),), run_check=False)

            return distribute_module(module, mesh, partition, to_dtensor)

    class Replicated(ParallelStyle):
        """A norm outside sequence parallelism: whole on every rank, its weight a Replicate DTensor (so
        that gradient clipping sees DTensors only); takes and returns local tensors."""

        def _apply(self, module, mesh):
            def to_dtensor(m, inputs, mesh):
                x = inputs[0]
                return x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, (Replicate(),), run_check=False)

            return distribute_module(module, mesh, None, to_dtensor, lambda m, out, mesh: out.to_local())

    return BitColwise, BitRowwise, ShardedNorm, Replicated


def tensor_parallel(model: nn.Module, mesh, sequence_parallel: bool = True, loss_parallel: bool = False) -> nn.Module:
    """Shard `model` (a BitNetForCausalLM, training or frozen) over the 1-D tensor-parallel `mesh`, in place.

    loss_parallel: the logits stay a (B, T, V/N) DTensor sharded over the vocabulary, and the
    cross-entropy of the model's forward is torch's vocab-parallel one, which needs the forward and
    the backward to run under `torch.distributed.tensor.parallel.loss_parallel()`: no rank then
    holds the (B, T, V) logits. Off: the logits are gathered, a plain tensor on every rank.

    Every rank must hold the same full model before the call (same seed or the same checkpoint);
    afterwards each holds its shards. The attention modules' head counts become the local ones
    (n_head / N, n_kv / N), which Attention.forward and setup_cache (the KV cache) then use.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module

    BitColwise, BitRowwise, ShardedNorm, Replicated = _styles()
    config: BitNetConfig = model.config
    tp = mesh.size()
    check_layout(config, tp, tp)
    frozen = any(isinstance(m, BitLinear) and m.frozen for m in model.modules())
    if frozen and sequence_parallel:
        raise ParallelError("a frozen (packed) model runs tensor-parallel without sequence parallelism "
                            "(sequence_parallel=False): a decode step has one token to shard")
    sp = sequence_parallel
    tied = config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    seq, rep = Shard(1), Replicate()

    plan: dict = {"model.embed_tokens": RowwiseParallel(input_layouts=rep, output_layouts=seq if sp else rep)}
    norm = SequenceParallel if sp else Replicated
    plan["model.norm"] = norm()
    if isinstance(model.lm_head, nn.Linear):  # an int8 head (quantize_lm_head) stays whole on every rank
        plan["lm_head"] = BitColwise(input_layouts=seq if sp else rep, output_layouts=Shard(-1) if loss_parallel else rep,
                                     use_local_output=not loss_parallel)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        plan[f"{p}.input_layernorm"] = norm()
        plan[f"{p}.post_attention_layernorm"] = norm()
        if sp:
            plan[f"{p}.self_attn"] = PrepareModuleInput(input_layouts=(seq, None, None, None, None),
                                                        desired_input_layouts=(rep, None, None, None, None))
            plan[f"{p}.mlp"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,))
        out = seq if sp else rep
        if frozen:
            _shard_frozen_block(model, i, mesh)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"{p}.self_attn.{name}"] = BitColwise()
            plan[f"{p}.self_attn.o_proj"] = BitRowwise(output_layouts=out)
            for name in ("gate_proj", "up_proj"):
                plan[f"{p}.mlp.{name}"] = BitColwise()
            plan[f"{p}.mlp.down_proj"] = BitRowwise(output_layouts=out)
        if attn.attn_sub_norm is not None:
            plan[f"{p}.self_attn.attn_sub_norm"] = ShardedNorm()
        if mlp.ffn_sub_norm is not None:
            plan[f"{p}.mlp.ffn_sub_norm"] = ShardedNorm()
        attn.n_head, attn.n_kv = attn.n_head // tp, attn.n_kv // tp
    parallelize_module(model, mesh, plan)
    if tied:  # both are (vocab, hidden) Shard(0): the same DTensor serves both again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.tensor_parallel = tp
    return model


# ----------------------------------------------------------------------------- frozen layers
def slab_order(n: int, fmt: str, tp: int) -> torch.Tensor | None:
    """The output-row order whose contiguous 1/tp chunks are the rows held by contiguous slabs of the
    packed matrix: chunk t = [r + i*R for i in 0..P-1 for r in slab t] (R packed rows, P values a
    byte). None when the slabs are not whole and equal (n % (P * tp) != 0)."""
    p = values_per_byte(fmt)
    if n % (p * tp):
        return None
    r = packed_rows(n, fmt)
    per = r // tp
    rows = [torch.arange(t * per, (t + 1) * per) + i * r for t in range(tp) for i in range(p)]
    return torch.cat(rows)


class PackedShard(nn.Module):
    """One rank's part of a frozen BitLinear under tensor parallelism: local packed bytes, the native
    kernels of bitnet.ops on local tensors, and the reductions of the quantization by hand.

    colwise: x (..., K) replicated -> y (..., n_local), the rank's output rows; one ops.bitlinear call.
    rowwise: x (..., K_local), the rank's columns -> y (..., N) summed over ranks:
        a   = 127 / all_reduce_MAX(max_k |x|)             reduction 2: the absmax of the full row
        acc = all_reduce_SUM(x_q @ W_q[:, cols]^T)         int32, exact: the row-parallel sum
        y   = acc * s / a + bias                           the float ops of bitnet.quant.quantized_linear
    The weight scale s is the whole matrix's (frozen with it), the same on every rank.
    """

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, n: int, fmt: str, bias: torch.Tensor | None,
                 style: str, group, kernel: str | None = None):
        super().__init__()
        self.register_buffer("weight", packed.contiguous())
        self.register_buffer("weight_scale", scale.float().reshape(1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.packing, self.style, self.group, self.kernel = n, fmt, style, group, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(x, "to_local"):
            x = x.to_local()
        if self.style == "colwise":
            return ops.bitlinear(x, self.weight, self.weight_scale, self.out_features, self.packing, self.bias,
                                 self.kernel)
        x32 = x.float()
        amax = x32.abs().amax(dim=-1, keepdim=True)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        a = QMAX / amax.clamp(min=EPS)  # (..., 1)
        x_q = (x32 * a).round().clamp(QMIN, QMAX).to(torch.int8)
        w_q = unpack(self.weight, self.out_features, self.packing)
        acc = int_matmul(x_q.reshape(-1, x_q.shape[-1]), w_q)  # (M, N) int32, this rank's columns
        dist.all_reduce(acc, group=self.group)
        y = acc.float() * (self.weight_scale.reshape(()) / a.reshape(-1, 1))
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.style}, out_features={self.out_features}, local packed {tuple(self.weight.shape)} {self.packing}"


def _rows_of(layer: BitLinear, rows: torch.Tensor, slab: tuple[int, int] | None) -> torch.Tensor:
    """Packed bytes of output rows `rows`: the slab packed[r0:r1] when it holds exactly them, else
    those rows unpacked and packed again."""
    if slab is not None:
        return layer.weight[slab[0]:slab[1]].clone()
    return pack(unpack(layer.weight, layer.out_features, layer.packing)[rows], layer.packing)


def _shard_frozen_block(model: nn.Module, i: int, mesh) -> None:
    """Swap block i's frozen BitLinears for their PackedShards (see the module docstring)."""
    tp, t, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    layer = model.model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp

    def colwise(m: BitLinear, rows: torch.Tensor, slab=None) -> PackedShard:
        bias = None if m.bias is None else m.bias[rows]
        return PackedShard(_rows_of(m, rows, slab), m.weight_scale, len(rows), m.packing, bias, "colwise", group,
                           m.kernel)

    def rowwise(m: BitLinear, cols: torch.Tensor) -> PackedShard:
        return PackedShard(m.weight[:, cols], m.weight_scale, m.out_features, m.packing, m.bias, "rowwise", group,
                           m.kernel)

    for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if not (isinstance(m, BitLinear) and m.frozen):
            raise ParallelError("tensor_parallel takes a model whose projections are all frozen BitLinear, or all "
                                f"training ones; block {i} mixes them")
        if m.rms_norm is not None:
            raise ParallelError("frozen layers with use_rms_norm are not supported under tensor parallelism")
    q = attn.q_proj.out_features // tp
    kv = attn.k_proj.out_features // tp
    q_rows, kv_rows = torch.arange(t * q, (t + 1) * q), torch.arange(t * kv, (t + 1) * kv)
    attn.q_proj = colwise(attn.q_proj, q_rows)
    attn.k_proj = colwise(attn.k_proj, kv_rows)
    attn.v_proj = colwise(attn.v_proj, kv_rows)
    attn.o_proj = rowwise(attn.o_proj, q_rows)

    n = mlp.gate_proj.out_features
    order = slab_order(n, mlp.gate_proj.packing, tp) if mlp.gate_proj.packing == mlp.up_proj.packing else None
    per = n // tp
    if order is None:  # rows not in whole slabs: contiguous rows, repacked
        order, slab = torch.arange(n), None
    else:
        r = packed_rows(n, mlp.gate_proj.packing) // tp
        slab = (t * r, (t + 1) * r)
    rows = order[t * per:(t + 1) * per]
    mlp.gate_proj = colwise(mlp.gate_proj, rows, slab)
    mlp.up_proj = colwise(mlp.up_proj, rows, slab)
    mlp.down_proj = rowwise(mlp.down_proj, rows)
    if mlp.ffn_sub_norm is not None:  # permuted like the MLP rows; ShardedNorm then gives rank t chunk t
        with torch.no_grad():
            mlp.ffn_sub_norm.weight.copy_(mlp.ffn_sub_norm.weight[order])


__all__ = ["ParallelError", "PackedShard", "check_layout", "device_mesh", "slab_order", "tensor_parallel"]
