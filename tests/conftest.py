import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before
# triton.jit decorates them, so here, before any test module imports bitnet.kernels. An explicit
# TRITON_INTERPRET=0 is kept: it plays a GPU machine (no interpreter) on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_patches_once_a_launch() -> None:
    """Triton's interpreter patches triton.language (inspect.getmembers over tl, tl.core, tl.math
    and tl.tensor) when a launch starts and restores it when the launch ends, but patches it again,
    never to be restored, at every call of a @triton.jit helper inside the kernel: ~0.3 ms a call,
    a third of an interpreted model test's time (tests/test_scheduler.py's padded buckets: 40,731
    helper calls). Inside a launch whose patch covers the helper's modules (tl and tl.core, found
    in the helper's globals as Triton finds them; Triton's own helpers reach tl.core), the
    helper's call now finds them patched and patches nothing: the same interpreted code runs."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or scope_type is None or executor is None or getattr(original, "bitnet_once", False):
        return  # another interpreter than the one this knows (3.6 to 3.9): left as it is
    import threading

    launch = threading.local()  # .langs: what the running launch patched (None: no launch yet)

    found: dict = {}

    def langs(fn) -> frozenset:
        if fn not in found:
            found[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return found[fn]

    def patch_lang(fn):
        need, patched = langs(fn), getattr(launch, "langs", None)
        if patched is not None and need <= patched:
            return scope_type()  # a helper inside the launch: its modules are patched already
        scope = original(fn)  # the launch's own patch, a helper's first reach into tl.core, or no launch
        if patched is not None:
            launch.langs = patched | need
        elif getattr(launch, "starting", False):
            launch.starting, launch.langs = False, need
        return scope

    run = executor.__call__

    def call(self, *args, **kwargs):
        launch.starting, launch.langs = True, None
        try:
            return run(self, *args, **kwargs)
        finally:
            launch.starting, launch.langs = False, None

    patch_lang.bitnet_once = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = call


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_patches_once_a_launch()

# Two threads a process; under pytest-xdist the workers share the cores (more threads than cores
# make libgomp stop spinning between parallel regions, and every region then waits for its threads)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))

# Where the Triton kernels run in this session, the one place that says so: "cpu" under the
# interpreter (TRITON_INTERPRET=1: the default tier on a CPU, and the interpreter rerun that
# test_kernels starts beside a GPU run), "cuda" with a GPU (compiled kernels), None with neither.
# A test that runs a Triton kernel takes the `triton_device` fixture and builds its inputs there;
# its exact references run on the CPU.
if os.environ.get("TRITON_INTERPRET") == "1":
    TRITON_DEVICE = "cpu"
elif torch.cuda.is_available():
    TRITON_DEVICE = "cuda"
else:
    TRITON_DEVICE = None
NO_TRITON = "no GPU and TRITON_INTERPRET=0: the Triton kernels can run nowhere in this session"
# On a GPU, the suite's hundreds of small shapes would each be autotuned (every config compiled and
# timed, ~0.3 s a shape): the first config that fits runs instead, and tests/test_configs.py runs
# every config against the references. An explicit BITNET_AUTOTUNE is kept.
if TRITON_DEVICE == "cuda":
    os.environ.setdefault("BITNET_AUTOTUNE", "first")
# Autotuning choices are kept in this machine's tables (kernels/tuning.py) only where a test says so.
os.environ.setdefault("BITNET_TUNING_DIR", "off")


@pytest.fixture
def triton_device() -> str:
    """The device of the Triton kernels' inputs ("cuda" or "cpu"); skips the test where they cannot run."""
    if TRITON_DEVICE is None:
        pytest.skip(NO_TRITON)
    return TRITON_DEVICE


@pytest.fixture
def gpu_gemm_tile():
    """Under the interpreter, the packed and int8 GEMMs in the first tile a GPU is given (16 x 128 x
    128, gemm.SMALL_M_CONFIGS[0]: what BITNET_AUTOTUNE=first launches) instead of the interpreter's
    small one (gemm.INTERPRET_CONFIG, 16 x 32 x 32: several tiles and K steps at the kernel tests'
    small shapes). For the tests of a whole model, which run each layer's GEMM at the tiny preset's
    widths (64 to 352): the same results (exact integers, then the same float epilogue) in about a
    sixth of the interpreted programs and K steps; the kernels' own tests keep the small tile.
    Nothing changes on a GPU."""
    if TRITON_DEVICE != "cpu":
        yield
        return
    from reference import pinned

    from bitnet.kernels import gemm
    from bitnet.kernels.launch import triton_kernel

    tile = gemm.SMALL_M_CONFIGS[0]
    with pinned(triton_kernel(gemm._gemm_kernel), tile), pinned(triton_kernel(gemm._gemm_int8_kernel), tile):
        yield


def pytest_collection_modifyitems(config, items):
    if TRITON_DEVICE == "cuda":
        # the longest items first, so that pytest-xdist does not start one near the end: the
        # interpreter tier's rerun (tests/test_kernels.py: a subprocess with workers of its own),
        # then the cuda tier (real shapes, tuning, recordings, compiles), then the rest
        items.sort(key=lambda item: (getattr(item, "originalname", None) != "test_interpreter_tier_reruns_beside_a_gpu",
                                     "cuda" not in item.keywords))
        return
    if not torch.cuda.is_available():
        reason = "needs an NVIDIA GPU"
    else:  # a GPU, but TRITON_INTERPRET=1: the tier's real shapes would take hours in the interpreter
        reason = "the cuda tier runs the compiled kernels, and TRITON_INTERPRET=1 is set"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on a few lines (vocabulary 300; <unk>, <s>, </s> = 0, 1, 2):
    the tokenizer.json of the test checkpoints that generate and serve text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, a tiny corpus for a tiny tokenizer", "naïve café, 😀 grüße"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 120 kB of TinyShakespeare (real text, small enough for quick training runs; the tests
    that take it skip where ../shared/data is not beside the checkout: test_train.needs_corpus)."""
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text.read_text()[:120_000])
    return path
