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
  row (a float GEMM blocks M = 1 and M = K differently: the last bits would differ from a lone run);
  a scored prompt's other rows (Segment.every: its tokens' logprobs) in one call of the head.

So each sequence's logits, hence its greedy tokens, are bit for bit those of `model.generate` on
its prompt alone (tests/test_scheduler.py: tiny fp32 and bf16 packed models on the CPU, and on a
GPU). A float (twin) model's projections are float GEMMs: there a batch may differ from a lone run
in the last bits. A prompt cut in chunks, or started after a prefix copied from another row
(copy_prefix: prefix caching), is a lone prefill bit for bit on the CPU where every chunk starts
at a multiple of bitnet.model.PROMPT_BLOCK (the prompt attention runs in blocks aligned to it, in
a lone prefill too: bitnet.model.prompt_attention; the scheduler cuts there), a chunk of one token
included (Segment.prompt). On a GPU a chunk's numbers are the whole prompt's within float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from ..bitlinear import BitLinear, Int4Linear, Int8Linear, StreamedLinear
from .. import model as modeling
from ..kernels import cpu as native
from ..model import (KVCache, attention_dtype, cache_dtype, native_decode_args, prenormed, projections,
                     prompt_attention)
from ..ops import (capture_cuda_graph, decode_attention, native_inference, record_cuda_graph, rope, rope_cache,
                   rope_decode_attention, triton_applies)

log = logging.getLogger("bitnet.serve")


@dataclass(frozen=True)
class Segment:
    """tokens[i] goes into cache column start + i of row `slot` (RoPE position start + i);
    `logits`: return the logits after its last token; `every`: after each of its tokens (a prompt
    scored: its tokens' logprobs); `prompt`: tokens of a prompt (on the CPU a one-token chunk of
    one after its first position attends as a prefill does, not as a decode step)."""

    slot: int
    tokens: Sequence[int]
    start: int
    logits: bool = True
    every: bool = False
    prompt: bool = False

    @property
    def rows(self) -> int:
        """Rows of logits the segment gets."""
        return len(self.tokens) if self.every else int(self.logits)


