"""Knowledge distillation (bitnet train --teacher): the KL and its gradient against float64, a run
whose teacher is the model it starts from, what distillation changes and what it does not, the
refusals, and DDP / FSDP2 / tensor parallelism on gloo against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import bitnet.train.distill as distill
from bitnet import BitNetForCausalLM
from bitnet.bench import free_port
from bitnet.train.distill import distill_loss
from bitnet.train.trainer import TrainingError
from test_train import SHAKESPEARE, metrics, needs_corpus, run


def reference_kl(student, teacher, temperature):
    """T^2 * mean over rows of KL(softmax(t / T) || softmax(s / T)), float64, torch's kl_div."""
    v = student.shape[-1]
    s = (student.double().reshape(-1, v) / temperature).log_softmax(-1)
    t = (teacher[..., :v].double().reshape(-1, v) / temperature).log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_and_its_gradient_against_float64(monkeypatch, temperature, dtype):
    """In chunks of 3 rows (15 rows: a short last chunk), a teacher with 7 padded vocabulary rows."""
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 3 * 50)
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 5, 50, generator=g)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(3, 5, 57, generator=g)).to(dtype)
    loss = distill_loss(student, teacher, temperature)
    loss.backward()
    s64 = student.detach().double().requires_grad_()
    ref = reference_kl(s64, teacher, temperature)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert student.grad.dtype == dtype
    tol = 1e-7 if dtype == torch.float32 else 2e-4  # bf16: the gradient's own rounding (values up to ~0.01)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=0, atol=tol)
    if temperature != 1.0:  # the temperature matters: without it the value is far from the reference
        assert abs(distill_loss(student, teacher, 1.0).item() - ref.item()) > 0.05


def test_kl_of_a_teacher_that_rules_tokens_out():
    """Teacher logits of -inf (tokens it never predicts) add nothing: not 0 * -inf = nan."""
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    teacher[:, 7:] = float("-inf")
    loss = distill_loss(student, teacher)
    loss.backward()
    kept = reference_kl(student.detach()[:, :7], teacher[:, :7], 1.0)  # over the tokens it can predict
    # KL(t || s) = sum_t p_t log p_t - sum_t p_t log p_s, with log p_s over all 10 tokens
    log_s = student.detach().double().log_softmax(-1)[:, :7]
    p_t = teacher[:, :7].double().softmax(-1)
    ref = (p_t * (p_t.log() - log_s)).sum(-1).mean()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert loss.item() > kept.item()  # the student's mass on the ruled-out tokens counts against it


def test_bad_shapes_and_temperature():
    with pytest.raises(ValueError, match="do not cover"):
        distill_loss(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="temperature must be positive"):
        distill_loss(torch.randn(2, 8), torch.randn(2, 8), 0.0)


def reference_relation_kl(student, teacher, heads):
    """The attention term in float64, loop by loop: for each of q, k, v and each relation head, the
    causal scaled dot products of every position with the earlier ones, softmax, KL per position
    (teacher || student), mean over batch, head and position; then the mean over q, k, v."""
    terms = []
    for s, t in zip(student, teacher):
        total, rows = 0.0, 0
        for x_s, x_t in zip(s.double(), t.double()):  # one sequence (T, width)
            T = x_s.shape[0]
            for a in range(heads):
                parts = []
                for x in (x_s, x_t):
                    d = x.shape[1] // heads
                    h = x[:, a * d:(a + 1) * d]
                    parts.append(h @ h.T / d**0.5)
                for i in range(T):
                    log_s = parts[0][i, :i + 1].log_softmax(-1)
                    log_t = parts[1][i, :i + 1].log_softmax(-1)
                    total = total + (log_t.exp() * (log_t - log_s)).sum()
                    rows += 1
        terms.append(total / rows)
    return sum(terms) / 3


def test_attention_relations_against_float64():
    """relation_loss (chunked KL over causal relation logits) against the loop above, in value and in
    the gradient of the student's q, k, v; the teacher wider (8 heads of 8) than the student (4 of 8),
    2 relation heads; red with the causal mask dropped or the scale left out."""
    g = torch.Generator().manual_seed(1)
    student = tuple(torch.randn(2, 7, w, generator=g, dtype=torch.float64).float().requires_grad_() for w in (32, 16, 16))
    teacher = tuple(torch.randn(2, 7, w, generator=g) for w in (64, 32, 32))
    loss = distill.relation_loss(student, teacher, heads=2)
    loss.backward()
    s64 = tuple(x.detach().double().requires_grad_() for x in student)
    ref = reference_relation_kl(s64, teacher, 2)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for x, r in zip(student, s64):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-4, atol=1e-6)
    assert distill.teacher_layer(3, 4, 4) == 3 and distill.teacher_layer(1, 2, 8) == 7 and distill.teacher_layer(0, 2, 8) == 3


