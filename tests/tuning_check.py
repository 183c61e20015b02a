"""The autotuning tables (bitnet.kernels.tuning) through Triton's own Autotuner.run, without a GPU.

A stand-in driver for sm_90 (precompile's: Triton compiles for it and launches nothing, the GPU
model it reports is "stand-in sm_90") and a stand-in timer (Triton's do_bench: each config timed
is reported 1 ms faster than the one before, so the last config that fits wins) take the place of
the GPU; the rest is the package's act_quant launched as on a GPU: its autotuner, the hook, the
tables on disk, the config the launch compiles. Last, on a stand-in sm_86 (99 KB of shared memory
a program), a kernel under the package's autotuner whose larger config does not fit it; then the
same key on a second GPU of another model (a stand-in sm_90 as cuda:1), where it does.

    python tests/tuning_check.py DIR      (without TRITON_INTERPRET; DIR: an empty folder; exit 1 on a failure)
"""

import json
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "import the kernels as real JITFunctions: unset TRITON_INTERPRET"
ROOT = Path(sys.argv[1])
MINE, SHIPPED = ROOT / "mine", ROOT / "shipped"
os.environ.update(BITNET_TUNING_DIR=str(MINE), BITNET_PRECOMPILE="0", BITNET_AUTOTUNE="full")
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bitnet.kernels import activations, precompile, tuning  # noqa: E402
from bitnet.kernels.launch import triton_kernel  # noqa: E402

timed = []


def stand_in_bench(kernel_call, warmup, rep, quantiles):
    timed.append(1)
    return [100.0 - len(timed)] * 3


triton.testing.do_bench = stand_in_bench
tuning.SHIPPED_DIR = SHIPPED
launcher = activations._act_quant_kernel
tuner = triton_kernel(launcher)
CONFIGS = [tuning.config_dict(c) for c in tuner.configs]
TABLE = tuning.table_name("stand-in sm_90")
failed = []


def launch():
    """A new process's first act_quant at K = 4096 (nothing in memory): (configs timed, the
    compiled kernel's BLOCK_K and num_warps)."""
    tuner.cache.clear()
    launcher._entries.clear()
    timed.clear()
    compiled = None
    original = triton.runtime.jit.JITFunction.run

    def run(self, *args, **kwargs):
        nonlocal compiled
        compiled = original(self, *args, **kwargs)
        return compiled

    triton.runtime.jit.JITFunction.run = run
    try:
        activations.act_quant(torch.randn(2, 4096))
    finally:
        triton.runtime.jit.JITFunction.run = original
    index = {n: i for i, n in enumerate(tuner.fn.arg_names)}
    return len(timed), {"BLOCK_K": compiled.src.constants[(index["BLOCK_K"],)], "num_warps": compiled.metadata.num_warps}


def entry(path: Path) -> dict:
    entries = json.loads(path.read_text())["entries"]
    (key, value), = entries.items()
    assert key.startswith("_act_quant_kernel (4096, "), key
    return value


def check(name, condition, detail=""):
    print(f"{'ok  ' if condition else 'FAIL'} {name}{'' if condition else f': {detail}'}")
    if not condition:
        failed.append(name)


def main() -> int:
    driver.set_active(precompile._FakeDriver(90))
    last = {k: CONFIGS[-1][k] for k in ("BLOCK_K", "num_warps")}
    first = {k: CONFIGS[0][k] for k in ("BLOCK_K", "num_warps")}
    assert last != first, CONFIGS

    n, compiled = launch()
    check("a new key is timed, every config", n == len(CONFIGS), n)
    check("the launch compiles the fastest", compiled == last, compiled)
    e = entry(MINE / TABLE)
    check("and this machine's table keeps it, with every config's time and the kernel source",
          e["config"] == CONFIGS[-1] and len(e["ms"]) == len(CONFIGS) and e["source"] == tuner.fn.cache_key
          and e["triton"] == triton.__version__, e)

    n, compiled = launch()
    check("the next process takes it from the table: nothing timed", n == 0 and compiled == last, (n, compiled))
    check("counted", tuning.STATS == {"from_table": 1, "recorded": 1}, tuning.STATS)

    os.environ["BITNET_AUTOTUNE"] = "retune"
    n, compiled = launch()
    check("retune times it again", n == len(CONFIGS) and compiled == last, (n, compiled))
    os.environ["BITNET_AUTOTUNE"] = "full"

    table = json.loads((MINE / TABLE).read_text())
    (key,) = table["entries"]
    table["entries"][key]["source"] = "an older kernel"
    (MINE / TABLE).write_text(json.dumps(table))
    n, _ = launch()
    check("this machine's entry of another kernel source is timed again", n == len(CONFIGS), n)
    check("and replaced", entry(MINE / TABLE)["source"] == tuner.fn.cache_key)

    # the package's table: any source, its config if it is still in the list
    SHIPPED.mkdir()
    shipped = {"format": 1, "device": "stand-in sm_90",
               "entries": {key: {"config": CONFIGS[0], "source": "the GPU session's kernel", "ms": []}}}
    (SHIPPED / TABLE).write_text(json.dumps(shipped))
    os.environ["BITNET_TUNING_DIR"] = "off"
    before = (MINE / TABLE).read_text()
    n, compiled = launch()
    check("the package's table is used whatever its source", n == 0 and compiled == first, (n, compiled))
    shipped["entries"][key]["config"] = {**CONFIGS[0], "BLOCK_K": 3}
    (SHIPPED / TABLE).write_text(json.dumps(shipped))
    n, compiled = launch()
    check("a config no longer in the list is ignored", n == len(CONFIGS) and compiled == last, (n, compiled))
    check("with BITNET_TUNING_DIR=off no table is read or written", (MINE / TABLE).read_text() == before
          and sorted(p.name for p in ROOT.iterdir()) == ["mine", "shipped"])
    os.environ["BITNET_TUNING_DIR"] = str(MINE)
    shipped["entries"][key]["config"] = CONFIGS[0]
    (SHIPPED / TABLE).write_text(json.dumps(shipped))
    n, compiled = launch()
    check("this machine's table comes first", n == 0 and compiled == last, (n, compiled))

    (MINE / TABLE).write_text("{not json")
    n, compiled = launch()
    check("an unreadable table of this machine's: the package's is used", n == 0 and compiled == first, (n, compiled))
    (SHIPPED / TABLE).unlink()
    n, compiled = launch()
    check("and without it, timed and written anew", n == len(CONFIGS) and entry(MINE / TABLE)["config"] == CONFIGS[-1],
          n)

    os.environ["BITNET_AUTOTUNE"] = "first"
    before = (MINE / TABLE).read_text()
    n, compiled = launch()
    check("first: the first config, nothing timed or written", n == 0 and compiled == first
          and (MINE / TABLE).read_text() == before, (n, compiled))
    os.environ["BITNET_AUTOTUNE"] = "full"
    too_big()
    print(f"tuning tables: {len(failed)} failed")
    return 1 if failed else 0


