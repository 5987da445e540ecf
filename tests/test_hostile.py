"""Runs the hostile fuzz suite (tests/hostile_fuzz.py) in subprocesses.

Every public entry point gets garbage; the only allowed outcomes are success or a
TypeError/ValueError that leaves every buffer bit-identical and the optimizer usable
(see hostile_fuzz.py). It runs in a child process so that a crash (a signal) or a hang
fails the test here instead of killing the run; one child per area so that a failure
points somewhere. The child's output is printed when it fails.

FASTADAM_HOSTILE_EXAMPLES=<factor> scales the number of examples (default 1);
FASTADAM_HOSTILE_TIMEOUT=<seconds> the limit per child (default 600).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FUZZ = HERE / "hostile_fuzz.py"
ROOT = HERE.parent
TIMEOUT = float(os.environ.get("FASTADAM_HOSTILE_TIMEOUT", "600"))


def _run(selection):
    # pytest collects a file named on the command line even though hostile_fuzz.py
    # does not match python_files; the child inherits pyproject's settings
    # (filterwarnings = error, strict markers) since it runs from the repository root.
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(FUZZ),
        "-k",
        selection,
    ]
    env = dict(os.environ)
    env.setdefault("FASTADAM_HOSTILE_WATCHDOG", str(max(TIMEOUT - 30, 30)))
    # the draws are derandomized, yet they still depend on Python's hash seed (with
    # PYTHONHASHSEED=6 the suite drew a case that seeds 0-5 did not): fix it, so that a run
    # is the same every time
    env.setdefault("PYTHONHASHSEED", "0")
    try:
        r = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(
            f"the hostile suite {selection!r} hung (no result after {TIMEOUT:.0f} s):\n{out or ''}",
            pytrace=False,
        )
    if r.returncode < 0:
        pytest.fail(
            f"the hostile suite {selection!r} crashed with signal {-r.returncode}:\n{r.stdout}",
            pytrace=False,
        )
    if r.returncode != 0:
        pytest.fail(
            f"the hostile suite {selection!r} failed (exit status {r.returncode}):\n{r.stdout}",
            pytrace=False,
        )


def test_hostile_numpy_api():
    """Adam/AdamW construction, step, add_param_group, load_state_dict; clip_grad_norm_;
    aligned_zeros."""
    _run("numpy_api")


def test_hostile_functional():
    """fastadam.adam_step, and its agreement with Adam on every option value."""
    _run("functional")


def test_hostile_torch():
    """fastadam.torch.Adam/AdamW construction, step (garbage .grad, grad_scale, found_inf,
    state, options) and load_state_dict."""
    pytest.importorskip("torch", reason="torch is not installed")
    _run("torch")
