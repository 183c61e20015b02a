"""The decode attention kernel (kernels/attention.py) against a float64 reference, and its wiring:
the model's decode steps and the server's batched decode call it, and it agrees with SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bitnet.model as bm
from bitnet import BitNetConfig, BitNetForCausalLM, freeze, kernels
from bitnet.kernels import attention
from bitnet.kernels.attention import CHUNK, reference_decode_attention

pytestmark = pytest.mark.usefixtures("gpu_gemm_tile")  # whole models: the GEMMs in a GPU's tile (conftest.py)


def bound(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel may be off the float64 reference: an ulp of the output dtype at |y| + 1
    (values of order one; the interpreter truncates float32 to bf16 / fp16 where a GPU rounds;
    P in TF32 on a GPU), 16 float32 ulps for float32 (IEEE dots, exp2)."""
    eps = torch.finfo(dtype).eps * (16 if dtype == torch.float32 else 1)
    return eps * (ref.abs() + 1)


def case(device, dtype, N, H, nkv, D, S, rows_n=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows_n = rows_n or N
    q = torch.randn(N, H, D, generator=g).to(dtype)
    k = torch.randn(rows_n, nkv, S, D, generator=g).to(dtype)
    v = torch.randn(rows_n, nkv, S, D, generator=g).to(dtype)
    pos = torch.randint(S // 2, S, (N,), generator=g)
    mask = torch.rand(N, S, generator=g) > 0.3
    return [t.to(device) for t in (q, k, v, pos, mask)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, H, nkv, D, S, rows_n", [
    (1, 20, 5, 128, 3 * CHUNK + 5, None),  # 2B-4T's heads, several splits
    (3, 8, 2, 64, 40, 5),                   # per-query cache rows
    (2, 6, 6, 32, 33, None),                # no grouping
    (2, 6, 2, 96, 50, None),                # three query heads per KV head, a head size not a power of two
    (1, 4, 2, 256, 40, None),               # the largest head size sent to the kernel (ops.decode_attention)
])
def test_decode_attention_matches_float64(dtype, N, H, nkv, D, S, rows_n, triton_device):
    q, k, v, pos, mask = case(triton_device, dtype, N, H, nkv, D, S, rows_n)
    rows = torch.randperm(rows_n)[:N].to(triton_device) if rows_n else None
    for key_mask in (None, mask, mask.to(torch.int64)):  # none, bool, an integer attention_mask
        for splits in (None, 1, 3):
            y = attention.decode_attention(q, k, v, pos, rows, key_mask, splits=splits)
            assert y.shape == (N, H * D) and y.dtype == dtype
            ref = reference_decode_attention(*(t.cpu() for t in (q, k, v, pos)), None if rows is None else rows.cpu(),
                                             None if key_mask is None else key_mask.cpu())
            err = (y.cpu().double() - ref).abs()
            assert (err <= bound(ref, dtype)).all(), f"mask {key_mask is not None}, splits {splits}: {err.max():.3g}"
    # the mask is seen: without it the answer is another (more than the bound away)
    unmasked = reference_decode_attention(*(t.cpu() for t in (q, k, v, pos)), None if rows is None else rows.cpu())
    y = kernels.decode_attention(q, k, v, pos, rows, mask).cpu().double()
    assert ((y - unmasked).abs() > bound(unmasked, dtype)).any()


def test_a_gpu_with_less_shared_memory_stages_fewer_tiles(monkeypatch, triton_device):
    """The launcher stages as many K / V tiles as the device lets a program have shared memory for
    (common.shared_limit: at head size 128 three bf16 stages ask 104 KB, over the 99 KB of an A10,
    L4, L40S or RTX 30xx-50xx); the result is the same bits with any number of stages (staging moves
    when a tile loads, not what is computed: on a GPU the stages really differ). The compile guard
    holds the compiled sizes to attention.shared_bytes (tests/test_compile_guard.py)."""
    q, k, v, pos, mask = case(triton_device, torch.bfloat16, 2, 20, 5, 128, 3 * CHUNK + 5)
    want = attention.decode_attention(q, k, v, pos, None, mask)
    stages, real = [], attention._decode_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                stages.append(kwargs["num_stages"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attention, "_decode_attention_kernel", Spy())
    three, two = (attention.shared_bytes(attention.BLOCK_S, 128, 16, 2, n) for n in (3, 2))
    for limit, expected in ((None, 3), (three, 3), (three - 1, 2), (two - 1, 1)):
        monkeypatch.setattr(attention, "shared_limit", lambda device, limit=limit: limit)
        assert torch.equal(attention.decode_attention(q, k, v, pos, None, mask), want)
        assert stages[-1] == expected, (limit, stages)


def test_one_position_for_every_query_and_an_unwritten_tail(triton_device):
    """pos (1,) broadcasts (a decode step's input_pos); slots after pos hold garbage that must not
    be read (a static cache's unwritten tail): NaN there changes nothing."""
    q, k, v, _, mask = case(triton_device, torch.float32, 2, 4, 2, 64, 4 * CHUNK)
    pos = torch.tensor([CHUNK + 3], device=triton_device)
    k[:, :, CHUNK + 4:] = float("nan")
    v[:, :, CHUNK + 4:] = float("nan")
    y = kernels.decode_attention(q, k, v, pos, key_mask=mask)
    ref = reference_decode_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), key_mask=mask.cpu())
    assert torch.isfinite(y).all()
    assert ((y.cpu().double() - ref).abs() <= bound(ref, torch.float32)).all()