# ----------------------------------------------------------------------------- bitnet train --teacher
# (`run` and `metrics` are tests/test_train.py's, the corpus fixture conftest's: 120 kB of TinyShakespeare)
@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus):
    """The float twin, trained 60 steps on the corpus: the model a QAT run converts and distills from."""
    tmp = tmp_path_factory.mktemp("teacher")
    _, out = run(tmp, corpus, "twin", linear="bf16", max_steps=60, eval_every=60)
    return out


def heldout_kl(student_dir, teacher_dir, text: str | None = None) -> float:
    """KL(teacher || student) on the first 4,096 tokens of `text` (default: TinyShakespeare past the
    corpus, which neither model saw), in float64, from the exported models' logits on the CPU (the
    student packed, as it is served)."""
    tok = Tokenizer.from_file(str(Path(teacher_dir) / "tokenizer.json"))
    text = SHAKESPEARE.read_text()[120_000:200_000] if text is None else text
    x = torch.tensor(tok.encode(text).ids[:4096]).view(-1, 64)
    logits = []
    for path in (student_dir, teacher_dir):
        model = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(x).logits.double())
    return reference_kl(*logits, 1.0).item()


@needs_corpus
def test_distilling_from_the_model_a_run_starts_from(tmp_path, corpus, teacher):
    """--init and --teacher the same float model, with a quantization warm-up: at step 1 (lambda 0,
    the student computes the teacher's function) the KL is 0 to float rounding; it rises as the
    weights become ternary. A weight of 0 trains exactly as no teacher does (the same floats); a
    weight of 10 ends nearer the teacher on held-out text (KL measured apart, in float64, from the
    two exported models) than the run without one."""
    base = dict(init=str(teacher / "export"), linear="bitnet", max_steps=30, eval_every=30, quant_warmup_steps=4)
    _, plain = run(tmp_path, corpus, "plain", **base)
    _, zero = run(tmp_path, corpus, "zero", teacher=str(teacher / "export"), distill_weight=0.0, **base)
    _, ten = run(tmp_path, corpus, "ten", teacher=str(teacher / "export"), distill_weight=10.0, **base)
    p, z, t = metrics(plain), metrics(zero), metrics(ten)
    assert [r["train_loss"] for r in z] == [r["train_loss"] for r in p]  # KL x 0 changes no float
    assert z[-1]["val_loss"] == p[-1]["val_loss"]
    assert t[0]["distill_loss"] < 1e-6 and t[0]["train_loss"] == p[0]["train_loss"]
    assert min(r["distill_loss"] for r in t[4:]) > 1e-3  # ternary from step 5
    assert t[-1]["teacher_val_loss"] == pytest.approx(z[-1]["teacher_val_loss"])
    assert "distill_loss" not in p[0] and "teacher_val_loss" not in p[-1]
    recipe = json.loads((ten / "recipe.json").read_text())
    assert recipe["distill_weight"] == 10.0 and recipe["distill_temperature"] == 1.0
    kl_plain = heldout_kl(plain / "export", teacher / "export")
    kl_ten = heldout_kl(ten / "export", teacher / "export")
    assert kl_ten < 0.8 * kl_plain, (kl_ten, kl_plain)


@needs_corpus
def test_attention_relations_in_a_run(tmp_path, corpus, teacher):
    """--distill-attention-weight: at step 1 (lambda 0) the relations are the teacher's (term ~0), then
    not; a run with the term ends with its layer's relations nearer the teacher's on held-out text
    (measured apart: the loop reference above on both exported models' q, k, v) than one without."""
    base = dict(init=str(teacher / "export"), teacher=str(teacher / "export"), linear="bitnet", max_steps=30,
                eval_every=30, quant_warmup_steps=4)
    _, logits_only = run(tmp_path, corpus, "logits", **base)
    _, both = run(tmp_path, corpus, "both", distill_attention_weight=10.0, **base)
    rows = metrics(both)
    assert rows[0]["distill_attention_loss"] < 1e-6 and min(r["distill_attention_loss"] for r in rows[4:]) > 1e-3
    assert "distill_attention_loss" not in metrics(logits_only)[0]
    recipe = json.loads((both / "recipe.json").read_text())
    assert recipe["distill_attention_layers"] == [1, 1] and recipe["distill_attention_heads"] == 2

    tok = Tokenizer.from_file(str(teacher / "tokenizer.json"))
    x = torch.tensor(tok.encode(SHAKESPEARE.read_text()[120_000:140_000]).ids[:512]).view(-1, 64)[:4]

    def qkv(path):
        model = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad(), distill.captured(model, 1) as seen:
            model(x)
        return seen[0]

    t = qkv(teacher / "export")
    with_term = reference_relation_kl(qkv(both / "export"), t, 2).item()
    without = reference_relation_kl(qkv(logits_only / "export"), t, 2).item()
    assert with_term < 0.8 * without, (with_term, without)


