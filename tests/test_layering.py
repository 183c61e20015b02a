"""The package's floors (README: Layout): every import goes down a floor or stays on its own, and
no imports close a circle. Read from the source with `ast`, nothing imported or executed; imports
inside functions count (a lazy import is still an import).

    1 ground    the math, atomic writes, config, argument dataclasses, the corpus: nothing of the package
    2 kernels   bitnet.kernels.* (every backend) over floor 1 only
    3 layers    ops (dispatch to the backends), bitlinear over ops, model over bitlinear
    4 library   checkpoint, convert, generation, evaluate, train/, ... over the model
    5 top       the command line and the package's __init__ (which attaches the model's methods)

scripts/ and benchmarks/ sit on top, over the installed package: they import `bitnet` and nothing
else of this repository, and never touch sys.path.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each top-level package of pyproject.toml's [tool.setuptools.package-dir] has its source.
PACKAGE_DIRS = {"bitnet": ROOT / "bitnet", "bitnet.kernels": ROOT / "kernels"}
FLOORS = {
    1: ("ground", ["bitnet.quant", "bitnet.packing", "bitnet.atomic", "bitnet.runlock", "bitnet.config", "bitnet.args", "bitnet.corpus",
                   "bitnet.hub"]),
    2: ("kernels", ["bitnet.kernels", "bitnet.kernels.*"]),
    3: ("layers", ["bitnet.ops", "bitnet.bitlinear", "bitnet.model"]),
    4: ("over the model", ["bitnet.checkpoint", "bitnet.convert", "bitnet.generation", "bitnet.evaluate",
                           "bitnet.train", "bitnet.train.*", "bitnet.experiment", "bitnet.report", "bitnet.plots",
                           "bitnet.bench", "bitnet.hf", "bitnet.gguf_export", "bitnet.serve", "bitnet.serve.*"]),
    5: ("top", ["bitnet.cli", "bitnet.commands", "bitnet.__main__", "bitnet"]),
}
THIN_DIRS = ("scripts", "benchmarks")  # thin over the library


# ----------------------------------------------------------------------------- the detector
def package_modules(package_dirs: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """{module name: (file, is a package __init__)} of every .py under the packages' folders
    (sub-folders count when they hold an __init__.py, as setuptools packages them)."""
    modules = {}
    for package, folder in package_dirs.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if (here / d / "__init__.py").is_file())
            parts = package.split(".") + list(here.relative_to(folder).parts)
            for f in sorted(filenames):
                if f.endswith(".py"):
                    name = parts if f == "__init__.py" else parts + [f[:-3]]
                    modules[".".join(name)] = (here / f, f == "__init__.py")
    return modules


def _known(name: str, known) -> str | None:
    """The longest prefix of the dotted `name` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def imports_of(tree: ast.AST, module: str, is_package: bool, known) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement in `tree`, anywhere."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, known)
                if target:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                target = _known(f"{base}.{alias.name}", known) if alias.name != "*" else None
                if target != f"{base}.{alias.name}":  # a name defined in `base`, not a submodule of it
                    target = _known(base, known)
                if target:
                    out.append((target, node.lineno))
    return list(dict.fromkeys(out))  # `from .x import a, b` is one import of x


def floor_of(module: str, floors=FLOORS) -> int | None:
    for floor, (_, patterns) in floors.items():
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return floor
    return None


def problems(edges: dict[str, list[tuple[str, str]]], floor: dict[str, int]) -> list[str]:
    """edges: {module: [(imported module, "file:line")]}; floor: {module: floor number}.
    One line per import that goes up a floor, then one per import circle."""
    out = []
    for a in sorted(edges):
        for b, where in edges[a]:
            if floor.get(a) is not None and floor.get(b) is not None and floor[b] > floor[a]:
                out.append(f"{where}: {a} (floor {floor[a]}) imports {b} (floor {floor[b]}), a floor above it")
    for cycle in cycles(edges):
        steps = [f"{a} -> {b} ({where})" for a, b, where in cycle]
        out.append("import circle: " + "; ".join(steps))
    return out


