"""bitnet eval ppl against a reference loop written with transformers (its perplexity guide)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import no_compile

from bitnet import BitNetConfig, BitNetForCausalLM, freeze
from bitnet.cli import main
from bitnet.evaluate import evaluate_folder, windows
from bitnet.train.data import train_tokenizer

pytestmark = pytest.mark.usefixtures("gpu_gemm_tile")  # whole models: the GEMMs in a GPU's tile (conftest.py)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
TEXT = (SHAKESPEARE.read_text()[:40_000] if SHAKESPEARE.is_file()
        else "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(800)))


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "test.txt").write_text(TEXT[30_000:])
    return d / "test.txt", train_tokenizer([TEXT[:30_000]], 300)


def folder(tmp, kind, tok):
    """A tiny model folder with tokenizer.json: ours (packed or latent) or a transformers GPT-2."""
    torch.manual_seed(0)
    path = tmp / kind
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                   bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    else:
        model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=300, max_position_embeddings=128))
        if kind == "packed":
            freeze(model)
        model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tok.to_str())
    return path


def reference_ppl(path, ids, max_length, stride=None, protocol="sliding", bos=1, lm_head_weight=None):
    """The loop of transformers' perplexity guide, with transformers' model, summing token NLLs
    (lm_head_weight: that model's head replaced by these weights, its embedding left as it is)."""
    from transformers import AutoModelForCausalLM

    with no_compile():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if lm_head_weight is not None:
        model.lm_head.weight = torch.nn.Parameter(lm_head_weight.float())
    nll, count = 0.0, 0

    def score(input_ids, target_ids):
        nonlocal nll, count
        with no_compile(), torch.no_grad():
            logits = model(input_ids).logits[0, :-1].double()
        target = target_ids[0, 1:]
        keep = target != -100
        nll += -F.log_softmax(logits, -1)[keep].gather(1, target[keep][:, None]).sum().item()
        count += int(keep.sum())

    if protocol == "chunks":
        for begin in range(0, len(ids), max_length - 1):
            chunk = torch.cat([torch.tensor([bos]), ids[begin:begin + max_length - 1]])[None]
            score(chunk, chunk)
        return math.exp(nll / count), count
    ids = torch.cat([torch.tensor([bos]), ids])
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = ids[None, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        score(input_ids, target_ids)
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("kind", ["packed", "latent", "gpt2"])
@pytest.mark.parametrize("protocol,max_length,stride", [("sliding", 64, 32), ("sliding", 96, 40), ("chunks", 64, None)])
def test_equals_the_transformers_reference_loop(tmp_path, text_and_tokenizer, kind, protocol, max_length, stride):
    text, tok = text_and_tokenizer
    path = folder(tmp_path, kind, tok)
    ids = torch.tensor(tok.encode(text.read_text(), add_special_tokens=False).ids)
    ref_ppl, ref_count = reference_ppl(path, ids, max_length, stride, protocol)
    ours = evaluate_folder(str(path), str(text), max_length, stride, protocol, batch_size=3)
    assert ours.tokens == ref_count
    assert ours.ppl == pytest.approx(ref_ppl, rel=1e-4)


@pytest.mark.parametrize("n,length,stride", [(10, 4, 2), (100, 16, 16), (101, 16, 5), (7, 16, 8)])
def test_sliding_scores_each_token_at_most_once(n, length, stride):
    scored = [p for b, e, first in windows(n, length, stride, "sliding", True) for p in range(first, e)]
    assert len(scored) == len(set(scored)) and set(scored) <= set(range(1, n))
    if stride < length:
        assert scored == list(range(1, n))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["packed", "latent"])
def test_perplexity_on_a_gpu_equals_the_transformers_reference_loop(tmp_path, text_and_tokenizer, kind):
    """bitnet eval on CUDA (the Triton kernels for a packed model, torch's for a latent one) against
    the reference loop above (transformers' model, on the CPU): the same tokens scored and the
    same perplexity, at the CPU tier's tolerance."""
    text, tok = text_and_tokenizer
    path = folder(tmp_path, kind, tok)
    ids = torch.tensor(tok.encode(text.read_text(), add_special_tokens=False).ids)
    ref_ppl, ref_count = reference_ppl(path, ids, 64, 32)
    ours = evaluate_folder(str(path), str(text), 64, 32, batch_size=3, device="cuda")
    assert ours.tokens == ref_count
    assert ours.ppl == pytest.approx(ref_ppl, rel=1e-4)


def test_chunks_score_every_token():
    spans = windows(100, 16, 0, "chunks", True)
    assert [p for b, e, first in spans for p in range(first, e)] == list(range(100))
    assert all(e - b <= 15 for b, e, _ in spans)


def test_cli_json_and_errors(tmp_path, text_and_tokenizer, capsys):
    text, tok = text_and_tokenizer
    path = folder(tmp_path, "packed", tok)
    assert main(["eval", "ppl", str(path), "--data", str(text), "--max-length", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "sliding" and out["stride"] == 32 and out["tokens"] > 1000 and out["ppl"] > 1
    assert main(["eval", "ppl", str(path), "--data", str(text), "--max-length", "4096"]) == 2
    assert "exceeds the model's max_position_embeddings (128)" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", "ppl", str(path), "--data", str(empty)]) == 2
    assert "empty.txt is empty" in capsys.readouterr().err


def test_cli_lm_head_quantized_as_served(tmp_path, text_and_tokenizer, capsys):
    """bitnet eval ppl --lm-head int8: the perplexity of the model with the int8 head it would be
    served with, against transformers' loop on the same checkpoint with its head replaced by those
    int8 rows times their scales (Int8Linear keeps activations float: the same function). --lm-head
    int4 runs too (its int8 activations have no float twin), and a transformers model is refused."""
    from bitnet import Int8Linear

    text, tok = text_and_tokenizer
    path = folder(tmp_path, "packed", tok)
    ids = torch.tensor(tok.encode(text.read_text(), add_special_tokens=False).ids)
    head = Int8Linear.from_linear(BitNetForCausalLM.from_pretrained(path).lm_head)
    ref_ppl, ref_count = reference_ppl(path, ids, 64, 32, lm_head_weight=head.weight.float() * head.weight_scale.view(-1, 1))
    float_ppl, _ = reference_ppl(path, ids, 64, 32)
    for kind in ("int8", "int4", "float"):
        assert main(["eval", "ppl", str(path), "--data", str(text), "--max-length", "64", "--json", "--lm-head", kind]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["tokens"] == ref_count
        if kind == "int8":
            assert out["ppl"] == pytest.approx(ref_ppl, rel=1e-4) and out["ppl"] != pytest.approx(float_ppl, rel=1e-6)
        else:
            assert out["ppl"] == pytest.approx(float_ppl, rel=2e-2 if kind == "int4" else 1e-4), kind
    gpt2 = folder(tmp_path, "gpt2", tok)
    assert main(["eval", "ppl", str(gpt2), "--data", str(text), "--lm-head", "int8"]) == 2
    assert "--lm-head int8 quantizes the head of this package's models" in capsys.readouterr().err


def test_bad_protocol_arguments_are_refused_by_name(tmp_path, text_and_tokenizer, capsys):
    """bitnet eval ppl (and bitnet.evaluate.perplexity) refuse, naming what is wrong: an unknown
    protocol, a window under 2 tokens, a stride outside (0, max_length], the chunks protocol for a
    model without BOS, a text of fewer than two tokens."""
    from bitnet.evaluate import perplexity

    text, tok = text_and_tokenizer
    path = folder(tmp_path, "packed", tok)
    cmd = ["eval", "ppl", str(path), "--data", str(text)]
    for extra, said in ((["--max-length", "1"], "max_length must be at least 2, got 1"),
                        (["--max-length", "64", "--stride", "65"], "stride must be in (0, max_length], got 65")):
        assert main([*cmd, *extra]) == 2
        assert said in capsys.readouterr().err, extra
    model = BitNetForCausalLM.from_pretrained(path)
    ids = torch.arange(3, 40)
    with pytest.raises(ValueError, match=r"protocol must be one of \('sliding', 'chunks'\), got 'windows'"):
        perplexity(model, ids, 16, protocol="windows")
    with pytest.raises(ValueError, match="the chunks protocol prefixes every chunk with BOS, but the model has no bos_token_id"):
        perplexity(model, ids, 16, protocol="chunks", bos_token_id=None)
    with pytest.raises(ValueError, match="fewer than two tokens"):
        perplexity(model, ids[:1], 16)
