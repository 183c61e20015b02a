"""The embedded default corpus: docstrings of Python's own standard library.

Real English prose about programming, present on every Python install, no download. Read with
`ast` from the standard library's source files (nothing is imported or executed), in sorted file
order, so the text is the same on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo",
             "ensurepip", "pydoc_data", "encodings"}


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(max_chars: int = 2_000_000) -> str:
    """Module, class and function docstrings of the standard library, up to `max_chars`."""
    root = sysconfig.get_paths()["stdlib"]
    parts: list[str] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        parts.append(doc.strip() + "\n\n")
                        size += len(parts[-1])
                        if size >= max_chars:
                            return "".join(parts)
    if not parts:
        raise RuntimeError(f"no docstrings found under the standard library at {root}")
    return "".join(parts)
