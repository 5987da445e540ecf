"""One Adam step of fastadam per benchmark: dtype x size x SIMD path x threads, plus the
model-shaped parameter sets, the memory-traffic roofline and torch's fused Adam (when torch
is installed) for comparison. Run with ``python -m pytest bench/ --benchmark-only``.

Each benchmark times ``fastadam.Adam.step(grads)`` (Python call included) on preallocated,
64-byte aligned buffers; ``extra_info`` carries the elements and bytes moved per step
(28 B/element float32, 56 float64) so that GB/s = bytes_per_step / mean.
"""

import os

import numpy as np
import pytest

import fastadam
from fastadam import _core
from fastadam.bench import BYTES_PER_ELEM, MODELS, Workload, _Filler


def _ints(env, default):
    cfg = fastadam.config()
    maxt = cfg["max_threads"] if cfg["openmp"] else 1
    out = []
    for tok in os.environ.get(env, default).split(","):
        tok = tok.strip().lower()
        if tok:
            out.append(maxt if tok == "max" else int(float(tok)))
    return list(dict.fromkeys(out))


SIZES = _ints("FASTADAM_BENCH_SIZES", "1e3,1e5,1e6,1e7")
THREADS = _ints("FASTADAM_BENCH_THREADS", "1,max")
SIMD = fastadam.config()["simd_available"]
DTYPES = ["float32", "float64"]


def _fmt(n):
    return Workload.tensor(n).label


def _setup(wl, dtype, threads, isa=None):
    fill_p, fill_g = _Filler(dtype, 0.02, 0), _Filler(dtype, 1.0, 1)
    params = [fill_p.fill(fastadam.aligned_zeros(s, dtype)) for s in wl.shapes]
    grads = [fill_g.fill(fastadam.aligned_zeros(s, dtype)) for s in wl.shapes]
    opt = fastadam.Adam(params, num_threads=threads)
    if isa is not None and isa != fastadam.config()["simd"]:
        # the path in use runs as "auto": a forced path is re-checked (CPUID) every call
        opt._isa = _core.isa_index(isa)
    opt.step(grads)  # warm-up (and page-in)
    return opt, grads


def _info(benchmark, wl, dtype, threads, isa):
    benchmark.extra_info.update(
        n_elems=wl.n_elems,
        n_tensors=wl.n_tensors,
        dtype=dtype,
        threads=threads,
        simd=isa or fastadam.config()["simd"],
        bytes_per_step=BYTES_PER_ELEM[dtype] * wl.n_elems,
    )


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"{t}T")
@pytest.mark.parametrize("isa", SIMD)
@pytest.mark.parametrize("n", SIZES, ids=_fmt)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_step(benchmark, dtype, n, isa, threads):
    benchmark.group = f"{dtype} n={_fmt(n)}"
    wl = Workload.tensor(n)
    opt, grads = _setup(wl, dtype, threads, isa)
    _info(benchmark, wl, dtype, threads, isa)
    benchmark(opt.step, grads)


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"{t}T")
@pytest.mark.parametrize("n", SIZES, ids=_fmt)
def test_adam_step_offset16(benchmark, n, threads):
    """float32, default SIMD path, with param and grad starting 16 bytes past a 64-byte
    boundary: the alignment NumPy usually gives (the moments stay 64-byte aligned)."""
    benchmark.group = f"float32 n={_fmt(n)}"
    fill_p, fill_g = _Filler("float32", 0.02, 0), _Filler("float32", 1.0, 1)
    p, g = (fastadam.aligned_zeros((n + 16,), np.float32)[4 : 4 + n] for _ in range(2))
    fill_p.fill(p)
    fill_g.fill(g)
    opt = fastadam.Adam([p], num_threads=threads)
    opt.step([g])
    _info(benchmark, Workload.tensor(n), "float32", threads, None)
    benchmark.extra_info["offset_bytes"] = 16
    benchmark(opt.step, [g])


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"{t}T")
@pytest.mark.parametrize("model", list(MODELS))
def test_model_step(benchmark, model, threads):
    benchmark.group = f"float32 {model}"
    wl = Workload.model(model)
    opt, grads = _setup(wl, "float32", threads)
    _info(benchmark, wl, "float32", threads, None)
    benchmark(opt.step, grads)


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"{t}T")
@pytest.mark.parametrize("n", SIZES, ids=_fmt)
def test_roofline(benchmark, n, threads):
    """The Adam memory pattern without arithmetic: the bound for out-of-cache sizes."""
    benchmark.group = f"float32 n={_fmt(n)}"
    p, g, m, v = (fastadam.aligned_zeros((n,), np.float32) for _ in range(4))
    _core.traffic_f32([p, g, m, v], threads)
    benchmark.extra_info.update(
        n_elems=n, dtype="float32", threads=threads, bytes_per_step=28 * n, roofline=True
    )
    benchmark(_core.traffic_f32, [p, g, m, v], threads)


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"{t}T")
@pytest.mark.parametrize("n", SIZES, ids=_fmt)
def test_torch_fused(benchmark, n, threads):
    """torch.optim.Adam(fused=True) on the same sizes, for comparison."""
    torch = pytest.importorskip("torch")
    benchmark.group = f"float32 n={_fmt(n)}"
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p = torch.nn.Parameter(torch.full((n,), 0.01))
        p.grad = torch.from_numpy(_Filler("float32", 1.0, 1).fill(np.empty(n, np.float32)))
        opt = torch.optim.Adam([p], lr=1e-3, fused=True)
        opt.step()
        benchmark.extra_info.update(
            n_elems=n, dtype="float32", threads=threads, bytes_per_step=28 * n, peer="torch fused"
        )
        benchmark(opt.step)
    finally:
        torch.set_num_threads(old)
