"""bitnet.patch: transformers BitNet models running on this package's packed layers.

The checkpoints are written with transformers' own pack_weights (tests/reference.py) and loaded
with AutoModelForCausalLM; after the swap the model is still transformers' (its generate, its
cache, its pipelines), with our BitLinear where its quantized linears were.
"""

import pytest
import torch
from reference import PROJECTIONS, hf_config, hf_model, logits_on_transformers_branch, no_compile, rel_err, write_checkpoint

import bitnet
from bitnet import BitLinear, BitNetForCausalLM, patch

IDS = torch.tensor([[1, 5, 77, 3, 9, 120, 45, 45, 0, 17, 2, 64], [1, 99, 12, 8, 8, 33, 101, 7, 6, 5, 4, 3]])
CASES = [("bitnet", "offline", "autobitlinear"), ("bitnet", "offline", "bitlinear"), ("bitnet", "online", "autobitlinear"),
         ("llama", "offline", "autobitlinear"), ("llama", "offline", "bitlinear")]


def load(path):
    from transformers import AutoModelForCausalLM

    with no_compile():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def held_bytes(model) -> int:
    """Bytes of every distinct tensor storage the model holds (parameters and buffers)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def greedy(model, n=8):
    with no_compile(), torch.no_grad():
        return model.generate(IDS.to(model.device), max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("model_type,mode,linear_class", CASES)
def test_patch_keeps_the_function_and_greedy_tokens(tmp_path, model_type, mode, linear_class):
    write_checkpoint(hf_model(hf_config(model_type, tied=model_type == "bitnet", vocab_size=128)), tmp_path, mode,
                     linear_class)
    model = load(tmp_path)
    before_tokens = greedy(model)
    before_bytes = held_bytes(model)
    old = {n: m.weight for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS}

    assert patch(model) is model
    swapped = {n: m for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS}
    assert swapped and all(type(m) is BitLinear and m.frozen and m.weight.dtype == torch.uint8 for m in swapped.values())
    assert all(m.weight_scale.dtype == torch.float32 for m in swapped.values())
    if linear_class == "bitlinear":  # already packed in our layout: taken over, not copied
        assert all(swapped[n].weight.data_ptr() == w.data_ptr() for n, w in old.items())
    del old
    # no float copy of a projection is left anywhere in the model
    floats = [n for n, t in model.state_dict().items() if t.is_floating_point() and t.dim() == 2
              and n.rsplit(".", 2)[-2] in PROJECTIONS]
    assert floats == []
    if linear_class == "bitlinear":
        assert held_bytes(model) == before_bytes
    else:  # float32 (N, K) -> 2 bits a weight: 16x fewer bytes on the projections
        assert held_bytes(model) < before_bytes - 15 / 16 * sum(4 * m.in_features * m.out_features for m in swapped.values()) * 0.99

    assert torch.equal(greedy(model), before_tokens)
    out, ref, ties = logits_on_transformers_branch(model, load(tmp_path), IDS)
    assert rel_err(out, ref) < 1e-4, f"{rel_err(out, ref):.2e} ({ties} ties)"
    assert model.config.quantization_config.linear_class == "autobitlinear"


@pytest.mark.cuda
@pytest.mark.parametrize("model_type,mode,linear_class", CASES)
def test_patch_on_a_gpu_keeps_the_function_and_greedy_tokens(tmp_path, model_type, mode, linear_class):
    """transformers' model on CUDA, patched: its projections become our packed layers on the GPU
    (Triton kernels under transformers' own forward and generate), its greedy tokens are those
    transformers gives on the GPU, and its logits are transformers' own on the CPU, on its branch at
    rounding ties, at the CPU test's tolerance."""
    write_checkpoint(hf_model(hf_config(model_type, tied=model_type == "bitnet", vocab_size=128)), tmp_path, mode,
                     linear_class)
    model = load(tmp_path).to("cuda")
    before_tokens = greedy(model)
    patch(model)
    swapped = [m for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS]
    assert swapped and all(type(m) is BitLinear and m.weight.is_cuda and m.weight.dtype == torch.uint8 for m in swapped)
    assert {bitnet.ops.default_kernel(m.weight.device) for m in swapped} == {"triton"}
    assert torch.equal(greedy(model), before_tokens)
    out, ref, ties = logits_on_transformers_branch(model, load(tmp_path), IDS)
    assert out.is_cuda and rel_err(out.cpu(), ref) < 1e-4, f"{rel_err(out.cpu(), ref):.2e} ({ties} ties)"


def test_patched_layers_run_through_bitnet_ops(tmp_path, monkeypatch):
    write_checkpoint(hf_model(hf_config("bitnet", vocab_size=128)), tmp_path, "offline", "bitlinear")
    model = patch(load(tmp_path))
    calls = []
    real = bitnet.ops.bitlinear
    monkeypatch.setattr(bitnet.ops, "bitlinear", lambda *a, **k: calls.append(bitnet.ops.choose_kernel(a[0], a[-1])) or real(*a, **k))
    greedy(model, 2)
    assert len(calls) == 7 * 2 * 2  # 7 projections x 2 layers x (prefill + 1 decode step)
    assert set(calls) == {bitnet.ops.default_kernel("cpu")}


def test_pipeline_on_the_patched_model(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {chr(i): i - 32 for i in range(32, 127)}  # 95 one-character tokens
    vocab.update({"<s>": 95, "</s>": 96, "<pad>": 97, **{chr(192 + i): 98 + i for i in range(30)}})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    write_checkpoint(hf_model(hf_config("bitnet", vocab_size=128, bos_token_id=95, eos_token_id=96)), tmp_path,
                     "offline", "autobitlinear")
    model = load(tmp_path)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)
    with no_compile():
        before = pipeline("text-generation", model=model, tokenizer=fast, device="cpu")("Hello, world", **gen)
        patch(model)
        after = pipeline("text-generation", model=model, tokenizer=fast, device="cpu")("Hello, world", **gen)
    assert after == before and len(before[0]["generated_text"]) == 6


def test_save_after_patch_loads_in_transformers_and_here(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_CPU_FLOAT_OPS", "torch")  # transformers' RMSNorm: torch's float32 mean, bit for bit
    write_checkpoint(hf_model(hf_config("llama", tied=False, vocab_size=128)), tmp_path / "src", "offline", "bitlinear")
    model = patch(load(tmp_path / "src"))
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    with no_compile(), torch.no_grad():
        theirs = load(tmp_path / "out")(IDS).logits
    ours = BitNetForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, expected)
    assert rel_err(theirs, expected) < 1e-3  # transformers' float GEMM, no tie correction here


def test_patch_refuses_a_model_without_bitnet_layers():
    with pytest.raises(ValueError, match="has no transformers BitNet layers.*bitnet.convert"):
        patch(hf_model(hf_config("llama", tied=False)))


def test_patch_refuses_weights_that_are_not_ternary(tmp_path):
    write_checkpoint(hf_model(hf_config("bitnet", vocab_size=128)), tmp_path, "offline", "autobitlinear")
    model = load(tmp_path)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"q_proj: offline AutoBitLinear weight holds values outside"):
        patch(model)


def test_patch_refuses_a_packed_code_3_and_a_scale_that_is_not_positive(tmp_path):
    """transformers' BitLinear (packed, our layout): a byte holding the 2-bit code 3 is no ternary
    weight, and a weight_scale of 0 (or infinity) gives no scale; both refused by layer name."""
    write_checkpoint(hf_model(hf_config("bitnet", vocab_size=128)), tmp_path, "offline", "bitlinear")
    model = load(tmp_path)
    q = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        q.weight.view(torch.uint8)[0, 0] = 0b11_00_01_10  # codes 2, 1, 0 and 3
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj: packed weight holds the 2-bit code 3"):
        patch(model)
    model = load(tmp_path)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight_scale.fill_(float("inf"))  # stored as 1 / mean|W|: a scale of 0
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.o_proj: weight_scale gives the scale 0\.0, not a positive"):
        patch(model)