@needs_corpus
def test_refusals(tmp_path, corpus, teacher):
    with pytest.raises(TrainingError, match="--distill-weight without --teacher"):
        run(tmp_path, corpus, "a", distill_weight=1.0, max_steps=1)
    with pytest.raises(TrainingError, match="--distill-attention-layer without --distill-attention-weight"):
        run(tmp_path, corpus, "e", teacher=str(teacher), distill_attention_layer=0, max_steps=1)
    with pytest.raises(TrainingError, match="--distill-attention-layer 2: the student has 2 layers"):
        run(tmp_path, corpus, "f", teacher=str(teacher), distill_attention_weight=1.0, distill_attention_layer=2,
            max_steps=1)
    with pytest.raises(TrainingError, match=r"--distill-attention-heads 3 does not divide the width of the student's "
                                            r"keys \(32\), the student's queries \(64\)"):
        run(tmp_path, corpus, "g", teacher=str(teacher), distill_attention_weight=1.0, distill_attention_heads=3,
            max_steps=1)
    with pytest.raises(TrainingError, match="--distill-temperature must be positive"):
        run(tmp_path, corpus, "b", teacher=str(teacher), distill_temperature=0.0, max_steps=1)
    # A tokenizer of its own (trained on other text): the ids differ.
    other = tmp_path / "other.txt"
    other.write_text(Path(corpus).read_text()[::-1])
    with pytest.raises(TrainingError, match=r"its tokenizer differs from the student's \(\d+ of \d+ tokens"):
        run(tmp_path, other, "c", teacher=str(teacher), max_steps=1)
    # A teacher with a smaller vocabulary than the student's (a Llama-style model of 640 rows, the
    # teacher's 512-token tokenizer).
    from reference import hf_config, hf_model, write_checkpoint

    big = tmp_path / "big"
    write_checkpoint(hf_model(hf_config("llama", tied=False, vocab_size=640, max_position_embeddings=256)), big, None)
    (big / "tokenizer.json").write_bytes((teacher / "tokenizer.json").read_bytes())
    with pytest.raises(TrainingError, match="has 512 tokens in its vocabulary, the student 640"):
        run(tmp_path, corpus, "d", init=str(big), teacher=str(teacher), max_steps=1)

# ----------------------------------------------------------------------------- torchrun on gloo
def torchrun(tmp, corpus, teacher, name, nproc, *extra, init=None):
    args = ["-m", "torch.distributed.run", "--nproc-per-node", nproc, "--master-port", str(free_port()),
            "-m", "bitnet", "train", "--data", corpus, "--device", "cpu", "--out", tmp / name,
            "--init", init or teacher, "--teacher", teacher, "--linear", "bitnet", "--seq-len", 64,
            "--threads", 1, "--max-steps", 6, "--eval-every", 3, "--eval-windows", 8, "--no-progress",
            "--cache-dir", tmp / "cache", *extra]
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return metrics(tmp / name)


@needs_corpus
def test_ddp_fsdp_and_tensor_parallel_distill_as_one_process(tmp_path, corpus, teacher):
    """2 ranks (DDP at micro-batch 4, FSDP2 at 4, tp=2 at 8) against one process at micro-batch 8: the
    same global batch, the teacher replicated (DDP) or sharded as the student (FSDP2, TP: its logits
    split over the vocabulary, the KL reduced across the shards). Step 1 agrees to float rounding;
    later steps drift by the flips of ternary / int8 codes that a reordered sum brings (measured on a
    2-core AMD EPYC: <= 8e-5 of the CE and <= 3.1e-3 of the KL, all three at step 6, where the one
    process flipped a code). Under TP a KL taken with F.log_softmax inside loss_parallel() (whose
    backward passes the gradient through as if an nll_loss followed) trained to CE 5.67 / KL 0.50
    at step 6 against 5.16 / 0.11 (another teacher, the same protocol)."""
    one = torchrun(tmp_path, corpus, teacher / "export", "one", 1, "--micro-batch", 8)
    for name, extra in (("ddp", ["--micro-batch", 4]), ("fsdp", ["--micro-batch", 4, "--fsdp"]),
                        ("tp", ["--micro-batch", 8, "--tp", 2])):
        two = torchrun(tmp_path, corpus, teacher / "export", name, 2, *extra)
        assert [r["step"] for r in two] == list(range(1, 7)), name
        assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=1e-5), name
        assert two[0]["distill_loss"] == pytest.approx(one[0]["distill_loss"], rel=1e-4), name
        for a, b in zip(one, two):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=5e-4), (name, a["step"])
            assert b["distill_loss"] == pytest.approx(a["distill_loss"], rel=1e-2), (name, a["step"])
        assert two[-1]["teacher_val_loss"] == pytest.approx(one[-1]["teacher_val_loss"], rel=1e-6), name


