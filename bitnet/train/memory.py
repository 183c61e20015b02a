"""Training memory per rank: weights, gradients, optimizer states (exact) and activations (a model).

Weights, gradients and AdamW states follow from the parameter shapes alone:
    weights    4 bytes x P         fp32 master weights (bf16 autocast makes bf16 copies per op)
    gradients  4 bytes x P
    optimizer  8 bytes x P + 4 x T  exp_avg and exp_avg_sq, plus one float32 `step` per tensor
with P parameters in T tensors; under FSDP2 (ZeRO-3) each rank keeps ceil(d0 / N) rows of every
tensor, N = ranks. DDP keeps everything on every rank.

Tensor parallelism over `tp` ranks (bitnet.train.parallel) first cuts every projection, the
embedding, the lm_head and the sub-norms into tp equal parts (the layer norms stay whole); FSDP2
over the dp ranks then shards those local tensors by rows.

Activations are what autograd saves for the backward pass. Per layer and token, with h hidden,
i intermediate, q = heads x head_dim, k = kv_heads x head_dim, and e = 2 bytes under bf16 autocast
(4 in fp32): every term below is one tensor our block saves (see the comments in the code), with
attention by a fused kernel that keeps its output and log-sum-exp rather than the s x s scores.
Activation checkpointing keeps only each block's input, plus one block's activations while it is
recomputed. The figures are checked against the bytes of the tensors autograd really saves
(`saved_activation_bytes`) in tests/test_memory.py, and on a tensor-parallel rank in tests/test_tp.py.

Under tensor parallelism a rank keeps 1/tp of everything between a colwise and a rowwise layer
(its heads, its MLP rows); with sequence parallelism 1/tp of the norms and the residual stream too.
What it keeps whole: the all-gathered (B, T, h) input of the colwise layers (each linear saves
the input its matmul sees, and DTensor gathers before the matmul; Megatron re-gathers it in the
backward pass instead, not done here). The logits stay sharded over the vocabulary: the trainer's
cross-entropy is vocab-parallel (torch's loss_parallel), so the log-probabilities are 1/tp too.

Distillation (`bitnet train --teacher`, bitnet.train.distill) adds the teacher's weights (bf16
under autocast, fp32 otherwise; sharded as the student's under FSDP2 and TP) and, per token, its
logits and what the KL keeps for the backward: the student's logits and the teacher's (the chunked
KL recomputes its softmaxes in the backward); under TP (the KL composed of DTensor ops) the
student's exponentials and the teacher's probabilities in float32, and the teacher's logits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import BitNetConfig
from ..model import BitNetForCausalLM
from .distill import distill_loss


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    teacher: int = 0  # a distillation teacher's weights (its logits are in activations)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.teacher


def parameter_shapes(config: BitNetConfig) -> list[tuple[int, ...]]:
    """Shapes of the trainable tensors (tied embeddings once), from a meta-device model."""
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    return [tuple(p.shape) for p in model.parameters()]


def tp_local_shapes(config: BitNetConfig, tp: int) -> list[tuple[int, ...]]:
    """The shapes one tensor-parallel rank holds, parameter by parameter (tied embeddings once)."""
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    colwise = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head", "attn_sub_norm",
               "ffn_sub_norm")
    shapes = []
    for name, p in model.named_parameters():
        shape = list(p.shape)
        parts = name.split(".")
        if tp > 1:
            if parts[-2] == "rms_norm":  # a BitLinear's input norm: sharded with a rowwise layer's input
                if parts[-3] in ("o_proj", "down_proj"):
                    shape[0] //= tp
            elif parts[-2] in colwise:
                shape[0] //= tp
            elif parts[-2] in ("o_proj", "down_proj") and parts[-1] == "weight":
                shape[1] //= tp
        shapes.append(tuple(shape))
    return shapes


def _shard(shape: tuple[int, ...], ranks: int) -> int:
    """Elements rank 0 holds of a tensor sharded on dim 0 into `ranks` chunks (FSDP2)."""
    rows = math.ceil(shape[0] / ranks)
    return rows * math.prod(shape[1:])


def layer_activation_bytes_per_token(config: BitNetConfig, bf16: bool, tp: int = 1, sequence_parallel: bool = True) -> float:
    """Bytes autograd saves per token in one decoder block (training state, fused attention), on one
    of `tp` tensor-parallel ranks (per token of the whole micro-batch)."""
    h, i = config.hidden_size, config.intermediate_size / tp
    q = config.num_attention_heads * config.dim_head / tp
    k = config.num_key_value_heads * config.dim_head / tp
    e = 2 if bf16 else 4
    quantized = config.linear != "bf16"
    sp = tp if sequence_parallel else 1  # the norms and the residual stream: 1/tp of the tokens

    def linear_inputs(count: int, dim: int) -> int:
        # A linear saves its input as its matmul sees it: under autocast a bf16 copy, one per
        # linear (autocast does not share activation casts); BitNet's fake-quantized copy, one per
        # linear; otherwise the shared input tensor itself, once.
        return count * e * dim if (bf16 or quantized) else 4 * dim

    def rms_norm(dim: int, input_bytes: int) -> int:
        return 4 * dim + input_bytes * dim  # its input in fp32 (a copy if it was bf16), normalized

    total = rms_norm(h, 4) / sp  # input_layernorm over the fp32 residual stream
    total += linear_inputs(3, h)  # q_proj, k_proj, v_proj (whole sequence: gathered under sequence parallelism)
    total += e * (2 * q + 2 * k) + 4 * config.num_attention_heads / tp  # attention: q, k, v, output, logsumexp
    if config.sub_norms:
        total += rms_norm(q, e)  # attn_sub_norm of the attention output
    total += linear_inputs(1, q)  # o_proj
    total += rms_norm(h, 4) / sp  # post_attention_layernorm
    total += linear_inputs(2, h)  # gate_proj, up_proj
    total += e * i + 2 * e * i  # act(gate) keeps one tensor, act(gate) * up keeps both factors
    if config.sub_norms:
        total += rms_norm(i, e)  # ffn_sub_norm
    total += linear_inputs(1, i)  # down_proj
    return total


def weight_copy_bytes(config: BitNetConfig, bf16: bool, tp: int = 1) -> tuple[float, float]:
    """Weight-sized tensors saved for the backward pass: BitNet's fake-quantized weights (fp32, or
    their bf16 cast under autocast) and autocast's bf16 copies of the twin's and lm_head's weights;
    of the rank's shards under tensor parallelism."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.dim_head
    k = config.num_key_value_heads * config.dim_head
    projections = layers * (h * q + 2 * h * k + q * h + 3 * h * i)
    per_weight = 2 if bf16 else (4 if config.linear != "bf16" else 0)
    return per_weight * projections / tp, (2 * config.vocab_size * h / tp if bf16 else 0)  # blocks, lm_head


