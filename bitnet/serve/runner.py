"""The server's model runner: runs the batch the engine hands it on the model's static KV cache,
one cache row (a slot) per sequence, and nothing else (no queue, no sampling, no HTTP).

    runner = ModelRunner(model, max_batch=8, max_seq_len=1024)    # model.setup_cache(8, 1024)
    logits = runner.prefill(slot=3, ids=prompt, start=0)          # (vocab,) after the prompt
    logits = runner.decode(slots=[0, 3], tokens=[17, 4], positions=[40, 9])   # (2, vocab)

Every sequence keeps the layout a lone `generate` gives it: its token i in cache column i of its
slot's row, RoPE position i. Sequences join at any step, so the rows of one decode step sit at
different positions; `model.forward` takes one cache position for the whole batch (left padding
aligns sequences that start together), so the decode step is written here over the model's own
modules, with only the attention's cache read/write done per row:

- embedding, RMSNorms, the seven projections and the MLP run on all rows at once: the packed
  kernels are exact per row (int32 sums, per-row activation scales, the same float32 epilogue), and
  the native RMSNorm / RoPE are row-wise, so row r of the batch equals that row run alone;
- attention runs as a lone step runs it: on the CPU row by row over that row's keys [0, position]
  (eager CPU decode reads the live window, no mask); on a GPU in one call over the whole static
  cache with each row's keys after its query masked (a lone GPU step's shapes and mask, batched);
- the lm_head runs all rows at once where its kernel is exact per row (the native bf16 and int8
  heads of packed models on the CPU), else row by row (a float GEMM blocks M = 1 and M = B
  differently: the last bits would differ from a lone run).

So a sequence's logits, hence its greedy tokens, are bit for bit those of `model.generate` on its
prompt alone (tests/test_scheduler.py holds them equal on the tiny fp32 model and on a packed bf16
model through the native kernels). A float (twin) model's projections are float GEMMs: there the
batched rows may differ from a lone run in the last bits.

Prefill runs `model.forward` itself on the slot's row alone (the layers' caches swapped for views
of that row), with the arguments `generate`'s prefill passes; a prompt longer than the engine's
chunk comes in several calls, `start` > 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..bitlinear import Int8Linear, StreamedLinear
from ..kernels import cpu as native
from ..model import CacheWindow, KVCache, attention_dtype, projections
from ..ops import native_inference, rope


class ModelRunner:
    def __init__(self, model, max_batch: int, max_seq_len: int):
        context = model.config.max_position_embeddings
        if max_seq_len > context:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of {context} tokens "
                             "(max_position_embeddings)")
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        ref = model.model.embed_tokens.weight
        self.device = ref.device
        model.setup_cache(max_batch, max_seq_len, dtype=attention_dtype(ref), device=ref.device)
        self.caches: list[KVCache] = [layer.self_attn.kv_cache for layer in model.model.layers]
        self._slot_views = [self._views(s) for s in range(max_batch)]

    def cache_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.caches)

    def close(self) -> None:
        self.model.clear_cache()

    def _views(self, slot: int) -> list[KVCache]:
        """Per layer, a batch-1 KVCache whose k / v are views of row `slot` of the big cache (writes
        land in it), all sharing one CacheWindow as setup_cache's caches do."""
        window = CacheWindow()
        views = []
        for big in self.caches:
            view = KVCache(1, big.k.shape[1], 0, big.k.shape[3], big.k.dtype, big.k.device, window)
            view.k, view.v = big.k[slot:slot + 1], big.v[slot:slot + 1]
            views.append(view)
        return views

    # ----------------------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, slot: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Prompt tokens ids (their positions start..start+len-1) into row `slot`; logits (vocab,)
        of the last one."""
        end = start + len(ids)
        if not ids or end > self.max_seq_len:
            raise ValueError(f"prefill of tokens [{start}, {end}) does not fit a cache row of {self.max_seq_len}")
        layers = self.model.model.layers
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # (1, T)
        input_pos = torch.arange(start, end, device=self.device)  # (T,)
        # no padding in a slot: every key up to the query is real (the causal mask stops at the query;
        # the model reads a CPU cache up to the last slot written, a GPU one whole, static shapes)
        key_mask = torch.ones(1, self.max_seq_len, dtype=torch.bool, device=self.device)
        try:
            for layer, view in zip(layers, self._slot_views[slot]):
                layer.self_attn.kv_cache = view
            out = self.model(input_ids, attention_mask=key_mask, position_ids=input_pos[None], input_pos=input_pos,
                             logits_to_keep=1)
        finally:
            for layer, big in zip(layers, self.caches):
                layer.self_attn.kv_cache = big
        return out.logits[0, -1]

    # ----------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One token per sequence: tokens[r] at cache column positions[r] of row slots[r], attending
        to that row's columns [0, positions[r]]; logits (B, vocab)."""
        B = len(slots)
        if not (B == len(tokens) == len(positions)) or B == 0:
            raise ValueError(f"decode needs as many slots, tokens and positions, at least one: {B}, {len(tokens)}, "
                             f"{len(positions)}")
        if len(set(slots)) != B or max(positions) >= self.max_seq_len or min(positions) < 0:
            raise ValueError(f"decode: slots must differ and positions lie in [0, {self.max_seq_len}): {slots}, "
                             f"{positions}")
        m = self.model.model
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        pos = torch.tensor(list(positions), dtype=torch.long, device=self.device)  # (B,)
        rows = torch.tensor(list(slots), dtype=torch.long, device=self.device)  # (B,)
        x = m.embed_tokens(ids)  # (B, 1, C)
        cos, sin = m.rotary(pos[:, None], x.dtype)  # (B, 1, 1, hd)
        _, nkv, S, hd = self.caches[0].k.shape
        # where each row's new key / value goes, as rows of the cache seen as (max_batch * nkv * S, hd)
        heads = torch.arange(nkv, device=self.device)
        at = ((rows[:, None] * nkv + heads[None, :]) * S + pos[:, None]).flatten()  # (B * nkv,)
        for layer, cache in zip(m.layers, self.caches):
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache, at, slots, positions)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return head_rows(self.model.lm_head, m.norm(x))  # (B, vocab)

    @staticmethod
    def _attention(attn, x, cos, sin, cache: KVCache, at: torch.Tensor, slots: Sequence[int],
                   positions: Sequence[int]) -> torch.Tensor:
        """bitnet.model.Attention.forward for one token per row at per-row cache positions."""
        B = x.shape[0]
        nh, nkv, hd = attn.n_head, attn.n_kv, attn.head_dim
        q, k, v = projections(x, attn.q_proj, attn.k_proj, attn.v_proj)
        q = q.view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
        k = k.view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
        v = v.view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        dtype = attention_dtype(q)
        cache.k.view(-1, hd).index_copy_(0, at, k.reshape(B * nkv, hd).to(cache.k.dtype))  # row r -> column pos[r]
        cache.v.view(-1, hd).index_copy_(0, at, v.reshape(B * nkv, hd).to(cache.v.dtype))
        q = q.to(dtype)
        gqa = nh != nkv
        if x.device.type == "cpu":  # as a lone eager CPU step: no mask, the live window [0, p] of its row
            ys = []
            for r, (s, p) in enumerate(zip(slots, positions)):
                k_r = cache.k[s:s + 1, :, :p + 1].to(dtype)  # (1, nkv, p + 1, hd)
                v_r = cache.v[s:s + 1, :, :p + 1].to(dtype)
                ys.append(F.scaled_dot_product_attention(q[r:r + 1], k_r, v_r, enable_gqa=gqa))  # (1, nh, 1, hd)
            y = torch.cat(ys)  # (B, nh, 1, hd)
        else:  # as a lone GPU step (static shapes): the whole row, keys after the query masked; one call
            S = cache.k.shape[2]
            if list(slots) == list(range(B)):
                k_b, v_b = cache.k[:B], cache.v[:B]  # (B, nkv, S, hd) views
            else:
                rows = torch.tensor(list(slots), device=x.device)
                k_b, v_b = cache.k.index_select(0, rows), cache.v.index_select(0, rows)
            pos = torch.tensor(list(positions), device=x.device)
            mask = torch.arange(S, device=x.device)[None, :] <= pos[:, None]  # (B, S)
            y = F.scaled_dot_product_attention(q, k_b.to(dtype), v_b.to(dtype), attn_mask=mask[:, None, None, :],
                                               enable_gqa=gqa)  # (B, nh, 1, hd)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, 1, nh * hd)  # (B, 1, nh*hd)
        if attn.attn_sub_norm is not None:
            y = attn.attn_sub_norm(y)
        return attn.o_proj(y)


def head_rows(head, h: torch.Tensor) -> torch.Tensor:
    """lm_head over h (B, 1, C) -> (B, vocab), each row as the head computes it for that row alone
    (a lone decode step runs it on one row): the native bf16 / int8 kernels are exact per row, so
    they take all rows in one pass over the weight; any other head runs row by row."""
    if native_inference(h):
        bias = [head.bias] if getattr(head, "bias", None) is not None else []
        if isinstance(head, Int8Linear):
            return native.int8_linear(h, head.weight, head.weight_scale, head.bias)[:, -1]
        if isinstance(head, StreamedLinear) and head.weight.dtype == torch.bfloat16 and native_inference(head.weight, *bias):
            return native.bf16_linear(h, head.weight, head.bias)[:, -1]
    return torch.cat([head(h[r:r + 1])[:, -1] for r in range(h.shape[0])])
