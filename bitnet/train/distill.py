"""Knowledge distillation for quantization-aware training: a frozen teacher's next-token
distributions as a second target beside the corpus' next tokens.

    loss = CE(student, next tokens) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

the KL averaged over every position of the batch (Hinton et al. 2015; forward KL, as BitNet
Distillation's logits term, arXiv 2510.13998). T^2 keeps the gradient's size independent of T. The
teacher is typically the float model a `--init` run converts (its own knowledge, not only the
corpus', pulls the ternary student back), or any model with the same tokenizer.

Memory: the student's logits (B, T, V) exist anyway (the cross-entropy needs them); the KL adds the
teacher's (no graph) and, per chunk of rows, float32 temporaries, not three more (B, T, V) tensors:
its backward recomputes the softmaxes chunk by chunk from the two logit tensors it keeps. Under
tensor parallelism both logit tensors are sharded over the vocabulary (DTensor) and the KL is
composed of DTensor ops (max, exp, sum: DTensor reduces them across the shards).

The attention term (BitNet Distillation's second, after MiniLM v2) compares, at one layer, the
self-relations of the q, k and v projections: softmax(X_a X_a^T / sqrt(d)) per relation head a,
causal, the same KL row by row (`relation_loss`); the projections are read by `captured`, which
has the model's Attention append them during a forward.
"""

from __future__ import annotations

import contextlib
import math

import torch

# float32 temporaries of a chunk: rows x vocabulary <= 2^24 elements (64 MiB each; a few at a time)
CHUNK_ELEMENTS = 2**24


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    log_t = (teacher.float() / temperature).log_softmax(-1)
    log_s = (student.float() / temperature).log_softmax(-1)
    p_t = log_t.exp()
    # A teacher probability of 0 (a logit of -inf) contributes 0, not 0 * -inf.
    return torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum()


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension from ops DTensor reduces across its shards (max, sum).
    Not F.log_softmax: inside loss_parallel() its backward passes the gradient through untouched
    (torch's handler leaves the softmax's part to the nll_loss it expects next), which is wrong for
    any other loss."""
    m = x.detach().amax(-1, keepdim=True)  # the shift's gradient cancels: detached, as in logsumexp
    shifted = x - m
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, rows):
        n = student.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for i in range(0, n, rows):
            total += _kl_rows(student[i:i + rows], teacher[i:i + rows], temperature)
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.rows = temperature, rows
        return total * (temperature * temperature / n)

    @staticmethod
    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        t, rows, n = ctx.temperature, ctx.rows, student.shape[0]
        out = torch.empty_like(student)
        # d/ds of T^2 / n * KL = T / n * (softmax(s / T) - softmax(t / T))
        scale = grad.float() * (t / n)
        for i in range(0, n, rows):
            p_s = (student[i:i + rows].float() / t).softmax(-1)
            p_t = (teacher[i:i + rows].float() / t).softmax(-1)
            out[i:i + rows] = ((p_s - p_t) * scale).to(out.dtype)
        return out, None, None, None


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)).

    student (..., V) with a graph; teacher (..., V') without, V' >= V: a teacher whose vocabulary
    is padded past the student's (the same tokenizer, more rows) is cut to the student's first V.
    DTensor logits (tensor parallelism: both sharded over the vocabulary alike) need equal
    vocabularies."""
    if not temperature > 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    if hasattr(student, "full_tensor"):  # DTensor, sharded over the vocabulary
        log_s, log_t = _log_softmax(student.float() / temperature), _log_softmax(teacher.float() / temperature)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        return kl.mean() * (temperature * temperature)
    v = student.shape[-1]
    if teacher.shape[-1] < v or teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not cover the student's {tuple(student.shape)}")
    s = student.reshape(-1, v)
    t = teacher[..., :v].reshape(-1, v)
    rows = max(1, CHUNK_ELEMENTS // v)
    return _ChunkedKL.apply(s, t.detach(), float(temperature), rows)


# ----------------------------------------------------------------------------- attention relations
@contextlib.contextmanager
def captured(model, layer: int):
    """Within the block: the (q, k, v) projections of `layer` in every forward of `model`, as a list of
    (B, T, width) triples (before RoPE); nothing is kept after it (an activation-checkpointed block's
    recomputation in the backward appends nothing)."""
    attn = model.model.layers[layer].self_attn
    attn.capture = seen = []
    try:
        yield seen
    finally:
        attn.capture = None


def relation_logits(x: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM's self-attention relation of a (B, T, width) projection: split into `heads` relation
    heads of width / heads, the scaled dot products of every position with every earlier one
    (causal: later positions masked to -inf) -> (B x heads x T, T) logits, float32."""
    B, T, width = x.shape
    d = width // heads
    x = x.float().reshape(B, T, heads, d).transpose(1, 2)  # (B, heads, T, d)
    s = x @ x.transpose(-1, -2) / math.sqrt(d)
    later = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    return s.masked_fill(later, float("-inf")).reshape(-1, T)


def relation_loss(student: tuple, teacher: tuple, heads: int) -> torch.Tensor:
    """BitNet Distillation's attention term (after MiniLM v2): the mean over q, k and v of the mean
    over rows of KL(teacher's relation || student's), each relation the softmax of relation_logits
    (T = 1). The teacher's projections may be wider than the student's: only the relations are
    compared (T x T per relation head)."""
    terms = [distill_loss(relation_logits(s, heads), relation_logits(t.detach(), heads)) for s, t in zip(student, teacher)]
    return sum(terms) / len(terms)


def relation_heads(student_config, teacher_config) -> int:
    """The default number of relation heads: the largest that divides both models' key/value widths
    (the number of KV heads they share, as both widths are heads x head_dim)."""
    return math.gcd(student_config.num_key_value_heads, teacher_config.num_key_value_heads)


def teacher_layer(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    """The teacher's layer at the same relative depth as the student's (the same index for equal depths)."""
    return round((student_layer + 1) * teacher_layers / student_layers) - 1
