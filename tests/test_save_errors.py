"""Saving on a full disk, and folders that say their step: an ENOSPC injected into safetensors'
writer (as a real full disk raises it) or into os.write ends the run with one clear line (file,
folder, bytes needed vs free), leaves no partial file, keeps the previous checkpoint loadable and
resumable exactly; a folder whose model files lag its trainer state warns with both steps."""

import errno
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

import bitnet.atomic as atomic
from bitnet import BitNetForCausalLM
from bitnet.atomic import SaveError, atomic_write_bytes
from bitnet.checkpoint import folder_steps, step_mismatch
from bitnet.config import BitNetConfig
from bitnet.train.trainer import TrainConfig, TrainingError, train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
needs_corpus = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is not beside the checkout")
FAST = dict(preset="tiny", seq_len=64, micro_batch=4, threads=1, progress=False, eval_windows=4,
            max_steps=15, eval_every=5, save_every=5, device="cpu")  # exact resumes: the CPU, GPU or not
ENOSPC = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:120_000] if SHAKESPEARE.is_file() else "")
    return path


def run(tmp_path, corpus, name, **kw):
    cfg = TrainConfig(data=str(corpus), out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), **{**FAST, **kw})
    return train(cfg), tmp_path / name


def losses(path):
    return [json.loads(line)["train_loss"] for line in open(Path(path) / "metrics.jsonl")]


def state_step(path):
    with safe_open(Path(path) / "trainer_state.safetensors", "pt") as f:
        return json.loads(f.metadata()["bitnet_trainer"])["step"]


def disk_full_on(monkeypatch, which, nth):
    """safetensors' save_file raises ENOSPC on the nth write of `which` ("state" or "model")."""
    real, calls = atomic.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        is_state = bool(metadata and "bitnet_trainer" in metadata)
        if is_state == (which == "state"):
            calls["n"] += 1
            if calls["n"] == nth:
                Path(filename).write_bytes(b"\x00" * 64)  # a part written, then the disk is full
                raise SafetensorError(ENOSPC)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", save_file)
    return real


def test_enospc_from_os_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "f.json").write_bytes(b"old")
    real = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SaveError) as e:
        atomic_write_bytes(str(tmp_path / "f.json"), b"x" * 5000)
    monkeypatch.setattr(os, "write", real)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "\n" not in msg
    assert "f.json" in msg and str(tmp_path) in msg and "5.0 KB" in msg and "free" in msg and "disk full" in msg
    assert sorted(os.listdir(tmp_path)) == ["f.json"] and (tmp_path / "f.json").read_bytes() == b"old"


@needs_corpus
def test_disk_full_on_the_state_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    run(tmp_path, corpus, "full")
    real = disk_full_on(monkeypatch, "state", 2)  # step 10's state
    with pytest.raises(TrainingError) as e:
        run(tmp_path, corpus, "crash")
    monkeypatch.setattr(atomic, "save_file", real)
    msg = str(e.value)
    assert "No space left on device" in msg and "trainer_state.safetensors" in msg and "free" in msg
    assert "checkpoint of step 5" in msg and "intact" in msg
    out = tmp_path / "crash"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert state_step(out) == 5 and folder_steps(str(out))["weights"] == {"model.safetensors": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BitNetForCausalLM.from_pretrained(out)  # the step-5 model, consistent: no warning
    run(tmp_path, corpus, "crash", resume=True)
    assert losses(out) == losses(tmp_path / "full")  # float for float (resume drops the rows after step 5)


@needs_corpus
def test_disk_full_on_the_model_files_warns_with_both_steps(tmp_path, corpus, monkeypatch):
    run(tmp_path, corpus, "full")
    real = disk_full_on(monkeypatch, "model", 2)  # step 10's model.safetensors, after step 10's state
    with pytest.raises(TrainingError) as e:
        run(tmp_path, corpus, "crash")
    monkeypatch.setattr(atomic, "save_file", real)
    msg = str(e.value)
    assert "model.safetensors" in msg and "No space left on device" in msg and "step 10" in msg and "step 5" in msg
    out = tmp_path / "crash"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    steps = folder_steps(str(out))
    assert steps == {"config": 5, "weights": {"model.safetensors": 5}, "trainer_state": 10}
    with pytest.warns(UserWarning, match=r"model.safetensors step 5.*trainer_state.safetensors step 10"):
        BitNetForCausalLM.from_pretrained(out)
    from bitnet.cli import main

    main(["info", str(out)])
    run(tmp_path, corpus, "crash", resume=True)  # the step-10 state is complete: resume is exact
    assert losses(out) == losses(tmp_path / "full")  # float for float
    assert step_mismatch(str(out)) is None and folder_steps(str(out))["config"] == 15


def test_step_is_recorded_and_carried(tmp_path):
    with torch.device("cpu"):
        model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=64))
    model.save_pretrained(str(tmp_path / "a"), step=7)
    assert folder_steps(str(tmp_path / "a")) == {"config": 7, "weights": {"model.safetensors": 7}, "trainer_state": None}
    BitNetForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(str(tmp_path / "b"))  # carried on re-save
    assert folder_steps(str(tmp_path / "b"))["weights"] == {"model.safetensors": 7}
    model.save_pretrained(str(tmp_path / "c"))
    assert folder_steps(str(tmp_path / "c"))["config"] is None


def test_info_prints_the_step(tmp_path, capsys):
    from bitnet.cli import main

    with torch.device("cpu"):
        model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=64))
    model.save_pretrained(str(tmp_path / "a"), step=12)
    assert main(["info", str(tmp_path / "a")]) == 0
    assert "step: 12 (model files)" in capsys.readouterr().out


def test_corpus_that_is_not_text_warns_with_the_share(tmp_path):
    from bitnet.train.data import read_corpus

    (tmp_path / "ok.txt").write_text("plain text, é and ü\n" * 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_corpus(str(tmp_path / "ok.txt"))[0].startswith("plain text")
    blob = bytes(range(128, 256)) * 4 + b"x" * 512  # 512 undecodable bytes of 1024
    (tmp_path / "bin.txt").write_bytes(blob)
    with pytest.warns(UserWarning, match=r"512 of 1,024 bytes \(50.00%\) are not UTF-8"):
        docs = read_corpus(str(tmp_path / "bin.txt"))
    assert docs[0].count("\ufffd") == 512 and docs[0].endswith("x" * 512)
    with pytest.warns(UserWarning, match=r"worst: .*bin.txt \(50.0%\)"):
        read_corpus(str(tmp_path))