def cycles(edges: dict[str, list[tuple[str, str]]]) -> list[list[tuple[str, str, str]]]:
    """One circle [(a, b, where), ...] per strongly connected set of modules (Tarjan), self-imports
    included, each as the shortest circle through its first module."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            sccs.append(scc)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    found = []
    for scc in sccs:
        start = min(scc)
        if len(scc) == 1 and not any(w == start for w, _ in edges.get(start, ())):
            continue
        # breadth-first from start back to start, inside the set
        paths = {start: []}
        queue = [start]
        while queue:
            a = queue.pop(0)
            for b, where in edges.get(a, ()):
                if b == start:
                    found.append(paths[a] + [(a, b, where)])
                    queue = []
                    break
                if b in scc and b not in paths:
                    paths[b] = paths[a] + [(a, b, where)]
                    queue.append(b)
    return found


def package_graph(package_dirs=PACKAGE_DIRS):
    modules = package_modules(package_dirs)
    edges, trees = {}, {}
    for name, (path, is_package) in modules.items():
        trees[name] = ast.parse(path.read_text(), filename=str(path))
        edges[name] = [(target, f"{path.relative_to(ROOT)}:{line}")
                       for target, line in imports_of(trees[name], name, is_package, modules) if target != name]
    return modules, edges, trees


# ----------------------------------------------------------------------------- the house
def test_every_module_has_a_floor():
    modules, _, _ = package_graph()
    assert "bitnet.kernels.gemv" in modules and "bitnet.train.trainer" in modules
    homeless = [m for m in modules if floor_of(m) is None]
    assert not homeless, f"modules with no floor: {homeless}; add them to FLOORS here and to README's Layout"


def test_imports_go_down_and_close_no_circle():
    modules, edges, _ = package_graph()
    found = problems(edges, {m: floor_of(m) for m in modules})
    assert not found, "\n".join(found)


def test_kernels_import_only_the_ground_floor():
    """Said twice on purpose: the kernels are the floor that reached up before."""
    modules, edges, _ = package_graph()
    up = [f"{where}: {a} imports {b}" for a in modules if floor_of(a) == 2
          for b, where in edges[a] if floor_of(b) not in (1, 2)]
    assert not up, "\n".join(up)


def _path_tricks(tree: ast.AST, rel: str) -> list[str]:
    """sys.path / __path__ changes and PYTHONPATH settings: code that finds the package by where it sits."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            out.append(f"{rel}:{node.lineno}: uses sys.path")
        elif isinstance(node, ast.Name) and node.id == "__path__":
            out.append(f"{rel}:{node.lineno}: uses __path__")
        elif isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
            out.append(f"{rel}:{node.lineno}: sets or reads PYTHONPATH")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            out.append(f"{rel}:{node.lineno}: imports sys.path")
    return out


def test_the_package_does_not_depend_on_where_its_source_sits():
    modules, _, trees = package_graph()
    found = []
    for name, tree in trees.items():
        rel = str(modules[name][0].relative_to(ROOT))
        found += _path_tricks(tree, rel)
        # `kernels` alone is not this repository's folder once installed (it is a PyPI package)
        found += [f"{rel}:{n.lineno}: imports top-level `kernels`; it is bitnet.kernels" for n in ast.walk(tree)
                  if (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "kernels" for a in n.names))
                  or (isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").split(".")[0] == "kernels")]
    assert not found, "\n".join(found)


def test_scripts_and_benchmarks_are_thin_over_the_package():
    first_party = {"kernels", "tests", *THIN_DIRS}
    found, checked = [], 0
    for folder in THIN_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text(), filename=rel)
            checked += 1
            siblings = {p.stem for p in path.parent.glob("*.py")}
            found += _path_tricks(tree, rel)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level:
                    found.append(f"{rel}:{node.lineno}: relative import; import from bitnet")
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                for name in names:
                    if name.split(".")[0] in first_party | siblings:
                        found.append(f"{rel}:{node.lineno}: imports {name}; only `bitnet` of this repository")
    assert checked, "no scripts found"
    assert not found, "\n".join(found)


