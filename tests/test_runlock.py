"""One writer per run folder (bitnet.runlock): a second writer gets a clear error naming the folder
and the holder; the lock goes away with its process, a SIGKILL included; two `bitnet train` started
on one --out at the same moment: one runs, the other exits with the lock error."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet.runlock import LOCK_NAME, RunLock, RunLockError

HOLD = "import sys, time; from bitnet.runlock import RunLock; l = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_gets_the_holders_pid_and_start(tmp_path):
    p = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunLockError) as e:
            RunLock(str(tmp_path / "run")).acquire()
        msg = str(e.value)
        assert str(tmp_path / "run") in msg and f"pid {p.pid}" in msg and "started " in msg
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with RunLock(str(tmp_path / "run")) as lock:  # released by the kernel when the holder died
        assert lock.holder()["pid"] == os.getpid()
    assert RunLock(str(tmp_path / "run")).holder() == {}  # emptied on release


def test_reentrant_in_one_object_and_released_on_exit(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    lock.acquire()
    with pytest.raises(RunLockError):
        RunLock(str(tmp_path)).acquire()  # another open file description: flock refuses it, same process too
    lock.release()
    RunLock(str(tmp_path)).acquire().release()
    assert (tmp_path / LOCK_NAME).exists()


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is not beside the checkout")
def test_two_trains_racing_on_one_folder(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:60_000])
    args = [sys.executable, "-m", "bitnet", "train", "--data", corpus, "--device", "cpu", "--preset", "tiny",
            "--seq-len", 64, "--micro-batch", 4, "--threads", 1, "--max-steps", 20, "--eval-every", 10,
            "--eval-windows", 2, "--no-progress", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run"]
    args = list(map(str, args))
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(rc for rc, _ in outs)
    assert codes[0] == 0 and codes[1] != 0, outs
    loser = next(o for rc, o in outs if rc != 0)
    winner = next(p for p, (rc, _) in zip(procs, outs) if rc == 0)
    assert f"is in use by pid {winner.pid}" in loser and "Traceback" not in loser, loser
    steps = [line for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(steps) == 20  # one run's metrics only, not two interleaved