def test_a_query_sees_its_own_slot_whatever_the_mask(triton_device):
    """The contract of the native op: the query's own slot is visible even where key_mask is 0 (a
    padded query then attends to itself alone: y is its own value, no NaN)."""
    q, k, v, pos, _ = case(triton_device, torch.float32, 2, 4, 2, 32, 20)
    none = torch.zeros(2, 20, dtype=torch.bool, device=triton_device)
    y = kernels.decode_attention(q, k, v, pos, key_mask=none).view(2, 2, 2, 32)  # (N, nkv, G, D)
    own = torch.stack([v[n, :, pos[n]] for n in range(2)])  # (N, nkv, D)
    torch.testing.assert_close(y, own[:, :, None].expand_as(y), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN scores
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_off_slots_may_hold_anything(dtype, triton_device):
    """Slots the key mask hides (left padding, another sequence's leftovers) are read with the rest
    of their block and may hold NaN or inf: y is what it is with any finite values there, within the
    float64 bound, with the RoPE folded in too; whole masked-off blocks and splits included."""
    q, k, v, _, mask = case(triton_device, dtype, 2, 8, 2, 64, 3 * CHUNK)
    pos = torch.tensor([3 * CHUNK - 2, 2 * CHUNK + 5], device=triton_device)
    mask[0, : CHUNK + 3] = False  # a whole split and a few slots of the next hidden
    ref = reference_decode_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), key_mask=mask.cpu())
    hidden = ~mask.cpu()
    hidden[torch.arange(2), pos.cpu()] = False  # the query's own slot is always seen
    for poison in (float("nan"), float("inf")):
        kp, vp = k.clone(), v.clone()
        for n in range(2):  # cache row n, every KV head, the slots hidden from query n
            kp[n, :, hidden[n].to(triton_device)] = poison
            vp[n, :, hidden[n].to(triton_device)] = -poison
        y = kernels.decode_attention(q, kp, vp, pos, key_mask=mask)
        assert torch.isfinite(y).all() and ((y.cpu().double() - ref).abs() <= bound(ref, dtype)).all()
    # the RoPE and cache write folded in: the same as with clean slots, bit for bit
    k_new, v_new = torch.randn(2, 2, 2, 64, generator=torch.Generator().manual_seed(1)).to(dtype).to(triton_device)
    cos, sin = torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(2)).to(dtype).to(triton_device)
    clean = kernels.rope_decode_attention(q, k_new, v_new, cos, sin, k.clone(), v.clone(), pos, None, mask)
    assert torch.equal(kernels.rope_decode_attention(q, k_new, v_new, cos, sin, kp, vp, pos, None, mask), clean)


def test_the_batch_does_not_change_a_query(triton_device):
    """Splits are fixed slot ranges, not a function of the batch: a query's y is the same bits alone
    or among others (a server's batched decode equals each lone decode step)."""
    q, k, v, pos, mask = case(triton_device, torch.bfloat16, 4, 8, 2, 64, 3 * CHUNK)
    rows = torch.tensor([2, 0, 3, 1], device=triton_device)
    batch = kernels.decode_attention(q, k, v, pos, rows, mask)
    for n in range(4):
        alone = kernels.decode_attention(q[n:n + 1], k, v, pos[n:n + 1], rows[n:n + 1], mask[n:n + 1])
        assert torch.equal(alone[0], batch[n])


