"""The server's model runner: runs the step the engine hands it on the model's static KV cache,
one cache row (a slot) per sequence, and nothing else (no queue, no sampling, no HTTP).

    runner = ModelRunner(model, max_batch=8, max_seq_len=1024)    # model.setup_cache(8, 1024)
    logits = runner.step([Segment(slot=3, tokens=prompt, start=0),           # a newcomer's prompt
                          Segment(slot=0, tokens=[17], start=40),            # running sequences:
                          Segment(slot=5, tokens=[4], start=9)])             # one token each
    # logits (3, vocab): after the prompt, and the next-token logits of slots 0 and 5

A step is a list of segments, each some tokens of one sequence at cache columns (and RoPE
positions) start, start + 1, ...: a whole prompt, a chunk of one, or the one token of a decode
step. All of them go through the model in ONE forward, so one pass over the weights serves the
newcomers' prefill and every running sequence's decode (`prefill` and `decode` are that step with
one kind of segment).

Every sequence keeps the layout a lone `generate` gives it: its token i in column i of its slot's
row. `model.forward` takes one cache position for the whole batch (left padding aligns sequences
that start together), so the step is written here over the model's own modules, the tokens of all
segments side by side in one row of the activations (1, N, C):

- embedding, RMSNorms, the seven projections, RoPE and the MLP run on all N tokens at once: the
  packed kernels are exact per row (int32 sums, per-row activation scales, the same float32
  epilogue for any M), the native RMSNorm / RoPE are row-wise, so each token's activations are
  those it has in a lone run;
- attention runs per segment as a lone forward runs it. On the CPU: a prompt (chunk) over the live
  window [0, end) of its row with a causal mask; the one-token segments all in one call of the
  native decode attention where a lone decode step runs it (a packed model on the native kernels:
  bitnet.model.native_decode_args), else each over its window without a mask. On a GPU: a whole prompt
  causal over its own slots (flash attention, as a lone prefill runs it), a later chunk over the
  whole static row with the keys after each query masked, the one-token segments in one
  call of the Triton decode attention (bitnet.kernels.decode_attention: each query's result is the
  same in any batch, as a lone decode step runs it), else of SDPA;
- a step of one-token segments only (pure decode) on a packed CPU model runs each layer as one
  native call (bitnet_cpu::decode_layer, the op a lone decode step runs);
- the lm_head runs on the last token of the segments that want logits, all at once where its
  kernel is exact per row (the native bf16 and int8 heads of packed models on the CPU), else row by
  row (a float GEMM blocks M = 1 and M = K differently: the last bits would differ from a lone run).

So each sequence's logits, hence its greedy tokens, are bit for bit those of `model.generate` on
its prompt alone (tests/test_scheduler.py: tiny fp32 and bf16 packed models on the CPU, and on a
GPU). A float (twin) model's projections are float GEMMs: there a batch may differ from a lone run
in the last bits. A prompt cut in chunks is not a lone prefill either, but equal to it in the
tests' chunk sizes, except that a chunk of one token takes the unmasked path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..bitlinear import BitLinear, Int4Linear, Int8Linear, StreamedLinear
from ..kernels import cpu as native
from ..model import KVCache, attention_dtype, native_decode_args, prenormed, projections
from ..ops import (capture_cuda_graph, decode_attention, native_inference, record_cuda_graph, rope, rope_cache,
                   rope_decode_attention, triton_applies)

log = logging.getLogger("bitnet.serve")


@dataclass(frozen=True)
class Segment:
    """tokens[i] goes into cache column start + i of row `slot` (RoPE position start + i);
    `logits`: return the logits after its last token."""

    slot: int
    tokens: Sequence[int]
    start: int
    logits: bool = True


class ModelRunner:
    """decode_graphs: run each pure decode step (one token per segment, every segment wanting logits,
    not the native CPU layers) padded to a bucket of sequences (powers of two, up to max_batch), the
    padding in a scratch cache row of its own, with each bucket's step recorded as a CUDA graph once
    and replayed (default: on CUDA, where an eager step is the host issuing every kernel: a 2B-4T
    16-sequence step took 113 ms on an H200 of which 10 ms on the GPU). Elsewhere, True runs the
    padded steps eagerly (what the tests check on a CPU: padding changes no sequence's logits)."""

    def __init__(self, model, max_batch: int, max_seq_len: int, decode_graphs: bool | None = None):
        context = model.config.max_position_embeddings
        if max_seq_len > context:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of {context} tokens "
                             "(max_position_embeddings)")
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        ref = model.model.embed_tokens.weight
        self.device = ref.device
        self.decode_graphs = self.device.type == "cuda" if decode_graphs is None else decode_graphs
        self.scratch = max_batch  # the padding's cache row (decode_graphs only)
        model.setup_cache(max_batch + int(self.decode_graphs), max_seq_len, dtype=attention_dtype(ref), device=ref.device)
        self.caches: list[KVCache] = [layer.self_attn.kv_cache for layer in model.model.layers]
        self._buckets: dict[int, _BucketStep] = {}
        self._pool = None  # the CUDA graphs' shared memory pool
        self._last_decode = None  # (bucket step, positions) of the last step, where it was a padded decode step

    def cache_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.caches)

    def close(self) -> None:
        self._buckets.clear()  # the graphs point into the cache
        self.model.clear_cache()

    # ----------------------------------------------------------------------------- the two kinds
    def prefill(self, slot: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Prompt tokens ids at columns start.. of row `slot`; logits (vocab,) after the last one."""
        return self.step([Segment(slot, list(ids), start)])[0]

    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One token per sequence, tokens[r] at column positions[r] of row slots[r]; logits (B, vocab)."""
        if not len(slots) == len(tokens) == len(positions):
            raise ValueError(f"decode needs as many slots, tokens and positions: {len(slots)}, {len(tokens)}, "
                             f"{len(positions)}")
        return self.step([Segment(s, [t], p) for s, t, p in zip(slots, tokens, positions)])

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, segments: Sequence[Segment]) -> torch.Tensor:
        """One forward over every segment's tokens; logits (number of segments with logits, vocab),
        in segment order."""
        segs = list(segments)
        self._last_decode = None
        if not segs or any(not s.tokens for s in segs):
            raise ValueError("a step needs at least one segment, each with at least one token")
        if len({s.slot for s in segs}) != len(segs) or not all(0 <= s.slot < self.max_batch for s in segs):
            raise ValueError(f"a step's segments need distinct slots in [0, {self.max_batch}): {[s.slot for s in segs]}")
        if any(s.start < 0 or s.start + len(s.tokens) > self.max_seq_len for s in segs):
            raise ValueError(f"tokens beyond a cache row of {self.max_seq_len}: "
                             f"{[(s.start, s.start + len(s.tokens)) for s in segs]}")
        m, dev = self.model.model, self.device
        pure_decode = all(len(s.tokens) == 1 for s in segs)  # one token a segment
        wants_all = all(s.logits for s in segs)
        if pure_decode and wants_all and dev.type != "cpu":  # off the CPU no native layer: from tensors alone
            return self._decode(segs)
        ids = torch.tensor([t for s in segs for t in s.tokens], dtype=torch.long, device=dev)[None]  # (1, N)
        pos = torch.tensor([s.start + i for s in segs for i in range(len(s.tokens))], device=dev)  # (N,)
        rows = torch.tensor([s.slot for s in segs for _ in s.tokens], dtype=torch.long, device=dev)  # (N,)
        x = m.embed_tokens(ids)  # (1, N, C)
        memo: dict = {}
        args = [native_decode_args(layer, x, self.model.config.hidden_act, memo) for layer in m.layers]
        native_decode = bool(args) and all(a is not None for a in args)  # what a lone decode step runs
        if pure_decode and not native_decode and wants_all and self.decode_graphs:  # padded steps asked for on a CPU
            return self._decode(segs)  # (the CPU's own path reads each row's live window instead)
        cos, sin = m.rotary(pos[None], x.dtype)  # (1, 1, N, hd)
        if native_decode and pure_decode:  # each layer in one native call
            N = len(segs)
            h, cos2, sin2 = x.reshape(N, -1), cos.reshape(N, -1), sin.reshape(N, -1)
            for a in args:
                h = native.decode_layer(h, *a[:10], rows, pos, cos2, sin2, None, *a[10:])
            x = h[None]
        else:
            _, nkv, S, hd = self.caches[0].k.shape
            # where each token's key / value goes, as rows of the cache seen as (max_batch * nkv * S, hd)
            heads = torch.arange(nkv, device=dev)
            at = ((rows[:, None] * nkv + heads[None, :]) * S + pos[:, None]).flatten()  # (N * nkv,)
            for layer, cache in zip(m.layers, self.caches):
                x = self._attention(layer.self_attn, x, cos, sin, cache, at, rows, pos, segs, native_decode,
                                    layer.input_layernorm)  # x + attention
                x = prenormed(layer.mlp, layer.post_attention_layernorm, x, skip=True)
        ends, offset = [], 0
        for s in segs:
            offset += len(s.tokens)
            if s.logits:
                ends.append(offset - 1)
        if not ends:
            return torch.empty(0, self.model.config.vocab_size, device=dev)
        last = x[0, ends][:, None]  # (K, 1, C): the last token of each segment that wants logits
        return head_rows(self.model.lm_head, m.norm(last))  # (K, vocab)

    # ----------------------------------------------------------------------------- pure decode
    def _decode(self, segs: list[Segment]) -> torch.Tensor:
        """One token per segment, logits for all: decode_forward, padded to a bucket and replayed as
        a CUDA graph where decode_graphs says so."""
        tokens, pos, rows = [s.tokens[0] for s in segs], [s.start for s in segs], [s.slot for s in segs]
        if not self.decode_graphs:
            dev = self.device
            return self.decode_forward(torch.tensor(tokens, device=dev), torch.tensor(pos, device=dev),
                                       torch.tensor(rows, device=dev))
        n = len(segs)
        bucket = self.bucket(n)
        step = self._buckets.get(bucket)
        if step is None:
            if self.device.type == "cuda" and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                step = self._buckets[bucket] = record_cuda_graph(lambda: _BucketStep(self, bucket, self._pool),
                                                                 f"the decode step of {bucket} sequences", self.device)
            except Exception:  # a step that cannot be recorded still runs: eagerly, from now on
                log.warning("recording the decode step of %d sequences as a CUDA graph failed; decoding eagerly",
                            bucket, exc_info=True)
                self.decode_graphs = False
                self._buckets.clear()
                return self._decode(segs)
        pad = bucket - n  # the padding: token 0 at slot 0 of the scratch row
        inputs = torch.tensor([tokens + [0] * pad, pos + [0] * pad, rows + [self.scratch] * pad], dtype=torch.long)
        step.inputs.copy_(inputs, non_blocking=False)
        logits = step()[:n].clone()  # the graph's output is overwritten by its next replay
        self._last_decode = (step, pos)
        return logits

    def bucket(self, n: int) -> int:
        """The padded size of a pure decode step of n sequences (decode_graphs): a power of two, at most max_batch."""
        return min(1 << (n - 1).bit_length(), self.max_batch)

    @torch.no_grad()
    def decode_next(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The pure decode step after the last step, where that was a padded one (decode_graphs):
        the same sequences in the same slots, each one column further, fed `tokens` (n,), a tensor
        on the device: the tokens chosen from the last step's logits before the host has read them, so that this
        step is queued while the host reads and handles them (bitnet.serve.engine's run_ahead).
        Logits (n, vocab), as step() gives them; None where the last step was another kind."""
        last, self._last_decode = self._last_decode, None
        if last is None:
            return None
        step, pos = last
        pos = [p + 1 for p in pos]
        if tokens.shape != (len(pos),):
            raise ValueError(f"decode_next needs one token per sequence of the last step ({len(pos)}), got shape "
                             f"{tuple(tokens.shape)}")
        if max(pos) >= self.max_seq_len:
            raise ValueError(f"tokens beyond a cache row of {self.max_seq_len}: positions {pos}")
        n = len(pos)
        step.inputs[0, :n].copy_(tokens)  # on the device, after the last step's replay: no host sync
        step.inputs[1, :n].add_(1)
        logits = step()[:n].clone()
        self._last_decode = (step, pos)
        return logits

    def decode_forward(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A pure decode step from device tensors alone, tokens, pos, rows (B,) -> logits (B, vocab):
        no host sync and no tensor made from Python values inside, so that a CUDA graph can record it
        (its inputs then change in place). Token b goes into column pos[b] of cache row rows[b]."""
        m = self.model.model
        x = m.embed_tokens(tokens[None])  # (1, B, C)
        cos, sin = m.rotary(pos[None], x.dtype)  # (1, 1, B, hd)
        _, nkv, S, _ = self.caches[0].k.shape
        heads = torch.arange(nkv, device=x.device)
        at = ((rows[:, None] * nkv + heads[None, :]) * S + pos[:, None]).flatten()  # (B * nkv,)
        for layer, cache in zip(m.layers, self.caches):
            x = self._attention(layer.self_attn, x, cos, sin, cache, at, rows, pos, None, False, layer.input_layernorm)
            x = prenormed(layer.mlp, layer.post_attention_layernorm, x, skip=True)
        return head_rows(self.model.lm_head, m.norm(x[0][:, None]))  # (B, vocab)

    def _attention(self, attn, x, cos, sin, cache: KVCache, at: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                   segs: list[Segment] | None, native_decode: bool, norm=None) -> torch.Tensor:
        """x + bitnet.model.Attention.forward over the segments side by side, x (1, N, C) (the skip
        connection added as the layer adds it); the one-token segments through the native or
        Triton decode attention where a lone decode step runs it. segs None: a pure decode step,
        token n a one-token segment at column pos[n] of row rows[n] (decode_forward: tensors only)."""
        N = x.shape[1]
        nh, nkv, hd = attn.n_head, attn.n_kv, attn.head_dim
        q, k, v = projections(x, attn.q_proj, attn.k_proj, attn.v_proj, norm=norm)
        q, k, v = q.view(1, N, nh, hd), k.view(1, N, nkv, hd), v.view(1, N, nkv, hd)
        fused = None
        packed = type(attn.q_proj) is BitLinear and attn.q_proj.frozen
        if segs is None and packed:  # a pure decode step: RoPE, cache writes and attention in one Triton launch
            y_b = rope_decode_attention(q.view(N, 1, nh, hd), k.view(N, 1, nkv, hd), v.view(N, 1, nkv, hd),
                                        cos.reshape(N, 1, 1, hd), sin.reshape(N, 1, 1, hd), cache, pos,
                                        kernel=attn.q_proj.kernel, rows=rows)
            if y_b is not None:  # (N, nh * hd)
                return projections(y_b.to(x.dtype)[None], attn.o_proj, norm=attn.attn_sub_norm, residual=x)[0]
        if packed:  # RoPE + cache writes in one Triton launch
            fused = rope_cache(q, k, v, cos, sin, cache, pos, attn.q_proj.kernel, cache_rows=rows)
        if fused is not None:
            q = fused[0]  # (1, nh, N, hd)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, heads, N, hd)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            # token n's key / value (all heads) into column pos[n] of row rows[n]
            cache.k.view(-1, hd).index_copy_(0, at, k[0].transpose(0, 1).reshape(N * nkv, hd).to(cache.k.dtype))
            cache.v.view(-1, hd).index_copy_(0, at, v[0].transpose(0, 1).reshape(N * nkv, hd).to(cache.v.dtype))
        dtype = attention_dtype(q)
        q = q.to(dtype)
        gqa = nh != nkv
        cpu = x.device.type == "cpu"
        kernel = getattr(attn.q_proj, "kernel", None)
        triton = triton_applies(q, kernel)  # the one-token segments through the Triton decode attention
        if segs is None:  # every token a one-token segment (decode_forward): from tensors alone
            y_b = self._singles_attention(q[0].transpose(0, 1), cache, pos, rows, kernel, gqa, dtype)
            return projections(y_b.to(x.dtype)[None], attn.o_proj, norm=attn.attn_sub_norm, residual=x)[0]
        ys: list[torch.Tensor | None] = []
        singles = []  # the one-token segments, attended in one call (native or Triton decode attention; SDPA on a GPU)
        offset = 0
        for i, s in enumerate(segs):
            T, end = len(s.tokens), s.start + len(s.tokens)
            q_s = q[:, :, offset:offset + T]  # (1, nh, T, hd)
            offset += T
            if T == 1 and (native_decode or not cpu or triton):
                singles.append(i)
                ys.append(None)
                continue
            S = end if cpu else cache.k.shape[2]  # the CPU reads the live window, a GPU the static row
            k_s = cache.k[s.slot:s.slot + 1, :, :S].to(dtype)  # (1, nkv, S, hd)
            v_s = cache.v[s.slot:s.slot + 1, :, :S].to(dtype)
            if not cpu and T > 1 and s.start == 0:  # a whole prompt on a GPU: causal over its slots, as generate runs it
                ys.append(F.scaled_dot_product_attention(q_s, k_s[:, :, :T], v_s[:, :, :T], is_causal=True, enable_gqa=gqa))
                continue
            mask = None
            if T > 1 or not cpu:  # a lone CPU step of one token sees its whole window: no mask
                columns = torch.arange(S, device=x.device)
                mask = (torch.arange(s.start, end, device=x.device)[:, None] >= columns[None, :])[None, None]  # (1, 1, T, S)
            ys.append(F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, enable_gqa=gqa))  # (1, nh, T, hd)
        if singles and native_decode:
            offsets = torch.tensor([sum(len(s.tokens) for s in segs[:i]) for i in singles], device=x.device)
            q_b = q[0].index_select(1, offsets).transpose(0, 1)  # (B, nh, hd)
            y_b = native.decode_attention(q_b.contiguous(), cache.k, cache.v,
                                          torch.tensor([segs[i].slot for i in singles], device=x.device),
                                          torch.tensor([segs[i].start for i in singles], device=x.device))
            for j, i in enumerate(singles):
                ys[i] = y_b[j][None, :, None]  # (1, nh, 1, hd)
        elif singles:
            offsets = torch.tensor([sum(len(s.tokens) for s in segs[:i]) for i in singles], device=x.device)
            q_b = q[0].index_select(1, offsets).transpose(0, 1)  # (B, nh, hd)
            y_b = self._singles_attention(q_b, cache, torch.tensor([segs[i].start for i in singles], device=x.device),
                                          torch.tensor([segs[i].slot for i in singles], device=x.device), kernel, gqa, dtype)
            if len(singles) == N:  # a pure decode step: the heads already side by side
                return projections(y_b.to(x.dtype)[None], attn.o_proj, norm=attn.attn_sub_norm, residual=x)[0]
            for j, i in enumerate(singles):
                ys[i] = y_b[j].view(nh, 1, hd)[None]  # (1, nh, 1, hd)
        y = torch.cat(ys, dim=2).to(x.dtype).transpose(1, 2).reshape(1, N, nh * hd)  # (1, N, nh*hd)
        return projections(y, attn.o_proj, norm=attn.attn_sub_norm, residual=x)[0]


    @staticmethod
    def _singles_attention(q_b, cache: KVCache, starts: torch.Tensor, slots: torch.Tensor, kernel, gqa: bool,
                           dtype: torch.dtype) -> torch.Tensor:
        """One-token queries q_b (B, nh, hd), query b at column starts[b] of cache row slots[b], over
        columns 0 .. starts[b] of its row -> (B, nh * hd): the Triton decode attention in one launch
        where it applies, else SDPA over the static rows with the later columns masked (a GPU without
        the kernel, as a lone GPU step masks them)."""
        y_b = decode_attention(q_b, cache.k, cache.v, starts, rows=slots, kernel=kernel)
        if y_b is not None:
            return y_b
        B, nh, hd = q_b.shape
        k_b, v_b = cache.k.index_select(0, slots), cache.v.index_select(0, slots)  # (B, nkv, S, hd)
        mask = torch.arange(cache.k.shape[2], device=q_b.device)[None, :] <= starts[:, None]  # (B, S)
        y_b = F.scaled_dot_product_attention(q_b[:, :, None], k_b.to(dtype), v_b.to(dtype),
                                             attn_mask=mask[:, None, None, :], enable_gqa=gqa)  # (B, nh, 1, hd)
        return y_b.reshape(B, nh * hd)


class _BucketStep:
    """A pure decode step of `bucket` sequences from fixed input tensors (tokens, positions, rows in
    `inputs`, (3, bucket)), recorded as a CUDA graph on CUDA (after an eager warm-up on a side
    stream, where the Triton kernels tune for this M), run eagerly elsewhere. The warm-up and the
    recording put every row in the scratch cache row: no sequence's cache is written."""

    def __init__(self, runner: ModelRunner, bucket: int, pool):
        self.runner = runner
        self.inputs = torch.zeros(3, bucket, dtype=torch.long, device=runner.device)
        self.inputs[2].fill_(runner.scratch)
        self.graph = None
        if runner.device.type == "cuda":
            with torch.no_grad():
                self.graph, self.logits = capture_cuda_graph(self._run, pool=pool)

    def _run(self) -> torch.Tensor:
        return self.runner.decode_forward(self.inputs[0], self.inputs[1], self.inputs[2])

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


def head_rows(head, h: torch.Tensor) -> torch.Tensor:
    """lm_head over h (B, 1, C) -> (B, vocab), each row as the head computes it for that row alone
    (a lone decode step runs it on one row): the native bf16 / int8 kernels are exact per row, so
    they take all rows in one pass over the weight; any other head runs row by row."""
    if native_inference(h):
        bias = [head.bias] if getattr(head, "bias", None) is not None else []
        if isinstance(head, Int8Linear):
            return native.int8_linear(h, head.weight, head.weight_scale, head.bias)[:, -1]
        if isinstance(head, Int4Linear):
            return native.int4_linear(h, head.codes, head.scales, head.out_features, head.bias)[:, -1]
        if isinstance(head, StreamedLinear) and head.weight.dtype == torch.bfloat16 and native_inference(head.weight, *bias):
            return native.bf16_linear(h, head.weight, head.bias)[:, -1]
    return torch.cat([head(h[r:r + 1])[:, -1] for r in range(h.shape[0])])
