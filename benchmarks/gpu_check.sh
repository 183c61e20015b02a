#!/usr/bin/env bash
# One call on a lent GPU machine: install, stamp, test, measure; everything logged to one folder.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR] [--stages install,stamp,tests,...] [--dry-run]
#   GIT_COMMIT=<hash> bash benchmarks/gpu_check.sh       # the copy sent to the machine has no .git
#
# For the bare machine a session is lent (README of the device tool): run in the repository root
# with `.whl` (wheels) and `.peers` (bitnet.cpp's gpu/ sources) carried, both git-ignored (`/.whl/`
# and `/.peers/` in .git/info/exclude) and made on the session's machine first:
#   python benchmarks/gpu_wheels.py      (what the machine's image lacks of the package's requirements
#       and its dev extra, at the versions CI tests: gguf, and the server's stack, without which
#       tests/test_serve.py skips whole; the stamp's "optional modules" line says what still fails there)
#   python benchmarks/peer_gpu_kernels.py --prepare --bitnet-git <git dir of microsoft/BitNet>
#       (the `fetch` tool's github:microsoft/BitNet gives one under /work/.mirror/)
#   python benchmarks/warm_triton_cache.py      (in a Python 3.12 venv of torch==2.11.0, triton==3.6.0: the
#       GPU machine's; 6-14 minutes on a 2-core CPU; from the commit sent) -> .tcache/triton-cache-sm90.tar.xz,
#       what the kernel, generate and peer stages compile, compiled beforehand for sm_90 (git-ignored
#       too: `/.tcache/`)
# in calls of at most 6 minutes, so that two fit the 15 minutes of device time a session has, each
# machine start included:
#   call 1 (issue 26, the default stages):  bash benchmarks/gpu_check.sh
#   call 2 (issue 27, speed beside the GPU peers; the machine may be a fresh one, keep install; the
#   packed model once more with its launches serialized, BITNET_PDL=0, and once with a batched
#   decode's norms launched apart, BITNET_GEMM_NORM_M=0: the A/Bs of PDL and of the norm inside
#   the GEMM; last, so that a stage cut short still has the twin for the ratios):
#     GENERATE_MODELS="bitnet bf16 bitnet-serial bitnet-norm-apart" BUDGET_GENERATE=130 \
#       bash benchmarks/gpu_check.sh --stages install,stamp,kernels,gpu_peers,generate
#   (carry [".whl", ".peers", ".tcache"]; timeout_s 360) Make call 2 as soon as call 1 has returned, with
#   nothing in between: a machine stays warm for 30 s after a call, a fresh start costs a minute or
#   two of the 15. On the warm machine call 2 finds call 1's autotuning choices (kept in
#   GPU_CHECK_KEEP, default ~/.cache/bitnet/gpu_check_tuning, `off`: none) and times none of its
#   keys again; on a fresh one it tunes them afresh, inside its stages' budgets. Its results.tar.gz
#   then holds both calls' choices (results/tuning/<GPU>.json): committed as kernels/tuned/<GPU>.json,
#   the package's table for that GPU model. What to read in each call's output, in order, and what
#   each figure was predicted to be: the checklist at the top of benchmarks/gpu_notes.md. Every stage runs under
# `timeout` (SIGINT first, so that pytest prints its summary and Python its traceback; SIGKILL 5 s
# later); a failing stage does not stop the next. Time a stage leaves unused passes on to the
# later ones; the stages together never run past TOTAL.
#
# Stages and their budgets in seconds (override any: BUDGET_TESTS=150 ..., TOTAL=500):
#   install   20  the carried wheels (.whl/*.whl) into /tmp/site (on PYTHONPATH), then the package:
#                 pip install --no-index --no-deps --no-build-isolation -e .; a carried Triton cache
#                 (.tcache/triton-cache-sm90.tar.xz, by Python: no xz binary needed) unpacked into TCACHE, /tmp/bitnet-triton-cache, the
#                 TRITON_CACHE_DIR of every stage (where it was built: Triton's group files hold paths);
#                 the stamp says whether this machine's Triton is the one that built it, the summary how
#                 many kernels the call compiled all the same
#   stamp     10  nvidia-smi (GPU, driver), python/torch/triton/transformers versions, commit, CPUs, the requirements
#                 not met and the suite's optional modules that do not import (gpu_wheels.py --check)
#   tests    150  the whole suite: pytest -q -n N -p no:cacheprovider --timeout 150 -rfs --durations=20
#                 but the compile guard's sweeps (every variant for sm_90 and sm_80, every launch of a
#                 run for sm_90, sm_86's tiles: ~790 CPU-only compiles, what CI runs on every change;
#                 TESTS_DESELECT="" keeps them) (its longest tests here: compare end to end ~100 s on a CPU core, the
#                 interpreter tier rerun beside the GPU ~60-100 s; conftest.py sets
#                 BITNET_AUTOTUNE=first: no config timing, tests/test_configs.py runs each)
#   kernels   55  bench_kernels.py: first the decode attention against SDPA (batch 1 8, 160 1024 4096
#                 slots, full and with 160 live: a server's row) and the lm_head GEMVs (bf16, int8, int4 at 128256 x 2560, M 1 8), then
#                 2560x6912 6912x2560 8192x8192 28672x8192, M 1 16 2048, 2bit at every M, 1.6bit and
#                 1bit at M = 1, 2bit also unsplit where M = 16 splits K (three shapes: the A/B of
#                 split_k), GPU time (CUDA graph) and eager call (each new key's configs are first
#                 compiled side by side by BITNET_PRECOMPILE workers; a stage that runs out of time
#                 loses the last shapes, not the tables)
#                 -> bench_kernels_cuda.{json,md} (saved shape by shape)
#   gpu_peers 90  peer_gpu_kernels.py (not a default stage: call 2): ours, bitnet.cpp's W2A8 GEMV
#                 (built here with nvcc from .peers), gemlite and bf16 cuBLAS, each checked against
#                 the exact reference before timing -> peer_gpu_kernels_cuda.{json,md}
#   generate  60  bench_generate.py: 2b4t, packed 2-bit vs the bf16 twin (GENERATE_MODELS), batch 1 8, compile (CUDA
#                 graphs), 32 new tokens, median of 3, then 8 decode steps profiled kernel by kernel
#                 (batch 1: each kernel's time a step, the sum against the step's time); the 512-token
#                 prefill eager, recorded as a CUDA graph (both sides) and profiled (its kernels' busy
#                 time): a few seconds a model -> generate_cuda.{json,md}
#                 (saved model by model)
#   peer      45  peer_transformers.py: 2b4t, 32 new tokens, median of 2: ours vs transformers' BitNet
#                 -> peer_transformers_cuda.{json,md} (saved before its compiled timing)
#   (packing)  5  reserved: after every stage the results folder is refreshed
#   TOTAL    345
#
# The results folder (argument, else $OUT, else benchmarks/results/gpu_check/<UTC date-time>)
# holds at most 8 files at every moment (what the device tool brings back from $OUT):
#   summary.md                               stamp, stage table, test summary line, failed tests, the
#                                            fallbacks logged (PDL or direct launches off, graphs not recorded)
#   logs.tar.gz                              every stage's log, tests.xml, the stamp, the kernel plot
#   results.tar.gz                           this run's result files (JSON and markdown), to commit, and
#                                            results/tuning/<GPU>.json: the autotuning choices this call
#                                            made and those of earlier calls on this machine
#                                            (kernels/tuning.py; BITNET_TUNING_DIR is a fresh folder,
#                                            seeded from GPU_CHECK_KEEP), to commit as
#                                            kernels/tuned/<GPU>.json: the package's table for that
#                                            GPU model (a call on a fresh machine reads it)
#   bench_kernels_cuda.md  generate_cuda.md  peer_transformers_cuda.md  peer_gpu_kernels_cuda.md
#   gpu_goals_cuda.md                        issues 26 and 27's goals held against this call's results
#                                            (benchmarks/gpu_goals.py, after the last stage): met,
#                                            missed or not measured, a row a goal
# The benchmarks also write these into benchmarks/results/ (only files written by this run are
# copied). The output ends with the result tables, the goals, the failed tests and the stage table.
# With both calls' results committed to benchmarks/results/, `python benchmarks/gpu_goals.py
# --junit <call 1's tests.xml>` makes the scorecard of the two together.
# --dry-run prints the folder, the budgets and every stage's command, and runs nothing.
#
# A second call, to give one stage the time the first did not (the machine may be a fresh one:
# keep install in the list):  BUDGET_TESTS=300 TOTAL=340 bash benchmarks/gpu_check.sh --stages install,tests

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

