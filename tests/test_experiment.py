"""bitnet compare: the three systems on the same tokens, LR chosen on dev, ppl on test."""

import dataclasses
import json
import os

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
    args = CompareArgs(data=str(corpus), device="cpu", presets=["tiny"], lr_bitnet=[1e-3, 3e-3], lr_bitnet1=[3e-3],
                       lr_bf16=[1e-3], max_steps=6, seq_len=32,
                       micro_batch=4, vocab_size=300, eval_every=3, threads=1, out=str(tmp_path / "cmp"),
                       extend=0)  # the grids only; the edge extension has its own test below
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


def test_sweeps_extend_past_the_edge_until_the_best_is_inside(tmp_path, corpus, monkeypatch):
    """A fake trainer whose dev loss is lowest at lr 0.032 (bitnet) and 0.001 (the twin): the sweeps
    grow upwards and downwards one factor-2 point at a time; a limit stops them, and says so."""
    import math

    import bitnet.experiment as E

    best = {"bitnet": 0.032, "bf16": 0.001}
    trained = []

    def fake_train(args, train_txt, tok, preset, linear, lr, threads):
        trained.append((linear, lr))
        if linear == "bitnet" and lr > 0.05:
            return {"preset": preset, "linear": linear, "lr": lr, "dev_loss": math.inf, "diverged": True,
                    "train_seconds": 0.0}
        return {"preset": preset, "linear": linear, "lr": lr, "dev_loss": 4 + math.log(lr / best[linear]) ** 2,
                "train_seconds": 0.0}

    monkeypatch.setattr(E, "_train", fake_train)
    args = E.CompareArgs(data=str(corpus), device="cpu", presets=["tiny"], linears=["bitnet", "bf16"],
                         lr_bitnet=[2e-3, 4e-3, 8e-3], lr_bf16=[4e-3, 8e-3], vocab_size=300, out=str(tmp_path / "cmp"),
                         extend=3)
    runs = E.train_runs(E.planned_runs(args), progress=lambda s: None)
    said = []
    runs, limited = E.extend_sweeps(args, runs, progress=said.append)
    pts = {lin: sorted(r["lr"] for r in runs if r["linear"] == lin) for lin in ("bitnet", "bf16")}
    assert pts["bitnet"] == pytest.approx([2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2])  # 0.064 is past the best: stop
    assert pts["bf16"] == pytest.approx([5e-4, 1e-3, 2e-3, 4e-3, 8e-3])  # downwards, 0.001 now inside
    assert limited == [] and not any("limit" in s for s in said)

    # one extension allowed: the bitnet sweep stops at 0.016, still its top, and the run says so
    args.extend, trained[:] = 1, []
    runs = E.train_runs(E.planned_runs(args), progress=lambda s: None)
    runs, limited = E.extend_sweeps(args, runs, progress=said.append)
    assert len(limited) == 2 and limited[0].startswith("tiny bitnet: best lr 0.016")
    assert any(s.startswith("  stopped at the limit: tiny bitnet") for s in said)


def test_edge_lr():
    from bitnet.experiment import edge_lr

    assert edge_lr({1e-3: 5.0}) is None  # one point brackets nothing
    assert edge_lr({1e-3: 5.0, 2e-3: 4.0, 4e-3: 4.5}) is None
    assert edge_lr({1e-3: 5.0, 2e-3: 4.0}) == 4e-3
    assert edge_lr({1e-3: 4.0, 2e-3: 5.0}, factor=3) == pytest.approx(1e-3 / 3)
    assert edge_lr({1e-3: 4.0, 2e-3: float("inf")}) == 5e-4  # diverged at the top: look below