@needs_corpus
def test_a_packed_teacher_whole_on_every_fsdp_rank(tmp_path, corpus, teacher):
    """A packed BitNet teacher (2 bits a weight: uint8 buffers FSDP2 does not shard) is kept whole on
    each rank and distills as in one process (the tolerances above)."""
    _, packed = run(tmp_path, corpus, "packed", init=str(teacher / "export"), linear="bitnet", max_steps=4,
                    eval_every=4)
    init = teacher / "export"
    one = torchrun(tmp_path, corpus, packed / "export", "one", 1, "--micro-batch", 8, init=init)
    two = torchrun(tmp_path, corpus, packed / "export", "two", 2, "--micro-batch", 4, "--fsdp", init=init)
    assert one[0]["distill_loss"] > 1e-3
    assert two[0]["distill_loss"] == pytest.approx(one[0]["distill_loss"], rel=1e-4)
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=5e-4), a["step"]
        assert b["distill_loss"] == pytest.approx(a["distill_loss"], rel=1e-2), a["step"]


@needs_corpus
def test_a_stopped_distillation_resumes_exactly(tmp_path, corpus, teacher):
    """--stop-at 3 then --resume: the same losses and KL, float for float, as the run never stopped
    (the teacher is reloaded, frozen; nothing of it is in the checkpoint)."""
    kw = dict(init=str(teacher / "export"), teacher=str(teacher / "export"), linear="bitnet", max_steps=6,
              eval_every=3, distill_weight=2.0, distill_temperature=2.0)
    run(tmp_path, corpus, "full", **kw)
    run(tmp_path, corpus, "part", stop_at=3, **kw)
    assert len(metrics(tmp_path / "part")) == 3
    run(tmp_path, corpus, "part", resume=True, **kw)
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    for key in ("train_loss", "distill_loss", "val_loss", "grad_norm"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    with pytest.raises(TrainingError, match="distill_temperature=2.0 there, 1.0 here"):
        run(tmp_path, corpus, "part", resume=True, **{**kw, "distill_temperature": 1.0})


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_distillation_on_cuda(tmp_path):
    """On the GPU (bf16 autocast, the teacher loaded in bf16): a twin trained 40 steps on the
    embedded corpus as --init and --teacher, a quantization warm-up: step 1's KL is the float
    student's against its bf16 self (autocast rounds both alike: < 1e-3), later steps' KL > 0,
    and distillation at weight 10 ends nearer the teacher on held-out text than none."""
    from bitnet.corpus import stdlib_docstrings

    docs = tmp_path / "docs.txt"
    docs.write_text(stdlib_docstrings(max_chars=120_000))
    _, twin = run(tmp_path, docs, "twin", linear="bf16", max_steps=40, eval_every=40, device="cuda")
    t = twin / "export"
    base = dict(init=str(t), linear="bitnet", max_steps=30, eval_every=30, quant_warmup_steps=4, device="cuda")
    _, plain = run(tmp_path, docs, "plain", **base)
    _, ten = run(tmp_path, docs, "ten", teacher=str(t), distill_weight=10.0, **base)
    rows = metrics(ten)
    assert rows[0]["distill_loss"] < 1e-3 and min(r["distill_loss"] for r in rows[4:]) > 1e-3
    heldout = stdlib_docstrings(max_chars=200_000)[120_000:]
    assert heldout_kl(ten / "export", t, heldout) < 0.8 * heldout_kl(plain / "export", t, heldout)


@needs_corpus
def test_attention_relations_under_fsdp_as_one_process(tmp_path, corpus, teacher):
    """The attention term on 2 FSDP2 ranks (the captured q, k, v of a sharded block) against one
    process, the tolerances above; under --tp it is refused before any step."""
    extra = ("--distill-attention-weight", 10)
    one = torchrun(tmp_path, corpus, teacher / "export", "one", 1, "--micro-batch", 8, *extra)
    two = torchrun(tmp_path, corpus, teacher / "export", "two", 2, "--micro-batch", 4, "--fsdp", *extra)
    assert one[1]["distill_attention_loss"] > 1e-3
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=5e-4), a["step"]
        assert b["distill_attention_loss"] == pytest.approx(a["distill_attention_loss"], rel=1e-2), a["step"]
    with pytest.raises(TrainingError, match="--distill-attention-weight under --tp"):
        run(tmp_path, corpus, "tp", teacher=str(teacher / "export"), distill_attention_weight=1.0, tp=2, max_steps=1)