ALL_STAGES="install stamp tests kernels gpu_peers generate peer"
STAGES="install stamp tests kernels generate peer"  # the default: call 1
DRY=0
RESULTS=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --stages) STAGES=${2//,/ }; shift ;;
        --stages=*) STAGES=${1#--stages=}; STAGES=${STAGES//,/ } ;;
        -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) RESULTS=$1 ;;
    esac
    shift
done
for s in $STAGES; do
    case " $ALL_STAGES " in *" $s "*) ;; *) echo "gpu_check: unknown stage '$s'; stages: $ALL_STAGES" >&2; exit 2 ;; esac
done
RESULTS=${RESULTS:-${OUT:-benchmarks/results/gpu_check/$(date -u +%Y-%m-%dT%H%MZ)}}

declare -A BUDGET=([install]=${BUDGET_INSTALL:-20} [stamp]=${BUDGET_STAMP:-10} [tests]=${BUDGET_TESTS:-150}
                   [kernels]=${BUDGET_KERNELS:-55} [gpu_peers]=${BUDGET_GPU_PEERS:-90} [generate]=${BUDGET_GENERATE:-60}
                   [peer]=${BUDGET_PEER:-45})
PACK_RESERVE=${PACK_RESERVE:-5}
TOTAL=${TOTAL:-345}
GRACE=${GRACE:-5}  # seconds between SIGINT and SIGKILL
BENCH_OUT=${BENCH_OUT:-benchmarks/results}  # where the benchmarks write (copied from there into the results folder)
NPROC=$(nproc 2>/dev/null || echo 2)
WORKERS=$(( NPROC >= 8 ? NPROC - 4 : (NPROC >= 2 ? NPROC : 1) ))
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
PY=${PYTHON:-python3}
RESULT_FILES="bench_kernels_cuda.json bench_kernels_cuda.md generate_cuda.json generate_cuda.md peer_transformers_cuda.json peer_transformers_cuda.md peer_gpu_kernels_cuda.json peer_gpu_kernels_cuda.md gpu_goals_cuda.json gpu_goals_cuda.md"