def test_bad_inputs_say_what_is_wrong(triton_device):
    q, k, v, pos, mask = case(triton_device, torch.float32, 2, 4, 2, 32, 20)
    with pytest.raises(ValueError, match="must have q's dtype"):
        kernels.decode_attention(q, k.double(), v.double(), pos)
    with pytest.raises(ValueError, match="3 query heads of 32 do not fit a cache of 2 heads"):
        kernels.decode_attention(q[:, :3], k, v, pos)
    with pytest.raises(ValueError, match="pos must be integer"):
        kernels.decode_attention(q, k, v, pos.float())
    with pytest.raises(ValueError, match="key_mask must be bool or integer"):
        kernels.decode_attention(q, k, v, pos, key_mask=mask[:1])
    with pytest.raises(ValueError, match="rows must be integer"):
        kernels.decode_attention(q, k, v, pos, rows=torch.zeros(3, dtype=torch.long, device=triton_device))


def test_the_op_traces_with_its_fake(triton_device):
    """bitnet::decode_attention under torch.compile (aot_eager, fullgraph): the same numbers."""
    q, k, v, pos, mask = case(triton_device, torch.float32, 2, 4, 2, 32, 20)
    fn = torch.compile(lambda *a: kernels.decode_attention(*a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, pos, None, mask), kernels.decode_attention(q, k, v, pos, None, mask),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, S, pos, rows_n, shared_cos", [
    (1, 40, [17], None, True),                  # one split, generate's (1,) position
    (2, 3 * CHUNK + 5, [3 * CHUNK + 2], None, True),  # several splits: the last holds the slot
    (3, 2 * CHUNK, [CHUNK - 1, CHUNK, 5], 5, False),  # per-query positions, rows and cos / sin
])
def test_the_rope_and_cache_write_fold_into_the_attention(dtype, N, S, pos, rows_n, shared_cos, triton_device):
    """decode_attention(..., rope=...) (the packed model's decode step: bitnet::rope_decode_attention_)
    gives what rope_cache then decode_attention give, bit for bit: the output, and the caches, the
    new key (rotated) and value written at each query's slot and nothing else changed; with a mask
    and splits around the slot."""
    from bitnet.kernels.rope import rope_cache

    d = triton_device
    g = torch.Generator().manual_seed(N)
    H, nkv, D = 8, 2, 64
    rows_n = rows_n or N
    q = torch.randn(N, 1, H, D, generator=g).to(d, dtype)
    k_new, v_new = (torch.randn(N, 1, nkv, D, generator=g).to(d, dtype) for _ in range(2))
    cos, sin = (torch.randn(1 if shared_cos else N, 1, 1, D, generator=g).to(d, dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(rows_n, nkv, S, D, generator=g).to(d, dtype) for _ in range(2))
    pos_t = torch.tensor(pos, device=d)
    rows = torch.randperm(rows_n, generator=g)[:N].to(d) if rows_n != N else None
    mask = (torch.rand(N, S, generator=g) > 0.3).to(d)
    # the unfused reference: rope_cache (one token per sequence, each into its row), then attention
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q_rot = []
    for n in range(N):
        r = int(rows[n]) if rows is not None else n
        p = pos_t[n if len(pos) == N else 0]
        c, s = (t[n if not shared_cos else 0][None] for t in (cos, sin))
        qn, _, _ = rope_cache(q[n][None], k_new[n][None], v_new[n][None], c, s, ref_k[r][None], ref_v[r][None], p[None])
        q_rot.append(qn[0, :, 0])  # (H, D)
    ref = attention.decode_attention(torch.stack(q_rot), ref_k, ref_v, pos_t, rows, mask)
    got = attention.decode_attention(q[:, 0], k_cache, v_cache, pos_t, rows, mask,
                                     rope=(k_new[:, 0], v_new[:, 0], cos.reshape(-1, D), sin.reshape(-1, D)))
    assert torch.equal(got, ref)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


# ----------------------------------------------------------------------------- wiring
def tiny_model(packed: bool, dtype=torch.float32):
    torch.manual_seed(0)
    config = BitNetConfig.from_preset("tiny", num_hidden_layers=2, initializer_range=0.05)
    model = BitNetForCausalLM(config).eval().to(dtype)
    return freeze(model) if packed else model


def decode_logits(model, device, prompt, steps, mask=None):
    """Prefill, then greedy decode steps with the cache: the decode steps' logits (steps, vocab)."""
    model.setup_cache(prompt.shape[0], 32)
    T = prompt.shape[1]
    key_mask = None if mask is None else torch.cat([mask, torch.ones(mask.shape[0], 32 - T, dtype=mask.dtype)], 1)
    with torch.no_grad():
        out = model(prompt.to(device), input_pos=torch.arange(T, device=device),
                    attention_mask=None if key_mask is None else key_mask.to(device)).logits[:, -1]
        logits = []
        for i in range(steps):
            step = out.argmax(-1, keepdim=True)
            out = model(step, input_pos=torch.tensor([T + i], device=device),
                        attention_mask=None if key_mask is None else key_mask.to(device)).logits[:, -1]
            logits.append(out.cpu())
    model.clear_cache()
    return torch.stack(logits, 1)


@pytest.mark.parametrize("packed", [True, False])
def test_decode_steps_use_it_and_agree_with_sdpa(packed, monkeypatch, triton_device):
    """A packed model on the Triton path and its float twin (kernel chosen by BITNET_KERNEL) run
    each decode step's attention in the kernel, once a layer; with everything else the same (the
    reference declines the kernel, so SDPA runs) the logits agree to float32 rounding, with left
    padding in the batch."""
    model = tiny_model(packed).to(triton_device)
    prompt = torch.tensor([[5, 77, 3, 120, 45], [0, 0, 9, 31, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    from bitnet.kernels import custom_ops

    calls = []
    for name in ("_decode_attention_impl", "_rope_decode_attention_impl"):  # the packed model's has its RoPE in it
        real = getattr(custom_ops, name)
        monkeypatch.setattr(custom_ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    with monkeypatch.context() as m:
        m.setattr(bm, "decode_attention", lambda *a, **k: None)  # the model's fallback: SDPA
        m.setattr(bm, "rope_decode_attention", lambda *a, **k: None)
        ref = decode_logits(model, triton_device, prompt, 3, mask)
    assert not calls
    got = decode_logits(model, triton_device, prompt, 3, mask)
    # two layers, three decode steps (the prefill runs SDPA)
    assert calls == ["_rope_decode_attention_impl" if packed else "_decode_attention_impl"] * (2 * 3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("packed", [True, False])
def test_an_unpadded_decode_step_takes_no_key_mask(packed, monkeypatch, triton_device):
    """Over the static cache (as on a GPU, where no live window is cut), a decode step without an
    attention_mask (generate's, for a batch with no padding) sees slots 0 .. input_pos with no key
    mask (bitnet.model.LIVE_SLOTS): the kernel gets none (no mask built each step, none loaded in
    its loop), with the same logits, bit for bit, as the same steps under an all-ones mask; where no
    kernel runs, SDPA gets those slots (the twin). generate decodes an unpadded batch so, a padded
    one with its mask (the twin)."""
    from bitnet.generation import generate
    from bitnet.kernels import custom_ops

    model = tiny_model(packed).to(triton_device)
    monkeypatch.setattr(BitNetForCausalLM, "_set_cache_window",
                        lambda self, pos: setattr(self.model.layers[0].self_attn.kv_cache.window, "live", None))
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    masks = []
    real = custom_ops._decode_attention
    monkeypatch.setattr(custom_ops, "_decode_attention", lambda *a, **k: masks.append(a[5]) or real(*a, **k))
    prompt = torch.tensor([[5, 77, 3, 120, 45], [8, 2, 9, 31, 7]])
    ones = torch.ones(2, 5, dtype=torch.long)
    bare = decode_logits(model, triton_device, prompt, 2)
    assert len(masks) == 2 * 2 and all(m is None for m in masks)
    masks.clear()
    masked = decode_logits(model, triton_device, prompt, 2, ones)
    assert len(masks) == 2 * 2 and all(torch.is_tensor(m) for m in masks)
    assert torch.equal(bare, masked)
    if packed:  # (the rest does not depend on the linear layers: the twin's run shows it)
        return
    with monkeypatch.context() as m:  # the model's fallback where no kernel runs: SDPA
        m.setattr(bm, "decode_attention", lambda *a, **k: None)
        m.setattr(bm, "rope_decode_attention", lambda *a, **k: None)
        sdpa_bare = decode_logits(model, triton_device, prompt, 2)
        sdpa_masked = decode_logits(model, triton_device, prompt, 2, ones)
    assert torch.equal(sdpa_bare, sdpa_masked)
    torch.testing.assert_close(bare, sdpa_bare, rtol=1e-4, atol=1e-4)
    for ids, attention_mask, none in ((prompt, None, True), (prompt, torch.tensor([[1] * 5, [0, 0, 1, 1, 1]]), False)):
        masks.clear()
        generate(model, ids.to(triton_device), 3, attention_mask=None if attention_mask is None else
                 attention_mask.to(triton_device))
        assert len(masks) == 2 * 2 and all((m is None) == none for m in masks), masks


def test_sdpa_agrees_with_the_reference_where_the_kernel_does(triton_device):
    """The yardstick: torch's SDPA (enable_gqa, a key mask) on the same bf16 inputs is within the
    same bound of the float64 reference as the kernel."""
    q, k, v, pos, mask = case("cpu", torch.bfloat16, 2, 20, 5, 128, 70)
    pos = torch.full((2,), 69)
    ref = reference_decode_attention(q, k, v, pos, key_mask=mask)
    keys = (mask | (torch.arange(70) == 69))[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=keys, enable_gqa=True)[:, :, 0].reshape(2, -1)
    assert ((sdpa.double() - ref).abs() <= bound(ref, torch.bfloat16)).all()
    y = kernels.decode_attention(*(t.to(triton_device) for t in (q, k, v, pos)), key_mask=mask.to(triton_device))
    assert ((y.cpu().double() - ref).abs() <= bound(ref, torch.bfloat16)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("N, S", [(1, 4096), (8, 1024), (8, 100)])
def test_decode_attention_at_2b4t_shapes_on_a_gpu(N, S):
    """Compiled, at 2B-4T's heads (20 on 5, head size 128) in bf16: within the bound of the float64
    reference, whatever the split count, and equal to its lone runs bit for bit."""
    q, k, v, pos, mask = case("cuda", torch.bfloat16, N, 20, 5, 128, S)
    rows = torch.randperm(N, device="cuda")
    y = kernels.decode_attention(q, k, v, pos, rows, mask)
    ref = reference_decode_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), rows.cpu(), mask.cpu())
    assert ((y.cpu().double() - ref).abs() <= bound(ref, torch.bfloat16)).all()
    alone = kernels.decode_attention(q[:1], k, v, pos[:1], rows[:1], mask[:1])
    assert torch.equal(alone[0], y[0])


@pytest.mark.cuda
def test_the_split_merge_is_the_same_launch_after_launch_on_a_gpu():
    """The last split to arrive merges the others' parts after one acq_rel counter (plain stores, a
    barrier, then the counter: the split-K GEMM's pattern): an ordering on the GPU's memory model
    that the interpreter, running programs one by one, cannot test. 32 splits of a 4096-slot cache,
    200 launches back to back: the merge runs in split order, so every result is the same bits,
    the first within the float64 reference's bound; a part read before it landed would differ."""
    q, k, v, pos, mask = case("cuda", torch.bfloat16, 1, 20, 5, 128, 4096)
    ys = [kernels.decode_attention(q, k, v, pos, key_mask=mask) for _ in range(200)]
    ref = reference_decode_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), key_mask=mask.cpu())
    assert ((ys[0].cpu().double() - ref).abs() <= bound(ref, torch.bfloat16)).all()
    differ = [i for i, y in enumerate(ys) if not torch.equal(y, ys[0])]
    assert not differ, f"{len(differ)} of 200 launches differ from the first, first at {differ[0]}"


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [True, False])
def test_a_prompt_from_slot_zero_runs_causal_on_a_gpu(packed, monkeypatch):
    """A prompt into cache slots 0..T-1 without padding takes plain causal attention over its slots
    (flash attention where the dtype allows; the masked call over the static cache took SDPA's math
    path): the same logits as the masked call, and a left-padded batch keeps the mask."""
    model = tiny_model(packed).cuda()
    prompt = torch.tensor([[5, 77, 3, 120, 45, 9, 31]], device="cuda")
    T, S = prompt.shape[1], 32
    kinds = []
    real = BitNetForCausalLM._mask
    monkeypatch.setattr(BitNetForCausalLM, "_mask", lambda self, *a: kinds.append(real(self, *a)) or kinds[-1])

    def prefill(**kw):
        model.setup_cache(1, S)
        with torch.no_grad():
            out = model(prompt, input_pos=torch.arange(T, device="cuda"), **kw).logits
        model.clear_cache()
        return out

    got = prefill()
    prefill(attention_mask=torch.tensor([[0] + [1] * (S - 1)], device="cuda"))
    assert kinds[0] is bm.CAUSAL_PREFIX and torch.is_tensor(kinds[1])
    causal = (torch.arange(T, device="cuda")[:, None] >= torch.arange(S, device="cuda")[None, :])[None, None]
    monkeypatch.setattr(BitNetForCausalLM, "_mask", lambda self, *a: causal)  # the masked call it replaced
    torch.testing.assert_close(got, prefill(), rtol=1e-5, atol=1e-5)


def test_a_float_model_on_a_gpu_keeps_sdpa_where_the_choice_is_the_cpus(monkeypatch):
    """BITNET_KERNEL names the packed layers' backend; for the attention it is a preference: where
    the Triton kernels are not the choice (cpu, torch) the attention is SDPA, and a choice that
    cannot be honoured (the CPU's kernels for a CUDA tensor, Triton for a CPU tensor without the
    interpreter) raises nothing: triton_applies says no."""
    from bitnet import ops

    q = torch.zeros(1, 4, 16)
    k = torch.zeros(1, 2, 8, 16)
    for choice in ("cpu", "torch"):
        monkeypatch.setenv("BITNET_KERNEL", choice)
        assert ops.decode_attention(q, k, k, torch.tensor([3])) is None
        assert not ops.triton_applies(q)
    monkeypatch.setenv("BITNET_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ops.triton_applies(q)  # a CPU tensor without the interpreter: no Triton, no error


def test_the_last_split_merges_in_the_same_launch(monkeypatch, triton_device):
    """Several splits: one launch a call (the program that finishes a row last merges its splits),
    the arrival counters left zero (a second call, and a CUDA graph's next replay, start from zero:
    the same bits again), and a split with no visible slot (pos in the first of four) merged as
    nothing."""
    from bitnet.kernels import gemm

    q, k, v, _, mask = case(triton_device, torch.bfloat16, 3, 8, 2, 64, 4 * CHUNK)
    pos = torch.tensor([CHUNK - 7, 2 * CHUNK + 1, 4 * CHUNK - 1], device=triton_device)
    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append((self.name, grid))
            return self.kernel[grid]

    for name, kernel in list(vars(attention).items()):  # every Triton kernel of the module
        if name.endswith("_kernel"):
            monkeypatch.setattr(attention, name, Counting(name, kernel))
    first = kernels.decode_attention(q, k, v, pos, key_mask=mask)
    assert launches == [("_decode_attention_kernel", (3 * 2, 4))]
    assert all(not buf.any() for buf in gemm._WORKSPACES.values())
    assert torch.equal(kernels.decode_attention(q, k, v, pos, key_mask=mask), first)
    ref = reference_decode_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), key_mask=mask.cpu())
    assert ((first.cpu().double() - ref).abs() <= bound(ref, torch.bfloat16)).all()


def test_splits_past_the_query_store_nothing_and_change_no_bit(monkeypatch, triton_device):
    """A cache row longer than a query's live slots (a server's rows hold the model's context): the
    splits past pos store no partial and take no part in the merge (their parts of the workspace are
    left as they were: NaN here), a query whose slots fit one split writes y with no partial at all,
    and y is the same bits as over the cache cut to the live splits, within the float64 bound."""
    q, k, v, _, mask = case(triton_device, torch.bfloat16, 3, 8, 2, 64, 6 * CHUNK)
    pos = torch.tensor([CHUNK - 7, 2 * CHUNK + 1, 3 * CHUNK - 1], device=triton_device)
    live = [1, 3, 3]
    made, empty = [], torch.empty

    def poisoned(*args, **kwargs):  # every float32 buffer the launcher makes starts as NaN
        t = empty(*args, **kwargs)
        if t.dtype == torch.float32:
            made.append(t.fill_(float("nan")))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    y = kernels.decode_attention(q, k, v, pos, key_mask=mask)
    monkeypatch.undo()
    assert len(made) == 1
    parts = made[0].view(3, 2, 6, -1).cpu()  # (query, KV head, split, one split's m, l and acc)
    for n, n_live in enumerate(live):
        written = ~parts[n].isnan().all(dim=-1)  # (KV head, split)
        expect = torch.zeros(2, 6, dtype=torch.bool)
        if n_live > 1:
            expect[:, :n_live] = True
        assert torch.equal(written, expect), f"query {n} (pos {pos[n].item()}): splits written {written.tolist()}"
    cut = 3 * CHUNK
    assert torch.equal(kernels.decode_attention(q, k[:, :, :cut], v[:, :, :cut], pos, key_mask=mask), y)
    ref = reference_decode_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), key_mask=mask.cpu())
    assert ((y.cpu().double() - ref).abs() <= bound(ref, torch.bfloat16)).all()
