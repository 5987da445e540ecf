"""pytest-benchmark suite over fastadam's kernels (not part of the default test run).

    python -m pytest bench/ --benchmark-only

FASTADAM_BENCH_SIZES (comma separated, default 1e3,1e5,1e6,1e7) chooses the single-tensor
sizes; FASTADAM_BENCH_THREADS (default "1,max") the thread counts.
"""

import os

import pytest

import fastadam

pytest.importorskip("pytest_benchmark")


def pytest_report_header(config):
    c = fastadam.config()
    return (
        f"fastadam {c['version']} bench: SIMD paths {c['simd_available']} (default "
        f"{c['simd']}), OpenMP {'on' if c['openmp'] else 'off'}, max_threads "
        f"{c['max_threads']}; FASTADAM_BENCH_SIZES="
        f"{os.environ.get('FASTADAM_BENCH_SIZES', '(default)')}, FASTADAM_BENCH_THREADS="
        f"{os.environ.get('FASTADAM_BENCH_THREADS', '(default)')}"
    )