class ModelRunner:
    """decode_graphs: run each pure decode step (one token per segment, every segment wanting logits,
    not the native CPU layers) padded to a bucket of sequences (powers of two, up to max_batch), the
    padding in a scratch cache row of its own, with each bucket's step recorded as a CUDA graph once
    and replayed (default: on CUDA, where an eager step is the host issuing every kernel: a 2B-4T
    16-sequence step took 113 ms on an H200 of which 10 ms on the GPU). Elsewhere, True runs the
    padded steps eagerly (what the tests check on a CPU: padding changes no sequence's logits).

    prompt_graphs: run every other step (one with prompt tokens in it) padded to a bucket of tokens,
    all but its prompts' attention recorded as CUDA graphs, one piece between two layers' attention,
    the prompts' attention run eagerly as the eager step runs it (_piecewise; default: on CUDA with
    decode_graphs). Elsewhere True runs the padded pieces eagerly (the CPU's native kernels aside:
    their own path stays)."""

    def __init__(self, model, max_batch: int, max_seq_len: int, decode_graphs: bool | None = None,
                 prompt_graphs: bool | None = None):
        context = model.config.max_position_embeddings
        if max_seq_len > context:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of {context} tokens "
                             "(max_position_embeddings)")
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        ref = model.model.embed_tokens.weight
        self.device = ref.device
        self.decode_graphs = self.device.type == "cuda" if decode_graphs is None else decode_graphs
        self.prompt_graphs = self.decode_graphs and self.device.type == "cuda" if prompt_graphs is None \
            else prompt_graphs
        self.scratch = max_batch  # the padding's cache row (decode_graphs, prompt_graphs)
        padded = self.decode_graphs or self.prompt_graphs
        model.setup_cache(max_batch + int(padded), max_seq_len, dtype=cache_dtype(model, ref.device), device=ref.device)
        self.caches: list[KVCache] = [layer.self_attn.kv_cache for layer in model.model.layers]
        self._buckets: dict[int, _BucketStep] = {}
        self._pieces: dict[int, _PromptPieces] = {}  # prompt_graphs: the recorded pieces of each bucket of tokens
        self._pool = None  # the CUDA graphs' shared memory pool
        self._last_decode = None  # (bucket step, positions) of the last step, where it was a padded decode step
        self._layer_args: dict = {}  # native_decode_args of every layer, read at the first step (_native_args)

    def cache_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.caches)

    def close(self) -> None:
        self._layer_args.clear()
        self._buckets.clear()  # the graphs point into the cache
        self._pieces.clear()
        self.model.clear_cache()

    # ----------------------------------------------------------------------------- the two kinds
    def prefill(self, slot: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Prompt tokens ids at columns start.. of row `slot`; logits (vocab,) after the last one."""
        return self.step([Segment(slot, list(ids), start, prompt=True)])[0]

    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One token per sequence, tokens[r] at column positions[r] of row slots[r]; logits (B, vocab)."""
        if not len(slots) == len(tokens) == len(positions):
            raise ValueError(f"decode needs as many slots, tokens and positions: {len(slots)}, {len(tokens)}, "
                             f"{len(positions)}")
        return self.step([Segment(s, [t], p) for s, t, p in zip(slots, tokens, positions)])

    @torch.no_grad()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Columns 0 .. n of cache row `src` into row `dst`, every layer's keys and values (prefix
        caching: a prompt that starts with tokens another row holds; on a GPU queued on the stream,
        before the step that reads them)."""
        if not (0 <= src < self.max_batch and 0 <= dst < self.max_batch and 0 <= n <= self.max_seq_len):
            raise ValueError(f"copy_prefix needs rows in [0, {self.max_batch}) and at most {self.max_seq_len} "
                             f"columns, got {src} -> {dst}, {n}")
        if src == dst or n == 0:
            return
        for c in self.caches:
            c.k[dst, :, :n].copy_(c.k[src, :, :n])
            c.v[dst, :, :n].copy_(c.v[src, :, :n])

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, segments: Sequence[Segment]) -> torch.Tensor:
        """One forward over every segment's tokens; logits (sum of the segments' rows, vocab): after
        the last token of each segment with `logits`, after each token of those with `every`, in
        segment order."""
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
        pure_decode = all(len(s.tokens) == 1 and not _prompt_single(s, dev) for s in segs)  # one token a segment
        wants_all = all(s.logits or s.every for s in segs)
        if pure_decode and wants_all and dev.type != "cpu":  # off the CPU no native layer: from tensors alone
            return self._decode(segs)
        if self.prompt_graphs and dev.type != "cpu":
            return self._piecewise(segs)
        plan = _Plan(segs, dev)
        ids, pos, rows = plan.ids[None], plan.pos, plan.rows  # (1, N), (N,), (N,)
        x = m.embed_tokens(ids)  # (1, N, C)
        args = self._native_args(x)
        native_decode = bool(args) and all(a is not None for a in args)  # what a lone decode step runs
        if pure_decode and not native_decode and wants_all and self.decode_graphs:  # padded steps asked for on a CPU
            return self._decode(segs)  # (the CPU's own path reads each row's live window instead)
        if self.prompt_graphs and not native_decode:  # asked for on a CPU: the pieces run eagerly, padded
            return self._piecewise(segs, plan)
        cos, sin = m.rotary(pos[None], x.dtype)  # (1, 1, N, hd)
        if native_decode and pure_decode:  # each layer in one native call
            N = len(segs)
            h, cos2, sin2 = x.reshape(N, -1), cos.reshape(N, -1), sin.reshape(N, -1)
            for a in args:
                h = native.decode_layer(h, *a[:10], rows, pos, cos2, sin2, None, *a[10:])
            x = h[None]
        else:
            at = self._cache_rows(rows, pos)
            for layer, cache in zip(m.layers, self.caches):
                x = self._attention(layer.self_attn, x, cos, sin, cache, at, rows, pos, plan, native_decode,
                                    layer.input_layernorm)  # x + attention
                x = prenormed(layer.mlp, layer.post_attention_layernorm, x, skip=True)
        return self._head(x, segs)

    def _native_args(self, x: torch.Tensor) -> list:
        """Each layer's bitnet_cpu::decode_layer arguments (None where it does not qualify), read at
        the first step of x's kind and kept for the runner's life, as generate keeps them for a call
        (BitNetForCausalLM.keep_decode_args): a server's model does not change while it serves, and
        reading them costs ~12 us a layer a step (700m, 24 layers: ~0.3 ms of a step)."""
        key = (x.dtype, x.device, x.requires_grad, torch.is_grad_enabled())
        args = self._layer_args.get(key)
        if args is None:
            memo: dict = {}
            args = self._layer_args[key] = [native_decode_args(layer, x, self.model.config.hidden_act, memo)
                                            for layer in self.model.model.layers]
        return args

    def _head(self, x: torch.Tensor, segs: list[Segment]) -> torch.Tensor:
        """The logits after the last token of each segment that wants them (after every token of
        those with `every`), x (1, N, C) the last layer's output over the segments' tokens side by
        side -> (K, vocab)."""
        ends, scored, offset = [], [], 0
        for s in segs:
            offset += len(s.tokens)
            if s.every:  # a prompt scored: its rows but the one a token is drawn from (the last, with `logits`)
                scored += range(len(ends), len(ends) + s.rows - int(s.logits))
            ends += range(offset - s.rows, offset)
        if not ends:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        h = self.model.model.norm(x[0, ends][:, None])  # (K, 1, C): the tokens whose logits are asked for
        if not scored:
            return head_rows(self.model.lm_head, h)  # (K, vocab)
        # the scored rows in one call of the head (a float head: torch's GEMM past a few rows, 3x the
        # native kernel's rate at 256 rows of 2B-4T's head on the EPYC), the rows drawn from as a lone run
        exact = sorted(set(range(len(ends))) - set(scored))
        out = torch.empty(len(ends), self.model.config.vocab_size, dtype=h.dtype, device=h.device)
        out[scored] = self.model.lm_head(h[scored])[:, -1].to(h.dtype)
        if exact:
            out[exact] = head_rows(self.model.lm_head, h[exact]).to(h.dtype)
        return out

    def _cache_rows(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Where each token's key / value goes, as rows of the cache seen as (max_batch * nkv * S, hd):
        token n, head h at column pos[n] of row rows[n] -> (N * nkv,)."""
        _, nkv, S, _ = self.caches[0].k.shape
        heads = torch.arange(nkv, device=rows.device)
        return ((rows[:, None] * nkv + heads[None, :]) * S + pos[:, None]).flatten()

    # ----------------------------------------------------------------------------- pure decode
    def _decode(self, segs: list[Segment]) -> torch.Tensor:
        """One token per segment, logits for all: decode_forward, padded to a bucket and replayed as
        a CUDA graph where decode_graphs says so."""
        tokens, pos, rows = [s.tokens[0] for s in segs], [s.start for s in segs], [s.slot for s in segs]
        if not self.decode_graphs:
            return self.decode_forward(*to_device(torch.tensor([tokens, pos, rows]), self.device))
        n = len(segs)
        bucket = self.bucket(n)
        step = self._decode_bucket(bucket)
        if step is None:
            return self._decode(segs)
        pad = bucket - n  # the padding: token 0 at slot 0 of the scratch row
        inputs = torch.tensor([tokens + [0] * pad, pos + [0] * pad, rows + [self.scratch] * pad], dtype=torch.long)
        to_device(inputs, self.device, out=step.inputs)
        logits = step()[:n].clone()  # the graph's output is overwritten by its next replay
        self._last_decode = (step, pos)
        return logits

    def record(self, max_tokens: int) -> int:
        """Record now what the first steps of each size would record as they come (each a one-off of
        up to a few seconds on a GPU: a server's first requests would wait for it): every decode
        bucket (decode_graphs) and every token bucket of a step of up to max_tokens tokens
        (prompt_graphs). The number of step sizes recorded."""
        done, n = 0, 1
        while self.decode_graphs and self._decode_bucket(self.bucket(n)) is not None:
            done += 1
            if self.bucket(n) >= self.max_batch:
                break
            n = self.bucket(n) + 1
        n = 1
        while self.prompt_graphs and n <= max_tokens and self._prompt_bucket(self.token_bucket(n)) is not None:
            done += 1
            n = self.token_bucket(n) + 1
        return done

    def _decode_bucket(self, bucket: int) -> "_BucketStep | None":
        return self._recorded(self._buckets, bucket, _BucketStep, f"the decode step of {bucket} sequences",
                              "decoding eagerly", "decode_graphs")

    def _prompt_bucket(self, bucket: int) -> "_PromptPieces | None":
        return self._recorded(self._pieces, bucket, _PromptPieces, f"the prompt step of {bucket} tokens",
                              "running prompt steps eagerly", "prompt_graphs")

    def _recorded(self, table: dict, size: int, make, what: str, then: str, option: str):
        """table[size], made by make(runner, size, pool) on first use (recording its CUDA graphs on
        CUDA, into the runner's one pool); None where that fails, the failure logged, the table
        emptied and `option` turned off: a step that cannot be recorded still runs, eagerly, from
        then on."""
        if size not in table:
            if self.device.type == "cuda" and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                table[size] = record_cuda_graph(lambda: make(self, size, self._pool), what, self.device)
            except Exception:
                log.warning("recording %s as CUDA graphs failed; %s from now on", what, then, exc_info=True)
                table.clear()
                setattr(self, option, False)
                return None
        return table[size]

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
        at = self._cache_rows(rows, pos)
        for layer, cache in zip(m.layers, self.caches):
            x = self._attention(layer.self_attn, x, cos, sin, cache, at, rows, pos, None, False, layer.input_layernorm)
            x = prenormed(layer.mlp, layer.post_attention_layernorm, x, skip=True)
        return head_rows(self.model.lm_head, m.norm(x[0][:, None]))  # (B, vocab)

    # ----------------------------------------------------------------------------- steps with a prompt
    def token_bucket(self, n: int) -> int:
        """The padded token count of a step with a prompt in it (prompt_graphs): 16, 32 or 64, then
        a multiple of 64 (of 256 past 1024), so that few recordings serve every step."""
        if n <= 64:
            return max(16, 1 << (n - 1).bit_length())
        unit = 64 if n <= 1024 else 256
        return -(-n // unit) * unit

    def _piecewise(self, segs: list[Segment], plan: "_Plan | None" = None) -> torch.Tensor:
        """A step with a prompt in it (prompt_graphs), padded to a bucket of tokens: everything but
        the prompts' attention recorded as CUDA graphs, one piece from each layer's attention to the
        next (the output projection, the MLP, the next layer's norm, q/k/v, RoPE and cache writes, the
        one-token segments' decode attention), and each layer's prompt attention run eagerly between
        two pieces exactly as the eager step runs it (flash attention over the prompt's own length):
        the same kernels on the same rows, so each sequence keeps its lone run's logits, with a
        replay and ~2 launches a layer from the host where the eager step makes ~12 (and ~50 torch
        ops). The padding's tokens sit in the scratch cache row."""
        plan = plan or _Plan(segs, self.device)
        nb = self.token_bucket(plan.n)
        pieces = self._prompt_bucket(nb)
        if pieces is None:
            return self.step(segs)
        pieces.load(plan)
        N = plan.n
        pieces.run(0)
        for i, (layer, cache) in enumerate(zip(self.model.model.layers, self.caches)):
            self._attend(layer.self_attn, pieces.q[:, :, :N], cache, plan, False, pieces.y.dtype, out=pieces.y[:, :N],
                         singles_done=pieces.in_graph_singles)
            pieces.run(i + 1)
        return self._head(pieces.x[:, :N], segs)

    def _attention(self, attn, x, cos, sin, cache: KVCache, at: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                   plan: "_Plan | None", native_decode: bool, norm=None) -> torch.Tensor:
        """x + bitnet.model.Attention.forward over the segments side by side, x (1, N, C) (the skip
        connection added as the layer adds it); the one-token segments through the native or
        Triton decode attention where a lone decode step runs it. plan None: a pure decode step,
        token n a one-token segment at column pos[n] of row rows[n] (decode_forward: tensors only)."""
        N = x.shape[1]
        nh, nkv, hd = attn.n_head, attn.n_kv, attn.head_dim
        q, k, v = projections(x, attn.q_proj, attn.k_proj, attn.v_proj, norm=norm)
        if plan is None and type(attn.q_proj) is BitLinear and attn.q_proj.frozen:
            # a pure decode step: RoPE, cache writes and attention in one Triton launch
            y_b = rope_decode_attention(q.view(N, 1, nh, hd), k.view(N, 1, nkv, hd), v.view(N, 1, nkv, hd),
                                        cos.reshape(N, 1, 1, hd), sin.reshape(N, 1, 1, hd), cache, pos,
                                        kernel=attn.q_proj.kernel, rows=rows)
            if y_b is not None:  # (N, nh * hd)
                return projections(y_b.to(x.dtype)[None], attn.o_proj, norm=attn.attn_sub_norm, residual=x)[0]
        q = self._rope_write(attn, q, k, v, cos, sin, cache, at, rows, pos)
        if plan is None:  # every token a one-token segment at column pos[n] of row rows[n]: from tensors alone
            y = self._singles_attention(q[0].transpose(0, 1), cache, pos, rows, getattr(attn.q_proj, "kernel", None),
                                        nh != nkv, q.dtype).to(x.dtype)[None]
        else:
            y = self._attend(attn, q, cache, plan, native_decode, x.dtype)
        return projections(y, attn.o_proj, norm=attn.attn_sub_norm, residual=x)[0]

    @staticmethod
    def _rope_write(attn, q, k, v, cos, sin, cache: KVCache, at: torch.Tensor, rows: torch.Tensor,
                    pos: torch.Tensor) -> torch.Tensor:
        """RoPE on the projections q, k, v (1, N, heads * hd), token n's key and value written into
        column pos[n] of cache row rows[n] -> q (1, nh, N, hd) in the attention's dtype."""
        N = q.shape[1]
        nh, nkv, hd = attn.n_head, attn.n_kv, attn.head_dim
        q, k, v = q.view(1, N, nh, hd), k.view(1, N, nkv, hd), v.view(1, N, nkv, hd)
        fused = None
        if type(attn.q_proj) is BitLinear and attn.q_proj.frozen:  # RoPE + cache writes in one Triton launch
            fused = rope_cache(q, k, v, cos, sin, cache, pos, attn.q_proj.kernel, cache_rows=rows)
        if fused is not None:
            q = fused[0]  # (1, nh, N, hd)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, heads, N, hd)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            cache.k.view(-1, hd).index_copy_(0, at, k[0].transpose(0, 1).reshape(N * nkv, hd).to(cache.k.dtype))
            cache.v.view(-1, hd).index_copy_(0, at, v[0].transpose(0, 1).reshape(N * nkv, hd).to(cache.v.dtype))
        return q.to(attention_dtype(q))

    def _attend(self, attn, q: torch.Tensor, cache: KVCache, plan: "_Plan | None", native_decode: bool,
                dtype: torch.dtype, out: torch.Tensor | None = None, singles_done: bool = False) -> torch.Tensor:
        """Attention of q (1, nh, N, hd) (RoPE applied, the step's keys and values in the cache) ->
        y (1, N, nh * hd) in `dtype`, written into `out` where given, each segment as a lone forward
        runs it. On the CPU: a prompt (chunk) over the live window [0, end) of its row with a causal
        mask; the one-token segments all in one call of the native decode attention (native_decode)
        or the Triton one, else each over its window without a mask. On a GPU: a whole prompt causal
        over its own slots (flash attention, as a lone prefill runs it), a later chunk over the whole
        static row with the keys after each query masked, the one-token segments in one call of the
        Triton decode attention, else of SDPA over the static rows. singles_done: those are in `out`
        already (a recorded piece ran them)."""
        N = q.shape[2]
        nh, hd = attn.n_head, attn.head_dim
        gqa = nh != attn.n_kv
        cpu = q.device.type == "cpu"
        kernel = getattr(attn.q_proj, "kernel", None)
        y = out if out is not None else torch.empty(1, N, nh * hd, dtype=dtype, device=q.device)
        triton = triton_applies(q, kernel)  # the one-token segments through the Triton decode attention
        singles = []  # the one-token segments, attended in one call (native or Triton decode attention; SDPA on a GPU)
        for i, s in enumerate(plan.segs):
            T, off, end = len(s.tokens), plan.offsets[i], s.start + len(s.tokens)
            single = _prompt_single(s, q.device)  # a prompt's one-token chunk: as a prefill runs it
            if T == 1 and not single and (native_decode or not cpu or triton):
                singles.append(i)
                continue
            q_s = q[:, :, off:off + T]  # (1, nh, T, hd)
            S = end if cpu else cache.k.shape[2]  # the CPU reads the live window, a GPU the static row
            if (T > 1 or single) and modeling.blocked_prompts(q.device):  # as a lone prefill runs it: aligned blocks
                y_s = prompt_attention(q_s, cache.k[s.slot:s.slot + 1], cache.v[s.slot:s.slot + 1], plan.mask(i, S),
                                       s.start, gqa)
                y[0, off:off + T].view(T, nh, hd).copy_(y_s[0].transpose(0, 1))
                continue
            k_s = cache.k[s.slot:s.slot + 1, :, :S].to(q.dtype)  # (1, nkv, S, hd)
            v_s = cache.v[s.slot:s.slot + 1, :, :S].to(q.dtype)
            if not cpu and T > 1 and s.start == 0:  # a whole prompt on a GPU: causal over its slots, as generate runs it
                y_s = F.scaled_dot_product_attention(q_s, k_s[:, :, :T], v_s[:, :, :T], is_causal=True, enable_gqa=gqa)
            else:  # a lone CPU step of one token sees its whole window: no mask
                mask = plan.mask(i, S) if T > 1 or not cpu else None
                y_s = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, enable_gqa=gqa)  # (1, nh, T, hd)
            y[0, off:off + T].view(T, nh, hd).copy_(y_s[0].transpose(0, 1))
        if singles and not singles_done:
            offsets, starts, slots = plan.singles(singles)
            q_b = q[0].index_select(1, offsets).transpose(0, 1)  # (B, nh, hd)
            if native_decode:
                y_b = native.decode_attention(q_b.contiguous(), cache.k, cache.v, slots, starts).reshape(len(singles), -1)
            else:
                y_b = self._singles_attention(q_b, cache, starts, slots, kernel, gqa, q.dtype)  # (B, nh * hd)
            if len(singles) == N and out is None:  # every token a one-token segment, in order
                return y_b.to(dtype)[None]
            y[0].index_copy_(0, offsets, y_b.to(dtype))
        return y

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


