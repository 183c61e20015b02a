"""bitnet compare: the three systems on the same tokens, LR chosen on dev, ppl on test."""

import json

import pytest

from bitnet.corpus import stdlib_docstrings
from bitnet.experiment import CompareArgs, run_comparison


def test_embedded_corpus_is_real_text():
    text = stdlib_docstrings(max_chars=200_000)
    assert len(text) >= 200_000
    words = text.split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.5  # prose, not random tokens
    assert stdlib_docstrings(max_chars=50_000) == stdlib_docstrings(max_chars=50_000)  # deterministic


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(stdlib_docstrings(max_chars=120_000))
    return path


def test_compare_end_to_end(tmp_path, corpus):
    args = CompareArgs(data=str(corpus), presets=["tiny"], lr_bitnet=[1e-3, 3e-3], lr_bitnet1=[3e-3], lr_bf16=[1e-3], max_steps=6, seq_len=32,
                       micro_batch=4, vocab_size=300, eval_every=3, threads=1, out=str(tmp_path / "cmp"))
    result = run_comparison(args, progress=lambda s: None)
    runs = result["runs"]
    assert sorted((r["linear"], r["lr"]) for r in runs) == [("bf16", 1e-3), ("bitnet", 1e-3), ("bitnet", 3e-3),
                                                            ("bitnet1", 3e-3)]
    row = result["table"][0]
    best = min((r for r in runs if r["linear"] == "bitnet"), key=lambda r: r["dev_loss"])
    assert row["lr_bitnet"] == best["lr"]
    assert row["ratio_bitnet"] == pytest.approx(row["ppl_bitnet"] / row["ppl_bf16"])
    assert row["tokens"] == 6 * 4 * 32 and row["params"] > 0
    assert all(1 < row[f"ppl_{k}"] < 400 for k in ("bitnet", "bitnet1", "bf16"))  # vocab 300: better than uniform
    saved = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert saved["table"] == result["table"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert "| tiny |" in (tmp_path / "cmp" / "compare.md").read_text()
    # complete runs are reused, not trained again
    again = run_comparison(args, progress=lambda s: None)
    assert all(r["wall_seconds_this_call"] < 5 for r in again["runs"])
    assert again["table"][0]["ppl_bitnet"] == pytest.approx(row["ppl_bitnet"])