def test_default_sweeps_are_the_recipes_rate_times_half_one_two(tmp_path):
    """With no --lr-<system>, each (size, system) starts at its recipe's rate x (1/2, 1, 2), every run
    with the recipe's warm-up; given rates and --warmup-steps replace them."""
    from bitnet.experiment import describe_sweeps, sweep_lrs, train_command, warmup_steps
    from bitnet.train.recipes import default_recipe

    args = CompareArgs(presets=["tiny", "small"], max_steps=300, out=str(tmp_path / "cmp"))
    for preset in args.presets:
        for linear in args.linears:
            r = default_recipe(linear, preset)
            assert sweep_lrs(args, preset, linear) == pytest.approx([r.lr / 2, r.lr, 2 * r.lr])
            assert warmup_steps(args, preset, linear) == r.warmup_for(300)
    assert sweep_lrs(args, "tiny", "bitnet") == [0.016, 0.032, 0.064]  # clean folder names, e.g. ...-lr0.016
    assert warmup_steps(args, "tiny", "bf16") == 120  # the recipe's 40% of 300 steps
    cmd = train_command(args, "train.txt", "tok.json", "tiny", "bitnet", 0.032, 1)
    assert cmd[cmd.index("--lr") + 1] == "0.032" and cmd[cmd.index("--warmup-steps") + 1] == "120"
    assert "--device" not in cmd  # bitnet train's default device, unless --device is given
    cmd = train_command(dataclasses.replace(args, device="cuda:1"), "train.txt", "tok.json", "tiny", "bitnet", 0.032, 1)
    assert cmd[cmd.index("--device") + 1] == "cuda:1"
    assert describe_sweeps(args)[0] == "tiny bitnet: lr 0.016 0.032 0.064 (recipe x 1/2, 1, 2), warm-up 120 steps (recipe)"

    given = CompareArgs(lr_bf16=[1e-3, 2e-3], warmup_steps=7, out=str(tmp_path / "cmp2"))
    assert sweep_lrs(given, "tiny", "bf16") == [1e-3, 2e-3] and warmup_steps(given, "tiny", "bitnet") == 7
    assert "(given)" in describe_sweeps(given)[2]


def test_default_sweep_extends_by_its_own_factor_2(tmp_path, corpus, monkeypatch):
    """The recipe-centred grid (0.016, 0.032, 0.064 at tiny) extends past its top by x2 when the best is
    there, and stops once the best is inside."""
    import math

    import bitnet.experiment as E

    def fake_train(args, train_txt, tok, preset, linear, lr, threads):
        return {"preset": preset, "linear": linear, "lr": lr, "dev_loss": 4 + math.log(lr / 0.128) ** 2,
                "train_seconds": 0.0}

    monkeypatch.setattr(E, "_train", fake_train)
    args = E.CompareArgs(data=str(corpus), device="cpu", presets=["tiny"], linears=["bitnet"], vocab_size=300,
                         out=str(tmp_path / "cmp"))
    runs = E.train_runs(E.planned_runs(args), progress=lambda s: None)
    runs, limited = E.extend_sweeps(args, runs, progress=lambda s: None)
    assert sorted(r["lr"] for r in runs) == pytest.approx([0.016, 0.032, 0.064, 0.128, 0.256])
    assert limited == []


def test_the_texts_of_a_comparison(tmp_path, corpus):
    """Its corpus: --data whole for training and --test-data for the test text when given; else the
    tail of --data, or of the embedded default (the README's `bitnet compare`), the last
    test_fraction of it cut at a line end with nothing lost. Written once under --out/data and
    reused (a second call reads, not retrains, the tokenizer)."""
    from bitnet.experiment import _corpus

    held = tmp_path / "held.txt"
    held.write_text("Held-out text, never trained on.\n" * 300)
    given = CompareArgs(data=str(corpus), test_data=str(held), vocab_size=300, out=str(tmp_path / "given"))
    train_txt, test_txt, tok = _corpus(given)
    assert open(train_txt).read() == corpus.read_text() and open(test_txt).read() == held.read_text()
    embedded = CompareArgs(vocab_size=300, out=str(tmp_path / "embedded"))
    train_txt, test_txt, tok = _corpus(embedded)
    text, train, test = stdlib_docstrings(), open(train_txt).read(), open(test_txt).read()
    assert train + test == text and train.endswith("\n") and abs(len(test) / len(text) - 0.1) < 0.01
    stamp = [os.stat(p).st_mtime_ns for p in (train_txt, test_txt, tok)]
    assert _corpus(embedded) == (train_txt, test_txt, tok)
    assert [os.stat(p).st_mtime_ns for p in (train_txt, test_txt, tok)] == stamp