declare -A CMD
TCACHE=${GPU_CHECK_TCACHE:-/tmp/bitnet-triton-cache}  # (benchmarks/warm_triton_cache.py's CACHE_DIR, where it was built)
TCACHE_ARCHIVE=${GPU_CHECK_TCACHE_ARCHIVE:-.tcache/triton-cache-sm90.tar.xz}
CMD[install]="if ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; else echo 'no .whl/*.whl carried'; fi
if [ -f $TCACHE_ARCHIVE ]; then mkdir -p $TCACHE && $PY -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter=\"data\")' $TCACHE_ARCHIVE $TCACHE && echo \"Triton cache carried: \$(ls -d $TCACHE/*/ | wc -l) entries into $TCACHE\"; else echo 'no Triton cache carried ($TCACHE_ARCHIVE)'; fi
$PY -m pip install --no-index --no-deps --no-build-isolation -e . && $PY -c 'import bitnet, bitnet.kernels, gguf; print(\"bitnet\", bitnet.__file__, \"gguf\", gguf.__file__)'"
CMD[stamp]="nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvidia-smi | head -n 12
$PY -c 'import platform, torch, triton, transformers; print(\"python\", platform.python_version(), \"| torch\", torch.__version__, \"cuda\", torch.version.cuda, \"| triton\", triton.__version__, \"| transformers\", transformers.__version__); print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, torch.cuda.get_device_capability(0) if torch.cuda.is_available() else \"\"); p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; print(\"SMs\", p and p.multi_processor_count, \"| shared memory a program\", p and getattr(p, \"shared_memory_per_block_optin\", None), \"| L2\", p and getattr(p, \"L2_cache_size\", None))'
$PY -c 'import torch; from bitnet.ops import describe_gpu_backend; print(\"packed layers on\", describe_gpu_backend(\"cuda\") if torch.cuda.is_available() else None)'
echo \"commit \$(git rev-parse HEAD 2>/dev/null || echo \${GIT_COMMIT:-unknown: no .git here, pass GIT_COMMIT=<hash>})\"
echo \"cpus $NPROC; \$(grep -m1 'model name' /proc/cpuinfo)\"; free -g | head -n 2; df -h /tmp | tail -n 1
$PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|numpy|setuptools|pytest|pytest-xdist|pytest-timeout|gguf|bitnet.*|accelerate|safetensors) '
$PY benchmarks/gpu_wheels.py --check
if [ -f $TCACHE/manifest.json ]; then $PY -c 'import json, sys, triton; from triton.runtime.cache import triton_key; m = json.load(open(sys.argv[1])); print(\"Triton cache carried:\", m[\"entries\"], \"kernels built with Triton\", m[\"triton\"], \"Python\", m[\"python\"], \"for\", m[\"sms\"], \"SMs, commit\", m.get(\"commit\"), \"| this Triton\", \"is the one that built it\" if m[\"triton_key\"] == triton_key() else \"is NOT the one that built it (no entry will be found)\")' $TCACHE/manifest.json; fi"
TESTS_DESELECT=${TESTS_DESELECT-"--deselect tests/test_compile_guard.py::test_every_kernel_compiles_for_sm90_and_sm80 --deselect tests/test_compile_guard.py::test_every_launch_of_a_run_compiles_for_sm90 --deselect tests/test_compile_guard.py::test_a_gpu_with_99_kb_of_shared_memory_is_given_tiles_that_fit"}
CMD[tests]="BITNET_TUNING_DIR=off $PY -m pytest -q -n $WORKERS -p no:cacheprovider --timeout $TEST_TIMEOUT -rfs --durations=20 --junitxml=@LOGS@/tests.xml $TESTS_DESELECT"
CMD[kernels]="$PY benchmarks/bench_kernels.py --device cuda --shapes 2560x6912 6912x2560 8192x8192 28672x8192 --m 1 16 2048 --formats 2bit --m1-formats 1.6bit 1bit --attention --heads --name bench_kernels_cuda --out-dir $BENCH_OUT"
CMD[gpu_peers]="$PY benchmarks/peer_gpu_kernels.py --budget-s \$(( \${STAGE_SECONDS:-90} - 20 )) --out-dir $BENCH_OUT"
CMD[generate]="HF_HUB_OFFLINE=1 $PY benchmarks/bench_generate.py --device cuda --preset 2b4t --models ${GENERATE_MODELS:-bitnet bf16} --batch 1 8 --compile --new-tokens 32 --warmup 2 --iters 3 --out-dir $BENCH_OUT"
CMD[peer]="HF_HUB_OFFLINE=1 $PY benchmarks/peer_transformers.py --device cuda --preset 2b4t --new-tokens 32 --iters 2 --out-dir $BENCH_OUT"