def _prompt_single(s: Segment, device: torch.device) -> bool:
    """A one-token chunk of a prompt after its first position, on the CPU: the whole prompt's
    prefill attends to that position in an aligned block (bitnet.model.prompt_attention), so the
    chunk does too, not through the decode path a one-token step takes (a prompt of one token is
    a lone decode step's, as generate runs it)."""
    return s.prompt and s.start > 0 and len(s.tokens) == 1 and modeling.blocked_prompts(device)


class _Plan:
    """A step's segments as its layers need them, made once a step rather than once a layer (a
    tensor made from Python values on a GPU is a copy that waits for the stream): every token's
    id, position and cache row side by side (one copy), each segment's first token, and on demand
    the one-token segments' index tensors and a chunk's causal mask."""

    def __init__(self, segs: list[Segment], device: torch.device):
        self.segs, self.device = segs, device
        lengths = [len(s.tokens) for s in segs]
        self.offsets = [0, *accumulate(lengths)][:-1]  # each segment's first token
        self.n = sum(lengths)
        self.host = torch.tensor([[t for s in segs for t in s.tokens],
                                  [s.start + i for s in segs for i in range(len(s.tokens))],
                                  [s.slot for s in segs for _ in s.tokens]], dtype=torch.long)  # (3, N)
        self._table = None
        self._singles: dict[tuple, tuple] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    @property
    def table(self) -> torch.Tensor:
        """(3, N) on the device: ids, positions, cache rows."""
        if self._table is None:
            self._table = to_device(self.host, self.device)
        return self._table

    ids = property(lambda self: self.table[0])
    pos = property(lambda self: self.table[1])
    rows = property(lambda self: self.table[2])

    def singles(self, which: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token offsets, starts, slots), each (B,) on the device, of segments `which` (one token each)."""
        key = tuple(which)
        if key not in self._singles:
            host = torch.tensor([[self.offsets[i] for i in which], [self.segs[i].start for i in which],
                                 [self.segs[i].slot for i in which]], dtype=torch.long)
            self._singles[key] = tuple(to_device(host, self.device))
        return self._singles[key]

    def mask(self, i: int, S: int) -> torch.Tensor:
        """(1, 1, T, S): segment i's query t (column start + t) sees columns 0 .. start + t."""
        if (i, S) not in self._masks:
            s = self.segs[i]
            columns = torch.arange(S, device=self.device)
            queries = torch.arange(s.start, s.start + len(s.tokens), device=self.device)
            self._masks[i, S] = (queries[:, None] >= columns[None, :])[None, None]
        return self._masks[i, S]