def too_big():
    """On a GPU with 99 KB of shared memory a program (sm_86: an A10, RTX 30xx; L4 and L40S are
    sm_89 with the same), a config that asks for more fails to launch ("out of resources"): timed
    through the package's autotuner (common.autotune, the tables), Triton passes over it and the
    table keeps it as not run. The stand-in timer runs each config's launch (compiled for sm_86;
    the stand-in driver reports that architecture's limit and launches nothing) and reports each
    config 1 ms faster than the one before, so the config over the limit, last, would win."""
    import triton.language as tl

    from bitnet.kernels.common import SHARED_LIMIT, autotune

    configs = [triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2),
               triton.Config({"BLOCK": 128}, num_warps=4, num_stages=3)]  # 2 x 64 KB staged: over 99 KB, within 227

    @autotune(configs, key=["K"], interpret_config=configs[0])
    @triton.jit
    def _staged_dot_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], tl.float32)
        for k in range(0, K, BLOCK):
            a = tl.load(a_ptr + offs[:, None] * K + k + offs[None, :])
            b = tl.load(b_ptr + (k + offs[:, None]) * BLOCK + offs[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

    def run_each(kernel_call, warmup, rep, quantiles):
        kernel_call()
        timed.append(1)
        return [100.0 - len(timed)] * 3

    triton.testing.do_bench = run_each
    driver.set_active(precompile._FakeDriver(86))
    limit = triton.compiler.compiler.max_shared_mem  # (Triton keeps the first driver's answer: sm_90's, above)
    getattr(limit, "cache_clear", lambda: None)()
    timed.clear()
    a, b = torch.empty(128, 512, dtype=torch.float16), torch.empty(512, 128, dtype=torch.float16)
    _staged_dot_kernel[(1,)](a, b, torch.empty(128, 128), 512)
    tuner = triton_kernel(_staged_dot_kernel)
    chosen = tuner.cache[(512,)] if (512,) in tuner.cache else next(iter(tuner.cache.values()))
    table = json.loads((MINE / tuning.table_name("stand-in sm_86")).read_text())["entries"]
    (entry,) = [e for key, e in table.items() if key.startswith("_staged_dot_kernel")]
    times = {c["BLOCK"]: ms for c, ms in entry["ms"]}
    check("a config over sm_86's shared memory is passed over when timed",
          SHARED_LIMIT[86] == 101376 and chosen.kwargs["BLOCK"] == 64 and len(timed) == 1, (chosen, len(timed)))
    check("and the table keeps it as not run", entry["config"]["BLOCK"] == 64 and times[128] is None
          and times[64] is not None, entry)
    another_gpu(_staged_dot_kernel, a, b)


class _SecondGPU(precompile._FakeDriver):
    """A stand-in for the machine's second GPU (cuda:1), another model."""

    def get_current_device(self):
        return 1


def another_gpu(kernel, a, b):
    """A machine with two GPU models: the same key launched on the second (a stand-in sm_90, where
    both configs fit) is timed there, not given the sm_86's choice from Triton's memory; back on the
    sm_86 its own choice is still in memory (nothing timed, nothing read from a table)."""
    tuner = triton_kernel(kernel)
    c = torch.empty(128, 128)
    timed.clear()
    driver.set_active(_SecondGPU(90))
    kernel[(1,)](a, b, c, 512)
    check("the same key on another GPU model is timed there, and its own choice taken",
          len(timed) == 2 and tuner.best_config.kwargs["BLOCK"] == 128, (len(timed), tuner.best_config))
    driver.set_active(precompile._FakeDriver(86))
    kernel._entries.clear()  # (Triton's path again, as a new signature would take)
    os.environ["BITNET_TUNING_DIR"] = "off"
    timed.clear()
    kernel[(1,)](a, b, c, 512)
    os.environ["BITNET_TUNING_DIR"] = str(MINE)
    check("and the first GPU's choice stays its own", len(timed) == 0 and tuner.best_config.kwargs["BLOCK"] == 64,
          (len(timed), tuner.best_config))


if __name__ == "__main__":
    sys.exit(main())