def test_bitnet_kernels_resolves_from_the_install_anywhere(tmp_path):
    """From a folder other than the checkout, with no PYTHONPATH: the install maps kernels/ to
    bitnet.kernels. Importing the package loads no Triton module (its names load on first use)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import sys, bitnet.kernels as k; assert 'triton' not in sys.modules, 'triton imported'; "
            "print(k.__file__); k.act_quant; assert 'bitnet.kernels.custom_ops' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parts[-2:] == ("kernels", "__init__.py"), r.stdout


def test_model_methods_are_attached_with_their_documentation():
    import inspect

    from bitnet import BitNetForCausalLM
    from bitnet.checkpoint import load_pretrained, save_pretrained
    from bitnet.convert import count_parameters, freeze
    from bitnet.generation import generate

    assert BitNetForCausalLM.save_pretrained is save_pretrained
    assert BitNetForCausalLM.generate is generate
    assert BitNetForCausalLM.freeze is freeze
    assert BitNetForCausalLM.num_parameters is count_parameters
    assert BitNetForCausalLM.from_pretrained.__doc__ == load_pretrained.__doc__
    assert list(inspect.signature(BitNetForCausalLM.from_pretrained).parameters) == ["path", "dtype", "device", "revision",
                                                                             "cache_dir", "local_files_only", "token"]


# ----------------------------------------------------------------------------- the detector can fail
FAKE_FLOORS = {1: ("ground", ["p.low", "p.low2"]), 2: ("kernels", ["p.k", "p.k.*"]), 3: ("top", ["p", "p.high"])}


def test_detector_reports_an_import_up_a_floor():
    edges = {"p.low": [("p.high", "p/low.py:3")], "p.high": [("p.low", "p/high.py:1")]}
    found = problems(edges, {m: floor_of(m, FAKE_FLOORS) for m in edges})
    assert found[0] == "p/low.py:3: p.low (floor 1) imports p.high (floor 3), a floor above it"
    assert any(f.startswith("import circle: p.high -> p.low (p/high.py:1); p.low -> p.high (p/low.py:3)") for f in found)


def test_detector_reports_a_circle_on_one_floor_and_passes_a_clean_graph():
    edges = {"p.low": [("p.low2", "a:1")], "p.low2": [("p.low", "b:2")], "p.k.x": [("p.low", "c:3")]}
    floor = {m: floor_of(m, FAKE_FLOORS) for m in edges}
    assert problems(edges, floor) == ["import circle: p.low -> p.low2 (a:1); p.low2 -> p.low (b:2)"]
    assert problems({"p.low": [("p.low2", "a:1")], "p.low2": [], "p.k.x": [("p.low", "c:3")]}, floor) == []
    assert cycles({"p.low": [("p.low", "a:1")]}) == [[("p.low", "p.low", "a:1")]]


def test_detector_resolves_relative_and_lazy_imports():
    known = {"p", "p.k", "p.k.x", "p.k.y", "p.low", "p.high"}
    src = ("from . import y\nfrom .y import thing\nfrom .. import low\nfrom ..high import f\nimport p.k.x as x\n"
           "import os\nfrom p import something\n\ndef lazy():\n    from ...p import high\n")
    got = imports_of(ast.parse(src), "p.k.x", False, known)
    assert got == [("p.k.y", 1), ("p.k.y", 2), ("p.low", 3), ("p.high", 4), ("p.k.x", 5), ("p", 7), ("p.high", 10)]
    # in a package's __init__, "." is the package itself
    assert imports_of(ast.parse("from . import x\nfrom .x import z"), "p.k", True, known) == [("p.k.x", 1), ("p.k.x", 2)]


def test_detector_sees_path_tricks():
    src = "import sys, os\nsys.path.insert(0, '..')\n__path__.append('x')\nos.environ['PYTHONPATH'] = '.'\n"
    assert len(_path_tricks(ast.parse(src), "s.py")) == 3


@pytest.mark.parametrize("module,floor", [("bitnet", 5), ("bitnet.kernels.cpu", 2), ("bitnet.train.data", 4),
                                          ("bitnet.quant", 1), ("bitnet.model", 3)])
def test_floor_map(module, floor):
    assert floor_of(module) == floor


def test_a_checkout_does_not_shadow_the_pypi_kernels_package():
    """Where `python -m` puts the repository root on sys.path (run there), `import kernels` is the
    PyPI package that transformers imports, not this repository's kernels/ folder (bitnet.kernels,
    which must still load from that folder)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed here: nothing for the checkout to shadow")
    code = "import kernels, bitnet.kernels; print(kernels.__file__); print(bitnet.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    top, ours = out.stdout.split()
    assert Path(top).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
