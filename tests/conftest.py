"""Shared fixtures: every test that takes `isa` runs once per SIMD path usable here."""

import numpy as np
import pytest

import fastadam
from fastadam import _core

AVAILABLE = fastadam.config()["simd_available"]


def pytest_report_header(config):
    c = fastadam.config()
    return (
        f"fastadam {c['version']}: SIMD path in use {c['simd']} "
        f"(usable: {', '.join(c['simd_available'])}; compiled: {', '.join(c['simd_compiled'])}); "
        f"OpenMP {'on' if c['openmp'] else 'off'}, max_threads {c['max_threads']}"
    )


@pytest.fixture(params=AVAILABLE)
def isa(request):
    """Index of one usable SIMD path (the test id names it)."""
    return _core.isa_index(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20150101)