selected() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if [ "$DRY" = 1 ]; then
    echo "gpu_check (dry run): results folder $RESULTS; total budget ${TOTAL}s; $WORKERS test workers"
    sum=$PACK_RESERVE
    for s in $ALL_STAGES; do
        if selected "$s"; then
            sum=$(( sum + BUDGET[$s] ))
            echo "stage $s: budget ${BUDGET[$s]}s"
            echo "${CMD[$s]//@LOGS@/<logs>}" | sed 's/^/    /'
        else
            echo "stage $s: not selected"
        fi
    done
    echo "sum of the selected budgets (with ${PACK_RESERVE}s for packing): ${sum}s of ${TOTAL}s"
    echo "then, at most 10s: $PY benchmarks/gpu_goals.py over this call's results (and the tests' tests.xml)"
    exit 0
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -f "$TCACHE_ARCHIVE" ] && export TRITON_CACHE_DIR=$TCACHE  # (unpacked by the install stage; a warm machine's next call finds this one's compiles there too)
[ -d .whl ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT  # the logs live on in logs.tar.gz
LOGS=$WORK/logs
mkdir -p "$LOGS"
export BITNET_TUNING_DIR=$WORK/tuning  # this call's autotuning choices, and an earlier call's on this machine (pack: results/tuning)
KEEP=${GPU_CHECK_KEEP-$HOME/.cache/bitnet/gpu_check_tuning}  # where a later call on this machine finds them
case ${KEEP,,} in off|0|none) KEEP="" ;; esac
mkdir -p "$BITNET_TUNING_DIR"
if [ -n "$KEEP" ] && ls "$KEEP"/*.json >/dev/null 2>&1; then
    cp "$KEEP"/*.json "$BITNET_TUNING_DIR/"
    echo "gpu_check: autotuning choices of an earlier call on this machine: $(cd "$KEEP" && echo *.json) (from $KEEP)"
fi
MARK=$WORK/start-mark
touch "$MARK"
T0=$(now)
declare -A STATUS SECS ALLOT NOTE

test_summary() {  # the pytest summary line, e.g. "3 failed, 400 passed, 5 skipped in 85.20s"
    grep -E '(passed|failed|errors?|skipped|no tests ran|interrupted).* in [0-9.]+s' "$LOGS/tests.log" 2>/dev/null \
        | tail -n 1 | sed -E 's/^=+ //; s/ =+$//'
}

write_summary() {
    {
        echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo
        echo '```'
        cat "$LOGS/stamp.log" 2>/dev/null || echo "(no stamp)"
        echo '```'
        echo
        echo "| stage | status | seconds | allotted | note |"
        echo "|---|---|---|---|---|"
        for s in $ALL_STAGES; do
            selected "$s" && echo "| $s | ${STATUS[$s]:-not run} | ${SECS[$s]:-} | ${ALLOT[$s]:-} | ${NOTE[$s]:-} |"
        done
        echo
        if [ -f "$TCACHE/manifest.json" ] && [ "${TRITON_CACHE_DIR:-}" = "$TCACHE" ]; then
            echo "Triton cache (kernels): $(grep -o '"entries": [0-9]*' "$TCACHE/manifest.json" | grep -o '[0-9]*') carried," \
                "$(find "$TCACHE" -mindepth 2 -maxdepth 2 -name '*.cubin' -newer "$MARK" | wc -l) compiled by this call"
            echo
        fi
        if [ -f "$LOGS/tests.log" ]; then
            echo "Tests: $(test_summary)"
            echo
            grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" | head -n 40 | sed 's/^/- /'
            # why tests skipped (pytest -rs groups them: "SKIPPED [count] file:line: reason")
            if grep -q -E '^SKIPPED ' "$LOGS/tests.log"; then
                echo
                echo "Skipped, by reason:"
                grep -E '^SKIPPED ' "$LOGS/tests.log" | head -n 25 | sed 's/^/- /'
            fi
        fi
        # the package's fallbacks, each logged once a process: PDL or direct launches off, graphs not recorded
        local fallbacks
        fallbacks=$(grep -h -o -E "(programmatic dependent launch|direct Triton launches) do(es)? not work[^;(]*|recording [^;]* (failed|succeeded)[^:;]*" \
            "$LOGS"/*.log 2>/dev/null | sort | uniq -c | head -n 8)
        if [ -n "$fallbacks" ]; then
            echo
            echo "Fallbacks logged (count, message):"
            echo '```'
            echo "$fallbacks"
            echo '```'
        fi
    } > "$RESULTS/summary.md"
}

pack() {  # the results folder: summary.md, logs.tar.gz, results.tar.gz and this run's tables; never more than 8 files
    local f src fresh=0
    mkdir -p "$WORK/results"
    for f in $RESULT_FILES; do
        src=$BENCH_OUT/$f
        if [ -f "$src" ] && [ "$src" -nt "$MARK" ]; then
            cp "$src" "$WORK/results/$f"
            fresh=1
            case $f in
                *.md) [ "$(cd "$BENCH_OUT" && pwd)" != "$RESULTS" ] && cp "$src" "$RESULTS/$f" ;;
            esac
        fi
    done
    if ls "$BITNET_TUNING_DIR"/*.json >/dev/null 2>&1; then
        mkdir -p "$WORK/results/tuning" && cp "$BITNET_TUNING_DIR"/*.json "$WORK/results/tuning/" && fresh=1
        [ -n "$KEEP" ] && mkdir -p "$KEEP" && cp "$BITNET_TUNING_DIR"/*.json "$KEEP/"
    fi
    [ "$fresh" = 1 ] && tar -czf "$RESULTS/results.tar.gz" -C "$WORK" results
    src=$BENCH_OUT/bench_kernels_cuda.png
    [ -f "$src" ] && [ "$src" -nt "$MARK" ] && cp "$src" "$LOGS/"
    write_summary
    cp "$RESULTS/summary.md" "$LOGS/"
    tar -czf "$WORK/logs.tar.gz" -C "$WORK" logs && cp "$WORK/logs.tar.gz" "$RESULTS/logs.tar.gz"
}

later_budgets() {  # the budgets of the selected stages after $1, plus the packing reserve
    local after=0 sum=$PACK_RESERVE
    for s in $ALL_STAGES; do
        if [ "$after" = 1 ] && selected "$s"; then sum=$(( sum + BUDGET[$s] )); fi
        [ "$s" = "$1" ] && after=1
    done
    echo $sum
}

run_stage() {
    local s=$1 start allot rc
    local elapsed=$(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%d", b - a }')
    allot=$(( TOTAL - elapsed - $(later_budgets "$s") ))
    [ "$allot" -gt $(( BUDGET[$s] * 3 )) ] && allot=$(( BUDGET[$s] * 3 ))  # carried-over time: at most 3x its own
    ALLOT[$s]=$allot
    if [ "$allot" -le $(( GRACE + 1 )) ]; then
        STATUS[$s]="skipped"; NOTE[$s]="no time left (${allot}s)"; echo "=== $s: skipped, ${allot}s left for it"; return
    fi
    echo "=== $s: up to ${allot}s (budget ${BUDGET[$s]}s; ${elapsed}s elapsed)"
    start=$(now)
    STAGE_SECONDS=$(( allot - GRACE )) timeout -s INT -k $GRACE $(( allot - GRACE )) bash -c "${CMD[$s]//@LOGS@/$LOGS}" > "$LOGS/$s.log" 2>&1
    rc=$?
    SECS[$s]=$(since "$start")
    case $rc in
        0) STATUS[$s]=ok ;;
        124|137) STATUS[$s]="TIMEOUT"; NOTE[$s]="stopped at ${allot}s" ;;
        *) STATUS[$s]="FAIL (rc $rc)" ;;
    esac
    [ "$s" = tests ] && NOTE[$s]="$(test_summary)${NOTE[$s]:+; ${NOTE[$s]}}"
    [ "$s" = stamp ] && grep -v '^$' "$LOGS/stamp.log" | head -n 8
    tail -n 3 "$LOGS/$s.log" | cut -c1-200 | sed 's/^/    /'
    echo "=== $s: ${STATUS[$s]} in ${SECS[$s]}s"
    pack
}

echo "gpu_check: results in $RESULTS, logs in $LOGS; total budget ${TOTAL}s; stages: $STAGES"
for s in $ALL_STAGES; do
    selected "$s" && run_stage "$s"
done
pack
# the goals against this call's results (those pack just gathered), and the tests' verdict where they
# ran: ~3 s, bounded to 10 within the 15 s between TOTAL and the device call's 360 (results.tar.gz is
# complete before it: a call stopped here loses only the goals' table)
JUNIT=""
[ -f "$LOGS/tests.xml" ] && JUNIT="--junit $LOGS/tests.xml"
timeout -k 1 10 $PY benchmarks/gpu_goals.py --results "$WORK/results" $JUNIT --out-dir "$BENCH_OUT" > "$LOGS/goals.log" 2>&1 \
    || echo "gpu_goals failed (rc $?): see logs/goals.log"
pack

# The tail of the output is what the device tool returns: result tables first, the stage table last.
for f in bench_kernels_cuda.md peer_gpu_kernels_cuda.md generate_cuda.md peer_transformers_cuda.md gpu_goals_cuda.md; do
    [ -f "$RESULTS/$f" ] && { echo; echo "----- $f"; cat "$RESULTS/$f"; }
done
if [ -f "$LOGS/tests.log" ]; then
    echo; echo "----- failed tests (of $(grep -c -E '^(FAILED|ERROR) ' "$LOGS/tests.log"))"
    grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" | head -n 15 | cut -c1-160
fi
echo
printf '%-9s %-14s %8s %9s  %s\n' stage status seconds allotted note
for s in $ALL_STAGES; do
    selected "$s" && printf '%-9s %-14s %8s %9s  %s\n' "$s" "${STATUS[$s]:-not run}" "${SECS[$s]:-}" "${ALLOT[$s]:-}" "${NOTE[$s]:-}"
done
printf '%-9s %-14s %8s %9s\n' total "" "$(since "$T0")" "$TOTAL"
echo "results: $RESULTS ($(ls "$RESULTS" | wc -l) files)"
