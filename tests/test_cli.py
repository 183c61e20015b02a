"""The `bitnet` command line: info and convert, and every command's --device."""

import json

import pytest
import torch
from reference import hf_config, hf_model, logits_on_transformers_branch, no_compile, rel_err, write_checkpoint

from bitnet import BitNetForCausalLM
from bitnet.cli import main


def test_info_2b4t(capsys):
    assert main(["info", "2b4t"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 2,412,820,480" in out
    twin = next(line for line in out.splitlines() if line.startswith("bf16 twin"))
    packed = next(line for line in out.splitlines() if line.startswith("bitnet b1.58, 2 bit"))
    assert "3.88 GiB" in twin and "496.88 MiB" in packed and "8.00" in packed


def test_info_folder_and_bad_name(tmp_path, capsys):
    write_checkpoint(hf_model(hf_config()), tmp_path, "offline", "bitlinear")
    assert main(["info", str(tmp_path)]) == 0
    assert "quantization_mode offline, linear_class bitlinear" in capsys.readouterr().out
    assert main(["info", "nope"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_info_names_each_gpu_and_what_its_packed_layers_run_on(monkeypatch, capsys):
    """`bitnet info` lists every GPU torch sees: its name, compute capability, SMs and the shared
    memory a program may have (what the kernels size their tiles by), and what a packed layer runs
    on there: the Triton kernels (dependent launches from sm_90 on; the package's tuning table for
    that GPU model if one ships), or the torch path below compute capability 8.0. torch.cuda's
    answers are monkeypatched for an H100, an L4 and a T4 (no GPU here)."""
    from types import SimpleNamespace

    from bitnet import ops
    from bitnet.kernels import common, tuning

    gpus = [SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                            shared_memory_per_block_optin=232448),
            SimpleNamespace(name="NVIDIA L4", major=8, minor=9, multi_processor_count=58, shared_memory_per_block_optin=101376),
            SimpleNamespace(name="Tesla T4", major=7, minor=5, multi_processor_count=40, shared_memory_per_block_optin=65536)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (gpus[i].major, gpus[i].minor))
    monkeypatch.setattr(ops, "_TRITON_GPUS", {})
    monkeypatch.setattr(common, "_SHARED_LIMITS", {})
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tuning.SHIPPED_DIR.parent / "no tables here")
    monkeypatch.delenv("BITNET_KERNEL", raising=False)
    assert main(["info", "2b4t"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("packed layers on cuda")]
    assert len(lines) == 3, lines
    assert lines[0].startswith("packed layers on cuda:0 NVIDIA H100 80GB HBM3 (compute capability 9.0, 132 SMs, 227 KB "
                               "of shared memory a program): Triton ") and "programmatic dependent launches" in lines[0]
    assert "autotuning on first use (no package table for this GPU model)" in lines[0]
    assert lines[1].startswith("packed layers on cuda:1 NVIDIA L4 (compute capability 8.9, 58 SMs, 99 KB of shared "
                               "memory a program): Triton ") and "serialized launches" in lines[1]
    assert lines[2] == ("packed layers on cuda:2 Tesla T4 (compute capability 7.5, 40 SMs): torch path (the Triton "
                        "kernels need compute capability 8.0 or later)")


def test_convert_llama_to_latent_then_packed(tmp_path):
    """A float Llama folder -> BitLinear latent (QAT start) -> packed; transformers reads both."""
    from transformers import AutoModelForCausalLM

    write_checkpoint(hf_model(hf_config("llama", tied=False)), tmp_path / "llama", None)
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "latent"), "--to", "latent"]) == 0
    assert main(["convert", str(tmp_path / "latent"), str(tmp_path / "packed"), "--linear-class", "bitlinear"]) == 0
    q = json.load(open(tmp_path / "packed" / "config.json"))["quantization_config"]
    assert (q["quantization_mode"], q["linear_class"]) == ("offline", "bitlinear")
    ids = torch.tensor([[1, 4, 9, 16, 25, 36, 49, 64]])
    latent = BitNetForCausalLM.from_pretrained(tmp_path / "latent")
    packed = BitNetForCausalLM.from_pretrained(tmp_path / "packed")
    with torch.no_grad():
        a, b = latent(ids).logits, packed(ids).logits
    assert rel_err(b, a) < 1e-5
    with no_compile():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
    ours, ref, _ = logits_on_transformers_branch(packed, theirs, ids)
    assert rel_err(ours, ref) < 1e-4


def test_convert_missing_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_command_checks_its_device_before_loading_anything(tmp_path, tokenizer, capsys, monkeypatch):
    """`--device` of generate, eval, serve, train and compare, each on input it could run: a device
    torch does not know, CUDA where torch sees none, cuda:N past a one-GPU machine's last; exit 2 and
    one line naming the device and what to do (not a CUDA traceback from inside a model's load)."""
    import importlib.util

    from bitnet import BitNetConfig, freeze

    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size())))
    model.tokenizer_files["tokenizer.json"] = tokenizer.to_str().encode()
    model.save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text("hello world, a tiny corpus for a tiny tokenizer\n" * 40)
    commands = {"generate": ["generate", str(tmp_path / "m"), "--prompt", "hello"],
                "eval": ["eval", "ppl", str(tmp_path / "m"), "--data", str(text)],
                "train": ["train", "--data", str(text), "--out", str(tmp_path / "run"), "--preset", "tiny"],
                "compare": ["compare", "--data", str(text), "--out", str(tmp_path / "cmp")]}
    if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")):
        commands["serve"] = ["serve", str(tmp_path / "m")]  # (its extra installed: the check comes after it)

    def said(cmd):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    for name, cmd in commands.items():
        assert f"bitnet {name}: error: --device 'gpu0' is not a device (cuda, cuda:1, cpu" in said([*cmd, "--device", "gpu0"])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert "--device cuda: torch sees no CUDA device" in said([*cmd, "--device", "cuda"])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        assert "--device cuda:1: this machine has 1 CUDA device(s) (cuda:0 .. cuda:0)" in said([*cmd, "--device", "cuda:1"])
        monkeypatch.undo()
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp" / "runs").exists()


def test_unknown_choice_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--to", "onnx"])
