"""The docs hold: README.md and docs/*.md have no dead relative links (files and #anchors, made the
GitHub way), and every `bitnet <subcommand>` and `python scripts/...` / `python benchmarks/...`
command in their code blocks still exists (it answers --help with exit status 0)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGES = ("training", "formats", "kernels", "evaluation", "reliability", "results")  # one page per topic

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
SHELL = {"", "bash", "sh", "shell", "console", "text"}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code (what GitHub renders as links and headings)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (word characters, hyphens and
    spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text())):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")  # GitHub numbers repeated headings
    return out


def commands(text: str) -> list[str]:
    """Shell lines of the code blocks (a text block's `$ ` lines only), comments cut off, and the
    inline code spans of the prose that are commands (`bitnet ...`, `python ...`)."""
    lines = [m for m in re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
             if re.match(r"^(?:[A-Z_]+=\S+\s+)*(?:bitnet|python3?)\s", m)]
    for lang, body in code_blocks(text):
        if lang not in SHELL:
            continue
        for line in body.splitlines():
            if lang in ("text", "console"):
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            lines.append(re.sub(r"(^|\s)#(\s.*)?$", "", line))
    return lines


def test_the_pages_exist_and_the_readme_is_short():
    names = {p.stem for p in DOCS[1:]}
    assert set(PAGES) <= names, f"missing docs pages: {set(PAGES) - names}"
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    test = "python -m pytest -q -n auto"
    assert test in commands(readme)  # .ci/run runs the README's test command
    assert any(line.split(" ||")[0] == test for line in (ROOT / ".ci" / "run").read_text().splitlines())
    assert "bitnet-b158" in readme  # the distribution's name, not PyPI's unrelated `bitnet`
    for page in DOCS[1:]:  # each page opens with a runnable example: a code block before its first section
        text = page.read_text()
        first_section = text.find("\n## ")
        assert "```" in text[: first_section if first_section > 0 else len(text)], f"{page.name}: no example up front"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_dead_relative_links(doc):
    dead = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            dead.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not dead, f"{doc.name}: dead links: {dead}"


def test_slugs_as_github_makes_them():
    assert slug("The comparison (`bitnet compare`)") == "the-comparison-bitnet-compare"
    assert slug("Learning-rate sweeps: the defaults' evidence") == "learning-rate-sweeps-the-defaults-evidence"
    assert slug("GGUF for llama.cpp") == "gguf-for-llamacpp"
    assert slug("transformers models after `bitnet.patch`") == "transformers-models-after-bitnetpatch"


def _all_commands() -> list[str]:
    return [line for doc in DOCS for line in commands(doc.read_text())]


def test_every_bitnet_subcommand_in_the_docs_answers_help(capsys):
    subs = set()
    for line in _all_commands():
        subs |= set(re.findall(r"(?:^|[\s;&|(])bitnet\s+([a-z][a-z-]*)", line))
    assert {"compare", "train", "generate", "eval", "convert", "info", "memory"} <= subs  # the docs show each
    for sub in sorted(subs):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0, f"`bitnet {sub} --help` exited {e.value.code}"
    capsys.readouterr()


# Runs each script as __main__ with --help (and its first positional word, e.g. a sub-command) in one
# child process, so torch is imported once; a script that does not exit on --help is a failure.
DRIVER = r"""
import contextlib, io, json, runpy, sys
codes = {}
for argv in json.loads(sys.argv[1]):
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(argv[0], run_name="__main__")
        codes[" ".join(argv)] = "did not exit on --help"
    except SystemExit as e:
        codes[" ".join(argv)] = e.code or 0
    except Exception as e:
        codes[" ".join(argv)] = f"{type(e).__name__}: {e}"
print(json.dumps(codes))
"""


def test_every_script_in_the_docs_answers_help():
    runs = {}
    for line in _all_commands():
        for m in re.finditer(r"python3?\s+((?:scripts|benchmarks)/[\w./-]+\.py)((?:\s+[^\s-][^\s]*)?)", line):
            path, word = m.group(1), m.group(2).strip()
            assert (ROOT / path).is_file(), f"no script {path} (from: {line.strip()})"
            argv = [path] + ([word] if word and not word.startswith(("'", '"')) else []) + ["--help"]
            runs[" ".join(argv)] = argv
    assert runs, "no scripts found in the docs' code blocks"
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(list(runs.values()))], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    codes = json.loads(p.stdout.strip().splitlines()[-1])
    failed = {cmd: code for cmd, code in codes.items() if code != 0}
    assert not failed, f"scripts that do not answer --help: {failed}"
