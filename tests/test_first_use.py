"""First use says what it does: the native CPU kernels' one-time build announces itself on stderr
and falls outside every timed part; `bitnet generate` reports prefill and decode rates apart."""

import os
import re
import subprocess
import sys

import pytest
import torch

import bitnet
from bitnet import generation
from bitnet.cli import main
from bitnet.kernels import cpu

TEXT = "hello world, a tiny corpus for a tiny tokenizer. " * 200


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A packed tiny model with its tokenizer.json."""
    from bitnet.train.data import train_tokenizer

    tok = train_tokenizer([TEXT], 300)
    torch.manual_seed(0)
    model = bitnet.BitNetForCausalLM(bitnet.BitNetConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(),
                                                                     eos_token_id=None))
    bitnet.freeze(model)
    model.tokenizer_files["tokenizer.json"] = tok.to_str().encode()
    path = tmp_path_factory.mktemp("m")
    model.save_pretrained(path)
    return path


def test_a_fresh_build_announces_itself_once(tmp_path, monkeypatch, capsys):
    """What, why, about how long and where it is cached, before the build; its time after; nothing
    once the library is in the cache."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    built = []

    def fake_load(name, **kw):  # stands in for the compiler: writes the library where torch caches it
        built.append(name)
        open(os.path.join(tmp_path, name, f"{name}.so"), "w").close()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    cpu._build()
    err = capsys.readouterr().err
    where = os.path.join(tmp_path, built[0])
    assert err.count("building the native CPU kernels") == 1
    assert where in err and "TORCH_EXTENSIONS_DIR" in err and cpu.BUILD_SECONDS in err
    assert "once" in err and "no reported speed includes it" in err
    assert re.search(r"native CPU kernels built in \d+\.\d s", err)
    cpu._build()  # cached now: silent
    assert capsys.readouterr().err == "" and len(built) == 2


def test_speed_report_separates_prefill_and_decode():
    line = generation.speed_report(5, 10.0, [10.02, 10.05, 10.08, 10.11, 10.14, 10.17, 10.20, 10.23])
    assert line == ("[prompt 5 tokens in 0.02 s (250 tok/s); 8 tokens in 0.23 s, 33.3 tok/s decode "
                    "(7 steps in 0.21 s after the prefill's token)]")
    assert generation.speed_report(5, 0.0, [0.5]) == "[prompt 5 tokens in 0.50 s (10 tok/s); 1 token in 0.50 s, from the prefill]"


def test_generate_builds_the_kernels_before_the_clock(folder, monkeypatch, capsys):
    """The build (cpu.load) comes before the model's first forward; the report has both rates."""
    events = []
    load, gen = cpu.load, generation.generate
    monkeypatch.setattr(cpu, "load", lambda: events.append("load") or load())
    monkeypatch.setattr(generation, "generate", lambda *a, **kw: events.append("generate") or gen(*a, **kw))
    assert main(["generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert events[:2] == ["load", "generate"]  # (every packed forward asks load() again: a cached answer)
    err = capsys.readouterr().err
    assert re.search(r"\[prompt \d+ tokens in \d+\.\d\d s \(\d+ tok/s\); 6 tokens in \d+\.\d\d s, \d+\.\d tok/s decode "
                     r"\(5 steps in \d+\.\d\d s after the prefill's token\)\]", err), err


def test_generate_warms_up_where_the_first_call_compiles(folder, monkeypatch, capsys):
    """With --compile the first call compiles: a short untimed warm-up on the same cache comes first."""
    calls = []
    gen = generation.generate
    monkeypatch.setattr(generation, "generate", lambda m, ids, n, *a, **kw: calls.append(n) or gen(m, ids, n, *a, **kw))
    monkeypatch.setattr(generation, "compiled_decode_step", lambda device_type: generation.decode_step)  # no inductor here
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "4", "--device", "cpu",
                 "--compile"]) == 0
    assert calls == [2, 4]
    err = capsys.readouterr().err
    assert "[warm-up: kernels compiled for this prompt in" in err and "4 tokens in" in err


def test_generate_lm_head_quantized_at_load(folder, monkeypatch, capsys):
    """--lm-head int8 / int4: the model generates with the head quantize_lm_head makes, and the same
    tokens as that model generates through the API (float: the head as loaded)."""
    from bitnet import BitNetForCausalLM, Int4Linear, Int8Linear
    from bitnet.bitlinear import StreamedLinear

    gen = generation.generate
    for kind, cls in (("int8", Int8Linear), ("int4", Int4Linear), ("float", StreamedLinear)):
        seen = []
        monkeypatch.setattr(generation, "generate", lambda m, ids, n, *a, **kw: seen.append(m) or gen(m, ids, n, *a, **kw))
        assert main(["generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "6", "--device", "cpu",
                     "--lm-head", kind]) == 0
        assert type(seen[0].lm_head) is cls, kind
        model = BitNetForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        if kind != "float":
            model.quantize_lm_head(int(kind[3:]))
        tokenizer = generation.load_tokenizer(str(folder))
        prompt = tokenizer.encode("hello world").ids
        want = gen(model, torch.tensor([prompt]), 6)[0, len(prompt):].tolist()
        assert capsys.readouterr().out == "hello world" + tokenizer.decode(want) + "\n", kind


@pytest.mark.slow
def test_first_generate_after_install_announces_its_build(folder, tmp_path):
    """A fresh TORCH_EXTENSIONS_DIR, as after an install: the build is announced before the text, and
    the decode rate is a real one (the ~15 s build is not in it)."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("BITNET_CPU_DISABLE", None)
    p = subprocess.run([sys.executable, "-m", "bitnet", "generate", str(folder), "--prompt", "hello world",
                        "--max-new-tokens", "16", "--device", "cpu"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stderr.index("building the native CPU kernels") < p.stderr.index("native CPU kernels built in") \
        < p.stderr.index("[prompt")
    built = float(re.search(r"built in (\d+\.\d) s", p.stderr).group(1))
    decode_steps_s = float(re.search(r"\(15 steps in (\d+\.\d\d) s", p.stderr).group(1))
    assert built > 2 and decode_steps_s < built / 2
