"""The linters and formatters (issue 12): pre-commit and the 'lint' extra pin the same
versions, and with this repository's settings each tool rejects what it should.

The whole tree is checked by `pre-commit run --all-files` in .ci/run; these tests keep the
configuration honest (a hook whose version drifted from the extra, or a setting that makes
a tool accept anything, fails here). They skip where the 'lint' extra is not installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r'"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.]+)"')


def _lint_extra() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^lint = \[(.*)\]$", text, re.M)
    assert line, "pyproject.toml has no 'lint' extra"
    return dict(PIN.findall(line.group(1)))


def _hook_pins() -> dict[str, str]:
    text = (ROOT / ".pre-commit-config.yaml").read_text()
    pins: dict[str, str] = {}
    for deps in re.findall(r"additional_dependencies: \[(.*)\]", text):
        pins.update(PIN.findall(deps))
    return pins


def test_hooks_pin_the_versions_of_the_lint_extra():
    extra, hooks = _lint_extra(), _hook_pins()
    assert set(hooks) == {"ruff", "cython-lint", "clang-format"}
    assert "pre-commit" in extra
    for tool, version in hooks.items():
        assert extra.get(tool) == version, (tool, version, extra.get(tool))


def test_generated_header_is_left_to_its_generator():
    # clang-format would rewrite it, and tests/test_formats.py compares it byte for byte
    text = (ROOT / ".pre-commit-config.yaml").read_text()
    assert r"exclude: ^csrc/formats/q8_maps\.h$" in text
    assert (ROOT / "csrc/formats/q8_maps.h").exists()


def _tool(name: str) -> str:
    # the console script next to this interpreter, else on PATH
    here = Path(sys.executable).parent / name
    path = str(here) if here.exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[lint]')")
    return path


def _run(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_ruff_flags_a_long_line_and_an_unused_import():
    ruff = _tool("ruff")
    ok = _run([ruff, "check", "--stdin-filename", "src/fastadam/x.py", "-"], "X = 1\n")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = "import os\nX = '" + "a" * 100 + "'\n"
    out = _run([ruff, "check", "--stdin-filename", "src/fastadam/x.py", "-"], bad)
    assert out.returncode == 1
    assert "F401" in out.stdout and "E501" in out.stdout


def test_ruff_format_wants_double_quotes_at_100_columns():
    ruff = _tool("ruff")
    args = [ruff, "format", "--check", "--stdin-filename", "src/fastadam/x.py", "-"]
    assert _run(args, 'f(aaaa, "' + "b" * 80 + '")\n').returncode == 0  # 94 columns: one line
    assert _run(args, "f(aaaa, '" + "b" * 80 + "')\n").returncode == 1  # single quotes
    assert _run(args, 'f(aaaa, "' + "b" * 90 + '")\n').returncode == 1  # 104: split


def test_clang_format_keeps_the_core_as_it_is_and_refuses_a_change():
    clang_format = _tool("clang-format")
    path = ROOT / "csrc/engine.c"
    good = path.read_text()
    args = [clang_format, "--dry-run", "-Werror", f"--assume-filename={path}"]
    out = _run(args, good)
    assert out.returncode == 0, out.stderr[:2000]
    out = _run(args, good.replace("    ", "  ", 1))
    assert out.returncode != 0


def test_cython_lint_flags_two_statements_on_a_line(tmp_path):
    cython_lint = _tool("cython-lint")
    pyx = tmp_path / "x.pyx"
    pyx.write_text("cdef int f(int a):\n    a += 1; return a\n")
    out = subprocess.run([cython_lint, str(pyx)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "E702" in out.stdout + out.stderr
    core = subprocess.run(
        [cython_lint, "src/fastadam/_core.pyx", "src/fastadam/_cfastadam.pxd"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert core.returncode == 0, core.stdout + core.stderr