def to_device(host: torch.Tensor, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A CPU tensor on `device` (copied into `out` where given); to a GPU from pinned memory, without
    waiting for the stream (a pageable copy would wait for it to drain)."""
    if device.type == "cuda":
        host = host.pin_memory()
    if out is None:
        return host.to(device, non_blocking=True)
    return out.copy_(host, non_blocking=True)


class _PromptPieces:
    """A step of `bucket` tokens with prompts in it, cut at the attention (ModelRunner._piecewise):
    piece 0 the embedding, the RoPE tables, layer 0's norm, q/k/v, RoPE and cache writes; piece i
    (1 .. layers) layer i - 1's output projection (its sub-norm in front, the skip connection
    added) and MLP, then layer i's q/k/v and, where the Triton decode attention takes them
    (`in_graph_singles`), the one-token segments' attention (the rows padded to the
    bucket, each row's result the same in any batch); the last piece: the MLP only. The pieces meet
    in fixed tensors: `inputs` (7, bucket): ids, positions and cache rows of the tokens, then the
    one-token segments' token offsets, columns, cache rows and rows of `y` (the padding's rows
    attend in the scratch row and land past the bucket); `x` the residual stream, `q` the layer's
    queries (RoPE applied), `y` the attention's output (the prompts' rows written between two
    pieces). Each piece is recorded as a CUDA graph on CUDA (after an eager run on a side stream,
    where the Triton kernels tune for this M), run eagerly elsewhere. The recording puts every
    token in the scratch cache row: no sequence's cache is written."""

    def __init__(self, runner: ModelRunner, bucket: int, pool):
        self.runner, self.bucket = runner, bucket
        m = runner.model.model
        dev, attn = runner.device, m.layers[0].self_attn
        dtype = m.embed_tokens.weight.dtype
        nh, hd = attn.n_head, attn.head_dim
        self.inputs = torch.zeros(7, bucket, dtype=torch.long, device=dev)
        self.inputs[[2, 5]] = runner.scratch
        self.inputs[6] = torch.arange(bucket, 2 * bucket)
        self.x = torch.zeros(1, bucket, m.embed_tokens.weight.shape[1], dtype=dtype, device=dev)
        self.y = torch.zeros(1, 2 * bucket, nh * hd, dtype=dtype, device=dev)  # rows past the bucket: the padding's
        self.q = torch.zeros(1, nh, bucket, hd, dtype=attention_dtype(self.x), device=dev)
        # the one-token segments' attention in the pieces where the Triton decode attention takes them (its
        # SDPA fallback gathers each row's whole cache row: not for rows padded to the bucket)
        self.in_graph_singles = triton_applies(self.q, getattr(attn.q_proj, "kernel", None))
        self.rotary = None  # (cos, sin, at): piece 0's, read by the others
        self.graphs: list = []
        if dev.type == "cuda":
            with torch.no_grad():
                for i in range(len(m.layers) + 1):
                    graph, out = capture_cuda_graph(lambda: self._piece(i), pool=pool)
                    if i == 0:
                        self.rotary = out
                    self.graphs.append(graph)

    def load(self, plan: _Plan) -> None:
        """The step's tokens and one-token segments into `inputs`, each padded to the bucket (a
        token 0 at column 0 of the scratch row; a one-token row that attends there from q's row 0
        and lands in a row of y past the bucket)."""
        nb, scratch = self.bucket, self.runner.scratch
        pad = nb - plan.n
        singles = [i for i, s in enumerate(plan.segs) if len(s.tokens) == 1] if self.in_graph_singles else []
        ones = len(singles)
        host = torch.tensor([[plan.offsets[i] for i in singles] + [0] * (nb - ones),
                             [plan.segs[i].start for i in singles] + [0] * (nb - ones),
                             [plan.segs[i].slot for i in singles] + [scratch] * (nb - ones),
                             [plan.offsets[i] for i in singles] + list(range(nb + ones, 2 * nb))])
        tokens = plan.host
        if pad:
            tokens = torch.cat([tokens, torch.tensor([[0] * pad, [0] * pad, [scratch] * pad])], dim=1)
        to_device(torch.cat([tokens, host]), self.inputs.device, out=self.inputs)

    def _piece(self, i: int):
        runner = self.runner
        m = runner.model.model
        ids, pos, rows = self.inputs[:3]
        if i == 0:
            x = m.embed_tokens(ids[None])  # (1, bucket, C)
            cos, sin = m.rotary(pos[None], x.dtype)
            rotary = (cos, sin, runner._cache_rows(rows, pos))
        else:
            rotary = self.rotary
            layer = m.layers[i - 1]
            attn = layer.self_attn
            x = projections(self.y[:, :self.bucket], attn.o_proj, norm=attn.attn_sub_norm, residual=self.x)[0]
            x = prenormed(layer.mlp, layer.post_attention_layernorm, x, skip=True)
        if i < len(m.layers):
            layer = m.layers[i]
            attn = layer.self_attn
            q, k, v = projections(x, attn.q_proj, attn.k_proj, attn.v_proj, norm=layer.input_layernorm)
            q = runner._rope_write(attn, q, k, v, rotary[0], rotary[1], runner.caches[i], rotary[2], rows, pos)
            self.q.copy_(q)
            if self.in_graph_singles:  # the one-token segments' attention, padded: every row its own
                offsets, starts, slots, out = self.inputs[3:]
                y_b = runner._singles_attention(q[0].index_select(1, offsets).transpose(0, 1), runner.caches[i], starts,
                                                slots, getattr(attn.q_proj, "kernel", None), attn.n_head != attn.n_kv,
                                                q.dtype)
                self.y[0].index_copy_(0, out, y_b.to(self.y.dtype))
        self.x.copy_(x)
        return rotary if i == 0 else None

    def run(self, i: int) -> None:
        if not self.graphs:
            out = self._piece(i)
            if i == 0:
                self.rotary = out
        else:
            self.graphs[i].replay()


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
