"""The install works where the GPU machines install: offline, `pip install --no-build-isolation`,
with whatever setuptools the machine has (older than 77 on the first one lent).

- default tier: pyproject.toml asks nothing of setuptools beyond its [build-system] floor (the
  SPDX string form of `license` needs setuptools >= 77: "project.license must be valid exactly by
  one definition" with older ones);
- slow tier: a wheel built with exactly that floor of setuptools, in a venv of its own, no build
  isolation, and the wheel holds the kernels' sources under bitnet/kernels (CI runs it as a step).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setuptools_floor(project: dict) -> tuple[int, ...]:
    for req in project["build-system"]["requires"]:
        m = re.fullmatch(r"setuptools\s*>=\s*([0-9.]+)", req.strip())
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    raise AssertionError(f"no setuptools floor in [build-system] requires: {project['build-system']['requires']}")


def test_license_field_builds_with_the_setuptools_floor():
    project = _pyproject()
    floor = _setuptools_floor(project)
    license = project["project"].get("license")
    if isinstance(license, str) or project["project"].get("license-files"):
        assert floor >= (77,), f"an SPDX license string needs setuptools >= 77, [build-system] says >= {floor}"


def test_every_subpackage_is_listed_for_the_wheel():
    # a subpackage missing from [tool.setuptools] packages is left out of a (non-editable) wheel,
    # and the CLI, which imports bitnet.serve, then fails on every command
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {"bitnet." + p.parent.name for p in (ROOT / "bitnet").glob("*/__init__.py")}
    assert found <= listed, f"subpackages not in [tool.setuptools] packages: {sorted(found - listed)}"


def test_distribution_name_is_not_pypis_bitnet():
    # PyPI's "bitnet" is an unrelated project: `pip install bitnet` must not be this package's name
    assert _pyproject()["project"]["name"] != "bitnet"


@pytest.mark.slow
def test_wheel_builds_offline_with_the_oldest_setuptools(tmp_path):
    project = _pyproject()
    floor = ".".join(map(str, _setuptools_floor(project)))
    floor = floor if floor.count(".") == 2 else floor + ".0"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", f"setuptools=={floor}", "wheel"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "wheel"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    r = subprocess.run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"setuptools {floor} could not build the package:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheel = next(out.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = [f"bitnet/kernels/tuned/{f.name}" for f in (ROOT / "kernels" / "tuned").glob("*.json")]  # (tuning.py)
    for member in ("bitnet/kernels/gemm.py", "bitnet/kernels/csrc/bitnet_cpu.cpp", "bitnet/kernels/compile_check.py",
                   "bitnet/kernels/tuning.py", "bitnet/train/trainer.py", "bitnet/serve/server.py", *shipped):
        assert member in names, f"{member} missing from {wheel.name}"