def activation_bytes(config: BitNetConfig, micro_batch: int, seq_len: int, bf16: bool,
                     checkpointing: bool = False, tp: int = 1, sequence_parallel: bool = True) -> int:
    """Activations saved for one micro-batch's backward (the peak of a training step), on one rank."""
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes_per_token(config, bf16, tp, sequence_parallel) * tokens
    h = config.hidden_size
    sp = tp if sequence_parallel else 1
    head = tokens * (8 * h / sp  # final norm: fp32 input and normalized output
                     + (2 if bf16 else 4) * h  # lm_head input (its bf16 cast, or the norm's output; gathered)
                     + 4 * config.vocab_size / tp)  # float32 log-probabilities of the (vocab-parallel) cross-entropy
    blocks, lm_head = weight_copy_bytes(config, bf16, tp)
    layers = config.num_hidden_layers
    if checkpointing:  # block inputs only, plus one block at a time while it is recomputed
        return round(layers * tokens * 4 * h / sp + per_layer + blocks / layers + head + lm_head)
    return round(layers * per_layer + blocks + head + lm_head)


def distill_activation_bytes(config: BitNetConfig, micro_batch: int, seq_len: int, bf16: bool, tp: int = 1) -> int:
    """What distillation keeps through a micro-batch's backward, on one rank: the student's logits
    (saved by the chunked KL) and the teacher's, or under TP the float32 exponentials and teacher
    probabilities the DTensor KL saves, and the teacher's logits (alive until the step's end)."""
    e = 2 if bf16 else 4  # logits under bf16 autocast, or fp32; the teacher's alike (loaded in bf16 there)
    per_token = (8 + e) if tp > 1 else 2 * e
    return round(micro_batch * seq_len * per_token * config.vocab_size / tp)


def estimate(config: BitNetConfig, micro_batch: int, seq_len: int, dp: int = 1, fsdp: bool = False,
             bf16: bool = True, checkpointing: bool = False, tp: int = 1,
             sequence_parallel: bool = True, teacher: BitNetConfig | None = None) -> MemoryEstimate:
    """Per-rank training memory (rank 0, the largest shard) of AdamW with fp32 master weights, on a
    (dp, tp) layout: dp data-parallel replicas (FSDP2-sharded with `fsdp`) of tp tensor-parallel ranks;
    with a distillation `teacher` (a float model: its weights and logits)."""
    shapes = tp_local_shapes(config, tp) if tp > 1 else parameter_shapes(config)
    ranks = dp if fsdp else 1
    elements = sum(_shard(s, ranks) for s in shapes)
    activations = activation_bytes(config, micro_batch, seq_len, bf16, checkpointing, tp, sequence_parallel)
    teacher_bytes = 0
    if teacher is not None:
        t_shapes = tp_local_shapes(teacher, tp) if tp > 1 else parameter_shapes(teacher)
        teacher_bytes = (2 if bf16 else 4) * sum(_shard(s, ranks) for s in t_shapes)
        activations += distill_activation_bytes(config, micro_batch, seq_len, bf16, tp)
    return MemoryEstimate(weights=4 * elements, gradients=4 * elements, optimizer=8 * elements + 4 * len(shapes),
                          activations=activations, teacher=teacher_bytes)


@contextmanager
def count_saved_tensors():
    """Bytes of every distinct storage autograd saves inside the block (a CPU-friendly measurement
    of activation memory): yields a dict whose 'bytes' grows as tensors are saved. Parameters, and
    tensors that merely alias a parameter, are not activations and are skipped."""
    seen: set[int] = set()
    result = {"bytes": 0}

    def pack(saved: torch.Tensor):
        t = saved
        while type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:  # DTensor, AsyncCollectiveTensor
            inner = getattr(t, "_local_tensor", getattr(t, "elem", None))
            if inner is None:
                raise TypeError(f"cannot measure a saved {type(t).__name__}")
            t = inner
        if not isinstance(saved, torch.nn.Parameter):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen and key not in result.setdefault("params", set()):
                seen.add(key)
                result["bytes"] += storage.nbytes()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result


def saved_activation_bytes(model: BitNetForCausalLM, input_ids: torch.Tensor, bf16: bool,
                           teacher: BitNetForCausalLM | None = None) -> int:
    """Measure: bytes of the activations one forward pass saves for its backward (with a teacher:
    the trainer's distillation loss beside the cross-entropy)."""
    params = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in model.parameters()}
    with count_saved_tensors() as counted:
        counted["params"] = params
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids, labels=input_ids)
            loss = out.loss
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(input_ids).logits
                loss = loss + distill_loss(out.logits, target)
    loss.backward()
    return counted["bytes"]
