"""The wheels a bare GPU machine lacks for this package and its test suite, downloaded for it.

    python benchmarks/gpu_wheels.py                  # -> .whl/*.whl (git-ignored), carried to the GPU machine
    python benchmarks/gpu_wheels.py --dry-run        # what would be downloaded, and why

The device tool's machines have no network. Their image holds torch, Triton, transformers and
a long list of packages (the device tool's KINDS.md, "Python packages already there"), but not
everything this package's requirements and its `dev` extra pull in: without fastapi, uvicorn,
sse-starlette and openai there, tests/test_serve.py skips whole (its GPU test too), and
benchmarks/bench_serve.py cannot start. This script walks the requirements of the installed
`bitnet-b158` distribution with the `dev` and `serve` extras, transitively, through the
distributions installed in this environment (the versions CI tests with), with the GPU machine's
environment markers (CPython 3.12 on x86-64 Linux), drops what the image already has, and
downloads each remaining one at this environment's version as a wheel for that machine
(`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`). gpu_check.sh's install
stage installs .whl/*.whl into /tmp/site and puts it on PYTHONPATH; its stamp then says which of
the suite's optional modules still fail to import.

Run it where pip reaches the package index, in the environment the tests pass in (`pip install -e
".[dev]"`). The image's list is read from --have (KINDS.md, or any file of `pip list` / `pip freeze`
lines); `--have none` downloads every requirement but torch, Triton and NVIDIA's libraries.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "bitnet-b158"
EXTRAS = ("dev", "serve")
KINDS_MD = "/work/.library/device/KINDS.md"  # the device tool's description of its machines
# the GPU machine's interpreter (KINDS.md: Python 3.12 on x86-64 Linux)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "linux_x86_64", "any")
# what the suite and the device script import where present (importorskip, or a stage's needs); the
# check imports each (a carried wheel may fail inside its own import) but those LOCATED only, whose
# import costs the stamp's seconds (accelerate imports torch)
OPTIONAL_MODULES = ("gguf", "fastapi", "uvicorn", "sse_starlette", "prometheus_client", "openai", "httpx", "hypothesis",
                    "xdist", "accelerate")
LOCATED = ("accelerate",)
NEVER = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")  # the image's own CUDA stack, never carried


def image_packages(path: str | None) -> set[str] | None:
    """The names the GPU machine's image holds: KINDS.md's "Packages: a, b, ..." list, or a file of
    `pip list` / `pip freeze` lines; None when there is no such file."""
    if not path or not Path(path).is_file():
        return None
    text = Path(path).read_text()
    listed = re.search(r"\bPackages: ([^\n]+)", text)
    if listed:
        return {canonicalize_name(n.strip().rstrip(".")) for n in listed.group(1).split(",") if n.strip()}
    names = set()
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==|\s)\s*\S", line)
        if m and m.group(1).lower() != "package":  # (pip list's header)
            names.add(canonicalize_name(m.group(1)))
    return names or None


def closure(have: set[str] | None = None, root: str = DISTRIBUTION, extras=EXTRAS,
            markers: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """{name: version installed here} of every requirement of `root` with `extras`, transitively,
    under the GPU machine's markers; and the requirements this environment does not meet (not
    installed, or at a version outside what a requirer asks), each saying so. A package the image
    holds (`have`) is listed but not walked: its own requirements are the image's (this
    environment's newer transformers, say, may want packages the image's does not). `markers`:
    the environment markers to read requirements with (default: the GPU machine's, TARGET)."""
    env = {**default_environment(), **(TARGET if markers is None else markers)}
    found: dict[str, str] = {}
    unmet: set[str] = set()
    todo: list[tuple[str, tuple[str, ...], Requirement | None]] = [(root, tuple(extras), None)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, want, req = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            unmet.add(f"{name} (not installed{f'; {req.name}{req.specifier} wanted' if req and req.specifier else ''})")
            continue
        if req is not None and req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            unmet.add(f"{name} {dist.version} (wanted {req.name}{req.specifier})")
        canonical = canonicalize_name(name)
        if (canonical, want) in seen:
            continue
        seen.add((canonical, want))
        if canonical != canonicalize_name(root):
            found[canonical] = dist.version
            if (have is not None and canonical in have) or NEVER.match(canonical):
                continue  # (the image's, or its CUDA stack: their requirements are the image's too)
        for spec in dist.requires or []:
            r = Requirement(spec)
            if r.marker is not None and not any(r.marker.evaluate({**env, "extra": e}) for e in (want or ("",))):
                continue
            todo.append((r.name, tuple(sorted(r.extras)), r))
    return found, sorted(unmet)


def plan(found: dict[str, str], have: set[str] | None) -> list[tuple[str, str]]:
    """(name, version) to download: what the image lacks, never its CUDA stack."""
    return sorted((n, v) for n, v in found.items() if not NEVER.match(n) and (have is None or n not in have))


def check() -> int:
    """On the GPU machine (gpu_check.sh's stamp): which requirements of the package and its extras
    this environment does not meet, and which of the suite's optional modules do not import (the
    tests that need them skip). 0 if none."""
    _, unmet = closure(markers=default_environment())
    bad = []
    for name in OPTIONAL_MODULES:
        try:
            if name in LOCATED:
                if importlib.util.find_spec(name) is None:
                    raise ModuleNotFoundError(f"No module named {name!r}")
            else:
                importlib.import_module(name)
        except Exception as e:  # not only ImportError: a carried wheel may fail inside its own import
            bad.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    print(f"requirements of {DISTRIBUTION}[{','.join(EXTRAS)}]: " + ("all met" if not unmet else "NOT met: " + "; ".join(unmet)))
    print("the suite's optional modules: " + ("all import" if not bad else
          "NOT importable, their tests skip: " + "; ".join(bad) + " (carry wheels: benchmarks/gpu_wheels.py)"))
    return int(bool(unmet or bad))


def other_versions(folder: Path, wanted: list[tuple[str, str]]) -> list[Path]:
    """The wheels in `folder` of a package the plan downloads, at another version (a wheel's file
    name starts `{name}-{version}-`, the name with underscores)."""
    versions = dict(wanted)
    stale = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if versions.get(canonicalize_name(name), version) != version:
            stale.append(wheel)
    return stale


def download(wanted: list[tuple[str, str]], out: Path) -> int:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(out), "-q"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return subprocess.call(cmd + [f"{n}=={v}" for n, v in wanted])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / ".whl"), help="where the wheels go (default .whl, git-ignored)")
    p.add_argument("--have", default=KINDS_MD, help="the image's package list: KINDS.md, or `pip list` / `pip freeze` "
                                                     f"output (default {KINDS_MD}; 'none': carry every requirement)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    p.add_argument("--check", action="store_true", help="on the GPU machine: the requirements not met there and the "
                                                         "suite's optional modules that do not import; downloads nothing")
    args = p.parse_args(argv)
    try:
        metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        p.error(f"{DISTRIBUTION} is not installed in this environment: pip install -e '.[dev]' first")
    if args.check:
        return check()
    have = None if args.have.lower() == "none" else image_packages(args.have)
    if have is None and args.have.lower() != "none":
        p.error(f"no list of the GPU image's packages in {args.have!r}: pass --have FILE (the device tool's KINDS.md, "
                "or `pip list` output from that machine), or --have none to carry every requirement but the CUDA "
                "stack (it then shadows the image's own versions, and may not fit the 64 MiB a call carries)")
    found, unmet = closure(have)
    wanted = plan(found, have)
    print(f"{len(found)} requirements of {DISTRIBUTION}[{','.join(EXTRAS)}] under CPython 3.12 on x86-64 Linux; "
          + (f"the image holds {len(found) - len(wanted)} of them ({args.have})" if have is not None
             else f"no image list read ({args.have}): every one but the CUDA stack is carried"))
    if unmet:
        print(f"not met in this environment (pip install -e '.[dev]', then run again): {'; '.join(unmet)}")
    print(f"to carry ({len(wanted)}): " + (", ".join(f"{n}=={v}" for n, v in wanted) or "nothing"))
    if args.dry_run or not wanted:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in other_versions(out, wanted):  # two versions of one package stop the install stage's pip
        print(f"removing {stale.name} (another version of a wheel this plan downloads)")
        stale.unlink()
    rc = download(wanted, out)
    if rc:
        print(f"pip download failed (exit status {rc}); the wheels it did fetch are in {out}", file=sys.stderr)
        return rc
    wheels = list(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"-> {out}: {len(wheels)} wheels, {size:.1f} MiB; carry it with .peers and .tcache (64 MiB a call in all, "
          "the working tree included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
